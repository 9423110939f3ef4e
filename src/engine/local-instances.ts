// The local engine seen through the Engine interface: an instance is an actor in one space (default "aenv").
//
// - id: "<actor>.<space>", which is also the router host prefix: the instance answers at
//   http://<id>.actors.<domain>, and through the MCP gateway by id (route), and nowhere a client names. Without a
//   name or idempotency key the actor name ends in 64 random bits, so an id cannot be guessed.
// - envName "name@version" → template "name-version" (see templateFor); environment_variables / arguments
//   → a derived template "<template>-e<hash>" (the base's env merged, arguments appended to its command), made
//   once per distinct set and golden-snapshotted like any template.
// - owner, ttl, envName and the idempotency key live on the actor's labels under "torpor.aenv/", so they are
//   stored, listed and deleted with it; user labels sit beside them (that prefix is refused).
// - TTL: one timer per instance, armed at create (and for every existing instance at start), that deletes it
//   at created_at + ttl; no sweep.
// - Ownership: a caller who states an owner (always, behind API keys: see src/api/compat.ts) sees and touches only
//   instances of that owner; one who states none (open mode, or a trusted service) is not restricted.
import { createHash, randomBytes } from 'node:crypto';
import type { Logger } from 'pino';
import type { Lifecycle } from '../control/lifecycle.ts';
import { isTorporError, TorporError } from '../core/errors.ts';
import { parse } from '../core/schemas.ts';
import type { Actor, ActorRef, Template } from '../core/types.ts';
import {
  CAPABILITIES,
  type Caller,
  type Capability,
  type CreateInstanceRequest,
  type CreateOptions,
  createInstanceRequest,
  createOwner,
  type Engine,
  type EnvObject,
  type ExecOutput,
  type Instance,
  type InstanceStatus,
  parseTtl,
  rfc3339,
  splitEnvName,
  templateFor,
} from './engine.ts';

export const LABEL_PREFIX = 'torpor.aenv/';
const L_ENV = `${LABEL_PREFIX}env`;
const L_OWNER = `${LABEL_PREFIX}owner`;
const L_TTL = `${LABEL_PREFIX}ttl`;
const L_IDEM = `${LABEL_PREFIX}idempotency`;
/** setTimeout's longest delay; longer TTLs re-arm. */
const MAX_TIMER_MS = 2 ** 31 - 1;

export interface LocalInstancesOptions {
  lifecycle: Lifecycle;
  log: Logger;
  /** The space instances live in. */
  space?: string;
}

const sha = (s: string) => createHash('sha256').update(s).digest('hex');

export class LocalInstances implements Engine {
  readonly name = 'local';
  readonly capabilities: ReadonlySet<Capability> = new Set(CAPABILITIES);
  readonly space: string;
  private readonly lifecycle: Lifecycle;
  private readonly log: Logger;
  private readonly timers = new Map<string, NodeJS.Timeout>();
  private readonly templates = new Map<string, Template>();
  private closed = false;

  constructor(opts: LocalInstancesOptions) {
    this.lifecycle = opts.lifecycle;
    this.log = opts.log;
    this.space = opts.space ?? 'aenv';
  }

  /** Arms the TTL timer of every existing instance (those whose time has passed are deleted at once). */
  async start(): Promise<void> {
    for (const actor of await this.actors()) this.armTtl(actor);
  }

  async close(): Promise<void> {
    this.closed = true;
    for (const t of this.timers.values()) clearTimeout(t);
    this.timers.clear();
  }

  // ---------------------------------------------------------------- instance lifecycle

