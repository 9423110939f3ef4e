// The router against real runsc: resume on request (one resume for many requests), idle suspend, WebSocket
// keeping an actor awake, queueing for capacity with one worker, streaming, and requests that try to steer it.
import assert from 'node:assert/strict';
import { writeFile } from 'node:fs/promises';
import http from 'node:http';
import net from 'node:net';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { counterImage } from '../fixtures/images.ts';
import { gvisorSkipReason, startTorpor, type Torpor } from './harness.ts';

interface Actor {
  status: string;
  address?: string;
}

interface Reply {
  status: number;
  headers: http.IncomingHttpHeaders;
  body: string;
}

const DOMAIN = 'torpor.localhost';
const hostOf = (actor: string, space = 'default') => `${actor}.${space}.actors.${DOMAIN}`;

/** A raw HTTP request: lets the test set Host and the request target exactly (fetch would not). */
function request(
  base: string,
  opts: { host: string; path?: string; method?: string; headers?: Record<string, string>; body?: Buffer },
) {
  const url = new URL(base);
  return new Promise<Reply>((resolve, reject) => {
    const req = http.request(
      {
        host: url.hostname,
        port: url.port,
        method: opts.method ?? 'GET',
        path: opts.path ?? '/',
        headers: { host: opts.host, ...opts.headers },
        agent: false,
      },
      (res) => {
        const chunks: Buffer[] = [];
        res.on('data', (c: Buffer) => chunks.push(c));
        res.on('end', () =>
          resolve({ status: res.statusCode ?? 0, headers: res.headers, body: Buffer.concat(chunks).toString().trim() }),
        );
      },
    );
    req.on('error', reject);
    req.end(opts.body);
  });
}

async function metric(t: Torpor, name: string): Promise<number> {
  const text = await (await fetch(`${t.url}/metrics`)).text();
  const line = text.split('\n').find((l) => l.startsWith(`${name} `));
  return Number(line?.split(' ')[1] ?? 0);
}

async function waitFor<T>(what: string, fn: () => Promise<T | undefined>, timeoutMs: number): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const v = await fn();
    if (v !== undefined) return v;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

