// The node agent: owns this node's worker slots (each a network namespace plus a runtime state root), and turns
// "activate this actor here" / "checkpoint it" into runtime calls, snapshot transfers and readiness checks.
// It never decides *which* actor goes where: that is the control layer's job.

import { createHash } from 'node:crypto';
import { EventEmitter } from 'node:events';
import { createReadStream, existsSync } from 'node:fs';
import { mkdir, readdir, readFile, rename, rm, stat, utimes, writeFile } from 'node:fs/promises';
import { dirname, join, relative, resolve, sep } from 'node:path';
import { PassThrough, Readable } from 'node:stream';
import type { Logger } from 'pino';
import type { BlobStore } from '../blob/blob.ts';
import { DEFAULT_CHUNK_CACHE_BYTES, LruBlobCache } from '../blob/lru-cache.ts';
import { TorporError } from '../core/errors.ts';
import { KeyedMutex } from '../core/keyed-mutex.ts';
import { assetMap, parse, type RuntimeClass } from '../core/schemas.ts';
import { recordPhases, timed, withSpan } from '../core/trace.ts';
import type { ActorRef, Asset, Phases, Template } from '../core/types.ts';
import type { ImageStore } from '../image/store.ts';
import type { NodeNetwork } from '../net/node-net.ts';
import { WorkerNetwork } from '../net/worker-net.ts';
import { checkAssetNames, fetchAssets, hostArch, pinnedAssets } from '../runtime/asset-set.ts';
import type { AssetStore } from '../runtime/assets.ts';
import type { ExecResult, OutputListener, Sandbox, SandboxRuntime } from '../runtime/runtime.ts';
import {
  COMPACT_DELTA_LEVEL,
  compactDelta,
  type ProgressListener,
  readManifest,
  restoreSnapshot,
  startChunkPool,
  writeSnapshot,
} from '../snapshot/index.ts';
import { crashPoint } from '../sys/crash.ts';
import { removeWithLinkedFiles, settleLinkedFiles } from '../sys/linked-files.ts';
import type {
  ActivateRequest,
  ActivateResult,
  AgentClient,
  CheckpointRequest,
  CheckpointResult,
  LocalCheckpoint,
  LocalCheckpointTarget,
  LogOptions,
  TransferEvent,
  UploadRequest,
} from './client.ts';
import { waitReady } from './ready.ts';
import type { WorkerInfo, WorkerRegistry } from './registry.ts';

export type {
  ActivateRequest,
  ActivateResult,
  CheckpointRequest,
  CheckpointResult,
  SnapshotStats,
  TransferEvent,
} from './client.ts';

export interface WorkerSlot {
  id: string;
  index: number;
  net: WorkerNetwork;
  runtime: SandboxRuntime;
  dir: string;
  sandbox?: Sandbox;
  actor?: ActorRef;
  /** Set while the previous sandbox is being torn down and the next activation's link prepared: the slot is not
   * free until it settles. */
  teardown?: Promise<void>;
  /** The next activation's interior namespace and veth, made ahead so a resume does not pay for them. */
  networkReady: boolean;
  /** A checkpointed sandbox whose teardown has not started yet. */
  stopped?: string;
  /** The asset set the current (or last) activation runs with: what its checkpoints pin. */
  pinned?: Record<string, Asset>;
  /** Digest of the image the current (or last) activation runs: its rootfs is not evicted from the cache. */
  image?: string;
  /** Its sandbox died on its own: the lease is left to expire (the reconciler then rolls the actor back to its
   * last snapshot) until the slot is released. */
  failed?: boolean;
  /** The suspend checkpoint (its directory) whose staged files may stay in memory for this slot (see keepLocal). */
  warmFrom?: string;
  /** Files of snapshot `snapshot` still in memory (guest RAM on tmpfs, the same bytes as its kept copy): the next
   * activation takes them if it restores that snapshot here (no copy), else they are dropped. A worker's own RAM
   * budget holds them while it is idle, never more than one snapshot's. */
  warm?: { snapshot: string; files: Record<string, string> };
}

/** Written into every checkpoint directory: the assets the checkpoint was made with (a local restore uses them;
 * the upload pins them in the manifest). Not part of the snapshot's files. */
export const PINNED_ASSETS_FILE = 'torpor-assets.json';

export interface NodeAgentOptions {
  node: string;
  dataDir: string;
  workers: number;
  /** First network index of this node's workers (indices must be unique on the machine). */
  indexBase: number;
  /** The node's own network namespace, which its workers' namespaces hang off. */
  network: NodeNetwork;
  /** Where the workers are registered and their leases renewed. */
  registry: WorkerRegistry;
  blob: BlobStore;
  images: ImageStore;
  makeRuntime: (stateRoot: string) => SandboxRuntime;
  /** The node's content-addressed runtime asset cache. */
  assets: AssetStore;
  /** The pool's current asset set for a runtime class on this node's architecture (boots without a template
   * override use it; restores use what their snapshot pinned). */
  poolAssets: (runtime: RuntimeClass) => Record<string, Asset> | undefined;
  /** Micro-VM worker slots on this node besides the `workers` gVisor ones (ids `<node>-m<i>`). */
  microvmWorkers?: number;
  makeMicrovmRuntime?: (stateRoot: string) => SandboxRuntime;
  log: Logger;
  /** zstd level for delta-encoded snapshot files (0: chunks only). */
  deltaLevel?: number;
  /** Cap of the node's chunk cache (chunks this node uploaded or fetched), least recently used first; default
   * DEFAULT_CHUNK_CACHE_BYTES. */
  chunkCacheBytes?: number;
  /** Local copies of snapshots this node wrote, kept for fast resumes here (default 4 per worker). */
  keepSnapshots?: number;
  /** Keep retrying the first registration (every second) instead of failing: a `torpor agent` may well start
   * before its server. */
  waitForRegistry?: boolean;
}

