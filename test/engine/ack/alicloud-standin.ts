// A local stand-in for the two Alibaba Cloud APIs the ACK engine calls, checking requests the way the cloud does:
//
// - ACK (CS 2015-12-15) over HTTP: DescribeClusterUserKubeconfig, `GET /k8s/{ClusterId}/user_config`, signed with
//   ACS3-HMAC-SHA256 (canonical request → sha256 → HMAC-SHA256 with the AccessKey secret). Unknown key, wrong
//   signature, a payload hash that does not match the body, a stale date, a reused nonce or an STS key without
//   its token are refused with Alibaba Cloud's error codes. It answers with a kubeconfig for the real local
//   kube-apiserver, its bearer token taken from a pool (each issue a different user) and an `expiration`.
// - STS (2015-04-01) over HTTPS, as the credentials SDK insists: AssumeRole signed with the RPC signature (HMAC-SHA1
//   over the sorted, percent-encoded parameters) and AssumeRoleWithOIDC (anonymous: the OIDC token is checked).
//   Both issue temporary STS credentials that the ACK endpoint then accepts.
import { execFile } from 'node:child_process';
import { createHash, createHmac, randomBytes, timingSafeEqual } from 'node:crypto';
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import http, { type IncomingMessage, type ServerResponse } from 'node:http';
import https from 'node:https';
import type { AddressInfo } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';

const run = promisify(execFile);

export interface StandInOptions {
  /** Long-lived AccessKeys: id → secret. */
  accessKeys: Record<string, string>;
  clusterId: string;
  /** The real API server the kubeconfig points at. */
  apiServer: string;
  /** Bearer tokens handed out in turn (user names for the audit log are the API server's business). */
  tokens: string[];
  /** RAM roles that may be assumed (ARN → the OIDC provider ARN allowed to assume it, if any). */
  roles: Record<string, { oidcProviderArn?: string; oidcToken?: string }>;
  /** Lifetime of an issued kubeconfig, in ms (default: the requested TemporaryDurationMinutes). */
  kubeconfigLifetimeMs?: number;
}

export interface KubeconfigIssue {
  accessKeyId: string;
  viaSecurityToken: boolean;
  privateIpAddress: string | null;
  temporaryDurationMinutes: string | null;
  token: string;
}

export interface StandIn {
  csEndpoint: string;
  stsEndpoint: string;
  /** PEM of the CA that signed the STS endpoint's certificate. */
  caPem: string;
  issues: KubeconfigIssue[];
  stsIssues: { action: string; accessKeyId: string; roleArn: string; issuedKeyId: string }[];
  refusals: { api: string; code: string }[];
  /** Issues STS credentials directly (what a user with an STS token would hold). */
  issueSts(lifetimeMs?: number): { accessKeyId: string; accessKeySecret: string; securityToken: string };
  close(): Promise<void>;
}

interface StsCredential {
  secret: string;
  token: string;
  expires: number;
}

