import assert from 'node:assert/strict';
import { test } from 'node:test';
import { buildOciSpec, mergeEnv, processArgs, SANDBOX_OVERHEAD_MIB } from '../../src/runtime/gvisor/spec.ts';
import type { ActivationSpec } from '../../src/runtime/runtime.ts';

const activation = (over: Partial<ActivationSpec> = {}): ActivationSpec => ({
  id: 'w0--default--a',
  actorId: 'default/a',
  rootfs: '/cache/rootfs/abc',
  image: { entrypoint: ['/srv'], cmd: ['--port', '80'], env: ['PATH=/bin', 'A=image'], workingDir: '/app' },
  command: [],
  env: { A: 'template', B: 'x' },
  memoryMiB: 128,
  vcpus: 2,
  netnsPath: '/var/run/netns/torpor-net0',
  workDir: '/work',
  logFile: '/work/log',
  assets: { runsc: '/cache/assets/runsc' },
  ...over,
});

test('template env overrides image env by name', () => {
  assert.deepEqual(mergeEnv(['PATH=/bin', 'A=image'], { A: 'template', B: 'x' }), ['PATH=/bin', 'A=template', 'B=x']);
});

test('the template command replaces entrypoint and cmd; an empty one keeps them', () => {
  assert.deepEqual(processArgs(activation()), ['/srv', '--port', '80']);
  assert.deepEqual(processArgs(activation({ command: ['/other'] })), ['/other']);
  assert.throws(() => processArgs(activation({ image: { entrypoint: [], cmd: [], env: [], workingDir: '' } })));
});

test('the OCI spec joins the worker namespace by path, mounts the identity dir read-only and limits resources', () => {
  const spec = buildOciSpec(activation(), '/work/identity') as {
    root: { path: string };
    process: { cwd: string; terminal: boolean };
    mounts: { destination: string; source: string; options?: string[] }[];
    linux: {
      namespaces: { type: string; path?: string }[];
      resources: { memory: { limit: number }; cpu: { quota: number } };
    };
  };
  assert.equal(spec.root.path, '/cache/rootfs/abc');
  assert.equal(spec.process.cwd, '/app');
  assert.equal(spec.process.terminal, false);
  const identity = spec.mounts.find((m) => m.destination === '/run/torpor');
  assert.equal(identity?.source, '/work/identity');
  assert.ok(identity?.options?.includes('ro'));
  assert.deepEqual(
    spec.linux.namespaces.find((n) => n.type === 'network'),
    { type: 'network', path: '/var/run/netns/torpor-net0' },
  );
  assert.equal(spec.linux.resources.memory.limit, (128 + SANDBOX_OVERHEAD_MIB) * 1024 * 1024);
  assert.equal(spec.linux.resources.cpu.quota, 200_000);
});
