// A WorkerPool as a Deployment of worker pods, each running one `torpor agent` with N worker slots. The pod's
// shape follows the runtime class: micro-VM pods get /dev/kvm and are pinned to nodes labelled (and tainted)
// torpor.dev/runtime=microvm; gVisor pods run on any node.
import type { AssetSet } from '../../core/schemas.ts';
import type { Toleration, WorkerPoolSpec } from './resources.ts';
import { API_VERSION, POOL_LABEL, RUNTIME_NODE_LABEL } from './resources.ts';

export interface AgentSettings {
  /** The control plane URL the agents register with (e.g. http://torpor-server.torpor.svc:7070). */
  serverUrl: string;
  /** The torpor image worker pods run unless the pool names another. */
  image: string;
  /** Secret (in the pool's namespace) holding the agents' bootstrap token, and its key. */
  tokenSecret: string;
  tokenSecretKey?: string;
  /** The blob store the agents share with the server (s3://bucket/prefix?endpoint=…); credentials come from
   * `blobSecret`'s keys as environment variables (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY), never the URL. */
  blobUrl: string;
  blobSecret?: string;
  /** The agents' network index (default 0: each pod is its own network namespace, so every agent may use 0). */
  networkBase?: number;
  /** Pod-level extras every pool gets (e.g. ACK virtual-node selector and tolerations). */
  nodeSelector?: Record<string, string>;
  tolerations?: Toleration[];
  imagePullPolicy?: 'Always' | 'IfNotPresent' | 'Never';
}

export interface PoolRef {
  namespace: string;
  name: string;
  uid: string;
}

export const MICROVM_TOLERATION: Toleration = {
  key: RUNTIME_NODE_LABEL,
  operator: 'Equal',
  value: 'microvm',
  effect: 'NoSchedule',
};

export const deploymentName = (pool: string): string => `torpor-pool-${pool}`;
export const poolSelector = (pool: string): Record<string, string> => ({
  'app.kubernetes.io/name': 'torpor-agent',
  [POOL_LABEL]: pool,
});
export const selectorString = (pool: string): string =>
  Object.entries(poolSelector(pool))
    .map(([k, v]) => `${k}=${v}`)
    .join(',');

/** The agent API's port on the pod's address (the server calls it). */
export const AGENT_PORT = 7071;
/** Where the agent keeps its caches (images, assets, snapshot chunks): node-local, thrown away with the pod. */
const DATA_DIR = '/var/lib/torpor';
/** Long enough for the agent to suspend its actors to object storage on SIGTERM. */
const GRACE_SECONDS = 300;

