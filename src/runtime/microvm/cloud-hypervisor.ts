// Cloud Hypervisor driver, through its REST API on the VMM's unix socket (vm.create, vm.boot, vm.pause,
// vm.resume, vm.snapshot, vm.restore, vm.shutdown, vmm.shutdown). Written to the documented API; it cannot run on
// this project's CI machine (Cloud Hypervisor is not installable there), so its tests skip with that reason.
//
// Differences from QEMU: the guest control channel is the virtio-console (hvc0) on a unix socket, as Cloud
// Hypervisor has no virtio-serial ports (the guest init falls back to /dev/hvc0); a snapshot is Cloud
// Hypervisor's own (config.json, state.json, memory-ranges) and a restore maps memory on demand (userfaultfd).
// The tap is opened by name in the activation's namespace, so a restore finds the tap recreated under the same
// name; passing fresh tap fds (vm.restore net_fds) needs SCM_RIGHTS, which Node cannot send without a native
// module.
import { type ChildProcess, spawn } from 'node:child_process';
import { closeSync, existsSync, openSync } from 'node:fs';
import { readdir } from 'node:fs/promises';
import http from 'node:http';
import { join } from 'node:path';
import { TorporError } from '../../core/errors.ts';
import { run } from '../../sys/run.ts';
import { connectWhenReady } from './unix-socket.ts';
import type { Vm, VmConfig, VmmDriver, VmmStatus } from './vmm.ts';

const API_TIMEOUT_MS = 120_000;

function apiCall(socket: string, method: 'GET' | 'PUT', path: string, body?: unknown): Promise<unknown> {
  return new Promise((resolve, reject) => {
    const payload = body === undefined ? undefined : JSON.stringify(body);
    const req = http.request(
      {
        socketPath: socket,
        method,
        path: `/api/v1/${path}`,
        timeout: API_TIMEOUT_MS,
        headers: payload ? { 'content-type': 'application/json', 'content-length': Buffer.byteLength(payload) } : {},
      },
      (res) => {
        let text = '';
        res.setEncoding('utf8');
        res.on('data', (c: string) => {
          text += c;
        });
        res.on('end', () => {
          if ((res.statusCode ?? 500) >= 300) {
            reject(new TorporError('RUNTIME_ERROR', `cloud-hypervisor ${path}: HTTP ${res.statusCode} ${text.trim()}`));
          } else resolve(text ? JSON.parse(text) : undefined);
        });
      },
    );
    req.on('timeout', () => req.destroy(new Error(`${path} timed out`)));
    req.on('error', (err) => reject(new TorporError('RUNTIME_ERROR', `cloud-hypervisor ${path}: ${err.message}`)));
    req.end(payload);
  });
}

/** The vm.create body (Cloud Hypervisor's VmConfig). */
export function chVmConfig(c: VmConfig, controlSocket: string): Record<string, unknown> {
  return {
    cpus: { boot_vcpus: c.vcpus, max_vcpus: c.vcpus },
    memory: { size: c.memoryMiB * 2 ** 20, shared: c.memory.shared },
    payload: { kernel: c.kernel, initramfs: c.initrd, cmdline: c.cmdline },
    disks: [{ path: c.disk, readonly: true }],
    net: [{ tap: c.tap, mac: c.mac }],
    serial: { mode: 'File', file: c.consoleLog },
    console: { mode: 'Socket', socket: controlSocket },
  };
}

class ChVm implements Vm {
  readonly pid: number;
  readonly controlSocket: string;
  readonly exited: Promise<number | string>;
  readonly api: string;
  private readonly child: ChildProcess;
  private done = false;

  constructor(child: ChildProcess, config: VmConfig) {
    this.child = child;
    this.pid = child.pid ?? -1;
    this.api = join(config.socketDir, 'api.sock');
    this.controlSocket = join(config.socketDir, 'control.sock');
    this.exited = new Promise((resolve) =>
      child.once('exit', (code, signal) => {
        this.done = true;
        resolve(code ?? signal ?? 'unknown');
      }),
    );
  }

  running(): boolean {
    return !this.done;
  }

