// Runtime assets (runsc; kernel, initrd, VMM, …) are fetched at run time by {url, sha256}, not baked into
// worker images, and kept in a content-addressed cache, <cacheDir>/<sha256>. A fetch streams into a temp
// file while hashing, stops at a size cap, verifies the sha256, sets the mode and renames the file into
// place; a cache hit is a stat. Concurrent fetches of one asset share one download. A hash mismatch
// deletes the download and fails naming the asset and both hashes.
//
// Sources: file://, http:// and https://. Credentials (bearer or basic) go only to the origin of the URL,
// only over HTTPS or loopback, and never into a message: URLs are printed without user info or query.
// s3://bucket/key: GetObject (ranged, in parallel for large objects) through src/blob/s3.ts, with S3
// credentials the caller resolved from its secret store (an asset set names them, never holds them), or
// without: the AWS SDK's default chain (environment, instance or pod role).

import { createReadStream } from 'node:fs';
import { stat } from 'node:fs/promises';
import { resolve as resolvePath } from 'node:path';
import { fileURLToPath } from 'node:url';
import { S3BlobStore, type S3Connection, type S3Credentials } from '../blob/s3.ts';
import { type ErrorCode, TorporError } from '../core/errors.ts';
import { type CasErrors, type CasFetch, ContentCache, type OpenedBody } from '../image/cas.ts';
import { httpGet, isLoopbackHost, redactUrl } from '../image/http.ts';

export interface AssetRef {
  url: string;
  /** Hex sha256 of the asset's bytes ("sha256:" prefix allowed). */
  sha256: string;
}

/** Access to an s3:// source. Secrets: resolved by the caller, never stored in an asset set or printed. */
export type S3AssetAuth = S3Credentials & Omit<S3Connection, 'credentials' | 'maxAttempts'>;

export type AssetAuth = { bearer: string } | { username: string; password: string } | { s3: S3AssetAuth };

export interface AssetFetchOptions {
  /** Size cap in bytes (default 1 GiB). */
  maxBytes?: number;
  /** File mode of the cached asset (default 0755: most assets are executables). */
  mode?: number;
  auth?: AssetAuth;
  /** Download progress (not called on a cache hit). */
  onProgress?: (progress: AssetProgress) => void;
}

export interface AssetProgress {
  bytesDone: number;
  /** When the source says (a file's size, Content-Length). */
  bytesTotal?: number;
}

export const DEFAULT_ASSET_MAX_BYTES = 1 << 30;
const DEFAULT_MODE = 0o755;
const SHA256 = /^(?:sha256:)?([a-f0-9]{64})$/;

export class AssetStore {
  readonly cacheDir: string;
  readonly #cache: ContentCache;

  constructor(cacheDir: string) {
    this.cacheDir = resolvePath(cacheDir);
    this.#cache = new ContentCache(this.cacheDir);
  }

  /** Downloads completed by this store (cache hits and joined downloads do not count). */
  get downloadCount(): number {
    return this.#cache.downloadCount;
  }

  /** The cached asset with this sha256, or undefined: a stat, no download. */
  cached(sha256: string): Promise<string | undefined> {
    return this.#cache.lookup(hexOf('asset', sha256));
  }

  /** Where the asset with this sha256 lives (whether or not it is there yet). */
  path(sha256: string): string {
    return this.#cache.path(hexOf('asset', sha256));
  }

