// Writes images in the three forms ImageStore reads: an OCI layout directory, a tar archive of one, and a
// `docker save` tarball. Used by tests (which may craft hostile entries on purpose: raw names such as
// "../escape", device nodes, FIFOs) and to build sample images. Output is reproducible: fixed mtimes and
// owners, so the same input always yields the same digest.

import { mkdir, mkdtemp, readdir, readFile, rename, rm, stat, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { dirname, join, relative } from 'node:path';
import { arch } from 'node:process';
import { gzipSync } from 'node:zlib';
import tar from 'tar-stream';
import { sha256Digest } from './digest.ts';

export interface LayerEntry {
  /** Written verbatim as the tar entry name: "usr/bin/x", "/abs", even "../escape". */
  path: string;
  type: 'file' | 'dir' | 'symlink' | 'hardlink' | 'char-device' | 'fifo';
  content?: Uint8Array | string;
  /** A host file to take the content from, instead of `content`. */
  sourcePath?: string;
  mode?: number;
  /** Target of a symlink or hardlink. */
  linkname?: string;
}

export interface ImageSpec {
  layers: LayerEntry[][];
  config: { entrypoint?: string[]; cmd?: string[]; env?: string[]; workingDir?: string };
  tag?: string;
}

interface BuiltLayer {
  tar: Buffer;
  gzip: Buffer;
  diffId: string;
  digest: string;
}

interface BuiltImage {
  layers: BuiltLayer[];
  config: Buffer;
  configDigest: string;
}

export const MEDIA_TYPES = {
  index: 'application/vnd.oci.image.index.v1+json',
  manifest: 'application/vnd.oci.image.manifest.v1+json',
  config: 'application/vnd.oci.image.config.v1+json',
  layerGzip: 'application/vnd.oci.image.layer.v1.tar+gzip',
} as const;

const REF_NAME = 'org.opencontainers.image.ref.name';
const PLATFORM = { architecture: arch === 'x64' ? 'amd64' : arch, os: 'linux' };
const EPOCH = new Date(0);
const TAR_TYPES = {
  file: 'file',
  dir: 'directory',
  symlink: 'symlink',
  hardlink: 'link',
  'char-device': 'character-device',
  fifo: 'fifo',
} as const;

/** Adds the image to the OCI layout at `dir` (created if needed); a manifest with the same tag is replaced. */
export async function writeOciLayout(dir: string, image: ImageSpec): Promise<{ digest: string }> {
  const built = await buildImage(image);
  await writeBlob(dir, built.config);
  for (const layer of built.layers) await writeBlob(dir, layer.gzip);
  const manifest = Buffer.from(JSON.stringify(manifestOf(built)));
  const descriptor = await writeBlob(dir, manifest);
  await writeFile(join(dir, 'oci-layout'), JSON.stringify({ imageLayoutVersion: '1.0.0' }));
  await addToIndex(dir, {
    mediaType: MEDIA_TYPES.manifest,
    ...descriptor,
    ...(image.tag ? { annotations: { [REF_NAME]: image.tag } } : {}),
    platform: PLATFORM,
  });
  return { digest: descriptor.digest };
}

/** A tar of an OCI layout, as `skopeo copy oci-archive:` or `docker buildx --output type=oci` write it. */
export async function writeOciArchive(file: string, image: ImageSpec): Promise<{ digest: string }> {
  const dir = await mkdtemp(join(tmpdir(), 'torpor-oci-'));
  try {
    const result = await writeOciLayout(dir, image);
    await writeTar(file, await filesUnder(dir));
    return result;
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}

/** A `docker save` tarball (legacy layout: <hex>.json config, <diff-id hex>/layer.tar, manifest.json). */
export async function writeDockerArchive(file: string, image: ImageSpec): Promise<{ digest: string }> {
  const built = await buildImage(image);
  const configName = `${hexOf(built.configDigest)}.json`;
  const layerNames = built.layers.map((layer) => `${hexOf(layer.diffId)}/layer.tar`);
  const manifest = [{ Config: configName, RepoTags: image.tag ? [repoTag(image.tag)] : [], Layers: layerNames }];
  const members = new Map<string, Buffer>([[configName, built.config]]);
  for (const [i, layer] of built.layers.entries()) members.set(layerNames[i]!, layer.tar);
  members.set('manifest.json', Buffer.from(JSON.stringify(manifest)));
  await writeTar(
    file,
    [...members].map(([name, data]) => ({ name, data })),
  );
  return { digest: built.configDigest };
}

/** Stores `data` as a content-addressed blob of the layout at `dir`; returns its descriptor fields. */
export async function writeBlob(dir: string, data: Uint8Array): Promise<{ digest: string; size: number }> {
  const digest = sha256Digest(data);
  const file = join(dir, 'blobs', 'sha256', hexOf(digest));
  await atomicWrite(file, data);
  return { digest, size: data.length };
}

async function buildImage(image: ImageSpec): Promise<BuiltImage> {
  const layers: BuiltLayer[] = [];
  for (const entries of image.layers) {
    const tarBytes = await layerTar(entries);
    const gzip = gzipSync(tarBytes);
    layers.push({ tar: tarBytes, gzip, diffId: sha256Digest(tarBytes), digest: sha256Digest(gzip) });
  }
  const config = Buffer.from(JSON.stringify(imageConfig(image, layers)));
  return { layers, config, configDigest: sha256Digest(config) };
}

function imageConfig(image: ImageSpec, layers: BuiltLayer[]) {
  const { entrypoint, cmd, env, workingDir } = image.config;
  return {
    ...PLATFORM,
    config: {
      ...(entrypoint ? { Entrypoint: entrypoint } : {}),
      ...(cmd ? { Cmd: cmd } : {}),
      ...(env ? { Env: env } : {}),
      ...(workingDir ? { WorkingDir: workingDir } : {}),
    },
    rootfs: { type: 'layers', diff_ids: layers.map((layer) => layer.diffId) },
  };
}

function manifestOf(built: BuiltImage) {
  return {
    schemaVersion: 2,
    mediaType: MEDIA_TYPES.manifest,
    config: { mediaType: MEDIA_TYPES.config, digest: built.configDigest, size: built.config.length },
    layers: built.layers.map((layer) => ({
      mediaType: MEDIA_TYPES.layerGzip,
      digest: layer.digest,
      size: layer.gzip.length,
    })),
  };
}

async function layerTar(entries: LayerEntry[]): Promise<Buffer> {
  const pack = tar.pack();
  const collected = collect(pack);
  for (const entry of entries) {
    const data = await entryData(entry);
    await new Promise<void>((resolve, reject) => {
      pack.entry(tarHeader(entry), data, (err) => (err ? reject(err) : resolve()));
    });
  }
  pack.finalize();
  return collected;
}

function tarHeader(entry: LayerEntry) {
  const defaultMode = entry.type === 'dir' ? 0o755 : entry.type === 'symlink' ? 0o777 : 0o644;
  return {
    name: entry.path,
    type: TAR_TYPES[entry.type],
    mode: entry.mode ?? defaultMode,
    mtime: EPOCH,
    uid: 0,
    gid: 0,
    ...(entry.linkname !== undefined ? { linkname: entry.linkname } : {}),
    ...(entry.type === 'char-device' ? { devmajor: 1, devminor: 3 } : {}),
  };
}

async function entryData(entry: LayerEntry): Promise<Buffer> {
  if (entry.type !== 'file') return Buffer.alloc(0);
  if (entry.sourcePath !== undefined) return readFile(entry.sourcePath);
  return Buffer.from(entry.content ?? '');
}

async function collect(stream: AsyncIterable<unknown>): Promise<Buffer> {
  const chunks: Uint8Array[] = [];
  for await (const chunk of stream) chunks.push(chunk as Uint8Array);
  return Buffer.concat(chunks);
}

async function writeTar(file: string, members: { name: string; data: Buffer }[]): Promise<void> {
  const pack = tar.pack();
  const collected = collect(pack);
  for (const { name, data } of members) pack.entry({ name, mode: 0o644, mtime: EPOCH }, data);
  pack.finalize();
  await atomicWrite(file, await collected);
}

async function addToIndex(dir: string, descriptor: Record<string, unknown> & { digest: string }): Promise<void> {
  const file = join(dir, 'index.json');
  const existing = await readFile(file, 'utf8').catch(() => undefined);
  const index = existing
    ? (JSON.parse(existing) as { manifests: Record<string, unknown>[] })
    : { schemaVersion: 2, mediaType: MEDIA_TYPES.index, manifests: [] };
  const tag = (descriptor.annotations as Record<string, string> | undefined)?.[REF_NAME];
  index.manifests = index.manifests.filter((m) => {
    const otherTag = (m.annotations as Record<string, string> | undefined)?.[REF_NAME];
    return m.digest !== descriptor.digest && (tag === undefined || otherTag !== tag);
  });
  index.manifests.push(descriptor);
  await atomicWrite(file, Buffer.from(JSON.stringify(index, null, 2)));
}

async function filesUnder(dir: string): Promise<{ name: string; data: Buffer }[]> {
  const names = (await readdir(dir, { recursive: true })).sort();
  const files: { name: string; data: Buffer }[] = [];
  for (const name of names) {
    const path = join(dir, name);
    if ((await stat(path)).isFile()) files.push({ name: relative(dir, path), data: await readFile(path) });
  }
  return files;
}

async function atomicWrite(file: string, data: Uint8Array): Promise<void> {
  await mkdir(dirname(file), { recursive: true });
  const temp = `${file}.tmp-${process.pid}-${Math.random().toString(36).slice(2)}`;
  await writeFile(temp, data);
  await rename(temp, file);
}

function hexOf(digest: string): string {
  return digest.slice('sha256:'.length);
}

function repoTag(tag: string): string {
  return tag.includes(':') ? tag : `torpor.local/image:${tag}`;
}
