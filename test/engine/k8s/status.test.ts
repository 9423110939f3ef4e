// A WorkerPool's status against Kubernetes' own controllers (kube-controller-manager: Deployment → ReplicaSet →
// Pods, garbage collection; no kubelet, so pods stay Pending): replicas follow the pods that exist, readyWorkers
// follows the workers registered in a real store under those pods' names, and deleting the pool takes its pods.
import assert from 'node:assert/strict';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { KubeController } from '../../../src/engine/k8s/controller.ts';
import { resourcePath } from '../../../src/engine/k8s/kube.ts';
import { StorePools } from '../../../src/engine/k8s/pools.ts';
import { selectorString } from '../../../src/engine/k8s/render.ts';
import { API_VERSION, type Condition } from '../../../src/engine/k8s/resources.ts';
import { SqliteStore } from '../../../src/store/sqlite.ts';
import { eventually, installCrds, quietLog, type RunningKube, startKube } from './kube-helpers.ts';

const started = await startKube({ controllers: true });
const skip = typeof started === 'string' ? started : false;
const k = typeof started === 'string' ? undefined : started;
const NS = 'default';

interface PoolStatus {
  replicas?: number;
  readyReplicas?: number;
  readyWorkers?: number;
  conditions?: Condition[];
}

describe('WorkerPool status with kube-controller-manager (pods created, never run)', { skip }, () => {
  let controller: KubeController;
  let store: SqliteStore;
  let dir: string;
  const kube = () => (k as RunningKube).kube;
  const poolPath = resourcePath(API_VERSION, 'workerpools', NS, 'real');
  const status = async () => (await kube().get<{ status?: PoolStatus }>(poolPath))?.status;
  const pods = async () =>
    (
      await kube().request<{ items: { metadata: { name: string } }[] }>('GET', resourcePath('v1', 'pods', NS), {
        query: { labelSelector: selectorString('real') },
      })
    ).items.map((p) => p.metadata.name);

  before(async () => {
    dir = await mkdtemp(join(tmpdir(), 'torpor-k8s-status-'));
    store = SqliteStore.open(join(dir, 'state.db'));
    await installCrds(kube());
    await kube().request('POST', resourcePath('v1', 'secrets', NS), {
      body: { apiVersion: 'v1', kind: 'Secret', metadata: { name: 'torpor-agent-token' }, stringData: { token: 't' } },
    });
    controller = new KubeController({
      kube: kube(),
      namespace: NS,
      agent: {
        serverUrl: 'http://torpor-server:7070',
        image: 'torpor:test',
        tokenSecret: 'torpor-agent-token',
        blobUrl: 's3://b/p',
      },
      pools: new StorePools({
        store,
        lifecycle: {
          suspend: () => {
            throw new Error('no actor runs on these pods');
          },
        },
        log: quietLog(),
      }),
      templates: { applyTemplate: async () => ({ created: true }) },
      log: quietLog(),
      resyncMs: 300,
    });
    await controller.start();
  });
  after(async () => {
    await controller?.stop();
    await store?.close();
    await k?.stop();
    if (dir) await rm(dir, { recursive: true, force: true });
  });

  it('replicas follow the pods Kubernetes created; ready workers follow registrations; /scale adds pods', async () => {
    await kube().request('POST', resourcePath(API_VERSION, 'workerpools', NS), {
      body: {
        apiVersion: API_VERSION,
        kind: 'WorkerPool',
        metadata: { name: 'real' },
        spec: { runtime: 'gvisor', replicas: 2 },
      },
    });
    const s = await eventually(
      async () => {
        const got = await status();
        return got?.replicas === 2 ? got : undefined;
      },
      30_000,
      'status.replicas 2',
    );
    assert.equal(s.readyReplicas, 0, 'no kubelet: no pod is ready');
    assert.equal(s.readyWorkers, 0);
    assert.equal(s.conditions?.find((c) => c.type === 'Available')?.reason, 'WaitingForPods');
    const names = await pods();
    assert.equal(names.length, 2);

    // The agent in one of those pods registers its two workers under the pod's name.
    const lease = new Date(Date.now() + 600_000).toISOString();
    for (const i of [0, 1]) {
      await store.putWorker({
        id: `${names[0]}-w${i}`,
        node: names[0]!,
        runtime: 'gvisor',
        state: 'free',
        host: `10.0.0.${i}:80`,
        leaseExpiresAt: lease,
      });
    }
    // A worker of some other node, and one whose lease has run out, do not count.
    await store.putWorker({
      id: 'elsewhere-w0',
      node: 'elsewhere',
      runtime: 'gvisor',
      state: 'free',
      host: '10.0.1.1:80',
      leaseExpiresAt: lease,
    });
    await store.putWorker({
      id: `${names[1]}-w0`,
      node: names[1]!,
      runtime: 'gvisor',
      state: 'free',
      host: '10.0.0.9:80',
      leaseExpiresAt: new Date(Date.now() - 1000).toISOString(),
    });
    const ready = await eventually(
      async () => {
        const got = await status();
        return got?.readyWorkers === 2 ? got : undefined;
      },
      15_000,
      'readyWorkers 2',
    );
    assert.equal(ready.conditions?.find((c) => c.type === 'Available')?.status, 'True');

    await kube().request('PATCH', `${poolPath}/scale`, { body: { spec: { replicas: 3 } }, patch: 'merge' });
    await eventually(async () => ((await status())?.replicas === 3 ? true : undefined), 30_000, 'status.replicas 3');
    assert.equal((await pods()).length, 3);
  });

  it('deleting the pool removes its Deployment and Kubernetes removes its pods', async () => {
    await kube().request('DELETE', poolPath);
    await eventually(async () => ((await kube().get(poolPath)) ? undefined : true), 30_000, 'pool gone');
    await eventually(async () => ((await pods()).length === 0 ? true : undefined), 60_000, 'pods garbage-collected');
  });
});
