// Micro-VM runtime: each activation is a VM driven directly by Torpor through a VMM driver (QEMU here; Cloud
// Hypervisor behind the same interface), with no containerd and no shim. The guest kernel and initramfs come
// from the runtime's assets; the image's rootfs is a read-only disk under an overlay in guest RAM, so the actor's
// writes travel with the memory snapshot. eth0 sits at the stable actor address on a tap in the activation's
// interior network namespace. A virtio-serial channel to the guest init starts the workload, runs exec, answers
// readiness and resynchronises the clock and the actor id after a restore.
import { createHash, randomBytes } from 'node:crypto';
import { existsSync } from 'node:fs';
import { mkdir, open, readdir, readFile, rename, rm, stat, symlink, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { TorporError } from '../../core/errors.ts';
import { elapsedMs } from '../../core/time.ts';
import type { Phases } from '../../core/types.ts';
import { perlExtentLoop } from '../../sys/extents.ts';
import { processRunning } from '../../sys/process.ts';
import { run as runProgram } from '../../sys/run.ts';
import { mergeEnv, processArgs } from '../gvisor/spec.ts';
import type {
  ActivationSpec,
  CheckpointResult,
  ExecResult,
  OutputListener,
  Restored,
  RestoreOptions,
  Sandbox,
  SandboxRuntime,
} from '../runtime.ts';
import { GuestControl } from './control.ts';
import { ensureRootDisk } from './disk.ts';
import { MEMORY_FILE, type Vm, type VmConfig, type VmmDriver } from './vmm.ts';

/** The guest's side of the activation network (the same on every worker: see src/net/worker-net.ts). */
export interface GuestNetwork {
  address: string;
  prefix: number;
  gateway: string;
  mac: string;
  /** The tap device in the activation's interior namespace. */
  tap: string;
}

export interface MicrovmRuntimeOptions {
  driver: VmmDriver;
  kernel: string;
  initrd: string;
  accel: 'kvm' | 'tcg';
  /** Per worker: one directory per sandbox (VMM sockets, logs), so `list` and leftovers are scoped to a slot. */
  stateRoot: string;
  /** Root disks built from image rootfs directories, shared by every worker of the machine. */
  diskCache: string;
  /** Guest RAM files: a tmpfs (default /dev/shm/torpor), so guest memory is never written back to a disk. */
  memoryDir?: string;
  network: GuestNetwork;
  /** How long a booted guest may take until its init answers (TCG boots take ~2 s on a quiet host). */
  bootTimeoutMs?: number;
}

/** The device model of a snapshot (vm.json), checked at restore. */
interface VmRecord {
  version: 1;
  driver: string;
  accel: 'kvm' | 'tcg';
  memoryMiB: number;
  vcpus: number;
  diskSha256: string;
  cmdline: string;
  mac: string;
  /** The actor the guest's id file names (absent in records from before it was kept): a restore for that same
   * actor sets the guest's clock alone. */
  actorId?: string;
}
const VM_RECORD = 'vm.json';
const CONTROL_TIMEOUT_MS = 10_000;

interface Running {
  vm: Vm;
  control?: GuestControl;
  config: VmConfig;
  /** Set before Torpor itself stops the VMM: any other exit is a crash. */
  stopping: boolean;
}

/** A VMM launched while the worker is idle, waiting for the snapshot its last checkpoint wrote (see prelaunch). */
interface Standby {
  vm: Vm & { adopt(config: VmConfig): void };
  config: VmConfig;
  /** The network namespace it runs in (by inode): one replaced since holds an old tap and is not adopted. */
  netns: number;
}

/** The run directory of a prelaunched VMM until a restore adopts it (never a sandbox id: those contain "--"). */
const STANDBY = 'prelaunched';

/** The host's TSC rate for the kernel command line: a TCG guest calibrating its own clock on a busy host may
 * hang or drift. */
async function hostTscKhz(): Promise<number | undefined> {
  const info = await readFile('/proc/cpuinfo', 'utf8').catch(() => '');
  const mhz = /^cpu MHz\s*:\s*([\d.]+)/m.exec(info)?.[1];
  return mhz ? Math.round(Number(mhz) * 1000) : undefined;
}

/** Moves a file into a checkpoint. Across file systems (guest RAM on tmpfs, checkpoints on disk) it is not
 * copied: it is renamed aside where it is and linked into the checkpoint (see src/sys/linked-files.ts), whose
 * owner moves it to disk once the snapshot is uploaded. Copying it took 50–65 ms of every suspend. */
async function moveFile(from: string, to: string): Promise<void> {
  if (await takeFile(from, to)) return;
  const staged = `${from}.checkpoint-${randomBytes(4).toString('hex')}`;
  await rename(from, staged);
  await symlink(staged, to);
}

async function sameSize(a: string, b: string): Promise<boolean> {
  const [x, y] = await Promise.all([stat(a).catch(() => undefined), stat(b).catch(() => undefined)]);
  return x !== undefined && y !== undefined && x.size === y.size;
}

/** Renames `from` to `to` when both are on one file system; false (and nothing changed) when they are not. */
async function takeFile(from: string, to: string): Promise<boolean> {
  try {
    await rename(from, to);
    return true;
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'EXDEV') return false;
    throw err;
  }
}

