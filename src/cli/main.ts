// The `torpor` command: `up` runs the embedded deployment; everything else talks to a server over REST.
import { readFileSync } from 'node:fs';
import { dirname, isAbsolute, join, resolve } from 'node:path';
import { Command, Option } from 'commander';
import { parse as parseYaml, stringify as stringifyYaml } from 'yaml';
import { DEFAULT_CHUNK_CACHE_BYTES } from '../blob/lru-cache.ts';
import { asTorporError, TorporError } from '../core/errors.ts';
import { type Actor, DEFAULT_SPACE, type Operation } from '../core/types.ts';
import { ApiClient } from './client.ts';
import {
  type AgentFlags,
  ackSettingsFrom,
  addAckOptions,
  addAgentOptions,
  addEngineOptions,
  addKubeOptions,
  agentSettings,
  ENGINE_CHOICES,
  kubeEngineSettings,
  kubeOptions,
  SERVER_ENGINE_CHOICES,
} from './kube-flags.ts';
import { describeActor, type Kind, type OutputFormat, render } from './output.ts';
import { addBlobOption, addStoreOption } from './storage.ts';
import { withTransferProgress } from './transfers.ts';

const program = new Command('torpor')
  .description('Run many AI-agent sandboxes on few machines: suspend idle actors, resume them anywhere.')
  .addOption(new Option('--server <url>', 'Torpor API server').env('TORPOR_SERVER').default('http://127.0.0.1:7070'))
  .addOption(new Option('-o, --output <format>', 'output format').choices(['table', 'json', 'yaml']).default('table'))
  .showHelpAfterError();

const client = () => new ApiClient(program.opts<{ server: string }>().server);
const format = () => program.opts<{ output: OutputFormat }>().output;
const print = (kind: Kind, value: unknown, as: OutputFormat = format()) => console.log(render(kind, value, as));
const actorPath = (space: string, name: string, action = '') =>
  `/v1/spaces/${encodeURIComponent(space)}/actors/${encodeURIComponent(name)}${action ? `/${action}` : ''}`;

/** Reads a template file (YAML or JSON); a relative image path is taken relative to the file. */
export function readTemplateFile(file: string): Record<string, unknown> {
  let doc: unknown;
  try {
    doc = parseYaml(readFileSync(file, 'utf8'));
  } catch (err) {
    throw new TorporError('INVALID_ARGUMENT', `${file}: ${(err as Error).message}`, { field: 'file' });
  }
  if (typeof doc !== 'object' || doc === null || Array.isArray(doc)) {
    throw new TorporError('INVALID_ARGUMENT', `${file}: must hold one template object`, { field: 'file' });
  }
  const template = doc as Record<string, unknown>;
  if (typeof template.image === 'string' && !isAbsolute(template.image) && template.image.startsWith('.')) {
    template.image = resolve(dirname(file), template.image);
  }
  return template;
}

// ------------------------------------------------------------------ up

/** On SIGINT or SIGTERM: `stop`, then exit (1 when stopping failed). */
function stopOnSignal(stop: () => Promise<void>): void {
  const shutdown = () => {
    stop().then(
      () => process.exit(0),
      () => process.exit(1),
    );
  };
  process.once('SIGINT', shutdown);
  process.once('SIGTERM', shutdown);
}

function integerFlag(name: string, value: string, min: number, max: number): number {
  const n = Number(value);
  if (!Number.isInteger(n) || n < min || n > max) {
    throw new TorporError('INVALID_ARGUMENT', `--${name} must be an integer from ${min} to ${max}, got "${value}"`, {
      field: name,
    });
  }
  return n;
}

interface UpFlags extends AgentFlags, RouterFlags {
  dataDir: string;
  host: string;
  port: string;
  workers: string;
  nodes: string;
  networkBase: string;
  microvmWorkers: string;
  runsc?: string;
  assets?: string;
  layerCacheMib?: string;
  chunkCacheMib?: string;
  rootfsCacheMib?: string;
  store?: string;
  blob?: string;
  sample?: boolean;
  routerPort: string;
  engine: string;
  scheduleType?: string;
  standardUrl?: string;
  kubeconfig?: string;
  context?: string;
  watchNamespace?: string;
  mcpPort: string;
  apiKey?: string[];
}

/** `name=secret` pairs from a repeatable flag and from an environment variable (same form, comma-separated), so
 * that secrets need not appear in a process listing. */
