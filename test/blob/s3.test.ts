// S3BlobStore against a real S3 server: Ceph radosgw (Debian 12), started once for this file by
// scripts/services/s3.sh. Every test gets a fresh key prefix in one bucket. Retries are tested through a
// loopback proxy in front of radosgw that fails chosen requests. Without radosgw every test here is skipped,
// with the reason.

import assert from 'node:assert/strict';
import { randomBytes, randomUUID } from 'node:crypto';
import { Readable } from 'node:stream';
import { buffer } from 'node:stream/consumers';
import { after, describe, it } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { inspect } from 'node:util';
import { HeadObjectCommand, ListMultipartUploadsCommand } from '@aws-sdk/client-s3';
import { openBlobStore } from '../../src/blob/open.ts';
import { MIN_PART_SIZE, S3BlobStore, type S3BlobStoreOptions } from '../../src/blob/s3.ts';
import { isTorporError } from '../../src/core/errors.ts';
import { blobStoreConformance, rejectsWith } from './conformance.ts';
import { createBucket, faultyProxy, type RunningS3, startS3 } from './s3-helpers.ts';

const BUCKET = 'torpor-blob-test';
const started = await startS3();
const skip = typeof started === 'string' ? started : false;
const s3: RunningS3 | undefined = typeof started === 'string' ? undefined : started;
if (s3) await createBucket(s3.connection, BUCKET);
after(() => s3?.stop());

function server(): RunningS3 {
  assert.ok(s3, 'radosgw is running');
  return s3;
}

/** A store on a fresh prefix of the test bucket; `close` releases its connections. */
function freshStore(opts: Partial<S3BlobStoreOptions> = {}): S3BlobStore {
  return new S3BlobStore({ ...server().connection, bucket: BUCKET, prefix: `t-${randomUUID()}`, ...opts });
}

if (s3) {
  blobStoreConformance('S3BlobStore (radosgw)', async () => {
    const store = freshStore();
    return { store, cleanup: async () => store.close() };
  });
} else {
  it('BlobStore conformance: S3BlobStore (radosgw)', { skip }, () => {});
}

const MiB = 1024 * 1024;
const PART = MIN_PART_SIZE;

/** A body delivered in 64 KiB pieces, as a file or a socket would deliver it. */
function streamOf(data: Buffer): Readable {
  return Readable.from(
    (function* () {
      for (let at = 0; at < data.length; at += 64 * 1024) yield data.subarray(at, at + 64 * 1024);
    })(),
  );
}

async function multipartUploads(store: S3BlobStore): Promise<number> {
  const out = await store.client.send(new ListMultipartUploadsCommand({ Bucket: BUCKET, Prefix: store.prefix }));
  return out.Uploads?.length ?? 0;
}