/** Creates (or replaces) `to` as a hole of `from`'s size: a VMM may open it as its RAM file from then on (QEMU
 * refuses a backing file shorter than guest memory, and cp truncates its target while it copies). */
export async function sizeAs(from: string, to: string): Promise<void> {
  const { size } = await stat(from);
  const target = await open(to, 'w');
  try {
    await target.truncate(size);
  } finally {
    await target.close();
  }
}

/** Copies the data extents of `from` (SEEK_DATA/SEEK_HOLE) into `to`, sized by sizeAs, at the same offsets: holes
 * stay holes and `to` keeps its size throughout, so a VMM launched with `to` as its RAM file may map it while the
 * copy runs — it must not touch guest RAM before the snapshot is loaded (QEMU in incoming state writes no ROM into
 * RAM). Perl is in every Debian (perl-base is essential) and seeks to data, which Node's fs cannot. The bytes move
 * by sendfile(2), inside the kernel (copy_file_range refuses to cross file systems: the snapshot is on disk, guest
 * RAM on tmpfs): ~25 % faster than reads and writes through a buffer (~40 vs ~53 ms for 100 MiB, page cache warm),
 * on the resume's critical path. Architectures without a known sendfile number copy through the buffer. */
export async function copyExtents(from: string, to: string, opts: { sendfile?: boolean } = {}): Promise<void> {
  const sendfile = opts.sendfile === false ? 0 : (SENDFILE_SYSCALL[process.arch] ?? 0);
  await runProgram('perl', ['-e', COPY_EXTENTS, from, to, String(sendfile)], {
    label: 'copy guest memory',
    timeoutMs: 120_000,
  });
}

const SENDFILE_SYSCALL: Partial<Record<string, number>> = { x64: 40, arm64: 71 };

