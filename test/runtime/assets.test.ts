// AssetStore: content-addressed runtime assets from file:// and from a loopback HTTP server started here
// (it counts requests, checks credentials, can redirect, and can cut one response to force a resume).

import assert from 'node:assert/strict';
import { createHash, randomBytes } from 'node:crypto';
import { mkdtemp, readdir, readFile, rm, stat, writeFile } from 'node:fs/promises';
import { createServer, type IncomingMessage } from 'node:http';
import type { AddressInfo } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { type TestContext, test } from 'node:test';
import { pathToFileURL } from 'node:url';
import { type ErrorCode, TorporError } from '../../src/core/errors.ts';
import { AssetStore } from '../../src/runtime/assets.ts';

const sha = (data: Uint8Array) => createHash('sha256').update(data).digest('hex');

async function dirs(t: TestContext) {
  const root = await mkdtemp(join(tmpdir(), 'torpor-assets-test-'));
  t.after(() => rm(root, { recursive: true, force: true }));
  return { root, cache: join(root, 'assets') };
}

interface Served {
  url: string;
  origin: string;
  requests: IncomingMessage[];
  /** Cut the next response halfway (once). */
  cutNext: boolean;
}

/** Serves `files` (path → bytes) with Range support; `auth` (an Authorization value) when given is required. */
async function serve(
  t: TestContext,
  files: Record<string, Uint8Array>,
  opts: { auth?: string; delayMs?: number; redirect?: Record<string, string> } = {},
): Promise<Served> {
  const served: Served = { url: '', origin: '', requests: [], cutNext: false };
  const server = createServer(async (req, res) => {
    served.requests.push(req);
    const path = new URL(req.url ?? '/', 'http://x').pathname;
    const target = opts.redirect?.[path];
    if (target) {
      res.writeHead(302, { location: target });
      res.end();
      return;
    }
    if (opts.auth && req.headers.authorization !== opts.auth) {
      res.writeHead(401);
      res.end('no');
      return;
    }
    const data = files[path];
    if (!data) {
      res.writeHead(404);
      res.end();
      return;
    }
    if (opts.delayMs) await new Promise((r) => setTimeout(r, opts.delayMs));
    const start = Number(/^bytes=(\d+)-$/.exec(req.headers.range ?? '')?.[1] ?? 0);
    const body = data.subarray(start);
    res.writeHead(start ? 206 : 200, {
      'content-length': body.length,
      ...(start ? { 'content-range': `bytes ${start}-${data.length - 1}/${data.length}` } : {}),
    });
    if (served.cutNext) {
      served.cutNext = false;
      res.write(body.subarray(0, body.length >> 1), () => setTimeout(() => res.destroy(), 20));
      return;
    }
    res.end(body);
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  t.after(
    () =>
      new Promise<void>((resolve) => {
        server.closeAllConnections();
        server.close(() => resolve());
      }),
  );
  served.origin = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
  served.url = served.origin;
  return served;
}

async function rejects(promise: Promise<unknown>, code: ErrorCode): Promise<TorporError> {
  let caught: unknown;
  await assert.rejects(promise, (err) => {
    caught = err;
    return true;
  });
  assert.ok(caught instanceof TorporError, `expected a TorporError, got ${String(caught)}`);
  assert.equal(caught.code, code, caught.message);
  return caught;
}

test('file:// asset: verified, cached under its sha256 with mode 0755, then a stat', async (t) => {
  const d = await dirs(t);
  const data = randomBytes(4096);
  const src = join(d.root, 'runsc');
  await writeFile(src, data);
  const store = new AssetStore(d.cache);
  const path = await store.fetch('runsc', { url: pathToFileURL(src).toString(), sha256: sha(data) });
  assert.equal(path, join(d.cache, sha(data)));
  assert.deepEqual(await readFile(path), data);
  assert.equal((await stat(path)).mode & 0o7777, 0o755);
  assert.equal(store.downloadCount, 1);

  // A hit does not read the source: it may even be gone.
  await rm(src);
  assert.equal(await store.fetch('runsc', { url: pathToFileURL(src).toString(), sha256: `sha256:${sha(data)}` }), path);
  assert.equal(store.downloadCount, 1);
  await rejects(store.fetch('other', { url: pathToFileURL(src).toString(), sha256: sha(randomBytes(8)) }), 'NOT_FOUND');
});

test('http:// asset with a bearer token: fetched once, a second fetch is a cache hit', async (t) => {
  const d = await dirs(t);
  const data = randomBytes(64 << 10);
  const token = `tok-${randomBytes(8).toString('hex')}`;
  const server = await serve(t, { '/kernel': data }, { auth: `Bearer ${token}` });
  const asset = { url: `${server.url}/kernel`, sha256: sha(data) };
  const store = new AssetStore(d.cache);
  const a = await store.fetch('kernel', asset, { auth: { bearer: token } });
  const b = await new AssetStore(d.cache).fetch('kernel', asset, { auth: { bearer: token } });
  assert.equal(a, b);
  assert.deepEqual(await readFile(a), data);
  assert.equal(server.requests.length, 1, 'the second fetch is a stat');

  const err = await rejects(
    new AssetStore(join(d.root, 'other')).fetch('kernel', asset, { auth: { bearer: 'wrong-token' } }),
    'UNAUTHENTICATED',
  );
  assert.match(err.message, /kernel/);
  assert.ok(!err.message.includes('wrong-token') && !err.message.includes(token));
  await rejects(new AssetStore(join(d.root, 'none')).fetch('kernel', asset), 'UNAUTHENTICATED');
});

test('http:// asset with basic auth', async (t) => {
  const d = await dirs(t);
  const data = Buffer.from('initrd bytes');
  const server = await serve(t, { '/initrd': data }, { auth: `Basic ${Buffer.from('u:p').toString('base64')}` });
  const path = await new AssetStore(d.cache).fetch(
    'initrd',
    { url: `${server.url}/initrd`, sha256: sha(data) },
    { auth: { username: 'u', password: 'p' }, mode: 0o644 },
  );
  assert.deepEqual(await readFile(path), data);
  assert.equal((await stat(path)).mode & 0o7777, 0o644);
});

test('10 concurrent fetches of one asset make one download', async (t) => {
  const d = await dirs(t);
  const data = randomBytes(256 << 10);
  const server = await serve(t, { '/qemu': data }, { delayMs: 100 });
  const store = new AssetStore(d.cache);
  const paths = await Promise.all(
    Array.from({ length: 10 }, () => store.fetch('qemu', { url: `${server.url}/qemu`, sha256: sha(data) })),
  );
  assert.equal(new Set(paths).size, 1);
  assert.equal(server.requests.length, 1);
  assert.equal(store.downloadCount, 1);
  assert.deepEqual(await readdir(d.cache), [sha(data)]);
});

test('a wrong sha256 fails naming the asset and both hashes, and leaves nothing in the cache', async (t) => {
  const d = await dirs(t);
  const data = randomBytes(1000);
  const server = await serve(t, { '/runsc': data });
  const claimed = sha(Buffer.from('something else'));
  const err = await rejects(
    new AssetStore(d.cache).fetch('runsc', { url: `${server.url}/runsc?X-Amz-Signature=s3cr3t`, sha256: claimed }),
    'RUNTIME_ERROR',
  );
  assert.match(err.message, /asset "runsc"/);
  assert.ok(err.message.includes(claimed) && err.message.includes(sha(data)), err.message);
  assert.ok(!err.message.includes('s3cr3t'), 'query strings (pre-signed URLs) are not printed');
  assert.deepEqual(await readdir(d.cache), []);
});

test('the size cap stops a download and leaves nothing behind', async (t) => {
  const d = await dirs(t);
  const data = randomBytes(100_000);
  const server = await serve(t, { '/big': data });
  const err = await rejects(
    new AssetStore(d.cache).fetch('big', { url: `${server.url}/big`, sha256: sha(data) }, { maxBytes: 10_000 }),
    'PAYLOAD_TOO_LARGE',
  );
  assert.match(err.message, /size cap of 10000 bytes/);
  assert.deepEqual(await readdir(d.cache), []);
  // The cap applies to file:// too.
  const src = join(d.root, 'big');
  await writeFile(src, data);
  await rejects(
    new AssetStore(d.cache).fetch('big', { url: pathToFileURL(src).toString(), sha256: sha(data) }, { maxBytes: 10 }),
    'PAYLOAD_TOO_LARGE',
  );
  assert.deepEqual(await readdir(d.cache), []);
});

test('mode is applied, also to an asset already cached with another mode', async (t) => {
  const d = await dirs(t);
  const data = Buffer.from('#!/bin/sh\n');
  const src = join(d.root, 'tool');
  await writeFile(src, data);
  const ref = { url: pathToFileURL(src).toString(), sha256: sha(data) };
  const store = new AssetStore(d.cache);
  assert.equal((await stat(await store.fetch('tool', ref, { mode: 0o700 }))).mode & 0o7777, 0o700);
  assert.equal((await stat(await store.fetch('tool', ref, { mode: 0o555 }))).mode & 0o7777, 0o555);
});

test('an interrupted download resumes with a Range request', async (t) => {
  const d = await dirs(t);
  const data = randomBytes(1 << 20);
  const server = await serve(t, { '/vmlinux': data });
  server.cutNext = true;
  const path = await new AssetStore(d.cache).fetch('vmlinux', { url: `${server.url}/vmlinux`, sha256: sha(data) });
  assert.deepEqual(await readFile(path), data);
  assert.equal(server.requests.length, 2);
  assert.match(server.requests[1]!.headers.range ?? '', /^bytes=[1-9]\d*-$/);
});

test('credentials are not sent to another origin a redirect points at', async (t) => {
  const d = await dirs(t);
  const data = Buffer.from('redirected asset');
  const mirror = await serve(t, { '/blob': data });
  const origin = await serve(t, {}, { redirect: { '/asset': `${mirror.url}/blob` } });
  const path = await new AssetStore(d.cache).fetch(
    'asset',
    { url: `${origin.url}/asset`, sha256: sha(data) },
    { auth: { bearer: 'only-for-origin' } },
  );
  assert.deepEqual(await readFile(path), data);
  assert.equal(origin.requests[0]!.headers.authorization, 'Bearer only-for-origin');
  assert.equal(mirror.requests.length, 1);
  assert.equal(mirror.requests[0]!.headers.authorization, undefined);
});

test('bad references are refused before any download', async (t) => {
  const d = await dirs(t);
  const store = new AssetStore(d.cache);
  const good = sha(Buffer.from('x'));
  const invalid = await rejects(store.fetch('runsc', { url: 'file:///x', sha256: 'abc' }), 'INVALID_ARGUMENT');
  assert.equal(invalid.field, 'assets.runsc.sha256');
  await rejects(store.fetch('runsc', { url: 'not a url', sha256: good }), 'INVALID_ARGUMENT');
  await rejects(store.fetch('runsc', { url: 'ftp://h/x', sha256: good }), 'INVALID_ARGUMENT');
  await rejects(
    store.fetch('runsc', { url: 's3://bucket/runsc', sha256: good }, { auth: { bearer: 't' } }),
    'INVALID_ARGUMENT',
  );
  await rejects(
    store.fetch('runsc', { url: 'http://assets.example/x', sha256: good }, { auth: { bearer: 't' } }),
    'INVALID_ARGUMENT',
  );
});
