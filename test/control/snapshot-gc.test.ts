// Snapshot GC beside snapshot writes of another server (src/control/snapshot-gc.ts), on both StateStores: two
// "servers" (two store clients, two SnapshotGc with their own holders) share one store and one blob store. The
// race is driven deterministically by holding a blob operation until the test lets it go: a writer that has
// handled (reused) every chunk but not yet put its manifest, and a sweep that has begun deleting.
import assert from 'node:assert/strict';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { Readable } from 'node:stream';
import { after, describe, it } from 'node:test';
import { pino } from 'pino';
import type { BlobList, BlobStore, ByteRange } from '../../src/blob/blob.ts';
import { SnapshotGc } from '../../src/control/snapshot-gc.ts';
import {
  collectGarbage,
  readManifest,
  referencedKeys,
  restoreSnapshot,
  snapshotWhole,
  writeSnapshot,
} from '../../src/snapshot/index.ts';
import { RedisStore } from '../../src/store/redis.ts';
import { SqliteStore } from '../../src/store/sqlite.ts';
import type { StateStore } from '../../src/store/store.ts';
import { CHUNK, filesUnder, META, makeCheckpoint, scratch, writeRandom } from '../snapshot/helpers.ts';
import { actor } from '../store/conformance.ts';
import { dropPrefix, startRedis } from '../store/redis-server.ts';

const log = pino({ level: 'silent' });
const redis = await startRedis();
after(async () => {
  if (typeof redis !== 'string') await redis.stop();
});

interface TwoServers {
  a: StateStore;
  b: StateStore;
  cleanup(): Promise<void>;
}

async function sqliteServers(): Promise<TwoServers> {
  const dir = await mkdtemp(join(tmpdir(), 'torpor-gc-'));
  const a = SqliteStore.open(join(dir, 'state.db'));
  const b = SqliteStore.open(join(dir, 'state.db'));
  return {
    a,
    b,
    cleanup: async () => {
      await a.close();
      await b.close();
      await rm(dir, { recursive: true, force: true });
    },
  };
}

let prefixes = 0;
async function redisServers(): Promise<TwoServers> {
  if (typeof redis === 'string') throw new Error(redis);
  const prefix = `gc${process.pid}-${++prefixes}:`;
  const a = await RedisStore.open({ url: redis.url, prefix });
  const b = await a.openAnother();
  return {
    a,
    b,
    cleanup: async () => {
      await a.close();
      await b.close();
      await dropPrefix(redis, prefix);
    },
  };
}

/** A real blob store whose chosen operations wait at a gate the test opens. */
class GatedBlobStore implements BlobStore {
  readonly inner: BlobStore;
  #gate: { match: (op: string, key: string) => boolean; reached: () => void; open: Promise<void> } | undefined;

  constructor(inner: BlobStore) {
    this.inner = inner;
  }

  /** The next operation `match` accepts waits until the returned `open` is called; `reached` settles when one
   * has arrived. */
  hold(match: (op: string, key: string) => boolean): { reached: Promise<void>; open: () => void } {
    let reached!: () => void;
    let open!: () => void;
    const arrived = new Promise<void>((r) => {
      reached = r;
    });
    const opened = new Promise<void>((r) => {
      open = r;
    });
    this.#gate = { match, reached, open: opened };
    return { reached: arrived, open };
  }

  async #pass(op: string, key: string): Promise<void> {
    const gate = this.#gate;
    if (gate?.match(op, key)) {
      this.#gate = undefined;
      gate.reached();
      await gate.open;
    }
  }

  async put(key: string, body: Uint8Array | Readable): Promise<void> {
    await this.#pass('put', key);
    return this.inner.put(key, body);
  }
  get(key: string, range?: ByteRange): Promise<Readable> {
    return this.inner.get(key, range);
  }
  getBytes(key: string): Promise<Uint8Array> {
    return this.inner.getBytes(key);
  }
  has(key: string): Promise<boolean> {
    return this.inner.has(key);
  }
  list(prefix: string, opts?: { cursor?: string; limit?: number }): Promise<BlobList> {
    return this.inner.list(prefix, opts);
  }
  async delete(key: string): Promise<void> {
    await this.#pass('delete', key);
    return this.inner.delete(key);
  }
}

/** What actors point at: the live set a server's collection reads (as Lifecycle.liveManifests does). */
async function liveIn(store: StateStore): Promise<string[]> {
  const page = await store.listActors(undefined, { limit: 1000 });
  return page.items.flatMap((a) => (a.snapshot ? [a.snapshot] : []));
}

