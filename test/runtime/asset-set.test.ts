// Asset sets: the schema (names per runtime class, sha256 required, no inline credentials), template overrides,
// secrets referenced by name and read only when a download needs them, never echoed.
import assert from 'node:assert/strict';
import { createHash, randomBytes } from 'node:crypto';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { createServer } from 'node:http';
import type { AddressInfo } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { type TestContext, test } from 'node:test';
import { stringify } from 'yaml';
import { TorporError } from '../../src/core/errors.ts';
import { parse, templateSpec } from '../../src/core/schemas.ts';
import {
  fetchAssets,
  hostArch,
  parseAssetSets,
  pinnedAssets,
  readSecret,
  selectAssetSet,
} from '../../src/runtime/asset-set.ts';
import { AssetStore } from '../../src/runtime/assets.ts';

const sha = (data: Uint8Array | string) => createHash('sha256').update(data).digest('hex');
const SHA = sha('runsc');

function invalid(fn: () => unknown, field: string, message?: RegExp): TorporError {
  let caught: unknown;
  assert.throws(fn, (err) => {
    caught = err;
    return true;
  });
  assert.ok(caught instanceof TorporError, String(caught));
  assert.equal(caught.code, 'INVALID_ARGUMENT', caught.message);
  assert.equal(caught.field, field, caught.message);
  if (message) assert.match(caught.message, message);
  return caught;
}

const gvisorSet = (assets: Record<string, unknown>, extra: Record<string, unknown> = {}) =>
  stringify({ runtime: 'gvisor', arch: 'amd64', assets, ...extra });

test('an asset set parses from YAML; sha256 is normalised; a list holds one set per class and arch', () => {
  const [set] = parseAssetSets(
    gvisorSet({ runsc: { url: 'https://assets.example/runsc', sha256: `sha256:${SHA.toUpperCase()}` } }),
    'f',
  );
  assert.equal(set!.assets.runsc!.sha256, SHA);
  const kernel = { url: 'file:///a/vmlinux', sha256: SHA };
  const list = parseAssetSets(
    stringify([
      { runtime: 'gvisor', arch: 'amd64', assets: { runsc: { url: 'file:///a/runsc', sha256: SHA } } },
      { runtime: 'gvisor', arch: 'arm64', assets: { runsc: { url: 'file:///b/runsc', sha256: SHA } } },
      {
        runtime: 'microvm',
        arch: 'amd64',
        assets: { kernel, initrd: kernel, qemu: kernel, bios: kernel },
        auth: { type: 'bearer', secretRef: 'env:ASSET_TOKEN' },
      },
    ]),
    'f',
  );
  assert.equal(selectAssetSet(list, 'gvisor', 'arm64')!.assets.runsc!.url, 'file:///b/runsc');
  assert.equal(selectAssetSet(list, 'microvm', 'arm64'), undefined);
  assert.ok(selectAssetSet(list, 'gvisor', hostArch()));
  // The set's auth reference is pinned with each of its assets.
  assert.deepEqual(pinnedAssets(selectAssetSet(list, 'microvm', 'amd64')!).kernel, {
    ...kernel,
    auth: { type: 'bearer', secretRef: 'env:ASSET_TOKEN' },
  });
});

test('asset sets are checked: names per runtime class, sha256, schemes, no credentials in URLs', () => {
  const ok = { url: 'file:///x', sha256: SHA };
  invalid(() => parseAssetSets(gvisorSet({}), 'f'), 'assets.assets', /gvisor needs the asset "runsc"/);
  invalid(() => parseAssetSets(gvisorSet({ runsc: ok, kernel: ok }), 'f'), 'assets.assets.kernel', /not a gvisor/);
  invalid(() => parseAssetSets(gvisorSet({ runsc: { url: 'file:///x' } }), 'f'), 'assets.assets.runsc.sha256');
  invalid(
    () => parseAssetSets(gvisorSet({ runsc: { url: 'file:///x', sha256: 'abc' } }), 'f'),
    'assets.assets.runsc.sha256',
  );
  invalid(() => parseAssetSets(gvisorSet({ runsc: { ...ok, url: 'ftp://h/x' } }), 'f'), 'assets.assets.runsc.url');
  const leaked = invalid(
    () => parseAssetSets(gvisorSet({ runsc: { ...ok, url: 'https://user:hunter2@h/runsc' } }), 'f'),
    'assets.assets.runsc.url',
    /auth\.secretRef/,
  );
  assert.ok(!leaked.message.includes('hunter2'));
  invalid(
    () => parseAssetSets(gvisorSet({ runsc: ok }, { auth: { type: 'bearer', secretRef: 'hunter2' } }), 'f'),
    'assets.auth.secretRef',
  );
  invalid(() => parseAssetSets(gvisorSet({ runsc: ok }, { auth: { token: 'hunter2' } }), 'f'), 'assets.auth.type');
  const bearer = { type: 'bearer', secretRef: 'env:T' };
  invalid(
    () => parseAssetSets(gvisorSet({ runsc: ok }, { auth: { ...bearer, region: 'eu' } }), 'f'),
    'assets.auth.region',
  );
  const s3 = { type: 's3', secretRef: 'env:T', endpoint: 'https://k:hunter2@s3.example' };
  const endpoint = invalid(() => parseAssetSets(gvisorSet({ runsc: ok }, { auth: s3 }), 'f'), 'assets.auth.endpoint');
  assert.ok(!endpoint.message.includes('hunter2'));
  const [withS3] = parseAssetSets(
    gvisorSet({ runsc: ok }, { auth: { ...s3, endpoint: 'http://127.0.0.1:7480' } }),
    'f',
  );
  assert.equal(withS3!.auth?.endpoint, 'http://127.0.0.1:7480');
  const microvm = (assets: Record<string, unknown>) => stringify({ runtime: 'microvm', arch: 'amd64', assets });
  invalid(() => parseAssetSets(microvm({ kernel: ok, initrd: ok }), 'f'), 'assets.assets', /exactly one of/);
  invalid(
    () => parseAssetSets(microvm({ kernel: ok, initrd: ok, qemu: ok, 'cloud-hypervisor': ok }), 'f'),
    'assets.assets',
  );
  invalid(() => parseAssetSets(gvisorSet({ runsc: ok }, { arch: 'mips' }), 'f'), 'assets.arch');
  invalid(() => parseAssetSets(stringify([]), 'f'), 'assets');
  invalid(() => parseAssetSets(`${stringify([yamlSet(ok), yamlSet(ok)])}`, 'f'), 'assets', /more than one/);
  invalid(() => parseAssetSets('runtime: [', 'f'), 'assets');
});

