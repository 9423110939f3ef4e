// bench/microvm: Torpor's micro-VM suspend and resume (through the REST API, as a user drives them) for several
// guest memory sizes, each next to a bare QMP suspend and resume of the same VM in the same run: the same QEMU,
// guest kernel and initrd, root disk, device model (vm.json of Torpor's snapshot) and kind of network (a worker's
// namespaces with a tap), driven by hand over QMP.
//   bare resume  = launch QEMU with `-incoming defer`, `migrate-incoming exec:cat STATE`, `cont`, then poll the
//                  counter's /healthz until it answers. Torpor's resume is measured to the same end point: the
//                  API answers a resume once the actor's readiness probe (the same /healthz) has passed.
//                  Both load the same snapshot: the one Torpor's suspend of this cycle wrote; the bare VM maps its
//                  memory file copy-on-write (the cheapest bare restore; Torpor's runtime copies it into a RAM file
//                  the VM owns, so that its next snapshot is a memory file again).
//   bare suspend = `stop`, plain `migrate` (RAM in the stream, x-ignore-shared off: a VM restored copy-on-write
//                  has no shared RAM file to leave out) to a file on the data directory's disk, then fsync. Torpor's suspend is measured to the snapshot
//                  being durable in the blob store (chunked, uploaded, manifest written).
// Interleaved: every cycle is Torpor's suspend, the bare resume and suspend of that snapshot, then Torpor's resume,
// so both sides of a ratio meet the same load (this machine's other work moves the figures between runs).
// Bytes stored per snapshot: the objects a suspend adds to the blob store (new chunks, deltas, the manifest: after
// dedup and compression), next to the snapshot's own file sizes and the bare migration file's size.
// Prints one JSON document: p50/p95 in ms, per-phase medians, ratios (Torpor / bare) and the load average.
// Usage: node bench/microvm.ts [--cycles N] [--sizes 128,256,512] [--network-base 204]
//   (root; QEMU and the guest from scripts/setup.sh)
import { spawn } from 'node:child_process';
import { mkdir, mkdtemp, open, readdir, readFile, rm, stat } from 'node:fs/promises';
import { loadavg, tmpdir } from 'node:os';
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
import { round, type Summary, summary } from './lib/bare.ts';

const { values } = parseArgs({
  options: {
    cycles: { type: 'string', default: '5' },
    sizes: { type: 'string', default: '128,256,512' },
    'network-base': { type: 'string', default: '204' },
  },
});
const cycles = Number(values.cycles);
const sizes = values.sizes.split(',').map(Number);
if (!(cycles > 0) || sizes.some((s) => !(s >= 64))) throw new Error('--cycles N (> 0) --sizes MiB,MiB,... (>= 64)');
const log = pino({ level: 'warn' });
// Network indices of this benchmark (bench/router uses 230, the micro-VM e2e test 200): Torpor's worker pool
// takes NETWORK_BASE and the next one, the bare VM BARE_NETWORK (NETWORK_BASE + 3). --network-base moves all three,
// so two runs on one machine do not collide.
const NETWORK_BASE = Number(values['network-base']);
const BARE_NETWORK = NETWORK_BASE + 3;
if (!Number.isSafeInteger(NETWORK_BASE) || NETWORK_BASE < 0) throw new Error('--network-base N (a network index)');

interface Actor {
  address?: string;
  snapshot?: string;
  lastOperation?: { phases: Record<string, number> };
}

function phaseMedians(ops: Record<string, number>[]): Record<string, number> {
  const names = new Set(ops.flatMap((o) => Object.keys(o)));
  return Object.fromEntries([...names].map((n) => [n, round(summary(ops.map((o) => o[n] ?? 0)).p50)]));
}

const ms = (s: Summary) => ({ p50: round(s.p50), p95: round(s.p95), min: round(s.min), max: round(s.max), n: s.n });

async function waitForFreeWorker(base: string): Promise<void> {
  for (let i = 0; i < 500; i++) {
    const workers = await api<{ items: { state: string; runtime: string }[] }>(base, 'GET', '/v1/workers');
    if (workers.items.some((w) => w.runtime === 'microvm' && w.state === 'free')) return;
    await new Promise((r) => setTimeout(r, 20));
  }
}

