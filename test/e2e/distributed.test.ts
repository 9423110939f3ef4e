// Torpor beyond one machine, all real processes: redis-server as the state store, Ceph radosgw as the blob
// store, one `torpor server`, two `torpor agent`s each in its own node network namespace, and one `torpor
// router`. An actor suspended on node A resumes on node B through S3 with its memory intact; an agent killed
// with -9 loses its lease and its actor goes back to its last snapshot; an agent stopped with SIGTERM drains (its
// actor is suspended and resumes on the other node); the agents' transfer progress reaches the server's event
// stream; and a kill -9 at each named step of suspend and resume, of the agent and of the server, leaves the actor
// consistent once the process is back: a snapshot pointer that names a manifest in S3 that restores, workers that
// are free unless they run it, and a count that never goes back past the last acknowledged suspend.
import assert from 'node:assert/strict';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { S3BlobStore } from '../../src/blob/s3.ts';
import { createBucket, type RunningS3, startS3 } from '../blob/s3-helpers.ts';
import { counterImage } from '../fixtures/images.ts';
import { type RedisServer, startRedis } from '../store/redis-server.ts';
import { run, TorporProcess, torpor } from './cluster.ts';
import { gvisorSkipReason, nftSkipReason } from './harness.ts';

/** Node A and node B: network indices (namespaces torpor-node224/225, one worker each: 10.213.224/225.2). Not 220
 * (test/e2e/k8s.test.ts) nor 232 (k8s-agent.test.ts). */
const NODES = { 'node-a': 224, 'node-b': 225 } as const;
type NodeName = keyof typeof NODES;
/** The control plane's address on this host, reachable from the node namespaces through their uplinks (in
 * 10.214.0.0/16, which actors are refused by default). The server, S3 and the router listen there. */
const CONTROL = '10.214.224.254';
// Longer than an agent takes to restart on a loaded 2-core machine (3–4 s), or a restart would count as a lost node.
const LEASE_SECONDS = 6;
const BUCKET = 'torpor-dist';
/** How long a stopping agent waits for its actors to be suspended (within TorporProcess.stop's 30 s). */
const DRAIN_SECONDS = 20;

const skip = gvisorSkipReason() ?? nftSkipReason();

interface Actor {
  status: string;
  worker?: string;
  node?: string;
  address?: string;
  snapshot?: string;
  pendingSnapshot?: string;
  reason?: string;
  version: number;
}

interface Worker {
  id: string;
  node: string;
  state: string;
  actor?: { space: string; name: string };
}

async function freePort(host: string): Promise<number> {
  const server = createServer();
  await new Promise<void>((r) => server.listen(0, host, r));
  const port = (server.address() as { port: number }).port;
  await new Promise((r) => server.close(r));
  return port;
}

