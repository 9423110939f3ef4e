// Staging an asset set to s3:// on a real S3 server (Ceph radosgw, started once for this file by
// scripts/services/s3.sh): the staged set names the secret nodes read it with, and a node with an empty cache
// fetches every asset from it. Without radosgw every test here is skipped, with the reason.
import assert from 'node:assert/strict';
import { createHash, randomBytes } from 'node:crypto';
import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, type TestContext, test } from 'node:test';
import { pathToFileURL } from 'node:url';
import { stringify } from 'yaml';
import { S3BlobStore } from '../../src/blob/s3.ts';
import { isTorporError } from '../../src/core/errors.ts';
import type { AssetSet } from '../../src/core/schemas.ts';
import { fetchAssets, parseAssetSets, pinnedAssets } from '../../src/runtime/asset-set.ts';
import { stageAssetSet } from '../../src/runtime/asset-stage.ts';
import { AssetStore } from '../../src/runtime/assets.ts';
import { createBucket, type RunningS3, startS3 } from '../blob/s3-helpers.ts';

const BUCKET = 'torpor-stage-test';
const SECRET_ENV = 'TORPOR_TEST_STAGE_S3_KEYS';
const started = await startS3();
const skip = typeof started === 'string' ? started : false;
const s3: RunningS3 | undefined = typeof started === 'string' ? undefined : started;
after(() => s3?.stop());
if (s3) await createBucket(s3.connection, BUCKET);

const sha = (data: Uint8Array) => createHash('sha256').update(data).digest('hex');

async function scratch(t: TestContext): Promise<string> {
  const dir = await mkdtemp(join(tmpdir(), 'torpor-stage-s3-'));
  t.after(() => rm(dir, { recursive: true, force: true }));
  return dir;
}

test('stage to s3://, then a node fetches the set with the keys its secretRef names', { skip }, async (t) => {
  assert.ok(s3);
  const dir = await scratch(t);
  const runsc = randomBytes((2 << 20) + 5);
  await writeFile(join(dir, 'runsc'), runsc);
  const source: AssetSet = {
    runtime: 'gvisor',
    arch: 'amd64',
    assets: { runsc: { url: pathToFileURL(join(dir, 'runsc')).href, sha256: sha(runsc) } },
  };
  const to = `s3://${BUCKET}/assets/v1?endpoint=${encodeURIComponent(s3.endpoint)}&pathStyle=true`;
  const staged = await stageAssetSet(source, to, {
    store: new AssetStore(join(dir, 'stage-cache')),
    secretRef: `env:${SECRET_ENV}`,
    env: { AWS_ACCESS_KEY_ID: s3.accessKeyId, AWS_SECRET_ACCESS_KEY: s3.secretAccessKey },
  });
  const yaml = stringify(staged);
  assert.ok(!yaml.includes(s3.secretAccessKey) && !yaml.includes(s3.accessKeyId), 'no key in the staged set');
  const [set] = parseAssetSets(yaml, 'staged');
  assert.deepEqual(set, {
    runtime: 'gvisor',
    arch: 'amd64',
    assets: { runsc: { url: `s3://${BUCKET}/assets/v1/runsc-${sha(runsc)}`, sha256: sha(runsc) } },
    auth: { type: 's3', secretRef: `env:${SECRET_ENV}`, endpoint: s3.endpoint, pathStyle: true },
  });
  const reader = new S3BlobStore({ ...s3.connection, bucket: BUCKET });
  t.after(() => reader.close());
  assert.ok(await reader.has(`assets/v1/runsc-${sha(runsc)}`));

  // A node: the secret is read when the asset is downloaded, from the variable the set names.
  const node = new AssetStore(join(dir, 'node-cache'));
  await assert.rejects(fetchAssets(node, pinnedAssets(set!)), (err) => {
    assert.ok(isTorporError(err, 'FAILED_PRECONDITION'), String(err));
    assert.match(err.message, new RegExp(`secret env:${SECRET_ENV} is not set`));
    return true;
  });
  process.env[SECRET_ENV] = `${s3.accessKeyId}:wrong-${s3.secretAccessKey.slice(0, 4)}`;
  t.after(() => delete process.env[SECRET_ENV]);
  await assert.rejects(fetchAssets(node, pinnedAssets(set!)), (err) => {
    assert.ok(isTorporError(err), String(err));
    assert.ok(!err.message.includes('wrong-'), err.message);
    return true;
  });
  process.env[SECRET_ENV] = `${s3.accessKeyId}:${s3.secretAccessKey}`;
  const paths = await fetchAssets(node, pinnedAssets(set!));
  assert.ok((await readFile(paths.runsc!)).equals(runsc));
  assert.equal(node.downloadCount, 1);
});

test('an S3 service of its own needs --secret-ref; a malformed S3 secret is refused without echoing it', async (t) => {
  const dir = await scratch(t);
  const set: AssetSet = {
    runtime: 'gvisor',
    arch: 'amd64',
    assets: { runsc: { url: 'file:///nonexistent/runsc', sha256: sha(Buffer.from('x')) } },
  };
  await assert.rejects(
    stageAssetSet(set, 's3://bucket/p?endpoint=http://127.0.0.1:9', { store: new AssetStore(join(dir, 'c')) }),
    (err) => isTorporError(err, 'INVALID_ARGUMENT') && err.field === 'secret-ref',
  );
  process.env[SECRET_ENV] = 'only-one-part';
  t.after(() => delete process.env[SECRET_ENV]);
  const s3set = { ...set, assets: { runsc: { url: 's3://b/runsc', sha256: set.assets.runsc!.sha256 } } };
  await assert.rejects(
    fetchAssets(
      new AssetStore(join(dir, 'c')),
      pinnedAssets({ ...s3set, auth: { type: 's3', secretRef: `env:${SECRET_ENV}` } }),
    ),
    (err) => isTorporError(err, 'FAILED_PRECONDITION') && !err.message.includes('only-one-part'),
  );
});
