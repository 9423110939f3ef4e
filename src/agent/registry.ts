// Where a node agent registers its workers and heartbeats their leases. In `torpor up` the agent writes the store
// itself (StoreRegistry); a `torpor agent` goes through the server's API (ServerRegistry in ./remote.ts), which
// writes the same records with a StoreRegistry of its own. The registry, not the agent, sets lease expiry, so
// one clock (the server's) decides whether a node is alive.
import type { Worker } from '../core/types.ts';
import type { StateStore } from '../store/store.ts';

/** A worker as its agent describes it: the registry adds the lease (and, for remote agents, their URL). */
export type WorkerInfo = Omit<Worker, 'leaseExpiresAt' | 'agent'>;

export interface WorkerRegistry {
  /** Inserts or replaces the workers exactly as given (state and actor included); returns the lease length the
   * registry expects heartbeats within. */
  register(workers: WorkerInfo[]): Promise<{ leaseMs: number }>;
  /** Extends the workers' leases without touching their claims; returns the ids the registry no longer knows
   * (removed after their lease expired): the agent must give up what runs there and register them again. */
  heartbeat(ids: string[]): Promise<{ unknown: string[] }>;
  unregister(ids: string[]): Promise<void>;
  /** Ends the workers' leases now (their sandbox died): the reconciler then settles their actors at once. */
  expire(ids: string[]): Promise<void>;
}

export const DEFAULT_LEASE_MS = 15_000;

export class StoreRegistry implements WorkerRegistry {
  private readonly store: StateStore;
  private readonly leaseMs: number;
  private readonly agentUrl: string | undefined;

  constructor(store: StateStore, opts: { leaseMs?: number; agentUrl?: string } = {}) {
    this.store = store;
    this.leaseMs = opts.leaseMs ?? DEFAULT_LEASE_MS;
    this.agentUrl = opts.agentUrl;
  }

  private expiry(): string {
    return new Date(Date.now() + this.leaseMs).toISOString();
  }

  async register(workers: WorkerInfo[]): Promise<{ leaseMs: number }> {
    for (const w of workers) {
      await this.store.putWorker({
        ...w,
        leaseExpiresAt: this.expiry(),
        ...(this.agentUrl ? { agent: this.agentUrl } : {}),
      });
    }
    return { leaseMs: this.leaseMs };
  }

  async heartbeat(ids: string[]): Promise<{ unknown: string[] }> {
    const unknown: string[] = [];
    for (const id of ids) if (!(await this.store.renewWorkerLease(id, this.expiry()))) unknown.push(id);
    return { unknown };
  }

  async unregister(ids: string[]): Promise<void> {
    for (const id of ids) await this.store.deleteWorker(id);
  }

  async expire(ids: string[]): Promise<void> {
    for (const id of ids) await this.store.renewWorkerLease(id, new Date(0).toISOString());
  }
}
