// restoreSnapshot: rebuilds a snapshot's files in a directory. Every distinct chunk is fetched once (from the
// node-local cache when it has a good copy), verified against its sha256, and written at each offset that
// uses it. Zero chunks are never fetched or written: the file is created at its full length, leaving holes.
// A file with a patch gets its pages written over its base chunks once those are in. Files are built as
// `<name>.partial` and renamed only when every chunk and patch is in, so a restore that fails leaves no file that
// looks complete.
import { type FileHandle, mkdir, open, rename, rm } from 'node:fs/promises';
import { dirname, join } from 'node:path';
import { promisify } from 'node:util';
import { zstdDecompress } from 'node:zlib';
import type { BlobStore } from '../blob/blob.ts';
import { isTorporError, TorporError } from '../core/errors.ts';
import type { ManifestFile, SnapshotManifest } from '../core/types.ts';
import { applyDelta, readChunkedContent } from './delta.ts';
import { chunkKey, readManifest } from './manifest.ts';
import { patchRanges, readPatch } from './patch.ts';
import { TaskPool } from './pool.ts';
import { elapsedMs, ProgressCounter, type ProgressListener, positiveInteger, sha256Hex } from './transfer.ts';
import { DEFAULT_CONCURRENCY } from './write.ts';

const decompress = promisify(zstdDecompress);

export const PARTIAL_SUFFIX = '.partial';

export interface RestoreSnapshotOptions {
  blob: BlobStore;
  /** Manifest key. */
  key: string;
  /** Created if missing; files are written at their manifest names inside it, replacing existing ones. */
  dir: string;
  concurrency?: number;
  /** Node-local chunk cache: read first, and filled with every chunk fetched from `blob`. */
  cache?: BlobStore;
  onProgress?: ProgressListener;
}

export interface RestoreSnapshotStats {
  /** Distinct chunks downloaded from `blob`. */
  fetchedChunks: number;
  /** Distinct chunks served by the cache. */
  cachedChunks: number;
  zeroChunks: number;
  /** Total size of the restored files. */
  bytes: number;
  /** Compressed bytes downloaded from `blob` (chunks; delta objects and their bases are not counted). */
  fetchedBytes: number;
  /** Files rebuilt from a delta against their keyframe. */
  deltaFiles: number;
  /** Files whose patch was written over their base chunks. */
  patchedFiles: number;
  phases: { manifest: number; fetch: number };
}

export interface RestoreSnapshotResult {
  manifest: SnapshotManifest;
  stats: RestoreSnapshotStats;
}

/** A file being rebuilt. */
interface Target {
  file: ManifestFile;
  partialPath: string;
  finalPath: string;
  handle: FileHandle;
}

/** One place a chunk goes. */
interface Placement {
  target: Target;
  offset: number;
  length: number;
}

interface RestoreContext {
  blob: BlobStore;
  cache: BlobStore | undefined;
  key: string;
  stats: Omit<RestoreSnapshotStats, 'phases' | 'bytes'>;
  progress: ProgressCounter;
}

export async function restoreSnapshot(opts: RestoreSnapshotOptions): Promise<RestoreSnapshotResult> {
  const pool = new TaskPool(positiveInteger(opts.concurrency ?? DEFAULT_CONCURRENCY, 'concurrency'));
  const manifestStart = performance.now();
  const manifest = await readManifest(opts.blob, opts.key);
  const manifestMs = elapsedMs(manifestStart);

  const fetchStart = performance.now();
  const bytes = manifest.files.reduce((sum, file) => sum + file.size, 0);
  const ctx: RestoreContext = {
    blob: opts.blob,
    cache: opts.cache,
    key: opts.key,
    stats: { fetchedChunks: 0, cachedChunks: 0, zeroChunks: 0, fetchedBytes: 0, deltaFiles: 0, patchedFiles: 0 },
    progress: new ProgressCounter(bytes, opts.onProgress),
  };
  await mkdir(opts.dir, { recursive: true });
  const targets: Target[] = [];
  try {
    for (const file of manifest.files) targets.push(await createPartial(opts.dir, file));
    const [patches] = await Promise.all([
      Promise.all(targets.map((target) => fetchPatch(ctx, target))),
      fetchAll(ctx, pool, planPlacements(ctx, manifest, targets)),
      ...targets.map((target) => restoreDeltaFile(ctx, target, manifest.chunkSize)),
    ]);
    // Only now: a patch's pages overwrite bytes of their base chunks.
    await Promise.all(targets.map((target, index) => writePatch(ctx, target, patches[index])));
    await closeAll(targets);
    for (const target of targets) await rename(target.partialPath, target.finalPath);
  } catch (err) {
    await closeAll(targets);
    await Promise.all(targets.map((target) => rm(target.partialPath, { force: true })));
    throw err;
  }
  const phases = { manifest: manifestMs, fetch: elapsedMs(fetchStart) };
  return { manifest, stats: { ...ctx.stats, bytes, phases } };
}

/** Creates `<name>.partial` at the file's full size: every byte no chunk covers is a zero hole. */
async function createPartial(dir: string, file: ManifestFile): Promise<Target> {
  const finalPath = join(dir, file.name);
  const partialPath = finalPath + PARTIAL_SUFFIX;
  await mkdir(dirname(finalPath), { recursive: true });
  const handle = await open(partialPath, 'w');
  try {
    await handle.truncate(file.size);
  } catch (err) {
    await handle.close();
    throw err;
  }
  return { file, partialPath, finalPath, handle };
}

