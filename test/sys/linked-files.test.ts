import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { existsSync } from 'node:fs';
import { lstat, mkdir, mkdtemp, readFile, rm, stat, symlink, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, it } from 'node:test';
import { removeWithLinkedFiles, settleLinkedFiles } from '../../src/sys/linked-files.ts';
import { writeSparse } from '../snapshot/helpers.ts';

async function stagedCheckpoint(t: { after: (fn: () => Promise<void>) => void }) {
  const root = await mkdtemp(join(tmpdir(), 'torpor-linked-'));
  // Staged on tmpfs when there is one (as guest RAM is), else beside the checkpoint.
  const stageDir = existsSync('/dev/shm') ? await mkdtemp('/dev/shm/torpor-linked-') : join(root, 'stage');
  t.after(async () => {
    await rm(root, { recursive: true, force: true });
    await rm(stageDir, { recursive: true, force: true });
  });
  const dir = join(root, 'checkpoint');
  await mkdir(dir);
  await mkdir(stageDir, { recursive: true });
  const staged = join(stageDir, 'vm.ram.checkpoint-1');
  await writeSparse(staged, 8 * 1024 * 1024, [{ offset: 4096 * 3 + 5, length: 100_000 }]);
  await symlink(staged, join(dir, 'memory'));
  await writeFile(join(dir, 'state'), randomBytes(1000));
  return { dir, staged };
}

describe('linked checkpoint files', () => {
  it('settles a linked file into the directory: same bytes, still sparse, the staged file gone', async (t) => {
    const { dir, staged } = await stagedCheckpoint(t);
    const bytes = await readFile(staged);
    const state = await readFile(join(dir, 'state'));
    assert.deepEqual(await settleLinkedFiles(dir), ['memory']);
    assert.ok((await lstat(join(dir, 'memory'))).isFile());
    assert.deepEqual(await readFile(join(dir, 'memory')), bytes);
    assert.ok((await stat(join(dir, 'memory'))).blocks * 512 < bytes.length / 2, 'holes stay holes');
    assert.equal(existsSync(staged), false);
    assert.deepEqual(await readFile(join(dir, 'state')), state, 'regular files are left alone');
    assert.deepEqual(await settleLinkedFiles(dir), [], 'nothing left to settle');
  });

  it('removes a directory together with the files it links to', async (t) => {
    const { dir, staged } = await stagedCheckpoint(t);
    await removeWithLinkedFiles(dir);
    assert.equal(existsSync(dir), false);
    assert.equal(existsSync(staged), false);
    await removeWithLinkedFiles(dir); // a missing directory is nothing to do
  });
});
