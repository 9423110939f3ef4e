// The behaviour every StateStore must have, as one suite each implementation registers:
//   stateStoreConformance('sqlite (memory)', async () => ({ store, cleanup }))
// Each test gets a fresh, empty store from `make`. When the backing store can be shared (a file, a Redis server),
// `second` opens another client on it, and the concurrency tests split their callers across both clients.
// The suite closes the stores `second` returns; `cleanup` closes `store` and removes the backing data.
import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { isTorporError } from '../../src/core/errors.ts';
import type { Actor, ActorRef, Template, Worker } from '../../src/core/types.ts';
import { type Change, type ChangeKind, SNAPSHOT_SWEEP_LEASE, type StateStore } from '../../src/store/store.ts';

export interface StoreFixture {
  store: StateStore;
  cleanup: () => Promise<void>;
  /** Another client on the same backing store, when it has one. */
  second?: () => Promise<StateStore>;
}

interface Context {
  store: StateStore;
  /** The clients to spread concurrent callers over: `store`, plus a second client when the fixture has one. */
  clients: StateStore[];
}

export function stateStoreConformance(name: string, make: () => Promise<StoreFixture>): void {
  const test = (title: string, body: (ctx: Context) => Promise<void>) =>
    it(title, { timeout: 10_000 }, async () => {
      const fixture = await make();
      const others = fixture.second ? [await fixture.second()] : [];
      try {
        await body({ store: fixture.store, clients: [fixture.store, ...others] });
      } finally {
        for (const other of others) await other.close();
        await fixture.cleanup();
      }
    });

  describe(`StateStore conformance: ${name}`, () => {
    describe('templates', () => templateTests(test));
    describe('spaces', () => spaceTests(test));
    describe('actors', () => actorTests(test));
    describe('listing', () => listingTests(test));
    describe('workers', () => workerTests(test));
    describe('leases', () => leaseTests(test));
    describe('fencing', () => fencingTests(test));
    describe('snapshot writes', () => snapshotWriteTests(test));
    describe('watch', () => watchTests(test));
  });
}

type Register = (title: string, body: (ctx: Context) => Promise<void>) => void;

// ── fixtures ─────────────────────────────────────────────────────────────────────────────────────────────────

export function template(name: string, overrides: Partial<Template> = {}): Template {
  return {
    name,
    image: `images/${name}`,
    command: ['/bin/server'],
    env: { MODE: 'test' },
    port: 8080,
    readiness: { path: '/healthz', timeoutSeconds: 30 },
    runtime: 'gvisor',
    resources: { memoryMiB: 256, vcpus: 1 },
    idleTimeoutSeconds: 300,
    snapshot: { retain: 3 },
    network: { egress: 'allow-all' },
    createdAt: '2025-01-01T00:00:00.000Z',
    ...overrides,
  };
}

export function actor(space: string, name: string): Omit<Actor, 'version'> {
  const at = '2025-01-01T00:00:00.000Z';
  return {
    space,
    name,
    template: 'web',
    status: 'SUSPENDED',
    labels: { team: 'a' },
    history: [],
    lastActivity: at,
    createdAt: at,
    updatedAt: at,
  };
}

export function worker(id: string, overrides: Partial<Worker> = {}): Worker {
  return {
    id,
    node: 'node-1',
    runtime: 'gvisor',
    state: 'free',
    host: `10.0.0.1:${7000 + id.length}`,
    leaseExpiresAt: new Date(Date.now() + 60_000).toISOString(),
    ...overrides,
  };
}

async function rejectsWith(promise: Promise<unknown>, code: string, field?: string): Promise<void> {
  await assert.rejects(promise, (err: unknown) => {
    assert.ok(isTorporError(err), `expected a TorporError, got ${String(err)}`);
    assert.equal(err.code, code, err.message);
    if (field !== undefined) assert.equal(err.field, field);
    return true;
  });
}

function shuffled<T>(items: T[]): T[] {
  const copy = [...items];
  for (let i = copy.length - 1; i > 0; i--) {
    const j = Math.floor(Math.random() * (i + 1));
    [copy[i], copy[j]] = [copy[j]!, copy[i]!];
  }
  return copy;
}

function clientFor(clients: StateStore[], i: number): StateStore {
  return clients[i % clients.length]!;
}

// ── templates and spaces ─────────────────────────────────────────────────────────────────────────────────────

function templateTests(test: Register): void {
  test('create then get returns the same template', async ({ store }) => {
    const created = await store.createTemplate(template('web'));
    assert.deepEqual(created, template('web'));
    assert.deepEqual(await store.getTemplate('web'), template('web'));
    assert.equal(await store.getTemplate('missing'), undefined);
  });

  test('templates are immutable: a second create is ALREADY_EXISTS and changes nothing', async ({ store }) => {
    await store.createTemplate(template('web'));
    await rejectsWith(store.createTemplate(template('web', { image: 'images/other' })), 'ALREADY_EXISTS', 'name');
    assert.equal((await store.getTemplate('web'))?.image, 'images/web');
  });

  test('setTemplateGolden sets only the golden snapshot', async ({ store }) => {
    await store.createTemplate(template('web'));
    const updated = await store.setTemplateGolden('web', 'snapshots/web/golden.json');
    assert.deepEqual(updated, { ...template('web'), goldenSnapshot: 'snapshots/web/golden.json' });
    assert.deepEqual(await store.getTemplate('web'), updated);
  });

  test('setTemplateGolden on a missing template is NOT_FOUND', async ({ store }) => {
    await rejectsWith(store.setTemplateGolden('missing', 'k'), 'NOT_FOUND');
    assert.equal(await store.getTemplate('missing'), undefined);
  });
}

