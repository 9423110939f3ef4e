// ImageStore against a real registry (Debian's docker-registry, distribution 2.8), started on a free
// loopback port by scripts/services/registry.sh and stopped by its PID. Requests are counted (and, on
// demand, tampered with or cut) by a proxy in front of it. Without docker-registry every test here is
// reported as skipped, with the reason.

import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdtemp, readdir, readFile, rm, stat, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import { promisify } from 'node:util';
import { TorporError } from '../../src/core/errors.ts';
import type { ImageSpec } from '../../src/image/pack.ts';
import { writeOciLayout } from '../../src/image/pack.ts';
import { parseRegistryReference } from '../../src/image/registry.ts';
import { ImageStore } from '../../src/image/store.ts';
import { assertRejects, scratch } from './helpers.ts';
import {
  type BuiltImage,
  buildImage,
  haveCommand,
  htpasswdFile,
  Pusher,
  RegistryProxy,
  type RunningRegistry,
  startRegistry,
  startTokenServer,
} from './registry-helpers.ts';

const run = promisify(execFile);

const SAMPLE: ImageSpec = {
  layers: [
    [
      { path: 'etc/', type: 'dir' },
      { path: 'etc/os-release', type: 'file', content: 'ID=torpor-test\n' },
      { path: 'bin/tool', type: 'file', content: '#!/bin/sh\necho hi\n', mode: 0o755 },
    ],
    [{ path: 'srv/data.txt', type: 'file', content: 'layer two\n' }],
  ],
  config: { entrypoint: ['/bin/tool'], env: ['A=1'], workingDir: '/srv' },
  tag: 'v1',
};

const started = await startRegistry();
const skip = typeof started === 'string' ? started : false;
const registry = typeof started === 'string' ? undefined : started;
after(() => registry?.stop());

let sample: BuiltImage;
before(async () => {
  if (!registry) return;
  sample = await buildImage(SAMPLE);
  await new Pusher(registry.url).image('torpor/sample', 'v1', sample);
});

function reg(): RunningRegistry {
  assert.ok(registry);
  return registry;
}

async function proxy(t: import('node:test').TestContext): Promise<RegistryProxy> {
  const p = await new RegistryProxy(reg().port).start();
  t.after(() => p.stop());
  return p;
}

function blobPath(cacheDir: string, digest: string): string {
  return join(cacheDir, 'blobs', 'sha256', digest.slice('sha256:'.length));
}

function platformImage(arch: string): ImageSpec {
  return { layers: [[{ path: 'arch', type: 'file', content: `${arch}\n` }]], config: { cmd: ['/arch'] } };
}

test('registry references parse, and credentials in a reference are refused without echoing them', () => {
  assert.deepEqual(parseRegistryReference('127.0.0.1:5000/a/b:v1'), {
    registry: '127.0.0.1:5000',
    repository: 'a/b',
    tag: 'v1',
  });
  const digest = `sha256:${'a'.repeat(64)}`;
  assert.deepEqual(parseRegistryReference(`docker://localhost:5000/x@${digest}`), {
    registry: 'localhost:5000',
    repository: 'x',
    digest,
  });
  assert.deepEqual(parseRegistryReference('docker://busybox'), {
    registry: 'docker.io',
    repository: 'library/busybox',
    tag: 'latest',
  });
  assert.throws(() => parseRegistryReference('docker://reg.example/UPPER:v1'), /invalid repository/);
  assert.throws(
    () => parseRegistryReference('docker://user:hunter2@reg.example/x:v1'),
    (err: unknown) => err instanceof TorporError && err.code === 'INVALID_ARGUMENT' && !err.message.includes('hunter2'),
  );
});

test('a missing local path that is not a registry reference keeps its old error', async (t) => {
  const s = await scratch(t);
  await assertRejects(new ImageStore(s.cacheDir).resolve(join(s.root, 'nope:v1')), 'NOT_FOUND', /layout directory/);
});

