// `torpor up --engine standard --standard-url …`: a Torpor (the front) whose AEnvironment API is served by another
// Torpor (the back) over the standard contract, as AEnvironment's api-service would use an external engine. Two real
// `torpor up` processes; the back accepts only the front's service key.
import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import { instanceSchema } from '../../src/engine/engine.ts';
import { applyTemplate, counterEnvTemplate, gvisorSkipReason, startTorpor, type Torpor } from './harness.ts';

const SERVICE = 'front-service-key-5e1f9c3a';

interface Envelope {
  success: boolean;
  code: number;
  message: string;
  data: unknown;
  field?: string;
  error?: string;
}

async function call(
  base: string,
  method: string,
  path: string,
  body?: unknown,
  headers: Record<string, string> = {},
): Promise<{ status: number; body: Envelope }> {
  const res = await fetch(`${base}${path}`, {
    method,
    headers: { ...(body !== undefined ? { 'content-type': 'application/json' } : {}), ...headers },
    ...(body !== undefined ? { body: JSON.stringify(body) } : {}),
  });
  return { status: res.status, body: (await res.json()) as Envelope };
}

function okData<T = Record<string, unknown>>(r: { status: number; body: Envelope }): T {
  assert.equal(r.status, 200, JSON.stringify(r.body));
  assert.deepEqual(Object.keys(r.body).sort(), ['code', 'data', 'message', 'success']);
  assert.equal(r.body.success, true);
  assert.equal(r.body.code, 0);
  return r.body.data as T;
}

function refused(r: { status: number; body: Envelope }, status: number, field: string): void {
  assert.equal(r.status, status, JSON.stringify(r.body));
  assert.equal(r.body.success, false);
  assert.equal(r.body.code, status);
  assert.equal(r.body.data, null);
  assert.equal(r.body.field, field, JSON.stringify(r.body));
  assert.ok(r.body.message.includes(field.split('.')[0]!), r.body.message);
}