function secretPairs(flags: string[] | undefined, envVar: string, field: string, form: string): [string, string][] {
  const pairs = [...(flags ?? []), ...(process.env[envVar]?.split(',').filter(Boolean) ?? [])];
  return pairs.map((pair) => {
    const eq = pair.indexOf('=');
    if (eq <= 0 || eq === pair.length - 1) {
      throw new TorporError('INVALID_ARGUMENT', `--${field} must be given as ${form}`, { field });
    }
    return [pair.slice(0, eq), pair.slice(eq + 1)];
  });
}

function ingressTokens(flags: string[] | undefined): Record<string, string> | undefined {
  const pairs = secretPairs(flags, 'TORPOR_INGRESS_TOKENS', 'ingress-token', 'space=token');
  return pairs.length > 0 ? Object.fromEntries(pairs) : undefined;
}

/** The router's flags, the same for `torpor up` and `torpor router`. */
interface RouterFlags {
  domain: string;
  queueSize: string;
  queueDeadline: string;
  upstreamTimeout: string;
  maxBody: string;
  ingressToken?: string[];
}

function withRouterOptions(command: Command): Command {
  return command
    .option('--domain <domain>', 'router domain', 'torpor.localhost')
    .option('--queue-size <n>', 'requests that may wait for a resume at once', '1000')
    .option('--queue-deadline <seconds>', 'how long a request waits for a resume before 503', '30')
    .option('--upstream-timeout <seconds>', 'how long the router waits for an actor to answer before 504', '60')
    .option('--max-body <mib>', 'largest request body the router forwards, in MiB (413 beyond)', '64')
    .option(
      '--ingress-token <space=token...>',
      'require Authorization: Bearer <token> for actors of a space (repeatable)',
    );
}

function routerSettings(o: RouterFlags) {
  const tokens = ingressTokens(o.ingressToken);
  return {
    domain: o.domain,
    queueSize: integerFlag('queue-size', o.queueSize, 1, 1_000_000),
    queueDeadlineMs: integerFlag('queue-deadline', o.queueDeadline, 1, 3600) * 1000,
    upstreamTimeoutMs: integerFlag('upstream-timeout', o.upstreamTimeout, 1, 86400) * 1000,
    maxBodyBytes: integerFlag('max-body', o.maxBody, 1, 65536) * 1024 * 1024,
    ...(tokens ? { ingressTokens: tokens } : {}),
  };
}

const CHUNK_CACHE_FLAG = '--chunk-cache-mib <n>';
const CHUNK_CACHE_HELP = `cap of the node's snapshot chunk cache (warm-node restores read it, not the blob store); least recently used chunks go first (default ${DEFAULT_CHUNK_CACHE_BYTES / 1024 ** 2})`;

/** The chunk cache cap a --chunk-cache-mib flag asks for (none: the agent's default). */
function chunkCacheSetting(mib: string | undefined): { chunkCacheBytes?: number } {
  return mib ? { chunkCacheBytes: integerFlag('chunk-cache-mib', mib, 1, 1 << 24) * 1024 * 1024 } : {};
}

const upCommand = program
  .command('up')
  .description('run Torpor on this machine (API, local engine, reconciler)')
  .option('--data-dir <dir>', 'where state, snapshots and caches live', '/var/lib/torpor')
  .option('--host <host>', 'address to listen on', '127.0.0.1')
  .option('--port <port>', 'API port (0 = any free port)', '7070')
  .option('--workers <n>', 'worker slots per node', '2')
  .option('--nodes <n>', 'node agents, each in its own network namespace', '1')
  .option('--runsc <path>', 'runsc binary (default: the asset built by scripts/setup.sh)')
  .option('--assets <file>', "the pool's runtime asset sets (YAML; `torpor assets stage` prints one)")
  .option('--layer-cache-mib <n>', 'cap of the image layer cache; least recently used layers go first')
  .option('--rootfs-cache-mib <n>', 'cap of the unpacked image cache; least recently used, unused images go first')
  .option(CHUNK_CACHE_FLAG, CHUNK_CACHE_HELP)
  .option('--microvm-workers <n>', 'micro-VM worker slots per node, besides the gVisor ones (QEMU)', '0')
  .option(
    '--network-base <n>',
    'first per-worker network index, 0..255 (two instances on one machine need distinct ranges)',
    '0',
  )
  .option('--router-port <port>', 'router port: Host <actor>.<space>.actors.<domain> reaches the actor', '7080')
  .option('--standard-url <url>', 'with --engine standard: the engine serving the standard contract')
  .option(
    '--mcp-port <port>',
    "MCP gateway port: tool traffic by AEnvCore-EnvInstance-ID (AEnvironment's SDK expects 8081 beside the API on 8080)",
    '7081',
  )
  .option(
    '--api-key <owner=key...>',
    'require Authorization: Bearer <key> on the AEnvironment API, the key speaking for owner ("*": a service ' +
      'that states the owner in X-Owner); repeatable, or TORPOR_API_KEYS=owner=key,…',
  )
  .option('--sample', 'create the sample "counter" template and actor');
