// ImageStore turns an image reference into an unpacked rootfs. A rootfs is unpacked once per image digest
// into <cacheDir>/rootfs/<hex> (built in a temp dir, then renamed into place), and reused afterwards.
//
// References: an OCI layout directory, a tar archive of one, or a `docker save` tarball, each optionally
// followed by ":<tag>"; or a registry reference, `docker://host[:port]/repo[:tag|@sha256:…]` or the same
// without the scheme when no such local path exists (see registry.ts).

import { randomBytes } from 'node:crypto';
import { mkdir, readdir, rename, rm, stat } from 'node:fs/promises';
import { join, resolve as resolvePath } from 'node:path';
import { TorporError } from '../core/errors.ts';
import { processRunning } from '../sys/process.ts';
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

export class ImageStore {
  readonly cacheDir: string;
  /** Unpacks started by this store (not cache hits): tests use it to see that the cache works. */
  unpackCount = 0;
  readonly #inflight = new Map<string, Promise<string>>();
  #staleTempsCleaned = false;

  /** Pulls registry references into <cacheDir>/blobs/sha256 (the node-wide layer cache). */
  readonly registry: RegistryPuller;

  constructor(cacheDir: string, options: ImageStoreOptions = {}) {
    this.cacheDir = resolvePath(cacheDir);
    this.registry = new RegistryPuller(this.cacheDir, options.registry);
  }

  async resolve(ref: string, options: ResolveOptions = {}): Promise<ResolvedImage> {
    const { source, image, fetchLayers } = await this.#open(ref);
    const rootfs = this.#rootfsPath(image.digest);
    if (await isDirectory(rootfs)) return { digest: image.digest, rootfs, config: image.config, unpacked: false };
    await fetchLayers?.(options.onProgress);
    await this.#unpackShared(source, image);
    return { digest: image.digest, rootfs, config: image.config, unpacked: true };
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
      await publish(temp, final);
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

async function exists(path: string): Promise<boolean> {
  return (await stat(path).catch(() => undefined)) !== undefined;
}

async function isDirectory(path: string): Promise<boolean> {
  return (await stat(path).catch(() => undefined))?.isDirectory() ?? false;
}