  async fetch(name: string, asset: AssetRef, options: AssetFetchOptions = {}): Promise<string> {
    const hex = hexOf(name, asset.sha256);
    const url = parseUrl(name, asset.url);
    const maxBytes = options.maxBytes ?? DEFAULT_ASSET_MAX_BYTES;
    const mode = options.mode ?? DEFAULT_MODE;
    if (!Number.isSafeInteger(maxBytes) || maxBytes <= 0) {
      throw new TorporError('INVALID_ARGUMENT', `maxBytes for asset "${name}" must be a positive integer`, {
        field: 'maxBytes',
      });
    }
    if (!Number.isInteger(mode) || mode < 0 || mode > 0o7777) {
      throw new TorporError('INVALID_ARGUMENT', `mode for asset "${name}" must be a file mode`, { field: 'mode' });
    }
    const where = `asset "${name}" from ${redactUrl(url.toString())}`;
    const progress = progressOf(options.onProgress);
    const open = opener(name, url, where, options.auth, progress?.total);
    const fetch: CasFetch = {
      maxBytes,
      mode,
      errors: assetErrors(name, where),
      retryable: (err) => !(err instanceof TorporError),
      open,
      ...(progress ? { onBytes: progress.bytes } : {}),
    };
    try {
      return (await this.#cache.get(hex, fetch)).path;
    } catch (err) {
      if (err instanceof TorporError) throw err;
      const reason = err instanceof Error ? err.message : String(err);
      throw new TorporError('RUNTIME_ERROR', `${where}: download failed: ${reason}`, { field: `assets.${name}` });
    } finally {
      open.close?.();
    }
  }
}

function opener(
  name: string,
  url: URL,
  where: string,
  auth: AssetAuth | undefined,
  onTotal: ((bytes: number) => void) | undefined,
): Opener {
  const field = `assets.${name}.url`;
  const s3Auth = auth !== undefined && 's3' in auth;
  if (auth !== undefined && s3Auth !== (url.protocol === 's3:')) {
    throw new TorporError('INVALID_ARGUMENT', `${where}: s3 credentials go with s3:// sources only`, { field });
  }
  switch (url.protocol) {
    case 'file:': {
      const path = fileURLToPath(url);
      return async (offset) => {
        const info = await stat(path).catch(() => undefined);
        if (!info?.isFile()) throw new TorporError('NOT_FOUND', `${where}: no such file`, { field });
        onTotal?.(info.size);
        return { body: createReadStream(path, { start: offset }), start: offset };
      };
    }
    case 'http:':
    case 'https:': {
      if (auth && url.protocol === 'http:' && !isLoopbackHost(url.host)) {
        throw new TorporError(
          'INVALID_ARGUMENT',
          `${where}: credentials are only sent over https (or to a loopback address)`,
          { field },
        );
      }
      const secretHeaders = auth && !('s3' in auth) ? { authorization: authorizationOf(auth) } : undefined;
      return async (offset) => {
        let res: Awaited<ReturnType<typeof httpGet>>;
        try {
          res = await httpGet(url.toString(), {
            ...(offset > 0 ? { headers: { range: `bytes=${offset}-` } } : {}),
            ...(secretHeaders ? { secretHeaders } : {}),
          });
        } catch (err) {
          const cause = (err as { cause?: { code?: string } }).cause?.code ?? (err as Error).name;
          // Not a TorporError: the download is retried (resumed) a few times before this surfaces.
          throw new Error(`${where}: ${cause}`);
        }
        if (res.status === 206 && contentRangeStart(res.headers.get('content-range')) === offset) {
          const total = /\/(\d+)$/.exec(res.headers.get('content-range') ?? '')?.[1];
          if (total) onTotal?.(Number(total));
          return { body: res.body(), start: offset };
        }
        if (res.status === 200) {
          const length = res.headers.get('content-length');
          if (length && /^\d+$/.test(length)) onTotal?.(Number(length));
          return { body: res.body(), start: 0 };
        }
        await res.discard();
        throw new TorporError(statusCode(res.status), `${where}: the server answered ${res.status}`, { field });
      };
    }
    case 's3:':
      return s3Opener(url, where, field, auth && 's3' in auth ? auth.s3 : undefined);
    default:
      throw new TorporError('INVALID_ARGUMENT', `${where}: unsupported scheme ${url.protocol}`, { field });
  }
}

/** Opens the source at an offset; close (when there is one) releases its connections once the fetch is over. */
type Opener = ((offset: number) => Promise<OpenedBody>) & { close?: () => void };

function s3Opener(url: URL, where: string, field: string, auth: S3AssetAuth | undefined): Opener {
  const key = decodeURIComponent(url.pathname.slice(1));
  if (url.hostname === '' || key === '') {
    throw new TorporError('INVALID_ARGUMENT', `${where}: an s3:// source is s3://bucket/key`, { field });
  }
  if (auth?.sessionToken && auth.endpoint !== undefined && isPlainRemote(auth.endpoint)) {
    // SigV4 never sends the secret key, but the session token travels as a header.
    throw new TorporError('INVALID_ARGUMENT', `${where}: a session token is only sent over https (or to loopback)`, {
      field,
    });
  }
  let store: S3BlobStore | undefined; // made on the first open: a cache hit needs no client
  const open: Opener = async (offset) => {
    store ??= s3Store(url.hostname, auth, where, field);
    try {
      // A resumed download asks for the rest; S3BlobStore answers exactly that range (or refuses it).
      return { body: await store.get(key, offset > 0 ? { start: offset } : undefined), start: offset };
    } catch (err) {
      if (!(err instanceof TorporError)) throw err;
      throw new TorporError(err.code, `${where}: ${err.message}`, { field });
    }
  };
  open.close = () => store?.close();
  return open;
}

function isPlainRemote(endpoint: string): boolean {
  try {
    const url = new URL(endpoint);
    return url.protocol === 'http:' && !isLoopbackHost(url.host);
  } catch {
    return false; // not a URL at all: the S3 client refuses it
  }
}

function s3Store(bucket: string, auth: S3AssetAuth | undefined, where: string, field: string): S3BlobStore {
  const { accessKeyId, secretAccessKey, sessionToken, ...connection } = auth ?? {};
  try {
    return new S3BlobStore({
      ...connection,
      bucket,
      ...(accessKeyId !== undefined && secretAccessKey !== undefined
        ? { credentials: { accessKeyId, secretAccessKey, ...(sessionToken ? { sessionToken } : {}) } }
        : {}),
    });
  } catch (err) {
    if (!(err instanceof TorporError)) throw err;
    throw new TorporError('INVALID_ARGUMENT', `${where}: ${err.message}`, { field });
  }
}

/** Turns the cache's byte deltas and the source's size into progress reports. */
function progressOf(
  listener: ((progress: AssetProgress) => void) | undefined,
): { bytes: (delta: number) => void; total: (bytes: number) => void } | undefined {
  if (!listener) return undefined;
  const state: AssetProgress = { bytesDone: 0 };
  return {
    bytes: (delta) => {
      state.bytesDone += delta;
      listener({ ...state });
    },
    total: (bytes) => {
      state.bytesTotal = bytes;
      listener({ ...state });
    },
  };
}

function assetErrors(name: string, where: string): CasErrors {
  return {
    mismatch: (expected, actual) =>
      new TorporError('RUNTIME_ERROR', `${where} does not match its sha256: expected ${expected}, got ${actual}`, {
        field: `assets.${name}.sha256`,
      }),
    tooLarge: (limit) =>
      new TorporError('PAYLOAD_TOO_LARGE', `${where} is larger than its size cap of ${limit} bytes`, {
        field: `assets.${name}`,
      }),
    wrongSize: (size, expected) =>
      new TorporError('RUNTIME_ERROR', `${where} is ${size} bytes, expected ${expected}`, {
        field: `assets.${name}`,
      }),
  };
}

function statusCode(status: number): ErrorCode {
  if (status === 404 || status === 410) return 'NOT_FOUND';
  if (status === 401) return 'UNAUTHENTICATED';
  if (status === 403) return 'PERMISSION_DENIED';
  return 'RUNTIME_ERROR';
}

function authorizationOf(auth: Exclude<AssetAuth, { s3: S3AssetAuth }>): string {
  if ('bearer' in auth) return `Bearer ${auth.bearer}`;
  return `Basic ${Buffer.from(`${auth.username}:${auth.password}`).toString('base64')}`;
}

function hexOf(name: string, sha256: string): string {
  const hex = SHA256.exec(typeof sha256 === 'string' ? sha256.toLowerCase() : '')?.[1];
  if (!hex) {
    throw new TorporError('INVALID_ARGUMENT', `asset "${name}" needs a sha256 of 64 hex digits`, {
      field: `assets.${name}.sha256`,
    });
  }
  return hex;
}

function parseUrl(name: string, url: string): URL {
  try {
    return new URL(url);
  } catch {
    // The URL itself is not echoed: a malformed one may still hold a secret.
    throw new TorporError('INVALID_ARGUMENT', `asset "${name}" has a malformed url`, { field: `assets.${name}.url` });
  }
}

function contentRangeStart(header: string | null): number | undefined {
  const match = /^bytes (\d+)-\d+\/(?:\d+|\*)$/.exec(header ?? '');
  return match ? Number(match[1]) : undefined;
}