  private call(method: 'GET' | 'PUT', path: string, body?: unknown) {
    return apiCall(this.api, method, path, body);
  }

  async state(): Promise<string> {
    return ((await this.call('GET', 'vm.info')) as { state?: string }).state ?? 'unknown';
  }

  async pause(): Promise<void> {
    if ((await this.state()) !== 'Paused') await this.call('PUT', 'vm.pause');
  }

  async resume(): Promise<void> {
    if ((await this.state()) === 'Paused') await this.call('PUT', 'vm.resume');
  }

  async snapshot(dir: string): Promise<string[]> {
    await this.pause();
    const before = new Set(await readdir(dir));
    await this.call('PUT', 'vm.snapshot', { destination_url: `file://${dir}` });
    return (await readdir(dir)).filter((f) => !before.has(f)).sort();
  }

  async shutdown(): Promise<void> {
    if (!this.running()) return;
    await this.call('PUT', 'vmm.shutdown').catch(() => undefined);
    const timer = setTimeout(() => this.kill(), 5000);
    await this.exited;
    clearTimeout(timer);
  }

  kill(): void {
    if (this.running()) this.child.kill('SIGKILL');
  }
}

export class CloudHypervisorDriver implements VmmDriver {
  readonly name = 'cloud-hypervisor' as const;
  readonly ramInFile = false;
  private readonly binary: string;

  constructor(opts: { binary: string }) {
    this.binary = opts.binary;
  }

  async status(): Promise<VmmStatus> {
    if (!existsSync(this.binary)) return { usable: false, detail: `cloud-hypervisor not installed (${this.binary})` };
    const out = await run(this.binary, ['--version'], { okCodes: [0, 1] }).catch((err: Error) => err);
    if (out instanceof Error) return { usable: false, detail: out.message };
    if (!existsSync('/dev/kvm')) return { usable: false, detail: 'cloud-hypervisor needs /dev/kvm' };
    return { usable: true, detail: out.stdout.trim() };
  }

  private async launch(config: VmConfig): Promise<ChVm> {
    const fd = openSync(join(config.runDir, 'vmm.log'), 'a');
    let vm: ChVm;
    try {
      const child = spawn(
        'nsenter',
        [`--net=${config.netnsPath}`, '--', this.binary, '--api-socket', `path=${join(config.socketDir, 'api.sock')}`],
        { detached: true, stdio: ['ignore', fd, fd] },
      );
      child.unref();
      vm = new ChVm(child, config);
    } finally {
      closeSync(fd);
    }
    const socket = await connectWhenReady(vm.api, 10_000, () => vm.running()).catch((err: unknown) => {
      vm.kill();
      throw err;
    });
    socket.destroy();
    return vm;
  }

  async boot(config: VmConfig): Promise<Vm> {
    const vm = await this.launch(config);
    try {
      await apiCall(vm.api, 'PUT', 'vm.create', chVmConfig(config, vm.controlSocket));
      await apiCall(vm.api, 'PUT', 'vm.boot');
    } catch (err) {
      vm.kill();
      throw err;
    }
    return vm;
  }

  async restore(config: VmConfig, dir: string, _files: string[], beforeLoad?: (vm: Vm) => Promise<void>): Promise<Vm> {
    const vm = await this.launch(config);
    try {
      await beforeLoad?.(vm);
      // The VM comes back paused; memory is faulted in from memory-ranges as the guest touches it.
      await apiCall(vm.api, 'PUT', 'vm.restore', { source_url: `file://${dir}`, memory_restore_mode: 'OnDemand' });
    } catch (err) {
      vm.kill();
      throw err;
    }
    return vm;
  }
}

/** Where cloud-hypervisor would be: TORPOR_CLOUD_HYPERVISOR, then the usual install paths. */
export function locateCloudHypervisor(): string | undefined {
  return [process.env.TORPOR_CLOUD_HYPERVISOR, '/usr/local/bin/cloud-hypervisor', '/usr/bin/cloud-hypervisor'].find(
    (p): p is string => typeof p === 'string' && p !== '' && existsSync(p),
  );
}