test('pull by tag, then by digest: verified blobs in the layer cache, rootfs keyed by manifest digest', {
  skip,
}, async (t) => {
  const s = await scratch(t);
  const store = new ImageStore(s.cacheDir);
  const byTag = await store.resolve(`${reg().host}/torpor/sample:v1`);
  assert.equal(byTag.digest, sample.digest);
  assert.equal(byTag.unpacked, true);
  assert.equal(byTag.rootfs, join(s.cacheDir, 'rootfs', sample.digest.slice(7)));
  assert.deepEqual(byTag.config, { entrypoint: ['/bin/tool'], cmd: [], env: ['A=1'], workingDir: '/srv', user: '' });
  assert.equal(await readFile(join(byTag.rootfs, 'etc/os-release'), 'utf8'), 'ID=torpor-test\n');
  assert.equal(await readFile(join(byTag.rootfs, 'srv/data.txt'), 'utf8'), 'layer two\n');
  assert.equal((await stat(join(byTag.rootfs, 'bin/tool'))).mode & 0o777, 0o755);
  for (const blob of [sample.config, ...sample.layers]) {
    assert.deepEqual(await readFile(blobPath(s.cacheDir, blob.digest)), blob.data);
  }

  const byDigest = await store.resolve(`docker://${reg().host}/torpor/sample@${sample.digest}`);
  assert.equal(byDigest.digest, sample.digest);
  assert.equal(byDigest.rootfs, byTag.rootfs);
  assert.equal(byDigest.unpacked, false);

  // A fresh cache pulling by digest alone works too.
  const s2 = await scratch(t);
  const fresh = await new ImageStore(s2.cacheDir).resolve(`${reg().host}/torpor/sample@${sample.digest}`);
  assert.equal(fresh.digest, sample.digest);
  assert.equal(fresh.unpacked, true);
});

test('a second resolve is a cache hit: no blob is fetched again, even when the rootfs must be rebuilt', {
  skip,
}, async (t) => {
  const s = await scratch(t);
  const p = await proxy(t);
  const ref = `${p.host}/torpor/sample:v1`;
  const first = await new ImageStore(s.cacheDir).resolve(ref);
  assert.equal(first.unpacked, true);
  assert.equal(p.blobGets().length, 3, 'config and two layers, each fetched once');
  // Not mtimes: a use touches them (the cache evicts least recently used blobs); a rewrite would change the inode.
  const inodes = await Promise.all(sample.layers.map(async (l) => (await stat(blobPath(s.cacheDir, l.digest))).ino));
  const before = p.requests.length;

  const second = await new ImageStore(s.cacheDir).resolve(ref);
  assert.equal(second.unpacked, false);
  const again = p.requests.slice(before);
  assert.ok(again.length > 0 && again.every((r) => r.path.includes('/manifests/')), JSON.stringify(again));

  // The layer cache outlives the rootfs: rebuilding it needs no download either.
  await rm(first.rootfs, { recursive: true });
  const third = await new ImageStore(s.cacheDir).resolve(ref);
  assert.equal(third.unpacked, true);
  assert.equal(await readFile(join(third.rootfs, 'srv/data.txt'), 'utf8'), 'layer two\n');
  assert.equal(p.blobGets().length, 3, 'still only the first pull fetched blobs');
  const inodesAfter = await Promise.all(
    sample.layers.map(async (l) => (await stat(blobPath(s.cacheDir, l.digest))).ino),
  );
  assert.deepEqual(inodesAfter, inodes);
});

test('concurrent pulls of one image share one download per blob', { skip }, async (t) => {
  const s = await scratch(t);
  const p = await proxy(t);
  const store = new ImageStore(s.cacheDir);
  const results = await Promise.all(Array.from({ length: 5 }, () => store.resolve(`${p.host}/torpor/sample:v1`)));
  assert.ok(results.every((r) => r.digest === sample.digest));
  for (const blob of [sample.config, ...sample.layers]) {
    assert.equal(p.blobGets(blob.digest).length, 1, `${blob.digest} fetched once`);
  }
  assert.equal(store.unpackCount, 1);
});

