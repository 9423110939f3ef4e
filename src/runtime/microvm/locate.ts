// Where the micro-VM runtime's binaries are on this machine: explicit paths, environment variables, then what
// scripts/setup.sh installs (qemu-system-x86 from Debian; the guest built by scripts/microvm-guest.sh). Asset
// sets (a template's pinned kernel/initrd/VMM) take precedence when the caller has them.
import { existsSync } from 'node:fs';

export const GUEST_CACHE = '/var/cache/torpor/assets/microvm-guest';

export interface MicrovmPaths {
  qemu: string;
  kernel: string;
  initrd: string;
}

function first(candidates: (string | undefined)[]): string | undefined {
  return candidates.find((c): c is string => typeof c === 'string' && c !== '' && existsSync(c));
}

/** The paths found, and for each missing one why. */
export function locateMicrovm(explicit: Partial<MicrovmPaths> = {}): {
  paths?: MicrovmPaths;
  missing: string[];
} {
  const qemu = first([explicit.qemu, process.env.TORPOR_QEMU, '/usr/bin/qemu-system-x86_64']);
  const kernel = first([explicit.kernel, process.env.TORPOR_MICROVM_KERNEL, `${GUEST_CACHE}/kernel`]);
  const initrd = first([explicit.initrd, process.env.TORPOR_MICROVM_INITRD, `${GUEST_CACHE}/initrd`]);
  const missing = [
    ...(qemu ? [] : ['qemu-system-x86_64 not found (apt-get install qemu-system-x86, or TORPOR_QEMU)']),
    ...(kernel && initrd ? [] : [`guest kernel/initrd not found in ${GUEST_CACHE}: run scripts/microvm-guest.sh`]),
  ];
  return qemu && kernel && initrd ? { paths: { qemu, kernel, initrd }, missing } : { missing };
}
