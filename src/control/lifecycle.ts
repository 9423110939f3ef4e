// Lifecycle workflows: create, resume, suspend, pause, fork, delete. Each is a short list of named steps; every
// status change is a compare-and-set on the actor's version, and a failed step rolls the actor back to a state
// that still has a restorable snapshot, saying why in `reason`.
import { randomUUID } from 'node:crypto';
import { readdir, rm } from 'node:fs/promises';
import { basename, join } from 'node:path';
import type { Logger } from 'pino';
import type { ActivateResult, NodeAgent, TransferEvent } from '../agent/agent.ts';
import type { BlobStore } from '../blob/blob.ts';
import { asTorporError, notFound, TorporError } from '../core/errors.ts';
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
import { timed, traceId, withSpan } from '../core/trace.ts';
import type { Actor, ActorRef, ActorStatus, Operation, Page, Template, Worker, WorkerFilter } from '../core/types.ts';
import type { ImageStore } from '../image/store.ts';
import type { OutputListener } from '../runtime/runtime.ts';
import { collectGarbage, newSnapshotId } from '../snapshot/index.ts';
import { allActors, allTemplates } from '../store/all.ts';
import type { StateStore } from '../store/store.ts';
import { KeyedMutex } from './keyed-mutex.ts';
import type { Metrics } from './metrics.ts';

export interface AgentDirectory {
  agent(node: string): NodeAgent | undefined;
  agents(): NodeAgent[];
}

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
}

const now = (): string => new Date().toISOString();
const actorKey = (ref: ActorRef): string => `${ref.space}/${ref.name}`;
const spanAttributes = (ref: ActorRef) => ({ 'torpor.space': ref.space, 'torpor.actor': ref.name });
/** Compaction waits for this long without any lifecycle operation. */
const COMPACTION_IDLE_MS = 500;

function sameSpec(a: Template, b: Template): boolean {
  const strip = ({ createdAt: _c, goldenSnapshot: _g, ...rest }: Template) => JSON.stringify(rest);
  return strip(a) === strip(b);
}

export class Lifecycle {
  private readonly o: LifecycleOptions;
  private readonly mutex = new KeyedMutex();
  private readonly goldenBuilds = new Map<string, Promise<void>>();
  /** Background durable uploads of paused actors, by local checkpoint directory. */
  private readonly pendingUploads = new Map<string, Promise<void>>();
  private readonly transitionTimeoutMs: number;
  private readonly compactionQueue: { agent: NodeAgent; key: string; actor: ActorRef }[] = [];
  private maintaining: Promise<void> | undefined;
  private shuttingDown = false;
  private gcDue = false;
  private gcRunning: Promise<void> | undefined;
  private activeOperations = 0;
  private lastOperationEnd = 0;
  /** Workers being freed (sandbox teardown in progress). */
  private readonly releasing = new Set<Promise<void>>();
  private readonly claimWaitMs: number;

