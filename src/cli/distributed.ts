// Torpor beyond one machine, as separate processes: `torpor server` (control API, scheduler, reconciler),
// `torpor agent` (one per node: its workers, registered through a server with a lease, and the agent API only
// servers may call) and `torpor router`; all share one store (Redis) and one blob store (S3). `torpor node-net`
// makes a node's network namespace on this machine for an agent to run in (tests, demos: several nodes on one
// host). `torpor up` remains the all-in-one embedded deployment.
import { createHash } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { mkdir, rmdir } from 'node:fs/promises';
import type { Server } from 'node:http';
import { join, resolve } from 'node:path';
import { type Logger, pino } from 'pino';
import { NodeAgent } from '../agent/agent.ts';
import { buildAgentApi } from '../agent/api.ts';
import { ServerRegistry } from '../agent/remote.ts';
import { buildApi } from '../api/server.ts';
import { openBlobStore } from '../blob/open.ts';
import { Lifecycle } from '../control/lifecycle.ts';
import { Metrics } from '../control/metrics.ts';
import { NodeDirectory } from '../control/nodes.ts';
import { TorporError } from '../core/errors.ts';
import { parse, type RuntimeClass, runtimeClass } from '../core/schemas.ts';
import { connectCluster, type KubeEngineName, type RunningKubeEngine, startKubeEngine } from '../engine/k8s/engine.ts';
import { StorePools } from '../engine/k8s/pools.ts';
import {
  loadMicrovmAssets,
  localGvisorAssets,
  localMicrovmAssets,
  locateRunsc,
  microvmRuntimeFactory,
} from '../engine/local.ts';
import { LocalInstances } from '../engine/local-instances.ts';
import { ImageStore } from '../image/store.ts';
import { NodeNetwork } from '../net/node-net.ts';
import { WorkerNetwork } from '../net/worker-net.ts';
import { listeningPort, type ServeRouterOptions, serveRouter } from '../router/serve.ts';
import { ServerOperations } from '../router/server-operations.ts';
import { loadAssetSets, parseAssetSets, pinnedAssets, selectAssetSet } from '../runtime/asset-set.ts';
import { AssetStore } from '../runtime/assets.ts';
import { GvisorRuntime } from '../runtime/gvisor/runsc.ts';
import { openStore } from '../store/open.ts';
import { storageMeter } from './storage.ts';
import { startTracing } from './tracing.ts';
import { prefetchAssetSets, type UpOptions } from './up.ts';

export interface Running {
  url: string;
  stop: () => Promise<void>;
}

/** The agent token: from a file (preferred: it appears in no process listing), the flag, or TORPOR_AGENT_TOKEN. */
export function agentToken(flag: string | undefined, file: string | undefined, field: string): string {
  const token = file ? readFileSync(file, 'utf8').trim() : (flag ?? process.env.TORPOR_AGENT_TOKEN);
  if (!token) {
    throw new TorporError(
      'INVALID_ARGUMENT',
      `the agent token is needed: --${field}-file FILE, --${field} TOKEN or TORPOR_AGENT_TOKEN`,
      { field },
    );
  }
  if (token.length < 16) {
    throw new TorporError('INVALID_ARGUMENT', `the agent token must be at least 16 characters`, { field });
  }
  return token;
}

// ------------------------------------------------------------------ server

export interface ServerOptions {
  store: string;
  blob: string;
  host: string;
  port: number;
  agentToken: string;
  /** Image cache (templates are checked against their image when applied). */
  dataDir: string;
  workerLeaseMs: number;
  reconcileMs: number;
  /** This server's identity (see LifecycleOptions.holder). */
  id?: string;
  /** With engine k8s or ack: the cluster whose WorkerPools and Templates this server reconciles, in its own
   * process (as `torpor controller` would over its API); the agents' blob store defaults to the server's. */
  kube?: NonNullable<UpOptions['kube']> & { engine: KubeEngineName };
  log?: Logger;
}

