// RedisStore on a real redis-server (scripts/services/redis.sh): the shared conformance suite on one server and
// on a one-node Redis Cluster (which refuses any script whose keys span hash slots), then what is particular to
// Redis: key slots, the commands sent on hot paths, change notifications across clients and processes.
import assert from 'node:assert/strict';
import { type ChildProcessWithoutNullStreams, execFile, spawn } from 'node:child_process';
import { join } from 'node:path';
import { after, describe, it } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { promisify } from 'node:util';
import { isTorporError } from '../../src/core/errors.ts';
import type { Actor } from '../../src/core/types.ts';
import { decodeActor } from '../../src/store/actor-codec.ts';
import { openStore } from '../../src/store/open.ts';
import { RedisStore, type RedisStoreOptions } from '../../src/store/redis.ts';
import type { Change } from '../../src/store/store.ts';
import { actor, type StoreFixture, stateStoreConformance, template, worker } from './conformance.ts';
import { dropPrefix, keysWithPrefix, type RedisServer, rawClient, startRedis } from './redis-server.ts';

const single = await startRedis();
const cluster = await startRedis({ cluster: true });
after(async () => {
  for (const server of [single, cluster]) if (typeof server !== 'string') await server.stop();
});

let prefixes = 0;
const nextPrefix = (): string => `t${process.pid}-${++prefixes}:`;

function open(server: RedisServer, prefix: string, options: RedisStoreOptions = {}): Promise<RedisStore> {
  return RedisStore.open({ url: server.url, cluster: server.cluster, prefix, ...options });
}

function fixture(server: RedisServer): () => Promise<StoreFixture> {
  return async () => {
    const prefix = nextPrefix();
    const store = await open(server, prefix);
    return {
      store,
      second: () => store.openAnother(),
      cleanup: async () => {
        await store.close();
        await dropPrefix(server, prefix);
      },
    };
  };
}

if (typeof single === 'string') {
  it('RedisStore conformance', { skip: single }, () => {});
} else {
  stateStoreConformance('redis, two clients', fixture(single));
}
if (typeof cluster === 'string') {
  it('RedisStore conformance on a Redis Cluster', { skip: cluster }, () => {});
} else {
  stateStoreConformance('redis cluster (one node, every slot), two clients', fixture(cluster));
}

/** Runs `body` with a store on a fresh prefix of `server`, removing its keys afterwards. */
async function withStore(
  server: RedisServer,
  body: (store: RedisStore, prefix: string) => Promise<void>,
  options: RedisStoreOptions = {},
): Promise<void> {
  const prefix = nextPrefix();
  const store = await open(server, prefix, options);
  try {
    await body(store, prefix);
  } finally {
    await store.close();
    await dropPrefix(server, prefix);
  }
}

const CHILD = join(import.meta.dirname, 'redis-child.ts');

/** Starts redis-child.ts; `lines` fills with what it prints, `exited` resolves with its exit code. */
function child(args: string[]): { proc: ChildProcessWithoutNullStreams; lines: string[]; exited: Promise<number> } {
  const proc = spawn(process.execPath, [CHILD, ...args]);
  const lines: string[] = [];
  let partial = '';
  proc.stdout.setEncoding('utf8').on('data', (chunk: string) => {
    const parts = (partial + chunk).split('\n');
    partial = parts.pop()!;
    lines.push(...parts);
  });
  let stderr = '';
  proc.stderr.setEncoding('utf8').on('data', (chunk: string) => {
    stderr += chunk;
  });
  const exited = new Promise<number>((resolve) =>
    proc.on('exit', (code) => {
      if (code !== 0) process.stderr.write(`redis-child ${args[0]} exited ${code}: ${stderr}\n`);
      resolve(code ?? -1);
    }),
  );
  return { proc, lines, exited };
}