function yamlSet(runsc: unknown) {
  return { runtime: 'gvisor', arch: 'amd64', assets: { runsc } };
}

test('a template may override its assets; names are checked against its runtime class', () => {
  const base = { name: 't', image: '/i', port: 80 };
  const t = parse(templateSpec, { ...base, assets: { runsc: { url: 'https://h/runsc', sha256: SHA } } });
  assert.equal(t.assets?.runsc?.sha256, SHA);
  assert.equal(parse(templateSpec, base).assets, undefined);
  invalid(() => parse(templateSpec, { ...base, assets: { kernel: { url: 'file:///k', sha256: SHA } } }), 'assets');
  invalid(() => parse(templateSpec, { ...base, assets: { runsc: { url: 'file:///k' } } }), 'assets.runsc.sha256');
  invalid(
    () =>
      parse(templateSpec, {
        ...base,
        runtime: 'microvm',
        assets: { kernel: { url: 'file:///k', sha256: SHA }, initrd: { url: 'file:///i', sha256: SHA } },
      }),
    'assets',
  );
});

async function scratch(t: TestContext): Promise<string> {
  const dir = await mkdtemp(join(tmpdir(), 'torpor-asset-set-test-'));
  t.after(() => rm(dir, { recursive: true, force: true }));
  return dir;
}

test('secrets are read by reference, from the environment or a file, and never echoed', async (t) => {
  const dir = await scratch(t);
  process.env.TORPOR_TEST_ASSET_SECRET = 'from-env';
  t.after(() => delete process.env.TORPOR_TEST_ASSET_SECRET);
  assert.equal(await readSecret('env:TORPOR_TEST_ASSET_SECRET', 'f'), 'from-env');
  await writeFile(join(dir, 'token'), 'from-file\n');
  assert.equal(await readSecret(`file:${join(dir, 'token')}`, 'f'), 'from-file');
  for (const ref of ['env:TORPOR_TEST_UNSET_SECRET', `file:${join(dir, 'missing')}`]) {
    await assert.rejects(readSecret(ref, 'f'), (err: TorporError) => {
      assert.equal(err.code, 'FAILED_PRECONDITION');
      assert.ok(err.message.includes(ref), err.message);
      return true;
    });
  }
});

test('fetchAssets: credentials resolved only for a download, sent to the origin, never in errors', async (t) => {
  const dir = await scratch(t);
  const data = randomBytes(50_000);
  const token = `tok-${randomBytes(6).toString('hex')}`;
  let requests = 0;
  const server = createServer((req, res) => {
    requests++;
    if (req.headers.authorization !== `Basic ${Buffer.from(`ops:${token}`).toString('base64')}`) {
      res.writeHead(401).end();
      return;
    }
    res.writeHead(200, { 'content-length': data.length }).end(data);
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  t.after(() => new Promise<void>((r) => server.close(() => r())));
  const url = `http://127.0.0.1:${(server.address() as AddressInfo).port}/runsc`;
  const secretFile = join(dir, 'basic');
  await writeFile(secretFile, `ops:${token}\n`, { mode: 0o600 });
  const assets = {
    runsc: { url, sha256: sha(data), auth: { type: 'basic' as const, secretRef: `file:${secretFile}` } },
  };
  const store = new AssetStore(join(dir, 'cache'));
  const progress: number[] = [];
  const paths = await fetchAssets(store, assets, { onProgress: (_name, p) => progress.push(p.bytesDone) });
  assert.equal(paths.runsc, store.path(sha(data)));
  assert.equal(progress.at(-1), data.length);
  assert.equal(requests, 1);

  // A cache hit needs no secret: it is not even read.
  await rm(secretFile);
  assert.deepEqual(await fetchAssets(store, assets), paths);
  assert.equal(requests, 1);

  // A wrong secret: UNAUTHENTICATED, and neither secret appears in the message.
  await writeFile(secretFile, 'ops:wrong-password');
  const err = await fetchAssets(new AssetStore(join(dir, 'other')), assets).then(
    () => assert.fail('expected a failure'),
    (e: TorporError) => e,
  );
  assert.equal(err.code, 'UNAUTHENTICATED');
  assert.ok(!err.message.includes('wrong-password') && !err.message.includes(token), err.message);

  await writeFile(secretFile, 'no-colon');
  await assert.rejects(fetchAssets(new AssetStore(join(dir, 'third')), assets), (e: TorporError) => {
    assert.equal(e.code, 'FAILED_PRECONDITION');
    assert.ok(!e.message.includes('no-colon'), e.message);
    return true;
  });
});
