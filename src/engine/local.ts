// The local engine: node agents in this process, on this machine, each node in its own network namespace. One
// node by default; several (`--nodes`) make moves between nodes real network moves.
import { createHash } from 'node:crypto';
import { existsSync } from 'node:fs';
import { realpath, rmdir } from 'node:fs/promises';
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';
import type { Logger } from 'pino';
import { NodeAgent } from '../agent/agent.ts';
import { StoreRegistry } from '../agent/registry.ts';
import type { BlobStore } from '../blob/blob.ts';
import { TorporError } from '../core/errors.ts';
import type { AssetSet, RuntimeClass } from '../core/schemas.ts';
import type { ImageStore } from '../image/store.ts';
import { ACTOR_ADDRESS, ACTOR_MAC, ACTOR_PREFIX, GATEWAY_ADDRESS } from '../net/egress.ts';
import { NodeNetwork } from '../net/node-net.ts';
import { TAP } from '../net/worker-net.ts';
import { hostArch, pinnedAssets, selectAssetSet } from '../runtime/asset-set.ts';
import type { AssetStore } from '../runtime/assets.ts';
import { GvisorRuntime, sha256File } from '../runtime/gvisor/runsc.ts';
import { locateMicrovm, type MicrovmPaths } from '../runtime/microvm/locate.ts';
import { probeKvm, QemuDriver } from '../runtime/microvm/qemu.ts';
import { MicrovmRuntime } from '../runtime/microvm/runtime.ts';
import type { VmmStatus } from '../runtime/microvm/vmm.ts';
import type { StateStore } from '../store/store.ts';

export interface LocalEngineOptions {
  dataDir: string;
  workers: number;
  nodes?: number;
  store: StateStore;
  blob: BlobStore;
  images: ImageStore;
  log: Logger;
  /** First node and worker network index (so two Torpor instances on one machine can coexist): node n gets
   * networkBase + n, its workers networkBase + n * (workers + microvmWorkers) + i. */
  networkBase?: number;
  deltaLevel?: number;
  /** Cap of each node's chunk cache (see NodeAgentOptions.chunkCacheBytes). */
  chunkCacheBytes?: number;
  /** The pool's asset sets, one per runtime class and architecture: boots use them; restores use what their
   * snapshot pinned. */
  assetSets: AssetSet[];
  /** The node-wide runtime asset cache. */
  assetStore: AssetStore;
  /** Micro-VM worker slots per node, besides the `workers` gVisor ones (needs `microvm`). */
  microvmWorkers?: number;
  microvm?: MicrovmAssets;
}

/** The micro-VM runtime's binaries on this machine and the accelerator a probe boot chose. */
export interface MicrovmAssets {
  paths: MicrovmPaths;
  accel: 'kvm' | 'tcg';
  kvm: VmmStatus;
}

/** Finds QEMU and the guest and probes KVM by booting the guest (a /dev/kvm that exists may still not work). */
export async function loadMicrovmAssets(explicit: Partial<MicrovmPaths>, log: Logger): Promise<MicrovmAssets> {
  const found = locateMicrovm(explicit);
  if (!found.paths) {
    throw new TorporError('FAILED_PRECONDITION', `micro-VM workers: ${found.missing.join('; ')}`, {
      field: 'microvm-workers',
    });
  }
  const { qemu, kernel, initrd } = found.paths;
  const kvm = await probeKvm(qemu, kernel, initrd);
  const accel = kvm.usable ? 'kvm' : 'tcg';
  log.info({ qemu, kernel, initrd, accel, kvm: kvm.detail }, 'micro-VM runtime');
  return { paths: found.paths, accel, kvm };
}

/** Finds runsc: an explicit path, TORPOR_RUNSC, the asset built by scripts/setup.sh, then the usual install paths. */
export function locateRunsc(explicit?: string): string {
  const candidates = [
    explicit,
    process.env.TORPOR_RUNSC,
    '/var/cache/torpor/assets/runsc',
    '/usr/local/bin/runsc',
    '/usr/bin/runsc',
  ];
  for (const c of candidates) if (c && existsSync(c)) return c;
  throw new TorporError('FAILED_PRECONDITION', 'runsc not found: run scripts/setup.sh or pass --runsc PATH', {
    field: 'runsc',
  });
}

/** The asset set of local files: each one's file:// URL (the file a symlink points at) and sha256. */
async function localAssetSet(runtime: AssetSet['runtime'], paths: Record<string, string>): Promise<AssetSet> {
  const assets: AssetSet['assets'] = {};
  for (const [name, path] of Object.entries(paths)) {
    const file = await realpath(path);
    assets[name] = { url: pathToFileURL(file).href, sha256: await sha256File(file) };
  }
  return { runtime, arch: hostArch(), assets };
}

/** The gVisor asset set of a local runsc binary (scripts/runsc-asset.sh names it by content). The default when a
 * pool declares no set. */
export function localGvisorAssets(path: string): Promise<AssetSet> {
  return localAssetSet('gvisor', { runsc: path });
}

