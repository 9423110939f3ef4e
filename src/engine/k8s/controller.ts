// The Kubernetes controller: WorkerPools become Deployments of agent pods, Templates are synced into the control
// plane's store, and a deleted pool's actors are suspended to snapshots before its pods go (a finalizer).
//
// Validation the CRD schema cannot express (cross-field rules, references to other objects, the pod template as
// the API server judges it) happens here and is reported in status conditions naming the field; an invalid spec
// changes nothing in the cluster.
import type { KubernetesObject, ListWatch } from '@kubernetes/client-node';
import type { Logger } from 'pino';
import { asTorporError, TorporError } from '../../core/errors.ts';
import { type AssetSet, dnsLabel, parse, templateSpec } from '../../core/schemas.ts';
import { parseAssetSets } from '../../runtime/asset-set.ts';
import { type Kube, KubeError, resourcePath } from './kube.ts';
import { type AgentSettings, deploymentName, renderDeployment, selectorString } from './render.ts';
import {
  API_VERSION,
  type AssetSetObject,
  assetSetResourceSpec,
  type Condition,
  DRAIN_FINALIZER,
  type TemplateObject,
  type WorkerPoolObject,
  type WorkerPoolSpec,
  type WorkerPoolStatus,
  workerPoolSpec,
} from './resources.ts';

/** What the controller needs from the control plane about a pool's workers (its pods are its nodes). */
export interface PoolControl {
  /** Workers registered by agents on these nodes whose lease is live. */
  readyWorkers(nodes: string[]): Promise<number>;
  /** Suspends the actors on these nodes to snapshots; resolves to how many still hold a worker there. */
  drain(nodes: string[]): Promise<number>;
}

/** Where synced templates go: the control plane's lifecycle (Lifecycle.applyTemplate). */
export interface TemplateSink {
  applyTemplate(input: unknown): Promise<{ created: boolean }>;
}

export interface ControllerOptions {
  kube: Kube;
  /** Watch one namespace; undefined: every namespace. */
  namespace?: string;
  agent: AgentSettings;
  pools: PoolControl;
  templates: TemplateSink;
  log: Logger;
  /** Status refresh of every pool (ready workers come from the control plane, not from a watch). */
  resyncMs?: number;
  /** How soon a pool whose drain is still in progress is looked at again. */
  drainRetryMs?: number;
}

interface DeploymentObject extends KubernetesObject {
  spec?: { replicas?: number };
  status?: { replicas?: number; readyReplicas?: number; availableReplicas?: number };
}

type Key = `${'pool' | 'template' | 'assetset'}/${string}/${string}`;

const collection = (plural: string, namespace?: string) => resourcePath(API_VERSION, plural, namespace);

export class KubeController {
  private readonly o: ControllerOptions;
  private readonly poolInformer: ListWatch<WorkerPoolObject & KubernetesObject>;
  private readonly templateInformer: ListWatch<TemplateObject & KubernetesObject>;
  private readonly deploymentInformer: ListWatch<DeploymentObject>;
  private readonly assetSetInformer: ListWatch<AssetSetObject & KubernetesObject>;
  private readonly queue = new Set<Key>();
  private readonly retries = new Map<Key, NodeJS.Timeout>();
  private running: Promise<void> | undefined;
  private stopped = false;
  private resync: NodeJS.Timeout | undefined;
  /** Resolved whenever the queue runs empty (tests wait on it). */
  private idleWaiters: (() => void)[] = [];

