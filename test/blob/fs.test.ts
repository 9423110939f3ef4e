import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { mkdtemp, readdir, readFile, rm, stat } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Readable } from 'node:stream';
import { afterEach, beforeEach, describe, it } from 'node:test';
import { FsBlobStore } from '../../src/blob/fs.ts';
import { blobStoreConformance, rejectsWith } from './conformance.ts';

async function tempStore(durable = true) {
  const root = await mkdtemp(join(tmpdir(), 'torpor-blob-'));
  return { root, store: new FsBlobStore(root, { durable }), cleanup: () => rm(root, { recursive: true, force: true }) };
}

blobStoreConformance('FsBlobStore', () => tempStore());
// The node-local chunk cache skips fsync; it must still be atomic and otherwise identical.
blobStoreConformance('FsBlobStore (not durable)', () => tempStore(false));

describe('FsBlobStore specifics', () => {
  let root: string;
  let store: FsBlobStore;
  let cleanup: () => Promise<void>;
  beforeEach(async () => {
    ({ root, store, cleanup } = await tempStore());
  });
  afterEach(async () => {
    await cleanup();
  });

  it('stores each key as a file at its path under the root', async () => {
    const data = randomBytes(100);
    await store.put('a/b/c', data);
    assert.deepEqual(await readFile(join(root, 'a', 'b', 'c')), data);
  });

  it('leaves no staging files behind, whether a put succeeds or fails', async () => {
    await store.put('ok', randomBytes(10));
    const failing = Readable.from(
      (async function* () {
        yield randomBytes(10);
        throw new Error('boom');
      })(),
    );
    await assert.rejects(store.put('bad', failing));
    assert.deepEqual(await readdir(join(root, '.tmp')), []);
  });

  it('reserves the .tmp/ prefix', async () => {
    await rejectsWith(store.put('.tmp/x', randomBytes(1)), 'INVALID_ARGUMENT', 'key');
  });

  it('removes directories a delete leaves empty, and keeps non-empty ones', async () => {
    await store.put('p/q/r', randomBytes(1));
    await store.put('p/s', randomBytes(1));
    await store.delete('p/q/r');
    await assert.rejects(stat(join(root, 'p', 'q')), { code: 'ENOENT' });
    assert.ok((await stat(join(root, 'p'))).isDirectory());
  });

  it('reports a key that clashes with an existing prefix as INVALID_ARGUMENT', async () => {
    await store.put('x/y', randomBytes(1));
    await rejectsWith(store.put('x', randomBytes(1)), 'INVALID_ARGUMENT', 'key');
    await store.put('f', randomBytes(1));
    await rejectsWith(store.put('f/g', randomBytes(1)), 'INVALID_ARGUMENT', 'key');
  });
});
