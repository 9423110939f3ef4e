// A `torpor router` in its own process resumes and suspends actors through a server's API instead of running a
// lifecycle itself (it holds no agent token and no blob credentials). Errors come back with the server's codes,
// so the router answers exactly as it does in `torpor up` (NO_CAPACITY 503, NOT_FOUND 404, …).
import type { ActorOperations } from '../control/lifecycle.ts';
import { TorporError } from '../core/errors.ts';
import type { Actor } from '../core/types.ts';
import { callJson } from '../sys/http.ts';

export class ServerOperations implements ActorOperations {
  private readonly server: string;
  private readonly timeoutMs: number;

  /** `timeoutMs` bounds one resume or suspend (default 5 min). */
  constructor(server: string, opts: { timeoutMs?: number } = {}) {
    this.server = server;
    this.timeoutMs = opts.timeoutMs ?? 300_000;
  }

  private path(space: string, name: string, action = ''): string {
    return `/v1/spaces/${encodeURIComponent(space)}/actors/${encodeURIComponent(name)}${action}`;
  }

  resume(space: string, name: string, input: { worker?: string } = {}): Promise<Actor> {
    return callJson(this.server, 'POST', this.path(space, name, '/resume'), input, { timeoutMs: this.timeoutMs });
  }

  /** `onlyIf` is checked against the actor as the server has it, just before asking for the suspend: across
   * processes there is no lock to hold between the two, so a request arriving in that window is cut by the
   * suspend — the router then resends it (safe methods) to the resumed actor, as it does for any racing suspend. */
  async suspend(space: string, name: string, opts: { onlyIf?: (actor: Actor) => boolean } = {}): Promise<Actor> {
    if (opts.onlyIf) {
      const actor = await callJson<Actor>(this.server, 'GET', this.path(space, name));
      if (!opts.onlyIf(actor)) {
        throw new TorporError('FAILED_PRECONDITION', 'actor is no longer idle', { field: 'status' });
      }
    }
    return callJson(this.server, 'POST', this.path(space, name, '/suspend'), {}, { timeoutMs: this.timeoutMs });
  }
}
