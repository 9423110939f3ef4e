// `torpor install`: deploy/ renders as kustomize would (namespace, images, the ACK overlay's patches), the CRDs in
// it are the ones generated from the schemas, and applying it to a real API server with RBAC enforced gives a
// controller identity that can run the pools it needs to and nothing more.
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { randomBytes, X509Certificate } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { promisify } from 'node:util';
import { renderCrds } from '../../../scripts/gen-crds.ts';
import { KubeController } from '../../../src/engine/k8s/controller.ts';
import { AGENT_TOKEN_SECRET, applyInstall, DEPLOY_DIR, renderInstall } from '../../../src/engine/k8s/install.ts';
import { Kube, type KubeError, kubeConfigFromString, resourcePath } from '../../../src/engine/k8s/kube.ts';
import { deploymentName } from '../../../src/engine/k8s/render.ts';
import { API_VERSION, type Condition, DRAIN_FINALIZER } from '../../../src/engine/k8s/resources.ts';
import { eventually, quietLog, type RunningKube, startKube } from './kube-helpers.ts';

const run = promisify(execFile);
const ROOT = join(import.meta.dirname, '..', '..', '..');

type Obj = { kind?: string; metadata?: { name?: string; namespace?: string }; [k: string]: unknown };
const find = (objects: Obj[], kind: string, name: string) =>
  objects.find((o) => o.kind === kind && o.metadata?.name === name);
const containerOf = (o: Obj | undefined) =>
  (o!.spec as { template: { spec: { containers: { image: string; args: string[] }[] } } }).template.spec.containers[0]!;

describe('deploy/ manifests', () => {
  it('holds the CRDs generated from the schemas (npm run gen:crds)', () => {
    assert.equal(readFileSync(join(DEPLOY_DIR, 'crds.yaml'), 'utf8'), renderCrds());
  });

  it('renders with the namespace and image given, secrets left out', async () => {
    const objects = await renderInstall({ dir: DEPLOY_DIR, namespace: 'agents', image: 'reg.example/torpor:2' });
    assert.equal(objects[0]!.kind, 'CustomResourceDefinition');
    assert.ok(find(objects, 'Namespace', 'agents'));
    for (const o of objects) {
      const clusterScoped = ['Namespace', 'CustomResourceDefinition', 'ClusterRole', 'ClusterRoleBinding'];
      if ([...clusterScoped, 'ValidatingWebhookConfiguration'].includes(o.kind ?? '')) continue;
      assert.equal(o.metadata?.namespace, 'agents', `${o.kind}/${o.metadata?.name}`);
    }
    assert.equal(containerOf(find(objects, 'Deployment', 'torpor-server')).image, 'reg.example/torpor:2');
    const controller = containerOf(find(objects, 'Deployment', 'torpor-controller'));
    assert.equal(controller.image, 'reg.example/torpor:2');
    assert.ok(controller.args.includes('--agent-image=reg.example/torpor:2'));
    assert.equal(containerOf(find(objects, 'Deployment', 'torpor-router')).image, 'reg.example/torpor:2');
    const binding = find(objects, 'ClusterRoleBinding', 'torpor-controller') as { subjects: { namespace: string }[] };
    assert.equal(binding.subjects[0]!.namespace, 'agents');
    assert.ok(find(objects, 'Service', 'torpor-router'));
    assert.ok(find(objects, 'StatefulSet', 'torpor-redis'));
    assert.ok(find(objects, 'WorkerPool', 'gvisor'));
    assert.ok(!objects.some((o) => o.kind === 'Secret'), 'no Secret in the manifests');
    const hook = find(objects, 'ValidatingWebhookConfiguration', 'torpor-template-immutable') as {
      metadata: { namespace?: string };
      webhooks: { clientConfig: { service: { name: string; namespace: string }; caBundle?: string } }[];
    };
    assert.equal(hook.metadata.namespace, undefined, 'cluster-scoped');
    assert.deepEqual(hook.webhooks[0]!.clientConfig.service.namespace, 'agents');
    assert.equal(hook.webhooks[0]!.clientConfig.caBundle, undefined, 'the CA is made at install');
    assert.ok(find(objects, 'Service', 'torpor-webhook'));
  });

  it('the ACK overlay puts worker pods on virtual nodes and the router behind an internal SLB', async () => {
    const objects = await renderInstall({ dir: join(DEPLOY_DIR, 'ack') });
    const args = containerOf(find(objects, 'Deployment', 'torpor-controller')).args;
    assert.ok(args.includes('--pool-node-selector=type=virtual-kubelet'));
    assert.ok(args.includes('--pool-toleration=virtual-kubelet.io/provider=alibabacloud:NoSchedule'));
    const svc = find(objects, 'Service', 'torpor-router') as { metadata: { annotations: Record<string, string> } };
    assert.equal(
      svc.metadata.annotations['service.beta.kubernetes.io/alibaba-cloud-loadbalancer-address-type'],
      'intranet',
    );
  });

  it('torpor install --dry-run prints the manifests and no token', async () => {
    const { stdout } = await run(process.execPath, [
      join(ROOT, 'bin/torpor.js'),
      'install',
      '--dry-run',
      '--engine',
      'k8s',
    ]);
    assert.match(stdout, /kind: CustomResourceDefinition/);
    assert.match(stdout, /kind: WorkerPool/);
    assert.doesNotMatch(stdout, /kind: Secret/);
  });
});

