// The control plane's side of a WorkerPool: which of its workers are registered, and draining its actors to
// snapshots before its pods go. A pool's agents register under their pod names (`--node $(POD_NAME)`), so a
// pool's nodes are its pods. StorePools does it in the server's process (store + lifecycle); ApiControlPlane
// (api-control.ts) over the REST API.
import type { Logger } from 'pino';
import type { Lifecycle } from '../../control/lifecycle.ts';
import type { Actor, Worker } from '../../core/types.ts';
import { allActors, allWorkers } from '../../store/all.ts';
import type { StateStore } from '../../store/store.ts';
import type { PoolControl } from './controller.ts';

/** Statuses in which an actor holds a worker (and so a pod cannot go without losing it). */
const HOLDING = new Set(['RESUMING', 'RUNNING', 'SUSPENDING', 'PAUSING', 'PAUSED']);

/** Workers on `nodes` whose lease is live. */
export async function countReady(workers: AsyncIterable<Worker>, nodes: string[]): Promise<number> {
  const on = new Set(nodes);
  const now = Date.now();
  let n = 0;
  for await (const w of workers) if (on.has(w.node) && Date.parse(w.leaseExpiresAt) > now) n++;
  return n;
}

/** Suspends the running and paused actors on `nodes`; resolves to how many still hold a worker there (those in a
 * transition end by themselves, or by the reconciler: the next pass looks again). */
export async function drainActors(
  actors: AsyncIterable<Actor>,
  nodes: string[],
  suspend: (a: Actor) => Promise<Actor | undefined>,
): Promise<number> {
  const on = new Set(nodes);
  let remaining = 0;
  for await (const actor of actors) {
    if (!actor.node || !on.has(actor.node) || !HOLDING.has(actor.status)) continue;
    if (actor.status === 'RUNNING' || actor.status === 'PAUSED') {
      if ((await suspend(actor))?.status === 'SUSPENDED') continue;
    }
    remaining++;
  }
  return remaining;
}

export class StorePools implements PoolControl {
  private readonly store: StateStore;
  private readonly lifecycle: Pick<Lifecycle, 'suspend'>;
  private readonly log: Logger;

  constructor(opts: { store: StateStore; lifecycle: Pick<Lifecycle, 'suspend'>; log: Logger }) {
    this.store = opts.store;
    this.lifecycle = opts.lifecycle;
    this.log = opts.log;
  }

  readyWorkers(nodes: string[]): Promise<number> {
    return countReady(allWorkers(this.store), nodes);
  }

  drain(nodes: string[]): Promise<number> {
    return drainActors(allActors(this.store), nodes, (a) =>
      this.lifecycle.suspend(a.space, a.name).catch((err: unknown) => {
        this.log.warn({ actor: `${a.space}/${a.name}`, err }, 'drain: suspend failed; will retry');
        return undefined;
      }),
    );
  }
}