interface CheckpointOptions {
  deferTeardown?: boolean;
  /** Move files the runtime left staged elsewhere (linked) into the directory before returning. */
  settle?: boolean;
}

/** Written into a checkpoint directory once the runtime's checkpoint completed: the files it reported. A directory
 * without it holds a checkpoint cut short (by a crash) and is never uploaded. */
const CHECKPOINT_FILES = '.torpor-files.json';

/** A path segment that cannot climb out of the directory it is joined to. */
function safeSegment(value: string, field: string): string {
  if (!/^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$/.test(value) || value.includes('..')) {
    throw new TorporError('INVALID_ARGUMENT', `${field}: not a valid name`, { field });
  }
  return value;
}

/** Sandbox ids are per worker and per actor: a retry of the same actor on the same worker collides on purpose,
 * so its leftovers are cleaned before the next run. */
export function sandboxId(workerId: string, actor: ActorRef): string {
  return `${sandboxIdPrefix(workerId)}${actor.space}--${actor.name}`;
}

/** What the ids of every sandbox of worker `workerId` start with. */
function sandboxIdPrefix(workerId: string): string {
  return `${workerId}--`;
}

export class NodeAgent implements AgentClient {
  readonly node: string;
  readonly slots = new Map<string, WorkerSlot>();
  private readonly opts: NodeAgentOptions;
  private readonly chunkCache: LruBlobCache;
  private renewTimer?: NodeJS.Timeout;
  private heartbeating = false;
  /** Activation, checkpoint and release of one slot run one at a time (the server, its reconciler and this agent's
   * heartbeat may all ask at once). */
  private readonly slotLocks = new KeyedMutex();
  /** Set once start() has prepared every slot: the agent API refuses calls before (see api.ts). */
  ready = false;
  /** Set by drain(): no activation begins any more, and workers leave the pool as they become idle. */
  private draining = false;
  /** Workers drain() took out of the pool (no longer registered, no longer heartbeated). */
  private readonly drained = new Set<string>();
  /** Workers with an activation in progress. */
  private readonly activating = new Set<string>();
  private readonly keepSnapshots: number;
  /** Checkpoint files being moved from memory to disk (see keepLocal); stop waits for them. */
  private readonly settling = new Set<Promise<unknown>>();
  /** Runtimes' prelaunches in progress (see prelaunch): a stop waits for them, then discards what they made. */
  private readonly prelaunching = new Set<Promise<unknown>>();
  private stopping = false;

  constructor(opts: NodeAgentOptions) {
    this.opts = opts;
    this.node = opts.node;
    this.keepSnapshots = opts.keepSnapshots ?? 4 * opts.workers;
    // Chunks this node has uploaded or fetched: a resume here needs no download for them.
    this.chunkCache = new LruBlobCache(join(this.nodeDir, 'chunks'), {
      maxBytes: opts.chunkCacheBytes ?? DEFAULT_CHUNK_CACHE_BYTES,
    });
    for (let i = 0; i < opts.workers; i++) {
      const id = `${opts.node}-w${i}`;
      const dir = join(this.nodeDir, 'workers', id);
      this.addSlot(id, opts.indexBase + i, false, opts.makeRuntime(join(dir, 'runsc')));
    }
    const microvm = opts.microvmWorkers ?? 0;
    if (microvm > 0 && !opts.makeMicrovmRuntime) throw new Error('microvmWorkers needs makeMicrovmRuntime');
    for (let i = 0; i < microvm; i++) {
      const id = `${opts.node}-m${i}`;
      const dir = join(this.nodeDir, 'workers', id);
      this.addSlot(id, opts.indexBase + opts.workers + i, true, opts.makeMicrovmRuntime!(join(dir, 'microvm')));
    }
  }

  private addSlot(id: string, index: number, tap: boolean, runtime: SandboxRuntime): void {
    const slot: WorkerSlot = {
      id,
      index,
      dir: join(this.nodeDir, 'workers', id),
      net: new WorkerNetwork({ index, node: this.opts.network, tap }),
      runtime,
      networkReady: false,
    };
    this.slots.set(id, slot);
    runtime.onUnexpectedExit?.((sandbox, why) => void this.sandboxDied(slot, sandbox, why));
  }

  /** A sandbox died under a running actor (a crashed VMM): stop renewing the worker's lease and expire it now, so
   * the reconciler notices the lost worker and rolls the actor back to its last snapshot. */
  private async sandboxDied(slot: WorkerSlot, sandbox: string, why: string): Promise<void> {
    if (slot.sandbox?.id !== sandbox) return;
    slot.failed = true;
    this.opts.log.warn({ worker: slot.id, actor: slot.actor, why }, 'sandbox died');
    await this.opts.registry.expire([slot.id]).catch(() => undefined);
  }

  /** Snapshot transfers in progress on this node, per actor: for progress displays. */
  readonly transfers = new EventEmitter<{ progress: [TransferEvent] }>();

  async watchTransfers(listener: (event: TransferEvent) => void): Promise<() => void> {
    this.transfers.on('progress', listener);
    return () => this.transfers.off('progress', listener);
  }

