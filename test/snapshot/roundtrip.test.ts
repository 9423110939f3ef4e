import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { cp, readFile, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, it } from 'node:test';
import { zstdDecompressSync } from 'node:zlib';
import type { BlobStore } from '../../src/blob/blob.ts';
import { TorporError } from '../../src/core/errors.ts';
import type { SnapshotManifest } from '../../src/core/types.ts';
import {
  chunkKey,
  readManifest,
  restoreSnapshot,
  type TransferProgress,
  type WriteSnapshotOptions,
  writeSnapshot,
} from '../../src/snapshot/index.ts';
import { rejectsWith } from '../blob/conformance.ts';
import {
  CHUNK,
  chunkKeysIn,
  filesUnder,
  META,
  makeCheckpoint,
  ObservedBlobStore,
  referenceChunks,
  scratch,
  scribble,
} from './helpers.ts';

type Scratch = Awaited<ReturnType<typeof scratch>>;

function snapshotOpts(s: Scratch, files: string[], key: string, extra: Partial<WriteSnapshotOptions> = {}) {
  return { blob: s.blob, dir: s.src, files, key, meta: META, chunkSize: CHUNK, ...extra };
}

function distinctChunks(manifest: SnapshotManifest): Set<string> {
  return new Set(manifest.files.flatMap((file) => file.chunks).filter((hash) => hash !== null));
}

async function assertSameFiles(fromDir: string, toDir: string, files: string[]): Promise<void> {
  for (const name of files) {
    const [expected, actual] = await Promise.all([readFile(join(fromDir, name)), readFile(join(toDir, name))]);
    assert.ok(actual.equals(expected), `${name} differs after restore`);
  }
}

