// Torpor's Kubernetes API (torpor.dev/v1alpha1): the WorkerPool spec schema and the CRDs of Template, WorkerPool
// and AssetSet. The Template and AssetSet CRDs' specs are the control plane's own template and asset-set schemas;
// nothing is written twice.
import { z } from 'zod';
import { assetSetList, runtimeClass, templateSpec } from '../../core/schemas.ts';
import { type JsonSchema, structuralSchema } from './structural.ts';

export const GROUP = 'torpor.dev';
export const VERSION = 'v1alpha1';
export const API_VERSION = `${GROUP}/${VERSION}`;
/** Pods and Deployments of a pool carry this label with the pool's name. */
export const POOL_LABEL = 'torpor.dev/pool';
/** Node label and taint key that micro-VM pools are pinned to (value "microvm"). */
export const RUNTIME_NODE_LABEL = 'torpor.dev/runtime';
/** Held on every WorkerPool until its actors are drained to snapshots. */
export const DRAIN_FINALIZER = 'torpor.dev/drain';

// ---------------------------------------------------------------- WorkerPool

const labelKey = z
  .string()
  .max(316)
  .regex(/^([a-z0-9]([-a-z0-9.]*[a-z0-9])?\/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$/, 'must be a label key');
const labelValue = z
  .string()
  .max(63)
  .regex(/^([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?$/, 'must be a label value');

/** A Kubernetes resource quantity ("500m", "2Gi", 4). */
const quantity = z.union([
  z
    .string()
    .regex(/^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+|[numkMGTPE]|[KMGTPE]i)?$/, 'must be a quantity such as 500m or 2Gi'),
  z.number().nonnegative(),
]);

export const toleration = z
  .object({
    key: z.string().optional(),
    operator: z.enum(['Exists', 'Equal']).optional(),
    value: z.string().optional(),
    effect: z.enum(['NoSchedule', 'PreferNoSchedule', 'NoExecute']).optional(),
    tolerationSeconds: z.number().int().optional(),
  })
  .strict()
  .superRefine((t, ctx) => {
    // What a structural schema cannot say: checked by the controller, reported in the pool's status.
    if (t.operator === 'Exists' && t.value) {
      ctx.addIssue({ code: 'custom', path: ['value'], message: 'must be empty when operator is Exists' });
    }
    if (!t.key && t.operator !== 'Exists') {
      ctx.addIssue({ code: 'custom', path: ['operator'], message: 'must be Exists when key is empty' });
    }
    if (t.tolerationSeconds !== undefined && t.effect !== 'NoExecute') {
      ctx.addIssue({ code: 'custom', path: ['tolerationSeconds'], message: 'is only allowed with effect NoExecute' });
    }
  });
export type Toleration = z.infer<typeof toleration>;

const resourceList = z.record(z.string().regex(/^[a-z0-9.\-/]+$/, 'must be a resource name'), quantity);

export const workerPoolSpec = z
  .object({
    /** Worker pods; each pod runs one agent with `workersPerPod` worker slots. */
    replicas: z.number().int().min(0).max(1000).default(1),
    runtime: runtimeClass,
    workersPerPod: z.number().int().min(1).max(64).default(2),
    /** Name of a cluster-scoped AssetSet holding a set for this runtime class; empty: the agents' default. */
    assetSet: z
      .string()
      .regex(/^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$/, 'must be a resource name')
      .max(253)
      .optional(),
    /** The torpor image the worker pods run (default: the controller's). */
    image: z.string().min(1).optional(),
    podTemplate: z
      .object({
        nodeSelector: z.record(labelKey, labelValue).optional(),
        tolerations: z.array(toleration).max(64).optional(),
        priorityClassName: z.string().max(253).optional(),
        /** A core/v1 Affinity; the API server validates it when the controller dry-runs the Deployment. */
        affinity: z
          .object({ nodeAffinity: z.unknown(), podAffinity: z.unknown(), podAntiAffinity: z.unknown() })
          .partial()
          .strict()
          .optional(),
        resources: z.object({ requests: resourceList, limits: resourceList }).partial().strict().optional(),
        labels: z.record(labelKey, labelValue).optional(),
        annotations: z.record(z.string(), z.string()).optional(),
      })
      .strict()
      .default({}),
  })
  .strict();
export type WorkerPoolSpec = z.infer<typeof workerPoolSpec>;

export interface Condition {
  type: string;
  status: 'True' | 'False' | 'Unknown';
  reason: string;
  message: string;
  lastTransitionTime: string;
  observedGeneration?: number;
}

export interface WorkerPoolStatus {
  observedGeneration?: number;
  /** Pods the Deployment has (the /scale subresource's status.replicas). */
  replicas: number;
  readyReplicas: number;
  /** Workers registered with the control plane by this pool's agents and holding a live lease. */
  readyWorkers: number;
  /** Label selector of the pool's pods (for the /scale subresource and HorizontalPodAutoscaler). */
  selector: string;
  conditions: Condition[];
}

export interface KubeMeta {
  name: string;
  namespace?: string;
  uid?: string;
  generation?: number;
  resourceVersion?: string;
  deletionTimestamp?: string | Date;
  finalizers?: string[];
  labels?: Record<string, string>;
  annotations?: Record<string, string>;
}

export interface WorkerPoolObject {
  apiVersion: string;
  kind: 'WorkerPool';
  metadata: KubeMeta;
  spec: unknown;
  status?: Partial<WorkerPoolStatus>;
}

/** The runtime binaries of an AssetSet: one set per runtime class and architecture (the asset-set file format). */
export const assetSetResourceSpec = z.object({ sets: assetSetList }).strict();

export interface AssetSetObject {
  apiVersion: string;
  kind: 'AssetSet';
  metadata: KubeMeta;
  spec: unknown;
  status?: { conditions?: Condition[] };
}

export interface TemplateObject {
  apiVersion: string;
  kind: 'Template';
  metadata: KubeMeta;
  spec: unknown;
  status?: { conditions?: Condition[]; syncedGeneration?: number };
}

// ---------------------------------------------------------------- CRDs

const conditionsSchema: JsonSchema = {
  type: 'array',
  items: {
    type: 'object',
    required: ['type', 'status'],
    properties: {
      type: { type: 'string' },
      status: { type: 'string', enum: ['True', 'False', 'Unknown'] },
      reason: { type: 'string' },
      message: { type: 'string' },
      lastTransitionTime: { type: 'string', format: 'date-time' },
      observedGeneration: { type: 'integer' },
    },
  },
  'x-kubernetes-list-type': 'map',
  'x-kubernetes-list-map-keys': ['type'],
};

/** The template schema without `name` (that is metadata.name on Kubernetes). */
function templateCrdSpec(): JsonSchema {
  const spec = structuralSchema(templateSpec);
  const { name: _name, ...properties } = spec.properties as Record<string, JsonSchema>;
  return {
    ...spec,
    properties,
    required: (spec.required as string[]).filter((r) => r !== 'name'),
    // Enforced by the API server on clusters with validation rules (Kubernetes ≥ 1.25); on older ones the
    // controller refuses to sync a changed spec and says so in the Template's status.
    'x-kubernetes-validations': [{ rule: 'self == oldSelf', message: 'Template spec is immutable: apply a new name' }],
  };
}

interface CrdNames {
  kind: string;
  plural: string;
  singular: string;
  shortNames: string[];
}

function crd(
  names: CrdNames,
  scope: 'Namespaced' | 'Cluster',
  spec: JsonSchema,
  status: JsonSchema,
  extra: { scale?: boolean; columns?: JsonSchema[] } = {},
) {
  return {
    apiVersion: 'apiextensions.k8s.io/v1',
    kind: 'CustomResourceDefinition',
    metadata: { name: `${names.plural}.${GROUP}`, labels: { 'app.kubernetes.io/part-of': 'torpor' } },
    spec: {
      group: GROUP,
      scope,
      names: { ...names, listKind: `${names.kind}List`, categories: ['torpor'] },
      versions: [
        {
          name: VERSION,
          served: true,
          storage: true,
          schema: {
            openAPIV3Schema: {
              type: 'object',
              required: ['spec'],
              properties: {
                apiVersion: { type: 'string' },
                kind: { type: 'string' },
                metadata: { type: 'object' },
                spec,
                status,
              },
            },
          },
          subresources: {
            status: {},
            ...(extra.scale
              ? {
                  scale: {
                    specReplicasPath: '.spec.replicas',
                    statusReplicasPath: '.status.replicas',
                    labelSelectorPath: '.status.selector',
                  },
                }
              : {}),
          },
          ...(extra.columns ? { additionalPrinterColumns: extra.columns } : {}),
        },
      ],
    },
  };
}

const age = { name: 'Age', type: 'date', jsonPath: '.metadata.creationTimestamp' };

export function templateCrd() {
  return crd(
    { kind: 'Template', plural: 'templates', singular: 'template', shortNames: ['ttpl'] },
    'Namespaced',
    templateCrdSpec(),
    {
      type: 'object',
      properties: { conditions: conditionsSchema, syncedGeneration: { type: 'integer' } },
    },
    {
      columns: [
        { name: 'Runtime', type: 'string', jsonPath: '.spec.runtime' },
        { name: 'Image', type: 'string', jsonPath: '.spec.image', priority: 1 },
        { name: 'Synced', type: 'string', jsonPath: '.status.conditions[?(@.type=="Synced")].status' },
        age,
      ],
    },
  );
}

export function workerPoolCrd() {
  return crd(
    { kind: 'WorkerPool', plural: 'workerpools', singular: 'workerpool', shortNames: ['twp'] },
    'Namespaced',
    structuralSchema(workerPoolSpec),
    {
      type: 'object',
      properties: {
        observedGeneration: { type: 'integer' },
        replicas: { type: 'integer' },
        readyReplicas: { type: 'integer' },
        readyWorkers: { type: 'integer' },
        selector: { type: 'string' },
        conditions: conditionsSchema,
      },
    },
    {
      scale: true,
      columns: [
        { name: 'Runtime', type: 'string', jsonPath: '.spec.runtime' },
        { name: 'Desired', type: 'integer', jsonPath: '.spec.replicas' },
        { name: 'Ready', type: 'integer', jsonPath: '.status.readyReplicas' },
        { name: 'Workers', type: 'integer', jsonPath: '.status.readyWorkers' },
        { name: 'Valid', type: 'string', jsonPath: '.status.conditions[?(@.type=="Valid")].status' },
        age,
      ],
    },
  );
}

export function assetSetCrd() {
  return crd(
    { kind: 'AssetSet', plural: 'assetsets', singular: 'assetset', shortNames: ['tas'] },
    'Cluster',
    structuralSchema(assetSetResourceSpec),
    { type: 'object', properties: { conditions: conditionsSchema } },
    {
      columns: [
        { name: 'Runtimes', type: 'string', jsonPath: '.spec.sets[*].runtime' },
        { name: 'Valid', type: 'string', jsonPath: '.status.conditions[?(@.type=="Valid")].status' },
        age,
      ],
    },
  );
}

/** Every CRD Torpor installs. */
export function crds() {
  return [templateCrd(), workerPoolCrd(), assetSetCrd()];
}