export async function server(o: ServerOptions): Promise<Running> {
  const log = o.log ?? pino({ name: 'torpor-server' });
  // A cluster that cannot be reached (or ACK credentials that do not work) fails before anything starts.
  const cluster = o.kube
    ? await connectCluster(o.kube.engine, {
        kube: o.kube.kube,
        ...(o.kube.ack ? { ack: o.kube.ack } : {}),
        log: log.child({ engine: o.kube.engine }),
      })
    : undefined;
  const tracing = startTracing('torpor-server', log);
  const dataDir = resolve(o.dataDir);
  await mkdir(dataDir, { recursive: true });
  const store = await openStore(o.store);
  const blob = openBlobStore(o.blob);
  const metrics = new Metrics();
  const lifecycle = new Lifecycle({
    store,
    blob,
    images: new ImageStore(join(dataDir, 'images')),
    agents: new NodeDirectory({ store, token: o.agentToken }),
    metrics,
    log,
    workerLeaseMs: o.workerLeaseMs,
    ...(o.id ? { holder: o.id } : {}),
  });
  const instances = new LocalInstances({ lifecycle, log });
  await instances.start();
  const storage = storageMeter(blob);
  const api = buildApi({
    lifecycle,
    store,
    metrics,
    log,
    instances,
    ...(storage ? { storage } : {}),
    nodes: {
      token: o.agentToken,
      leaseMs: o.workerLeaseMs,
      suspend: (space: string, name: string) => lifecycle.suspend(space, name),
    },
  });
  await api.listen({ host: o.host, port: o.port });
  const url = `http://${o.host}:${listeningPort(api.server)}`;
  // WorkerPools become Deployments of agent pods that register here; Templates sync into this store.
  let kubeEngine: RunningKubeEngine | undefined;
  if (o.kube && cluster) {
    try {
      kubeEngine = await startKubeEngine({
        engine: o.kube.engine,
        cluster,
        kube: o.kube.kube,
        ...(o.kube.namespace ? { namespace: o.kube.namespace } : {}),
        ...(o.kube.webhook ? { webhook: o.kube.webhook } : {}),
        agent: o.kube.agent(url, o.blob),
        pools: new StorePools({ store, lifecycle, log }),
        templates: lifecycle,
        log,
      });
    } catch (err) {
      await api.close();
      await instances.close();
      await store.close();
      throw err;
    }
  }
  // After listening: settling an actor may need its agent, and agents register through this API.
  let reconciling: Promise<unknown> = Promise.resolve();
  const reconciler = setInterval(() => {
    reconciling = lifecycle.reconcile().catch((err: unknown) => log.warn({ err }, 'reconcile failed'));
  }, o.reconcileMs);
  lifecycle.collectLater();
  return {
    url,
    stop: async () => {
      await kubeEngine?.stop();
      clearInterval(reconciler);
      await reconciling;
      await api.close();
      await instances.close();
      await store.close();
      await tracing?.shutdown();
    },
  };
}

// ------------------------------------------------------------------ agent

/** Where an agent's node is: `node`, a named namespace torpor-node<n> this process was started in (torpor
 * node-net create + nsenter); `pod`, this process's own namespace whatever it is (a Kubernetes pod), its workers
 * exposed at the pod's address (the --listen address) on ports of their own (see NodeNetwork). */
export const AGENT_NETWORKS = ['node', 'pod'] as const;
export type AgentNetworkMode = (typeof AGENT_NETWORKS)[number];

export interface AgentOptions {
  server: string;
  token: string;
  node: string;
  /** Worker slots, all of `runtime`. */
  workers: number;
  /** The runtime class of the workers (default gvisor). */
  runtime?: RuntimeClass;
  /** The node's network index: namespace torpor-node<n> (node mode); workers n … n+workers-1. */
  networkBase: number;
  /** Default `node`. */
  network?: AgentNetworkMode;
  blob: string;
  /** ADDR:PORT for the agent API (default: the node's address, port 7071; in pod mode $POD_IP:7071). */
  listen?: string;
  dataDir: string;
  runsc?: string;
  /** The pool's runtime asset sets: a YAML file, or the text itself (TORPOR_ASSETS); default: this machine's
   * runsc (and QEMU and guest for micro-VM workers). */
  assets?: { file: string } | { text: string };
  deltaLevel?: number;
  /** On stop, how long the agent waits for its running actors to be suspended (default 60 s; 0: no drain). */
  drainTimeoutMs?: number;
  /** Byte cap of the node's snapshot chunk cache. */
  chunkCacheBytes?: number;
  log?: Logger;
}

