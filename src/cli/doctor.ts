// `torpor doctor`: for each runtime, whether it is usable on this machine and why not. Nothing is assumed from a
// file's existence alone: runsc is asked for its version and flags, and KVM is probed by booting the guest.
import { locateRunsc } from '../engine/local.ts';
import { detectRunsc } from '../runtime/gvisor/runsc.ts';
import { CloudHypervisorDriver, locateCloudHypervisor } from '../runtime/microvm/cloud-hypervisor.ts';
import { locateMicrovm } from '../runtime/microvm/locate.ts';
import { probeKvm, QemuDriver } from '../runtime/microvm/qemu.ts';

export interface RuntimeCheck {
  runtime: 'gvisor' | 'microvm';
  vmm?: 'qemu' | 'cloud-hypervisor';
  usable: boolean;
  detail: string;
}

export async function checkRuntimes(opts: { runsc?: string } = {}): Promise<RuntimeCheck[]> {
  return [await checkGvisor(opts.runsc), await checkQemu(), await checkCloudHypervisor()];
}

async function checkGvisor(explicit?: string): Promise<RuntimeCheck> {
  try {
    const path = locateRunsc(explicit);
    const f = await detectRunsc(path);
    const caveat = f.netDisconnectOk ? '' : '; lacks -net-disconnect-ok: actors that served TCP cannot be checkpointed';
    return { runtime: 'gvisor', usable: true, detail: `${path}: ${f.version}${caveat}` };
  } catch (err) {
    return { runtime: 'gvisor', usable: false, detail: (err as Error).message };
  }
}

async function checkQemu(): Promise<RuntimeCheck> {
  const found = locateMicrovm();
  if (!found.paths) return { runtime: 'microvm', vmm: 'qemu', usable: false, detail: found.missing.join('; ') };
  const { qemu, kernel, initrd } = found.paths;
  const status = await new QemuDriver({ binary: qemu }).status();
  if (!status.usable) return { runtime: 'microvm', vmm: 'qemu', usable: false, detail: status.detail };
  const kvm = await probeKvm(qemu, kernel, initrd);
  const accel = kvm.usable ? `KVM (${kvm.detail})` : `TCG, no KVM: ${kvm.detail}`;
  return { runtime: 'microvm', vmm: 'qemu', usable: true, detail: `${status.detail}; ${accel}` };
}

async function checkCloudHypervisor(): Promise<RuntimeCheck> {
  const binary = locateCloudHypervisor();
  if (!binary) {
    return { runtime: 'microvm', vmm: 'cloud-hypervisor', usable: false, detail: 'cloud-hypervisor not installed' };
  }
  const status = await new CloudHypervisorDriver({ binary }).status();
  return { runtime: 'microvm', vmm: 'cloud-hypervisor', ...status };
}
