// Page patches through the S3 blob store (a real radosgw): the patch object is put, found and read back there.
import assert from 'node:assert/strict';
import { after, describe, it } from 'node:test';
import { S3BlobStore } from '../../src/blob/s3.ts';
import { createBucket, type RunningS3, startS3 } from '../blob/s3-helpers.ts';
import { scratch } from './helpers.ts';
import { memoryLike, memoryOf, page, patchedPages, Suspender, touchPages } from './patch-helpers.ts';

const BUCKET = 'torpor-patches-test';
const started = await startS3();
const skip = typeof started === 'string' ? started : false;
const s3: RunningS3 | undefined = typeof started === 'string' ? undefined : started;
after(() => s3?.stop());

describe('page patches on S3', () => {
  it('round-trips a patched file through the S3 blob store', { skip }, async () => {
    assert.ok(s3);
    await createBucket(s3.connection, BUCKET);
    const blob = new S3BlobStore({ ...s3.connection, bucket: BUCKET });
    const s = await scratch();
    try {
      const suspender = new Suspender(s, blob);
      await memoryLike(suspender.memory);
      const first = await suspender.suspend();
      await touchPages(suspender.memory, [page(0, 0), page(10, 15)]);
      const second = await suspender.suspend(); // restores from S3 and compares the bytes
      assert.deepEqual(memoryOf(second).chunks, memoryOf(first).chunks);
      assert.deepEqual(patchedPages(memoryOf(second)), [page(0, 0), page(10, 15)]);
      assert.equal(second.stats.uploadedChunks, 1);
      assert.ok(await blob.has(memoryOf(second).patch!.object));
    } finally {
      blob.close();
      await s.cleanup();
    }
  });
});