function spaceTests(test: Register): void {
  test('ensureSpace is idempotent', async ({ store }) => {
    assert.equal(await store.getSpace('team-a'), undefined);
    const first = await store.ensureSpace('team-a');
    const again = await store.ensureSpace('team-a');
    assert.equal(first.name, 'team-a');
    assert.deepEqual(again, first);
    assert.deepEqual(await store.getSpace('team-a'), first);
  });

  test('createActor creates its space', async ({ store }) => {
    await store.createActor(actor('team-b', 'one'));
    assert.equal((await store.getSpace('team-b'))?.name, 'team-b');
  });
}

// ── actors ───────────────────────────────────────────────────────────────────────────────────────────────────

function actorTests(test: Register): void {
  test('create stores version 1; a duplicate is ALREADY_EXISTS and changes nothing', async ({ store }) => {
    const created = await store.createActor(actor('default', 'a1'));
    assert.equal(created.version, 1);
    assert.deepEqual(await store.getActor('default', 'a1'), created);
    await rejectsWith(store.createActor({ ...actor('default', 'a1'), template: 'other' }), 'ALREADY_EXISTS', 'name');
    assert.deepEqual(await store.getActor('default', 'a1'), created);
    assert.equal(await store.getActor('other-space', 'a1'), undefined);
  });

  test('CAS with the current version writes, increments the version and sets updatedAt', async ({ store }) => {
    const created = await store.createActor(actor('default', 'a1'));
    const before = Date.now();
    const next = await store.casActor({ ...created, status: 'RESUMING', worker: 'w1' }, 1);
    assert.equal(next.version, 2);
    assert.equal(next.status, 'RESUMING');
    assert.ok(Date.parse(next.updatedAt) >= before - 1, `updatedAt ${next.updatedAt} is not now`);
    assert.deepEqual(await store.getActor('default', 'a1'), next);
    const third = await store.casActor({ ...next, status: 'RUNNING' }, 2);
    assert.equal(third.version, 3);
  });

  test('CAS with a stale version is CONFLICT naming both versions, and changes nothing', async ({ store }) => {
    const created = await store.createActor(actor('default', 'a1'));
    const current = await store.casActor({ ...created, status: 'RESUMING' }, 1);
    await assert.rejects(store.casActor({ ...created, status: 'FAILED' }, 1), (err: unknown) => {
      assert.ok(isTorporError(err, 'CONFLICT'), String(err));
      assert.match(err.message, /expected version 1/);
      assert.match(err.message, /version 2/);
      return true;
    });
    assert.deepEqual(await store.getActor('default', 'a1'), current);
  });

  test('CAS on a missing actor is NOT_FOUND and creates nothing', async ({ store }) => {
    const ghost: Actor = { ...actor('default', 'ghost'), version: 1 };
    await rejectsWith(store.casActor(ghost, 1), 'NOT_FOUND');
    assert.equal(await store.getActor('default', 'ghost'), undefined);
  });

  test('20 concurrent CAS writers on one version: exactly one wins', async ({ store, clients }) => {
    const created = await store.createActor(actor('default', 'a1'));
    const writers = Array.from({ length: 20 }, (_, i) =>
      clientFor(clients, i).casActor({ ...created, labels: { writer: String(i) } }, 1),
    );
    const results = await Promise.allSettled(writers);
    const won = results.filter((r) => r.status === 'fulfilled');
    const lost = results.filter((r) => r.status === 'rejected');
    assert.equal(won.length, 1);
    for (const r of lost) assert.ok(isTorporError(r.reason, 'CONFLICT'), String(r.reason));
    const stored = await store.getActor('default', 'a1');
    assert.equal(stored?.version, 2);
    assert.deepEqual(stored, won[0]!.value);
  });

  test('delete requires the current version', async ({ store }) => {
    const created = await store.createActor(actor('default', 'a1'));
    await store.casActor(created, 1);
    await rejectsWith(store.deleteActor('default', 'a1', 1), 'CONFLICT');
    assert.equal((await store.getActor('default', 'a1'))?.version, 2);
    await store.deleteActor('default', 'a1', 2);
    assert.equal(await store.getActor('default', 'a1'), undefined);
    await rejectsWith(store.deleteActor('default', 'a1', 2), 'NOT_FOUND');
  });

  test('a deleted actor can be created again at version 1', async ({ store }) => {
    await store.createActor(actor('default', 'a1'));
    await store.deleteActor('default', 'a1', 1);
    assert.equal((await store.createActor(actor('default', 'a1'))).version, 1);
  });
}

// ── listing ──────────────────────────────────────────────────────────────────────────────────────────────────

