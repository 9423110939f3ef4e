// The local engine: node agents in this process, on this machine, each node in its own network namespace. One
// node by default; several (`--nodes`) make moves between nodes real network moves.
import { createHash } from 'node:crypto';
import { existsSync } from 'node:fs';
import { rmdir } from 'node:fs/promises';
import { join } from 'node:path';
import type { Logger } from 'pino';
import { NodeAgent } from '../agent/agent.ts';
import type { BlobStore } from '../blob/blob.ts';
import { TorporError } from '../core/errors.ts';
import type { ImageStore } from '../image/store.ts';
import { ACTOR_ADDRESS, ACTOR_MAC, ACTOR_PREFIX, GATEWAY_ADDRESS } from '../net/egress.ts';
import { NodeNetwork } from '../net/node-net.ts';
import { TAP } from '../net/worker-net.ts';
import { detectRunsc, GvisorRuntime, type RunscFeatures, sha256File } from '../runtime/gvisor/runsc.ts';
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
   * networkBase + n, its workers networkBase + n * workers + i. */
  networkBase?: number;
  deltaLevel?: number;
  /** Micro-VM worker slots per node, besides the `workers` gVisor ones (needs `microvm`). */
  microvmWorkers?: number;
  microvm?: MicrovmAssets;
}

/** The micro-VM runtime's binaries on this machine and the accelerator a probe boot chose. */
export interface MicrovmAssets {
  paths: MicrovmPaths;
  sha256: MicrovmPaths;
  accel: 'kvm' | 'tcg';
  kvm: VmmStatus;
}

/** Finds QEMU and the guest, hashes them (snapshot manifests pin them) and probes KVM by booting the guest. */
export async function loadMicrovmAssets(explicit: Partial<MicrovmPaths>, log: Logger): Promise<MicrovmAssets> {
  const found = locateMicrovm(explicit);
  if (!found.paths) {
    throw new TorporError('FAILED_PRECONDITION', `micro-VM workers: ${found.missing.join('; ')}`, {
      field: 'microvm-workers',
    });
  }
  const { qemu, kernel, initrd } = found.paths;
  const [kvm, qemuSha, kernelSha, initrdSha] = await Promise.all([
    probeKvm(qemu, kernel, initrd),
    sha256File(qemu),
    sha256File(kernel),
    sha256File(initrd),
  ]);
  const accel = kvm.usable ? 'kvm' : 'tcg';
  log.info({ qemu, kernel, initrd, accel, kvm: kvm.detail }, 'micro-VM runtime');
  return { paths: found.paths, sha256: { qemu: qemuSha, kernel: kernelSha, initrd: initrdSha }, accel, kvm };
}

export interface RunscAsset {
  path: string;
  sha256: string;
  features: RunscFeatures;
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

export async function loadRunscAsset(path: string, log: Logger): Promise<RunscAsset> {
  const [features, sha256] = await Promise.all([detectRunsc(path), sha256File(path)]);
  if (!features.netDisconnectOk) {
    log.warn(
      { runsc: path, version: features.version },
      'runsc lacks -net-disconnect-ok: actors that served TCP cannot be checkpointed',
    );
  }
  return { path, sha256, features };
}

export class LocalEngine {
  private readonly nodes = new Map<string, NodeAgent>();
  /** Guest RAM files of this instance's micro-VMs, on tmpfs, apart from any other instance's. */
  private readonly memoryDir: string;

  constructor(opts: LocalEngineOptions, runsc: RunscAsset) {
    this.memoryDir = `/dev/shm/torpor-${createHash('sha256').update(opts.dataDir).digest('hex').slice(0, 12)}`;
    const nodeCount = opts.nodes ?? 1;
    const base = opts.networkBase ?? 0;
    const microvmWorkers = opts.microvmWorkers ?? 0;
    const microvm = opts.microvm;
    if (microvmWorkers > 0 && !microvm) throw new Error('microvmWorkers needs the micro-VM assets');
    const memoryDir = this.memoryDir;
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
          store: opts.store,
          blob: opts.blob,
          images: opts.images,
          log: opts.log.child({ node }),
          ...(opts.deltaLevel !== undefined ? { deltaLevel: opts.deltaLevel } : {}),
          makeRuntime: (stateRoot) =>
            new GvisorRuntime({
              runsc: runsc.path,
              features: runsc.features,
              asset: { url: `file://${runsc.path}`, sha256: runsc.sha256 },
              stateRoot,
            }),
          microvmWorkers,
          ...(microvm
            ? {
                makeMicrovmRuntime: (stateRoot: string) =>
                  new MicrovmRuntime({
                    driver: new QemuDriver({ binary: microvm.paths.qemu }),
                    kernel: microvm.paths.kernel,
                    initrd: microvm.paths.initrd,
                    accel: microvm.accel,
                    stateRoot,
                    diskCache: join(opts.dataDir, 'microvm', 'disks'),
                    memoryDir,
                    network: {
                      address: ACTOR_ADDRESS,
                      prefix: ACTOR_PREFIX,
                      gateway: GATEWAY_ADDRESS,
                      mac: ACTOR_MAC,
                      tap: TAP,
                    },
                    assets: Object.fromEntries(
                      (['kernel', 'initrd', 'qemu'] as const).map((k) => [
                        k,
                        { url: `file://${microvm.paths[k]}`, sha256: microvm.sha256[k] },
                      ]),
                    ),
                  }),
              }
            : {}),
        }),
      );
    }
  }

  agent(node: string): NodeAgent | undefined {
    return this.nodes.get(node);
  }

  agents(): NodeAgent[] {
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