describe('router (gVisor, one worker)', { skip: gvisorSkipReason() }, () => {
  let t: Torpor;

  before(async () => {
    const image = await counterImage();
    t = await startTorpor({
      workers: 1,
      networkBase: 60,
      args: [
        '--upstream-timeout',
        '3',
        // Long enough for two suspend+resume cycles on a loaded 2-core machine (three actors, one worker).
        '--queue-deadline',
        '10',
        '--max-body',
        '2',
        '--ingress-token',
        'private=s3cret-token',
      ],
    });
    // One template at a time, each with its golden snapshot taken, so golden builds never compete with traffic
    // for the single worker. `broken` never gets ready, so it never gets a golden snapshot.
    for (const [name, idle, ready] of [
      ['counter', 300, '/healthz'],
      ['sleepy', 2, '/healthz'],
      ['pinned', 0, '/healthz'],
      ['broken', 300, '/never-ready'],
    ] as const) {
      const file = join(t.dataDir, `${name}.yaml`);
      const readiness = `readiness: { path: ${ready}, timeoutSeconds: 2 }`;
      await writeFile(file, `name: ${name}\nimage: ${image}\nport: 8080\n${readiness}\nidleTimeoutSeconds: ${idle}\n`);
      await t.json('template', 'apply', '-f', file);
      if (name !== 'broken') {
        await waitFor(
          `${name} golden`,
          async () => (await t.json<{ goldenSnapshot?: string }>('template', 'get', name)).goldenSnapshot,
          30_000,
        );
      }
    }
    // The failed golden attempt of `broken` gives the worker back.
    await waitFor(
      'a free worker',
      async () => {
        const w = await t.json<{ items: { state: string }[] }>('worker', 'list');
        return w.items.every((x) => x.state === 'free') ? true : undefined;
      },
      30_000,
    );
  });
  after(async () => {
    await t?.stop();
  });

  test('100 concurrent requests to a suspended actor: one resume, every request answered', async () => {
    await t.json('actor', 'create', 'a1', '--template', 'counter');
    const resumesBefore = await metric(t, 'torpor_router_resumes_total');
    const replies = await Promise.all(Array.from({ length: 100 }, () => request(t.routerUrl, { host: hostOf('a1') })));
    assert.deepEqual(
      replies.map((r) => r.status),
      Array(100).fill(200),
    );
    const counts = replies.map((r) => Number(r.body)).sort((a, b) => a - b);
    assert.deepEqual(
      counts,
      Array.from({ length: 100 }, (_, i) => i + 1),
    );
    assert.equal((await metric(t, 'torpor_router_resumes_total')) - resumesBefore, 1);
    assert.equal((await t.json<Actor>('actor', 'get', 'a1')).status, 'RUNNING');
  });

  test('requests racing suspends are all answered, in order, with memory intact', async () => {
    const values: number[] = [];
    const slow: number[] = [];
    let suspends = 0;
    const counting = (async () => {
      for (let i = 0; i < 40; i++) {
        const r = await request(t.routerUrl, { host: hostOf('a1') });
        assert.equal(r.status, 200, r.body);
        values.push(Number(r.body));
      }
    })();
    // Requests in flight while the actor is checkpointed: their connection is cut, and the router resends them
    // (GET, no body) to the resumed actor.
    const sleeping = (async () => {
      for (let i = 0; i < 12; i++)
        slow.push((await request(t.routerUrl, { host: hostOf('a1'), path: '/sleep?ms=300' })).status);
    })();
    const suspender = (async () => {
      for (let i = 0; i < 3; i++) {
        await new Promise((r) => setTimeout(r, 500));
        if ((await t.cli('actor', 'suspend', 'a1')).code === 0) suspends++;
      }
    })();
    await Promise.all([counting, sleeping, suspender]);
    assert.ok(suspends >= 2, 'the actor was suspended under traffic');
    assert.deepEqual(slow, Array(12).fill(200));
    for (let i = 1; i < values.length; i++) assert.equal(values[i], values[i - 1]! + 1, `count ${i} continues`);
  });

  test('headers: hop-by-hop stripped, X-Forwarded-* set; bodies and SSE stream through', async () => {
    const r = await request(t.routerUrl, {
      host: hostOf('a1'),
      path: '/headers',
      headers: { connection: 'keep-alive, x-hop', 'x-hop': 'secret-hop', 'keep-alive': 'timeout=5', 'x-end': 'kept' },
    });
    assert.equal(r.status, 200);
    const head = r.body.toLowerCase();
    assert.match(head, /x-forwarded-for: 127\.0\.0\.1/);
    assert.match(head, /x-forwarded-host: a1\.default\.actors\.torpor\.localhost/);
    assert.match(head, /x-end: kept/);
    assert.doesNotMatch(head, /x-hop|keep-alive: timeout/);

    const body = Buffer.alloc(1024 * 1024, 'z');
    const echoed = await request(t.routerUrl, { host: hostOf('a1'), path: '/echo', method: 'POST', body });
    assert.equal(echoed.body.length, body.length);

    const arrivals: number[] = [];
    const t0 = Date.now();
    await new Promise<void>((resolve, reject) => {
      const url = new URL(t.routerUrl);
      http
        .get({ host: url.hostname, port: url.port, path: '/sse', headers: { host: hostOf('a1') } }, (res) => {
          assert.equal(res.headers['content-type'], 'text/event-stream');
          res.on('data', () => arrivals.push(Date.now() - t0));
          res.on('end', resolve);
        })
        .on('error', reject);
    });
    assert.ok(arrivals.length >= 2, 'events arrive as separate chunks');
    assert.ok(arrivals.at(-1)! - arrivals[0]! >= 300, `events streamed, not buffered: ${arrivals}`);
  });

  test('an idle actor suspends itself after idleTimeoutSeconds and the next request resumes it intact', async () => {
    await t.json('actor', 'create', 's1', '--template', 'sleepy');
    assert.equal((await request(t.routerUrl, { host: hostOf('s1') })).body, '1');
    const last = Date.now();
    await waitFor(
      's1 suspended',
      async () => ((await t.json<Actor>('actor', 'get', 's1')).status === 'SUSPENDED' ? true : undefined),
      8000,
    );
    const after = Date.now() - last;
    assert.ok(after >= 2000 && after < 4500, `suspended after ${after} ms of silence`);
    assert.equal((await request(t.routerUrl, { host: hostOf('s1') })).body, '2');
  });

  test('an open WebSocket keeps its actor awake; closing it lets the actor sleep', async () => {
    const url = new URL(t.routerUrl);
    // Node's WebSocket cannot set Host, so speak the handshake on a raw socket.
    const socket = net.connect(Number(url.port), url.hostname);
    await new Promise((r) => socket.once('connect', r));
    socket.write(
      `GET /ws HTTP/1.1\r\nHost: ${hostOf('s1')}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n` +
        'Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n',
    );
    const handshake = await new Promise<string>((r) => socket.once('data', (d: Buffer) => r(d.toString())));
    assert.match(handshake, /^HTTP\/1\.1 101/);
    assert.match(handshake, /Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK\+xOo=/i);
    // A masked text frame "ping"; the actor echoes it unmasked.
    const mask = Buffer.from([1, 2, 3, 4]);
    const payload = Buffer.from('ping').map((b, i) => b ^ mask[i % 4]!);
    socket.write(Buffer.concat([Buffer.from([0x81, 0x80 | 4]), mask, payload]));
    const echo = await new Promise<Buffer>((r) => socket.once('data', r));
    assert.equal(echo.subarray(2).toString(), 'ping');
    await new Promise((r) => setTimeout(r, 4000));
    assert.equal((await t.json<Actor>('actor', 'get', 's1')).status, 'RUNNING', 'kept awake by the open WebSocket');
    socket.destroy();
    await waitFor(
      's1 suspended after the socket closed',
      async () => ((await t.json<Actor>('actor', 'get', 's1')).status === 'SUSPENDED' ? true : undefined),
      8000,
    );
  });

  test('one worker, three actors: every request is served (idle actors make room)', async () => {
    for (const n of ['x1', 'x2', 'x3']) await t.json('actor', 'create', n, '--template', 'counter');
    for (const round of [1, 2]) {
      for (const n of ['x1', 'x2', 'x3']) {
        const r = await request(t.routerUrl, { host: hostOf(n) });
        assert.equal(r.status, 200, `${n}: ${r.body}`);
        assert.equal(r.body, String(round), `${n} keeps its own count across being moved out and back`);
      }
    }
    const together = await Promise.all(['x1', 'x2', 'x3'].map((n) => request(t.routerUrl, { host: hostOf(n) })));
    assert.deepEqual(
      together.map((r) => r.body),
      ['3', '3', '3'],
    );
  });

  test('forged Host, port and absolute-URI targets never reach anything but the named actor', async () => {
    let canaryHits = 0;
    const canary = http.createServer((_q, s) => {
      canaryHits++;
      s.end('canary');
    });
    await new Promise<void>((r) => canary.listen(0, '127.0.0.1', r));
    const canaryPort = (canary.address() as net.AddressInfo).port;
    try {
      for (const host of [
        'evil.example',
        `a1.default.actors.${DOMAIN}.evil.example`,
        `127.0.0.1:${canaryPort}`,
        `x.a1.default.actors.${DOMAIN}`,
      ]) {
        const r = await request(t.routerUrl, { host });
        assert.equal(r.status, 404, host);
        assert.equal(JSON.parse(r.body).error.code, 'NOT_FOUND');
      }
      const absolute = await request(t.routerUrl, { host: hostOf('a1'), path: `http://127.0.0.1:${canaryPort}/` });
      assert.equal(absolute.status, 400);
      // A port in Host is ignored: the request goes to a1's worker, not to that port.
      const ported = await request(t.routerUrl, { host: `${hostOf('a1')}:${canaryPort}`, path: '/id' });
      assert.equal(ported.body, 'default/a1');
      // X-Torpor-Actor names an actor (for clients that cannot set Host); it wins over Host and is not passed on.
      const named = await request(t.routerUrl, {
        host: `127.0.0.1:${canaryPort}`,
        path: '/headers',
        headers: { 'x-torpor-actor': 'a1.default' },
      });
      assert.equal(named.status, 200);
      assert.doesNotMatch(named.body.toLowerCase(), /x-torpor-actor/);
      assert.equal(
        (await request(t.routerUrl, { host: 'x', path: '/id', headers: { 'x-torpor-actor': 'a1.default' } })).body,
        'default/a1',
      );
      for (const forged of [`127.0.0.1:${canaryPort}`, 'a1', 'a1.default.x', `a1.default.actors.${DOMAIN}`]) {
        const r = await request(t.routerUrl, { host: hostOf('a1'), headers: { 'x-torpor-actor': forged } });
        assert.equal(r.status, 404, forged);
        assert.equal(r.headers['x-torpor-error'], 'NOT_FOUND', 'the router marks its own answers');
      }
      assert.equal(canaryHits, 0);
    } finally {
      canary.close();
    }
  });

  test('a resume that fails is 502 with the reason; no worker within the deadline is 503 with Retry-After', async () => {
    await t.json('actor', 'create', 'b1', '--template', 'broken');
    const broken = await request(t.routerUrl, { host: hostOf('b1') });
    assert.equal(broken.status, 502);
    assert.equal(JSON.parse(broken.body).error.code, 'RUNTIME_ERROR');
    assert.match(JSON.parse(broken.body).error.message, /not ready/);
    assert.equal((await t.json<Actor>('actor', 'get', 'b1')).status, 'SUSPENDED', 'rolled back, not stuck');

    // The only worker goes to an actor whose template never lets it be suspended for room.
    await t.json('actor', 'create', 'pin1', '--template', 'pinned');
    assert.equal((await request(t.routerUrl, { host: hostOf('pin1') })).status, 200);
    const started = Date.now();
    const refused = await request(t.routerUrl, { host: hostOf('a1') });
    assert.equal(refused.status, 503);
    assert.equal(JSON.parse(refused.body).error.code, 'NO_CAPACITY');
    assert.ok(Number(refused.headers['retry-after']) > 0);
    assert.ok(Date.now() - started >= 9500, 'it waited for the queue deadline first');
    await t.json('actor', 'suspend', 'pin1');
    assert.equal((await request(t.routerUrl, { host: hostOf('a1') })).status, 200, 'served once capacity is back');
  });

  test('errors: unknown actor 404, upstream timeout 504, ingress tokens 401/403', async () => {
    const unknown = await request(t.routerUrl, { host: hostOf('nobody') });
    assert.equal(unknown.status, 404);
    assert.equal(JSON.parse(unknown.body).error.code, 'NOT_FOUND');
    assert.equal(unknown.headers['x-torpor-error'], 'NOT_FOUND');
    const actors404 = await request(t.routerUrl, { host: hostOf('a1'), path: '/no-such-path' });
    assert.equal(actors404.headers['x-torpor-error'], undefined, "the actor's own answers are not marked");

    // Announced as 3 MiB against a 2 MiB limit: refused from the header, before any body is read.
    const url = new URL(t.routerUrl);
    const raw = net.connect(Number(url.port), url.hostname);
    raw.write(`POST /echo HTTP/1.1\r\nHost: ${hostOf('a1')}\r\nContent-Length: ${3 * 1024 * 1024}\r\n\r\n`);
    const answer = await new Promise<string>((r) => raw.once('data', (d: Buffer) => r(d.toString())));
    raw.destroy();
    assert.match(answer, /^HTTP\/1\.1 413/);
    assert.match(answer, /"code":"PAYLOAD_TOO_LARGE"/);

    const slow = await request(t.routerUrl, { host: hostOf('a1'), path: '/sleep?ms=5000' });
    assert.equal(slow.status, 504, slow.body);
    assert.equal(JSON.parse(slow.body).error.code, 'TIMEOUT');

    await t.json('actor', 'create', 'p1', '--template', 'counter', '--space', 'private');
    const none = await request(t.routerUrl, { host: hostOf('p1', 'private') });
    assert.equal(none.status, 401);
    const wrong = await request(t.routerUrl, {
      host: hostOf('p1', 'private'),
      headers: { authorization: 'Bearer nope' },
    });
    assert.equal(wrong.status, 403);
    assert.doesNotMatch(wrong.body, /s3cret/);
    const right = await request(t.routerUrl, {
      host: hostOf('p1', 'private'),
      path: '/headers',
      headers: { authorization: 'Bearer s3cret-token' },
    });
    assert.equal(right.status, 200);
    assert.doesNotMatch(right.body, /s3cret/, 'the ingress token is not passed on to the actor');
  });
});
