// The micro-VM runtime on Cloud Hypervisor, through its REST API: boot, exec over the virtio-console channel,
// snapshot (Cloud Hypervisor's own files), restore with the in-RAM counter continuing. Runs only where a
// cloud-hypervisor binary and a usable /dev/kvm exist; this project's CI machine has neither.
import assert from 'node:assert/strict';
import { mkdir, mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, it } from 'node:test';
import { ImageStore } from '../../src/image/store.ts';
import { ACTOR_ADDRESS, ACTOR_MAC, ACTOR_PREFIX, GATEWAY_ADDRESS, GATEWAY_MAC } from '../../src/net/egress.ts';
import { CloudHypervisorDriver, locateCloudHypervisor } from '../../src/runtime/microvm/cloud-hypervisor.ts';
import { locateMicrovm } from '../../src/runtime/microvm/locate.ts';
import { MicrovmRuntime } from '../../src/runtime/microvm/runtime.ts';
import { run } from '../../src/sys/run.ts';
import { counterImage, TEST_CACHE } from '../fixtures/images.ts';

const binary = locateCloudHypervisor();
const guest = locateMicrovm();
const status = binary ? await new CloudHypervisorDriver({ binary }).status() : undefined;
const skip =
  process.getuid?.() !== 0
    ? 'needs root (network namespaces, tap devices)'
    : !binary
      ? 'cloud-hypervisor not installed (not installable on this machine: set TORPOR_CLOUD_HYPERVISOR where it is)'
      : !status?.usable
        ? status?.detail
        : guest.paths?.kernel
          ? undefined
          : guest.missing.join('; ');

async function tapNamespace(name: string): Promise<string> {
  await run('ip', ['netns', 'del', name], { okCodes: [0, 1] });
  await run('ip', ['netns', 'add', name]);
  await run('ip', ['-n', name, '-batch', '-'], {
    input: `link set lo up\ntuntap add tap0 mode tap\nlink set tap0 address ${GATEWAY_MAC}\naddr add ${GATEWAY_ADDRESS}/${ACTOR_PREFIX} dev tap0\nlink set tap0 up\n`,
  });
  return `/var/run/netns/${name}`;
}

async function get(ns: string, path: string): Promise<string> {
  const out = await run('ip', ['netns', 'exec', ns, 'curl', '-sS', '-m', '5', `http://${ACTOR_ADDRESS}:8080${path}`]);
  return out.stdout.trim();
}

describe('micro-VM runtime (Cloud Hypervisor)', { skip, timeout: 300_000 }, () => {
  it('boots, snapshots and restores with the in-RAM counter intact', async (t) => {
    const root = await mkdtemp(join(tmpdir(), 'torpor-ch-'));
    const runtime = new MicrovmRuntime({
      driver: new CloudHypervisorDriver({ binary: binary! }),
      kernel: guest.paths!.kernel,
      initrd: guest.paths!.initrd,
      accel: 'kvm',
      stateRoot: join(root, 'state'),
      diskCache: join(TEST_CACHE, 'microvm-disks'),
      network: { address: ACTOR_ADDRESS, prefix: ACTOR_PREFIX, gateway: GATEWAY_ADDRESS, mac: ACTOR_MAC, tap: 'tap0' },
    });
    t.after(async () => {
      for (const id of await runtime.list()) await runtime.destroy(id);
      for (const ns of ['torpor-cht-a', 'torpor-cht-b']) await run('ip', ['netns', 'del', ns], { okCodes: [0, 1] });
      await rm(root, { recursive: true, force: true });
    });
    const image = await new ImageStore(join(TEST_CACHE, 'microvm-images')).resolve(await counterImage());
    await mkdir(join(root, 'logs'), { recursive: true });
    const spec = async (id: string, ns: string) => ({
      id,
      actorId: `default/${id}`,
      rootfs: image.rootfs,
      image: image.config,
      command: [],
      env: {},
      memoryMiB: 128,
      vcpus: 1,
      netnsPath: await tapNamespace(ns),
      workDir: join(root, id),
      logFile: join(root, 'logs', `${id}.log`),
      assets: {},
    });
    const booted = await runtime.run(await spec('ch-a', 'torpor-cht-a'));
    let body = '';
    for (let i = 0; i < 100 && body !== 'ok'; i++) body = await get('torpor-cht-a', '/healthz').catch(() => '');
    assert.deepEqual([await get('torpor-cht-a', '/'), await get('torpor-cht-a', '/')], ['1', '2']);
    const id = await runtime.exec(booted, ['/bin/busybox', 'cat', '/run/torpor/actor-id'], 10_000);
    assert.equal(id.stdout, 'default/ch-a');
    const cp = await runtime.checkpoint(booted, join(root, 'snap'));
    assert.deepEqual(cp.files, ['config.json', 'memory-ranges', 'state.json', 'vm.json']);
    await (await runtime.restore(await spec('ch-b', 'torpor-cht-b'), join(root, 'snap'), cp.files)).settled;
    assert.equal(await get('torpor-cht-b', '/'), '3');
    assert.equal(await get('torpor-cht-b', '/id'), 'default/ch-b');
  });
});
