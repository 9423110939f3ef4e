// Page patches: a chunk that differs from the parent snapshot's in few pages keeps the parent's chunk as its base
// and its pages go into the file's patch object. Every test follows the agent's flow: each snapshot is written with
// the previous manifest and a local copy of the previous snapshot's files, then restored and compared byte for byte.
type Scratch = Awaited<ReturnType<typeof scratch>>;

import assert from 'node:assert/strict';
import { cp, open, readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, it } from 'node:test';
import { zstdCompressSync } from 'node:zlib';
import type { BlobStore } from '../../src/blob/blob.ts';
import { TorporError } from '../../src/core/errors.ts';
import {
  chunkKey,
  collectGarbage,
  decodeManifest,
  restoreSnapshot,
  snapshotWhole,
  writeSnapshot,
} from '../../src/snapshot/index.ts';
import { encodePageRuns, patchedPagesByChunk } from '../../src/snapshot/patch.ts';
import { CHUNK, filesUnder, META, referenceChunks, scratch } from './helpers.ts';
import {
  FILE_CHUNKS,
  FILE_SIZE,
  MAX_PAGES,
  memoryLike,
  memoryOf,
  PAGE,
  PAGES_PER_CHUNK,
  page,
  patchedPages,
  Suspender,
  touchPages,
} from './patch-helpers.ts';