  constructor(opts: LifecycleOptions) {
    this.o = opts;
    this.transitionTimeoutMs = opts.transitionTimeoutMs ?? 120_000;
    this.claimWaitMs = opts.claimWaitMs ?? 10_000;
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
    const hasPool = this.o.agents
      .agents()
      .some((agent) => [...agent.slots.values()].some((slot) => slot.runtime.name === spec.runtime));
    if (!hasPool) {
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

  private async takeGolden(template: Template): Promise<void> {
    const ref: ActorRef = { space: '_golden', name: template.name };
    while (this.gcRunning) await this.gcRunning;
    // Templates applied together take turns on the workers; give up only after a minute without one.
    let worker = await this.claimWorker({ runtime: template.runtime }, ref);
    for (let tries = 0; !worker && tries < 240; tries++) {
      await new Promise((r) => setTimeout(r, 250));
      worker = await this.claimWorker({ runtime: template.runtime }, ref);
    }
    if (!worker) throw new TorporError('NO_CAPACITY', 'no free worker for the golden snapshot');
    const agent = this.agentOf(worker.node);
    try {
      await agent.activate({ workerId: worker.id, actor: ref, template });
      const key = `snapshots/_golden/${template.name}/${newSnapshotId()}/manifest.json`;
      await agent.checkpoint({ workerId: worker.id, actor: ref, template, manifestKey: key, parent: null });
      await this.o.store.setTemplateGolden(template.name, key);
      this.o.log.info({ template: template.name, snapshot: key }, 'golden snapshot taken');
    } finally {
      await agent.release(worker.id).catch(() => undefined);
      await this.o.store.releaseWorker(worker.id, ref);
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
    await this.mutex.run(actorKey(ref), async () => {
      const actor = await this.getActor(space, name);
      if (TRANSITIONAL.has(actor.status)) {
        throw new TorporError('FAILED_PRECONDITION', `actor is ${actor.status}; retry when it settles`, {
          field: 'status',
        });
      }
      if (actor.worker && actor.node) {
        await this.agentOf(actor.node).release(actor.worker);
        await this.o.store.releaseWorker(actor.worker, ref);
      }
      await this.o.store.deleteActor(space, name, actor.version);
      this.collectLater();
      if (actor.localSnapshot) await rm(actor.localSnapshot, { recursive: true, force: true });
      this.o.metrics.record('delete', 'ok', {});
    });
  }

  // ---------------------------------------------------------------- resume

  async resume(space: string, name: string, input: { worker?: string } = {}): Promise<Actor> {
    const ref = { space, name };
    await this.getActor(space, name);
    return withSpan('actor.resume', spanAttributes(ref), () =>
      this.operate(ref, () => this.resumeLocked(ref, input.worker)),
    );
  }

  private async resumeLocked(ref: ActorRef, workerId: string | undefined): Promise<Actor> {
    let actor = await this.getActor(ref.space, ref.name);
    if (actor.status === 'RUNNING') return actor;
    this.assertSettled(actor);
    const template = await this.getTemplate(actor.template);
    const from = actor.status;
    const op = this.startOperation('resume');
    const t0 = performance.now();

    actor = await this.transition(actor, 'RESUMING', { lastOperation: op });
    const worker = await timed(op.phases, 'claim', () =>
      this.claimWorker(
        {
          runtime: template.runtime,
          ...(workerId ? { workerId } : {}),
          ...(actor.node ? { preferNodes: [actor.node] } : {}),
        },
        ref,
      ),
    );
    if (!worker) {
      await this.rollback(actor, from, op, 'no free worker');
      const which = workerId ? `worker "${workerId}" is not free` : `no free ${template.runtime} worker`;
      throw new TorporError('NO_CAPACITY', which, { field: workerId ? 'worker' : 'runtime' });
    }

    const agent = this.agentOf(worker.node);
    const local = actor.localSnapshot && actor.node === worker.node ? actor.localSnapshot : undefined;
    let result: ActivateResult;
    try {
      await agent.settled(worker.id);
      result = await agent.activate({
        workerId: worker.id,
        actor: ref,
        template,
        ...(actor.snapshot ? { snapshot: actor.snapshot } : {}),
        ...(local ? { localSnapshot: local } : {}),
      });
    } catch (err) {
      await this.o.store.releaseWorker(worker.id, ref);
      const e = asTorporError(err, 'RUNTIME_ERROR');
      await this.rollback(actor, from, op, `resume failed: ${e.message}`);
      throw e.code === 'SNAPSHOT_CORRUPT' || e.code === 'TIMEOUT' || e.code === 'IMAGE_REJECTED'
        ? e
        : new TorporError('RUNTIME_ERROR', `resume failed: ${e.message}`, { cause: err });
    }
    Object.assign(op.phases, result.phases);
    op.phases.total = elapsedMs(t0);
    op.finishedAt = now();
    const running = await this.transition(actor, 'RUNNING', {
      worker: worker.id,
      node: worker.node,
      address: result.address,
      lastOperation: op,
      lastActivity: now(),
      reason: undefined,
    });
    this.finished(running, op, 'ok');
    if (local) this.dropLocalSnapshot(running, local);
    return running;
  }

  // ---------------------------------------------------------------- suspend / pause

  /** `opts.onlyIf` is checked under the actor's lock, just before the suspend starts: the idle policy uses it so
   * that a request arriving between its decision and the suspend keeps the actor running. */
  async suspend(space: string, name: string, opts: { onlyIf?: (actor: Actor) => boolean } = {}): Promise<Actor> {
    const ref = { space, name };
    await this.getActor(space, name);
    return withSpan('actor.suspend', spanAttributes(ref), () =>
      this.operate(ref, () => this.suspendLocked(ref, opts.onlyIf)),
    );
  }

  private async suspendLocked(ref: ActorRef, onlyIf?: (actor: Actor) => boolean): Promise<Actor> {
    let actor = await this.getActor(ref.space, ref.name);
    if (actor.status === 'SUSPENDED') return actor;
    if (onlyIf && !onlyIf(actor)) {
      throw new TorporError('FAILED_PRECONDITION', 'actor is no longer idle', { field: 'status' });
    }
    if (actor.status === 'PAUSED') return this.suspendPaused(actor);
    this.assertRunning(actor);
    const template = await this.getTemplate(actor.template);
    const op = this.startOperation('suspend');
    const t0 = performance.now();
    const worker = actor.worker!;
    const agent = this.agentOf(actor.node!);
    const key = this.snapshotKey(ref);
    actor = await this.transition(actor, 'SUSPENDING', { lastOperation: op });

    const dir = join(agent.nodeDir, 'checkpoints', ref.space, ref.name, key.split('/').at(-2)!);
    let files: string[];
    try {
      const local = await agent.checkpointLocal(worker, dir, { deferTeardown: true });
      files = local.files;
      Object.assign(op.phases, local.phases);
    } catch (err) {
      throw await this.checkpointFailed(actor, op, agent, worker, err);
    }
    try {
      const uploaded = await agent.upload(
        { actor: ref, template, manifestKey: key, parent: actor.snapshot ?? null },
        dir,
        files,
      );
      Object.assign(op.phases, uploaded.phases);
      const { rawBytes, storedBytes, uploadedChunks, reusedChunks, zeroChunks, deltaFiles } = uploaded.stats;
      op.snapshot = { rawBytes, storedBytes, uploadedChunks, reusedChunks, zeroChunks, deltaFiles };
      this.o.metrics.snapshotBytes.inc({ kind: 'raw' }, uploaded.stats.rawBytes);
      this.o.metrics.snapshotBytes.inc({ kind: 'stored' }, uploaded.stats.storedBytes);
    } catch (err) {
      // The checkpoint exists only on this node: keep it there (PAUSED) rather than lose the actor's state.
      const e = asTorporError(err);
      op.error = e.message;
      op.finishedAt = now();
      const paused = await this.transition(actor, 'PAUSED', {
        lastOperation: op,
        localSnapshot: dir,
        worker: undefined,
        address: undefined,
        reason: `upload failed, checkpoint kept on node ${actor.node}: ${e.message}`,
      });
      this.finished(paused, op, 'error');
      return paused;
    } finally {
      this.releaseAfterTeardown(agent, worker, ref);
    }
    void agent.keepLocal(dir, key).catch(() => rm(dir, { recursive: true, force: true }));
    op.phases.total = elapsedMs(t0);
    op.finishedAt = now();
    const suspended = await this.transition(actor, 'SUSPENDED', {
      ...this.withNewSnapshot(actor, key, template),
      worker: undefined,
      address: undefined,
      lastOperation: op,
      reason: undefined,
    });
    this.finished(suspended, op, 'ok');
    this.compactAfterRelease(agent, key, ref);
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
      const agent = this.agentOf(actor.node!);
      const worker = actor.worker!;
      const key = this.snapshotKey(ref);
      const dir = join(agent.nodeDir, 'paused', space, name, key.split('/').at(-2)!);
      actor = await this.transition(actor, 'PAUSING', { lastOperation: op });
      try {
        Object.assign(op.phases, (await agent.checkpointLocal(worker, dir)).phases);
      } catch (err) {
        throw await this.checkpointFailed(actor, op, agent, worker, err);
      }
      this.releaseAfterTeardown(agent, worker, ref);
      op.phases.total = elapsedMs(t0);
      op.finishedAt = now();
      const paused = await this.transition(actor, 'PAUSED', {
        lastOperation: op,
        localSnapshot: dir,
        worker: undefined,
        address: undefined,
        reason: undefined,
      });
      this.finished(paused, op, 'ok');
      this.uploadPaused(paused, template, agent, dir, key);
      return paused;
    });
  }

  /** A paused actor's checkpoint is copied to durable storage in the background, so a lost node never
   * strands it: the actor then points at the durable copy too. */
  private uploadPaused(actor: Actor, template: Template, agent: NodeAgent, dir: string, key: string): void {
    const ref = { space: actor.space, name: actor.name };
    const upload = (async () => {
      const files = await readdir(dir);
      await agent.upload({ actor: ref, template, manifestKey: key, parent: actor.snapshot ?? null }, dir, files);
      await this.mutex.run(actorKey(ref), async () => {
        const current = await this.o.store.getActor(ref.space, ref.name);
        if (!current || current.localSnapshot !== dir) return;
        await this.o.store.casActor({ ...current, ...this.withNewSnapshot(current, key, template) }, current.version);
      });
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
    if (dir) await rm(dir, { recursive: true, force: true });
    return suspended;
  }

  private dropLocalSnapshot(actor: Actor, dir: string): void {
    void (async () => {
      await this.pendingUploads.get(dir);
      await this.mutex.run(actorKey(actor), async () => {
        const current = await this.o.store.getActor(actor.space, actor.name);
        if (current?.localSnapshot === dir) {
          await this.o.store.casActor({ ...current, localSnapshot: undefined }, current.version);
        }
      });
      await rm(dir, { recursive: true, force: true });
    })().catch((err: unknown) => this.o.log.warn({ err }, 'dropping local snapshot failed'));
  }

  // ---------------------------------------------------------------- exec / logs

  /** Runs a command in the running actor; `onOutput` sees its output as it is produced. */
  async exec(space: string, name: string, input: unknown, onOutput?: OutputListener) {
    const req = parse(execRequest, input);
    const actor = await this.getActor(space, name);
    if (actor.status !== 'RUNNING' || !actor.worker || !actor.node) {
      throw new TorporError('FAILED_PRECONDITION', `actor is ${actor.status}; resume it first`, { field: 'status' });
    }
    return this.agentOf(actor.node).exec(actor.worker, req.command, req.timeoutSeconds * 1000, onOutput);
  }

  async logs(space: string, name: string) {
    const actor = await this.getActor(space, name);
    const agent = (actor.node && this.o.agents.agent(actor.node)) || this.o.agents.agents()[0];
    if (!agent) throw new TorporError('NOT_FOUND', 'no node holds logs for this actor', { field: 'name' });
    return agent.logs({ space, name });
  }

  /** On shutdown: suspends every running actor and waits for their uploads and for the compaction of snapshots
   * still in use; garbage collection is left to the next process. */
  /** Calls `listener` with every snapshot transfer's progress on every node, until the returned function is called. */
  onTransfer(listener: (event: TransferEvent) => void): () => void {
    const agents = this.o.agents.agents();
    for (const agent of agents) agent.transfers.on('progress', listener);
    return () => {
      for (const agent of agents) agent.transfers.off('progress', listener);
    };
  }

  async suspendAll(): Promise<void> {
    this.shuttingDown = true;
    for await (const actor of allActors(this.o.store)) {
      if (actor.status !== 'RUNNING') continue;
      await this.suspend(actor.space, actor.name).catch((err: unknown) =>
        this.o.log.warn({ err, actor: actorKey(actor) }, 'suspend on shutdown failed'),
      );
    }
    await Promise.allSettled([...this.pendingUploads.values(), ...this.goldenBuilds.values()]);
    await this.maintaining;
  }

  // ---------------------------------------------------------------- reconciler

  /** Ends transitions that stalled (a crashed process, a worker whose lease expired) in a state that still has
   * a restorable snapshot. Actors with an operation in flight in this process are left alone. */
  async reconcile(): Promise<number> {
    let fixed = 0;
    for await (const actor of allActors(this.o.store)) {
      if (this.mutex.isLocked(actorKey(actor))) continue;
      if (await this.reconcileOne(actor)) fixed++;
    }
    return fixed;
  }

  private async reconcileOne(actor: Actor): Promise<boolean> {
    const stalled = TRANSITIONAL.has(actor.status) && Date.parse(actor.transitionDeadline ?? '') < Date.now();
    const worker = actor.worker ? await this.o.store.getWorker(actor.worker) : undefined;
    const workerLost =
      actor.worker !== undefined &&
      (actor.status === 'RUNNING' || TRANSITIONAL.has(actor.status)) &&
      (!worker || Date.parse(worker.leaseExpiresAt) < Date.now() || worker.actor?.name !== actor.name);
    const pausedNodeLost = actor.status === 'PAUSED' && actor.node !== undefined && !this.o.agents.agent(actor.node);
    if (!stalled && !workerLost && !pausedNodeLost) return false;
    const why = stalled
      ? `${actor.status} passed its deadline`
      : workerLost
        ? `worker ${actor.worker} was lost`
        : `node ${actor.node} holding the paused checkpoint is gone`;
    await this.mutex.run(actorKey(actor), async () => {
      const current = await this.o.store.getActor(actor.space, actor.name);
      if (!current || current.version !== actor.version) return;
      if (current.worker && current.node) {
        await this.o.agents
          .agent(current.node)
          ?.release(current.worker)
          .catch(() => undefined);
        await this.o.store.releaseWorker(current.worker, current);
      }
      await this.transition(current, 'SUSPENDED', {
        worker: undefined,
        address: undefined,
        localSnapshot: undefined,
        reason: `reconciled: ${why}; rolled back to ${current.snapshot ?? 'a fresh boot'}`,
      });
      this.o.metrics.record('reconcile', 'ok', {});
      this.o.log.warn({ actor: actorKey(current), why }, 'reconciled a stalled actor');
    });
    return true;
  }

  // ---------------------------------------------------------------- helpers

  private agentOf(node: string): NodeAgent {
    const agent = this.o.agents.agent(node);
    if (!agent) throw new TorporError('RUNTIME_ERROR', `node "${node}" has no agent`, { field: 'node' });
    return agent;
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
  private async checkpointFailed(actor: Actor, op: Operation, agent: NodeAgent, worker: string, err: unknown) {
    const e = asTorporError(err, 'RUNTIME_ERROR');
    op.error = e.message;
    op.finishedAt = now();
    this.finished(actor, op, 'error');
    if (await agent.sandboxAlive(worker).catch(() => false)) {
      await this.transition(actor, 'RUNNING', { lastOperation: op, reason: `${op.kind} failed: ${e.message}` });
      return e;
    }
    await agent.release(worker).catch(() => undefined);
    await this.o.store.releaseWorker(worker, actor);
    await this.transition(actor, 'SUSPENDED', {
      lastOperation: op,
      worker: undefined,
      address: undefined,
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
  private releaseAfterTeardown(agent: NodeAgent, worker: string, ref: ActorRef): void {
    const release = agent
      .settled(worker)
      .then(() => this.o.store.releaseWorker(worker, ref))
      .then(() => undefined)
      .catch((err: unknown) => this.o.log.warn({ err, worker }, 'releasing worker failed'))
      .finally(() => this.releasing.delete(release));
    this.releasing.add(release);
  }

  /** Queues the new snapshot's deltas for compaction (see maintain). */
  private compactAfterRelease(agent: NodeAgent, key: string, actor: ActorRef): void {
    this.compactionQueue.push({ agent, key, actor });
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
   * and snapshot garbage collection. One thing at a time, only while no lifecycle operation is in flight; GC
   * additionally holds operations off while it runs, because a snapshot being written may reuse a chunk GC
   * is about to delete. */
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
        const saved = await next.agent.compact(next.key).catch((err: unknown) => {
          this.o.log.warn({ err, snapshot: next.key }, 'delta compaction failed');
          return 0;
        });
        this.o.metrics.snapshotBytes.inc({ kind: 'compacted' }, saved);
        continue;
      }
      this.gcDue = false;
      this.gcRunning = this.collectGarbage().finally(() => {
        this.gcRunning = undefined;
      });
      await this.gcRunning;
    }
  }

  /** Deletes manifests no actor or template points at (snapshot, history, golden) and every object only they
   * used. Runs with no snapshot write in flight (see maintain). */
  private async collectGarbage(): Promise<void> {
    const live = new Set<string>();
    for await (const a of allActors(this.o.store)) for (const k of [a.snapshot, ...a.history]) if (k) live.add(k);
    for await (const t of allTemplates(this.o.store)) if (t.goldenSnapshot) live.add(t.goldenSnapshot);
    try {
      const result = await collectGarbage(this.o.blob, [...live]);
      this.o.metrics.gcDeleted.inc({ kind: 'manifest' }, result.deletedManifests);
      this.o.metrics.gcDeleted.inc({ kind: 'object' }, result.deletedChunks);
      if (result.deletedManifests + result.deletedChunks > 0) this.o.log.info(result, 'snapshot garbage collected');
    } catch (err) {
      this.o.log.warn({ err }, 'snapshot garbage collection failed');
    }
  }

  /** Runs a lifecycle operation under the actor's lock, counted as activity (see compaction). */
  private operate<T>(ref: ActorRef, fn: () => Promise<T>): Promise<T> {
    return this.mutex.run(actorKey(ref), async () => {
      while (this.gcRunning) await this.gcRunning;
      this.activeOperations++;
      try {
        return await fn();
      } finally {
        this.activeOperations--;
        this.lastOperationEnd = Date.now();
      }
    });
  }

  /** Claims a worker; when none is free but some are being torn down, waits for them (bounded) rather than
   * failing a resume that would succeed a moment later. */
  private async claimWorker(filter: WorkerFilter, ref: ActorRef): Promise<Worker | undefined> {
    const deadline = Date.now() + this.claimWaitMs;
    for (;;) {
      const worker = await this.o.store.claimWorker(filter, ref);
      if (worker || this.releasing.size === 0 || Date.now() >= deadline) return worker;
      await Promise.race([...this.releasing, new Promise((r) => setTimeout(r, Math.max(0, deadline - Date.now())))]);
    }
  }

  /** CAS the actor into `to`; `patch` keys set to undefined are removed. */
  private async transition(actor: Actor, to: ActorStatus, patch: Partial<Actor>): Promise<Actor> {
    if (actor.status !== to) assertTransition(actor.status, to);
    const next: Actor = { ...actor, ...patch, status: to };
    if (TRANSITIONAL.has(to)) next.transitionDeadline = new Date(Date.now() + this.transitionTimeoutMs).toISOString();
    else delete next.transitionDeadline;
    for (const k of Object.keys(next) as (keyof Actor)[]) if (next[k] === undefined) delete next[k];
    return this.o.store.casActor(next, actor.version);
  }

  private async rollback(actor: Actor, to: ActorStatus, op: Operation, reason: string): Promise<void> {
    op.error = reason;
    op.finishedAt = now();
    await this.transition(actor, to, { lastOperation: op, reason, worker: undefined, address: undefined });
    this.finished(actor, op, 'error');
  }
}
