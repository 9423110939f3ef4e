// The CPU-bound part of writing a snapshot, one chunk at a time: reading it, telling zeros and unchanged bytes
// apart, hashing what changed, compressing what gets uploaded. It runs on worker threads (see chunk-pool.ts), so
// that the main thread stays free for the uploads' I/O (each put is a chain of a dozen file system calls; behind
// synchronous reads on the main thread, one took 20–90 ms) and, in `torpor up`, for the server.
import { closeSync, openSync, readSync } from 'node:fs';
import { constants, zstdCompressSync } from 'node:zlib';
import { sha256Hex } from './transfer.ts';

export interface ScanRequest {
  path: string;
  offset: number;
  length: number;
  /** The same file in the previous snapshot (same size, same chunking) and its hash of this chunk: bytes equal
   * to it take that hash without hashing (a comparison is ~20x cheaper than sha256). */
  base?: { path: string; hash: string; patch?: PatchRequest };
}

/** Asks for a chunk that differs from its base in few pages to come back as those pages (see patch.ts). */
export interface PatchRequest {
  pageSize: number;
  /** More differing pages than this: the chunk comes back whole, as a new keyframe. */
  maxPages: number;
  /** The pages (indices within the chunk, sorted) the base snapshot patched over the base chunk: in the local copy
   * they differ from the base chunk, so they stay in the patch even where they did not change since. */
  pages: number[];
}

export type ScanResult =
  | { kind: 'zero' }
  | { kind: 'unchanged' }
  /** `bytes` owns its memory whole (it is moved between threads, never copied). */
  | { kind: 'data'; hash: string; bytes: Uint8Array }
  /** The chunk is its base with `pages` (indices within the chunk, sorted) replaced by `bytes`, the pages' current
   * bytes back to back. */
  | { kind: 'patched'; pages: number[]; bytes: Uint8Array }
  /** The file ended before the chunk did. */
  | { kind: 'short' };

/** One thread's reusable buffers: a chunk's buffer is given away only with a chunk that gets uploaded. */
export class ScanBuffers {
  #chunk: Buffer | undefined;
  #base: Buffer | undefined;
  #zeros: Buffer | undefined;

  chunk(length: number): Buffer {
    if (!this.#chunk || this.#chunk.length < length) this.#chunk = Buffer.allocUnsafeSlow(length);
    return this.#chunk.subarray(0, length);
  }

  giveAwayChunk(): void {
    this.#chunk = undefined;
  }

  base(length: number): Buffer {
    if (!this.#base || this.#base.length < length) this.#base = Buffer.allocUnsafeSlow(length);
    return this.#base.subarray(0, length);
  }

  zeros(length: number): Buffer {
    if (!this.#zeros || this.#zeros.length < length) this.#zeros = Buffer.alloc(length);
    return this.#zeros.subarray(0, length);
  }
}

export function scanChunk(req: ScanRequest, buffers: ScanBuffers): ScanResult {
  const bytes = buffers.chunk(req.length);
  if (!readFully(req.path, bytes, req.offset)) return { kind: 'short' };
  const previous = req.base && buffers.base(req.length);
  // An unreadable or short base only costs hashing.
  const based = req.base && previous && readFully(req.base.path, previous, req.offset, true);
  const patch = req.base?.patch;
  if (based && previous.equals(bytes)) {
    // Not all zeros (the base snapshot names a chunk here, and stores a chunk of zeros as null): no zero check.
    const pages = patch?.pages ?? [];
    if (pages.length === 0) return { kind: 'unchanged' };
    if (pages.length <= patch!.maxPages) return patchedResult(bytes, pages, patch!.pageSize);
  }
  if (bytes.equals(buffers.zeros(req.length))) return { kind: 'zero' };
  const pages = based && patch && differingPages(bytes, previous, patch);
  if (pages) return patchedResult(bytes, pages, patch!.pageSize);
  const hash = sha256Hex(bytes);
  buffers.giveAwayChunk();
  return { kind: 'data', hash, bytes };
}

function patchedResult(bytes: Buffer, pages: number[], pageSize: number): ScanResult {
  return { kind: 'patched', pages, bytes: copyPages(bytes, pages, pageSize) };
}

/** The pages where `bytes` differ from the local copy of the base snapshot, united with the pages that snapshot
 * patched (so the result is relative to the base chunk); undefined past `maxPages`. */
function differingPages(bytes: Buffer, previous: Buffer, patch: PatchRequest): number[] | undefined {
  const { pageSize, maxPages } = patch;
  const pages: number[] = [];
  let next = 0; // into patch.pages
  for (let page = 0, start = 0; start < bytes.length; page++, start += pageSize) {
    const end = Math.min(start + pageSize, bytes.length);
    const patched = patch.pages[next] === page;
    if (patched) next++;
    if (patched || bytes.compare(previous, start, end, start, end) !== 0) {
      if (pages.length === maxPages) return undefined;
      pages.push(page);
    }
  }
  return pages;
}

/** The listed pages of `bytes` back to back, in memory of their own (to be moved to the main thread). */
function copyPages(bytes: Buffer, pages: number[], pageSize: number): Uint8Array {
  const slices = pages.map((page) => bytes.subarray(page * pageSize, Math.min((page + 1) * pageSize, bytes.length)));
  const out = Buffer.allocUnsafeSlow(slices.reduce((sum, slice) => sum + slice.length, 0));
  let offset = 0;
  for (const slice of slices) offset += slice.copy(out, offset);
  return out;
}

export function compress(bytes: Uint8Array, level: number): Uint8Array {
  const compressed = zstdCompressSync(bytes, { params: { [constants.ZSTD_c_compressionLevel]: level } });
  // Moved when it owns its memory whole, else copied into memory of its own (a small result may sit in Node's
  // shared buffer pool, which must not be moved away).
  return compressed.byteOffset === 0 && compressed.buffer.byteLength === compressed.length
    ? compressed
    : new Uint8Array(compressed);
}

/** Fills `bytes` from `offset`; false if the file ended first (or, with `lenient`, could not be read). */
function readFully(path: string, bytes: Buffer, offset: number, lenient = false): boolean {
  let fd: number;
  try {
    fd = openSync(path, 'r');
  } catch (err) {
    if (lenient) return false;
    throw err;
  }
  try {
    for (let filled = 0; filled < bytes.length; ) {
      const n = readSync(fd, bytes, filled, bytes.length - filled, offset + filled);
      if (n === 0) return false;
      filled += n;
    }
    return true;
  } catch (err) {
    if (lenient) return false;
    throw err;
  } finally {
    closeSync(fd);
  }
}
