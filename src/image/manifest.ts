// Reads an image's metadata — OCI index and manifest, or `docker save` manifest.json — down to the
// image config and the ordered list of layer blobs. Nothing here reads a layer.

import { arch } from 'node:process';
import { TorporError } from '../core/errors.ts';
import { blobName, sha256Digest, verifyDigest } from './digest.ts';
import { type ImageSource, readRange } from './source.ts';

export interface ImageConfig {
  entrypoint: string[];
  cmd: string[];
  env: string[];
  workingDir: string;
  user: string;
}

export interface LayerBlob {
  /** Name of the blob inside the layout or archive. */
  name: string;
  /** Digest of the blob's bytes as stored, when the image names one. */
  digest?: string;
  size?: number;
  /** Digest of the uncompressed tar, from the config's rootfs.diff_ids. */
  diffId?: string;
}

export interface ImageMetadata {
  /** The image manifest's digest; for a `docker save` tarball, the config's. */
  digest: string;
  config: ImageConfig;
  layers: LayerBlob[];
}

interface Descriptor {
  mediaType?: string;
  digest: string;
  size?: number;
  annotations?: Record<string, string>;
  platform?: { os?: string; architecture?: string; variant?: string };
}

const REF_NAME = 'org.opencontainers.image.ref.name';
const MAX_INDEX_DEPTH = 4;
const HOST_ARCH = arch === 'x64' ? 'amd64' : arch;

export async function readImageMetadata(source: ImageSource, tag: string | undefined): Promise<ImageMetadata> {
  if (await source.locate('index.json')) return readOciImage(source, tag);
  if (await source.locate('manifest.json')) return readDockerImage(source, tag);
  throw malformed(source, 'it has neither index.json (OCI layout) nor manifest.json (docker save)');
}

async function readOciImage(source: ImageSource, tag: string | undefined): Promise<ImageMetadata> {
  const index = await readJson(source, 'index.json');
  if (!isRecord(index)) throw malformed(source, 'index.json is not an object');
  const descriptor = selectTagged(source, descriptorsOf(source, index, 'index.json'), tag);
  return readManifest(source, descriptor, 0);
}

function selectTagged(source: ImageSource, descriptors: Descriptor[], tag: string | undefined): Descriptor {
  if (tag === undefined) {
    if (descriptors.length === 1) return descriptors[0]!;
    const tags = descriptors.map((d) => d.annotations?.[REF_NAME] ?? '(untagged)').join(', ');
    throw malformed(source, `it holds ${descriptors.length} manifests; name one as <path>:<tag> (tags: ${tags})`);
  }
  const matches = descriptors.filter((d) => tagMatches(d.annotations?.[REF_NAME], tag));
  return single(source, matches, tag);
}

/** A tag matches a full reference too: "latest" selects "counter:latest". */
function tagMatches(candidate: string | undefined, tag: string): boolean {
  return candidate === tag || (candidate?.endsWith(`:${tag}`) ?? false);
}

function single<T>(source: ImageSource, matches: T[], tag: string): T {
  if (matches.length === 0) {
    throw new TorporError('NOT_FOUND', `image ${source.path} has no tag "${tag}"`, { field: 'image' });
  }
  if (matches.length > 1) throw malformed(source, `tag "${tag}" names ${matches.length} images`);
  return matches[0]!;
}

async function readManifest(source: ImageSource, descriptor: Descriptor, depth: number): Promise<ImageMetadata> {
  const what = `manifest ${descriptor.digest}`;
  const manifest = await readBlobJson(source, descriptor, what);
  // The blob's own shape decides, not the media type a descriptor claims.
  if (Array.isArray(manifest.manifests)) {
    if (depth >= MAX_INDEX_DEPTH) throw malformed(source, `image indexes nest deeper than ${MAX_INDEX_DEPTH}`);
    return readManifest(source, selectPlatform(source, descriptorsOf(source, manifest, what)), depth + 1);
  }
  if (!Array.isArray(manifest.layers) || !isRecord(manifest.config)) {
    throw malformed(source, `${what} is neither an image index nor an image manifest`);
  }
  const configDescriptor = toDescriptor(source, manifest.config, `${what} config`);
  const configJson = await readBlobJson(source, configDescriptor, `config ${configDescriptor.digest}`);
  const layers = manifest.layers.map((layer, i) => toDescriptor(source, layer, `${what} layer ${i}`));
  return {
    digest: descriptor.digest,
    config: parseConfig(source, configJson),
    layers: withDiffIds(
      source,
      configJson,
      layers.map((d) => ({ name: blobName(d.digest, 'layer'), ...d })),
    ),
  };
}

function selectPlatform(source: ImageSource, descriptors: Descriptor[]): Descriptor {
  const candidates = descriptors.filter((d) => d.platform?.os === 'linux' && d.platform.architecture === HOST_ARCH);
  const chosen = candidates.find((d) => !d.platform?.variant || d.platform.variant === 'v1') ?? candidates[0];
  if (!chosen) {
    throw new TorporError('NOT_FOUND', `image ${source.path} has no linux/${HOST_ARCH} manifest`, { field: 'image' });
  }
  return chosen;
}

