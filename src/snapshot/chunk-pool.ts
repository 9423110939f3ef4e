// The process-wide pool of threads that scan and compress snapshot chunks (chunk-work.ts). It starts with the first
// snapshot written and holds the process open only while it has work.
import { availableParallelism } from 'node:os';
import { WorkerPool } from '../sys/worker-pool.ts';
import type { ScanRequest, ScanResult } from './chunk-work.ts';

/** zstd level of snapshot chunks. Measured on the 117 changed 1 MiB chunks of four consecutive suspends of a
 * micro-VM guest (128 and 512 MiB counter, this 2-core host), ms per chunk / KiB stored per chunk: level -5
 * 1.7 / 151, -3 1.8 / 132, 1 2.1 / 96, 2 2.2 / 93, 3 (zstd's default, used before) 2.9 / 90, 4 3.4 / 90. Level 1:
 * a quarter less CPU than 3 for 6% more bytes; the negative levels save little more time for 40–70% more bytes.
 * Reads decompress at any level alike. */
export const CHUNK_LEVEL = 1;

/** On a suspend's critical path the VM has stopped, so the node's cores are free; more threads than this would
 * only compete with other work on the node. */
const MAX_THREADS = 4;

let pool: WorkerPool | undefined;

function chunkPool(): WorkerPool {
  pool ??= new WorkerPool(new URL('./chunk-worker.ts', import.meta.url), Math.min(MAX_THREADS, availableParallelism()));
  return pool;
}

/** Starts the threads now (each takes ~50 ms to boot), e.g. while a checkpoint is being taken. */
export function startChunkPool(): void {
  chunkPool().start();
}

/** The pool's size (how many chunks to keep in flight). */
export function chunkPoolSize(): number {
  return chunkPool().size;
}

export async function scanInPool(req: ScanRequest): Promise<ScanResult> {
  return chunkPool().run<ScanResult>({ op: 'scan', ...req });
}

/** Compresses `bytes` on a pool thread. Its memory is moved there, not copied: the caller must own all of
 * `bytes.buffer` (as the bytes of a scan result do; never a Buffer from Node's shared pool) and not use it again. */
export async function compressInPool(bytes: Uint8Array, level = CHUNK_LEVEL): Promise<Buffer> {
  const buffer = bytes.buffer as ArrayBuffer;
  const request = { op: 'compress', buffer, offset: bytes.byteOffset, length: bytes.length, level };
  const value = await chunkPool().run<Uint8Array>(request, [buffer]);
  return Buffer.from(value.buffer, value.byteOffset, value.length);
}
