// Snapshot format v1: content-addressed, compressed, deduplicated chunks plus a manifest written last.

export { startChunkPool } from './chunk-pool.ts';
export { COMPACT_DELTA_LEVEL, compactDelta, DEFAULT_DELTA_LEVEL } from './delta.ts';
export {
  addLiveManifests,
  collectGarbage,
  deleteGarbage,
  type GcOptions,
  type GcPlan,
  type GcResult,
  planGarbage,
  snapshotWhole,
} from './gc.ts';
export {
  CHUNK_PREFIX,
  chunkKey,
  DEFAULT_MANIFEST_PREFIX,
  decodeManifest,
  encodeManifest,
  manifestKeyFor,
  newSnapshotId,
  readManifest,
  referencedKeys,
  snapshotManifestSchema,
} from './manifest.ts';
export { PATCH_MAX_FRACTION, PATCH_PAGE_SIZE, PATCH_PREFIX, patchKey } from './patch.ts';
export {
  PARTIAL_SUFFIX,
  type RestoreSnapshotOptions,
  type RestoreSnapshotResult,
  type RestoreSnapshotStats,
  restoreSnapshot,
} from './restore.ts';
export type { ProgressListener, TransferProgress } from './transfer.ts';
export {
  DEFAULT_CHUNK_SIZE,
  DEFAULT_CONCURRENCY,
  type SnapshotMeta,
  type WriteSnapshotOptions,
  type WriteSnapshotResult,
  type WriteSnapshotStats,
  writeSnapshot,
} from './write.ts';
