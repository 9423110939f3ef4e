// The router's location cache follows the store's change feed; when a watch ends (a store may end one that fell
// behind, a connection may drop), the router must not keep serving from a cache that no longer hears changes.
import assert from 'node:assert/strict';
import { createServer, request, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { after, test } from 'node:test';
import { pino } from 'pino';
import { ActivityTracker } from '../../src/control/activity.ts';
import type { IdlePolicy } from '../../src/control/idle.ts';
import type { Lifecycle } from '../../src/control/lifecycle.ts';
import { Metrics } from '../../src/control/metrics.ts';
import { Router } from '../../src/router/router.ts';
import { SqliteStore } from '../../src/store/sqlite.ts';
import type { ChangeKind, StateStore } from '../../src/store/store.ts';
import { actor } from '../store/conformance.ts';

const servers: Server[] = [];
after(() => {
  for (const s of servers) s.close();
});

async function listen(handler: Parameters<typeof createServer>[1]): Promise<string> {
  const server = createServer(handler);
  servers.push(server);
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  return `127.0.0.1:${(server.address() as AddressInfo).port}`;
}

function get(address: string): Promise<string> {
  const [host, port] = address.split(':');
  return new Promise((resolve, reject) => {
    const req = request({ host, port, path: '/', headers: { host: 'a1.default.actors.test' } }, (res) => {
      let body = '';
      res.on('data', (d: Buffer) => {
        body += d.toString();
      });
      res.on('end', () => resolve(body));
    });
    req.on('error', reject);
    req.end();
  });
}

test('a watch that ends is started again, and the cache it fed is dropped', async () => {
  const store = SqliteStore.open(':memory:');
  // The first watch ends when the test says so; later ones are the store's own.
  let endFirstWatch!: () => void;
  const ended = new Promise<void>((r) => {
    endFirstWatch = r;
  });
  let watches = 0;
  const watch = (kinds: ChangeKind[], signal: AbortSignal) => {
    watches++;
    if (watches > 1) return store.watch(kinds, signal);
    const inner = new AbortController();
    void ended.then(() => inner.abort());
    signal.addEventListener('abort', () => inner.abort());
    return store.watch(kinds, inner.signal);
  };
  const flaky = new Proxy(store, {
    get(target, prop) {
      if (prop === 'watch') return watch;
      const value = Reflect.get(target, prop, target) as unknown;
      return typeof value === 'function' ? value.bind(target) : value;
    },
  }) as StateStore;
  const addressA = await listen((_q, s) => s.end('A'));
  const addressB = await listen((_q, s) => s.end('B'));
  const created = await store.createActor({ ...actor('default', 'a1'), status: 'RUNNING', address: addressA });
  const router = new Router({
    store: flaky,
    lifecycle: {} as Lifecycle,
    idle: {} as IdlePolicy,
    activity: new ActivityTracker(),
    metrics: new Metrics(),
    log: pino({ level: 'silent' }),
    domain: 'test',
  });
  const front = await listen(router.handle);
  try {
    assert.equal(await get(front), 'A');
    endFirstWatch();
    await new Promise((r) => setTimeout(r, 20));
    // Moved while nothing was watching.
    await store.casActor({ ...created, address: addressB }, created.version);
    await new Promise((r) => setTimeout(r, 500));
    assert.equal(await get(front), 'B', 'the router no longer serves the stale location');
    assert.ok(watches >= 2, 'the watch was started again');
  } finally {
    router.close();
    await store.close();
  }
});
