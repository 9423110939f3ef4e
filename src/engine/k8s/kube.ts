// Talking to a Kubernetes API server: configuration (in-cluster, a kubeconfig file, or a kubeconfig handed over
// by the ACK engine), REST calls with the configuration's credentials, and informers (list + watch).
//
// Every request reads the KubeConfig at the time it is made, so replacing its contents in place (`swap`) moves
// new requests to new credentials while open watches carry on: that is how a temporary ACK kubeconfig is
// refreshed before it expires.
import { existsSync } from 'node:fs';
import {
  HttpMethod,
  KubeConfig,
  type KubernetesListObject,
  type KubernetesObject,
  ListWatch,
  RequestContext,
  Watch,
} from '@kubernetes/client-node';
import { fetch } from 'undici';
import { TorporError } from '../../core/errors.ts';

export interface KubeOptions {
  /** A kubeconfig file; without it: in-cluster configuration inside a pod, else $KUBECONFIG or ~/.kube/config. */
  kubeconfig?: string;
  context?: string;
  /** Where the pod's service-account files are mounted ("" = /; a test runs outside a pod). */
  inClusterRoot?: string;
}

const IN_CLUSTER_TOKEN = '/var/run/secrets/kubernetes.io/serviceaccount/token';

/** Loads a KubeConfig the way `opts` says; fails with a clear error when there is no cluster to talk to. */
export function loadKubeConfig(opts: KubeOptions = {}): KubeConfig {
  const kc = new KubeConfig();
  try {
    const root = opts.inClusterRoot ?? '';
    if (opts.kubeconfig) kc.loadFromFile(opts.kubeconfig);
    else if (process.env.KUBERNETES_SERVICE_HOST && existsSync(root + IN_CLUSTER_TOKEN)) kc.loadFromCluster(root);
    else if (process.env.KUBECONFIG || existsSync(`${process.env.HOME}/.kube/config`)) kc.loadFromDefault();
    else {
      throw new TorporError(
        'FAILED_PRECONDITION',
        'no Kubernetes configuration: pass --kubeconfig, set KUBECONFIG, or run inside a pod',
        { field: 'kubeconfig' },
      );
    }
  } catch (err) {
    if (err instanceof TorporError) throw err;
    // The loader's message may quote the file; it never holds credentials, but say only what failed.
    throw new TorporError('INVALID_ARGUMENT', `cannot load the kubeconfig: ${(err as Error).name}`, {
      field: 'kubeconfig',
    });
  }
  if (opts.context) kc.setCurrentContext(opts.context);
  if (!kc.getCurrentCluster()) {
    throw new TorporError('INVALID_ARGUMENT', 'the kubeconfig has no current cluster', { field: 'kubeconfig' });
  }
  return kc;
}

/** Parses kubeconfig text (e.g. from ACK's DescribeClusterUserKubeconfig) into a KubeConfig. */
export function kubeConfigFromString(text: string): KubeConfig {
  const kc = new KubeConfig();
  kc.loadFromString(text);
  if (!kc.getCurrentCluster() || !kc.getCurrentUser()) {
    throw new TorporError('INVALID_ARGUMENT', 'the kubeconfig has no current cluster or user', {
      field: 'kubeconfig',
    });
  }
  return kc;
}

/** A Kubernetes Status error, with the HTTP status and the API server's reason and message. */
export class KubeError extends TorporError {
  /** The API server's HTTP status (404, 409, 422 …). */
  readonly kubeStatus: number;
  readonly reason: string;
  constructor(kubeStatus: number, reason: string, message: string, field?: string) {
    super(KubeError.codeFor(kubeStatus), message, field ? { field } : {});
    this.kubeStatus = kubeStatus;
    this.reason = reason;
  }
  static codeFor(status: number) {
    if (status === 404) return 'NOT_FOUND' as const;
    if (status === 409) return 'CONFLICT' as const;
    if (status === 422 || status === 400) return 'INVALID_ARGUMENT' as const;
    if (status === 401) return 'UNAUTHENTICATED' as const;
    if (status === 403) return 'PERMISSION_DENIED' as const;
    return 'RUNTIME_ERROR' as const;
  }
}

interface StatusBody {
  kind?: string;
  reason?: string;
  message?: string;
  details?: { causes?: { field?: string; message?: string }[] };
}

export type PatchType = 'apply' | 'merge' | 'json';
const PATCH_CONTENT_TYPES: Record<PatchType, string> = {
  apply: 'application/apply-patch+yaml',
  merge: 'application/merge-patch+json',
  json: 'application/json-patch+json',
};

export const FIELD_MANAGER = 'torpor';

export class Kube {
  readonly kc: KubeConfig;

  constructor(kc: KubeConfig) {
    this.kc = kc;
  }

  /** Replaces the configuration's contents in place: later requests use them; open watches are not touched. */
  swap(next: KubeConfig): void {
    this.kc.loadFromOptions({
      clusters: next.getClusters(),
      users: next.getUsers(),
      contexts: next.getContexts(),
      currentContext: next.getCurrentContext(),
    });
  }

  /** Namespace of the current context (default "default"). */
  namespace(): string {
    const ctx = this.kc.getContextObject(this.kc.getCurrentContext());
    return ctx?.namespace || 'default';
  }

