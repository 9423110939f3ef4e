import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import type { Actor } from '../../src/core/types.ts';
import { decodeActor, encodeActor } from '../../src/store/actor-codec.ts';

const suspended: Actor = {
  space: 'tenant-07',
  name: 'actor-012345',
  template: 'web',
  status: 'SUSPENDED',
  version: 6,
  labels: {},
  history: [
    'snapshots/tenant-07/actor-012345/20261122T184900000Z-aaaaaa/manifest.json',
    'snapshots/_golden/web/0001/manifest.json',
  ],
  snapshot: 'snapshots/tenant-07/actor-012345/20261122T184906566Z-edd7dd/manifest.json',
  node: 'node-0',
  lastActivity: '2026-11-22T18:49:06.564Z',
  createdAt: '2026-11-22T18:49:06.560Z',
  updatedAt: '2026-11-22T18:49:06.567Z',
  lastOperation: {
    id: '5f8c61ab-cb76-45f3-9c75-8c1afc714fe2',
    kind: 'suspend',
    startedAt: '2026-11-22T18:49:06.566Z',
    finishedAt: '2026-11-22T18:49:06.566Z',
    phases: { checkpoint: 64, upload: 19.36, total: 96 },
    snapshot: {
      rawBytes: 745596,
      storedBytes: 32213,
      uploadedChunks: 3,
      reusedChunks: 11,
      zeroChunks: 177,
      deltaFiles: 2,
    },
  },
};

describe('actor codec (RedisStore records)', () => {
  it('round-trips a suspended actor, and is much smaller than its JSON', () => {
    const text = encodeActor(suspended);
    assert.deepEqual(decodeActor(suspended.space, suspended.name, text), suspended);
    assert.ok(text.startsWith('6\n'));
    assert.ok(!text.includes('actor-012345'), text); // the name and its own snapshot prefix are the key's
    assert.ok(text.length < 0.65 * JSON.stringify(suspended).length, `${text.length} bytes`);
  });

  it('round-trips every optional field, labels, and keys that look like its own abbreviations', () => {
    const running: Actor = {
      ...suspended,
      status: 'SUSPENDING',
      labels: { team: 'a', '~': '~/x' },
      history: ['~/not-own', '~~odd', 'snapshots/other/actor/1/manifest.json'],
      snapshot: '~starts-with-tilde',
      pendingSnapshot: 'snapshots/tenant-07/actor-012345/x/manifest.json',
      worker: 'w1',
      address: '10.0.0.2:8080',
      localSnapshot: '/var/lib/torpor/checkpoints/x',
      transitionDeadline: '2026-11-22T18:51:06.564Z',
      reason: 'a "quoted"\nreason',
      lastOperation: { kind: 'resume', startedAt: '2026-11-22T18:49:06.566Z', phases: {}, error: 'boom' },
    };
    assert.deepEqual(decodeActor(running.space, running.name, encodeActor(running)), running);
  });

  it('fields it does not know keep their names (records of a newer build)', () => {
    const newer = { ...suspended, future: { x: 1 } } as Actor;
    assert.deepEqual(decodeActor(newer.space, newer.name, encodeActor(newer)), newer);
  });
});