async function listAllActors(store: StateStore, space: string | undefined, limit: number) {
  const pages: Actor[][] = [];
  let cursor: string | undefined;
  do {
    const page = await store.listActors(space, { limit, cursor });
    pages.push(page.items);
    cursor = page.nextCursor;
    assert.ok(pages.length <= 100, 'listing does not terminate');
  } while (cursor !== undefined);
  return pages;
}

function listingTests(test: Register): void {
  const names = (n: number, prefix: string) =>
    Array.from({ length: n }, (_, i) => `${prefix}-${String(i).padStart(2, '0')}`);

  async function create25(store: StateStore): Promise<string[]> {
    const keys = [...names(12, 'alpha').map((n) => ['space-a', n]), ...names(13, 'beta').map((n) => ['space-b', n])];
    for (const [space, name] of shuffled(keys)) await store.createActor(actor(space!, name!));
    return keys.map(([space, name]) => `${space}/${name}`).sort();
  }

  test('25 actors in 2 spaces, limit 10: pages of 10, 10, 5, ordered, no gaps or duplicates', async ({ store }) => {
    const expected = await create25(store);
    const pages = await listAllActors(store, undefined, 10);
    assert.deepEqual(
      pages.map((p) => p.length),
      [10, 10, 5],
    );
    assert.deepEqual(
      pages.flat().map((a) => `${a.space}/${a.name}`),
      expected,
    );
  });

  test('listing one space returns only that space, in name order', async ({ store }) => {
    await create25(store);
    const pages = await listAllActors(store, 'space-b', 5);
    assert.deepEqual(
      pages.map((p) => p.length),
      [5, 5, 3],
    );
    assert.deepEqual(
      pages.flat().map((a) => a.name),
      names(13, 'beta'),
    );
    assert.ok(pages.flat().every((a) => a.space === 'space-b'));
    assert.deepEqual((await store.listActors('nobody')).items, []);
  });

  test('the default limit is 100 and an exact last page has no next cursor', async ({ store }) => {
    await create25(store);
    const all = await store.listActors(undefined);
    assert.equal(all.items.length, 25);
    assert.equal(all.nextCursor, undefined);
    const exact = await store.listActors('space-a', { limit: 12 });
    assert.equal(exact.items.length, 12);
    assert.equal(exact.nextCursor, undefined);
  });

  test('a cursor the store did not make is INVALID_ARGUMENT on field cursor', async ({ store }) => {
    await create25(store);
    const junk = ['not a cursor!', '', Buffer.from('{"space":1}').toString('base64url'), 'AAAA'];
    for (const cursor of junk) {
      await rejectsWith(store.listActors(undefined, { cursor }), 'INVALID_ARGUMENT', 'cursor');
      await rejectsWith(store.listTemplates({ cursor }), 'INVALID_ARGUMENT', 'cursor');
      await rejectsWith(store.listWorkers({ cursor }), 'INVALID_ARGUMENT', 'cursor');
    }
  });

  test('templates page by name', async ({ store }) => {
    const all = names(7, 't');
    for (const name of shuffled(all)) await store.createTemplate(template(name));
    const first = await store.listTemplates({ limit: 4 });
    assert.ok(first.nextCursor);
    const second = await store.listTemplates({ limit: 4, cursor: first.nextCursor });
    assert.equal(second.nextCursor, undefined);
    assert.deepEqual(
      [...first.items, ...second.items].map((t) => t.name),
      all,
    );
  });

  test('workers page by id', async ({ store }) => {
    const all = names(5, 'w');
    for (const id of shuffled(all)) await store.putWorker(worker(id));
    const first = await store.listWorkers({ limit: 3 });
    const second = await store.listWorkers({ limit: 3, cursor: first.nextCursor });
    assert.equal(second.nextCursor, undefined);
    assert.deepEqual(
      [...first.items, ...second.items].map((w) => w.id),
      all,
    );
  });
}

// ── workers ──────────────────────────────────────────────────────────────────────────────────────────────────