/** Every object in the blob store and its size (what a suspend adds is the difference). */
async function blobObjects(root: string): Promise<Map<string, number>> {
  const found = new Map<string, number>();
  const walk = async (dir: string): Promise<void> => {
    for (const e of await readdir(dir, { withFileTypes: true }).catch(() => [])) {
      const path = join(dir, e.name);
      if (e.isDirectory()) {
        if (e.name !== '.tmp') await walk(path);
      } else found.set(path, (await stat(path)).size);
    }
  };
  await walk(root);
  return found;
}

function addedBytes(before: Map<string, number>, after: Map<string, number>): number {
  let sum = 0;
  for (const [path, size] of after) if (!before.has(path)) sum += size;
  return sum;
}

type Torpor = Awaited<ReturnType<typeof up>>;

/** The actor of one guest memory size, created through the API and resumed once (a boot from its golden
 * snapshot). */
async function startActor(t: Torpor, ref: string, memoryMiB: number): Promise<{ path: string; actor: Actor }> {
  const template = `bench-vm-${memoryMiB}`;
  const path = `/v1/spaces/bench/actors/vm-${memoryMiB}`;
  await api(t.url, 'POST', '/v1/templates', {
    name: template,
    image: ref,
    port: 8080,
    runtime: 'microvm',
    readiness: { path: '/healthz', timeoutSeconds: 60 },
    resources: { memoryMiB, vcpus: 1 },
  });
  await api(t.url, 'POST', '/v1/spaces/bench/actors', { name: `vm-${memoryMiB}`, template });
  return { path, actor: await api<Actor>(t.url, 'POST', `${path}/resume`, {}) };
}

interface Samples {
  suspend: number[];
  resume: number[];
  suspendPhases: Record<string, number>[];
  resumePhases: Record<string, number>[];
}

const samples = (): Samples => ({ suspend: [], resume: [], suspendPhases: [], resumePhases: [] });

/** `cycles` rounds for one guest memory size: Torpor's suspend (through the API), the bare resume and suspend of
 * the snapshot it wrote, Torpor's resume. */
async function cyclesFor(
  t: Torpor,
  ref: string,
  memoryMiB: number,
  bareEnv: { net: WorkerNetwork; paths: BarePaths; work: string },
  blobRoot: string,
) {
  const torpor = samples();
  const bare = samples();
  const stored: number[] = [];
  const bareFileBytes: number[] = [];
  let snapshotFiles: Record<string, number> = {};
  const blob = new FsBlobStore(blobRoot);
  const { path, actor: first } = await startActor(t, ref, memoryMiB);
  let actor = first;
  for (let i = 0; i < cycles; i++) {
    const got = Number(await (await fetch(`http://${actor.address}/`)).text());
    if (got !== i + 1) throw new Error(`counter returned ${got}, expected ${i + 1}: memory was lost`);
    const before = await blobObjects(blobRoot);
    let t0 = performance.now();
    actor = await api<Actor>(t.url, 'POST', `${path}/suspend`, {});
    torpor.suspend.push(performance.now() - t0);
    stored.push(addedBytes(before, await blobObjects(blobRoot)));
    torpor.suspendPhases.push(actor.lastOperation?.phases ?? {});

    // The same snapshot, rebuilt from the object store into a plain directory (outside the timing).
    const snapshotDir = join(bareEnv.work, `snapshot-${memoryMiB}`);
    await restoreSnapshot({ blob, key: actor.snapshot!, dir: snapshotDir });
    snapshotFiles = await filesBytes(snapshotDir);
    const b = await bareCycle(bareEnv.net, bareEnv.paths, snapshotDir, bareEnv.work, i);
    await rm(snapshotDir, { recursive: true, force: true });
    bare.resume.push(b.resume);
    bare.suspend.push(b.suspend);
    bare.resumePhases.push(b.phases);
    bareFileBytes.push(b.fileBytes);

    await waitForFreeWorker(t.url);
    t0 = performance.now();
    actor = await api<Actor>(t.url, 'POST', `${path}/resume`, {});
    torpor.resume.push(performance.now() - t0);
    torpor.resumePhases.push(actor.lastOperation?.phases ?? {});
  }
  // The next size needs the one micro-VM worker.
  await api(t.url, 'POST', `${path}/suspend`, {});
  await waitForFreeWorker(t.url);
  return { torpor, bare, stored: summary(stored), bareFileBytes: summary(bareFileBytes), snapshotFiles };
}

