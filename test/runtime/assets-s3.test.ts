// AssetStore with s3:// sources on a real S3 server (Ceph radosgw, started once for this file by
// scripts/services/s3.sh): the download goes through the content-addressed cache (sha256 verified, size cap,
// atomic rename, one download for concurrent fetches), and no credential ever appears in an error.
// Without radosgw every test here is skipped, with the reason.

import assert from 'node:assert/strict';
import { createHash, randomBytes } from 'node:crypto';
import { mkdtemp, readdir, readFile, rm, stat } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, type TestContext, test } from 'node:test';
import { inspect } from 'node:util';
import { S3BlobStore } from '../../src/blob/s3.ts';
import { isTorporError, type TorporError } from '../../src/core/errors.ts';
import { AssetStore, type S3AssetAuth } from '../../src/runtime/assets.ts';
import { createBucket, type RunningS3, startS3 } from '../blob/s3-helpers.ts';

const BUCKET = 'torpor-assets-test';
const started = await startS3();
const skip = typeof started === 'string' ? started : false;
const s3: RunningS3 | undefined = typeof started === 'string' ? undefined : started;
after(() => s3?.stop());

const sha = (data: Uint8Array) => createHash('sha256').update(data).digest('hex');
/** Bigger than one S3BlobStore part (8 MiB), so the download also takes the parallel ranged path. */
const runsc = randomBytes(9 * 1024 * 1024 + 17);
const small = randomBytes(1000);

if (s3) {
  await createBucket(s3.connection, BUCKET);
  const uploader = new S3BlobStore({ ...s3.connection, bucket: BUCKET });
  await uploader.put('assets/runsc', runsc);
  await uploader.put('assets/small', small);
  uploader.close();
}

function auth(overrides: Partial<S3AssetAuth> = {}): { s3: S3AssetAuth } {
  assert.ok(s3);
  return {
    s3: {
      endpoint: s3.endpoint,
      forcePathStyle: true,
      accessKeyId: s3.accessKeyId,
      secretAccessKey: s3.secretAccessKey,
      ...overrides,
    },
  };
}

async function cacheDir(t: TestContext): Promise<string> {
  const root = await mkdtemp(join(tmpdir(), 'torpor-assets-s3-'));
  t.after(() => rm(root, { recursive: true, force: true }));
  return join(root, 'assets');
}

async function rejected(promise: Promise<unknown>): Promise<TorporError> {
  let caught: unknown;
  await assert.rejects(promise, (err) => {
    caught = err;
    return true;
  });
  assert.ok(isTorporError(caught), `expected a TorporError, got ${String(caught)}`);
  return caught;
}

test('fetches an s3:// asset into the cache, once, verified, with its mode', { skip }, async (t) => {
  const store = new AssetStore(await cacheDir(t));
  const asset = { url: `s3://${BUCKET}/assets/runsc`, sha256: sha(runsc) };
  const [a, b] = await Promise.all([
    store.fetch('runsc', asset, { auth: auth() }),
    store.fetch('runsc', asset, { auth: auth() }),
  ]);
  assert.equal(a, b);
  assert.equal(a, store.path(asset.sha256));
  assert.ok((await readFile(a)).equals(runsc));
  assert.equal((await stat(a)).mode & 0o777, 0o755);
  assert.equal(store.downloadCount, 1, 'concurrent fetches share one download');
  await store.fetch('runsc', asset, { auth: auth() });
  assert.equal(store.downloadCount, 1, 'a cache hit downloads nothing');
});

test('refuses an s3:// asset whose bytes do not match, and deletes the download', { skip }, async (t) => {
  const dir = await cacheDir(t);
  const store = new AssetStore(dir);
  const claimed = sha(Buffer.from('something else'));
  const err = await rejected(
    store.fetch('runsc', { url: `s3://${BUCKET}/assets/small`, sha256: claimed }, { auth: auth() }),
  );
  assert.equal(err.code, 'RUNTIME_ERROR');
  assert.equal(err.field, 'assets.runsc.sha256');
  assert.match(err.message, new RegExp(`expected sha256:${claimed}, got sha256:${sha(small)}`));
  assert.deepEqual(await readdir(dir), [], 'neither the asset nor a temp file is left');
});

test('enforces the size cap on s3:// assets', { skip }, async (t) => {
  const dir = await cacheDir(t);
  const err = await rejected(
    new AssetStore(dir).fetch(
      'runsc',
      { url: `s3://${BUCKET}/assets/small`, sha256: sha(small) },
      { auth: auth(), maxBytes: 999 },
    ),
  );
  assert.equal(err.code, 'PAYLOAD_TOO_LARGE');
  assert.deepEqual(await readdir(dir), []);
});

test('never puts the secret in an error: wrong secret, missing object', { skip }, async (t) => {
  const store = new AssetStore(await cacheDir(t));
  const secret = `wrong-${randomBytes(16).toString('hex')}`;
  const wrong = await rejected(
    store.fetch(
      'runsc',
      { url: `s3://${BUCKET}/assets/small`, sha256: sha(small) },
      { auth: auth({ secretAccessKey: secret }) },
    ),
  );
  assert.equal(wrong.code, 'UNAUTHENTICATED', wrong.message);
  assert.equal(wrong.field, 'assets.runsc.url');
  assert.match(
    wrong.message,
    /^asset "runsc" from s3:\/\/torpor-assets-test\/assets\/small: .*credentials were refused/,
  );
  assert.ok(!inspect(wrong, { depth: 10 }).includes(secret));

  const realSecret = auth().s3.secretAccessKey;
  const missing = await rejected(
    store.fetch('runsc', { url: `s3://${BUCKET}/assets/nope`, sha256: sha(small) }, { auth: auth() }),
  );
  assert.equal(missing.code, 'NOT_FOUND', missing.message);
  assert.ok(!inspect(missing, { depth: 10 }).includes(realSecret));
});

test('s3 credentials go only with s3:// sources; a session token never over plain remote http', async (t) => {
  const store = new AssetStore(await cacheDir(t));
  const good = sha(small);
  const s3Auth = { s3: { accessKeyId: 'AKID', secretAccessKey: 'secret-key-value' } };
  const http = await rejected(store.fetch('a', { url: 'https://example.com/a', sha256: good }, { auth: s3Auth }));
  assert.equal(http.code, 'INVALID_ARGUMENT');
  const token = await rejected(
    store.fetch(
      'a',
      { url: 's3://bucket/a', sha256: good },
      { auth: { s3: { ...s3Auth.s3, sessionToken: 'tok-value', endpoint: 'http://s3.example.com' } } },
    ),
  );
  assert.equal(token.code, 'INVALID_ARGUMENT');
  assert.match(token.message, /session token is only sent over https/);
  assert.ok(!token.message.includes('tok-value') && !token.message.includes('secret-key-value'));
  const noKey = await rejected(store.fetch('a', { url: 's3://bucket', sha256: good }, { auth: s3Auth }));
  assert.equal(noKey.code, 'INVALID_ARGUMENT');
  assert.equal(noKey.field, 'assets.a.url');
});
