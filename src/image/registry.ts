// Pulls images from OCI registries (distribution API v2). The manifest is always asked of the registry
// (that is where tags resolve and access is checked); an index or manifest list is narrowed to this node's
// platform; config and layers are fetched by digest into a node-wide content-addressed blob cache,
// <cacheDir>/blobs/sha256/<hex>, each verified before it is renamed into place, downloaded in parallel
// (bounded), resumed with a Range request when a connection drops. A blob already in the cache is not
// downloaded again. The result is an ImageSource over that cache, which the ImageStore unpacks like a local
// OCI layout (verifying every digest once more on the way through).
//
// Authentication: anonymous, HTTP Basic, and the bearer-token flow (a 401 with `WWW-Authenticate: Bearer
// realm=…,service=…,scope=…` sends us to the realm for a token). Credentials come from the options or from
// a docker-style config.json named by TORPOR_REGISTRY_AUTH_FILE. They are never logged and never part of
// an error message.

import { mkdir, readFile, rename, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { arch } from 'node:process';
import { type ErrorCode, TorporError } from '../core/errors.ts';
import { type CasErrors, ContentCache } from './cas.ts';
import { digestHex, sha256Digest } from './digest.ts';
import { type GetResponse, httpGet, isLoopbackHost, redactUrl } from './http.ts';
import { type ImageMetadata, readImageMetadata } from './manifest.ts';
import type { ImageSource } from './source.ts';

export type RegistryCredential = { username: string; password: string } | { token: string };

export interface RegistryProgress {
  bytesDone: number;
  bytesTotal: number;
}

export interface Platform {
  os: string;
  architecture: string;
  variant?: string;
}

export interface RegistryOptions {
  /** Credentials per registry host ("host" or "host:port", as written in image references). */
  auth?: Record<string, RegistryCredential>;
  /** A docker-style config.json (`auths: { host: { auth: base64(user:pass) } }`); default TORPOR_REGISTRY_AUTH_FILE. */
  authFile?: string;
  /** Hosts spoken to over plain HTTP (loopback hosts always are). */
  insecureRegistries?: string[];
  /** Parallel layer downloads per pull (default 4). */
  concurrency?: number;
  /** The platform picked from an index (default this node's: linux and its architecture). */
  platform?: Platform;
  onProgress?: (progress: RegistryProgress) => void;
}

export interface RegistryReference {
  /** As written: "host[:port]"; "docker.io" for Docker Hub. */
  registry: string;
  repository: string;
  tag?: string;
  digest?: string;
}

export interface OpenedRegistryImage {
  source: ImageSource;
  image: ImageMetadata;
  /** Puts every layer blob in the blob cache (only needed when the rootfs is not unpacked yet). */
  fetchLayers(onProgress?: (progress: RegistryProgress) => void): Promise<void>;
}

interface Descriptor {
  mediaType?: string;
  digest: string;
  size?: number;
  platform?: { os?: string; architecture?: string; variant?: string };
}

interface Manifest {
  digest: string;
  bytes: Buffer;
  mediaType: string;
  json: Record<string, unknown>;
}

interface Challenge {
  scheme: string;
  params: Record<string, string>;
}

const MEDIA = {
  ociIndex: 'application/vnd.oci.image.index.v1+json',
  ociManifest: 'application/vnd.oci.image.manifest.v1+json',
  dockerList: 'application/vnd.docker.distribution.manifest.list.v2+json',
  dockerManifest: 'application/vnd.docker.distribution.manifest.v2+json',
};
const ACCEPT = [MEDIA.ociIndex, MEDIA.ociManifest, MEDIA.dockerList, MEDIA.dockerManifest].join(', ');
const MAX_MANIFEST_BYTES = 4 << 20;
const MAX_CONFIG_BYTES = 8 << 20;
const MAX_INDEX_DEPTH = 4;
const DEFAULT_CONCURRENCY = 4;
const DOCKER_HUB = 'docker.io';
const DOCKER_HUB_API = 'registry-1.docker.io';
const HOST =
  /^(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*|\[[0-9a-fA-F:]+\])(?::\d{1,5})?$/;
const PATH_COMPONENT = /^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*$/;
const TAG = /^[\w][\w.-]{0,127}$/;
const DIGEST = /^sha256:[a-f0-9]{64}$/;

export const REGISTRY_PREFIX = 'docker://';

/** True for "docker://…" and for "host[:port]/repo…" whose first component names a host. */
export function looksLikeRegistryReference(ref: string): boolean {
  if (ref.startsWith(REGISTRY_PREFIX)) return true;
  const slash = ref.indexOf('/');
  if (slash <= 0) return false;
  const first = ref.slice(0, slash);
  return (first.includes('.') || first.includes(':') || first === 'localhost') && HOST.test(first);
}

/** Parses `[docker://]host[:port]/repo[:tag][@sha256:…]`; with docker:// a bare "repo" means Docker Hub. */
export function parseRegistryReference(ref: string): RegistryReference {
  const explicit = ref.startsWith(REGISTRY_PREFIX);
  let rest = explicit ? ref.slice(REGISTRY_PREFIX.length) : ref;
  const slash = rest.indexOf('/');
  const at = rest.indexOf('@');
  if (at >= 0 && (slash < 0 || at < slash)) {
    // user:password@host: do not echo the reference, it holds a secret.
    throw invalid('image references may not carry credentials; configure them for the registry instead');
  }
  let digest: string | undefined;
  if (at >= 0) {
    digest = rest.slice(at + 1);
    rest = rest.slice(0, at);
    if (!DIGEST.test(digest)) throw invalid(`image reference "${ref}" has an unsupported digest (sha256:<64 hex>)`);
  }
  let tag: string | undefined;
  const colon = rest.lastIndexOf(':');
  if (colon > rest.lastIndexOf('/')) {
    tag = rest.slice(colon + 1);
    rest = rest.slice(0, colon);
    if (!TAG.test(tag)) throw invalid(`image reference "${ref}" has an invalid tag`);
  }
  const first = rest.split('/')[0] ?? '';
  let registry: string;
  let repository: string;
  if (rest.includes('/') && (first.includes('.') || first.includes(':') || first === 'localhost')) {
    registry = first;
    repository = rest.slice(first.length + 1);
  } else if (explicit) {
    registry = DOCKER_HUB;
    repository = rest.includes('/') ? rest : `library/${rest}`;
  } else {
    throw invalid(`image reference "${ref}" names no registry host`);
  }
  if (!HOST.test(registry)) throw invalid(`image reference "${ref}" has an invalid registry host`);
  if (registry === DOCKER_HUB && !repository.includes('/')) repository = `library/${repository}`;
  if (!repository.split('/').every((c) => PATH_COMPONENT.test(c))) {
    throw invalid(`image reference "${ref}" has an invalid repository name (lowercase letters, digits, . _ -)`);
  }
  if (!tag && !digest) tag = 'latest';
  return { registry, repository, ...(tag ? { tag } : {}), ...(digest ? { digest } : {}) };
}

export function formatReference(ref: RegistryReference): string {
  return `${ref.registry}/${ref.repository}${ref.tag ? `:${ref.tag}` : ''}${ref.digest ? `@${ref.digest}` : ''}`;
}

export class RegistryPuller {
  readonly cacheDir: string;
  /** Node-wide blob cache: <cacheDir>/blobs/sha256/<hex>. */
  readonly blobs: ContentCache;
  readonly #options: RegistryOptions;
  readonly #tokens = new Map<string, { header: string; expires: number }>();

  constructor(cacheDir: string, options: RegistryOptions = {}) {
    this.cacheDir = cacheDir;
    this.blobs = new ContentCache(join(cacheDir, 'blobs', 'sha256'));
    this.#options = options;
  }

  async open(reference: string): Promise<OpenedRegistryImage> {
    const ref = parseRegistryReference(reference);
    const session = new Session(this, ref, await this.#credentialFor(ref.registry), this.#tokens);
    const manifest = await this.#platformManifest(session, ref);
    const config = descriptorOf(manifest.json.config, `manifest ${manifest.digest} config`);
    const layers = Array.isArray(manifest.json.layers)
      ? manifest.json.layers.map((l, i) => descriptorOf(l, `manifest ${manifest.digest} layer ${i}`))
      : [];
    await this.#fetchBlob(session, config, `config ${config.digest}`, MAX_CONFIG_BYTES);
    const index = await this.#writeIndex(manifest);
    const source = this.#source(formatReference(ref), index);
    const image = await readImageMetadata(source, undefined);
    return {
      source,
      image,
      fetchLayers: (onProgress) => this.#fetchLayers(session, layers, onProgress ?? this.#options.onProgress),
    };
  }

  /** The scheme a host is spoken to with: plain HTTP only for loopback and configured insecure registries. */
  baseUrl(registry: string): string {
    const host = registry === DOCKER_HUB ? DOCKER_HUB_API : registry;
    const insecure = isLoopbackHost(host) || (this.#options.insecureRegistries ?? []).includes(registry);
    return `${insecure ? 'http' : 'https'}://${host}`;
  }

  isInsecure(url: string): boolean {
    const u = new URL(url);
    return isLoopbackHost(u.host) || (this.#options.insecureRegistries ?? []).includes(u.host);
  }

  async #credentialFor(registry: string): Promise<RegistryCredential | undefined> {
    const explicit = this.#options.auth?.[registry];
    if (explicit) return explicit;
    const file = this.#options.authFile ?? process.env.TORPOR_REGISTRY_AUTH_FILE;
    return file ? credentialFromAuthFile(file, registry) : undefined;
  }

  async #platformManifest(session: Session, ref: RegistryReference): Promise<Manifest> {
    let manifest = await this.#manifest(session, ref.digest ?? ref.tag!, ref.digest, undefined);
    for (let depth = 0; Array.isArray(manifest.json.manifests); depth++) {
      if (depth >= MAX_INDEX_DEPTH)
        throw rejected(`${session.name}: image indexes nest deeper than ${MAX_INDEX_DEPTH}`);
      const chosen = this.#selectPlatform(session, manifest);
      manifest = await this.#manifest(session, chosen.digest, chosen.digest, chosen.size);
    }
    if (manifest.json.schemaVersion === 1 || !Array.isArray(manifest.json.layers)) {
      throw new TorporError(
        'NOT_SUPPORTED',
        `${session.name}: manifest ${manifest.digest} (${manifest.mediaType || 'no media type'}) is not an OCI or Docker v2 image manifest`,
        { field: 'image' },
      );
    }
    return manifest;
  }

  #selectPlatform(session: Session, index: Manifest): Descriptor {
    const wanted = this.#options.platform ?? { os: 'linux', architecture: arch === 'x64' ? 'amd64' : arch };
    const list = index.json.manifests as unknown[];
    const descriptors = list.map((d, i) => descriptorOf(d, `index ${index.digest} manifest ${i}`));
    const candidates = descriptors.filter(
      (d) => d.platform?.os === wanted.os && d.platform.architecture === wanted.architecture,
    );
    const chosen =
      candidates.find((d) => (wanted.variant ? d.platform?.variant === wanted.variant : false)) ??
      candidates.find((d) => !d.platform?.variant || d.platform.variant === 'v1' || d.platform.variant === 'v8') ??
      candidates[0];
    if (!chosen) {
      const offered = descriptors.map((d) => `${d.platform?.os}/${d.platform?.architecture}`).join(', ');
      throw new TorporError(
        'NOT_FOUND',
        `image ${session.name} has no ${wanted.os}/${wanted.architecture} manifest (it offers ${offered || 'none'})`,
        { field: 'image' },
      );
    }
    return chosen;
  }

  async #manifest(
    session: Session,
    reference: string,
    expectedDigest: string | undefined,
    expectedSize: number | undefined,
  ): Promise<Manifest> {
    const path = `/v2/${session.ref.repository}/manifests/${reference}`;
    const res = await session.get(path, { accept: ACCEPT }, `manifest ${reference}`);
    if (res.status === 404) {
      await res.discard();
      throw new TorporError('NOT_FOUND', `image ${session.name} not found: the registry has no manifest ${reference}`, {
        field: 'image',
      });
    }
    if (res.status !== 200) throw await unexpected(res, session, `manifest ${reference}`);
    const bytes = await res.text(MAX_MANIFEST_BYTES).catch((err: unknown) => {
      if (err instanceof TypeError) throw unreachable(session.ref.registry, `manifest ${reference}`, err);
      throw rejected(`${session.name}: manifest ${reference}: ${(err as Error).message}`);
    });
    const digest = sha256Digest(bytes);
    const claimed = res.headers.get('docker-content-digest');
    for (const [what, expected] of [
      ['the reference', expectedDigest],
      ['the registry header', claimed?.startsWith('sha256:') ? claimed : undefined],
    ] as const) {
      if (expected !== undefined && expected !== digest) {
        throw rejected(
          `${session.name}: manifest ${reference} does not match its digest (${what}): expected ${expected}, got ${digest}`,
        );
      }
    }
    if (expectedSize !== undefined && bytes.length !== expectedSize) {
      throw rejected(
        `${session.name}: manifest ${digest} is ${bytes.length} bytes, its descriptor says ${expectedSize}`,
      );
    }
    let json: unknown;
    try {
      json = JSON.parse(bytes.toString('utf8'));
    } catch {
      throw rejected(`${session.name}: manifest ${digest} is not valid JSON`);
    }
    if (!isRecord(json)) throw rejected(`${session.name}: manifest ${digest} is not an object`);
    await this.blobs.get(digestHex(digest, 'manifest'), {
      open: async () => ({ body: [bytes], start: 0 }),
      expectedSize: bytes.length,
      maxBytes: MAX_MANIFEST_BYTES,
      mode: 0o644,
      errors: blobErrors(`manifest ${digest} of ${session.name}`),
    });
    const mediaType =
      (typeof json.mediaType === 'string' ? json.mediaType : undefined) ??
      res.headers.get('content-type')?.split(';')[0] ??
      '';
    return { digest, bytes, mediaType, json };
  }

  async #fetchLayers(
    session: Session,
    layers: Descriptor[],
    onProgress: ((progress: RegistryProgress) => void) | undefined,
  ): Promise<void> {
    const bytesTotal = layers.reduce((sum, l) => sum + (l.size ?? 0), 0);
    let bytesDone = 0;
    const missing: [Descriptor, number][] = [];
    for (const [i, layer] of layers.entries()) {
      const hit = await this.blobs.lookup(digestHex(layer.digest, 'layer'), sizeSanity(layer));
      if (hit) bytesDone += layer.size ?? 0;
      else missing.push([layer, i]);
    }
    onProgress?.({ bytesDone, bytesTotal });
    const onBytes = (delta: number) => {
      bytesDone += delta;
      onProgress?.({ bytesDone, bytesTotal });
    };
    await parallel(missing, this.#options.concurrency ?? DEFAULT_CONCURRENCY, ([layer, i]) =>
      this.#fetchBlob(session, layer, `layer ${i} (${layer.digest})`, Number.MAX_SAFE_INTEGER, onBytes),
    );
  }

  async #fetchBlob(
    session: Session,
    descriptor: Descriptor,
    label: string,
    maxBytes: number,
    onBytes?: (delta: number) => void,
  ): Promise<string> {
    const hex = digestHex(descriptor.digest, label);
    const path = `/v2/${session.ref.repository}/blobs/${descriptor.digest}`;
    const { path: file } = await this.blobs
      .get(hex, {
        ...(descriptor.size !== undefined ? { expectedSize: descriptor.size } : {}),
        maxBytes,
        mode: 0o644,
        errors: blobErrors(`${label} of ${session.name}`),
        ...(onBytes ? { onBytes } : {}),
        retryable: (err) => !(err instanceof TorporError),
        open: async (offset) => {
          const headers: Record<string, string> = offset > 0 ? { range: `bytes=${offset}-` } : {};
          const res = await session.get(path, headers, label);
          if (res.status === 206 && contentRangeStart(res.headers.get('content-range')) === offset) {
            return { body: res.body(), start: offset };
          }
          if (res.status === 200) return { body: res.body(), start: 0 };
          if (res.status === 404) {
            await res.discard();
            throw new TorporError('NOT_FOUND', `image ${session.name} is incomplete: the registry has no ${label}`, {
              field: 'image',
            });
          }
          throw await unexpected(res, session, label);
        },
      })
      .catch((err: unknown) => {
        // What is left after the retries is a transport failure (the connection dropped again and again).
        if (err instanceof TorporError) throw err;
        throw unreachable(session.ref.registry, label, err);
      });
    return file;
  }

  async #writeIndex(manifest: Manifest): Promise<string> {
    const dir = join(this.cacheDir, 'registry');
    await mkdir(dir, { recursive: true });
    const file = join(dir, `index-${digestHex(manifest.digest, 'manifest')}.json`);
    const index = {
      schemaVersion: 2,
      mediaType: MEDIA.ociIndex,
      manifests: [{ mediaType: manifest.mediaType, digest: manifest.digest, size: manifest.bytes.length }],
    };
    const temp = `${file}.tmp-${process.pid}-${Math.random().toString(36).slice(2)}`;
    await writeFile(temp, JSON.stringify(index));
    await rename(temp, file);
    return file;
  }

  /** The blob cache seen as an OCI layout whose index.json names exactly the pulled manifest. */
  #source(name: string, indexFile: string): ImageSource {
    const blobs = this.blobs;
    return {
      path: name,
      async locate(entry) {
        if (entry === 'index.json') {
          return { file: indexFile, start: 0, size: (await stat(indexFile)).size };
        }
        const hex = /^blobs\/sha256\/([a-f0-9]{64})$/.exec(entry)?.[1];
        if (!hex) return undefined;
        const file = await blobs.lookup(hex);
        if (!file) return undefined;
        return { file, start: 0, size: (await stat(file)).size };
      },
    };
  }
}