function hostPort(listen: string, field: string): { host: string; port: number } {
  const i = listen.lastIndexOf(':');
  const port = Number(listen.slice(i + 1));
  if (i <= 0 || !Number.isInteger(port) || port < 0 || port > 65535) {
    throw new TorporError('INVALID_ARGUMENT', `--${field} must be ADDRESS:PORT, got "${listen}"`, { field });
  }
  return { host: listen.slice(0, i), port };
}

/** The flags of `torpor agent` that the pod environment may give instead (render.ts sets TORPOR_RUNTIME and
 * TORPOR_ASSETS): a flag wins over the environment, the environment over the default. */
export function agentPodSettings(
  flags: { runtime?: string; assets?: string; listen?: string; network?: string },
  env: NodeJS.ProcessEnv,
): Pick<AgentOptions, 'runtime' | 'assets' | 'listen' | 'network'> {
  const runtimeName = flags.runtime ?? env.TORPOR_RUNTIME;
  const runtime = runtimeName === undefined ? undefined : parse(runtimeClass, runtimeName, 'runtime');
  const network = flags.network ?? 'node';
  if (!(AGENT_NETWORKS as readonly string[]).includes(network)) {
    throw new TorporError('INVALID_ARGUMENT', `--network must be ${AGENT_NETWORKS.join(' or ')}, got "${network}"`, {
      field: 'network',
    });
  }
  const assets = flags.assets ? { file: flags.assets } : env.TORPOR_ASSETS ? { text: env.TORPOR_ASSETS } : undefined;
  const listen = flags.listen ?? (network === 'pod' && env.POD_IP ? `${env.POD_IP}:7071` : undefined);
  return {
    ...(runtime ? { runtime } : {}),
    ...(assets ? { assets } : {}),
    ...(listen ? { listen } : {}),
    network: network as AgentNetworkMode,
  };
}

export async function agent(o: AgentOptions): Promise<Running> {
  const log = o.log ?? pino({ name: 'torpor-agent' }).child({ node: o.node });
  const tracing = startTracing(`torpor-agent-${o.node}`, log);
  if (o.networkBase + o.workers > 256) {
    throw new TorporError('INVALID_ARGUMENT', 'network-base + workers must be at most 256', { field: 'workers' });
  }
  const pod = o.network === 'pod';
  if (pod && !o.listen) {
    throw new TorporError('INVALID_ARGUMENT', 'in pod mode --listen (or POD_IP) names the pod’s address', {
      field: 'listen',
    });
  }
  // In pod mode the workers are exposed at the address the agent is reached at: the pod's.
  const advertised = o.listen ? hostPort(o.listen, 'listen') : undefined;
  const network = new NodeNetwork({
    index: o.networkBase,
    self: true,
    ...(pod && advertised ? { pod: { address: advertised.host } } : {}),
  });
  // First: an agent started outside its node's namespace says so, before anything else fails less clearly.
  await network.ensure();
  const { host, port } = advertised ?? hostPort(`${network.address}:7071`, 'listen');
  if (host === '0.0.0.0' || host === '::') {
    throw new TorporError('INVALID_ARGUMENT', '--listen must name the address servers reach this agent at', {
      field: 'listen',
    });
  }
  const dataDir = resolve(o.dataDir);
  await mkdir(dataDir, { recursive: true });
  const runtime = o.runtime ?? 'gvisor';
  const microvm = runtime === 'microvm' ? await loadMicrovmAssets({}, log) : undefined;
  const assetSets = !o.assets
    ? [microvm ? await localMicrovmAssets(microvm) : await localGvisorAssets(locateRunsc(o.runsc))]
    : 'file' in o.assets
      ? await loadAssetSets(o.assets.file)
      : parseAssetSets(o.assets.text, 'TORPOR_ASSETS');
  const assetStore = new AssetStore(join(dataDir, 'assets'));
  await prefetchAssetSets(assetStore, assetSets, log);
  // Where the server reaches this agent is known once its API listens (the port may be 0: any free one).
  const registry = new ServerRegistry({ server: o.server, token: o.token, node: o.node });
  const memoryDir = `/dev/shm/torpor-${createHash('sha256').update(dataDir).digest('hex').slice(0, 12)}`;
  const nodeAgent = new NodeAgent({
    node: o.node,
    dataDir,
    workers: microvm ? 0 : o.workers,
    ...(microvm
      ? { microvmWorkers: o.workers, makeMicrovmRuntime: microvmRuntimeFactory(microvm, dataDir, memoryDir) }
      : {}),
    keepSnapshots: 4 * o.workers,
    indexBase: o.networkBase,
    network,
    registry,
    blob: openBlobStore(o.blob),
    images: new ImageStore(join(dataDir, 'images')),
    assets: assetStore,
    poolAssets: (runtime) => {
      const set = selectAssetSet(assetSets, runtime);
      return set ? pinnedAssets(set) : undefined;
    },
    makeRuntime: (stateRoot) =>
      new GvisorRuntime({ stateRoot, onWarning: (message, fields) => log.warn(fields, message) }),
    log,
    waitForRegistry: true,
    ...(o.deltaLevel !== undefined ? { deltaLevel: o.deltaLevel } : {}),
    ...(o.chunkCacheBytes !== undefined ? { chunkCacheBytes: o.chunkCacheBytes } : {}),
  });
  const api = buildAgentApi({ agent: nodeAgent, token: o.token, log, ready: () => nodeAgent.ready });
  await api.listen({ host, port });
  const url = `http://${host}:${listeningPort(api.server)}`;
  registry.agentUrl = url;
  await nodeAgent.start();
  return {
    url,
    stop: async () => {
      // Before the API closes: the server checkpoints and uploads through it.
      const drainMs = o.drainTimeoutMs ?? 60_000;
      if (drainMs > 0) {
        const left = await nodeAgent.drain((ids, ms) => registry.suspendActors(ids, ms), drainMs);
        if (left.length > 0)
          log.warn({ workers: left }, 'drain timed out: these actors go back to their last snapshot');
      }
      await closeLettingRequestsFinish(api);
      await nodeAgent.stop();
      // Every VM is gone: its RAM directory is empty (rmdir refuses otherwise), as the local engine leaves it.
      await rmdir(memoryDir).catch(() => undefined);
      await tracing?.shutdown();
    },
  };
}