describe('page patches', () => {
  let s: Scratch;
  let suspender: Suspender;
  beforeEach(async () => {
    s = await scratch();
    suspender = new Suspender(s, s.blob);
    await memoryLike(suspender.memory);
  });
  afterEach(async () => {
    await s.cleanup();
  });

  it('keeps base chunks through successive snapshots, the patch holding every page changed since them', async () => {
    const first = await suspender.suspend();
    const bases = memoryOf(first).chunks;
    assert.deepEqual(bases, await referenceChunks(suspender.memory, CHUNK));
    assert.equal(memoryOf(first).patch, undefined, 'nothing to patch without a parent');

    const changed = new Set<number>();
    const steps = [
      [page(0, 1), page(5, 7), page(9, 15)],
      [page(0, 2), page(5, 7), page(FILE_CHUNKS - 1, PAGES_PER_CHUNK - 1)], // the last, partial page
      [page(2, 0), page(2, 1), page(11, 3)],
      [page(0, 1), page(7, 8)],
    ];
    for (const pages of steps) {
      await touchPages(suspender.memory, pages);
      for (const p of pages) changed.add(p);
      const result = await suspender.suspend();
      const file = memoryOf(result);
      assert.deepEqual(file.chunks, bases, 'every chunk keeps its base');
      assert.deepEqual(
        patchedPages(file),
        [...changed].sort((a, b) => a - b),
      );
      const chunksTouched = new Set([...changed].map((p) => Math.floor(p / PAGES_PER_CHUNK)));
      assert.equal(result.stats.patchedChunks, chunksTouched.size);
      assert.equal(result.stats.uploadedChunks, 1, 'only the patch object is uploaded');
      assert.ok(result.stats.patchBytes > 0 && result.stats.patchBytes === result.stats.storedBytes);
      assert.ok(await s.blob.has(file.patch!.object));
    }
  });

  it('stores a chunk whole again (a new keyframe) once its pages pass a quarter of it, and patches it from there', async () => {
    const first = await suspender.suspend();
    const base3 = memoryOf(first).chunks[3];
    await touchPages(suspender.memory, [page(3, 0), page(3, 5)]);
    assert.deepEqual(patchedPages(memoryOf(await suspender.suspend())), [page(3, 0), page(3, 5)]);
    await touchPages(suspender.memory, [page(3, 9), page(3, 10)]);
    const atLimit = memoryOf(await suspender.suspend());
    assert.equal(atLimit.chunks[3], base3, `${MAX_PAGES} pages are still a patch`);
    assert.deepEqual(patchedPages(atLimit), [page(3, 0), page(3, 5), page(3, 9), page(3, 10)]);

    await touchPages(suspender.memory, [page(3, 12), page(4, 4)]);
    const past = await suspender.suspend();
    const reference = await referenceChunks(suspender.memory, CHUNK);
    assert.notEqual(memoryOf(past).chunks[3], base3);
    assert.equal(memoryOf(past).chunks[3], reference[3], 'chunk 3 is stored whole, by its hash');
    assert.ok(await s.blob.has(chunkKey(reference[3]!)));
    assert.deepEqual(patchedPages(memoryOf(past)), [page(4, 4)], 'its pages left the patch');
    assert.equal(past.stats.uploadedChunks, 2, 'the new keyframe and the patch');

    await touchPages(suspender.memory, [page(3, 1)]);
    const after = memoryOf(await suspender.suspend());
    assert.equal(after.chunks[3], reference[3], 'patched against the new keyframe');
    assert.deepEqual(patchedPages(after), [page(3, 1), page(4, 4)]);
  });

  it('stores an unchanged snapshot of a patched file with the same patch object, uploading nothing', async () => {
    await suspender.suspend();
    await touchPages(suspender.memory, [page(6, 6)]);
    const patched = await suspender.suspend();
    const again = await suspender.suspend();
    assert.equal(memoryOf(again).patch?.object, memoryOf(patched).patch?.object);
    assert.equal(again.stats.uploadedChunks, 0);
    assert.equal(again.stats.storedBytes, 0);
    assert.equal(again.stats.patchedChunks, 1);
  });

  it('drops a patched chunk that became all zeros to null, and its pages from the patch', async () => {
    await suspender.suspend();
    await touchPages(suspender.memory, [page(4, 2), page(8, 3)]);
    await suspender.suspend();
    const handle = await open(suspender.memory, 'r+');
    await handle.write(Buffer.alloc(CHUNK), 0, CHUNK, 4 * CHUNK);
    await handle.close();
    const zeroed = memoryOf(await suspender.suspend());
    assert.equal(zeroed.chunks[4], null);
    assert.deepEqual(patchedPages(zeroed), [page(8, 3)]);
  });

  it('stores a chunk whose base was all zeros whole, then patches it against that', async () => {
    await suspender.suspend();
    await touchPages(suspender.memory, [page(20, 3)]);
    const filled = await suspender.suspend();
    const reference = await referenceChunks(suspender.memory, CHUNK);
    assert.equal(memoryOf(filled).chunks[20], reference[20]);
    assert.notEqual(reference[20], null);
    assert.equal(memoryOf(filled).patch, undefined, 'no patch: a zero chunk is no base');
    await touchPages(suspender.memory, [page(20, 4)]);
    const patched = memoryOf(await suspender.suspend());
    assert.equal(patched.chunks[20], reference[20]);
    assert.deepEqual(patchedPages(patched), [page(20, 4)]);
  });

  it('writes correct chunks without patching after a patched parent (its local copy is not its base)', async () => {
    await suspender.suspend();
    await touchPages(suspender.memory, [page(1, 1), page(2, 2)]);
    await suspender.suspend();
    await touchPages(suspender.memory, [page(2, 3)]);
    const plain = new Suspender(s, s.blob, false);
    plain.last = suspender.last;
    plain.keys = [...suspender.keys];
    await cp(suspender.kept, plain.kept, { recursive: true });
    const result = await plain.suspend();
    assert.equal(memoryOf(result).patch, undefined);
    assert.deepEqual(memoryOf(result).chunks, await referenceChunks(suspender.memory, CHUNK));
  });

  it('restores a delta whose keyframe is a patched file (the keyframe is its base chunks)', async () => {
    await suspender.suspend();
    await touchPages(suspender.memory, [page(1, 1)]);
    const patched = await suspender.suspend();
    assert.ok(memoryOf(patched).patch);
    await touchPages(suspender.memory, [page(2, 2)]);
    const key = 'snapshots/web/delta.json';
    const delta = await writeSnapshot({
      blob: s.blob,
      dir: s.src,
      files: ['memory'],
      key,
      meta: META,
      chunkSize: CHUNK,
      previous: patched.manifest,
      previousDir: suspender.kept,
      deltaLevel: 19, // level 3 finds too few matches of random bytes in a 2 MiB dictionary to keep the delta
    });
    assert.deepEqual(memoryOf(delta).delta?.base, { size: FILE_SIZE, chunks: memoryOf(patched).chunks });
    await suspender.assertRestores(key);
  });

  it('uploads fewer objects and bytes than whole chunks would', async () => {
    const whole = new Suspender(s, s.blob, false);
    await suspender.suspend();
    await whole.suspend();
    let patchedBytes = 0;
    let wholeBytes = 0;
    for (const pages of [
      [page(0, 3), page(1, 4), page(2, 5), page(3, 6)],
      [page(0, 7), page(5, 4), page(9, 5), page(10, 6)],
    ]) {
      await touchPages(suspender.memory, pages);
      const patched = await suspender.suspend();
      const plain = await whole.suspend();
      assert.equal(plain.stats.patchedChunks, 0);
      assert.equal(plain.stats.uploadedChunks, 4);
      assert.equal(patched.stats.uploadedChunks, 1);
      patchedBytes += patched.stats.storedBytes;
      wholeBytes += plain.stats.storedBytes;
      assert.ok(patched.stats.phases.patch >= 0);
    }
    assert.ok(patchedBytes * 4 < wholeBytes, `patches stored ${patchedBytes} bytes, whole chunks ${wholeBytes}`);
  });
});

