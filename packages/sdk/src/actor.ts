// Actor: a handle on one actor, with the lifecycle calls, exec, logs and fetch through the router.
import { type ErrorCode, TorporApiError } from './errors.ts';
import { type Config, json, lines, resolveConfig, send, type TorporOptions, textChunks } from './http.ts';
import type { components } from './openapi.ts';

export type ActorInfo = components['schemas']['Actor'];
export type ActorStatus = components['schemas']['ActorStatus'];
export type ExecResult = components['schemas']['ExecResult'];
type ExecEvent = components['schemas']['ExecEvent'];

export interface CreateActorOptions extends TorporOptions {
  template: string;
  /** A DNS-1123 label; default: the template's name and a random suffix. */
  name?: string;
  labels?: Record<string, string>;
}

export interface ExecOptions {
  /** Called with output as the command writes it. */
  onStdout?: (text: string) => void;
  onStderr?: (text: string) => void;
  timeoutSeconds?: number;
  signal?: AbortSignal;
}

export interface LogsOptions {
  /** Keep streaming what the actor writes next, until `signal` aborts or the loop stops. */
  follow?: boolean;
  signal?: AbortSignal;
}

const actorPath = (space: string, name: string, action?: string) =>
  `/v1/spaces/${encodeURIComponent(space)}/actors/${encodeURIComponent(name)}${action ? `/${action}` : ''}`;

function randomSuffix(): string {
  return Math.random().toString(36).slice(2, 8).padEnd(6, '0');
}

export class Actor {
  readonly #config: Config;
  #info: ActorInfo;

  private constructor(config: Config, info: ActorInfo) {
    this.#config = config;
    this.#info = info;
  }

  /** Creates an actor (SUSPENDED: its first resume restores the template's golden snapshot). Not retried: a
   * lost answer would otherwise turn into ALREADY_EXISTS. */
  static async create(opts: CreateActorOptions): Promise<Actor> {
    const config = resolveConfig(opts);
    const body = {
      name: opts.name ?? `${opts.template}-${randomSuffix()}`,
      template: opts.template,
      labels: opts.labels ?? {},
    };
    const info = await json<ActorInfo>(config, 'POST', `/v1/spaces/${encodeURIComponent(config.space)}/actors`, {
      body,
      idempotent: false,
    });
    return new Actor(config, info);
  }

  /** A handle on an existing actor (NOT_FOUND when there is none). */
  static async connect(name: string, opts: TorporOptions = {}): Promise<Actor> {
    const config = resolveConfig(opts);
    return new Actor(config, await json<ActorInfo>(config, 'GET', actorPath(config.space, name), { idempotent: true }));
  }

  /** Every actor of the space (`opts.space`, default "default"), or of every space with `allSpaces`. */
  static async list(opts: TorporOptions & { allSpaces?: boolean } = {}): Promise<Actor[]> {
    const config = resolveConfig(opts);
    const base = opts.allSpaces ? '/v1/actors' : `/v1/spaces/${encodeURIComponent(config.space)}/actors`;
    const out: Actor[] = [];
    let cursor: string | undefined;
    do {
      const query = new URLSearchParams({ limit: '1000', ...(cursor ? { cursor } : {}) });
      const page = await json<components['schemas']['ActorList']>(config, 'GET', `${base}?${query}`, {
        idempotent: true,
      });
      out.push(...page.items.map((info) => new Actor(config, info)));
      cursor = page.nextCursor;
    } while (cursor);
    return out;
  }

