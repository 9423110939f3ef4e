// One conformance suite for every engine behind the AEnvironment API: the instance lifecycle, its JSON, bad
// input, ownership, idempotent create, TTL expiry and the "not supported" answer for undeclared capabilities.
import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import { isTorporError } from '../../src/core/errors.ts';
import { CAPABILITIES, type Engine, type Instance, instanceSchema } from '../../src/engine/engine.ts';

export interface ConformanceTarget {
  engine: Engine;
  /** An env ("name@version") that exists on the engine. */
  envName: string;
  teardown: () => Promise<void>;
}

async function rejectsWith(p: Promise<unknown>, code: string, field?: string): Promise<Error> {
  try {
    await p;
  } catch (err) {
    assert.ok(isTorporError(err), `a TorporError, got ${String(err)}`);
    assert.equal(err.code, code, err.message);
    if (field) assert.equal(err.field, field, err.message);
    return err;
  }
  assert.fail(`expected ${code}`);
}

function assertInstance(i: Instance, envName: string): void {
  // The schema the OpenAPI document publishes: every field, with its type and the status enum.
  const parsed = instanceSchema.strict().safeParse(i);
  assert.ok(parsed.success, JSON.stringify(parsed.error?.issues));
  assert.ok(i.id.length > 0);
  for (const k of ['created_at', 'updated_at'] as const) {
    assert.match(i[k], /^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$/, k);
  }
  const [name, version] = envName.split('@');
  assert.equal(i.env?.name, name);
  assert.equal(i.env?.version, version);
}

