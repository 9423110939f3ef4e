// What the dashboard (and any other watcher) sees live: recent operations kept from the store's change feed,
// snapshot storage used, and a Server-Sent Events stream of actor, worker and operation changes.
import type { ServerResponse } from 'node:http';
import type { Actor, Operation, Worker } from '../core/types.ts';
import { allActors, allWorkers } from '../store/all.ts';
import type { StateStore } from '../store/store.ts';

/** A finished lifecycle operation of one actor, as the API reports it. */
export interface OperationRecord extends Operation {
  space: string;
  name: string;
  /** finishedAt − startedAt, in milliseconds. */
  durationMs: number;
}

export interface StorageUsage {
  /** Objects in the snapshot store (manifests, chunks, deltas). */
  objects: number;
  bytes: number;
}

/** Anything that can say how much it stores (FsBlobStore does; see src/blob/fs.ts). */
export interface StorageMeter {
  usage(): Promise<StorageUsage>;
}

const KEEP_OPERATIONS = 500;
const STORAGE_TTL_MS = 5000;

/** Keeps the last operations of every actor as they finish, from the store's change feed. An actor record
 * carries only its last operation, so history has to be collected as it happens. */
export class RecentOperations {
  readonly #items: OperationRecord[] = [];
  readonly #seen = new Set<string>();
  readonly #listeners = new Set<(op: OperationRecord) => void>();
  readonly #stop = new AbortController();

  constructor(store: StateStore) {
    const changes = store.watch(['actor'], this.#stop.signal);
    void (async () => {
      for await (const change of changes) {
        const actor = change.value as Actor | undefined;
        if (actor) this.#record(actor);
      }
    })();
  }

  #record(actor: Actor): void {
    const op = actor.lastOperation;
    if (!op?.finishedAt) return;
    const id = `${actor.space}/${actor.name}/${op.kind}/${op.startedAt}`;
    if (this.#seen.has(id)) return;
    this.#seen.add(id);
    const record: OperationRecord = {
      ...op,
      space: actor.space,
      name: actor.name,
      durationMs: Date.parse(op.finishedAt) - Date.parse(op.startedAt),
    };
    this.#items.push(record);
    if (this.#items.length > KEEP_OPERATIONS) {
      const dropped = this.#items.shift()!;
      this.#seen.delete(`${dropped.space}/${dropped.name}/${dropped.kind}/${dropped.startedAt}`);
    }
    for (const listener of this.#listeners) listener(record);
  }

  /** Oldest first, at most `limit` (the newest ones), optionally only one actor's. */
  list(limit = KEEP_OPERATIONS, actor?: { space: string; name: string }): OperationRecord[] {
    const items = actor ? this.#items.filter((op) => op.space === actor.space && op.name === actor.name) : this.#items;
    return items.slice(-limit);
  }

  subscribe(listener: (op: OperationRecord) => void): () => void {
    this.#listeners.add(listener);
    return () => this.#listeners.delete(listener);
  }

  close(): void {
    this.#stop.abort();
    this.#listeners.clear();
  }
}

/** Measures storage at most every few seconds, however many clients ask. */
export class CachedUsage {
  readonly #meter: StorageMeter;
  #last: { at: number; value: Promise<StorageUsage> } | undefined;

  constructor(meter: StorageMeter) {
    this.#meter = meter;
  }

  get(): Promise<StorageUsage> {
    if (!this.#last || Date.now() - this.#last.at > STORAGE_TTL_MS) {
      const value = this.#meter.usage();
      this.#last = { at: Date.now(), value };
      value.catch(() => {
        this.#last = undefined;
      });
    }
    return this.#last.value;
  }
}

export interface LiveSources {
  store: StateStore;
  operations: RecentOperations;
  storage: CachedUsage | undefined;
}

/** Streams `snapshot` (everything, once), then `actor`, `worker`, `operation` and `storage` events until the
 * client goes away. The watch starts before the snapshot is read, so no change falls between the two. */
export async function streamEvents(sources: LiveSources, res: ServerResponse, shutdown: AbortSignal): Promise<void> {
  const stop = new AbortController();
  res.on('close', () => stop.abort());
  // The server closing ends the stream (an open stream would otherwise hold the close up forever).
  shutdown.addEventListener('abort', () => stop.abort(), { once: true, signal: stop.signal });
  const changes = sources.store.watch(['actor', 'worker'], stop.signal);
  res.writeHead(200, {
    'content-type': 'text/event-stream; charset=utf-8',
    'cache-control': 'no-store',
    'x-accel-buffering': 'no',
  });
  const send = (event: string, data: unknown) => {
    if (!res.writableEnded) res.write(`event: ${event}\ndata: ${JSON.stringify(data)}\n\n`);
  };
  const unsubscribe = sources.operations.subscribe((op) => send('operation', op));
  let lastStorage = '';
  const sendStorage = async () => {
    const usage = await sources.storage?.get().catch(() => undefined);
    if (!usage || JSON.stringify(usage) === lastStorage) return;
    lastStorage = JSON.stringify(usage);
    send('storage', usage);
  };
  // Comments keep proxies from closing an idle stream; storage is re-measured on the same beat.
  const beat = setInterval(() => {
    res.write(': keep-alive\n\n');
    void sendStorage();
  }, 10_000);
  stop.signal.addEventListener('abort', () => {
    clearInterval(beat);
    unsubscribe();
  });
  try {
    const actors: Actor[] = [];
    for await (const a of allActors(sources.store)) actors.push(a);
    const workers: Worker[] = [];
    for await (const w of allWorkers(sources.store)) workers.push(w);
    send('snapshot', { actors, workers, operations: sources.operations.list(), storage: null });
    await sendStorage();
    for await (const change of changes) {
      if (change.kind === 'actor') send('actor', { key: change.key, actor: change.value ?? null });
      else send('worker', { key: change.key, worker: change.value ?? null });
      const actor = change.kind === 'actor' ? (change.value as Actor | undefined) : undefined;
      if (!actor || ['SUSPENDED', 'PAUSED'].includes(actor.status)) void sendStorage();
    }
  } finally {
    stop.abort();
    res.end();
  }
}
