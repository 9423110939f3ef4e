// Calls between Torpor's own processes (server → agent API, agent → server, router → server): JSON in and out,
// an optional bearer token, the active trace (traceparent), a deadline on every call, and errors turned back into
// the TorporErrors the other side raised. A call that got no answer at all (refused, reset, timed out) throws
// Unreachable, so a caller can tell "the other side said no" from "the other side is gone".
import type { Readable } from 'node:stream';
import { request } from 'undici';
import { ERROR_STATUS, type ErrorCode, TorporError } from '../core/errors.ts';
import { traceHeaders } from '../core/trace.ts';

export class Unreachable extends TorporError {
  constructor(message: string, cause: unknown) {
    super('RUNTIME_ERROR', message, { cause });
    this.name = 'Unreachable';
  }
}

export interface CallOptions {
  token?: string;
  /** Deadline for the answer's head (default 30 s). */
  timeoutMs?: number;
  /** Longest silence while the body streams (default: timeoutMs; 0 = none, for followed logs). */
  bodyTimeoutMs?: number;
  headers?: Record<string, string>;
  signal?: AbortSignal;
}

type Method = 'GET' | 'POST' | 'PUT' | 'DELETE';

/** What to call the other side in error messages (never the token, never a query string). */
function describe(base: string): string {
  try {
    return new URL(base).host;
  } catch {
    return 'the server';
  }
}

async function send(base: string, method: Method, path: string, body: unknown, opts: CallOptions) {
  // The caller's trace goes along: the other process's spans continue it.
  const headers: Record<string, string> = { ...traceHeaders(), ...opts.headers };
  if (opts.token !== undefined) headers.authorization = `Bearer ${opts.token}`;
  if (body !== undefined) headers['content-type'] = 'application/json';
  const timeout = opts.timeoutMs ?? 30_000;
  try {
    return await request(base.replace(/\/+$/, '') + path, {
      method,
      headers,
      ...(body !== undefined ? { body: JSON.stringify(body) } : {}),
      headersTimeout: timeout,
      bodyTimeout: opts.bodyTimeoutMs ?? timeout,
      ...(opts.signal ? { signal: opts.signal } : {}),
    });
  } catch (err) {
    throw new Unreachable(`${describe(base)} did not answer ${method} ${path}: ${(err as Error).message}`, err);
  }
}

/** The error the other side answered with, as the TorporError it raised. */
function answeredError(status: number, text: string): TorporError {
  let e: { code?: string; message?: string; field?: string } | undefined;
  try {
    e = (JSON.parse(text) as { error?: typeof e }).error;
  } catch {
    e = undefined;
  }
  const code = e?.code && e.code in ERROR_STATUS ? (e.code as ErrorCode) : status >= 500 ? 'RUNTIME_ERROR' : 'INTERNAL';
  return new TorporError(code, e?.message ?? `HTTP ${status}`, e?.field ? { field: e.field } : {});
}

export async function callJson<T>(
  base: string,
  method: Method,
  path: string,
  body?: unknown,
  opts: CallOptions = {},
): Promise<T> {
  const res = await send(base, method, path, body, opts);
  let text: string;
  try {
    text = await res.body.text();
  } catch (err) {
    throw new Unreachable(`${describe(base)} went away answering ${method} ${path}: ${(err as Error).message}`, err);
  }
  if (res.statusCode >= 400) throw answeredError(res.statusCode, text);
  return (text ? JSON.parse(text) : undefined) as T;
}

/** A streamed answer (logs, exec output): its body once the head says it succeeded. */
export async function callStream(
  base: string,
  method: Method,
  path: string,
  body?: unknown,
  opts: CallOptions = {},
): Promise<Readable> {
  const res = await send(base, method, path, body, opts);
  if (res.statusCode >= 400) throw answeredError(res.statusCode, await res.body.text().catch(() => ''));
  return res.body;
}
