// S3BlobStore: a BlobStore on any S3-compatible service (AWS S3, Alibaba OSS, GCS interop, MinIO, Ceph radosgw).
// Only the plain S3 API is used: PutObject, multipart upload, ranged GetObject with If-Match, HeadObject,
// ListObjectsV2 and DeleteObject — nothing AWS-only.
//
// - Atomic put: S3 publishes an object only when PutObject or CompleteMultipartUpload succeeds, so readers see
//   the previous object or the whole new one. Bodies up to one part go in one PutObject; longer ones in a
//   multipart upload (parts uploaded concurrently, each buffered once to compute its Content-MD5) that is
//   aborted when anything fails, so no parts are left behind to be billed.
// - Integrity: every PutObject and UploadPart carries Content-MD5, which every one of those services verifies
//   (BadDigest otherwise). The SDK's newer flexible checksums are switched off (WHEN_REQUIRED), see s3Client().
// - Large gets: the first part streams at once while the following parts are fetched in parallel (bounded),
//   pinned to the first response's ETag with If-Match, and emitted in order.
// - Retries: the SDK's standard strategy (exponential backoff with full jitter; only 500/502/503/504,
//   throttling and network resets, never another 4xx). Part bodies that break mid-transfer are refetched here.
// - Errors: TorporError with stable codes; no credential ever appears in a message.
import { createHash } from 'node:crypto';
import { Readable } from 'node:stream';
import { buffer } from 'node:stream/consumers';
import { setTimeout as sleep } from 'node:timers/promises';
import {
  AbortMultipartUploadCommand,
  CompleteMultipartUploadCommand,
  CreateMultipartUploadCommand,
  DeleteObjectCommand,
  GetObjectCommand,
  type GetObjectCommandOutput,
  HeadObjectCommand,
  ListObjectsV2Command,
  PutObjectCommand,
  S3Client,
  UploadPartCommand,
} from '@aws-sdk/client-s3';
import { type ErrorCode, isTorporError, TorporError } from '../core/errors.ts';
import { assertValidRange, type BlobList, type BlobStore, type ByteRange, checkListLimit } from './blob.ts';
import { assertValidKey } from './keys.ts';

export interface S3Credentials {
  accessKeyId: string;
  secretAccessKey: string;
  sessionToken?: string;
}

/** Where an S3-compatible service is and how to talk to it. */
export interface S3Connection {
  /** e.g. http://127.0.0.1:17480, https://oss-cn-hangzhou.aliyuncs.com, https://storage.googleapis.com. */
  endpoint?: string;
  /** Default us-east-1 (what MinIO and Ceph expect; GCS interop accepts "auto"). */
  region?: string;
  /** Path-style URLs (endpoint/bucket/key) instead of virtual-hosted (bucket.endpoint/key): MinIO, Ceph. */
  forcePathStyle?: boolean;
  /** Omitted: the SDK's default chain (environment, shared config files, web identity, instance metadata). */
  credentials?: S3Credentials;
  /** Attempts per request, first included (default 5). */
  maxAttempts?: number;
}

export interface S3BlobStoreOptions extends S3Connection {
  bucket: string;
  /** Every key is stored under `<prefix>/` (omitted: at the bucket's root). */
  prefix?: string;
  /** Multipart upload and parallel download part size in bytes (default 8 MiB, at least 5 MiB). */
  partSize?: number;
  /** Parts in flight per put or get (default 4). */
  concurrency?: number;
}

export const MIN_PART_SIZE = 5 * 1024 * 1024;
const DEFAULT_PART_SIZE = 8 * 1024 * 1024;
const DEFAULT_CONCURRENCY = 4;
const DEFAULT_MAX_ATTEMPTS = 5;
/** ListObjectsV2 returns at most this many keys per request. */
const S3_PAGE_MAX = 1000;
const MAX_PARTS = 10_000;
const PART_BODY_ATTEMPTS = 3;
const PART_RETRY_BASE_MS = 50;