  server(): string {
    return this.kc.getCurrentCluster()!.server;
  }

  async request<T = unknown>(
    method: 'GET' | 'POST' | 'PUT' | 'PATCH' | 'DELETE',
    path: string,
    opts: { body?: unknown; patch?: PatchType; query?: Record<string, string | undefined> } = {},
  ): Promise<T> {
    const url = new URL(this.server().replace(/\/$/, '') + path);
    for (const [k, v] of Object.entries(opts.query ?? {})) if (v !== undefined) url.searchParams.set(k, v);
    const ctx = new RequestContext(url.toString(), HttpMethod[method]);
    await this.kc.applySecurityAuthentication(ctx);
    const headers = ctx.getHeaders() as Record<string, string>;
    headers.accept = 'application/json';
    if (opts.body !== undefined) {
      headers['content-type'] = opts.patch ? PATCH_CONTENT_TYPES[opts.patch] : 'application/json';
    }
    const res = await fetch(url, {
      method,
      headers,
      dispatcher: ctx.getDispatcher() as never,
      ...(opts.body !== undefined ? { body: JSON.stringify(opts.body) } : {}),
      signal: AbortSignal.timeout(30_000),
    });
    const text = await res.text();
    if (res.ok) return (text ? JSON.parse(text) : undefined) as T;
    let status: StatusBody = {};
    try {
      status = JSON.parse(text) as StatusBody;
    } catch {
      // not a Status object
    }
    const cause = status.details?.causes?.[0];
    throw new KubeError(
      res.status,
      status.reason ?? res.statusText,
      `${method} ${url.pathname}: ${status.message ?? `HTTP ${res.status}`}`,
      cause?.field,
    );
  }

  /** Server-side apply (the object's apiVersion/kind/metadata.name[/namespace] say where). */
  apply<T extends KubernetesObject>(obj: T, opts: { dryRun?: boolean; subresource?: string } = {}): Promise<T> {
    return this.request<T>('PATCH', objectPath(obj) + (opts.subresource ? `/${opts.subresource}` : ''), {
      body: obj,
      patch: 'apply',
      query: { fieldManager: FIELD_MANAGER, force: 'true', ...(opts.dryRun ? { dryRun: 'All' } : {}) },
    });
  }

  async get<T>(path: string): Promise<T | undefined> {
    try {
      return await this.request<T>('GET', path);
    } catch (err) {
      if (err instanceof KubeError && err.kubeStatus === 404) return undefined;
      throw err;
    }
  }

  /** Deletes; absent is fine. */
  async delete(path: string, propagationPolicy: 'Background' | 'Foreground' = 'Background'): Promise<void> {
    try {
      await this.request('DELETE', path, { body: { kind: 'DeleteOptions', apiVersion: 'v1', propagationPolicy } });
    } catch (err) {
      if (!(err instanceof KubeError && err.kubeStatus === 404)) throw err;
    }
  }

  /** A cache kept current by list + watch (re-listing after a dropped watch). */
  informer<T extends KubernetesObject>(path: string, labelSelector?: string): ListWatch<T> {
    const list = () =>
      this.request<KubernetesListObject<T>>('GET', path, labelSelector ? { query: { labelSelector } } : {});
    return new ListWatch<T>(path, new Watch(this.kc), list, false, labelSelector);
  }
}

/** The REST path of an object (its collection when `name` is omitted). */
export function resourcePath(apiVersion: string, plural: string, namespace?: string, name?: string): string {
  const base = apiVersion.includes('/') ? `/apis/${apiVersion}` : `/api/${apiVersion}`;
  return `${base}${namespace ? `/namespaces/${namespace}` : ''}/${plural}${name ? `/${name}` : ''}`;
}

/** Plural resource names of the kinds Torpor creates. */
const PLURALS: Record<string, string> = {
  CustomResourceDefinition: 'customresourcedefinitions',
  Namespace: 'namespaces',
  ServiceAccount: 'serviceaccounts',
  Secret: 'secrets',
  ConfigMap: 'configmaps',
  Service: 'services',
  Deployment: 'deployments',
  StatefulSet: 'statefulsets',
  ClusterRole: 'clusterroles',
  ClusterRoleBinding: 'clusterrolebindings',
  Role: 'roles',
  RoleBinding: 'rolebindings',
  PriorityClass: 'priorityclasses',
  Template: 'templates',
  WorkerPool: 'workerpools',
  AssetSet: 'assetsets',
  ValidatingWebhookConfiguration: 'validatingwebhookconfigurations',
};
const CLUSTER_SCOPED = new Set([
  'CustomResourceDefinition',
  'Namespace',
  'ClusterRole',
  'ClusterRoleBinding',
  'PriorityClass',
  'AssetSet',
  'ValidatingWebhookConfiguration',
]);

export function objectPath(obj: KubernetesObject): string {
  const kind = obj.kind ?? '';
  const plural = PLURALS[kind];
  if (!plural || !obj.apiVersion || !obj.metadata?.name) {
    throw new TorporError('INVALID_ARGUMENT', `cannot address a ${kind || 'object without kind'}`, { field: 'kind' });
  }
  const namespace = CLUSTER_SCOPED.has(kind) ? undefined : (obj.metadata.namespace ?? 'default');
  return resourcePath(obj.apiVersion, plural, namespace, obj.metadata.name);
}
