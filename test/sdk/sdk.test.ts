// The SDK against a real `torpor up` on runsc: every method, typed errors, retries (through a proxy that injects
// failures in front of the real API), and the README's SDK examples, run as they are written.
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import http from 'node:http';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { pathToFileURL } from 'node:url';
import { Actor, Template, TorporApiError } from '../../packages/sdk/src/index.ts';
import { renderSdkTypes, SDK_TYPES } from '../../scripts/gen-sdk-types.ts';
import { gvisorSkipReason, startTorpor, type Torpor } from '../e2e/harness.ts';

const ROOT = resolve(import.meta.dirname, '../..');
const skip = gvisorSkipReason();

describe('SDK package', () => {
  test('the committed generated types match the OpenAPI document', async () => {
    assert.equal(
      readFileSync(SDK_TYPES, 'utf8'),
      await renderSdkTypes(),
      'packages/sdk/src/openapi.ts is stale: run npm run gen:sdk-types',
    );
  });

  test('the SDK typechecks with browser types only (no Node modules or globals)', async () => {
    const r = await run(join(ROOT, 'node_modules/.bin/tsc'), ['--noEmit', '-p', 'packages/sdk/tsconfig.json']);
    assert.equal(r.code, 0, r.stdout + r.stderr);
  });
});

