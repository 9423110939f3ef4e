// writeSnapshot: turns the files a runtime checkpointed into a v1 snapshot in a BlobStore.
// Files are read one chunk at a time; each chunk is named by the sha256 of its bytes, so a chunk the store
// already holds (from this actor's last snapshot, its template's golden snapshot, any other actor) is not
// uploaded again. All-zero chunks (most of a memory image) are not stored at all. The manifest goes last.
// With a local copy of the parent snapshot, a chunk that differs from the parent's in few pages keeps the parent's
// chunk and stores the pages in the file's patch object (patch.ts).
// Reading, hashing and compressing run on the chunk pool's threads (chunk-pool.ts); this thread only orders the
// results and drives the uploads, whose many small file system calls would otherwise wait behind that work.
import { readFile, stat } from 'node:fs/promises';
import { join } from 'node:path';
import type { BlobStore } from '../blob/blob.ts';
import { assertValidKey, unsafePathReason } from '../blob/keys.ts';
import { TorporError } from '../core/errors.ts';
import { parse, type RuntimeClass } from '../core/schemas.ts';
import type { Asset, ChunkedContent, FilePatch, ManifestFile, SnapshotManifest } from '../core/types.ts';
import { crashPoint } from '../sys/crash.ts';
import { dataExtents } from '../sys/extents.ts';
import { chunkPoolSize, compressInPool, scanInPool, startChunkPool } from './chunk-pool.ts';
import type { PatchRequest, ScanResult } from './chunk-work.ts';
import {
  DEFAULT_DELTA_LEVEL,
  DELTA_MAX_BYTES,
  DELTA_MAX_RATIO,
  deltaKey,
  encodeDelta,
  keyframeOf,
  readChunkedContent,
} from './delta.ts';
import { chunkKey, encodeManifest, snapshotManifestSchema } from './manifest.ts';
import {
  encodePageRuns,
  PATCH_MAX_FRACTION,
  PATCH_PAGE_SIZE,
  patchedPagesByChunk,
  patchIssue,
  patchKey,
} from './patch.ts';
import { TaskPool } from './pool.ts';
import { elapsedMs, ProgressCounter, type ProgressListener, positiveInteger, roundMs, sha256Hex } from './transfer.ts';

export const DEFAULT_CHUNK_SIZE = 1024 * 1024;
export const DEFAULT_CONCURRENCY = 8;
/** Files of at least this many chunks are read by their data extents only: listing them costs a process spawn
 * (~5 ms, while other files are read), reading a hole a copy of zeros (on ext4 ~0.5 ms per MiB, page-cache pages
 * too). A guest's memory file is mostly holes. */
const EXTENTS_MIN_CHUNKS = 16;

export interface SnapshotMeta {
  runtime: RuntimeClass;
  template: string;
  assets: Record<string, Asset>;
  parent: string | null;
}

export interface WriteSnapshotOptions {
  blob: BlobStore;
  /** Directory holding the checkpoint. */
  dir: string;
  /** Names relative to `dir`, exactly the files the runtime reported. */
  files: string[];
  /** Manifest key (see manifestKeyFor). */
  key: string;
  meta: SnapshotMeta;
  chunkSize?: number;
  /** Chunks in flight (being compressed or uploaded) at once; also bounds memory to about this many chunks. */
  concurrency?: number;
  /** Node-local chunk cache: every chunk is kept there too, so a restore on this node fetches nothing. */
  cache?: BlobStore;
  onProgress?: ProgressListener;
  /** The snapshot this one follows: a file it also has is stored as a delta against that file's keyframe. */
  previous?: SnapshotManifest;
  /** zstd level for deltas; 0 stores every file as chunks. */
  deltaLevel?: number;
  /** A local copy of `previous`'s files as they were written (the node's kept copy of that snapshot). A chunk
   * whose bytes equal the same range of the same file there takes `previous`'s hash for it without hashing: a
   * byte comparison is ~20x cheaper than sha256, and most of a guest's memory is unchanged between snapshots.
   * One that differs in few pages keeps `previous`'s hash as its base and goes into the file's patch.
   * Trusted like a restore from that copy trusts it; a missing or resized file is simply not used. */
  previousDir?: string;
  /** Store chunks that differ from `previousDir`'s in few pages as page patches (default true). */
  patches?: boolean;
}