  async create(input: CreateInstanceRequest, opts: CreateOptions = {}): Promise<Instance> {
    const req = parse(createInstanceRequest, input);
    const base = templateFor(req.envName);
    if (req.envName.length > 63) {
      throw new TorporError('INVALID_ARGUMENT', 'envName: must be at most 63 characters', { field: 'envName' });
    }
    for (const key of Object.keys(req.labels ?? {})) {
      if (key.startsWith(LABEL_PREFIX)) {
        throw new TorporError('INVALID_ARGUMENT', `labels.${key}: the prefix "${LABEL_PREFIX}" is reserved`, {
          field: `labels.${key}`,
        });
      }
    }
    if (req.datasource) {
      throw new TorporError('NOT_SUPPORTED', 'local engine does not support datasource (a second image)', {
        field: 'datasource',
      });
    }
    const ttl = req.ttl ?? '';
    parseTtl(ttl);
    const owner = createOwner(req, opts) ?? '';
    const template = await this.templateFor(base, req.environment_variables ?? {}, req.arguments ?? []);

    const prefix = template.slice(0, 46).replace(/-+$/, '');
    const name =
      req.name ??
      (opts.idempotencyKey
        ? `${prefix}-${sha(`${owner}\0${opts.idempotencyKey}`).slice(0, 16)}`
        : `${prefix}-${randomBytes(8).toString('hex')}`);
    const labels: Record<string, string> = {
      ...(req.labels ?? {}),
      [L_ENV]: req.envName,
      ...(owner ? { [L_OWNER]: owner } : {}),
      ...(ttl ? { [L_TTL]: ttl } : {}),
      ...(opts.idempotencyKey ? { [L_IDEM]: sha(`${owner}\0${opts.idempotencyKey}`).slice(0, 32) } : {}),
    };

    let actor: Actor;
    try {
      actor = await this.lifecycle.createActor(this.space, { name, template, labels });
    } catch (err) {
      if (!isTorporError(err, 'ALREADY_EXISTS')) throw err;
      // The same name (or the same idempotency key): the same instance, if it is the same request's.
      const existing = await this.lifecycle.getActor(this.space, name);
      this.checkOwner(existing, { owner });
      if (existing.labels[L_ENV] !== req.envName) {
        throw new TorporError('ALREADY_EXISTS', `instance "${name}" exists for env ${existing.labels[L_ENV]}`, {
          field: 'name',
        });
      }
      return this.toInstance(existing);
    }
    this.armTtl(actor);
    try {
      actor = await this.lifecycle.resume(this.space, name);
    } catch (err) {
      // No free worker now: the instance stays Pending and the router resumes it on its first request.
      if (!isTorporError(err, 'NO_CAPACITY')) throw err;
      actor = await this.lifecycle.getActor(this.space, name);
    }
    return this.toInstance(actor);
  }

  async get(id: string, caller: Caller = {}): Promise<Instance> {
    return this.toInstance(await this.actor(id, caller));
  }

  async list(envName?: string, caller: Caller = {}): Promise<Instance[]> {
    const all = !envName || envName === '*';
    const byVersion = !all && envName.includes('@');
    const out: Instance[] = [];
    for (const actor of await this.actors()) {
      const env = actor.labels[L_ENV]!;
      if (!all && (byVersion ? env !== envName : env.split('@')[0] !== envName)) continue;
      if (caller.owner !== undefined && (actor.labels[L_OWNER] ?? '') !== caller.owner) continue;
      out.push(await this.toInstance(actor));
    }
    return out;
  }

  async delete(id: string, caller: Caller = {}): Promise<void> {
    const actor = await this.actor(id, caller);
    await this.lifecycle.deleteActor(actor.space, actor.name);
    this.disarm(id);
  }

  async warmup(envName: string): Promise<EnvObject> {
    const t = await this.template(templateFor(envName));
    // The golden snapshot (taken once, when the template is applied) is what makes a create fast.
    const deadline = Date.now() + 120_000;
    let current = t;
    while (!current.goldenSnapshot && Date.now() < deadline) {
      await new Promise((r) => setTimeout(r, 100));
      current = await this.lifecycle.getTemplate(t.name);
    }
    if (!current.goldenSnapshot) {
      throw new TorporError('TIMEOUT', `template "${t.name}" has no golden snapshot yet`, { field: 'envName' });
    }
    return envObject(envName, current);
  }

  // ---------------------------------------------------------------- capabilities

  async suspend(id: string, caller: Caller = {}): Promise<Instance> {
    const a = await this.actor(id, caller);
    return this.toInstance(await this.lifecycle.suspend(a.space, a.name));
  }

