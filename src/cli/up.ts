// `torpor up`: the embedded deployment in one process — SQLite state, filesystem blobs (or the --store and --blob
// of a shared deployment), a local engine with in-process node agents, the reconciler and the REST API.
import { mkdir } from 'node:fs/promises';
import http, { type Server } from 'node:http';
import { join, resolve } from 'node:path';
import { type Logger, pino } from 'pino';
import { ApiKeys } from '../api/compat.ts';
import { mcpGateway } from '../api/mcp-gateway.ts';
import { buildApi } from '../api/server.ts';
import { FsBlobStore } from '../blob/fs.ts';
import { openBlobStore } from '../blob/open.ts';
import { Lifecycle } from '../control/lifecycle.ts';
import { Metrics } from '../control/metrics.ts';
import { TorporError } from '../core/errors.ts';
import type { AssetSet } from '../core/schemas.ts';
import type { AckSettings } from '../engine/ack/settings.ts';
import type { Engine } from '../engine/engine.ts';
import { connectCluster, type KubeEngineName, type RunningKubeEngine, startKubeEngine } from '../engine/k8s/engine.ts';
import type { KubeOptions } from '../engine/k8s/kube.ts';
import { StorePools } from '../engine/k8s/pools.ts';
import type { AgentSettings } from '../engine/k8s/render.ts';
import { LocalEngine, loadMicrovmAssets, localGvisorAssets, localMicrovmAssets, locateRunsc } from '../engine/local.ts';
import { LocalInstances } from '../engine/local-instances.ts';
import { StandardEngine } from '../engine/standard.ts';
import { ImageStore } from '../image/store.ts';
import { listeningPort, serveRouter } from '../router/serve.ts';
import { fetchAssets, hostArch, loadAssetSets, pinnedAssets } from '../runtime/asset-set.ts';
import { AssetStore } from '../runtime/assets.ts';
import { prepareRunsc } from '../runtime/gvisor/runsc.ts';
import { openStore } from '../store/open.ts';
import { SqliteStore } from '../store/sqlite.ts';
import { Progress } from './progress.ts';
import { storageMeter } from './storage.ts';
import { startTracing } from './tracing.ts';

export interface UpOptions {
  dataDir: string;
  /** State store URL (src/store/open.ts); default: SQLite in dataDir. */
  store?: string;
  /** Blob store URL (src/blob/open.ts); default: the directory blobs/ in dataDir. */
  blob?: string;
  host: string;
  port: number;
  /** Worker slots per node. */
  workers: number;
  /** Node agents, each in its own network namespace (default 1). */
  nodes?: number;
  runsc?: string;
  /** An asset-set file (YAML): the pool's default sets; without one, the gVisor set of the local runsc. */
  assets?: string;
  /** Byte caps of the node's image caches (registry layers; unpacked rootfs): least recently used go first. */
  layerCacheBytes?: number;
  rootfsCacheBytes?: number;
  /** Byte cap of each node's snapshot chunk cache: least recently used chunks go first. */
  chunkCacheBytes?: number;
  /** Micro-VM worker slots per node (QEMU), besides the `workers` gVisor ones. */
  microvmWorkers?: number;
  /** First per-worker network index: lets two Torpor instances share one machine. */
  networkBase?: number;
  /** zstd level for delta-encoded snapshot files (0: chunks only). */
  deltaLevel?: number;
  reconcileMs?: number;
  /** The router: Host <actor>.<space>.actors.<domain> on this port (0 = any free port). */
  routerPort?: number;
  domain?: string;
  queueSize?: number;
  queueDeadlineMs?: number;
  upstreamTimeoutMs?: number;
  maxBodyBytes?: number;
  ingressTokens?: Record<string, string>;
  /** The engine behind the AEnvironment API (/env-instance, /aenvironment/instance): this node's actors
   * (local) or an external service speaking the standard contract at standardUrl. */
  engine?: 'local' | 'standard' | KubeEngineName;
  standardUrl?: string;
  /** Presented to the standard engine as `Authorization: Bearer` (a service key there). */
  standardApiKey?: string;
  /** The MCP gateway (tool traffic by instance id, src/api/mcp-gateway.ts) on this port; none when undefined. */
  mcpPort?: number;
  /** [owner, key] pairs: when any, the AEnvironment API needs one of these keys (src/api/compat.ts). */
  apiKeys?: [string, string][];
  /** With engine k8s or ack: the cluster whose WorkerPools and Templates this control plane reconciles. */
  kube?: {
    kube: KubeOptions;
    ack?: AckSettings;
    namespace?: string;
    /** Serve the Template admission webhook (see KubeEngineOptions.webhook). */
    webhook?: { listen: string; certDir: string };
    /** What worker pods get, given this control plane's URL and blob store. */
    agent: (serverUrl: string, blobUrl: string) => AgentSettings;
  };
  log?: Logger;
}