  get name(): string {
    return this.#info.name;
  }
  get space(): string {
    return this.#info.space;
  }
  get status(): ActorStatus {
    return this.#info.status;
  }
  /** The actor's record as last seen (updated by every call on this handle). */
  get info(): ActorInfo {
    return this.#info;
  }
  /** The actor's address through the router: http(s)://<actor>.<space>.actors.<domain>[:port]. */
  get url(): string {
    const url = new URL(this.#config.routerUrl);
    url.hostname = `${this.name}.${this.space}.actors.${this.#config.routerDomain}`;
    return url.origin;
  }

  async #action(action: 'resume' | 'suspend' | 'pause', body: object = {}): Promise<this> {
    // Idempotent: each names the state to reach, and asking again in that state changes nothing.
    this.#info = await json<ActorInfo>(this.#config, 'POST', actorPath(this.space, this.name, action), {
      body,
      idempotent: true,
    });
    return this;
  }

  /** Restores the actor on a free worker (optionally exactly `worker`); resolves when it is RUNNING. */
  resume(opts: { worker?: string } = {}): Promise<this> {
    return this.#action('resume', opts.worker ? { worker: opts.worker } : {});
  }

  /** Checkpoints the actor to durable storage and frees its worker. */
  suspend(): Promise<this> {
    return this.#action('suspend');
  }

  /** Checkpoints the actor and keeps the checkpoint on its node (a resume there restores it first). */
  pause(): Promise<this> {
    return this.#action('pause');
  }

  /** Re-reads the actor's record. */
  async refresh(): Promise<this> {
    this.#info = await json<ActorInfo>(this.#config, 'GET', actorPath(this.space, this.name), { idempotent: true });
    return this;
  }

  /** A new actor, SUSPENDED, from this actor's latest snapshot. */
  async fork(opts: { name?: string; labels?: Record<string, string> } = {}): Promise<Actor> {
    const body = { name: opts.name ?? `${this.name}-${randomSuffix()}`, labels: opts.labels ?? {} };
    const info = await json<ActorInfo>(this.#config, 'POST', actorPath(this.space, this.name, 'fork'), {
      body,
      idempotent: false,
    });
    return new Actor(this.#config, info);
  }

  /** Deletes the actor (it must not be running). */
  async delete(): Promise<void> {
    await send(this.#config, 'DELETE', actorPath(this.space, this.name), { idempotent: false });
  }

  /** Runs `command` in the running actor and resolves with its exit code and output; `onStdout`/`onStderr` see
   * the output as it is written. Not retried (a command may not be safe to run twice). */
  async exec(command: string[], opts: ExecOptions = {}): Promise<ExecResult> {
    const res = await send(this.#config, 'POST', actorPath(this.space, this.name, 'exec'), {
      body: { command, ...(opts.timeoutSeconds !== undefined ? { timeoutSeconds: opts.timeoutSeconds } : {}) },
      idempotent: false,
      headers: { accept: 'application/x-ndjson' },
      ...(opts.signal ? { signal: opts.signal } : {}),
    });
    const result: ExecResult = { exitCode: -1, stdout: '', stderr: '' };
    if (!res.body) throw new TorporApiError('INTERNAL', 'exec: the response has no body', res.status);
    for await (const line of lines(res.body)) {
      if (!line.trim()) continue;
      const event = JSON.parse(line) as ExecEvent;
      if (event.stdout !== undefined) {
        result.stdout += event.stdout;
        opts.onStdout?.(event.stdout);
      }
      if (event.stderr !== undefined) {
        result.stderr += event.stderr;
        opts.onStderr?.(event.stderr);
      }
      if (event.error) throw new TorporApiError(event.error.code, event.error.message, res.status, event.error.field);
      if (event.exitCode !== undefined) result.exitCode = event.exitCode;
    }
    return result;
  }

  /** The actor's stdout/stderr, as text chunks. With `follow`, keeps going until `signal` aborts or the loop
   * stops. */
  async *logs(opts: LogsOptions = {}): AsyncGenerator<string> {
    const query = opts.follow ? '?follow=true' : '';
    const res = await send(this.#config, 'GET', `${actorPath(this.space, this.name, 'logs')}${query}`, {
      idempotent: true,
      headers: { accept: 'text/plain' },
      ...(opts.signal ? { signal: opts.signal } : {}),
    });
    if (!res.body) return;
    try {
      yield* textChunks(res.body);
    } catch (err) {
      if (!opts.signal?.aborted) throw err;
    }
  }

  /** Sends a request to the actor through the router (which resumes it if it is suspended), like the platform's
   * fetch: `path` is relative to the actor, e.g. "/" or "/api?x=1". The actor is named by the X-Torpor-Actor
   * header, so no DNS is needed for the router's domain. The actor's own responses come back as they are (a 404
   * from the actor is a Response); the router's own failures (no such actor, no capacity, resume failed, upstream
   * timeout) throw TorporApiError with the router's code. Not retried: only the caller knows whether its request
   * is safe to send twice. Throws UNREACHABLE when the router cannot be reached. */
  async fetch(path: string, init: RequestInit = {}): Promise<Response> {
    if (!path.startsWith('/')) throw new TorporApiError('INVALID_ARGUMENT', 'path: must start with "/"', 400, 'path');
    const headers = new Headers(init.headers);
    headers.set('x-torpor-actor', `${this.name}.${this.space}`);
    if (this.#config.ingressToken && !headers.has('authorization')) {
      headers.set('authorization', `Bearer ${this.#config.ingressToken}`);
    }
    const router = new URL(this.#config.routerUrl).origin;
    let res: Response;
    try {
      res = await fetch(router + path, { ...init, headers });
    } catch (err) {
      if (init.signal?.aborted) throw err;
      const message = `cannot reach the router at ${router}: ${(err as Error).message}`;
      throw new TorporApiError('UNREACHABLE', message, 0, 'routerUrl', err);
    }
    const routerError = res.headers.get('x-torpor-error');
    if (routerError) {
      const body = (await res.json().catch(() => ({}))) as { error?: { message?: string; field?: string } };
      const message = body.error?.message ?? `router answered ${res.status}`;
      throw new TorporApiError(routerError as ErrorCode, message, res.status, body.error?.field);
    }
    return res;
  }
}
