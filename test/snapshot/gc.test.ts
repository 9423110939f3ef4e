import assert from 'node:assert/strict';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, it } from 'node:test';
import type { SnapshotManifest } from '../../src/core/types.ts';
import { chunkKey, collectGarbage, restoreSnapshot, snapshotWhole, writeSnapshot } from '../../src/snapshot/index.ts';
import { rejectsWith } from '../blob/conformance.ts';
import { CHUNK, chunkKeysIn, META, makeCheckpoint, scratch, scribble } from './helpers.ts';

type Scratch = Awaited<ReturnType<typeof scratch>>;

function chunkKeysOf(manifest: SnapshotManifest): Set<string> {
  const hashes = manifest.files.flatMap((file) => file.chunks).filter((hash) => hash !== null);
  return new Set(hashes.map(chunkKey));
}

describe('collectGarbage', () => {
  let s: Scratch;
  let oldManifest: SnapshotManifest;
  let newManifest: SnapshotManifest;
  const OLD = 'snapshots/web/1.json';
  const NEW = 'snapshots/web/2.json';

  // Two snapshots of the same files, one chunk changed in between: exactly one chunk belongs only to OLD.
  beforeEach(async () => {
    s = await scratch();
    const files = await makeCheckpoint(s.src, CHUNK);
    const snapshot = (key: string) =>
      writeSnapshot({ blob: s.blob, dir: s.src, files, key, meta: META, chunkSize: CHUNK });
    ({ manifest: oldManifest } = await snapshot(OLD));
    await scribble(join(s.src, 'odd.bin'), 10, 10);
    ({ manifest: newManifest } = await snapshot(NEW));
  });
  afterEach(async () => {
    await s.cleanup();
  });

  it('snapshotWhole: the manifest and every object it names exist', async () => {
    assert.equal(await snapshotWhole(s.blob, NEW), true);
    assert.equal(await snapshotWhole(s.blob, 'snapshots/web/none.json'), false);
    await s.blob.delete([...chunkKeysOf(newManifest)][0]!);
    assert.equal(await snapshotWhole(s.blob, NEW), false);
  });

  it('deletes dead manifests and the chunks only they used, keeping every live chunk', async () => {
    const live = chunkKeysOf(newManifest);
    const onlyOld = [...chunkKeysOf(oldManifest)].filter((key) => !live.has(key));
    assert.equal(onlyOld.length, 1);

    const result = await collectGarbage(s.blob, [NEW]);
    assert.deepEqual(result, { deletedManifests: 1, deletedChunks: 1, keptChunks: live.size });
    assert.deepEqual(await chunkKeysIn(s.blob), live);
    assert.equal(await s.blob.has(OLD), false);
    assert.equal(await s.blob.has(onlyOld[0]!), false);
    await restoreSnapshot({ blob: s.blob, key: NEW, dir: join(s.root, 'out') });
  });

  it('keeps everything when every manifest is live', async () => {
    const before = await chunkKeysIn(s.blob);
    const result = await collectGarbage(s.blob, [OLD, NEW]);
    assert.deepEqual(result, { deletedManifests: 0, deletedChunks: 0, keptChunks: before.size });
    assert.deepEqual(await chunkKeysIn(s.blob), before);
  });

  it('deletes nothing on a dry run, but counts what it would delete', async () => {
    const before = (await s.blob.list('')).keys;
    const result = await collectGarbage(s.blob, [NEW], { dryRun: true });
    assert.equal(result.deletedManifests, 1);
    assert.equal(result.deletedChunks, 1);
    assert.deepEqual((await s.blob.list('')).keys, before);
  });

  it('with no live manifests, removes every manifest and chunk under the prefix', async () => {
    const result = await collectGarbage(s.blob, [], { manifestPrefix: 'snapshots/web/' });
    assert.equal(result.deletedManifests, 2);
    assert.equal(result.keptChunks, 0);
    assert.deepEqual((await s.blob.list('')).keys, []);
  });

  it('only deletes manifests under the prefix, and a live manifest anywhere protects its chunks', async () => {
    await s.blob.put('golden/counter.json', await s.blob.getBytes(OLD));
    const result = await collectGarbage(s.blob, ['golden/counter.json', NEW]);
    assert.equal(result.deletedManifests, 1);
    assert.equal(result.deletedChunks, 0);
    assert.equal(await s.blob.has('golden/counter.json'), true);
  });

  it('deletes nothing if a live manifest is missing or corrupt', async () => {
    const before = (await s.blob.list('')).keys;
    await rejectsWith(collectGarbage(s.blob, [NEW, 'snapshots/web/none.json']), 'NOT_FOUND');
    await s.blob.put(OLD, Buffer.from('garbage'));
    await rejectsWith(collectGarbage(s.blob, [OLD]), 'SNAPSHOT_CORRUPT');
    assert.deepEqual((await s.blob.list('')).keys, before);
  });
});
