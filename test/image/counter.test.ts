import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { readFile, stat } from 'node:fs/promises';
import { createServer } from 'node:net';
import { join } from 'node:path';
import { test } from 'node:test';
import { buildCounterImage } from '../../examples/counter/image.ts';
import { ImageStore } from '../../src/image/store.ts';
import { counterImage } from '../fixtures/images.ts';
import { scratch } from './helpers.ts';

test('the counter image resolves to a rootfs with an executable static /counter', async (t) => {
  const s = await scratch(t);
  const image = await new ImageStore(s.cacheDir).resolve(await counterImage());
  const binary = join(image.rootfs, 'counter');
  const info = await stat(binary);
  assert.ok(info.isFile());
  assert.equal(info.mode & 0o111, 0o111, 'executable');
  assert.deepEqual([...(await readFile(binary)).subarray(0, 4)], [0x7f, 0x45, 0x4c, 0x46], 'an ELF binary');
  assert.ok((await stat(join(image.rootfs, 'run/torpor'))).isDirectory());
  assert.equal((await stat(join(image.rootfs, 'tmp'))).mode & 0o7777, 0o1777);
  assert.deepEqual(image.config.entrypoint, ['/counter', '8080']);

  await assertServesCounter(t, binary);
});

test('buildCounterImage reuses a layout built from the same source', async (t) => {
  const s = await scratch(t);
  const outDir = join(s.images, 'counter');
  const first = await buildCounterImage(outDir);
  const builtAt = (await stat(join(outDir, 'index.json'))).mtimeMs;
  const second = await buildCounterImage(outDir);
  assert.deepEqual(second, first);
  assert.equal(first.ref, `${outDir}:latest`);
  assert.equal((await stat(join(outDir, 'index.json'))).mtimeMs, builtAt, 'not rebuilt');
});

/** Runs the unpacked binary on the host (it is static) to show it is the counter, not just any file. */
async function assertServesCounter(t: import('node:test').TestContext, binary: string): Promise<void> {
  const port = await freePort();
  const child = spawn(binary, [String(port)], { stdio: ['ignore', 'ignore', 'pipe'] });
  t.after(() => child.kill());
  await new Promise<void>((resolve, reject) => {
    child.stderr.on('data', (chunk: Buffer) => chunk.toString().includes('listening') && resolve());
    child.once('exit', (code) => reject(new Error(`counter exited with ${code}`)));
  });
  const get = async (path: string) => (await fetch(`http://127.0.0.1:${port}${path}`)).text();
  assert.equal(await get('/healthz'), 'ok\n');
  assert.equal(await get('/'), '1\n');
  assert.equal(await get('/'), '2\n');
}

async function freePort(): Promise<number> {
  const server = createServer();
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const address = server.address();
  await new Promise((resolve) => server.close(resolve));
  assert.ok(address && typeof address === 'object');
  return address.port;
}
