// The control plane alone, for bench/store.ts: the real Lifecycle (actor locks, claims, compare-and-sets, the
// rollback bookkeeping) on a real StateStore, with the node side answered at once by an in-process agent that
// does nothing. That stub is what makes this a measurement of the control plane: a real activation restores a
// sandbox (hundreds of milliseconds, bench/lifecycle.ts measures it), which would hide the store entirely.
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Readable } from 'node:stream';
import { pino } from 'pino';
import type {
  ActivateRequest,
  AgentClient,
  CheckpointResult,
  LocalCheckpoint,
  LocalCheckpointTarget,
  TransferEvent,
  UploadRequest,
} from '../../src/agent/client.ts';
import { FsBlobStore } from '../../src/blob/fs.ts';
import { Lifecycle } from '../../src/control/lifecycle.ts';
import { Metrics } from '../../src/control/metrics.ts';
import type { SnapshotManifest } from '../../src/core/types.ts';
import type { ImageStore } from '../../src/image/store.ts';
import type { StateStore } from '../../src/store/store.ts';
import { template, worker } from '../../test/store/conformance.ts';

/** Phases and sizes shaped like a real suspend's (bench/RESULTS.md), so stored records have their real size. */
const CHECKPOINT_PHASES = { checkpoint: 64, teardown: 2.2 };
const UPLOAD_PHASES = { chunk: 0.4, delta: 14.13, upload: 19.36, manifest: 1.44 };
const UPLOAD_STATS = {
  totalChunks: 191,
  rawBytes: 745596,
  storedBytes: 32213,
  uploadedChunks: 3,
  reusedChunks: 11,
  zeroChunks: 177,
  deltaFiles: 2,
};

/** An agent that answers every request at once and runs nothing. */
class InstantAgent implements AgentClient {
  readonly node: string;
  constructor(node: string) {
    this.node = node;
  }
  async watchTransfers(_listener: (event: TransferEvent) => void): Promise<() => void> {
    return () => {};
  }
  async activate(req: ActivateRequest) {
    return { address: `10.0.${req.workerId.length}.2:8080`, phases: { restore: 200, ready: 5 } };
  }
  async checkpointLocal(_worker: string, target: LocalCheckpointTarget): Promise<LocalCheckpoint> {
    return { dir: `/var/lib/torpor/checkpoints/${target.id}`, files: ['checkpoint.img'], phases: CHECKPOINT_PHASES };
  }
  async upload(req: UploadRequest): Promise<CheckpointResult> {
    const manifest = { key: req.manifestKey } as unknown as SnapshotManifest;
    return { manifest, stats: UPLOAD_STATS, phases: UPLOAD_PHASES };
  }
  checkpoint(): Promise<CheckpointResult> {
    throw new Error('not used by the bench');
  }
  async keepLocal() {}
  async discardLocal() {}
  async compact() {
    return 0;
  }
  async sandboxAlive() {
    return true;
  }
  async settled() {}
  async release() {}
  async exec(): Promise<never> {
    throw new Error('not used by the bench');
  }
  async logs() {
    return Readable.from([]);
  }
}

export interface ControlPlane {
  lifecycle: Lifecycle;
  /** Store calls made so far, by method (the store is wrapped to count them). */
  calls: Map<string, number>;
  close(): Promise<void>;
}

/** A Lifecycle on `store` with `nodes` instant agents of `workersPerNode` registered workers each. */
export async function controlPlane(store: StateStore, nodes: number, workersPerNode: number): Promise<ControlPlane> {
  const calls = new Map<string, number>();
  const counted = new Proxy(store, {
    get(target, prop, receiver) {
      const value = Reflect.get(target, prop, receiver);
      if (typeof value !== 'function') return value;
      return (...args: unknown[]) => {
        calls.set(String(prop), (calls.get(String(prop)) ?? 0) + 1);
        return value.apply(target, args);
      };
    },
  });
  const agents = new Map<string, AgentClient>();
  for (let n = 0; n < nodes; n++) {
    const node = `node-${n}`;
    agents.set(node, new InstantAgent(node));
    for (let w = 0; w < workersPerNode; w++) {
      await store.putWorker(
        worker(`${node}-w${w}`, { node, leaseExpiresAt: new Date(Date.now() + 3_600_000).toISOString() }),
      );
    }
  }
  // The blob store is only asked whether a manifest exists when an upload fails, which the stub never does.
  const blobDir = await mkdtemp(join(tmpdir(), 'torpor-bench-cp-'));
  const lifecycle = new Lifecycle({
    store: counted,
    blob: new FsBlobStore(blobDir),
    images: {} as ImageStore, // templates go straight into the store: no image is ever resolved
    agents: { agent: async (node) => agents.get(node), agents: async () => [...agents.values()] },
    metrics: new Metrics(),
    log: pino({ level: 'silent' }),
  });
  if (!(await store.getTemplate('web'))) {
    await store.createTemplate(template('web', { goldenSnapshot: 'snapshots/_golden/web/0001/manifest.json' }));
  }
  return {
    lifecycle,
    calls,
    close: async () => {
      await lifecycle.suspendAll(); // waits for the background bookkeeping (compaction queue) to drain
      await rm(blobDir, { recursive: true, force: true });
    },
  };
}

/** Creates `count` suspended actors `<prefix><i>` in `space` through the lifecycle. */
export async function createActors(cp: ControlPlane, space: string, prefix: string, count: number): Promise<void> {
  for (let i = 0; i < count; i++) await cp.lifecycle.createActor(space, { template: 'web', name: `${prefix}${i}` });
}

export interface TransitionRun {
  transitions: number;
  seconds: number;
  /** Milliseconds per transition (a whole resume or a whole suspend), in completion order. */
  latencies: number[];
}

/** Every actor cycles resume → suspend, all of them at once, until `transitions` operations completed. */
export async function cycle(cp: ControlPlane, space: string, names: string[], transitions: number) {
  let started = 0;
  const latencies: number[] = [];
  const t0 = performance.now();
  await Promise.all(
    names.map(async (name) => {
      let running = (await cp.lifecycle.getActor(space, name)).status === 'RUNNING';
      while (started < transitions) {
        started++;
        const t = performance.now();
        const after = running ? await cp.lifecycle.suspend(space, name) : await cp.lifecycle.resume(space, name);
        latencies.push(performance.now() - t);
        running = !running;
        if (after.status !== (running ? 'RUNNING' : 'SUSPENDED')) {
          throw new Error(`a transition ended in ${after.status}: ${after.reason}`);
        }
      }
    }),
  );
  return { transitions: latencies.length, seconds: (performance.now() - t0) / 1000, latencies };
}