function workerTests(test: Register): void {
  const who = (i: number): ActorRef => ({ space: 'default', name: `actor-${i}` });

  test('putWorker upserts exactly as given; deleteWorker removes', async ({ store }) => {
    const w = worker('w1');
    assert.deepEqual(await store.putWorker(w), w);
    assert.deepEqual(await store.getWorker('w1'), w);
    const busy = { ...w, state: 'busy' as const, actor: who(1) };
    await store.putWorker(busy);
    assert.deepEqual(await store.getWorker('w1'), busy);
    await store.deleteWorker('w1');
    assert.equal(await store.getWorker('w1'), undefined);
    await store.deleteWorker('w1');
  });

  test('50 concurrent claimers on 10 free workers: 10 distinct claims, 40 undefined', async ({ store, clients }) => {
    for (let i = 0; i < 10; i++) await store.putWorker(worker(`w${i}`, { node: `node-${i % 3}` }));
    const claims = await Promise.all(
      Array.from({ length: 50 }, (_, i) => clientFor(clients, i).claimWorker({ runtime: 'gvisor' }, who(i))),
    );
    const won = claims.flatMap((w, i) => (w ? [{ worker: w, by: who(i) }] : []));
    assert.equal(won.length, 10);
    assert.equal(claims.filter((w) => w === undefined).length, 40);
    assert.equal(new Set(won.map((c) => c.worker.id)).size, 10);
    for (const { worker: w, by } of won) {
      assert.equal(w.state, 'busy');
      assert.deepEqual(w.actor, by);
      assert.deepEqual(await store.getWorker(w.id), w);
    }
  });

  test('workers whose lease expired are never claimed', async ({ store }) => {
    const past = new Date(Date.now() - 1000).toISOString();
    await store.putWorker(worker('stale', { leaseExpiresAt: past }));
    await store.putWorker(worker('short', { leaseExpiresAt: new Date(Date.now() + 50).toISOString() }));
    await sleep(80);
    assert.equal(await store.claimWorker({ runtime: 'gvisor' }, who(1)), undefined);
    assert.equal(await store.claimWorker({ runtime: 'gvisor', workerId: 'stale' }, who(1)), undefined);
    assert.equal((await store.getWorker('stale'))?.state, 'free');
    await store.putWorker(worker('stale'));
    assert.equal((await store.claimWorker({ runtime: 'gvisor' }, who(1)))?.id, 'stale');
  });

  test('renewWorkerLease extends the lease and keeps a concurrent claim', async ({ store }) => {
    await store.putWorker(worker('r1', { leaseExpiresAt: new Date(Date.now() + 50).toISOString() }));
    assert.equal((await store.claimWorker({ runtime: 'gvisor' }, who(1)))?.id, 'r1');
    const later = new Date(Date.now() + 60_000).toISOString();
    assert.equal(await store.renewWorkerLease('r1', later), true);
    const renewed = await store.getWorker('r1');
    assert.equal(renewed?.leaseExpiresAt, later);
    assert.equal(renewed?.state, 'busy');
    assert.deepEqual(renewed?.actor, who(1));
    assert.equal(await store.renewWorkerLease('missing', later), false);
    assert.equal(await store.getWorker('missing'), undefined);
  });

  test('only workers of the requested runtime are claimed', async ({ store }) => {
    await store.putWorker(worker('g1', { runtime: 'gvisor' }));
    await store.putWorker(worker('m1', { runtime: 'microvm' }));
    assert.equal((await store.claimWorker({ runtime: 'microvm' }, who(1)))?.id, 'm1');
    assert.equal(await store.claimWorker({ runtime: 'microvm' }, who(2)), undefined);
    assert.equal((await store.getWorker('g1'))?.state, 'free');
  });

  test('busy workers are not claimed again', async ({ store }) => {
    await store.putWorker(worker('w1'));
    assert.equal((await store.claimWorker({ runtime: 'gvisor' }, who(1)))?.id, 'w1');
    assert.equal(await store.claimWorker({ runtime: 'gvisor' }, who(2)), undefined);
    assert.equal(await store.claimWorker({ runtime: 'gvisor', workerId: 'w1' }, who(2)), undefined);
    assert.deepEqual((await store.getWorker('w1'))?.actor, who(1));
  });

  test('preferNodes are tried in order before any other node', async ({ store }) => {
    for (const node of ['n1', 'n2', 'n3']) {
      for (let i = 0; i < 3; i++) await store.putWorker(worker(`${node}-w${i}`, { node }));
    }
    const nodes: string[] = [];
    for (let i = 0; i < 9; i++) {
      const claimed = await store.claimWorker({ runtime: 'gvisor', preferNodes: ['n3', 'n2'] }, who(i));
      nodes.push(claimed!.node);
    }
    assert.deepEqual(nodes, ['n3', 'n3', 'n3', 'n2', 'n2', 'n2', 'n1', 'n1', 'n1']);
  });

  test('workerId claims exactly that worker', async ({ store }) => {
    for (let i = 0; i < 5; i++) await store.putWorker(worker(`w${i}`));
    assert.equal((await store.claimWorker({ runtime: 'gvisor', workerId: 'w3' }, who(1)))?.id, 'w3');
    assert.equal(await store.claimWorker({ runtime: 'gvisor', workerId: 'missing' }, who(2)), undefined);
  });

  test('excludeWorkers are never claimed', async ({ store }) => {
    await store.putWorker(worker('w1'));
    await store.putWorker(worker('w2'));
    for (let i = 0; i < 5; i++) {
      const claimed = await store.claimWorker({ runtime: 'gvisor', excludeWorkers: ['w1'] }, who(i));
      assert.equal(claimed?.id, 'w2');
      assert.ok(await store.releaseWorker('w2', who(i)));
    }
    assert.equal(await store.claimWorker({ runtime: 'gvisor', excludeWorkers: ['w1', 'w2'] }, who(9)), undefined);
  });

  test('release frees only a worker held by that actor', async ({ store }) => {
    await store.putWorker(worker('w1'));
    await store.putWorker(worker('w2'));
    const held = await store.claimWorker({ runtime: 'gvisor', workerId: 'w1' }, who(1));
    assert.ok(held);
    assert.equal(await store.releaseWorker('w1', who(2)), false);
    assert.equal(await store.releaseWorker('w1', { space: 'other', name: 'actor-1' }), false);
    assert.equal(await store.releaseWorker('w2', who(1)), false);
    assert.deepEqual(await store.getWorker('w1'), held);
    assert.equal(await store.releaseWorker('w1', who(1)), true);
    const freed = await store.getWorker('w1');
    assert.equal(freed?.state, 'free');
    assert.equal(freed?.actor, undefined);
    assert.equal(await store.releaseWorker('w1', who(1)), false);
    assert.equal((await store.claimWorker({ runtime: 'gvisor', workerId: 'w1' }, who(2)))?.id, 'w1');
  });
}