export interface WriteSnapshotStats {
  rawBytes: number;
  /** Compressed bytes this call uploaded to `blob` (chunks the store already had cost nothing). */
  storedBytes: number;
  /** Objects uploaded: chunks, deltas, patches. */
  uploadedChunks: number;
  /** Non-zero chunks not uploaded: already in the store, or repeated within this snapshot, or the base of a patched
   * chunk. */
  reusedChunks: number;
  zeroChunks: number;
  totalChunks: number;
  /** Files stored as deltas against their keyframe (each delta counts as one uploaded or reused object). */
  deltaFiles: number;
  /** Chunks stored as their base chunk plus pages in their file's patch (counted in reusedChunks too). */
  patchedChunks: number;
  /** Compressed bytes of this snapshot's patch objects (those uploaded count in storedBytes too). */
  patchBytes: number;
  /** chunk: first chunk read to last chunk scanned (on the chunk pool's threads); delta: encoding deltas; patch:
   * gathering, compressing and storing the patch objects (after their file's last chunk); upload: first upload start
   * to last upload end (overlaps chunk, delta and patch); manifest. */
  phases: { chunk: number; delta: number; patch: number; upload: number; manifest: number };
}

export interface WriteSnapshotResult {
  manifest: SnapshotManifest;
  stats: WriteSnapshotStats;
}

interface SnapshotFile {
  name: string;
  size: number;
}

/** Everything the chunking loop and the upload tasks share for one writeSnapshot call. */
interface WriteContext {
  blob: BlobStore;
  cache: BlobStore | undefined;
  chunkSize: number;
  pool: TaskPool;
  /** Hashes already handled in this call, so a chunk repeated across or within files is uploaded once. */
  seen: Set<string>;
  stats: Omit<WriteSnapshotStats, 'phases'>;
  progress: ProgressCounter;
  /** From the first chunk scan's start to the last one's end. */
  chunkSpan: { start?: number; end?: number };
  deltaMs: number;
  /** From the first patch gathered to the last one stored. */
  patchSpan: { start?: number; end?: number };
  previous: SnapshotManifest | undefined;
  deltaLevel: number;
  uploadStartedAt: number | undefined;
  previousDir: string | undefined;
  /** Pages per patch and most pages a patched chunk may have; undefined when chunks are not patched. */
  patch: { pageSize: number; maxPages: number } | undefined;
  /** Per large file, which of its chunks may hold data (see chunkDataMap). */
  dataMaps: Map<string, Promise<Uint8Array | undefined>>;
}