addStoreOption(upCommand, { required: false, otherwise: 'a SQLite file in --data-dir' });
addBlobOption(upCommand, { required: false, otherwise: 'the directory blobs/ in --data-dir' });
addEngineOptions(
  upCommand,
  ENGINE_CHOICES,
  'engine: local (this machine), k8s (a Kubernetes cluster: pools, templates), ack (Alibaba Cloud ACK), standard',
);
addAckOptions(addAgentOptions(addKubeOptions(withRouterOptions(upCommand)))).action(
  async (o: UpFlags & Record<string, unknown>) => {
    const { up } = await import('./up.ts');
    const { ENGINE_ALIASES } = await import('../engine/k8s/engine.ts');
    const engine = ENGINE_ALIASES[o.scheduleType ?? o.engine]!;
    const kubeEngine = engine === 'k8s' || engine === 'ack' ? await kubeEngineSettings(engine, o) : undefined;
    const torpor = await up({
      dataDir: o.dataDir,
      ...(o.store ? { store: o.store } : {}),
      ...(o.blob ? { blob: o.blob } : {}),
      host: o.host,
      port: integerFlag('port', o.port, 0, 65535),
      workers: integerFlag('workers', o.workers, 1, 64),
      nodes: integerFlag('nodes', o.nodes, 1, 16),
      microvmWorkers: integerFlag('microvm-workers', o.microvmWorkers, 0, 64),
      networkBase: integerFlag('network-base', o.networkBase, 0, 255),
      routerPort: integerFlag('router-port', o.routerPort, 0, 65535),
      ...routerSettings(o),
      ...(o.runsc ? { runsc: o.runsc } : {}),
      ...(o.assets ? { assets: o.assets } : {}),
      ...(o.layerCacheMib
        ? { layerCacheBytes: integerFlag('layer-cache-mib', o.layerCacheMib, 1, 1 << 24) * 1024 * 1024 }
        : {}),
      ...(o.rootfsCacheMib
        ? { rootfsCacheBytes: integerFlag('rootfs-cache-mib', o.rootfsCacheMib, 1, 1 << 24) * 1024 * 1024 }
        : {}),
      ...chunkCacheSetting(o.chunkCacheMib),
      engine,
      ...(o.standardUrl ? { standardUrl: o.standardUrl } : {}),
      // The key this Torpor presents to its standard engine: from the environment only, never a flag.
      ...(process.env.TORPOR_STANDARD_API_KEY ? { standardApiKey: process.env.TORPOR_STANDARD_API_KEY } : {}),
      mcpPort: integerFlag('mcp-port', o.mcpPort, 0, 65535),
      apiKeys: secretPairs(o.apiKey, 'TORPOR_API_KEYS', 'api-key', 'owner=key'),
      ...(kubeEngine
        ? {
            kube: {
              ...kubeEngine,
              agent: (url: string, blobUrl: string) => agentSettings(o, { serverUrl: url, blobUrl }),
            },
          }
        : {}),
    });
    process.stderr.write(`Torpor API listening on ${torpor.url} (dashboard: ${torpor.url}/dashboard/)\n`);
    process.stderr.write(`Torpor router listening on ${torpor.routerUrl} (Host: <actor>.<space>.actors.${o.domain})\n`);
    if (torpor.mcpUrl) process.stderr.write(`Torpor MCP gateway listening on ${torpor.mcpUrl}\n`);
    if (o.sample) {
      const { createSample } = await import('./sample.ts');
      await createSample(torpor.lifecycle, resolve(o.dataDir), `${o.domain}:${new URL(torpor.routerUrl).port}`);
    }
    stopOnSignal(() => {
      process.stderr.write('Torpor stopping: suspending running actors…\n');
      return torpor.stop();
    });
  },
);

// ------------------------------------------------------------------ install

const installCommand = program
  .command('install')
  .description('render deploy/ and apply it to a Kubernetes cluster (server-side apply, CRDs first)')
  .addOption(
    new Option('--engine <engine>', 'k8s, or ack (Alibaba Cloud ACK: deploy/ack)')
      .choices(['k8s', 'ack', 'alicloud-k8s'])
      .default('k8s'),
  )
  .addOption(new Option('--schedule-type <engine>', 'alias of --engine').choices(['k8s', 'ack', 'alicloud-k8s']))
  .option('--dry-run', 'print the manifests instead of applying them (no cluster is contacted)')
  .option('--namespace <ns>', 'namespace for Torpor', 'torpor')
  .option('--image <image>', 'the torpor image (server, router, worker pods)')
  .option('--blob <url>', 'snapshot store URL for torpor-config (credentials: the Secret torpor-blob)')
  .option('--domain <domain>', 'router domain for torpor-config');
