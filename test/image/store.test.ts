import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { createReadStream } from 'node:fs';
import { lstat, mkdir, readdir, readFile, readlink, rm, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { pipeline } from 'node:stream/promises';
import { test } from 'node:test';
import { gunzipSync, zstdCompressSync } from 'node:zlib';
import tar from 'tar-stream';
import {
  type ImageSpec,
  MEDIA_TYPES,
  writeBlob,
  writeDockerArchive,
  writeOciArchive,
  writeOciLayout,
} from '../../src/image/pack.ts';
import { ImageStore } from '../../src/image/store.ts';
import { assertNothingEscaped, assertRejects, type Scratch, scratch } from './helpers.ts';

const SAMPLE: ImageSpec = {
  layers: [
    [
      { path: 'usr/', type: 'dir' },
      { path: 'usr/bin/tool', type: 'file', content: '#!/bin/sh\necho hi\n', mode: 0o755 },
      { path: 'usr/lib/libx.so', type: 'file', content: 'lib', mode: 0o644 },
      { path: 'etc/secret', type: 'file', content: 's3cret', mode: 0o600 },
      { path: 'private/', type: 'dir', mode: 0o700 },
      { path: 'bin/suid', type: 'file', content: 'x', mode: 0o4755 },
      { path: 'lib', type: 'symlink', linkname: 'usr/lib' },
      { path: 'lib64', type: 'symlink', linkname: '/usr/lib' },
      { path: 'usr/bin/tool-alias', type: 'hardlink', linkname: 'usr/bin/tool' },
    ],
    [
      // Written through the symlinks of the layer below: must land in usr/lib, inside the rootfs.
      { path: 'lib/via-relative.so', type: 'file', content: 'r' },
      { path: 'lib64/via-absolute.so', type: 'file', content: 'a' },
    ],
  ],
  config: { entrypoint: ['/usr/bin/tool'], cmd: ['--flag'], env: ['A=1', 'PATH=/usr/bin'], workingDir: '/srv' },
  tag: 'v1',
};

type Writer = (s: Scratch, image: ImageSpec) => Promise<{ ref: string; digest: string }>;

const FORMS: Record<string, Writer> = {
  'OCI layout directory': async (s, image) => {
    const dir = join(s.images, 'layout');
    return { ref: `${dir}:${image.tag}`, ...(await writeOciLayout(dir, image)) };
  },
  'OCI archive': async (s, image) => {
    const file = join(s.images, 'image.oci.tar');
    return { ref: `${file}:${image.tag}`, ...(await writeOciArchive(file, image)) };
  },
  'docker save archive': async (s, image) => {
    const file = join(s.images, 'image.docker.tar');
    return { ref: `${file}:${image.tag}`, ...(await writeDockerArchive(file, image)) };
  },
};

for (const [form, write] of Object.entries(FORMS)) {
  test(`round trip through ${form}: files, modes, links and config`, async (t) => {
    const s = await scratch(t);
    const { ref, digest } = await write(s, SAMPLE);
    const image = await new ImageStore(s.cacheDir).resolve(ref);

    assert.equal(image.digest, digest);
    assert.equal(image.rootfs, join(s.cacheDir, 'rootfs', digest.slice('sha256:'.length)));
    assert.equal(image.unpacked, true);
    assert.deepEqual(image.config, {
      entrypoint: ['/usr/bin/tool'],
      cmd: ['--flag'],
      env: ['A=1', 'PATH=/usr/bin'],
      workingDir: '/srv',
      user: '',
    });
    const at = (path: string) => join(image.rootfs, path);
    assert.equal(await readFile(at('usr/bin/tool'), 'utf8'), '#!/bin/sh\necho hi\n');
    assert.equal((await stat(at('usr/bin/tool'))).mode & 0o7777, 0o755);
    assert.equal((await stat(at('etc/secret'))).mode & 0o7777, 0o600);
    assert.equal((await stat(at('private'))).mode & 0o7777, 0o700);
    assert.equal((await stat(at('bin/suid'))).mode & 0o7777, 0o755, 'setuid is stripped');
    assert.equal(await readlink(at('lib')), 'usr/lib');
    assert.equal(await readlink(at('lib64')), '/usr/lib');
    assert.equal((await stat(at('usr/bin/tool-alias'))).ino, (await stat(at('usr/bin/tool'))).ino);
    assert.equal(await readFile(at('usr/lib/via-relative.so'), 'utf8'), 'r');
    assert.equal(await readFile(at('usr/lib/via-absolute.so'), 'utf8'), 'a');
    assert.ok((await lstat(at('lib'))).isSymbolicLink(), 'the symlink is still a symlink');
  });
}

test('an upper layer whiteout hides a lower file and an opaque whiteout hides a lower directory', async (t) => {
  const s = await scratch(t);
  const dir = join(s.images, 'layout');
  await writeOciLayout(dir, {
    layers: [
      [
        { path: 'a/', type: 'dir' },
        { path: 'a/keep', type: 'file', content: 'k' },
        { path: 'a/gone', type: 'file', content: 'g' },
        { path: 'c', type: 'file', content: 'c' },
        { path: 'b/', type: 'dir' },
        { path: 'b/old1', type: 'file', content: '1' },
        { path: 'b/old2/x', type: 'file', content: 'x' },
        { path: 'b/sub/lower', type: 'file', content: 'l' },
      ],
      [
        { path: 'a/.wh.gone', type: 'file' },
        { path: '.wh.c', type: 'file' },
        { path: 'b/before-marker', type: 'file', content: 'n' },
        { path: 'b/sub/upper', type: 'file', content: 'u' },
        { path: 'b/.wh..wh..opq', type: 'file' },
        { path: 'b/after-marker', type: 'file', content: 'm' },
      ],
    ],
    config: {},
  });
  const { rootfs } = await new ImageStore(s.cacheDir).resolve(dir);
  assert.deepEqual((await readdir(join(rootfs, 'a'))).sort(), ['keep']);
  assert.deepEqual((await readdir(rootfs)).sort(), ['a', 'b']);
  assert.deepEqual((await readdir(join(rootfs, 'b'))).sort(), ['after-marker', 'before-marker', 'sub']);
  assert.deepEqual(await readdir(join(rootfs, 'b', 'sub')), ['upper']);
});

test('a cache hit reuses the rootfs without reading any layer', async (t) => {
  const s = await scratch(t);
  const dir = join(s.images, 'layout');
  const { digest } = await writeOciLayout(dir, SAMPLE);
  const first = await new ImageStore(s.cacheDir).resolve(dir);
  await deleteLayerBlobs(dir, digest);

  const store = new ImageStore(s.cacheDir);
  const second = await store.resolve(dir);
  assert.equal(second.unpacked, false);
  assert.equal(second.rootfs, first.rootfs);
  assert.equal(store.unpackCount, 0);
  assert.deepEqual(second.config, first.config);
});

test('concurrent resolves of one image share a single unpack', async (t) => {
  const s = await scratch(t);
  const dir = join(s.images, 'layout');
  await writeOciLayout(dir, SAMPLE);
  const store = new ImageStore(s.cacheDir);
  const results = await Promise.all([store.resolve(dir), store.resolve(`${dir}:v1`), store.resolve(dir)]);
  assert.equal(store.unpackCount, 1);
  assert.equal(new Set(results.map((r) => r.rootfs)).size, 1);
  assert.deepEqual(await readdir(join(s.cacheDir, 'rootfs')), [results[0]!.digest.slice('sha256:'.length)]);
});

test('a temp dir left by a crashed process is cleaned up', async (t) => {
  const s = await scratch(t);
  const dir = join(s.images, 'layout');
  const { digest } = await writeOciLayout(dir, SAMPLE);
  const leftover = join(s.cacheDir, 'rootfs', `.tmp-${await deadPid()}-abc`);
  await mkdir(join(leftover, 'half'), { recursive: true });
  await new ImageStore(s.cacheDir).resolve(dir);
  assert.deepEqual(await readdir(join(s.cacheDir, 'rootfs')), [digest.slice('sha256:'.length)]);
});

test('a tag selects one of several manifests; without a tag several manifests are ambiguous', async (t) => {
  const s = await scratch(t);
  const dir = join(s.images, 'layout');
  const one = await writeOciLayout(dir, { ...SAMPLE, tag: 'one' });
  const two = await writeOciLayout(dir, { layers: [[{ path: 'two', type: 'file' }]], config: {}, tag: 'two' });
  const store = new ImageStore(s.cacheDir);
  assert.equal((await store.resolve(`${dir}:one`)).digest, one.digest);
  assert.equal((await store.resolve(`${dir}:two`)).digest, two.digest);
  await assertRejects(store.resolve(dir), 'INVALID_ARGUMENT', /2 manifests.*one, two/);
  await assertRejects(store.resolve(`${dir}:three`), 'NOT_FOUND', /three/);
});

test('a missing image path is NOT_FOUND', async (t) => {
  const s = await scratch(t);
  await assertRejects(new ImageStore(s.cacheDir).resolve(join(s.images, 'nope')), 'NOT_FOUND', /nope/);
  await assertRejects(new ImageStore(s.cacheDir).resolve(`${join(s.images, 'nope')}:latest`), 'NOT_FOUND');
});

test('a directory that is not an image layout is INVALID_ARGUMENT', async (t) => {
  const s = await scratch(t);
  await assertRejects(new ImageStore(s.cacheDir).resolve(s.images), 'INVALID_ARGUMENT', /neither index.json/);
  const notTar = join(s.images, 'not.tar');
  await writeFile(notTar, 'x'.repeat(2048));
  await assertRejects(new ImageStore(s.cacheDir).resolve(notTar), 'INVALID_ARGUMENT', /tar header/);
});

test('a nested image index resolves to the manifest for this host platform', async (t) => {
  const s = await scratch(t);
  const dir = join(s.images, 'layout');
  const native = await writeOciLayout(dir, SAMPLE);
  const foreign = await writeOciLayout(dir, { layers: [[{ path: 'foreign', type: 'file' }]], config: {} });
  const descriptors = await indexManifests(dir);
  const hostArch = process.arch === 'x64' ? 'amd64' : process.arch;
  const platformOf = (digest: string) => ({ os: 'linux', architecture: digest === native.digest ? hostArch : 's390x' });
  const nested = Buffer.from(
    JSON.stringify({
      schemaVersion: 2,
      mediaType: MEDIA_TYPES.index,
      // The foreign manifest comes first, so picking the first entry would be wrong.
      manifests: [foreign.digest, native.digest].map((digest) => {
        const d = descriptors.find((m) => m.digest === digest)!;
        return { mediaType: MEDIA_TYPES.manifest, digest, size: d.size, platform: platformOf(digest) };
      }),
    }),
  );
  const nestedBlob = await writeBlob(dir, nested);
  await writeIndex(dir, [{ mediaType: MEDIA_TYPES.index, ...nestedBlob }]);

  const image = await new ImageStore(s.cacheDir).resolve(dir);
  assert.equal(image.digest, native.digest);
  assert.equal(await readFile(join(image.rootfs, 'usr/bin/tool'), 'utf8'), '#!/bin/sh\necho hi\n');
});

test('zstd and uncompressed layers are sniffed, whatever their media type claims', async (t) => {
  const s = await scratch(t);
  const dir = join(s.images, 'layout');
  const { digest } = await writeOciLayout(dir, SAMPLE);
  const manifest = JSON.parse(await readFile(blobPath(dir, digest), 'utf8'));
  const recompress = [zstdCompressSync, (tar: Buffer) => tar];
  for (const [i, layer] of manifest.layers.entries()) {
    const tar = gunzipSync(await readFile(blobPath(dir, layer.digest)));
    Object.assign(layer, await writeBlob(dir, recompress[i]!(tar))); // media type still says gzip
  }
  const rewritten = await writeBlob(dir, Buffer.from(JSON.stringify(manifest)));
  await writeIndex(dir, [{ mediaType: MEDIA_TYPES.manifest, ...rewritten }]);

  const image = await new ImageStore(s.cacheDir).resolve(dir);
  assert.equal(await readFile(join(image.rootfs, 'usr/lib/via-relative.so'), 'utf8'), 'r');
});

test('a tampered layer blob is rejected and nothing lands in the cache', async (t) => {
  const s = await scratch(t);
  const dir = join(s.images, 'layout');
  const { digest } = await writeOciLayout(dir, SAMPLE);
  const other = await writeOciLayout(join(s.images, 'other'), {
    layers: [[{ path: 'usr/bin/tool', type: 'file', content: 'evil' }]],
    config: {},
  });
  const [victimLayer] = await layerDigests(dir, digest);
  const [replacement] = await layerDigests(join(s.images, 'other'), other.digest);
  await writeFile(blobPath(dir, victimLayer!), await readFile(blobPath(join(s.images, 'other'), replacement!)));

  await assertRejects(new ImageStore(s.cacheDir).resolve(dir), 'IMAGE_REJECTED', /does not match its digest/);
  await assertNothingEscaped(s);
});

test('a tampered config blob is rejected', async (t) => {
  const s = await scratch(t);
  const dir = join(s.images, 'layout');
  const { digest } = await writeOciLayout(dir, SAMPLE);
  const manifest = JSON.parse(await readFile(blobPath(dir, digest), 'utf8'));
  const configFile = blobPath(dir, manifest.config.digest);
  await writeFile(configFile, (await readFile(configFile, 'utf8')).replace('/srv', '/etc'));
  await assertRejects(new ImageStore(s.cacheDir).resolve(dir), 'IMAGE_REJECTED', /config .* does not match/);
});

test('a docker save layer whose bytes do not match the config diff_ids is rejected', async (t) => {
  const s = await scratch(t);
  const file = join(s.images, 'image.docker.tar');
  await writeDockerArchive(file, SAMPLE);
  const evil = join(s.images, 'evil.docker.tar');
  await writeDockerArchive(evil, { ...SAMPLE, layers: [[{ path: 'usr/bin/tool', type: 'file', content: 'evil' }]] });
  const members = await readTarMembers(file);
  const evilLayer = [...(await readTarMembers(evil))].find(([name]) => name.endsWith('layer.tar'))![1];
  const firstLayer = [...members.keys()].find((name) => name.endsWith('layer.tar'))!;
  members.set(firstLayer, evilLayer);
  const pack = tar.pack();
  for (const [name, data] of members) pack.entry({ name }, data);
  pack.finalize();
  await writeFile(file, await collect(pack));

  await assertRejects(
    new ImageStore(s.cacheDir).resolve(`${file}:v1`),
    'IMAGE_REJECTED',
    /uncompressed.*does not match/,
  );
  await assertNothingEscaped(s);
});

async function readTarMembers(file: string): Promise<Map<string, Buffer>> {
  const members = new Map<string, Buffer>();
  const extract = tar.extract();
  const feeding = pipeline(createReadStream(file), extract);
  for await (const entry of extract) {
    members.set(entry.header.name, await collect(entry));
  }
  await feeding;
  return members;
}

async function collect(stream: AsyncIterable<unknown>): Promise<Buffer> {
  const chunks: Buffer[] = [];
  for await (const chunk of stream) chunks.push(chunk as Buffer);
  return Buffer.concat(chunks);
}

async function deadPid(): Promise<number> {
  const child = spawn(process.execPath, ['-e', '0']);
  await new Promise((resolve) => child.once('exit', resolve));
  return child.pid!;
}

function blobPath(dir: string, digest: string): string {
  return join(dir, 'blobs', 'sha256', digest.slice('sha256:'.length));
}

async function indexManifests(dir: string): Promise<{ digest: string; size: number }[]> {
  return JSON.parse(await readFile(join(dir, 'index.json'), 'utf8')).manifests;
}

async function writeIndex(dir: string, manifests: object[]): Promise<void> {
  await writeFile(join(dir, 'index.json'), JSON.stringify({ schemaVersion: 2, manifests }));
}

async function layerDigests(dir: string, manifestDigest: string): Promise<string[]> {
  const manifest = JSON.parse(await readFile(blobPath(dir, manifestDigest), 'utf8'));
  return manifest.layers.map((layer: { digest: string }) => layer.digest);
}

async function deleteLayerBlobs(dir: string, manifestDigest: string): Promise<void> {
  for (const digest of await layerDigests(dir, manifestDigest)) await rm(blobPath(dir, digest));
}
