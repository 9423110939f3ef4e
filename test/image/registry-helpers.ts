// Scaffolding for registry tests: a real docker-registry started by scripts/services/registry.sh, a push
// client for the distribution API (so tests can push what skopeo cannot build: indexes, Docker media types),
// a logging proxy that can tamper with or cut one blob, and a bearer-token server for token auth.

import { execFile } from 'node:child_process';
import { createPrivateKey, createPublicKey, randomUUID, sign } from 'node:crypto';
import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { createServer, request, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { sha256Digest } from '../../src/image/digest.ts';
import { type ImageSpec, writeOciLayout } from '../../src/image/pack.ts';

const run = promisify(execFile);
const ROOT = join(import.meta.dirname, '..', '..');
const SCRIPT = join(ROOT, 'scripts', 'services', 'registry.sh');

export const MEDIA = {
  ociIndex: 'application/vnd.oci.image.index.v1+json',
  ociManifest: 'application/vnd.oci.image.manifest.v1+json',
  dockerList: 'application/vnd.docker.distribution.manifest.list.v2+json',
  dockerManifest: 'application/vnd.docker.distribution.manifest.v2+json',
  dockerConfig: 'application/vnd.docker.container.image.v1+json',
  dockerLayer: 'application/vnd.docker.image.rootfs.diff.tar.gzip',
} as const;

export interface RunningRegistry {
  pid: number;
  port: number;
  /** "127.0.0.1:<port>", as written in image references. */
  host: string;
  url: string;
  dir: string;
  stop(): Promise<void>;
}

export type RegistryAuthConfig =
  | { htpasswd: string }
  | { token: { realm: string; service: string; issuer: string; certFile: string } };

/** Whether a command exists, for skip reasons. */
export async function haveCommand(name: string): Promise<boolean> {
  try {
    await run('sh', ['-c', `command -v ${name}`]);
    return true;
  } catch {
    return false;
  }
}

/** Starts a registry, or answers why it cannot (then the caller skips, saying so). */
export async function startRegistry(auth?: RegistryAuthConfig): Promise<RunningRegistry | string> {
  if (!(await haveCommand('docker-registry'))) {
    return 'docker-registry is not installed (scripts/setup.sh installs it: apt-get install docker-registry)';
  }
  const dir = await mkdtemp(join(tmpdir(), 'torpor-registry-'));
  const args = ['start', dir];
  if (auth && 'htpasswd' in auth) args.push('--htpasswd', auth.htpasswd);
  if (auth && 'token' in auth) {
    const t = auth.token;
    args.push('--token', t.realm, t.service, t.issuer, t.certFile);
  }
  let stdout: string;
  try {
    ({ stdout } = await run('bash', [SCRIPT, ...args], { timeout: 60_000 }));
  } catch (err) {
    await rm(dir, { recursive: true, force: true });
    return `docker-registry could not be started: ${(err as { stderr?: string }).stderr ?? String(err)}`;
  }
  const pid = Number(/pid=(\d+)/.exec(stdout)?.[1]);
  const port = Number(/port=(\d+)/.exec(stdout)?.[1]);
  if (!pid || !port) throw new Error(`registry.sh printed no pid/port: ${stdout}`);
  return {
    pid,
    port,
    host: `127.0.0.1:${port}`,
    url: `http://127.0.0.1:${port}`,
    dir,
    async stop() {
      await stopPid(pid);
      await rm(dir, { recursive: true, force: true });
    },
  };
}

async function stopPid(pid: number): Promise<void> {
  try {
    process.kill(pid, 'SIGTERM');
  } catch {
    return;
  }
  for (let i = 0; i < 100; i++) {
    try {
      process.kill(pid, 0);
    } catch {
      return;
    }
    await new Promise((r) => setTimeout(r, 50));
  }
  process.kill(pid, 'SIGKILL');
}

export interface BuiltImage {
  manifest: Buffer;
  digest: string;
  config: { digest: string; data: Buffer };
  layers: { digest: string; data: Buffer }[];
}

export type Flavor = 'oci' | 'docker';

/** Builds an image with the project's own OCI writer, optionally re-labelled with Docker v2 media types. */
export async function buildImage(spec: ImageSpec, flavor: Flavor = 'oci'): Promise<BuiltImage> {
  const dir = await mkdtemp(join(tmpdir(), 'torpor-build-'));
  try {
    const { digest: ociDigest } = await writeOciLayout(dir, spec);
    const blob = (digest: string) => readFile(join(dir, 'blobs', 'sha256', digest.slice(7)));
    const json = JSON.parse((await blob(ociDigest)).toString()) as {
      mediaType: string;
      config: { mediaType: string; digest: string };
      layers: { mediaType: string; digest: string }[];
    };
    const config = { digest: json.config.digest, data: await blob(json.config.digest) };
    const layers = await Promise.all(json.layers.map(async (l) => ({ digest: l.digest, data: await blob(l.digest) })));
    if (flavor === 'docker') {
      json.mediaType = MEDIA.dockerManifest;
      json.config.mediaType = MEDIA.dockerConfig;
      for (const l of json.layers) l.mediaType = MEDIA.dockerLayer;
    }
    const manifest = Buffer.from(JSON.stringify(json));
    return { manifest, digest: sha256Digest(manifest), config, layers };
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}

/** A minimal distribution-API push client: monolithic blob uploads, then the manifest. */
export class Pusher {
  readonly base: string;
  readonly headers: Record<string, string>;

  constructor(base: string, headers: Record<string, string> = {}) {
    this.base = base;
    this.headers = headers;
  }

  async blob(repo: string, data: Buffer): Promise<string> {
    const digest = sha256Digest(data);
    const start = await fetch(`${this.base}/v2/${repo}/blobs/uploads/`, { method: 'POST', headers: this.headers });
    await start.arrayBuffer();
    if (start.status !== 202) throw new Error(`upload start for ${repo}: ${start.status}`);
    const location = new URL(start.headers.get('location') ?? '', this.base);
    location.searchParams.set('digest', digest);
    const put = await fetch(location, {
      method: 'PUT',
      headers: { ...this.headers, 'content-type': 'application/octet-stream' },
      body: new Uint8Array(data),
    });
    await put.arrayBuffer();
    if (put.status !== 201) throw new Error(`blob upload ${digest}: ${put.status}`);
    return digest;
  }

  async manifest(repo: string, reference: string, data: Buffer, mediaType: string): Promise<string> {
    const res = await fetch(`${this.base}/v2/${repo}/manifests/${reference}`, {
      method: 'PUT',
      headers: { ...this.headers, 'content-type': mediaType },
      body: new Uint8Array(data),
    });
    const text = await res.text();
    if (res.status !== 201) throw new Error(`manifest push ${repo}:${reference}: ${res.status} ${text}`);
    return sha256Digest(data);
  }

  async image(repo: string, tag: string | undefined, image: BuiltImage): Promise<string> {
    for (const b of [image.config, ...image.layers]) await this.blob(repo, b.data);
    const mediaType = (JSON.parse(image.manifest.toString()) as { mediaType: string }).mediaType;
    return this.manifest(repo, tag ?? image.digest, image.manifest, mediaType);
  }

  /** Pushes each image by digest, then an index (or Docker manifest list) over them under `tag`. */
  async index(
    repo: string,
    tag: string,
    entries: { image: BuiltImage; platform: { os: string; architecture: string; variant?: string } }[],
    flavor: Flavor,
  ): Promise<{ digest: string; data: Buffer }> {
    for (const e of entries) await this.image(repo, undefined, e.image);
    const mediaType = flavor === 'oci' ? MEDIA.ociIndex : MEDIA.dockerList;
    const data = Buffer.from(
      JSON.stringify({
        schemaVersion: 2,
        mediaType,
        manifests: entries.map((e) => ({
          mediaType: flavor === 'oci' ? MEDIA.ociManifest : MEDIA.dockerManifest,
          digest: e.image.digest,
          size: e.image.manifest.length,
          platform: e.platform,
        })),
      }),
    );
    return { digest: await this.manifest(repo, tag, data, mediaType), data };
  }
}

export interface ProxyRequest {
  method: string;
  path: string;
  range: string | undefined;
  authorization: boolean;
}

/**
 * An HTTP proxy in front of the registry that records every request, and on demand flips a byte of one
 * blob (`tamper`) or cuts one blob's response halfway, once (`cutOnce`).
 */
export class RegistryProxy {
  readonly requests: ProxyRequest[] = [];
  tamper: string | undefined;
  cutOnce: string | undefined;
  readonly #target: number;
  #server: Server | undefined;
  port = 0;

  constructor(targetPort: number) {
    this.#target = targetPort;
  }

  get host(): string {
    return `127.0.0.1:${this.port}`;
  }

  blobGets(digest?: string): ProxyRequest[] {
    return this.requests.filter(
      (r) => r.method === 'GET' && r.path.includes('/blobs/') && (!digest || r.path.endsWith(digest)),
    );
  }

  async start(): Promise<this> {
    this.#server = createServer((req, res) => {
      const path = req.url ?? '/';
      this.requests.push({
        method: req.method ?? 'GET',
        path,
        range: req.headers.range,
        authorization: req.headers.authorization !== undefined,
      });
      const upstream = request(
        { host: '127.0.0.1', port: this.#target, method: req.method, path, headers: req.headers },
        (up) => {
          const digest = /\/blobs\/(sha256:[a-f0-9]{64})$/.exec(path)?.[1];
          const mode =
            digest && up.statusCode === 200 && digest === this.tamper
              ? 'tamper'
              : digest && (up.statusCode === 200 || up.statusCode === 206) && digest === this.cutOnce
                ? 'cut'
                : 'pass';
          if (mode === 'pass') {
            res.writeHead(up.statusCode ?? 502, up.headers);
            up.pipe(res);
            return;
          }
          const chunks: Buffer[] = [];
          up.on('data', (c: Buffer) => chunks.push(c));
          up.on('end', () => {
            const body = Buffer.concat(chunks);
            res.writeHead(up.statusCode ?? 502, up.headers);
            if (mode === 'tamper') {
              body[body.length >> 1]! ^= 0xff;
              res.end(body);
              return;
            }
            this.cutOnce = undefined;
            res.write(body.subarray(0, body.length >> 1), () => {
              setTimeout(() => res.destroy(), 20);
            });
          });
        },
      );
      upstream.on('error', () => res.destroy());
      req.pipe(upstream);
    });
    await new Promise<void>((resolve) => this.#server!.listen(0, '127.0.0.1', resolve));
    this.port = (this.#server.address() as AddressInfo).port;
    return this;
  }

  async stop(): Promise<void> {
    this.#server?.closeAllConnections();
    await new Promise<void>((resolve) => this.#server?.close(() => resolve()) ?? resolve());
  }
}

export interface TokenServer {
  realm: string;
  service: string;
  issuer: string;
  certFile: string;
  /** Every token request: scope asked for and whether its credentials were right. */
  requests: { scope: string | null; service: string | null; authorized: boolean }[];
  /** A token for direct use (pushing), without the HTTP round trip. */
  issue(repository: string, actions: string[]): string;
  stop(): Promise<void>;
}

/**
 * A bearer-token service as docker-registry expects one: ES256 JWTs whose `kid` is the libtrust key id of the
 * certificate the registry trusts. Only `user`/`password` get a token.
 */
export async function startTokenServer(user: string, password: string): Promise<TokenServer | string> {
  if (!(await haveCommand('openssl'))) return 'openssl is not installed (needed to make the token-signing certificate)';
  const dir = await mkdtemp(join(tmpdir(), 'torpor-token-'));
  const keyFile = join(dir, 'key.pem');
  const certFile = join(dir, 'cert.pem');
  await run('openssl', [
    'req',
    '-x509',
    '-newkey',
    'ec',
    '-pkeyopt',
    'ec_paramgen_curve:prime256v1',
    '-nodes',
    '-keyout',
    keyFile,
    '-out',
    certFile,
    '-days',
    '2',
    '-subj',
    '/CN=torpor-test-token-issuer',
  ]);
  const key = createPrivateKey(await readFile(keyFile));
  const kid = libtrustKeyId(createPublicKey(key).export({ type: 'spki', format: 'der' }));
  const service = 'torpor-test-registry';
  const issuer = 'torpor-test-issuer';
  const issue = (repository: string, actions: string[]): string => {
    const now = Math.floor(Date.now() / 1000);
    const header = { typ: 'JWT', alg: 'ES256', kid };
    const claims = {
      iss: issuer,
      sub: user,
      aud: service,
      exp: now + 300,
      nbf: now - 10,
      iat: now,
      jti: randomUUID(),
      access: [{ type: 'repository', name: repository, actions }],
    };
    const input = `${b64url(JSON.stringify(header))}.${b64url(JSON.stringify(claims))}`;
    const signature = sign('sha256', Buffer.from(input), { key, dsaEncoding: 'ieee-p1363' });
    return `${input}.${signature.toString('base64url')}`;
  };
  const requests: TokenServer['requests'] = [];
  const expected = `Basic ${Buffer.from(`${user}:${password}`).toString('base64')}`;
  const server = createServer((req, res) => {
    const url = new URL(req.url ?? '/', 'http://x');
    const authorized = req.headers.authorization === expected;
    const scope = url.searchParams.get('scope');
    requests.push({ scope, service: url.searchParams.get('service'), authorized });
    if (!authorized) {
      res.writeHead(401, { 'content-type': 'application/json' });
      res.end('{"details":"incorrect username or password"}');
      return;
    }
    const repository = /^repository:([^:]+):/.exec(scope ?? '')?.[1] ?? '';
    res.writeHead(200, { 'content-type': 'application/json' });
    res.end(JSON.stringify({ token: issue(repository, ['pull']), expires_in: 300 }));
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const port = (server.address() as AddressInfo).port;
  return {
    realm: `http://127.0.0.1:${port}/token`,
    service,
    issuer,
    certFile,
    requests,
    issue,
    async stop() {
      server.closeAllConnections();
      await new Promise<void>((resolve) => server.close(() => resolve()));
      await rm(dir, { recursive: true, force: true });
    },
  };
}

/** libtrust's key id: sha256 of the DER public key, first 30 bytes, base32, in colon-separated groups of 4. */
function libtrustKeyId(der: Buffer): string {
  const alphabet = 'ABCDEFGHIJKLMNOPQRSTUVWXYZ234567';
  const bytes = der.length ? sha256Raw(der).subarray(0, 30) : Buffer.alloc(0);
  let bits = 0;
  let value = 0;
  let out = '';
  for (const byte of bytes) {
    value = (value << 8) | byte;
    bits += 8;
    while (bits >= 5) {
      out += alphabet[(value >>> (bits - 5)) & 31];
      bits -= 5;
    }
  }
  if (bits > 0) out += alphabet[(value << (5 - bits)) & 31];
  return out.match(/.{1,4}/g)!.join(':');
}

function sha256Raw(data: Buffer): Buffer {
  return Buffer.from(sha256Digest(data).slice(7), 'hex');
}

function b64url(text: string): string {
  return Buffer.from(text).toString('base64url');
}

export async function htpasswdFile(dir: string, user: string, password: string): Promise<string | undefined> {
  if (!(await haveCommand('htpasswd'))) return undefined;
  const { stdout } = await run('htpasswd', ['-Bbn', user, password]);
  const file = join(dir, 'htpasswd');
  await writeFile(file, stdout);
  return file;
}