addAckOptions(addKubeOptions(installCommand)).action(async (o: Record<string, unknown>) => {
  const { DEPLOY_DIR, applyInstall, renderInstall, toYaml } = await import('../engine/k8s/install.ts');
  const { ENGINE_ALIASES, connectCluster } = await import('../engine/k8s/engine.ts');
  const engine = ENGINE_ALIASES[String(o.scheduleType ?? o.engine)] === 'ack' ? 'ack' : 'k8s';
  const config: Record<string, string> = {};
  if (o.blob) config.blob = String(o.blob);
  if (o.domain) config.domain = String(o.domain);
  const namespace = String(o.namespace);
  config.server = `http://torpor-server.${namespace}.svc:7070`;
  config.store = `redis://torpor-redis.${namespace}.svc:6379`;
  const objects = await renderInstall({
    dir: engine === 'ack' ? join(DEPLOY_DIR, 'ack') : DEPLOY_DIR,
    namespace,
    ...(o.image ? { image: String(o.image) } : {}),
    config,
  });
  if (o.dryRun) {
    process.stdout.write(toYaml(objects));
    process.stdout.write(`# plus Secret ${namespace}/torpor-agent-token: a random token generated in the cluster\n`);
    process.stdout.write(
      `# plus Secret ${namespace}/torpor-webhook-tls: the Template webhook's certificate and CA (its caBundle)\n`,
    );
    return;
  }
  const { pino } = await import('pino');
  const log = pino({ name: 'torpor-install' });
  const cluster = await connectCluster(engine, {
    kube: kubeOptions(o as { kubeconfig?: string; context?: string }),
    ...(engine === 'ack' ? { ack: await ackSettingsFrom(o) } : {}),
    log,
  });
  try {
    await applyInstall(cluster.kube, objects, log);
  } finally {
    cluster.close();
  }
  process.stderr.write(`Torpor installed in namespace ${namespace} on ${cluster.kube.server()}\n`);
});

// ------------------------------------------------------------------ controller

const controllerCommand = program
  .command('controller')
  .description(
    'the Kubernetes controller for a Torpor server (--server): WorkerPools become Deployments of agent pods, ' +
      "Templates are applied to the server, a deleted pool's actors are suspended first",
  )
  .addOption(
    new Option('--engine <engine>', 'k8s, or ack (cluster credentials from Alibaba Cloud ACK)')
      .choices(['k8s', 'kubernetes', 'ack', 'alicloud-k8s'])
      .default('k8s'),
  );
addAckOptions(addAgentOptions(addKubeOptions(controllerCommand))).action(
  async (o: AgentFlags & Record<string, unknown>) => {
    const { ENGINE_ALIASES, startKubeEngine } = await import('../engine/k8s/engine.ts');
    const { ApiControlPlane } = await import('../engine/k8s/api-control.ts');
    const { pino } = await import('pino');
    const engine = ENGINE_ALIASES[String(o.engine)] === 'ack' ? 'ack' : 'k8s';
    const server = program.opts<{ server: string }>().server;
    if (!o.agentBlob) {
      throw new TorporError('INVALID_ARGUMENT', '--agent-blob is required: the blob store URL the server uses', {
        field: 'agent-blob',
      });
    }
    const control = new ApiControlPlane({ url: server });
    const log = pino({ name: 'torpor-controller' });
    const running = await startKubeEngine({
      ...(await kubeEngineSettings(engine, o)),
      agent: agentSettings(o, { serverUrl: server, blobUrl: o.agentBlob }),
      pools: control,
      templates: control,
      log,
    });
    process.stderr.write(`Torpor controller running against ${running.kube.server()} for ${server}\n`);
    stopOnSignal(() => running.stop());
  },
);

// ------------------------------------------------------------------ beyond one machine

/** Runs a long-lived process until SIGINT/SIGTERM, announcing where it listens on stderr. */
async function serveUntilSignal(what: string, start: () => Promise<{ url: string; stop: () => Promise<void> }>) {
  const running = await start();
  process.stderr.write(`Torpor ${what} listening on ${running.url}\n`);
  stopOnSignal(() => running.stop());
}

const serverCommand = program
  .command('server')
  .description(
    'the control API, scheduler and reconciler, over a shared store and blob store (agents register here); with ' +
      '--engine k8s|ack also the Kubernetes controller (WorkerPools become Deployments of agent pods)',
  );
