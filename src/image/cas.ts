// A content-addressed file cache: <dir>/<sha256 hex>. A file only ever appears there whole and verified:
// it is streamed into a temp file while being hashed and counted, checked against the expected sha256 (and
// size, when known), given its mode, then renamed into place. A cache hit is a stat. Concurrent requests for
// one file in this process share one download; across processes the rename makes the race harmless.
//
// Used by the registry layer cache (src/image/registry.ts) and the runtime asset store
// (src/runtime/assets.ts); each supplies its own errors so messages name what the caller knows it as.
//
// A hit touches the file (its mtime is its last use), so `prune` can bring the cache under a byte cap by removing
// the least recently used files first.

import { createHash, type Hash, randomBytes } from 'node:crypto';
import { chmod, type FileHandle, mkdir, open, readdir, rename, rm, stat, utimes } from 'node:fs/promises';
import { join } from 'node:path';
import { processRunning } from '../sys/process.ts';

const HEX64 = /^[a-f0-9]{64}$/;
const TEMP_PREFIX = '.tmp-';
const DEFAULT_ATTEMPTS = 3;

/** One response body to copy, starting at `start` (0, or the offset asked for when the source resumed). */
export interface OpenedBody {
  body: AsyncIterable<Uint8Array> | Iterable<Uint8Array>;
  start: number;
}

export interface CasErrors {
  /** The bytes hash to `actual`, not `expected` (full "sha256:<hex>" forms). */
  mismatch(expected: string, actual: string): Error;
  /** More than `limit` bytes arrived. */
  tooLarge(limit: number): Error;
  /** The source ended after `size` bytes; the descriptor said `expected`. */
  wrongSize(size: number, expected: number): Error;
}

export interface CasFetch {
  /** Opens the source at byte `offset`; a source that cannot resume answers with start 0. */
  open(offset: number): Promise<OpenedBody>;
  /** Exact size, when a descriptor states it: more bytes abort the download, fewer fail it. */
  expectedSize?: number;
  /** Hard cap on the bytes accepted when no exact size is known. */
  maxBytes: number;
  /** File mode of the cached file. */
  mode: number;
  errors: CasErrors;
  /** Called with the number of new bytes as they arrive (negative when a source restarts from 0). */
  onBytes?: (delta: number) => void;
  /** Whether an error thrown by open() or while reading is worth another attempt (resuming where it stopped). */
  retryable?: (err: unknown) => boolean;
  attempts?: number;
}

export interface PruneResult {
  /** Files removed, oldest use first. */
  removed: string[];
  /** Bytes in the cache after pruning. */
  bytes: number;
}

export interface CasResult {
  path: string;
  /** False on a cache hit, or when this call joined another call's download. */
  downloaded: boolean;
}

export class ContentCache {
  readonly dir: string;
  /** Downloads completed by this cache (not hits): tests use it to see that sharing and hits work. */
  downloadCount = 0;
  readonly #inflight = new Map<string, Promise<string>>();
  #cleaned = false;

  constructor(dir: string) {
    this.dir = dir;
  }

  static isHex(hex: string): boolean {
    return HEX64.test(hex);
  }

  path(hex: string): string {
    if (!HEX64.test(hex)) throw new Error(`not a sha256 hex digest: ${JSON.stringify(hex)}`);
    return join(this.dir, hex);
  }

  /** The cached file when it is there, a regular file, and of the expected size (or within the cap). */
  async lookup(hex: string, sanity: { expectedSize?: number; maxBytes?: number } = {}): Promise<string | undefined> {
    const path = this.path(hex);
    const info = await stat(path).catch(() => undefined);
    if (!info?.isFile()) return undefined;
    const sizeOk =
      sanity.expectedSize !== undefined
        ? info.size === sanity.expectedSize
        : sanity.maxBytes === undefined || info.size <= sanity.maxBytes;
    if (!sizeOk) {
      // A file of the wrong size under a content address was not written by us: drop it and fetch again.
      await rm(path, { force: true });
      return undefined;
    }
    // The mtime is the last use: pruning removes the least recently used files first.
    const now = new Date();
    await utimes(path, now, now).catch(() => undefined);
    return path;
  }

