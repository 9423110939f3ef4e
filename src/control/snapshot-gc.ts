// Snapshot garbage collection that is safe with several servers sharing one StateStore and one BlobStore.
//
// The hazard: chunks are content-addressed and shared, so a snapshot being written reuses a chunk the store
// already has (writeSnapshot skips the upload when `has` says yes). If that chunk is garbage at that moment (only
// dead manifests named it), a collection on another server may delete it after the `has` and before the new
// manifest goes live: the new snapshot then names a chunk that is gone.
//
// The protocol (every step through the StateStore, so it holds across processes):
//   writer   recordSnapshotWrite(key) before its first chunk, renewed while it runs; endSnapshotWrite(key) once
//            its manifest is live (or abandoned). recordSnapshotWrite is refused while a sweep is deleting, so the
//            writer waits (bounded) for the sweep to end.
//   GC       1. takes the cluster-wide GC lease (one collection at a time across servers);
//            2. plans while writes go on: live manifests, the objects they name, the objects listed;
//            3. waits for a moment when no write is in flight (each ends, or expires: its writer died), then takes
//               the sweep lease: from now on no new write begins; if writes never pause, it takes the lease anyway
//               after a while and waits for those in flight (new ones wait for the sweep);
//            4. checks, holding the lease, that no write is in flight (one may have begun just before it);
//            5. re-reads the live set and adds the manifests that became live since step 2 (writes that finished
//               meanwhile, with every chunk they reused): only what is still unreferenced is deleted;
//            6. deletes (manifests, then chunks), checking before each batch that it still holds the sweep lease;
//            7. releases both leases.
// So a chunk is deleted only if, at a moment when no write was in flight and none could begin, no live manifest
// named it; a write that begins after the sweep finds the chunk gone and uploads it again.
//
// A write whose record expired (its process stalled longer than the record's ttl) cannot know whether a sweep ran
// meanwhile: SnapshotWrite.whole() then checks that every object its manifest names still exists before it is
// committed.
import type { Logger } from 'pino';
import type { BlobStore } from '../blob/blob.ts';
import { TorporError } from '../core/errors.ts';
import { addLiveManifests, deleteGarbage, type GcResult, planGarbage, snapshotWhole } from '../snapshot/index.ts';
import { SNAPSHOT_SWEEP_LEASE, type StateStore } from '../store/store.ts';

/** The lease of the one collection running cluster-wide (planning included). */
export const SNAPSHOT_GC_LEASE = 'snapshot-gc';

export interface SnapshotGcOptions {
  store: StateStore;
  blob: BlobStore;
  log: Logger;
  /** Names this process's leases; unique per process. */
  holder: string;
  /** How long a write's record lasts without renewal (renewed every quarter of it): how long the record of a write
   * whose process died keeps collections waiting. Default 30 s. */
  writeTtlMs?: number;
  /** How long the GC and sweep leases last without renewal (renewed every quarter). Default 30 s. */
  leaseTtlMs?: number;
  /** How long a collection waits for a moment without writes in flight before it gives up (retried at the next
   * collection; for its second half it holds new writes off, see closeGate), and how long a write waits for a
   * sweep to end. Default 120 s: the first half outlasts the record of a write whose process died. */
  waitMs?: number;
  /** How often waits poll the store. Default 100 ms. */
  pollMs?: number;
}

/** A snapshot write in flight, recorded in the store until end(). */
export interface SnapshotWrite {
  /** True when the write may be committed: its manifest exists and, if its record ever lapsed (a sweep may have run
   * meanwhile), every object the manifest names does too. */
  whole(): Promise<boolean>;
  end(): Promise<void>;
}

export class SnapshotGc {
  private readonly o: SnapshotGcOptions;
  private readonly writeTtlMs: number;
  private readonly leaseTtlMs: number;
  private readonly waitMs: number;
  private readonly pollMs: number;

  constructor(opts: SnapshotGcOptions) {
    this.o = opts;
    this.writeTtlMs = opts.writeTtlMs ?? 30_000;
    this.leaseTtlMs = opts.leaseTtlMs ?? 30_000;
    this.waitMs = opts.waitMs ?? 120_000;
    this.pollMs = opts.pollMs ?? 100;
  }

