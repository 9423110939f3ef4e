// Bounded parallelism for chunk transfers. The producer (a file reader) awaits `submit`, which returns once a
// slot is free: that back-pressure is what keeps a multi-GB snapshot to `limit` chunks in memory.
// The first failure stops new work; `drain` waits for what is in flight, then reports that failure.

export class TaskPool {
  readonly #limit: number;
  readonly #running = new Set<Promise<void>>();
  #failure: { error: unknown } | undefined;

  constructor(limit: number) {
    if (!Number.isSafeInteger(limit) || limit < 1) throw new RangeError(`concurrency must be >= 1, got ${limit}`);
    this.#limit = limit;
  }

  /** Starts `task` as soon as a slot is free (without waiting for it to finish). Throws once any task failed. */
  async submit(task: () => Promise<void>): Promise<void> {
    while (this.#running.size >= this.#limit) await Promise.race(this.#running);
    this.#throwIfFailed();
    // Errors are captured here, never left as unhandled rejections; they surface through submit or drain.
    const running: Promise<void> = task()
      .catch((error: unknown) => {
        this.#failure ??= { error };
      })
      .finally(() => this.#running.delete(running));
    this.#running.add(running);
  }

  /** Waits for every started task to settle, without throwing. */
  async settle(): Promise<void> {
    while (this.#running.size > 0) await Promise.race(this.#running);
  }

  /** Waits for every started task, then throws the first failure if there was one. */
  async drain(): Promise<void> {
    await this.settle();
    this.#throwIfFailed();
  }

  /**
   * Runs `produce` (which submits tasks), then waits for all of them, throwing the first failure of either.
   * Even when `produce` fails, in-flight tasks finish first: no task outlives the call.
   */
  async run(produce: () => Promise<void>): Promise<void> {
    try {
      await produce();
    } finally {
      await this.settle();
    }
    this.#throwIfFailed();
  }

  #throwIfFailed(): void {
    if (this.#failure !== undefined) throw this.#failure.error;
  }
}