/** One pull's conversation with one registry: carries the credential and the Authorization header won. */
class Session {
  readonly ref: RegistryReference;
  readonly name: string;
  readonly #puller: RegistryPuller;
  readonly #credential: RegistryCredential | undefined;
  readonly #tokens: Map<string, { header: string; expires: number }>;
  #authorization: string | undefined;

  constructor(
    puller: RegistryPuller,
    ref: RegistryReference,
    credential: RegistryCredential | undefined,
    tokens: Map<string, { header: string; expires: number }>,
  ) {
    this.#puller = puller;
    this.ref = ref;
    this.name = formatReference(ref);
    this.#credential = credential;
    this.#tokens = tokens;
  }

  async get(path: string, headers: Record<string, string>, what: string): Promise<GetResponse> {
    const url = `${this.#puller.baseUrl(this.ref.registry)}${path}`;
    let res = await this.#send(url, headers, what);
    if (res.status !== 401) return checkForbidden(res, this, what);
    const challenge = parseChallenge(res.headers.get('www-authenticate'));
    await res.discard();
    await this.#authenticate(challenge);
    res = await this.#send(url, headers, what);
    if (res.status === 401) {
      await res.discard();
      throw new TorporError(
        'UNAUTHENTICATED',
        `registry ${this.ref.registry} rejected the credentials configured for it (${what} of ${this.name})`,
        { field: 'image' },
      );
    }
    return checkForbidden(res, this, what);
  }

