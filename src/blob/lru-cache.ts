// A node-local blob cache bounded by bytes: an FsBlobStore whose least recently used objects are deleted once
// the cache holds more than `maxBytes`. It is the agent's chunk cache: a restore reads a chunk here first and
// puts every chunk it fetched, so a warm node restores without the network while the disk it may take stays
// capped. As in the image caches (src/image/cas.ts), a file's mtime is its last use: a restarted agent picks the
// recency order up from the files. In between, the order and the byte count live in memory (a Map in use order),
// so neither a hit nor an eviction lists the directory.
//
// What the cache loses is only ever a refetch: callers verify what they read (restore.ts checks every chunk's
// sha256 and fetches a bad or vanished one again).
import { stat, utimes } from 'node:fs/promises';
import { join } from 'node:path';
import type { Readable } from 'node:stream';
import { isTorporError, TorporError } from '../core/errors.ts';
import type { BlobList, BlobStore, ByteRange } from './blob.ts';
import { FsBlobStore } from './fs.ts';

/** A node's chunk cache cap unless told otherwise: 4 GiB, the snapshots of some dozens of actors (compressed,
 * deduplicated). */
export const DEFAULT_CHUNK_CACHE_BYTES = 4 * 1024 ** 3;

export interface LruBlobCacheOptions {
  /** Most bytes the cache keeps; least recently used objects go first. */
  maxBytes: number;
}

export class LruBlobCache implements BlobStore {
  readonly root: string;
  readonly maxBytes: number;
  readonly #files: FsBlobStore;
  /** Object sizes, least recently used first (a use moves a key to the end). */
  readonly #sizes = new Map<string, number>();
  #bytes = 0;
  #loaded: Promise<void> | undefined;

  constructor(root: string, opts: LruBlobCacheOptions) {
    if (!Number.isSafeInteger(opts.maxBytes) || opts.maxBytes < 1) {
      throw new TorporError('INVALID_ARGUMENT', `maxBytes must be a positive integer, got ${opts.maxBytes}`, {
        field: 'maxBytes',
      });
    }
    this.#files = new FsBlobStore(root, { durable: false });
    this.root = this.#files.root;
    this.maxBytes = opts.maxBytes;
  }

  /** Bytes the cache holds now. */
  async bytes(): Promise<number> {
    await this.#load();
    return this.#bytes;
  }

  async put(key: string, body: Uint8Array | Readable): Promise<void> {
    await this.#load();
    await this.#files.put(key, body);
    const size = body instanceof Uint8Array ? body.byteLength : (await stat(join(this.root, key))).size;
    this.#record(key, size);
    await this.#evict(key);
  }

  async get(key: string, range?: ByteRange): Promise<Readable> {
    return this.#used(key, () => this.#files.get(key, range));
  }

  async getBytes(key: string): Promise<Uint8Array> {
    return this.#used(key, () => this.#files.getBytes(key));
  }

  /** A hit counts as a use: a snapshot being written that reuses a cached chunk keeps it fresh. */
  async has(key: string): Promise<boolean> {
    await this.#load();
    const here = await this.#files.has(key);
    if (here) await this.#touch(key);
    else this.#forget(key);
    return here;
  }

  list(prefix: string, opts?: { cursor?: string; limit?: number }): Promise<BlobList> {
    return this.#files.list(prefix, opts);
  }

  async delete(key: string): Promise<void> {
    await this.#load();
    await this.#files.delete(key);
    this.#forget(key);
  }

  async #used<T>(key: string, read: () => Promise<T>): Promise<T> {
    await this.#load();
    try {
      const result = await read();
      await this.#touch(key);
      return result;
    } catch (err) {
      if (isTorporError(err, 'NOT_FOUND')) this.#forget(key);
      throw err;
    }
  }

  /** Moves the key to the most recently used end, in memory and in its mtime (for the next process). */
  async #touch(key: string): Promise<void> {
    const size = this.#sizes.get(key);
    if (size === undefined) return;
    this.#sizes.delete(key);
    this.#sizes.set(key, size);
    const now = new Date();
    await utimes(join(this.root, key), now, now).catch(() => undefined);
  }

  #record(key: string, size: number): void {
    this.#forget(key);
    this.#sizes.set(key, size);
    this.#bytes += size;
  }

  #forget(key: string): void {
    const size = this.#sizes.get(key);
    if (size === undefined) return;
    this.#sizes.delete(key);
    this.#bytes -= size;
  }

  /** Deletes least recently used objects until the cache fits. An object bigger than the whole cap (`fresh`, just
   * put) is not kept rather than emptying the cache for it. */
  async #evict(fresh: string): Promise<void> {
    if ((this.#sizes.get(fresh) ?? 0) > this.maxBytes) {
      this.#forget(fresh);
      await this.#files.delete(fresh);
    }
    for (const [key] of this.#sizes) {
      if (this.#bytes <= this.maxBytes) return;
      this.#forget(key);
      await this.#files.delete(key);
    }
  }

  /** Once per process: the objects already on disk, oldest use first, then evicted down to the cap (which may
   * have been lowered since). */
  #load(): Promise<void> {
    this.#loaded ??= (async () => {
      const found: { key: string; size: number; used: number }[] = [];
      let cursor: string | undefined;
      do {
        const page = await this.#files.list('', { ...(cursor ? { cursor } : {}), limit: 1000 });
        for (const key of page.keys) {
          const info = await stat(join(this.root, key)).catch(() => undefined);
          if (info?.isFile()) found.push({ key, size: info.size, used: info.mtimeMs });
        }
        cursor = page.nextCursor;
      } while (cursor);
      found.sort((a, b) => a.used - b.used);
      for (const f of found) this.#record(f.key, f.size);
      await this.#evict('');
    })();
    return this.#loaded;
  }
}
