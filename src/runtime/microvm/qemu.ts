// QEMU driver: the `microvm` machine (no PCI, no firmware tables beyond what a virtio-mmio guest needs), driven
// over QMP. Snapshots are QEMU migrations into a file (`exec:cat`): with guest RAM in a shared file and the
// `x-ignore-shared` capability, the stream holds only device state (a few hundred KiB) and the RAM file is the
// snapshot's memory. A restore maps the RAM file it is given (the runtime gives it a private copy of the
// snapshot's, so the snapshot is never written and several VMs (forks) can start from it). QEMU 7.2 (Debian 12) has no `file:` migration URI, hence `exec:cat`.
import { type ChildProcess, spawn } from 'node:child_process';
import { closeSync, existsSync, mkdirSync, openSync, rmSync, symlinkSync } from 'node:fs';
import { join } from 'node:path';
import { TorporError } from '../../core/errors.ts';
import { run } from '../../sys/run.ts';
import { QmpClient } from './qmp.ts';
import { MEMORY_FILE, type Vm, type VmConfig, type VmmDriver, type VmmStatus } from './vmm.ts';

export const STATE_FILE = 'state';
const QMP_TIMEOUT_MS = 10_000;
const MIGRATION_TIMEOUT_MS = 120_000;

export interface QemuOptions {
  /** qemu-system-x86_64. */
  binary: string;
}

