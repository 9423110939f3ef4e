// Shared bits of snapshot transfers: progress reporting, timing, hashing, option checks.
import { createHash } from 'node:crypto';
import type { BlobStore } from '../blob/blob.ts';
import { isTorporError, TorporError } from '../core/errors.ts';
import { elapsedMs, roundMs } from '../core/time.ts';

export { elapsedMs, roundMs };

export interface TransferProgress {
  bytesDone: number;
  bytesTotal: number;
}

export type ProgressListener = (progress: TransferProgress) => void;

/** Counts bytes done against a known total and tells the listener after every step. */
export class ProgressCounter {
  readonly #listener: ProgressListener | undefined;
  readonly #total: number;
  #done = 0;

  constructor(total: number, listener: ProgressListener | undefined) {
    this.#total = total;
    this.#listener = listener;
  }

  add(bytes: number): void {
    this.#done += bytes;
    this.#listener?.({ bytesDone: this.#done, bytesTotal: this.#total });
  }
}

export function sha256Hex(bytes: Uint8Array): string {
  return createHash('sha256').update(bytes).digest('hex');
}

export function positiveInteger(value: number, field: string): number {
  if (!Number.isSafeInteger(value) || value < 1) {
    throw new TorporError('INVALID_ARGUMENT', `${field} must be a positive integer, got ${value}`, { field });
  }
  return value;
}

/** Reads a blob from the node cache when it holds a copy that passes `verify`, else from the store (and caches
 * it). A key the store lacks is SNAPSHOT_CORRUPT: a manifest named it. */
export async function readVerified(
  blob: BlobStore,
  cache: BlobStore | undefined,
  key: string,
  verify: (bytes: Uint8Array) => Promise<Buffer>,
  what: string,
): Promise<Buffer> {
  if (cache) {
    const cached = await cache.getBytes(key).catch(() => undefined);
    if (cached) {
      const ok = await verify(cached).catch(() => undefined);
      if (ok) return ok;
    }
  }
  let bytes: Uint8Array;
  try {
    bytes = await blob.getBytes(key);
  } catch (err) {
    if (isTorporError(err, 'NOT_FOUND'))
      throw new TorporError('SNAPSHOT_CORRUPT', `${what} ${key} is missing from the blob store`, {
        field: 'snapshot',
        cause: err,
      });
    throw err;
  }
  const decoded = await verify(bytes);
  await cache?.put(key, bytes);
  return decoded;
}
