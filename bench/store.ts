// StateStore throughput on a local redis-server (started by scripts/services/redis.sh): worker claims and actor
// compare-and-sets per second, one at a time (round-trip bound) and with many in flight, next to raw SET and GET
// round-trips on the same server (the floor: a claim or a CAS is one script call), and the same store operations
// on a SQLite file for comparison. Measurements are interleaved over several rounds and reported as medians (with
// min and max), so a busy machine skews every figure alike rather than one of them.
//
// `lifecycle`: lifecycle transitions per second and their latency, measuring the control plane alone — the real
// Lifecycle (actor locks, worker claims, compare-and-sets) on the real store, with the node agents replaced by an
// in-process stub that answers at once (bench/lib/control-plane.ts); a transition is one whole resume or suspend.
// `--concurrency` actors cycle at once. The floor is a raw GET round-trip at the same concurrency, in the same run.
//
// `memory`: bytes of Redis memory per suspended actor — `--memory-actors` suspended actors (the record a real
// resume + suspend leaves, spread over 100 spaces) created through the store, INFO used_memory before and after.
// The change streams are bounded (about changeRetention entries per slot, whatever the number of actors): their
// share is reported apart.
//
//   node bench/store.ts [--ops 1000] [--rounds 5] [--concurrency 32] [--transitions 2000]
//                       [--memory-actors 100000] [--sections raw,lifecycle,memory]
//                       [--lifecycle-stores redis,sqlite_file]   → JSON on stdout
import { mkdtemp, rm } from 'node:fs/promises';
import { loadavg, tmpdir } from 'node:os';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { Redis } from 'ioredis';
import type { Actor } from '../src/core/types.ts';
import { encodeActor } from '../src/store/actor-codec.ts';
import { RedisStore } from '../src/store/redis.ts';
import { SqliteStore } from '../src/store/sqlite.ts';
import type { StateStore } from '../src/store/store.ts';
import { actor, worker } from '../test/store/conformance.ts';
import { startRedis } from '../test/store/redis-server.ts';
import { round as round2, summary } from './lib/bare.ts';
import { controlPlane, createActors, cycle } from './lib/control-plane.ts';

const { values } = parseArgs({
  options: {
    ops: { type: 'string', default: '1000' },
    rounds: { type: 'string', default: '5' },
    concurrency: { type: 'string', default: '32' },
    transitions: { type: 'string', default: '2000' },
    'memory-actors': { type: 'string', default: '100000' },
    sections: { type: 'string', default: 'raw,lifecycle,memory' },
    'lifecycle-stores': { type: 'string', default: 'redis,sqlite_file' },
  },
});
const SECTIONS = new Set(values.sections.split(','));
const TRANSITIONS = Number(values.transitions);
const MEMORY_ACTORS = Number(values['memory-actors']);
/** SQLite writes one at a time: fewer transitions keep its rounds short. */
const SQLITE_TRANSITIONS = Math.min(TRANSITIONS, 600);
const OPS = Number(values.ops);
const ROUNDS = Number(values.rounds);
const CONCURRENCY = Number(values.concurrency);
/** SQLite claims scan the free workers: fewer operations keep its rounds short. */
const SQLITE_OPS = Math.min(OPS, 300);

/** Operations per second of `op(i)` for i in [0, ops) with `concurrency` in flight. */
async function rate(ops: number, concurrency: number, op: (i: number) => Promise<unknown>): Promise<number> {
  let next = 0;
  const started = performance.now();
  await Promise.all(
    Array.from({ length: concurrency }, async () => {
      while (next < ops) await op(next++);
    }),
  );
  return Math.round((ops / (performance.now() - started)) * 1000);
}

/** Claims (each takes one of `ops` free workers registered first, untimed: the pool shrinks from `ops` to 0) and CAS (one actor per writer, so no
 * conflicts: each writer carries its actor's version forward) on `store`. */
