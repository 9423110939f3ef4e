// The bare runtime floor every benchmark compares against: runsc alone, same binary, same image, same machine.
import { stat } from 'node:fs/promises';
import { join } from 'node:path';
import type { Logger } from 'pino';
import { waitReady } from '../../src/agent/ready.ts';
import { NodeNetwork } from '../../src/net/node-net.ts';
import { WorkerNetwork } from '../../src/net/worker-net.ts';
import { GvisorRuntime } from '../../src/runtime/gvisor/runsc.ts';

export interface Summary {
  n: number;
  p50: number;
  p95: number;
  p99: number;
  min: number;
  max: number;
}

export function summary(samples: number[]): Summary {
  const s = [...samples].sort((a, b) => a - b);
  const at = (q: number) => s[Math.min(s.length - 1, Math.ceil(q * s.length) - 1)]!;
  return { n: s.length, p50: at(0.5), p95: at(0.95), p99: at(0.99), min: s[0]!, max: s.at(-1)! };
}

export const round = (x: number) => Math.round(x * 100) / 100;

/** `cycles` bare `runsc checkpoint` and `runsc restore` (to ready) of one sandbox. */
export async function bare(
  runscPath: string,
  rootfs: string,
  image: { entrypoint: string[]; cmd: string[]; env: string[]; workingDir: string },
  work: string,
  cycles: number,
  log: Logger,
  networkIndex = 250,
) {
  const rt = new GvisorRuntime({
    stateRoot: join(work, 'bare-state'),
    onWarning: (message, fields) => log.warn(fields, message),
  });
  // The same network a worker has (node and worker namespaces, a fresh interior per activation), so the ratio
  // compares runtime operations only.
  const node = new NodeNetwork({ index: networkIndex });
  const net = new WorkerNetwork({ index: networkIndex, node });
  const activation = { ports: [8080], egress: 'allow-all' as const, actor: 'bench/bare' };
  await node.ensure();
  await net.ensure();
  const spec = {
    id: 'bench-bare',
    actorId: 'bench/bare',
    rootfs,
    image,
    command: [],
    env: {},
    memoryMiB: 256,
    vcpus: 1,
    netnsPath: net.netnsPath,
    workDir: join(work, 'bare-work'),
    logFile: join(work, 'bare.log'),
    assets: { runsc: runscPath },
  };
  const url = `http://${net.address}:8080/healthz`;
  const checkpoint: number[] = [];
  const restore: number[] = [];
  let rawBytes = 0;
  try {
    await net.prepare();
    await net.activate(activation);
    let sandbox = await rt.run(spec);
    await waitReady(url, 20_000);
    for (let i = 0; i < cycles; i++) {
      const dir = join(work, 'bare-cp');
      let t0 = performance.now();
      const cp = await rt.checkpoint(sandbox, dir);
      checkpoint.push(performance.now() - t0);
      rawBytes = 0;
      for (const f of cp.files) rawBytes += (await stat(join(dir, f))).size;
      await rt.destroy(spec.id);
      await net.prepare();
      await net.activate(activation);
      t0 = performance.now();
      sandbox = (await rt.restore(spec, dir, cp.files)).sandbox;
      await waitReady(url, 20_000);
      restore.push(performance.now() - t0);
    }
    await rt.destroy(spec.id);
  } finally {
    await net.destroy();
    await node.destroy();
  }
  return { checkpoint: summary(checkpoint), restore: summary(restore), rawBytes };
}