addStoreOption(serverCommand, { required: true });
addBlobOption(serverCommand, { required: true });
serverCommand
  .option('--host <host>', 'address to listen on (agents must reach it)', '127.0.0.1')
  .option('--port <port>', 'API port (0 = any free port)', '7070')
  .option('--agent-token <token>', 'token agents and this server present to each other (or TORPOR_AGENT_TOKEN)')
  .option('--agent-token-file <file>', 'read the agent token from this file')
  .option('--data-dir <dir>', 'image cache', '/var/lib/torpor/server')
  .option('--worker-lease <seconds>', 'a node whose agent has not renewed its lease for this long is lost', '15')
  .option('--reconcile-interval <ms>', 'how often the reconciler runs', '2000')
  .option('--id <id>', "this server's identity, unique among servers: a restart with the same id resumes its leases");
addAckOptions(
  addAgentOptions(
    addKubeOptions(
      addEngineOptions(
        serverCommand,
        SERVER_ENGINE_CHOICES,
        'local (agents started by hand register here), k8s (a Kubernetes cluster: pools, templates), ack (Alibaba ' +
          'Cloud ACK)',
      ),
    ),
  ),
).action(
  async (
    o: AgentFlags & {
      store: string;
      blob: string;
      host: string;
      port: string;
      agentToken?: string;
      agentTokenFile?: string;
      dataDir: string;
      workerLease: string;
      reconcileInterval: string;
      id?: string;
      engine: string;
      scheduleType?: string;
    },
  ) => {
    const { server, agentToken } = await import('./distributed.ts');
    const { ENGINE_ALIASES } = await import('../engine/k8s/engine.ts');
    const engine = ENGINE_ALIASES[o.scheduleType ?? o.engine];
    const kube =
      engine === 'k8s' || engine === 'ack'
        ? {
            ...(await kubeEngineSettings(engine, o as unknown as Record<string, unknown>)),
            agent: (serverUrl: string, blobUrl: string) => agentSettings(o, { serverUrl, blobUrl }),
          }
        : undefined;
    await serveUntilSignal('server', () =>
      server({
        store: o.store,
        blob: o.blob,
        host: o.host,
        port: integerFlag('port', o.port, 0, 65535),
        agentToken: agentToken(o.agentToken, o.agentTokenFile, 'agent-token'),
        dataDir: o.dataDir,
        workerLeaseMs: integerFlag('worker-lease', o.workerLease, 1, 3600) * 1000,
        reconcileMs: integerFlag('reconcile-interval', o.reconcileInterval, 50, 3_600_000),
        ...(o.id ? { id: o.id } : {}),
        ...(kube ? { kube } : {}),
      }),
    );
  },
);

const agentCommand = program
  .command('agent')
  .description(
    "a node agent: runs this node's workers, registered with the server given by --server (run it in the node's " +
      'namespace, or with --network pod in a Kubernetes pod)',
  );
addBlobOption(agentCommand, { required: true, note: 'the same as the server’s' });
agentCommand
  .option('--token <token>', 'the agent token (or TORPOR_AGENT_TOKEN)')
  .option('--token-file <file>', 'read the agent token from this file')
  .requiredOption('--node <name>', 'node name (DNS-1123 label, unique)')
  .option('--workers <n>', 'worker slots', '2')
  .option('--runtime <class>', 'the runtime class of the worker slots: gvisor | microvm (or TORPOR_RUNTIME)')
  .option(
    '--network <mode>',
    "node: run in the node's namespace torpor-node<network-base>; pod: this namespace is the node (a pod), workers " +
      'are reached at the --listen address (default $POD_IP:7071) on ports 20000+2·index (and +1)',
    'node',
  )
  .option('--network-base <n>', "the node's network index: namespace torpor-node<n>, workers n…n+workers-1", '0')
  .option('--listen <addr:port>', "agent API address (default: the node's address, port 7071)")
  .option('--data-dir <dir>', 'where this node keeps checkpoints, caches and logs', '/var/lib/torpor/agent')
  .option('--runsc <path>', 'runsc binary (default: the asset built by scripts/setup.sh)')
  .option('--assets <file>', "the pool's runtime asset sets (YAML; `torpor assets stage` prints one; or TORPOR_ASSETS)")
  .option(
    '--drain-timeout <seconds>',
    'on SIGTERM, how long to wait for the running actors to be suspended before exiting (0: no drain)',
    '60',
  )
  .option(CHUNK_CACHE_FLAG, CHUNK_CACHE_HELP)
  .action(
    async (o: {
      drainTimeout: string;
      chunkCacheMib?: string;
      token?: string;
      tokenFile?: string;
      node: string;
      workers: string;
      runtime?: string;
      network: string;
      networkBase: string;
      blob: string;
      listen?: string;
      dataDir: string;
      runsc?: string;
      assets?: string;
    }) => {
      const { agent, agentToken, agentPodSettings } = await import('./distributed.ts');
      const { dnsLabel, parse } = await import('../core/schemas.ts');
      await serveUntilSignal(`agent ${o.node}`, () =>
        agent({
          server: program.opts<{ server: string }>().server,
          token: agentToken(o.token, o.tokenFile, 'token'),
          node: parse(dnsLabel, o.node, 'node'),
          workers: integerFlag('workers', o.workers, 1, 64),
          networkBase: integerFlag('network-base', o.networkBase, 0, 255),
          blob: o.blob,
          dataDir: o.dataDir,
          drainTimeoutMs: integerFlag('drain-timeout', o.drainTimeout, 0, 86_400) * 1000,
          ...agentPodSettings(o, process.env),
          ...(o.runsc ? { runsc: o.runsc } : {}),
          ...chunkCacheSetting(o.chunkCacheMib),
        }),
      );
    },
  );