async function storeRates(store: StateStore, concurrency: number, tag: string, ops: number) {
  for (let i = 0; i < ops; i++) await store.putWorker(worker(`${tag}-w${i}`, { node: `n${i % 8}` }));
  const claims = await rate(ops, concurrency, async (i) => {
    if (!(await store.claimWorker({ runtime: 'gvisor' }, { space: 'bench', name: `${tag}-a${i}` }))) {
      throw new Error('a claim found no free worker');
    }
  });
  for (let i = 0; i < ops; i++) await store.deleteWorker(`${tag}-w${i}`); // the next round starts from the same pool
  const actors: Actor[] = [];
  for (let i = 0; i < concurrency; i++) actors.push(await store.createActor(actor('bench', `${tag}-cas${i}`)));
  let writer = 0;
  const cas = await rate(ops, concurrency, async () => {
    const mine = writer++ % concurrency;
    const current = actors[mine]!;
    actors[mine] = await store.casActor({ ...current, labels: { n: String(current.version) } }, current.version);
  });
  for (const a of actors) await store.deleteActor(a.space, a.name, a.version);
  return { claims, cas };
}

function stats(samples: number[]) {
  const sorted = [...samples].sort((a, b) => a - b);
  return { median: sorted[Math.floor(sorted.length / 2)]!, min: sorted[0]!, max: sorted[sorted.length - 1]! };
}

/** The raw floor: `ops` GETs of an actor-sized value with `concurrency` in flight; per second and ms per GET. */
async function roundTrips(raw: Redis, ops: number, concurrency: number) {
  await raw.set('bench:floor:rtt', JSON.stringify(actor('bench', 'floor')));
  const latencies: number[] = [];
  const perSecond = await rate(ops, concurrency, async () => {
    const t = performance.now();
    await raw.get('bench:floor:rtt');
    latencies.push(performance.now() - t);
  });
  return { perSecond, latencies };
}

/** Claims and CAS per second, one at a time and in flight, Redis and SQLite, next to raw SET/GET. */
async function rawSection(raw: Redis, url: string, dir: string) {
  const value = JSON.stringify(actor('bench', 'floor')); // about the size of a stored actor
  const redis = await RedisStore.open({ url, prefix: 'bench:' });
  const sqlite = SqliteStore.open(join(dir, 'state.db'));

  const samples = new Map<string, number[]>();
  const record = (name: string, value: number) => samples.set(name, [...(samples.get(name) ?? []), value]);
  const round = async (concurrency: number, mode: string, ops: number) => {
    const key = (i: number) => `bench:floor:${i % concurrency}`;
    record(`${mode}.redis_floor.set`, await rate(ops, concurrency, (i) => raw.set(key(i), value)));
    record(`${mode}.redis_floor.get`, await rate(ops, concurrency, (i) => raw.get(key(i))));
    const r = await storeRates(redis, concurrency, mode, ops);
    record(`${mode}.redis.claims`, r.claims);
    record(`${mode}.redis.cas`, r.cas);
    const s = await storeRates(sqlite, concurrency, mode, Math.min(ops, SQLITE_OPS));
    record(`${mode}.sqlite_file.claims`, s.claims);
    record(`${mode}.sqlite_file.cas`, s.cas);
  };

  await round(1, 'warmup', 200); // connections, script cache, JIT: not reported
  samples.clear();
  for (let i = 0; i < ROUNDS; i++) {
    await round(1, 'one_at_a_time', OPS);
    await round(CONCURRENCY, 'in_flight', OPS);
  }
  await redis.close();
  await sqlite.close();
  const perSecond: Record<string, ReturnType<typeof stats>> = {};
  for (const [name, values] of samples) perSecond[name] = stats(values);
  return { ops_per_sample: { redis: OPS, sqlite_file: Math.min(OPS, SQLITE_OPS) }, per_second: perSecond };
}