describe('writeSnapshot + restoreSnapshot', () => {
  let s: Scratch;
  let files: string[];
  beforeEach(async () => {
    s = await scratch();
    files = await makeCheckpoint(s.src, CHUNK);
  });
  afterEach(async () => {
    await s.cleanup();
  });

  it('restores every file byte for byte, and nothing else', async (t) => {
    await writeSnapshot(snapshotOpts(s, files, 'snapshots/a.json'));
    const out = join(s.root, 'out');
    const { stats } = await restoreSnapshot({ blob: s.blob, key: 'snapshots/a.json', dir: out });
    await assertSameFiles(s.src, out, files);
    assert.deepEqual(await filesUnder(out), [...files].sort());
    const sizes = await Promise.all(files.map(async (name) => (await stat(join(s.src, name))).size));
    assert.equal(
      stats.bytes,
      sizes.reduce((a, b) => a + b, 0),
    );

    const source = await stat(join(s.src, 'memory.img'));
    if (source.blocks * 512 >= source.size) return t.skip('this filesystem does not keep holes in sparse files');
    const restored = await stat(join(out, 'memory.img'));
    assert.ok(restored.blocks * 512 < restored.size / 2, 'zero chunks are restored as holes');
  });

  it('lists each chunk by the sha256 of its bytes, null for all-zero chunks', async () => {
    const { manifest } = await writeSnapshot(snapshotOpts(s, files, 'snapshots/a.json'));
    assert.deepEqual(
      manifest.files.map((file) => file.name),
      files,
    );
    for (const file of manifest.files) {
      assert.deepEqual(file.chunks, await referenceChunks(join(s.src, file.name), CHUNK), file.name);
      assert.equal(file.size, (await stat(join(s.src, file.name))).size);
    }
    assert.ok(
      manifest.files.some((file) => file.chunks.includes(null)),
      'the fixture has zero chunks',
    );
    assert.deepEqual(await readManifest(s.blob, 'snapshots/a.json'), manifest);
    assert.equal(manifest.template, META.template);
    assert.equal(manifest.chunkSize, CHUNK);
  });

  it('stores exactly the distinct non-zero chunks, compressed, and counts them', async () => {
    const { manifest, stats } = await writeSnapshot(snapshotOpts(s, files, 'snapshots/a.json'));
    const expected = distinctChunks(manifest);
    assert.deepEqual(await chunkKeysIn(s.blob), new Set([...expected].map(chunkKey)));
    const zeroHash = createHash('sha256').update(Buffer.alloc(CHUNK)).digest('hex');
    assert.equal(await s.blob.has(chunkKey(zeroHash)), false, 'an all-zero chunk is never stored');

    let storedBytes = 0;
    for (const hash of expected) {
      const compressed = await s.blob.getBytes(chunkKey(hash));
      storedBytes += compressed.length;
      assert.equal(createHash('sha256').update(zstdDecompressSync(compressed)).digest('hex'), hash);
    }
    const entries = manifest.files.flatMap((file) => file.chunks);
    assert.equal(stats.uploadedChunks, expected.size);
    assert.equal(stats.storedBytes, storedBytes);
    assert.equal(stats.totalChunks, entries.length);
    assert.equal(stats.zeroChunks, entries.filter((hash) => hash === null).length);
    assert.equal(stats.reusedChunks, stats.totalChunks - stats.zeroChunks - stats.uploadedChunks);
    assert.ok(stats.reusedChunks > 0, 'dup.bin repeats a chunk within the snapshot');
  });

  it('uploads nothing for a second snapshot of unchanged files', async () => {
    const first = await writeSnapshot(snapshotOpts(s, files, 'snapshots/a.json'));
    const second = await writeSnapshot(snapshotOpts(s, files, 'snapshots/b.json'));
    assert.equal(second.stats.uploadedChunks, 0);
    assert.equal(second.stats.storedBytes, 0);
    assert.equal(second.stats.reusedChunks, first.stats.totalChunks - first.stats.zeroChunks);
    assert.deepEqual(second.manifest.files, first.manifest.files);
  });

  it('uploads only the chunk that changed', async () => {
    const first = await writeSnapshot(snapshotOpts(s, files, 'snapshots/a.json'));
    await scribble(join(s.src, 'odd.bin'), 2 * CHUNK + 5, 100);
    const second = await writeSnapshot(snapshotOpts(s, files, 'snapshots/b.json'));
    assert.equal(second.stats.uploadedChunks, 1);

    const before = first.manifest.files.find((file) => file.name === 'odd.bin')!.chunks;
    const after = second.manifest.files.find((file) => file.name === 'odd.bin')!.chunks;
    assert.deepEqual(
      after.map((hash, i) => hash !== before[i]),
      before.map((_, i) => i === 2),
    );
    const out = join(s.root, 'out');
    await restoreSnapshot({ blob: s.blob, key: 'snapshots/b.json', dir: out });
    await assertSameFiles(s.src, out, files);
  });

  it('takes the previous hash for a chunk byte-equal to a local copy of the previous snapshot, hashes the rest', async () => {
    const first = await writeSnapshot(snapshotOpts(s, files, 'snapshots/a.json', { deltaLevel: 0 }));
    const kept = join(s.root, 'kept');
    await cp(s.src, kept, { recursive: true });
    await scribble(join(s.src, 'odd.bin'), 2 * CHUNK + 5, 100);
    // The kept copy differs from the live file where the live one did not change: only equal bytes count.
    await scribble(join(kept, 'odd.bin'), 4 * CHUNK + 1, 10);
    const looked: string[] = [];
    const blob = new ObservedBlobStore(s.blob);
    blob.has = (key: string) => {
      looked.push(key);
      return s.blob.has(key);
    };
    const second = await writeSnapshot(
      snapshotOpts(s, files, 'snapshots/b.json', {
        blob,
        previous: first.manifest,
        previousDir: kept,
        deltaLevel: 0,
        patches: false,
      }),
    );
    for (const name of files) {
      const chunks = second.manifest.files.find((file) => file.name === name)!.chunks;
      assert.deepEqual(chunks, await referenceChunks(join(s.src, name), CHUNK), name);
    }
    // Looked up: odd.bin's changed chunk 2 and chunk 4 (unequal to the kept copy); nothing else.
    const odd = second.manifest.files.find((file) => file.name === 'odd.bin')!.chunks;
    assert.deepEqual(looked.sort(), [chunkKey(odd[2]!), chunkKey(odd[4]!)].sort());
    assert.equal(second.stats.uploadedChunks, 1);
    const out = join(s.root, 'out');
    await restoreSnapshot({ blob: s.blob, key: 'snapshots/b.json', dir: out });
    await assertSameFiles(s.src, out, files);
  });

  it('reports progress that rises to the total, writing and restoring', async () => {
    const writes: TransferProgress[] = [];
    const restores: TransferProgress[] = [];
    const { stats } = await writeSnapshot(snapshotOpts(s, files, 'k.json', { onProgress: (p) => writes.push(p) }));
    await restoreSnapshot({
      blob: s.blob,
      key: 'k.json',
      dir: join(s.root, 'out'),
      onProgress: (p) => restores.push(p),
    });
    for (const events of [writes, restores]) {
      assert.ok(events.length > 1);
      events.forEach((p, i) => {
        assert.ok(i === 0 || p.bytesDone >= events[i - 1]!.bytesDone, 'monotonic');
      });
      assert.deepEqual(events.at(-1), { bytesDone: stats.rawBytes, bytesTotal: stats.rawBytes });
    }
  });

  it('uploads in parallel, never more chunks at once than the concurrency', async () => {
    const observed = new ObservedBlobStore(s.blob);
    observed.putDelayMs = 5;
    await writeSnapshot(snapshotOpts(s, files, 'k.json', { blob: observed, concurrency: 3 }));
    assert.ok(observed.maxInFlightPuts <= 3, `saw ${observed.maxInFlightPuts} puts at once`);
    assert.ok(observed.maxInFlightPuts >= 2, 'uploads overlap');
  });

  it('refuses missing, repeated or escaping file names and bad metadata, writing nothing', async () => {
    const write = (extra: Partial<WriteSnapshotOptions>) => writeSnapshot(snapshotOpts(s, files, 'k.json', extra));
    await rejectsWith(write({ files: ['odd.bin', 'nope'] }), 'INVALID_ARGUMENT', 'files');
    await rejectsWith(write({ files: ['odd.bin', 'odd.bin'] }), 'INVALID_ARGUMENT', 'files');
    await rejectsWith(write({ files: ['../src/odd.bin'] }), 'INVALID_ARGUMENT', 'files');
    await rejectsWith(write({ meta: { ...META, template: '' } }), 'INVALID_ARGUMENT', 'meta.template');
    await rejectsWith(write({ chunkSize: 0 }), 'INVALID_ARGUMENT', 'chunkSize');
    await rejectsWith(write({ key: '/abs' }), 'INVALID_ARGUMENT', 'key');
    assert.deepEqual((await s.blob.list('')).keys, []);
  });
});

