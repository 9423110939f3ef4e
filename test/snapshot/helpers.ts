// Test helpers for snapshots: temp dirs, checkpoint-like files, and BlobStore wrappers that observe or fail.
import { createHash, randomBytes } from 'node:crypto';
import { mkdir, mkdtemp, open, readdir, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { dirname, join, relative, sep } from 'node:path';
import type { Readable } from 'node:stream';
import { setTimeout as sleep } from 'node:timers/promises';
import type { BlobList, BlobStore, ByteRange } from '../../src/blob/blob.ts';
import { FsBlobStore } from '../../src/blob/fs.ts';
import type { SnapshotMeta } from '../../src/snapshot/index.ts';

export const CHUNK = 64 * 1024;

export const META: SnapshotMeta = {
  runtime: 'gvisor',
  template: 'counter',
  assets: { runsc: { url: 'https://example.invalid/runsc', sha256: 'a'.repeat(64) } },
  parent: null,
};

/** A scratch area with a blob store, a cache store and directories, removed by cleanup(). */
export async function scratch() {
  const root = await mkdtemp(join(tmpdir(), 'torpor-snap-'));
  const src = join(root, 'src');
  await mkdir(src);
  return {
    root,
    src,
    blob: new FsBlobStore(join(root, 'blob')),
    cache: new FsBlobStore(join(root, 'cache')),
    cleanup: () => rm(root, { recursive: true, force: true }),
  };
}

export async function writeRandom(path: string, size: number): Promise<void> {
  await mkdir(dirname(path), { recursive: true });
  await writeFile(path, randomBytes(size));
}

/** A sparse file of `size` bytes: zero everywhere except random data at the given byte offsets. */
export async function writeSparse(path: string, size: number, regions: { offset: number; length: number }[]) {
  const handle = await open(path, 'w');
  try {
    await handle.truncate(size);
    for (const { offset, length } of regions) await handle.write(randomBytes(length), 0, length, offset);
  } finally {
    await handle.close();
  }
}

/** Overwrites `length` bytes at `offset` in an existing file with fresh random bytes. */
export async function scribble(path: string, offset: number, length: number): Promise<void> {
  const handle = await open(path, 'r+');
  try {
    await handle.write(randomBytes(length), 0, length, offset);
  } finally {
    await handle.close();
  }
}

export type BlobEvent = { op: 'put-start' | 'put-end' | 'get'; key: string };

/** Delegates to another store, recording puts and reads; can delay puts, fail chosen ones, and track overlap. */
export class ObservedBlobStore implements BlobStore {
  readonly inner: BlobStore;
  readonly events: BlobEvent[] = [];
  putDelayMs = 0;
  failPut: (key: string) => boolean = () => false;
  inFlightPuts = 0;
  maxInFlightPuts = 0;

  constructor(inner: BlobStore) {
    this.inner = inner;
  }

  async put(key: string, body: Uint8Array | Readable): Promise<void> {
    this.events.push({ op: 'put-start', key });
    this.inFlightPuts++;
    this.maxInFlightPuts = Math.max(this.maxInFlightPuts, this.inFlightPuts);
    try {
      if (this.putDelayMs > 0) await sleep(this.putDelayMs);
      if (this.failPut(key)) throw new Error(`injected failure putting ${key}`);
      await this.inner.put(key, body);
    } finally {
      this.inFlightPuts--;
    }
    this.events.push({ op: 'put-end', key });
  }

  get(key: string, range?: ByteRange): Promise<Readable> {
    this.events.push({ op: 'get', key });
    return this.inner.get(key, range);
  }

  getBytes(key: string): Promise<Uint8Array> {
    this.events.push({ op: 'get', key });
    return this.inner.getBytes(key);
  }

  has(key: string): Promise<boolean> {
    return this.inner.has(key);
  }

  list(prefix: string, opts?: { cursor?: string; limit?: number }): Promise<BlobList> {
    return this.inner.list(prefix, opts);
  }

  delete(key: string): Promise<void> {
    return this.inner.delete(key);
  }

  keysFor(op: BlobEvent['op'], prefix = ''): string[] {
    return this.events.filter((e) => e.op === op && e.key.startsWith(prefix)).map((e) => e.key);
  }
}

export async function chunkKeysIn(blob: BlobStore): Promise<Set<string>> {
  return new Set((await blob.list('chunks/', { limit: 100_000 })).keys);
}

/** An independent oracle for a file's chunk list: whole file in memory, byte-by-byte zero test. */
export async function referenceChunks(path: string, chunkSize: number): Promise<(string | null)[]> {
  const data = await readFile(path);
  const chunks: (string | null)[] = [];
  for (let offset = 0; offset < data.length; offset += chunkSize) {
    const piece = data.subarray(offset, offset + chunkSize);
    chunks.push(piece.every((byte) => byte === 0) ? null : createHash('sha256').update(piece).digest('hex'));
  }
  return chunks;
}

/** Files shaped like a checkpoint: a sparse memory image, odd sizes, an empty file, a nested file, repeats. */
export async function makeCheckpoint(dir: string, chunkSize: number): Promise<string[]> {
  await writeSparse(join(dir, 'memory.img'), 64 * chunkSize, [
    { offset: 3 * chunkSize + 100, length: 5000 },
    { offset: 40 * chunkSize, length: chunkSize },
    { offset: 63 * chunkSize + 10, length: 50 },
  ]);
  await writeRandom(join(dir, 'odd.bin'), 5 * chunkSize + 123);
  await writeFile(join(dir, 'empty'), '');
  await writeRandom(join(dir, 'nested', 'deeper', 'state.json'), 777);
  const block = randomBytes(chunkSize);
  await writeFile(join(dir, 'dup.bin'), Buffer.concat([block, block, block.subarray(0, 10)]));
  return ['memory.img', 'odd.bin', 'empty', 'nested/deeper/state.json', 'dup.bin'];
}

/** Every file under `dir`, as '/'-separated relative names, sorted. */
export async function filesUnder(dir: string): Promise<string[]> {
  const entries = await readdir(dir, { recursive: true, withFileTypes: true });
  return entries
    .filter((entry) => entry.isFile())
    .map((entry) => relative(dir, join(entry.parentPath, entry.name)).split(sep).join('/'))
    .sort();
}