const routerCommand = program
  .command('router')
  .description('the resume-on-request proxy, over a shared store; resumes and suspends through --server');
addStoreOption(routerCommand, { required: true, note: 'the same as the server’s' });
routerCommand
  .option('--host <host>', 'address to listen on', '127.0.0.1')
  .option('--port <port>', 'router port (0 = any free port)', '7080');
withRouterOptions(routerCommand).action(async (o: RouterFlags & { store: string; host: string; port: string }) => {
  const { router } = await import('./distributed.ts');
  await serveUntilSignal('router', () =>
    router({
      store: o.store,
      server: program.opts<{ server: string }>().server,
      host: o.host,
      port: integerFlag('port', o.port, 0, 65535),
      ...routerSettings(o),
    }),
  );
});

program
  .command('node-net <action>')
  .description("create|delete a node's network namespace on this machine (for a torpor agent) and the host's routes")
  .requiredOption('--network-base <n>', "the node's network index (as given to torpor agent)")
  .option('--workers <n>', 'worker slots of the agent (as given to torpor agent)', '2')
  .action(async (action: string, o: { networkBase: string; workers: string }) => {
    if (action !== 'create' && action !== 'delete') {
      throw new TorporError('INVALID_ARGUMENT', 'node-net: the action is create or delete', { field: 'action' });
    }
    const { nodeNet } = await import('./distributed.ts');
    const base = integerFlag('network-base', o.networkBase, 0, 255);
    const namespace = await nodeNet(action, base, integerFlag('workers', o.workers, 1, 256 - base));
    console.log(action === 'create' ? `/var/run/netns/${namespace}` : `deleted ${namespace}`);
  });

// ------------------------------------------------------------------ templates

program
  .command('doctor')
  .description('for each runtime: usable on this machine, and why not (runsc version, QEMU, KVM probe boot, …)')
  .option('--runsc <path>', 'runsc binary to check')
  .action(async (o: { runsc?: string }) => {
    const { checkRuntimes } = await import('./doctor.ts');
    const checks = await checkRuntimes(o.runsc ? { runsc: o.runsc } : {});
    if (format() === 'json') return console.log(JSON.stringify(checks, null, 2));
    if (format() === 'yaml') return console.log(stringifyYaml(checks).trimEnd());
    for (const c of checks) {
      const name = c.vmm ? `${c.runtime} (${c.vmm})` : c.runtime;
      console.log(`${c.usable ? 'ok  ' : 'no  '} ${name.padEnd(28)} ${c.detail}`);
    }
  });

const template = program.command('template').description('manage templates');
template
  .command('apply')
  .requiredOption('-f, --file <file>', 'template file (YAML or JSON)')
  .action(async (o: { file: string }) =>
    print('template', await client().call('POST', '/v1/templates', readTemplateFile(o.file))),
  );
template
  .command('get <name>')
  .action(async (name: string) =>
    print('template', await client().call('GET', `/v1/templates/${encodeURIComponent(name)}`)),
  );
template.command('list').action(async () => print('template', await client().call('GET', '/v1/templates')));

// ------------------------------------------------------------------ actors

const spaceOption = () => new Option('-s, --space <space>', 'space').default(DEFAULT_SPACE);
const actor = program.command('actor').description('manage actors');

