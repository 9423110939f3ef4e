import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import type { SnapshotManifest } from '../../src/core/types.ts';
import {
  chunkKey,
  decodeManifest,
  encodeManifest,
  manifestKeyFor,
  newSnapshotId,
  readManifest,
} from '../../src/snapshot/index.ts';
import { rejectsWith } from '../blob/conformance.ts';
import { CHUNK, META, scratch } from './helpers.ts';

const HASH = 'b'.repeat(64);

function manifest(files: SnapshotManifest['files']): SnapshotManifest {
  return { version: 1, ...META, chunkSize: CHUNK, files, createdAt: new Date().toISOString() };
}

const decodes = (value: unknown) => () => decodeManifest(Buffer.from(JSON.stringify(value)), 'k');
const corrupt = { code: 'SNAPSHOT_CORRUPT', field: 'snapshot' };

describe('snapshot ids and keys', () => {
  it('newSnapshotId is time-based, so ids sort by creation time', () => {
    const times = [Date.UTC(2026, 0, 2), Date.UTC(2026, 10, 22, 13, 17, 0, 123), Date.UTC(2027, 0, 1)];
    const ids = times.map((t) => newSnapshotId(new Date(t)));
    assert.deepEqual([...ids].sort(), ids);
    assert.match(ids[1]!, /^20261122T131700123Z-[0-9a-f]{6}$/);
    assert.notEqual(newSnapshotId(), newSnapshotId(), 'ids made in the same millisecond still differ');
  });

  it('manifestKeyFor joins prefix and id, tolerating a trailing slash', () => {
    assert.equal(manifestKeyFor('snapshots/default/web', 'x1'), 'snapshots/default/web/x1.json');
    assert.equal(manifestKeyFor('snapshots/', 'x1'), 'snapshots/x1.json');
    assert.throws(() => manifestKeyFor('snapshots', 'a/b'), { code: 'INVALID_ARGUMENT', field: 'id' });
  });

  it('chunkKey is chunks/<hash>', () => {
    assert.equal(chunkKey(HASH), `chunks/${HASH}`);
  });
});

describe('manifest parsing', () => {
  it('round-trips through encode and decode', () => {
    const m = manifest([{ name: 'mem', size: CHUNK + 1, chunks: [HASH, null] }]);
    assert.deepEqual(decodeManifest(encodeManifest(m), 'k'), m);
  });

  it('rejects a chunk list that does not cover the file size', () => {
    assert.throws(decodes(manifest([{ name: 'mem', size: CHUNK + 1, chunks: [HASH] }])), corrupt);
  });

  it('rejects file names that could escape the restore directory, and duplicates', () => {
    for (const name of ['../x', '/etc/passwd', 'a/../../x', '']) {
      assert.throws(decodes(manifest([{ name, size: 0, chunks: [] }])), corrupt, name);
    }
    const file = { name: 'mem', size: 0, chunks: [] };
    assert.throws(decodes(manifest([file, file])), corrupt);
  });

  it('rejects other versions, bad hashes, unknown fields and non-JSON', () => {
    assert.throws(decodes({ ...manifest([]), version: 2 }), corrupt);
    assert.throws(decodes(manifest([{ name: 'mem', size: 1, chunks: ['XYZ'] }])), corrupt);
    assert.throws(decodes({ ...manifest([]), extra: true }), corrupt);
    assert.throws(() => decodeManifest(Buffer.from('not json'), 'k'), corrupt);
  });

  it('readManifest reports NOT_FOUND for a missing manifest and SNAPSHOT_CORRUPT for a bad one', async () => {
    const s = await scratch();
    try {
      await rejectsWith(readManifest(s.blob, 'snapshots/none.json'), 'NOT_FOUND', 'key');
      await s.blob.put('snapshots/bad.json', Buffer.from('[1,2'));
      await rejectsWith(readManifest(s.blob, 'snapshots/bad.json'), 'SNAPSHOT_CORRUPT', 'snapshot');
    } finally {
      await s.cleanup();
    }
  });
});