/** Lifecycle transitions (whole resumes and suspends) per second and their latency, the control plane alone. */
async function lifecycleSection(raw: Redis, url: string, dir: string) {
  const actorNames = Array.from({ length: CONCURRENCY }, (_, i) => `a${i}`);
  // Twice as many workers as actors: a suspend frees its worker in the background, as it does in production.
  const workersPerNode = Math.ceil((2 * CONCURRENCY) / 4);
  const redisStore = await RedisStore.open({ url, prefix: 'lc:' });
  const sqliteStore = SqliteStore.open(join(dir, 'lifecycle.db'));
  const wanted = new Set(values['lifecycle-stores'].split(','));
  const planes = {
    ...(wanted.has('redis')
      ? { redis: { cp: await controlPlane(redisStore, 4, workersPerNode), transitions: TRANSITIONS } }
      : {}),
    ...(wanted.has('sqlite_file')
      ? { sqlite_file: { cp: await controlPlane(sqliteStore, 4, workersPerNode), transitions: SQLITE_TRANSITIONS } }
      : {}),
  };
  const rates = new Map<string, number[]>();
  const latencies = new Map<string, number[]>();
  const calls = new Map<string, number>();
  /** Store calls per transition by method, summed over the rounds. */
  const callsByMethod = new Map<string, Map<string, number>>();
  /** CPU milliseconds per transition, of this process (the control plane) and of redis-server. */
  const cpuMs = new Map<string, number[]>();
  const add = <T>(m: Map<string, T[]>, k: string, xs: T[]) => m.set(k, [...(m.get(k) ?? []), ...xs]);
  for (const { cp } of Object.values(planes)) await createActors(cp, 'bench', 'a', CONCURRENCY);
  for (let r = -1; r < ROUNDS; r++) {
    const warmup = r < 0; // connections, script cache, JIT: not reported
    const floor = await roundTrips(raw, TRANSITIONS, CONCURRENCY);
    if (!warmup) {
      add(rates, 'redis_floor.get', [floor.perSecond]);
      add(latencies, 'redis_floor.get', floor.latencies);
    }
    for (const [name, plane] of Object.entries(planes)) {
      const before = sumCalls(plane.cp.calls);
      const methodsBefore = new Map(plane.cp.calls);
      const [cpuBefore, redisCpuBefore] = [process.cpuUsage(), await redisCpuMs(raw)];
      const run = await cycle(plane.cp, 'bench', actorNames, warmup ? 2 * CONCURRENCY : plane.transitions);
      if (warmup) continue;
      const cpu = process.cpuUsage(cpuBefore);
      add(cpuMs, `${name}.control_plane`, [(cpu.user + cpu.system) / 1000 / run.transitions]);
      if (name === 'redis')
        add(cpuMs, 'redis.redis_server', [((await redisCpuMs(raw)) - redisCpuBefore) / run.transitions]);
      add(rates, name, [Math.round(run.transitions / run.seconds)]);
      add(latencies, name, run.latencies);
      calls.set(name, (calls.get(name) ?? 0) + (sumCalls(plane.cp.calls) - before) / run.transitions);
      const byMethod = callsByMethod.get(name) ?? new Map<string, number>();
      for (const [method, n] of plane.cp.calls) {
        const delta = (n - (methodsBefore.get(method) ?? 0)) / run.transitions;
        if (delta > 0) byMethod.set(method, (byMethod.get(method) ?? 0) + delta);
      }
      callsByMethod.set(name, byMethod);
    }
  }
  for (const { cp } of Object.values(planes)) await cp.close();
  await redisStore.close();
  await sqliteStore.close();

  const latency = (k: string) => {
    const s = summary(latencies.get(k)!);
    return { n: s.n, p50: round2(s.p50), p95: round2(s.p95), p99: round2(s.p99), max: round2(s.max) };
  };
  const names = Object.keys(planes);
  const each = <T>(f: (name: string) => T) => Object.fromEntries(names.map((n) => [n, f(n)]));
  const rateOf = (k: string) => rates.get(k) && stats(rates.get(k)!).median;
  const floorRate = rateOf('redis_floor.get')!;
  const floorP99 = summary(latencies.get('redis_floor.get')!).p99;
  return {
    transitions_per_sample: each((n) => planes[n as keyof typeof planes]!.transitions),
    actors_in_flight: CONCURRENCY,
    transitions_per_second: {
      ...each((n) => stats(rates.get(n)!)),
      redis_floor_get: stats(rates.get('redis_floor.get')!),
    },
    latency_ms: { ...each(latency), redis_floor_get: latency('redis_floor.get') },
    store_calls_per_transition: each((n) => round2(calls.get(n)! / ROUNDS)),
    store_calls_per_transition_by_method: each((n) =>
      Object.fromEntries([...callsByMethod.get(n)!].map(([method, sum]) => [method, round2(sum / ROUNDS)])),
    ),
    // What the machine's load cannot skew: one core of the control plane sustains 1000 / control_plane of them.
    cpu_ms_per_transition: Object.fromEntries([...cpuMs].map(([k, xs]) => [k, round3(stats(xs).median)])),
    ratios: {
      ...(rateOf('redis') ? { redis_transitions_over_floor_gets: round2(rateOf('redis')! / floorRate) } : {}),
      ...(rateOf('redis') && rateOf('sqlite_file')
        ? { redis_over_sqlite: round2(rateOf('redis')! / rateOf('sqlite_file')!) }
        : {}),
      ...(latencies.get('redis')
        ? { redis_p99_over_floor_p99: round2(summary(latencies.get('redis')!).p99 / floorP99) }
        : {}),
    },
    target_redis_transitions_per_second: 2000,
  };
}