function labels(list: string[] | undefined): Record<string, string> {
  const out: Record<string, string> = {};
  for (const kv of list ?? []) {
    const eq = kv.indexOf('=');
    if (eq <= 0) throw new TorporError('INVALID_ARGUMENT', `label "${kv}" must be key=value`, { field: 'labels' });
    out[kv.slice(0, eq)] = kv.slice(eq + 1);
  }
  return out;
}

actor
  .command('create <name>')
  .requiredOption('-t, --template <template>', 'template name')
  .option('-l, --label <key=value...>', 'labels')
  .addOption(spaceOption())
  .action(async (name: string, o: { template: string; space: string; label?: string[] }) => {
    const body = { name, template: o.template, labels: labels(o.label) };
    print('actor', await client().call('POST', `/v1/spaces/${encodeURIComponent(o.space)}/actors`, body));
  });
actor
  .command('get <name>')
  .addOption(spaceOption())
  .action(async (name: string, o: { space: string }) =>
    print('actor', await client().call('GET', actorPath(o.space, name))),
  );
actor
  .command('describe <name>')
  .description('the actor, and its recent operations with per-phase timings')
  .addOption(spaceOption())
  .action(async (name: string, o: { space: string }) => {
    const api = client();
    const found = (await api.call('GET', actorPath(o.space, name))) as Actor;
    const query = `?space=${encodeURIComponent(o.space)}&actor=${encodeURIComponent(name)}&limit=20`;
    const recent = ((await api.call('GET', `/v1/operations${query}`)) as { items: Operation[] }).items;
    // The record's lastOperation is durable; the list is what this server saw since it started.
    const last = found.lastOperation;
    const operations = last && !recent.some((op) => op.startedAt === last.startedAt) ? [...recent, last] : recent;
    const description = { actor: found, operations: operations.reverse() };
    const f = format();
    console.log(
      f === 'table' ? describeActor(description.actor, description.operations) : render('actor', description, f),
    );
  });
actor
  .command('list')
  .option('-s, --space <space>', 'space (default: every space)')
  .action(async (o: { space?: string }) => {
    const path = o.space ? `/v1/spaces/${encodeURIComponent(o.space)}/actors` : '/v1/actors';
    print('actor', await client().call('GET', path));
  });
actor
  .command('resume <name>')
  .option('-w, --worker <id>', 'resume on exactly this worker')
  .addOption(spaceOption())
  .action(async (name: string, o: { space: string; worker?: string }) => {
    const api = client();
    const body = o.worker ? { worker: o.worker } : {};
    const path = actorPath(o.space, name);
    const resumed = await withTransferProgress(api.server, path, `resuming ${name}`, () =>
      api.call('POST', `${path}/resume`, body),
    );
    print('actor', resumed);
  });
actor
  .command('suspend <name>')
  .addOption(spaceOption())
  .action(async (name: string, o: { space: string }) => {
    const api = client();
    const path = actorPath(o.space, name);
    const suspended = await withTransferProgress(api.server, path, `suspending ${name}`, () =>
      api.call('POST', `${path}/suspend`, {}),
    );
    print('actor', suspended);
  });
actor
  .command('pause <name>')
  .addOption(spaceOption())
  .action(async (name: string, o: { space: string }) =>
    print('actor', await client().call('POST', actorPath(o.space, name, 'pause'), {})),
  );
actor
  .command('fork <name>')
  .requiredOption('--name <new>', 'name of the new actor')
  .addOption(spaceOption())
  .action(async (name: string, o: { space: string; name: string }) =>
    print('actor', await client().call('POST', actorPath(o.space, name, 'fork'), { name: o.name })),
  );
actor
  .command('url <name>')
  .description("print the running actor's URL (for curl)")
  .addOption(spaceOption())
  .action(async (name: string, o: { space: string }) => {
    const a = await client().call<{ status: string; address?: string }>('GET', actorPath(o.space, name));
    if (!a.address) {
      throw new TorporError('FAILED_PRECONDITION', `actor is ${a.status}; resume it first`, { field: 'status' });
    }
    console.log(`http://${a.address}`);
  });
actor
  .command('delete <name>')
  .addOption(spaceOption())
  .action(async (name: string, o: { space: string }) => {
    await client().call('DELETE', actorPath(o.space, name));
    console.log(`actor "${o.space}/${name}" deleted`);
  });
actor
  .command('exec <name> <command...>')
  .description('run a command in a running actor: torpor actor exec NAME -- CMD ARGS')
  .option('--timeout <seconds>', 'timeout', '60')
  .addOption(spaceOption())
  .action(async (name: string, command: string[], o: { space: string; timeout: string }) => {
    const result = await client().call<{ exitCode: number; stdout: string; stderr: string }>(
      'POST',
      actorPath(o.space, name, 'exec'),
      { command, timeoutSeconds: Number(o.timeout) },
    );
    if (format() !== 'table') return console.log(render('actor', result, format()));
    process.stdout.write(result.stdout);
    process.stderr.write(result.stderr);
    process.exitCode = result.exitCode;
  });
