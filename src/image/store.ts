// ImageStore turns an image reference into an unpacked rootfs. A rootfs is unpacked once per image digest
// into <cacheDir>/rootfs/<hex> (built in a temp dir, then renamed into place), and reused afterwards.
//
// Both node-wide caches, the registry layer cache (<cacheDir>/blobs/sha256) and the unpacked rootfs cache, can be
// capped in bytes: after an unpack, least recently used entries go first (a use touches the entry's mtime), never
// a rootfs in use by an activation (`inUse`) nor anything an unpack in progress needs.
//
// References: an OCI layout directory, a tar archive of one, or a `docker save` tarball, each optionally
// followed by ":<tag>"; or a registry reference, `docker://host[:port]/repo[:tag|@sha256:…]` or the same
// without the scheme when no such local path exists (see registry.ts).

import { randomBytes } from 'node:crypto';
import { lstat, mkdir, readdir, readFile, rename, rm, stat, utimes, writeFile } from 'node:fs/promises';
import { join, resolve as resolvePath } from 'node:path';
import { TorporError } from '../core/errors.ts';
import { processRunning } from '../sys/process.ts';
import type { PruneResult } from './cas.ts';
import { digestHex } from './digest.ts';
import { openLayer } from './layer.ts';
import { type ImageConfig, type ImageMetadata, readImageMetadata } from './manifest.ts';
import {
  looksLikeRegistryReference,
  REGISTRY_PREFIX,
  type RegistryOptions,
  type RegistryProgress,
  RegistryPuller,
} from './registry.ts';
import { type ImageSource, openSource } from './source.ts';
import { RootfsWriter } from './unpack.ts';

export type { ImageConfig } from './manifest.ts';

export interface ResolvedImage {
  /** sha256 digest of the image manifest (of the config, for a `docker save` tarball). */
  digest: string;
  /** Absolute path of the unpacked rootfs. Treat it as read-only: it is shared by every user of the image. */
  rootfs: string;
  config: ImageConfig;
  /** True when this call (or a concurrent one it joined) unpacked the layers; false on a cache hit. */
  unpacked: boolean;
}

export interface ImageStoreOptions {
  registry?: RegistryOptions;
  /** Byte cap of the registry layer cache (default: none). */
  layerCacheBytes?: number;
  /** Byte cap of the unpacked rootfs cache (default: none). */
  rootfsCacheBytes?: number;
  /** Digests of the images activations use now: their rootfs is never evicted. */
  inUse?: () => Iterable<string>;
}

export interface CachePruneResult {
  layers?: PruneResult;
  /** Image digests whose rootfs was removed, and the bytes the rootfs cache holds after. */
  rootfs?: { removed: string[]; bytes: number };
}

export interface ResolveOptions {
  /** Layer download progress, for registry references. */
  onProgress?: (progress: RegistryProgress) => void;
}

interface OpenedImage {
  source: ImageSource;
  image: ImageMetadata;
  fetchLayers?: (onProgress?: (progress: RegistryProgress) => void) => Promise<void>;
}

interface ImageRef {
  path: string;
  tag: string | undefined;
}

const TEMP_PREFIX = '.tmp-';
const HEX64 = /^[a-f0-9]{64}$/;

export class ImageStore {
  readonly cacheDir: string;
  /** Unpacks started by this store (not cache hits): tests use it to see that the cache works. */
  unpackCount = 0;
  readonly #inflight = new Map<string, Promise<string>>();
  #staleTempsCleaned = false;
  readonly #options: ImageStoreOptions;
  /** Images being resolved and the blobs they are unpacked from: never evicted meanwhile. */
  readonly #pinnedImages = new Map<string, number>();
  readonly #pinnedBlobs = new Map<string, number>();
  #pruning: Promise<unknown> = Promise.resolve();

  /** Pulls registry references into <cacheDir>/blobs/sha256 (the node-wide layer cache). */
  readonly registry: RegistryPuller;

  constructor(cacheDir: string, options: ImageStoreOptions = {}) {
    this.cacheDir = resolvePath(cacheDir);
    this.#options = options;
    this.registry = new RegistryPuller(this.cacheDir, options.registry);
  }

  async resolve(ref: string, options: ResolveOptions = {}): Promise<ResolvedImage> {
    const { source, image, fetchLayers } = await this.#open(ref);
    const unpin = this.#pin(image);
    try {
      const rootfs = this.#rootfsPath(image.digest);
      if (await isDirectory(rootfs)) {
        await touch(rootfs);
        return { digest: image.digest, rootfs, config: image.config, unpacked: false };
      }
      await fetchLayers?.(options.onProgress);
      await this.#unpackShared(source, image);
      // Still pinned: the image just unpacked is not what makes room.
      await this.prune();
      return { digest: image.digest, rootfs, config: image.config, unpacked: true };
    } finally {
      unpin();
    }
  }