const COPY_EXTENTS = `
use strict; use warnings;
my ($from, $to, $sendfile) = @ARGV;
open(my $in, '<:raw', $from) or die "open $from: $!\\n";
open(my $out, '+<:raw', $to) or die "open $to: $!\\n";
my $buf;
${perlExtentLoop(`  sysseek($out, $data, 0) // die "seek: $!\\n";
  my $left = $hole - $data;
  if ($sendfile) {
    # sendfile(out, in, &offset, count) writes at out's position and advances the offset it is given.
    my $at = pack('q', $data);
    while ($left > 0) {
      my $n = syscall($sendfile, fileno($out), fileno($in), $at, $left);
      die "sendfile: $!\\n" if $n < 0;
      die "$from shrank while it was copied\\n" if $n == 0;
      $left -= $n;
    }
  } else {
    sysseek($in, $data, 0) // die "seek: $!\\n";
    while ($left > 0) {
      my $n = sysread($in, $buf, $left < 4194304 ? $left : 4194304) // die "read: $!\\n";
      die "$from shrank while it was copied\\n" if $n == 0;
      for (my $w = 0; $w < $n;) { $w += syswrite($out, $buf, $n - $w, $w) // die "write: $!\\n"; }
      $left -= $n;
    }
  }`)}
close($out) or die "close: $!\\n";
`;

/** Kills a VMM and waits (up to 10 s) for it to exit. The wait keeps the process alive: a VMM's child handle does
 * not (it is detached), and a caller that is shutting down must still see it gone. */
async function killAndWait(vm: Vm): Promise<void> {
  vm.kill();
  let timer: NodeJS.Timeout | undefined;
  await Promise.race([vm.exited, new Promise((r) => (timer = setTimeout(r, 10_000)))]);
  clearTimeout(timer);
}

export class MicrovmRuntime implements SandboxRuntime {
  readonly name = 'microvm' as const;
  private readonly opts: MicrovmRuntimeOptions;
  private readonly running = new Map<string, Running>();
  private readonly exitListeners = new Set<(id: string, why: string) => void>();
  /** The VM model of the last checkpoint on this worker: what a prelaunched VMM is launched as. */
  private lastCheckpointed?: VmConfig;
  private standby?: Promise<Standby | undefined>;

  constructor(opts: MicrovmRuntimeOptions) {
    this.opts = opts;
  }

  private get memoryDir(): string {
    return this.opts.memoryDir ?? '/dev/shm/torpor';
  }

  private runDir(id: string): string {
    return join(this.opts.stateRoot, id);
  }

  /** Unix socket paths must fit in 108 bytes; a run directory under a data directory may not. */
  private socketDir(id: string): string {
    return join('/run/torpor-vm', createHash('sha256').update(this.runDir(id)).digest('hex').slice(0, 16));
  }

  private ramFile(id: string): string {
    return join(this.memoryDir, `${id}.ram`);
  }

  /** Next to the RAM files (tmpfs): a fetched snapshot's memory file becomes the VM's RAM file by a rename. */
  stagingDir(id: string): string {
    return join(this.memoryDir, `${id}.fetched`);
  }

  private async cmdline(): Promise<string> {
    const n = this.opts.network;
    const parts = ['console=ttyS0', 'loglevel=1', 'panic=-1', `torpor.ip=${n.address}/${n.prefix}`];
    parts.push(`torpor.gw=${n.gateway}`);
    if (this.opts.accel === 'tcg') {
      const khz = await hostTscKhz();
      if (khz) parts.push(`tsc_early_khz=${khz}`, 'tsc=reliable');
    }
    return parts.join(' ');
  }

  private vmConfig(spec: ActivationSpec, disk: string, memory: VmConfig['memory'], model: VmRecord): VmConfig {
    return {
      id: spec.id,
      // The activation's asset set (pinned by its snapshot, for a restore) names the guest and the VMM; the
      // runtime's own paths are the fallback for callers without one.
      kernel: spec.assets.kernel ?? this.opts.kernel,
      initrd: spec.assets.initrd ?? this.opts.initrd,
      ...(spec.assets.qemu ? { vmm: spec.assets.qemu } : {}),
      ...(spec.assets['qemu-tcg'] ? { tcgModule: spec.assets['qemu-tcg'] } : {}),
      ...(spec.assets.bios ? { firmware: spec.assets.bios } : {}),
      cmdline: model.cmdline,
      memoryMiB: model.memoryMiB,
      vcpus: model.vcpus,
      disk,
      netnsPath: spec.netnsPath,
      tap: this.opts.network.tap,
      mac: model.mac,
      runDir: this.runDir(spec.id),
      socketDir: this.socketDir(spec.id),
      consoleLog: spec.logFile,
      memory,
      accel: model.accel,
    };
  }

  /** Registers a started VMM and watches it: an exit Torpor did not ask for is reported to the listeners. */
  private supervise(id: string, vm: Vm, config: VmConfig): Running {
    const entry: Running = { vm, config, stopping: false };
    this.running.set(id, entry);
    void vm.exited.then((how) => {
      if (this.running.get(id) === entry) this.running.delete(id);
      if (entry.stopping) return;
      entry.control?.close();
      for (const l of this.exitListeners) l(id, `VMM exited unexpectedly (${how})`);
    });
    return entry;
  }

  onUnexpectedExit(listener: (id: string, why: string) => void): void {
    this.exitListeners.add(listener);
  }

  private async prepare(spec: ActivationSpec) {
    this.lastCheckpointed = undefined;
    await this.stop(spec.id);
    const disk = await ensureRootDisk(spec.rootfs, this.opts.diskCache);
    await mkdir(this.runDir(spec.id), { recursive: true });
    await mkdir(this.socketDir(spec.id), { recursive: true });
    await mkdir(this.memoryDir, { recursive: true });
    await writeFile(join(this.runDir(spec.id), 'owner'), `${process.pid}\n`);
    return disk;
  }

  async run(spec: ActivationSpec): Promise<Sandbox> {
    await this.discardPrelaunched();
    const disk = await this.prepare(spec);
    const model: VmRecord = {
      version: 1,
      driver: this.opts.driver.name,
      accel: this.opts.accel,
      memoryMiB: spec.memoryMiB,
      vcpus: spec.vcpus,
      diskSha256: disk.sha256,
      cmdline: await this.cmdline(),
      mac: this.opts.network.mac,
      actorId: spec.actorId,
    };
    await writeFile(join(this.runDir(spec.id), VM_RECORD), JSON.stringify(model));
    const config = this.vmConfig(spec, disk.path, { path: this.ramFile(spec.id), shared: true }, model);
    const vm = await this.opts.driver.boot(config).catch(async (err: unknown) => {
      throw await this.failure('boot', spec, err);
    });
    await this.writePid(spec.id, vm.pid);
    const entry = this.supervise(spec.id, vm, config);
    try {
      entry.control = await GuestControl.connect(vm.controlSocket, CONTROL_TIMEOUT_MS, () => vm.running());
      await entry.control.ping(this.opts.bootTimeoutMs ?? 30_000);
      await entry.control.start(
        {
          argv: processArgs(spec),
          env: mergeEnv(spec.image.env, spec.env),
          workDir: spec.image.workingDir || '/',
          actorId: spec.actorId,
        },
        CONTROL_TIMEOUT_MS,
      );
    } catch (err) {
      const failure = await this.failure('boot', spec, err);
      await this.destroy(spec.id);
      throw failure;
    }
    return { id: spec.id, spec, logFile: spec.logFile };
  }

  async checkpoint(sandbox: Sandbox, dir: string): Promise<CheckpointResult> {
    const entry = this.running.get(sandbox.id);
    if (!entry) throw new TorporError('FAILED_PRECONDITION', `VM ${sandbox.id} is not running`, { field: 'sandbox' });
    const phases: Phases = {};
    await rm(dir, { recursive: true, force: true });
    await mkdir(dir, { recursive: true });
    let t0 = performance.now();
    await entry.vm.pause();
    phases.pause = elapsedMs(t0);
    t0 = performance.now();
    const files = await entry.vm.snapshot(dir);
    phases.snapshot = elapsedMs(t0);
    t0 = performance.now();
    // Guest RAM in a shared file is the snapshot's memory as it stands (the VM is paused): move it, not copy it
    // (across file systems it is linked, see moveFile). RAM mapped privately travelled in the stream.
    if (this.opts.driver.ramInFile && entry.config.memory.shared) {
      await moveFile(entry.config.memory.path, join(dir, MEMORY_FILE));
      files.push(MEMORY_FILE);
    }
    // The device model travels with the snapshot: a restore rebuilds the same one (and refuses another disk).
    const record = await readFile(join(this.runDir(sandbox.id), VM_RECORD));
    await writeFile(join(dir, VM_RECORD), record);
    phases.capture = elapsedMs(t0);
    t0 = performance.now();
    entry.stopping = true;
    entry.control?.close();
    await entry.vm.shutdown();
    phases.shutdown = elapsedMs(t0);
    this.lastCheckpointed = entry.config;
    t0 = performance.now();
    await this.removeLeftovers(sandbox.id);
    phases.teardown = elapsedMs(t0);
    return { files: [...files, VM_RECORD].sort(), phases };
  }

  async restore(spec: ActivationSpec, dir: string, files: string[], opts: RestoreOptions = {}): Promise<Restored> {
    const phases: Phases = {};
    // A prelaunched VMM serves this restore if it is the one it was launched for; otherwise it goes first (it holds
    // the tap, which no second VMM can open).
    const standby = await this.standby;
    this.standby = undefined;
    let t0 = performance.now();
    const listed = files.length > 0 ? files : await readdir(dir);
    const model = JSON.parse(await readFile(join(dir, VM_RECORD), 'utf8')) as VmRecord;
    const disk = await this.prepare(spec);
    if (model.diskSha256 !== disk.sha256) {
      throw new TorporError(
        'RUNTIME_ERROR',
        `the snapshot's root disk (sha256 ${model.diskSha256.slice(0, 12)}) differs from this node's build of the image (${disk.sha256.slice(0, 12)})`,
        { field: 'rootfs' },
      );
    }
    if (model.accel !== this.opts.accel || model.driver !== this.opts.driver.name) {
      throw new TorporError(
        'RUNTIME_ERROR',
        `snapshot taken with ${model.driver}/${model.accel}, this worker runs ${this.opts.driver.name}/${this.opts.accel}`,
        { field: 'runtime' },
      );
    }
    // The guest names this actor once the resync below is done (a failed one fails the restore).
    const sameActor = model.actorId === spec.actorId;
    await writeFile(join(this.runDir(spec.id), VM_RECORD), JSON.stringify({ ...model, actorId: spec.actorId }));
    // Not "prepare": that is the agent's phase (the worker's network), which these phases are merged into.
    phases.disk = elapsedMs(t0);
    t0 = performance.now();
    // Guest RAM lives in a shared file the VM owns, so its next snapshot is again a memory file next to a small
    // device-state stream (cheap to write, and chunk-aligned: unchanged pages dedup against this snapshot). The
    // snapshot's own memory file is never modified (forks and kept copies share it): it is copied (sparse: a
    // guest's untouched RAM is holes) into the VM's file. A snapshot without one carried RAM in its stream, which
    // lands in the fresh file. A VMM without RAM files maps the snapshot's memory copy-on-write.
    const memory = this.opts.driver.ramInFile
      ? { path: this.ramFile(spec.id), shared: true }
      : { path: join(dir, MEMORY_FILE), shared: false };
    // The copy runs while the VMM launches (the file is full-sized first, see copyExtents) and must be done
    // before the snapshot is loaded: `memory` is the copy's own time, `restore` the launch and load, overlapping it.
    // A snapshot the caller fetched for this restore alone (disposable), or the memory a suspend on this worker
    // left on tmpfs (takeable), gives its memory file up instead when it is on the RAM files' file system (see
    // stagingDir): nothing is copied (phase `take`).
    let copied: Promise<void> | undefined;
    let tookHeld: string | undefined;
    if (memory.shared && listed.includes(MEMORY_FILE)) {
      const start = t0;
      const source = join(dir, MEMORY_FILE);
      const held = opts.takeable?.[MEMORY_FILE];
      if (held && (await sameSize(held, source)) && (await takeFile(held, memory.path))) {
        phases.take = elapsedMs(start);
        tookHeld = held;
      } else if (opts.disposable && (await takeFile(source, memory.path))) {
        phases.take = elapsedMs(start);
      } else {
        // Sized before the VMM is launched, so that it never sees the file missing or short.
        await sizeAs(source, memory.path);
        copied = copyExtents(source, memory.path).then(() => {
          phases.memory = elapsedMs(start);
        });
        copied.catch(() => undefined); // awaited before the load, or after a failed launch
      }
    }
    const config = this.vmConfig(spec, disk.path, memory, model);
    let control: GuestControl | undefined;
    const beforeLoad = async (started: Vm) => {
      control = await GuestControl.connect(started.controlSocket, CONTROL_TIMEOUT_MS, () => started.running());
      await copied;
    };
    const adoptStart = performance.now();
    const adopted =
      standby && tookHeld
        ? await this.adopt(standby, config, tookHeld).catch(async (err: unknown) => {
            await this.stopStandby(standby);
            throw await this.failure('restore', spec, err);
          })
        : undefined;
    if (adopted) phases.adopt = elapsedMs(adoptStart);
    else if (standby) await this.stopStandby(standby);
    const { driver } = this.opts;
    const restoring =
      adopted && driver.load
        ? driver.load(adopted.vm, dir, listed, beforeLoad)
        : driver.restore(config, dir, listed, beforeLoad);
    const vm = await restoring.catch(async (err: unknown) => {
      control?.close();
      // No copy may still write the RAM file once this restore has failed (its cleanup removes the file).
      await copied?.catch(() => undefined);
      throw await this.failure('restore', spec, err);
    });
    await this.writePid(spec.id, vm.pid, adopted?.launchedAs);
    const entry = this.supervise(spec.id, vm, config);
    entry.control = control;
    phases.restore = elapsedMs(t0);
    let settled: Promise<Phases>;
    try {
      // The VM has been paused since its launch (-incoming): it first runs at `resume`.
      await opts.beforeRun;
      if (!entry.control) throw new TorporError('RUNTIME_ERROR', 'guest control channel not connected');
      // The guest's clock stood still while it was suspended, and the actor may be someone else now (a fork): for
      // the actor the guest already names, the clock alone is set (see GuestControl.clock). The request is sent
      // before the guest runs again, so it is the first thing the guest does (its control server has been waiting
      // on the port since the snapshot) rather than work interleaved with the readiness answer; the caller probes
      // readiness meanwhile, and the activation is ready once both are done. Requests after this one (exec) are
      // answered after it.
      const sent = performance.now();
      const resynced = sameActor
        ? entry.control.clock(new Date(), spec.actorId, CONTROL_TIMEOUT_MS)
        : entry.control.resync(new Date(), spec.actorId, CONTROL_TIMEOUT_MS);
      settled = resynced.then(
        () => ({ resync: elapsedMs(sent) }),
        async (err: unknown) => {
          throw await this.failure('restore', spec, err);
        },
      );
      settled.catch(() => undefined); // handled by the caller; not an unhandled rejection if it never gets there
      t0 = performance.now();
      await vm.resume();
      phases.resume = elapsedMs(t0);
    } catch (err) {
      const failure = await this.failure('restore', spec, err);
      await this.destroy(spec.id);
      throw failure;
    }
    return { sandbox: { id: spec.id, spec, logFile: spec.logFile }, phases, settled };
  }

  /** Launches, while the worker is idle, the VMM that restoring its last checkpoint will need: the same device
   * model, waiting for a snapshot, on the guest memory the worker holds for it (`held`, which a restore of that
   * checkpoint here takes: see RestoreOptions.takeable). That restore then only loads the device state and runs,
   * instead of starting QEMU (~50–130 ms here). It needs the worker's next network (the tap) in place. An idle
   * worker pays the VMM's own memory (tens of MiB; guest RAM is the held file's). Best effort: a VMM that cannot
   * start is no error, the restore launches its own. */
  async prelaunch(held: Record<string, string>): Promise<void> {
    await this.discardPrelaunched();
    const last = this.lastCheckpointed;
    const memory = held[MEMORY_FILE];
    const driver = this.opts.driver;
    if (!last || !memory || !driver.prelaunch || !driver.load || !driver.ramInFile) return;
    const launching = (async (): Promise<Standby> => {
      await this.stop(STANDBY);
      const config: VmConfig = {
        ...last,
        id: STANDBY,
        runDir: this.runDir(STANDBY),
        socketDir: this.socketDir(STANDBY),
        memory: { path: memory, shared: true },
      };
      await mkdir(config.runDir, { recursive: true });
      await mkdir(config.socketDir, { recursive: true });
      await writeFile(join(config.runDir, 'owner'), `${process.pid}\n`);
      const netns = (await stat(config.netnsPath)).ino;
      const vm = await driver.prelaunch!(config);
      await this.writePid(STANDBY, vm.pid);
      return { vm, config, netns };
    })();
    const standby = launching.catch(async () => {
      await this.stop(STANDBY);
      return undefined;
    });
    this.standby = standby;
    await standby;
  }

  /** Removes the guest memory files of sandboxes whose ids start with `prefix` (RAM files, memory held after a
   * suspend, snapshots staged for a restore): an agent that starts again (after a crash) owns none of them any more,
   * its predecessor's checkpoints having been settled onto disk first, and each would hold its size of RAM. */
  async removeLeftoverMemory(prefix: string): Promise<void> {
    if (prefix === '') throw new RangeError('a prefix is needed: the memory directory may be shared');
    const names = await readdir(this.memoryDir).catch(() => [] as string[]);
    for (const name of names.filter((n) => n.startsWith(prefix))) {
      await rm(join(this.memoryDir, name), { recursive: true, force: true });
    }
  }

  /** Stops a prelaunched VMM, if there is one. */
  async discardPrelaunched(): Promise<void> {
    const standby = await this.standby;
    this.standby = undefined;
    if (standby) await this.stopStandby(standby);
  }

  private async stopStandby(standby: Standby): Promise<void> {
    await killAndWait(standby.vm);
    await this.stop(STANDBY);
  }

  /** Makes the prelaunched VMM sandbox `config.id`'s if it is the VM `config` describes and maps the guest memory
   * the restore took (`tookHeld`, since renamed to config.memory.path: the same file). Its directories move to the
   * sandbox's (its sockets stay reachable through them); undefined when it does not fit. */
  private async adopt(
    standby: Standby,
    config: VmConfig,
    tookHeld: string,
  ): Promise<{ vm: Standby['vm']; launchedAs: string } | undefined> {
    const model = (c: VmConfig) => JSON.stringify({ ...c, id: '', runDir: '', socketDir: '', memory: c.memory.shared });
    const fits =
      standby.vm.running() &&
      standby.config.memory.path === tookHeld &&
      model(standby.config) === model(config) &&
      (await stat(config.netnsPath).catch(() => undefined))?.ino === standby.netns;
    if (!fits) return undefined;
    const record = await readFile(join(config.runDir, VM_RECORD));
    await rm(config.runDir, { recursive: true, force: true });
    await rm(config.socketDir, { recursive: true, force: true });
    await rename(standby.config.runDir, config.runDir);
    await rename(standby.config.socketDir, config.socketDir);
    await writeFile(join(config.runDir, VM_RECORD), record);
    standby.vm.adopt(config);
    return { vm: standby.vm, launchedAs: standby.config.socketDir };
  }

  async exec(sandbox: Sandbox, command: string[], timeoutMs: number, onOutput?: OutputListener): Promise<ExecResult> {
    const control = this.running.get(sandbox.id)?.control;
    if (!control) throw new TorporError('FAILED_PRECONDITION', 'actor is not running', { field: 'status' });
    if (command.length === 0) throw new TorporError('INVALID_ARGUMENT', 'command is empty', { field: 'command' });
    const r = await control.exec(command, timeoutMs, onOutput);
    return { exitCode: r.exitCode, stdout: r.stdout.toString(), stderr: r.stderr.toString() };
  }

  async alive(id: string): Promise<boolean> {
    const entry = this.running.get(id);
    if (entry) return entry.vm.running();
    return (await this.recordedVmm(id)) !== undefined;
  }

  async destroy(id: string): Promise<void> {
    await this.stop(id);
    await rm(this.stagingDir(id), { recursive: true, force: true });
  }

  /** Kills the sandbox's VMM (this process's, or one an earlier process left) and removes its files, but not a
   * snapshot staged for its restore. */
  private async stop(id: string): Promise<void> {
    const entry = this.running.get(id);
    if (entry) {
      entry.stopping = true;
      entry.control?.close();
      await killAndWait(entry.vm);
      this.running.delete(id);
    } else {
      // A VMM left by an earlier process (its pid recorded in the run directory).
      const pid = await this.recordedVmm(id);
      if (pid !== undefined) {
        process.kill(pid, 'SIGKILL');
        for (let i = 0; i < 1000 && (await processRunning(pid)); i++) await new Promise((r) => setTimeout(r, 10));
      }
    }
    await this.removeLeftovers(id);
  }

  async list(): Promise<string[]> {
    const entries = await readdir(this.opts.stateRoot, { withFileTypes: true }).catch(() => []);
    return entries.filter((e) => e.isDirectory()).map((e) => e.name);
  }

  private async removeLeftovers(id: string): Promise<void> {
    await rm(this.runDir(id), { recursive: true, force: true });
    await rm(this.socketDir(id), { recursive: true, force: true });
    await rm(this.ramFile(id), { force: true });
  }

  /** The VMM's pid, and the socket directory it was launched with (its command line names it; a prelaunched VMM's
   * is not its sandbox's). */
  private async writePid(id: string, pid: number, launchedAs = this.socketDir(id)): Promise<void> {
    await writeFile(join(this.runDir(id), 'pid'), `${pid}\n${launchedAs}\n`);
  }

  /** The pid recorded for sandbox `id`'s VMM, if that process still runs and is it (not a recycled pid): its
   * command line names the socket directory recorded with the pid. */
  private async recordedVmm(id: string): Promise<number | undefined> {
    const [pidText, launchedAs] = (await readFile(join(this.runDir(id), 'pid'), 'utf8').catch(() => '')).split('\n');
    const pid = Number.parseInt(pidText ?? '', 10);
    if (!Number.isInteger(pid) || pid <= 0 || !(await processRunning(pid))) return undefined;
    const cmdline = await readFile(`/proc/${pid}/cmdline`, 'utf8').catch(() => '');
    return cmdline.includes(launchedAs || this.socketDir(id)) ? pid : undefined;
  }

  /** A boot or restore error with the tail of what the VMM and the guest console said. */
  private async failure(what: string, spec: ActivationSpec, err: unknown): Promise<TorporError> {
    const tail = async (path: string) =>
      existsSync(path) ? (await readFile(path, 'utf8')).trim().split('\n').slice(-3).join(' | ') : '';
    const vmm = await tail(join(this.runDir(spec.id), 'qemu.log'));
    const guest = await tail(spec.logFile);
    const message = err instanceof Error ? err.message : String(err);
    const details = [vmm && `VMM: ${vmm}`, guest && `guest: ${guest}`].filter(Boolean).join('; ');
    return new TorporError(
      err instanceof TorporError && err.code === 'TIMEOUT' ? 'TIMEOUT' : 'RUNTIME_ERROR',
      `micro-VM ${what} failed: ${message}${details ? ` (${details})` : ''}`,
      { cause: err },
    );
  }
}