  async resume(id: string, caller: Caller = {}): Promise<Instance> {
    const a = await this.actor(id, caller);
    return this.toInstance(await this.lifecycle.resume(a.space, a.name));
  }

  async pause(id: string, caller: Caller = {}): Promise<Instance> {
    const a = await this.actor(id, caller);
    return this.toInstance(await this.lifecycle.pause(a.space, a.name));
  }

  async fork(id: string, name: string, caller: Caller = {}): Promise<Instance> {
    const a = await this.actor(id, caller);
    const forked = await this.lifecycle.fork(a.space, a.name, { name });
    this.armTtl(forked);
    return this.toInstance(forked);
  }

  async exec(id: string, command: string[], caller: Caller = {}): Promise<ExecOutput> {
    const a = await this.actor(id, caller);
    const r = await this.lifecycle.exec(a.space, a.name, { command });
    return { exitCode: r.exitCode, stdout: r.stdout, stderr: r.stderr };
  }

  async route(id: string, caller: Caller = {}): Promise<ActorRef> {
    const a = await this.actor(id, caller);
    return { space: a.space, name: a.name };
  }

  // ---------------------------------------------------------------- helpers

  idOf(actor: { name: string; space: string }): string {
    return `${actor.name}.${actor.space}`;
  }

  private async actor(id: string, caller: Caller): Promise<Actor> {
    const dot = id.indexOf('.');
    const [name, space] = dot > 0 ? [id.slice(0, dot), id.slice(dot + 1)] : [id, this.space];
    if (space !== this.space || !/^[a-z0-9]([-a-z0-9]*[a-z0-9])?$/.test(name) || name.length > 63) {
      throw new TorporError('NOT_FOUND', `id: instance "${id}" not found`, { field: 'id' });
    }
    const actor = await this.lifecycle.getActor(space, name).catch((err: unknown) => {
      throw isTorporError(err, 'NOT_FOUND')
        ? new TorporError('NOT_FOUND', `id: instance "${id}" not found`, { field: 'id' })
        : err;
    });
    if (actor.labels[L_ENV] === undefined) {
      throw new TorporError('NOT_FOUND', `id: instance "${id}" not found`, { field: 'id' });
    }
    this.checkOwner(actor, caller);
    return actor;
  }

  /** A stated owner must be the instance's (an instance without one belongs to no stated owner). */
  private checkOwner(actor: Actor, caller: Caller): void {
    const owner = actor.labels[L_OWNER] ?? '';
    if (caller.owner !== undefined && caller.owner !== owner) {
      throw new TorporError('PERMISSION_DENIED', `owner: instance "${this.idOf(actor)}" belongs to another owner`, {
        field: 'owner',
      });
    }
  }

  /** Every actor of the space that is an instance. */
  private async actors(): Promise<Actor[]> {
    const out: Actor[] = [];
    let cursor: string | undefined;
    do {
      const page = await this.lifecycle.listActors(this.space, { limit: 1000, ...(cursor ? { cursor } : {}) });
      out.push(...page.items.filter((a) => a.labels[L_ENV] !== undefined));
      cursor = page.nextCursor;
    } while (cursor);
    return out;
  }

  private async template(name: string): Promise<Template> {
    const cached = this.templates.get(name);
    if (cached?.goldenSnapshot) return cached;
    try {
      const t = await this.lifecycle.getTemplate(name);
      this.templates.set(name, t);
      return t;
    } catch (err) {
      if (!isTorporError(err, 'NOT_FOUND')) throw err;
      throw new TorporError('NOT_FOUND', `envName: env not found (no template "${name}")`, { field: 'envName' });
    }
  }