const OLD = 'snapshots/s/gone/1/manifest.json';
const OTHER = 'snapshots/s/other/1/manifest.json';
const NEW = 'snapshots/s/kept/2/manifest.json';

/** A checkpoint written once as OLD (dead: nothing points at it) plus an unrelated dead snapshot OTHER, so a
 * collection has garbage to delete; NEW, written by the test, reuses every chunk of OLD. */
async function setup() {
  const s = await scratch();
  const files = await makeCheckpoint(s.src, CHUNK);
  const first = await writeSnapshot({ blob: s.blob, dir: s.src, files, key: OLD, meta: META, chunkSize: CHUNK });
  const otherDir = join(s.root, 'other');
  await writeRandom(join(otherDir, 'solo.bin'), 3 * CHUNK);
  await writeSnapshot({ blob: s.blob, dir: otherDir, files: ['solo.bin'], key: OTHER, meta: META, chunkSize: CHUNK });
  const otherObjects = [...referencedKeys(await readManifest(s.blob, OTHER))];
  const gated = new GatedBlobStore(s.blob);
  const writeNew = () => writeSnapshot({ blob: gated, dir: s.src, files, key: NEW, meta: META, chunkSize: CHUNK });
  return { s, gated, writeNew, otherObjects, firstStats: first.stats };
}

/** NEW's manifest and every object it names exist, and it restores to the checkpoint's bytes. */
async function assertRestorable(s: Awaited<ReturnType<typeof scratch>>): Promise<void> {
  assert.equal(await snapshotWhole(s.blob, NEW), true, 'every object of the new snapshot is still there');
  const out = join(s.root, 'restored');
  await restoreSnapshot({ blob: s.blob, key: NEW, dir: out });
  assert.deepEqual(await filesUnder(out), await filesUnder(s.src));
}

function gcFor(store: StateStore, blob: BlobStore, holder: string, waitMs = 10_000): SnapshotGc {
  return new SnapshotGc({ store, blob, log, holder, waitMs, pollMs: 20 });
}

const suites: [string, () => Promise<TwoServers>, string | undefined][] = [
  ['sqlite', sqliteServers, undefined],
  ['redis', redisServers, typeof redis === 'string' ? redis : undefined],
];