export async function writeSnapshot(opts: WriteSnapshotOptions): Promise<WriteSnapshotResult> {
  const chunkSize = positiveInteger(opts.chunkSize ?? DEFAULT_CHUNK_SIZE, 'chunkSize');
  const concurrency = positiveInteger(opts.concurrency ?? DEFAULT_CONCURRENCY, 'concurrency');
  assertValidKey(opts.key);
  checkMeta(opts.meta, chunkSize);
  const files = await statFiles(opts.dir, opts.files);
  startChunkPool();
  const rawBytes = files.reduce((sum, file) => sum + file.size, 0);
  const ctx: WriteContext = {
    blob: opts.blob,
    cache: opts.cache,
    chunkSize,
    pool: new TaskPool(concurrency),
    seen: new Set(),
    stats: {
      rawBytes,
      storedBytes: 0,
      uploadedChunks: 0,
      reusedChunks: 0,
      zeroChunks: 0,
      totalChunks: 0,
      deltaFiles: 0,
      patchedChunks: 0,
      patchBytes: 0,
    },
    progress: new ProgressCounter(rawBytes, opts.onProgress),
    chunkSpan: {},
    deltaMs: 0,
    patchSpan: {},
    // A base is read with the previous manifest's chunk size: deltas need the same one.
    previous: opts.previous?.chunkSize === chunkSize ? opts.previous : undefined,
    deltaLevel: opts.deltaLevel ?? DEFAULT_DELTA_LEVEL,
    uploadStartedAt: undefined,
    previousDir: opts.previousDir,
    patch: opts.patches === false ? undefined : patchLimits(chunkSize),
    dataMaps: new Map(),
  };
  for (const file of files) {
    if (file.size >= EXTENTS_MIN_CHUNKS * chunkSize) {
      ctx.dataMaps.set(file.name, chunkDataMap(join(opts.dir, file.name), file.size, chunkSize));
    }
  }

  const manifestFiles = await chunkAllFiles(ctx, opts.dir, files);
  const upload = ctx.uploadStartedAt === undefined ? 0 : elapsedMs(ctx.uploadStartedAt);

  // Only now, with every chunk durable, may the manifest (the commit marker) appear.
  const manifestStart = performance.now();
  const manifest: SnapshotManifest = {
    version: 1,
    ...opts.meta,
    chunkSize,
    files: manifestFiles,
    createdAt: new Date().toISOString(),
  };
  crashPoint('upload.chunks-stored');
  await opts.blob.put(opts.key, encodeManifest(manifest));
  crashPoint('upload.manifest-written');

  const phases = {
    chunk: roundMs((ctx.chunkSpan.end ?? 0) - (ctx.chunkSpan.start ?? 0)),
    delta: roundMs(ctx.deltaMs),
    patch: roundMs((ctx.patchSpan.end ?? 0) - (ctx.patchSpan.start ?? 0)),
    upload,
    manifest: elapsedMs(manifestStart),
  };
  return { manifest, stats: { ...ctx.stats, phases } };
}

/** Stores every file (concurrently; the manifest keeps their order), then waits for every upload; throws the
 * first failure. */
async function chunkAllFiles(ctx: WriteContext, dir: string, files: SnapshotFile[]): Promise<ManifestFile[]> {
  let manifestFiles: ManifestFile[] = [];
  await ctx.pool.run(async () => {
    manifestFiles = await Promise.all(files.map((file) => storeFile(ctx, dir, file)));
  });
  return manifestFiles;
}

async function storeFile(ctx: WriteContext, dir: string, file: SnapshotFile): Promise<ManifestFile> {
  const previous = ctx.previous?.files.find((f) => f.name === file.name);
  if (previous && ctx.deltaLevel > 0 && file.size > 0 && file.size <= DELTA_MAX_BYTES) {
    const base = keyframeOf(previous);
    if (base.size <= DELTA_MAX_BYTES) {
      const delta = await storeDelta(ctx, dir, file, base);
      if (delta) return delta;
    }
  }
  return chunkFile(ctx, dir, file);
}

/** Stores the file as a delta against `base`, or returns undefined when the delta would not pay off (the file
 * is then chunked and becomes the next keyframe). */
async function storeDelta(
  ctx: WriteContext,
  dir: string,
  file: SnapshotFile,
  base: ChunkedContent,
): Promise<ManifestFile | undefined> {
  const [target, baseBytes] = await Promise.all([
    readFile(join(dir, file.name)),
    readChunkedContent(ctx.blob, ctx.cache, base, ctx.chunkSize),
  ]);
  if (target.length !== file.size) {
    throw new TorporError('FAILED_PRECONDITION', `file "${file.name}" changed while it was being snapshotted`, {
      field: 'files',
    });
  }
  const started = performance.now();
  const delta = await encodeDelta(target, baseBytes, ctx.deltaLevel);
  ctx.deltaMs += performance.now() - started;
  if (delta.length > target.length * DELTA_MAX_RATIO) return undefined;
  const contentSha256 = sha256Hex(target);
  const object = deltaKey(contentSha256, base);
  ctx.uploadStartedAt ??= performance.now();
  const [inStore, inCache] = await Promise.all([ctx.blob.has(object), ctx.cache?.has(object) ?? true]);
  await Promise.all([
    inStore ? undefined : ctx.blob.put(object, delta),
    inCache ? undefined : ctx.cache?.put(object, delta),
  ]);
  ctx.stats.totalChunks++;
  ctx.stats.deltaFiles++;
  if (inStore) ctx.stats.reusedChunks++;
  else {
    ctx.stats.uploadedChunks++;
    ctx.stats.storedBytes += delta.length;
  }
  ctx.progress.add(file.size);
  return { name: file.name, size: file.size, chunks: [], delta: { object, sha256: contentSha256, base } };
}