  private progressOf(actor: ActorRef, direction: TransferEvent['direction']): ProgressListener {
    return (p) => this.transfers.emit('progress', { ...actor, direction, ...p });
  }

  get nodeDir(): string {
    return join(this.opts.dataDir, 'nodes', this.node);
  }

  get cache(): BlobStore {
    return this.chunkCache;
  }

  /** Prepares every slot (cleaning leftovers of an earlier process: their sandboxes died with it as far as the
   * control layer knows) and registers the workers, free. Heartbeats start only once that succeeded. */
  async start(): Promise<void> {
    await this.settleLeftovers();
    await this.opts.network.ensure();
    for (const slot of this.slots.values()) {
      for (const id of await slot.runtime.list()) await slot.runtime.destroy(id);
      // Memory an earlier agent held for this slot's actors (their checkpoints were settled onto disk above).
      await slot.runtime.removeLeftoverMemory?.(sandboxIdPrefix(slot.id));
      await slot.net.ensure();
      await this.prepareNetwork(slot);
    }
    this.ready = true;
    const { leaseMs } = await this.registerAll();
    this.renewTimer = setInterval(() => void this.heartbeat(), Math.max(200, leaseMs / 3));
    this.renewTimer.unref();
  }

  async stop(): Promise<void> {
    clearInterval(this.renewTimer);
    this.stopping = true;
    await Promise.allSettled([...this.settling, ...this.prelaunching]);
    for (const slot of this.slots.values()) {
      await this.dropWarm(slot);
      this.startTeardown(slot.id);
      await slot.teardown;
      if (slot.sandbox) await slot.runtime.destroy(slot.sandbox.id);
      slot.sandbox = undefined;
      await slot.net.destroy();
    }
    await this.opts.registry.unregister([...this.slots.keys()]).catch((err: unknown) => {
      this.opts.log.warn({ err }, 'unregistering the workers failed');
    });
    await this.opts.network.destroy();
  }

  private async registerAll(): Promise<{ leaseMs: number }> {
    const workers = [...this.slots.values()].map((s) => this.freeWorker(s));
    for (let attempt = 1; ; attempt++) {
      try {
        return await this.opts.registry.register(workers);
      } catch (err) {
        if (!this.opts.waitForRegistry) throw err;
        if (attempt % 10 === 1) this.opts.log.warn({ err, attempt }, 'registering the workers failed; retrying');
        await new Promise((r) => setTimeout(r, 1000));
      }
    }
  }

  private freeWorker(slot: WorkerSlot): WorkerInfo {
    return { id: slot.id, node: this.node, runtime: slot.runtime.name, state: 'free', host: slot.net.host };
  }

  /** Extends the workers' leases without touching their claims (the control layer owns claims); a slot whose
   * sandbox died is left to expire. A worker the registry forgot was declared lost (its lease ran out while this
   * agent could not renew it): its actor has been rolled back elsewhere, so whatever still runs there is stale —
   * released, then registered afresh. */
  private async heartbeat(): Promise<void> {
    if (this.heartbeating) return;
    this.heartbeating = true;
    try {
      const live = [...this.slots.values()]
        .filter((slot) => !slot.failed && !this.drained.has(slot.id))
        .map((slot) => slot.id);
      const { unknown } = await this.opts.registry.heartbeat(live);
      if (unknown.length === 0 || this.draining) return;
      this.opts.log.warn({ workers: unknown }, 'workers were declared lost; releasing and registering them again');
      for (const id of unknown) await this.release(id).catch(() => undefined);
      await this.opts.registry.register(unknown.map((id) => this.freeWorker(this.slot(id))));
    } catch (err) {
      this.opts.log.warn({ err }, 'lease renewal failed');
    } finally {
      this.heartbeating = false;
    }
  }

  slot(workerId: string): WorkerSlot {
    const slot = this.slots.get(workerId);
    if (!slot)
      throw new TorporError('NOT_FOUND', `worker "${workerId}" is not on node ${this.node}`, { field: 'worker' });
    return slot;
  }

  /** Restores (or boots) the actor on the worker and waits until it is ready. */
  async activate(req: ActivateRequest): Promise<ActivateResult> {
    this.slot(req.workerId);
    if (this.draining) {
      throw new TorporError('FAILED_PRECONDITION', `node ${this.node} is draining (its agent is stopping)`, {
        field: 'worker',
      });
    }
    const attributes = { 'torpor.worker': req.workerId, 'torpor.actor': `${req.actor.space}/${req.actor.name}` };
    this.activating.add(req.workerId);
    try {
      return await this.slotLocks.run(req.workerId, () =>
        withSpan('agent.activate', attributes, () => this.activateTraced(req)),
      );
    } finally {
      this.activating.delete(req.workerId);
    }
  }