  constructor(opts: ControllerOptions) {
    this.o = opts;
    const kube = opts.kube;
    this.poolInformer = kube.informer(collection('workerpools', opts.namespace));
    this.templateInformer = kube.informer(collection('templates', opts.namespace));
    this.deploymentInformer = kube.informer(
      resourcePath('apps/v1', 'deployments', opts.namespace),
      'app.kubernetes.io/name=torpor-agent',
    );
    this.assetSetInformer = kube.informer(collection('assetsets'));
    const onAssetSet = (a: KubernetesObject) => {
      this.enqueue(`assetset//${a.metadata!.name}`);
      // Pools using it render its contents into their pods.
      for (const p of this.poolInformer.list()) {
        if ((p.spec as { assetSet?: string } | undefined)?.assetSet === a.metadata!.name) {
          this.enqueue(`pool/${p.metadata.namespace}/${p.metadata.name}`);
        }
      }
    };
    const onPool = (p: KubernetesObject) => this.enqueue(`pool/${p.metadata!.namespace}/${p.metadata!.name}`);
    const onTemplate = (t: KubernetesObject) => this.enqueue(`template/${t.metadata!.namespace}/${t.metadata!.name}`);
    const onDeployment = (d: KubernetesObject) => {
      const owner = d.metadata?.ownerReferences?.find((r) => r.kind === 'WorkerPool' && r.apiVersion === API_VERSION);
      if (owner) this.enqueue(`pool/${d.metadata!.namespace}/${owner.name}`);
    };
    for (const [informer, handler] of [
      [this.poolInformer, onPool],
      [this.templateInformer, onTemplate],
      [this.deploymentInformer, onDeployment],
      [this.assetSetInformer, onAssetSet],
    ] as const) {
      const inf = informer as ListWatch<KubernetesObject>;
      inf.on('add', handler);
      inf.on('update', handler);
      inf.on('delete', handler);
      inf.on('error', (err: unknown) => this.restartInformer(inf, err));
    }
  }

  async start(): Promise<void> {
    // Asset sets first: pools look them up in its cache.
    await this.assetSetInformer.start();
    await Promise.all([this.poolInformer.start(), this.templateInformer.start(), this.deploymentInformer.start()]);
    this.resync = setInterval(() => {
      for (const p of this.poolInformer.list()) this.enqueue(`pool/${p.metadata.namespace}/${p.metadata.name}`);
    }, this.o.resyncMs ?? 10_000);
    this.resync.unref();
  }

  async stop(): Promise<void> {
    this.stopped = true;
    clearInterval(this.resync);
    for (const t of this.retries.values()) clearTimeout(t);
    await Promise.all(
      [this.poolInformer, this.templateInformer, this.deploymentInformer, this.assetSetInformer].map((i) => i.stop()),
    );
    await this.running;
  }

  /** Resolves once every queued reconcile has run (retries scheduled for later do not count). */
  idle(): Promise<void> {
    if (!this.running && this.queue.size === 0) return Promise.resolve();
    return new Promise((resolve) => this.idleWaiters.push(resolve));
  }

  private restartInformer(informer: ListWatch<KubernetesObject>, err: unknown): void {
    if (this.stopped) return;
    this.o.log.warn({ err: asTorporError(err, 'RUNTIME_ERROR').message }, 'kubernetes watch failed; restarting');
    setTimeout(() => {
      if (!this.stopped) informer.start().catch((e: unknown) => this.restartInformer(informer, e));
    }, 1000).unref();
  }

  private enqueue(key: Key, afterMs = 0): void {
    if (this.stopped) return;
    if (afterMs > 0) {
      clearTimeout(this.retries.get(key));
      this.retries.set(
        key,
        setTimeout(() => {
          this.retries.delete(key);
          this.enqueue(key);
        }, afterMs),
      );
      return;
    }
    this.queue.add(key);
    this.running ??= this.drainQueue().finally(() => {
      this.running = undefined;
      for (const resolve of this.idleWaiters.splice(0)) resolve();
    });
  }

  private async drainQueue(): Promise<void> {
    while (this.queue.size > 0 && !this.stopped) {
      const key = this.queue.values().next().value as Key;
      this.queue.delete(key);
      const [kind, namespace, name] = key.split('/') as ['pool' | 'template' | 'assetset', string, string];
      try {
        if (kind === 'pool') await this.reconcilePool(namespace, name);
        else if (kind === 'template') await this.reconcileTemplate(namespace, name);
        else await this.reconcileAssetSet(name);
      } catch (err) {
        const e = asTorporError(err, 'RUNTIME_ERROR');
        // A conflict means our view was stale: the watch brings the new version and we go again.
        if (!(err instanceof KubeError && err.kubeStatus === 409)) {
          this.o.log.warn({ kind, namespace, name, code: e.code, err: e.message }, 'reconcile failed; retrying');
        }
        this.enqueue(key, err instanceof KubeError && err.kubeStatus === 409 ? 200 : 2000);
      }
    }
  }

  // ---------------------------------------------------------------- WorkerPool

