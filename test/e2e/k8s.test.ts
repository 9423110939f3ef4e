// `torpor up --engine k8s` against a real kube-apiserver, with real runsc workers on this machine: a Template
// custom resource is synced into the control plane's store (and gets its golden snapshot), a WorkerPool reports
// the workers its agents registered, and deleting the pool suspends its running actor to a snapshot before the
// pool and its Deployment go.
//
// There is no kubelet: the pool's pod is created by the test under the name this machine's agent registers with
// ("node0"), standing in for the pod that would host that agent.
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import type { Actor, Template } from '../../src/core/types.ts';
import { resourcePath } from '../../src/engine/k8s/kube.ts';
import { deploymentName, poolSelector } from '../../src/engine/k8s/render.ts';
import { API_VERSION, type Condition } from '../../src/engine/k8s/resources.ts';
import { startStandIn } from '../engine/ack/alicloud-standin.ts';
import { eventually, installCrds, type RunningKube, startKube } from '../engine/k8s/kube-helpers.ts';
import { counterImage } from '../fixtures/images.ts';
import { gvisorSkipReason, startTorpor, type Torpor } from './harness.ts';

const NS = 'default';
const BIN = join(import.meta.dirname, '..', '..', 'bin', 'torpor.js');
const noGvisor = gvisorSkipReason();
const started = noGvisor ? noGvisor : await startKube();
const skip = typeof started === 'string' ? started : false;
const k = typeof started === 'string' ? undefined : started;

const conditionOf = (obj: { status?: { conditions?: Condition[] } } | undefined, type: string) =>
  obj?.status?.conditions?.find((c) => c.type === type);

