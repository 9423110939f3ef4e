// The local engine: node agents in this process, on this machine, each node in its own network namespace. One
// node by default; several (`--nodes`) make moves between nodes real network moves.
import { existsSync } from 'node:fs';
import { realpath } from 'node:fs/promises';
import { pathToFileURL } from 'node:url';
import type { Logger } from 'pino';
import { NodeAgent } from '../agent/agent.ts';
import type { BlobStore } from '../blob/blob.ts';
import { TorporError } from '../core/errors.ts';
import type { AssetSet } from '../core/schemas.ts';
import type { ImageStore } from '../image/store.ts';
import { NodeNetwork } from '../net/node-net.ts';
import { hostArch, pinnedAssets, selectAssetSet } from '../runtime/asset-set.ts';
import type { AssetStore } from '../runtime/assets.ts';
import { GvisorRuntime, sha256File } from '../runtime/gvisor/runsc.ts';
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
  /** The pool's asset sets, one per runtime class and architecture: boots use them; restores use what their
   * snapshot pinned. */
  assetSets: AssetSet[];
  /** The node-wide runtime asset cache. */
  assetStore: AssetStore;
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

/** The gVisor asset set of a local runsc binary: its file:// URL (the file a symlink points at, which
 * scripts/runsc-asset.sh names by content) and its sha256. The default when a pool declares no set. */
export async function localGvisorAssets(path: string): Promise<AssetSet> {
  const file = await realpath(path);
  const sha256 = await sha256File(file);
  return { runtime: 'gvisor', arch: hostArch(), assets: { runsc: { url: pathToFileURL(file).href, sha256 } } };
}

export class LocalEngine {
  private readonly nodes = new Map<string, NodeAgent>();

  constructor(opts: LocalEngineOptions) {
    const nodeCount = opts.nodes ?? 1;
    const base = opts.networkBase ?? 0;
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
          store: opts.store,
          blob: opts.blob,
          images: opts.images,
          log: opts.log.child({ node }),
          ...(opts.deltaLevel !== undefined ? { deltaLevel: opts.deltaLevel } : {}),
          assets: opts.assetStore,
          poolAssets: (runtime) => {
            const set = selectAssetSet(opts.assetSets, runtime);
            return set ? pinnedAssets(set) : undefined;
          },
          makeRuntime: (stateRoot) =>
            new GvisorRuntime({ stateRoot, onWarning: (message, fields) => opts.log.warn(fields, message) }),
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
  }
}
