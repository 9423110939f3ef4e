// Byte caps on the node's image caches: the least recently used entries go first (a use touches them), never one
// in use by an activation, never one an unpack needs. The layer cache is tried against a real registry.
import assert from 'node:assert/strict';
import { createHash, randomBytes } from 'node:crypto';
import { readdir, readFile, stat, utimes } from 'node:fs/promises';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import { ContentCache } from '../../src/image/cas.ts';
import { writeOciLayout } from '../../src/image/pack.ts';
import { ImageStore } from '../../src/image/store.ts';
import { scratch } from './helpers.ts';
import { type BuiltImage, buildImage, Pusher, type RunningRegistry, startRegistry } from './registry-helpers.ts';

const sha = (data: Uint8Array) => createHash('sha256').update(data).digest('hex');
const tick = () => new Promise((r) => setTimeout(r, 20));

async function put(cache: ContentCache, data: Buffer): Promise<string> {
  const hex = sha(data);
  await cache.get(hex, {
    open: async () => ({ body: [data], start: 0 }),
    maxBytes: data.length,
    mode: 0o644,
    errors: {
      mismatch: () => new Error('mismatch'),
      tooLarge: () => new Error('too large'),
      wrongSize: () => new Error('wrong size'),
    },
  });
  return hex;
}

test('content cache: prune removes least recently used files first; a lookup is a use; kept files stay', async (t) => {
  const s = await scratch(t);
  const cache = new ContentCache(join(s.cacheDir, 'cas'));
  const blobs: string[] = [];
  for (let i = 0; i < 4; i++) {
    blobs.push(await put(cache, randomBytes(10_000)));
    // Distinct, ordered last uses.
    const at = new Date(Date.now() - (10 - i) * 1000);
    await utimes(cache.path(blobs[i]!), at, at);
  }
  const [b0, b1, b2, b3] = blobs as [string, string, string, string];
  assert.ok(await cache.lookup(b0)); // b0 is now the most recently used

  assert.deepEqual(await cache.prune(100_000), { removed: [], bytes: 40_000 }, 'under the cap: nothing goes');
  const result = await cache.prune(25_000, (hex) => hex === b1);
  assert.deepEqual(result, { removed: [b2, b3], bytes: 20_000 });
  assert.deepEqual((await readdir(cache.dir)).sort(), [b0, b1].sort());
  // Everything kept: the cap cannot be met, and nothing in use is removed for it.
  assert.deepEqual(await cache.prune(0, () => true), { removed: [], bytes: 20_000 });
});

function layoutImage(tag: string) {
  return {
    layers: [[{ path: `data-${tag}`, type: 'file' as const, content: randomBytes(64 << 10) }]],
    config: { cmd: [`/data-${tag}`] },
  };
}

test('rootfs cache: over its cap the least recently used image goes, never one in use', async (t) => {
  const s = await scratch(t);
  const refs: Record<string, string> = {};
  for (const name of ['a', 'b', 'c', 'd', 'e']) {
    const dir = join(s.images, name);
    await writeOciLayout(dir, layoutImage(name));
    refs[name] = dir;
  }
  const inUse = new Set<string>();
  const probe = new ImageStore(join(s.root, 'probe'));
  const one = await probe.resolve(refs.a!);
  const size = Number(await readFile(join(s.root, 'probe', 'rootfs-size', one.digest.slice(7)), 'utf8'));
  assert.ok(size >= 64 << 10, `measured ${size} bytes`);

  const store = new ImageStore(s.cacheDir, { rootfsCacheBytes: Math.floor(size * 2.5), inUse: () => inUse });
  const cached = async () => (await readdir(join(s.cacheDir, 'rootfs'))).sort();
  const hex = async (name: string) => (await store.resolve(refs[name]!)).digest.slice(7);
  const a = await hex('a');
  await tick();
  const b = await hex('b');
  await tick();
  const c = await hex('c');
  assert.deepEqual(await cached(), [b, c].sort(), 'a, the least recently used, made room for c');

  await tick();
  assert.equal((await store.resolve(refs.b!)).unpacked, false, 'b is a hit: now the most recently used');
  await tick();
  const d = await hex('d');
  assert.deepEqual(await cached(), [b, d].sort(), 'c went, not b');

  // d is in use by an activation: e's unpack evicts b although d is older.
  inUse.add(`sha256:${d}`);
  await tick();
  assert.equal((await store.resolve(refs.b!)).unpacked, false);
  await tick();
  const e = await hex('e');
  assert.deepEqual(await cached(), [d, e].sort());
  assert.ok(!(await readdir(join(s.cacheDir, 'rootfs-size'))).includes(a), 'sizes go with their rootfs');
  // An evicted image unpacks again on its next use.
  const again = await store.resolve(refs.a!);
  assert.equal(again.unpacked, true);
  assert.ok((await stat(join(again.rootfs, 'data-a'))).isFile());
});

const started = await startRegistry();
const skip = typeof started === 'string' ? started : false;
const registry: RunningRegistry | undefined = typeof started === 'string' ? undefined : started;
after(() => registry?.stop());

const images: Record<string, BuiltImage> = {};
before(async () => {
  if (!registry) return;
  for (const name of ['one', 'two']) {
    images[name] = await buildImage(layoutImage(name));
    await new Pusher(registry.url).image(`torpor/${name}`, 'v1', images[name]);
  }
});

test("layer cache: over its cap the previous image's layers go; the rootfs cache keeps its own entries", {
  skip,
}, async (t) => {
  assert.ok(registry);
  const s = await scratch(t);
  const layerBytes = images.one!.layers[0]!.data.length;
  const store = new ImageStore(s.cacheDir, { layerCacheBytes: Math.floor(layerBytes * 1.5) });
  const blobs = async () => readdir(join(s.cacheDir, 'blobs', 'sha256'));
  const one = await store.resolve(`${registry.host}/torpor/one:v1`);
  assert.ok((await blobs()).includes(images.one!.layers[0]!.digest.slice(7)));
  await tick();
  await store.resolve(`${registry.host}/torpor/two:v1`);
  const after = await blobs();
  assert.ok(after.includes(images.two!.layers[0]!.digest.slice(7)), 'the layer just unpacked stays');
  assert.ok(!after.includes(images.one!.layers[0]!.digest.slice(7)), "one's layer made room");
  // Its rootfs is still cached: resolving it again needs no layer.
  const again = await store.resolve(`${registry.host}/torpor/one:v1`);
  assert.equal(again.unpacked, false);
  assert.equal(again.rootfs, one.rootfs);
});
