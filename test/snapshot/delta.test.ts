// Delta-encoded files: a state file that changes all over between checkpoints is stored as a zstd delta
// against its keyframe, restored byte-identical, and kept alive by GC through the manifests that use it.
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, it } from 'node:test';
import {
  COMPACT_DELTA_LEVEL,
  collectGarbage,
  compactDelta,
  readManifest,
  referencedKeys,
  restoreSnapshot,
  writeSnapshot,
} from '../../src/snapshot/index.ts';
import { CHUNK, META, scratch } from './helpers.ts';

/** Like a gVisor state file: mostly the same bytes, but edits everywhere and a length change that shifts them. */
function mutate(base: Buffer): Buffer {
  const out = Buffer.from(base);
  for (let i = 0; i < out.length; i += 4096) out.writeUInt32LE(randomBytes(4).readUInt32LE(), i);
  return Buffer.concat([randomBytes(37), out]);
}

describe('delta-encoded snapshot files', () => {
  let s: Awaited<ReturnType<typeof scratch>>;
  beforeEach(async () => {
    s = await scratch();
  });
  afterEach(async () => {
    await s.cleanup();
  });

  async function snapshot(key: string, content: Buffer, previousKey?: string) {
    await writeFile(join(s.src, 'state.img'), content);
    const previous = previousKey ? await readManifest(s.blob, previousKey) : undefined;
    return writeSnapshot({
      blob: s.blob,
      cache: s.cache,
      dir: s.src,
      files: ['state.img'],
      key,
      meta: { ...META, parent: previousKey ?? null },
      chunkSize: CHUNK,
      ...(previous ? { previous } : {}),
    });
  }

  async function restored(key: string): Promise<Buffer> {
    const dir = join(s.root, `out-${Math.random()}`);
    await restoreSnapshot({ blob: s.blob, key, dir });
    return readFile(join(dir, 'state.img'));
  }

  it('stores a changed-everywhere file as a small delta and restores it byte-identical', async () => {
    // Compressible, like serialised kernel state: repeated structure with random fields.
    const base = Buffer.concat(
      Array.from({ length: 400 }, () => Buffer.concat([randomBytes(64), Buffer.alloc(960, 7)])),
    );
    const first = await snapshot('snapshots/a/1/manifest.json', base);
    assert.equal(first.manifest.files[0]!.delta, undefined, 'the first snapshot is a keyframe');
    const next = mutate(base);
    const second = await snapshot('snapshots/a/2/manifest.json', next, 'snapshots/a/1/manifest.json');
    const file = second.manifest.files[0]!;
    assert.ok(file.delta, 'stored as a delta');
    assert.deepEqual(file.chunks, []);
    assert.deepEqual(file.delta.base.chunks, first.manifest.files[0]!.chunks);
    assert.equal(second.stats.deltaFiles, 1);
    assert.ok(
      second.stats.storedBytes < first.stats.storedBytes / 4,
      `${second.stats.storedBytes} vs ${first.stats.storedBytes}`,
    );
    assert.ok((await restored('snapshots/a/2/manifest.json')).equals(next));
  });

  it('compaction re-encodes a delta in place: smaller, same key, same restored bytes', async () => {
    const base = Buffer.concat(
      Array.from({ length: 400 }, () => Buffer.concat([randomBytes(64), Buffer.alloc(960, 1)])),
    );
    await snapshot('snapshots/a/1/manifest.json', base);
    const next = mutate(base);
    const second = await snapshot('snapshots/a/2/manifest.json', next, 'snapshots/a/1/manifest.json');
    const file = second.manifest.files[0]!;
    const before = (await s.blob.getBytes(file.delta!.object)).length;
    const saved = await compactDelta(s.blob, s.cache, { ...file, delta: file.delta! }, CHUNK, COMPACT_DELTA_LEVEL);
    const after = (await s.blob.getBytes(file.delta!.object)).length;
    assert.equal(before - after, saved);
    assert.ok(saved >= 0);
    assert.ok((await restored('snapshots/a/2/manifest.json')).equals(next));
  });

  it('a delta is always against the keyframe, never against another delta', async () => {
    const base = Buffer.concat(
      Array.from({ length: 200 }, () => Buffer.concat([randomBytes(64), Buffer.alloc(960, 3)])),
    );
    await snapshot('snapshots/a/1/manifest.json', base);
    const v2 = mutate(base);
    await snapshot('snapshots/a/2/manifest.json', v2, 'snapshots/a/1/manifest.json');
    const v3 = mutate(v2);
    const third = await snapshot('snapshots/a/3/manifest.json', v3, 'snapshots/a/2/manifest.json');
    const keyframe = (await readManifest(s.blob, 'snapshots/a/1/manifest.json')).files[0]!;
    assert.deepEqual(third.manifest.files[0]!.delta?.base, { size: keyframe.size, chunks: keyframe.chunks });
    assert.ok((await restored('snapshots/a/3/manifest.json')).equals(v3));
  });

  it('a file unrelated to its previous version is chunked and becomes the next keyframe', async () => {
    await snapshot('snapshots/a/1/manifest.json', randomBytes(200_000));
    const other = randomBytes(200_000);
    const second = await snapshot('snapshots/a/2/manifest.json', other, 'snapshots/a/1/manifest.json');
    assert.equal(second.manifest.files[0]!.delta, undefined);
    assert.ok((await restored('snapshots/a/2/manifest.json')).equals(other));
  });

  it('a corrupt delta object or a missing base chunk is SNAPSHOT_CORRUPT', async () => {
    const base = Buffer.concat(
      Array.from({ length: 200 }, () => Buffer.concat([randomBytes(64), Buffer.alloc(960, 5)])),
    );
    const first = await snapshot('snapshots/a/1/manifest.json', base);
    const second = await snapshot('snapshots/a/2/manifest.json', mutate(base), 'snapshots/a/1/manifest.json');
    const object = second.manifest.files[0]!.delta!.object;
    const good = await s.blob.getBytes(object);
    await s.blob.put(object, randomBytes(good.length));
    await assert.rejects(restored('snapshots/a/2/manifest.json'), { code: 'SNAPSHOT_CORRUPT' });
    await s.blob.put(object, good);
    await s.blob.delete(`chunks/${first.manifest.files[0]!.chunks[0]}`);
    await assert.rejects(restored('snapshots/a/2/manifest.json'), { code: 'SNAPSHOT_CORRUPT' });
  });

  it('GC keeps the delta and its keyframe chunks after the keyframe manifest itself is collected', async () => {
    const base = Buffer.concat(
      Array.from({ length: 200 }, () => Buffer.concat([randomBytes(64), Buffer.alloc(960, 9)])),
    );
    await snapshot('snapshots/a/1/manifest.json', base);
    const next = mutate(base);
    const second = await snapshot('snapshots/a/2/manifest.json', next, 'snapshots/a/1/manifest.json');
    const result = await collectGarbage(s.blob, ['snapshots/a/2/manifest.json']);
    assert.equal(result.deletedManifests, 1);
    assert.equal(result.deletedChunks, 0, 'every chunk is a base chunk of the live delta');
    assert.ok(referencedKeys(second.manifest).has(second.manifest.files[0]!.delta!.object));
    assert.ok((await restored('snapshots/a/2/manifest.json')).equals(next));
  });
});