describe('restoring a damaged patch', () => {
  let s: Scratch;
  let suspender: Suspender;
  let key: string;
  let object: string;
  beforeEach(async () => {
    s = await scratch();
    suspender = new Suspender(s, s.blob);
    await memoryLike(suspender.memory);
    await suspender.suspend();
    await touchPages(suspender.memory, [page(1, 1), page(3, 2), page(3, 3)]);
    const result = await suspender.suspend();
    key = suspender.keys.at(-1)!;
    object = memoryOf(result).patch!.object;
  });
  afterEach(async () => {
    await s.cleanup();
  });

  async function assertCorrupt(problem: RegExp, cache?: BlobStore): Promise<void> {
    const out = join(s.root, 'out');
    await assert.rejects(restoreSnapshot({ blob: s.blob, key, dir: out, ...(cache ? { cache } : {}) }), (err) => {
      assert.ok(err instanceof TorporError);
      assert.equal(err.code, 'SNAPSHOT_CORRUPT');
      assert.equal(err.field, 'snapshot');
      assert.ok(err.message.includes(object), err.message);
      assert.ok(err.message.includes(`snapshot "${key}"`), err.message);
      assert.match(err.message, /file "memory"/);
      assert.match(err.message, problem);
      return true;
    });
    assert.deepEqual(await filesUnder(out), [], 'no file, complete-looking or partial, is left behind');
  }

  it('reports a missing patch object', async () => {
    await s.blob.delete(object);
    await assertCorrupt(/missing/);
  });

  it('reports a patch object that is not zstd', async () => {
    await s.blob.put(object, Buffer.from('not zstd at all'));
    await assertCorrupt(/decompress/);
  });

  it('reports a patch object of the right length whose bytes do not match its hash', async () => {
    await s.blob.put(object, zstdCompressSync(Buffer.alloc(3 * PAGE, 7)));
    await assertCorrupt(/sha256/);
  });

  it('reports a patch object of the wrong length', async () => {
    await s.blob.put(object, zstdCompressSync(Buffer.alloc(2 * PAGE, 7)));
    await assertCorrupt(/bytes where/);
  });

  it('reads the patch from the node cache, and refetches it when the cached copy is bad', async () => {
    const out = join(s.root, 'out-cached');
    const restoresExactly = async () => {
      await restoreSnapshot({ blob: s.blob, key, dir: out, cache: s.cache });
      assert.ok((await readFile(join(out, 'memory'))).equals(await readFile(suspender.memory)));
    };
    await restoresExactly();
    assert.ok(await s.cache.has(object), 'a restore caches the patch');
    await s.cache.put(object, Buffer.from('bad'));
    await restoresExactly(); // refetched from the store, and the cached copy repaired
    await s.blob.delete(object);
    await restoresExactly(); // from the cache alone
    await s.cache.put(object, Buffer.from('bad'));
    await assertCorrupt(/missing/, s.cache);
  });
});