// ── leases ───────────────────────────────────────────────────────────────────────────────────────────────────

function leaseTests(test: Register): void {
  test('acquire, refuse another holder, release by the holder', async ({ store }) => {
    assert.equal(typeof (await store.acquireLease('reconciler', 'a', 10_000)), 'number');
    assert.equal(await store.acquireLease('reconciler', 'b', 10_000), undefined);
    assert.equal(typeof (await store.acquireLease('other-key', 'b', 10_000)), 'number');
    await store.releaseLease('reconciler', 'a');
    assert.equal(typeof (await store.acquireLease('reconciler', 'b', 10_000)), 'number');
  });

  test('the same holder extends its lease and keeps its token', async ({ store }) => {
    assert.notEqual(await store.acquireLease('k', 'a', 50), undefined);
    await sleep(25);
    assert.notEqual(await store.acquireLease('k', 'a', 10_000), undefined);
    await sleep(60);
    assert.equal(await store.acquireLease('k', 'b', 10_000), undefined, 'the extension did not hold');
    // A lease too long to lapse in between, so this is surely an extension: it keeps the holding's token.
    const token = await store.acquireLease('k2', 'a', 10_000);
    assert.ok(token !== undefined && token >= 1, `token ${token}`);
    assert.equal(await store.acquireLease('k2', 'a', 10_000), token);
  });

  test('an expired lease can be taken by another holder', async ({ store }) => {
    assert.notEqual(await store.acquireLease('k', 'a', 50), undefined);
    assert.equal(await store.acquireLease('k', 'b', 50), undefined);
    await sleep(80);
    assert.notEqual(await store.acquireLease('k', 'b', 10_000), undefined);
    assert.equal(await store.acquireLease('k', 'a', 10_000), undefined);
  });

  test('release by a non-holder is ignored', async ({ store }) => {
    assert.notEqual(await store.acquireLease('k', 'a', 10_000), undefined);
    await store.releaseLease('k', 'b');
    assert.equal(await store.acquireLease('k', 'b', 10_000), undefined);
    await store.releaseLease('missing', 'b');
  });

  test('concurrent acquirers: exactly one holds the lease', async ({ clients }) => {
    const results = await Promise.all(
      Array.from({ length: 20 }, (_, i) => clientFor(clients, i).acquireLease('k', `holder-${i}`, 10_000)),
    );
    assert.equal(results.filter((token) => token !== undefined).length, 1);
  });

  test('tokens increase with every new holding: takeover, release, re-acquire after expiry', async ({ clients }) => {
    const [one, two] = [clientFor(clients, 0), clientFor(clients, 1)];
    const tokens: (number | undefined)[] = [];
    tokens.push(await one.acquireLease('default/a1', 'a', 40));
    await sleep(60);
    tokens.push(await two.acquireLease('default/a1', 'b', 10_000)); // takeover of an expired lease
    await two.releaseLease('default/a1', 'b');
    tokens.push(await one.acquireLease('default/a1', 'a', 40)); // after a release
    await sleep(60);
    tokens.push(await one.acquireLease('default/a1', 'a', 10_000)); // the same holder, after its lease expired
    tokens.push(await two.acquireLease('default/a1', 'a', 10_000)); // an extension: the same token
    assert.ok(
      tokens.every((t) => typeof t === 'number'),
      `tokens ${tokens}`,
    );
    const [t1, t2, t3, t4, t5] = tokens as number[];
    assert.ok(t1! < t2! && t2! < t3! && t3! < t4!, `tokens do not increase: ${tokens}`);
    assert.equal(t5, t4);
    // Another key's tokens do not disturb this one's order.
    await one.acquireLease('default/other', 'c', 10_000);
    await one.releaseLease('default/a1', 'a');
    assert.ok((await two.acquireLease('default/a1', 'd', 10_000))! > t4!);
  });

  test('acquireActorLease: the token and the actor as it is once held; the same lease as acquireLease', async ({
    store,
    clients,
  }) => {
    const [one, two] = [clientFor(clients, 0), clientFor(clients, 1)];
    await store.ensureSpace('default');
    const created = await store.createActor(actor('default', 'a1'));
    const held = await one.acquireActorLease('default/actor/a1', 'a', 10_000, { space: 'default', name: 'a1' });
    assert.ok(held && held.token >= 1, `lease ${JSON.stringify(held)}`);
    assert.deepEqual(held.actor, created);
    // Another holder is refused either way; the holder extends it and keeps its token, as with acquireLease.
    assert.equal(
      await two.acquireActorLease('default/actor/a1', 'b', 10_000, { space: 'default', name: 'a1' }),
      undefined,
    );
    assert.equal(await two.acquireLease('default/actor/a1', 'b', 10_000), undefined);
    assert.equal(await one.acquireLease('default/actor/a1', 'a', 10_000), held.token);
    // Its token fences writes; the actor it returns is the one a write that follows changes.
    const next = await one.casActor({ ...held.actor!, labels: { n: '2' } }, held.actor!.version, {
      lease: 'default/actor/a1',
      token: held.token,
    });
    const again = await one.acquireActorLease('default/actor/a1', 'a', 10_000, { space: 'default', name: 'a1' });
    assert.deepEqual(again, { token: held.token, actor: next });
    // A missing actor: the lease is still taken, with no actor.
    const none = await two.acquireActorLease('default/actor/gone', 'b', 10_000, { space: 'default', name: 'gone' });
    assert.ok(none && none.token >= 1 && none.actor === undefined, `lease ${JSON.stringify(none)}`);
    await one.releaseLease('default/actor/a1', 'a');
    const taken = await two.acquireActorLease('default/actor/a1', 'b', 10_000, { space: 'default', name: 'a1' });
    assert.ok(taken && taken.token > held.token, 'a new holding has a higher token');
    // The lease must be named after the actor's space (it fences writes there), as a Fence.
    await rejectsWith(
      one.acquireActorLease('other/actor/a1', 'a', 10_000, { space: 'default', name: 'a1' }),
      'INVALID_ARGUMENT',
      'key',
    );
  });
}

