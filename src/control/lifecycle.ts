// Lifecycle workflows: create, resume, suspend, pause, fork, delete. Each is a short list of named steps; every
// status change is a compare-and-set on the actor's version, and a failed step rolls the actor back to a state
// that still has a restorable snapshot, saying why in `reason`. Operations on one actor are serialized across
// processes (ActorLocks); the reconciler settles whatever a dead process or a lost node left half done.
import { randomUUID } from 'node:crypto';
import { hostname } from 'node:os';
import { basename } from 'node:path';
import type { Logger } from 'pino';
import type { ActivateResult, AgentClient, LocalCheckpoint, LogOptions, TransferEvent } from '../agent/client.ts';
import type { BlobStore } from '../blob/blob.ts';
import { asTorporError, notFound, TorporError } from '../core/errors.ts';
import type { RuntimeClass } from '../core/schemas.ts';
import {
  createActorRequest,
  dnsLabel,
  execRequest,
  forkActorRequest,
  listQuery,
  parse,
  templateSpec,
} from '../core/schemas.ts';
import { assertTransition, TRANSITIONAL } from '../core/state.ts';
import { elapsedMs } from '../core/time.ts';
import { recordPhase, timed, traceId, withSpan } from '../core/trace.ts';
import type { Actor, ActorRef, ActorStatus, Operation, Page, Template, Worker, WorkerFilter } from '../core/types.ts';
import type { ImageStore } from '../image/store.ts';
import type { OutputListener } from '../runtime/runtime.ts';
import { newSnapshotId, snapshotWhole } from '../snapshot/index.ts';
import { allActors, allTemplates, allWorkers } from '../store/all.ts';
import type { StateStore } from '../store/store.ts';
import { crashPoint } from '../sys/crash.ts';
import { Unreachable } from '../sys/http.ts';
import { ActorLocks } from './actor-lock.ts';
import type { Metrics } from './metrics.ts';
import { SnapshotGc, type SnapshotWrite } from './snapshot-gc.ts';

/** Where the lifecycle finds node agents: in this process (LocalEngine) or behind their APIs (NodeDirectory). */
export interface AgentDirectory {
  /** The agent of `node`, or undefined when the node has no registered agent (it is gone). */
  agent(node: string): Promise<AgentClient | undefined>;
  /** Every registered agent. */
  agents(): Promise<AgentClient[]>;
  /** The runtime classes this engine can ever have workers of, when that is fixed (agents in this process); absent
   * when agents come and go (a template's pool may register later: its golden snapshot then waits for it). */
  runtimes?(): Promise<Set<RuntimeClass>>;
}

/** What the router and the idle policy ask of a lifecycle: this process's, or a server's over its API. */
export type ActorOperations = Pick<Lifecycle, 'resume' | 'suspend'>;

export interface LifecycleOptions {
  store: StateStore;
  blob: BlobStore;
  images: ImageStore;
  agents: AgentDirectory;
  metrics: Metrics;
  log: Logger;
  /** How long a transitional state may last before the reconciler ends it. */
  transitionTimeoutMs?: number;
  /** How long a resume waits for a worker that is being freed before answering NO_CAPACITY. */
  claimWaitMs?: number;
  /** Names this process's actor leases; unique per process. A restarted process given its old id takes its
   * leases back at once (what it was doing died with it); by default a fresh id, so a restart waits for them to
   * expire (lockTtlMs). */
  holder?: string;
  /** Lease of an operation on an actor, renewed while it runs (default 10 s). */
  lockTtlMs?: number;
  /** Worker lease length, for agents in other processes (torpor server): for this long after this process
   * starts, expired worker leases are not judged and a resume finding no worker waits (bounded) — agents that
   * could not reach a server that was down get to renew them first. Agents in this process need no grace. */
  workerLeaseMs?: number;
}

const now = (): string => new Date().toISOString();
/** An actor reference whose names are valid (INVALID_ARGUMENT otherwise), before any lock is taken. */
const validRef = (space: string, name: string): ActorRef => ({
  space: parse(dnsLabel, space, 'space'),
  name: parse(dnsLabel, name, 'name'),
});
const actorKey = (ref: ActorRef): string => `${ref.space}/${ref.name}`;
const spanAttributes = (ref: ActorRef) => ({ 'torpor.space': ref.space, 'torpor.actor': ref.name });
const sameActor = (a: ActorRef | undefined, b: ActorRef): boolean => a?.space === b.space && a.name === b.name;
const leaseExpired = (w: Worker): boolean => Date.parse(w.leaseExpiresAt) < Date.now();
/** The snapshot id in a manifest key `snapshots/<space>/<name>/<id>/manifest.json`. */
const snapshotIdOf = (key: string): string => key.split('/').at(-2)!;
/** The actor an operation's lock found, or NOT_FOUND. */
function existing(ref: ActorRef, actor: Actor | undefined): Actor {
  if (!actor) throw notFound('actor', `${ref.space}/${ref.name}`);
  return actor;
}
/** Compaction waits for this long without any lifecycle operation. */
const COMPACTION_IDLE_MS = 500;

/** A snapshot that may not be committed: its manifest is missing, or (its write record lapsed) an object it names. */
function incompleteSnapshot(key: string): TorporError {
  return new TorporError(
    'SNAPSHOT_CORRUPT',
    `snapshot ${key} is incomplete: its manifest or an object it names is missing`,
    {
      field: 'snapshot',
    },
  );
}

function sameSpec(a: Template, b: Template): boolean {
  const strip = ({ createdAt: _c, goldenSnapshot: _g, ...rest }: Template) => JSON.stringify(rest);
  return strip(a) === strip(b);
}

