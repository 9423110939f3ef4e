// StateStore throughput on a local redis-server (started by scripts/services/redis.sh): worker claims and actor
// compare-and-sets per second, one at a time (round-trip bound) and with many in flight, next to raw SET and GET
// round-trips on the same server (the floor: a claim or a CAS is one script call), and the same store operations
// on a SQLite file for comparison. Measurements are interleaved over several rounds and reported as medians (with
// min and max), so a busy machine skews every figure alike rather than one of them.
//
//   node bench/store.ts [--ops 1000] [--rounds 5] [--concurrency 32]   → JSON on stdout
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { Redis } from 'ioredis';
import type { Actor } from '../src/core/types.ts';
import { RedisStore } from '../src/store/redis.ts';
import { SqliteStore } from '../src/store/sqlite.ts';
import type { StateStore } from '../src/store/store.ts';
import { actor, worker } from '../test/store/conformance.ts';
import { startRedis } from '../test/store/redis-server.ts';

const { values } = parseArgs({
  options: {
    ops: { type: 'string', default: '1000' },
    rounds: { type: 'string', default: '5' },
    concurrency: { type: 'string', default: '32' },
  },
});
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

const server = await startRedis();
if (typeof server === 'string') {
  process.stderr.write(`skipped: ${server}\n`);
  process.exit(3);
}
const dir = await mkdtemp(join(tmpdir(), 'torpor-bench-store-'));
try {
  const raw = new Redis(server.port, '127.0.0.1', { enableAutoPipelining: true });
  const value = JSON.stringify(actor('bench', 'floor')); // about the size of a stored actor
  const redis = await RedisStore.open({ url: server.url, prefix: 'bench:' });
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
  const redisVersion = /redis_version:(\S+)/.exec(await raw.info('server'))?.[1];
  raw.disconnect();

  const perSecond: Record<string, ReturnType<typeof stats>> = {};
  for (const [name, values] of samples) perSecond[name] = stats(values);
  process.stdout.write(
    `${JSON.stringify(
      {
        benchmark: 'store',
        redis_version: redisVersion,
        ops_per_sample: { redis: OPS, sqlite_file: Math.min(OPS, SQLITE_OPS) },
        rounds: ROUNDS,
        concurrency: CONCURRENCY,
        per_second: perSecond,
      },
      null,
      2,
    )}\n`,
  );
} finally {
  await server.stop();
  await rm(dir, { recursive: true, force: true });
}