  private async reconcilePool(namespace: string, name: string): Promise<void> {
    const pool = await this.o.kube.get<WorkerPoolObject>(collection('workerpools', namespace) + `/${name}`);
    if (!pool) return; // gone: its Deployment is garbage-collected with it (owner reference)
    if (pool.metadata.deletionTimestamp) return this.finalizePool(pool);
    if (!pool.metadata.finalizers?.includes(DRAIN_FINALIZER)) {
      await this.patchMeta(pool, 'workerpools', { finalizers: [...(pool.metadata.finalizers ?? []), DRAIN_FINALIZER] });
      return; // the update event brings us back with the finalizer in place
    }
    const generation = pool.metadata.generation ?? 0;
    let spec: WorkerPoolSpec;
    let assets: AssetSet[] | undefined;
    try {
      ({ spec, assets } = await this.validatePool(pool));
    } catch (err) {
      const e = asTorporError(err, 'INVALID_ARGUMENT');
      const reason = e.code === 'FAILED_PRECONDITION' ? 'MissingTokenSecret' : 'InvalidSpec';
      await this.setPoolStatus(pool, { conditions: [condition('Valid', 'False', reason, e.message, generation)] });
      return;
    }
    const deployment = renderDeployment({ namespace, name, uid: pool.metadata.uid ?? '' }, spec, this.o.agent, assets);
    try {
      await this.o.kube.apply(deployment, { dryRun: true });
    } catch (err) {
      if (!(err instanceof KubeError && (err.kubeStatus === 422 || err.kubeStatus === 400))) throw err;
      await this.setPoolStatus(pool, {
        conditions: [condition('Valid', 'False', 'InvalidPodTemplate', err.message, generation)],
      });
      return;
    }
    await this.o.kube.apply(deployment);
    const current = this.deploymentInformer.get(deploymentName(name), namespace);
    const nodes = await this.podNames(namespace, name);
    const readyWorkers = await this.o.pools.readyWorkers(nodes);
    const readyReplicas = current?.status?.readyReplicas ?? 0;
    await this.setPoolStatus(pool, {
      observedGeneration: generation,
      replicas: current?.status?.replicas ?? 0,
      readyReplicas,
      readyWorkers,
      conditions: [
        condition('Valid', 'True', 'Valid', 'the spec is valid', generation),
        readyWorkers > 0 || spec.replicas === 0
          ? condition('Available', 'True', 'WorkersReady', `${readyWorkers} worker(s) registered`, generation)
          : condition(
              'Available',
              'False',
              readyReplicas > 0 ? 'WaitingForAgents' : 'WaitingForPods',
              `${readyReplicas}/${spec.replicas} pod(s) ready, no worker registered yet`,
              generation,
            ),
      ],
    });
  }

  /** The zod schema (what the CRD schema cannot say) and references to other objects. */
  private async validatePool(pool: WorkerPoolObject): Promise<{ spec: WorkerPoolSpec; assets?: AssetSet[] }> {
    parse(
      dnsLabel.max(52, 'must be at most 52 characters (the Deployment is torpor-pool-<name>)'),
      pool.metadata.name,
      'metadata.name',
    );
    const spec = parse(workerPoolSpec, pool.spec, 'spec');
    const priorityClass = spec.podTemplate.priorityClassName;
    if (priorityClass && !(await this.o.kube.get(`/apis/scheduling.k8s.io/v1/priorityclasses/${priorityClass}`))) {
      throw new TorporError(
        'INVALID_ARGUMENT',
        `spec.podTemplate.priorityClassName: PriorityClass "${priorityClass}" does not exist`,
        {
          field: 'spec.podTemplate.priorityClassName',
        },
      );
    }
    const assets = spec.assetSet ? this.assetSetFor(spec.assetSet, spec.runtime) : undefined;
    // Without it the pods would never start; say so here rather than in a pod event nobody reads.
    const namespace = pool.metadata.namespace ?? 'default';
    if (!(await this.o.kube.get(resourcePath('v1', 'secrets', namespace, this.o.agent.tokenSecret)))) {
      throw new TorporError(
        'FAILED_PRECONDITION',
        `the agents' token Secret "${this.o.agent.tokenSecret}" does not exist in namespace ${namespace}`,
        { field: 'metadata.namespace' },
      );
    }
    return { spec, ...(assets ? { assets } : {}) };
  }