export class Lifecycle {
  private readonly o: LifecycleOptions;
  private readonly locks: ActorLocks;
  private readonly startedAt = Date.now();
  private readonly goldenBuilds = new Map<string, Promise<void>>();
  /** Background durable uploads of paused actors, by local checkpoint directory. */
  private readonly pendingUploads = new Map<string, Promise<void>>();
  private readonly transitionTimeoutMs: number;
  private readonly compactionQueue: { node: string; key: string; actor: ActorRef }[] = [];
  private maintaining: Promise<void> | undefined;
  private shuttingDown = false;
  private gcDue = false;
  /** Snapshot writes and garbage collection, coordinated with every other server through the store. */
  private readonly snapshotGc: SnapshotGc;
  private activeOperations = 0;
  private lastOperationEnd = 0;
  /** Snapshot write records being ended after their suspend (see endWriteLater). */
  private readonly endingWrites = new Set<Promise<void>>();
  /** Workers being freed (sandbox teardown in progress). */
  private readonly releasing = new Set<Promise<void>>();
  private readonly claimWaitMs: number;
  /** Templates whose golden snapshot is taken: nothing changes them any more (see templateOf). */
  private readonly settledTemplates = new Map<string, Template>();

  constructor(opts: LifecycleOptions) {
    this.o = opts;
    this.transitionTimeoutMs = opts.transitionTimeoutMs ?? 120_000;
    this.claimWaitMs = opts.claimWaitMs ?? 10_000;
    const holder = opts.holder ?? `${hostname()}/${randomUUID()}`;
    this.snapshotGc = new SnapshotGc({ store: opts.store, blob: opts.blob, log: opts.log, holder });
    this.locks = new ActorLocks({
      store: opts.store,
      holder,
      ttlMs: opts.lockTtlMs ?? 10_000,
      waitMs: this.transitionTimeoutMs,
    });
  }

  // ---------------------------------------------------------------- templates

  /** Creates a template (idempotent for an identical spec; templates are immutable) and starts its golden
   * snapshot in the background. */
  async applyTemplate(input: unknown): Promise<{ template: Template; created: boolean }> {
    const spec = parse(templateSpec, input);
    const existing = await this.o.store.getTemplate(spec.name);
    const candidate: Template = { ...spec, createdAt: existing?.createdAt ?? now() };
    if (existing) {
      if (!sameSpec(existing, candidate)) {
        throw new TorporError(
          'ALREADY_EXISTS',
          `template "${spec.name}" exists with a different spec; templates are immutable: apply it under a new name`,
          { field: 'name' },
        );
      }
      return { template: existing, created: false };
    }
    const runtimes = await this.o.agents.runtimes?.();
    if (runtimes && !runtimes.has(spec.runtime)) {
      throw new TorporError('NOT_SUPPORTED', `runtime "${spec.runtime}" has no worker pool on this engine`, {
        field: 'runtime',
      });
    }
    await this.o.images.resolve(spec.image); // NOT_FOUND / IMAGE_REJECTED before anything is stored
    const template = await this.o.store.createTemplate(candidate);
    this.buildGolden(template);
    return { template, created: true };
  }

  async getTemplate(name: string): Promise<Template> {
    const t = await this.o.store.getTemplate(parse(dnsLabel, name, 'name'));
    if (!t) throw notFound('template', name);
    return t;
  }

  /** A transition's template. A template is immutable once its golden snapshot is recorded (its spec never
   * changes, and templates are never deleted), so from then on it is read once per process, not per transition. */
  private async templateOf(name: string): Promise<Template> {
    const cached = this.settledTemplates.get(name);
    if (cached) return cached;
    const template = await this.getTemplate(name);
    if (template.goldenSnapshot) this.settledTemplates.set(name, template);
    return template;
  }

  listTemplates(query: unknown): Promise<Page<Template>> {
    return this.o.store.listTemplates(parse(listQuery, query ?? {}));
  }

  /** Boots the template once, waits ready, checkpoints: every actor's first resume restores this. */
  private buildGolden(template: Template): void {
    const build = this.takeGolden(template)
      .catch((err: unknown) => this.o.log.warn({ err, template: template.name }, 'golden snapshot failed'))
      .finally(() => this.goldenBuilds.delete(template.name));
    this.goldenBuilds.set(template.name, build);
  }

  /** Under the golden pseudo-actor's lock: the reconciler leaves the worker it holds alone. */
  private takeGolden(template: Template): Promise<void> {
    const ref: ActorRef = { space: '_golden', name: template.name };
    return this.locks.run(ref, () => this.takeGoldenLocked(template, ref));
  }

  private async takeGoldenLocked(template: Template, ref: ActorRef): Promise<void> {
    // Templates applied together take turns on the workers; give up only after a minute without one.
    let worker = await this.claimWorker({ runtime: template.runtime }, ref);
    for (let tries = 0; !worker && tries < 240; tries++) {
      await new Promise((r) => setTimeout(r, 250));
      worker = await this.claimWorker({ runtime: template.runtime }, ref);
    }
    if (!worker) throw new TorporError('NO_CAPACITY', 'no free worker for the golden snapshot');
    const agent = await this.agentOf(worker.node);
    try {
      await agent.activate({ workerId: worker.id, actor: ref, template });
      const key = `snapshots/_golden/${template.name}/${newSnapshotId()}/manifest.json`;
      const write = await this.snapshotGc.beginWrite(key);
      try {
        await agent.checkpoint({ workerId: worker.id, actor: ref, template, manifestKey: key, parent: null });
        if (!(await write.whole())) throw incompleteSnapshot(key);
        await this.o.store.setTemplateGolden(template.name, key);
      } finally {
        await write.end();
      }
      this.o.log.info({ template: template.name, snapshot: key }, 'golden snapshot taken');
    } finally {
      await this.releaseHeld(worker.id, ref);
    }
  }

  // ---------------------------------------------------------------- actors: reads

  async getActor(space: string, name: string): Promise<Actor> {
    parse(dnsLabel, space, 'space');
    parse(dnsLabel, name, 'name');
    const actor = await this.o.store.getActor(space, name);
    if (!actor) throw notFound('actor', `${space}/${name}`);
    return actor;
  }

  listActors(space: string | undefined, query: unknown): Promise<Page<Actor>> {
    if (space !== undefined) parse(dnsLabel, space, 'space');
    return this.o.store.listActors(space, parse(listQuery, query ?? {}));
  }

  // ---------------------------------------------------------------- create / fork / delete