describe('S3BlobStore on radosgw', () => {
  it('uploads a streamed body larger than the part size in parts', { skip }, async () => {
    const store = freshStore({ partSize: PART });
    after(() => store.close());
    const data = randomBytes(2 * PART + 123_457);
    await store.put('big/stream', streamOf(data));
    const head = await store.client.send(new HeadObjectCommand({ Bucket: BUCKET, Key: `${store.prefix}big/stream` }));
    assert.match(head.ETag ?? '', /-3"$/, 'a three-part multipart upload');
    assert.equal(head.ContentLength, data.length);
    assert.ok(Buffer.from(await store.getBytes('big/stream')).equals(data));
    assert.equal(await multipartUploads(store), 0);
  });

  it('aborts the multipart upload when the body fails, leaving no parts and no object', { skip }, async () => {
    const store = freshStore({ partSize: PART });
    after(() => store.close());
    let uploadsSeen = 0;
    const failing = Readable.from(
      (async function* () {
        yield randomBytes(2 * PART + 1); // two whole parts and the start of a third
        await sleep(300); // let the first parts reach the server
        uploadsSeen = await multipartUploads(store);
        throw new Error('source broke');
      })(),
    );
    await assert.rejects(store.put('big/failing', failing), /source broke/);
    assert.equal(uploadsSeen, 1, 'a multipart upload was in progress when the body failed');
    assert.equal(await multipartUploads(store), 0, 'ListMultipartUploads is empty after the failure');
    assert.equal(await store.has('big/failing'), false);
  });

  it('downloads a large object as parallel ranged parts, in order, exactly', { skip }, async () => {
    const proxy = await faultyProxy(server().endpoint);
    const store = freshStore({ partSize: PART, concurrency: 4, endpoint: proxy.endpoint });
    after(async () => {
      store.close();
      await proxy.close();
    });
    const data = randomBytes(4 * PART + 777);
    await store.put('big/obj', data);
    proxy.requests.length = 0;
    proxy.maxInFlight = 0;
    assert.ok((await buffer(await store.get('big/obj'))).equals(data));
    const gets = proxy.requests.filter((r) => r.method === 'GET');
    assert.equal(gets.length, 5, 'one ranged GET per part');
    assert.ok(
      gets.every((r) => r.range?.startsWith('bytes=')),
      'every part is a ranged GET',
    );
    assert.ok(proxy.maxInFlight > 1, `parts were fetched in parallel (max in flight ${proxy.maxInFlight})`);
    const start = PART + 12_345;
    const end = 3 * PART + 999;
    assert.ok((await buffer(await store.get('big/obj', { start, end }))).equals(data.subarray(start, end + 1)));
    assert.ok((await buffer(await store.get('big/obj', { start: 10 }))).equals(data.subarray(10)));
  });

  it('stops fetching parts when the reader gives up early', { skip }, async () => {
    const proxy = await faultyProxy(server().endpoint);
    const store = freshStore({ partSize: PART, concurrency: 3, endpoint: proxy.endpoint });
    after(async () => {
      store.close();
      await proxy.close();
    });
    await store.put('big/early', randomBytes(8 * PART));
    proxy.requests.length = 0;
    const stream = await store.get('big/early');
    for await (const _ of stream) break; // destroys the stream after the first chunk
    await sleep(300);
    const gets = proxy.requests.filter((r) => r.method === 'GET').length;
    // The first part, and at most the two fetched ahead (aborted if they had not started yet): not all eight.
    assert.ok(gets >= 1 && gets <= 3, `saw ${gets} GETs`);
  });

  it('reports a wrong secret clearly, without the secret', { skip }, async () => {
    const { accessKeyId } = server();
    const secret = `wrong-${randomBytes(12).toString('hex')}`;
    const store = freshStore({ credentials: { accessKeyId, secretAccessKey: secret } });
    after(() => store.close());
    for (const attempt of [() => store.put('k', randomBytes(10)), () => store.getBytes('k')]) {
      await assert.rejects(attempt(), (err: unknown) => {
        assert.ok(isTorporError(err, 'UNAUTHENTICATED'), String(err));
        assert.equal(err.field, 'credentials');
        assert.match(err.message, /credentials were refused \(SignatureDoesNotMatch\)/);
        assert.ok(!inspect(err, { depth: 10 }).includes(secret), 'the secret is nowhere in the error');
        return true;
      });
    }
    await rejectsWith(store.has('k'), 'PERMISSION_DENIED', 'credentials');
  });

  it('pages through more than 1000 keys', { skip }, async () => {
    const store = freshStore();
    after(() => store.close());
    const keys = Array.from({ length: 1100 }, (_, i) => `many/${String(i).padStart(4, '0')}`);
    for (let at = 0; at < keys.length; at += 25) {
      await Promise.all(keys.slice(at, at + 25).map((key) => store.put(key, Buffer.from(key))));
    }
    const first = await store.list('many/');
    assert.equal(first.keys.length, 1000);
    assert.equal(first.nextCursor, keys[999]);
    const second = await store.list('many/', { cursor: first.nextCursor! });
    assert.deepEqual(second.keys, keys.slice(1000));
    assert.equal(second.nextCursor, undefined);
    const all = await store.list('many/', { limit: 5000 });
    assert.deepEqual(all.keys, keys, 'a limit above S3 page size gathers several S3 pages');
    assert.equal(all.nextCursor, undefined);
    const small = await store.list('many/', { limit: 7, cursor: keys[500]! });
    assert.deepEqual(small.keys, keys.slice(501, 508));
    assert.equal(small.nextCursor, keys[507]);
  });

  it('retries transient failures (503, connection reset) and not a 4xx', { skip }, async () => {
    const proxy = await faultyProxy(server().endpoint);
    const store = freshStore({ endpoint: proxy.endpoint, maxAttempts: 4 });
    after(async () => {
      store.close();
      await proxy.close();
    });
    const data = randomBytes(1000);

    proxy.fail = (_req, i) => (i < 2 ? 503 : undefined);
    await store.put('r/a', data);
    assert.deepEqual(
      proxy.requests.map((r) => r.outcome),
      ['failed', 'failed', 'forwarded'],
    );

    proxy.requests.length = 0;
    proxy.fail = (_req, i) => (i === 0 ? 'reset' : undefined);
    assert.ok(Buffer.from(await store.getBytes('r/a')).equals(data));
    assert.deepEqual(
      proxy.requests.map((r) => r.outcome),
      ['failed', 'forwarded'],
    );

    proxy.requests.length = 0;
    proxy.fail = (_req, i) => (i === 0 ? 400 : undefined);
    await rejectsWith(store.put('r/b', data), 'RUNTIME_ERROR', 'key');
    assert.equal(proxy.requests.length, 1, 'a 400 is not retried');

    proxy.requests.length = 0;
    proxy.fail = () => undefined;
    await rejectsWith(store.getBytes('r/missing'), 'NOT_FOUND', 'key');
    assert.equal(proxy.requests.length, 1, "radosgw's 404 is not retried");

    proxy.requests.length = 0;
    proxy.fail = () => 503;
    await rejectsWith(store.put('r/c', data), 'RUNTIME_ERROR', 'key');
    assert.equal(proxy.requests.length, 4, 'gives up after maxAttempts');
  });

  it('openBlobStore(s3://…) reaches radosgw with credentials from the environment', { skip }, async () => {
    const { endpoint, accessKeyId, secretAccessKey } = server();
    const prefix = `open-${randomUUID()}`;
    const url = `s3://${BUCKET}/${prefix}/?endpoint=${encodeURIComponent(endpoint)}&pathStyle=true`;
    const store = openBlobStore(url, { AWS_ACCESS_KEY_ID: accessKeyId, AWS_SECRET_ACCESS_KEY: secretAccessKey });
    assert.ok(store instanceof S3BlobStore);
    after(() => store.close());
    await store.put('x/y', Buffer.from('via url'));
    assert.equal(Buffer.from(await store.getBytes('x/y')).toString(), 'via url');
    const direct = freshStore({ prefix });
    after(() => direct.close());
    assert.deepEqual((await direct.list('')).keys, ['x/y'], 'stored under the prefix the URL names');
  });

  it('refuses bad options naming the field', () => {
    const base = { bucket: BUCKET, endpoint: 'http://127.0.0.1:1' };
    assert.throws(() => new S3BlobStore({ ...base, partSize: MiB }), { code: 'INVALID_ARGUMENT', field: 'partSize' });
    assert.throws(() => new S3BlobStore({ ...base, concurrency: 0 }), {
      code: 'INVALID_ARGUMENT',
      field: 'concurrency',
    });
    assert.throws(() => new S3BlobStore({ ...base, prefix: '/abs' }), { code: 'INVALID_ARGUMENT', field: 'prefix' });
    assert.throws(() => new S3BlobStore({ ...base, bucket: 'Bad Bucket' }), {
      code: 'INVALID_ARGUMENT',
      field: 'bucket',
    });
  });
});