describe('SDK against torpor up (gVisor)', { skip }, () => {
  let t: Torpor;
  let opts: { apiUrl: string; routerUrl: string; space: string };

  before(async () => {
    t = await startTorpor({ workers: 2, networkBase: 140, args: ['--sample'] });
    opts = { apiUrl: t.url, routerUrl: t.routerUrl, space: 'sdk' };
    // --sample applies the "counter" template after the server starts listening.
    for (let i = 0; i < 600 && !(await Template.get('counter', opts).catch(() => undefined)); i++) await sleep(100);
    // …and then creates the sample actor.
    const sample = { ...opts, space: 'default' };
    for (let i = 0; i < 600 && !(await Actor.connect('counter', sample).catch(() => undefined)); i++) await sleep(100);
  });
  after(async () => {
    await t?.stop();
  });

  test('Template.apply, get and list', async () => {
    const { image } = await Template.get('counter', opts);
    const spec = { name: 'sdk-counter', image, port: 8080, readiness: { path: '/healthz' }, idleTimeoutSeconds: 0 };
    const created = await Template.apply(spec, opts);
    assert.equal(created.name, 'sdk-counter');
    assert.equal(created.resources.memoryMiB, 256, 'defaults filled in by the server');
    const again = await Template.apply(spec, opts);
    assert.equal(again.createdAt, created.createdAt, 'applying the same spec again changes nothing');
    const names = (await Template.list(opts)).map((x) => x.name);
    assert.deepEqual(names.sort(), ['counter', 'sdk-counter']);
    await assert.rejects(Template.apply({ ...spec, port: 9090 }, opts), { code: 'ALREADY_EXISTS', status: 409 });
  });

  test('Actor.create, connect and list', async () => {
    const a = await Actor.create({ ...opts, template: 'sdk-counter', name: 'a1', labels: { team: 'sdk' } });
    assert.equal(a.status, 'SUSPENDED');
    assert.equal(a.space, 'sdk');
    assert.deepEqual(a.info.labels, { team: 'sdk' });
    const again = await Actor.connect('a1', opts);
    // Same actor (not the same version: the template's golden snapshot may land on it in between).
    assert.equal(again.info.createdAt, a.info.createdAt);
    assert.equal(again.info.template, 'sdk-counter');
    assert.deepEqual(
      (await Actor.list(opts)).map((x) => x.name),
      ['a1'],
    );
    const everywhere = (await Actor.list({ ...opts, allSpaces: true })).map((x) => `${x.space}/${x.name}`);
    assert.deepEqual(everywhere.sort(), ['default/counter', 'sdk/a1']);
    const generated = await Actor.create({ ...opts, template: 'sdk-counter' });
    assert.match(generated.name, /^sdk-counter-[a-z0-9]{6}$/);
    await generated.delete();
  });

  test('resume, fetch through the router, pause, suspend, refresh', async () => {
    const a = await Actor.connect('a1', opts);
    assert.equal(new URL(a.url).hostname, 'a1.sdk.actors.torpor.localhost');
    assert.equal(new URL(a.url).port, new URL(t.routerUrl).port);
    await a.resume();
    assert.equal(a.status, 'RUNNING');
    assert.ok((a.info.lastOperation?.phases.restore ?? 0) > 0, 'resumed by restore');
    assert.equal(await text(a.fetch('/')), '1');
    assert.equal(await text(a.fetch('/id')), 'sdk/a1');
    await a.pause();
    assert.equal(a.status, 'PAUSED');
    await a.resume();
    assert.equal(await text(a.fetch('/')), '2');
    await a.suspend();
    assert.equal(a.status, 'SUSPENDED');
    assert.equal(a.info.worker, undefined);
    // The router resumes a suspended actor on the first request: the count continues from the snapshot.
    assert.equal(await text(a.fetch('/')), '3');
    assert.equal(a.status, 'SUSPENDED', 'the handle shows what it last saw');
    await a.refresh();
    assert.equal(a.status, 'RUNNING');
    const headers = await text(a.fetch('/headers', { headers: { 'x-sdk-test': 'yes' } }));
    assert.match(headers, /^x-sdk-test: yes\r?$/m, 'init headers reach the actor');
    assert.doesNotMatch(headers, /x-torpor-actor/i, 'the router keeps its addressing header from the actor');
    // The actor's own answers come back as they are, errors included.
    const post = await a.fetch('/', { method: 'POST', body: 'x' });
    assert.equal(post.status, 404);
    assert.equal((await post.text()).trim(), 'not found');
  });

  test('exec streams its output as the command writes it', async () => {
    const a = await Actor.connect('a1', opts);
    const seen: { text: string; at: number }[] = [];
    const t0 = Date.now();
    const result = await a.exec(['/bin/busybox', 'sh', '-c', 'echo one; sleep 1.5; echo two >&2; exit 3'], {
      onStdout: (text) => seen.push({ text, at: Date.now() - t0 }),
      onStderr: (text) => seen.push({ text: `err:${text}`, at: Date.now() - t0 }),
    });
    const done = Date.now() - t0;
    assert.deepEqual(result, { exitCode: 3, stdout: 'one\n', stderr: 'two\n' });
    assert.deepEqual(
      seen.map((s) => s.text),
      ['one\n', 'err:two\n'],
    );
    assert.ok(done - seen[0]!.at >= 1000, `"one" arrived ${done - seen[0]!.at} ms before the end, not streamed`);
    const id = await a.exec(['/bin/busybox', 'cat', '/run/torpor/actor-id']);
    assert.deepEqual(id, { exitCode: 0, stdout: 'sdk/a1', stderr: '' });
  });

  test('logs, and logs that follow', async () => {
    const a = await Actor.connect('a1', opts);
    let all = '';
    for await (const chunk of a.logs()) all += chunk;
    assert.match(all, /count 3\n/);
    const stop = new AbortController();
    let followed = '';
    const following = (async () => {
      for await (const chunk of a.logs({ follow: true, signal: stop.signal })) {
        followed += chunk;
        if (followed.includes('count 5')) stop.abort();
      }
    })();
    await sleep(300);
    assert.equal(await text(a.fetch('/')), '4');
    assert.equal(await text(a.fetch('/')), '5');
    const timer = setTimeout(() => stop.abort(), 10_000);
    await following;
    clearTimeout(timer);
    assert.match(followed, /count 4\n.*count 5/s);
  });

  test('fork and delete', async () => {
    const a = await Actor.connect('a1', opts);
    await a.suspend();
    const copy = await a.fork({ name: 'a1-copy', labels: { copy: 'yes' } });
    assert.equal(copy.status, 'SUSPENDED');
    assert.equal(copy.info.snapshot, a.info.snapshot);
    assert.equal(await text(copy.fetch('/')), '6', 'the fork continues from the snapshot');
    await copy.suspend();
    await copy.delete();
    await assert.rejects(Actor.connect('a1-copy', opts), (err: unknown) => {
      assert.ok(err instanceof TorporApiError);
      assert.equal(err.code, 'NOT_FOUND');
      assert.equal(err.status, 404);
      assert.equal(err.field, 'name');
      return true;
    });
  });

  test('typed errors carry the server code, status and field', async () => {
    await assert.rejects(Actor.create({ ...opts, template: 'sdk-counter', name: 'Bad_Name' }), {
      name: 'TorporApiError',
      code: 'INVALID_ARGUMENT',
      status: 400,
      field: 'name',
    });
    await assert.rejects(Actor.create({ ...opts, template: 'nope', name: 'orphan' }), {
      code: 'NOT_FOUND',
      field: 'template',
    });
    const a = await Actor.connect('a1', opts);
    assert.equal(a.status, 'SUSPENDED');
    await assert.rejects(a.exec(['/bin/busybox', 'true']), {
      code: 'FAILED_PRECONDITION',
      status: 409,
      field: 'status',
    });
    await assert.rejects(a.fetch('no-slash'), { code: 'INVALID_ARGUMENT', field: 'path' });
    // The router's own failures throw (the actor's own 404 does not: see above).
    const ghost = await Actor.create({ ...opts, template: 'sdk-counter', name: 'ghost' });
    await ghost.delete();
    await assert.rejects(ghost.fetch('/'), { code: 'NOT_FOUND', status: 404 });
    await assert.rejects(Actor.connect('a1', { ...opts, apiUrl: 'http://127.0.0.1:1', retries: 1 }), {
      code: 'UNREACHABLE',
      status: 0,
    });
  });

  describe('retries: transient failures only, idempotent calls only', () => {
    let proxy: FaultProxy;
    before(async () => {
      proxy = await faultProxy(t.url);
    });
    after(() => proxy.close());

    test('503 and a dropped connection are retried for reads and state changes', async () => {
      proxy.fail([{ status: 503 }, { drop: true }]);
      const a = await Actor.connect('a1', { ...opts, apiUrl: proxy.url });
      assert.equal(a.name, 'a1');
      assert.equal(proxy.requests, 3, 'two failures, then the real answer');
      proxy.fail([{ status: 504 }]);
      await a.resume();
      assert.equal(a.status, 'RUNNING');
      assert.equal(proxy.requests, 2);
      proxy.fail([{ status: 429, retryAfter: '0' }]);
      await a.suspend();
      assert.equal(a.status, 'SUSPENDED');
      assert.equal(proxy.requests, 2);
    });

    test('not retried: creates, 429 without Retry-After, Torpor RUNTIME_ERROR, exhausted retries', async () => {
      proxy.fail([{ status: 503 }]);
      await assert.rejects(Actor.create({ ...opts, apiUrl: proxy.url, template: 'sdk-counter', name: 'r1' }), {
        code: 'NO_CAPACITY',
        status: 503,
      });
      assert.equal(proxy.requests, 1);
      await assert.rejects(Actor.connect('r1', opts), { code: 'NOT_FOUND' }, 'the create never reached Torpor');
      proxy.fail([{ status: 429 }]);
      await assert.rejects(Actor.connect('a1', { ...opts, apiUrl: proxy.url }), { status: 429 });
      assert.equal(proxy.requests, 1);
      proxy.fail([{ status: 502, body: { error: { code: 'RUNTIME_ERROR', message: 'sandbox died' } } }]);
      await assert.rejects(Actor.connect('a1', { ...opts, apiUrl: proxy.url }), {
        code: 'RUNTIME_ERROR',
        message: 'sandbox died',
      });
      assert.equal(proxy.requests, 1);
      proxy.fail([{ status: 503 }, { status: 503 }, { status: 503 }]);
      await assert.rejects(Actor.connect('a1', { ...opts, apiUrl: proxy.url, retries: 2 }), { status: 503 });
      assert.equal(proxy.requests, 3);
    });
  });

  test("the README's SDK examples run and print what the README says", async () => {
    const examples = readmeExamples(readFileSync(join(ROOT, 'README.md'), 'utf8'));
    assert.equal(examples.length, 2);
    const dir = await mkdtemp(join(tmpdir(), 'torpor-readme-'));
    try {
      for (const [i, example] of examples.entries()) {
        const file = join(dir, `example${i}.mts`);
        const sdk = pathToFileURL(join(ROOT, 'packages/sdk/src/index.ts')).href;
        await writeFile(file, example.code.replaceAll("'@torpor/sdk'", `'${sdk}'`));
        const r = await run(process.execPath, [file], {
          TORPOR_API_URL: t.url,
          TORPOR_ROUTER_URL: t.routerUrl,
        });
        assert.equal(r.code, 0, `example ${i + 1} failed:\n${r.stderr}`);
        assert.equal(r.stdout, example.prints, `example ${i + 1} printed something else`);
      }
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });
});

// ------------------------------------------------------------------ helpers

async function text(response: Promise<Response>): Promise<string> {
  const res = await response;
  assert.equal(res.status, 200);
  return (await res.text()).trim();
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

function run(program: string, args: string[], env: Record<string, string> = {}) {
  return new Promise<{ code: number; stdout: string; stderr: string }>((done) => {
    execFile(program, args, { cwd: ROOT, env: { ...process.env, ...env }, timeout: 180_000 }, (err, stdout, stderr) =>
      done({ code: err ? (typeof err.code === 'number' ? err.code : 1) : 0, stdout, stderr }),
    );
  });
}

/** The ```ts blocks of the README's "## SDK" section, each with the ```text block after "prints". */
function readmeExamples(readme: string): { code: string; prints: string }[] {
  const start = readme.indexOf('\n## SDK\n');
  assert.ok(start >= 0, 'README has an SDK section');
  const section = readme.slice(start + 1, readme.indexOf('\n## ', start + 1));
  const blocks = [...section.matchAll(/```(ts|text)\n([\s\S]*?)```/g)];
  const out: { code: string; prints: string }[] = [];
  for (const [i, block] of blocks.entries()) {
    if (block[1] !== 'ts') continue;
    const next = blocks[i + 1];
    out.push({ code: block[2]!, prints: next?.[1] === 'text' ? next[2]! : '' });
  }
  return out;
}

interface Fault {
  status?: number;
  retryAfter?: string;
  body?: unknown;
  /** Close the connection without answering. */
  drop?: boolean;
}

interface FaultProxy {
  url: string;
  /** The next requests get these faults, in order; later ones go to Torpor. Resets the request count. */
  fail: (faults: Fault[]) => void;
  requests: number;
  close: () => void;
}

/** A proxy in front of the real API that answers the next requests with the given faults. */
async function faultProxy(target: string): Promise<FaultProxy> {
  let queue: Fault[] = [];
  const state = { requests: 0 };
  const server = http.createServer((req, res) => {
    state.requests++;
    const fault = queue.shift();
    if (fault?.drop) {
      req.socket.destroy();
      return;
    }
    if (fault) {
      const headers: Record<string, string> = { 'content-type': 'application/json' };
      if (fault.retryAfter !== undefined) headers['retry-after'] = fault.retryAfter;
      res.writeHead(fault.status ?? 503, headers);
      res.end(JSON.stringify(fault.body ?? { message: 'injected' }));
      return;
    }
    const upstream = http.request(
      new URL(req.url ?? '/', target),
      { method: req.method, headers: req.headers },
      (up) => {
        res.writeHead(up.statusCode ?? 502, up.headers);
        up.pipe(res);
      },
    );
    req.pipe(upstream);
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  const { port } = server.address() as { port: number };
  return {
    url: `http://127.0.0.1:${port}`,
    fail(faults) {
      queue = [...faults];
      state.requests = 0;
    },
    get requests() {
      return state.requests;
    },
    close: () => server.close(),
  };
}
