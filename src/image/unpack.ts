// Applies image layers to a directory as a container runtime would see them, treating every layer as hostile.
//
// The rules that keep writes inside the root:
// - entry names are cleaned lexically, and a ".." that climbs above the root rejects the image;
// - parent directories are resolved component by component with lstat, following symlinks the way a
//   chroot would (an absolute target starts again at the root); a symlink whose target climbs above the
//   root rejects the image, so an `evil -> ../../..` link can never be written through;
// - the last component is never followed: whatever is there is removed first and files are created with
//   O_EXCL|O_NOFOLLOW, so neither a symlink nor a hard link planted by an earlier layer is written through;
// - hard links must name an existing regular file inside the root; device nodes and FIFOs are refused.

import { constants } from 'node:fs';
import type { FileHandle } from 'node:fs/promises';
import {
  chmod,
  lchown,
  link,
  lstat,
  lutimes,
  mkdir,
  open,
  readdir,
  readlink,
  rm,
  symlink,
  unlink,
  utimes,
} from 'node:fs/promises';
import { join } from 'node:path';
import type { Header } from 'tar-stream';
import { TorporError } from '../core/errors.ts';

/** A tar entry as tar-stream yields it: its header, and its data as an async iterable. */
export interface TarEntry extends AsyncIterable<unknown> {
  header: Header;
  resume(): unknown;
}

interface DirMeta {
  mode: number;
  mtime: Date | undefined;
}

const WHITEOUT = '.wh.';
const OPAQUE = '.wh..wh..opq';
const MAX_SYMLINK_HOPS = 40;
/** setuid/setgid bits are dropped: a cached rootfs on the host must not hold privileged executables. */
const MODE_MASK = 0o1777;
const CREATE_EXCLUSIVE = constants.O_WRONLY | constants.O_CREAT | constants.O_EXCL | constants.O_NOFOLLOW;

export class RootfsWriter {
  readonly root: string;
  readonly #keepOwners = process.getuid?.() === 0;
  /** Paths the current layer has written, and their ancestors: an opaque whiteout must spare them. */
  #layerPaths = new Set<string>();
  /** Directory modes are applied last, so a read-only directory does not block the entries inside it. */
  readonly #dirMeta = new Map<string, DirMeta>();

  constructor(root: string) {
    this.root = root;
  }

  async applyLayer(entries: AsyncIterable<TarEntry>, label: string): Promise<void> {
    this.#layerPaths = new Set();
    for await (const entry of entries) {
      try {
        await this.#applyEntry(entry, `${label} entry "${entry.header.name}"`);
      } finally {
        entry.resume();
      }
    }
  }

