// The standard engine client against a scripted server: the envelope, retries that never duplicate a create,
// timeouts, and the parsing helpers (envName, ttl).
import assert from 'node:assert/strict';
import http from 'node:http';
import type { AddressInfo } from 'node:net';
import { after, before, describe, test } from 'node:test';
import { envToCreateRequest } from '../../src/api/compat.ts';
import { isTorporError } from '../../src/core/errors.ts';
import { parseTtl, templateFor } from '../../src/engine/engine.ts';
import { StandardEngine } from '../../src/engine/standard.ts';

interface Seen {
  method: string;
  url: string;
  headers: http.IncomingHttpHeaders;
  body: string;
}

describe('standard engine client', () => {
  let server: http.Server;
  let url: string;
  let seen: Seen[] = [];
  let script: ((req: Seen, res: http.ServerResponse) => void)[] = [];
  const instances = new Map<string, string>(); // idempotency key → id

  before(async () => {
    server = http.createServer((req, res) => {
      let body = '';
      req.on('data', (d: Buffer) => {
        body += d.toString();
      });
      req.on('end', () => {
        const s = { method: req.method!, url: req.url!, headers: req.headers, body };
        seen.push(s);
        const next = script.shift();
        if (next) return next(s, res);
        res.writeHead(500).end('no script');
      });
    });
    await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
    url = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
  });
  after(async () => {
    server.closeAllConnections();
    await new Promise((r) => server.close(r));
  });

  const send = (res: http.ServerResponse, status: number, body: unknown) =>
    res.writeHead(status, { 'content-type': 'application/json' }).end(JSON.stringify(body));
  const reset = () => {
    seen = [];
    script = [];
  };

  test('a create retried after 503 and a dropped connection carries one idempotency key and makes one instance', async () => {
    reset();
    const create = (s: Seen, res: http.ServerResponse) => {
      const key = String(s.headers['idempotency-key']);
      if (!instances.has(key)) instances.set(key, `i-${instances.size + 1}`);
      send(res, 200, { success: true, code: 0, message: '', data: { id: instances.get(key), status: 'Running' } });
    };
    script = [
      (_s, res) => send(res, 503, { success: false, code: 503, message: 'busy', data: null }),
      (_s, res) => res.socket?.destroy(),
      create,
    ];
    const engine = new StandardEngine({ url, backoffMs: 10 });
    const i = await engine.create({ envName: 'counter@v1', ttl: '30m', owner: 'alice', labels: { a: 'b' } });
    assert.equal(i.id, 'i-1');
    assert.equal(seen.length, 3);
    const keys = new Set(seen.map((s) => s.headers['idempotency-key']));
    assert.equal(keys.size, 1, 'one key for every attempt');
    assert.ok([...keys][0]);
    assert.equal(seen[0]!.method, 'POST');
    assert.equal(seen[0]!.url, '/aenvironment/instance');
    assert.deepEqual(JSON.parse(seen[0]!.body), {
      name: 'counter',
      version: 'v1',
      deploy_config: { ttl: '30m', owner: 'alice', labels: { a: 'b' } },
    });
    await engine.close();
  });

  test('success:false is an error carrying the remote message, code and field; not retried', async () => {
    reset();
    script = [
      (_s, res) => send(res, 400, { success: false, code: 400, message: 'ttl: bad', data: null, field: 'ttl' }),
    ];
    const engine = new StandardEngine({ url, backoffMs: 10 });
    await assert.rejects(engine.get('x'), (err: unknown) => {
      assert.ok(isTorporError(err, 'INVALID_ARGUMENT'));
      assert.match(err.message, /ttl: bad/);
      assert.equal(err.field, 'ttl');
      return true;
    });
    assert.equal(seen.length, 1);
    // HTTP 200 with success:false (some engines answer so) is an error too.
    script = [(_s, res) => send(res, 200, { success: false, code: 500, message: 'boom', data: null })];
    await assert.rejects(engine.delete('x'), /boom/);
    await engine.close();
  });

  test('a body that is not the envelope, and a timeout, are clear errors', async () => {
    reset();
    script = [(_s, res) => res.writeHead(404).end('<html>nope</html>')];
    const engine = new StandardEngine({ url, backoffMs: 10, retries: 1, timeoutMs: 300 });
    await assert.rejects(engine.get('x'), (err: unknown) => {
      assert.ok(isTorporError(err, 'NOT_FOUND'));
      assert.match(err.message, /not an envelope: <html>nope/);
      return true;
    });
    script = [() => undefined, () => undefined];
    await assert.rejects(engine.list('counter'), (err: unknown) => {
      assert.ok(isTorporError(err, 'TIMEOUT'), String(err));
      assert.match(err.message, /timed out after 300 ms/);
      return true;
    });
    assert.equal(seen.length, 3, 'the timed-out list was tried twice');
    assert.equal(seen[1]!.url, '/aenvironment/instance?envName=counter');
    await engine.close();
  });

  test('bad input is refused with the field named before anything is sent', async () => {
    reset();
    const engine = new StandardEngine({ url, backoffMs: 10 });
    await assert.rejects(engine.create({ envName: 'counter@v1', ttl: 'soon' }), {
      code: 'INVALID_ARGUMENT',
      field: 'ttl',
    });
    await assert.rejects(engine.create({ envName: 'counter' }), { code: 'INVALID_ARGUMENT', field: 'envName' });
    await assert.rejects(engine.create({ envName: 'counter@v1', owner: 'bob' }, { owner: 'alice' }), {
      code: 'PERMISSION_DENIED',
      field: 'owner',
    });
    assert.equal(seen.length, 0);
    await engine.close();
  });

  test('capabilities it lacks answer NOT_SUPPORTED naming the engine', async () => {
    const engine = new StandardEngine({ url });
    await assert.rejects(engine.pause('x'), {
      code: 'NOT_SUPPORTED',
      message: 'standard engine does not support pause',
    });
    await engine.close();
  });
});

describe('parsing', () => {
  test('ttl is a Go duration', () => {
    assert.equal(parseTtl(''), undefined);
    assert.equal(parseTtl('30m'), 1_800_000);
    assert.equal(parseTtl('1h30m'), 5_400_000);
    assert.equal(parseTtl('1.5s'), 1500);
    for (const bad of ['30', 'm', '-1m', '0s', '1d', '1m ', '721h']) {
      assert.throws(() => parseTtl(bad), { code: 'INVALID_ARGUMENT', field: 'ttl' }, bad);
    }
  });

  test('envName name@version maps to the template name-version', () => {
    assert.equal(templateFor('counter@v1'), 'counter-v1');
    assert.equal(templateFor('Python3.9-RL@1.2.0'), 'python3-9-rl-1-2-0');
    for (const bad of ['counter', '@v1', 'counter@', 'a@b@c', '-x@1']) {
      assert.throws(() => templateFor(bad), { code: 'INVALID_ARGUMENT', field: 'envName' }, bad);
    }
  });

  test('the standard contract body (an Env) becomes a create request', () => {
    assert.deepEqual(
      envToCreateRequest({
        name: 'counter',
        version: 'v1',
        deploy_config: { ttl: '1h', owner: 'o', environment_variables: { A: '1' }, arguments: ['x'], replicas: 1 },
      }),
      { envName: 'counter@v1', ttl: '1h', owner: 'o', environment_variables: { A: '1' }, arguments: ['x'] },
    );
    assert.throws(() => envToCreateRequest({ version: 'v1' }), { field: 'name' });
    assert.throws(() => envToCreateRequest({ name: 'a', version: 'v1', deploy_config: [] }), {
      field: 'deploy_config',
    });
  });
});