  /** Removes least recently used files until the cache holds at most `maxBytes`, never one that `keep` names
   * (in use) or that is being downloaded. */
  async prune(maxBytes: number, keep: (hex: string) => boolean = () => false): Promise<PruneResult> {
    const files: { hex: string; size: number; used: number }[] = [];
    for (const hex of await readdir(this.dir).catch(() => [] as string[])) {
      if (!HEX64.test(hex)) continue;
      const info = await stat(join(this.dir, hex)).catch(() => undefined);
      if (info?.isFile()) files.push({ hex, size: info.size, used: info.mtimeMs });
    }
    let bytes = files.reduce((sum, f) => sum + f.size, 0);
    const removed: string[] = [];
    files.sort((a, b) => a.used - b.used);
    for (const file of files) {
      if (bytes <= maxBytes) break;
      if (keep(file.hex) || this.#inflight.has(file.hex)) continue;
      await rm(join(this.dir, file.hex), { force: true });
      bytes -= file.size;
      removed.push(file.hex);
    }
    return { removed, bytes };
  }

  async get(hex: string, fetch: CasFetch): Promise<CasResult> {
    const hit = await this.lookup(hex, fetch);
    if (hit) {
      if (((await stat(hit)).mode & 0o7777) !== fetch.mode) await chmod(hit, fetch.mode);
      return { path: hit, downloaded: false };
    }
    const pending = this.#inflight.get(hex);
    if (pending) return { path: await pending, downloaded: false };
    const download = this.#download(hex, fetch).finally(() => this.#inflight.delete(hex));
    this.#inflight.set(hex, download);
    return { path: await download, downloaded: true };
  }

  async #download(hex: string, fetch: CasFetch): Promise<string> {
    await mkdir(this.dir, { recursive: true });
    await this.#cleanStaleTemps();
    const final = this.path(hex);
    const temp = join(this.dir, `${TEMP_PREFIX}${process.pid}-${randomBytes(6).toString('hex')}`);
    const handle = await open(temp, 'w', 0o600);
    const state: CopyState = { hash: createHash('sha256'), size: 0 };
    const limit = fetch.expectedSize ?? fetch.maxBytes;
    try {
      const attempts = fetch.attempts ?? DEFAULT_ATTEMPTS;
      for (let attempt = 1; ; attempt++) {
        try {
          const opened = await fetch.open(state.size);
          if (opened.start !== state.size) {
            // The source restarted from the beginning: so do we.
            fetch.onBytes?.(-state.size);
            await handle.truncate(0);
            state.hash = createHash('sha256');
            state.size = 0;
          }
          await copy(opened.body, handle, state, limit, fetch);
          break;
        } catch (err) {
          if (attempt >= attempts || !(fetch.retryable?.(err) ?? false)) throw err;
        }
      }
      if (fetch.expectedSize !== undefined && state.size !== fetch.expectedSize) {
        throw fetch.errors.wrongSize(state.size, fetch.expectedSize);
      }
      const actual = state.hash.digest('hex');
      if (actual !== hex) throw fetch.errors.mismatch(`sha256:${hex}`, `sha256:${actual}`);
      await handle.chmod(fetch.mode);
      await handle.close();
      await rename(temp, final);
      this.downloadCount++;
      return final;
    } catch (err) {
      await handle.close().catch(() => undefined);
      await rm(temp, { force: true });
      throw err;
    }
  }

  /** A temp file whose process is gone is the leftover of a crash; another live process's is left alone. */
  async #cleanStaleTemps(): Promise<void> {
    if (this.#cleaned) return;
    this.#cleaned = true;
    for (const name of await readdir(this.dir)) {
      const pid = Number(/^\.tmp-(\d+)-/.exec(name)?.[1]);
      if (pid && pid !== process.pid && !(await processRunning(pid))) await rm(join(this.dir, name), { force: true });
    }
  }
}

interface CopyState {
  hash: Hash;
  size: number;
}

/** Appends the body to the temp file; `state` always describes what is on disk, so a retry can resume. */
async function copy(
  body: AsyncIterable<Uint8Array> | Iterable<Uint8Array>,
  handle: FileHandle,
  state: CopyState,
  limit: number,
  fetch: CasFetch,
): Promise<void> {
  for await (const chunk of body) {
    if (state.size + chunk.length > limit) {
      throw fetch.expectedSize !== undefined
        ? fetch.errors.wrongSize(state.size + chunk.length, fetch.expectedSize)
        : fetch.errors.tooLarge(limit);
    }
    await handle.write(chunk, 0, chunk.length, state.size);
    state.hash.update(chunk);
    state.size += chunk.length;
    fetch.onBytes?.(chunk.length);
  }
}