  /** Records the write of manifest `key` before its first chunk; waits while a sweep is deleting (UNAVAILABLE
   * after waitMs). */
  async beginWrite(key: string): Promise<SnapshotWrite> {
    const deadline = Date.now() + this.waitMs;
    // When the record was last set, read before the call that set it: its life is never overestimated.
    let renewedAt: number;
    for (;;) {
      renewedAt = Date.now();
      if (await this.o.store.recordSnapshotWrite(key, this.writeTtlMs)) break;
      if (Date.now() >= deadline) {
        throw new TorporError('TIMEOUT', 'a snapshot garbage collection is still deleting; try again', {
          field: 'snapshot',
        });
      }
      await sleep(this.pollMs);
    }
    let lapsed = false;
    const renew = async () => {
      const before = Date.now();
      const held = await this.o.store.recordSnapshotWrite(key, this.writeTtlMs).catch(() => false);
      if (held && before - renewedAt < this.writeTtlMs) renewedAt = before;
      else lapsed = true;
    };
    const timer = setInterval(() => void renew(), this.writeTtlMs / 4);
    timer.unref();
    return {
      whole: async () => {
        // A record renewed less than a renewal period ago has as much life left as the timer ever leaves it: it
        // cannot have lapsed, and renewing it again would only cost a round-trip per suspend.
        if (Date.now() - renewedAt >= this.writeTtlMs / 4) await renew();
        return lapsed ? snapshotWhole(this.o.blob, key) : this.o.blob.has(key);
      },
      end: async () => {
        clearInterval(timer);
        await this.o.store.endSnapshotWrite(key).catch((err: unknown) => {
          // It expires on its own: a sweep waits at most writeTtlMs longer.
          this.o.log.warn({ err, snapshot: key }, 'ending a snapshot write record failed');
        });
      },
    };
  }

  /** One collection, if no other server is collecting (undefined then, or when writes in flight did not end
   * within waitMs). `liveManifests` lists the manifests actors and templates point at; it is read twice. */
  async collect(liveManifests: () => Promise<string[]>): Promise<GcResult | undefined> {
    const { store, holder } = this.o;
    if ((await store.acquireLease(SNAPSHOT_GC_LEASE, holder, this.leaseTtlMs)) === undefined) return undefined;
    const gcLease = this.keepLease(SNAPSHOT_GC_LEASE);
    try {
      let plan = await planGarbage(this.o.blob, await liveManifests());
      const sweepToken = await this.closeGate();
      if (sweepToken === undefined) {
        this.o.log.info('snapshot garbage collection put off: snapshot writes still in flight');
        return undefined;
      }
      const sweepLease = this.keepLease(SNAPSHOT_SWEEP_LEASE);
      try {
        plan = await addLiveManifests(this.o.blob, plan, await liveManifests());
        return await deleteGarbage(this.o.blob, plan, {
          beforeBatch: async () => {
            if ((await store.acquireLease(SNAPSHOT_SWEEP_LEASE, holder, this.leaseTtlMs)) !== sweepToken) {
              throw new TorporError('LEASE_LOST', 'the snapshot sweep lease was lost; collection stopped', {
                field: 'lease',
              });
            }
          },
        });
      } finally {
        sweepLease.stop();
        await store.releaseLease(SNAPSHOT_SWEEP_LEASE, holder);
      }
    } finally {
      gcLease.stop();
      await store.releaseLease(SNAPSHOT_GC_LEASE, holder);
    }
  }

  /** Takes the sweep lease at a moment when no write is in flight; returns its token, or undefined (leaving the
   * lease free) when there was none within waitMs. For the first half of waitMs it waits for a moment without writes
   * *without* holding new ones off (a write whose process died keeps its record until it expires: it must not hold
   * every suspend off meanwhile); past that (writes never paused), it holds new writes off and waits for those in
   * flight to end. */
  private async closeGate(): Promise<number | undefined> {
    const { store, holder } = this.o;
    const deadline = Date.now() + this.waitMs;
    const patientUntil = Date.now() + this.waitMs / 2;
    for (;;) {
      const idle = (await store.listSnapshotWrites()).length === 0;
      if (idle || Date.now() >= patientUntil) {
        const token = await store.acquireLease(SNAPSHOT_SWEEP_LEASE, holder, this.leaseTtlMs);
        if (token === undefined) return undefined;
        // Writes recorded before the lease (one may have begun since the listing) end, or expire.
        if (await this.writesEnded(deadline)) return token;
        await store.releaseLease(SNAPSHOT_SWEEP_LEASE, holder);
        return undefined;
      }
      if (Date.now() >= deadline) return undefined;
      await sleep(this.pollMs);
    }
  }

  /** Waits (up to `deadline`) until no snapshot write is recorded. */
  private async writesEnded(deadline: number): Promise<boolean> {
    for (;;) {
      if ((await this.o.store.listSnapshotWrites()).length === 0) return true;
      if (Date.now() >= deadline) return false;
      await sleep(this.pollMs);
    }
  }

  /** Renews a lease this process holds until stop(). */
  private keepLease(key: string): { stop: () => void } {
    const timer = setInterval(() => {
      void this.o.store.acquireLease(key, this.o.holder, this.leaseTtlMs).catch(() => undefined);
    }, this.leaseTtlMs / 4);
    timer.unref();
    return { stop: () => clearInterval(timer) };
  }
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
