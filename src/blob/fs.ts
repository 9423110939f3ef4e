// FsBlobStore: the embedded default BlobStore, one file per key under a root directory.
// Atomicity comes from rename(2): an object is written and fsynced under <root>/.tmp, then renamed into place,
// so a reader opens either the previous file or the complete new one. Reads go through an open descriptor,
// so an overwrite that lands mid-read does not change the bytes the reader is streaming.
import { randomUUID } from 'node:crypto';
import { createWriteStream, type Dirent } from 'node:fs';
import { type FileHandle, mkdir, open, readdir, rename, rm, rmdir, stat, unlink, writeFile } from 'node:fs/promises';
import { dirname, join, resolve } from 'node:path';
import type { Readable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { TorporError } from '../core/errors.ts';
import { assertValidRange, type BlobList, type BlobStore, type ByteRange, badRange, checkListLimit } from './blob.ts';
import { assertValidKey, unsafePathReason } from './keys.ts';

/** Staging area for puts in progress; inside the root so the final rename never crosses filesystems. */
const TMP_DIR = '.tmp';
/** A concurrent delete may prune the parent directory between our mkdir and rename; retry that many times. */
const RENAME_ATTEMPTS = 4;

export interface FsBlobStoreOptions {
  /** fsync every object and its directory (default). A node-local cache, which can always be refilled from the
   * durable store, turns this off: a chunk it loses in a crash is simply fetched again. */
  durable?: boolean;
}

export class FsBlobStore implements BlobStore {
  readonly root: string;
  readonly #durable: boolean;

  constructor(root: string, opts: FsBlobStoreOptions = {}) {
    this.root = resolve(root);
    this.#durable = opts.durable ?? true;
  }

  async put(key: string, body: Uint8Array | Readable): Promise<void> {
    const path = this.#pathOf(key);
    const tmp = await this.#writeTemp(body);
    try {
      await this.#moveIntoPlace(tmp, path, key);
    } catch (err) {
      await rm(tmp, { force: true });
      throw err;
    }
  }

  async get(key: string, range?: ByteRange): Promise<Readable> {
    const handle = await this.#openObject(key);
    try {
      const { size } = await handle.stat();
      return handle.createReadStream({ ...resolveRange(range, size), autoClose: true });
    } catch (err) {
      await handle.close();
      throw err;
    }
  }

  async getBytes(key: string): Promise<Uint8Array> {
    const handle = await this.#openObject(key);
    try {
      return await handle.readFile();
    } finally {
      await handle.close();
    }
  }

  async has(key: string): Promise<boolean> {
    const path = this.#pathOf(key);
    try {
      return (await stat(path)).isFile();
    } catch (err) {
      if (isMissing(err)) return false;
      throw err;
    }
  }

  async list(prefix: string, opts: { cursor?: string; limit?: number } = {}): Promise<BlobList> {
    const limit = checkListLimit(opts.limit);
    const { cursor } = opts;
    const candidates = await this.#keysUnder(prefix);
    const matching = candidates
      .filter((key) => key.startsWith(prefix) && (cursor === undefined || key > cursor))
      .sort();
    const keys = matching.slice(0, limit);
    return matching.length > limit ? { keys, nextCursor: keys.at(-1)! } : { keys };
  }

  async delete(key: string): Promise<void> {
    const path = this.#pathOf(key);
    try {
      await unlink(path);
    } catch (err) {
      // Missing, or the key names a "directory" (a prefix of other keys): either way there is no such object.
      if (isMissing(err) || errorCode(err) === 'EISDIR') return;
      throw err;
    }
    await this.#pruneEmptyParents(dirname(path));
  }

  /** Objects stored and their bytes on disk (one stat per object: for a dashboard, not a hot path). */
  async usage(): Promise<{ objects: number; bytes: number }> {
    const keys = await this.#walk(this.root, '');
    let bytes = 0;
    for (const key of keys) bytes += (await stat(join(this.root, ...key.split('/'))).catch(() => ({ size: 0 }))).size;
    return { objects: keys.length, bytes };
  }

  #pathOf(key: string): string {
    assertValidKey(key);
    const segments = key.split('/');
    if (segments[0] === TMP_DIR) {
      throw new TorporError('INVALID_ARGUMENT', `blob key "${key}" uses the reserved "${TMP_DIR}/" prefix`, {
        field: 'key',
      });
    }
    return join(this.root, ...segments);
  }

  async #writeTemp(body: Uint8Array | Readable): Promise<string> {
    const tmpDir = join(this.root, TMP_DIR);
    await mkdir(tmpDir, { recursive: true });
    const tmp = join(tmpDir, randomUUID());
    try {
      // flush: fsync before close, so the rename below never publishes a file whose data is not on disk.
      const flush = this.#durable;
      if (body instanceof Uint8Array) await writeFile(tmp, body, { flush });
      else await pipeline(body, createWriteStream(tmp, { flush }));
    } catch (err) {
      await rm(tmp, { force: true });
      throw err;
    }
    return tmp;
  }

  async #moveIntoPlace(tmp: string, path: string, key: string): Promise<void> {
    for (let attempt = 1; ; attempt++) {
      try {
        await mkdir(dirname(path), { recursive: true });
        await rename(tmp, path);
        if (this.#durable) await syncDirectory(dirname(path));
        return;
      } catch (err) {
        const code = errorCode(err);
        if (code === 'ENOENT' && attempt < RENAME_ATTEMPTS) continue;
        if (code === 'EISDIR' || code === 'ENOTDIR' || code === 'EEXIST') throw prefixConflict(key, err);
        throw err;
      }
    }
  }

  /** Opens the object's file, so that later reads see this version even if it is replaced meanwhile. */
  async #openObject(key: string): Promise<FileHandle> {
    const path = this.#pathOf(key);
    let handle: FileHandle;
    try {
      handle = await open(path, 'r');
    } catch (err) {
      if (isMissing(err)) throw blobNotFound(key);
      throw err;
    }
    if (!(await handle.stat()).isFile()) {
      await handle.close();
      throw blobNotFound(key);
    }
    return handle;
  }

  /** Every key in the deepest directory that the prefix fully names (the caller filters by the whole prefix). */
  async #keysUnder(prefix: string): Promise<string[]> {
    const dirPart = prefix.slice(0, prefix.lastIndexOf('/') + 1);
    const dirKey = dirPart.slice(0, -1);
    if (dirKey === '' || unsafePathReason(dirKey) !== undefined) return this.#walk(this.root, '');
    if (dirKey.split('/')[0] === TMP_DIR) return [];
    return this.#walk(join(this.root, ...dirKey.split('/')), dirPart);
  }

  async #walk(dir: string, keyPrefix: string): Promise<string[]> {
    let entries: Dirent[];
    try {
      entries = await readdir(dir, { withFileTypes: true });
    } catch (err) {
      if (isMissing(err)) return [];
      throw err;
    }
    const keys: string[] = [];
    for (const entry of entries) {
      if (keyPrefix === '' && entry.name === TMP_DIR) continue;
      if (entry.isDirectory()) keys.push(...(await this.#walk(join(dir, entry.name), `${keyPrefix}${entry.name}/`)));
      else if (entry.isFile()) keys.push(keyPrefix + entry.name);
    }
    return keys;
  }

  /** Removes directories left empty by a delete, so the tree does not fill with empty husks. */
  async #pruneEmptyParents(dir: string): Promise<void> {
    for (let current = dir; current !== this.root && current.startsWith(this.root); current = dirname(current)) {
      try {
        await rmdir(current);
      } catch {
        return; // not empty (or already gone): nothing more to prune
      }
    }
  }
}