  /** Applies directory modes and mtimes, deepest first; call once after the last layer. */
  async finish(): Promise<void> {
    const byDepth = [...this.#dirMeta].sort(([a], [b]) => b.split('/').length - a.split('/').length);
    for (const [key, meta] of byDepth) {
      const physical = key === '' ? [] : key.split('/');
      if (!(await this.#isRealDirectory(physical))) continue;
      const host = this.#host(physical);
      await chmod(host, meta.mode);
      if (meta.mtime) await utimes(host, meta.mtime, meta.mtime);
    }
  }

  async #applyEntry(entry: TarEntry, where: string): Promise<void> {
    const { header } = entry;
    const type: string = header.type ?? 'file';
    const parts = cleanPath(header.name, where);
    const base = parts.at(-1);
    try {
      if (base?.startsWith(WHITEOUT)) return await this.#whiteout(parts, where);
      if (type === 'directory') return await this.#writeDir(parts, header, where);
      if (parts.length === 0) throw rejected(where, 'names the image root as a non-directory');
      if (type === 'file' || type === 'contiguous-file') return await this.#writeFile(parts, entry, where);
      if (type === 'symlink') return await this.#writeSymlink(parts, header, where);
      if (type === 'link') return await this.#writeHardlink(parts, header, where);
      if (type === 'character-device' || type === 'block-device' || type === 'fifo') {
        throw rejected(where, `is a ${type}: images may not create device nodes or FIFOs`);
      }
      throw rejected(where, `has unsupported tar entry type ${type}`);
    } catch (err) {
      throw asUnpackError(err, where);
    }
  }

  async #writeFile(parts: string[], entry: TarEntry, where: string): Promise<void> {
    const host = await this.#prepareLeaf(parts, where);
    const handle = await open(host, CREATE_EXCLUSIVE, 0o600);
    try {
      for await (const chunk of entry) await writeAll(handle, chunk as Uint8Array);
      if (this.#keepOwners) await handle.chown(entry.header.uid ?? 0, entry.header.gid ?? 0).catch(() => {});
      await handle.chmod((entry.header.mode ?? 0o644) & MODE_MASK);
      if (entry.header.mtime) await handle.utimes(entry.header.mtime, entry.header.mtime);
    } finally {
      await handle.close();
    }
  }

  async #writeDir(parts: string[], header: Header, where: string): Promise<void> {
    const physical =
      parts.length === 0 ? [] : [...(await this.#resolveDir(parts.slice(0, -1), true, where)), parts.at(-1)!];
    const host = this.#host(physical);
    const existing = await lstat(host).catch(() => undefined);
    if (existing && !existing.isDirectory()) await unlink(host);
    if (!existing?.isDirectory()) await mkdir(host, 0o755);
    await this.#chown(host, header);
    this.#markWritten(physical);
    this.#dirMeta.set(physical.join('/'), { mode: (header.mode ?? 0o755) & MODE_MASK, mtime: header.mtime });
  }

  async #writeSymlink(parts: string[], header: Header, where: string): Promise<void> {
    const target = header.linkname ?? '';
    if (target === '' || target.includes('\0')) throw rejected(where, 'is a symlink with an empty or invalid target');
    const host = await this.#prepareLeaf(parts, where);
    await symlink(target, host);
    await this.#chown(host, header);
    if (header.mtime) await lutimes(host, header.mtime, header.mtime).catch(() => {});
  }

  async #writeHardlink(parts: string[], header: Header, where: string): Promise<void> {
    const targetParts = cleanPath(header.linkname ?? '', `${where} hard link target`);
    const targetDir = await this.#resolveDir(targetParts.slice(0, -1), false, where);
    const target = targetDir && targetParts.length > 0 ? this.#host([...targetDir, targetParts.at(-1)!]) : undefined;
    const info = target ? await lstat(target).catch(() => undefined) : undefined;
    if (!target || !info?.isFile()) {
      throw rejected(where, `is a hard link to "${header.linkname}", which is not a regular file in the image`);
    }
    if (targetParts.join('/') === parts.join('/')) return; // a link to itself changes nothing
    const host = await this.#prepareLeaf(parts, where);
    await link(target, host);
  }

  /** `.wh.<name>` hides <name> of lower layers; `.wh..wh..opq` hides everything lower layers put in its directory. */
  async #whiteout(parts: string[], where: string): Promise<void> {
    const base = parts.at(-1)!;
    if (base === OPAQUE) {
      const dir = await this.#resolveDir(parts.slice(0, -1), true, where);
      this.#markWritten(dir);
      return this.#clearLowerLayers(dir);
    }
    if (base.startsWith(`${WHITEOUT}${WHITEOUT}`)) return; // other AUFS metadata: nothing to apply
    const name = base.slice(WHITEOUT.length);
    if (name === '' || name === '.' || name === '..') throw rejected(where, 'is a whiteout without a valid name');
    const dir = await this.#resolveDir(parts.slice(0, -1), false, where);
    if (!dir || this.#layerPaths.has([...dir, name].join('/'))) return;
    await rm(this.#host([...dir, name]), { recursive: true, force: true });
  }

  async #clearLowerLayers(dir: string[]): Promise<void> {
    for (const child of await readdir(this.#host(dir))) {
      const physical = [...dir, child];
      if (!this.#layerPaths.has(physical.join('/'))) {
        await rm(this.#host(physical), { recursive: true, force: true });
      } else if ((await lstat(this.#host(physical))).isDirectory()) {
        await this.#clearLowerLayers(physical);
      }
    }
  }

  /** Resolves the parent inside the root and removes whatever occupies the leaf, never following it. */
  async #prepareLeaf(parts: string[], where: string): Promise<string> {
    const physical = [...(await this.#resolveDir(parts.slice(0, -1), true, where)), parts.at(-1)!];
    const host = this.#host(physical);
    await rm(host, { recursive: true, force: true });
    this.#markWritten(physical);
    return host;
  }

  /**
   * Walks `parts` from the root as a chroot would: existing directories are entered, symlinks are followed
   * inside the root, missing directories are created when `create` is set (else: undefined).
   * Returns the physical path, relative to the root, of the directory reached.
   */
  async #resolveDir(parts: string[], create: true, where: string): Promise<string[]>;
  async #resolveDir(parts: string[], create: boolean, where: string): Promise<string[] | undefined>;
  async #resolveDir(parts: string[], create: boolean, where: string): Promise<string[] | undefined> {
    const physical: string[] = [];
    const pending = [...parts];
    let hops = 0;
    while (pending.length > 0) {
      const part = pending.shift()!;
      if (part === '' || part === '.') continue;
      if (part === '..') {
        if (physical.length === 0) throw rejected(where, 'goes through a symlink that points outside the image root');
        physical.pop();
        continue;
      }
      const host = this.#host([...physical, part]);
      const info = await lstat(host).catch(() => undefined);
      if (info?.isSymbolicLink()) {
        if (++hops > MAX_SYMLINK_HOPS) throw rejected(where, 'goes through too many symlinks (a loop?)');
        const target = await readlink(host);
        if (target.startsWith('/')) physical.length = 0;
        pending.unshift(...target.split('/'));
        continue;
      }
      if (info && !info.isDirectory()) throw rejected(where, `has a parent "${part}" that is not a directory`);
      if (!info) {
        if (!create) return undefined;
        await mkdir(host, 0o755);
      }
      physical.push(part);
    }
    return physical;
  }

  /** A later layer may have replaced a parent with a symlink: every component must still be a directory. */
  async #isRealDirectory(physical: string[]): Promise<boolean> {
    for (let i = 0; i <= physical.length; i++) {
      const info = await lstat(this.#host(physical.slice(0, i))).catch(() => undefined);
      if (!info?.isDirectory()) return false;
    }
    return true;
  }

  #markWritten(physical: string[]): void {
    for (let i = 1; i <= physical.length; i++) this.#layerPaths.add(physical.slice(0, i).join('/'));
  }

  async #chown(host: string, header: Header): Promise<void> {
    if (this.#keepOwners) await lchown(host, header.uid ?? 0, header.gid ?? 0).catch(() => {});
  }

  #host(physical: string[]): string {
    return join(this.root, ...physical);
  }
}

/** tar-stream entries are streamx streams, which node:stream pipeline does not fully understand: copy by hand. */
async function writeAll(handle: FileHandle, chunk: Uint8Array): Promise<void> {
  for (let offset = 0; offset < chunk.length; ) {
    offset += (await handle.write(chunk, offset, chunk.length - offset)).bytesWritten;
  }
}

/** Cleans an entry name lexically; a ".." that would climb above the root rejects the image. */
export function cleanPath(name: string, where: string): string[] {
  if (name.includes('\0')) throw rejected(where, 'has a NUL byte in its name');
  const parts: string[] = [];
  for (const part of name.split('/')) {
    if (part === '' || part === '.') continue;
    if (part !== '..') parts.push(part);
    else if (parts.pop() === undefined) throw rejected(where, 'has a path that escapes the image root');
  }
  return parts;
}

function rejected(where: string, reason: string): TorporError {
  return new TorporError('IMAGE_REJECTED', `${where} ${reason}`, { field: 'image' });
}

function asUnpackError(err: unknown, where: string): TorporError {
  if (err instanceof TorporError) return err;
  const code = (err as NodeJS.ErrnoException).code;
  if (code === 'ENOSPC' || code === 'EDQUOT' || code === 'EIO') {
    return new TorporError('INTERNAL', `unpacking ${where} failed: ${code}`, { cause: err });
  }
  return new TorporError('IMAGE_REJECTED', `${where} could not be applied (${code ?? String(err)})`, {
    field: 'image',
    cause: err,
  });
}