describe('the manifest is the commit marker', () => {
  let s: Scratch;
  let files: string[];
  beforeEach(async () => {
    s = await scratch();
    files = await makeCheckpoint(s.src, CHUNK);
  });
  afterEach(async () => {
    await s.cleanup();
  });

  it('is put last, after every chunk put has resolved', async () => {
    const observed = new ObservedBlobStore(s.blob);
    observed.putDelayMs = 3;
    await writeSnapshot(snapshotOpts(s, files, 'snapshots/a.json', { blob: observed }));
    const puts = observed.events.filter((e) => e.op !== 'get');
    const manifestStart = puts.findIndex((e) => e.op === 'put-start' && e.key === 'snapshots/a.json');
    const lastChunkEnd = puts.findLastIndex((e) => e.op === 'put-end' && e.key.startsWith('chunks/'));
    assert.ok(lastChunkEnd >= 0 && manifestStart > lastChunkEnd, 'manifest put starts after the last chunk put ends');
    assert.equal(observed.keysFor('put-start', 'snapshots/').length, 1);
    assert.deepEqual(puts.at(-1), { op: 'put-end', key: 'snapshots/a.json' });
  });

  it('is not written when a chunk put fails, and writeSnapshot rejects', async () => {
    const observed = new ObservedBlobStore(s.blob);
    let chunkPuts = 0;
    observed.failPut = (key) => key.startsWith('chunks/') && ++chunkPuts === 3;
    await assert.rejects(
      writeSnapshot(snapshotOpts(s, files, 'snapshots/a.json', { blob: observed })),
      /injected failure/,
    );
    assert.equal(await s.blob.has('snapshots/a.json'), false);
    assert.deepEqual(observed.keysFor('put-start', 'snapshots/'), []);
  });
});