async function chunkFile(ctx: WriteContext, dir: string, file: SnapshotFile): Promise<ManifestFile> {
  const path = join(dir, file.name);
  const base = await baseOf(ctx, file);
  // Scanning starts at once; chunks scanned before the extents are listed (a process spawn) are read whole.
  let data: Uint8Array | undefined;
  void ctx.dataMaps.get(file.name)?.then((map) => {
    data = map;
  });
  const count = Math.ceil(file.size / ctx.chunkSize);
  const chunks: (string | null)[] = new Array(count).fill(null);
  // Chunks are scanned on the pool's threads, a few per thread in flight, and handled here in order.
  const window = 4 * chunkPoolSize();
  const scans: (Promise<ScanResult> | undefined)[] = [];
  const patched: PatchedChunk[] = [];
  const scan = (index: number) => {
    if (index >= count || (data && data[index] === 0)) return undefined;
    const offset = index * ctx.chunkSize;
    const hash = base?.chunks[index];
    ctx.chunkSpan.start ??= performance.now();
    const patchedBefore = base?.patched.get(index);
    const patch: PatchRequest | undefined = base?.patch && { ...base.patch, pages: patchedBefore ?? [] };
    // A chunk the previous snapshot patched equals its local copy, not its base: without patching it is hashed.
    const useBase = base && hash && (patch || !patchedBefore);
    const scanned = scanInPool({
      path,
      offset,
      length: Math.min(ctx.chunkSize, file.size - offset),
      ...(useBase ? { base: { path: base.path, hash, ...(patch ? { patch } : {}) } } : {}),
    }).finally(() => {
      ctx.chunkSpan.end = performance.now();
    });
    scanned.catch(() => undefined); // awaited in order below; not unhandled if an earlier chunk failed
    return scanned;
  };
  for (let index = 0; index < Math.min(window, count); index++) scans[index] = scan(index);
  for (let index = 0; index < count; index++) {
    const length = Math.min(ctx.chunkSize, file.size - index * ctx.chunkSize);
    const scanned = scans[index];
    scans[index + window] = scan(index + window);
    if (scanned === undefined) {
      countZero(ctx, length); // wholly in a hole: not even read
      continue;
    }
    const result = await scanned;
    scans[index] = undefined;
    if (result.kind === 'short') {
      throw new TorporError('FAILED_PRECONDITION', `file "${file.name}" shrank while it was being snapshotted`, {
        field: 'files',
      });
    }
    if (result.kind === 'zero') countZero(ctx, length);
    else if (result.kind === 'unchanged') {
      chunks[index] = base!.chunks[index]!;
      countStored(ctx, chunks[index]!, length);
    } else if (result.kind === 'patched') {
      chunks[index] = base!.chunks[index]!;
      countStored(ctx, chunks[index]!, length);
      ctx.stats.patchedChunks++;
      patched.push({ index, pages: result.pages, bytes: result.bytes });
    } else {
      chunks[index] = result.hash;
      await handleChunk(ctx, result.hash, result.bytes);
    }
  }
  const stored: ManifestFile = { name: file.name, size: file.size, chunks };
  if (patched.length > 0) stored.patch = await storePatch(ctx, stored, patched);
  return stored;
}

/** A chunk stored as its base plus pages: their indices within the chunk and their bytes back to back. */
interface PatchedChunk {
  index: number;
  pages: number[];
  bytes: Uint8Array;
}

