// The Kubernetes and ACK engines as a control plane runs them: connect to the cluster (a kubeconfig, in-cluster
// configuration, or ACK's temporary kubeconfig, refreshed), then run the controller with the control plane as the
// place templates are synced to and pools are drained through (in its process, or over its API).
import type { Logger } from 'pino';
import { TorporError } from '../../core/errors.ts';
import { AckCluster } from '../ack/cluster.ts';
import type { AckSettings } from '../ack/settings.ts';
import { KubeController, type PoolControl, type TemplateSink } from './controller.ts';
import { Kube, type KubeOptions, loadKubeConfig } from './kube.ts';
import type { AgentSettings } from './render.ts';
import { type RunningWebhook, serveWebhook } from './webhook.ts';

export type KubeEngineName = 'k8s' | 'ack';

/** `--engine` values (and AEnvironment's `--schedule-type` names) → the engine. */
export const ENGINE_ALIASES: Record<string, 'local' | 'standard' | KubeEngineName> = {
  local: 'local',
  standard: 'standard',
  k8s: 'k8s',
  kubernetes: 'k8s',
  ack: 'ack',
  'alicloud-k8s': 'ack',
};

export interface KubeEngineOptions {
  engine: KubeEngineName;
  kube?: KubeOptions;
  /** Required for `ack`. */
  ack?: AckSettings;
  /** Watch one namespace (undefined: all). */
  namespace?: string;
  agent: AgentSettings;
  /** The control plane: in its process (StorePools + Lifecycle) or over its API (ApiControlPlane). */
  pools: PoolControl;
  templates: TemplateSink;
  log: Logger;
  /** A connection made earlier with connectCluster (so a bad kubeconfig fails before anything else starts). */
  cluster?: ClusterConnection;
  /** Serve the Template admission webhook (immutability on API servers < 1.25): where, and its certificate. */
  webhook?: { listen: string; certDir: string };
}

export interface ClusterConnection {
  kube: Kube;
  close(): void;
}

export interface RunningKubeEngine {
  kube: Kube;
  controller: KubeController;
  stop(): Promise<void>;
}

/** Connects to the cluster the options name (ACK: with a refreshed temporary kubeconfig). */
export async function connectCluster(
  engine: KubeEngineName,
  opts: { kube?: KubeOptions; ack?: AckSettings; log: Logger },
): Promise<ClusterConnection> {
  let connection: ClusterConnection;
  if (engine === 'ack') {
    if (!opts.ack) throw new TorporError('INVALID_ARGUMENT', 'the ack engine needs its settings', { field: 'engine' });
    const cluster = await AckCluster.connect({ settings: opts.ack, log: opts.log });
    connection = { kube: cluster.kube, close: () => cluster.close() };
  } else {
    connection = { kube: new Kube(loadKubeConfig(opts.kube)), close: () => undefined };
  }
  try {
    await connection.kube.request('GET', '/version');
  } catch (err) {
    connection.close();
    if (err instanceof TorporError) throw err;
    const c = (err as { cause?: { code?: string; message?: string } }).cause;
    const cause = c?.code ?? c?.message ?? (err as Error).message;
    throw new TorporError(
      'RUNTIME_ERROR',
      `cannot reach the Kubernetes API server ${connection.kube.server()}: ${cause}`,
      {
        field: 'kubeconfig',
      },
    );
  }
  return connection;
}

export async function startKubeEngine(o: KubeEngineOptions): Promise<RunningKubeEngine> {
  const log = o.log.child({ engine: o.engine });
  const cluster =
    o.cluster ??
    (await connectCluster(o.engine, { ...(o.kube ? { kube: o.kube } : {}), ...(o.ack ? { ack: o.ack } : {}), log }));

  const controller = new KubeController({
    kube: cluster.kube,
    ...(o.namespace ? { namespace: o.namespace } : {}),
    agent: o.agent,
    pools: o.pools,
    templates: o.templates,
    log,
  });
  let webhook: RunningWebhook | undefined;
  try {
    await controller.start();
    if (o.webhook) webhook = await serveWebhook({ ...o.webhook, log });
  } catch (err) {
    await controller.stop().catch(() => undefined);
    cluster.close();
    throw err;
  }
  log.info({ server: cluster.kube.server(), namespace: o.namespace ?? '(all)' }, 'kubernetes controller started');
  return {
    kube: cluster.kube,
    controller,
    async stop() {
      await webhook?.close();
      await controller.stop();
      cluster.close();
    },
  };
}