/** Alibaba Cloud's percent-encoding: everything but A-Z a-z 0-9 - _ . ~ */
export function popEncode(s: string): string {
  return encodeURIComponent(s).replace(/[!'()*]/g, (c) => `%${c.charCodeAt(0).toString(16).toUpperCase()}`);
}

const sha256 = (data: string | Buffer) => createHash('sha256').update(data).digest('hex');

function safeEqual(a: string, b: string): boolean {
  const x = Buffer.from(a);
  const y = Buffer.from(b);
  return x.length === y.length && timingSafeEqual(x, y);
}

class Refusal extends Error {
  readonly status: number;
  readonly code: string;
  constructor(status: number, code: string, message: string) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

async function body(req: IncomingMessage): Promise<Buffer> {
  const chunks: Buffer[] = [];
  for await (const c of req) chunks.push(c as Buffer);
  return Buffer.concat(chunks);
}

function reply(res: ServerResponse, status: number, payload: unknown): void {
  res.writeHead(status, { 'content-type': 'application/json;charset=utf-8' });
  res.end(JSON.stringify(payload));
}

async function selfSignedTls(): Promise<{ key: string; cert: string; ca: string }> {
  const dir = await mkdtemp(join(tmpdir(), 'torpor-sts-tls-'));
  try {
    const o = (f: string) => join(dir, f);
    await run('openssl', [
      'req',
      '-x509',
      '-newkey',
      'rsa:2048',
      '-nodes',
      '-days',
      '1',
      '-subj',
      '/CN=test-ca',
      '-keyout',
      o('ca.key'),
      '-out',
      o('ca.pem'),
    ]);
    await run('openssl', [
      'req',
      '-newkey',
      'rsa:2048',
      '-nodes',
      '-subj',
      '/CN=127.0.0.1',
      '-keyout',
      o('leaf.key'),
      '-out',
      o('leaf.csr'),
    ]);
    await run('bash', ['-c', `printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\\n' > ${o('ext')}`]);
    await run('openssl', [
      'x509',
      '-req',
      '-in',
      o('leaf.csr'),
      '-CA',
      o('ca.pem'),
      '-CAkey',
      o('ca.key'),
      '-CAcreateserial',
      '-days',
      '1',
      '-extfile',
      o('ext'),
      '-out',
      o('leaf.pem'),
    ]);
    return {
      key: await readFile(o('leaf.key'), 'utf8'),
      cert: await readFile(o('leaf.pem'), 'utf8'),
      ca: await readFile(o('ca.pem'), 'utf8'),
    };
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}

export async function startStandIn(opts: StandInOptions): Promise<StandIn> {
  const sts = new Map<string, StsCredential>();
  const nonces = new Set<string>();
  const issues: KubeconfigIssue[] = [];
  const stsIssues: StandIn['stsIssues'] = [];
  const refusals: StandIn['refusals'] = [];
  let nextToken = 0;

  const issueSts = (lifetimeMs = 3_600_000) => {
    const accessKeyId = `STS.${randomBytes(8).toString('hex')}`;
    const cred = {
      secret: randomBytes(20).toString('base64url'),
      token: randomBytes(32).toString('base64url'),
      expires: Date.now() + lifetimeMs,
    };
    sts.set(accessKeyId, cred);
    return { accessKeyId, accessKeySecret: cred.secret, securityToken: cred.token };
  };

  const checkFresh = (nonce: string | undefined, date: string | undefined) => {
    if (!nonce || nonces.has(nonce))
      throw new Refusal(400, 'SignatureNonceUsed', 'The request signature nonce has been used.');
    nonces.add(nonce);
    const t = Date.parse(date ?? '');
    if (!Number.isFinite(t) || Math.abs(Date.now() - t) > 15 * 60_000) {
      throw new Refusal(400, 'InvalidTimeStamp.Expired', 'Specified time stamp or date value is expired.');
    }
  };

  /** The secret for a key id, checking an STS key's token; throws Refusal. */
  const secretFor = (accessKeyId: string, securityToken: string | undefined): { secret: string; sts: boolean } => {
    const longLived = opts.accessKeys[accessKeyId];
    if (longLived !== undefined) {
      if (securityToken)
        throw new Refusal(
          400,
          'InvalidSecurityToken.MismatchWithAccessKey',
          'The security token does not match the AccessKey.',
        );
      return { secret: longLived, sts: false };
    }
    const cred = sts.get(accessKeyId);
    if (!cred) throw new Refusal(404, 'InvalidAccessKeyId.NotFound', 'Specified access key is not found.');
    if (!securityToken) throw new Refusal(400, 'InvalidSecurityToken.Missing', 'The security token is missing.');
    if (!safeEqual(securityToken, cred.token))
      throw new Refusal(400, 'InvalidSecurityToken.Malformed', 'The security token is invalid.');
    if (cred.expires < Date.now())
      throw new Refusal(400, 'InvalidSecurityToken.Expired', 'The security token has expired.');
    return { secret: cred.secret, sts: true };
  };

  // ---------------------------------------------------------------- ACK (ACS3-HMAC-SHA256)

  const verifyAcs3 = (req: IncomingMessage, url: URL, payload: Buffer): { accessKeyId: string; sts: boolean } => {
    const auth = req.headers.authorization ?? '';
    const m = /^ACS3-HMAC-SHA256 Credential=([^,]+),SignedHeaders=([^,]+),Signature=([0-9a-f]{64})$/.exec(auth);
    if (!m)
      throw new Refusal(400, 'IncompleteSignature', 'The request signature does not conform to Aliyun standards.');
    const [, accessKeyId, signedHeaderList, signature] = m as unknown as [string, string, string, string];
    const signed = signedHeaderList.split(';');
    for (const required of [
      'host',
      'x-acs-action',
      'x-acs-version',
      'x-acs-date',
      'x-acs-signature-nonce',
      'x-acs-content-sha256',
    ]) {
      if (!signed.includes(required)) throw new Refusal(400, 'IncompleteSignature', `${required} must be signed.`);
    }
    if (signed.join(';') !== [...signed].sort().join(';'))
      throw new Refusal(400, 'IncompleteSignature', 'SignedHeaders must be sorted.');
    const header = (name: string) => {
      const v = req.headers[name];
      return Array.isArray(v) ? v.join(',') : (v ?? '');
    };
    if (header('x-acs-content-sha256') !== sha256(payload)) {
      throw new Refusal(400, 'ContentSHA256NotMatched', 'The x-acs-content-sha256 header does not match the body.');
    }
    const securityToken = req.headers['x-acs-security-token'] as string | undefined;
    if (securityToken && !signed.includes('x-acs-security-token'))
      throw new Refusal(400, 'IncompleteSignature', 'x-acs-security-token must be signed.');
    const { secret, sts: viaSts } = secretFor(accessKeyId, securityToken);
    const query = [...url.searchParams.entries()]
      .map(([k, v]) => [popEncode(k), popEncode(v)] as const)
      .sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0))
      .map(([k, v]) => `${k}=${v}`)
      .join('&');
    const canonicalHeaders = signed.map((h) => `${h}:${header(h).trim()}\n`).join('');
    const canonicalRequest = [
      req.method,
      url.pathname,
      query,
      canonicalHeaders,
      signed.join(';'),
      sha256(payload),
    ].join('\n');
    const stringToSign = `ACS3-HMAC-SHA256\n${sha256(canonicalRequest)}`;
    const expected = createHmac('sha256', secret).update(stringToSign).digest('hex');
    if (!safeEqual(expected, signature)) {
      throw new Refusal(400, 'SignatureDoesNotMatch', 'Specified signature is not matched with our calculation.');
    }
    checkFresh(header('x-acs-signature-nonce'), header('x-acs-date'));
    return { accessKeyId, sts: viaSts };
  };

  const kubeconfig = (token: string, server: string) =>
    [
      'apiVersion: v1',
      'kind: Config',
      'clusters:',
      `- name: ${opts.clusterId}`,
      `  cluster: {server: "${server}", insecure-skip-tls-verify: true}`,
      'users:',
      `- name: ack-user`,
      `  user: {token: "${token}"}`,
      'contexts:',
      `- name: ack`,
      `  context: {cluster: ${opts.clusterId}, user: ack-user, namespace: default}`,
      'current-context: ack',
      '',
    ].join('\n');

  const cs = http.createServer(async (req, res) => {
    const payload = await body(req);
    const url = new URL(req.url ?? '/', 'http://stand-in');
    try {
      const m = /^\/k8s\/([^/]+)\/user_config$/.exec(url.pathname);
      if (req.method !== 'GET' || !m) throw new Refusal(404, 'InvalidAction.NotFound', 'Specified api is not found.');
      if (
        req.headers['x-acs-action'] !== 'DescribeClusterUserKubeconfig' ||
        req.headers['x-acs-version'] !== '2015-12-15'
      ) {
        throw new Refusal(400, 'InvalidAction', 'x-acs-action / x-acs-version do not name this API.');
      }
      const who = verifyAcs3(req, url, payload);
      if (decodeURIComponent(m[1]!) !== opts.clusterId)
        throw new Refusal(404, 'ErrorClusterNotFound', 'cluster not found');
      const minutes = Number(url.searchParams.get('TemporaryDurationMinutes') ?? 4320 * 60);
      const token = opts.tokens[nextToken++ % opts.tokens.length]!;
      issues.push({
        accessKeyId: who.accessKeyId,
        viaSecurityToken: who.sts,
        privateIpAddress: url.searchParams.get('PrivateIpAddress'),
        temporaryDurationMinutes: url.searchParams.get('TemporaryDurationMinutes'),
        token,
      });
      const expiration = new Date(Date.now() + (opts.kubeconfigLifetimeMs ?? minutes * 60_000));
      reply(res, 200, {
        config: kubeconfig(token, opts.apiServer),
        expiration: expiration.toISOString().replace(/\.\d+Z$/, 'Z'),
      });
    } catch (err) {
      const r = err instanceof Refusal ? err : new Refusal(500, 'InternalError', String(err));
      refusals.push({ api: 'cs', code: r.code });
      reply(res, r.status, { code: r.code, message: r.message, requestId: randomBytes(8).toString('hex') });
    }
  });

  // ---------------------------------------------------------------- STS (RPC signature, HTTPS)

  const tls = await selfSignedTls();
  const stsServer = https.createServer({ key: tls.key, cert: tls.cert }, async (req, res) => {
    const url = new URL(req.url ?? '/', 'https://stand-in');
    const form = new URLSearchParams((await body(req)).toString('utf8'));
    const params = new Map<string, string>([...url.searchParams.entries(), ...form.entries()]);
    try {
      if (req.method !== 'POST') throw new Refusal(400, 'InvalidParameter', 'POST only');
      if (params.get('Version') !== '2015-04-01')
        throw new Refusal(400, 'InvalidVersion', 'Specified parameter Version is not valid.');
      checkFresh(params.get('SignatureNonce') ?? randomBytes(8).toString('hex'), params.get('Timestamp'));
      const roleArn = params.get('RoleArn') ?? '';
      const role = opts.roles[roleArn];
      if (!role) throw new Refusal(404, 'EntityNotExist.Role', 'The role not exists.');
      const lifetimeMs = Number(params.get('DurationSeconds') ?? 3600) * 1000;
      let accessKeyId = '';
      if (params.get('Action') === 'AssumeRole') {
        accessKeyId = params.get('AccessKeyId') ?? '';
        const { secret } = secretFor(accessKeyId, params.get('SecurityToken'));
        if (params.get('SignatureMethod') !== 'HMAC-SHA1' || params.get('SignatureVersion') !== '1.0') {
          throw new Refusal(400, 'InvalidParameter.SignatureMethod', 'HMAC-SHA1 / 1.0 expected');
        }
        const canonical = [...params.entries()]
          .filter(([k]) => k !== 'Signature')
          .map(([k, v]) => [popEncode(k), popEncode(v)] as const)
          .sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0))
          .map(([k, v]) => `${k}=${v}`)
          .join('&');
        const stringToSign = `POST&${popEncode('/')}&${popEncode(canonical)}`;
        const expected = createHmac('sha1', `${secret}&`).update(stringToSign).digest('base64');
        if (!safeEqual(expected, params.get('Signature') ?? '')) {
          throw new Refusal(
            400,
            'SignatureDoesNotMatch',
            `Specified signature is not matched with our calculation. server string to sign is:${stringToSign}`,
          );
        }
      } else if (params.get('Action') === 'AssumeRoleWithOIDC') {
        if (!role.oidcProviderArn || params.get('OIDCProviderArn') !== role.oidcProviderArn) {
          throw new Refusal(400, 'AuthenticationFail.OIDCProvider', 'The OIDC provider may not assume this role.');
        }
        if (!role.oidcToken || !safeEqual(params.get('OIDCToken') ?? '', role.oidcToken)) {
          throw new Refusal(400, 'AuthenticationFail.OIDCToken.Invalid', 'The OIDC token is invalid.');
        }
        accessKeyId = 'oidc';
      } else {
        throw new Refusal(400, 'InvalidAction.NotFound', 'Specified api is not found.');
      }
      const issued = issueSts(lifetimeMs);
      stsIssues.push({ action: params.get('Action')!, accessKeyId, roleArn, issuedKeyId: issued.accessKeyId });
      reply(res, 200, {
        RequestId: randomBytes(8).toString('hex'),
        AssumedRoleUser: {
          Arn: `${roleArn}/${params.get('RoleSessionName')}`,
          AssumedRoleId: randomBytes(6).toString('hex'),
        },
        Credentials: {
          AccessKeyId: issued.accessKeyId,
          AccessKeySecret: issued.accessKeySecret,
          SecurityToken: issued.securityToken,
          Expiration: new Date(Date.now() + lifetimeMs).toISOString().replace(/\.\d+Z$/, 'Z'),
        },
      });
    } catch (err) {
      const r = err instanceof Refusal ? err : new Refusal(500, 'InternalError', String(err));
      refusals.push({ api: 'sts', code: r.code });
      reply(res, r.status, { RequestId: randomBytes(8).toString('hex'), Code: r.code, Message: r.message });
    }
  });

  const listen = (server: http.Server) =>
    new Promise<number>((resolve) =>
      server.listen(0, '127.0.0.1', () => resolve((server.address() as AddressInfo).port)),
    );
  const csPort = await listen(cs);
  const stsPort = await listen(stsServer);
  return {
    csEndpoint: `127.0.0.1:${csPort}`,
    stsEndpoint: `127.0.0.1:${stsPort}`,
    caPem: tls.ca,
    issues,
    stsIssues,
    refusals,
    issueSts,
    async close() {
      for (const s of [cs, stsServer]) {
        s.closeAllConnections();
        await new Promise((r) => s.close(r));
      }
    },
  };
}