  /** The template to run: the env's own, or one derived from it with these variables and arguments. */
  private async templateFor(base: string, env: Record<string, string>, args: string[]): Promise<string> {
    const t = await this.template(base);
    if (Object.keys(env).length === 0 && args.length === 0) return t.name;
    if (args.length > 0 && t.command.length === 0) {
      throw new TorporError(
        'NOT_SUPPORTED',
        `arguments: template "${t.name}" has no command to append them to (it runs the image's entrypoint)`,
        { field: 'arguments' },
      );
    }
    const { createdAt: _c, goldenSnapshot: _g, ...spec } = t;
    const derived = {
      ...spec,
      env: { ...t.env, ...env },
      command: [...t.command, ...args],
    };
    const hash = sha(JSON.stringify([derived.env, derived.command])).slice(0, 10);
    derived.name = `${t.name.slice(0, 50).replace(/-+$/, '')}-e${hash}`;
    await this.lifecycle.applyTemplate(derived);
    return derived.name;
  }

  private async toInstance(actor: Actor): Promise<Instance> {
    const envName = actor.labels[L_ENV] ?? '';
    const t = await this.template(templateFor(envName)).catch(() => undefined);
    const labels: Record<string, string> = {};
    for (const [k, v] of Object.entries(actor.labels)) if (!k.startsWith(LABEL_PREFIX)) labels[k] = v;
    return {
      id: this.idOf(actor),
      env: t ? envObject(envName, t) : null,
      status: instanceStatus(actor),
      created_at: rfc3339(actor.createdAt),
      updated_at: rfc3339(actor.updatedAt),
      ip: actor.status === 'RUNNING' && actor.address ? actor.address.replace(/:\d+$/, '') : '',
      ttl: actor.labels[L_TTL] ?? '',
      owner: actor.labels[L_OWNER] ?? '',
      labels,
    };
  }

  private armTtl(actor: Actor): void {
    const ttlMs = parseTtl(actor.labels[L_TTL]);
    if (ttlMs === undefined || this.closed) return;
    const id = this.idOf(actor);
    this.schedule(id, Date.parse(actor.createdAt) + ttlMs);
  }

  private schedule(id: string, expiresAt: number): void {
    this.disarm(id);
    const delay = Math.max(0, expiresAt - Date.now());
    const timer = setTimeout(
      () => {
        this.timers.delete(id);
        if (delay >= MAX_TIMER_MS) this.schedule(id, expiresAt);
        else void this.expire(id, expiresAt);
      },
      Math.min(delay, MAX_TIMER_MS),
    );
    timer.unref();
    this.timers.set(id, timer);
  }

  private disarm(id: string): void {
    const t = this.timers.get(id);
    if (t) clearTimeout(t);
    this.timers.delete(id);
  }

  private async expire(id: string, expiresAt: number): Promise<void> {
    if (this.closed) return;
    const dot = id.indexOf('.');
    try {
      await this.lifecycle.deleteActor(id.slice(dot + 1), id.slice(0, dot));
      this.log.info({ instance: id }, 'instance TTL expired: deleted');
    } catch (err) {
      if (isTorporError(err, 'NOT_FOUND')) return;
      // An operation in flight (FAILED_PRECONDITION) or a passing failure: try again shortly.
      const retryMs = isTorporError(err, 'FAILED_PRECONDITION') ? 200 : 5000;
      this.log.warn({ err, instance: id }, 'TTL delete failed; retrying');
      if (!this.closed) this.schedule(id, Math.max(expiresAt, Date.now() + retryMs));
    }
  }
}

function instanceStatus(actor: Actor): InstanceStatus {
  switch (actor.status) {
    case 'RUNNING':
      return 'Running';
    case 'RESUMING':
      return 'Creating';
    case 'FAILED':
      return 'Failed';
    default:
      // Never run yet (still on its template's golden snapshot): Pending. Otherwise it is suspended or paused,
      // and the router resumes it on its first request: to a client it is running.
      return actor.snapshot?.startsWith('snapshots/_golden/') && actor.history.length === 0 ? 'Pending' : 'Running';
  }
}

export function envObject(envName: string, t: Template): EnvObject {
  const { name, version } = splitEnvName(envName);
  return {
    id: envName,
    name,
    description: '',
    version,
    tags: [],
    code_url: '',
    status: t.goldenSnapshot ? 6 : 1,
    artifacts: [],
    build_config: {},
    test_config: {},
    deploy_config: { template: t.name, port: t.port },
    created_at: rfc3339(t.createdAt),
    updated_at: rfc3339(t.createdAt),
  };
}
