import assert from 'node:assert/strict';
import { cp, open, readFile, symlink } from 'node:fs/promises';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, it } from 'node:test';
import { restoreSnapshot, writeSnapshot } from '../../src/snapshot/index.ts';
import { dataExtents } from '../../src/sys/extents.ts';
import { CHUNK, META, referenceChunks, scratch, scribble, writeSparse } from './helpers.ts';

type Scratch = Awaited<ReturnType<typeof scratch>>;

/** A sparse file whose data sits at odd offsets: straddling chunk boundaries, a single byte, the partial last
 * chunk, and a region written with zeros (data to the file system, an all-zero chunk to the snapshot). */
async function oddSparseFile(path: string): Promise<number> {
  const size = 40 * CHUNK + 1234;
  await writeSparse(path, size, [
    { offset: 0, length: 10 },
    { offset: 7 * CHUNK - 3, length: 10 },
    { offset: 20 * CHUNK + 4097, length: 1 },
    { offset: size - 1, length: 1 },
  ]);
  const handle = await open(path, 'r+');
  try {
    await handle.write(Buffer.alloc(2 * CHUNK), 0, 2 * CHUNK, 30 * CHUNK);
  } finally {
    await handle.close();
  }
  return size;
}

describe('snapshot of a sparse file by its data extents', () => {
  let s: Scratch;
  beforeEach(async () => {
    s = await scratch();
  });
  afterEach(async () => {
    await s.cleanup();
  });

  it('lists the data extents: holes are left out, every data byte is inside one', async () => {
    const path = join(s.src, 'memory');
    const size = await oddSparseFile(path);
    const { size: listed, extents } = await dataExtents(path);
    assert.equal(listed, size);
    const data = extents.reduce((sum, e) => sum + e.end - e.start, 0);
    assert.ok(data < size / 2, `holes are reported (${data} of ${size} bytes are data)`);
    for (const offset of [0, 7 * CHUNK - 3, 7 * CHUNK + 6, 20 * CHUNK + 4097, size - 1, 30 * CHUNK, 32 * CHUNK - 1]) {
      assert.ok(
        extents.some((e) => e.start <= offset && offset < e.end),
        `byte ${offset} is in a data extent`,
      );
    }
  });

  it('gives byte for byte the manifest of a whole-file read, and restores the same bytes', async () => {
    const path = join(s.src, 'memory');
    await oddSparseFile(path);
    const expected = await referenceChunks(path, CHUNK);
    assert.ok(expected.filter((h) => h !== null).length >= 4, 'the file has data chunks');
    assert.equal(expected[30], null, 'a chunk of written zeros is an all-zero chunk');
    const { manifest, stats } = await writeSnapshot({
      blob: s.blob,
      dir: s.src,
      files: ['memory'],
      key: 'snapshots/a.json',
      meta: META,
      chunkSize: CHUNK,
    });
    assert.deepEqual(manifest.files[0]!.chunks, expected);
    assert.equal(stats.zeroChunks, expected.filter((h) => h === null).length);
    const restored = join(s.root, 'restored');
    await restoreSnapshot({ blob: s.blob, key: 'snapshots/a.json', dir: restored });
    assert.deepEqual(await readFile(join(restored, 'memory')), await readFile(path));
  });

  it('reads a linked file and compares against a kept copy: only the changed chunk is uploaded', async () => {
    // The memory file staged elsewhere and linked into the checkpoint, as the micro-VM runtime leaves it.
    const staged = join(s.root, 'staged-memory');
    await oddSparseFile(staged);
    await symlink(staged, join(s.src, 'memory'));
    const first = await writeSnapshot({
      blob: s.blob,
      dir: s.src,
      files: ['memory'],
      key: 'snapshots/a.json',
      meta: META,
      chunkSize: CHUNK,
    });
    const kept = join(s.root, 'kept');
    await cp(staged, join(kept, 'memory'), { recursive: true });
    await scribble(staged, 7 * CHUNK + 100, 50);
    const second = await writeSnapshot({
      blob: s.blob,
      dir: s.src,
      files: ['memory'],
      key: 'snapshots/b.json',
      meta: { ...META, parent: 'snapshots/a.json' },
      chunkSize: CHUNK,
      previous: first.manifest,
      previousDir: kept,
      deltaLevel: 0, // chunked, not a delta against the first
      patches: false, // the changed chunk whole, not as a patch of the first's
    });
    assert.deepEqual(second.manifest.files[0]!.chunks, await referenceChunks(staged, CHUNK));
    assert.equal(second.stats.uploadedChunks, 1);
    assert.notEqual(second.manifest.files[0]!.chunks[7], first.manifest.files[0]!.chunks[7]);
  });
});