/** redis-server's CPU time so far (user + system), in ms. */
async function redisCpuMs(raw: Redis): Promise<number> {
  const info = await raw.info('cpu');
  const field = (name: string) => Number(new RegExp(`${name}:([\\d.]+)`).exec(info)?.[1]);
  return (field('used_cpu_user') + field('used_cpu_sys')) * 1000;
}

const round3 = (x: number) => Math.round(x * 1000) / 1000;

function sumCalls(calls: Map<string, number>): number {
  let n = 0;
  for (const v of calls.values()) n += v;
  return n;
}

/** Redis memory per suspended actor: the record a real resume + suspend leaves, `MEMORY_ACTORS` times. */
async function memorySection(raw: Redis, url: string) {
  const prefix = 'mem:';
  const store = await RedisStore.open({ url, prefix });
  const cp = await controlPlane(store, 1, 1);
  await createActors(cp, 'sample', 'a', 1);
  await cp.lifecycle.resume('sample', 'a0');
  const { version: _v, ...sample } = await cp.lifecycle.suspend('sample', 'a0');
  await cp.close();
  const usedMemory = async () => Number(/used_memory:(\d+)/.exec(await raw.info('memory'))?.[1]);
  const streams = async () => {
    let bytes = 0;
    for (const tag of ['g', 'w', ...Array.from({ length: 16 }, (_, i) => `s${i}`)]) {
      bytes += Number((await raw.call('MEMORY', 'USAGE', `${prefix}{${tag}}:changes`, 'SAMPLES', '0')) ?? 0);
    }
    return bytes;
  };
  const spaces = 100;
  const before = await usedMemory();
  const streamsBefore = await streams();
  const t0 = performance.now();
  let next = 0;
  await Promise.all(
    Array.from({ length: 128 }, async () => {
      while (next < MEMORY_ACTORS) {
        const i = next++;
        const space = `tenant-${String(i % spaces).padStart(2, '0')}`;
        const name = `actor-${String(i).padStart(6, '0')}`;
        // Its own snapshot key, as a suspend writes it (the store keeps such keys relative to the actor).
        const snapshot = sample.snapshot!.replace('snapshots/sample/a0/', `snapshots/${space}/${name}/`);
        await store.createActor({ ...sample, space, name, snapshot });
      }
    }),
  );
  const seconds = (performance.now() - t0) / 1000;
  const after = await usedMemory();
  const streamBytes = (await streams()) - streamsBefore;
  await store.close();
  const total = after - before;
  return {
    actors: MEMORY_ACTORS,
    spaces,
    record_json_bytes: JSON.stringify({ ...sample, version: 1 }).length,
    record_stored_bytes: encodeActor({ ...sample, version: 1 }).length,
    create_seconds: round2(seconds),
    used_memory_delta_bytes: total,
    change_stream_bytes: streamBytes,
    bytes_per_actor: Math.round((total - streamBytes) / MEMORY_ACTORS),
    bytes_per_actor_with_change_streams: Math.round(total / MEMORY_ACTORS),
    target_bytes_per_actor: 1024,
  };
}

const server = await startRedis();
if (typeof server === 'string') {
  process.stderr.write(`skipped: ${server}\n`);
  process.exit(3);
}
const dir = await mkdtemp(join(tmpdir(), 'torpor-bench-store-'));
try {
  const raw = new Redis(server.port, '127.0.0.1', { enableAutoPipelining: true });
  const redisVersion = /redis_version:(\S+)/.exec(await raw.info('server'))?.[1];
  const result: Record<string, unknown> = {
    benchmark: 'store',
    redis_version: redisVersion,
    rounds: ROUNDS,
    concurrency: CONCURRENCY,
    load_average_at_start: loadavg().map(round2),
  };
  if (SECTIONS.has('memory')) result.memory = await memorySection(raw, server.url); // first: nothing else in the server yet
  if (SECTIONS.has('raw')) result.raw = await rawSection(raw, server.url, dir);
  if (SECTIONS.has('lifecycle')) result.lifecycle = await lifecycleSection(raw, server.url, dir);
  raw.disconnect();
  process.stdout.write(`${JSON.stringify(result, null, 2)}\n`);
} finally {
  await server.stop();
  await rm(dir, { recursive: true, force: true });
}