  async createActor(space: string, input: unknown): Promise<Actor> {
    parse(dnsLabel, space, 'space');
    const req = parse(createActorRequest, input);
    const template = await this.o.store.getTemplate(req.template);
    if (!template) throw new TorporError('NOT_FOUND', `template "${req.template}" not found`, { field: 'template' });
    await this.goldenBuilds.get(template.name);
    const golden = (await this.o.store.getTemplate(template.name))?.goldenSnapshot;
    return this.o.store.createActor({
      space,
      name: req.name,
      template: template.name,
      status: 'SUSPENDED',
      labels: req.labels,
      history: [],
      lastActivity: now(),
      createdAt: now(),
      updatedAt: now(),
      ...(golden ? { snapshot: golden } : {}),
    });
  }

  async fork(space: string, name: string, input: unknown): Promise<Actor> {
    const req = parse(forkActorRequest, input);
    const source = await this.getActor(space, name);
    if (!source.snapshot) {
      throw new TorporError('FAILED_PRECONDITION', `actor "${space}/${name}" has no snapshot to fork from yet`, {
        field: 'name',
      });
    }
    return this.o.store.createActor({
      space,
      name: req.name,
      template: source.template,
      status: 'SUSPENDED',
      labels: { ...source.labels, ...req.labels },
      snapshot: source.snapshot,
      history: [],
      lastActivity: now(),
      createdAt: now(),
      updatedAt: now(),
    });
  }

  async deleteActor(space: string, name: string): Promise<void> {
    const ref = { space, name };
    await this.getActor(space, name);
    await this.locks.run(ref, async () => {
      const actor = await this.getActor(space, name);
      if (TRANSITIONAL.has(actor.status)) {
        throw new TorporError('FAILED_PRECONDITION', `actor is ${actor.status}; retry when it settles`, {
          field: 'status',
        });
      }
      if (actor.worker && actor.node) {
        await (await this.agentOf(actor.node)).release(actor.worker);
        await this.o.store.releaseWorker(actor.worker, ref);
      }
      await this.o.store.deleteActor(space, name, actor.version, this.locks.fence(ref));
      this.collectLater();
      if (actor.localSnapshot && actor.node) await this.discardLocal(actor.node, actor.localSnapshot);
      this.o.metrics.record('delete', 'ok', {});
    });
  }

  // ---------------------------------------------------------------- resume

  async resume(space: string, name: string, input: { worker?: string } = {}): Promise<Actor> {
    const ref = validRef(space, name); // a missing actor is NOT_FOUND once locked
    return withSpan('actor.resume', spanAttributes(ref), () => {
      const t0 = performance.now();
      return this.operate(ref, (current) => this.resumeLocked(ref, input.worker, current, t0));
    });
  }

  /** `current`: the actor as the lock found it; `t0`: when the resume asked for the lock. */
  private async resumeLocked(
    ref: ActorRef,
    workerId: string | undefined,
    current: Actor | undefined,
    t0: number,
  ): Promise<Actor> {
    const locked = performance.now();
    let actor = existing(ref, current);
    if (actor.status === 'RUNNING') return actor;
    this.assertSettled(actor);
    const op = this.startOperation('resume');
    recordPhase(op.phases, 'lock', t0, locked);
    const template = await timed(op.phases, 'template', () => this.templateOf(actor.template));
    const from = actor.status;
    const origin = actor.node;

    actor = await timed(op.phases, 'mark', () => this.transition(actor, 'RESUMING', { lastOperation: op }));
    crashPoint('resume.marked');
    // A node that died keeps its workers registered until their lease runs out: try another worker then.
    const unreachable: string[] = [];
    for (;;) {
      const worker = await timed(op.phases, 'claim', () =>
        this.claimWorker(
          {
            runtime: template.runtime,
            ...(workerId ? { workerId } : {}),
            ...(origin ? { preferNodes: [origin] } : {}),
            ...(unreachable.length ? { excludeWorkers: unreachable } : {}),
          },
          ref,
        ),
      );
      if (!worker) {
        await this.rollback(actor, from, op, 'no free worker');
        const which = workerId ? `worker "${workerId}" is not free` : `no free ${template.runtime} worker`;
        throw new TorporError('NO_CAPACITY', which, { field: workerId ? 'worker' : 'runtime' });
      }
      // Recorded before the agent is asked, so that whoever settles this resume after a crash knows the worker.
      actor = await timed(op.phases, 'assign', () => this.transition(actor, 'RESUMING', { worker: worker.id }));
      crashPoint('resume.claimed');

      const local = actor.localSnapshot && origin === worker.node ? actor.localSnapshot : undefined;
      let result: ActivateResult;
      try {
        const agent = await timed(op.phases, 'settle', async () => {
          const found = await this.agentOf(worker.node);
          await found.settled(worker.id);
          return found;
        });
        result = await agent.activate({
          workerId: worker.id,
          actor: ref,
          template,
          ...(actor.snapshot ? { snapshot: actor.snapshot } : {}),
          ...(local ? { localSnapshot: local } : {}),
        });
      } catch (err) {
        const e = asTorporError(err, 'RUNTIME_ERROR');
        if (err instanceof Unreachable && !workerId && unreachable.length < 3) {
          // Left busy: the node's lease (or its agent, when it comes back) settles the worker.
          this.o.log.warn({ worker: worker.id, err }, 'agent unreachable; resuming on another worker');
          unreachable.push(worker.id);
          actor = await this.transition(actor, 'RESUMING', { worker: undefined });
          continue;
        }
        // The agent released its slot when the activation failed (or it is gone and its lease will tell).
        if (!(err instanceof Unreachable)) await this.o.store.releaseWorker(worker.id, ref);
        await this.rollback(actor, from, op, `resume failed: ${e.message}`, { node: origin });
        throw e.code === 'SNAPSHOT_CORRUPT' || e.code === 'TIMEOUT' || e.code === 'IMAGE_REJECTED'
          ? e
          : new TorporError('RUNTIME_ERROR', `resume failed: ${e.message}`, { cause: err });
      }
      crashPoint('resume.activated');
      Object.assign(op.phases, result.phases);
      op.phases.total = elapsedMs(t0);
      op.finishedAt = now();
      const running = await this.lastTransition(actor, 'RUNNING', {
        worker: worker.id,
        node: worker.node,
        address: result.address,
        lastOperation: op,
        lastActivity: now(),
        reason: undefined,
      });
      crashPoint('resume.committed');
      this.finished(running, op, 'ok');
      if (local) this.dropLocalSnapshot(running, worker.node, local);
      return running;
    }
  }

