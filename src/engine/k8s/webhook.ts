// Template immutability for API servers older than 1.25, which do not enforce the CRD's `self == oldSelf` rule
// (x-kubernetes-validations): a validating admission webhook, served by the controller over TLS, refuses an UPDATE
// that changes a Template's spec (metadata, labels and status may change). `torpor install` generates the webhook's
// CA and serving certificate (the CA goes into the ValidatingWebhookConfiguration's caBundle, both into the Secret
// torpor-webhook-tls the controller mounts).
import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { createServer, type Server } from 'node:https';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { isDeepStrictEqual } from 'node:util';
import type { Logger } from 'pino';
import { TorporError } from '../../core/errors.ts';
import { run } from '../../sys/run.ts';
import { GROUP } from './resources.ts';

/** The path the API server posts Template admission reviews to. */
export const TEMPLATE_WEBHOOK_PATH = '/validate-template';
/** The Secret holding the webhook's certificate (tls.crt, tls.key) and its CA (ca.crt). */
export const WEBHOOK_SECRET = 'torpor-webhook-tls';

interface AdmissionRequest {
  uid: string;
  kind?: { group?: string; kind?: string };
  operation?: string;
  name?: string;
  namespace?: string;
  object?: { spec?: unknown };
  oldObject?: { spec?: unknown };
}

interface AdmissionReview {
  apiVersion?: string;
  kind?: string;
  request?: AdmissionRequest;
}

/** The answer to one AdmissionReview (v1 or v1beta1: the reply speaks the request's version). */
export function reviewTemplate(review: AdmissionReview): object {
  const req = review.request;
  if (!req?.uid) {
    throw new TorporError('INVALID_ARGUMENT', 'not an AdmissionReview: request.uid is missing', { field: 'request' });
  }
  const template = req.kind?.group === GROUP && req.kind.kind === 'Template';
  const changed = req.operation === 'UPDATE' && !isDeepStrictEqual(req.object?.spec, req.oldObject?.spec);
  const refused = template && changed;
  return {
    apiVersion: review.apiVersion ?? 'admission.k8s.io/v1',
    kind: 'AdmissionReview',
    response: {
      uid: req.uid,
      allowed: !refused,
      ...(refused
        ? {
            status: {
              code: 422,
              reason: 'Invalid',
              message:
                `Template ${req.namespace}/${req.name}: spec is immutable (snapshots were made from it); create a ` +
                'Template under a new name instead',
            },
          }
        : {}),
    },
  };
}

export interface WebhookOptions {
  /** ADDRESS:PORT to listen on (port 0: any free one). */
  listen: string;
  /** Directory with tls.crt and tls.key (a mounted torpor-webhook-tls Secret). */
  certDir: string;
  log: Logger;
}

export interface RunningWebhook {
  /** https://ADDRESS:PORT */
  url: string;
  close(): Promise<void>;
}

/** Serves the Template admission webhook over TLS. */
export async function serveWebhook(o: WebhookOptions): Promise<RunningWebhook> {
  const i = o.listen.lastIndexOf(':');
  const host = o.listen.slice(0, i);
  const port = Number(o.listen.slice(i + 1));
  if (i <= 0 || !Number.isInteger(port) || port < 0 || port > 65535) {
    throw new TorporError('INVALID_ARGUMENT', `--webhook-listen must be ADDRESS:PORT, got "${o.listen}"`, {
      field: 'webhook-listen',
    });
  }
  const [cert, key] = await Promise.all([
    readFile(join(o.certDir, 'tls.crt'), 'utf8'),
    readFile(join(o.certDir, 'tls.key'), 'utf8'),
  ]).catch((err: NodeJS.ErrnoException) => {
    throw new TorporError('INVALID_ARGUMENT', `cannot read tls.crt and tls.key in ${o.certDir}: ${err.code}`, {
      field: 'webhook-cert-dir',
    });
  });
  const server: Server = createServer({ cert, key }, (req, res) => {
    if (req.method !== 'POST' || req.url?.split('?')[0] !== TEMPLATE_WEBHOOK_PATH) {
      res.writeHead(404).end();
      return;
    }
    const chunks: Buffer[] = [];
    let size = 0;
    req.on('data', (c: Buffer) => {
      size += c.length;
      if (size <= 4 << 20) chunks.push(c);
    });
    req.on('end', () => {
      try {
        if (size > 4 << 20) throw new TorporError('INVALID_ARGUMENT', 'admission review too large', { field: 'body' });
        const answer = reviewTemplate(JSON.parse(Buffer.concat(chunks).toString('utf8')) as AdmissionReview);
        const allowed = (answer as { response: { allowed: boolean } }).response.allowed;
        if (!allowed) o.log.info({ webhook: 'template' }, 'refused a change of a Template spec');
        res.writeHead(200, { 'content-type': 'application/json' }).end(JSON.stringify(answer));
      } catch (err) {
        res.writeHead(400, { 'content-type': 'text/plain' }).end((err as Error).message);
      }
    });
  });
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(port, host, resolve);
  });
  const bound = (server.address() as { port: number }).port;
  o.log.info({ listen: `${host}:${bound}` }, 'template admission webhook serving');
  return {
    url: `https://${host.includes(':') ? `[${host}]` : host}:${bound}`,
    close: () => new Promise((resolve) => server.close(() => resolve())),
  };
}

export interface WebhookCertificates {
  /** PEM: the CA (the webhook configuration's caBundle, base64-encoded). */
  ca: string;
  /** PEM: the serving certificate (signed by the CA) and its key. */
  cert: string;
  key: string;
}

/** A fresh CA and a serving certificate for `names` (DNS names, or IPv4 addresses) signed by it, with openssl. The
 * CA's key is thrown away: nothing else is ever signed with it. */
export async function generateWebhookCertificates(names: string[], days = 3650): Promise<WebhookCertificates> {
  const dir = await mkdtemp(join(tmpdir(), 'torpor-webhook-'));
  try {
    const ec = ['-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes'];
    await run('openssl', [
      ...['req', '-x509', ...ec, '-keyout', join(dir, 'ca.key'), '-out', join(dir, 'ca.crt')],
      ...['-days', String(days), '-subj', '/CN=torpor-webhook-ca'],
    ]);
    await run('openssl', [
      ...['req', ...ec, '-keyout', join(dir, 'tls.key'), '-out', join(dir, 'tls.csr')],
      ...['-subj', `/CN=${names[0] ?? 'torpor-webhook'}`],
    ]);
    const san = names.map((n) => (/^\d+\.\d+\.\d+\.\d+$/.test(n) ? `IP:${n}` : `DNS:${n}`)).join(',');
    await writeFile(join(dir, 'ext.cnf'), `subjectAltName=${san}\nextendedKeyUsage=serverAuth\n`);
    await run('openssl', [
      ...['x509', '-req', '-in', join(dir, 'tls.csr'), '-CA', join(dir, 'ca.crt'), '-CAkey', join(dir, 'ca.key')],
      ...['-CAcreateserial', '-out', join(dir, 'tls.crt'), '-days', String(days), '-extfile', join(dir, 'ext.cnf')],
    ]);
    const [ca, cert, key] = await Promise.all(
      ['ca.crt', 'tls.crt', 'tls.key'].map((f) => readFile(join(dir, f), 'utf8')),
    );
    return { ca: ca!, cert: cert!, key: key! };
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}