for (const [name, open, skip] of suites) {
  describe(`snapshot GC beside another server's snapshot write (${name})`, { skip }, () => {
    it('without the protocol, a collection between chunk reuse and manifest deletes what the write reused', async () => {
      // The control: shows the race this suite guards against is real in this setup.
      const { s, gated, writeNew } = await setup();
      try {
        const manifestPut = gated.hold((op, key) => op === 'put' && key === NEW);
        const writing = writeNew();
        await manifestPut.reached;
        await collectGarbage(s.blob, []);
        manifestPut.open();
        await writing;
        assert.equal(await snapshotWhole(s.blob, NEW), false);
      } finally {
        await s.cleanup();
      }
    });

    it('a collection waits for the writes in flight without holding new ones off, and deletes none of their objects', async () => {
      const servers = await open();
      const { s, gated, writeNew, otherObjects } = await setup();
      try {
        const gcA = gcFor(servers.a, s.blob, 'server-a');
        const gcB = gcFor(servers.b, s.blob, 'server-b');
        const write = await gcA.beginWrite(NEW);
        const manifestPut = gated.hold((op, key) => op === 'put' && key === NEW);
        const writing = writeNew();
        await manifestPut.reached;

        const collecting = gcB.collect(() => liveIn(servers.b));
        await new Promise((r) => setTimeout(r, 300));
        for (const key of otherObjects) assert.equal(await s.blob.has(key), true, 'nothing deleted while A writes');
        // A write whose process died keeps its record until it expires: meanwhile other writes go on.
        const other = await gcA.beginWrite('snapshots/s/another/3/manifest.json');
        await other.end();

        manifestPut.open();
        await writing;
        await servers.a.ensureSpace('s');
        await servers.a.createActor({ ...actor('s', 'kept'), snapshot: NEW });
        await write.end();
        const result = await collecting;
        assert.ok(result, 'the collection ran');
        assert.equal(result.deletedManifests, 2, 'OLD and OTHER');
        assert.equal(result.deletedChunks, otherObjects.length, "OTHER's objects, none of NEW's");
        await assertRestorable(s);
      } finally {
        await s.cleanup();
        await servers.cleanup();
      }
    });

    it('a collection that finds no moment without writes holds new ones off, waits for those in flight, and deletes none of their objects', async () => {
      const servers = await open();
      const { s, gated, writeNew, otherObjects } = await setup();
      try {
        const gcA = gcFor(servers.a, s.blob, 'server-a');
        // Patient for 0.5 s: then B holds new writes off and waits for A's.
        const gcB = gcFor(servers.b, s.blob, 'server-b', 1000);
        // Server A suspends: the write is recorded, every chunk is handled (all reused: `has` said yes), the
        // manifest is not written yet.
        const write = await gcA.beginWrite(NEW);
        const manifestPut = gated.hold((op, key) => op === 'put' && key === NEW);
        const writing = writeNew();
        await manifestPut.reached;

        // Server B collects meanwhile: nothing points at OLD, so every chunk NEW reused is garbage by the store.
        const collecting = gcB.collect(() => liveIn(servers.b));
        // Once B sweeps, no new write may begin (the probe): it is then waiting for A's write.
        while (await servers.a.recordSnapshotWrite('probe', 60_000)) {
          await servers.a.endSnapshotWrite('probe');
          await new Promise((r) => setTimeout(r, 20));
        }
        for (const key of otherObjects) assert.equal(await s.blob.has(key), true, 'nothing deleted while A writes');

        // A finishes: manifest, commit (the actor points at NEW), end of the write.
        manifestPut.open();
        await writing;
        assert.equal(await write.whole(), true);
        await servers.a.ensureSpace('s');
        await servers.a.createActor({ ...actor('s', 'kept'), snapshot: NEW });
        await write.end();

        const result = await collecting;
        assert.ok(result, 'the collection ran');
        assert.equal(result.deletedManifests, 2, 'OLD and OTHER');
        assert.equal(result.deletedChunks, otherObjects.length, "OTHER's objects, none of NEW's");
        for (const key of otherObjects) assert.equal(await s.blob.has(key), false);
        await assertRestorable(s);
      } finally {
        await s.cleanup();
        await servers.cleanup();
      }
    });

    it('a write that begins while a collection deletes waits for it, then uploads what was deleted', async () => {
      const servers = await open();
      const { s, writeNew, firstStats } = await setup();
      const gatedGcBlob = new GatedBlobStore(s.blob);
      try {
        const gcA = gcFor(servers.a, s.blob, 'server-a');
        const gcB = gcFor(servers.b, gatedGcBlob, 'server-b');
        const firstDelete = gatedGcBlob.hold((op) => op === 'delete');
        const collecting = gcB.collect(() => liveIn(servers.b));
        await firstDelete.reached;

        let began = false;
        const beginning = gcA.beginWrite(NEW).then((w) => {
          began = true;
          return w;
        });
        await new Promise((r) => setTimeout(r, 300));
        assert.equal(began, false, 'no write begins while a sweep deletes');

        firstDelete.open();
        const result = await collecting;
        assert.ok(result);
        assert.ok(result.deletedChunks > 0, "OLD's chunks were deleted");
        const write = await beginning;
        const { stats } = await writeNew();
        // Nothing left to reuse from the store: it uploads what the first write did (repeats within it aside).
        assert.equal(stats.uploadedChunks, firstStats.uploadedChunks);
        assert.equal(stats.reusedChunks, firstStats.reusedChunks);
        assert.equal(await write.whole(), true);
        await write.end();
        await assertRestorable(s);
      } finally {
        await s.cleanup();
        await servers.cleanup();
      }
    });

    it('only one collection runs at a time across servers, and one put off by a write deletes nothing', async () => {
      const servers = await open();
      const { s, otherObjects } = await setup();
      try {
        const gcA = gcFor(servers.a, s.blob, 'server-a', 200);
        const gcB = gcFor(servers.b, s.blob, 'server-b', 200);
        const write = await gcA.beginWrite(NEW);
        // B gives up waiting for the write (waitMs 200): nothing deleted, the leases are free again.
        assert.equal(await gcB.collect(() => liveIn(servers.b)), undefined);
        for (const key of otherObjects) assert.equal(await s.blob.has(key), true);
        assert.equal(await servers.a.recordSnapshotWrite('probe', 60_000), true, 'the sweep lease was released');
        await servers.a.endSnapshotWrite('probe');
        await write.end();

        // While A holds the GC lease, B does not collect at all.
        assert.ok(await servers.a.acquireLease('snapshot-gc', 'server-a', 60_000));
        assert.equal(await gcB.collect(() => liveIn(servers.b)), undefined);
        await servers.a.releaseLease('snapshot-gc', 'server-a');
        const result = await gcB.collect(() => liveIn(servers.b));
        assert.ok(result);
        assert.equal(result.deletedManifests, 2);
      } finally {
        await s.cleanup();
        await servers.cleanup();
      }
    });
  });
}
