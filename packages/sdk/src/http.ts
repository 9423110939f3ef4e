// The HTTP layer: configuration (options, then environment), JSON requests, typed errors, and retries with
// backoff on transient failures only. Uses nothing but the platform's fetch, URL, ReadableStream, TextDecoder.
import { type ErrorCode, TorporApiError } from './errors.ts';
import type { components } from './openapi.ts';

export interface TorporOptions {
  /** The Torpor API, e.g. http://127.0.0.1:7070. Default: $TORPOR_API_URL, else http://127.0.0.1:7070. */
  apiUrl?: string;
  /** The router, e.g. http://127.0.0.1:7080. Default: $TORPOR_ROUTER_URL, else the API's host on port 7080. */
  routerUrl?: string;
  /** Actors are reached at <actor>.<space>.actors.<routerDomain>. Default: $TORPOR_ROUTER_DOMAIN, else
   * torpor.localhost (which browsers and curl resolve to loopback). */
  routerDomain?: string;
  /** Sent as `Authorization: Bearer <token>` to the API (never to actors). Default: $TORPOR_TOKEN. */
  token?: string;
  /** Sent as `Authorization: Bearer <ingressToken>` by `actor.fetch`, for spaces the router keeps private. */
  ingressToken?: string;
  /** The space actors live in. Default: $TORPOR_SPACE, else "default". */
  space?: string;
  /** Retries of a transient failure (network error, 502/503/504 not from Torpor's runtime, 429 with
   * Retry-After) for idempotent calls. Default 3. */
  retries?: number;
}

export interface Config {
  apiUrl: string;
  routerUrl: string;
  routerDomain: string;
  token: string | undefined;
  ingressToken: string | undefined;
  space: string;
  retries: number;
}

type Env = Record<string, string | undefined>;
const env = (): Env => (globalThis as { process?: { env?: Env } }).process?.env ?? {};

export function resolveConfig(opts: TorporOptions = {}): Config {
  const e = env();
  const apiUrl = trimSlash(opts.apiUrl ?? e.TORPOR_API_URL ?? 'http://127.0.0.1:7070');
  let routerUrl = opts.routerUrl ?? e.TORPOR_ROUTER_URL;
  if (!routerUrl) {
    const derived = new URL(apiUrl);
    derived.port = '7080';
    routerUrl = derived.origin;
  }
  return {
    apiUrl,
    routerUrl: trimSlash(routerUrl),
    routerDomain: opts.routerDomain ?? e.TORPOR_ROUTER_DOMAIN ?? 'torpor.localhost',
    token: opts.token ?? e.TORPOR_TOKEN,
    ingressToken: opts.ingressToken,
    space: opts.space ?? e.TORPOR_SPACE ?? 'default',
    retries: opts.retries ?? 3,
  };
}

const trimSlash = (url: string) => url.replace(/\/+$/, '');

export interface RequestOptions {
  body?: unknown;
  /** Safe to send again after a transient failure (the server ends in the same state). */
  idempotent: boolean;
  headers?: Record<string, string>;
  signal?: AbortSignal;
}

const BACKOFF_BASE_MS = 200;
const BACKOFF_MAX_MS = 5000;
const RETRY_AFTER_MAX_MS = 30_000;

/** Sends a request to the API; returns the response once it is a success, throws TorporApiError otherwise. */
export async function send(config: Config, method: string, path: string, opts: RequestOptions): Promise<Response> {
  const headers: Record<string, string> = { accept: 'application/json', ...opts.headers };
  if (opts.body !== undefined) headers['content-type'] = 'application/json';
  if (config.token) headers.authorization = `Bearer ${config.token}`;
  const attempts = opts.idempotent ? config.retries + 1 : 1;
  for (let attempt = 1; ; attempt++) {
    let res: Response;
    try {
      res = await fetch(config.apiUrl + path, {
        method,
        headers,
        ...(opts.body !== undefined ? { body: JSON.stringify(opts.body) } : {}),
        ...(opts.signal ? { signal: opts.signal } : {}),
      });
    } catch (err) {
      if (opts.signal?.aborted) throw err;
      if (attempt < attempts) {
        await sleep(backoff(attempt));
        continue;
      }
      const message = `cannot reach the Torpor API at ${config.apiUrl}: ${(err as Error).message}`;
      throw new TorporApiError('UNREACHABLE', message, 0, 'apiUrl', err);
    }
    if (res.ok) return res;
    const { error, fromTorpor } = await parseError(res);
    const wait = retryDelay(res, fromTorpor, attempt);
    if (wait === undefined || attempt >= attempts) throw error;
    await sleep(wait);
  }
}