/** Patching needs whole pages per chunk, and room for at least one page under the threshold. */
function patchLimits(chunkSize: number): { pageSize: number; maxPages: number } | undefined {
  const maxPages = Math.floor((chunkSize / PATCH_PAGE_SIZE) * PATCH_MAX_FRACTION);
  return chunkSize % PATCH_PAGE_SIZE === 0 && maxPages >= 1 ? { pageSize: PATCH_PAGE_SIZE, maxPages } : undefined;
}

/** Gathers a file's patched pages into its one patch object (named by the sha256 of the pages' bytes) and queues
 * its upload, like a chunk's. */
async function storePatch(ctx: WriteContext, file: ManifestFile, parts: PatchedChunk[]): Promise<FilePatch> {
  ctx.patchSpan.start ??= performance.now();
  const { pageSize } = ctx.patch!;
  const pagesPerChunk = ctx.chunkSize / pageSize;
  const pages = parts.flatMap(({ index, pages }) => pages.map((page) => index * pagesPerChunk + page));
  // Memory of its own: it is moved to a compression thread.
  const bytes = Buffer.allocUnsafeSlow(parts.reduce((sum, part) => sum + part.bytes.length, 0));
  let offset = 0;
  for (const part of parts) {
    bytes.set(part.bytes, offset);
    offset += part.bytes.length;
  }
  const patch: FilePatch = { object: patchKey(sha256Hex(bytes)), pageSize, pages: encodePageRuns(pages) };
  // What a restore will check: a writer bug must not produce a snapshot that cannot be restored.
  const problem = patchIssue({ ...file, patch }, ctx.chunkSize);
  if (problem !== undefined) {
    throw new TorporError('INTERNAL', `patch of file "${file.name}" would be invalid: ${problem}`, { field: 'files' });
  }
  await ctx.pool.submit(async () => {
    ctx.uploadStartedAt ??= performance.now();
    const [inStore, inCache] = await Promise.all([ctx.blob.has(patch.object), ctx.cache?.has(patch.object) ?? true]);
    // Compressed even when both have it: patchBytes reports its size. (Rare: the same pages again.)
    const compressed = await compressInPool(bytes);
    ctx.stats.patchBytes += compressed.length;
    await Promise.all([
      inStore ? undefined : ctx.blob.put(patch.object, compressed),
      inCache ? undefined : ctx.cache?.put(patch.object, compressed),
    ]);
    if (inStore) ctx.stats.reusedChunks++;
    else {
      ctx.stats.uploadedChunks++;
      ctx.stats.storedBytes += compressed.length;
    }
    ctx.patchSpan.end = performance.now();
  });
  return patch;
}

/** The previous snapshot's version of a file, when this node still has it as written and it was chunked with
 * the same size (chunk i then covers the same bytes in both). */
interface BaseFile {
  path: string;
  chunks: (string | null)[];
  /** Set when chunks that differ in few pages are patched. */
  patch: { pageSize: number; maxPages: number } | undefined;
  /** The pages the previous snapshot patched, per chunk index (see PatchRequest.pages). */
  patched: Map<number, number[]>;
}

async function baseOf(ctx: WriteContext, file: SnapshotFile): Promise<BaseFile | undefined> {
  if (ctx.previousDir === undefined) return undefined;
  const previous = ctx.previous?.files.find((f) => f.name === file.name);
  if (!previous || previous.delta || previous.size !== file.size) return undefined;
  const path = join(ctx.previousDir, file.name);
  const info = await stat(path).catch(() => undefined);
  if (!info?.isFile() || info.size !== file.size) return undefined;
  const patch = ctx.patch;
  return {
    path,
    chunks: previous.chunks,
    patch,
    patched: patchedPagesByChunk(previous, ctx.chunkSize, patch?.pageSize),
  };
}

/** Counts a chunk `previous` names: it is in the store already (a live manifest's chunks stay there while no
 * garbage collection runs, which callers serialize with writes), so it is neither looked up nor uploaded. */
