// AgentClient: exactly what the control layer asks of a node agent. NodeAgent answers it in this process (torpor
// up); RemoteAgent answers it over the agent API (torpor server → torpor agent). Everything crossing this seam
// is plain data, so the two behave the same; node-local paths (a paused actor's checkpoint) are opaque strings
// the control layer stores and hands back, never builds.
import type { Readable } from 'node:stream';
import type { ActorRef, Phases, SnapshotManifest, Template } from '../core/types.ts';
import type { ExecResult, OutputListener } from '../runtime/runtime.ts';
import type { TransferProgress, WriteSnapshotStats } from '../snapshot/index.ts';

export interface ActivateRequest {
  workerId: string;
  actor: ActorRef;
  template: Template;
  /** Durable snapshot to restore; none = boot from the image. */
  snapshot?: string;
  /** Node-local checkpoint directory (a paused actor's), restored in preference to `snapshot`. */
  localSnapshot?: string;
}

export interface ActivateResult {
  address: string;
  phases: Phases;
}

export interface CheckpointRequest {
  workerId: string;
  actor: ActorRef;
  template: Template;
  /** Manifest key to write; the manifest is the commit marker. */
  manifestKey: string;
  parent: string | null;
}

export type UploadRequest = Omit<CheckpointRequest, 'workerId'>;

export type SnapshotStats = Omit<WriteSnapshotStats, 'phases'>;

/** A snapshot transfer's progress on a node (for progress displays). */
export interface TransferEvent extends ActorRef, TransferProgress {
  direction: 'upload' | 'download';
}

export interface CheckpointResult {
  manifest: SnapshotManifest;
  stats: SnapshotStats;
  phases: Phases;
}

/** Names a node-local checkpoint: the agent turns it into a directory of its own (a suspend's working copy, or a
 * paused actor's kept checkpoint), so the control layer never names paths on a node. */
export interface LocalCheckpointTarget {
  kind: 'suspend' | 'pause';
  actor: ActorRef;
  /** The snapshot id the checkpoint will be uploaded under (the manifest key's directory). */
  id: string;
}

export interface LocalCheckpoint {
  dir: string;
  files: string[];
  phases: Phases;
}

export interface LogOptions {
  /** Keep streaming what is appended until `signal` aborts. */
  follow?: boolean;
  signal?: AbortSignal;
}

export interface AgentClient {
  readonly node: string;
  /** Calls `listener` with the progress of every snapshot transfer on the node from now on (for progress displays),
   * until the returned function is called. Resolves once the subscription is live (for a remote agent: its stream
   * of events is open). */
  watchTransfers(listener: (event: TransferEvent) => void): Promise<() => void>;
  /** Restores (or boots) the actor on the worker and waits until it is ready. */
  activate(req: ActivateRequest): Promise<ActivateResult>;
  /** Checkpoints the worker's sandbox into a node-local directory (the sandbox stops). With `deferTeardown`,
   * what is left of the sandbox goes only at `settled`/`release`, so an upload does not compete with it. */
  checkpointLocal(
    workerId: string,
    target: LocalCheckpointTarget,
    opts?: { deferTeardown?: boolean },
  ): Promise<LocalCheckpoint>;
  /** Uploads a local checkpoint as a durable snapshot (chunks first, manifest last). Without `files`, the ones the
   * checkpoint recorded; a checkpoint that did not complete is refused. */
  upload(req: UploadRequest, dir: string, files?: string[]): Promise<CheckpointResult>;
  /** Checkpoint + durable upload in one call (golden snapshots). */
  checkpoint(req: CheckpointRequest): Promise<CheckpointResult>;
  /** Keeps an uploaded checkpoint as this node's local copy of that snapshot (faster resumes here). */
  keepLocal(dir: string, manifestKey: string): Promise<void>;
  /** Deletes a node-local checkpoint. Idempotent. */
  discardLocal(dir: string): Promise<void>;
  /** Re-encodes the snapshot's deltas at a higher level, in place; returns the bytes saved. */
  compact(manifestKey: string): Promise<number>;
  /** Whether the worker's sandbox still runs (a failed checkpoint may have killed it). */
  sandboxAlive(workerId: string): Promise<boolean>;
  /** Resolves when the worker's previous sandbox is fully gone (the worker may be handed out again). */
  settled(workerId: string): Promise<void>;
  /** Stops whatever runs on the worker without a snapshot. Idempotent. */
  release(workerId: string): Promise<void>;
  exec(workerId: string, command: string[], timeoutMs: number, onOutput?: OutputListener): Promise<ExecResult>;
  /** The actor's stdout/stderr from every activation on this node. */
  logs(actor: ActorRef, opts?: LogOptions): Promise<Readable>;
}