describe('torpor up --engine standard: a front Torpor delegating to a back Torpor (gVisor)', {
  skip: gvisorSkipReason(),
}, () => {
  let back: Torpor;
  let front: Torpor;
  const backActors = async (): Promise<{ name: string; labels: Record<string, string> }[]> => {
    const res = await fetch(`${back.url}/v1/spaces/aenv/actors`);
    return ((await res.json()) as { items: { name: string; labels: Record<string, string> }[] }).items;
  };

  before(async () => {
    back = await startTorpor({ workers: 2, networkBase: 160, env: { TORPOR_API_KEYS: `*=${SERVICE}` } });
    await applyTemplate(back.url, await counterEnvTemplate());
    front = await startTorpor({
      workers: 1,
      networkBase: 165,
      args: ['--engine', 'standard', '--standard-url', back.url],
      env: { TORPOR_STANDARD_API_KEY: SERVICE },
    });
  });
  after(async () => {
    await front?.stop();
    await back?.stop();
  });

  test("the front's AEnvironment API and standard contract serve the back's instances", async () => {
    const req = {
      envName: 'counter@v1',
      ttl: '30m',
      owner: 'alice',
      labels: { team: 'a' },
      environment_variables: { GREETING: 'from-the-front' },
    };
    const created = okData(await call(front.url, 'POST', '/env-instance', req, { 'idempotency-key': 'f1' }));
    assert.ok(instanceSchema.strict().safeParse(created).success, JSON.stringify(created));
    assert.equal(created.status, 'Running');
    assert.equal(created.owner, 'alice');
    assert.equal(created.ttl, '30m');
    assert.deepEqual(created.labels, { team: 'a' });
    const id = String(created.id);
    const again = okData(await call(front.url, 'POST', '/env-instance', req, { 'idempotency-key': 'f1' }));
    assert.equal(again.id, id, 'the Idempotency-Key travelled to the back');

    // It is an actor of the back, not of the front, and the environment variables reached its process.
    const [name] = id.split('.');
    const onBack = (await backActors()).find((a) => a.name === name);
    assert.equal(onBack?.labels['torpor.aenv/owner'], 'alice');
    const frontActors = (await (await fetch(`${front.url}/v1/actors`)).json()) as { items: unknown[] };
    assert.deepEqual(frontActors.items, []);
    const exec = await fetch(`${back.url}/v1/spaces/aenv/actors/${name}/exec`, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ command: ['/bin/busybox', 'cat', '/proc/1/environ'] }),
    });
    const environ = ((await exec.json()) as { stdout: string }).stdout.split('\0');
    assert.ok(environ.includes('GREETING=from-the-front'), environ.join(' '));

    assert.equal(okData(await call(front.url, 'GET', `/env-instance/${id}`)).id, id);
    for (const sel of ['counter@v1', 'counter', '*']) {
      const list = okData<{ id: string }[]>(
        await call(front.url, 'GET', `/env-instance/${encodeURIComponent(sel)}/list`),
      );
      assert.deepEqual(
        list.map((i) => i.id),
        [id],
        sel,
      );
    }
    const contract = okData<{ id: string }[]>(await call(front.url, 'GET', '/aenvironment/instance?envName=counter'));
    assert.deepEqual(
      contract.map((i) => i.id),
      [id],
    );
    // Ownership is the back's to enforce, for the owner the front states: the refusal comes back whole.
    refused(await call(front.url, 'GET', `/env-instance/${id}`, undefined, { 'x-owner': 'bob' }), 403, 'owner');
    refused(await call(front.url, 'DELETE', `/env-instance/${id}`, undefined, { 'x-owner': 'bob' }), 403, 'owner');
    assert.deepEqual(okData(await call(front.url, 'GET', '/env-instance/*/list', undefined, { 'x-owner': 'bob' })), []);

    assert.equal(
      okData(await call(front.url, 'DELETE', `/env-instance/${id}`, undefined, { 'x-owner': 'alice' })),
      'Deleted successfully',
    );
    assert.equal(
      (await backActors()).find((a) => a.name === name),
      undefined,
      'deleted on the back',
    );
    refused(await call(front.url, 'GET', `/env-instance/${id}`), 404, 'id');
  });

  test('bad input is refused by the front with the field named, and nothing reaches the back', async () => {
    const before = (await backActors()).length;
    refused(await call(front.url, 'POST', '/env-instance', { envName: 'counter' }), 400, 'envName');
    refused(await call(front.url, 'POST', '/env-instance', { envName: 'counter@v1', ttl: 'soon' }), 400, 'ttl');
    refused(
      await call(front.url, 'POST', '/env-instance', { envName: 'counter@v1', environment_variables: { '1X': 'a' } }),
      400,
      'environment_variables.1X',
    );
    refused(
      await call(front.url, 'POST', '/aenvironment/instance', { name: 'counter', version: 'v1', deploy_config: [] }),
      400,
      'deploy_config',
    );
    refused(
      await call(front.url, 'POST', '/env-instance', { envName: 'counter@v1', owner: 'bob' }, { 'x-owner': 'alice' }),
      403,
      'owner',
    );
    // What only the back can judge comes back with its status and field.
    refused(await call(front.url, 'POST', '/env-instance', { envName: 'nope@v1' }), 404, 'envName');
    assert.equal((await backActors()).length, before, 'nothing was created on the back');

    // The back answers only the front: its service key is required there.
    refused(await call(back.url, 'GET', '/aenvironment/instance'), 401, 'authorization');
    // Tool traffic needs the instances in this Torpor's own store: the front says so plainly.
    const res = await fetch(`${front.mcpUrl}/mcp`, { headers: { 'AEnvCore-EnvInstance-ID': 'x.aenv' } });
    assert.equal(res.status, 501);
    assert.deepEqual(await res.json(), {
      error: { code: 'NOT_SUPPORTED', message: 'standard engine does not support route', field: 'route' },
    });
  });
});