function countStored(ctx: WriteContext, hash: string, length: number): void {
  ctx.stats.totalChunks++;
  ctx.stats.reusedChunks++;
  ctx.seen.add(hash);
  ctx.progress.add(length);
}

/** Counts an all-zero chunk (never stored: the manifest names it null). */
function countZero(ctx: WriteContext, length: number): void {
  ctx.stats.totalChunks++;
  ctx.stats.zeroChunks++;
  ctx.progress.add(length);
}

/** Counts a non-zero chunk and, if it is new to this call, queues its upload (waiting for a free slot). `bytes`
 * own their memory (a scan's result): the upload moves them to a compression thread. */
async function handleChunk(ctx: WriteContext, hash: string, bytes: Uint8Array): Promise<void> {
  ctx.stats.totalChunks++;
  if (ctx.seen.has(hash)) {
    ctx.stats.reusedChunks++;
    ctx.progress.add(bytes.length);
    return;
  }
  ctx.seen.add(hash);
  await ctx.pool.submit(() => uploadChunk(ctx, hash, bytes));
}

async function uploadChunk(ctx: WriteContext, hash: string, bytes: Uint8Array): Promise<void> {
  const length = bytes.length;
  ctx.uploadStartedAt ??= performance.now();
  const key = chunkKey(hash);
  const [inStore, inCache] = await Promise.all([ctx.blob.has(key), ctx.cache?.has(key) ?? true]);
  if (inStore) ctx.stats.reusedChunks++;
  if (!inStore || !inCache) {
    // On a pool thread. (Not libuv's thread pool: its few threads are busy with the uploads' file system calls, and
    // a 1 MiB zstd queued behind them took ten times as long.)
    const compressed = await compressInPool(bytes);
    const toStore = async () => {
      if (inStore) return;
      await ctx.blob.put(key, compressed);
      ctx.stats.uploadedChunks++;
      ctx.stats.storedBytes += compressed.length;
    };
    await Promise.all([toStore(), inCache ? undefined : ctx.cache?.put(key, compressed)]);
  }
  ctx.progress.add(length);
}

/** Which chunks of a file may hold data (1) and which lie wholly in holes (0), from its data extents; undefined
 * (read every chunk) if they cannot be listed or the file is not `size` bytes. A chunk partly data is read whole. */
async function chunkDataMap(path: string, size: number, chunkSize: number): Promise<Uint8Array | undefined> {
  const listed = await dataExtents(path).catch(() => undefined);
  if (!listed || listed.size !== size) return undefined;
  const map = new Uint8Array(Math.ceil(size / chunkSize));
  for (const { start, end } of listed.extents) {
    for (let index = Math.floor(start / chunkSize); index * chunkSize < end; index++) map[index] = 1;
  }
  return map;
}

/** Sizes of the listed files; a name that is unsafe, repeated, missing or not a regular file is refused. */
async function statFiles(dir: string, names: string[]): Promise<SnapshotFile[]> {
  const files: SnapshotFile[] = [];
  const seen = new Set<string>();
  for (const name of names) {
    const reason = unsafePathReason(name);
    if (reason !== undefined) throw badFile(`file name ${JSON.stringify(name)} ${reason}`);
    if (seen.has(name)) throw badFile(`file "${name}" is listed twice`);
    seen.add(name);
    const info = await stat(join(dir, name)).catch(() => undefined);
    if (!info?.isFile()) throw badFile(`file "${name}" is not a regular file in ${dir}`);
    files.push({ name, size: info.size });
  }
  return files;
}

/** Validates the metadata before any upload, so a bad template name cannot produce an unreadable manifest. */
function checkMeta(meta: SnapshotMeta, chunkSize: number): void {
  const skeleton = { version: 1, ...meta, chunkSize, files: [], createdAt: new Date().toISOString() };
  parse(snapshotManifestSchema, skeleton, 'meta');
}

function badFile(message: string): TorporError {
  return new TorporError('INVALID_ARGUMENT', message, { field: 'files' });
}
