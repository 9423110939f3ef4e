// `torpor image pull`: into the node's caches, from a local layout and from a real registry; on a terminal (a
// pseudo-terminal made by script(1)) the pull shows bytes, rate and time left on stderr.
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { existsSync } from 'node:fs';
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { after, type TestContext, test } from 'node:test';
import { promisify } from 'node:util';
import { counterImage } from '../fixtures/images.ts';
import { buildImage, haveCommand, Pusher, startRegistry } from '../image/registry-helpers.ts';

const run = promisify(execFile);
const BIN = resolve(import.meta.dirname, '../../bin/torpor.js');

async function scratch(t: TestContext): Promise<string> {
  const dir = await mkdtemp(join(tmpdir(), 'torpor-image-cli-'));
  t.after(() => rm(dir, { recursive: true, force: true }));
  return dir;
}

interface Pulled {
  digest: string;
  rootfs: string;
  unpacked: boolean;
}

test('image pull of a local layout unpacks once into the data directory', async (t) => {
  const dir = await scratch(t);
  const ref = await counterImage();
  const pull = async () =>
    JSON.parse((await run(process.execPath, [BIN, 'image', 'pull', ref, '--data-dir', dir, '-o', 'json'])).stdout);
  const first: Pulled = await pull();
  assert.match(first.digest, /^sha256:[a-f0-9]{64}$/);
  assert.equal(first.rootfs, join(dir, 'images', 'rootfs', first.digest.slice(7)));
  assert.ok(existsSync(join(first.rootfs, 'counter')));
  assert.equal(first.unpacked, true);
  const second: Pulled = await pull();
  assert.deepEqual(second, { ...first, unpacked: false });
});

const started = await startRegistry();
after(() => (typeof started === 'string' ? undefined : started.stop()));
const skip =
  typeof started === 'string' ? started : !(await haveCommand('script')) ? 'script(1) is not installed' : undefined;

test('image pull from a registry on a terminal shows bytes, rate and ETA', { skip }, async (t) => {
  assert.ok(typeof started !== 'string');
  const dir = await scratch(t);
  const image = await buildImage({
    layers: [[{ path: 'blob', type: 'file', content: randomBytes(6 << 20).toString('base64') }]],
    config: { cmd: ['/blob'] },
  });
  await new Pusher(started.url).image('torpor/big', 'v1', image);
  const ref = `${started.host}/torpor/big:v1`;
  const typescript = join(dir, 'typescript');
  // script(1) gives the command a pseudo-terminal, as a user's shell would; its output is what the user sees.
  const command = `${process.execPath} ${BIN} image pull ${ref} --data-dir ${join(dir, 'data')}`;
  await run('script', ['-qec', command, typescript], { timeout: 120_000 });
  const seen = await readFile(typescript, 'utf8');
  assert.match(seen, /\rpulling \S+ {2}\d+\.\d MiB \/ \d+\.\d MiB {2}\d+% {2}\S+ \S+\/s/);
  assert.match(seen, /100%/);
  assert.ok(seen.includes(image.digest), 'the pulled digest is printed');

  // Output to a pipe (as here) carries the result only: no progress.
  const piped = await run(process.execPath, [BIN, 'image', 'pull', ref, '--data-dir', join(dir, 'data2')]);
  assert.equal(piped.stderr, '');
  assert.ok(piped.stdout.includes(image.digest));
});
