// `torpor up --store URL --blob URL`: the all-in-one process on a shared state store (a real redis-server) and
// a shared blob store (real radosgw S3) instead of its embedded SQLite file and blob directory. Its state is in
// Redis, its snapshots in the bucket, and nothing of either in its data directory.
import assert from 'node:assert/strict';
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { S3BlobStore } from '../../src/blob/s3.ts';
import { readManifest, referencedKeys } from '../../src/snapshot/index.ts';
import { RedisStore } from '../../src/store/redis.ts';
import { createBucket, type RunningS3, startS3 } from '../blob/s3-helpers.ts';
import { type RedisServer, startRedis } from '../store/redis-server.ts';
import { counterEnvTemplate, gvisorSkipReason, startTorpor, type Torpor } from './harness.ts';

/** Network index 226 (one worker). */
const NETWORK_BASE = 226;
const BUCKET = 'torpor-up';
const PREFIX = 'up-test:';

interface Actor {
  status: string;
  address?: string;
  snapshot?: string;
}

async function get(address: string): Promise<string> {
  const res = await fetch(`http://${address}/`);
  assert.equal(res.status, 200);
  return (await res.text()).trim();
}

describe('torpor up on a shared store and blob store (Redis, S3)', { skip: gvisorSkipReason() }, () => {
  let s3: RunningS3 | string;
  let redis: RedisServer | string;
  let t: Torpor | undefined;
  let store: RedisStore;
  let blob: S3BlobStore;

  before(async () => {
    [s3, redis] = await Promise.all([startS3(), startRedis()]);
    if (typeof s3 === 'string' || typeof redis === 'string') return;
    await createBucket(s3.connection, BUCKET);
    blob = new S3BlobStore({ ...s3.connection, bucket: BUCKET, prefix: 'snaps' });
    store = await RedisStore.open({ url: redis.url, prefix: PREFIX });
    t = await startTorpor({
      workers: 1,
      networkBase: NETWORK_BASE,
      args: [
        ...['--store', `${redis.url}?prefix=${encodeURIComponent(PREFIX)}`],
        ...['--blob', `s3://${BUCKET}/snaps?endpoint=${encodeURIComponent(s3.endpoint)}&pathStyle=true`],
      ],
      env: { AWS_ACCESS_KEY_ID: s3.accessKeyId, AWS_SECRET_ACCESS_KEY: s3.secretAccessKey, AWS_REGION: 'us-east-1' },
    });
  });
  after(async () => {
    await t?.stop();
    await store?.close();
    if (typeof s3 === 'object') await s3.stop();
    if (typeof redis === 'object') await redis.stop();
  });

  test('state goes to Redis, snapshots to S3, and an actor keeps its memory across a suspend', async (ctx) => {
    if (!t) return ctx.skip(typeof s3 === 'string' ? s3 : String(redis));
    const template = await counterEnvTemplate({ name: 'counter' });
    const applied = await fetch(`${t.url}/v1/templates`, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify(template),
    });
    assert.equal(applied.status, 201, await applied.text());
    assert.ok(await store.getTemplate('counter'), 'the template is in Redis');

    await t.json<Actor>('actor', 'create', 'c1', '--template', 'counter');
    const running = await t.json<Actor>('actor', 'resume', 'c1');
    assert.equal(running.status, 'RUNNING');
    assert.deepEqual([await get(running.address!), await get(running.address!)], ['1', '2']);
    const suspended = await t.json<Actor>('actor', 'suspend', 'c1');
    assert.equal(suspended.status, 'SUSPENDED');
    assert.equal((await store.getActor('default', 'c1'))?.snapshot, suspended.snapshot, 'the actor is in Redis');

    const manifest = await readManifest(blob, suspended.snapshot!);
    for (const key of referencedKeys(manifest)) assert.equal(await blob.has(key), true, `${key} is in S3`);
    assert.equal(existsSync(join(t.dataDir, 'state.db')), false, 'no embedded state file');
    assert.equal(existsSync(join(t.dataDir, 'blobs')), false, 'no embedded blob directory');

    const resumed = await t.json<Actor>('actor', 'resume', 'c1');
    assert.equal(await get(resumed.address!), '3');
  });
});
