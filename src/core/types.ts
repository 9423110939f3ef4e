// The records Torpor stores. Pure data: no I/O here.
import type { AssetAuthRef, RuntimeClass, TemplateSpec } from './schemas.ts';

export const DEFAULT_SPACE = 'default';

/** A template as stored: the immutable spec plus its golden snapshot once one has been taken. */
export interface Template extends TemplateSpec {
  createdAt: string;
  /** Manifest key of the snapshot taken once per template (boot, wait ready, checkpoint). */
  goldenSnapshot?: string;
}

export const ACTOR_STATUSES = [
  'SUSPENDED',
  'RESUMING',
  'RUNNING',
  'SUSPENDING',
  'PAUSING',
  'PAUSED',
  'FAILED',
] as const;
export type ActorStatus = (typeof ACTOR_STATUSES)[number];

/** Per-phase durations in milliseconds, e.g. { claim: 1, fetch: 20, restore: 140, ready: 12 }. */
export type Phases = Record<string, number>;

export interface Operation {
  /** Names the operation in log lines (and the dashboard); absent on records written before it existed. */
  id?: string;
  kind: 'create' | 'resume' | 'suspend' | 'pause' | 'fork' | 'delete' | 'reconcile';
  startedAt: string;
  finishedAt?: string;
  phases: Phases;
  /** For operations that wrote a snapshot: bytes as checkpointed vs bytes newly stored (compressed, deduplicated). */
  snapshot?: {
    rawBytes: number;
    storedBytes: number;
    uploadedChunks: number;
    reusedChunks: number;
    zeroChunks: number;
    deltaFiles: number;
  };
  error?: string;
}

export interface ActorRef {
  space: string;
  name: string;
}

export interface Actor extends ActorRef {
  template: string;
  status: ActorStatus;
  /** Incremented by every compare-and-set; a writer must present the version it read. */
  version: number;
  labels: Record<string, string>;
  /** Manifest key of the latest durable snapshot (the one a resume restores). */
  snapshot?: string;
  /** Older snapshots kept for rollback, newest first (bounded by the template's snapshot.retain). */
  history: string[];
  /** Set while the actor holds a worker (RESUMING, RUNNING, SUSPENDING, PAUSING, PAUSED). */
  worker?: string;
  node?: string;
  /** Where the actor serves: host:port on the worker, set while RUNNING. */
  address?: string;
  /** For PAUSED actors: the node-local checkpoint directory that a resume on the same node restores first. */
  localSnapshot?: string;
  /** While SUSPENDING: the manifest key the suspend is writing. A suspend cut short (its process died) whose
   * manifest exists is completed by the reconciler rather than rolled back: the manifest is the commit marker. */
  pendingSnapshot?: string;
  /** When a transitional state was entered: the reconciler rolls it forward or back after its deadline. */
  transitionDeadline?: string;
  reason?: string;
  lastOperation?: Operation;
  lastActivity: string;
  createdAt: string;
  updatedAt: string;
}

export type WorkerState = 'free' | 'busy';

export interface Worker {
  id: string;
  node: string;
  runtime: RuntimeClass;
  state: WorkerState;
  /** Address the worker's actor is reached at (the worker's own address, not the actor's). */
  host: string;
  actor?: ActorRef;
  /** The agent that owns the worker renews this; a worker whose lease expired is considered gone. */
  leaseExpiresAt: string;
  /** Base URL of the node agent's API, for workers of an agent in another process (torpor agent); absent for
   * agents in the server's own process (torpor up). */
  agent?: string;
}

export interface WorkerFilter {
  runtime: RuntimeClass;
  /** Claim exactly this worker (or nothing). */
  workerId?: string;
  /** Prefer workers on these nodes, in order (e.g. nodes that already hold the snapshot's chunks). */
  preferNodes?: string[];
  /** Never claim on these workers (e.g. to force a move). */
  excludeWorkers?: string[];
}

export interface Page<T> {
  items: T[];
  nextCursor?: string;
}

export interface Space {
  name: string;
  createdAt: string;
}

/** A runtime binary pinned by content: the same bytes on every node that restores a snapshot. */
export interface Asset {
  url: string;
  /** 64 lower-case hex digits. */
  sha256: string;
  /** Where the credential for `url` lives (a reference, never the secret itself). */
  auth?: AssetAuthRef;
}

/** A file as a list of chunks: sha256 of each chunk's uncompressed bytes; null for an all-zero chunk. */
export interface ChunkedContent {
  size: number;
  chunks: (string | null)[];
}

/** A file stored as a zstd delta against a chunked base file (a "keyframe", never itself a delta). */
export interface FileDelta {
  /** Blob key `deltas/<sha256 of the object's bytes>`. */
  object: string;
  /** sha256 of the file's full content, checked after the delta is applied. */
  sha256: string;
  base: ChunkedContent;
}

/** Pages of a chunked file whose bytes differ from its chunks (the "base" or keyframe chunks): the file is its
 * chunks with these pages written over them. Lets a chunk that changed in a few pages keep its base. */
export interface FilePatch {
  /** Blob key `patches/<sha256 of the listed pages' bytes, concatenated>`; the object is those bytes, zstd. */
  object: string;
  /** Bytes per page; divides the manifest's chunkSize. The file's last page may be shorter. */
  pageSize: number;
  /** Runs of consecutive page indices within the file, flattened: `[first, count, first, count, …]`; sorted, apart
   * (a run starts after the previous one's end plus one), each page inside a non-null chunk. */
  pages: number[];
}

export interface ManifestFile {
  name: string;
  size: number;
  /** The file's chunks; empty when the file is stored as a delta. With `patch`, a patched chunk's base. */
  chunks: (string | null)[];
  delta?: FileDelta;
  patch?: FilePatch;
}

export interface SnapshotManifest {
  version: 1;
  runtime: RuntimeClass;
  template: string;
  assets: Record<string, Asset>;
  chunkSize: number;
  files: ManifestFile[];
  createdAt: string;
  /** Manifest key of the snapshot this one followed (for history and GC), or null. */
  parent: string | null;
}