  /** Brings both caches under their caps (when set), least recently used first. One prune at a time. */
  prune(): Promise<CachePruneResult> {
    const run = this.#pruning.then(async () => {
      const result: CachePruneResult = {};
      const { layerCacheBytes, rootfsCacheBytes } = this.#options;
      if (rootfsCacheBytes !== undefined) result.rootfs = await this.#pruneRootfs(rootfsCacheBytes);
      if (layerCacheBytes !== undefined) {
        result.layers = await this.registry.blobs.prune(layerCacheBytes, (hex) => this.#pinnedBlobs.has(hex));
      }
      return result;
    });
    this.#pruning = run.catch(() => undefined);
    return run;
  }

  async #pruneRootfs(maxBytes: number): Promise<{ removed: string[]; bytes: number }> {
    const parent = join(this.cacheDir, 'rootfs');
    const inUse = new Set([...(this.#options.inUse?.() ?? [])].map((d) => digestHex(d, 'image')));
    // Asked again for each entry, right before it goes: a resolve may have pinned it meanwhile.
    const keep = (hex: string) =>
      inUse.has(hex) || this.#pinnedImages.has(`sha256:${hex}`) || this.#inflight.has(`sha256:${hex}`);
    const entries: { hex: string; size: number; used: number }[] = [];
    for (const hex of await readdir(parent).catch(() => [] as string[])) {
      if (!HEX64.test(hex)) continue;
      const info = await stat(join(parent, hex)).catch(() => undefined);
      if (info?.isDirectory()) entries.push({ hex, size: await this.#rootfsSize(hex), used: info.mtimeMs });
    }
    let bytes = entries.reduce((sum, e) => sum + e.size, 0);
    const removed: string[] = [];
    entries.sort((a, b) => a.used - b.used);
    for (const entry of entries) {
      if (bytes <= maxBytes) break;
      if (keep(entry.hex)) continue;
      // Renamed away first (atomic), so no resolve ever finds a rootfs half removed; a crash leaves a temp dir
      // that the next process cleans up.
      const doomed = join(parent, `${TEMP_PREFIX}${process.pid}-evict-${randomBytes(6).toString('hex')}`);
      await rename(join(parent, entry.hex), doomed);
      await rm(doomed, { recursive: true, force: true });
      await rm(this.#sizePath(entry.hex), { force: true });
      bytes -= entry.size;
      removed.push(`sha256:${entry.hex}`);
    }
    return { removed, bytes };
  }

  /** Each rootfs's size on disk, measured once when it is unpacked: <cacheDir>/rootfs-size/<hex>. */
  #sizePath(hex: string): string {
    return join(this.cacheDir, 'rootfs-size', hex);
  }

  async #rootfsSize(hex: string): Promise<number> {
    const recorded = Number(await readFile(this.#sizePath(hex), 'utf8').catch(() => ''));
    if (Number.isSafeInteger(recorded) && recorded > 0) return recorded;
    // Unpacked before sizes were recorded: measure it now.
    return this.#recordSize(hex, join(this.cacheDir, 'rootfs', hex));
  }

  async #recordSize(hex: string, dir: string): Promise<number> {
    const size = await diskUsage(dir);
    await mkdir(join(this.cacheDir, 'rootfs-size'), { recursive: true });
    await writeFile(this.#sizePath(hex), String(size));
    return size;
  }

  #pin(image: ImageMetadata): () => void {
    const blobs = [image.digest, ...image.layers.flatMap((l) => (l.digest ? [l.digest] : []))]
      .filter((d) => d.startsWith('sha256:'))
      .map((d) => d.slice('sha256:'.length));
    const add = (map: Map<string, number>, key: string, by: number) => {
      const n = (map.get(key) ?? 0) + by;
      if (n > 0) map.set(key, n);
      else map.delete(key);
    };
    add(this.#pinnedImages, image.digest, 1);
    for (const hex of blobs) add(this.#pinnedBlobs, hex, 1);
    return () => {
      add(this.#pinnedImages, image.digest, -1);
      for (const hex of blobs) add(this.#pinnedBlobs, hex, -1);
    };
  }

  /** A local path (exactly as before registries were supported) wins over a registry reference. */
  async #open(ref: string): Promise<OpenedImage> {
    if (ref.startsWith(REGISTRY_PREFIX)) return this.registry.open(ref);
    let local: ImageRef;
    try {
      local = await parseRef(ref);
    } catch (err) {
      if (err instanceof TorporError && err.code === 'NOT_FOUND' && looksLikeRegistryReference(ref)) {
        return this.registry.open(ref);
      }
      throw err;
    }
    const source = await openSource(local.path);
    return { source, image: await readImageMetadata(source, local.tag) };
  }

  #rootfsPath(digest: string): string {
    return join(this.cacheDir, 'rootfs', digestHex(digest, 'image'));
  }

  /** Concurrent resolves of one image in this process wait for the same unpack. */
  #unpackShared(source: ImageSource, image: ImageMetadata): Promise<string> {
    let pending = this.#inflight.get(image.digest);
    if (!pending) {
      pending = this.#unpack(source, image).finally(() => this.#inflight.delete(image.digest));
      this.#inflight.set(image.digest, pending);
    }
    return pending;
  }

  async #unpack(source: ImageSource, image: ImageMetadata): Promise<string> {
    const final = this.#rootfsPath(image.digest);
    const parent = join(this.cacheDir, 'rootfs');
    await mkdir(parent, { recursive: true });
    await this.#cleanStaleTemps(parent);
    const temp = join(parent, `${TEMP_PREFIX}${process.pid}-${randomBytes(6).toString('hex')}`);
    await mkdir(temp, { mode: 0o755 });
    this.unpackCount++;
    try {
      await applyLayers(source, image, temp);
      await this.#recordSize(digestHex(image.digest, 'image'), temp);
      await publish(temp, final);
      await touch(final);
      return final;
    } catch (err) {
      await rm(temp, { recursive: true, force: true });
      throw err;
    }
  }

  /** A temp dir whose process is gone is the leftover of a crash; another live process's is left alone. */
  async #cleanStaleTemps(parent: string): Promise<void> {
    if (this.#staleTempsCleaned) return;
    this.#staleTempsCleaned = true;
    for (const name of await readdir(parent)) {
      const pid = Number(/^\.tmp-(\d+)-/.exec(name)?.[1]);
      if (pid && pid !== process.pid && !(await processRunning(pid)))
        await rm(join(parent, name), { recursive: true, force: true });
    }
  }
}

async function applyLayers(source: ImageSource, image: ImageMetadata, root: string): Promise<void> {
  const writer = new RootfsWriter(root);
  for (const [i, layer] of image.layers.entries()) {
    const label = `layer ${i} (${layer.digest ?? layer.name})`;
    const { entries, finished } = await openLayer(source, layer, label);
    const streamed = finished.then(
      () => undefined,
      (err: unknown) => err,
    );
    try {
      await writer.applyLayer(entries, label);
    } catch (err) {
      // The entry that failed is the reason; the stream's own error is then only "premature close".
      entries.destroy();
      await streamed;
      throw asLayerError(err, label);
    }
    const streamError = await streamed;
    if (streamError) throw asLayerError(streamError, label);
  }
  await writer.finish();
}

/** Stream failures (bad gzip, bad tar, digest mismatch) mean the layer is not what the image claims. */
function asLayerError(err: unknown, label: string): TorporError {
  if (err instanceof TorporError) return err;
  const reason = err instanceof Error ? err.message : String(err);
  return new TorporError('IMAGE_REJECTED', `${label} is not a valid layer: ${reason}`, { field: 'image', cause: err });
}

async function publish(temp: string, final: string): Promise<void> {
  try {
    await rename(temp, final);
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    // Another process published the same digest first; its rootfs is as good as ours.
    if ((code === 'ENOTEMPTY' || code === 'EEXIST') && (await isDirectory(final))) {
      await rm(temp, { recursive: true, force: true });
      return;
    }
    throw err;
  }
}

/** "<path>" or "<path>:<tag>"; the path may itself contain ':' so the existing path decides the split. */
async function parseRef(ref: string): Promise<ImageRef> {
  if (ref === '') throw new TorporError('INVALID_ARGUMENT', 'image reference is empty', { field: 'image' });
  if (await exists(ref)) return { path: resolvePath(ref), tag: undefined };
  for (let colon = ref.indexOf(':'); colon > 0; colon = ref.indexOf(':', colon + 1)) {
    const path = ref.slice(0, colon);
    const tag = ref.slice(colon + 1);
    if (tag !== '' && !tag.includes('/') && (await exists(path))) return { path: resolvePath(path), tag };
  }
  throw new TorporError('NOT_FOUND', `image "${ref}" not found: no such layout directory or archive`, {
    field: 'image',
  });
}

/** Marks a cache entry as just used (its mtime orders eviction). */
async function touch(path: string): Promise<void> {
  const now = new Date();
  await utimes(path, now, now).catch(() => undefined);
}

/** Bytes a directory tree takes on disk (hard links counted once). */
async function diskUsage(root: string): Promise<number> {
  const seen = new Set<number>();
  let bytes = 0;
  const walk = async (dir: string): Promise<void> => {
    for (const entry of await readdir(dir, { withFileTypes: true })) {
      const path = join(dir, entry.name);
      const info = await lstat(path);
      if (seen.has(info.ino)) continue;
      seen.add(info.ino);
      bytes += info.blocks * 512;
      if (entry.isDirectory()) await walk(path);
    }
  };
  await walk(root);
  return bytes;
}

async function exists(path: string): Promise<boolean> {
  return (await stat(path).catch(() => undefined)) !== undefined;
}

async function isDirectory(path: string): Promise<boolean> {
  return (await stat(path).catch(() => undefined))?.isDirectory() ?? false;
}