for (const flavor of ['oci', 'docker'] as const) {
  test(`a multi-platform ${flavor === 'oci' ? 'OCI index' : 'Docker manifest list'} resolves to linux/amd64`, {
    skip,
  }, async (t) => {
    const s = await scratch(t);
    const p = await proxy(t);
    const images = {
      arm64: await buildImage(platformImage('arm64'), flavor),
      amd64: await buildImage(platformImage('amd64'), flavor),
      s390x: await buildImage(platformImage('s390x'), flavor),
    };
    const repo = `torpor/multi-${flavor}`;
    await new Pusher(reg().url).index(
      repo,
      'latest',
      [
        { image: images.arm64, platform: { os: 'linux', architecture: 'arm64', variant: 'v8' } },
        { image: images.s390x, platform: { os: 'linux', architecture: 's390x' } },
        { image: images.amd64, platform: { os: 'linux', architecture: 'amd64' } },
      ],
      flavor,
    );
    const image = await new ImageStore(s.cacheDir).resolve(`docker://${p.host}/${repo}`);
    assert.equal(image.digest, images.amd64.digest, 'the rootfs is keyed by the platform manifest');
    assert.equal(await readFile(join(image.rootfs, 'arch'), 'utf8'), 'amd64\n');
    for (const other of [images.arm64, images.s390x]) {
      assert.equal(p.blobGets(other.layers[0]!.digest).length, 0, 'no other platform is downloaded');
    }
  });
}

test('an index without this platform is NOT_FOUND, naming what it offers', { skip }, async (t) => {
  const s = await scratch(t);
  const arm = await buildImage(platformImage('arm64'));
  await new Pusher(reg().url).index(
    'torpor/arm-only',
    'v1',
    [{ image: arm, platform: { os: 'linux', architecture: 'arm64' } }],
    'oci',
  );
  await assertRejects(
    new ImageStore(s.cacheDir).resolve(`${reg().host}/torpor/arm-only:v1`),
    'NOT_FOUND',
    /no linux\/amd64 manifest \(it offers linux\/arm64\)/,
  );
});

test('a tampered layer is IMAGE_REJECTED naming the blob, and nothing is cached', { skip }, async (t) => {
  const s = await scratch(t);
  const p = await proxy(t);
  const bad = sample.layers[1]!.digest;
  p.tamper = bad;
  const err = await assertRejects(
    new ImageStore(s.cacheDir).resolve(`${p.host}/torpor/sample:v1`),
    'IMAGE_REJECTED',
    /does not match its digest/,
  );
  assert.match(err.message, new RegExp(bad));
  await assert.rejects(stat(blobPath(s.cacheDir, bad)), { code: 'ENOENT' });
  const leftovers = (await readdir(join(s.cacheDir, 'blobs', 'sha256'))).filter((n) => n.startsWith('.tmp-'));
  assert.deepEqual(leftovers, []);
  assert.deepEqual(await readdir(join(s.cacheDir, 'rootfs')).catch(() => []), []);

  // Nothing was poisoned: the honest registry's blob is then accepted.
  p.tamper = undefined;
  const image = await new ImageStore(s.cacheDir).resolve(`${p.host}/torpor/sample:v1`);
  assert.equal(image.digest, sample.digest);
});