/** An S3 client configured for every S3-compatible service Torpor supports. Also used by s3:// asset sources. */
export function s3Client(conn: S3Connection): S3Client {
  return new S3Client({
    region: conn.region ?? 'us-east-1',
    ...(conn.endpoint !== undefined ? { endpoint: conn.endpoint } : {}),
    forcePathStyle: conn.forcePathStyle ?? false,
    ...(conn.credentials !== undefined ? { credentials: { ...conn.credentials } } : {}),
    // The SDK's standard retry mode already backs off exponentially with full jitter and retries only
    // transient errors (500/502/503/504, throttling, connection resets and timeouts).
    retryMode: 'standard',
    maxAttempts: conn.maxAttempts ?? DEFAULT_MAX_ATTEMPTS,
    // Recent SDKs add CRC32 checksums to every upload by default (and aws-chunked trailers to streamed
    // ones). Ceph radosgw 16 (Debian 12) ignores x-amz-checksum-* (a wrong CRC32 is accepted) and answers a
    // streamed aws-chunked PutObject with 411 MissingContentLength; other S3-compatible services differ too.
    // Content-MD5, which we compute ourselves, is verified by all of them, so checksums only when required.
    requestChecksumCalculation: 'WHEN_REQUIRED',
    responseChecksumValidation: 'WHEN_REQUIRED',
    requestHandler: { connectionTimeout: 10_000, requestTimeout: 120_000, httpAgent: { keepAlive: true } },
  });
}

export class S3BlobStore implements BlobStore {
  readonly bucket: string;
  readonly prefix: string;
  readonly client: S3Client;
  readonly #partSize: number;
  readonly #concurrency: number;
  /** Secrets to scrub from any message, whatever a server chooses to echo. */
  readonly #secrets: string[];

