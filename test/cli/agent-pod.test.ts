// What a worker pod's agent is told and how it reads it: render.ts puts the pool's runtime class and asset sets in
// the pod's environment (TORPOR_RUNTIME, TORPOR_ASSETS) and runs the agent in pod mode; agentPodSettings turns flags
// and that environment into the agent's options, a flag winning over the environment.
import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { agentPodSettings } from '../../src/cli/distributed.ts';
import { TorporError } from '../../src/core/errors.ts';
import type { AssetSet } from '../../src/core/schemas.ts';
import { renderDeployment } from '../../src/engine/k8s/render.ts';
import { workerPoolSpec } from '../../src/engine/k8s/resources.ts';
import { parseAssetSets } from '../../src/runtime/asset-set.ts';

const sha = (c: string) => c.repeat(64);
const MICROVM_SET: AssetSet = {
  runtime: 'microvm',
  arch: 'amd64',
  assets: {
    qemu: { url: 'https://assets.example/qemu', sha256: sha('a') },
    kernel: { url: 'https://assets.example/vmlinux', sha256: sha('b') },
    initrd: { url: 'https://assets.example/initrd', sha256: sha('c') },
  },
};

function renderedContainer(runtime: 'gvisor' | 'microvm', assets?: AssetSet[]) {
  const spec = workerPoolSpec.parse({ runtime, replicas: 1, workersPerPod: 3 });
  const deployment = renderDeployment(
    { namespace: 'ns', name: 'vms', uid: 'u-1' },
    spec,
    { serverUrl: 'http://torpor-server:7070', image: 'torpor:test', tokenSecret: 'tok', blobUrl: 's3://b/p' },
    assets,
  );
  const container = deployment.spec.template.spec.containers[0]!;
  const env: Record<string, string> = {};
  for (const e of container.env as { name: string; value?: string }[]) if (e.value !== undefined) env[e.name] = e.value;
  return { command: container.command, env };
}

const flag = (argv: string[], name: string) => argv[argv.indexOf(name) + 1];

describe('worker pod agent settings', () => {
  it('a micro-VM pool’s pod runs a pod-mode agent of micro-VM workers with the pool’s asset sets', () => {
    const { command, env } = renderedContainer('microvm', [MICROVM_SET]);
    assert.equal(flag(command, '--network'), 'pod');
    assert.equal(flag(command, '--workers'), '3');
    assert.equal(env.TORPOR_RUNTIME, 'microvm');
    // The agent as the pod starts it: no --runtime or --assets flag, the environment plus the kubelet's POD_IP.
    const settings = agentPodSettings({ network: flag(command, '--network') }, { ...env, POD_IP: '10.1.2.3' });
    assert.equal(settings.runtime, 'microvm');
    assert.equal(settings.network, 'pod');
    assert.equal(settings.listen, '10.1.2.3:7071');
    assert.ok(settings.assets && 'text' in settings.assets, 'the asset sets come from TORPOR_ASSETS');
    assert.deepEqual(parseAssetSets(settings.assets.text, 'TORPOR_ASSETS'), [MICROVM_SET]);
  });

  it('a gVisor pool without an AssetSet gives no TORPOR_ASSETS: the agent uses its default', () => {
    const { env } = renderedContainer('gvisor');
    assert.equal(env.TORPOR_ASSETS, undefined);
    const settings = agentPodSettings({ network: 'pod' }, { ...env, POD_IP: '10.1.2.3' });
    assert.equal(settings.runtime, 'gvisor');
    assert.equal(settings.assets, undefined);
  });

  it('flags win over the environment', () => {
    const env = { TORPOR_RUNTIME: 'microvm', TORPOR_ASSETS: JSON.stringify([MICROVM_SET]), POD_IP: '10.1.2.3' };
    const settings = agentPodSettings(
      { runtime: 'gvisor', assets: '/etc/torpor/assets.yaml', listen: '10.9.9.9:9000', network: 'pod' },
      env,
    );
    assert.equal(settings.runtime, 'gvisor');
    assert.deepEqual(settings.assets, { file: '/etc/torpor/assets.yaml' });
    assert.equal(settings.listen, '10.9.9.9:9000');
  });

  it('node mode (the default) ignores POD_IP: the agent listens at its node’s address', () => {
    const settings = agentPodSettings({}, { POD_IP: '10.1.2.3' });
    assert.equal(settings.network, 'node');
    assert.equal(settings.listen, undefined);
    assert.equal(settings.runtime, undefined);
  });

  it('refuses an unknown runtime class or network mode, naming the field', () => {
    assert.throws(
      () => agentPodSettings({}, { TORPOR_RUNTIME: 'firecracker' }),
      (err: unknown) => err instanceof TorporError && err.code === 'INVALID_ARGUMENT' && err.field === 'runtime',
    );
    assert.throws(
      () => agentPodSettings({ network: 'host' }, {}),
      (err: unknown) => err instanceof TorporError && err.code === 'INVALID_ARGUMENT' && err.field === 'network',
    );
  });
});