/** Groups chunk positions by hash, so a chunk used many times is fetched once. Counts zero chunks. */
function planPlacements(ctx: RestoreContext, manifest: SnapshotManifest, targets: Target[]): Map<string, Placement[]> {
  const plan = new Map<string, Placement[]>();
  for (const target of targets) {
    const { size, chunks } = target.file;
    chunks.forEach((hash, index) => {
      const offset = index * manifest.chunkSize;
      const length = Math.min(manifest.chunkSize, size - offset);
      if (hash === null) {
        ctx.stats.zeroChunks++;
        ctx.progress.add(length);
        return;
      }
      const placements = plan.get(hash) ?? [];
      placements.push({ target, offset, length });
      plan.set(hash, placements);
    });
  }
  return plan;
}

/** A delta file: rebuild its keyframe from chunks, apply the delta, write the verified result. */
async function restoreDeltaFile(ctx: RestoreContext, target: Target, chunkSize: number): Promise<void> {
  const { file } = target;
  if (!file.delta) return;
  const base = await readChunkedContent(ctx.blob, ctx.cache, file.delta.base, chunkSize);
  const content = await applyDelta(ctx.blob, ctx.cache, { ...file, delta: file.delta }, base);
  await target.handle.write(content, 0, content.length, 0);
  ctx.stats.deltaFiles++;
  ctx.progress.add(content.length);
}

/** The file's patch bytes (verified), fetched while its chunks are; undefined for a file without a patch. */
async function fetchPatch(ctx: RestoreContext, target: Target): Promise<Buffer | undefined> {
  const { file } = target;
  if (!file.patch) return undefined;
  return readPatch(ctx.blob, ctx.cache, { ...file, patch: file.patch }, ctx.key);
}

/** Writes each run of the patch's pages at its offset, over the base chunks already written. */
async function writePatch(ctx: RestoreContext, target: Target, bytes: Buffer | undefined): Promise<void> {
  const { patch, size } = target.file;
  if (!patch || !bytes) return;
  let from = 0;
  for (const { start, end } of patchRanges(patch, size)) {
    await target.handle.write(bytes, from, end - start, start);
    from += end - start;
  }
  ctx.stats.patchedFiles++;
}

async function fetchAll(ctx: RestoreContext, pool: TaskPool, plan: Map<string, Placement[]>): Promise<void> {
  await pool.run(async () => {
    for (const [hash, placements] of plan) await pool.submit(() => restoreChunk(ctx, hash, placements));
  });
}

async function restoreChunk(ctx: RestoreContext, hash: string, placements: Placement[]): Promise<void> {
  const bytes = (await readCachedChunk(ctx, hash, placements)) ?? (await fetchChunk(ctx, hash, placements));
  for (const { target, offset, length } of placements) {
    await target.handle.write(bytes, 0, length, offset);
    ctx.progress.add(length);
  }
}

/** A verified chunk from the cache, or undefined when the cache lacks it or holds a bad copy (then refetch). */
async function readCachedChunk(
  ctx: RestoreContext,
  hash: string,
  placements: Placement[],
): Promise<Buffer | undefined> {
  if (ctx.cache === undefined) return undefined;
  try {
    const bytes = await decodeChunk(ctx, await ctx.cache.getBytes(chunkKey(hash)), hash, placements);
    ctx.stats.cachedChunks++;
    return bytes;
  } catch {
    return undefined;
  }
}

async function fetchChunk(ctx: RestoreContext, hash: string, placements: Placement[]): Promise<Buffer> {
  let compressed: Uint8Array;
  try {
    compressed = await ctx.blob.getBytes(chunkKey(hash));
  } catch (err) {
    if (isTorporError(err, 'NOT_FOUND')) throw corruptChunk(ctx, hash, placements, 'is missing from the blob store');
    throw err;
  }
  const bytes = await decodeChunk(ctx, compressed, hash, placements);
  ctx.stats.fetchedChunks++;
  ctx.stats.fetchedBytes += compressed.length;
  await ctx.cache?.put(chunkKey(hash), compressed);
  return bytes;
}

/** Decompresses and checks the chunk against its hash and the length every placement expects. */
async function decodeChunk(ctx: RestoreContext, compressed: Uint8Array, hash: string, placements: Placement[]) {
  const length = placements[0]!.length;
  let bytes: Buffer;
  try {
    // The cap stops a hostile chunk from inflating into gigabytes before the hash check can reject it.
    bytes = await decompress(compressed, { maxOutputLength: Math.max(length, 1) });
  } catch (err) {
    throw corruptChunk(ctx, hash, placements, 'does not decompress', err);
  }
  if (placements.some((placement) => placement.length !== bytes.length)) {
    throw corruptChunk(ctx, hash, placements, `has ${bytes.length} bytes where ${length} are expected`);
  }
  if (sha256Hex(bytes) !== hash) throw corruptChunk(ctx, hash, placements, 'does not match its sha256');
  return bytes;
}

async function closeAll(targets: Target[]): Promise<void> {
  // fd is -1 once closed; closing twice would throw.
  await Promise.all(targets.filter((target) => target.handle.fd !== -1).map((target) => target.handle.close()));
}

function corruptChunk(
  ctx: RestoreContext,
  hash: string,
  placements: Placement[],
  problem: string,
  cause?: unknown,
): TorporError {
  const file = placements[0]!.target.file.name;
  return new TorporError('SNAPSHOT_CORRUPT', `chunk ${hash} of file "${file}" in snapshot "${ctx.key}" ${problem}`, {
    field: 'snapshot',
    cause,
  });
}
