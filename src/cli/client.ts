// The CLI's HTTP client. Errors from the server come back as TorporErrors with the server's code.
import { request } from 'undici';
import { type ErrorCode, TorporError } from '../core/errors.ts';

export class ApiClient {
  readonly server: string;

  constructor(server: string) {
    this.server = server.replace(/\/+$/, '');
  }

  async call<T>(method: 'GET' | 'POST' | 'DELETE', path: string, body?: unknown): Promise<T> {
    let res: Awaited<ReturnType<typeof request>>;
    try {
      res = await request(this.server + path, {
        method,
        headers: body === undefined ? {} : { 'content-type': 'application/json' },
        body: body === undefined ? undefined : JSON.stringify(body),
        headersTimeout: 600_000,
        bodyTimeout: 600_000,
      });
    } catch (err) {
      throw new TorporError(
        'RUNTIME_ERROR',
        `cannot reach the Torpor server at ${this.server}: ${(err as Error).message}`,
        {
          field: 'server',
        },
      );
    }
    const text = await res.body.text();
    if (res.statusCode >= 400) {
      const parsed = safeJson(text) as { error?: { code?: ErrorCode; message?: string; field?: string } } | undefined;
      const e = parsed?.error;
      throw new TorporError(
        e?.code ?? 'INTERNAL',
        e?.message ?? `HTTP ${res.statusCode}`,
        e?.field ? { field: e.field } : {},
      );
    }
    return (text ? JSON.parse(text) : undefined) as T;
  }

  /** Streams a text response (logs) to `out` until the server or the user ends it. */
  async stream(path: string, out: NodeJS.WritableStream): Promise<void> {
    const res = await request(this.server + path, { method: 'GET', bodyTimeout: 0 });
    if (res.statusCode >= 400) {
      const parsed = safeJson(await res.body.text()) as { error?: { code?: ErrorCode; message?: string } } | undefined;
      throw new TorporError(parsed?.error?.code ?? 'INTERNAL', parsed?.error?.message ?? `HTTP ${res.statusCode}`);
    }
    for await (const chunk of res.body) out.write(chunk as Buffer);
  }
}

function safeJson(text: string): unknown {
  try {
    return JSON.parse(text);
  } catch {
    return undefined;
  }
}