async function readDockerImage(source: ImageSource, tag: string | undefined): Promise<ImageMetadata> {
  const entries = await readJson(source, 'manifest.json');
  if (!Array.isArray(entries)) throw malformed(source, 'manifest.json is not a list');
  const entry = selectDockerEntry(source, entries, tag);
  if (typeof entry.Config !== 'string' || !isStringArray(entry.Layers)) {
    throw malformed(source, 'manifest.json entry lacks Config or Layers');
  }
  const configBytes = await readNamed(source, entry.Config);
  const digest = sha256Digest(configBytes);
  const namedHex = /([a-f0-9]{64})(\.json)?$/.exec(entry.Config)?.[1];
  if (namedHex) verifyDigest(configBytes, `sha256:${namedHex}`, `config ${entry.Config}`);
  const configJson = parseJson(source, configBytes, entry.Config);
  if (!isRecord(configJson)) throw malformed(source, `config ${entry.Config} is not an object`);
  const layers = entry.Layers.map((name): LayerBlob => {
    const hex = /^blobs\/sha256\/([a-f0-9]{64})$/.exec(name)?.[1];
    return hex ? { name, digest: `sha256:${hex}` } : { name };
  });
  return { digest, config: parseConfig(source, configJson), layers: withDiffIds(source, configJson, layers) };
}

function selectDockerEntry(source: ImageSource, entries: unknown[], tag: string | undefined): Record<string, unknown> {
  const records = entries.filter(isRecord);
  if (tag === undefined) {
    if (records.length === 1) return records[0]!;
    throw malformed(source, `it holds ${records.length} images; name one as <path>:<tag>`);
  }
  const repoTags = (r: Record<string, unknown>) => (isStringArray(r.RepoTags) ? r.RepoTags : []);
  return single(
    source,
    records.filter((r) => repoTags(r).some((t) => tagMatches(t, tag))),
    tag,
  );
}

/** diff_ids let the unpacker check each layer's uncompressed bytes too, whatever compression the blob used. */
function withDiffIds(source: ImageSource, config: Record<string, unknown>, layers: LayerBlob[]): LayerBlob[] {
  const rootfs = isRecord(config.rootfs) ? config.rootfs : {};
  const diffIds = rootfs.diff_ids;
  if (!isStringArray(diffIds) || diffIds.length !== layers.length) {
    throw malformed(
      source,
      `config lists ${isStringArray(diffIds) ? diffIds.length : 0} diff_ids for ${layers.length} layers`,
    );
  }
  return layers.map((layer, i) => ({ ...layer, diffId: diffIds[i]! }));
}

function parseConfig(source: ImageSource, json: Record<string, unknown>): ImageConfig {
  const config = isRecord(json.config) ? json.config : {};
  const strings = (key: string): string[] => {
    const value = config[key];
    if (value === undefined || value === null) return [];
    if (!isStringArray(value)) throw malformed(source, `config field ${key} is not a list of strings`);
    return value;
  };
  const text = (key: string): string => (typeof config[key] === 'string' ? (config[key] as string) : '');
  return {
    entrypoint: strings('Entrypoint'),
    cmd: strings('Cmd'),
    env: strings('Env'),
    workingDir: text('WorkingDir'),
    user: text('User'),
  };
}

function descriptorsOf(source: ImageSource, index: Record<string, unknown>, what: string): Descriptor[] {
  if (!Array.isArray(index.manifests)) throw malformed(source, `${what} has no manifests list`);
  return index.manifests.map((d, i) => toDescriptor(source, d, `${what} manifest ${i}`));
}

function toDescriptor(source: ImageSource, value: unknown, what: string): Descriptor {
  if (!isRecord(value) || typeof value.digest !== 'string') throw malformed(source, `${what} is not a descriptor`);
  blobName(value.digest, what);
  if (value.size !== undefined && !Number.isSafeInteger(value.size)) throw malformed(source, `${what} has a bad size`);
  return value as unknown as Descriptor;
}

async function readBlobJson(
  source: ImageSource,
  descriptor: Descriptor,
  what: string,
): Promise<Record<string, unknown>> {
  const data = await readNamed(source, blobName(descriptor.digest, what));
  verifyDigest(data, descriptor.digest, what);
  const json = parseJson(source, data, what);
  if (!isRecord(json)) throw malformed(source, `${what} is not an object`);
  return json;
}

async function readJson(source: ImageSource, name: string): Promise<unknown> {
  return parseJson(source, await readNamed(source, name), name);
}

async function readNamed(source: ImageSource, name: string): Promise<Buffer> {
  const range = await source.locate(name);
  if (!range) throw malformed(source, `${name} is missing`);
  return readRange(range, name);
}

function parseJson(source: ImageSource, data: Buffer, what: string): unknown {
  try {
    return JSON.parse(data.toString('utf8'));
  } catch {
    throw malformed(source, `${what} is not valid JSON`);
  }
}

function isRecord(value: unknown): value is Record<string, unknown> {
  return typeof value === 'object' && value !== null && !Array.isArray(value);
}

function isStringArray(value: unknown): value is string[] {
  return Array.isArray(value) && value.every((v) => typeof v === 'string');
}

function malformed(source: ImageSource, reason: string): TorporError {
  return new TorporError('INVALID_ARGUMENT', `image ${source.path} is malformed: ${reason}`, { field: 'image' });
}