  /** The sets of AssetSet `name` for `runtime`; throws naming spec.assetSet when there are none. */
  private assetSetFor(name: string, runtime: WorkerPoolSpec['runtime']): AssetSet[] {
    const field = 'spec.assetSet';
    const obj = this.assetSetInformer.get(name);
    if (!obj) throw new TorporError('INVALID_ARGUMENT', `${field}: AssetSet "${name}" does not exist`, { field });
    let sets: AssetSet[];
    try {
      sets = validAssetSets(obj);
    } catch (err) {
      throw new TorporError('INVALID_ARGUMENT', `${field}: AssetSet "${name}" is invalid: ${(err as Error).message}`, {
        field,
      });
    }
    const mine = sets.filter((s) => s.runtime === runtime);
    if (mine.length === 0) {
      throw new TorporError('INVALID_ARGUMENT', `${field}: AssetSet "${name}" has no set for runtime ${runtime}`, {
        field,
      });
    }
    return mine;
  }

  // ---------------------------------------------------------------- AssetSet

  private async reconcileAssetSet(name: string): Promise<void> {
    const obj = await this.o.kube.get<AssetSetObject>(`${collection('assetsets')}/${name}`);
    if (!obj) return;
    const generation = obj.metadata.generation ?? 0;
    let result: Condition;
    try {
      const sets = validAssetSets(obj);
      result = condition(
        'Valid',
        'True',
        'Valid',
        `${sets.length} set(s): ${sets.map((s) => `${s.runtime}/${s.arch}`).join(', ')}`,
        generation,
      );
    } catch (err) {
      result = condition('Valid', 'False', 'InvalidSpec', (err as Error).message, generation);
    }
    const status = { conditions: mergeConditions(obj.status?.conditions ?? [], [result]) };
    if (sameStatus(obj.status ?? {}, status)) return;
    await this.o.kube.request('PATCH', `${collection('assetsets')}/${name}/status`, {
      body: { status },
      patch: 'merge',
    });
  }

  private async podNames(namespace: string, pool: string): Promise<string[]> {
    const pods = await this.o.kube.request<{ items: KubernetesObject[] }>(
      'GET',
      resourcePath('v1', 'pods', namespace),
      {
        query: { labelSelector: selectorString(pool) },
      },
    );
    return pods.items.map((p) => p.metadata!.name!);
  }

  /** Drains the pool's actors, then deletes its Deployment and lets the pool go. */
  private async finalizePool(pool: WorkerPoolObject): Promise<void> {
    if (!pool.metadata.finalizers?.includes(DRAIN_FINALIZER)) return;
    const { namespace = 'default', name } = pool.metadata;
    const nodes = await this.podNames(namespace, name);
    const remaining = await this.o.pools.drain(nodes);
    if (remaining > 0) {
      await this.setPoolStatus(pool, {
        conditions: [
          condition(
            'Draining',
            'True',
            'SuspendingActors',
            `${remaining} actor(s) still on this pool's workers`,
            pool.metadata.generation ?? 0,
          ),
        ],
      });
      this.enqueue(`pool/${namespace}/${name}`, this.o.drainRetryMs ?? 2000);
      return;
    }
    await this.o.kube.delete(resourcePath('apps/v1', 'deployments', namespace, deploymentName(name)));
    await this.patchMeta(pool, 'workerpools', {
      finalizers: (pool.metadata.finalizers ?? []).filter((f) => f !== DRAIN_FINALIZER),
    });
    this.o.log.info({ namespace, name }, 'worker pool drained and removed');
  }

  private async setPoolStatus(pool: WorkerPoolObject, patch: Partial<WorkerPoolStatus>): Promise<void> {
    const old = pool.status ?? {};
    const conditions = mergeConditions(old.conditions ?? [], patch.conditions ?? []);
    const next = { ...old, ...patch, selector: selectorString(pool.metadata.name), conditions };
    if (sameStatus(old, next)) return;
    await this.o.kube.request(
      'PATCH',
      `${collection('workerpools', pool.metadata.namespace)}/${pool.metadata.name}/status`,
      {
        body: { status: next },
        patch: 'merge',
      },
    );
  }

  /** A metadata change guarded by the version we read (a concurrent writer makes it fail with 409). */
  private async patchMeta(
    obj: { metadata: { namespace?: string; name: string; resourceVersion?: string } },
    plural: string,
    metadata: object,
  ) {
    await this.o.kube.request('PATCH', `${collection(plural, obj.metadata.namespace)}/${obj.metadata.name}`, {
      body: { metadata: { ...metadata, resourceVersion: obj.metadata.resourceVersion } },
      patch: 'merge',
    });
  }