interface BarePaths {
  qemu: string;
  kernel: string;
  initrd: string;
  disk: string;
}

interface VmModel {
  cmdline: string;
  memoryMiB: number;
  vcpus: number;
  mac: string;
  accel: 'kvm' | 'tcg';
}

async function fsyncFile(path: string): Promise<void> {
  const handle = await open(path, 'r+');
  try {
    await handle.sync();
  } finally {
    await handle.close();
  }
}

async function untilStatus(qmp: QmpClient, leave: string): Promise<void> {
  for (let i = 0; i < 120_000; i++) {
    const { status } = await qmp.execute<{ status: string }>('query-status');
    if (status !== leave) return;
    await new Promise((r) => setTimeout(r, 1));
  }
}

async function untilMigrated(qmp: QmpClient): Promise<void> {
  for (let i = 0; i < 120_000; i++) {
    const m = await qmp.execute<{ status?: string }>('query-migrate');
    if (m.status === 'completed') return;
    if (m.status === 'failed' || m.status === 'cancelled') throw new Error(`bare migrate ${m.status}`);
    await new Promise((r) => setTimeout(r, 1));
  }
}

/** Bare QEMU over QMP: resume a snapshot directory of Torpor's to ready, then suspend it to a file. */
async function bareCycle(net: WorkerNetwork, paths: BarePaths, snapshotDir: string, work: string, i: number) {
  const model = JSON.parse(await readFile(join(snapshotDir, 'vm.json'), 'utf8')) as VmModel;
  if (!(await readdir(snapshotDir)).includes('memory')) throw new Error(`${snapshotDir} has no memory file`);
  const url = `http://${net.address}:8080/healthz`;
  await net.prepare();
  await net.activate({ ports: [8080], egress: 'allow-all', actor: 'bench/bare' });
  // Short: unix socket paths must fit in 108 bytes.
  const runDir = `/run/torpor-vm/bare-${process.pid}-${i}`;
  const saved = join(work, `bare-${model.memoryMiB}-${i}.state`);
  await mkdir(runDir, { recursive: true });
  const args = qemuArgs(
    {
      id: 'bare',
      kernel: paths.kernel,
      initrd: paths.initrd,
      cmdline: model.cmdline,
      memoryMiB: model.memoryMiB,
      vcpus: model.vcpus,
      disk: paths.disk,
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
  let t0 = performance.now();
  const phase: Record<string, number> = {};
  const mark = (name: string) => {
    phase[name] = performance.now() - t0 - Object.values(phase).reduce((a, b) => a + b, 0);
  };
  const child = spawn('nsenter', [`--net=${net.netnsPath}`, '--', paths.qemu, ...args], { stdio: 'ignore' });
  try {
    const qmp = await QmpClient.connect(join(runDir, 'qmp.sock'), 10_000, () => child.exitCode === null);
    // QEMU throttles migrations to 128 MiB/s by default; Torpor lifts that too.
    await qmp.execute('migrate-set-parameters', { 'max-bandwidth': 64 * 1024 ** 3 });
    await qmp.execute('migrate-set-capabilities', {
      capabilities: [{ capability: 'x-ignore-shared', state: true }],
    });
    mark('launch');
    await qmp.execute('migrate-incoming', { uri: `exec:cat ${join(snapshotDir, 'state')}` });
    await untilStatus(qmp, 'inmigrate');
    mark('load');
    await qmp.execute('cont');
    mark('cont');
    await waitReady(url, 30_000);
    mark('ready');
    const resume = performance.now() - t0;

    const got = await (await fetch(`http://${net.address}:8080/`)).text();
    if (!/^\d+$/.test(got.trim())) throw new Error(`bare counter answered ${got}`);
    await qmp.execute('migrate-set-capabilities', {
      capabilities: [{ capability: 'x-ignore-shared', state: false }],
    });
    t0 = performance.now();
    await qmp.execute('stop');
    await qmp.execute('migrate', { uri: `exec:cat > ${saved}` });
    await untilMigrated(qmp);
    await fsyncFile(saved);
    const suspend = performance.now() - t0;
    const fileBytes = (await stat(saved)).size;
    qmp.close();
    return { resume, suspend, fileBytes, phases: phase };
  } finally {
    child.kill('SIGKILL');
    if (child.exitCode === null) await new Promise((r) => child.once('exit', r));
    await rm(runDir, { recursive: true, force: true });
    await rm(saved, { force: true });
  }
}

async function filesBytes(dir: string): Promise<Record<string, number>> {
  const out: Record<string, number> = {};
  for (const name of (await readdir(dir)).sort()) out[name] = (await stat(join(dir, name))).size;
  return out;
}

const found = locateMicrovm();
if (!found.paths) throw new Error(found.missing.join('; '));
const { qemu, kernel, initrd } = found.paths;
const work = await mkdtemp(join(tmpdir(), 'torpor-bench-microvm-'));
const loadBefore = loadavg().map(round);
const results: Record<string, unknown>[] = [];
try {
  const { ref } = await buildCounterImage(join(work, 'image'));
  const dataDir = join(work, 'torpor');
  const blobRoot = join(dataDir, 'blobs');
  const t = await up({
    dataDir,
    host: '127.0.0.1',
    port: 0,
    routerPort: 0,
    workers: 1,
    microvmWorkers: 1,
    networkBase: NETWORK_BASE,
    log,
  });
  const node = new NodeNetwork({ index: BARE_NETWORK });
  const net = new WorkerNetwork({ index: BARE_NETWORK, node, tap: true });
  try {
    await node.ensure();
    await net.ensure();
    const rootfs = (await new ImageStore(join(dataDir, 'images')).resolve(ref)).rootfs;
    const disk = join(dataDir, 'microvm', 'disks', `${basename(rootfs)}.ext4`);
    for (const memoryMiB of sizes) {
      const o = await cyclesFor(t, ref, memoryMiB, { net, paths: { qemu, kernel, initrd, disk }, work }, blobRoot);
      const torpor = { suspend: summary(o.torpor.suspend), resume: summary(o.torpor.resume) };
      const bare = { suspend: summary(o.bare.suspend), resume: summary(o.bare.resume) };
      results.push({
        guest_memory_mib: memoryMiB,
        torpor: {
          suspend_ms: ms(torpor.suspend),
          resume_ms: ms(torpor.resume),
          suspend_phase_p50_ms: phaseMedians(o.torpor.suspendPhases),
          resume_phase_p50_ms: phaseMedians(o.torpor.resumePhases),
        },
        bare: {
          suspend_ms: ms(bare.suspend),
          resume_to_ready_ms: ms(bare.resume),
          resume_phase_p50_ms: phaseMedians(o.bare.resumePhases),
        },
        ratios: {
          suspend_p50: round(torpor.suspend.p50 / bare.suspend.p50),
          suspend_p95: round(torpor.suspend.p95 / bare.suspend.p95),
          resume_p50: round(torpor.resume.p50 / bare.resume.p50),
          resume_p95: round(torpor.resume.p95 / bare.resume.p95),
        },
        bytes: {
          stored_per_snapshot_p50: o.stored.p50,
          stored_per_snapshot_max: o.stored.max,
          snapshot_files: o.snapshotFiles,
          bare_migration_file_p50: o.bareFileBytes.p50,
        },
      });
    }
  } finally {
    await net.destroy().catch(() => undefined);
    await node.destroy().catch(() => undefined);
    await t.stop();
  }
  const kvm = await probeKvm(qemu, kernel, initrd);
  console.log(
    JSON.stringify(
      {
        benchmark: 'microvm',
        cycles,
        qemu,
        accel: kvm.usable ? 'kvm' : 'tcg',
        load_average: { before: loadBefore, after: loadavg().map(round) },
        sizes: results,
        targets: { suspend_ratio: 1.25, resume_ratio: 1.25 },
      },
      null,
      2,
    ),
  );
} finally {
  await rm(work, { recursive: true, force: true });
}
