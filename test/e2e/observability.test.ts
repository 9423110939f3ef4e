// Observability through a real `torpor up`: one resume triggered by the router is one OpenTelemetry trace, exported
// over OTLP/HTTP to a collector run by the test, with a span per phase (matching the phases the actor records);
// the log line of that resume names actor, space, template, operation and trace; metrics cover the layers.
import assert from 'node:assert/strict';
import { readdir, rm } from 'node:fs/promises';
import { createServer, request, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { withTransferProgress } from '../../src/cli/transfers.ts';
import { counterImage } from '../fixtures/images.ts';
import { gvisorSkipReason, startTorpor, type Torpor } from './harness.ts';

interface OtlpSpan {
  traceId: string;
  spanId: string;
  parentSpanId?: string;
  name: string;
  startTimeUnixNano: string;
  endTimeUnixNano: string;
}

const skip = gvisorSkipReason();

describe('traces, logs and metrics of one resume (gVisor)', { skip }, () => {
  let t: Torpor;
  let collector: Server;
  const spans: OtlpSpan[] = [];
  let requests = 0;

  before(async () => {
    // A minimal OTLP/HTTP JSON collector: it accepts only what the protocol says (POST /v1/traces, JSON).
    collector = createServer((req, res) => {
      const chunks: Buffer[] = [];
      req.on('data', (c: Buffer) => chunks.push(c));
      req.on('end', () => {
        requests++;
        if (req.method !== 'POST' || req.url !== '/v1/traces' || !req.headers['content-type']?.includes('json')) {
          res.writeHead(400).end();
          return;
        }
        const body = JSON.parse(Buffer.concat(chunks).toString()) as {
          resourceSpans: { scopeSpans: { spans: OtlpSpan[] }[] }[];
        };
        for (const rs of body.resourceSpans) for (const ss of rs.scopeSpans) spans.push(...ss.spans);
        res.writeHead(200, { 'content-type': 'application/json' }).end('{}');
      });
    });
    await new Promise<void>((r) => collector.listen(0, '127.0.0.1', r));
    const port = (collector.address() as AddressInfo).port;
    t = await startTorpor({
      workers: 1,
      networkBase: 90,
      env: { OTEL_EXPORTER_OTLP_ENDPOINT: `http://127.0.0.1:${port}`, OTEL_BSP_SCHEDULE_DELAY: '100' },
    });
    const res = await fetch(`${t.url}/v1/templates`, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({
        name: 'traced',
        image: await counterImage(),
        port: 8080,
        readiness: { path: '/healthz', timeoutSeconds: 20 },
        resources: { memoryMiB: 64, vcpus: 1 },
      }),
    });
    assert.equal(res.status, 201, await res.text());
  });

  after(async () => {
    await t?.stop();
    collector?.close();
  });

  test('a resume through the router is one trace with a span per phase', async () => {
    await t.json('actor', 'create', 'o1', '--template', 'traced');
    const url = new URL(t.routerUrl);
    const body = await new Promise<string>((resolve, reject) => {
      const req = request(
        { host: url.hostname, port: url.port, path: '/', headers: { host: 'o1.default.actors.torpor.localhost' } },
        (res) => {
          let text = '';
          res.on('data', (d: Buffer) => {
            text += d.toString();
          });
          res.on('end', () => resolve(text));
        },
      );
      req.on('error', reject);
      req.end();
    });
    assert.equal(body.trim(), '1');
    const actor = await t.json<{ lastOperation: { id: string; kind: string; phases: Record<string, number> } }>(
      'actor',
      'get',
      'o1',
    );
    assert.equal(actor.lastOperation.kind, 'resume');

    // Spans arrive in batches: wait until the router's span for this request has come.
    const deadline = Date.now() + 15_000;
    let root: OtlpSpan | undefined;
    while (Date.now() < deadline) {
      root = spans.find((s) => s.name === 'router.request' && spans.some((c) => c.parentSpanId === s.spanId));
      if (root && spans.some((s) => s.traceId === root!.traceId && s.name === 'phase ready')) break;
      await new Promise((r) => setTimeout(r, 200));
    }
    assert.ok(root, `no router.request span with children among ${spans.map((s) => s.name).join(', ')}`);
    const trace = spans.filter((s) => s.traceId === root.traceId);
    const named = (name: string) => {
      const found = trace.filter((s) => s.name === name);
      assert.equal(found.length, 1, `one "${name}" span in the trace (got ${found.length})`);
      return found[0]!;
    };
    const resume = named('actor.resume');
    const activate = named('agent.activate');
    assert.equal(resume.parentSpanId, root.spanId, 'the resume is part of the request');
    assert.equal(activate.parentSpanId, resume.spanId, 'the node agent works inside the resume');
    // Every phase the actor's record shows is a span of this trace, as long as the record says.
    const phases = Object.entries(actor.lastOperation.phases).filter(([name]) => name !== 'total');
    assert.ok(phases.length >= 5, `phases: ${JSON.stringify(actor.lastOperation.phases)}`);
    for (const [name, ms] of phases) {
      const span = named(`phase ${name}`);
      const spanMs = Number(BigInt(span.endTimeUnixNano) - BigInt(span.startTimeUnixNano)) / 1e6;
      assert.ok(Math.abs(spanMs - ms) < 0.05, `phase ${name}: span ${spanMs} ms vs recorded ${ms} ms`);
      assert.ok([resume.spanId, activate.spanId].includes(span.parentSpanId ?? ''), `phase ${name} parent`);
    }
    for (const name of ['claim', 'prepare', 'restore', 'ready']) assert.ok(name in actor.lastOperation.phases, name);

    // The resume's log line names the actor, its space, template, operation and trace.
    const line = t
      .log()
      .split('\n')
      .filter((l) => l.startsWith('{'))
      .map((l) => JSON.parse(l) as Record<string, unknown>)
      .find((l) => l.msg === 'resume done' && l.actor === 'o1');
    assert.ok(line, 'a "resume done" log line for o1');
    assert.equal(line.space, 'default');
    assert.equal(line.template, 'traced');
    assert.equal(line.operation, actor.lastOperation.id);
    assert.equal(line.traceId, root.traceId);
  });

  test('torpor actor describe shows the actor and its operations with phase timings', async () => {
    await t.json('actor', 'suspend', 'o1');
    const text = await t.cli('actor', 'describe', 'o1');
    assert.equal(text.code, 0, text.stderr);
    assert.match(text.stdout, /^Status:\s+SUSPENDED$/m);
    assert.match(text.stdout, /^Template:\s+traced$/m);
    const rows = text.stdout.split('\n').filter((l) => /^\s+(resume|suspend)\s/.test(l));
    assert.equal(rows.length, 2, text.stdout);
    assert.match(rows[0]!, /^\s+suspend\s.*\sok\s.*checkpoint=[\d.]+/, 'newest first, with its phases');
    assert.match(rows[1]!, /^\s+resume\s.*\sok\s.*claim=[\d.]+ .*ready=[\d.]+/);
    const json = await t.json<{ actor: { status: string }; operations: { kind: string; phases: object }[] }>(
      'actor',
      'describe',
      'o1',
    );
    assert.equal(json.actor.status, 'SUSPENDED');
    assert.deepEqual(
      json.operations.map((o) => o.kind),
      ['suspend', 'resume'],
    );
    await t.json('actor', 'resume', 'o1');
  });

  test('suspend and resume on a terminal show the snapshot transfer: bytes, percentage, rate', async () => {
    const terminal = () => {
      const writes: string[] = [];
      return { writes, stream: { isTTY: true, columns: 120, write: (text: string) => writes.push(text) } };
    };
    const post = async (action: string) => {
      const res = await fetch(`${t.url}/v1/spaces/default/actors/o1/${action}`, {
        method: 'POST',
        headers: { 'content-type': 'application/json' },
        body: '{}',
      });
      assert.equal(res.status, 200, await res.text());
    };
    const path = '/v1/spaces/default/actors/o1';
    const up = terminal();
    await withTransferProgress(t.url, path, 'suspending o1', () => post('suspend'), up.stream);
    const upLine = up.writes.join('');
    assert.match(upLine, /suspending o1 +[\d.]+ (B|KiB|MiB) \/ [\d.]+ (B|KiB|MiB) +100% +[\d.]+ (B|KiB|MiB)\/s/);
    assert.ok(upLine.endsWith('\n'));
    // Without the node's own copy of that snapshot, the resume downloads it. The copy is kept in the background
    // after the suspend answers: wait for it, then take it away.
    const kept = join(t.dataDir, 'nodes', 'node0', 'snapshots');
    for (let i = 0; i < 100 && (await readdir(kept).catch(() => [])).length === 0; i++) {
      await new Promise((r) => setTimeout(r, 50));
    }
    await rm(kept, { recursive: true, force: true, maxRetries: 10, retryDelay: 50 });
    const down = terminal();
    await withTransferProgress(t.url, path, 'resuming o1', () => post('resume'), down.stream);
    assert.match(down.writes.join(''), /resuming o1 +[\d.]+ (B|KiB|MiB) \/ [\d.]+ (B|KiB|MiB) +100%/);
    // Not a terminal: nothing is drawn.
    const piped = { writes: [] as string[], stream: { isTTY: false, write: (x: string) => piped.writes.push(x) } };
    await withTransferProgress(t.url, path, 'suspending o1', () => post('suspend'), piped.stream);
    assert.deepEqual(piped.writes, []);
    await post('resume');
  });

  test('metrics cover the API, router, lifecycle phases, store, blob store, workers and actors', async () => {
    const text = await (await fetch(`${t.url}/metrics`)).text();
    for (const pattern of [
      /^torpor_api_request_seconds_count\{method="POST",route="\/v1\/templates",status="201"\} 1$/m,
      /^torpor_api_request_seconds_count\{method="GET",route="\/v1\/operations",status="200"\} [1-9]/m,
      /^torpor_router_request_seconds_count\{outcome="[^"]+"\} [1-9]/m,
      /^torpor_store_operation_seconds_count\{operation="casActor"\} [1-9]/m,
      /^torpor_blob_operation_seconds_count\{operation="put"\} [1-9]/m,
      /^torpor_blob_bytes_total\{direction="out"\} [1-9]/m,
      /^torpor_workers\{node="node0",runtime="gvisor",state="busy"\} 1$/m,
      /^torpor_actors\{status="RUNNING"\} 1$/m,
      /^torpor_actors\{status="SUSPENDED"\} 0$/m,
    ]) {
      assert.match(text, pattern);
    }
    assert.doesNotMatch(text, /route="\/v1\/spaces\/default/, 'route patterns, never actor names, as labels');
    // Every successful resume observed its ready phase once.
    const value = (re: RegExp) => Number(re.exec(text)?.[1]);
    const resumes = value(/^torpor_operations_total\{operation="resume",result="ok"\} (\d+)$/m);
    assert.ok(resumes >= 3, `resumes: ${resumes}`);
    assert.equal(value(/^torpor_operation_phase_seconds_count\{operation="resume",phase="ready"\} (\d+)$/m), resumes);
    assert.ok(requests > 0);
    // Query strings are parsed like every other list's.
    const page = await fetch(`${t.url}/v1/workers?limit=1000`);
    assert.equal(page.status, 200);
    assert.equal(((await page.json()) as { items: unknown[] }).items.length, 1);
    const bad = await fetch(`${t.url}/v1/workers?limit=0`);
    assert.equal(bad.status, 400);
    assert.equal(((await bad.json()) as { error: { field: string } }).error.field, 'limit');
  });
});