async function until<T>(what: string, timeoutMs: number, probe: () => Promise<T | undefined>): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  let last: unknown;
  for (;;) {
    try {
      const value = await probe();
      if (value !== undefined) return value;
    } catch (err) {
      last = err;
    }
    if (Date.now() > deadline) throw new Error(`${what}: not within ${timeoutMs} ms${last ? ` (${last})` : ''}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

describe('beyond one machine: server, two agents in their own namespaces, router, S3', { skip }, () => {
  let dir: string;
  let s3: RunningS3 | undefined;
  let redis: RedisServer | undefined;
  /** Why the services could not be had (the tests then skip, saying so). */
  let s3Skip: string | undefined;
  let blob: S3BlobStore;
  let server: TorporProcess;
  let router: TorporProcess;
  const agents = {} as Record<NodeName, TorporProcess>;
  let serverUrl: string;
  /** The count at the last acknowledged suspend, and the highest count any request saw since. */
  let acked = 0;
  let lastSeen = 0;

  before(async () => {
    dir = await mkdtemp(join(tmpdir(), 'torpor-dist-'));
    await run('ip', ['addr', 'replace', `${CONTROL}/32`, 'dev', 'lo']);
    const [started, redisStarted] = await Promise.all([startS3({ address: CONTROL }), startRedis()]);
    if (typeof redisStarted !== 'string') redis = redisStarted;
    if (typeof started !== 'string') s3 = started;
    if (typeof started === 'string' || typeof redisStarted === 'string') {
      s3Skip = [started, redisStarted].filter((r) => typeof r === 'string').join('; ');
      return;
    }
    s3 = started;
    await createBucket(s3.connection, BUCKET);
    blob = new S3BlobStore({ ...s3.connection, bucket: BUCKET, prefix: 'snaps' });
    const token = join(dir, 'agent-token');
    await writeFile(token, `${crypto.randomUUID()}${crypto.randomUUID()}\n`, { mode: 0o600 });
    const env = {
      AWS_ACCESS_KEY_ID: s3.accessKeyId,
      AWS_SECRET_ACCESS_KEY: s3.secretAccessKey,
      AWS_REGION: 'us-east-1',
    };
    const blobUrl = `s3://${BUCKET}/snaps?endpoint=${encodeURIComponent(s3.endpoint)}&pathStyle=true`;
    const store = redisStarted.url;
    // A fixed port: agents keep the server's URL across its restarts.
    serverUrl = `http://${CONTROL}:${await freePort(CONTROL)}`;
    const port = new URL(serverUrl).port;
    server = new TorporProcess(
      'server',
      [
        'server',
        ...['--store', store, '--blob', blobUrl, '--host', CONTROL, '--port', port],
        ...['--agent-token-file', token, '--data-dir', join(dir, 'server')],
        ...['--worker-lease', String(LEASE_SECONDS), '--reconcile-interval', '300', '--id', 'server-1'],
      ],
      { env, logFile: join(dir, 'server.log') },
    );
    for (const [node, base] of Object.entries(NODES) as [NodeName, number][]) {
      await torpor('node-net', 'create', '--network-base', String(base), '--workers', '1');
      agents[node] = new TorporProcess(
        node,
        [
          ...['--server', serverUrl, 'agent', '--token-file', token, '--node', node, '--workers', '1'],
          ...['--network-base', String(base), '--blob', blobUrl, '--listen', `10.214.${base}.2:7071`],
          ...['--data-dir', join(dir, node), '--drain-timeout', String(DRAIN_SECONDS)],
        ],
        { netns: `torpor-node${base}`, env, logFile: join(dir, `${node}.log`) },
      );
    }
    router = new TorporProcess('router', ['--server', serverUrl, 'router', '--store', store, '--port', '0'], {
      logFile: join(dir, 'router.log'),
    });
    await server.start();
    await Promise.all([agents['node-a'].start(), agents['node-b'].start(), router.start()]);
  });

  after(async () => {
    for (const p of [router, agents['node-a'], agents['node-b'], server]) await p?.stop().catch(() => undefined);
    for (const base of Object.values(NODES)) {
      await torpor('node-net', 'delete', '--network-base', String(base), '--workers', '1').catch(() => undefined);
    }
    await s3?.stop();
    await redis?.stop();
    await run('ip', ['addr', 'del', `${CONTROL}/32`, 'dev', 'lo']).catch(() => undefined);
    if (process.env.TORPOR_KEEP_TEST_DIR) console.log(`kept ${dir}`);
    else await rm(dir, { recursive: true, force: true });
  });

  async function api<T>(method: string, path: string, body?: unknown): Promise<T> {
    const res = await fetch(`${serverUrl}${path}`, {
      method,
      ...(body !== undefined ? { headers: { 'content-type': 'application/json' }, body: JSON.stringify(body) } : {}),
    });
    const text = await res.text();
    if (!res.ok) throw new Error(`${method} ${path}: ${res.status} ${text}`);
    return (text ? JSON.parse(text) : undefined) as T;
  }
  const actorPath = (name: string, action = '') => `/v1/spaces/default/actors/${name}${action}`;
  const getActor = (name: string) => api<Actor>('GET', actorPath(name));
  const workers = async () => (await api<{ items: Worker[] }>('GET', '/v1/workers')).items;

  /** One request through the router: the actor's count (it resumes the actor if it must). */
  async function count(name: string): Promise<number> {
    const res = await fetch(`${router.url}/`, { headers: { 'x-torpor-actor': `${name}.default` } });
    const text = (await res.text()).trim();
    assert.equal(res.status, 200, `router: ${text}`);
    const n = Number(text);
    lastSeen = Math.max(lastSeen, n);
    return n;
  }

  async function suspend(name: string): Promise<Actor> {
    const a = await api<Actor>('POST', actorPath(name, '/suspend'));
    assert.equal(a.status, 'SUSPENDED');
    assert.ok(a.snapshot && (await blob.has(a.snapshot)), 'an acknowledged suspend names a manifest in S3');
    acked = lastSeen;
    return a;
  }

  /** The counter template (applying it again is a no-op: each test may run alone). */
  async function applyCounter(): Promise<void> {
    await api('POST', '/v1/templates', {
      name: 'counter',
      image: await counterImage(),
      port: 8080,
      readiness: { path: '/healthz', timeoutSeconds: 20 },
      resources: { memoryMiB: 64, vcpus: 1 },
      idleTimeoutSeconds: 0,
    });
  }

  test('an actor suspended on node A resumes on node B through S3 with its memory intact', async (t) => {
    if (s3Skip) return t.skip(s3Skip);
    await applyCounter();
    const created = await api<Actor>('POST', '/v1/spaces/default/actors', { name: 'c1', template: 'counter' });
    assert.match(created.snapshot ?? '', /^snapshots\/_golden\/counter\//, 'created from the golden snapshot');

    let a = await api<Actor>('POST', actorPath('c1', '/resume'), { worker: 'node-a-w0' });
    assert.equal(a.status, 'RUNNING');
    assert.equal(a.node, 'node-a');
    assert.deepEqual([await count('c1'), await count('c1')], [1, 2]);
    a = await suspend('c1');
    await until('node A frees its worker (once the sandbox is gone)', 10_000, async () =>
      (await workers()).find((w) => w.id === 'node-a-w0')?.state === 'free' ? true : undefined,
    );

    a = await api<Actor>('POST', actorPath('c1', '/resume'), { worker: 'node-b-w0' });
    assert.equal(a.node, 'node-b');
    assert.equal(a.address, `10.213.${NODES['node-b']}.2:8080`);
    assert.ok((a as { lastOperation?: { phases: Record<string, number> } }).lastOperation?.phases.fetch !== undefined);
    assert.equal(await count('c1'), 3, 'memory intact after the move through S3');

    // exec and logs of an actor on another node stream through the server and the agent API.
    const res = await fetch(`${serverUrl}${actorPath('c1', '/exec')}`, {
      method: 'POST',
      headers: { 'content-type': 'application/json', accept: 'application/x-ndjson' },
      body: JSON.stringify({ command: ['/bin/busybox', 'sh', '-c', 'cat /run/torpor/actor-id; echo oops >&2'] }),
    });
    const lines = (await res.text())
      .trim()
      .split('\n')
      .map((l) => JSON.parse(l) as Record<string, unknown>);
    assert.deepEqual(lines, [{ stdout: 'default/c1' }, { stderr: 'oops\n' }, { exitCode: 0 }]);
    const logs = await (await fetch(`${serverUrl}${actorPath('c1', '/logs')}`)).text();
    assert.match(logs, /count 3/, "node B's log of the actor");
  });

  test('an agent killed with -9 loses its lease: its workers go, its actor is back at its last snapshot', async (t) => {
    if (s3Skip) return t.skip(s3Skip);
    const before = await getActor('c1');
    assert.equal(before.node, 'node-b');
    const last = before.snapshot;
    await agents['node-b'].kill();
    const t0 = Date.now();
    const lost = await until('the actor is settled', 20_000, async () => {
      const a = await getActor('c1');
      return a.status === 'SUSPENDED' ? a : undefined;
    });
    const ms = Date.now() - t0;
    assert.match(lost.reason ?? '', /worker node-b-w0 was lost \(its lease expired: node node-b stopped renewing it\)/);
    assert.equal(lost.snapshot, last, 'back at its last durable snapshot');
    assert.equal(lost.worker, undefined);
    assert.ok(ms < (LEASE_SECONDS + 5) * 1000, `settled ${ms} ms after the kill`);
    await until('node-b workers removed', 10_000, async () =>
      (await workers()).some((w) => w.node === 'node-b') ? undefined : true,
    );
    // Resumed where capacity is left: node A, from S3 (count 2 was the last suspend).
    const a = await api<Actor>('POST', actorPath('c1', '/resume'), {});
    assert.equal(a.node, 'node-a');
    assert.equal(await count('c1'), 3);
    lastSeen = 3;
    await suspend('c1');
    await agents['node-b'].start();
    await until('node-b registered again', 10_000, async () =>
      (await workers()).some((w) => w.id === 'node-b-w0' && w.state === 'free') ? true : undefined,
    );
  });

  test('an agent started outside its node’s namespace refuses to start, saying how', async (t) => {
    if (s3Skip) return t.skip(s3Skip);
    const stray = new TorporProcess('stray agent', [
      ...['--server', serverUrl, 'agent', '--token', 'x'.repeat(32), '--node', 'stray', '--workers', '1'],
      ...['--network-base', String(NODES['node-a']), '--blob', join(dir, 'unused'), '--data-dir', join(dir, 'stray')],
    ]);
    await assert.rejects(stray.start(), /exited \(1\)/);
    assert.match(
      stray.log(),
      new RegExp(
        `FAILED_PRECONDITION: this process must run in the node's network namespace torpor-node${NODES['node-a']}`,
      ),
    );
    assert.ok(stray.log().includes(`nsenter --net=/var/run/netns/torpor-node${NODES['node-a']}`));
    assert.ok(!(await workers()).some((w) => w.node === 'stray'), 'nothing registered');
  });

  test('an agent stopped with SIGTERM drains: its actor is suspended with its memory and resumes elsewhere', async (t) => {
    if (s3Skip) return t.skip(s3Skip);
    await applyCounter();
    const seen = lastSeen; // d1's counts are not c1's (the crash cases follow c1)
    await api('POST', '/v1/spaces/default/actors', { name: 'd1', template: 'counter' });
    const running = await api<Actor>('POST', actorPath('d1', '/resume'), { worker: 'node-a-w0' });
    assert.equal(running.node, 'node-a');
    const golden = running.snapshot;
    assert.deepEqual([await count('d1'), await count('d1')], [1, 2]);

    const t0 = Date.now();
    await agents['node-a'].stop();
    const exit = await agents['node-a'].exited;
    assert.deepEqual(exit, { code: 0, signal: null }, `node-a exited by itself:\n${agents['node-a'].tail()}`);
    assert.ok(Date.now() - t0 < DRAIN_SECONDS * 1000, 'within the drain timeout');
    assert.match(agents['node-a'].log(), /draining: suspending the running actors/);

    const drained = await getActor('d1');
    assert.equal(drained.status, 'SUSPENDED', 'suspended, not left running on a node that is gone');
    assert.equal(drained.reason, undefined, `suspended, not lost: ${drained.reason}`);
    assert.notEqual(drained.snapshot, golden, 'a snapshot of its own');
    assert.ok(drained.snapshot && (await blob.has(drained.snapshot)), 'its snapshot is in S3');
    assert.ok(!(await workers()).some((w) => w.node === 'node-a'), "node A's workers left the pool");

    const moved = await api<Actor>('POST', actorPath('d1', '/resume'), {});
    assert.equal(moved.node, 'node-b');
    assert.equal(await count('d1'), 3, 'its memory came along');
    await api<Actor>('POST', actorPath('d1', '/suspend'));
    await api('DELETE', actorPath('d1'));
    lastSeen = seen;
    await agents['node-a'].start();
    await until('node-a registered again', 10_000, async () =>
      (await workers()).some((w) => w.id === 'node-a-w0' && w.state === 'free') ? true : undefined,
    );
    await until('node-b frees its worker', 10_000, async () =>
      (await workers()).find((w) => w.id === 'node-b-w0')?.state === 'free' ? true : undefined,
    );
  });

  test("remote agents' snapshot transfer progress reaches the server's event stream", async (t) => {
    if (s3Skip) return t.skip(s3Skip);
    await applyCounter();
    const seen = lastSeen;
    await api('POST', '/v1/spaces/default/actors', { name: 'p1', template: 'counter' });
    await api<Actor>('POST', actorPath('p1', '/resume'), { worker: 'node-a-w0' });
    assert.equal(await count('p1'), 1);

    const listening = new AbortController();
    const res = await fetch(`${serverUrl}${actorPath('p1', '/transfers')}`, { signal: listening.signal });
    assert.equal(res.status, 200);
    const reader = res.body!.pipeThrough(new TextDecoderStream()).getReader();
    let text = '';
    const reading = (async () => {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) return;
        text += value;
      }
    })().catch(() => undefined);
    await until('subscribed', 5000, async () => (text.includes(': subscribed') ? true : undefined));

    await api<Actor>('POST', actorPath('p1', '/suspend')); // node A uploads
    await until('node A frees its worker', 10_000, async () =>
      (await workers()).find((w) => w.id === 'node-a-w0')?.state === 'free' ? true : undefined,
    );
    const moved = await api<Actor>('POST', actorPath('p1', '/resume'), { worker: 'node-b-w0' }); // node B downloads
    assert.equal(moved.node, 'node-b');
    assert.equal(await count('p1'), 2);
    listening.abort();
    await reading;
    const events = [...text.matchAll(/^data: (.*)\n/gm)].map(
      (m) => JSON.parse(m[1]!) as { direction: string; bytesDone: number; bytesTotal: number },
    );

    for (const direction of ['upload', 'download']) {
      const of = events.filter((e) => e.direction === direction);
      assert.ok(of.length > 0, `${direction} progress forwarded from the agent (events: ${events.length})`);
      const last = of.at(-1)!;
      assert.ok(last.bytesTotal > 0);
      assert.equal(last.bytesDone, last.bytesTotal, `the ${direction} reached its total`);
    }
    await api<Actor>('POST', actorPath('p1', '/suspend'));
    await api('DELETE', actorPath('p1'));
    lastSeen = seen;
    await until('node-b frees its worker', 10_000, async () =>
      (await workers()).find((w) => w.id === 'node-b-w0')?.state === 'free' ? true : undefined,
    );
  });

  /** Each step where a process may die, and what the actor must come back as: "forward" = with everything the
   * interrupted operation captured (count continues from the last one seen), "back" = at the last acknowledged
   * suspend. Resumes always come back counting from the last acknowledged suspend. */
  const CASES: { target: 'server' | 'agent'; op: 'suspend' | 'resume'; step: string; expect: 'forward' | 'back' }[] = [
    { target: 'server', op: 'suspend', step: 'suspend.marked', expect: 'forward' },
    { target: 'server', op: 'suspend', step: 'suspend.checkpointed', expect: 'back' },
    { target: 'server', op: 'suspend', step: 'suspend.uploaded', expect: 'forward' },
    { target: 'server', op: 'suspend', step: 'suspend.committed', expect: 'forward' },
    { target: 'agent', op: 'suspend', step: 'checkpoint.started', expect: 'back' },
    { target: 'agent', op: 'suspend', step: 'checkpoint.done', expect: 'back' },
    { target: 'agent', op: 'suspend', step: 'upload.chunks-stored', expect: 'forward' },
    { target: 'agent', op: 'suspend', step: 'upload.manifest-written', expect: 'forward' },
    { target: 'server', op: 'resume', step: 'resume.marked', expect: 'back' },
    { target: 'server', op: 'resume', step: 'resume.claimed', expect: 'back' },
    { target: 'server', op: 'resume', step: 'resume.activated', expect: 'back' },
    { target: 'server', op: 'resume', step: 'resume.committed', expect: 'back' },
    { target: 'agent', op: 'resume', step: 'activate.fetched', expect: 'back' },
    { target: 'agent', op: 'resume', step: 'activate.restored', expect: 'back' },
    { target: 'agent', op: 'resume', step: 'activate.ready', expect: 'back' },
  ];

  for (const c of CASES) {
    test(`kill -9 of the ${c.target} at ${c.step}: the actor ends consistent`, async (t) => {
      if (s3Skip) return t.skip(s3Skip);
      await withLogs(() => crashCase(c));
    });
  }

  /** Runs a step of the test; when it fails, says what the processes said. */
  async function withLogs(fn: () => Promise<void>): Promise<void> {
    try {
      await fn();
    } catch (err) {
      const logs = [server, agents['node-a'], agents['node-b']].map((p) => `--- ${p.name}:\n${p.tail(15)}`);
      throw new Error(`${(err as Error).stack ?? err}\n${logs.join('\n')}`);
    }
  }

  async function crashCase(c: (typeof CASES)[number]): Promise<void> {
    {
      // Each case starts from an acknowledged suspend.
      if ((await getActor('c1')).status !== 'SUSPENDED') {
        await count('c1');
        await suspend('c1');
      }
      const start = await getActor('c1');
      // The other node than the last suspend's: a resume there fetches from S3 (the node that wrote a snapshot
      // keeps a local copy of it), and the actor keeps moving between nodes.
      const target = other((start.node ?? 'node-b') as NodeName);
      const victim = c.target === 'server' ? server : agents[target];
      await victim.restart({ TORPOR_CRASH_AT: c.step });
      if (c.op === 'suspend') {
        await api('POST', actorPath('c1', '/resume'), { worker: `${target}-w0` });
        await count('c1');
      }
      // The call the crash interrupts: whatever it answers (an error, most often) is not what is checked.
      const interrupted = api('POST', actorPath('c1', c.op === 'suspend' ? '/suspend' : '/resume'), {
        ...(c.op === 'resume' ? { worker: `${target}-w0` } : {}),
      }).catch((err: unknown) => err);
      const exit = await Promise.race([
        victim.exited,
        new Promise<undefined>((r) => {
          setTimeout(() => r(undefined), 60_000).unref();
        }),
      ]);
      await interrupted;
      assert.equal(exit?.signal, 'SIGKILL', `${victim.name} died at ${c.step}:\n${victim.tail()}`);
      assert.match(victim.log(), new RegExp(`TORPOR_CRASH_AT=${c.step.replace('.', '\\.')}: killing`));
      await victim.start();

      const settled = await until('the actor settles', 30_000, async () => {
        const a = await getActor('c1');
        return ['SUSPENDED', 'RUNNING', 'PAUSED'].includes(a.status) ? a : undefined;
      });
      assert.equal(settled.pendingSnapshot, undefined);
      if (settled.status !== 'RUNNING') {
        assert.equal(settled.worker, undefined);
        assert.equal(settled.address, undefined);
      }
      if (settled.snapshot) {
        assert.ok(await blob.has(settled.snapshot), `${settled.snapshot} is in S3`);
      }
      // Workers: free unless they run the actor (an orphaned claim is freed by the reconciler).
      await until('workers settle', 15_000, async () => {
        const ws = await workers();
        const actor = await getActor('c1');
        const wrong = ws.filter((w) => (w.state === 'busy') !== (actor.status === 'RUNNING' && w.id === actor.worker));
        return ws.length === 2 && wrong.length === 0 ? true : undefined;
      });
      const expected = c.expect === 'forward' ? lastSeen + 1 : acked + 1;
      const n = await count('c1'); // through the router: resumes it if it is not running (from S3 or the node)
      assert.ok(n > acked, `count ${n} went back past the last acknowledged suspend (${acked})`);
      assert.equal(n, expected, `after ${c.step} (${settled.status}, ${settled.reason ?? 'no reason'})`);
      lastSeen = n;
      await suspend('c1');
    }
  }
});

function other(node: NodeName): NodeName {
  return node === 'node-a' ? 'node-b' : 'node-a';
}
