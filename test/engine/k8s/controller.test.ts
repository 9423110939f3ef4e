// The Kubernetes engine against a real kube-apiserver (no kubelet: pods never run): the CRDs install and validate,
// WorkerPools reconcile into Deployments of the right shape per runtime class, /scale works, status reports
// invalid pools, Template changes are refused, and a deleted pool is drained before its Deployment goes.
import assert from 'node:assert/strict';
import { copyFile, mkdir, mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Writable } from 'node:stream';
import { after, before, describe, it } from 'node:test';
import { pino } from 'pino';
import { KubeController, type PoolControl, type TemplateSink } from '../../../src/engine/k8s/controller.ts';
import { Kube, KubeError, loadKubeConfig, resourcePath } from '../../../src/engine/k8s/kube.ts';
import { deploymentName } from '../../../src/engine/k8s/render.ts';
import { API_VERSION, type Condition, DRAIN_FINALIZER } from '../../../src/engine/k8s/resources.ts';
import { eventually, installCrds, type RunningKube, startKube } from './kube-helpers.ts';

const started = await startKube();
const skip = typeof started === 'string' ? started : false;
const k = typeof started === 'string' ? undefined : started;
const NS = 'default';

const pools = (name?: string) => resourcePath(API_VERSION, 'workerpools', NS, name);
const templates = (name?: string) => resourcePath(API_VERSION, 'templates', NS, name);
const deployments = (name?: string) => resourcePath('apps/v1', 'deployments', NS, name);

interface Deployment {
  spec: {
    replicas: number;
    template: {
      metadata: { labels: Record<string, string> };
      spec: {
        nodeSelector?: Record<string, string>;
        tolerations?: { key?: string; operator?: string; value?: string; effect?: string }[];
        priorityClassName?: string;
        affinity?: unknown;
        automountServiceAccountToken?: boolean;
        volumes: { name: string; hostPath?: { path: string; type: string } }[];
        containers: {
          command: string[];
          env: { name: string; value?: string; valueFrom?: { secretKeyRef?: { name: string; key: string } } }[];
          envFrom?: unknown;
          securityContext: { privileged: boolean };
          resources?: unknown;
          volumeMounts: { name: string; mountPath: string }[];
        }[];
      };
    };
  };
}

/** What the control plane answers about pools: drain counts down as the test says. */
class TestPools implements PoolControl {
  drainCalls: string[][] = [];
  remaining = 0;
  async readyWorkers(): Promise<number> {
    return 0;
  }
  async drain(nodes: string[]): Promise<number> {
    this.drainCalls.push(nodes);
    return this.remaining;
  }
}

class TestTemplates implements TemplateSink {
  applied: Record<string, unknown>[] = [];
  async applyTemplate(input: unknown) {
    const created = !this.applied.some((t) => t.name === (input as { name: string }).name);
    this.applied.push(input as Record<string, unknown>);
    return { created };
  }
}

const logLines: string[] = [];
const BOOTSTRAP_TOKEN = 'bootstrap-token-for-tests';
const testPools = new TestPools();
const testTemplates = new TestTemplates();
let controller: KubeController | undefined;

function pool(name: string, spec: Record<string, unknown>) {
  return { apiVersion: API_VERSION, kind: 'WorkerPool', metadata: { name, namespace: NS }, spec };
}

async function create(kube: Kube, path: string, body: object): Promise<void> {
  await kube.request('POST', path, { body });
}

async function rejected(fn: () => Promise<unknown>): Promise<KubeError> {
  try {
    await fn();
  } catch (err) {
    assert.ok(err instanceof KubeError, String(err));
    return err;
  }
  assert.fail('the API server accepted it');
}

const conditionOf = (obj: { status?: { conditions?: Condition[] } } | undefined, type: string) =>
  obj?.status?.conditions?.find((c) => c.type === type);