export interface RunningTorpor {
  url: string;
  routerUrl: string;
  /** The MCP gateway, when one was asked for. */
  mcpUrl?: string;
  lifecycle: Lifecycle;
  instances: Engine;
  stop: () => Promise<void>;
}

export async function up(opts: UpOptions): Promise<RunningTorpor> {
  const log = opts.log ?? pino({ name: 'torpor' });
  // A cluster that cannot be reached (or ACK credentials that do not work) fails before anything starts.
  const cluster =
    (opts.engine === 'k8s' || opts.engine === 'ack') && opts.kube
      ? await connectCluster(opts.engine, {
          kube: opts.kube.kube,
          ...(opts.kube.ack ? { ack: opts.kube.ack } : {}),
          log: log.child({ engine: opts.engine }),
        })
      : undefined;
  const tracing = startTracing('torpor', log);
  const nodes = opts.nodes ?? 1;
  const microvmWorkers = opts.microvmWorkers ?? 0;
  if ((opts.networkBase ?? 0) + nodes * (opts.workers + microvmWorkers) > 256) {
    throw new TorporError(
      'INVALID_ARGUMENT',
      'network-base + nodes × (workers + microvm-workers) must be at most 256 (one /30 per worker)',
      { field: 'workers' },
    );
  }
  const dataDir = resolve(opts.dataDir);
  await mkdir(dataDir, { recursive: true });
  const metrics = new Metrics();
  const store = metrics.timed(
    opts.store ? await openStore(opts.store) : SqliteStore.open(join(dataDir, 'state.db')),
    metrics.storeOperations,
  );
  metrics.observeStore(store);
  const blobUrl = opts.blob ?? `file://${join(dataDir, 'blobs')}`;
  const blobStore = opts.blob ? openBlobStore(opts.blob) : new FsBlobStore(join(dataDir, 'blobs'));
  const blob = metrics.blob(blobStore);
  const storage = storageMeter(blobStore);
  let engine: LocalEngine | undefined;
  const images = new ImageStore(join(dataDir, 'images'), {
    ...(opts.layerCacheBytes !== undefined ? { layerCacheBytes: opts.layerCacheBytes } : {}),
    ...(opts.rootfsCacheBytes !== undefined ? { rootfsCacheBytes: opts.rootfsCacheBytes } : {}),
    inUse: () =>
      (engine?.localAgents() ?? []).flatMap((agent) =>
        [...agent.slots.values()].flatMap((s) => (s.image ? [s.image] : [])),
      ),
  });
  if (opts.assets && opts.runsc) {
    throw new TorporError('INVALID_ARGUMENT', '--runsc and --assets exclude each other: name runsc in the asset set', {
      field: 'runsc',
    });
  }
  const assetSets = opts.assets ? await loadAssetSets(opts.assets) : [await localGvisorAssets(locateRunsc(opts.runsc))];
  // Micro-VM workers: QEMU and the guest found on this machine, KVM probed by booting; their files are the
  // default micro-VM set unless the asset file declares one.
  const microvm = microvmWorkers > 0 ? await loadMicrovmAssets({}, log) : undefined;
  if (microvm && !assetSets.some((set) => set.runtime === 'microvm' && set.arch === hostArch())) {
    assetSets.push(await localMicrovmAssets(microvm));
  }
  const assetStore = new AssetStore(join(dataDir, 'assets'));
  await prefetchAssetSets(assetStore, assetSets, log);
  engine = new LocalEngine({
    dataDir,
    workers: opts.workers,
    nodes,
    store,
    blob,
    images,
    log,
    networkBase: opts.networkBase ?? 0,
    ...(opts.deltaLevel !== undefined ? { deltaLevel: opts.deltaLevel } : {}),
    ...(opts.chunkCacheBytes !== undefined ? { chunkCacheBytes: opts.chunkCacheBytes } : {}),
    assetSets,
    assetStore,
    microvmWorkers,
    ...(microvm ? { microvm } : {}),
  });
  await engine.start();
  const lifecycle = new Lifecycle({ store, blob, images, agents: engine, metrics, log });
  const reconciler = setInterval(() => {
    lifecycle.reconcile().catch((err: unknown) => log.warn({ err }, 'reconcile failed'));
  }, opts.reconcileMs ?? 5000);
  // Actors left RUNNING by a previous process lost their sandboxes: settle them now, not in 5 s.
  await lifecycle.reconcile();
  // An earlier process may have stopped with garbage uncollected (shutdown drops queued maintenance).
  lifecycle.collectLater();

  let instances: Engine;
  if (opts.engine === 'standard') {
    if (!opts.standardUrl) {
      throw new TorporError('INVALID_ARGUMENT', '--engine standard needs --standard-url', { field: 'standard-url' });
    }
    instances = new StandardEngine({
      url: opts.standardUrl,
      ...(opts.standardApiKey ? { apiKey: opts.standardApiKey } : {}),
    });
  } else {
    const local = new LocalInstances({ lifecycle, log });
    await local.start();
    instances = local;
  }
  const keys = opts.apiKeys?.length ? new ApiKeys(opts.apiKeys) : undefined;
  const api = buildApi({
    lifecycle,
    store,
    metrics,
    log,
    instances,
    ...(storage ? { storage } : {}),
    instanceKeys: keys,
  });
  await api.listen({ host: opts.host, port: opts.port });
  const url = `http://${opts.host}:${listeningPort(api.server)}`;

  // Kubernetes / ACK: WorkerPools become Deployments of agent pods, Templates sync into this store.
  let kubeEngine: RunningKubeEngine | undefined;
  if (opts.engine === 'k8s' || opts.engine === 'ack') {
    if (!opts.kube) throw new TorporError('INVALID_ARGUMENT', `--engine ${opts.engine} needs cluster settings`);
    kubeEngine = await startKubeEngine({
      engine: opts.engine,
      ...(cluster ? { cluster } : {}),
      kube: opts.kube.kube,
      ...(opts.kube.ack ? { ack: opts.kube.ack } : {}),
      ...(opts.kube.namespace ? { namespace: opts.kube.namespace } : {}),
      ...(opts.kube.webhook ? { webhook: opts.kube.webhook } : {}),
      agent: opts.kube.agent(url, blobUrl),
      pools: new StorePools({ store, lifecycle, log }),
      templates: lifecycle,
      log,
    });
  }

  const router = await serveRouter({
    store,
    lifecycle,
    metrics,
    log,
    host: opts.host,
    port: opts.routerPort ?? 7080,
    domain: opts.domain ?? 'torpor.localhost',
    ...(opts.queueSize !== undefined ? { queueSize: opts.queueSize } : {}),
    ...(opts.queueDeadlineMs !== undefined ? { queueDeadlineMs: opts.queueDeadlineMs } : {}),
    ...(opts.ingressTokens ? { ingressTokens: opts.ingressTokens } : {}),
    ...(opts.upstreamTimeoutMs !== undefined ? { upstreamTimeoutMs: opts.upstreamTimeoutMs } : {}),
    ...(opts.maxBodyBytes !== undefined ? { maxBodyBytes: opts.maxBodyBytes } : {}),
  });

  let mcpServer: Server | undefined;
  if (opts.mcpPort !== undefined) {
    mcpServer = http.createServer(
      { keepAlive: true },
      mcpGateway({ engine: instances, keys, proxy: router.router.handleFor }),
    );
    const server = mcpServer;
    await new Promise<void>((resolve) => server.listen(opts.mcpPort, opts.host, resolve));
  }
  const mcpUrl = mcpServer ? `http://${opts.host}:${listeningPort(mcpServer)}` : undefined;

  let stopping: Promise<void> | undefined;
  const stop = (): Promise<void> => {
    stopping ??= (async () => {
      clearInterval(reconciler);
      await kubeEngine?.stop();
      await router.close();
      if (mcpServer) {
        mcpServer.closeAllConnections();
        await new Promise((r) => mcpServer.close(r));
      }
      await api.close();
      await instances.close();
      await lifecycle.suspendAll();
      await engine.stop();
      await store.close();
      await tracing?.shutdown();
    })();
    return stopping;
  };
  return { url, routerUrl: router.url, ...(mcpUrl ? { mcpUrl } : {}), lifecycle, instances, stop };
}

