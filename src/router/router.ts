// The router: maps Host to an actor, wakes it if needed (one resume per actor however many requests wait),
// proxies HTTP, SSE and WebSocket to the worker the store says it runs on, and records activity for the idle
// policy. It never forwards anywhere a client names.
import http, { type IncomingHttpHeaders, type IncomingMessage, type ServerResponse } from 'node:http';
import net from 'node:net';
import type { Duplex } from 'node:stream';
import { context, propagation } from '@opentelemetry/api';
import type { Logger } from 'pino';
import type { ActivityTracker } from '../control/activity.ts';
import type { IdlePolicy } from '../control/idle.ts';
import type { Lifecycle } from '../control/lifecycle.ts';
import type { Metrics } from '../control/metrics.ts';
import { asTorporError, ERROR_STATUS, isTorporError, TorporError } from '../core/errors.ts';
import { bearerToken, secretEquals } from '../core/secret.ts';
import { withSpan } from '../core/trace.ts';
import type { Actor, ActorRef } from '../core/types.ts';
import type { StateStore } from '../store/store.ts';
import { ACTOR_HEADER, actorOf, originFormPath } from './host.ts';

export interface RouterOptions {
  store: StateStore;
  lifecycle: Lifecycle;
  idle: IdlePolicy;
  activity: ActivityTracker;
  metrics: Metrics;
  log: Logger;
  /** Hosts are <actor>.<space>.actors.<domain>. */
  domain: string;
  /** Requests that may wait for a resume at once; more are refused with 503. */
  queueSize?: number;
  /** How long a request waits for its actor to be resumed before 503. */
  queueDeadlineMs?: number;
  /** Upstream response timeout (504). */
  timeoutMs?: number;
  /** Largest request body forwarded (413). */
  bodyLimit?: number;
  /** Spaces whose actors need `Authorization: Bearer <token>`: space → token. */
  ingressTokens?: Record<string, string>;
}

// RFC 9110 §7.6.1: never forwarded, plus whatever the Connection header lists.
const HOP_BY_HOP = new Set([
  'connection',
  'keep-alive',
  'proxy-authenticate',
  'proxy-authorization',
  'proxy-connection',
  'te',
  'trailer',
  'transfer-encoding',
  'upgrade',
]);

const keyOf = (ref: ActorRef) => `${ref.space}/${ref.name}`;

/** Headers for the upstream request: hop-by-hop ones removed, X-Forwarded-* set, and the ingress token (when the
 * space has one) kept from the actor. */
export function forwardHeaders(
  headers: IncomingHttpHeaders,
  clientIp: string,
  opts: { upgrade: boolean; dropAuthorization: boolean },
) {
  const keepUpgrade = opts.upgrade;
  const listed = new Set(
    String(headers.connection ?? '')
      .split(',')
      .map((h) => h.trim().toLowerCase())
      .filter(Boolean),
  );
  const out: Record<string, string | string[]> = {};
  for (const [name, value] of Object.entries(headers)) {
    if (value === undefined) continue;
    if ((HOP_BY_HOP.has(name) || listed.has(name)) && !(keepUpgrade && name === 'upgrade')) continue;
    if (name === 'authorization' && opts.dropAuthorization) continue;
    if (name === ACTOR_HEADER) continue;
    out[name] = value;
  }
  const prior = headers['x-forwarded-for'];
  out['x-forwarded-for'] = prior ? `${prior}, ${clientIp}` : clientIp;
  out['x-forwarded-proto'] = 'http';
  out['x-forwarded-host'] = headers.host ?? '';
  if (keepUpgrade) out.connection = 'Upgrade';
  return out;
}

export class Router {
  private readonly o: RouterOptions;
  private readonly cache = new Map<string, Actor>();
  private readonly activations = new Map<string, Promise<Actor>>();
  private readonly sockets = new Map<string, Set<Duplex>>();
  private readonly agent = new http.Agent({ keepAlive: true, maxSockets: 256 });
  private readonly watching = new AbortController();
  private waiting = 0;

  constructor(opts: RouterOptions) {
    this.o = opts;
    void this.follow();
  }

  /** Keeps the location cache fresh from store change notifications; closes connections of actors that stop. A
   * watch can end (a store may end one that fell too far behind, a connection may fail): then whatever the cache
   * holds may be stale, so it is dropped (it refills on demand) and the watch starts again. */
  private async follow(): Promise<void> {
    for (let retry = 0; !this.watching.signal.aborted; retry++) {
      try {
        for await (const change of this.o.store.watch(['actor'], this.watching.signal)) {
          retry = 0;
          const actor = change.value as Actor | undefined;
          if (actor) this.cache.set(change.key, actor);
          else this.cache.delete(change.key);
          if (actor?.status !== 'RUNNING') this.closeConnections(change.key);
        }
      } catch (err) {
        if (!this.watching.signal.aborted) this.o.log.warn({ err }, 'store watch failed');
      }
      if (this.watching.signal.aborted) return;
      this.cache.clear();
      await new Promise((r) => setTimeout(r, Math.min(5000, 100 * 2 ** retry)));
    }
  }

