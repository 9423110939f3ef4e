// The whole actor lifecycle through the CLI, against real runsc: create, talk, suspend, resume on the other
// worker with memory intact; pause, fork, exec, logs, delete; and bad input that must change nothing.
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { readdir, readFile, rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import type { SnapshotManifest } from '../../src/core/types.ts';
import { writeOciLayout } from '../../src/image/pack.ts';
import { referencedKeys } from '../../src/snapshot/index.ts';
import { counterImage } from '../fixtures/images.ts';
import { gvisorSkipReason, startTorpor, type Torpor } from './harness.ts';

interface Actor {
  name: string;
  space: string;
  status: string;
  version: number;
  worker?: string;
  address?: string;
  snapshot?: string;
  history: string[];
  reason?: string;
  lastOperation?: { kind: string; phases: Record<string, number> };
}

const skip = gvisorSkipReason();

async function get(address: string, path = '/'): Promise<string> {
  const res = await fetch(`http://${address}${path}`);
  assert.equal(res.status, 200, `GET ${path} on ${address}`);
  return (await res.text()).trim();
}

async function blobKeys(t: Torpor, prefix: string): Promise<string[]> {
  const dir = join(t.dataDir, 'blobs', prefix);
  const entries = await readdir(dir, { recursive: true, withFileTypes: true }).catch(() => []);
  return entries
    .filter((e) => e.isFile())
    .map((e) => join(e.parentPath, e.name).slice(join(t.dataDir, 'blobs').length + 1));
}

async function manifestOf(t: Torpor, key: string): Promise<SnapshotManifest> {
  return JSON.parse(await readFile(join(t.dataDir, 'blobs', key), 'utf8')) as SnapshotManifest;
}

/** Chunks a manifest lists for its own chunked files. */
async function manifestChunks(t: Torpor, key: string): Promise<string[]> {
  const manifest = await manifestOf(t, key);
  return manifest.files.flatMap((f) => f.chunks).filter((c): c is string => c !== null);
}

describe('actor lifecycle through the CLI (gVisor)', { skip }, () => {
  let t: Torpor;
  let templateFile: string;

  before(async () => {
    const image = await counterImage();
    t = await startTorpor({ workers: 2, networkBase: 40 });
    templateFile = join(t.dataDir, 'counter.yaml');
    await writeFile(
      templateFile,
      [
        'name: counter',
        `image: ${image}`,
        'port: 8080',
        'readiness: { path: /healthz, timeoutSeconds: 20 }',
        'resources: { memoryMiB: 128, vcpus: 1 }',
        'snapshot: { retain: 2 }',
        '',
      ].join('\n'),
    );
  });
  after(async () => {
    await t?.stop();
  });

  test('template apply is idempotent and takes a golden snapshot', async () => {
    const created = await t.json<{ name: string }>('template', 'apply', '-f', templateFile);
    assert.equal(created.name, 'counter');
    const again = await t.json<{ name: string; createdAt: string }>('template', 'apply', '-f', templateFile);
    assert.equal(again.name, 'counter');
  });

  test('requests 1, 2, 3; suspend; resume on the other worker; the next request returns 4', async () => {
    const created = await t.json<Actor>('actor', 'create', 'c1', '--template', 'counter');
    assert.equal(created.status, 'SUSPENDED');
    assert.match(created.snapshot ?? '', /^snapshots\/_golden\/counter\//, 'first resume restores the golden snapshot');

    const running = await t.json<Actor>('actor', 'resume', 'c1');
    assert.equal(running.status, 'RUNNING');
    assert.ok(running.address && running.worker);
    assert.ok((running.lastOperation?.phases.restore ?? 0) > 0, 'resumed by restore, not boot');
    assert.deepEqual(
      [await get(running.address), await get(running.address), await get(running.address)],
      ['1', '2', '3'],
    );
    assert.equal(await get(running.address, '/id'), 'default/c1');

    const suspended = await t.json<Actor>('actor', 'suspend', 'c1');
    assert.equal(suspended.status, 'SUSPENDED');
    assert.equal(suspended.worker, undefined);
    assert.match(suspended.snapshot ?? '', /^snapshots\/default\/c1\//);
    assert.ok((suspended.lastOperation?.phases.checkpoint ?? -1) >= 0);

    const workers = await t.json<{ items: { id: string }[] }>('worker', 'list');
    const other = workers.items.map((w) => w.id).find((id) => id !== running.worker);
    assert.ok(other, 'there is another worker');
    // The first worker frees itself after teardown; resuming on the *other* one must not wait for it.
    const resumed = await t.json<Actor>('actor', 'resume', 'c1', '--worker', other);
    assert.equal(resumed.status, 'RUNNING');
    assert.equal(resumed.worker, other);
    assert.equal(await get(resumed.address!), '4');
    assert.equal(await get(resumed.address!, '/id'), 'default/c1');

    // The blob store holds exactly the objects its manifests list (chunks, deltas and their keyframes' chunks, patches):
    // nothing missing, nothing orphaned.
    const manifests = (await blobKeys(t, 'snapshots')).filter((k) => k.endsWith('manifest.json'));
    assert.ok(manifests.includes(suspended.snapshot!));
    const referenced = new Set<string>();
    for (const m of manifests) for (const k of referencedKeys(await manifestOf(t, m))) referenced.add(k);
    const stored = [
      ...(await blobKeys(t, 'chunks')),
      ...(await blobKeys(t, 'deltas')),
      ...(await blobKeys(t, 'patches')),
    ];
    assert.deepEqual(new Set(stored), referenced);
    assert.ok(
      (await manifestOf(t, suspended.snapshot!)).files.some((f) => f.delta),
      'the state file is stored as a delta against the golden snapshot',
    );
  });

  test('pause keeps the checkpoint on the node and resumes from it', async () => {
    const paused = await t.json<Actor>('actor', 'pause', 'c1');
    assert.equal(paused.status, 'PAUSED');
    const resumed = await t.json<Actor>('actor', 'resume', 'c1');
    assert.equal(resumed.status, 'RUNNING');
    assert.equal(resumed.lastOperation?.phases.fetch, undefined, 'restored from the node, no fetch');
    assert.equal(await get(resumed.address!), '5');
  });

  test('exec runs a command inside the running actor; logs show its output', async () => {
    const r = await t.cli('actor', 'exec', 'c1', '--', '/bin/busybox', 'cat', '/run/torpor/actor-id');
    assert.equal(r.code, 0, r.stderr);
    assert.equal(r.stdout.trim(), 'default/c1');
    const failing = await t.cli('actor', 'exec', 'c1', '--', '/bin/busybox', 'false');
    assert.equal(failing.code, 1);
    const logs = await t.cli('actor', 'logs', 'c1');
    assert.equal(logs.code, 0, logs.stderr);
    assert.match(logs.stdout, /count 5/);
  });

  test('fork starts a new actor from the latest snapshot; suspends are idempotent', async () => {
    const s1 = await t.json<Actor>('actor', 'suspend', 'c1');
    const s2 = await t.json<Actor>('actor', 'suspend', 'c1');
    assert.equal(s2.version, s1.version, 'a repeated suspend changes nothing');
    const fork = await t.json<Actor>('actor', 'fork', 'c1', '--name', 'c2');
    assert.equal(fork.snapshot, s1.snapshot);
    const running = await t.json<Actor>('actor', 'resume', 'c2');
    assert.equal(await get(running.address!), '6');
    await t.json<Actor>('actor', 'suspend', 'c2');
    const del = await t.cli('actor', 'delete', 'c2');
    assert.equal(del.code, 0, del.stderr);
    const gone = await t.cli('actor', 'get', 'c2');
    assert.equal(gone.code, 1);
    assert.match(gone.stderr, /NOT_FOUND/);
  });

  test('garbage collection leaves exactly the live snapshots and the objects they use', async () => {
    // c2 was deleted and c1 has been suspended more often than its template retains (2): both left garbage.
    const live = async () => {
      const actors = await t.json<{ items: Actor[] }>('actor', 'list');
      const keys = new Set(actors.items.flatMap((a) => [a.snapshot, ...a.history]).filter((k): k is string => !!k));
      const templates = await t.json<{ items: { goldenSnapshot?: string }[] }>('template', 'list');
      for (const tpl of templates.items) if (tpl.goldenSnapshot) keys.add(tpl.goldenSnapshot);
      return keys;
    };
    const stored = async () => new Set((await blobKeys(t, 'snapshots')).filter((k) => k.endsWith('manifest.json')));
    const deadline = Date.now() + 20_000;
    let manifests = await stored();
    let expected = await live();
    while (Date.now() < deadline && [...manifests].some((m) => !expected.has(m))) {
      await new Promise((r) => setTimeout(r, 250));
      manifests = await stored();
      expected = await live();
    }
    assert.deepEqual(manifests, expected, 'every stored manifest is live, and every live one is stored');
    const referenced = new Set<string>();
    for (const m of manifests) for (const k of referencedKeys(await manifestOf(t, m))) referenced.add(k);
    const objects = [
      ...(await blobKeys(t, 'chunks')),
      ...(await blobKeys(t, 'deltas')),
      ...(await blobKeys(t, 'patches')),
    ];
    assert.deepEqual(new Set(objects), referenced);
    const metrics = await (await fetch(`${t.url}/metrics`)).text();
    assert.match(metrics, /torpor_snapshot_gc_deleted_total\{kind="manifest"\} [1-9]/);
  });

  test('metrics and OpenAPI are served', async () => {
    const metrics = await (await fetch(`${t.url}/metrics`)).text();
    assert.match(metrics, /torpor_operations_total\{operation="resume",result="ok"\} [1-9]/);
    assert.match(metrics, /torpor_operation_phase_seconds_bucket\{[^}]*phase="checkpoint"/);
    const doc = (await (await fetch(`${t.url}/openapi.json`)).json()) as { paths: Record<string, unknown> };
    assert.ok(doc.paths['/v1/spaces/{space}/actors/{name}/resume']);
  });

  describe('bad input changes nothing', () => {
    async function actorsSnapshot(): Promise<string> {
      return JSON.stringify((await t.json<{ items: Actor[] }>('actor', 'list')).items);
    }

    test('an invalid actor name is INVALID_ARGUMENT naming the field', async () => {
      const before = await actorsSnapshot();
      const r = await t.cli('actor', 'create', 'Bad_Name', '--template', 'counter');
      assert.equal(r.code, 1);
      assert.match(r.stderr, /INVALID_ARGUMENT: name: must be a DNS-1123 label/);
      assert.equal(await actorsSnapshot(), before);
    });

    test('an unknown template is NOT_FOUND on field template', async () => {
      const before = await actorsSnapshot();
      const res = await fetch(`${t.url}/v1/spaces/default/actors`, {
        method: 'POST',
        headers: { 'content-type': 'application/json' },
        body: JSON.stringify({ name: 'orphan', template: 'nope' }),
      });
      assert.equal(res.status, 404);
      assert.deepEqual(((await res.json()) as { error: unknown }).error, {
        code: 'NOT_FOUND',
        message: 'template "nope" not found',
        field: 'template',
      });
      assert.equal(await actorsSnapshot(), before);
    });

    test('an oversized body is PAYLOAD_TOO_LARGE', async () => {
      const before = await actorsSnapshot();
      const res = await fetch(`${t.url}/v1/spaces/default/actors`, {
        method: 'POST',
        headers: { 'content-type': 'application/json' },
        body: JSON.stringify({ name: 'big', template: 'counter', labels: { pad: 'x'.repeat(2 * 1024 * 1024) } }),
      });
      assert.equal(res.status, 413);
      assert.equal(((await res.json()) as { error: { code: string } }).error.code, 'PAYLOAD_TOO_LARGE');
      assert.equal(await actorsSnapshot(), before);
    });

    test('a changed spec under an existing template name is ALREADY_EXISTS', async () => {
      const res = await fetch(`${t.url}/v1/templates`, {
        method: 'POST',
        headers: { 'content-type': 'application/json' },
        body: JSON.stringify({ name: 'counter', image: '/nonexistent', port: 9090 }),
      });
      assert.equal(res.status, 409);
      const tpl = await t.json<{ port: number }>('template', 'get', 'counter');
      assert.equal(tpl.port, 8080);
    });

    test('a template whose image has a hostile layer is IMAGE_REJECTED and not created', async () => {
      const image = join(t.dataDir, 'hostile');
      await writeOciLayout(image, {
        layers: [[{ path: '../../escape', type: 'file', content: 'pwned' }]],
        config: { entrypoint: ['/x'] },
      });
      const file = join(t.dataDir, 'hostile.yaml');
      await writeFile(file, `name: hostile\nimage: ${image}\nport: 8080\n`);
      const r = await t.cli('template', 'apply', '-f', file);
      assert.equal(r.code, 1);
      assert.match(r.stderr, /IMAGE_REJECTED/);
      const get = await t.cli('template', 'get', 'hostile');
      assert.match(get.stderr, /NOT_FOUND/);
      assert.equal(existsSync(join(t.dataDir, '..', 'escape')), false);
    });

    test('a sandbox that dies under a suspend rolls the actor back to its last snapshot, never stuck RUNNING', async () => {
      const running = await t.json<Actor>('actor', 'resume', 'c1');
      const before = await t.json<Actor>('actor', 'get', 'c1');
      const runsc = process.env.TORPOR_RUNSC ?? '/var/cache/torpor/assets/runsc';
      const root = join(t.dataDir, 'nodes', 'node0', 'workers', running.worker!, 'runsc');
      const state = execFileSync(runsc, ['--root', root, 'state', `${running.worker}--default--c1`]).toString();
      process.kill((JSON.parse(state) as { pid: number }).pid, 'SIGKILL');
      const r = await t.cli('actor', 'suspend', 'c1');
      assert.equal(r.code, 1);
      assert.match(r.stderr, /RUNTIME_ERROR/);
      const after = await t.json<Actor>('actor', 'get', 'c1');
      assert.equal(after.status, 'SUSPENDED');
      assert.equal(after.snapshot, before.snapshot, 'the last good snapshot is kept');
      assert.match(after.reason ?? '', /sandbox died/);
      const workers = await t.json<{ items: { state: string }[] }>('worker', 'list');
      assert.ok(
        workers.items.every((w) => w.state === 'free'),
        'the worker is freed',
      );
      await t.json<Actor>('actor', 'resume', 'c1');
      await t.json<Actor>('actor', 'suspend', 'c1');
    });

    test('a corrupted chunk fails the resume with SNAPSHOT_CORRUPT and keeps the good snapshot', async () => {
      const before = await t.json<Actor>('actor', 'get', 'c1');
      assert.equal(before.status, 'SUSPENDED');
      // Corrupt an object only this snapshot uses: its delta (or, without one, its first chunk).
      const manifest = await manifestOf(t, before.snapshot!);
      const delta = manifest.files.find((f) => f.delta)?.delta;
      const chunks = await manifestChunks(t, before.snapshot!);
      const victim = join(t.dataDir, 'blobs', delta ? delta.object : `chunks/${chunks[0]}`);
      const original = await readFile(victim);
      // Also drop the node's cached chunks and snapshot copies so the store's corrupt copy is what the restore reads.
      await rmNodeCaches(t);
      await writeFile(victim, Buffer.from('definitely not the chunk'));
      const r = await t.cli('actor', 'resume', 'c1');
      assert.equal(r.code, 1);
      assert.match(r.stderr, /SNAPSHOT_CORRUPT/);
      const after = await t.json<Actor>('actor', 'get', 'c1');
      assert.equal(after.status, 'SUSPENDED');
      assert.equal(after.snapshot, before.snapshot);
      assert.match(after.reason ?? '', /resume failed/);
      await writeFile(victim, original);
      const resumed = await t.json<Actor>('actor', 'resume', 'c1');
      assert.equal(await get(resumed.address!), '6', 'c1 continues from its own snapshot (5), not its fork');
    });
  });
});

async function rmNodeCaches(t: Torpor): Promise<void> {
  const nodes = await readdir(join(t.dataDir, 'nodes'));
  for (const n of nodes) {
    for (const cache of ['chunks', 'snapshots'])
      await rm(join(t.dataDir, 'nodes', n, cache), { recursive: true, force: true });
  }
}
