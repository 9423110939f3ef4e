// A layer is hostile input. Each case here would write outside the rootfs, or create something an image
// must not, if the unpacker trusted it; each must be rejected with IMAGE_REJECTED, leave the sentinel
// next to the cache untouched, and leave nothing in the cache.

import assert from 'node:assert/strict';
import { lstat, readFile, readlink, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { test } from 'node:test';
import { type LayerEntry, writeOciLayout } from '../../src/image/pack.ts';
import { ImageStore } from '../../src/image/store.ts';
import { assertNothingEscaped, assertRejects, ESCAPE_TO_SENTINEL, type Scratch, scratch } from './helpers.ts';

async function resolveLayers(s: Scratch, layers: LayerEntry[][]) {
  const dir = join(s.images, 'hostile');
  await writeOciLayout(dir, { layers, config: {} });
  return new ImageStore(s.cacheDir).resolve(dir);
}

const REJECTED: Record<string, { layers: LayerEntry[][]; reason: RegExp }> = {
  '"../" traversal': {
    layers: [[{ path: `${ESCAPE_TO_SENTINEL}/pwned`, type: 'file', content: 'x' }]],
    reason: /pwned.*escapes the image root/,
  },
  '"../" traversal hidden behind a subdirectory': {
    layers: [[{ path: `a/b/../../${ESCAPE_TO_SENTINEL}/pwned`, type: 'file', content: 'x' }]],
    reason: /escapes the image root/,
  },
  'absolute path climbing above the root': {
    layers: [[{ path: `/../../${ESCAPE_TO_SENTINEL}/pwned`, type: 'file', content: 'x' }]],
    reason: /escapes the image root/,
  },
  'symlink to outside, then a write through it': {
    layers: [
      [{ path: 'evil', type: 'symlink', linkname: ESCAPE_TO_SENTINEL }],
      [{ path: 'evil/pwned', type: 'file', content: 'x' }],
    ],
    reason: /evil\/pwned.*symlink that points outside/,
  },
  'symlink to outside, then a write through it in the same layer': {
    layers: [
      [
        { path: 'evil', type: 'symlink', linkname: '../../..' },
        { path: 'evil/sentinel/pwned', type: 'file', content: 'x' },
      ],
    ],
    reason: /symlink that points outside/,
  },
  'chained symlinks that together climb out': {
    layers: [
      [
        { path: 'a/b', type: 'symlink', linkname: '..' },
        { path: 'c', type: 'symlink', linkname: 'a/b/../..' },
        { path: 'c/sentinel/pwned', type: 'file', content: 'x' },
      ],
    ],
    reason: /symlink that points outside/,
  },
  'symlink loop': {
    layers: [
      [
        { path: 'loop', type: 'symlink', linkname: 'loop' },
        { path: 'loop/x', type: 'file', content: 'x' },
      ],
    ],
    reason: /too many symlinks/,
  },
  'hard link to a file outside': {
    layers: [[{ path: 'stolen', type: 'hardlink', linkname: `${ESCAPE_TO_SENTINEL}/keep` }]],
    reason: /stolen.*escapes the image root/,
  },
  'hard link through an escaping symlink': {
    layers: [
      [{ path: 'evil', type: 'symlink', linkname: ESCAPE_TO_SENTINEL }],
      [{ path: 'stolen', type: 'hardlink', linkname: 'evil/keep' }],
    ],
    reason: /symlink that points outside/,
  },
  'hard link to an absolute host path': {
    // Inside the rootfs that path does not exist, so there is nothing to link to.
    layers: [[{ path: 'stolen', type: 'hardlink', linkname: '/etc/passwd' }]],
    reason: /hard link to "\/etc\/passwd", which is not a regular file/,
  },
  'hard link to a directory': {
    layers: [
      [
        { path: 'd/', type: 'dir' },
        { path: 'stolen', type: 'hardlink', linkname: 'd' },
      ],
    ],
    reason: /not a regular file/,
  },
  'character device': {
    layers: [[{ path: 'dev/mem', type: 'char-device' }]],
    reason: /dev\/mem.*device node/,
  },
  fifo: {
    layers: [[{ path: 'run/pipe', type: 'fifo' }]],
    reason: /run\/pipe.*device node/,
  },
  'whiteout that climbs out': {
    layers: [[{ path: `${ESCAPE_TO_SENTINEL}/.wh.keep`, type: 'file' }]],
    reason: /escapes the image root/,
  },
  'whiteout through an escaping symlink': {
    layers: [
      [{ path: 'evil', type: 'symlink', linkname: ESCAPE_TO_SENTINEL }],
      [{ path: 'evil/.wh.keep', type: 'file' }],
    ],
    reason: /symlink that points outside/,
  },
  'opaque whiteout through an escaping symlink': {
    layers: [
      [{ path: 'evil', type: 'symlink', linkname: ESCAPE_TO_SENTINEL }],
      [{ path: 'evil/.wh..wh..opq', type: 'file' }],
    ],
    reason: /symlink that points outside/,
  },
};

for (const [name, { layers, reason }] of Object.entries(REJECTED)) {
  test(`hostile layer rejected: ${name}`, async (t) => {
    const s = await scratch(t);
    await assertRejects(resolveLayers(s, layers), 'IMAGE_REJECTED', reason);
    await assertNothingEscaped(s);
  });
}

test('an absolute symlink is followed inside the rootfs, never on the host', async (t) => {
  const s = await scratch(t);
  const image = await resolveLayers(s, [
    [{ path: 'evil', type: 'symlink', linkname: s.sentinel }],
    [{ path: 'evil/pwned', type: 'file', content: 'contained' }],
  ]);
  assert.equal(await readFile(join(image.rootfs, s.sentinel, 'pwned'), 'utf8'), 'contained');
  assert.equal(await readlink(join(image.rootfs, 'evil')), s.sentinel);
  await assertSentinelUntouched(s);
});

test('an escaping symlink as a leaf is kept as data, and replacing or whiting it out never follows it', async (t) => {
  const s = await scratch(t);
  const image = await resolveLayers(s, [
    [
      { path: 'gone', type: 'symlink', linkname: ESCAPE_TO_SENTINEL },
      { path: 'replaced', type: 'symlink', linkname: `${ESCAPE_TO_SENTINEL}/keep` },
      { path: 'dir-over-link', type: 'symlink', linkname: ESCAPE_TO_SENTINEL },
      { path: 'removed-dir/link', type: 'symlink', linkname: `../${ESCAPE_TO_SENTINEL}` },
      { path: 'opaque-dir/link', type: 'symlink', linkname: `../${ESCAPE_TO_SENTINEL}` },
    ],
    [
      { path: '.wh.removed-dir', type: 'file' },
      { path: 'opaque-dir/.wh..wh..opq', type: 'file' },
      { path: '.wh.gone', type: 'file' },
      { path: 'replaced', type: 'file', content: 'mine' },
      { path: 'dir-over-link/', type: 'dir' },
    ],
  ]);
  await assert.rejects(lstat(join(image.rootfs, 'gone')), { code: 'ENOENT' });
  await assert.rejects(lstat(join(image.rootfs, 'removed-dir')), { code: 'ENOENT' });
  await assert.rejects(lstat(join(image.rootfs, 'opaque-dir/link')), { code: 'ENOENT' });
  assert.equal(await readFile(join(image.rootfs, 'replaced'), 'utf8'), 'mine');
  assert.ok((await lstat(join(image.rootfs, 'dir-over-link'))).isDirectory());
  await assertSentinelUntouched(s);
});

test('a file written over a hard link replaces it instead of writing through to the other name', async (t) => {
  const s = await scratch(t);
  const image = await resolveLayers(s, [
    [
      { path: 'original', type: 'file', content: 'old' },
      { path: 'alias', type: 'hardlink', linkname: 'original' },
    ],
    [{ path: 'alias', type: 'file', content: 'new' }],
  ]);
  assert.equal(await readFile(join(image.rootfs, 'original'), 'utf8'), 'old');
  assert.equal(await readFile(join(image.rootfs, 'alias'), 'utf8'), 'new');
});

test('directory modes applied at the end never follow a symlink that later replaced a parent', async (t) => {
  const s = await scratch(t);
  const before = await stat(s.sentinel);
  await resolveLayers(s, [
    [
      { path: 'a/', type: 'dir' },
      { path: 'a/sentinel/', type: 'dir', mode: 0o700 },
    ],
    // "a" becomes a symlink to the scratch root, where a "sentinel" directory exists on the host.
    [{ path: 'a', type: 'symlink', linkname: '../../..' }],
  ]);
  const after = await stat(s.sentinel);
  assert.equal(after.mode, before.mode);
  assert.equal(after.mtimeMs, before.mtimeMs);
});

async function assertSentinelUntouched(s: Scratch): Promise<void> {
  assert.equal(await readFile(join(s.sentinel, 'keep'), 'utf8'), 'untouched');
  await assert.rejects(lstat(join(s.sentinel, 'pwned')), { code: 'ENOENT' });
}