/** Turns an inclusive ByteRange into createReadStream options. A range running past the end is cut at the end. */
function resolveRange(range: ByteRange | undefined, size: number): { start?: number; end?: number } {
  if (range === undefined) return {};
  assertValidRange(range);
  const { start, end } = range;
  if (start >= size) throw badRange(`start ${start} is beyond the object's ${size} bytes`);
  return { start, end: Math.min(end ?? size - 1, size - 1) };
}

/** fsync the directory so the rename itself survives a crash, not just the file's data. */
/** Directory fsyncs per directory: one running and at most one queued behind it. */
const directorySyncs = new Map<string, { running: Promise<void>; next?: Promise<void> }>();

/** Makes the renames into `dir` done before this call durable. Concurrent puts into one directory (a snapshot's
 * chunks all land in chunks/) share fsyncs: a caller joins the queued sync, which starts after the running one
 * (that one may have started before the caller's rename), so N puts cost at most two fsyncs, not N. */
function syncDirectory(dir: string): Promise<void> {
  const state = directorySyncs.get(dir);
  if (!state) {
    const running = fsyncDirectory(dir).finally(() => advance(dir));
    directorySyncs.set(dir, { running });
    return running;
  }
  state.next ??= state.running.then(() => fsyncDirectory(dir));
  return state.next;
}

/** The running sync finished: the queued one (if any) becomes the running one. */
function advance(dir: string): void {
  const state = directorySyncs.get(dir);
  if (!state) return;
  if (!state.next) {
    directorySyncs.delete(dir);
    return;
  }
  const running = state.next.finally(() => advance(dir));
  directorySyncs.set(dir, { running });
}

async function fsyncDirectory(dir: string): Promise<void> {
  let handle: FileHandle | undefined;
  try {
    handle = await open(dir, 'r');
    await handle.sync();
  } catch {
    // Some filesystems refuse fsync on directories; the data itself was already flushed.
  } finally {
    await handle?.close();
  }
}

function blobNotFound(key: string): TorporError {
  return new TorporError('NOT_FOUND', `blob "${key}" not found`, { field: 'key' });
}

function prefixConflict(key: string, cause: unknown): TorporError {
  return new TorporError(
    'INVALID_ARGUMENT',
    `blob key "${key}" clashes with an existing key: the filesystem store cannot hold both "x" and "x/..."`,
    { field: 'key', cause },
  );
}

function errorCode(err: unknown): string | undefined {
  return (err as NodeJS.ErrnoException | undefined)?.code;
}

/** ENOTDIR: a path component is a file, so the object cannot exist either. */
function isMissing(err: unknown): boolean {
  const code = errorCode(err);
  return code === 'ENOENT' || code === 'ENOTDIR';
}