/** Where Debian's qemu-system-x86 keeps what a copy of its binary cannot find by itself. */
const QEMU_TCG_MODULE = '/usr/lib/x86_64-linux-gnu/qemu/accel-tcg-x86_64.so';
const QEMU_MICROVM_FIRMWARE = '/usr/share/qemu/bios-microvm.bin';

/** The micro-VM asset set of the local QEMU (with its TCG module and firmware: activations run a content-addressed
 * copy of the binary, which does not look beside the installation) and guest. The default when a pool declares no
 * micro-VM set. */
export function localMicrovmAssets(microvm: MicrovmAssets): Promise<AssetSet> {
  const { qemu, kernel, initrd } = microvm.paths;
  const extras = Object.entries({ 'qemu-tcg': QEMU_TCG_MODULE, bios: QEMU_MICROVM_FIRMWARE }).filter(([, path]) =>
    existsSync(path),
  );
  return localAssetSet('microvm', { qemu, kernel, initrd, ...Object.fromEntries(extras) });
}

/** Micro-VM runtimes of one node, each with its own state root: QEMU from `microvm`, the disk cache under
 * `dataDir`, guest RAM files in `memoryDir` (tmpfs). */
export function microvmRuntimeFactory(
  microvm: MicrovmAssets,
  dataDir: string,
  memoryDir: string,
): (stateRoot: string) => MicrovmRuntime {
  return (stateRoot) =>
    new MicrovmRuntime({
      driver: new QemuDriver({ binary: microvm.paths.qemu }),
      kernel: microvm.paths.kernel,
      initrd: microvm.paths.initrd,
      accel: microvm.accel,
      stateRoot,
      diskCache: join(dataDir, 'microvm', 'disks'),
      memoryDir,
      network: { address: ACTOR_ADDRESS, prefix: ACTOR_PREFIX, gateway: GATEWAY_ADDRESS, mac: ACTOR_MAC, tap: TAP },
    });
}

export class LocalEngine {
  private readonly nodes = new Map<string, NodeAgent>();
  /** Guest RAM files of this instance's micro-VMs, on tmpfs, apart from any other instance's. */
  private readonly memoryDir: string;

  constructor(opts: LocalEngineOptions) {
    this.memoryDir = `/dev/shm/torpor-${createHash('sha256').update(opts.dataDir).digest('hex').slice(0, 12)}`;
    const nodeCount = opts.nodes ?? 1;
    const base = opts.networkBase ?? 0;
    const microvmWorkers = opts.microvmWorkers ?? 0;
    const microvm = opts.microvm;
    if (microvmWorkers > 0 && !microvm) throw new Error('microvmWorkers needs the micro-VM assets');
    const memoryDir = this.memoryDir;
    const registry = new StoreRegistry(opts.store);
    for (let n = 0; n < nodeCount; n++) {
      const node = `node${n}`;
      this.nodes.set(
        node,
        new NodeAgent({
          node,
          dataDir: opts.dataDir,
          workers: opts.workers,
          indexBase: base + n * (opts.workers + microvmWorkers),
          network: new NodeNetwork({ index: base + n }),
          registry,
          blob: opts.blob,
          images: opts.images,
          log: opts.log.child({ node }),
          ...(opts.deltaLevel !== undefined ? { deltaLevel: opts.deltaLevel } : {}),
          ...(opts.chunkCacheBytes !== undefined ? { chunkCacheBytes: opts.chunkCacheBytes } : {}),
          assets: opts.assetStore,
          poolAssets: (runtime) => {
            const set = selectAssetSet(opts.assetSets, runtime);
            return set ? pinnedAssets(set) : undefined;
          },
          makeRuntime: (stateRoot) =>
            new GvisorRuntime({ stateRoot, onWarning: (message, fields) => opts.log.warn(fields, message) }),
          microvmWorkers,
          ...(microvm ? { makeMicrovmRuntime: microvmRuntimeFactory(microvm, opts.dataDir, memoryDir) } : {}),
        }),
      );
    }
  }

  async agent(node: string): Promise<NodeAgent | undefined> {
    return this.nodes.get(node);
  }

  async agents(): Promise<NodeAgent[]> {
    return [...this.nodes.values()];
  }

  /** The runtime classes of this engine's worker slots (a template of another class has no pool here). */
  async runtimes(): Promise<Set<RuntimeClass>> {
    return new Set(this.localAgents().flatMap((agent) => [...agent.slots.values()].map((slot) => slot.runtime.name)));
  }

  /** The node agents, now (for what must not wait, e.g. the image cache asking which images are in use). */
  localAgents(): NodeAgent[] {
    return [...this.nodes.values()];
  }

  async start(): Promise<void> {
    for (const agent of this.nodes.values()) await agent.start();
  }

  async stop(): Promise<void> {
    for (const agent of this.nodes.values()) await agent.stop();
    // Every VM is gone: its RAM directory is empty (rmdir refuses otherwise).
    await rmdir(this.memoryDir).catch(() => undefined);
  }
}
