// Fan-out of store changes to watchers. Each subscriber has its own unbounded queue, so a slow consumer delays
// only itself and never loses an event; a subscriber that stops (abort, break, store closed) is detached at once.
import { EventEmitter } from 'node:events';
import type { Change, ChangeKind } from './store.ts';

export class ChangeFeed {
  readonly #emitter = new EventEmitter();

  constructor() {
    // Every router/scheduler cache is a listener; the default limit of 10 would only produce warnings.
    this.#emitter.setMaxListeners(0);
  }

  /** Whether anyone subscribes now (a feed fed from elsewhere can skip work when nobody does). */
  get watched(): boolean {
    return this.#emitter.listenerCount('change') > 0;
  }

  /** Delivers `change` to every current subscriber (call after the write is durable). */
  publish(change: Change): void {
    // One copy shared by subscribers, separate from the object the writer got back and may mutate.
    this.#emitter.emit('change', structuredClone(change));
  }

  /** Ends every subscription (the store is closing). */
  close(): void {
    this.#emitter.emit('close');
  }

  /** Subscribes now (not at first iteration), so no change made after this call is missed. */
  subscribe(kinds: readonly ChangeKind[], signal: AbortSignal): AsyncIterableIterator<Change> {
    const wanted = new Set(kinds);
    const queue: Change[] = [];
    let ended = signal.aborted;
    let wake: (() => void) | undefined;

    const onChange = (change: Change): void => {
      if (!wanted.has(change.kind)) return;
      queue.push(change);
      wake?.();
    };
    const detach = (): void => {
      this.#emitter.off('change', onChange);
      this.#emitter.off('close', end);
      signal.removeEventListener('abort', end);
    };
    const end = (): void => {
      ended = true;
      detach();
      wake?.();
    };

    if (!ended) {
      this.#emitter.on('change', onChange);
      this.#emitter.on('close', end);
      signal.addEventListener('abort', end, { once: true });
    }

    async function* drain(): AsyncGenerator<Change> {
      try {
        while (!ended) {
          const next = queue.shift();
          if (next) {
            yield next;
            continue;
          }
          await new Promise<void>((resolve) => {
            wake = resolve;
          });
          wake = undefined;
        }
      } finally {
        detach();
      }
    }
    return drain();
  }
}
