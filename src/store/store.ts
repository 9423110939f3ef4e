// StateStore: where actors, templates, workers and leases live. Implementations: sqlite (embedded default) and
// redis (several machines). Every implementation must pass test/store/conformance.ts.
import type { Actor, ActorRef, Page, Space, Template, Worker, WorkerFilter } from '../core/types.ts';

export type ChangeKind = 'actor' | 'template' | 'worker';

export interface Change {
  kind: ChangeKind;
  /** `space/name` for actors, the name for templates, the id for workers. */
  key: string;
  /** The record after the change, or undefined when it was deleted. */
  value: Actor | Template | Worker | undefined;
}

/** Proof that a write is made by the current holder of a lease: the lease's key and the token `acquireLease`
 * returned. A fenced write is refused with LEASE_LOST once that holding has ended (expired, released, or taken
 * over: a new holding always has a higher token), so a holder that stalled past its lease cannot overwrite the
 * work of the one that took over. The lease must be named `<space>/…` after the actor's space (a store spread
 * over machines keeps a space's leases beside its actors, so the check is atomic with the write). */
export interface Fence {
  lease: string;
  token: number;
  /** casActor only: the write also ends this holding (as releaseLease would), when it succeeds. An operation's
   * last write saves the release's round-trip so. */
  release?: boolean;
}

/** A lease taken by acquireActorLease: its fencing token, and the actor read once it was held (undefined: none). */
export interface ActorLease {
  token: number;
  actor: Actor | undefined;
}

/** Held by the garbage collection deleting snapshot objects (see StateStore.recordSnapshotWrite). */
export const SNAPSHOT_SWEEP_LEASE = 'snapshot-sweep';

export interface ListOptions {
  limit?: number;
  cursor?: string;
}

export interface StateStore {
  // Templates are immutable: createTemplate throws ALREADY_EXISTS for a name that exists.
  createTemplate(t: Template): Promise<Template>;
  getTemplate(name: string): Promise<Template | undefined>;
  listTemplates(opts?: ListOptions): Promise<Page<Template>>;
  /** The only mutable part of a template: the golden snapshot pointer, set once it has been taken. */
  setTemplateGolden(name: string, manifestKey: string): Promise<Template>;

  getSpace(name: string): Promise<Space | undefined>;
  /** Idempotent. */
  ensureSpace(name: string): Promise<Space>;

  /** Throws ALREADY_EXISTS when space/name exists. The stored actor has version 1. */
  createActor(a: Omit<Actor, 'version'>): Promise<Actor>;
  getActor(space: string, name: string): Promise<Actor | undefined>;
  /** Writes `next` iff the stored version equals `expectedVersion`; returns it with version+1. Throws CONFLICT
   * (stale version), NOT_FOUND, or LEASE_LOST (`fence` given and no longer current). */
  casActor(next: Actor, expectedVersion: number, fence?: Fence): Promise<Actor>;
  /** Deletes iff the stored version equals `expectedVersion`. Throws CONFLICT, NOT_FOUND or LEASE_LOST. */
  deleteActor(space: string, name: string, expectedVersion: number, fence?: Fence): Promise<void>;
  /** Ordered by space then name; `cursor` is opaque. `space` undefined lists every space. */
  listActors(space: string | undefined, opts?: ListOptions): Promise<Page<Actor>>;

  /** Insert or replace (the agent owning the worker calls this on start and on every lease renewal). */
  putWorker(w: Worker): Promise<Worker>;
  /** Extends only the lease, never touching claim state (an agent's heartbeat must not race a claim).
   * Returns false when the worker is not registered. */
  renewWorkerLease(id: string, leaseExpiresAt: string): Promise<boolean>;
  getWorker(id: string): Promise<Worker | undefined>;
  listWorkers(opts?: ListOptions): Promise<Page<Worker>>;
  deleteWorker(id: string): Promise<void>;
  /** Atomically picks one free worker matching `filter` whose lease has not expired, marks it busy for `actor`
   * and returns it; undefined when none is free. Two concurrent claims never get the same worker. */
  claimWorker(filter: WorkerFilter, actor: ActorRef): Promise<Worker | undefined>;
  /** Marks the worker free iff it is held by `actor`; returns whether it did. */
  releaseWorker(id: string, actor: ActorRef): Promise<boolean>;

  /** Expiring named locks. Acquire succeeds when the lease is absent, expired, or already held by `holder`
   * (which extends it), and returns the holding's fencing token; undefined when another holder has it. Tokens of a
   * key only grow: a new holding (another holder, or the same one after its lease ended) gets a higher token than
   * every earlier one, while an extension keeps its token. */
  acquireLease(key: string, holder: string, ttlMs: number): Promise<number | undefined>;
  /** acquireLease of an actor's lease (named `<space>/…` after `actor`'s space, as a Fence; INVALID_ARGUMENT
   * otherwise) and, when it is taken, the actor as it is right after: what every operation on an actor starts
   * with, in one round-trip. Undefined when another holder has the lease. */
  acquireActorLease(key: string, holder: string, ttlMs: number, actor: ActorRef): Promise<ActorLease | undefined>;
  releaseLease(key: string, holder: string): Promise<void>;

  // Snapshot writes in flight, so that garbage collection on any server never deletes an object one of them
  // reuses (protocol in src/control/snapshot-gc.ts). A write is recorded before its first chunk and ended once its
  // manifest is live (or abandoned); while the lease SNAPSHOT_SWEEP_LEASE is held, no new write may begin.

  /** Records the write of snapshot `key` as in flight for `ttlMs` (or extends it); returns false, recording
   * nothing, when the write is not already recorded and SNAPSHOT_SWEEP_LEASE is held (a sweep is deleting). */
  recordSnapshotWrite(key: string, ttlMs: number): Promise<boolean>;
  /** Idempotent. */
  endSnapshotWrite(key: string): Promise<void>;
  /** Keys of the writes recorded and not expired, in no particular order. */
  listSnapshotWrites(): Promise<string[]>;

  /** Changes made through this store from now on (for caches: router, scheduler). Ends when `signal` aborts. */
  watch(kinds: ChangeKind[], signal: AbortSignal): AsyncIterable<Change>;

  close(): Promise<void>;
}
