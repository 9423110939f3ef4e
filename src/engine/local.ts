// The local engine: node agents in this process, on this machine, each node in its own network namespace. One
// node by default; several (`--nodes`) make moves between nodes real network moves.
import { existsSync } from 'node:fs';
import type { Logger } from 'pino';
import { NodeAgent } from '../agent/agent.ts';
import { StoreRegistry } from '../agent/registry.ts';
import type { BlobStore } from '../blob/blob.ts';
import { TorporError } from '../core/errors.ts';
import type { ImageStore } from '../image/store.ts';
import { NodeNetwork } from '../net/node-net.ts';
import { detectRunsc, GvisorRuntime, type RunscFeatures, sha256File } from '../runtime/gvisor/runsc.ts';
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

export function gvisorRuntimeFactory(runsc: RunscAsset): (stateRoot: string) => GvisorRuntime {
  return (stateRoot) =>
    new GvisorRuntime({
      runsc: runsc.path,
      features: runsc.features,
      asset: { url: `file://${runsc.path}`, sha256: runsc.sha256 },
      stateRoot,
    });
}

export class LocalEngine {
  private readonly nodes = new Map<string, NodeAgent>();

  constructor(opts: LocalEngineOptions, runsc: RunscAsset) {
    const nodeCount = opts.nodes ?? 1;
    const base = opts.networkBase ?? 0;
    const registry = new StoreRegistry(opts.store);
    for (let n = 0; n < nodeCount; n++) {
      const node = `node${n}`;
      this.nodes.set(
        node,
        new NodeAgent({
          node,
          dataDir: opts.dataDir,
          workers: opts.workers,
          indexBase: base + n * opts.workers,
          network: new NodeNetwork({ index: base + n }),
          registry,
          blob: opts.blob,
          images: opts.images,
          log: opts.log.child({ node }),
          ...(opts.deltaLevel !== undefined ? { deltaLevel: opts.deltaLevel } : {}),
          makeRuntime: gvisorRuntimeFactory(runsc),
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

  async start(): Promise<void> {
    for (const agent of this.nodes.values()) await agent.start();
  }

  async stop(): Promise<void> {
    for (const agent of this.nodes.values()) await agent.stop();
  }
}