  /** Empties the node before its agent stops (`torpor agent` on SIGTERM): no activation begins any more, idle
   * workers leave the pool at once (so no claim lands on them), and `suspend` (the server, suspending the actors of
   * the workers given) takes every running actor to a durable snapshot; each worker leaves the pool as its actor
   * goes. Bounded by `timeoutMs`; returns the workers still running an actor then (stop() ends them: their actors
   * go back to their last snapshot). */
  async drain(suspend: (workers: string[], timeoutMs: number) => Promise<void>, timeoutMs: number): Promise<string[]> {
    this.draining = true;
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const running = [...this.slots.values()].filter((s) => s.sandbox !== undefined).map((s) => s.id);
      const idle = [...this.slots.keys()].filter((id) => !running.includes(id) && !this.activating.has(id));
      await this.leavePool(idle);
      const left = deadline - Date.now();
      if ((running.length === 0 && this.activating.size === 0) || left <= 0) return running;
      if (running.length === 0) {
        await new Promise((r) => setTimeout(r, 100)); // an activation that began before the drain finishes
        continue;
      }
      this.opts.log.info({ workers: running }, 'draining: suspending the running actors');
      await suspend(running, left).catch(async (err: unknown) => {
        this.opts.log.warn({ err }, 'draining: suspending the running actors failed');
        await new Promise((r) => setTimeout(r, Math.min(1000, Math.max(0, deadline - Date.now()))));
      });
    }
  }

  /** Unregisters the workers not yet out of the pool (during a drain). */
  private async leavePool(ids: string[]): Promise<void> {
    const leaving = ids.filter((id) => !this.drained.has(id));
    if (leaving.length === 0) return;
    await this.opts.registry.unregister(leaving);
    for (const id of leaving) this.drained.add(id);
  }

  private async activateTraced(req: ActivateRequest): Promise<ActivateResult> {
    const slot = this.slot(req.workerId);
    const localSnapshot = req.localSnapshot === undefined ? undefined : this.localDir(req.localSnapshot);
    const phases: Phases = {};
    const readiness = req.template.readiness;
    const readyPort = readiness.port ?? req.template.port;
    // What the slot holds in memory serves this activation only if it restores that very snapshot from the kept
    // copy; otherwise it goes now, before the next sandbox needs the memory.
    const warm = slot.warm?.snapshot === req.snapshot && req.snapshot !== undefined ? slot.warm : undefined;
    // This activation owns the held memory now (released below if the restore leaves it), and a VMM prelaunched
    // on it (see prelaunch), which the restore adopts or stops.
    if (warm) slot.warm = undefined;
    else await this.dropWarm(slot);
    // Set once the activation's rules start loading (see loadRules).
    let network: Promise<void> | undefined;
    // What a restored sandbox still finishes while it is probed for readiness (see SandboxRuntime.restore).
    let settled: Promise<Phases> | undefined;
    try {
      await timed(phases, 'prepare', async () => {
        this.startTeardown(slot.id);
        await slot.teardown;
        if (slot.sandbox) await slot.runtime.destroy(slot.sandbox.id);
        slot.sandbox = undefined;
        if (!slot.networkReady) await slot.net.prepare();
        slot.networkReady = false;
      });
      network = this.loadRules(slot, req, phases);
      const workDir = join(slot.dir, 'activation');
      const image = await timed(phases, 'stage', async () => {
        const resolved = await this.opts.images.resolve(req.template.image);
        slot.image = resolved.digest;
        await rm(workDir, { recursive: true, force: true });
        await mkdir(workDir, { recursive: true });
        await mkdir(join(this.nodeDir, 'logs', req.actor.space), { recursive: true });
        return resolved;
      });
      const spec = {
        id: sandboxId(slot.id, req.actor),
        actorId: `${req.actor.space}/${req.actor.name}`,
        rootfs: image.rootfs,
        image: image.config,
        command: req.template.command,
        env: req.template.env,
        memoryMiB: req.template.resources.memoryMiB,
        vcpus: req.template.resources.vcpus,
        netnsPath: slot.net.netnsPath,
        workDir,
        logFile: this.logPath(req.actor),
        assets: {} as Record<string, string>,
      };
      const restoreOptions = { beforeRun: network };
      const kept = req.snapshot ? this.keptSnapshot(req.snapshot) : undefined;
      const localDir =
        localSnapshot && existsSync(localSnapshot) ? localSnapshot : kept && existsSync(kept) ? kept : undefined;
      // Mark a kept copy as recently used, so eviction takes older ones first.
      if (localDir && localDir === kept) await utimes(kept, new Date(), new Date()).catch(() => undefined);
      if (localDir) {
        spec.assets = await timed(phases, 'assets', async () => {
          const pinned =
            (await readPinned(localDir)) ?? this.bootAssets(req.template, `the local checkpoint ${localDir}`);
          return this.prepareAssets(slot, req.template.runtime, pinned, 'the local checkpoint');
        });
        const takeable = warm && localDir === kept ? { takeable: warm.files } : {};
        const {
          sandbox,
          phases: p,
          settled: late,
        } = await slot.runtime.restore(spec, localDir, [], { ...restoreOptions, ...takeable });
        await network;
        slot.sandbox = sandbox;
        settled = late;
        Object.assign(phases, p);
      } else if (req.snapshot) {
        // Fetched for this restore alone: the runtime may take its files rather than copy them (disposable), from
        // where it prefers them (a micro-VM's memory on tmpfs, see SandboxRuntime.stagingDir).
        const staging = slot.runtime.stagingDir?.(spec.id);
        const dir = staging ?? join(workDir, 'checkpoint');
        const snapshot = req.snapshot;
        const onProgress = this.progressOf(req.actor, 'download');
        const restored = await timed(phases, 'fetch', () =>
          restoreSnapshot({ blob: this.opts.blob, key: snapshot, dir, cache: this.chunkCache, onProgress }),
        );
        crashPoint('activate.fetched');
        // The assets the snapshot was made with, not the pool's current ones.
        spec.assets = await timed(phases, 'assets', () =>
          this.prepareAssets(slot, restored.manifest.runtime, restored.manifest.assets, `snapshot ${snapshot}`),
        );
        const files = restored.manifest.files.map((f) => f.name);
        const {
          sandbox,
          phases: p,
          settled: late,
        } = await slot.runtime
          .restore(spec, dir, files, { ...restoreOptions, disposable: true })
          // What the runtime left of its staging directory is no longer needed once it has restored (or failed).
          .finally(() => (staging ? rm(staging, { recursive: true, force: true }) : undefined));
        await network;
        slot.sandbox = sandbox;
        settled = late;
        Object.assign(phases, p);
      } else {
        const pinned = this.bootAssets(req.template);
        const what = `template "${req.template.name}"`;
        spec.assets = await timed(phases, 'assets', () => this.prepareAssets(slot, req.template.runtime, pinned, what));
        await network;
        slot.sandbox = await timed(phases, 'boot', () => slot.runtime.run(spec));
      }
      slot.actor = req.actor;
      crashPoint('activate.restored');
      await timed(phases, 'ready', async () => {
        const url = `http://${slot.net.address}:${readyPort}${readiness.path}`;
        // A sandbox that fails to settle will not become ready: stop probing it.
        const probing = new AbortController();
        settled?.catch(() => probing.abort());
        const ready = waitReady(url, readiness.timeoutSeconds * 1000, probing.signal);
        const [, late] = await Promise.all([ready, settled]);
        Object.assign(phases, late);
      });
    } catch (err) {
      // Once the rules started loading, a failure releases the worker; they must be in place (or have failed)
      // before the release clears them, or they would outlive it.
      if (network) {
        await network.catch(() => undefined);
        await this.releaseLocked(slot);
      }
      throw err;
    } finally {
      // What the slot held in memory and the restore did not take (it went another way) is released.
      if (warm) await removeFiles(warm.files);
    }
    crashPoint('activate.ready');
    return { address: slot.net.endpoint(req.template.port), phases };
  }

  /** Starts loading the activation's rules (a process spawn, 20-60 ms here), as soon as the worker's network is
   * prepared: they load while the image is resolved (phase `stage`) and the sandbox restored. The runtime awaits them before the
   * sandbox first runs (RestoreOptions.beforeRun); a boot awaits them first. */
  private loadRules(slot: WorkerSlot, req: ActivateRequest, phases: Phases): Promise<void> {
    const readiness = req.template.readiness;
    const network = timed(phases, 'network', () =>
      slot.net.activate({
        ports: [req.template.port, readiness.port ?? req.template.port],
        // Templates stored before egress policies existed have none: they keep the default.
        egress: req.template.network?.egress ?? 'allow-all',
        actor: `${req.actor.space}/${req.actor.name}`,
      }),
    );
    network.catch(() => undefined); // awaited on every path; not an unhandled rejection meanwhile
    return network;
  }

  /** The directory a node-local checkpoint lives in (see LocalCheckpointTarget). */
  checkpointDir(target: LocalCheckpointTarget): string {
    return join(
      this.nodeDir,
      target.kind === 'pause' ? 'paused' : 'checkpoints',
      safeSegment(target.actor.space, 'actor.space'),
      safeSegment(target.actor.name, 'actor.name'),
      safeSegment(target.id, 'id'),
    );
  }

  /** `dir` if it is one of this node's checkpoint directories; refuses anything else (the path comes from the
   * control layer, possibly over the network). */
  private localDir(dir: string): string {
    const full = resolve(dir);
    const inside = ['checkpoints', 'paused', 'snapshots'].some((kind) => {
      const rel = relative(join(this.nodeDir, kind), full);
      return rel !== '' && !rel.startsWith('..') && !rel.startsWith(sep);
    });
    if (!inside) {
      throw new TorporError('INVALID_ARGUMENT', 'dir: not a checkpoint directory of this node', { field: 'dir' });
    }
    return full;
  }

  /** Checkpoints the actor into a node-local directory (the sandbox stops). Teardown runs in the background,
   * started at once or, with `deferTeardown`, by `startTeardown`: a stopped sandbox takes a second of kernel
   * work to go away, and a suspend should not upload its snapshot while competing with that. */
  async checkpointLocal(
    workerId: string,
    target: LocalCheckpointTarget,
    opts: { deferTeardown?: boolean } = {},
  ): Promise<LocalCheckpoint> {
    // A suspend's checkpoint may keep files staged where the runtime wrote them (guest RAM on tmpfs, linked into
    // the directory) until its upload is done: see upload and keepLocal. A pause's is local state that must
    // survive the node: it is settled onto disk before the pause is acknowledged.
    const settle = target.kind !== 'suspend';
    return this.checkpointInto(workerId, this.checkpointDir(target), { ...opts, settle });
  }

  private checkpointInto(workerId: string, dir: string, opts: CheckpointOptions): Promise<LocalCheckpoint> {
    this.slot(workerId);
    return this.slotLocks.run(workerId, () => this.checkpointLocked(workerId, dir, opts));
  }

  private async checkpointLocked(workerId: string, dir: string, opts: CheckpointOptions): Promise<LocalCheckpoint> {
    const slot = this.slot(workerId);
    if (!slot.sandbox)
      throw new TorporError('FAILED_PRECONDITION', `worker ${workerId} runs no actor`, { field: 'worker' });
    const sandbox = slot.sandbox;
    crashPoint('checkpoint.started');
    // The snapshot writer's threads boot (~50 ms) while the checkpoint is taken, not when its upload starts.
    startChunkPool();
    await this.dropWarm(slot);
    const result = await slot.runtime.checkpoint(sandbox, dir);
    if (opts.settle) await timed(result.phases, 'settle', () => settleLinkedFiles(dir));
    slot.warmFrom = opts.settle ? undefined : resolve(dir);
    if (slot.pinned) await writeFile(join(dir, PINNED_ASSETS_FILE), JSON.stringify(slot.pinned));
    this.opts.log.info(
      { worker: workerId, actor: slot.actor, runtime: slot.runtime.name, files: result.files, phases: result.phases },
      'actor checkpointed',
    );
    slot.sandbox = undefined;
    slot.stopped = sandbox.id;
    // Last: only a checkpoint that completed (assets recorded too) is ever uploaded.
    await writeFile(join(dir, CHECKPOINT_FILES), JSON.stringify(result.files));
    if (!opts.deferTeardown) this.startTeardown(workerId);
    crashPoint('checkpoint.done');
    return { dir, ...result };
  }

  /** The files a completed checkpoint recorded; refuses a directory whose checkpoint was cut short. */
  private async checkpointFiles(dir: string): Promise<string[]> {
    const text = await readFile(join(dir, CHECKPOINT_FILES), 'utf8').catch(() => undefined);
    const files = text === undefined ? undefined : (JSON.parse(text) as unknown);
    if (!Array.isArray(files) || !files.every((f) => typeof f === 'string')) {
      throw new TorporError('FAILED_PRECONDITION', 'the checkpoint did not complete: nothing to upload', {
        field: 'dir',
      });
    }
    return files;
  }

  /** Whether the worker's sandbox is still running (a failed checkpoint may have killed it). */
  async sandboxAlive(workerId: string): Promise<boolean> {
    const slot = this.slot(workerId);
    return slot.sandbox !== undefined && (await slot.runtime.alive(slot.sandbox.id));
  }

  /** Releases what is left of a checkpointed sandbox, then prepares the worker's next link. Idempotent. */
  startTeardown(workerId: string): void {
    const slot = this.slot(workerId);
    if (slot.stopped === undefined) return;
    slot.teardown = this.tearDown(slot, slot.stopped);
    slot.stopped = undefined;
  }

  private async tearDown(slot: WorkerSlot, id: string): Promise<void> {
    try {
      await slot.runtime.destroy(id);
      await this.prepareNetwork(slot);
    } catch (err) {
      this.opts.log.warn({ err, worker: slot.id }, 'teardown failed');
      return;
    }
    void this.prelaunch(slot);
  }

  /** Once a worker is idle with its next network ready and memory held for its last snapshot (warm), the runtime
   * prepares the restore of that snapshot ahead (a micro-VM's VMM: see SandboxRuntime.prelaunch). Under the slot's
   * lock, so an activation arriving meanwhile finds it done (and uses it, or discards it). */
  private async prelaunch(slot: WorkerSlot): Promise<void> {
    if (!slot.runtime.prelaunch) return;
    await this.slotLocks
      .run(slot.id, async () => {
        const warm = slot.warm;
        if (this.stopping || !warm || slot.sandbox || !slot.networkReady || slot.stopped !== undefined) return;
        // Registered before anything yields: a stop that begins from here on waits for it (and then discards it).
        const launching = slot.runtime.prelaunch?.(warm.files);
        if (!launching) return;
        this.prelaunching.add(launching);
        try {
          await launching;
        } finally {
          this.prelaunching.delete(launching);
        }
      })
      .catch((err: unknown) => this.opts.log.warn({ err, worker: slot.id }, 'prelaunching the next restore failed'));
  }

  /** Ends the last activation's network and makes the next one's now, off the resume path. */
  private async prepareNetwork(slot: WorkerSlot): Promise<void> {
    slot.networkReady = false;
    await slot.net.prepare();
    slot.networkReady = true;
  }

  /** Uploads a local checkpoint as a durable snapshot (chunks first, manifest last). */
  async upload(req: UploadRequest, dir: string, files?: string[]): Promise<CheckpointResult> {
    const local = this.localDir(dir);
    try {
      return await this.uploadDir(req, local, files ?? (await this.checkpointFiles(local)));
    } catch (err) {
      // The checkpoint stays on this node as the actor's only state (PAUSED): on disk, not in memory.
      await settleLinkedFiles(local).catch((e: unknown) => this.opts.log.warn({ err: e, dir }, 'settling failed'));
      throw err;
    }
  }

  private async uploadDir(req: UploadRequest, dir: string, files: string[]): Promise<CheckpointResult> {
    const runtime = this.runtimeFor(req.template.runtime);
    const assets = (await readPinned(dir)) ?? this.bootAssets(req.template, `the checkpoint ${dir}`);
    // The parent is the delta base; a parent that cannot be read only costs dedup, never the snapshot.
    const previous = req.parent ? await readManifest(this.opts.blob, req.parent).catch(() => undefined) : undefined;
    // This node's kept copy of the parent: chunks equal to it are not hashed again.
    const previousDir = previous && req.parent ? this.keptSnapshot(req.parent) : undefined;
    const result = await writeSnapshot({
      ...(previous ? { previous } : {}),
      ...(previousDir && existsSync(previousDir) ? { previousDir } : {}),
      blob: this.opts.blob,
      dir,
      files: files.filter((f) => f !== PINNED_ASSETS_FILE),
      key: req.manifestKey,
      meta: { runtime: runtime.name, template: req.template.name, assets, parent: req.parent },
      cache: this.chunkCache,
      onProgress: this.progressOf(req.actor, 'upload'),
      ...(this.opts.deltaLevel !== undefined ? { deltaLevel: this.opts.deltaLevel } : {}),
    });
    const { phases: uploadPhases, ...stats } = result.stats;
    // The write pipelines its phases internally: they become spans here, from its own measurements.
    recordPhases(uploadPhases, 'upload');
    return { manifest: result.manifest, stats, phases: { ...uploadPhases } };
  }

  /** The assets a boot of `template` runs with: its own override, else the pool's set for its runtime class.
   * `legacy` names a checkpoint made before checkpoints recorded their assets (the pool's set is the best guess). */
  private bootAssets(template: Template, legacy?: string): Record<string, Asset> {
    if (legacy) this.opts.log.warn({ checkpoint: legacy }, 'checkpoint records no assets; using the pool set');
    const assets = template.assets ? pinnedAssets({ assets: template.assets }) : this.opts.poolAssets(template.runtime);
    if (!assets) {
      throw new TorporError(
        'FAILED_PRECONDITION',
        `no ${template.runtime} asset set for ${hostArch()} on node ${this.node}: give the pool one (torpor up --assets FILE)`,
        { field: 'assets' },
      );
    }
    return assets;
  }

  /** Gets an activation's assets into the node's cache (a hit is a stat) and makes them the slot's pinned set. */
  private async prepareAssets(
    slot: WorkerSlot,
    runtime: RuntimeClass,
    pinned: Record<string, Asset>,
    what: string,
  ): Promise<Record<string, string>> {
    checkAssetNames(runtime, pinned, what);
    const paths = await fetchAssets(this.opts.assets, pinned);
    slot.pinned = pinned;
    return paths;
  }

  /** Background: re-encodes the snapshot's deltas at a higher level, in place. Returns the bytes saved. */
  async compact(manifestKey: string): Promise<number> {
    const manifest = await readManifest(this.opts.blob, manifestKey);
    let saved = 0;
    for (const file of manifest.files) {
      if (!file.delta) continue;
      saved += await compactDelta(
        this.opts.blob,
        this.chunkCache,
        { ...file, delta: file.delta },
        manifest.chunkSize,
        COMPACT_DELTA_LEVEL,
      );
    }
    return saved;
  }

  /** Checkpoint + durable upload in one call (golden snapshots). */
  async checkpoint(req: CheckpointRequest): Promise<CheckpointResult> {
    const dir = join(
      this.nodeDir,
      'checkpoints',
      safeSegment(req.actor.space, 'actor.space'),
      safeSegment(req.actor.name, 'actor.name'),
    );
    const local = await this.checkpointInto(req.workerId, dir, { deferTeardown: true });
    let uploaded: CheckpointResult;
    try {
      uploaded = await this.uploadDir(req, dir, local.files);
    } catch (err) {
      this.startTeardown(req.workerId);
      await removeWithLinkedFiles(dir);
      throw err;
    }
    this.startTeardown(req.workerId);
    // Kept like a suspend's checkpoint: actors resumed from this snapshot on this node restore from the copy, and
    // their first suspend compares against it instead of hashing every chunk.
    await this.keepLocal(dir, req.manifestKey).catch((err: unknown) => {
      this.opts.log.warn({ err, snapshot: req.manifestKey }, 'keeping the checkpoint failed');
    });
    return { ...uploaded, phases: { ...local.phases, ...uploaded.phases } };
  }

  /** Stops whatever runs on the worker without a snapshot (delete, failed activation). Idempotent. */
  release(workerId: string): Promise<void> {
    const slot = this.slot(workerId);
    return this.slotLocks.run(workerId, () => this.releaseLocked(slot));
  }

  private async releaseLocked(slot: WorkerSlot): Promise<void> {
    await this.dropWarm(slot);
    this.startTeardown(slot.id);
    await slot.teardown;
    if (slot.sandbox) await slot.runtime.destroy(slot.sandbox.id);
    slot.sandbox = undefined;
    slot.actor = undefined;
    await this.prepareNetwork(slot);
    if (slot.failed) {
      slot.failed = false;
      await this.opts.registry.heartbeat([slot.id]).catch(() => undefined);
    }
  }

  /** A runtime of the class (its assets are what a snapshot of that class pins). */
  private runtimeFor(runtimeClass: string): SandboxRuntime {
    const slot = [...this.slots.values()].find((s) => s.runtime.name === runtimeClass);
    if (!slot) {
      throw new TorporError('NOT_SUPPORTED', `node ${this.node} has no ${runtimeClass} worker`, { field: 'runtime' });
    }
    return slot.runtime;
  }

  /** Resolves when the worker's previous sandbox is fully gone (the worker may be handed out again). */
  async settled(workerId: string): Promise<void> {
    // Draining: the worker leaves the pool before the server frees it, so no claim can land on it.
    if (this.draining) await this.leavePool([workerId]);
    this.startTeardown(workerId);
    await this.slot(workerId).teardown;
  }

  async exec(workerId: string, command: string[], timeoutMs: number, onOutput?: OutputListener): Promise<ExecResult> {
    const slot = this.slot(workerId);
    if (!slot.sandbox) throw new TorporError('FAILED_PRECONDITION', 'actor is not running', { field: 'status' });
    return slot.runtime.exec(slot.sandbox, command, timeoutMs, onOutput);
  }

  /** Releases what the slot held in memory for a snapshot (see WorkerSlot.warm). */
  private async dropWarm(slot: WorkerSlot): Promise<void> {
    const warm = slot.warm;
    slot.warm = undefined;
    slot.warmFrom = undefined;
    // A VMM prelaunched on the held memory goes with it.
    await slot.runtime.discardPrelaunched?.();
    if (warm) await removeFiles(warm.files);
  }

  /** Where this node keeps its own copy of a snapshot it wrote (see keepLocal). */
  private keptSnapshot(manifestKey: string): string {
    return join(this.nodeDir, 'snapshots', createHash('sha256').update(manifestKey).digest('hex').slice(0, 32));
  }

  /** Keeps a checkpoint this node just uploaded as a local copy of that snapshot: a resume here restores it
   * without fetching or rebuilding anything. The durable copy is the one in the blob store; local copies are a
   * bounded cache (the most recent `keepSnapshots`), dropped oldest first. */
  async keepLocal(dir: string, manifestKey: string): Promise<void> {
    const local = this.localDir(dir);
    const target = this.keptSnapshot(manifestKey);
    await mkdir(dirname(target), { recursive: true });
    await removeWithLinkedFiles(target);
    try {
      await rename(local, target);
    } catch (err) {
      await removeWithLinkedFiles(local);
      throw err;
    }
    // Files the checkpoint left staged in memory move to disk now, after the suspend was acknowledged. A resume or
    // the next suspend meanwhile reads them through their links. The in-memory originals stay with the worker that
    // wrote them (warm) as long as it has not moved on: resuming this snapshot there then takes them, not a copy.
    const slot = [...this.slots.values()].find((s) => s.warmFrom === local);
    const held: Record<string, string> = {};
    const settled = settleLinkedFiles(target, (name, staged) => {
      if (!slot) return false;
      held[name] = staged;
      return true;
    });
    this.settling.add(settled);
    try {
      await settled;
    } catch (err) {
      await removeWithLinkedFiles(target);
      throw err;
    } finally {
      this.settling.delete(settled);
    }
    if (slot && slot.warmFrom === local && !slot.sandbox) {
      slot.warmFrom = undefined;
      slot.warm = { snapshot: manifestKey, files: held };
      void this.prelaunch(slot);
    } else {
      await removeFiles(held);
    }
    const root = dirname(target);
    const entries = await Promise.all(
      (await readdir(root)).map(async (name) => ({ name, mtime: (await stat(join(root, name))).mtimeMs })),
    );
    entries.sort((a, b) => b.mtime - a.mtime);
    for (const old of entries.slice(this.keepSnapshots)) await removeWithLinkedFiles(join(root, old.name));
  }

  /** Moves to disk what an earlier process left staged in memory (it stopped between a suspend's checkpoint and
   * keepLocal): checkpoint directories are at most three levels below their kind's directory. */
  private async settleLeftovers(): Promise<void> {
    const visit = async (dir: string, depth: number): Promise<void> => {
      const entries = await readdir(dir, { withFileTypes: true }).catch(() => []);
      if (entries.some((e) => e.isSymbolicLink())) {
        await settleLinkedFiles(dir).catch((err: unknown) => this.opts.log.warn({ err, dir }, 'settling failed'));
      }
      if (depth > 0) {
        for (const e of entries) if (e.isDirectory()) await visit(join(dir, e.name), depth - 1);
      }
    };
    for (const kind of ['checkpoints', 'paused', 'snapshots']) await visit(join(this.nodeDir, kind), 3);
  }

  async discardLocal(dir: string): Promise<void> {
    await removeWithLinkedFiles(this.localDir(dir));
  }

  logPath(actor: ActorRef): string {
    return join(
      this.nodeDir,
      'logs',
      safeSegment(actor.space, 'actor.space'),
      `${safeSegment(actor.name, 'actor.name')}.log`,
    );
  }

  /** The actor's stdout/stderr from every activation on this node; with `follow`, then whatever is appended,
   * until `signal` aborts. */
  async logs(actor: ActorRef, opts: LogOptions = {}): Promise<Readable> {
    const path = this.logPath(actor);
    if (!opts.follow) {
      if (!existsSync(path)) return Readable.from([]);
      return createReadStream(path);
    }
    return followFile(path, opts.signal);
  }
}