  // ---------------------------------------------------------------- suspend / pause

  /** `opts.onlyIf` is checked under the actor's lock, just before the suspend starts: the idle policy uses it so
   * that a request arriving between its decision and the suspend keeps the actor running. */
  async suspend(space: string, name: string, opts: { onlyIf?: (actor: Actor) => boolean } = {}): Promise<Actor> {
    const ref = validRef(space, name); // a missing actor is NOT_FOUND once locked
    return withSpan('actor.suspend', spanAttributes(ref), async () => {
      // The snapshot's write is recorded while the lock is taken (it needs nothing the lock guards), and ended
      // off the suspend's path (it only holds garbage collection back).
      const key = this.snapshotKey(ref);
      const writing = this.snapshotGc.beginWrite(key);
      writing.catch(() => undefined); // awaited under the lock, if the suspend gets that far
      try {
        return await this.operate(ref, (current) => this.suspendLocked(ref, current, key, writing, opts.onlyIf));
      } finally {
        this.endWriteLater(writing);
      }
    });
  }

  /** `current`: the actor as the lock found it; `writing`: the record of the write of snapshot `key`. */
  private async suspendLocked(
    ref: ActorRef,
    current: Actor | undefined,
    key: string,
    writing: Promise<SnapshotWrite>,
    onlyIf?: (actor: Actor) => boolean,
  ): Promise<Actor> {
    const actor = existing(ref, current);
    if (actor.status === 'SUSPENDED') return actor;
    if (onlyIf && !onlyIf(actor)) {
      throw new TorporError('FAILED_PRECONDITION', 'actor is no longer idle', { field: 'status' });
    }
    if (actor.status === 'PAUSED') return this.suspendPaused(actor);
    this.assertRunning(actor);
    const template = await this.templateOf(actor.template);
    const op = this.startOperation('suspend');
    const t0 = performance.now();
    const worker = actor.worker!;
    const node = actor.node!;
    const agent = await this.agentOf(node);
    // Recorded before the actor changes: a wait for a garbage collection that times out leaves it RUNNING.
    const write = await writing;
    return this.suspendWriting(actor, { op, t0, worker, node, agent, key, template, write });
  }

  /** Ends a snapshot write's record once its suspend is over, without the suspend waiting; shutdown waits. */
  private endWriteLater(writing: Promise<SnapshotWrite>): void {
    const ending: Promise<void> = writing
      .then(
        (write) => write.end(),
        () => undefined,
      )
      .finally(() => this.endingWrites.delete(ending));
    this.endingWrites.add(ending);
  }

  private async suspendWriting(
    running: Actor,
    s: {
      op: Operation;
      t0: number;
      worker: string;
      node: string;
      agent: AgentClient;
      key: string;
      template: Template;
      write: SnapshotWrite;
    },
  ): Promise<Actor> {
    const { op, t0, worker, node, agent, key, template, write } = s;
    const ref = { space: running.space, name: running.name };
    const actor = await this.transition(running, 'SUSPENDING', { lastOperation: op, pendingSnapshot: key });
    crashPoint('suspend.marked');

    let local: LocalCheckpoint;
    try {
      local = await agent.checkpointLocal(
        worker,
        { kind: 'suspend', actor: ref, id: snapshotIdOf(key) },
        { deferTeardown: true },
      );
      Object.assign(op.phases, local.phases);
    } catch (err) {
      throw await this.checkpointFailed(actor, op, agent, worker, err);
    }
    crashPoint('suspend.checkpointed');
    try {
      const uploaded = await agent.upload(
        { actor: ref, template, manifestKey: key, parent: actor.snapshot ?? null },
        local.dir,
        local.files,
      );
      Object.assign(op.phases, uploaded.phases);
      const { rawBytes, storedBytes, uploadedChunks, reusedChunks, zeroChunks, deltaFiles } = uploaded.stats;
      op.snapshot = { rawBytes, storedBytes, uploadedChunks, reusedChunks, zeroChunks, deltaFiles };
      this.o.metrics.snapshotBytes.inc({ kind: 'raw' }, uploaded.stats.rawBytes);
      this.o.metrics.snapshotBytes.inc({ kind: 'stored' }, uploaded.stats.storedBytes);
      if (!(await write.whole())) throw incompleteSnapshot(key);
    } catch (err) {
      // The manifest is the commit marker: if it got written (the agent died answering), the snapshot is whole.
      if (!(await write.whole().catch(() => false))) {
        // The checkpoint exists only on the node: keep it there (PAUSED) rather than lose the actor's state.
        const e = asTorporError(err);
        op.error = e.message;
        op.finishedAt = now();
        const paused = await this.transition(actor, 'PAUSED', {
          lastOperation: op,
          localSnapshot: local.dir,
          pendingSnapshot: undefined,
          worker: undefined,
          address: undefined,
          reason: `upload failed, checkpoint kept on node ${node}: ${e.message}`,
        });
        this.finished(paused, op, 'error');
        this.releaseAfterTeardown(agent, worker, ref);
        return paused;
      }
    }
    crashPoint('suspend.uploaded');
    this.releaseAfterTeardown(agent, worker, ref);
    void agent.keepLocal(local.dir, key).catch(() => agent.discardLocal(local.dir).catch(() => undefined));
    op.phases.total = elapsedMs(t0);
    op.finishedAt = now();
    const suspended = await this.lastTransition(actor, 'SUSPENDED', {
      ...this.withNewSnapshot(actor, key, template),
      pendingSnapshot: undefined,
      worker: undefined,
      address: undefined,
      lastOperation: op,
      reason: undefined,
    });
    crashPoint('suspend.committed');
    this.finished(suspended, op, 'ok');
    this.compactAfterRelease(node, key, ref);
    return suspended;
  }

  async pause(space: string, name: string): Promise<Actor> {
    const ref = { space, name };
    await this.getActor(space, name);
    return withSpan('actor.pause', spanAttributes(ref), () => this.pauseLocked(ref));
  }