  constructor(opts: S3BlobStoreOptions) {
    if (typeof opts.bucket !== 'string' || !/^[a-z0-9][a-z0-9.\-_]{1,254}$/i.test(opts.bucket)) {
      throw new TorporError('INVALID_ARGUMENT', 'bucket must be an S3 bucket name', { field: 'bucket' });
    }
    const prefix = opts.prefix ?? '';
    if (prefix !== '') assertValidPrefix(prefix);
    this.#partSize = positiveInteger(opts.partSize ?? DEFAULT_PART_SIZE, 'partSize');
    if (this.#partSize < MIN_PART_SIZE) {
      throw new TorporError('INVALID_ARGUMENT', `partSize must be at least ${MIN_PART_SIZE} bytes (S3's minimum)`, {
        field: 'partSize',
      });
    }
    this.#concurrency = positiveInteger(opts.concurrency ?? DEFAULT_CONCURRENCY, 'concurrency');
    this.bucket = opts.bucket;
    this.prefix = prefix === '' ? '' : `${prefix}/`;
    this.client = s3Client(opts);
    this.#secrets = [opts.credentials?.secretAccessKey, opts.credentials?.sessionToken].filter(
      (s): s is string => typeof s === 'string' && s.length > 0,
    );
  }

  async put(key: string, body: Uint8Array | Readable): Promise<void> {
    const objectKey = this.#objectKey(key);
    const parts = partsOf(body, this.#partSize);
    // A body that fails here has already been destroyed (for await does that); nothing was uploaded yet.
    const first = await parts.next();
    const second = first.done ? first : await parts.next();
    if (first.done) return this.#putObject(key, objectKey, new Uint8Array(0));
    if (second.done) return this.#putObject(key, objectKey, first.value);
    await this.#multipart(key, objectKey, [first.value, second.value], parts);
  }

  async get(key: string, range?: ByteRange): Promise<Readable> {
    const objectKey = this.#objectKey(key);
    const start = range?.start ?? 0;
    if (range !== undefined) assertValidRange(range);
    const wantedEnd = range?.end ?? Number.POSITIVE_INFINITY;
    const firstEnd = Math.min(wantedEnd, start + this.#partSize - 1);
    let first: GetObjectCommandOutput;
    try {
      first = await this.#send('GetObject', key, () =>
        this.client.send(
          new GetObjectCommand({ Bucket: this.bucket, Key: objectKey, Range: `bytes=${start}-${firstEnd}` }),
        ),
      );
    } catch (err) {
      // S3 refuses any range of an empty object (416): a plain get tells "empty" from "missing".
      if (range === undefined && isTorporError(err, 'INVALID_ARGUMENT')) return this.#getWhole(key, objectKey);
      throw err;
    }
    const body = first.Body as Readable;
    const total = contentRangeTotal(first.ContentRange);
    if (total === undefined) {
      body.destroy();
      throw this.#error('RUNTIME_ERROR', `GetObject "${key}": the server ignored the Range header`, 'key');
    }
    const last = Math.min(wantedEnd, total - 1);
    if (firstEnd >= last) return body;
    const rest: Array<[number, number]> = [];
    for (let from = firstEnd + 1; from <= last; from += this.#partSize) {
      rest.push([from, Math.min(from + this.#partSize - 1, last)]);
    }
    const etag = first.ETag;
    return Readable.from(
      inOrder(body, rest, this.#concurrency - 1, (from, to, signal) =>
        this.#getPart(key, objectKey, etag, from, to, signal),
      ),
      { objectMode: false },
    );
  }

  async getBytes(key: string): Promise<Uint8Array> {
    return buffer(await this.get(key));
  }

  async has(key: string): Promise<boolean> {
    const objectKey = this.#objectKey(key);
    try {
      await this.#send('HeadObject', key, () =>
        this.client.send(new HeadObjectCommand({ Bucket: this.bucket, Key: objectKey })),
      );
      return true;
    } catch (err) {
      if (isTorporError(err, 'NOT_FOUND') && err.field === 'key') return false;
      throw err;
    }
  }

  async list(prefix: string, opts: { cursor?: string; limit?: number } = {}): Promise<BlobList> {
    const limit = checkListLimit(opts.limit);
    if (typeof prefix !== 'string') {
      throw new TorporError('INVALID_ARGUMENT', 'prefix must be a string', { field: 'prefix' });
    }
    const keys: string[] = [];
    let token: string | undefined;
    let more = true;
    // S3 pages hold at most 1000 keys: a larger limit takes several requests.
    while (more && keys.length < limit) {
      const page = await this.#send('ListObjectsV2', prefix, () =>
        this.client.send(
          new ListObjectsV2Command({
            Bucket: this.bucket,
            Prefix: this.prefix + prefix,
            MaxKeys: Math.min(limit - keys.length, S3_PAGE_MAX),
            ...(token !== undefined
              ? { ContinuationToken: token }
              : opts.cursor !== undefined
                ? { StartAfter: this.prefix + opts.cursor }
                : {}),
          }),
        ),
      );
      for (const object of page.Contents ?? []) {
        if (object.Key !== undefined) keys.push(object.Key.slice(this.prefix.length));
      }
      token = page.NextContinuationToken;
      more = page.IsTruncated === true && token !== undefined;
    }
    return more ? { keys, nextCursor: keys.at(-1)! } : { keys };
  }

  async delete(key: string): Promise<void> {
    const objectKey = this.#objectKey(key);
    // S3 answers 204 for a missing key too: idempotent as required.
    await this.#send('DeleteObject', key, () =>
      this.client.send(new DeleteObjectCommand({ Bucket: this.bucket, Key: objectKey })),
    );
  }

  /** Closes the client's idle connections. */
  close(): void {
    this.client.destroy();
  }

  #objectKey(key: string): string {
    assertValidKey(key);
    return this.prefix + key;
  }

  async #putObject(key: string, objectKey: string, bytes: Uint8Array): Promise<void> {
    await this.#send('PutObject', key, () =>
      this.client.send(
        new PutObjectCommand({
          Bucket: this.bucket,
          Key: objectKey,
          Body: bytes,
          ContentLength: bytes.length,
          ContentMD5: md5Base64(bytes),
        }),
      ),
    );
  }

  async #multipart(
    key: string,
    objectKey: string,
    firstParts: Uint8Array[],
    parts: AsyncGenerator<Uint8Array>,
  ): Promise<void> {
    const created = await this.#send('CreateMultipartUpload', key, () =>
      this.client.send(new CreateMultipartUploadCommand({ Bucket: this.bucket, Key: objectKey })),
    );
    const uploadId = created.UploadId;
    if (uploadId === undefined)
      throw this.#error('RUNTIME_ERROR', `CreateMultipartUpload "${key}": no UploadId`, 'key');
    const etags: string[] = [];
    const inflight = new Set<Promise<void>>();
    let failure: { error: unknown } | undefined;
    const upload = (partNumber: number, bytes: Uint8Array) => {
      const task = this.#uploadPart(key, objectKey, uploadId, partNumber, bytes).then(
        (etag) => {
          etags[partNumber - 1] = etag;
        },
        (error: unknown) => {
          failure ??= { error };
        },
      );
      const tracked = task.finally(() => inflight.delete(tracked));
      inflight.add(tracked);
    };
    try {
      let partNumber = 0;
      const queued = [...firstParts];
      for (;;) {
        const next = queued.shift() ?? (await nextPart(parts));
        if (next === undefined) break;
        if (++partNumber > MAX_PARTS) {
          throw this.#error('PAYLOAD_TOO_LARGE', `"${key}" needs more than ${MAX_PARTS} parts: raise partSize`, 'key');
        }
        upload(partNumber, next);
        while (inflight.size >= this.#concurrency) await Promise.race(inflight);
        if (failure) throw failure.error;
      }
      await Promise.all(inflight);
      if (failure) throw failure.error;
      await this.#send('CompleteMultipartUpload', key, () =>
        this.client.send(
          new CompleteMultipartUploadCommand({
            Bucket: this.bucket,
            Key: objectKey,
            UploadId: uploadId,
            MultipartUpload: { Parts: etags.map((ETag, i) => ({ ETag, PartNumber: i + 1 })) },
          }),
        ),
      );
    } catch (err) {
      await parts.return(undefined); // stops (destroys) the caller's stream when we fail first
      // Parts still uploading would be stored after an abort: let them finish or fail first.
      await Promise.allSettled(inflight);
      await this.#abort(key, objectKey, uploadId);
      throw failure?.error ?? err;
    }
  }

  async #uploadPart(
    key: string,
    objectKey: string,
    uploadId: string,
    partNumber: number,
    bytes: Uint8Array,
  ): Promise<string> {
    const out = await this.#send('UploadPart', key, () =>
      this.client.send(
        new UploadPartCommand({
          Bucket: this.bucket,
          Key: objectKey,
          UploadId: uploadId,
          PartNumber: partNumber,
          Body: bytes,
          ContentLength: bytes.length,
          ContentMD5: md5Base64(bytes),
        }),
      ),
    );
    if (out.ETag === undefined) throw this.#error('RUNTIME_ERROR', `UploadPart "${key}": no ETag`, 'key');
    return out.ETag;
  }

  /** Best effort: the put has failed already, and that error is the one to report. */
  async #abort(key: string, objectKey: string, uploadId: string): Promise<void> {
    try {
      await this.#send('AbortMultipartUpload', key, () =>
        this.client.send(new AbortMultipartUploadCommand({ Bucket: this.bucket, Key: objectKey, UploadId: uploadId })),
      );
    } catch {
      // A bucket lifecycle rule for incomplete multipart uploads is the backstop for this rare case.
    }
  }

  async #getWhole(key: string, objectKey: string): Promise<Readable> {
    const out = await this.#send('GetObject', key, () =>
      this.client.send(new GetObjectCommand({ Bucket: this.bucket, Key: objectKey })),
    );
    return out.Body as Readable;
  }

  /** One part, whole, from the same object version as the first part (If-Match), refetched if cut. */
  async #getPart(
    key: string,
    objectKey: string,
    etag: string | undefined,
    from: number,
    to: number,
    signal: AbortSignal,
  ): Promise<Buffer[]> {
    for (let attempt = 1; ; attempt++) {
      const out = await this.#send('GetObject', key, () =>
        this.client.send(
          new GetObjectCommand({
            Bucket: this.bucket,
            Key: objectKey,
            Range: `bytes=${from}-${to}`,
            ...(etag !== undefined ? { IfMatch: etag } : {}),
          }),
          { abortSignal: signal },
        ),
      );
      try {
        // Kept as the chunks that arrived: joining them would copy every byte once more.
        const chunks: Buffer[] = [];
        let length = 0;
        for await (const chunk of out.Body as Readable) {
          chunks.push(chunk as Buffer);
          length += (chunk as Buffer).length;
        }
        if (length !== to - from + 1) throw new Error(`short part: ${length} of ${to - from + 1} bytes`);
        return chunks;
      } catch (err) {
        if (signal.aborted || attempt >= PART_BODY_ATTEMPTS) {
          throw this.#error('RUNTIME_ERROR', `GetObject "${key}" bytes ${from}-${to}: ${reasonOf(err)}`, 'key');
        }
        await sleep(Math.random() * PART_RETRY_BASE_MS * 2 ** attempt); // full jitter
      }
    }
  }

  /** Runs one S3 call, turning its failure into a TorporError that names the key and holds no secret. */
  async #send<T>(operation: string, key: string, call: () => Promise<T>): Promise<T> {
    try {
      return await call();
    } catch (err) {
      throw this.#translate(operation, key, err);
    }
  }

  #translate(operation: string, key: string, err: unknown): Error {
    if (err instanceof TorporError) return err;
    const e = err as { name?: string; message?: string; $metadata?: { httpStatusCode?: number } };
    const name = e.name ?? 'Error';
    const status = e.$metadata?.httpStatusCode;
    const what = `S3 ${operation} "${key}" in bucket "${this.bucket}"`;
    if (name === 'AbortError') return this.#error('RUNTIME_ERROR', `${what}: aborted`, 'key');
    if (name === 'NoSuchKey' || (status === 404 && (name === 'NotFound' || name === 'Unknown'))) {
      return this.#error('NOT_FOUND', `blob "${key}" not found`, 'key');
    }
    if (name === 'NoSuchBucket') return this.#error('NOT_FOUND', `S3 bucket "${this.bucket}" does not exist`, 'bucket');
    if (name === 'InvalidRange' || status === 416) {
      return this.#error('INVALID_ARGUMENT', `range: start is beyond the end of blob "${key}"`, 'range');
    }
    if (name === 'PreconditionFailed' || status === 412) {
      return this.#error('CONFLICT', `blob "${key}" was replaced while it was being read`, 'key');
    }
    if (CREDENTIAL_ERRORS.has(name)) {
      // The server's own message is left out: some echo parts of the request.
      return this.#error('UNAUTHENTICATED', `${what}: the S3 credentials were refused (${name})`, 'credentials');
    }
    if (name === 'CredentialsProviderError') {
      return this.#error('UNAUTHENTICATED', `${what}: no S3 credentials found (${e.message ?? ''})`, 'credentials');
    }
    if (status === 403 || name === 'AccessDenied') {
      return this.#error(
        'PERMISSION_DENIED',
        `${what}: access denied (HTTP 403): the credentials are wrong or lack permission`,
        'credentials',
      );
    }
    const detail = status !== undefined ? `${name} (HTTP ${status})` : name;
    const message = e.message && e.message !== 'UnknownError' && e.message !== name ? `: ${e.message}` : '';
    return this.#error('RUNTIME_ERROR', `${what} failed: ${detail}${message}`, 'key');
  }

  #error(code: ErrorCode, message: string, field: string): TorporError {
    let clean = message;
    for (const secret of this.#secrets) clean = clean.replaceAll(secret, '***');
    return new TorporError(code, clean, { field });
  }
}

