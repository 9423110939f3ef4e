// AEnvironment's HTTP API and the standard engine contract, request by request, against a real `torpor up`:
// field names, status codes, the {success, code, message, data} envelope, and bad input refused with the field
// named; API keys and ownership on every call; the MCP gateway reaching instances by id only; the OpenAPI document.
import assert from 'node:assert/strict';
import http from 'node:http';
import type { AddressInfo } from 'node:net';
import { after, before, describe, test } from 'node:test';
import { z } from 'zod';
import { createInstanceRequest, instanceSchema, standardEnvRequest } from '../../src/engine/engine.ts';
import { applyTemplate, counterEnvTemplate, gvisorSkipReason, startTorpor, type Torpor } from './harness.ts';

const skip = gvisorSkipReason();
// Keys as `torpor up` takes them from TORPOR_API_KEYS: two owners and a trusted service (owner "*").
const ALICE = 'alice-key-7f3e9a1c5b2d';
const BOB = 'bob-key-4c8e2f6a9d1b3';
const SERVICE = 'service-key-1a2b3c4d5e6f';
const bearer = (key: string) => ({ authorization: `Bearer ${key}` });

interface Reply {
  status: number;
  body: { success: boolean; code: number; message: string; data: unknown; field?: string; error?: string };
}

const INSTANCE_KEYS = ['created_at', 'env', 'id', 'ip', 'labels', 'owner', 'status', 'ttl', 'updated_at'];
// What AEnvironment's Python SDK requires of `env` (aenv.core.models.Env).
const ENV_KEYS = ['code_url', 'created_at', 'description', 'id', 'name', 'status', 'updated_at', 'version'];