/** `promise`, or a failure after `ms` (so a broken watcher fails the test instead of hanging it). */
async function within<T>(ms: number, what: string, promise: Promise<T>): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out waiting for ${what}`)), ms);
  });
  try {
    return await Promise.race([promise, timeout]);
  } finally {
    clearTimeout(timer);
  }
}

async function until(what: string, condition: () => boolean, timeoutMs = 10_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!condition()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await sleep(10);
  }
}

/** The id of the Pub/Sub connection of the client named `name` (the watcher's subscriber). */
async function subscriberId(server: RedisServer, name: string): Promise<string> {
  const raw = rawClient(server);
  try {
    const list = (await raw.call('CLIENT', 'LIST', 'TYPE', 'pubsub')) as string;
    const line = list.split('\n').find((l) => l.includes(` name=${name} `));
    assert.ok(line, `no pubsub connection named ${name} in:\n${list}`);
    return /\bid=(\d+)/.exec(line)![1]!;
  } finally {
    raw.disconnect();
  }
}

const skipSingle = typeof single === 'string' ? single : false;
const skipCluster = typeof cluster === 'string' ? cluster : false;
const server = (): RedisServer => single as RedisServer;

describe('RedisStore specifics', () => {
  it('keys of one space share a hash slot; every key is in its tag slot', { skip: skipCluster }, async () => {
    const node = cluster as RedisServer;
    await withStore(node, async (store, prefix) => {
      const spaces = ['team-a', 'team-b', 'team:c%odd'];
      await store.createTemplate(template('web'));
      await store.setTemplateGolden('web', 'golden');
      for (const space of spaces) {
        for (let i = 0; i < 3; i++) {
          const created = await store.createActor(actor(space, `a${i}`));
          const token = (await store.acquireLease(`${space}/a${i}`, 'me', 10_000))!;
          await store.casActor(created, 1, { lease: `${space}/a${i}`, token });
        }
      }
      await store.acquireLease('reconciler', 'me', 10_000);
      for (let i = 0; i < 4; i++) await store.putWorker(worker(`w${i}`, { node: `n${i % 2}` }));
      await store.claimWorker({ runtime: 'gvisor', preferNodes: ['n1'] }, { space: 'team-a', name: 'a0' });

      const keys = await keysWithPrefix(node, prefix);
      const raw = rawClient(node);
      const slotOf = new Map<string, number>();
      try {
        for (const key of keys) slotOf.set(key, Number(await raw.cluster('KEYSLOT', key)));
      } finally {
        raw.disconnect();
      }
      const slots = (match: (key: string) => boolean) => new Set(keys.filter(match).map((key) => slotOf.get(key)));
      const tagOf = (key: string) => /\{([^}]*)\}/.exec(key)![1]!;
      for (const space of spaces) {
        const enc = encodeURIComponent(space);
        const ofSpace = keys.filter(
          (key) =>
            key.includes(`:actor:${enc}:`) || key.endsWith(`:actors:${space}`) || key.includes(`:lease:${space}/`),
        );
        assert.equal(ofSpace.length, 3 + 1 + 3, `keys of ${space}: ${ofSpace}`);
        assert.equal(new Set(ofSpace.map((key) => slotOf.get(key))).size, 1, `${space} spans slots: ${ofSpace}`);
        const tag = tagOf(ofSpace[0]!);
        assert.ok(keys.includes(`${prefix}{${tag}}:changes`), `the stream of ${space}'s slot`);
        assert.equal(slotOf.get(`${prefix}{${tag}}:changes`), slotOf.get(ofSpace[0]!));
      }
      // Every key sits in the slot of its tag; tags: g (global), w (workers), s<n> (space shards).
      for (const key of keys) assert.match(tagOf(key), /^(g|w|s\d+)$/, key);
      for (const tag of new Set(keys.map(tagOf))) {
        assert.equal(slots((key) => tagOf(key) === tag).size, 1, `tag ${tag} spans slots`);
      }
      assert.ok(keys.some((key) => key.includes('{w}:free:gvisor:n0')));
      assert.ok(keys.some((key) => key.includes('{g}:lease:reconciler')));
    });
  });

  it('sends no KEYS or SCAN on hot paths; ranges are bounded (MONITOR)', { skip: skipSingle }, async () => {
    await withStore(server(), async (store) => {
      for (let i = 0; i < 20; i++)
        await store.putWorker(worker(`w${String(i).padStart(2, '0')}`, { node: `n${i % 4}` }));
      for (let i = 0; i < 10; i++) await store.createActor(actor('default', `a${i}`));

      // Connected before MONITOR starts, so its handshake is not among the commands seen.
      const probe = rawClient(server());
      await probe.ping();
      const monitored = rawClient(server());
      const monitor = await monitored.monitor();
      const seen: { args: string[]; source: string }[] = [];
      monitor.on('monitor', (_time: string, args: string[], source: string) => seen.push({ args, source }));
      const marker = `hot-path-done-${Date.now()}`;
      try {
        for (let i = 0; i < 5; i++) {
          const claimed = await store.claimWorker(
            { runtime: 'gvisor', preferNodes: ['n3', 'n2'], excludeWorkers: ['w03'] },
            { space: 'default', name: `a${i}` },
          );
          assert.ok(claimed);
          const current = (await store.getActor('default', `a${i}`))!;
          const token = (await store.acquireLease(`default/a${i}`, 'scheduler', 5000))!;
          await store.casActor({ ...current, status: 'RESUMING', worker: claimed.id }, current.version, {
            lease: `default/a${i}`,
            token,
          });
          await store.releaseWorker(claimed.id, { space: 'default', name: `a${i}` });
          await store.renewWorkerLease(claimed.id, new Date(Date.now() + 60_000).toISOString());
        }
        await store.claimWorker({ runtime: 'gvisor', workerId: 'w05' }, { space: 'default', name: 'x' });
        await store.getWorker('w01');
        assert.equal((await store.listActors('default', { limit: 4 })).items.length, 4);
        assert.equal((await store.listActors(undefined, { limit: 4 })).items.length, 4);
        assert.equal((await store.listWorkers({ limit: 4 })).items.length, 4);
        await probe.echo(marker);
        await until('the marker in MONITOR', () => seen.some((c) => c.args.includes(marker)));
      } finally {
        monitor.disconnect();
        monitored.disconnect();
        probe.disconnect();
      }
      const commands = seen.map((c) => c.args[0]!.toUpperCase());
      const scans = commands.filter((c) =>
        ['KEYS', 'SCAN', 'HSCAN', 'SSCAN', 'ZSCAN', 'HGETALL', 'SMEMBERS'].includes(c),
      );
      assert.deepEqual(scans, []);
      for (const { args } of seen) {
        const name = args[0]!.toUpperCase();
        if (name.startsWith('ZRANGE') || name === 'XRANGE' || name === 'XREVRANGE') {
          assert.ok(
            args.some((a) => /^(LIMIT|COUNT)$/i.test(a)),
            `unbounded ${args.join(' ')}`,
          );
        }
      }
      // The writes ran as scripts, and inside them every change was appended and published.
      assert.ok(commands.filter((c) => c === 'EVALSHA' || c === 'EVAL').length >= 5 * 6);
      const fromLua = seen.filter((c) => c.source === 'lua').map((c) => c.args[0]!.toUpperCase());
      assert.ok(fromLua.includes('XADD') && fromLua.includes('PUBLISH') && fromLua.includes('ZRANGEBYSCORE'));
      const direct = new Set(seen.filter((c) => c.source !== 'lua').map((c) => c.args[0]!.toUpperCase()));
      for (const name of direct) {
        assert.ok(
          ['EVALSHA', 'EVAL', 'GET', 'HGET', 'ZRANGEBYLEX', 'ECHO', 'XRANGE', 'XREVRANGE'].includes(name),
          name,
        );
      }
    });
  });

  it('a write and its change are one script: the change is in the stream with the new value', {
    skip: skipSingle,
  }, async () => {
    await withStore(server(), async (store, prefix) => {
      const created = await store.createActor(actor('default', 'a1'));
      const next = await store.casActor({ ...created, status: 'RESUMING' }, 1);
      const raw = rawClient(server());
      try {
        const streams = (await keysWithPrefix(server(), prefix)).filter((k) => /\{s\d+\}:changes$/.test(k));
        assert.equal(streams.length, 1);
        const entries = (await raw.xrange(streams[0]!, '-', '+', 'COUNT', 10)) as [string, string[]][];
        assert.deepEqual(
          entries.map(([id]) => id),
          ['0-1', '0-2'],
        );
        const fields = new Map<string, string>();
        for (let i = 0; i < entries[1]![1].length; i += 2) fields.set(entries[1]![1][i]!, entries[1]![1][i + 1]!);
        assert.equal(fields.get('k'), 'actor');
        assert.equal(fields.get('key'), 'default/a1');
        assert.deepEqual(decodeActor('default', 'a1', fields.get('v')!), next);
      } finally {
        raw.disconnect();
      }
    });
  });

  it('watch sees the changes another client makes, with their values', { skip: skipSingle }, async () => {
    await withStore(server(), async (store) => {
      const other = await store.openAnother();
      try {
        const controller = new AbortController();
        const seen: Change[] = [];
        const consumed = (async () => {
          for await (const change of store.watch(['actor', 'worker'], controller.signal)) {
            seen.push(change);
            if (seen.length === 4) controller.abort();
          }
        })();
        const created = await other.createActor(actor('team-x', 'a1'));
        const next = await other.casActor({ ...created, status: 'RESUMING' }, 1);
        const w1 = await other.putWorker(worker('w1'));
        await other.deleteActor('team-x', 'a1', 2);
        await consumed;
        assert.deepEqual(
          seen.map((c) => [c.kind, c.key]),
          [
            ['actor', 'team-x/a1'],
            ['actor', 'team-x/a1'],
            ['worker', 'w1'],
            ['actor', 'team-x/a1'],
          ],
        );
        assert.deepEqual(seen[1]!.value, next);
        assert.deepEqual(seen[2]!.value, w1);
        assert.equal(seen[3]!.value, undefined);
      } finally {
        await other.close();
      }
    });
  });

  it('claims are exclusive across processes', { skip: skipSingle, timeout: 60_000 }, async () => {
    await withStore(server(), async (store, prefix) => {
      for (let i = 0; i < 40; i++) await store.putWorker(worker(`w${String(i).padStart(2, '0')}`));
      const run = promisify(execFile);
      const outputs = await Promise.all(
        [0, 1, 2, 3].map((p) =>
          run(process.execPath, [CHILD, 'claim', server().url, prefix, '25', `p${p}`], { timeout: 30_000 }),
        ),
      );
      const won = outputs.flatMap(({ stdout }) => JSON.parse(stdout) as string[]);
      assert.equal(won.length, 40);
      assert.equal(new Set(won).size, 40);
      const busy = (await store.listWorkers({ limit: 1000 })).items.filter((w) => w.state === 'busy');
      assert.equal(busy.length, 40);
    });
  });

  it('a watcher in another process gets every change made while its connection was cut', {
    skip: skipSingle,
    timeout: 60_000,
  }, async () => {
    await withStore(server(), async (store, prefix) => {
      const watcher = child(['watch', server().url, prefix, '30']);
      try {
        await until('the child watching', () => watcher.lines.includes('ready'));
        await store.createActor(actor('default', 'before')); // delivered live
        await until('the live change', () => watcher.lines.includes('default/before'));
        const id = await subscriberId(server(), 'torpor-watch-child');
        // Freeze the child, cut its subscription, write meanwhile: nothing reaches it through Pub/Sub.
        watcher.proc.kill('SIGSTOP');
        const raw = rawClient(server());
        await raw.client('KILL', 'ID', id);
        raw.disconnect();
        const names = Array.from({ length: 29 }, (_, i) => `during-${String(i).padStart(2, '0')}`);
        for (const [i, name] of names.entries()) await store.createActor(actor(i % 2 ? 'default' : 'team-y', name));
        watcher.proc.kill('SIGCONT');
        assert.equal(await within(20_000, 'the child to finish', watcher.exited), 0);
        const keys = watcher.lines.filter((l) => l !== 'ready');
        assert.equal(keys.length, 30, keys.join(' '));
        assert.equal(keys[0], 'default/before');
        // Per space (per slot) in order; nothing lost, nothing twice.
        for (const space of ['default', 'team-y']) {
          assert.deepEqual(
            keys.filter((k) => k.startsWith(`${space}/during`)),
            names.filter((_, i) => (i % 2 ? 'default' : 'team-y') === space).map((n) => `${space}/${n}`),
          );
        }
      } finally {
        watcher.proc.kill('SIGKILL');
      }
    });
  });

  it('a watcher that fell behind the retained history is ended, not left stale', {
    skip: skipSingle,
    timeout: 60_000,
  }, async () => {
    await withStore(
      server(),
      async (store, prefix) => {
        const watcher = child(['watch', server().url, prefix, '1000']);
        try {
          await until('the child watching', () => watcher.lines.includes('ready'));
          const id = await subscriberId(server(), 'torpor-watch-child');
          watcher.proc.kill('SIGSTOP');
          const raw = rawClient(server());
          await raw.client('KILL', 'ID', id);
          raw.disconnect();
          await Promise.all(Array.from({ length: 400 }, (_, i) => store.createActor(actor('default', `a${i}`))));
          watcher.proc.kill('SIGCONT');
          assert.equal(await within(20_000, 'the child to finish', watcher.exited), 0);
          assert.equal(watcher.lines.at(-1), 'ended');
          assert.ok(watcher.lines.length < 400, `${watcher.lines.length} lines`);
        } finally {
          watcher.proc.kill('SIGKILL');
        }
      },
      // Writers trim the streams: with a retention of 10, 400 changes drop the first ones (Redis trims whole
      // stream nodes, so a few more than 10 remain).
      { changeRetention: 10 },
    );
  });

  it('close ends open watches', { skip: skipSingle }, async () => {
    const store = await open(server(), nextPrefix());
    const drained = (async () => {
      for await (const _ of store.watch(['actor'], new AbortController().signal)) {
        // nothing is written: the loop must end because the store closed
      }
    })();
    await store.close();
    await drained;
  });

  it('refuses a brace in the prefix and a changed shard count', { skip: skipSingle }, async () => {
    await assert.rejects(open(server(), 'bad{prefix}:'), { code: 'INVALID_ARGUMENT', field: 'prefix' });
    await assert.rejects(open(server(), 'p:', { shards: 0 }), { code: 'INVALID_ARGUMENT', field: 'shards' });
    await withStore(
      server(),
      async (_store, prefix) => {
        await assert.rejects(open(server(), prefix, { shards: 8 }), { code: 'FAILED_PRECONDITION', field: 'shards' });
        const again = await open(server(), prefix); // takes the recorded count
        await again.createActor(actor('default', 'a1'));
        assert.equal((await _store.getActor('default', 'a1'))?.version, 1);
        await again.close();
      },
      { shards: 4 },
    );
  });

  it('openStore opens redis:// with its options; errors never show the password', { skip: skipSingle }, async () => {
    const prefix = nextPrefix();
    const store = await openStore(`${server().url}?prefix=${encodeURIComponent(prefix)}&shards=2`);
    try {
      assert.ok(store instanceof RedisStore);
      await store.createActor(actor('default', 'a1'));
      assert.ok((await keysWithPrefix(server(), prefix)).some((k) => k.startsWith(`${prefix}{s`)));
      const actors: Actor[] = (await store.listActors('default')).items;
      assert.equal(actors.length, 1);
    } finally {
      await store.close();
      await dropPrefix(server(), prefix);
    }
    const secret = 'hunter2-secret';
    await assert.rejects(openStore(`redis://user:${secret}@127.0.0.1:1`), (err: unknown) => {
      assert.ok(isTorporError(err, 'RUNTIME_ERROR'), String(err));
      assert.equal(err.field, 'store');
      assert.match(err.message, /127\.0\.0\.1:1/);
      assert.ok(!err.message.includes(secret), err.message);
      return true;
    });
    await assert.rejects(openStore(`${server().url}?password=${secret}`), (err: unknown) => {
      assert.ok(isTorporError(err, 'INVALID_ARGUMENT'), String(err));
      assert.equal(err.field, 'store');
      assert.ok(!err.message.includes(secret), err.message);
      return true;
    });
  });
});