describe('patches in the manifest schema', () => {
  const HASH = 'c'.repeat(64);
  const OBJECT = `patches/${'d'.repeat(64)}`;
  // 3 chunks of 16 pages; chunk 1 has no base.
  const file = (patch: unknown, extra: object = {}) => ({
    name: 'memory',
    size: 3 * CHUNK - 100,
    chunks: [HASH, null, HASH],
    patch,
    ...extra,
  });
  const manifest = (f: object) => ({
    version: 1,
    ...META,
    chunkSize: CHUNK,
    files: [f],
    createdAt: new Date().toISOString(),
  });
  const decodes = (f: object) => decodeManifest(Buffer.from(JSON.stringify(manifest(f))), 'snapshots/x.json');
  const rejected = (f: object, message: RegExp) =>
    assert.throws(
      () => decodes(f),
      (err) => err instanceof TorporError && err.code === 'SNAPSHOT_CORRUPT' && message.test(err.message),
    );

  it('accepts valid runs, up to the partial last page', () => {
    const good = file({ object: OBJECT, pageSize: PAGE, pages: [0, 2, 5, 11, 32, 1, 40, 8] });
    assert.deepEqual(decodes(good).files[0], good);
  });

  it('rejects runs out of range, unsorted, overlapping or touching, empty, or unpaired', () => {
    const bad = (pages: number[]) => file({ object: OBJECT, pageSize: PAGE, pages });
    rejected(bad([40, 9]), /ends past the file's 48 pages/);
    rejected(bad([5, 1, 2, 1]), /before the end of the previous run/);
    rejected(bad([2, 4, 5, 1]), /before the end of the previous run/);
    rejected(bad([2, 3, 5, 1]), /touching/);
    rejected(bad([2, 0]), /has no pages/);
    rejected(bad([2, 1, 4]), /pairs/);
    rejected(bad([]), /patch\.pages/);
    rejected(bad([-1, 1]), /patch\.pages/);
    rejected(bad([1.5, 1]), /patch\.pages/);
  });

  it('rejects pages in a chunk with no base, a page size that does not divide the chunk, a bad key, a delta', () => {
    rejected(file({ object: OBJECT, pageSize: PAGE, pages: [15, 2] }), /chunk 1, which has no base/);
    rejected(file({ object: OBJECT, pageSize: 3000, pages: [0, 1] }), /does not divide/);
    rejected(file({ object: `chunks/${'d'.repeat(64)}`, pageSize: PAGE, pages: [0, 1] }), /patches\/<sha256>/);
    rejected(file({ object: OBJECT, pageSize: PAGE, pages: [0, 1], extra: 1 }), /patch/);
    const delta = { object: `deltas/${'e'.repeat(64)}`, sha256: HASH, base: { size: CHUNK, chunks: [HASH] } };
    rejected(file({ object: OBJECT, pageSize: PAGE, pages: [0, 1] }, { chunks: [], delta }), /delta has no patch/);
  });
});

describe('garbage collection of patched snapshots', () => {
  let s: Scratch;
  beforeEach(async () => {
    s = await scratch();
  });
  afterEach(async () => {
    await s.cleanup();
  });

  it('keeps the live patch and the base chunks it needs, deletes a patch only a dead snapshot named', async () => {
    const suspender = new Suspender(s, s.blob);
    await memoryLike(suspender.memory);
    const keyframe = await suspender.suspend();
    await touchPages(suspender.memory, [page(2, 2)]);
    const older = await suspender.suspend();
    await touchPages(suspender.memory, [page(2, 3), page(7, 1)]);
    const live = await suspender.suspend();
    const [keyframeKey, olderKey, liveKey] = suspender.keys as [string, string, string];
    const deadPatch = memoryOf(older).patch!.object;
    const livePatch = memoryOf(live).patch!.object;
    assert.notEqual(deadPatch, livePatch);
    assert.deepEqual(
      memoryOf(live).chunks,
      memoryOf(keyframe).chunks,
      'the live snapshot needs the first one’s chunks',
    );

    const result = await collectGarbage(s.blob, [liveKey]);
    assert.equal(result.deletedManifests, 2);
    assert.equal(result.deletedChunks, 1, 'only the dead patch');
    assert.equal(await s.blob.has(deadPatch), false);
    assert.equal(await s.blob.has(livePatch), true);
    assert.equal(await s.blob.has(keyframeKey), false);
    assert.equal(await s.blob.has(olderKey), false);
    assert.equal(await snapshotWhole(s.blob, liveKey), true);
    await suspender.assertRestores(liveKey);

    await s.blob.delete(livePatch);
    assert.equal(await snapshotWhole(s.blob, liveKey), false, 'a snapshot without its patch is not whole');
  });
});

describe('page runs', () => {
  it('encodes sorted pages as [first, count] runs', () => {
    assert.deepEqual(encodePageRuns([]), []);
    assert.deepEqual(encodePageRuns([3]), [3, 1]);
    assert.deepEqual(encodePageRuns([0, 1, 2, 5, 7, 8]), [0, 3, 5, 1, 7, 2]);
  });

  it("maps a parent patch's pages to each chunk's pages, of its own page size or another", () => {
    const HASH = 'c'.repeat(64);
    const object = `patches/${'d'.repeat(64)}`;
    const size = 3 * CHUNK - 100;
    const file = (pageSize: number, pages: number[]) => ({
      name: 'memory',
      size,
      chunks: [HASH, HASH, HASH],
      patch: { object, pageSize, pages },
    });
    // 4 KiB pages 14..17 straddle chunks 0 and 1; page 47 is the file's partial last page.
    const same = patchedPagesByChunk(file(PAGE, [14, 4, 47, 1]), CHUNK);
    assert.deepEqual(
      [...same],
      [
        [0, [14, 15]],
        [1, [0, 1]],
        [2, [15]],
      ],
    );
    // 8 KiB pages 7 and 23 are 4 KiB pages 14, 15 and 46, 47.
    const larger = patchedPagesByChunk(file(2 * PAGE, [7, 1, 23, 1]), CHUNK, PAGE);
    assert.deepEqual(
      [...larger],
      [
        [0, [14, 15]],
        [2, [14, 15]],
      ],
    );
    // 1 KiB pages 3, then 4 and 6 (both in 4 KiB page 1, listed once).
    const smaller = patchedPagesByChunk(file(1024, [3, 2, 6, 1]), CHUNK, PAGE);
    assert.deepEqual([...smaller], [[0, [0, 1]]]);
  });
});
