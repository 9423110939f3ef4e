// Micro-VM actors end to end on a real `torpor up` with two nodes, each with one gVisor and one micro-VM worker
// (QEMU; TCG unless a KVM probe boot succeeds): the in-RAM counter is suspended to the object store and resumed
// on the other node with its count intact, the actor id file is fresh after every resume, exec works (its output
// streamed as the command writes it), the checkpoint's per-phase timings reach the actor's lastOperation and the
// metrics, a fork continues from the source's snapshot, and a VMM that dies is noticed and the actor rolled back
// to its last snapshot.
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { lstat, readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { locateMicrovm } from '../../src/runtime/microvm/locate.ts';
import { counterImage } from '../fixtures/images.ts';
import { gvisorSkipReason, startTorpor, type Torpor } from './harness.ts';

const BASE = 200;
const skip = gvisorSkipReason() ?? (locateMicrovm().missing.join('; ') || undefined);

interface Actor {
  name: string;
  status: string;
  worker?: string;
  node?: string;
  address?: string;
  snapshot?: string;
  reason?: string;
  lastOperation?: { kind: string; phases: Record<string, number> };
}

describe('micro-VM actors through the API (QEMU)', { skip, timeout: 600_000 }, () => {
  let t: Torpor;

  async function api<T>(method: string, path: string, body?: unknown): Promise<T> {
    const res = await fetch(`${t.url}${path}`, {
      method,
      ...(body !== undefined ? { headers: { 'content-type': 'application/json' }, body: JSON.stringify(body) } : {}),
    });
    const text = await res.text();
    assert.ok(res.ok, `${method} ${path}: ${res.status} ${text}`);
    return (text ? JSON.parse(text) : undefined) as T;
  }
  const actorPath = (name: string) => `/v1/spaces/default/actors/${name}`;
  const get = async (a: Actor, path = '/') => (await (await fetch(`http://${a.address}${path}`)).text()).trim();

  before(async () => {
    t = await startTorpor({ workers: 1, networkBase: BASE, args: ['--nodes', '2', '--microvm-workers', '1'] });
  });
  after(async () => {
    await t?.stop();
  });

  test('a counter suspended to storage resumes on another node with its count, then forks', async () => {
    await api('POST', '/v1/templates', {
      name: 'vm-counter',
      image: await counterImage(),
      port: 8080,
      runtime: 'microvm',
      readiness: { path: '/healthz', timeoutSeconds: 60 },
      resources: { memoryMiB: 128, vcpus: 1 },
    });
    const workers = await api<{ items: { id: string; runtime: string }[] }>('GET', '/v1/workers');
    assert.deepEqual(
      workers.items
        .filter((w) => w.runtime === 'microvm')
        .map((w) => w.id)
        .sort(),
      ['node0-m0', 'node1-m0'],
    );
    // The create waits for the template's golden snapshot (a boot, then a checkpoint).
    await api('POST', '/v1/spaces/default/actors', { name: 'vm1', template: 'vm-counter' });

    const first = await api<Actor>('POST', `${actorPath('vm1')}/resume`, { worker: 'node0-m0' });
    assert.equal(first.status, 'RUNNING');
    assert.equal(first.node, 'node0');
    assert.equal(typeof first.lastOperation?.phases.restore, 'number', 'the first resume restores the golden one');
    assert.deepEqual([await get(first), await get(first)], ['1', '2']);
    assert.equal(await get(first, '/id'), 'default/vm1');
    const uname = await api<{ exitCode: number; stdout: string }>('POST', `${actorPath('vm1')}/exec`, {
      command: ['/bin/busybox', 'cat', '/proc/version'],
    });
    assert.equal(uname.exitCode, 0);
    assert.match(uname.stdout, /^Linux version /, 'a real guest kernel, not gVisor');

    // Streamed exec: the first line reaches the client while the command still runs (it sleeps 2 s after it).
    const t0 = performance.now();
    const res = await fetch(`${t.url}${actorPath('vm1')}/exec`, {
      method: 'POST',
      headers: { 'content-type': 'application/json', accept: 'application/x-ndjson' },
      body: JSON.stringify({
        command: ['/bin/busybox', 'sh', '-c', 'echo one; sleep 2; echo two >&2; sleep 1; echo three; exit 3'],
      }),
    });
    assert.equal(res.status, 200);
    const seen: { at: number; line: Record<string, unknown> }[] = [];
    let buffered = '';
    for await (const chunk of res.body!) {
      buffered += Buffer.from(chunk).toString();
      for (let nl = buffered.indexOf('\n'); nl >= 0; nl = buffered.indexOf('\n')) {
        seen.push({ at: performance.now() - t0, line: JSON.parse(buffered.slice(0, nl)) });
        buffered = buffered.slice(nl + 1);
      }
    }
    assert.deepEqual(
      seen.map((s) => s.line),
      [{ stdout: 'one\n' }, { stderr: 'two\n' }, { stdout: 'three\n' }, { exitCode: 3 }],
    );
    const done = seen.at(-1)!.at;
    assert.ok(done - seen[0]!.at >= 2500, `"one" arrived ${done - seen[0]!.at} ms before the end, not streamed`);

    const suspended = await api<Actor>('POST', `${actorPath('vm1')}/suspend`);
    assert.equal(suspended.status, 'SUSPENDED');
    for (const phase of ['pause', 'snapshot', 'capture', 'shutdown', 'teardown']) {
      assert.equal(typeof suspended.lastOperation?.phases[phase], 'number', `suspend phase ${phase}`);
    }
    assert.match(t.log(), /"msg":"actor checkpointed"/);
    const metrics = await (await fetch(`${t.url}/metrics`)).text();
    assert.match(metrics, /phase="snapshot"/);

    const moved = await api<Actor>('POST', `${actorPath('vm1')}/resume`, { worker: 'node1-m0' });
    assert.equal(moved.node, 'node1');
    assert.equal(await get(moved), '3', 'the in-RAM count survived the move');
    assert.equal(await get(moved, '/id'), 'default/vm1');

    const resuspended = await api<Actor>('POST', `${actorPath('vm1')}/suspend`);
    // node1 keeps a copy of that snapshot: its memory moves from tmpfs to disk once the suspend is acknowledged.
    const kept = join(
      t.dataDir,
      'nodes',
      'node1',
      'snapshots',
      createHash('sha256').update(resuspended.snapshot!).digest('hex').slice(0, 32),
      'memory',
    );
    for (let i = 0; i < 200 && !(await lstat(kept).catch(() => undefined))?.isFile(); i++) {
      await new Promise((r) => setTimeout(r, 50));
    }
    assert.ok((await lstat(kept)).isFile(), 'the kept snapshot’s memory reached the disk');
    const keptSha = createHash('sha256')
      .update(await readFile(kept))
      .digest('hex');
    const fork = await api<Actor>('POST', `${actorPath('vm1')}/fork`, { name: 'vm2' });
    assert.equal(fork.status, 'SUSPENDED');
    const forked = await api<Actor>('POST', `${actorPath('vm2')}/resume`, { worker: 'node0-m0' });
    const original = await api<Actor>('POST', `${actorPath('vm1')}/resume`, { worker: 'node1-m0' });
    assert.equal(await get(forked), '4');
    assert.equal(await get(forked, '/id'), 'default/vm2', 'a fork reads its own id');
    assert.equal(await get(original), '4', 'the fork and its source count independently');
    assert.equal(await get(original), '5');
    // Resumed on the worker that suspended it: the VM took the guest memory that worker still held, no copy of
    // the kept snapshot (which stays as it was: the next suspend compares against it).
    assert.equal(typeof original.lastOperation?.phases.take, 'number', JSON.stringify(original.lastOperation));
    assert.equal(original.lastOperation?.phases.memory, undefined);
    // ... in the VMM the idle worker had launched on that memory (prelaunch): the resume only loaded the state.
    assert.equal(typeof original.lastOperation?.phases.adopt, 'number', JSON.stringify(original.lastOperation));
    assert.equal(
      createHash('sha256')
        .update(await readFile(kept))
        .digest('hex'),
      keptSha,
    );

    // A VMM that dies is noticed: the worker's lease is expired and the reconciler rolls the actor back.
    const pid = Number.parseInt(
      await readFile(
        join(t.dataDir, 'nodes', 'node0', 'workers', 'node0-m0', 'microvm', 'node0-m0--default--vm2', 'pid'),
        'utf8',
      ),
      10,
    );
    process.kill(pid, 'SIGKILL');
    let after: Actor = forked;
    for (let i = 0; i < 120 && after.status === 'RUNNING'; i++) {
      await new Promise((r) => setTimeout(r, 250));
      after = await api<Actor>('GET', actorPath('vm2'));
    }
    assert.equal(after.status, 'SUSPENDED');
    assert.match(after.reason ?? '', /worker node0-m0 was lost/);
    // The lost worker comes back once its VMM is reaped (the other one still runs vm1): wait for it.
    for (let i = 0; i < 120; i++) {
      const workers = await api<{ items: { runtime: string; state: string }[] }>('GET', '/v1/workers');
      if (workers.items.some((w) => w.runtime === 'microvm' && w.state === 'free')) break;
      await new Promise((r) => setTimeout(r, 250));
    }
    const recovered = await api<Actor>('POST', `${actorPath('vm2')}/resume`);
    assert.equal(await get(recovered), '4', 'recovered from its last snapshot');

    for (const name of ['vm1', 'vm2']) {
      await api('POST', `${actorPath(name)}/suspend`);
      await api('DELETE', actorPath(name));
    }
  });
});