  private pauseLocked(ref: ActorRef): Promise<Actor> {
    const { space, name } = ref;
    return this.operate(ref, async () => {
      let actor = await this.getActor(space, name);
      if (actor.status === 'PAUSED') return actor;
      this.assertRunning(actor);
      const template = await this.getTemplate(actor.template);
      const op = this.startOperation('pause');
      const t0 = performance.now();
      const node = actor.node!;
      const agent = await this.agentOf(node);
      const worker = actor.worker!;
      const key = this.snapshotKey(ref);
      actor = await this.transition(actor, 'PAUSING', { lastOperation: op });
      let local: LocalCheckpoint;
      try {
        local = await agent.checkpointLocal(worker, { kind: 'pause', actor: ref, id: snapshotIdOf(key) });
        Object.assign(op.phases, local.phases);
      } catch (err) {
        throw await this.checkpointFailed(actor, op, agent, worker, err);
      }
      this.releaseAfterTeardown(agent, worker, ref);
      op.phases.total = elapsedMs(t0);
      op.finishedAt = now();
      const paused = await this.transition(actor, 'PAUSED', {
        lastOperation: op,
        localSnapshot: local.dir,
        worker: undefined,
        address: undefined,
        reason: undefined,
      });
      this.finished(paused, op, 'ok');
      this.uploadPaused(paused, template, agent, local.dir, key);
      return paused;
    });
  }

  /** A paused actor's checkpoint is copied to durable storage in the background, so a lost node never
   * strands it: the actor then points at the durable copy too. */
  private uploadPaused(actor: Actor, template: Template, agent: AgentClient, dir: string, key: string): void {
    const ref = { space: actor.space, name: actor.name };
    const upload = (async () => {
      const write = await this.snapshotGc.beginWrite(key);
      try {
        await agent.upload({ actor: ref, template, manifestKey: key, parent: actor.snapshot ?? null }, dir);
        if (!(await write.whole())) throw incompleteSnapshot(key);
        await this.locks.run(ref, async () => {
          const current = await this.o.store.getActor(ref.space, ref.name);
          if (!current || current.localSnapshot !== dir) return;
          await this.o.store.casActor(
            { ...current, ...this.withNewSnapshot(current, key, template) },
            current.version,
            this.locks.fence(ref),
          );
        });
      } finally {
        await write.end();
      }
    })()
      .catch((err: unknown) => this.o.log.warn({ err, actor: actorKey(ref) }, 'durable copy of paused actor failed'))
      .finally(() => this.pendingUploads.delete(dir));
    this.pendingUploads.set(dir, upload);
  }

  private async suspendPaused(actor: Actor): Promise<Actor> {
    const dir = actor.localSnapshot;
    if (dir) await this.pendingUploads.get(dir);
    const current = await this.getActor(actor.space, actor.name);
    // The paused checkpoint's directory and its durable snapshot share one id: if the actor does not point at
    // that snapshot, the background upload failed and the node holds the only copy — keep it.
    const pausedId = current.localSnapshot ? basename(current.localSnapshot) : undefined;
    if (pausedId && current.snapshot?.split('/').at(-2) !== pausedId) {
      throw new TorporError(
        'FAILED_PRECONDITION',
        'the paused checkpoint has no durable copy (its upload failed); resume the actor and suspend it again',
        { field: 'status' },
      );
    }
    const suspended = await this.transition(current, 'SUSPENDED', { localSnapshot: undefined, node: current.node });
    if (dir && current.node) await this.discardLocal(current.node, dir);
    return suspended;
  }

  private dropLocalSnapshot(actor: Actor, node: string, dir: string): void {
    void (async () => {
      await this.pendingUploads.get(dir);
      await this.locks.run(actor, async () => {
        const current = await this.o.store.getActor(actor.space, actor.name);
        if (current?.localSnapshot === dir) {
          await this.o.store.casActor(
            { ...current, localSnapshot: undefined },
            current.version,
            this.locks.fence(actor),
          );
        }
      });
      await this.discardLocal(node, dir);
    })().catch((err: unknown) => this.o.log.warn({ err }, 'dropping local snapshot failed'));
  }

  /** Deletes a node-local checkpoint, if its node is still there (a node that is gone took it along). */
  private async discardLocal(node: string, dir: string): Promise<void> {
    const agent = await this.o.agents.agent(node);
    await agent?.discardLocal(dir).catch((err: unknown) => this.o.log.warn({ err, node }, 'discarding failed'));
  }

  // ---------------------------------------------------------------- exec / logs

  /** Runs a command in the running actor; `onOutput` sees its output as it is produced. */
  async exec(space: string, name: string, input: unknown, onOutput?: OutputListener) {
    const req = parse(execRequest, input);
    const actor = await this.getActor(space, name);
    if (actor.status !== 'RUNNING' || !actor.worker || !actor.node) {
      throw new TorporError('FAILED_PRECONDITION', `actor is ${actor.status}; resume it first`, { field: 'status' });
    }
    return (await this.agentOf(actor.node)).exec(actor.worker, req.command, req.timeoutSeconds * 1000, onOutput);
  }

  /** The actor's output as its last node kept it; with `follow`, streaming until `signal` aborts. */
  async logs(space: string, name: string, opts: LogOptions = {}) {
    const actor = await this.getActor(space, name);
    const agent = (actor.node && (await this.o.agents.agent(actor.node))) || (await this.o.agents.agents())[0];
    if (!agent) throw new TorporError('NOT_FOUND', 'no node holds logs for this actor', { field: 'name' });
    return agent.logs({ space, name }, opts);
  }

  /** Calls `listener` with every snapshot transfer's progress on every node whose agent reports it, until the
   * returned function is called. */
  async onTransfer(listener: (event: TransferEvent) => void): Promise<() => void> {
    const agents = await this.o.agents.agents();
    // A node that cannot be watched (its agent unreachable) just reports nothing.
    const watches = await Promise.all(agents.map((agent) => agent.watchTransfers(listener).catch(() => () => {})));
    return () => {
      for (const unwatch of watches) unwatch();
    };
  }

  /** On shutdown: suspends every running actor and waits for their uploads and for the compaction of snapshots
   * still in use; garbage collection is left to the next process. */
  async suspendAll(): Promise<void> {
    this.shuttingDown = true;
    for await (const actor of allActors(this.o.store)) {
      if (actor.status !== 'RUNNING') continue;
      await this.suspend(actor.space, actor.name).catch((err: unknown) =>
        this.o.log.warn({ err, actor: actorKey(actor) }, 'suspend on shutdown failed'),
      );
    }
    await Promise.allSettled([...this.pendingUploads.values(), ...this.goldenBuilds.values(), ...this.endingWrites]);
    await this.maintaining;
  }