export async function json<T>(config: Config, method: string, path: string, opts: RequestOptions): Promise<T> {
  const res = await send(config, method, path, opts);
  const text = await res.text();
  return (text ? JSON.parse(text) : undefined) as T;
}

/** The error a failed response carries: the server's `{error: {code, message, field}}`, or one made from the
 * status when the body is not Torpor's (e.g. from a proxy in front of it). */
export async function errorOf(res: Response): Promise<TorporApiError> {
  return (await parseError(res)).error;
}

async function parseError(res: Response): Promise<{ error: TorporApiError; fromTorpor: boolean }> {
  const text = await res.text().catch(() => '');
  let body: components['schemas']['Error'] | undefined;
  try {
    body = JSON.parse(text) as components['schemas']['Error'];
  } catch {
    body = undefined;
  }
  const e = body?.error;
  if (e?.code) return { error: new TorporApiError(e.code, e.message, res.status, e.field), fromTorpor: true };
  const message = `HTTP ${res.status}: ${text.slice(0, 200)}`;
  return { error: new TorporApiError(codeForStatus(res.status), message, res.status), fromTorpor: false };
}

function codeForStatus(status: number): ErrorCode {
  const codes: Record<number, ErrorCode> = {
    400: 'INVALID_ARGUMENT',
    401: 'UNAUTHENTICATED',
    403: 'PERMISSION_DENIED',
    404: 'NOT_FOUND',
    409: 'CONFLICT',
    413: 'PAYLOAD_TOO_LARGE',
    501: 'NOT_SUPPORTED',
    502: 'RUNTIME_ERROR',
    503: 'NO_CAPACITY',
    504: 'TIMEOUT',
  };
  return codes[status] ?? 'INTERNAL';
}

/** How long to wait before trying again, or undefined when the failure is not transient. A 502 that Torpor
 * itself reports (RUNTIME_ERROR) is the runtime's verdict on this operation, not a passing glitch: trying again
 * could hide it (a suspend whose sandbox died would "succeed" on the second try), so it is not retried. */
function retryDelay(res: Response, fromTorpor: boolean, attempt: number): number | undefined {
  const retryAfter = parseRetryAfter(res.headers.get('retry-after'));
  if (res.status === 429) return retryAfter;
  if (res.status === 502 && fromTorpor) return undefined;
  if (res.status === 502 || res.status === 503 || res.status === 504) return retryAfter ?? backoff(attempt);
  return undefined;
}

function parseRetryAfter(value: string | null): number | undefined {
  if (!value) return undefined;
  const seconds = Number(value);
  const ms = Number.isFinite(seconds) ? seconds * 1000 : Date.parse(value) - Date.now();
  return Number.isFinite(ms) ? Math.min(Math.max(ms, 0), RETRY_AFTER_MAX_MS) : undefined;
}

/** Exponential backoff with full jitter. */
function backoff(attempt: number): number {
  return Math.random() * Math.min(BACKOFF_MAX_MS, BACKOFF_BASE_MS * 2 ** (attempt - 1));
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** Text chunks of a streamed response body, decoded as UTF-8 across chunk boundaries. Stopping the iteration
 * (break, return, throw) cancels the stream. */
export async function* textChunks(body: ReadableStream<Uint8Array>): AsyncGenerator<string> {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  try {
    for (;;) {
      const { done, value } = await reader.read();
      if (done) break;
      const text = decoder.decode(value, { stream: true });
      if (text) yield text;
    }
    const rest = decoder.decode();
    if (rest) yield rest;
  } finally {
    await reader.cancel().catch(() => {});
  }
}

/** Lines of a streamed text body (the last one may lack its newline). */
export async function* lines(body: ReadableStream<Uint8Array>): AsyncGenerator<string> {
  let buffered = '';
  for await (const text of textChunks(body)) {
    buffered += text;
    let nl = buffered.indexOf('\n');
    while (nl >= 0) {
      yield buffered.slice(0, nl);
      buffered = buffered.slice(nl + 1);
      nl = buffered.indexOf('\n');
    }
  }
  if (buffered) yield buffered;
}