describe('kubernetes engine (real kube-apiserver)', { skip }, () => {
  const kube = () => (k as RunningKube).kube;

  before(async () => {
    await installCrds(kube());
    await create(kube(), resourcePath('v1', 'secrets', NS), {
      apiVersion: 'v1',
      kind: 'Secret',
      metadata: { name: 'torpor-agent-token' },
      stringData: { token: BOOTSTRAP_TOKEN },
    });
    controller = new KubeController({
      kube: kube(),
      namespace: NS,
      agent: {
        serverUrl: 'http://torpor-server.torpor.svc:7070',
        image: 'torpor/torpor:test',
        tokenSecret: 'torpor-agent-token',
        blobUrl: 's3://torpor/snapshots?endpoint=http://minio:9000',
        blobSecret: 'torpor-blob',
      },
      pools: testPools,
      templates: testTemplates,
      log: pino(
        { level: 'debug' },
        new Writable({
          write(chunk, _enc, cb) {
            logLines.push(String(chunk));
            cb();
          },
        }),
      ),
      resyncMs: 500,
      drainRetryMs: 200,
    });
    await controller.start();
  });

  after(async () => {
    await controller?.stop();
    await k?.stop();
  });

  it('refuses bad specs at the API server, naming the field', async () => {
    const bad = [
      [pool('bad-replicas', { runtime: 'gvisor', replicas: -1 }), 'spec.replicas'],
      [pool('bad-runtime', { runtime: 'docker' }), 'spec.runtime'],
      [pool('bad-missing', {}), 'spec.runtime'],
      [pool('bad-workers', { runtime: 'gvisor', workersPerPod: 100 }), 'spec.workersPerPod'],
    ] as const;
    for (const [body, field] of bad) {
      const err = await rejected(() => create(kube(), pools(), body));
      assert.equal(err.kubeStatus, 422);
      assert.match(err.message, new RegExp(field.replace('.', '\\.')), err.message);
    }
    const badTemplate = {
      apiVersion: API_VERSION,
      kind: 'Template',
      metadata: { name: 'bad-port', namespace: NS },
      spec: { image: 'counter', port: 70000 },
    };
    const err = await rejected(() => create(kube(), templates(), badTemplate));
    assert.match(err.message, /spec\.port/);
    const noImage = { ...badTemplate, metadata: { name: 'no-image', namespace: NS }, spec: { port: 8080 } };
    assert.match((await rejected(() => create(kube(), templates(), noImage))).message, /spec\.image/);
    // Nothing was stored.
    assert.equal((await kube().request<{ items: unknown[] }>('GET', pools())).items.length, 0);
  });

  it('reconciles a gVisor pool into a Deployment of agent pods', async () => {
    await create(
      kube(),
      pools(),
      pool('small', {
        runtime: 'gvisor',
        replicas: 2,
        workersPerPod: 3,
        podTemplate: {
          nodeSelector: { 'pool.example/tier': 'agents' },
          tolerations: [{ key: 'dedicated', operator: 'Equal', value: 'torpor', effect: 'NoSchedule' }],
          affinity: {
            nodeAffinity: {
              requiredDuringSchedulingIgnoredDuringExecution: {
                nodeSelectorTerms: [{ matchExpressions: [{ key: 'zone', operator: 'In', values: ['a'] }] }],
              },
            },
          },
          resources: { requests: { cpu: '500m', memory: '1Gi' }, limits: { memory: '2Gi' } },
        },
      }),
    );
    const d = await eventually(
      () => kube().get<Deployment>(deployments(deploymentName('small'))),
      15_000,
      'deployment',
    );
    assert.equal(d.spec.replicas, 2);
    const podSpec = d.spec.template.spec;
    const c = podSpec.containers[0]!;
    assert.deepEqual(c.command.slice(0, 4), ['torpor', 'agent', '--server', 'http://torpor-server.torpor.svc:7070']);
    const flag = (name: string) => c.command[c.command.indexOf(name) + 1];
    assert.equal(flag('--workers'), '3');
    assert.equal(flag('--node'), '$(POD_NAME)');
    assert.equal(flag('--listen'), '$(POD_IP):7071');
    assert.equal(flag('--blob'), 's3://torpor/snapshots?endpoint=http://minio:9000');
    assert.ok(!JSON.stringify(d).includes(BOOTSTRAP_TOKEN), 'the token is not in the Deployment, only its Secret');
    assert.deepEqual(c.envFrom, [{ secretRef: { name: 'torpor-blob', optional: true } }]);
    assert.equal(c.env.find((e) => e.name === 'TORPOR_RUNTIME')?.value, 'gvisor');
    const token = c.env.find((e) => e.name === 'TORPOR_AGENT_TOKEN');
    assert.deepEqual(token?.valueFrom?.secretKeyRef, { name: 'torpor-agent-token', key: 'token' });
    assert.equal(c.securityContext.privileged, true);
    assert.equal(podSpec.automountServiceAccountToken, false);
    // gVisor needs neither /dev/kvm nor micro-VM nodes.
    assert.ok(!podSpec.volumes.some((v) => v.hostPath?.path === '/dev/kvm'));
    assert.ok(!c.volumeMounts.some((m) => m.mountPath === '/dev/kvm'));
    assert.deepEqual(podSpec.nodeSelector, { 'pool.example/tier': 'agents' });
    assert.deepEqual(podSpec.tolerations, [
      { key: 'dedicated', operator: 'Equal', value: 'torpor', effect: 'NoSchedule' },
    ]);
    assert.ok(podSpec.affinity);
    assert.deepEqual(c.resources, { requests: { cpu: '500m', memory: '1Gi' }, limits: { memory: '2Gi' } });
    assert.equal(d.spec.template.metadata.labels['torpor.dev/pool'], 'small');

    const p = await eventually(async () => {
      const got = await kube().get<{
        status?: { selector?: string; conditions?: Condition[] };
        metadata: { finalizers?: string[] };
      }>(pools('small'));
      return conditionOf(got, 'Valid')?.status === 'True' ? got : undefined;
    });
    assert.deepEqual(p.metadata.finalizers, [DRAIN_FINALIZER]);
    assert.equal(p.status?.selector, 'app.kubernetes.io/name=torpor-agent,torpor.dev/pool=small');
    assert.equal(conditionOf(p, 'Available')?.status, 'False');
    assert.equal(conditionOf(p, 'Available')?.reason, 'WaitingForPods');
  });

  it('reconciles a micro-VM pool with /dev/kvm, pinned to micro-VM nodes', async () => {
    await create(kube(), pools(), pool('vms', { runtime: 'microvm', replicas: 1 }));
    const d = await eventually(() => kube().get<Deployment>(deployments(deploymentName('vms'))), 15_000, 'deployment');
    const podSpec = d.spec.template.spec;
    const c = podSpec.containers[0]!;
    assert.deepEqual(
      podSpec.volumes.find((v) => v.name === 'kvm'),
      { name: 'kvm', hostPath: { path: '/dev/kvm', type: 'CharDevice' } },
    );
    assert.ok(c.volumeMounts.some((m) => m.name === 'kvm' && m.mountPath === '/dev/kvm'));
    assert.deepEqual(podSpec.nodeSelector, { 'torpor.dev/runtime': 'microvm' });
    assert.deepEqual(podSpec.tolerations, [
      { key: 'torpor.dev/runtime', operator: 'Equal', value: 'microvm', effect: 'NoSchedule' },
    ]);
    assert.equal(c.env.find((e) => e.name === 'TORPOR_RUNTIME')?.value, 'microvm');
  });

  it('scales through the /scale subresource', async () => {
    const scale = await kube().request<{ spec: { replicas: number }; status: { selector?: string } }>(
      'GET',
      `${pools('small')}/scale`,
    );
    assert.equal(scale.spec.replicas, 2);
    assert.equal(scale.status.selector, 'app.kubernetes.io/name=torpor-agent,torpor.dev/pool=small');
    await kube().request('PATCH', `${pools('small')}/scale`, { body: { spec: { replicas: 4 } }, patch: 'merge' });
    const got = await kube().get<{ spec: { replicas: number } }>(pools('small'));
    assert.equal(got?.spec.replicas, 4);
    await eventually(
      async () => {
        const d = await kube().get<Deployment>(deployments(deploymentName('small')));
        return d?.spec.replicas === 4 ? d : undefined;
      },
      15_000,
      'deployment scaled to 4',
    );
  });

  it('reports what the schema cannot say in status conditions, and changes nothing', async () => {
    const cases = [
      [
        'bad-toleration',
        { runtime: 'gvisor', podTemplate: { tolerations: [{ key: 'x', operator: 'Exists', value: 'y' }] } },
        'InvalidSpec',
        /spec\.podTemplate\.tolerations\.0\.value/,
      ],
      [
        'bad-priority',
        { runtime: 'gvisor', podTemplate: { priorityClassName: 'no-such-class' } },
        'InvalidSpec',
        /spec\.podTemplate\.priorityClassName.*no-such-class/,
      ],
      [
        'bad-affinity',
        {
          runtime: 'gvisor',
          podTemplate: {
            affinity: {
              nodeAffinity: {
                requiredDuringSchedulingIgnoredDuringExecution: {
                  nodeSelectorTerms: [{ matchExpressions: [{ key: 'zone', operator: 'Near', values: ['a'] }] }],
                },
              },
            },
          },
        },
        'InvalidPodTemplate',
        /affinity.*operator/,
      ],
    ] as const;
    for (const [name, spec] of cases) await create(kube(), pools(), pool(name, spec));
    for (const [name, , reason, message] of cases) {
      const valid = await eventually(async () => conditionOf(await kube().get(pools(name)), 'Valid'), 15_000, name);
      assert.equal(valid.status, 'False', name);
      assert.equal(valid.reason, reason, name);
      assert.match(valid.message, message);
      assert.equal(await kube().get(deployments(deploymentName(name))), undefined, `${name}: no Deployment`);
    }
    // Fixing the spec makes the pool valid and creates its Deployment.
    await kube().request('PATCH', pools('bad-toleration'), {
      body: { spec: { podTemplate: { tolerations: [{ key: 'x', operator: 'Exists' }] } } },
      patch: 'merge',
    });
    await eventually(() => kube().get(deployments(deploymentName('bad-toleration'))), 15_000, 'deployment after fix');
  });

  it('validates AssetSets (schema at the API server, per-class names in status) and renders a pool’s set', async () => {
    const sha = 'a'.repeat(64);
    const assetSets = (name?: string) => resourcePath(API_VERSION, 'assetsets', undefined, name);
    const badHash = {
      apiVersion: API_VERSION,
      kind: 'AssetSet',
      metadata: { name: 'bad-hash' },
      spec: {
        sets: [{ runtime: 'gvisor', arch: 'amd64', assets: { runsc: { url: 'https://x/runsc', sha256: 'nope' } } }],
      },
    };
    assert.match(
      (await rejected(() => create(kube(), assetSets(), badHash))).message,
      /spec\.sets(\[0\])?\.assets\.runsc\.sha256/,
    );
    // A micro-VM set without its kernel: only the controller can tell.
    await create(kube(), assetSets(), {
      ...badHash,
      metadata: { name: 'vm-no-kernel' },
      spec: {
        sets: [
          {
            runtime: 'microvm',
            arch: 'amd64',
            assets: { initrd: { url: 'https://x/i', sha256: sha }, qemu: { url: 'https://x/q', sha256: sha } },
          },
        ],
      },
    });
    const invalid = await eventually(async () => conditionOf(await kube().get(assetSets('vm-no-kernel')), 'Valid'));
    assert.equal(invalid.status, 'False');
    assert.match(invalid.message, /microvm needs the asset "kernel"/);

    await create(kube(), pools(), pool('pinned', { runtime: 'gvisor', assetSet: 'runsc-2024' }));
    const missing = await eventually(async () => conditionOf(await kube().get(pools('pinned')), 'Valid'));
    assert.equal(missing.status, 'False');
    assert.match(missing.message, /spec\.assetSet: AssetSet "runsc-2024" does not exist/);
    const set = {
      runtime: 'gvisor',
      arch: 'amd64',
      assets: { runsc: { url: 'https://assets.example/runsc', sha256: sha } },
    };
    await create(kube(), assetSets(), { ...badHash, metadata: { name: 'runsc-2024' }, spec: { sets: [set] } });
    const d = await eventually(
      () => kube().get<Deployment>(deployments(deploymentName('pinned'))),
      15_000,
      'pinned deployment',
    );
    const env = d.spec.template.spec.containers[0]!.env.find((e) => e.name === 'TORPOR_ASSETS');
    assert.deepEqual(JSON.parse(env?.value ?? '[]'), [set]);
    const valid = await eventually(async () => conditionOf(await kube().get(assetSets('runsc-2024')), 'Valid'));
    assert.equal(valid.status, 'True');
    assert.equal(valid.message, '1 set(s): gvisor/amd64');
  });

  it('syncs Templates to the control plane and refuses later changes to them', async () => {
    const t = {
      apiVersion: API_VERSION,
      kind: 'Template',
      metadata: { name: 'counter', namespace: NS },
      spec: { image: 'registry.example/counter:1', port: 8080, env: { MODE: 'a' } },
    };
    await create(kube(), templates(), t);
    const synced = await eventually(async () => {
      const c = conditionOf(await kube().get(templates('counter')), 'Synced');
      return c?.status === 'True' ? c : undefined;
    });
    assert.equal(synced.reason, 'Synced');
    assert.equal(synced.message, 'created in the control plane store');
    const applied = testTemplates.applied.find((x) => x.name === 'counter');
    // The API server applied the schema's defaults: the control plane gets the same spec it would parse.
    assert.equal(applied?.runtime, 'gvisor');
    assert.equal(applied?.idleTimeoutSeconds, 300);
    assert.deepEqual(applied?.env, { MODE: 'a' });

    let refusedByServer = false;
    try {
      await kube().request('PATCH', templates('counter'), { body: { spec: { env: { MODE: 'b' } } }, patch: 'merge' });
    } catch (err) {
      // Kubernetes ≥ 1.25 evaluates the CRD's validation rule (self == oldSelf).
      assert.match(String(err), /immutable/);
      refusedByServer = true;
    }
    if (!refusedByServer) {
      const c = await eventually(async () => {
        const got = conditionOf(await kube().get(templates('counter')), 'Synced');
        return got?.status === 'False' ? got : undefined;
      });
      assert.equal(c.reason, 'Immutable');
      assert.match(c.message, /immutable/);
    }
    // A re-apply of the synced spec may still be in flight (every watch event reconciles): what must never reach
    // the control plane is the changed one.
    assert.deepEqual(
      testTemplates.applied.filter((x) => x.name === 'counter').map((x) => x.env),
      testTemplates.applied.filter((x) => x.name === 'counter').map(() => ({ MODE: 'a' })),
      'the changed spec never reached the control plane',
    );

    // A template the control plane refuses is reported with the field.
    await create(kube(), templates(), {
      ...t,
      metadata: { name: 'bad-name', namespace: NS },
      spec: { image: 'x', port: 8080, env: { 'not a name': 'v' } },
    });
    const refused = await eventually(async () => {
      const c = conditionOf(await kube().get(templates('bad-name')), 'Synced');
      return c?.status === 'False' ? c : undefined;
    });
    assert.equal(refused.reason, 'INVALID_ARGUMENT');
    assert.match(refused.message, /^spec\.env/);
  });

  it('works with in-cluster configuration (service-account token and CA, TLS verified)', async () => {
    const root = await mkdtemp(join(tmpdir(), 'torpor-incluster-'));
    const saved = { host: process.env.KUBERNETES_SERVICE_HOST, port: process.env.KUBERNETES_SERVICE_PORT };
    try {
      const sa = join(root, 'var/run/secrets/kubernetes.io/serviceaccount');
      await mkdir(sa, { recursive: true });
      await writeFile(join(sa, 'token'), k!.token);
      await writeFile(join(sa, 'namespace'), 'kube-system');
      // The API server's own serving certificate (self-signed) is the CA a pod would be given.
      await copyFile(join(k!.dir, 'certs', 'apiserver.crt'), join(sa, 'ca.crt'));
      process.env.KUBERNETES_SERVICE_HOST = '127.0.0.1';
      process.env.KUBERNETES_SERVICE_PORT = new URL(k!.server).port;
      const inCluster = new Kube(loadKubeConfig({ inClusterRoot: root }));
      assert.equal(inCluster.namespace(), 'kube-system');
      const ns = await inCluster.request<{ metadata: { name: string } }>('GET', '/api/v1/namespaces/default');
      assert.equal(ns.metadata.name, 'default');
      // TLS is verified: a CA that did not sign the server's certificate is refused.
      const other = await mkdtemp(join(tmpdir(), 'torpor-incluster-bad-'));
      await mkdir(join(other, 'var/run/secrets/kubernetes.io/serviceaccount'), { recursive: true });
      await writeFile(join(other, 'var/run/secrets/kubernetes.io/serviceaccount/token'), k!.token);
      await copyFile(
        join(import.meta.dirname, 'fixtures', 'unrelated-ca.crt'),
        join(other, 'var/run/secrets/kubernetes.io/serviceaccount/ca.crt'),
      );
      await assert.rejects(new Kube(loadKubeConfig({ inClusterRoot: other })).request('GET', '/api/v1/namespaces'));
      await rm(other, { recursive: true, force: true });
    } finally {
      process.env.KUBERNETES_SERVICE_HOST = saved.host;
      process.env.KUBERNETES_SERVICE_PORT = saved.port;
      if (saved.host === undefined) delete process.env.KUBERNETES_SERVICE_HOST;
      if (saved.port === undefined) delete process.env.KUBERNETES_SERVICE_PORT;
      await rm(root, { recursive: true, force: true });
    }
  });

  it('drains a deleted pool before its Deployment goes (finalizer)', async () => {
    testPools.remaining = 2;
    const callsBefore = testPools.drainCalls.length;
    await kube().request('DELETE', pools('vms'));
    const draining = await eventually(async () => {
      const c = conditionOf(await kube().get(pools('vms')), 'Draining');
      return c?.status === 'True' ? c : undefined;
    });
    assert.match(draining.message, /2 actor/);
    // Still there, with its Deployment, while actors remain: the drain is retried.
    await eventually(
      async () => (testPools.drainCalls.length >= callsBefore + 3 ? true : undefined),
      15_000,
      'retries',
    );
    assert.ok(await kube().get(pools('vms')));
    assert.ok(await kube().get(deployments(deploymentName('vms'))));
    testPools.remaining = 0;
    await eventually(async () => ((await kube().get(pools('vms'))) ? undefined : true), 15_000, 'pool gone');
    assert.equal(await kube().get(deployments(deploymentName('vms'))), undefined);
  });

  it('never puts a secret into a log line, a status or a Deployment', async () => {
    assert.ok(logLines.length > 0, 'the controller logged');
    const everything = [
      ...logLines,
      JSON.stringify(await kube().request('GET', pools())),
      JSON.stringify(await kube().request('GET', templates())),
      JSON.stringify(await kube().request('GET', deployments())),
    ].join('\n');
    for (const secret of [BOOTSTRAP_TOKEN, k!.token]) assert.ok(!everything.includes(secret), 'a secret leaked');
  });
});