describe('torpor up --engine k8s (real kube-apiserver, real runsc)', { skip }, () => {
  let t: Torpor;
  const kube = () => (k as RunningKube).kube;

  before(async () => {
    await installCrds(kube());
    await kube().request('POST', resourcePath('v1', 'secrets', NS), {
      body: { apiVersion: 'v1', kind: 'Secret', metadata: { name: 'torpor-agent-token' }, stringData: { token: 't' } },
    });
    t = await startTorpor({
      workers: 2,
      networkBase: 200,
      args: ['--engine', 'k8s', '--kubeconfig', k!.kubeconfig, '--watch-namespace', NS],
    });
  });
  after(async () => {
    await t?.stop();
    await k?.stop();
  });

  it('syncs a Template custom resource into the store, golden snapshot included', async () => {
    const image = await counterImage();
    await kube().request('POST', resourcePath(API_VERSION, 'templates', NS), {
      body: {
        apiVersion: API_VERSION,
        kind: 'Template',
        metadata: { name: 'counter' },
        spec: { image, port: 8080, readiness: { path: '/healthz', timeoutSeconds: 20 }, resources: { memoryMiB: 128 } },
      },
    });
    const synced = await eventually(
      async () => {
        const c = conditionOf(await kube().get(resourcePath(API_VERSION, 'templates', NS, 'counter')), 'Synced');
        return c?.status === 'True' ? c : undefined;
      },
      60_000,
      'Synced',
    );
    assert.equal(synced.reason, 'Synced');
    assert.equal(synced.message, 'created in the control plane store');
    const stored = await eventually(
      async () => {
        const got = await t.json<Template>('template', 'get', 'counter');
        return got.goldenSnapshot ? got : undefined;
      },
      60_000,
      'golden snapshot',
    );
    assert.equal(stored.port, 8080);
    assert.equal(stored.resources.memoryMiB, 128);
    assert.equal(stored.idleTimeoutSeconds, 300, 'defaults applied');
  });

  it('a pool counts its registered workers and drains its actors before it goes', async () => {
    const actor = await t.json<Actor>('actor', 'create', 'k1', '--template', 'counter');
    assert.equal(actor.status, 'SUSPENDED');
    const running = await t.json<Actor>('actor', 'resume', 'k1');
    assert.equal(running.status, 'RUNNING');
    assert.equal(running.node, 'node0');
    const snapshotBefore = running.snapshot;

    await kube().request('POST', resourcePath(API_VERSION, 'workerpools', NS), {
      body: { apiVersion: API_VERSION, kind: 'WorkerPool', metadata: { name: 'local' }, spec: { runtime: 'gvisor' } },
    });
    // The pod that hosts agent "node0" (its name is the agent's node name).
    await kube().request('POST', resourcePath('v1', 'pods', NS), {
      body: {
        apiVersion: 'v1',
        kind: 'Pod',
        metadata: { name: 'node0', labels: poolSelector('local') },
        spec: { containers: [{ name: 'agent', image: 'torpor:test' }] },
      },
    });
    const status = await eventually(
      async () => {
        const p = await kube().get<{ status?: { readyWorkers?: number; conditions?: Condition[] } }>(
          resourcePath(API_VERSION, 'workerpools', NS, 'local'),
        );
        return p?.status?.readyWorkers === 2 ? p.status : undefined;
      },
      30_000,
      'readyWorkers 2',
    );
    assert.equal(conditionOf({ status }, 'Available')?.status, 'True');
    assert.ok(await kube().get(resourcePath('apps/v1', 'deployments', NS, deploymentName('local'))));

    await kube().request('DELETE', resourcePath(API_VERSION, 'workerpools', NS, 'local'));
    await eventually(
      async () => ((await kube().get(resourcePath(API_VERSION, 'workerpools', NS, 'local'))) ? undefined : true),
      60_000,
      'pool gone',
    );
    const drained = await t.json<Actor>('actor', 'get', 'k1');
    assert.equal(drained.status, 'SUSPENDED', 'suspended by the drain');
    assert.ok(drained.snapshot && drained.snapshot !== snapshotBefore, 'a new snapshot was taken');
    assert.equal(await kube().get(resourcePath('apps/v1', 'deployments', NS, deploymentName('local'))), undefined);
  });

  it('torpor controller, a separate process, applies templates and drains pools through the server API', async () => {
    const ns = 'ctl';
    await kube().request('POST', '/api/v1/namespaces', {
      body: { apiVersion: 'v1', kind: 'Namespace', metadata: { name: ns } },
    });
    await kube().request('POST', resourcePath('v1', 'secrets', ns), {
      body: { apiVersion: 'v1', kind: 'Secret', metadata: { name: 'torpor-agent-token' }, stringData: { token: 't' } },
    });
    const controller = spawn(
      process.execPath,
      [
        BIN,
        'controller',
        '--server',
        t.url,
        '--kubeconfig',
        k!.kubeconfig,
        '--watch-namespace',
        ns,
        '--agent-blob',
        'file:///srv/blobs',
      ],
      { stdio: ['ignore', 'pipe', 'pipe'] },
    );
    let output = '';
    controller.stdout.on('data', (d: Buffer) => (output += d));
    controller.stderr.on('data', (d: Buffer) => (output += d));
    try {
      await eventually(async () => (output.includes('Torpor controller running') ? true : undefined), 30_000, output);
      await kube().request('POST', resourcePath(API_VERSION, 'templates', ns), {
        body: {
          apiVersion: API_VERSION,
          kind: 'Template',
          metadata: { name: 'counter-api' },
          spec: { image: await counterImage(), port: 8080, readiness: { path: '/healthz', timeoutSeconds: 20 } },
        },
      });
      const stored = await eventually(
        async () => {
          const r = await t.cli('template', 'get', 'counter-api', '-o', 'json');
          return r.code === 0 ? (JSON.parse(r.stdout) as Template) : undefined;
        },
        30_000,
        'template applied through the API',
      );
      assert.equal(stored.port, 8080);

      await t.json<Actor>('actor', 'create', 'k2', '--template', 'counter');
      const running = await t.json<Actor>('actor', 'resume', 'k2');
      assert.equal(running.status, 'RUNNING');
      await kube().request('POST', resourcePath(API_VERSION, 'workerpools', ns), {
        body: {
          apiVersion: API_VERSION,
          kind: 'WorkerPool',
          metadata: { name: 'remote' },
          spec: { runtime: 'gvisor' },
        },
      });
      await kube().request('POST', resourcePath('v1', 'pods', ns), {
        body: {
          apiVersion: 'v1',
          kind: 'Pod',
          metadata: { name: running.node, labels: poolSelector('remote') },
          spec: { containers: [{ name: 'agent', image: 'torpor:test' }] },
        },
      });
      await eventually(
        async () => {
          const p = await kube().get<{ status?: { readyWorkers?: number } }>(
            resourcePath(API_VERSION, 'workerpools', ns, 'remote'),
          );
          return p?.status?.readyWorkers === 2 ? true : undefined;
        },
        30_000,
        'readyWorkers through the API',
      );
      await kube().request('DELETE', resourcePath(API_VERSION, 'workerpools', ns, 'remote'));
      await eventually(
        async () => ((await kube().get(resourcePath(API_VERSION, 'workerpools', ns, 'remote'))) ? undefined : true),
        60_000,
        'pool gone',
      );
      const drained = await t.json<Actor>('actor', 'get', 'k2');
      assert.equal(drained.status, 'SUSPENDED', 'suspended through the API before the pool went');
    } catch (err) {
      throw new Error(`${(err as Error).message}\ncontroller output:\n${output}`);
    } finally {
      controller.kill('SIGTERM');
    }
  });

  it('torpor up --schedule-type alicloud-k8s: ACK credentials, the same controller, no secret in its output', async () => {
    const secret = randomBytes(24).toString('base64url');
    const standIn = await startStandIn({
      accessKeys: { LTAI5tE2eTestKey: secret },
      clusterId: 'ce2e',
      apiServer: k!.server,
      tokens: [k!.token],
      roles: {},
    });
    let ack: Torpor | undefined;
    try {
      await kube().request('POST', '/api/v1/namespaces', {
        body: { apiVersion: 'v1', kind: 'Namespace', metadata: { name: 'ack' } },
      });
      ack = await startTorpor({
        workers: 1,
        networkBase: 220,
        args: [
          '--schedule-type',
          'alicloud-k8s',
          '--alicloud-region',
          'cn-hangzhou',
          '--alicloud-cluster-id',
          'ce2e',
          '--alicloud-cs-endpoint',
          standIn.csEndpoint,
          '--alicloud-cs-protocol',
          'http',
          '--watch-namespace',
          'ack',
        ],
        env: { ALIBABA_CLOUD_ACCESS_KEY_ID: 'LTAI5tE2eTestKey', TORPOR_ALICLOUD_ACCESS_KEY_SECRET: secret },
      });
      assert.equal(standIn.issues.length, 1, 'the kubeconfig came from ACK');
      await kube().request('POST', resourcePath(API_VERSION, 'templates', 'ack'), {
        body: {
          apiVersion: API_VERSION,
          kind: 'Template',
          metadata: { name: 'counter-ack' },
          spec: { image: await counterImage(), port: 8080, readiness: { path: '/healthz', timeoutSeconds: 20 } },
        },
      });
      const synced = await eventually(
        async () => {
          const got = await ack!.cli('template', 'get', 'counter-ack', '-o', 'json');
          return got.code === 0 ? (JSON.parse(got.stdout) as Template) : undefined;
        },
        60_000,
        'template synced through ACK',
      );
      assert.equal(synced.port, 8080);
      const output = ack.log();
      assert.match(output, /ACK: kubeconfig obtained/);
      assert.ok(!output.includes(secret), 'the AccessKey secret is not in the output');
      assert.ok(!output.includes(k!.token), 'the kubeconfig token is not in the output');
    } finally {
      await ack?.stop();
      await standIn.close();
    }
  });
});