describe('AEnvironment API and standard contract over HTTP (gVisor)', { skip }, () => {
  let t: Torpor;
  /** A call with the service key (which, like a Torpor without keys, acts for whoever X-Owner names), unless
   * `headers` carries another authorization ('' for none). */
  const call = async (
    method: string,
    path: string,
    body?: unknown,
    headers: Record<string, string> = {},
  ): Promise<Reply> => {
    const raw = typeof body === 'string';
    const auth = { ...bearer(SERVICE), ...headers };
    if (auth.authorization === '') delete (auth as { authorization?: string }).authorization;
    const res = await fetch(`${t.url}${path}`, {
      method,
      headers: { ...(body !== undefined ? { 'content-type': 'application/json' } : {}), ...auth },
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
    t = await startTorpor({
      workers: 2,
      networkBase: 100,
      env: { TORPOR_API_KEYS: `alice=${ALICE},bob=${BOB},*=${SERVICE}` },
    });
    await applyTemplate(t.url, await counterEnvTemplate());
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
    // AEnvironment's SDK sends Content-Type: application/json with bodiless GETs and DELETEs.
    const json = { 'content-type': 'application/json' };
    assert.equal(okData(await call('GET', `/env-instance/${id}`, undefined, json)).id, id);
    assert.equal(okData(await call('DELETE', `/env-instance/${id}`, undefined, json)), 'Deleted successfully');
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

  test('API keys: every call needs one, and its owner is the caller on every call', async () => {
    const before = okData<unknown[]>(await call('GET', '/env-instance/*/list')).length;
    const none = { authorization: '' };
    refused(await call('POST', '/env-instance', { envName: 'counter@v1' }, none), 401, 'authorization');
    refused(await call('POST', '/env-instance', { envName: 'counter@v1' }, bearer('not-a-key')), 401, 'authorization');
    refused(await call('GET', '/env-instance/*/list', undefined, none), 401, 'authorization');
    refused(await call('GET', '/env-instance/x.aenv', undefined, none), 401, 'authorization');
    refused(await call('DELETE', '/env-instance/x.aenv', undefined, none), 401, 'authorization');
    refused(await call('GET', '/aenvironment/instance', undefined, none), 401, 'authorization');
    refused(await call('PUT', '/aenvironment/instance/action/warmup', undefined, none), 401, 'authorization');
    assert.equal((await fetch(`${t.url}/health`)).status, 200, '/health needs no key');

    // Alice's key makes her the owner; she cannot speak for bob, in the body or in X-Owner.
    const mine = okData(await call('POST', '/env-instance', { envName: 'counter@v1' }, bearer(ALICE)));
    assert.equal(mine.owner, 'alice');
    const id = String(mine.id);
    refused(await call('POST', '/env-instance', { envName: 'counter@v1', owner: 'bob' }, bearer(ALICE)), 403, 'owner');
    refused(await call('GET', `/env-instance/${id}`, undefined, { ...bearer(ALICE), 'x-owner': 'bob' }), 403, 'owner');

    // Bob's key: alice's instance is not his to read, list, delete or create under its name.
    refused(await call('GET', `/env-instance/${id}`, undefined, bearer(BOB)), 403, 'owner');
    refused(await call('DELETE', `/env-instance/${id}`, undefined, bearer(BOB)), 403, 'owner');
    refused(await call('DELETE', `/aenvironment/instance/${id}`, undefined, bearer(BOB)), 403, 'owner');
    assert.deepEqual(okData(await call('GET', '/env-instance/*/list', undefined, bearer(BOB))), []);
    assert.deepEqual(okData(await call('GET', '/aenvironment/instance', undefined, bearer(BOB))), []);
    const alices = okData<{ id: string }[]>(await call('GET', '/env-instance/counter/list', undefined, bearer(ALICE)));
    assert.deepEqual(
      alices.map((i) => i.id),
      [id],
    );
    // The same Idempotency-Key is per owner: bob's retry cannot reach alice's instance.
    const k = { 'idempotency-key': 'shared-key' };
    const a1 = okData(await call('POST', '/env-instance', { envName: 'counter@v1' }, { ...bearer(ALICE), ...k }));
    const b1 = okData(await call('POST', '/env-instance', { envName: 'counter@v1' }, { ...bearer(BOB), ...k }));
    assert.notEqual(a1.id, b1.id);
    assert.equal(b1.owner, 'bob');

    // The service key acts for whoever X-Owner names, and is held to it.
    assert.equal(okData(await call('GET', `/env-instance/${id}`, undefined, { 'x-owner': 'alice' })).id, id);
    refused(await call('GET', `/env-instance/${id}`, undefined, { 'x-owner': 'bob' }), 403, 'owner');
    assert.equal(
      okData<unknown[]>(await call('GET', '/env-instance/*/list')).length,
      before + 3,
      'refused calls created nothing',
    );

    assert.equal(okData(await call('DELETE', `/env-instance/${id}`, undefined, bearer(ALICE))), 'Deleted successfully');
    okData(await call('DELETE', `/env-instance/${a1.id}`, undefined, bearer(ALICE)));
    okData(await call('DELETE', `/env-instance/${b1.id}`, undefined, bearer(BOB)));
  });

  test('MCP gateway: tool traffic reaches an instance by its id only, never the address a client names', async () => {
    // Where AEnvironment's gateway would send the request: it must never see one.
    let decoyHits = 0;
    const decoy = http.createServer((_req, res) => {
      decoyHits++;
      res.end('decoy');
    });
    await new Promise<void>((r) => decoy.listen(0, '127.0.0.1', r));
    const decoyUrl = `http://127.0.0.1:${(decoy.address() as AddressInfo).port}`;
    try {
      const created = okData(await call('POST', '/env-instance', { envName: 'counter@v1' }, bearer(ALICE)));
      const id = String(created.id);
      assert.ok(instanceSchema.strict().safeParse(created).success);
      // What AEnvironment's SDK sends: both headers, no credentials.
      const sdk = { 'AEnvCore-EnvInstance-ID': id, 'AEnvCore-MCPProxy-URL': decoyUrl };
      const gw = (path: string, headers: Record<string, string>, init: RequestInit = {}) =>
        fetch(`${t.mcpUrl}${path}`, { ...init, headers });

      let res = await gw('/', sdk);
      assert.equal(res.status, 200);
      assert.equal((await res.text()).trim(), '1', "the instance's own counter answered");
      // With alice's key: checked, then kept from the sandbox, as is the address header.
      res = await gw('/headers', { ...sdk, ...bearer(ALICE) });
      assert.equal(res.status, 200);
      const head = (await res.text()).toLowerCase();
      assert.match(head, /^get \/headers http\/1\.1\r\n/);
      assert.ok(head.includes(`aenvcore-envinstance-id: ${id}`), head);
      assert.ok(!head.includes('aenvcore-mcpproxy-url'), head);
      assert.ok(!head.includes(ALICE.toLowerCase()), 'the API key never reaches the sandbox');
      res = await gw('/echo', { ...sdk, 'content-type': 'application/json' }, { method: 'POST', body: '{"a":1}' });
      assert.equal(await res.text(), '{"a":1}', 'bodies (MCP is JSON-RPC over POST) pass both ways');

      // A suspended instance is resumed by its tool traffic, memory intact.
      const [name, space] = id.split('.');
      const suspended = await fetch(`${t.url}/v1/spaces/${space}/actors/${name}/suspend`, { method: 'POST' });
      assert.equal(((await suspended.json()) as { status: string }).status, 'SUSPENDED');
      assert.equal((await (await gw('/', sdk)).text()).trim(), '2');

      const gatewayError = async (r: Response, status: number, field?: string) => {
        assert.equal(r.status, status);
        const body = (await r.json()) as { error: { code: string; message: string; field?: string } };
        if (field) assert.equal(body.error.field, field, JSON.stringify(body));
        return body.error;
      };
      await gatewayError(await gw('/', { 'AEnvCore-MCPProxy-URL': decoyUrl }), 400, 'AEnvCore-EnvInstance-ID');
      await gatewayError(await gw('/', { ...sdk, ...bearer(BOB) }), 403, 'owner');
      await gatewayError(await gw('/', { ...sdk, 'AEnvCore-EnvInstance-ID': 'nosuch.aenv' }), 404, 'id');
      // Actors that are not instances are out of the gateway's reach, in any space.
      for (const sp of ['default', 'aenv']) {
        const plain = await fetch(`${t.url}/v1/spaces/${sp}/actors`, {
          method: 'POST',
          headers: { 'content-type': 'application/json' },
          body: JSON.stringify({ name: 'plain', template: 'counter-v1' }),
        });
        assert.equal(plain.status, 201);
        await gatewayError(await gw('/', { ...sdk, 'AEnvCore-EnvInstance-ID': `plain.${sp}` }), 404, 'id');
      }
      // An absolute-form target naming the decoy is refused too.
      const absolute = await new Promise<number>((resolve, reject) => {
        const u = new URL(t.mcpUrl);
        http
          .request({ host: u.hostname, port: u.port, path: `${decoyUrl}/x`, headers: sdk }, (r) => {
            r.resume();
            resolve(r.statusCode ?? 0);
          })
          .on('error', reject)
          .end();
      });
      assert.equal(absolute, 400);
      const health = await gw('/health', {});
      assert.deepEqual(await health.json(), { status: 'healthy', message: 'MCP Gateway is running' });
      assert.equal(decoyHits, 0, 'nothing ever reached the address the client named');

      okData(await call('DELETE', `/env-instance/${id}`, undefined, bearer(ALICE)));
      await gatewayError(await gw('/', sdk), 404, 'id');
    } finally {
      decoy.closeAllConnections();
      await new Promise((r) => decoy.close(r));
    }
  });

  test('the OpenAPI document describes the compat routes with the schemas the routes validate with', async () => {
    const doc = (await (await fetch(`${t.url}/openapi.json`)).json()) as {
      paths: Record<string, Record<string, unknown>>;
      components: { schemas: Record<string, unknown> };
    };
    const routes = Object.entries(doc.paths).flatMap(([p, ops]) => Object.keys(ops).map((m) => `${m} ${p}`));
    for (const r of [
      'get /health',
      'post /env-instance',
      'get /env-instance/{id}',
      'delete /env-instance/{id}',
      'get /env-instance/{id}/list',
      'post /aenvironment/instance',
      'get /aenvironment/instance',
      'get /aenvironment/instance/{id}',
      'delete /aenvironment/instance/{id}',
      'put /aenvironment/instance/action/warmup',
      'put /aenvironment/instance/action/cleanup',
    ]) {
      assert.ok(routes.includes(r), `${r} is documented`);
    }
    const json = (s: z.ZodType) =>
      JSON.parse(JSON.stringify(z.toJSONSchema(s, { io: 'input', unrepresentable: 'any' })));
    assert.deepEqual(doc.components.schemas.CreateEnvInstance, json(createInstanceRequest));
    assert.deepEqual(doc.components.schemas.StandardEnv, json(standardEnvRequest));
    assert.deepEqual(doc.components.schemas.EnvInstance, json(instanceSchema));
  });
});