// ── fencing ──────────────────────────────────────────────────────────────────────────────────────────────────

function fencingTests(test: Register): void {
  const LEASE = 'default/a1';

  test("a stale holder's late write is LEASE_LOST and changes nothing; the new holder's write wins", async ({
    store,
    clients,
  }) => {
    const [stale, fresh] = [clientFor(clients, 1), clientFor(clients, 0)];
    const created = await store.createActor(actor('default', 'a1'));
    const oldToken = (await stale.acquireLease(LEASE, 'old', 40))!;
    const read = (await stale.getActor('default', 'a1'))!; // the old holder read version 1, then stalled
    await sleep(60);
    const newToken = (await fresh.acquireLease(LEASE, 'new', 10_000))!;
    assert.ok(newToken > oldToken);

    // The old holder wakes up: its write carries the right version but a lease that has been taken over.
    await rejectsWith(
      stale.casActor({ ...read, status: 'FAILED' }, 1, { lease: LEASE, token: oldToken }),
      'LEASE_LOST',
      'fence',
    );
    await rejectsWith(stale.deleteActor('default', 'a1', 1, { lease: LEASE, token: oldToken }), 'LEASE_LOST', 'fence');
    assert.deepEqual(await store.getActor('default', 'a1'), created);

    const next = await fresh.casActor({ ...read, status: 'RESUMING' }, 1, { lease: LEASE, token: newToken });
    assert.equal(next.version, 2);
    assert.deepEqual(await store.getActor('default', 'a1'), next);
    // A lost lease is reported before a stale version: re-reading the actor would not help the old holder.
    await rejectsWith(stale.casActor(next, 1, { lease: LEASE, token: oldToken }), 'LEASE_LOST', 'fence');
    await rejectsWith(fresh.casActor(next, 1, { lease: LEASE, token: newToken }), 'CONFLICT');
    await fresh.deleteActor('default', 'a1', 2, { lease: LEASE, token: newToken });
    assert.equal(await store.getActor('default', 'a1'), undefined);
  });

  test('a fenced write after the lease expired or was released is LEASE_LOST', async ({ store }) => {
    const created = await store.createActor(actor('default', 'a1'));
    const released = (await store.acquireLease(LEASE, 'a', 10_000))!;
    assert.equal((await store.casActor(created, 1, { lease: LEASE, token: released })).version, 2);
    await store.releaseLease(LEASE, 'a');
    await rejectsWith(store.casActor(created, 2, { lease: LEASE, token: released }), 'LEASE_LOST', 'fence');
    const expired = (await store.acquireLease(LEASE, 'b', 40))!;
    await sleep(60); // nobody takes it over: the holding just ends
    await rejectsWith(store.casActor(created, 2, { lease: LEASE, token: expired }), 'LEASE_LOST', 'fence');
    await rejectsWith(store.casActor(created, 2, { lease: 'default/never', token: 1 }), 'LEASE_LOST', 'fence');
    assert.equal((await store.getActor('default', 'a1'))?.version, 2);
    // Unfenced writes are not affected by leases.
    assert.equal((await store.casActor(created, 2)).version, 3);
  });

  test('a fenced write with release ends the holding when it succeeds, and only then', async ({ store, clients }) => {
    const [holder, other] = [clientFor(clients, 0), clientFor(clients, 1)];
    const created = await store.createActor(actor('default', 'a1'));
    const token = (await holder.acquireLease(LEASE, 'a', 10_000))!;
    // A refused write (stale version) leaves the holding as it was.
    await rejectsWith(holder.casActor(created, 7, { lease: LEASE, token, release: true }), 'CONFLICT');
    assert.equal(await other.acquireLease(LEASE, 'b', 10_000), undefined, 'still held after a refused write');
    assert.equal(await holder.acquireLease(LEASE, 'a', 10_000), token);
    const written = await holder.casActor(created, 1, { lease: LEASE, token, release: true });
    assert.equal(written.version, 2);
    assert.deepEqual(await store.getActor('default', 'a1'), written);
    // Ended: the holding's token fences nothing any more, and another holder takes the lease at once.
    await rejectsWith(holder.casActor(written, 2, { lease: LEASE, token }), 'LEASE_LOST', 'fence');
    const next = await other.acquireLease(LEASE, 'b', 10_000);
    assert.ok(next !== undefined && next > token, `token ${next} after ${token}`);
    assert.equal(await holder.acquireLease(LEASE, 'a', 10_000), undefined);
  });

  test("a fence must be a lease of the actor's space with a valid token: INVALID_ARGUMENT", async ({ store }) => {
    const created = await store.createActor(actor('default', 'a1'));
    const global = (await store.acquireLease('reconciler', 'a', 10_000))!;
    const otherSpace = (await store.acquireLease('team-b/a1', 'a', 10_000))!;
    await rejectsWith(
      store.casActor(created, 1, { lease: 'reconciler', token: global }),
      'INVALID_ARGUMENT',
      'fence.lease',
    );
    await rejectsWith(
      store.casActor(created, 1, { lease: 'team-b/a1', token: otherSpace }),
      'INVALID_ARGUMENT',
      'fence.lease',
    );
    await rejectsWith(
      store.deleteActor('default', 'a1', 1, { lease: 'team-b/a1', token: otherSpace }),
      'INVALID_ARGUMENT',
      'fence.lease',
    );
    await rejectsWith(store.casActor(created, 1, { lease: LEASE, token: 0 }), 'INVALID_ARGUMENT', 'fence.token');
    assert.deepEqual(await store.getActor('default', 'a1'), created);
  });

  test('a succession of holders across clients: a write after the lease changed hands is refused', async ({
    store,
    clients,
  }) => {
    await store.createActor(actor('default', 'a1'));
    const write = async (client: StateStore, holder: string, token: number): Promise<string> => {
      const current = (await client.getActor('default', 'a1'))!;
      try {
        await client.casActor({ ...current, labels: { by: holder } }, current.version, { lease: LEASE, token });
        return 'ok';
      } catch (err) {
        return isTorporError(err) ? err.code : String(err);
      }
    };
    const outcomes: string[] = [];
    let previous: { client: StateStore; holder: string; token: number } | undefined;
    for (let i = 0; i < 5; i++) {
      const client = clientFor(clients, i);
      const holder = `holder-${i}`;
      const token = await client.acquireLease(LEASE, holder, 10_000);
      assert.ok(token !== undefined && (previous === undefined || token > previous.token), `token ${token}`);
      if (previous) outcomes.push(await write(previous.client, previous.holder, previous.token));
      outcomes.push(await write(client, holder, token));
      previous = { client, holder, token };
      await client.releaseLease(LEASE, holder); // the next holder takes it over
    }
    assert.deepEqual(outcomes, ['ok', ...Array.from({ length: 4 }, () => ['LEASE_LOST', 'ok']).flat()]);
    assert.deepEqual((await store.getActor('default', 'a1'))?.labels, { by: 'holder-4' });
  });
}