describe('restoring a damaged snapshot', () => {
  let s: Scratch;
  let files: string[];
  let manifest: SnapshotManifest;
  let out: string;
  const key = 'snapshots/a.json';
  beforeEach(async () => {
    s = await scratch();
    files = await makeCheckpoint(s.src, CHUNK);
    ({ manifest } = await writeSnapshot(snapshotOpts(s, files, key)));
    out = join(s.root, 'out');
  });
  afterEach(async () => {
    await s.cleanup();
  });

  const oddChunk = (index: number) => manifest.files.find((file) => file.name === 'odd.bin')!.chunks[index]!;

  async function assertCorrupt(blob: BlobStore, hash: string, message: RegExp): Promise<void> {
    await assert.rejects(restoreSnapshot({ blob, key, dir: out }), (err: unknown) => {
      assert.ok(err instanceof TorporError);
      assert.equal(err.code, 'SNAPSHOT_CORRUPT');
      assert.equal(err.field, 'snapshot');
      assert.match(err.message, new RegExp(hash));
      assert.match(err.message, /odd\.bin/);
      assert.match(err.message, message);
      return true;
    });
    assert.deepEqual(await filesUnder(out), [], 'no file, complete-looking or partial, is left behind');
  }

  it('rejects a chunk whose content does not match its hash', async () => {
    const hash = oddChunk(2);
    await s.blob.put(chunkKey(hash), await s.blob.getBytes(chunkKey(oddChunk(1))));
    await assertCorrupt(s.blob, hash, /sha256/);
  });

  it('rejects a chunk that is not zstd', async () => {
    const hash = oddChunk(0);
    await s.blob.put(chunkKey(hash), Buffer.from('definitely not zstd'));
    await assertCorrupt(s.blob, hash, /decompress/);
  });

  it('reports a missing chunk as SNAPSHOT_CORRUPT, not NOT_FOUND', async () => {
    const hash = oddChunk(4);
    await s.blob.delete(chunkKey(hash));
    await assertCorrupt(s.blob, hash, /missing/);
  });

  it('leaves a previously restored file untouched when a restore fails', async () => {
    await restoreSnapshot({ blob: s.blob, key, dir: out });
    const hash = oddChunk(3);
    await s.blob.delete(chunkKey(hash));
    await assert.rejects(restoreSnapshot({ blob: s.blob, key, dir: out }), { code: 'SNAPSHOT_CORRUPT' });
    await assertSameFiles(s.src, out, files);
    assert.deepEqual(await filesUnder(out), [...files].sort());
  });

  it('rejects a manifest that is not JSON or not a v1 manifest, and a missing one', async () => {
    await s.blob.put(key, Buffer.from('{"version": 1, "files": ['));
    await rejectsWith(restoreSnapshot({ blob: s.blob, key, dir: out }), 'SNAPSHOT_CORRUPT', 'snapshot');
    const escaping = { ...manifest, files: [{ name: '../escape', size: 1, chunks: [oddChunk(0)] }] };
    await s.blob.put(key, Buffer.from(JSON.stringify(escaping)));
    await rejectsWith(restoreSnapshot({ blob: s.blob, key, dir: out }), 'SNAPSHOT_CORRUPT', 'snapshot');
    await rejectsWith(restoreSnapshot({ blob: s.blob, key: 'snapshots/none.json', dir: out }), 'NOT_FOUND', 'key');
  });
});

describe('node-local chunk cache', () => {
  let s: Scratch;
  let files: string[];
  beforeEach(async () => {
    s = await scratch();
    files = await makeCheckpoint(s.src, CHUNK);
  });
  afterEach(async () => {
    await s.cleanup();
  });

  it('fills on the first restore, so the second fetches no chunks', async () => {
    const { manifest } = await writeSnapshot(snapshotOpts(s, files, 'k.json'));
    const distinct = distinctChunks(manifest).size;
    const first = await restoreSnapshot({ blob: s.blob, key: 'k.json', dir: join(s.root, 'one'), cache: s.cache });
    assert.equal(first.stats.fetchedChunks, distinct);
    assert.equal(first.stats.cachedChunks, 0);

    const observed = new ObservedBlobStore(s.blob);
    const out = join(s.root, 'two');
    const second = await restoreSnapshot({ blob: observed, key: 'k.json', dir: out, cache: s.cache });
    assert.deepEqual(observed.keysFor('get', 'chunks/'), []);
    assert.equal(second.stats.fetchedChunks, 0);
    assert.equal(second.stats.cachedChunks, distinct);
    await assertSameFiles(s.src, out, files);
  });

  it('is filled by writeSnapshot, so a restore on the same node fetches no chunks', async () => {
    await writeSnapshot(snapshotOpts(s, files, 'k.json', { cache: s.cache }));
    const observed = new ObservedBlobStore(s.blob);
    const out = join(s.root, 'out');
    await restoreSnapshot({ blob: observed, key: 'k.json', dir: out, cache: s.cache });
    assert.deepEqual(observed.keysFor('get', 'chunks/'), []);
    await assertSameFiles(s.src, out, files);
  });

  it('refetches and repairs a corrupt cached chunk instead of failing', async () => {
    const { manifest } = await writeSnapshot(snapshotOpts(s, files, 'k.json', { cache: s.cache }));
    const hash = manifest.files.find((file) => file.name === 'odd.bin')!.chunks[1]!;
    const good = await s.cache.getBytes(chunkKey(hash));
    await s.cache.put(chunkKey(hash), Buffer.from('rotten'));

    const observed = new ObservedBlobStore(s.blob);
    const out = join(s.root, 'out');
    const { stats } = await restoreSnapshot({ blob: observed, key: 'k.json', dir: out, cache: s.cache });
    assert.deepEqual(observed.keysFor('get', 'chunks/'), [chunkKey(hash)]);
    assert.equal(stats.fetchedChunks, 1);
    await assertSameFiles(s.src, out, files);
    assert.deepEqual(Buffer.from(await s.cache.getBytes(chunkKey(hash))), Buffer.from(good));
  });
});
