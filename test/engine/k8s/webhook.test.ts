// Template immutability on an API server < 1.25 (ours is 1.20): the CRD's `self == oldSelf` rule is not enforced
// there, so the controller's validating admission webhook refuses a change of a Template's spec. Against the real
// kube-apiserver, which calls the webhook on loopback over TLS with a CA generated as `torpor install` does.
import assert from 'node:assert/strict';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { pino } from 'pino';
import { KubeError, resourcePath } from '../../../src/engine/k8s/kube.ts';
import { API_VERSION } from '../../../src/engine/k8s/resources.ts';
import {
  generateWebhookCertificates,
  type RunningWebhook,
  reviewTemplate,
  serveWebhook,
  TEMPLATE_WEBHOOK_PATH,
} from '../../../src/engine/k8s/webhook.ts';
import { eventually, installCrds, type RunningKube, startKube } from './kube-helpers.ts';

const NS = 'default';
const WEBHOOKS = '/apis/admissionregistration.k8s.io/v1/validatingwebhookconfigurations';

const review = (operation: string, kind: string, spec: unknown, oldSpec: unknown, apiVersion = 'admission.k8s.io/v1') =>
  reviewTemplate({
    apiVersion,
    kind: 'AdmissionReview',
    request: {
      uid: 'u-1',
      kind: { group: 'torpor.dev', kind },
      operation,
      name: 't',
      namespace: NS,
      object: { spec },
      oldObject: { spec: oldSpec },
    },
  }) as { apiVersion: string; response: { uid: string; allowed: boolean; status?: { message: string } } };

describe('template admission review', () => {
  it('refuses an UPDATE that changes a Template spec, naming the template', () => {
    const r = review('UPDATE', 'Template', { port: 8081 }, { port: 8080 });
    assert.equal(r.response.uid, 'u-1');
    assert.equal(r.response.allowed, false);
    assert.match(r.response.status?.message ?? '', /Template default\/t: spec is immutable/);
  });

  it('allows the same spec (metadata changes), creates, and other kinds; answers in the request’s version', () => {
    assert.equal(review('UPDATE', 'Template', { port: 8080, env: {} }, { env: {}, port: 8080 }).response.allowed, true);
    assert.equal(review('CREATE', 'Template', { port: 8080 }, undefined).response.allowed, true);
    assert.equal(review('UPDATE', 'WorkerPool', { replicas: 2 }, { replicas: 1 }).response.allowed, true);
    const beta = review('UPDATE', 'Template', { port: 1 }, { port: 2 }, 'admission.k8s.io/v1beta1');
    assert.equal(beta.apiVersion, 'admission.k8s.io/v1beta1');
  });
});

const started = await startKube();
const skip = typeof started === 'string' ? started : false;
const k = typeof started === 'string' ? undefined : started;

describe('template admission webhook (real kube-apiserver 1.20)', { skip }, () => {
  const kube = () => (k as RunningKube).kube;
  let dir: string;
  let webhook: RunningWebhook | undefined;
  const template = (name: string, port: number) => ({
    apiVersion: API_VERSION,
    kind: 'Template',
    metadata: { name },
    spec: { image: 'registry.example/counter:1', port, readiness: { path: '/healthz' } },
  });
  const changePort = (name: string, port: number) =>
    kube().request('PATCH', resourcePath(API_VERSION, 'templates', NS, name), {
      body: { spec: { port } },
      patch: 'merge',
    });

  before(async () => {
    dir = await mkdtemp(join(tmpdir(), 'torpor-webhook-test-'));
    await installCrds(kube());
  });
  after(async () => {
    await webhook?.close();
    await k?.stop();
    await rm(dir, { recursive: true, force: true });
  });

  it('without the webhook, this API server lets a Template spec change (the CRD rule is not enforced)', async () => {
    await kube().request('POST', resourcePath(API_VERSION, 'templates', NS), { body: template('before', 8080) });
    await changePort('before', 9090);
    const got = await kube().get<{ spec: { port: number } }>(resourcePath(API_VERSION, 'templates', NS, 'before'));
    assert.equal(got?.spec.port, 9090);
  });

  it('with it, a spec change is refused with the reason, and metadata still changes', async () => {
    const certs = await generateWebhookCertificates(['127.0.0.1']);
    await writeFile(join(dir, 'tls.crt'), certs.cert);
    await writeFile(join(dir, 'tls.key'), certs.key, { mode: 0o600 });
    webhook = await serveWebhook({ listen: '127.0.0.1:0', certDir: dir, log: pino({ level: 'silent' }) });
    await kube().request('POST', WEBHOOKS, {
      body: {
        apiVersion: 'admissionregistration.k8s.io/v1',
        kind: 'ValidatingWebhookConfiguration',
        metadata: { name: 'torpor-template-immutable' },
        webhooks: [
          {
            name: 'templates.torpor.dev',
            clientConfig: {
              url: `${webhook.url}${TEMPLATE_WEBHOOK_PATH}`,
              caBundle: Buffer.from(certs.ca).toString('base64'),
            },
            rules: [
              {
                apiGroups: ['torpor.dev'],
                apiVersions: ['*'],
                operations: ['UPDATE'],
                resources: ['templates'],
              },
            ],
            failurePolicy: 'Fail',
            sideEffects: 'None',
            admissionReviewVersions: ['v1', 'v1beta1'],
          },
        ],
      },
    });
    await kube().request('POST', resourcePath(API_VERSION, 'templates', NS), { body: template('fixed', 8080) });
    // The API server picks the configuration up within a moment (a change let through before that is no failure).
    let attempt = 9000;
    const refused = await eventually(
      async () => {
        try {
          await changePort('fixed', ++attempt);
          return undefined;
        } catch (err) {
          return err;
        }
      },
      15_000,
      'the webhook refusing a spec change',
    );
    assert.ok(refused instanceof KubeError, String(refused));
    assert.match(refused.message, /spec is immutable/);
    assert.match(refused.message, /Template default\/fixed/);
    const got = await kube().get<{ spec: { port: number } }>(resourcePath(API_VERSION, 'templates', NS, 'fixed'));
    assert.notEqual(got?.spec.port, attempt, 'the refused change was not made');
    // Refused every time from now on.
    await assert.rejects(changePort('fixed', 7000), /spec is immutable/);
    await kube().request('PATCH', resourcePath(API_VERSION, 'templates', NS, 'fixed'), {
      body: { metadata: { labels: { team: 'a' } } },
      patch: 'merge',
    });
    const labelled = await kube().get<{ metadata: { labels?: Record<string, string> } }>(
      resourcePath(API_VERSION, 'templates', NS, 'fixed'),
    );
    assert.equal(labelled?.metadata.labels?.team, 'a');
  });
});
