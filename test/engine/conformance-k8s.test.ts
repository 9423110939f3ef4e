// The engine conformance suite against the Kubernetes engine: a control plane running the controller against a
// real kube-apiserver, its template coming from a Template custom resource (synced by the controller, not applied
// by the test). There is no kubelet, so the workers are this machine's agents on runsc, standing in for the
// pool's pods.
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { pino } from 'pino';
import { up } from '../../src/cli/up.ts';
import { resourcePath } from '../../src/engine/k8s/kube.ts';
import { API_VERSION } from '../../src/engine/k8s/resources.ts';
import { gvisorSkipReason } from '../e2e/harness.ts';
import { counterImage } from '../fixtures/images.ts';
import { engineConformance } from './conformance.ts';
import { eventually, installCrds, startKube } from './k8s/kube-helpers.ts';

const noGvisor = gvisorSkipReason();
const kube = noGvisor ? noGvisor : await startKube();

engineConformance(
  'k8s (templates from Template resources)',
  async () => {
    if (typeof kube === 'string') throw new Error(kube);
    await installCrds(kube.kube);
    const dataDir = await mkdtemp(join(tmpdir(), 'torpor-conf-k8s-'));
    const torpor = await up({
      dataDir,
      host: '127.0.0.1',
      port: 0,
      routerPort: 0,
      workers: 3,
      networkBase: 210,
      engine: 'k8s',
      kube: {
        kube: { kubeconfig: kube.kubeconfig },
        namespace: 'default',
        agent: (serverUrl, blobUrl) => ({
          serverUrl,
          blobUrl,
          image: 'torpor:test',
          tokenSecret: 'torpor-agent-token',
        }),
      },
      log: pino({ level: 'warn' }),
    });
    await kube.kube.request('POST', resourcePath(API_VERSION, 'templates', 'default'), {
      body: {
        apiVersion: API_VERSION,
        kind: 'Template',
        metadata: { name: 'counter-v1' },
        spec: {
          image: await counterImage(),
          port: 8080,
          readiness: { path: '/healthz', timeoutSeconds: 20 },
          resources: { memoryMiB: 128, vcpus: 1 },
        },
      },
    });
    await eventually(() => torpor.lifecycle.getTemplate('counter-v1').catch(() => undefined), 30_000, 'template sync');
    return {
      engine: torpor.instances,
      envName: 'counter@v1',
      teardown: async () => {
        await torpor.stop();
        await kube.stop();
        await rm(dataDir, { recursive: true, force: true });
      },
    };
  },
  { skip: typeof kube === 'string' ? kube : undefined },
);