  close(): void {
    this.watching.abort();
    this.agent.destroy();
  }

  private async lookup(ref: ActorRef): Promise<Actor> {
    const key = keyOf(ref);
    const cached = this.cache.get(key);
    if (cached) return cached;
    const actor = await this.o.store.getActor(ref.space, ref.name);
    if (!actor) throw new TorporError('NOT_FOUND', `actor "${key}" not found`, { field: 'host' });
    // A change may have landed while we read; the cache keeps the newer version.
    const now = this.cache.get(key);
    if (!now || now.version < actor.version) this.cache.set(key, actor);
    return this.cache.get(key)!;
  }

  private authorize(ref: ActorRef, headers: IncomingHttpHeaders): void {
    const token = this.o.ingressTokens?.[ref.space];
    if (token === undefined) return;
    const auth = headers.authorization;
    if (!auth)
      throw new TorporError('UNAUTHENTICATED', `space "${ref.space}" needs an ingress token`, {
        field: 'authorization',
      });
    if (!secretEquals(bearerToken(auth) ?? '', token)) {
      throw new TorporError('PERMISSION_DENIED', `the ingress token is not valid for space "${ref.space}"`, {
        field: 'authorization',
      });
    }
  }

  /** The actor, running. Concurrent callers for one actor share one resume. */
  private async running(ref: ActorRef): Promise<Actor> {
    const actor = await this.lookup(ref);
    if (actor.status === 'RUNNING' && actor.address) return actor;
    const key = keyOf(ref);
    let activation = this.activations.get(key);
    if (!activation) {
      activation = this.activate(ref).finally(() => this.activations.delete(key));
      this.activations.set(key, activation);
    }
    const queueSize = this.o.queueSize ?? 1000;
    if (this.waiting >= queueSize) {
      throw new TorporError('NO_CAPACITY', `router queue is full (${queueSize} requests waiting)`, { field: 'queue' });
    }
    const t0 = performance.now();
    this.waiting++;
    try {
      return await activation;
    } finally {
      this.waiting--;
      this.o.metrics.routerQueueWait.observe((performance.now() - t0) / 1000);
    }
  }

  /** Resumes the actor; while no worker is free, asks the idle policy to make room, until the deadline. */
  private async activate(ref: ActorRef): Promise<Actor> {
    const deadline = Date.now() + (this.o.queueDeadlineMs ?? 30_000);
    this.o.metrics.routerResumes.inc();
    for (;;) {
      try {
        const actor = await this.o.lifecycle.resume(ref.space, ref.name);
        this.cache.set(keyOf(ref), actor);
        return actor;
      } catch (err) {
        if (!isTorporError(err, 'NO_CAPACITY') || Date.now() >= deadline) throw err;
        const actor = await this.lookup(ref);
        const template = await this.o.store.getTemplate(actor.template);
        const freed = template ? await this.o.idle.makeRoom(template.runtime, keyOf(ref)) : false;
        if (!freed) await new Promise((r) => setTimeout(r, Math.min(250, Math.max(0, deadline - Date.now()))));
      }
    }
  }

  private closeConnections(key: string): void {
    const open = this.sockets.get(key);
    if (!open) return;
    for (const s of open) s.end();
    this.sockets.delete(key);
  }

  private track(key: string, socket: Duplex): void {
    let set = this.sockets.get(key);
    if (!set) {
      set = new Set();
      this.sockets.set(key, set);
    }
    set.add(socket);
    socket.once('close', () => set.delete(socket));
  }

  // ------------------------------------------------------------------ HTTP

  readonly handle = (req: IncomingMessage, res: ServerResponse): void => this.serve(req, res);

  /** Proxies a request to an actor its caller resolved by other means than Host (the MCP gateway, by instance id),
   * with everything else as for Host-routed requests: resume on demand, activity, ingress token, limits. */
  readonly handleFor = (ref: ActorRef, req: IncomingMessage, res: ServerResponse): void => this.serve(req, res, ref);

