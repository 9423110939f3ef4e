// The guest's root disk: an image's unpacked rootfs as a read-only ext4 file system (`mke2fs -d`, no root
// needed), built once per rootfs and cached. The build is reproducible (fixed UUID, hash seed and timestamps),
// because a restored guest's kernel caches the disk's metadata in its memory: a restore must see the very same
// bytes, and every snapshot records the disk's sha256 so a different disk is refused instead of corrupting reads.
import { createHash, randomBytes } from 'node:crypto';
import { existsSync } from 'node:fs';
import { lstat, mkdir, readdir, readFile, rename, rm, writeFile } from 'node:fs/promises';
import { basename, join } from 'node:path';
import { run } from '../../sys/run.ts';
import { sha256File } from '../gvisor/runsc.ts';

export interface RootDisk {
  path: string;
  sha256: string;
}

const building = new Map<string, Promise<RootDisk>>();

/** The disk for `rootfs` in `cacheDir` (named after the rootfs directory, which is content-addressed). */
export function ensureRootDisk(rootfs: string, cacheDir: string): Promise<RootDisk> {
  const path = join(cacheDir, `${basename(rootfs)}.ext4`);
  let disk = building.get(path);
  if (!disk) {
    disk = buildOnce(rootfs, path).finally(() => building.delete(path));
    building.set(path, disk);
  }
  return disk;
}

async function buildOnce(rootfs: string, path: string): Promise<RootDisk> {
  const sidecar = `${path}.sha256`;
  if (existsSync(path) && existsSync(sidecar)) return { path, sha256: (await readFile(sidecar, 'utf8')).trim() };
  await mkdir(join(path, '..'), { recursive: true });
  const tmp = `${path}.tmp-${process.pid}-${randomBytes(4).toString('hex')}`;
  try {
    const bytes = await treeBytes(rootfs);
    // Room for metadata plus 25%, at least 16 MiB; whole MiB.
    const mib = Math.max(16, Math.ceil((bytes * 1.25) / 2 ** 20) + 8);
    const seed = uuidFrom(basename(rootfs));
    await run(
      'mke2fs',
      [
        ...['-q', '-t', 'ext4', '-b', '4096', '-m', '0', '-U', seed],
        ...['-O', '^metadata_csum,^has_journal,^resize_inode', '-E', `hash_seed=${seed},root_owner=0:0`],
        ...['-d', rootfs, tmp, `${mib}M`],
      ],
      { env: { ...process.env, E2FSPROGS_FAKE_TIME: '1' }, label: 'mke2fs root disk', timeoutMs: 300_000 },
    );
    const sha256 = await sha256File(tmp);
    await writeFile(sidecar, `${sha256}\n`);
    await rename(tmp, path);
    return { path, sha256 };
  } finally {
    await rm(tmp, { force: true });
  }
}

/** A UUID derived from a name: the same rootfs gets the same file-system identity on every node. */
function uuidFrom(name: string): string {
  const h = createHash('sha256').update(name).digest('hex');
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20, 32)}`;
}

async function treeBytes(dir: string): Promise<number> {
  let total = 0;
  for (const entry of await readdir(dir, { withFileTypes: true })) {
    const path = join(dir, entry.name);
    const st = await lstat(path);
    total += 4096 + (entry.isFile() ? st.size : 0);
    if (entry.isDirectory()) total += await treeBytes(path);
  }
  return total;
}
