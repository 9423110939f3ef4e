// ActorLocks on a real store (SQLite in memory): the actor read that comes with the lease, and an operation's last
// write ending the lease itself (lastFence/ended), with no renewal taking it back afterwards.
import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { ActorLocks } from '../../src/control/actor-lock.ts';
import { isTorporError } from '../../src/core/errors.ts';
import { SqliteStore } from '../../src/store/sqlite.ts';
import { actor } from '../store/conformance.ts';

const REF = { space: 'default', name: 'a1' };
const LEASE = 'default/actor/a1';
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

async function setup(ttlMs = 10_000) {
  const store = SqliteStore.open(':memory:');
  await store.ensureSpace('default');
  const created = await store.createActor(actor('default', 'a1'));
  const locks = new ActorLocks({ store, holder: 'me', ttlMs, waitMs: 1000 });
  return { store, created, locks };
}

describe('ActorLocks', () => {
  it('hands the operation the actor as it was once the lease was held; undefined when there is none', async () => {
    const { store, created, locks } = await setup();
    try {
      assert.deepEqual(await locks.run(REF, async (current) => current), created);
      assert.equal(await locks.run({ space: 'default', name: 'gone' }, async (current) => current), undefined);
      // Released at the end: another holder takes it at once.
      assert.notEqual(await store.acquireLease(LEASE, 'other', 10_000), undefined);
    } finally {
      await store.close();
    }
  });

  it("an operation's last write ends the lease: no release after it, no renewal taking it back", async () => {
    // A short lease: renewals (every ttl/3) would fire during the wait below if they were still running.
    const { store, created, locks } = await setup(300);
    try {
      await locks.run(REF, async (current) => {
        const fence = locks.lastFence(REF);
        assert.ok(fence?.release, 'the last fence ends the lease');
        await store.casActor({ ...current!, labels: { last: 'yes' } }, current!.version, fence);
        locks.ended(REF);
        assert.equal(locks.fence(REF), undefined, 'nothing is fenced by an ended lease');
        // Still inside the operation: the lease is free for others, and stays free.
        await sleep(400);
        const other = await store.acquireLease(LEASE, 'other', 10_000);
        assert.notEqual(other, undefined, 'the lease was not taken back by a renewal');
        await store.releaseLease(LEASE, 'other');
      });
      assert.equal((await store.getActor('default', 'a1'))?.version, created.version + 1);
    } finally {
      await store.close();
    }
  });

  it('a last write that is refused leaves the lease to be released when the operation ends', async () => {
    const { store, created, locks } = await setup();
    try {
      await locks.run(REF, async () => {
        const fence = locks.lastFence(REF);
        await assert.rejects(store.casActor(created, created.version + 5, fence), (err: unknown) => {
          assert.ok(isTorporError(err));
          assert.equal(err.code, 'CONFLICT');
          return true;
        });
        assert.equal(await store.acquireLease(LEASE, 'other', 10_000), undefined, 'still held');
      });
      assert.notEqual(await store.acquireLease(LEASE, 'other', 10_000), undefined, 'released at the end');
    } finally {
      await store.close();
    }
  });
});