// ── watch ────────────────────────────────────────────────────────────────────────────────────────────────────

/** Collects `count` changes from `store.watch(kinds)` while `act` runs, then aborts and checks the stream ends. */
async function collect(
  store: StateStore,
  kinds: ChangeKind[],
  count: number,
  act: () => Promise<void>,
): Promise<Change[]> {
  const controller = new AbortController();
  const stream = store.watch(kinds, controller.signal);
  const seen: Change[] = [];
  const consumed = (async () => {
    for await (const change of stream) {
      seen.push(change);
      if (seen.length === count) controller.abort();
    }
  })();
  await act();
  await consumed; // would time out the test if the stream ignored the abort
  return seen;
}

function watchTests(test: Register): void {
  test('delivers actor create, CAS and delete in order, then stops on abort', async ({ store }) => {
    const changes = await collect(store, ['actor'], 3, async () => {
      await store.createTemplate(template('web')); // another kind: must not be delivered
      const created = await store.createActor(actor('default', 'a1'));
      await store.casActor({ ...created, status: 'RESUMING' }, 1);
      await store.deleteActor('default', 'a1', 2);
    });
    assert.deepEqual(
      changes.map((c) => [c.kind, c.key, (c.value as Actor | undefined)?.version]),
      [
        ['actor', 'default/a1', 1],
        ['actor', 'default/a1', 2],
        ['actor', 'default/a1', undefined],
      ],
    );
    assert.equal((changes[1]!.value as Actor).status, 'RESUMING');
    assert.equal(changes[2]!.value, undefined);
  });

  test('a slow consumer loses nothing', async ({ store }) => {
    const controller = new AbortController();
    const stream = store.watch(['actor'], controller.signal);
    for (let i = 0; i < 50; i++) await store.createActor(actor('default', `a${i}`));
    const keys: string[] = [];
    for await (const change of stream) {
      keys.push(change.key);
      await sleep(1);
      if (keys.length === 50) controller.abort();
    }
    assert.deepEqual(
      keys,
      Array.from({ length: 50 }, (_, i) => `default/a${i}`),
    );
  });

  test('template and worker writes are delivered to watchers of those kinds', async ({ store }) => {
    const changes = await collect(store, ['template', 'worker'], 6, async () => {
      await store.createTemplate(template('web'));
      await store.setTemplateGolden('web', 'golden');
      await store.putWorker(worker('w1'));
      await store.claimWorker({ runtime: 'gvisor' }, { space: 'default', name: 'a1' });
      await store.releaseWorker('w1', { space: 'default', name: 'a1' });
      await store.deleteWorker('w1');
    });
    assert.deepEqual(
      changes.map((c) => [c.kind, c.key, (c.value as Worker | undefined)?.state]),
      [
        ['template', 'web', undefined],
        ['template', 'web', undefined],
        ['worker', 'w1', 'free'],
        ['worker', 'w1', 'busy'],
        ['worker', 'w1', 'free'],
        ['worker', 'w1', undefined],
      ],
    );
    assert.equal((changes[1]!.value as Template).goldenSnapshot, 'golden');
    assert.equal(changes[5]!.value, undefined);
  });

  test('a watch on an already aborted signal ends at once', async ({ store }) => {
    const stream = store.watch(['actor'], AbortSignal.abort());
    await store.createActor(actor('default', 'a1'));
    const seen: Change[] = [];
    for await (const change of stream) seen.push(change);
    assert.deepEqual(seen, []);
  });
}

