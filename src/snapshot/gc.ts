// Garbage collection: chunks are shared between snapshots, so a chunk may go only when no live manifest
// names it. Safety comes first: if a live manifest cannot be read, nothing is deleted.
//
// Not safe to run concurrently with writeSnapshot: a snapshot being written has chunks in the store but no
// manifest in the live set yet (and may be reusing a chunk GC is about to delete). Callers serialize the two.
import type { BlobStore } from '../blob/blob.ts';
import { CHUNK_PREFIX, DEFAULT_MANIFEST_PREFIX, DELTA_PREFIX, readManifest, referencedKeys } from './manifest.ts';
import { TaskPool } from './pool.ts';

const DELETE_CONCURRENCY = 8;

export interface GcOptions {
  /** Every key under this prefix is a manifest; those not live are deleted. Default "snapshots/". */
  manifestPrefix?: string;
  /** Count what would be deleted, delete nothing. */
  dryRun?: boolean;
}

export interface GcResult {
  deletedManifests: number;
  deletedChunks: number;
  keptChunks: number;
}

export async function collectGarbage(
  blob: BlobStore,
  liveManifestKeys: string[],
  opts: GcOptions = {},
): Promise<GcResult> {
  const live = new Set(liveManifestKeys);
  // Read the live set first: a missing or corrupt live manifest throws here, before anything is deleted.
  const referenced = await referencedChunkKeys(blob, live);
  const deadManifests = (await listAll(blob, opts.manifestPrefix ?? DEFAULT_MANIFEST_PREFIX)).filter(
    (key) => !live.has(key),
  );
  const chunkKeys = [...(await listAll(blob, CHUNK_PREFIX)), ...(await listAll(blob, DELTA_PREFIX))];
  const deadChunks = chunkKeys.filter((key) => !referenced.has(key));
  if (!opts.dryRun) {
    // Manifests before chunks: a crash in between leaves orphan chunks (collected next time), never a
    // manifest pointing at deleted chunks.
    await deleteAll(blob, deadManifests);
    await deleteAll(blob, deadChunks);
  }
  return {
    deletedManifests: deadManifests.length,
    deletedChunks: deadChunks.length,
    keptChunks: chunkKeys.length - deadChunks.length,
  };
}

async function referencedChunkKeys(blob: BlobStore, liveManifestKeys: Set<string>): Promise<Set<string>> {
  const referenced = new Set<string>();
  for (const key of liveManifestKeys) {
    for (const k of referencedKeys(await readManifest(blob, key))) referenced.add(k);
  }
  return referenced;
}

async function listAll(blob: BlobStore, prefix: string): Promise<string[]> {
  const keys: string[] = [];
  let cursor: string | undefined;
  do {
    const page = await blob.list(prefix, cursor === undefined ? {} : { cursor });
    keys.push(...page.keys);
    cursor = page.nextCursor;
  } while (cursor !== undefined);
  return keys;
}

async function deleteAll(blob: BlobStore, keys: string[]): Promise<void> {
  const pool = new TaskPool(DELETE_CONCURRENCY);
  await pool.run(async () => {
    for (const key of keys) await pool.submit(() => blob.delete(key));
  });
}