const CREDENTIAL_ERRORS = new Set([
  'InvalidAccessKeyId',
  'SignatureDoesNotMatch',
  'InvalidToken',
  'ExpiredToken',
  'TokenRefreshRequired',
  'InvalidSecurity',
]);

/** The body cut into parts of exactly `size` bytes (the last one shorter, never empty). */
async function* partsOf(body: Uint8Array | Readable, size: number): AsyncGenerator<Uint8Array> {
  if (body instanceof Uint8Array) {
    for (let at = 0; at < body.length; at += size) yield body.subarray(at, at + size);
    return;
  }
  let pending: Buffer[] = [];
  let pendingBytes = 0;
  for await (const chunk of body) {
    let data = asBuffer(chunk);
    while (pendingBytes + data.length >= size) {
      const take = size - pendingBytes;
      pending.push(data.subarray(0, take));
      yield Buffer.concat(pending, size);
      data = data.subarray(take);
      pending = [];
      pendingBytes = 0;
    }
    if (data.length > 0) {
      pending.push(data);
      pendingBytes += data.length;
    }
  }
  if (pendingBytes > 0) yield Buffer.concat(pending, pendingBytes);
}

/** A view of a stream chunk as a Buffer, without copying it. */
function asBuffer(chunk: unknown): Buffer {
  if (Buffer.isBuffer(chunk)) return chunk;
  if (chunk instanceof Uint8Array) return Buffer.from(chunk.buffer, chunk.byteOffset, chunk.byteLength);
  return Buffer.from(String(chunk));
}

