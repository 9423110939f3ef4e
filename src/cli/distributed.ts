// Torpor beyond one machine, as separate processes: `torpor server` (control API, scheduler, reconciler),
// `torpor agent` (one per node: its workers, registered through a server with a lease, and the agent API only
// servers may call) and `torpor router`; all share one store (Redis) and one blob store (S3). `torpor node-net`
// makes a node's network namespace on this machine for an agent to run in (tests, demos: several nodes on one
// host). `torpor up` remains the all-in-one embedded deployment.
import { readFileSync } from 'node:fs';
import { mkdir } from 'node:fs/promises';
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
import { localGvisorAssets, locateRunsc } from '../engine/local.ts';
import { LocalInstances } from '../engine/local-instances.ts';
import { ImageStore } from '../image/store.ts';
import { NodeNetwork } from '../net/node-net.ts';
import { WorkerNetwork } from '../net/worker-net.ts';
import { listeningPort, type ServeRouterOptions, serveRouter } from '../router/serve.ts';
import { ServerOperations } from '../router/server-operations.ts';
import { loadAssetSets, pinnedAssets, selectAssetSet } from '../runtime/asset-set.ts';
import { AssetStore } from '../runtime/assets.ts';
import { GvisorRuntime } from '../runtime/gvisor/runsc.ts';
import { openStore } from '../store/open.ts';
import { storageMeter } from './storage.ts';
import { startTracing } from './tracing.ts';
import { prefetchAssetSets } from './up.ts';

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
  log?: Logger;
}

export async function server(o: ServerOptions): Promise<Running> {
  const log = o.log ?? pino({ name: 'torpor-server' });
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
  // After listening: settling an actor may need its agent, and agents register through this API.
  let reconciling: Promise<unknown> = Promise.resolve();
  const reconciler = setInterval(() => {
    reconciling = lifecycle.reconcile().catch((err: unknown) => log.warn({ err }, 'reconcile failed'));
  }, o.reconcileMs);
  lifecycle.collectLater();
  return {
    url: `http://${o.host}:${listeningPort(api.server)}`,
    stop: async () => {
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

export interface AgentOptions {
  server: string;
  token: string;
  node: string;
  workers: number;
  /** The node's network index: namespace torpor-node<n>; workers n … n+workers-1. */
  networkBase: number;
  blob: string;
  /** ADDR:PORT for the agent API (default: the node's address, port 7071). */
  listen?: string;
  dataDir: string;
  runsc?: string;
  /** The pool's runtime asset sets (YAML); default: the local runsc. */
  assets?: string;
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

export async function agent(o: AgentOptions): Promise<Running> {
  const log = o.log ?? pino({ name: 'torpor-agent' }).child({ node: o.node });
  const tracing = startTracing(`torpor-agent-${o.node}`, log);
  if (o.networkBase + o.workers > 256) {
    throw new TorporError('INVALID_ARGUMENT', 'network-base + workers must be at most 256', { field: 'workers' });
  }
  const network = new NodeNetwork({ index: o.networkBase, self: true });
  // First: an agent started outside its node's namespace says so, before anything else fails less clearly.
  await network.ensure();
  const { host, port } = hostPort(o.listen ?? `${network.address}:7071`, 'listen');
  if (host === '0.0.0.0' || host === '::') {
    throw new TorporError('INVALID_ARGUMENT', '--listen must name the address servers reach this agent at', {
      field: 'listen',
    });
  }
  const dataDir = resolve(o.dataDir);
  await mkdir(dataDir, { recursive: true });
  const assetSets = o.assets ? await loadAssetSets(o.assets) : [await localGvisorAssets(locateRunsc(o.runsc))];
  const assetStore = new AssetStore(join(dataDir, 'assets'));
  await prefetchAssetSets(assetStore, assetSets, log);
  // Where the server reaches this agent is known once its API listens (the port may be 0: any free one).
  const registry = new ServerRegistry({ server: o.server, token: o.token, node: o.node });
  const nodeAgent = new NodeAgent({
    node: o.node,
    dataDir,
    workers: o.workers,
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
