// A small pool of worker threads for CPU-bound work the main thread should not do (compressing snapshot chunks
// while it reads and hashes the next ones). Workers start on first use and hold the process open only while they
// have work: an idle pool never keeps a process alive. A worker answers every request with
// `{ id, value }` or `{ id, error }`; a worker that crashes or exits fails the requests it held and is replaced
// by the next request.
import { type Transferable, Worker } from 'node:worker_threads';

interface Pending {
  resolve: (value: unknown) => void;
  reject: (error: unknown) => void;
}

interface Slot {
  worker: Worker;
  online: boolean;
  pending: Map<number, Pending>;
}

export interface WorkerReply {
  id: number;
  value?: unknown;
  error?: unknown;
}

export class WorkerPool {
  readonly #script: URL;
  readonly #size: number;
  readonly #slots: Slot[] = [];
  #nextId = 1;

  constructor(script: URL, size: number) {
    if (!Number.isSafeInteger(size) || size < 1) throw new RangeError(`pool size must be >= 1, got ${size}`);
    this.#script = script;
    this.#size = size;
  }

  get size(): number {
    return this.#size;
  }

  /** Whether a worker has started (before that, a request waits for a thread to boot: ~50 ms). */
  get online(): boolean {
    return this.#slots.some((slot) => slot.online);
  }

  /** Starts the workers now rather than at the first request. */
  start(): void {
    while (this.#slots.length < this.#size) this.#spawn();
  }

  /** Sends `message` (plus `id`) to the least busy worker; `transfer` moves buffers there instead of copying. */
  run<T>(message: Record<string, unknown>, transfer: Transferable[] = []): Promise<T> {
    this.start();
    const slot = this.#slots.reduce((a, b) => (b.pending.size < a.pending.size ? b : a));
    const id = this.#nextId++;
    return new Promise<T>((resolve, reject) => {
      slot.pending.set(id, { resolve: resolve as (value: unknown) => void, reject });
      if (slot.pending.size === 1) slot.worker.ref();
      slot.worker.postMessage({ ...message, id }, transfer);
    });
  }

  /** Stops every worker; their pending requests fail. */
  async close(): Promise<void> {
    const slots = this.#slots.splice(0);
    await Promise.all(slots.map((slot) => slot.worker.terminate()));
  }

  #spawn(): void {
    const worker = new Worker(this.#script);
    const slot: Slot = { worker, online: false, pending: new Map() };
    worker.unref();
    worker.on('online', () => {
      slot.online = true;
    });
    worker.on('message', (reply: WorkerReply) => {
      const pending = slot.pending.get(reply.id);
      if (!pending) return;
      slot.pending.delete(reply.id);
      if (slot.pending.size === 0) worker.unref();
      if ('error' in reply) pending.reject(reply.error);
      else pending.resolve(reply.value);
    });
    const fail = (error: unknown) => {
      const index = this.#slots.indexOf(slot);
      if (index >= 0) this.#slots.splice(index, 1);
      for (const pending of slot.pending.values()) pending.reject(error);
      slot.pending.clear();
    };
    worker.on('error', fail);
    worker.on('exit', (code) => fail(new Error(`worker thread exited (code ${code})`)));
    this.#slots.push(slot);
  }
}