  // ---------------------------------------------------------------- Template

  private async reconcileTemplate(namespace: string, name: string): Promise<void> {
    const t = await this.o.kube.get<TemplateObject>(`${collection('templates', namespace)}/${name}`);
    if (!t || t.metadata.deletionTimestamp) return; // store templates are immutable and outlive their CRD objects
    const generation = t.metadata.generation ?? 0;
    const synced = t.status?.syncedGeneration;
    let result: Condition;
    if (synced !== undefined && synced !== generation) {
      // Clusters without validation rules (Kubernetes < 1.25) let a spec change through; it is refused here.
      result = condition(
        'Synced',
        'False',
        'Immutable',
        `spec changed after generation ${synced} was synced; templates are immutable: create a Template with a new name`,
        generation,
      );
    } else {
      try {
        parse(dnsLabel, name, 'metadata.name');
        const spec = typeof t.spec === 'object' && t.spec !== null ? t.spec : {};
        const input = { ...spec, name };
        parse(templateSpec, input, 'spec');
        const { created } = await this.o.templates.applyTemplate(input);
        const before = t.status?.conditions?.find((c) => c.type === 'Synced');
        // Re-applying is idempotent (and restores a template a wiped store lost); the first word stays.
        result =
          before?.status === 'True' && before.observedGeneration === generation
            ? before
            : condition(
                'Synced',
                'True',
                'Synced',
                `${created ? 'created' : 'found'} in the control plane store`,
                generation,
              );
      } catch (err) {
        const e = asTorporError(err, 'RUNTIME_ERROR');
        const field =
          e.field && !e.field.startsWith('spec') && !e.field.startsWith('metadata') ? `spec.${e.field}` : e.field;
        result = condition(
          'Synced',
          'False',
          e.code,
          field && !e.message.startsWith(field) ? `${field}: ${e.message}` : e.message,
          generation,
        );
      }
    }
    const conditions = mergeConditions(t.status?.conditions ?? [], [result]);
    const status = {
      conditions,
      ...(result.status === 'True'
        ? { syncedGeneration: generation }
        : synced !== undefined
          ? { syncedGeneration: synced }
          : {}),
    };
    if (sameStatus(t.status ?? {}, status)) return;
    await this.o.kube.request('PATCH', `${collection('templates', namespace)}/${name}/status`, {
      body: { status },
      patch: 'merge',
    });
  }
}

/** An AssetSet's sets, checked as the control plane checks an asset-set file (names per class, one set per
 * runtime and architecture). */
function validAssetSets(obj: AssetSetObject): AssetSet[] {
  const { sets } = parse(assetSetResourceSpec, obj.spec, 'spec');
  return parseAssetSets(JSON.stringify(sets), `AssetSet ${obj.metadata.name}`);
}

// ---------------------------------------------------------------- conditions

export function condition(
  type: string,
  status: Condition['status'],
  reason: string,
  message: string,
  observedGeneration: number,
): Condition {
  return {
    type,
    status,
    reason,
    message,
    lastTransitionTime: new Date().toISOString().replace(/\.\d+Z$/, 'Z'),
    observedGeneration,
  };
}

/** Replaces conditions by type, keeping lastTransitionTime when the status did not change. */
export function mergeConditions(old: Condition[], updates: Condition[]): Condition[] {
  const out = [...old];
  for (const u of updates) {
    const i = out.findIndex((c) => c.type === u.type);
    if (i < 0) out.push(u);
    else out[i] = out[i]!.status === u.status ? { ...u, lastTransitionTime: out[i]!.lastTransitionTime } : u;
  }
  return out;
}

function sameStatus(a: object, b: object): boolean {
  return JSON.stringify(sortKeys(a)) === JSON.stringify(sortKeys(b));
}

function sortKeys(v: unknown): unknown {
  if (Array.isArray(v)) return v.map(sortKeys);
  if (v && typeof v === 'object') {
    return Object.fromEntries(
      Object.entries(v)
        .filter(([, x]) => x !== undefined)
        .sort(([x], [y]) => x.localeCompare(y))
        .map(([k, x]) => [k, sortKeys(x)]),
    );
  }
  return v;
}
