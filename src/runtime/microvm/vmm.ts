// The VMM driver interface: what the micro-VM runtime needs from a virtual machine monitor (QEMU, Cloud
// Hypervisor). A driver launches one VM per activation from a VmConfig, and snapshots/restores it; the runtime
// owns everything around (root disk, guest control channel, supervision).

/** Everything that defines a VM's device model. A restore must be given the same model (paths may differ). */
export interface VmConfig {
  id: string;
  /** The VMM binary for this VM (the activation's asset), when not the driver's default. */
  vmm?: string;
  /** QEMU's TCG accelerator module (asset `qemu-tcg`): a VMM binary that is an asset copy does not find the
   * modules of its installation. */
  tcgModule?: string;
  /** Firmware (asset `bios`), for the same reason. */
  firmware?: string;
  kernel: string;
  initrd: string;
  /** Kernel command line. */
  cmdline: string;
  memoryMiB: number;
  vcpus: number;
  /** The image's root filesystem as a read-only raw disk (the guest's /dev/vda). */
  disk: string;
  /** Network namespace the VMM runs in; the tap device is opened there by name. */
  netnsPath: string;
  tap: string;
  /** The guest NIC's MAC: fixed, so a restored guest's neighbours (and the gateway's ARP entry) stay valid. */
  mac: string;
  /** Directory for the VMM's own files (its log). */
  runDir: string;
  /** Directory for the VMM's unix sockets: short, because a socket path must fit in 108 bytes. */
  socketDir: string;
  /** The guest's serial console (the workload's stdout/stderr) is appended here. */
  consoleLog: string;
  /** Guest RAM: a file mapped shared (writes land in the file: a snapshot moves it, nothing is copied) or
   * private (copy-on-write over a snapshot's memory file: many VMs may map one file). */
  memory: { path: string; shared: boolean };
  accel: 'kvm' | 'tcg';
}

export interface Vm {
  readonly pid: number;
  /** Host end of the guest control channel (a unix socket). */
  readonly controlSocket: string;
  /** Resolves when the VMM process exits (with its exit code, or the signal's name). */
  readonly exited: Promise<number | string>;
  running(): boolean;
  /** Stops the vCPUs; pausing a paused VM does nothing. */
  pause(): Promise<void>;
  resume(): Promise<void>;
  /** Writes a paused VM's state into `dir` and returns exactly the files written (relative to `dir`). Guest RAM
   * in a shared file is not among them: the caller moves that file (see VmConfig.memory). */
  snapshot(dir: string): Promise<string[]>;
  /** Asks the VMM to exit and waits for it (killing it after a grace period). */
  shutdown(): Promise<void>;
  kill(): void;
}

export interface VmmStatus {
  usable: boolean;
  /** Why not, or what was found (version, accelerator). */
  detail: string;
}

export interface VmmDriver {
  readonly name: 'qemu' | 'cloud-hypervisor';
  /** Whether guest RAM lives in VmConfig.memory.path (QEMU's memory-backend-file), which a checkpoint then moves
   * into the snapshot; otherwise the driver's snapshot holds the memory itself. */
  readonly ramInFile: boolean;
  status(): Promise<VmmStatus>;
  boot(config: VmConfig): Promise<Vm>;
  /** Starts a VMM with the same device model and loads the snapshot in `dir`; the VM is left paused.
   * `beforeLoad` runs once the VMM is up, before the snapshot is loaded (the runtime connects the guest channel
   * there: a channel that is connected when the device state loads looks to the guest as if it never went away). */
  restore(config: VmConfig, dir: string, files: string[], beforeLoad?: (vm: Vm) => Promise<void>): Promise<Vm>;
  /** `restore` in two steps, for a VMM launched ahead of the restore that will use it (see
   * MicrovmRuntime.prelaunch): `prelaunch` starts it waiting for a snapshot, `load` is the rest of `restore`. */
  prelaunch?(config: VmConfig): Promise<Vm & { adopt(config: VmConfig): void }>;
  load?(vm: Vm, dir: string, files: string[], beforeLoad?: (vm: Vm) => Promise<void>): Promise<Vm>;
}

/** The memory file of a snapshot, when it has one (name shared by the drivers). */
export const MEMORY_FILE = 'memory';
