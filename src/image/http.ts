// HTTP GET for registries and asset servers, with redirects followed by hand so that credentials are never
// sent to another origin (blob stores behind a registry answer with a redirect to pre-signed URLs), and a
// printable form of URLs that drops anything secret (user info, query strings).

import { Readable } from 'node:stream';

const MAX_REDIRECTS = 5;

export interface GetOptions {
  headers?: Record<string, string>;
  /** Headers sent only to the origin of the first URL (Authorization), dropped on a cross-origin redirect. */
  secretHeaders?: Record<string, string>;
  signal?: AbortSignal;
}

export interface GetResponse {
  status: number;
  headers: Headers;
  /** The URL that answered, after redirects. */
  url: string;
  body(): AsyncIterable<Uint8Array>;
  text(limit: number): Promise<Buffer>;
  /** Releases the connection when the body is not wanted. */
  discard(): Promise<void>;
}

export async function httpGet(url: string, options: GetOptions = {}): Promise<GetResponse> {
  const origin = new URL(url).origin;
  let current = url;
  for (let hops = 0; ; hops++) {
    const sameOrigin = new URL(current).origin === origin;
    const res = await fetch(current, {
      method: 'GET',
      redirect: 'manual',
      headers: { ...options.headers, ...(sameOrigin ? options.secretHeaders : {}) },
      ...(options.signal ? { signal: options.signal } : {}),
    });
    const location = res.headers.get('location');
    if (res.status >= 300 && res.status < 400 && location && hops < MAX_REDIRECTS) {
      await res.body?.cancel().catch(() => undefined);
      current = new URL(location, current).toString();
      continue;
    }
    return wrap(res, current);
  }
}

function wrap(res: Response, url: string): GetResponse {
  return {
    status: res.status,
    headers: res.headers,
    url,
    body() {
      if (!res.body) return Readable.from([]);
      return Readable.fromWeb(res.body as import('node:stream/web').ReadableStream<Uint8Array>);
    },
    async text(limit) {
      const chunks: Buffer[] = [];
      let size = 0;
      for await (const chunk of this.body()) {
        size += chunk.length;
        if (size > limit) {
          await res.body?.cancel().catch(() => undefined);
          throw new Error(`response from ${redactUrl(url)} is larger than ${limit} bytes`);
        }
        chunks.push(Buffer.from(chunk));
      }
      return Buffer.concat(chunks);
    },
    async discard() {
      await res.body?.cancel().catch(() => undefined);
    },
  };
}

/** scheme://host[:port]/path: no user info, no query (pre-signed URLs carry credentials there), no fragment. */
export function redactUrl(url: string): string {
  try {
    const u = new URL(url);
    return `${u.protocol}//${u.host}${u.pathname}`;
  } catch {
    return '(malformed URL)';
  }
}

/** Loopback hosts, where plain HTTP is acceptable: the traffic never leaves the machine. */
export function isLoopbackHost(host: string): boolean {
  const name = host.replace(/:\d+$/, '').replace(/^\[(.*)\]$/, '$1');
  return name === 'localhost' || name === '::1' || /^127\.\d+\.\d+\.\d+$/.test(name);
}