  // ---------------------------------------------------------------- reconciler

  /** Settles what operations that died (their process crashed, their node was lost) left behind, in a state that
   * still has a restorable snapshot: every transitional actor whose lock is free (its operation is over), every
   * running actor whose worker was lost, every paused actor whose node is gone; then removes workers whose lease
   * expired and frees workers held for an actor that does not hold them. Actors someone is working on (their
   * lock is held, here or elsewhere) are left to them. Returns how many actors it settled. */
  async reconcile(): Promise<number> {
    const judgeLeases = !this.inAgentGrace();
    let fixed = 0;
    for await (const actor of allActors(this.o.store)) {
      if (this.locks.isLocal(actor) || !(await this.needsSettling(actor, judgeLeases))) continue;
      let settled = false;
      await this.locks.tryRun(actor, async () => {
        const current = await this.o.store.getActor(actor.space, actor.name);
        if (current && (await this.needsSettling(current, judgeLeases))) settled = await this.settle(current);
      });
      if (settled) fixed++;
    }
    for await (const worker of allWorkers(this.o.store)) await this.reconcileWorker(worker, judgeLeases);
    return fixed;
  }

  private async needsSettling(actor: Actor, judgeLeases: boolean): Promise<boolean> {
    if (TRANSITIONAL.has(actor.status)) return true;
    if (actor.status === 'RUNNING') return (await this.workerLoss(actor, judgeLeases)) !== undefined;
    if (actor.status === 'PAUSED' && actor.node) return !(await this.o.agents.agent(actor.node));
    return false;
  }

  /** Why a running actor's worker no longer serves it, or undefined when it does. */
  private async workerLoss(actor: Actor, judgeLeases: boolean): Promise<string | undefined> {
    if (!actor.worker) return 'it has no worker';
    const worker = await this.o.store.getWorker(actor.worker);
    if (!worker) return `worker ${actor.worker} was lost (no longer registered: node ${actor.node} is gone)`;
    if (judgeLeases && leaseExpired(worker)) {
      return `worker ${worker.id} was lost (its lease expired: node ${worker.node} stopped renewing it)`;
    }
    if (!sameActor(worker.actor, actor)) return `worker ${actor.worker} was lost (its agent restarted)`;
    return undefined;
  }

  /** Brings one actor (whose lock this process holds) to a settled state. Returns whether it changed it. */
  private async settle(actor: Actor): Promise<boolean> {
    let to: ActorStatus;
    let patch: Partial<Actor>;
    let why: string;
    if (actor.status === 'RUNNING') {
      why = (await this.workerLoss(actor, true)) ?? 'its worker was lost';
      await this.releaseHeld(actor.worker, actor);
      [to, patch] = ['SUSPENDED', { localSnapshot: undefined }];
    } else if (actor.status === 'PAUSED') {
      why = `node ${actor.node} holding the paused checkpoint is gone`;
      [to, patch] = ['SUSPENDED', { localSnapshot: undefined }];
    } else if (actor.status === 'RESUMING') {
      why = 'the resume was interrupted';
      await this.releaseHeld(actor.worker, actor);
      const keepPaused = actor.localSnapshot !== undefined && (await this.nodeAlive(actor.node));
      [to, patch] = keepPaused ? ['PAUSED', {}] : ['SUSPENDED', { localSnapshot: undefined }];
    } else {
      [to, patch, why] = await this.settleCheckpoint(actor);
    }
    const snapshot = patch.snapshot ?? actor.snapshot;
    await this.transition(actor, to, {
      worker: undefined,
      address: undefined,
      pendingSnapshot: undefined,
      ...patch,
      reason:
        to === 'SUSPENDED' && patch.snapshot === undefined
          ? `reconciled: ${why}; rolled back to ${snapshot ?? 'a fresh boot'}`
          : `reconciled: ${why}`,
    });
    this.o.metrics.record('reconcile', 'ok', {});
    this.o.log.warn({ actor: actorKey(actor), from: actor.status, to, why }, 'reconciled an actor');
    return true;
  }

  /** A suspend or pause that was cut short: completed if its snapshot was written, back to RUNNING if the
   * sandbox still runs, otherwise back to the last snapshot. */
  private async settleCheckpoint(actor: Actor): Promise<[ActorStatus, Partial<Actor>, string]> {
    const pending = actor.pendingSnapshot;
    // Whole, not just present: its writer may have stalled past its write record while a collection swept.
    if (actor.status === 'SUSPENDING' && pending && (await snapshotWhole(this.o.blob, pending).catch(() => false))) {
      await this.releaseHeld(actor.worker, actor);
      const template = await this.o.store.getTemplate(actor.template);
      const patch = template ? this.withNewSnapshot(actor, pending, template) : { snapshot: pending };
      return ['SUSPENDED', patch, `the suspend was interrupted after its snapshot was written; completed`];
    }
    const worker = actor.worker ? await this.o.store.getWorker(actor.worker) : undefined;
    if (worker && sameActor(worker.actor, actor)) {
      const agent = await this.o.agents.agent(worker.node);
      if (agent && (await agent.sandboxAlive(worker.id).catch(() => false))) {
        return ['RUNNING', { worker: worker.id, address: actor.address }, `the ${actor.status} was interrupted`];
      }
    }
    await this.releaseHeld(actor.worker, actor);
    return ['SUSPENDED', { localSnapshot: undefined }, `the ${actor.status} was interrupted`];
  }

