// Idle policy and capacity: suspends actors nobody has used for their template's idleTimeoutSeconds, and, when a
// resume finds no free worker, suspends the least recently used idle actor of the same runtime class.
import type { Logger } from 'pino';
import { isTorporError } from '../core/errors.ts';
import type { RuntimeClass } from '../core/schemas.ts';
import type { Actor, Template } from '../core/types.ts';
import { allActors } from '../store/all.ts';
import type { StateStore } from '../store/store.ts';
import type { ActivityTracker } from './activity.ts';
import type { ActorOperations } from './lifecycle.ts';

export interface IdlePolicyOptions {
  store: StateStore;
  /** Resumes and suspends: a lifecycle in this process, or a server's (ServerOperations). */
  lifecycle: ActorOperations;
  activity: ActivityTracker;
  log: Logger;
  intervalMs?: number;
}

const keyOf = (a: { space: string; name: string }) => `${a.space}/${a.name}`;

export class IdlePolicy {
  private readonly o: IdlePolicyOptions;
  private timer?: NodeJS.Timeout;
  private readonly inFlight = new Set<string>();

  constructor(opts: IdlePolicyOptions) {
    this.o = opts;
  }

  start(): void {
    this.timer = setInterval(() => void this.sweep(), this.o.intervalMs ?? 500);
    this.timer.unref();
  }

  stop(): void {
    clearInterval(this.timer);
  }

  /** Milliseconds the actor has been idle (no request, no open connection), from its activity or its resume. */
  idleMs(actor: Actor): number {
    const rec = this.o.activity.get(keyOf(actor));
    if (rec && rec.openConnections > 0) return 0;
    const last = Math.max(rec?.lastActivity ?? 0, Date.parse(actor.lastActivity) || 0);
    return Date.now() - last;
  }

  private async running(): Promise<Actor[]> {
    const out: Actor[] = [];
    for await (const actor of allActors(this.o.store)) if (actor.status === 'RUNNING') out.push(actor);
    return out;
  }

  private async templateOf(actor: Actor, cache: Map<string, Template | undefined>): Promise<Template | undefined> {
    if (!cache.has(actor.template)) cache.set(actor.template, await this.o.store.getTemplate(actor.template));
    return cache.get(actor.template);
  }

  /** Suspends every running actor past its template's idle timeout (0 = never). */
  async sweep(): Promise<void> {
    const templates = new Map<string, Template | undefined>();
    for (const actor of await this.running().catch(() => [])) {
      const t = await this.templateOf(actor, templates);
      if (!t || t.idleTimeoutSeconds === 0) continue;
      const timeoutMs = t.idleTimeoutSeconds * 1000;
      if (this.idleMs(actor) >= timeoutMs) void this.suspend(actor, 'idle', (a) => this.idleMs(a) >= timeoutMs);
    }
  }

  /** Frees one worker of `runtime` by suspending the least recently used idle actor that may be suspended.
   * Returns whether it suspended one. */
  async makeRoom(runtime: RuntimeClass, except: string): Promise<boolean> {
    const templates = new Map<string, Template | undefined>();
    const candidates: { actor: Actor; idle: number }[] = [];
    for (const actor of await this.running()) {
      if (keyOf(actor) === except || this.inFlight.has(keyOf(actor))) continue;
      const t = await this.templateOf(actor, templates);
      if (!t || t.runtime !== runtime || t.idleTimeoutSeconds === 0) continue;
      const idle = this.idleMs(actor);
      if (idle > 0) candidates.push({ actor, idle });
    }
    candidates.sort((a, b) => b.idle - a.idle);
    const victim = candidates[0];
    if (!victim) return false;
    return this.suspend(victim.actor, 'make room', (a) => this.idleMs(a) > 0);
  }

  private async suspend(actor: Actor, why: string, stillIdle: (a: Actor) => boolean): Promise<boolean> {
    const key = keyOf(actor);
    if (this.inFlight.has(key)) return false;
    this.inFlight.add(key);
    try {
      await this.o.lifecycle.suspend(actor.space, actor.name, { onlyIf: stillIdle });
      this.o.log.info({ actor: key, why }, 'suspended idle actor');
      return true;
    } catch (err) {
      if (!isTorporError(err, 'FAILED_PRECONDITION')) this.o.log.warn({ err, actor: key, why }, 'idle suspend failed');
      return false;
    } finally {
      this.inFlight.delete(key);
    }
  }
}
