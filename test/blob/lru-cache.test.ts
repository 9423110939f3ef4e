import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { mkdtemp, readdir, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Readable } from 'node:stream';
import { afterEach, beforeEach, describe, it } from 'node:test';
import { LruBlobCache } from '../../src/blob/lru-cache.ts';
import { restoreSnapshot, writeSnapshot } from '../../src/snapshot/index.ts';
import { CHUNK, META, scratch, writeRandom } from '../snapshot/helpers.ts';
import { blobStoreConformance, rejectsWith } from './conformance.ts';

async function tempCache(maxBytes: number) {
  const root = await mkdtemp(join(tmpdir(), 'torpor-lru-'));
  return {
    root,
    store: new LruBlobCache(root, { maxBytes }),
    cleanup: () => rm(root, { recursive: true, force: true }),
  };
}

// Under its cap it is a plain blob store.
blobStoreConformance('LruBlobCache', () => tempCache(1 << 30));

describe('LruBlobCache', () => {
  let root: string;
  let cache: LruBlobCache;
  let cleanup: () => Promise<void>;
  const KB = 1000;
  beforeEach(async () => {
    ({ root, store: cache, cleanup } = await tempCache(3 * KB));
  });
  afterEach(() => cleanup());

  // One after another: a `has` hit is a use, so concurrent ones would leave the recency order to chance.
  const has = async (keys: string[]) => {
    const found: boolean[] = [];
    for (const key of keys) found.push(await cache.has(key));
    return found;
  };

  it('evicts the least recently used objects once it holds more than its cap', async () => {
    for (const key of ['a', 'b', 'c']) await cache.put(key, randomBytes(KB));
    assert.equal(await cache.bytes(), 3 * KB);
    await cache.put('d', Readable.from([randomBytes(KB / 2), randomBytes(KB / 2)])); // a stream: sized on disk
    assert.equal(await cache.bytes(), 3 * KB);
    assert.deepEqual(await has(['b', 'c', 'd']), [true, true, true]);
    await rejectsWith(cache.getBytes('a'), 'NOT_FOUND', 'key');
    await cache.put('big', randomBytes(2 * KB)); // two must go for it
    assert.deepEqual(await has(['c', 'd', 'big']), [false, true, true]);
    assert.equal(await cache.bytes(), 3 * KB);
  });

  it('a hit refreshes recency: the read object outlives older unread ones', async () => {
    for (const key of ['a', 'b', 'c']) await cache.put(key, randomBytes(KB));
    await cache.getBytes('a');
    await cache.put('d', randomBytes(KB));
    assert.deepEqual(await has(['a', 'b']), [true, false]);
  });

  it('an object larger than the whole cap is not kept, and evicts nothing', async () => {
    await cache.put('a', randomBytes(KB));
    await cache.put('huge', randomBytes(4 * KB));
    assert.deepEqual(await has(['a', 'huge']), [true, false]);
    assert.equal(await cache.bytes(), KB);
  });

  it('a new process takes the recency order from the files and applies a lower cap', async () => {
    for (const key of ['a', 'b', 'c']) await cache.put(key, randomBytes(KB));
    await new Promise((r) => setTimeout(r, 20)); // distinct mtimes
    await cache.getBytes('a');
    const reopened = new LruBlobCache(root, { maxBytes: 2 * KB });
    assert.equal(await reopened.bytes(), 2 * KB);
    assert.deepEqual(await Promise.all(['a', 'b', 'c'].map((k) => reopened.has(k))), [true, false, true]);
  });

  it('refuses a cap that is not a positive integer', () => {
    assert.throws(() => new LruBlobCache(root, { maxBytes: 0 }), /maxBytes/);
  });
});

describe('LruBlobCache as the chunk cache of a restore', () => {
  it('a warm restore fetches nothing; a corrupt cached chunk is fetched again and replaced', async () => {
    const s = await scratch();
    try {
      await writeRandom(join(s.src, 'mem.img'), 4 * CHUNK);
      const key = 'snapshots/sp/a/1/manifest.json';
      await writeSnapshot({ blob: s.blob, dir: s.src, files: ['mem.img'], key, meta: META, chunkSize: CHUNK });
      const cache = new LruBlobCache(join(s.root, 'lru'), { maxBytes: 64 * CHUNK });
      const cold = await restoreSnapshot({ blob: s.blob, key, dir: join(s.root, 'r1'), cache });
      assert.equal(cold.stats.fetchedChunks, 4);
      const warm = await restoreSnapshot({ blob: s.blob, key, dir: join(s.root, 'r2'), cache });
      assert.deepEqual([warm.stats.fetchedChunks, warm.stats.cachedChunks], [0, 4]);

      const chunks = join(s.root, 'lru', 'chunks');
      const [victim] = await readdir(chunks);
      await writeFile(join(chunks, victim!), randomBytes(100));
      const repaired = await restoreSnapshot({ blob: s.blob, key, dir: join(s.root, 'r3'), cache });
      assert.deepEqual([repaired.stats.fetchedChunks, repaired.stats.cachedChunks], [1, 3]);
      const again = await restoreSnapshot({ blob: s.blob, key, dir: join(s.root, 'r4'), cache });
      assert.deepEqual([again.stats.fetchedChunks, again.stats.cachedChunks], [0, 4]);
    } finally {
      await s.cleanup();
    }
  });
});