  /** Removes workers whose lease expired (their node is lost), and frees workers held for an actor that does not
   * hold them (a claim whose operation died before it recorded it, or a release that never happened). */
  private async reconcileWorker(worker: Worker, judgeLeases: boolean): Promise<void> {
    if (judgeLeases && leaseExpired(worker)) {
      // An actor still pointing at it is settled first (next pass, once its lock is free).
      const holder = worker.actor && (await this.o.store.getActor(worker.actor.space, worker.actor.name));
      if (holder && holder.worker === worker.id) return;
      await this.o.store.deleteWorker(worker.id);
      this.o.log.warn({ worker: worker.id, node: worker.node }, 'removed a worker whose lease expired');
      return;
    }
    const ref = worker.actor;
    if (worker.state !== 'busy' || !ref) return;
    await this.locks.tryRun(ref, async () => {
      const current = await this.o.store.getWorker(worker.id);
      if (!current || !sameActor(current.actor, ref)) return;
      const actor = await this.o.store.getActor(ref.space, ref.name);
      if (actor?.worker === worker.id) return;
      if (await this.releaseHeld(worker.id, ref)) {
        this.o.log.warn(
          { worker: worker.id, actor: actorKey(ref) },
          'freed a worker held for an actor it does not run',
        );
      }
    });
  }

  // ---------------------------------------------------------------- helpers

  private async agentOf(node: string): Promise<AgentClient> {
    const agent = await this.o.agents.agent(node);
    if (!agent) throw new TorporError('RUNTIME_ERROR', `node "${node}" has no agent`, { field: 'node' });
    return agent;
  }

  private inAgentGrace(): boolean {
    return Date.now() - this.startedAt < (this.o.workerLeaseMs ?? 0);
  }

  private async nodeAlive(node: string | undefined): Promise<boolean> {
    return node !== undefined && (await this.o.agents.agent(node)) !== undefined;
  }

  private async manifestExists(key: string): Promise<boolean> {
    return this.o.blob.has(key).catch(() => false);
  }

  /** Frees a worker the store says `ref` holds: its agent stops whatever runs there first. A worker whose agent
   * cannot confirm that stays held — its node's lease (or its agent, re-registering it) settles it later, so a
   * worker is never handed out while something may still run on it. Returns whether it freed it. */
  private async releaseHeld(workerId: string | undefined, ref: ActorRef): Promise<boolean> {
    if (!workerId) return false;
    const worker = await this.o.store.getWorker(workerId);
    if (!worker || !sameActor(worker.actor, ref)) return false;
    const agent = await this.o.agents.agent(worker.node);
    if (!agent) return false;
    try {
      await agent.release(workerId);
    } catch (err) {
      this.o.log.warn({ err, worker: workerId }, 'could not release a worker; leaving it to its lease');
      return false;
    }
    return this.o.store.releaseWorker(workerId, ref);
  }

  private assertSettled(actor: Actor): void {
    if (TRANSITIONAL.has(actor.status)) {
      throw new TorporError('FAILED_PRECONDITION', `actor is ${actor.status}; another operation is in flight`, {
        field: 'status',
      });
    }
  }

  /** After a failed checkpoint: back to RUNNING if the sandbox survived; if the checkpoint killed it, roll back
   * to the last snapshot rather than leave a RUNNING actor with nothing behind it. Returns the error to throw. */
  private async checkpointFailed(actor: Actor, op: Operation, agent: AgentClient, worker: string, err: unknown) {
    const e = asTorporError(err, 'RUNTIME_ERROR');
    op.error = e.message;
    op.finishedAt = now();
    this.finished(actor, op, 'error');
    if (await agent.sandboxAlive(worker).catch(() => false)) {
      await this.transition(actor, 'RUNNING', { lastOperation: op, reason: `${op.kind} failed: ${e.message}` });
      return e;
    }
    await this.releaseHeld(worker, actor);
    await this.transition(actor, 'SUSPENDED', {
      lastOperation: op,
      worker: undefined,
      address: undefined,
      pendingSnapshot: undefined,
      reason: `${op.kind} failed and the sandbox died (${e.message}); rolled back to ${actor.snapshot ?? 'a fresh boot'}`,
    });
    return e;
  }

  private assertRunning(actor: Actor): void {
    this.assertSettled(actor);
    if (actor.status !== 'RUNNING') {
      throw new TorporError('FAILED_PRECONDITION', `actor is ${actor.status}, not RUNNING`, { field: 'status' });
    }
  }

  private startOperation(kind: Operation['kind']): Operation {
    return { id: randomUUID(), kind, startedAt: now(), phases: {} };
  }

  /** The end of an operation: its metrics, and one log line naming actor, space, template, operation and trace. */
  private finished(actor: Actor, op: Operation, result: 'ok' | 'error'): void {
    this.o.metrics.record(op.kind, result, op.phases);
    const fields = {
      actor: actor.name,
      space: actor.space,
      template: actor.template,
      operation: op.id,
      kind: op.kind,
      result,
      phases: op.phases,
      traceId: traceId(),
      ...(op.error ? { error: op.error } : {}),
    };
    if (result === 'ok') this.o.log.info(fields, `${op.kind} done`);
    else this.o.log.warn(fields, `${op.kind} failed`);
  }

  private snapshotKey(ref: ActorRef): string {
    return `snapshots/${ref.space}/${ref.name}/${newSnapshotId()}/manifest.json`;
  }

  /** Points the actor at a new durable snapshot, keeping `retain` older ones in its history. */
  private withNewSnapshot(actor: Actor, key: string, template: Template): Partial<Actor> {
    const history = actor.snapshot ? [actor.snapshot, ...actor.history] : actor.history;
    const kept = history.slice(0, Math.max(0, template.snapshot.retain - 1));
    if (kept.length < history.length) this.collectLater();
    return { snapshot: key, history: kept };
  }

  /** A stopped sandbox takes a second or so to go away; its worker is freed only then. */
  private releaseAfterTeardown(agent: AgentClient, worker: string, ref: ActorRef): void {
    const release = agent
      .settled(worker)
      .then(() => this.o.store.releaseWorker(worker, ref))
      .then(() => undefined)
      .catch((err: unknown) => this.o.log.warn({ err, worker }, 'releasing worker failed'))
      .finally(() => this.releasing.delete(release));
    this.releasing.add(release);
  }

  /** Queues the new snapshot's deltas for compaction (see maintain). */
  private compactAfterRelease(node: string, key: string, actor: ActorRef): void {
    this.compactionQueue.push({ node, key, actor });
    this.kickMaintenance();
  }

  /** Asks for a garbage collection of snapshots nothing points at any more (see maintain). */
  collectLater(): void {
    this.gcDue = true;
    this.kickMaintenance();
  }

