// One operation per actor at a time, across every process that runs a lifecycle (servers, `torpor up`): an
// in-process mutex orders this process's callers, and a store lease (renewed while the operation runs) excludes
// other processes. The lease's fencing token goes with every write the operation makes, so a process that
// stalled past its lease cannot overwrite the work of whoever took over. A process that dies leaves its lease to
// expire; the reconciler then takes it and settles the actor.
import { TorporError } from '../core/errors.ts';
import { KeyedMutex } from '../core/keyed-mutex.ts';
import type { Actor, ActorRef } from '../core/types.ts';
import type { Fence, StateStore } from '../store/store.ts';

export interface ActorLocksOptions {
  store: StateStore;
  /** Who holds the leases: unique per process (a restarted process with the same id takes its leases back). */
  holder: string;
  ttlMs: number;
  /** How long `run` waits for another process's operation on the same actor before giving up. */
  waitMs: number;
}

const keyOf = (ref: ActorRef) => `${ref.space}/${ref.name}`;
/** Lease keys start with the actor's space, as fenced writes require (see Fence). */
const leaseOf = (ref: ActorRef) => `${ref.space}/actor/${ref.name}`;

export class ActorLocks {
  private readonly o: ActorLocksOptions;
  private readonly mutex = new KeyedMutex();
  private readonly fences = new Map<string, Fence>();
  /** The renewal timers of the holdings in flight, by actor. */
  private readonly renewals = new Map<string, NodeJS.Timeout>();

  constructor(opts: ActorLocksOptions) {
    this.o = opts;
  }

  /** Whether an operation on the actor is in flight in this process. */
  isLocal(ref: ActorRef): boolean {
    return this.mutex.isLocked(keyOf(ref));
  }

  /** The fence of the operation this process runs on the actor, if any. */
  fence(ref: ActorRef): Fence | undefined {
    return this.fences.get(keyOf(ref));
  }

  /** The fence of an operation's last write on the actor: the write ends the lease with it (Fence.release). Once
   * it succeeded, call `ended`. The lease is no longer renewed from now on: a renewal landing after that write
   * would take the lease anew, for nobody. */
  lastFence(ref: ActorRef): Fence | undefined {
    const key = keyOf(ref);
    clearInterval(this.renewals.get(key));
    const fence = this.fences.get(key);
    return fence && { ...fence, release: true };
  }

  /** The last write (see lastFence) ended the lease: it is not released again. The in-process lock is still held
   * until the operation returns. */
  ended(ref: ActorRef): void {
    const key = keyOf(ref);
    this.renewals.delete(key);
    this.fences.delete(key);
  }

  /** Runs `fn` holding the actor's lock; waits (bounded) for an operation elsewhere to finish. `fn` is given the
   * actor as it was once the lock was held (undefined when there is none): the read comes with the lease. */
  run<T>(ref: ActorRef, fn: (actor: Actor | undefined) => Promise<T>): Promise<T> {
    return this.mutex.run(keyOf(ref), async () => {
      const deadline = Date.now() + this.o.waitMs;
      for (;;) {
        const held = await this.o.store.acquireActorLease(leaseOf(ref), this.o.holder, this.o.ttlMs, ref);
        if (held !== undefined) return this.holding(ref, held.token, () => fn(held.actor));
        if (Date.now() >= deadline) {
          throw new TorporError(
            'FAILED_PRECONDITION',
            `another operation on actor "${keyOf(ref)}" is in flight elsewhere; retry when it settles`,
            { field: 'name' },
          );
        }
        await new Promise((r) => setTimeout(r, 50 + Math.random() * 100));
      }
    });
  }

  /** Runs `fn` only if the actor's lock is free right now (the reconciler: an actor someone is working on is left
   * to them). Returns whether it ran. */
  async tryRun(ref: ActorRef, fn: () => Promise<void>): Promise<boolean> {
    if (this.isLocal(ref)) return false;
    return this.mutex.run(keyOf(ref), async () => {
      const token = await this.o.store.acquireLease(leaseOf(ref), this.o.holder, this.o.ttlMs);
      if (token === undefined) return false;
      await this.holding(ref, token, fn);
      return true;
    });
  }

  private async holding<T>(ref: ActorRef, token: number, fn: () => Promise<T>): Promise<T> {
    const key = keyOf(ref);
    const lease = leaseOf(ref);
    this.fences.set(key, { lease, token });
    // Renewal failures are not fatal here: if the lease is really lost, the next fenced write says so.
    const renew = setInterval(
      () => void this.o.store.acquireLease(lease, this.o.holder, this.o.ttlMs).catch(() => undefined),
      Math.max(100, this.o.ttlMs / 3),
    );
    this.renewals.set(key, renew);
    try {
      return await fn();
    } finally {
      clearInterval(renew);
      const ended = !this.renewals.delete(key); // its last write ended it (see ended)
      this.fences.delete(key);
      if (!ended) await this.o.store.releaseLease(lease, this.o.holder).catch(() => undefined);
    }
  }
}