// ── snapshot writes ──────────────────────────────────────────────────────────────────────────────────────────

function snapshotWriteTests(test: Register): void {
  test('a recorded write is listed until it ends', async ({ clients }) => {
    const [a, b] = [clientFor(clients, 0), clientFor(clients, 1)];
    assert.deepEqual(await a.listSnapshotWrites(), []);
    assert.equal(await a.recordSnapshotWrite('snapshots/s/a/1/manifest.json', 60_000), true);
    assert.equal(await b.recordSnapshotWrite('snapshots/s/b/2/manifest.json', 60_000), true);
    assert.deepEqual((await b.listSnapshotWrites()).sort(), [
      'snapshots/s/a/1/manifest.json',
      'snapshots/s/b/2/manifest.json',
    ]);
    await b.endSnapshotWrite('snapshots/s/a/1/manifest.json');
    await b.endSnapshotWrite('snapshots/s/a/1/manifest.json');
    assert.deepEqual(await a.listSnapshotWrites(), ['snapshots/s/b/2/manifest.json']);
  });

  test('an expired write is not listed', async ({ store }) => {
    assert.equal(await store.recordSnapshotWrite('k/short', 50), true);
    assert.equal(await store.recordSnapshotWrite('k/long', 60_000), true);
    await sleep(120);
    assert.deepEqual(await store.listSnapshotWrites(), ['k/long']);
  });

  test('while the sweep lease is held no new write begins, but one in flight is extended', async ({ clients }) => {
    const [gc, writer] = [clientFor(clients, 0), clientFor(clients, 1)];
    assert.equal(await writer.recordSnapshotWrite('k/in-flight', 60_000), true);
    assert.ok(await gc.acquireLease(SNAPSHOT_SWEEP_LEASE, 'gc-1', 60_000));
    assert.equal(await writer.recordSnapshotWrite('k/new', 60_000), false);
    assert.equal(await writer.recordSnapshotWrite('k/in-flight', 60_000), true);
    assert.deepEqual(await gc.listSnapshotWrites(), ['k/in-flight']);
    await gc.releaseLease(SNAPSHOT_SWEEP_LEASE, 'gc-1');
    assert.equal(await writer.recordSnapshotWrite('k/new', 60_000), true);
    assert.deepEqual((await gc.listSnapshotWrites()).sort(), ['k/in-flight', 'k/new']);
  });

  test('an expired write cannot be extended while the sweep lease is held', async ({ clients }) => {
    const [gc, writer] = [clientFor(clients, 0), clientFor(clients, 1)];
    assert.equal(await writer.recordSnapshotWrite('k/stalled', 50), true);
    await sleep(120);
    assert.ok(await gc.acquireLease(SNAPSHOT_SWEEP_LEASE, 'gc-1', 60_000));
    assert.equal(await writer.recordSnapshotWrite('k/stalled', 60_000), false);
    assert.deepEqual(await gc.listSnapshotWrites(), []);
  });

  test('a sweep lease that expired no longer holds writes off', async ({ clients }) => {
    const [gc, writer] = [clientFor(clients, 0), clientFor(clients, 1)];
    assert.ok(await gc.acquireLease(SNAPSHOT_SWEEP_LEASE, 'gc-1', 50));
    await sleep(120);
    assert.equal(await writer.recordSnapshotWrite('k/after', 60_000), true);
  });

  test('a bad ttl is refused', async ({ store }) => {
    await rejectsWith(store.recordSnapshotWrite('k/x', 0), 'INVALID_ARGUMENT', 'ttlMs');
    assert.deepEqual(await store.listSnapshotWrites(), []);
  });
}