  private kickMaintenance(): void {
    this.maintaining ??= this.maintain().finally(() => {
      this.maintaining = undefined;
    });
  }

  private busy(): boolean {
    return (
      this.activeOperations > 0 ||
      this.releasing.size > 0 ||
      this.pendingUploads.size > 0 ||
      this.goldenBuilds.size > 0 ||
      Date.now() - this.lastOperationEnd < COMPACTION_IDLE_MS
    );
  }

  /** Background work that must never slow a resume or a suspend: delta compaction (CPU-heavy, zstd level 19)
   * and snapshot garbage collection. One thing at a time, only while no lifecycle operation is in flight (GC's
   * safety beside snapshot writes does not rest on this: see snapshot-gc.ts). */
  private async maintain(): Promise<void> {
    // On shutdown, compactions of live snapshots still finish (their bytes are saved once and for all); garbage
    // collection waits for the next process.
    while (this.compactionQueue.length > 0 || (this.gcDue && !this.shuttingDown)) {
      while (this.busy() && !this.shuttingDown) await new Promise((r) => setTimeout(r, COMPACTION_IDLE_MS));
      const next = this.compactionQueue.shift();
      if (next) {
        // A snapshot nothing points at any more (its actor was deleted, or it aged out) is garbage, not work.
        const actor = await this.o.store.getActor(next.actor.space, next.actor.name).catch(() => undefined);
        if (!actor || (actor.snapshot !== next.key && !actor.history.includes(next.key))) continue;
        const agent = await this.o.agents.agent(next.node);
        const saved = await (agent?.compact(next.key) ?? Promise.resolve(0)).catch((err: unknown) => {
          this.o.log.warn({ err, snapshot: next.key }, 'delta compaction failed');
          return 0;
        });
        this.o.metrics.snapshotBytes.inc({ kind: 'compacted' }, saved);
        continue;
      }
      this.gcDue = false;
      await this.collectGarbage();
    }
  }

  /** Deletes manifests no actor or template points at (snapshot, history, golden) and every object only they
   * used. Safe beside snapshot writes on this and every other server (see snapshot-gc.ts); one collection runs at a
   * time cluster-wide. */
  private async collectGarbage(): Promise<void> {
    try {
      const result = await this.snapshotGc.collect(() => this.liveManifests());
      if (!result) return;
      this.o.metrics.gcDeleted.inc({ kind: 'manifest' }, result.deletedManifests);
      this.o.metrics.gcDeleted.inc({ kind: 'object' }, result.deletedChunks);
      if (result.deletedManifests + result.deletedChunks > 0) this.o.log.info(result, 'snapshot garbage collected');
    } catch (err) {
      this.o.log.warn({ err }, 'snapshot garbage collection failed');
    }
  }

  private async liveManifests(): Promise<string[]> {
    const live = new Set<string>();
    for await (const a of allActors(this.o.store)) {
      for (const k of [a.snapshot, ...a.history]) if (k) live.add(k);
      // A suspend cut short whose manifest was written is completed by the reconciler: keep what it wrote.
      if (a.pendingSnapshot && (await this.manifestExists(a.pendingSnapshot))) live.add(a.pendingSnapshot);
    }
    for await (const t of allTemplates(this.o.store)) if (t.goldenSnapshot) live.add(t.goldenSnapshot);
    return [...live];
  }

  /** Runs a lifecycle operation under the actor's lock, counted as activity (see compaction); `fn` is given the
   * actor as the lock found it. */
  private operate<T>(ref: ActorRef, fn: (actor: Actor | undefined) => Promise<T>): Promise<T> {
    return this.locks.run(ref, async (actor) => {
      this.activeOperations++;
      try {
        return await fn(actor);
      } finally {
        this.activeOperations--;
        this.lastOperationEnd = Date.now();
      }
    });
  }

  /** Claims a worker; when none is free but some are being torn down, waits for them (bounded) rather than
   * failing a resume that would succeed a moment later. So it does just after this process started, while agents
   * that could not renew their leases during a restart come back. */
  private async claimWorker(filter: WorkerFilter, ref: ActorRef): Promise<Worker | undefined> {
    const deadline = Date.now() + this.claimWaitMs;
    for (;;) {
      const worker = await this.o.store.claimWorker(filter, ref);
      if (worker || Date.now() >= deadline) return worker;
      if (this.releasing.size > 0) {
        await Promise.race([...this.releasing, new Promise((r) => setTimeout(r, Math.max(0, deadline - Date.now())))]);
      } else if (this.inAgentGrace()) {
        await new Promise((r) => setTimeout(r, 100));
      } else {
        return undefined;
      }
    }
  }

  /** CAS the actor into `to`; `patch` keys set to undefined are removed. */
  private async transition(
    actor: Actor,
    to: ActorStatus,
    patch: Partial<Actor>,
    fence = this.locks.fence(actor),
  ): Promise<Actor> {
    if (actor.status !== to) assertTransition(actor.status, to);
    const next: Actor = { ...actor, ...patch, status: to };
    if (TRANSITIONAL.has(to)) next.transitionDeadline = new Date(Date.now() + this.transitionTimeoutMs).toISOString();
    else delete next.transitionDeadline;
    for (const k of Object.keys(next) as (keyof Actor)[]) if (next[k] === undefined) delete next[k];
    return this.o.store.casActor(next, actor.version, fence);
  }

  /** An operation's last write on the actor (nothing after it writes the actor under this lock): it ends the
   * actor's lease too, saving the release's round-trip. */
  private async lastTransition(actor: Actor, to: ActorStatus, patch: Partial<Actor>): Promise<Actor> {
    const fence = this.locks.lastFence(actor);
    const next = await this.transition(actor, to, patch, fence);
    if (fence) this.locks.ended(actor);
    return next;
  }

  private async rollback(
    actor: Actor,
    to: ActorStatus,
    op: Operation,
    reason: string,
    patch: Partial<Actor> = {},
  ): Promise<void> {
    op.error = reason;
    op.finishedAt = now();
    await this.transition(actor, to, { lastOperation: op, reason, worker: undefined, address: undefined, ...patch });
    this.finished(actor, op, 'error');
  }
}