// The controller's identity: the torpor-controller ServiceAccount, as the API server's RBAC sees it.
const controllerToken = randomBytes(24).toString('hex');
const started = await startKube({
  rbac: true,
  extraTokens: [
    `${controllerToken},system:serviceaccount:torpor:torpor-controller,sa-uid,"system:serviceaccounts,system:serviceaccounts:torpor"`,
  ],
});
const skip = typeof started === 'string' ? started : false;
const k = typeof started === 'string' ? undefined : started;

describe('torpor install on a real API server (RBAC enforced)', { skip }, () => {
  let asController: Kube;
  before(() => {
    const server = (k as RunningKube).server;
    asController = new Kube(
      kubeConfigFromString(
        [
          'apiVersion: v1',
          'kind: Config',
          `clusters: [{name: c, cluster: {server: "${server}", insecure-skip-tls-verify: true}}]`,
          `users: [{name: u, user: {token: "${controllerToken}"}}]`,
          'contexts: [{name: x, context: {cluster: c, user: u, namespace: torpor}}]',
          'current-context: x',
        ].join('\n'),
      ),
    );
  });
  after(async () => {
    await k?.stop();
  });

  it('applies everything, creates the token Secret once, and is idempotent', async () => {
    const kube = k!.kube;
    const objects = await renderInstall({ dir: DEPLOY_DIR });
    await applyInstall(kube, objects, quietLog());
    const secretPath = resourcePath('v1', 'secrets', 'torpor', AGENT_TOKEN_SECRET);
    const secret = await kube.get<{ data: { token: string } }>(secretPath);
    assert.ok(secret && Buffer.from(secret.data.token, 'base64').length >= 32);
    const tlsPath = resourcePath('v1', 'secrets', 'torpor', 'torpor-webhook-tls');
    const tls = await kube.get<{ data: Record<string, string> }>(tlsPath);
    assert.ok(tls, 'the webhook certificate Secret');
    const hookPath = '/apis/admissionregistration.k8s.io/v1/validatingwebhookconfigurations/torpor-template-immutable';
    const hook = await kube.get<{ webhooks: { clientConfig: { caBundle: string } }[] }>(hookPath);
    assert.equal(hook?.webhooks[0]?.clientConfig.caBundle, tls.data['ca.crt'], 'the caBundle is the Secret’s CA');
    const ca = new X509Certificate(Buffer.from(tls.data['ca.crt']!, 'base64'));
    const cert = new X509Certificate(Buffer.from(tls.data['tls.crt']!, 'base64'));
    assert.ok(cert.verify(ca.publicKey), 'the serving certificate is signed by that CA');
    assert.equal(cert.checkHost('torpor-webhook.torpor.svc'), 'torpor-webhook.torpor.svc');
    await applyInstall(kube, objects, quietLog());
    assert.equal((await kube.get<{ data: { token: string } }>(secretPath))?.data.token, secret.data.token);
    assert.equal(
      (await kube.get<{ data: Record<string, string> }>(tlsPath))?.data['tls.crt'],
      tls.data['tls.crt'],
      'the certificate is kept',
    );
    assert.equal(
      (await kube.get<{ webhooks: { clientConfig: { caBundle: string } }[] }>(hookPath))?.webhooks[0]?.clientConfig
        .caBundle,
      tls.data['ca.crt'],
    );
    for (const o of objects) {
      const ns = o.metadata?.namespace;
      const plural = { Deployment: 'deployments', Service: 'services', StatefulSet: 'statefulsets' }[o.kind ?? ''];
      if (plural) {
        const api = o.kind === 'Service' ? 'v1' : 'apps/v1';
        assert.ok(await kube.get(resourcePath(api, plural, ns, o.metadata!.name)), `${o.kind}/${o.metadata!.name}`);
      }
    }
  });

  it("the controller's role is enough to run the sample pool, and no more", async () => {
    const controller = new KubeController({
      kube: asController,
      agent: {
        serverUrl: 'http://torpor-server.torpor.svc:7070',
        image: 'torpor:latest',
        tokenSecret: AGENT_TOKEN_SECRET,
        blobUrl: 's3://torpor/snapshots',
      },
      pools: { readyWorkers: async () => 0, drain: async () => 0 },
      templates: { applyTemplate: async () => ({ created: true }) },
      log: quietLog(),
    });
    await controller.start();
    try {
      const pool = await eventually(
        async () => {
          const p = await k!.kube.get<{ metadata: { finalizers?: string[] }; status?: { conditions?: Condition[] } }>(
            resourcePath(API_VERSION, 'workerpools', 'torpor', 'gvisor'),
          );
          return p?.status?.conditions?.some((c) => c.type === 'Valid' && c.status === 'True') ? p : undefined;
        },
        20_000,
        'sample pool valid',
      );
      assert.deepEqual(pool.metadata.finalizers, [DRAIN_FINALIZER]);
      assert.ok(await k!.kube.get(resourcePath('apps/v1', 'deployments', 'torpor', deploymentName('gvisor'))));
      // Least privilege: the controller may read the token Secret and nothing else of the kind, nor touch RBAC.
      for (const [method, path] of [
        ['GET', resourcePath('v1', 'secrets', 'torpor')],
        ['GET', resourcePath('v1', 'secrets', 'torpor', 'torpor-blob')],
        ['GET', resourcePath('v1', 'configmaps', 'torpor')],
        ['GET', '/apis/rbac.authorization.k8s.io/v1/clusterroles'],
      ] as const) {
        await assert.rejects(asController.request(method, path), (e: KubeError) => e.kubeStatus === 403, path);
      }
      // Deleting the pool with the controller's identity completes: drain, Deployment removed, finalizer released.
      await k!.kube.request('DELETE', resourcePath(API_VERSION, 'workerpools', 'torpor', 'gvisor'));
      await eventually(
        async () =>
          (await k!.kube.get(resourcePath(API_VERSION, 'workerpools', 'torpor', 'gvisor'))) ? undefined : true,
        20_000,
        'pool deleted',
      );
      assert.equal(
        await k!.kube.get(resourcePath('apps/v1', 'deployments', 'torpor', deploymentName('gvisor'))),
        undefined,
      );
    } finally {
      await controller.stop();
    }
  });
});
