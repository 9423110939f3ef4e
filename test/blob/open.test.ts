// openBlobStore: which store a location names, and the locations it refuses (naming the field "blob",
// without echoing anything that could be a secret). A round trip through s3:// is in s3.test.ts.
import assert from 'node:assert/strict';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { describe, it } from 'node:test';
import { pathToFileURL } from 'node:url';
import { FsBlobStore } from '../../src/blob/fs.ts';
import { openBlobStore } from '../../src/blob/open.ts';
import { S3BlobStore } from '../../src/blob/s3.ts';
import { isTorporError } from '../../src/core/errors.ts';

const ENV = { AWS_ACCESS_KEY_ID: 'AKIDEXAMPLE', AWS_SECRET_ACCESS_KEY: 'very-secret-key' };

function refuses(url: string, env: NodeJS.ProcessEnv, pattern: RegExp, secret?: string): void {
  assert.throws(
    () => openBlobStore(url, env),
    (err: unknown) => {
      assert.ok(isTorporError(err, 'INVALID_ARGUMENT'), String(err));
      assert.equal(err.field, 'blob');
      assert.match(err.message, pattern);
      if (secret !== undefined) assert.ok(!err.message.includes(secret), err.message);
      return true;
    },
  );
}

describe('openBlobStore', () => {
  it('opens a path or a file:// URL as a filesystem store', () => {
    const dir = join(tmpdir(), 'torpor-open-test');
    const plain = openBlobStore(dir, {});
    assert.ok(plain instanceof FsBlobStore);
    assert.equal(plain.root, dir);
    const relative = openBlobStore('data/blobs', {});
    assert.ok(relative instanceof FsBlobStore);
    assert.equal(relative.root, resolve('data/blobs'));
    const fromUrl = openBlobStore(pathToFileURL(dir).href, {});
    assert.ok(fromUrl instanceof FsBlobStore);
    assert.equal(fromUrl.root, dir);
  });

  it('opens s3://bucket/prefix with its endpoint, region and path style', async () => {
    const store = openBlobStore(
      's3://snapshots/team/a/?endpoint=http://127.0.0.1:17480&region=eu-west-1&pathStyle=true',
      ENV,
    );
    assert.ok(store instanceof S3BlobStore);
    assert.equal(store.bucket, 'snapshots');
    assert.equal(store.prefix, 'team/a/');
    assert.equal(await store.client.config.region(), 'eu-west-1');
    assert.equal(store.client.config.forcePathStyle, true);
    const credentials = await store.client.config.credentials();
    assert.equal(credentials.accessKeyId, 'AKIDEXAMPLE');
    assert.equal(credentials.secretAccessKey, 'very-secret-key');
    store.close();
    const bare = openBlobStore('s3://snapshots', { ...ENV, AWS_REGION: 'ap-south-1' });
    assert.ok(bare instanceof S3BlobStore);
    assert.equal(bare.prefix, '');
    assert.equal(await bare.client.config.region(), 'ap-south-1');
    bare.close();
  });

  it('refuses credentials in the URL without echoing them', () => {
    refuses('s3://AKID:hunter2@bucket/p', ENV, /credentials do not belong in the blob store URL/, 'hunter2');
    refuses('s3://bucket/p?endpoint=http://u:hunter2@127.0.0.1:1', ENV, /credentials do not belong/, 'hunter2');
    refuses('s3://bucket/p?secretAccessKey=hunter2', ENV, /unknown s3:\/\/ parameter "secretAccessKey"/, 'hunter2');
  });

  it('refuses what it cannot open, naming the field', () => {
    refuses('', {}, /empty/);
    refuses('gs://bucket/x', {}, /unsupported blob store scheme "gs:"/);
    refuses('s3:///prefix', ENV, /needs a bucket/);
    refuses('s3://bucket?pathStyle=yes', ENV, /pathStyle must be true or false/);
    refuses('s3://bucket?endpoint=ftp://x', ENV, /endpoint parameter must be an http\(s\) URL/);
    refuses('s3://bad_bucket!/x', ENV, /s3:\/\/ blob store: bucket must be an S3 bucket name/);
    refuses('s3://bucket/a//b', ENV, /prefix/);
    refuses('s3://bucket', { AWS_ACCESS_KEY_ID: 'AKID' }, /must be set together/);
    refuses('file://otherhost/x', {}, /local absolute path/);
  });
});