/** Fetches every asset set of the pool into the node's cache now, so the first activation does not wait; a failure
 * is not fatal (an activation tries again). The runsc among them is detected now too. */
export async function prefetchAssetSets(assetStore: AssetStore, assetSets: AssetSet[], log: Logger): Promise<void> {
  for (const set of assetSets) {
    // Fetched now so the first activation does not wait; a failure here is not fatal (a later fetch may succeed).
    const assets = pinnedAssets(set);
    const sha256 = Object.fromEntries(Object.entries(assets).map(([name, a]) => [name, a.sha256]));
    log.info({ runtime: set.runtime, arch: set.arch, sha256 }, 'pool asset set');
    const progress = new Progress(`fetching ${set.runtime} assets`);
    try {
      const paths = await fetchAssets(assetStore, assets, {
        onProgress: (name, p) => progress.update(name, p.bytesDone, p.bytesTotal),
      });
      // Detected now, not in the first activation; a runsc that does not run is worth a warning, not a refusal.
      if (set.runtime === 'gvisor' && set.arch === hostArch() && paths.runsc) {
        await prepareRunsc(paths.runsc, (message, fields) => log.warn(fields, message));
      }
    } catch (err) {
      log.warn({ err, runtime: set.runtime, arch: set.arch }, 'pool assets not ready: activations will try again');
    } finally {
      progress.finish();
    }
  }
}