/** Closes an API whose clients keep connections alive: requests in flight finish, and each connection closes once
 * idle (a plain close only closes those idle at the moment it is called; the rest would linger for the keep-alive
 * timeout, over a minute — e.g. the server's connection still waiting on a drained worker's teardown). */
async function closeLettingRequestsFinish(api: { close(): Promise<unknown>; server: Server }): Promise<void> {
  const closing = api.close();
  const sweeper = setInterval(() => api.server.closeIdleConnections(), 100);
  try {
    await closing;
  } finally {
    clearInterval(sweeper);
  }
}

// ------------------------------------------------------------------ router

export interface RouterOptions extends Omit<ServeRouterOptions, 'store' | 'lifecycle' | 'metrics' | 'log'> {
  /** The store's URL (the same as the server's). */
  store: string;
  /** The server that resumes and suspends actors. */
  server: string;
  log?: Logger;
}

export async function router(o: RouterOptions): Promise<Running> {
  const log = o.log ?? pino({ name: 'torpor-router' });
  const tracing = startTracing('torpor-router', log);
  const store = await openStore(o.store);
  const { store: _s, server: _v, log: _l, ...rest } = o;
  const served = await serveRouter({
    ...rest,
    store,
    lifecycle: new ServerOperations(o.server),
    metrics: new Metrics(),
    log,
  });
  return {
    url: served.url,
    stop: async () => {
      await served.close();
      await store.close();
      await tracing?.shutdown();
    },
  };
}

// ------------------------------------------------------------------ node-net

/** Makes (or removes) a node's network namespace on this machine, with the host's routes to its workers, for a
 * `torpor agent --network-base N --workers W` to run in (nsenter --net=/var/run/netns/torpor-node<N>). */
export async function nodeNet(action: 'create' | 'delete', networkBase: number, workers: number): Promise<string> {
  const network = new NodeNetwork({ index: networkBase });
  const subnets = Array.from(
    { length: workers },
    (_, i) => new WorkerNetwork({ index: networkBase + i, node: network }),
  );
  if (action === 'delete') {
    // The workers' namespaces too: an agent that was killed left them behind.
    for (const w of subnets) await w.destroy();
    await network.destroy();
    return network.namespace;
  }
  await network.ensure();
  for (const w of subnets) await network.routeToHost(w.subnet);
  return network.namespace;
}