  async #send(url: string, headers: Record<string, string>, what: string): Promise<GetResponse> {
    try {
      return await httpGet(url, {
        headers,
        ...(this.#authorization ? { secretHeaders: { authorization: this.#authorization } } : {}),
      });
    } catch (err) {
      throw unreachable(this.ref.registry, what, err);
    }
  }

  async #authenticate(challenge: Challenge | undefined): Promise<void> {
    const credential = this.#credential;
    const none = () =>
      new TorporError(
        'UNAUTHENTICATED',
        `registry ${this.ref.registry} requires authentication for ${this.name}, and no credentials are configured for it`,
        { field: 'image' },
      );
    if (challenge?.scheme === 'basic') {
      if (!credential || !('username' in credential)) throw none();
      this.#authorization = basicHeader(credential);
      return;
    }
    if (challenge?.scheme !== 'bearer' || !challenge.params.realm) {
      throw new TorporError(
        'UNAUTHENTICATED',
        `registry ${this.ref.registry} refused ${this.name} without a usable authentication challenge`,
        { field: 'image' },
      );
    }
    if (credential && 'token' in credential) {
      this.#authorization = `Bearer ${credential.token}`;
      return;
    }
    const scope = challenge.params.scope ?? `repository:${this.ref.repository}:pull`;
    const key = `${this.ref.registry} ${challenge.params.realm} ${challenge.params.service ?? ''} ${scope}`;
    const cached = this.#tokens.get(key);
    if (cached && cached.expires > Date.now() && !this.#authorization) {
      this.#authorization = cached.header;
      return;
    }
    const token = await this.#requestToken(challenge.params.realm, challenge.params.service, scope, credential);
    this.#authorization = `Bearer ${token.token}`;
    this.#tokens.set(key, { header: this.#authorization, expires: Date.now() + token.expiresIn * 1000 - 5000 });
  }

  async #requestToken(
    realm: string,
    service: string | undefined,
    scope: string,
    credential: { username: string; password: string } | undefined,
  ): Promise<{ token: string; expiresIn: number }> {
    let url: URL;
    try {
      url = new URL(realm);
    } catch {
      throw new TorporError('UNAUTHENTICATED', `registry ${this.ref.registry} names a malformed token realm`, {
        field: 'image',
      });
    }
    if (url.protocol !== 'https:' && !(url.protocol === 'http:' && this.#puller.isInsecure(url.toString()))) {
      throw new TorporError(
        'UNAUTHENTICATED',
        `registry ${this.ref.registry} names a token realm ${redactUrl(realm)} that is not HTTPS; refusing to send credentials there`,
        { field: 'image' },
      );
    }
    if (service) url.searchParams.set('service', service);
    url.searchParams.set('scope', scope);
    const what = `a token from ${redactUrl(realm)}`;
    let res: GetResponse;
    try {
      res = await httpGet(url.toString(), {
        ...(credential ? { secretHeaders: { authorization: basicHeader(credential) } } : {}),
      });
    } catch (err) {
      throw unreachable(url.host, what, err);
    }
    if (res.status === 401 || res.status === 403) {
      await res.discard();
      throw new TorporError(
        res.status === 401 ? 'UNAUTHENTICATED' : 'PERMISSION_DENIED',
        credential
          ? `the token service of registry ${this.ref.registry} rejected the credentials configured for it (${this.name})`
          : `the token service of registry ${this.ref.registry} requires credentials for ${this.name}, and none are configured`,
        { field: 'image' },
      );
    }
    if (res.status !== 200) throw await unexpected(res, this, what);
    let body: unknown;
    try {
      body = JSON.parse((await res.text(1 << 20)).toString('utf8'));
    } catch {
      throw new TorporError('RUNTIME_ERROR', `${what} for ${this.name} is not valid JSON`, { field: 'image' });
    }
    const token = isRecord(body) ? (body.token ?? body.access_token) : undefined;
    if (typeof token !== 'string' || token === '') {
      throw new TorporError('RUNTIME_ERROR', `${what} for ${this.name} holds no token`, { field: 'image' });
    }
    const expiresIn = isRecord(body) && typeof body.expires_in === 'number' ? body.expires_in : 60;
    return { token, expiresIn: Math.max(expiresIn, 10) };
  }
}

