// bench/microvm: Torpor's micro-VM resume and suspend (through the REST API, as a user drives them) next to a
// bare QEMU restore of the same snapshot, in the same run: the same QEMU, guest, disk and device model, on the
// same kind of network (a worker's namespaces with a tap), started by hand with `-incoming defer`, loaded with
// `migrate-incoming exec:cat`, `cont`, then polled until the counter answers. Prints one JSON document: medians
// and p95 in ms, per-phase medians, and ratios (ours / bare).
// Usage: node bench/microvm.ts [--cycles N]     (root; QEMU and the guest from scripts/setup.sh)
import { spawn } from 'node:child_process';
import { mkdir, mkdtemp, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { basename, join } from 'node:path';
import { parseArgs } from 'node:util';
import { pino } from 'pino';
import { buildCounterImage } from '../examples/counter/image.ts';
import { waitReady } from '../src/agent/ready.ts';
import { FsBlobStore } from '../src/blob/fs.ts';
import { up } from '../src/cli/up.ts';
import { ImageStore } from '../src/image/store.ts';
import { NodeNetwork } from '../src/net/node-net.ts';
import { TAP, WorkerNetwork } from '../src/net/worker-net.ts';
import { locateMicrovm } from '../src/runtime/microvm/locate.ts';
import { probeKvm, qemuArgs } from '../src/runtime/microvm/qemu.ts';
import { QmpClient } from '../src/runtime/microvm/qmp.ts';
import { restoreSnapshot } from '../src/snapshot/index.ts';
import { api } from './lib/api.ts';
import { round, summary } from './lib/bare.ts';

const { values } = parseArgs({ options: { cycles: { type: 'string', default: '10' } } });
const cycles = Number(values.cycles);
const log = pino({ level: 'warn' });

interface Actor {
  address?: string;
  snapshot?: string;
  lastOperation?: { phases: Record<string, number> };
}

function phaseMedians(ops: Record<string, number>[]): Record<string, number> {
  const names = new Set(ops.flatMap((o) => Object.keys(o)));
  return Object.fromEntries([...names].map((n) => [n, round(summary(ops.map((o) => o[n] ?? 0)).p50)]));
}

async function waitForFreeWorker(base: string): Promise<void> {
  for (let i = 0; i < 500; i++) {
    const workers = await api<{ items: { state: string; runtime: string }[] }>(base, 'GET', '/v1/workers');
    if (workers.items.some((w) => w.runtime === 'microvm' && w.state === 'free')) return;
    await new Promise((r) => setTimeout(r, 20));
  }
}

async function torpor(ref: string, dataDir: string) {
  const t = await up({
    dataDir,
    host: '127.0.0.1',
    port: 0,
    routerPort: 0,
    workers: 1,
    microvmWorkers: 1,
    networkBase: 230,
    log,
  });
  const suspend: number[] = [];
  const resume: number[] = [];
  const suspendPhases: Record<string, number>[] = [];
  const resumePhases: Record<string, number>[] = [];
  const actorPath = '/v1/spaces/bench/actors/vm';
  try {
    await api(t.url, 'POST', '/v1/templates', {
      name: 'bench-vm',
      image: ref,
      port: 8080,
      runtime: 'microvm',
      readiness: { path: '/healthz', timeoutSeconds: 60 },
      resources: { memoryMiB: 128, vcpus: 1 },
    });
    await api(t.url, 'POST', '/v1/spaces/bench/actors', { name: 'vm', template: 'bench-vm' });
    let actor = await api<Actor>(t.url, 'POST', `${actorPath}/resume`, {});
    for (let i = 0; i < cycles; i++) {
      const got = Number(await (await fetch(`http://${actor.address}/`)).text());
      if (got !== i + 1) throw new Error(`counter returned ${got}, expected ${i + 1}: memory was lost`);
      let t0 = performance.now();
      actor = await api<Actor>(t.url, 'POST', `${actorPath}/suspend`, {});
      suspend.push(performance.now() - t0);
      suspendPhases.push(actor.lastOperation?.phases ?? {});
      await waitForFreeWorker(t.url);
      t0 = performance.now();
      actor = await api<Actor>(t.url, 'POST', `${actorPath}/resume`, {});
      resume.push(performance.now() - t0);
      resumePhases.push(actor.lastOperation?.phases ?? {});
    }
    actor = await api<Actor>(t.url, 'POST', `${actorPath}/suspend`, {});
    return {
      snapshot: actor.snapshot!,
      suspend: summary(suspend),
      resume: summary(resume),
      suspendPhases: phaseMedians(suspendPhases),
      resumePhases: phaseMedians(resumePhases),
    };
  } finally {
    await t.stop();
  }
}

/** Bare QEMU: restore Torpor's last snapshot of the actor, by hand, `cycles` times. */
async function bare(qemu: string, kernel: string, initrd: string, disk: string, snapshotDir: string, work: string) {
  const model = JSON.parse(await readFile(join(snapshotDir, 'vm.json'), 'utf8')) as {
    cmdline: string;
    memoryMiB: number;
    vcpus: number;
    mac: string;
    accel: 'kvm' | 'tcg';
  };
  const node = new NodeNetwork({ index: 250 });
  const net = new WorkerNetwork({ index: 250, node, tap: true });
  await node.ensure();
  await net.ensure();
  const url = `http://${net.address}:8080/healthz`;
  const restore: number[] = [];
  try {
    for (let i = 0; i < cycles; i++) {
      await net.prepare();
      await net.activate({ ports: [8080], egress: 'allow-all', actor: 'bench/bare' });
      // Short: unix socket paths must fit in 108 bytes.
      const runDir = `/run/torpor-vm/bare-${process.pid}-${i}`;
      await mkdir(runDir, { recursive: true });
      const args = qemuArgs(
        {
          id: 'bare',
          kernel,
          initrd,
          cmdline: model.cmdline,
          memoryMiB: model.memoryMiB,
          vcpus: model.vcpus,
          disk,
          netnsPath: net.netnsPath,
          tap: TAP,
          mac: model.mac,
          runDir,
          socketDir: runDir,
          consoleLog: join(work, 'bare-console.log'),
          memory: { path: join(snapshotDir, 'memory'), shared: false },
          accel: model.accel,
        },
        true,
      );
      const t0 = performance.now();
      const child = spawn('nsenter', [`--net=${net.netnsPath}`, '--', qemu, ...args], { stdio: 'ignore' });
      const qmp = await QmpClient.connect(join(runDir, 'qmp.sock'), 10_000, () => child.exitCode === null);
      await qmp.execute('migrate-set-capabilities', { capabilities: [{ capability: 'x-ignore-shared', state: true }] });
      await qmp.execute('migrate-incoming', { uri: `exec:cat ${join(snapshotDir, 'state')}` });
      while ((await qmp.execute<{ status: string }>('query-status')).status === 'inmigrate') {
        await new Promise((r) => setTimeout(r, 1));
      }
      await qmp.execute('cont');
      await waitReady(url, 30_000);
      restore.push(performance.now() - t0);
      qmp.close();
      child.kill('SIGKILL');
      await new Promise((r) => child.once('exit', r));
      await rm(runDir, { recursive: true, force: true });
    }
  } finally {
    await net.destroy();
    await node.destroy();
  }
  return { restore: summary(restore) };
}

const found = locateMicrovm();
if (!found.paths) throw new Error(found.missing.join('; '));
const { qemu, kernel, initrd } = found.paths;
const work = await mkdtemp(join(tmpdir(), 'torpor-bench-microvm-'));
try {
  const { ref } = await buildCounterImage(join(work, 'image'));
  const dataDir = join(work, 'torpor');
  const o = await torpor(ref, dataDir);
  // The same snapshot, rebuilt from the object store into a plain directory, and the same root disk.
  const snapshotDir = join(work, 'snapshot');
  await restoreSnapshot({ blob: new FsBlobStore(join(dataDir, 'blobs')), key: o.snapshot, dir: snapshotDir });
  const rootfs = (await new ImageStore(join(dataDir, 'images')).resolve(ref)).rootfs;
  const disk = join(dataDir, 'microvm', 'disks', `${basename(rootfs)}.ext4`);
  const b = await bare(qemu, kernel, initrd, disk, snapshotDir, work);
  const kvm = await probeKvm(qemu, kernel, initrd);
  console.log(
    JSON.stringify(
      {
        benchmark: 'microvm',
        cycles,
        qemu,
        accel: kvm.usable ? 'kvm' : 'tcg',
        guest_memory_mib: 128,
        bare: { restore_to_ready_ms: b.restore },
        torpor: {
          suspend_ms: o.suspend,
          resume_ms: o.resume,
          suspend_phase_p50_ms: o.suspendPhases,
          resume_phase_p50_ms: o.resumePhases,
        },
        ratios: {
          resume_p50: round(o.resume.p50 / b.restore.p50),
          resume_p95: round(o.resume.p95 / b.restore.p95),
        },
        targets: { resume_ratio: 1.25 },
      },
      null,
      2,
    ),
  );
} finally {
  await rm(work, { recursive: true, force: true });
}