/** `assets`: the pool's AssetSet's sets for its runtime class (every architecture; the agent picks its own). */
export function renderDeployment(pool: PoolRef, spec: WorkerPoolSpec, agent: AgentSettings, assets?: AssetSet[]) {
  const microvm = spec.runtime === 'microvm';
  const pt = spec.podTemplate;
  const nodeSelector = {
    ...agent.nodeSelector,
    ...pt.nodeSelector,
    ...(microvm ? { [RUNTIME_NODE_LABEL]: 'microvm' } : {}),
  };
  const tolerations = [
    ...(agent.tolerations ?? []),
    ...(pt.tolerations ?? []),
    ...(microvm ? [MICROVM_TOLERATION] : []),
  ];
  const labels = { ...pt.labels, ...poolSelector(pool.name), 'torpor.dev/runtime': spec.runtime };
  // Each pod is its own network namespace and is the agent's node (--network pod): every agent can use network
  // index 0, and its workers are reached at the pod's IP (the only address routable in the cluster), on ports of
  // their own. The agent reads its token from TORPOR_AGENT_TOKEN (a Secret), never from the command line, and its
  // runtime class and asset sets from TORPOR_RUNTIME and TORPOR_ASSETS below.
  const command = [
    'torpor',
    'agent',
    '--server',
    agent.serverUrl,
    '--node',
    '$(POD_NAME)',
    '--listen',
    `$(POD_IP):${AGENT_PORT}`,
    '--workers',
    String(spec.workersPerPod),
    '--network',
    'pod',
    '--network-base',
    String(agent.networkBase ?? 0),
    '--blob',
    agent.blobUrl,
    '--data-dir',
    DATA_DIR,
  ];
  const volumes: object[] = [{ name: 'data', emptyDir: {} }];
  const mounts: object[] = [{ name: 'data', mountPath: DATA_DIR }];
  if (microvm) {
    volumes.push({ name: 'kvm', hostPath: { path: '/dev/kvm', type: 'CharDevice' } });
    mounts.push({ name: 'kvm', mountPath: '/dev/kvm' });
  }
  return {
    apiVersion: 'apps/v1',
    kind: 'Deployment',
    metadata: {
      name: deploymentName(pool.name),
      namespace: pool.namespace,
      labels: { ...poolSelector(pool.name), 'app.kubernetes.io/part-of': 'torpor' },
      ownerReferences: [
        {
          apiVersion: API_VERSION,
          kind: 'WorkerPool',
          name: pool.name,
          uid: pool.uid,
          controller: true,
          blockOwnerDeletion: true,
        },
      ],
    },
    spec: {
      replicas: spec.replicas,
      selector: { matchLabels: poolSelector(pool.name) },
      // A worker pod holds actors: replace one at a time, and only after the new one is up.
      strategy: { type: 'RollingUpdate', rollingUpdate: { maxUnavailable: 0, maxSurge: 1 } },
      template: {
        metadata: { labels, ...(pt.annotations ? { annotations: pt.annotations } : {}) },
        spec: {
          // The agent needs no Kubernetes API: it talks only to the control plane, with its bootstrap token.
          automountServiceAccountToken: false,
          enableServiceLinks: false,
          terminationGracePeriodSeconds: GRACE_SECONDS,
          ...(Object.keys(nodeSelector).length ? { nodeSelector } : {}),
          ...(tolerations.length ? { tolerations } : {}),
          ...(pt.priorityClassName ? { priorityClassName: pt.priorityClassName } : {}),
          ...(pt.affinity ? { affinity: pt.affinity } : {}),
          containers: [
            {
              name: 'agent',
              image: spec.image ?? agent.image,
              ...(agent.imagePullPolicy ? { imagePullPolicy: agent.imagePullPolicy } : {}),
              command,
              env: [
                { name: 'POD_NAME', valueFrom: { fieldRef: { fieldPath: 'metadata.name' } } },
                { name: 'POD_IP', valueFrom: { fieldRef: { fieldPath: 'status.podIP' } } },
                {
                  name: 'TORPOR_AGENT_TOKEN',
                  valueFrom: { secretKeyRef: { name: agent.tokenSecret, key: agent.tokenSecretKey ?? 'token' } },
                },
                // What the pod is for (the agent's runtime class), for the agent and for people reading `kubectl
                // describe`.
                { name: 'TORPOR_RUNTIME', value: spec.runtime },
                { name: 'TORPOR_POOL', value: `${pool.namespace}/${pool.name}` },
                // The asset-set file format (JSON is YAML), read by the agent; references to secrets only, never
                // secrets. A change of the AssetSet rolls the pods; snapshots keep restoring with the assets they
                // pinned.
                ...(assets?.length ? [{ name: 'TORPOR_ASSETS', value: JSON.stringify(assets) }] : []),
              ],
              ...(agent.blobSecret ? { envFrom: [{ secretRef: { name: agent.blobSecret, optional: true } }] } : {}),
              ports: [{ name: 'agent', containerPort: AGENT_PORT, protocol: 'TCP' }],
              // runsc and QEMU build sandboxes (namespaces, cgroups, seccomp, netns + nftables per activation).
              securityContext: { privileged: true },
              ...(pt.resources ? { resources: pt.resources } : {}),
              volumeMounts: mounts,
            },
          ],
          volumes,
        },
      },
    },
  };
}