test('an interrupted layer download resumes with a Range request', { skip }, async (t) => {
  const s = await scratch(t);
  const big = await buildImage({
    layers: [[{ path: 'blob.bin', type: 'file', content: randomBytes(2 << 20) }]],
    config: {},
  });
  await new Pusher(reg().url).image('torpor/big', 'v1', big);
  const p = await proxy(t);
  const layer = big.layers[0]!;
  p.cutOnce = layer.digest;
  const progress: { bytesDone: number; bytesTotal: number }[] = [];
  const image = await new ImageStore(s.cacheDir).resolve(`${p.host}/torpor/big:v1`, {
    onProgress: (x) => progress.push(x),
  });
  assert.equal(image.digest, big.digest);
  const gets = p.blobGets(layer.digest);
  assert.equal(gets.length, 2, 'one cut download, one resumed');
  assert.equal(gets[0]!.range, undefined);
  assert.match(gets[1]!.range ?? '', /^bytes=[1-9]\d*-$/);
  assert.deepEqual(await readFile(blobPath(s.cacheDir, layer.digest)), layer.data);
  assert.deepEqual(progress.at(-1), { bytesDone: layer.data.length, bytesTotal: layer.data.length });
});

test('progress reports bytes of layer downloads up to the total', { skip }, async (t) => {
  const s = await scratch(t);
  const progress: { bytesDone: number; bytesTotal: number }[] = [];
  await new ImageStore(s.cacheDir, { registry: { onProgress: (x) => progress.push(x) } }).resolve(
    `${reg().host}/torpor/sample:v1`,
  );
  const total = sample.layers.reduce((sum, l) => sum + l.data.length, 0);
  assert.ok(progress.length >= 2);
  assert.ok(progress.every((x) => x.bytesTotal === total));
  assert.deepEqual(progress[0], { bytesDone: 0, bytesTotal: total });
  assert.deepEqual(progress.at(-1), { bytesDone: total, bytesTotal: total });
  for (let i = 1; i < progress.length; i++) assert.ok(progress[i]!.bytesDone >= progress[i - 1]!.bytesDone);
});

test('an unknown tag or repository is NOT_FOUND', { skip }, async (t) => {
  const s = await scratch(t);
  const store = new ImageStore(s.cacheDir);
  await assertRejects(store.resolve(`${reg().host}/torpor/sample:nope`), 'NOT_FOUND', /no manifest nope/);
  await assertRejects(store.resolve(`docker://${reg().host}/torpor/absent:v1`), 'NOT_FOUND');
  const wrong = `sha256:${'0'.repeat(64)}`;
  await assertRejects(store.resolve(`${reg().host}/torpor/sample@${wrong}`), 'NOT_FOUND');
});

const htpasswdSkip = skip || ((await haveCommand('htpasswd')) ? false : 'htpasswd (apache2-utils) is not installed');

test('HTTP Basic auth: options, auth file, wrong password (not leaked), no credentials', {
  skip: htpasswdSkip,
}, async (t) => {
  const s = await scratch(t);
  const password = `pw-${randomBytes(6).toString('hex')}`;
  const htpasswd = await htpasswdFile(s.root, 'alice', password);
  assert.ok(htpasswd);
  const secured = await startRegistry({ htpasswd });
  if (typeof secured === 'string') return t.skip(secured);
  t.after(() => secured.stop());
  const basic = `Basic ${Buffer.from(`alice:${password}`).toString('base64')}`;
  await new Pusher(secured.url, { authorization: basic }).image('private/app', 'v1', sample);
  const ref = `${secured.host}/private/app:v1`;

  const image = await new ImageStore(join(s.root, 'c1'), {
    registry: { auth: { [secured.host]: { username: 'alice', password } } },
  }).resolve(ref);
  assert.equal(image.digest, sample.digest);

  const authFile = join(s.root, 'config.json');
  await writeFile(
    authFile,
    JSON.stringify({ auths: { [secured.host]: { auth: Buffer.from(`alice:${password}`).toString('base64') } } }),
  );
  const viaFile = await new ImageStore(join(s.root, 'c2'), { registry: { authFile } }).resolve(ref);
  assert.equal(viaFile.digest, sample.digest);
  const previous = process.env.TORPOR_REGISTRY_AUTH_FILE;
  process.env.TORPOR_REGISTRY_AUTH_FILE = authFile;
  try {
    assert.equal((await new ImageStore(join(s.root, 'c3')).resolve(ref)).digest, sample.digest);
  } finally {
    if (previous === undefined) delete process.env.TORPOR_REGISTRY_AUTH_FILE;
    else process.env.TORPOR_REGISTRY_AUTH_FILE = previous;
  }

  const wrong = `${password}-wrong`;
  const err = await assertRejects(
    new ImageStore(join(s.root, 'c4'), {
      registry: { auth: { [secured.host]: { username: 'alice', password: wrong } } },
    }).resolve(ref),
    'UNAUTHENTICATED',
    /rejected the credentials/,
  );
  for (const secret of [password, wrong, Buffer.from(`alice:${wrong}`).toString('base64')]) {
    assert.ok(!err.message.includes(secret), 'the password never reaches an error message');
    assert.ok(!JSON.stringify(err.toJSON()).includes(secret));
  }
  await assertRejects(new ImageStore(join(s.root, 'c5')).resolve(ref), 'UNAUTHENTICATED', /no credentials/);
});