/** Single-quoted for `sh -c` (QEMU runs exec: URIs through the shell). */
function shellQuote(text: string): string {
  return `'${text.replace(/'/g, `'\\''`)}'`;
}

export function qemuArgs(c: VmConfig, incoming: boolean): string[] {
  const mem = `${c.memoryMiB}M`;
  return [
    '-machine',
    'microvm,x-option-roms=off,rtc=on,isa-serial=on,memory-backend=mem',
    '-accel',
    c.accel,
    '-cpu',
    c.accel === 'kvm' ? 'host' : 'max',
    '-m',
    mem,
    '-smp',
    String(c.vcpus),
    '-nodefaults',
    '-no-user-config',
    '-display',
    'none',
    '-object',
    `memory-backend-file,id=mem,size=${mem},mem-path=${c.memory.path},share=${c.memory.shared ? 'on' : 'off'}`,
    '-chardev',
    `file,id=con,path=${c.consoleLog},append=on`,
    '-serial',
    'chardev:con',
    '-qmp',
    `unix:${join(c.socketDir, 'qmp.sock')},server=on,wait=off`,
    '-drive',
    `if=none,id=root,file=${c.disk},format=raw,readonly=on`,
    '-device',
    'virtio-blk-device,drive=root',
    '-netdev',
    `tap,id=net0,ifname=${c.tap},script=no,downscript=no`,
    '-device',
    `virtio-net-device,netdev=net0,mac=${c.mac}`,
    '-device',
    'virtio-serial-device',
    '-chardev',
    `socket,id=ctl,path=${join(c.socketDir, 'control.sock')},server=on,wait=off`,
    '-device',
    'virtserialport,chardev=ctl,name=torpor.0',
    ...(c.firmware ? ['-bios', c.firmware] : []),
    '-kernel',
    c.kernel,
    '-initrd',
    c.initrd,
    '-append',
    c.cmdline,
    // A restore starts paused (-S) and waits for the migration stream; `cont` resumes it.
    ...(incoming ? ['-S', '-incoming', 'defer'] : []),
  ];
}

class QemuVm implements Vm {
  readonly pid: number;
  readonly exited: Promise<number | string>;
  private readonly child: ChildProcess;
  private config: VmConfig;
  private qmp?: QmpClient;
  private done = false;

  constructor(child: ChildProcess, config: VmConfig) {
    this.child = child;
    this.config = config;
    this.pid = child.pid ?? -1;
    this.exited = new Promise((resolve) => {
      child.once('exit', (code, signal) => {
        this.done = true;
        this.qmp?.close();
        resolve(code ?? signal ?? 'unknown');
      });
    });
  }

  get controlSocket(): string {
    return join(this.config.socketDir, 'control.sock');
  }

  running(): boolean {
    return !this.done;
  }

  /** The VM now goes by `config` (a prelaunched VMM adopted by a restore: its directories were moved there). The
   * device model must be the one it was launched with. */
  adopt(config: VmConfig): void {
    this.config = config;
  }

  async connect(): Promise<void> {
    this.qmp = await QmpClient.connect(join(this.config.socketDir, 'qmp.sock'), QMP_TIMEOUT_MS, () => this.running());
    // The default (128 MiB/s) throttles a local file write.
    await this.qmp.execute('migrate-set-parameters', { 'max-bandwidth': 64 * 1024 ** 3 });
  }

  /** With x-ignore-shared, RAM in a shared file stays out of the stream. Both ends must agree (the stream names
   * the capability), so it is on exactly when the snapshot has a memory file. */
  async ignoreSharedMemory(on: boolean): Promise<void> {
    await this.client.execute('migrate-set-capabilities', {
      capabilities: [{ capability: 'x-ignore-shared', state: on }],
    });
  }

  private get client(): QmpClient {
    if (!this.qmp || !this.running()) throw new TorporError('RUNTIME_ERROR', `VM ${this.config.id} is not running`);
    return this.qmp;
  }

  async status(): Promise<string> {
    return (await this.client.execute<{ status: string }>('query-status')).status;
  }

  async pause(): Promise<void> {
    if ((await this.status()) === 'running') await this.client.execute('stop');
  }

  /** `cont` on a running VM does nothing, so no status query first (a round trip on every resume's path). */
  async resume(): Promise<void> {
    await this.client.execute('cont');
  }

  async snapshot(dir: string): Promise<string[]> {
    await this.pause();
    await this.ignoreSharedMemory(this.config.memory.shared);
    await this.client.execute('migrate', { uri: `exec:cat > ${shellQuote(join(dir, STATE_FILE))}` });
    await this.waitMigration();
    return [STATE_FILE];
  }

  private async waitMigration(): Promise<void> {
    const deadline = Date.now() + MIGRATION_TIMEOUT_MS;
    for (let delay = 1; Date.now() < deadline; delay = Math.min(delay * 2, 20)) {
      const m = await this.client.execute<{ status?: string; 'error-desc'?: string }>('query-migrate');
      if (m.status === 'completed') return;
      if (m.status === 'failed' || m.status === 'cancelled') {
        throw new TorporError('RUNTIME_ERROR', `QEMU snapshot ${m.status}: ${m['error-desc'] ?? 'no reason given'}`);
      }
      await new Promise((r) => setTimeout(r, delay));
    }
    throw new TorporError('TIMEOUT', `QEMU snapshot did not finish within ${MIGRATION_TIMEOUT_MS} ms`);
  }

  /** Loads a snapshot into a VMM started with -incoming defer; the VM stays paused. */
  async loadSnapshot(dir: string): Promise<void> {
    await this.client.execute('migrate-incoming', { uri: `exec:cat ${shellQuote(join(dir, STATE_FILE))}` });
    const deadline = Date.now() + MIGRATION_TIMEOUT_MS;
    // Polled tightly: a restore's load takes tens of ms, and every ms waited here is resume latency.
    for (let delay = 1; Date.now() < deadline; delay = Math.min(delay * 2, 4)) {
      // A failed incoming migration makes QEMU exit: `client` then throws "not running".
      const status = await this.status();
      if (status === 'paused' || status === 'running') return;
      if (status !== 'inmigrate') throw new TorporError('RUNTIME_ERROR', `QEMU restore ended in state ${status}`);
      await new Promise((r) => setTimeout(r, delay));
    }
    throw new TorporError('TIMEOUT', `QEMU restore did not finish within ${MIGRATION_TIMEOUT_MS} ms`);
  }

  async shutdown(): Promise<void> {
    if (!this.running()) return;
    await this.qmp?.execute('quit').catch(() => undefined);
    const timer = setTimeout(() => this.kill(), 5000);
    await this.exited;
    clearTimeout(timer);
  }

  kill(): void {
    if (this.running()) this.child.kill('SIGKILL');
  }
}

export class QemuDriver implements VmmDriver {
  readonly name = 'qemu' as const;
  readonly ramInFile = true;
  private readonly opts: QemuOptions;

  constructor(opts: QemuOptions) {
    this.opts = opts;
  }

  async status(): Promise<VmmStatus> {
    if (!existsSync(this.opts.binary)) return { usable: false, detail: `${this.opts.binary} not found` };
    const out = await run(this.opts.binary, ['--version'], { okCodes: [0, 1] }).catch((err: Error) => err);
    if (out instanceof Error) return { usable: false, detail: out.message };
    return { usable: true, detail: out.stdout.split('\n')[0]?.trim() ?? 'unknown version' };
  }

  private launch(config: VmConfig, incoming: boolean): QemuVm {
    // QEMU's own messages (not the guest's) go next to its sockets.
    const fd = openSync(join(config.runDir, 'qemu.log'), 'a');
    const env = { ...process.env };
    if (config.tcgModule) {
      // QEMU loads its accelerator by file name from QEMU_MODULE_DIR; the asset is named by its content.
      const modules = join(config.runDir, 'modules');
      mkdirSync(modules, { recursive: true });
      rmSync(join(modules, 'accel-tcg-x86_64.so'), { force: true });
      symlinkSync(config.tcgModule, join(modules, 'accel-tcg-x86_64.so'));
      env.QEMU_MODULE_DIR = modules;
    }
    try {
      // Started detached: a VMM outlives the request that started it; the runtime supervises it.
      const child = spawn(
        'nsenter',
        [`--net=${config.netnsPath}`, '--', config.vmm ?? this.opts.binary, ...qemuArgs(config, incoming)],
        {
          detached: true,
          stdio: ['ignore', fd, fd],
          env,
        },
      );
      child.unref();
      return new QemuVm(child, config);
    } finally {
      closeSync(fd);
    }
  }

  async boot(config: VmConfig): Promise<Vm> {
    const vm = this.launch(config, false);
    await this.connectOrKill(vm);
    return vm;
  }

  async restore(config: VmConfig, dir: string, files: string[], beforeLoad?: (vm: Vm) => Promise<void>): Promise<Vm> {
    return this.load(await this.prelaunch(config), dir, files, beforeLoad);
  }

  async prelaunch(config: VmConfig): Promise<QemuVm> {
    const vm = this.launch(config, true);
    await this.connectOrKill(vm);
    return vm;
  }

  async load(vm: Vm, dir: string, files: string[], beforeLoad?: (vm: Vm) => Promise<void>): Promise<Vm> {
    if (!(vm instanceof QemuVm)) throw new TypeError('not a VM of this driver');
    try {
      await beforeLoad?.(vm);
      await vm.ignoreSharedMemory(files.includes(MEMORY_FILE));
      await vm.loadSnapshot(dir);
    } catch (err) {
      vm.kill();
      throw err;
    }
    return vm;
  }

  private async connectOrKill(vm: QemuVm): Promise<void> {
    try {
      await vm.connect();
    } catch (err) {
      vm.kill();
      throw err;
    }
  }
}

/** Boots the guest kernel once under KVM with a timeout: `/dev/kvm` existing is not enough (a paravirtual nested
 * KVM may fail to run a stock kernel). The verdict is cached for the process. */
const kvmVerdicts = new Map<string, Promise<VmmStatus>>();

export function probeKvm(binary: string, kernel: string, initrd: string, timeoutMs = 10_000): Promise<VmmStatus> {
  const key = `${binary}\0${kernel}\0${initrd}`;
  let verdict = kvmVerdicts.get(key);
  if (!verdict) {
    verdict = runKvmProbe(binary, kernel, initrd, timeoutMs);
    kvmVerdicts.set(key, verdict);
  }
  return verdict;
}

async function runKvmProbe(binary: string, kernel: string, initrd: string, timeoutMs: number): Promise<VmmStatus> {
  if (!existsSync('/dev/kvm')) return { usable: false, detail: '/dev/kvm does not exist' };
  const args = [
    ...['-machine', 'microvm,x-option-roms=off,rtc=on,isa-serial=on', '-accel', 'kvm', '-cpu', 'host'],
    ...['-m', '128M', '-smp', '1', '-nodefaults', '-no-user-config', '-display', 'none', '-serial', 'stdio'],
    ...['-kernel', kernel, '-initrd', initrd, '-append', 'console=ttyS0 loglevel=1 panic=-1 torpor.probe=1'],
  ];
  const t0 = performance.now();
  const out = await run(binary, args, { timeoutMs, okCodes: Array.from({ length: 256 }, (_, i) => i) }).catch(
    (err: Error) => err,
  );
  if (out instanceof Error) return { usable: false, detail: `probe boot failed: ${out.message}` };
  if (out.stdout.includes('torpor-guest: probe ok')) {
    return { usable: true, detail: `a probe guest booted under KVM in ${Math.round(performance.now() - t0)} ms` };
  }
  const why = `${out.stderr} ${out.stdout}`.trim().split('\n').slice(-2).join(' | ').slice(0, 300);
  return { usable: false, detail: `a probe guest did not boot under KVM (exit ${out.code}): ${why}` };
}
