// BlobStore: object storage for snapshots. Implementations: filesystem (embedded default); later S3-compatible.
// Every implementation must pass test/blob/conformance.ts.
import type { Readable } from 'node:stream';

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
