// Garbage collection: chunks are shared between snapshots, so a chunk may go only when no live manifest
// names it. Safety comes first: if a live manifest cannot be read, nothing is deleted.
//
// Not safe to run concurrently with writeSnapshot: a snapshot being written has chunks in the store but no
// manifest in the live set yet (and may be reusing a chunk GC is about to delete). collectGarbage is for a caller
// that serializes the two itself; with several processes, src/control/snapshot-gc.ts plans (planGarbage) while
// writes go on, holds new writes off and waits for those in flight, adds what became live meanwhile
// (addLiveManifests), and only then deletes (deleteGarbage).
import type { BlobStore } from '../blob/blob.ts';
import { CHUNK_PREFIX, DEFAULT_MANIFEST_PREFIX, DELTA_PREFIX, readManifest, referencedKeys } from './manifest.ts';
import { PATCH_PREFIX } from './patch.ts';
import { TaskPool } from './pool.ts';

/** Object requests (deletes, existence checks) in flight at once. */
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
  const plan = await planGarbage(blob, liveManifestKeys, opts);
  return opts.dryRun ? resultOf(plan) : deleteGarbage(blob, plan);
}

/** What a collection would delete, decided from the live manifests and the objects listed now. */
export interface GcPlan {
  live: Set<string>;
  referenced: Set<string>;
  deadManifests: string[];
  deadChunks: string[];
  /** Chunk, delta and patch objects listed. */
  listedChunks: number;
}

export async function planGarbage(blob: BlobStore, liveManifestKeys: string[], opts: GcOptions = {}): Promise<GcPlan> {
  const live = new Set(liveManifestKeys);
  // Read the live set first: a missing or corrupt live manifest throws here, before anything is deleted.
  const referenced = await referencedChunkKeys(blob, live);
  const deadManifests = (await listAll(blob, opts.manifestPrefix ?? DEFAULT_MANIFEST_PREFIX)).filter(
    (key) => !live.has(key),
  );
  const chunkKeys = [
    ...(await listAll(blob, CHUNK_PREFIX)),
    ...(await listAll(blob, DELTA_PREFIX)),
    ...(await listAll(blob, PATCH_PREFIX)),
  ];
  const deadChunks = chunkKeys.filter((key) => !referenced.has(key));
  return { live, referenced, deadManifests, deadChunks, listedChunks: chunkKeys.length };
}

/** The plan once `liveManifestKeys` are live too (manifests committed since it was made): they and every object
 * they name are no longer garbage. Reads only the manifests new to the plan. */
export async function addLiveManifests(blob: BlobStore, plan: GcPlan, liveManifestKeys: string[]): Promise<GcPlan> {
  const added = new Set(liveManifestKeys.filter((key) => !plan.live.has(key)));
  if (added.size === 0) return plan;
  const referenced = new Set([...plan.referenced, ...(await referencedChunkKeys(blob, added))]);
  const live = new Set([...plan.live, ...added]);
  return {
    live,
    referenced,
    deadManifests: plan.deadManifests.filter((key) => !live.has(key)),
    deadChunks: plan.deadChunks.filter((key) => !referenced.has(key)),
    listedChunks: plan.listedChunks,
  };
}

export interface DeleteOptions {
  /** Called before each batch of deletions; a throw stops the collection there (e.g. a lease was lost). */
  beforeBatch?: () => Promise<void>;
}

const DELETE_BATCH = 256;

export async function deleteGarbage(blob: BlobStore, plan: GcPlan, opts: DeleteOptions = {}): Promise<GcResult> {
  // Manifests before chunks: a crash in between leaves orphan chunks (collected next time), never a manifest
  // pointing at deleted chunks.
  for (const keys of [plan.deadManifests, plan.deadChunks]) {
    for (let i = 0; i < keys.length; i += DELETE_BATCH) {
      await opts.beforeBatch?.();
      await deleteAll(blob, keys.slice(i, i + DELETE_BATCH));
    }
  }
  return resultOf(plan);
}

function resultOf(plan: GcPlan): GcResult {
  return {
    deletedManifests: plan.deadManifests.length,
    deletedChunks: plan.deadChunks.length,
    keptChunks: plan.listedChunks - plan.deadChunks.length,
  };
}

/** Whether the manifest `key` exists and every object it names does too (a snapshot that can be restored). */
export async function snapshotWhole(blob: BlobStore, key: string): Promise<boolean> {
  if (!(await blob.has(key))) return false;
  const keys = [...referencedKeys(await readManifest(blob, key))];
  let missing = 0;
  const pool = new TaskPool(DELETE_CONCURRENCY);
  await pool.run(async () => {
    for (const k of keys) {
      await pool.submit(async () => {
        if (!(await blob.has(k))) missing++;
      });
    }
  });
  return missing === 0;
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