  private serve(req: IncomingMessage, res: ServerResponse, ref?: ActorRef): void {
    const t0 = performance.now();
    // A client's traceparent is continued; the resume this request may trigger becomes part of its trace.
    const traced = () =>
      withSpan('router.request', { 'http.request.method': req.method ?? '' }, () => this.route(req, res, ref));
    context.with(propagation.extract(context.active(), req.headers), traced).then(
      (outcome) => this.o.metrics.routerRequests.observe({ outcome }, (performance.now() - t0) / 1000),
      (err: unknown) => {
        const e = asTorporError(err);
        this.o.metrics.routerRequests.observe({ outcome: e.code }, (performance.now() - t0) / 1000);
        sendError(res, e);
      },
    );
  }

  private async route(req: IncomingMessage, res: ServerResponse, given?: ActorRef): Promise<string> {
    const path = originFormPath(req.url);
    const ref = given ?? actorOf(req.headers, this.o.domain);
    this.authorize(ref, req.headers);
    const limit = this.o.bodyLimit ?? 64 * 1024 * 1024;
    if (Number(req.headers['content-length'] ?? 0) > limit) {
      throw new TorporError('PAYLOAD_TOO_LARGE', `request body is larger than ${limit} bytes`, { field: '(body)' });
    }
    const actor = await this.runningOrBadGateway(ref);
    const key = keyOf(ref);
    this.o.activity.opened(key);
    this.o.metrics.routerConnections.inc();
    try {
      return await this.forwardResending(req, res, ref, actor, path, limit);
    } finally {
      this.o.activity.closed(key);
      this.o.metrics.routerConnections.dec();
    }
  }

  /** Resume failures that are not about capacity or existence are the runtime's: 502 with the reason. */
  private async runningOrBadGateway(ref: ActorRef): Promise<Actor> {
    try {
      return await this.running(ref);
    } catch (err) {
      const e = asTorporError(err);
      if (['NOT_FOUND', 'NO_CAPACITY', 'UNAUTHENTICATED', 'PERMISSION_DENIED'].includes(e.code)) throw e;
      throw new TorporError('RUNTIME_ERROR', `could not resume actor "${keyOf(ref)}": ${e.message}`, { cause: err });
    }
  }

  /** The actor can go away under a request (a suspend racing it). A safe method without a body is then sent
   * again, after the actor is looked up afresh and resumed — a few times, within the queue deadline. */
  private async forwardResending(
    req: IncomingMessage,
    res: ServerResponse,
    ref: ActorRef,
    first: Actor,
    path: string,
    limit: number,
  ): Promise<string> {
    const resendable = bodiless(req) && SAFE_METHODS.has(req.method ?? '');
    const deadline = Date.now() + (this.o.queueDeadlineMs ?? 30_000);
    let actor = first;
    for (let attempt = 1; ; attempt++) {
      try {
        return await this.forward(req, res, actor, path, limit);
      } catch (err) {
        if (!(err instanceof UpstreamUnavailable) || !resendable || attempt >= 5 || Date.now() > deadline) throw err;
        this.cache.delete(keyOf(ref));
        actor = await this.runningOrBadGateway(ref);
      }
    }
  }

  private forward(
    req: IncomingMessage,
    res: ServerResponse,
    actor: Actor,
    path: string,
    limit: number,
  ): Promise<string> {
    const [host, port] = splitAddress(actor.address!);
    return new Promise((resolve, reject) => {
      const upstream = http.request({
        host,
        port,
        method: req.method,
        path,
        headers: forwardHeaders(req.headers, req.socket.remoteAddress ?? '', {
          upgrade: false,
          dropAuthorization: this.o.ingressTokens?.[actor.space] !== undefined,
        }),
        agent: this.agent,
      });
      // Bounds the wait for the response head; a streaming body (SSE) may then last as long as it likes.
      const timeoutMs = this.o.timeoutMs ?? 60_000;
      const timer = setTimeout(() => {
        upstream.destroy();
        reject(
          new TorporError('TIMEOUT', `actor "${actor.space}/${actor.name}" did not answer within ${timeoutMs} ms`),
        );
      }, timeoutMs);
      // A client that goes away before the answer must not leave the upstream request running.
      res.on('close', () => {
        if (!res.headersSent) {
          clearTimeout(timer);
          upstream.destroy();
          resolve('client-closed');
        }
      });
      let sent = 0;
      req.on('data', (chunk: Buffer) => {
        sent += chunk.length;
        if (sent > limit) {
          upstream.destroy();
          reject(
            new TorporError('PAYLOAD_TOO_LARGE', `request body is larger than ${limit} bytes`, { field: '(body)' }),
          );
        }
      });
      upstream.on('error', (err) => {
        clearTimeout(timer);
        if (res.headersSent) res.destroy(err);
        else reject(new UpstreamUnavailable(`actor "${actor.space}/${actor.name}": ${err.message}`));
      });
      upstream.on('response', (up) => {
        clearTimeout(timer);
        const headers = forwardResponseHeaders(up.headers);
        res.writeHead(up.statusCode ?? 502, up.statusMessage, headers);
        // Flush the head at once: Server-Sent Events must not wait for a first body chunk.
        res.flushHeaders();
        up.pipe(res);
        up.on('error', (err) => res.destroy(err));
        res.on('close', () => {
          if (!res.writableFinished) up.destroy();
          resolve(String(up.statusCode ?? 502));
        });
      });
      // A bodiless request is ended here rather than piped, so that a retry can send it again.
      if (bodiless(req)) upstream.end();
      else req.pipe(upstream);
    });
  }