export function engineConformance(
  label: string,
  setup: () => Promise<ConformanceTarget>,
  opts: { skip?: string | undefined } = {},
): void {
  describe(`engine conformance: ${label}`, { skip: opts.skip }, () => {
    let t: ConformanceTarget;
    let engine: Engine;
    let envName: string;
    before(async () => {
      t = await setup();
      engine = t.engine;
      envName = t.envName;
    });
    after(async () => {
      await t?.teardown();
    });

    test('declares its capabilities; an undeclared one answers NOT_SUPPORTED naming the engine', async () => {
      for (const c of engine.capabilities) assert.ok((CAPABILITIES as readonly string[]).includes(c), c);
      const calls: Record<string, () => Promise<unknown>> = {
        suspend: () => engine.suspend('x'),
        resume: () => engine.resume('x'),
        pause: () => engine.pause('x'),
        fork: () => engine.fork('x', 'y'),
        exec: () => engine.exec('x', ['true']),
        route: () => engine.route('x'),
      };
      for (const c of CAPABILITIES.filter((c) => !engine.capabilities.has(c))) {
        const e = await rejectsWith(calls[c]!(), 'NOT_SUPPORTED');
        assert.equal(e.message, `${engine.name} engine does not support ${c}`);
      }
    });

    test('create, get, list, delete', async () => {
      const created = await engine.create({ envName, owner: 'alice', labels: { team: 'a' } });
      assertInstance(created, envName);
      assert.ok(['Running', 'Pending', 'Creating'].includes(created.status));
      assert.equal(created.owner, 'alice');
      assert.deepEqual(created.labels, { team: 'a' });
      assert.equal(created.ttl, '');

      const got = await engine.get(created.id);
      assertInstance(got, envName);
      assert.equal(got.id, created.id);
      assert.equal(got.created_at, created.created_at);

      const ids = async (env?: string, owner?: string) =>
        (await engine.list(env, owner ? { owner } : {})).map((i) => i.id);
      assert.ok((await ids(envName)).includes(created.id), 'listed by name@version');
      assert.ok((await ids(envName.split('@')[0])).includes(created.id), 'listed by name');
      assert.ok((await ids('*')).includes(created.id), 'listed by *');
      assert.ok((await ids()).includes(created.id), 'listed with no filter');
      assert.ok(!(await ids('other@1')).includes(created.id), 'not listed for another env');
      assert.ok((await ids(envName, 'alice')).includes(created.id), 'listed for its owner');
      assert.ok(!(await ids(envName, 'bob')).includes(created.id), 'not listed for another owner');

      await engine.delete(created.id, { owner: 'alice' });
      await rejectsWith(engine.get(created.id), 'NOT_FOUND');
      await rejectsWith(engine.delete(created.id), 'NOT_FOUND');
      assert.ok(!(await ids(envName)).includes(created.id));
    });

    test('create is idempotent: the same key (and owner) or the same name gives the same instance', async () => {
      const before = (await engine.list(envName)).length;
      const [a, b] = await Promise.all([
        engine.create({ envName }, { idempotencyKey: 'conf-key-1' }),
        engine.create({ envName }, { idempotencyKey: 'conf-key-1' }),
      ]);
      const c = await engine.create({ envName }, { idempotencyKey: 'conf-key-1' });
      assert.equal(a.id, b.id);
      assert.equal(a.id, c.id);
      assert.equal((await engine.list(envName)).length, before + 1, 'exactly one instance');
      const other = await engine.create({ envName }, { owner: 'carol', idempotencyKey: 'conf-key-1' });
      assert.notEqual(other.id, a.id, 'keys are per owner');

      const named = await engine.create({ envName, name: 'conf-named', owner: 'dave' });
      const again = await engine.create({ envName, name: 'conf-named', owner: 'dave' });
      assert.equal(named.id, again.id);
      await rejectsWith(engine.create({ envName, name: 'conf-named', owner: 'eve' }), 'PERMISSION_DENIED', 'owner');
      for (const i of [a, other, named]) await engine.delete(i.id);
    });

    test('ownership is checked: a different owner is refused', async () => {
      const i = await engine.create({ envName, owner: 'alice' });
      await rejectsWith(engine.get(i.id, { owner: 'mallory' }), 'PERMISSION_DENIED', 'owner');
      await rejectsWith(engine.delete(i.id, { owner: 'mallory' }), 'PERMISSION_DENIED', 'owner');
      await rejectsWith(engine.create({ envName, owner: 'alice' }, { owner: 'mallory' }), 'PERMISSION_DENIED', 'owner');
      assert.equal((await engine.get(i.id, { owner: 'alice' })).id, i.id, 'still there');
      await engine.delete(i.id, { owner: 'alice' });
    });

    test('a stated owner sees only its own instances: not an ownerless one; a caller stating none is unrestricted', async () => {
      const ownerless = await engine.create({ envName });
      const owned = await engine.create({ envName, owner: 'alice' });
      assert.equal(ownerless.owner, '');
      await rejectsWith(engine.get(ownerless.id, { owner: 'alice' }), 'PERMISSION_DENIED', 'owner');
      await rejectsWith(engine.delete(ownerless.id, { owner: 'alice' }), 'PERMISSION_DENIED', 'owner');
      const ids = async (owner?: string) => (await engine.list(envName, owner ? { owner } : {})).map((i) => i.id);
      assert.deepEqual(await ids('alice'), [owned.id]);
      assert.deepEqual((await ids()).sort(), [ownerless.id, owned.id].sort());
      assert.equal((await engine.get(owned.id)).owner, 'alice', 'no stated owner: unrestricted');
      await engine.delete(owned.id);
      await engine.delete(ownerless.id);
    });

    test('bad input is refused with the field named', async () => {
      await rejectsWith(engine.create({ envName: 'no-version' }), 'INVALID_ARGUMENT', 'envName');
      await rejectsWith(engine.create({ envName, ttl: 'soon' }), 'INVALID_ARGUMENT', 'ttl');
      await rejectsWith(engine.create({ envName: 'nope@9' }), 'NOT_FOUND', 'envName');
      await rejectsWith(engine.get('no-such-instance'), 'NOT_FOUND');
      await rejectsWith(engine.warmup('nope@9'), 'NOT_FOUND', 'envName');
    });

    test('warmup answers the env', async () => {
      const env = await engine.warmup(envName);
      assert.equal(`${env.name}@${env.version}`, envName);
    });

    test('TTL: the instance is deleted at created_at + ttl, not by a later sweep', async () => {
      const t0 = Date.now();
      const i = await engine.create({ envName, ttl: '3s' });
      assert.equal(i.ttl, '3s');
      const expiry = Date.parse(i.created_at) + 3000;
      await new Promise((r) => setTimeout(r, Math.max(0, expiry - Date.now() - 1000)));
      assert.equal((await engine.get(i.id)).id, i.id, 'still there a second before expiry');
      let goneAt = 0;
      while (Date.now() - t0 < 15_000) {
        try {
          await engine.get(i.id);
        } catch (err) {
          if (!isTorporError(err, 'NOT_FOUND')) throw err;
          goneAt = Date.now();
          break;
        }
        await new Promise((r) => setTimeout(r, 100));
      }
      assert.ok(goneAt > 0, 'deleted');
      // created_at has second precision: allow for it, plus a deletion that tears a sandbox down (slower on a
      // loaded machine). A periodic sweep would be minutes late.
      assert.ok(goneAt - expiry < 4500, `deleted ${goneAt - expiry} ms after expiry`);
    });

    test("route: tool traffic goes to the instance's own actor, for its owner only", async (ctx) => {
      if (!engine.capabilities.has('route')) {
        ctx.skip(`${engine.name} does not declare route`);
        return;
      }
      const i = await engine.create({ envName, owner: 'alice' });
      const ref = await engine.route(i.id, { owner: 'alice' });
      assert.equal(`${ref.name}.${ref.space}`, i.id);
      await rejectsWith(engine.route(i.id, { owner: 'mallory' }), 'PERMISSION_DENIED', 'owner');
      await rejectsWith(engine.route('no-such-instance'), 'NOT_FOUND', 'id');
      await engine.delete(i.id);
      await rejectsWith(engine.route(i.id), 'NOT_FOUND', 'id');
    });

    test('declared capabilities work: exec, suspend, resume', async (ctx) => {
      if (!engine.capabilities.has('exec') || !engine.capabilities.has('suspend')) {
        ctx.skip(`${engine.name} declares neither exec nor suspend`);
        return;
      }
      const i = await engine.create({ envName });
      const r = await engine.exec(i.id, ['/bin/busybox', 'echo', 'hello']);
      assert.equal(r.exitCode, 0);
      assert.equal(r.stdout.trim(), 'hello');
      const s = await engine.suspend(i.id);
      assert.equal(s.ip, '', 'no address while suspended');
      const resumed = await engine.resume(i.id);
      assert.equal(resumed.status, 'Running');
      assert.notEqual(resumed.ip, '');
      await engine.delete(i.id);
    });
  });
}