/** Streams a file from the start and then whatever is appended (polled), until `signal` aborts or the reader
 * goes away. */
function followFile(path: string, signal: AbortSignal | undefined): Readable {
  const out = new PassThrough();
  let offset = 0;
  let closed = false;
  const close = () => {
    closed = true;
    out.end();
  };
  signal?.addEventListener('abort', close, { once: true });
  out.on('close', () => {
    closed = true;
  });
  const pump = async (): Promise<void> => {
    while (!closed) {
      const size = (await stat(path).catch(() => ({ size: offset }))).size;
      if (size > offset) {
        for await (const chunk of createReadStream(path, { start: offset, end: size - 1 })) {
          if (closed) return;
          offset += (chunk as Buffer).length;
          out.write(chunk);
        }
      }
      await new Promise((r) => setTimeout(r, 200));
    }
  };
  void pump().catch(() => out.end());
  return out;
}

/** The assets recorded in a checkpoint directory, or undefined for one made before they were recorded. */
async function readPinned(dir: string): Promise<Record<string, Asset> | undefined> {
  const file = join(dir, PINNED_ASSETS_FILE);
  const text = await readFile(file, 'utf8').catch(() => undefined);
  if (text === undefined) return undefined;
  let recorded: unknown;
  try {
    recorded = JSON.parse(text);
  } catch {
    throw new TorporError('SNAPSHOT_CORRUPT', `${file} is not valid JSON`, { field: 'assets' });
  }
  return parse(assetMap, recorded, `${file}: assets`);
}

/** Removes files by path (name → path), missing ones included. */
async function removeFiles(paths: Record<string, string>): Promise<void> {
  await Promise.all(Object.values(paths).map((path) => rm(path, { force: true })));
}