actor
  .command('logs <name>')
  .option('-f, --follow', 'keep streaming')
  .addOption(spaceOption())
  .action(async (name: string, o: { space: string; follow?: boolean }) =>
    client().stream(`${actorPath(o.space, name, 'logs')}${o.follow ? '?follow=true' : ''}`, process.stdout),
  );

// ------------------------------------------------------------------ workers and kubectl-style verbs

program
  .command('worker')
  .description('list workers')
  .command('list')
  .action(async () => print('worker', await client().call('GET', '/v1/workers')));

program
  .command('get <kind> [name]')
  .description('kubectl-style: get actors|templates|workers [NAME]')
  .addOption(spaceOption())
  .action(async (kind: string, name: string | undefined, o: { space: string }) => {
    const k = kind.replace(/s$/, '');
    if (k === 'actor')
      return print('actor', await client().call('GET', name ? actorPath(o.space, name) : '/v1/actors'));
    if (k === 'template')
      return print('template', await client().call('GET', name ? `/v1/templates/${name}` : '/v1/templates'));
    if (k === 'worker') return print('worker', await client().call('GET', '/v1/workers'));
    throw new TorporError('INVALID_ARGUMENT', `unknown kind "${kind}": use actors, templates or workers`, {
      field: 'kind',
    });
  });
program
  .command('apply')
  .requiredOption('-f, --file <file>', 'template file')
  .action(async (o: { file: string }) =>
    print('template', await client().call('POST', '/v1/templates', readTemplateFile(o.file))),
  );
program
  .command('delete <kind> <name>')
  .addOption(spaceOption())
  .action(async (kind: string, name: string, o: { space: string }) => {
    if (kind.replace(/s$/, '') !== 'actor') {
      throw new TorporError('NOT_SUPPORTED', `deleting ${kind} is not supported (templates are immutable)`, {
        field: 'kind',
      });
    }
    await client().call('DELETE', actorPath(o.space, name));
    console.log(`actor "${o.space}/${name}" deleted`);
  });

// ------------------------------------------------------------------ runtime assets and images (this machine)

const assets = program.command('assets').description('build and stage runtime asset sets (on this machine)');
assets
  .command('build <runtime>')
  .description('assemble gvisor (runsc) or microvm (kernel, initrd, qemu, bios) assets from Debian packages')
  .option('--out <dir>', 'where to put them (default: /var/cache/torpor/assets, …/assets/microvm)')
  .action(async (runtime: string, o: { out?: string }) => {
    const { buildAssets, runtimeOf } = await import('./assets.ts');
    const built = await buildAssets(runtimeOf(runtime), o.out);
    if (format() !== 'table') return print('asset', built.set);
    print('asset', { items: built.assets });
    process.stderr.write(`asset set: ${built.file}\n`);
  });
assets
  .command('stage <set>')
  .description('copy a set (gvisor, microvm: the built one; or a set file) to <name>-<sha256> files; print its YAML')
  .requiredOption('--to <url>', 'file://DIR or s3://bucket/prefix[?endpoint=URL&region=R&pathStyle=true]')
  .option('--secret-ref <ref>', 's3: where nodes find "accessKeyId:secretAccessKey" (env:NAME or file:/path)')
  .option('--cache <dir>', 'where sources are fetched and verified first', '/var/cache/torpor/asset-cache')
  .action(async (what: string, o: { to: string; cache: string; secretRef?: string }) => {
    const { stageAssets } = await import('./assets.ts');
    const staged = await stageAssets(what, o.to, o.cache, o.secretRef);
    print('asset', staged, format() === 'table' ? 'yaml' : format());
  });

program
  .command('image')
  .description('OCI images (on this machine)')
  .command('pull <ref>')
  .description("pull an image into this node's cache (registry layers, then the unpacked rootfs)")
  .option('--data-dir <dir>', "the node's data directory (as for torpor up)", '/var/lib/torpor')
  .action(async (ref: string, o: { dataDir: string }) => {
    const { pullImage } = await import('./image.ts');
    print('image', await pullImage(ref, o.dataDir));
  });

program.parseAsync(process.argv).catch((err: unknown) => {
  const e = asTorporError(err);
  process.stderr.write(`error: ${e.code}: ${e.message}\n`);
  process.exit(1);
});
