// The control plane alone, for bench/store.ts: the real Lifecycle (actor locks, claims, compare-and-sets, the
// rollback bookkeeping) on a real StateStore, with the node side answered at once by an in-process agent that
// does nothing. That stub is what makes this a measurement of the control plane: a real activation restores a
// sandbox (hundreds of milliseconds, bench/lifecycle.ts measures it), which would hide the store entirely.
// The blob store is in memory for the same reason: the stub "uploads" a manifest there, and the one question the
// control plane asks of it per suspend (does the manifest exist: the commit marker) is answered at once.
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
import type { BlobList, BlobStore } from '../../src/blob/blob.ts';
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
  patchedChunks: 0,
  patchBytes: 0,
};

/** Objects in a Map: what a suspend's commit check reads (`has` of its manifest) and what the stub writes. */
class MemoryBlobStore implements BlobStore {
  readonly objects = new Map<string, Uint8Array>();
  async put(key: string, body: Uint8Array | Readable): Promise<void> {
    if (!(body instanceof Uint8Array)) throw new Error('the bench stores bytes only');
    this.objects.set(key, body);
  }
  async get(key: string): Promise<Readable> {
    return Readable.from([await this.getBytes(key)]);
  }
  async getBytes(key: string): Promise<Uint8Array> {
    const body = this.objects.get(key);
    if (!body) throw new Error(`no object ${key}`);
    return body;
  }
  async has(key: string): Promise<boolean> {
    return this.objects.has(key);
  }
  async list(prefix: string): Promise<BlobList> {
    return { keys: [...this.objects.keys()].filter((k) => k.startsWith(prefix)).sort() };
  }
  async delete(key: string): Promise<void> {
    this.objects.delete(key);
  }
}

const MANIFEST_BYTES = new TextEncoder().encode('{}');

/** An agent that answers every request at once and runs nothing; an upload puts a placeholder manifest. */
class InstantAgent implements AgentClient {
  readonly node: string;
  readonly #blob: BlobStore;
  constructor(node: string, blob: BlobStore) {
    this.node = node;
    this.#blob = blob;
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
    await this.#blob.put(req.manifestKey, MANIFEST_BYTES);
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
  const blob = new MemoryBlobStore();
  const agents = new Map<string, AgentClient>();
  for (let n = 0; n < nodes; n++) {
    const node = `node-${n}`;
    agents.set(node, new InstantAgent(node, blob));
    for (let w = 0; w < workersPerNode; w++) {
      await store.putWorker(
        worker(`${node}-w${w}`, { node, leaseExpiresAt: new Date(Date.now() + 3_600_000).toISOString() }),
      );
    }
  }
  const lifecycle = new Lifecycle({
    store: counted,
    blob,
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
