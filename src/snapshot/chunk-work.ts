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
  base?: { path: string; hash: string };
}

export type ScanResult =
  | { kind: 'zero' }
  | { kind: 'unchanged' }
  /** `bytes` owns its memory whole (it is moved between threads, never copied). */
  | { kind: 'data'; hash: string; bytes: Uint8Array }
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
  if (bytes.equals(buffers.zeros(req.length))) return { kind: 'zero' };
  if (req.base) {
    const previous = buffers.base(req.length);
    // An unreadable or short base only costs hashing.
    if (readFully(req.base.path, previous, req.offset, true) && previous.equals(bytes)) return { kind: 'unchanged' };
  }
  const hash = sha256Hex(bytes);
  buffers.giveAwayChunk();
  return { kind: 'data', hash, bytes };
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