  // ------------------------------------------------------------------ WebSocket and other upgrades

  readonly upgrade = (req: IncomingMessage, socket: Duplex, head: Buffer): void => {
    this.tunnel(req, socket, head).catch((err: unknown) => {
      const e = asTorporError(err);
      const body = JSON.stringify({ error: e.toJSON() });
      socket.end(
        `HTTP/1.1 ${e.status} ${http.STATUS_CODES[e.status] ?? ''}\r\ncontent-type: application/json\r\n` +
          `x-torpor-error: ${e.code}\r\n` +
          `content-length: ${Buffer.byteLength(body)}\r\nconnection: close\r\n\r\n${body}`,
      );
    });
  };

  private async tunnel(req: IncomingMessage, client: Duplex, head: Buffer): Promise<void> {
    const path = originFormPath(req.url);
    const ref = actorOf(req.headers, this.o.domain);
    this.authorize(ref, req.headers);
    const actor = await this.runningOrBadGateway(ref);
    const [host, port] = splitAddress(actor.address!);
    const key = keyOf(ref);
    const upstream = net.connect(port, host);
    await new Promise<void>((resolve, reject) => {
      upstream.once('connect', resolve);
      upstream.once('error', (err) => reject(new TorporError('RUNTIME_ERROR', `actor "${key}": ${err.message}`)));
    });
    const headers = forwardHeaders(req.headers, req.socket.remoteAddress ?? '', {
      upgrade: true,
      dropAuthorization: this.o.ingressTokens?.[ref.space] !== undefined,
    });
    const lines = Object.entries(headers).flatMap(([k, v]) => (Array.isArray(v) ? v : [v]).map((x) => `${k}: ${x}`));
    upstream.write(`${req.method} ${path} HTTP/1.1\r\n${lines.join('\r\n')}\r\n\r\n`);
    if (head.length > 0) upstream.write(head);
    this.o.activity.opened(key);
    this.o.metrics.routerConnections.inc();
    this.track(key, client);
    this.track(key, upstream);
    let closed = false;
    const done = () => {
      if (closed) return;
      closed = true;
      this.o.activity.closed(key);
      this.o.metrics.routerConnections.dec();
      client.destroy();
      upstream.destroy();
    };
    client.on('close', done);
    upstream.on('close', done);
    client.on('error', done);
    upstream.on('error', done);
    upstream.pipe(client);
    client.pipe(upstream);
  }
}

const SAFE_METHODS = new Set(['GET', 'HEAD', 'OPTIONS']);

/** The upstream connection failed before any answer (refused or reset). */
class UpstreamUnavailable extends TorporError {
  constructor(message: string) {
    super('RUNTIME_ERROR', message);
  }
}

function bodiless(req: IncomingMessage): boolean {
  const length = req.headers['content-length'];
  return req.headers['transfer-encoding'] === undefined && (length === undefined || length === '0');
}

function forwardResponseHeaders(headers: IncomingHttpHeaders): Record<string, string | string[]> {
  const listed = new Set(
    String(headers.connection ?? '')
      .split(',')
      .map((h) => h.trim().toLowerCase()),
  );
  const out: Record<string, string | string[]> = {};
  for (const [name, value] of Object.entries(headers)) {
    if (value !== undefined && !HOP_BY_HOP.has(name) && !listed.has(name)) out[name] = value;
  }
  return out;
}

function splitAddress(address: string): [string, number] {
  const i = address.lastIndexOf(':');
  return [address.slice(0, i), Number(address.slice(i + 1))];
}

function sendError(res: ServerResponse, e: TorporError): void {
  if (res.headersSent) {
    res.destroy();
    return;
  }
  // Marks the router's own answers, so a client can tell them from the actor's (which may also be a 404 or 503).
  const headers: Record<string, string> = { 'content-type': 'application/json', 'x-torpor-error': e.code };
  if (e.code === 'NO_CAPACITY') headers['retry-after'] = '5';
  res.writeHead(ERROR_STATUS[e.code], headers);
  res.end(JSON.stringify({ error: e.toJSON() }));
}
