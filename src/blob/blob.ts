// BlobStore: object storage for snapshots. Implementations: filesystem (embedded default); later S3-compatible.
// Every implementation must pass test/blob/conformance.ts.
import type { Readable } from 'node:stream';
import { TorporError } from '../core/errors.ts';

export interface ByteRange {
  /** First byte, inclusive. Must lie inside the object, or get throws INVALID_ARGUMENT (field "range"). */
  start: number;
  /** Last byte, inclusive; omitted = to the end. Past the end reads to the end, as an HTTP Range does. */
  end?: number;
}

export interface BlobList {
  keys: string[];
  nextCursor?: string;
}

export interface BlobStore {
  /** Atomic: a reader sees the whole object or none of it, never part. Overwrites. */
  put(key: string, body: Uint8Array | Readable): Promise<void>;
  /** Throws TorporError NOT_FOUND (field "key") for a missing key. */
  get(key: string, range?: ByteRange): Promise<Readable>;
  /** Whole object in memory (small objects: manifests, chunks). Throws NOT_FOUND. */
  getBytes(key: string): Promise<Uint8Array>;
  has(key: string): Promise<boolean>;
  /** Keys starting with `prefix`, in lexicographic order, at most `limit` (default 1000) per page. */
  list(prefix: string, opts?: { cursor?: string; limit?: number }): Promise<BlobList>;
  /** Idempotent: deleting a missing key is not an error. */
  delete(key: string): Promise<void>;
}

export const DEFAULT_LIST_LIMIT = 1000;

// The argument rules every implementation enforces the same way.

/** Throws INVALID_ARGUMENT (field "range") unless start and end are integers with 0 <= start <= end. */
export function assertValidRange(range: ByteRange): void {
  const { start, end } = range;
  if (!Number.isSafeInteger(start) || start < 0) throw badRange(`start must be a non-negative integer, got ${start}`);
  if (end !== undefined && (!Number.isSafeInteger(end) || end < start)) {
    throw badRange(`end must be an integer not below start (${start}), got ${end}`);
  }
}

export function badRange(message: string): TorporError {
  return new TorporError('INVALID_ARGUMENT', `range: ${message}`, { field: 'range' });
}

/** The list limit, or INVALID_ARGUMENT (field "limit") unless it is a positive integer. */
export function checkListLimit(limit: number | undefined): number {
  const value = limit ?? DEFAULT_LIST_LIMIT;
  if (!Number.isSafeInteger(value) || value < 1) {
    throw new TorporError('INVALID_ARGUMENT', `limit must be a positive integer, got ${value}`, { field: 'limit' });
  }
  return value;
}
