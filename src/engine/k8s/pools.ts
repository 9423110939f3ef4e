// The control plane's side of a WorkerPool: which of its workers are registered, and draining its actors to
// snapshots before its pods go. A pool's agents register under their pod names (`--node $(POD_NAME)`), so a
// pool's nodes are its pods.
import type { Logger } from 'pino';
import type { Lifecycle } from '../../control/lifecycle.ts';
import { allActors, allWorkers } from '../../store/all.ts';
import type { StateStore } from '../../store/store.ts';
import type { PoolControl } from './controller.ts';

/** Statuses in which an actor holds a worker (and so a pod cannot go without losing it). */
const HOLDING = new Set(['RESUMING', 'RUNNING', 'SUSPENDING', 'PAUSING', 'PAUSED']);

export class StorePools implements PoolControl {
  private readonly store: StateStore;
  private readonly lifecycle: Pick<Lifecycle, 'suspend'>;
  private readonly log: Logger;

  constructor(opts: { store: StateStore; lifecycle: Pick<Lifecycle, 'suspend'>; log: Logger }) {
    this.store = opts.store;
    this.lifecycle = opts.lifecycle;
    this.log = opts.log;
  }

  async readyWorkers(nodes: string[]): Promise<number> {
    const on = new Set(nodes);
    const now = Date.now();
    let n = 0;
    for await (const w of allWorkers(this.store)) {
      if (on.has(w.node) && Date.parse(w.leaseExpiresAt) > now) n++;
    }
    return n;
  }

  async drain(nodes: string[]): Promise<number> {
    const on = new Set(nodes);
    let remaining = 0;
    for await (const actor of allActors(this.store)) {
      if (!actor.node || !on.has(actor.node) || !HOLDING.has(actor.status)) continue;
      if (actor.status === 'RUNNING' || actor.status === 'PAUSED') {
        try {
          const after = await this.lifecycle.suspend(actor.space, actor.name);
          if (after.status === 'SUSPENDED') continue;
        } catch (err) {
          this.log.warn({ actor: `${actor.space}/${actor.name}`, err }, 'drain: suspend failed; will retry');
        }
      }
      // Transitional states end by themselves (or by the reconciler); the next pass looks again.
      remaining++;
    }
    return remaining;
  }
}
