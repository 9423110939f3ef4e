// Checkpoint files staged on another file system. A runtime may leave a checkpoint's large file where it was
// written (a guest's RAM file on tmpfs) and link it into the checkpoint directory with a symlink: the checkpoint
// is then taken without a copy, and readers (the upload, a restore) follow the link. The checkpoint's owner later
// moves the file into the directory (settleLinkedFiles), off the critical path; until then the staged file costs
// memory, and whoever deletes the directory deletes what it links to (removeWithLinkedFiles).
import { readdir, readlink, rename, rm } from 'node:fs/promises';
import { join, resolve } from 'node:path';
import { run } from './run.ts';

/** Replaces every symlink in `dir` with a copy of its target, then removes the target — unless `keep` claims it
 * (returns true), which then owns it. A reader sees the link or the copy, never a partial file (the copy is renamed
 * over the link). Returns the files it moved. */
export async function settleLinkedFiles(
  dir: string,
  keep?: (name: string, target: string) => boolean,
): Promise<string[]> {
  const moved: string[] = [];
  for (const name of await linkedNames(dir)) {
    const link = join(dir, name);
    const target = resolve(dir, await readlink(link));
    const copy = join(dir, `.${name}.settling`);
    try {
      await copySparse(target, copy);
      await rename(copy, link);
    } catch (err) {
      await rm(copy, { force: true });
      throw err;
    }
    if (!keep?.(name, target)) await rm(target, { force: true });
    moved.push(name);
  }
  return moved;
}

/** Deletes `dir` and whatever its symlinks point to (missing `dir`: nothing to do). */
export async function removeWithLinkedFiles(dir: string): Promise<void> {
  for (const name of await linkedNames(dir)) {
    const target = await readlink(join(dir, name)).catch(() => undefined);
    if (target !== undefined) await rm(resolve(dir, target), { force: true });
  }
  await rm(dir, { recursive: true, force: true });
}

async function linkedNames(dir: string): Promise<string[]> {
  const entries = await readdir(dir, { withFileTypes: true }).catch((err: NodeJS.ErrnoException) => {
    if (err.code === 'ENOENT') return [];
    throw err;
  });
  return entries.filter((e) => e.isSymbolicLink()).map((e) => e.name);
}

/** Copies data extents only (holes stay holes: a guest's untouched RAM is holes). Not --sparse=always: scanning
 * every data block for zeros took twice as long (512 MiB file, 90 MiB of data: ~110 vs ~50 ms). At the lowest CPU
 * priority: settling runs in the background, typically while the node resumes an actor (perhaps this one). */
export async function copySparse(from: string, to: string): Promise<void> {
  await run('nice', ['-n', '19', 'cp', '--sparse=auto', from, to], { label: 'cp sparse file', timeoutMs: 120_000 });
}