async function nextPart(parts: AsyncGenerator<Uint8Array>): Promise<Uint8Array | undefined> {
  const next = await parts.next();
  return next.done ? undefined : next.value;
}

/**
 * Streams `first`, then the parts `rest` in order, fetching up to `ahead` of them in parallel while earlier
 * ones are consumed. Stopping early (the reader destroys the stream) aborts the fetches still running.
 */
async function* inOrder(
  first: Readable,
  rest: Array<[number, number]>,
  ahead: number,
  fetchPart: (from: number, to: number, signal: AbortSignal) => Promise<Buffer[]>,
): AsyncGenerator<Uint8Array> {
  const controller = new AbortController();
  const pending: Promise<Buffer[]>[] = [];
  let next = 0;
  const refill = () => {
    while (pending.length < Math.max(1, ahead) && next < rest.length) {
      const [from, to] = rest[next++]!;
      const part = fetchPart(from, to, controller.signal);
      part.catch(() => {}); // observed when its turn comes; until then, not an unhandled rejection
      pending.push(part);
    }
  };
  try {
    refill();
    yield* first;
    for (let part = pending.shift(); part !== undefined; part = pending.shift()) {
      const chunks = await part;
      refill();
      yield* chunks;
    }
  } finally {
    controller.abort();
    first.destroy();
  }
}

function md5Base64(bytes: Uint8Array): string {
  return createHash('md5').update(bytes).digest('base64');
}

/** The total size from a Content-Range header ("bytes 0-99/1000"). */
function contentRangeTotal(header: string | undefined): number | undefined {
  const match = /^bytes \d+-\d+\/(\d+)$/.exec(header ?? '');
  return match ? Number(match[1]) : undefined;
}

function assertValidPrefix(prefix: string): void {
  try {
    assertValidKey(prefix);
  } catch {
    throw new TorporError('INVALID_ARGUMENT', `prefix ${JSON.stringify(prefix)} must be a valid blob key`, {
      field: 'prefix',
    });
  }
}

function positiveInteger(value: number, field: string): number {
  if (!Number.isSafeInteger(value) || value < 1) {
    throw new TorporError('INVALID_ARGUMENT', `${field} must be a positive integer, got ${value}`, { field });
  }
  return value;
}

function reasonOf(err: unknown): string {
  const e = err as { code?: string; message?: string };
  return e.code ?? e.message ?? String(err);
}
