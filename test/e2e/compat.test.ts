// AEnvironment's HTTP API and the standard engine contract, request by request, against a real `torpor up`:
// field names, status codes, the {success, code, message, data} envelope, and bad input refused with the field
// named.
import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import { counterImage } from '../fixtures/images.ts';
import { gvisorSkipReason, startTorpor, type Torpor } from './harness.ts';

const skip = gvisorSkipReason();

interface Reply {
  status: number;
  body: { success: boolean; code: number; message: string; data: unknown; field?: string; error?: string };
}

const INSTANCE_KEYS = ['created_at', 'env', 'id', 'ip', 'labels', 'owner', 'status', 'ttl', 'updated_at'];
// What AEnvironment's Python SDK requires of `env` (aenv.core.models.Env).
const ENV_KEYS = ['code_url', 'created_at', 'description', 'id', 'name', 'status', 'updated_at', 'version'];

describe('AEnvironment API and standard contract over HTTP (gVisor)', { skip }, () => {
  let t: Torpor;
  const call = async (
    method: string,
    path: string,
    body?: unknown,
    headers: Record<string, string> = {},
  ): Promise<Reply> => {
    const raw = typeof body === 'string';
    const res = await fetch(`${t.url}${path}`, {
      method,
      headers: { ...(body !== undefined ? { 'content-type': 'application/json' } : {}), ...headers },
      ...(body !== undefined ? { body: raw ? body : JSON.stringify(body) } : {}),
    });
    return { status: res.status, body: (await res.json()) as Reply['body'] };
  };
  const okData = <T = Record<string, unknown>>(r: Reply): T => {
    assert.equal(r.status, 200, JSON.stringify(r.body));
    assert.deepEqual(Object.keys(r.body).sort(), ['code', 'data', 'message', 'success']);
    assert.equal(r.body.success, true);
    assert.equal(r.body.code, 0);
    assert.equal(r.body.message, '');
    return r.body.data as T;
  };
  const refused = (r: Reply, status: number, field?: string) => {
    assert.equal(r.status, status, JSON.stringify(r.body));
    assert.equal(r.body.success, false);
    assert.equal(r.body.code, status);
    assert.equal(r.body.data, null);
    assert.ok(r.body.message.length > 0);
    if (field) {
      assert.equal(r.body.field, field, JSON.stringify(r.body));
      assert.ok(r.body.message.includes(field.split('.')[0]!), `the message names ${field}: ${r.body.message}`);
    }
  };
  const exec = async (id: string, command: string[]) => {
    const [name, space] = id.split('.');
    const res = await fetch(`${t.url}/v1/spaces/${space}/actors/${name}/exec`, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ command }),
    });
    assert.equal(res.status, 200);
    return (await res.json()) as { exitCode: number; stdout: string };
  };

  before(async () => {
    t = await startTorpor({ workers: 2, networkBase: 100 });
    const res = await fetch(`${t.url}/v1/templates`, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({
        name: 'counter-v1',
        image: await counterImage(),
        port: 8080,
        readiness: { path: '/healthz', timeoutSeconds: 20 },
        resources: { memoryMiB: 128, vcpus: 1 },
      }),
    });
    assert.equal(res.status, 201, await res.text());
  });
  after(async () => {
    await t?.stop();
  });

  test('AEnvironment public API: /health, POST, GET, list, DELETE', async () => {
    const health = await fetch(`${t.url}/health`);
    assert.equal(health.status, 200);
    assert.deepEqual(await health.json(), {});

    const req = { envName: 'counter@v1', ttl: '30m', owner: 'alice', labels: { team: 'a' } };
    const created = okData<Record<string, unknown>>(
      await call('POST', '/env-instance', req, { 'idempotency-key': 'k1' }),
    );
    assert.deepEqual(Object.keys(created).sort(), INSTANCE_KEYS);
    assert.equal(created.status, 'Running');
    assert.match(String(created.ip), /^\d+\.\d+\.\d+\.\d+$/);
    assert.equal(created.ttl, '30m');
    assert.equal(created.owner, 'alice');
    assert.deepEqual(created.labels, { team: 'a' });
    const env = created.env as Record<string, unknown>;
    for (const k of ENV_KEYS) assert.ok(k in env, `env.${k}`);
    assert.equal(env.name, 'counter');
    assert.equal(env.version, 'v1');
    const id = String(created.id);

    const again = okData(await call('POST', '/env-instance', req, { 'idempotency-key': 'k1' }));
    assert.equal(again.id, id, 'same Idempotency-Key, same instance');

    assert.equal(okData(await call('GET', `/env-instance/${id}`)).id, id);
    assert.equal(okData(await call('GET', `/env-instance/${id}`, undefined, { 'x-owner': 'alice' })).id, id);
    refused(await call('GET', `/env-instance/${id}`, undefined, { 'x-owner': 'bob' }), 403, 'owner');
    refused(await call('GET', '/env-instance/nosuch.aenv'), 404, 'id');

    for (const sel of ['counter@v1', 'counter', '*']) {
      const list = okData<{ id: string }[]>(await call('GET', `/env-instance/${encodeURIComponent(sel)}/list`));
      assert.deepEqual(
        list.map((i) => i.id),
        [id],
        sel,
      );
    }
    assert.deepEqual(okData(await call('GET', '/env-instance/other@v1/list')), []);

    refused(await call('DELETE', `/env-instance/${id}`, undefined, { 'x-owner': 'bob' }), 403, 'owner');
    assert.equal(okData(await call('DELETE', `/env-instance/${id}`)), 'Deleted successfully');
    refused(await call('GET', `/env-instance/${id}`), 404);
    refused(await call('DELETE', `/env-instance/${id}`), 404);
  });

  test('bad input is refused with the envelope and the field named', async () => {
    refused(await call('POST', '/env-instance', {}), 400, 'envName');
    refused(await call('POST', '/env-instance', { envName: 'counter' }), 400, 'envName');
    refused(await call('POST', '/env-instance', { envName: 42 }), 400, 'envName');
    refused(await call('POST', '/env-instance', { envName: 'counter@v1', ttl: 'soon' }), 400, 'ttl');
    refused(await call('POST', '/env-instance', { envName: 'counter@v1', owner: 'x'.repeat(64) }), 400, 'owner');
    refused(
      await call('POST', '/env-instance', { envName: 'counter@v1', environment_variables: { '1X': 'a' } }),
      400,
      'environment_variables.1X',
    );
    refused(await call('POST', '/env-instance', { envName: 'counter@v1', arguments: 'x' }), 400, 'arguments');
    refused(
      await call('POST', '/env-instance', { envName: 'counter@v1', labels: { 'torpor.aenv/owner': 'me' } }),
      400,
      'labels.torpor.aenv/owner',
    );
    refused(await call('POST', '/env-instance', { envName: 'nope@v1' }), 404, 'envName');
    refused(await call('POST', '/env-instance', { envName: 'counter@v1', datasource: 'd' }), 501, 'datasource');
    refused(await call('POST', '/env-instance', { envName: 'counter@v1', arguments: ['x'] }), 501, 'arguments');
    refused(await call('POST', '/env-instance', '{"envName":'), 400, '(body)');
    refused(await call('POST', '/env-instance', [1]), 400, '(body)');
    refused(
      await call('POST', '/env-instance', { envName: 'counter@v1' }, { 'idempotency-key': 'k'.repeat(256) }),
      400,
      'Idempotency-Key',
    );

    refused(await call('POST', '/aenvironment/instance', {}), 400, 'name');
    refused(await call('POST', '/aenvironment/instance', { name: 'counter' }), 400, 'version');
    refused(
      await call('POST', '/aenvironment/instance', { name: 'counter', version: 'v1', deploy_config: 'x' }),
      400,
      'deploy_config',
    );
    refused(await call('PUT', '/aenvironment/instance/action/warmup', { name: 'counter' }), 400, 'version');
    refused(await call('PUT', '/aenvironment/instance/action/warmup', { name: 'nope', version: 'v1' }), 404, 'envName');
    refused(await call('GET', '/aenvironment/instance?envName=a&envName=b'), 400, 'envName');
    // Nothing was created by any of that.
    assert.deepEqual(okData(await call('GET', '/env-instance/*/list')), []);
  });

  test('standard contract: create (environment_variables honoured), get, list, warmup, delete', async () => {
    const env = {
      name: 'counter',
      version: 'v1',
      deploy_config: { owner: 'alice', environment_variables: { GREETING: 'hi' } },
    };
    const created = okData<Record<string, unknown>>(await call('POST', '/aenvironment/instance', env));
    assert.deepEqual(Object.keys(created).sort(), INSTANCE_KEYS);
    assert.equal(created.owner, 'alice');
    assert.equal(created.status, 'Running');
    const id = String(created.id);
    const environ = await exec(id, ['/bin/busybox', 'cat', '/proc/1/environ']);
    assert.ok(environ.stdout.split('\0').includes('GREETING=hi'), environ.stdout);

    assert.equal(okData(await call('GET', `/aenvironment/instance/${id}`)).id, id);
    const list = okData<{ id: string; ttl: string; created_at: string }[]>(
      await call('GET', '/aenvironment/instance?envName=counter'),
    );
    assert.deepEqual(
      list.map((i) => i.id),
      [id],
    );
    assert.ok('ttl' in list[0]! && 'created_at' in list[0]!, 'list items carry ttl and created_at');
    assert.equal(okData(await call('PUT', '/aenvironment/instance/action/warmup')), null);
    assert.equal(
      okData(await call('PUT', '/aenvironment/instance/action/warmup', { name: 'counter', version: 'v1' })).name,
      'counter',
    );
    assert.equal(okData(await call('PUT', '/aenvironment/instance/action/cleanup')), 0);

    refused(await call('DELETE', `/aenvironment/instance/${id}`, undefined, { 'x-owner': 'bob' }), 403, 'owner');
    assert.equal(okData(await call('DELETE', `/aenvironment/instance/${id}`)), true);
    refused(await call('GET', `/aenvironment/instance/${id}`), 404, 'id');
    refused(await call('DELETE', `/aenvironment/instance/${id}`), 404, 'id');
  });
});