test('bearer-token auth: the token flow with the realm, scope and service the registry names', {
  skip,
}, async (t) => {
  const s = await scratch(t);
  const password = `tok-${randomBytes(6).toString('hex')}`;
  const tokens = await startTokenServer('bob', password);
  if (typeof tokens === 'string') return t.skip(tokens);
  t.after(() => tokens.stop());
  const secured = await startRegistry({ token: tokens });
  if (typeof secured === 'string') return t.skip(secured);
  t.after(() => secured.stop());
  const push = new Pusher(secured.url, { authorization: `Bearer ${tokens.issue('team/app', ['pull', 'push'])}` });
  await push.image('team/app', 'v1', sample);
  const ref = `docker://${secured.host}/team/app:v1`;

  const image = await new ImageStore(join(s.root, 'c1'), {
    registry: { auth: { [secured.host]: { username: 'bob', password } } },
  }).resolve(ref);
  assert.equal(image.digest, sample.digest);
  const granted = tokens.requests.filter((r) => r.authorized);
  assert.ok(granted.length >= 1);
  assert.equal(granted[0]!.scope, 'repository:team/app:pull');
  assert.equal(granted[0]!.service, tokens.service);

  const err = await assertRejects(
    new ImageStore(join(s.root, 'c2'), {
      registry: { auth: { [secured.host]: { username: 'bob', password: 'not-it' } } },
    }).resolve(ref),
    'UNAUTHENTICATED',
  );
  assert.ok(!err.message.includes('not-it') && !err.message.includes(password));
  await assertRejects(new ImageStore(join(s.root, 'c3')).resolve(ref), 'UNAUTHENTICATED', /none are configured/);

  // A pre-issued token is used as the bearer directly.
  const direct = await new ImageStore(join(s.root, 'c4'), {
    registry: { auth: { [secured.host]: { token: tokens.issue('team/app', ['pull']) } } },
  }).resolve(ref);
  assert.equal(direct.digest, sample.digest);
});

const skopeoSkip = skip || ((await haveCommand('skopeo')) ? false : 'skopeo is not installed');

test('an image pushed by skopeo (a real client) pulls', { skip: skopeoSkip }, async (t) => {
  const s = await scratch(t);
  const layout = await mkdtemp(join(tmpdir(), 'torpor-skopeo-'));
  t.after(() => rm(layout, { recursive: true, force: true }));
  const { digest } = await writeOciLayout(layout, { ...SAMPLE, tag: 'v2' });
  await run('skopeo', [
    '--insecure-policy',
    'copy',
    '--quiet',
    '--dest-tls-verify=false',
    `oci:${layout}:v2`,
    `docker://${reg().host}/skopeo/sample:v2`,
  ]);
  const image = await new ImageStore(s.cacheDir).resolve(`${reg().host}/skopeo/sample:v2`);
  assert.equal(image.digest, digest, 'skopeo kept the manifest byte for byte');
  assert.equal(await readFile(join(image.rootfs, 'srv/data.txt'), 'utf8'), 'layer two\n');
});
