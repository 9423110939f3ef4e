// Shared scaffolding for image tests: a scratch area with a cache, an images dir and a sentinel directory
// placed where a traversal out of an unpacking rootfs would land, plus checks that nothing escaped.

import assert from 'node:assert/strict';
import { mkdir, mkdtemp, readdir, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { TestContext } from 'node:test';
import { type ErrorCode, TorporError } from '../../src/core/errors.ts';

export interface Scratch {
  root: string;
  cacheDir: string;
  images: string;
  sentinel: string;
}

/**
 * The unpack temp dir is <root>/cache/rootfs/.tmp-*, so "../../../sentinel" from inside it is the sentinel.
 * Hostile layers aim there.
 */
export const ESCAPE_TO_SENTINEL = '../../../sentinel';

export async function scratch(t: TestContext): Promise<Scratch> {
  const root = await mkdtemp(join(tmpdir(), 'torpor-image-test-'));
  t.after(() => rm(root, { recursive: true, force: true }));
  const paths = { root, cacheDir: join(root, 'cache'), images: join(root, 'images'), sentinel: join(root, 'sentinel') };
  await mkdir(paths.images);
  await mkdir(paths.sentinel);
  await writeFile(join(paths.sentinel, 'keep'), 'untouched');
  return paths;
}

/** Nothing outside the cache changed, and the cache holds no rootfs (not even a leftover temp dir). */
export async function assertNothingEscaped(s: Scratch): Promise<void> {
  const unexpected = (await readdir(s.root)).filter((name) => !['cache', 'images', 'sentinel'].includes(name));
  assert.deepEqual(unexpected, [], 'nothing may appear next to the cache');
  assert.deepEqual(await readdir(s.sentinel), ['keep']);
  assert.equal(await readFile(join(s.sentinel, 'keep'), 'utf8'), 'untouched');
  const cached = await readdir(join(s.cacheDir, 'rootfs')).catch(() => []);
  assert.deepEqual(cached, [], 'nothing may land in the cache');
}

export async function assertRejects(
  promise: Promise<unknown>,
  code: ErrorCode,
  message?: RegExp,
): Promise<TorporError> {
  let caught: unknown;
  await assert.rejects(promise, (err) => {
    caught = err;
    return true;
  });
  assert.ok(caught instanceof TorporError, `expected a TorporError, got ${String(caught)}`);
  assert.equal(caught.code, code, caught.message);
  assert.equal(caught.field, 'image');
  if (message) assert.match(caught.message, message);
  return caught;
}