async function checkForbidden(res: GetResponse, session: Session, what: string): Promise<GetResponse> {
  if (res.status !== 403) return res;
  await res.discard();
  throw new TorporError(
    'PERMISSION_DENIED',
    `registry ${session.ref.registry} denies access to ${what} of ${session.name}`,
    { field: 'image' },
  );
}

/** `Bearer realm="…",service="…",scope="…"` (values may hold commas inside quotes). */
export function parseChallenge(header: string | null): Challenge | undefined {
  if (!header) return undefined;
  const match = /^\s*(\w+)\s*(.*)$/s.exec(header);
  if (!match) return undefined;
  const params: Record<string, string> = {};
  for (const p of (match[2] ?? '').matchAll(/(\w+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^,\s]*))/g)) {
    params[p[1]!.toLowerCase()] = (p[2] ?? p[3] ?? '').replace(/\\(.)/g, '$1');
  }
  return { scheme: match[1]!.toLowerCase(), params };
}

async function credentialFromAuthFile(file: string, registry: string): Promise<RegistryCredential | undefined> {
  const field = 'TORPOR_REGISTRY_AUTH_FILE';
  let text: string;
  try {
    text = await readFile(file, 'utf8');
  } catch (err) {
    throw new TorporError(
      'INVALID_ARGUMENT',
      `cannot read the registry auth file ${file}: ${(err as NodeJS.ErrnoException).code ?? 'error'}`,
      { field },
    );
  }
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch {
    throw new TorporError('INVALID_ARGUMENT', `the registry auth file ${file} is not valid JSON`, { field });
  }
  const auths = isRecord(json) && isRecord(json.auths) ? json.auths : {};
  const wanted = registry === DOCKER_HUB ? [DOCKER_HUB, 'index.docker.io', DOCKER_HUB_API] : [registry];
  for (const [key, entry] of Object.entries(auths)) {
    const host = key.replace(/^https?:\/\//, '').split('/')[0] ?? '';
    if (!wanted.includes(host) || !isRecord(entry)) continue;
    if (typeof entry.registrytoken === 'string' && entry.registrytoken) return { token: entry.registrytoken };
    if (typeof entry.username === 'string' && typeof entry.password === 'string') {
      return { username: entry.username, password: entry.password };
    }
    if (typeof entry.auth === 'string' && entry.auth) {
      const decoded = Buffer.from(entry.auth, 'base64').toString('utf8');
      const colon = decoded.indexOf(':');
      if (colon <= 0) {
        throw new TorporError('INVALID_ARGUMENT', `the registry auth file ${file} has a malformed auth for ${host}`, {
          field,
        });
      }
      return { username: decoded.slice(0, colon), password: decoded.slice(colon + 1) };
    }
  }
  return undefined;
}

function basicHeader(credential: { username: string; password: string }): string {
  return `Basic ${Buffer.from(`${credential.username}:${credential.password}`).toString('base64')}`;
}

function descriptorOf(value: unknown, what: string): Descriptor {
  if (!isRecord(value) || typeof value.digest !== 'string') throw rejected(`${what} is not a descriptor`);
  digestHex(value.digest, what);
  if (value.size !== undefined && !(Number.isSafeInteger(value.size) && (value.size as number) >= 0)) {
    throw rejected(`${what} has a bad size`);
  }
  return value as unknown as Descriptor;
}

function sizeSanity(d: Descriptor): { expectedSize?: number } {
  return d.size !== undefined ? { expectedSize: d.size } : {};
}

function blobErrors(label: string): CasErrors {
  return {
    mismatch: (expected, actual) => rejected(`${label} does not match its digest: expected ${expected}, got ${actual}`),
    tooLarge: (limit) => rejected(`${label} is larger than ${limit} bytes`),
    wrongSize: (size, expected) => rejected(`${label} is ${size} bytes, its descriptor says ${expected}`),
  };
}

function contentRangeStart(header: string | null): number | undefined {
  const match = /^bytes (\d+)-\d+\/(?:\d+|\*)$/.exec(header ?? '');
  return match ? Number(match[1]) : undefined;
}

async function unexpected(res: GetResponse, session: Session, what: string): Promise<TorporError> {
  await res.discard();
  const code: ErrorCode = 'RUNTIME_ERROR';
  return new TorporError(
    code,
    `registry ${session.ref.registry} answered ${res.status} for ${what} of ${session.name}`,
    {
      field: 'image',
    },
  );
}

function unreachable(host: string, what: string, err: unknown): TorporError {
  const cause =
    (err as { cause?: { code?: string } }).cause?.code ?? (err instanceof Error ? err.message : String(err));
  // No `cause`: the underlying error may carry request details; the code is all a reader needs.
  return new TorporError('RUNTIME_ERROR', `cannot reach ${host} for ${what}: ${cause}`, { field: 'image' });
}

function rejected(message: string): TorporError {
  return new TorporError('IMAGE_REJECTED', message, { field: 'image' });
}

function invalid(message: string): TorporError {
  return new TorporError('INVALID_ARGUMENT', message, { field: 'image' });
}

function isRecord(value: unknown): value is Record<string, unknown> {
  return typeof value === 'object' && value !== null && !Array.isArray(value);
}

async function parallel<T>(items: T[], limit: number, work: (item: T) => Promise<unknown>): Promise<void> {
  let next = 0;
  let failure: { err: unknown } | undefined;
  const runner = async () => {
    while (!failure && next < items.length) {
      const item = items[next++]!;
      try {
        await work(item);
      } catch (err) {
        failure ??= { err };
      }
    }
  };
  await Promise.all(Array.from({ length: Math.max(1, Math.min(limit, items.length)) }, runner));
  if (failure) throw failure.err;
}
