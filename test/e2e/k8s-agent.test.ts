// Worker pods for real, without a kubelet: `torpor server --engine k8s` (SQLite store, directory blob store) runs
// as a process, its in-process controller rendering a WorkerPool's Deployment in a real kube-apiserver; a
// stand-in kubelet takes that pod template and runs exactly its command and environment (POD_NAME, POD_IP, the
// bootstrap token from the Secret) as a `torpor agent` in a network namespace of its own, as a pod would have:
// unnamed as far as the agent knows (no torpor-node<N>), with one address (the pod IP) and no route from the host
// to the workers' subnets, so the actor is reached at the pod IP or not at all. The agent registers with the
// server under its pod's name, the pool reports its worker, an actor runs on it and answers at POD_IP:port and
// through a router, and deleting the pool suspends the actor through the server before the pool goes.
//
// Needs a torpor with `agent` and `router` (the distributed commands): this checkout's, or TORPOR_CLI=path/to/bin/
// torpor.js (the server always runs from this checkout). `torpor controller` as a process of its own: k8s.test.ts.
import assert from 'node:assert/strict';
import { type ChildProcess, execFile, execFileSync, spawn } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { existsSync } from 'node:fs';
import { mkdir, mkdtemp, rm, writeFile } from 'node:fs/promises';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { promisify } from 'node:util';
import type { Actor } from '../../src/core/types.ts';
import { resourcePath } from '../../src/engine/k8s/kube.ts';
import { deploymentName } from '../../src/engine/k8s/render.ts';
import { API_VERSION } from '../../src/engine/k8s/resources.ts';
import { locateMicrovm } from '../../src/runtime/microvm/locate.ts';
import { startStandIn } from '../engine/ack/alicloud-standin.ts';
import { eventually, installCrds, type RunningKube, startKube } from '../engine/k8s/kube-helpers.ts';
import { counterImage } from '../fixtures/images.ts';
import { gvisorSkipReason } from './harness.ts';

const run = promisify(execFile);
const BIN = join(import.meta.dirname, '..', '..', 'bin', 'torpor.js');
const CLI = process.env.TORPOR_CLI ?? BIN;
/** The stand-in pod's network index (its workers' namespaces torpor-net232…, subnets 10.213.232.x). */
const BASE = 232;
/** The stand-in pod's network namespace, linked to this host by a veth pair (POD_LINK here, eth0 in the pod). */
const POD_NETNS = `tpod${BASE}`;
const POD_LINK = `tp${BASE}h`;
const POD_GATEWAY = `10.214.${BASE}.1`;
const POD_IP = `10.214.${BASE}.2`;
/** The server's address on this host, reachable from the pod's namespace through its uplink. */
const CONTROL = `10.214.${BASE}.254`;
const NS = 'default';

function cliSkipReason(): string | undefined {
  // The command list of `torpor --help`: each command at the start of a line, indented by two spaces.
  const help = execFileSync(process.execPath, [CLI, '--help'], { encoding: 'utf8' });
  for (const command of ['agent', 'router']) {
    if (!new RegExp(`^ {2}${command} `, 'm').test(help)) {
      return `${CLI} has no \`torpor ${command}\` yet (the distributed commands); set TORPOR_CLI to one that has`;
    }
  }
  return undefined;
}

const early = gvisorSkipReason() ?? cliSkipReason();
const started = early ?? (await startKube());
const skip = typeof started === 'string' ? started : false;
const k = typeof started === 'string' ? undefined : started;

async function freePort(host: string): Promise<number> {
  const server = createServer();
  await new Promise<void>((r) => server.listen(0, host, r));
  const port = (server.address() as { port: number }).port;
  await new Promise((r) => server.close(r));
  return port;
}

class Proc {
  readonly child: ChildProcess;
  output = '';
  constructor(program: string, args: string[], env: NodeJS.ProcessEnv = {}) {
    this.child = spawn(program, args, { stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, ...env } });
    this.child.stdout?.on('data', (d: Buffer) => (this.output += d));
    this.child.stderr?.on('data', (d: Buffer) => (this.output += d));
  }
  async stop(): Promise<void> {
    if (this.child.exitCode !== null || this.child.signalCode !== null) return;
    const exited = new Promise((r) => this.child.once('exit', r));
    this.child.kill('SIGTERM');
    await Promise.race([exited, new Promise((r) => setTimeout(r, 30_000).unref())]);
    if (this.child.exitCode === null) this.child.kill('SIGKILL');
  }
}

interface Container {
  command: string[];
  env?: {
    name: string;
    value?: string;
    valueFrom?: { fieldRef?: { fieldPath: string }; secretKeyRef?: { name: string; key: string } };
  }[];
  volumeMounts?: { name: string; mountPath: string }[];
}

/** The stand-in pod's network: a namespace with the pod IP on eth0 and a default route to this host, which routes
 * only the pod's /30 to it (as a cluster network routes only pod IPs). */
async function makePodNetns(): Promise<void> {
  await run('ip', ['netns', 'del', POD_NETNS]).catch(() => undefined);
  await run('ip', ['link', 'del', POD_LINK]).catch(() => undefined);
  await run('ip', ['netns', 'add', POD_NETNS]);
  const batch = async (netns: string | undefined, commands: string[]) => {
    const child = execFile('ip', netns ? ['-n', netns, '-batch', '-'] : ['-batch', '-']);
    child.stdin?.end(`${commands.join('\n')}\n`);
    const code = await new Promise((r) => child.once('exit', r));
    assert.equal(code, 0, `ip ${commands[0]}`);
  };
  await batch(undefined, [
    `link add ${POD_LINK} type veth peer name eth0 netns ${POD_NETNS}`,
    `addr add ${POD_GATEWAY}/30 dev ${POD_LINK}`,
    `link set ${POD_LINK} up`,
  ]);
  await batch(POD_NETNS, [
    'link set lo up',
    `addr add ${POD_IP}/30 dev eth0`,
    'link set eth0 up',
    `route add default via ${POD_GATEWAY}`,
  ]);
}

describe('worker pods run by a stand-in kubelet: torpor agent registers, serves, drains', { skip }, () => {
  let dir: string;
  let serverUrl: string;
  let server: Proc | undefined;
  let agent: Proc | undefined;
  let router: Proc | undefined;
  let routerUrl: string;
  const kube = () => (k as RunningKube).kube;
  const api = async <T>(method: string, path: string, body?: unknown): Promise<T> => {
    const res = await fetch(serverUrl + path, {
      method,
      headers: body === undefined ? {} : { 'content-type': 'application/json' },
      ...(body === undefined ? {} : { body: JSON.stringify(body) }),
    });
    const text = await res.text();
    if (!res.ok) throw new Error(`${method} ${path}: ${res.status} ${text}`);
    return JSON.parse(text) as T;
  };

  /** The stand-in kubelet: the pool's pod object, then its container as a process in the pod's own network
   * namespace (made afresh), with the environment and $(VAR) expansion a kubelet gives it. */
  const startPod = async (pool: string, podName: string): Promise<Proc> => {
    const deployment = await eventually(
      () =>
        kube().get<{
          spec: { template: { metadata: { labels: Record<string, string> }; spec: { containers: Container[] } } };
        }>(resourcePath('apps/v1', 'deployments', NS, deploymentName(pool))),
      30_000,
      'deployment',
    );
    const template = deployment.spec.template;
    await kube().request('POST', resourcePath('v1', 'pods', NS), {
      body: {
        apiVersion: 'v1',
        kind: 'Pod',
        metadata: { name: podName, labels: template.metadata.labels },
        spec: template.spec,
      },
    });
    const container = template.spec.containers[0]!;
    const env: Record<string, string> = {};
    for (const e of container.env ?? []) {
      if (e.value !== undefined) env[e.name] = e.value;
      else if (e.valueFrom?.fieldRef?.fieldPath === 'metadata.name') env[e.name] = podName;
      else if (e.valueFrom?.fieldRef?.fieldPath === 'status.podIP') env[e.name] = POD_IP;
      else if (e.valueFrom?.secretKeyRef) {
        const ref = e.valueFrom.secretKeyRef;
        const secret = await kube().get<{ data: Record<string, string> }>(resourcePath('v1', 'secrets', NS, ref.name));
        env[e.name] = Buffer.from(secret!.data[ref.key]!, 'base64').toString('utf8');
      } else assert.fail(`the stand-in kubelet does not know how to set ${e.name}`);
    }
    // $(VAR) as the kubelet expands it; the emptyDir volumes become directories of their own.
    let argv = container.command.map((a) => a.replace(/\$\(([A-Z_]+)\)/g, (_, v: string) => env[v] ?? `$(${v})`));
    for (const m of container.volumeMounts ?? []) {
      const hostDir = join(dir, 'pods', podName, m.name);
      await mkdir(hostDir, { recursive: true });
      argv = argv.map((a) => (a === m.mountPath ? hostDir : a));
    }
    assert.equal(argv[0], 'torpor');
    assert.ok(argv.includes('--network') && argv[argv.indexOf('--network') + 1] === 'pod', 'the pod runs in pod mode');
    await makePodNetns();
    return new Proc(
      'nsenter',
      [`--net=/var/run/netns/${POD_NETNS}`, '--', process.execPath, CLI, ...argv.slice(1)],
      env,
    );
  };

  before(async () => {
    dir = await mkdtemp(join(tmpdir(), 'torpor-k8s-agent-'));
    const token = randomBytes(24).toString('hex');
    const tokenFile = join(dir, 'agent-token');
    await writeFile(tokenFile, token, { mode: 0o600 });
    await installCrds(kube());
    await kube().request('POST', resourcePath('v1', 'secrets', NS), {
      body: { apiVersion: 'v1', kind: 'Secret', metadata: { name: 'torpor-agent-token' }, stringData: { token } },
    });
    await run('ip', ['addr', 'replace', `${CONTROL}/32`, 'dev', 'lo']);
    serverUrl = `http://${CONTROL}:${await freePort(CONTROL)}`;
    const blobs = join(dir, 'blobs');
    server = new Proc(process.execPath, [
      BIN,
      'server',
      ...['--store', `sqlite:${join(dir, 'state.db')}`, '--blob', blobs, '--host', CONTROL],
      ...['--port', new URL(serverUrl).port, '--agent-token-file', tokenFile, '--data-dir', join(dir, 'server')],
      ...['--engine', 'k8s', '--kubeconfig', k!.kubeconfig, '--watch-namespace', NS],
      ...['--agent-network-base', String(BASE), '--agent-image', 'torpor:test'],
    ]);
    // Listening is announced once the controller runs too.
    await eventually(async () => (server!.output.includes('server listening') ? true : undefined), 30_000, 'server');
    routerUrl = `http://127.0.0.1:${await freePort('127.0.0.1')}`;
    router = new Proc(process.execPath, [
      CLI,
      ...['--server', serverUrl, 'router', '--store', `sqlite:${join(dir, 'state.db')}`],
      ...['--host', '127.0.0.1', '--port', new URL(routerUrl).port],
    ]);
    await eventually(async () => (router!.output.includes('router listening') ? true : undefined), 30_000, 'router');
  });

  after(async () => {
    await agent?.stop();
    await router?.stop();
    await server?.stop();
    // What a killed agent leaves behind: its worker's namespaces; then the pod's (its veth pair goes with it).
    for (const ns of [`torpor-net${BASE}-actor`, `torpor-net${BASE}`, POD_NETNS]) {
      await run('ip', ['netns', 'del', ns]).catch(() => undefined);
    }
    await run('ip', ['addr', 'del', `${CONTROL}/32`, 'dev', 'lo']).catch(() => undefined);
    await k?.stop();
    if (dir && !process.env.TORPOR_KEEP_TEST_DIR) await rm(dir, { recursive: true, force: true });
  });

  it('the rendered pod runs as a real agent that registers and hosts an actor', async () => {
    await kube().request('POST', resourcePath(API_VERSION, 'templates', NS), {
      body: {
        apiVersion: API_VERSION,
        kind: 'Template',
        metadata: { name: 'counter' },
        spec: { image: await counterImage(), port: 8080, readiness: { path: '/healthz', timeoutSeconds: 20 } },
      },
    });
    await kube().request('POST', resourcePath(API_VERSION, 'workerpools', NS), {
      body: {
        apiVersion: API_VERSION,
        kind: 'WorkerPool',
        metadata: { name: 'live' },
        spec: { runtime: 'gvisor', replicas: 1, workersPerPod: 1 },
      },
    });
    const podName = 'torpor-pool-live-0';
    agent = await startPod('live', podName);

    const pool = await eventually(
      async () => {
        const p = await kube().get<{ status?: { readyWorkers?: number } }>(
          resourcePath(API_VERSION, 'workerpools', NS, 'live'),
        );
        return p?.status?.readyWorkers === 1 ? p : undefined;
      },
      60_000,
      `the agent registered (agent output: ${agent.output})`,
    );
    assert.equal(pool.status?.readyWorkers, 1);

    await eventually(
      async () => (await api<{ name: string }>('GET', '/v1/templates/counter')).name,
      30_000,
      'template',
    );
    await api('POST', `/v1/spaces/${NS}/actors`, { name: 'a1', template: 'counter' });
    const running = await api<Actor>('POST', `/v1/spaces/${NS}/actors/a1/resume`, {});
    assert.equal(running.status, 'RUNNING');
    assert.equal(running.node, podName, 'the actor runs on the pod’s agent');
    // Reached at the pod's IP, on the worker's pod port (not the template's 8080 on the worker's address).
    const [host, port] = running.address!.split(':');
    assert.equal(host, POD_IP);
    assert.notEqual(port, '8080');
    const worker = await api<{ items: { node: string; host: string }[] }>('GET', '/v1/workers');
    assert.deepEqual(
      worker.items.filter((w) => w.node === podName).map((w) => w.host),
      [POD_IP],
      'the worker is advertised at the pod IP',
    );
    const direct = await fetch(`http://${running.address}/`);
    assert.equal(direct.status, 200, await direct.text());
    const routed = await fetch(`${routerUrl}/`, { headers: { 'x-torpor-actor': `a1.${NS}` } });
    assert.equal(routed.status, 200, await routed.text());
    // Nothing else leads there: the host has no route to the worker's own address.
    const route = await run('ip', ['route', 'get', `10.213.${BASE}.2`]).then(
      (r) => r.stdout,
      () => 'unreachable',
    );
    assert.ok(!route.includes(POD_LINK), `the host routes the worker subnet through the pod: ${route}`);
    // (A connection there leaves by the host's default route: refused, timed out, or answered by whatever is there
    // (this machine's egress proxy says 404), but not by the actor.)
    const stray = await fetch(`http://10.213.${BASE}.2:8080/`, { signal: AbortSignal.timeout(2000) }).then(
      (r) => r.status,
      () => 0,
    );
    assert.notEqual(stray, 200, 'the actor answers at its worker address from the host');
  });

  it('deleting the pool suspends its actor through the server before the pool goes', async () => {
    await kube().request('DELETE', resourcePath(API_VERSION, 'workerpools', NS, 'live'));
    await eventually(
      async () => ((await kube().get(resourcePath(API_VERSION, 'workerpools', NS, 'live'))) ? undefined : true),
      60_000,
      'pool gone',
    );
    const actor = await api<Actor>('GET', `/v1/spaces/${NS}/actors/a1`);
    assert.equal(actor.status, 'SUSPENDED');
    assert.ok(actor.snapshot, 'it has a snapshot to resume from');
  });

  it('a micro-VM pool’s pod runs micro-VM workers (TORPOR_RUNTIME): its actor boots in QEMU, reached at the pod IP', {
    skip: locateMicrovm().missing.join('; ') || false,
  }, async () => {
    // One stand-in pod at a time: the pods of this host share the worker namespace names (their index).
    await agent?.stop();
    await kube().request('POST', resourcePath(API_VERSION, 'templates', NS), {
      body: {
        apiVersion: API_VERSION,
        kind: 'Template',
        metadata: { name: 'vm-counter' },
        spec: {
          image: await counterImage(),
          port: 8080,
          runtime: 'microvm',
          readiness: { path: '/healthz', timeoutSeconds: 60 },
          resources: { memoryMiB: 128, vcpus: 1 },
        },
      },
    });
    await kube().request('POST', resourcePath(API_VERSION, 'workerpools', NS), {
      body: {
        apiVersion: API_VERSION,
        kind: 'WorkerPool',
        metadata: { name: 'vms' },
        spec: { runtime: 'microvm', replicas: 1, workersPerPod: 1 },
      },
    });
    const podName = 'torpor-pool-vms-0';
    agent = await startPod('vms', podName);
    const pod = agent;
    await eventually(
      async () => {
        const p = await kube().get<{ status?: { readyWorkers?: number } }>(
          resourcePath(API_VERSION, 'workerpools', NS, 'vms'),
        );
        return p?.status?.readyWorkers === 1 ? p : undefined;
      },
      120_000,
      `the micro-VM agent registered (agent output: ${pod.output.slice(-2000)})`,
    );
    const workers = await api<{ items: { node: string; runtime: string }[] }>('GET', '/v1/workers');
    assert.deepEqual(
      workers.items.filter((w) => w.node === podName).map((w) => w.runtime),
      ['microvm'],
      'the pod’s worker is a micro-VM one',
    );
    await eventually(
      async () => (await api<{ name: string }>('GET', '/v1/templates/vm-counter')).name,
      30_000,
      'template',
    );
    // The create waits for the template's golden snapshot (a boot and a checkpoint on the pod's worker).
    await api('POST', `/v1/spaces/${NS}/actors`, { name: 'vm1', template: 'vm-counter' });
    const running = await api<Actor>('POST', `/v1/spaces/${NS}/actors/vm1/resume`, {});
    assert.equal(running.node, podName);
    assert.equal(running.address?.split(':')[0], POD_IP);
    const first = await fetch(`http://${running.address}/`);
    assert.equal(first.status, 200);
    const routed = await fetch(`${routerUrl}/`, { headers: { 'x-torpor-actor': `vm1.${NS}` } });
    assert.equal(routed.status, 200);
    assert.equal(Number(await routed.text()), Number(await first.text()) + 1, 'the same in-RAM counter');
    // exec crosses the server and the pod's agent API into the guest's control channel.
    const uname = await api<{ exitCode: number; stdout: string }>('POST', `/v1/spaces/${NS}/actors/vm1/exec`, {
      command: ['/bin/busybox', 'cat', '/proc/version'],
    });
    assert.equal(uname.exitCode, 0, JSON.stringify(uname));
    assert.match(uname.stdout, /^Linux version /, 'the guest kernel answers, through the remote agent');
    // A QEMU process serves it: the micro-VM runtime's, under the pod's data directory.
    const { stdout: ps } = await run('ps', ['-eo', 'args=']);
    const vmm = ps
      .split('\n')
      .filter((line) => line.includes(join(dir, 'pods', podName)) && line.includes('-machine microvm'));
    assert.equal(vmm.length, 1, `one QEMU of the pod's worker: ${ps}`);
    // Stopped, the pod's agent ends cleanly, and its guest RAM directory (tmpfs) goes with its VMs.
    await pod.stop();
    assert.equal(pod.child.exitCode, 0, pod.output.slice(-2000));
    const args = pod.child.spawnargs;
    const podData = resolve(args[args.indexOf('--data-dir') + 1]!);
    const ramDir = `/dev/shm/torpor-${createHash('sha256').update(podData).digest('hex').slice(0, 12)}`;
    assert.equal(existsSync(ramDir), false, `${ramDir} is left behind`);
  });

  it('torpor server --schedule-type alicloud-k8s: ACK credentials, the controller in the server, no secret shown', async () => {
    const secret = randomBytes(24).toString('base64url');
    const standIn = await startStandIn({
      accessKeys: { LTAI5tSrvTestKey: secret },
      clusterId: 'csrv',
      apiServer: k!.server,
      tokens: [k!.token],
      roles: {},
    });
    const ns = 'ack-srv';
    const tokenFile = join(dir, 'agent-token');
    const ack = new Proc(
      process.execPath,
      [
        BIN,
        'server',
        ...['--store', `sqlite:${join(dir, 'ack.db')}`, '--blob', join(dir, 'ack-blobs'), '--port', '0'],
        ...['--agent-token-file', tokenFile, '--data-dir', join(dir, 'ack-server')],
        ...['--schedule-type', 'alicloud-k8s', '--watch-namespace', ns, '--agent-image', 'torpor:ack'],
        ...['--alicloud-region', 'cn-hangzhou', '--alicloud-cluster-id', 'csrv'],
        ...['--alicloud-cs-endpoint', standIn.csEndpoint, '--alicloud-cs-protocol', 'http'],
      ],
      { ALIBABA_CLOUD_ACCESS_KEY_ID: 'LTAI5tSrvTestKey', TORPOR_ALICLOUD_ACCESS_KEY_SECRET: secret },
    );
    try {
      await kube().request('POST', '/api/v1/namespaces', {
        body: { apiVersion: 'v1', kind: 'Namespace', metadata: { name: ns } },
      });
      await kube().request('POST', resourcePath('v1', 'secrets', ns), {
        body: {
          apiVersion: 'v1',
          kind: 'Secret',
          metadata: { name: 'torpor-agent-token' },
          stringData: { token: 't' },
        },
      });
      const url = await eventually(
        async () => /server listening on (\S+)/.exec(ack.output)?.[1],
        60_000,
        `the ACK server (output: ${ack.output})`,
      );
      assert.equal(standIn.issues.length, 1, 'the kubeconfig came from ACK');
      await kube().request('POST', resourcePath(API_VERSION, 'workerpools', ns), {
        body: {
          apiVersion: API_VERSION,
          kind: 'WorkerPool',
          metadata: { name: 'vms' },
          spec: { runtime: 'microvm', replicas: 2, workersPerPod: 1 },
        },
      });
      const deployment = await eventually(
        () =>
          kube().get<{ spec: { replicas: number; template: { spec: { containers: Container[] } } } }>(
            resourcePath('apps/v1', 'deployments', ns, deploymentName('vms')),
          ),
        30_000,
        'the pool’s deployment',
      ).catch(async (err: Error) => {
        const pool = await kube().get(resourcePath(API_VERSION, 'workerpools', ns, 'vms'));
        throw new Error(`${err.message}; pool ${JSON.stringify(pool)}; server output: ${ack.output.slice(-3000)}`);
      });
      assert.equal(deployment.spec.replicas, 2);
      const container = deployment.spec.template.spec.containers[0]!;
      assert.equal(container.command[container.command.indexOf('--server') + 1], url, 'pods register with it');
      assert.equal(container.env?.find((e) => e.name === 'TORPOR_RUNTIME')?.value, 'microvm');
      assert.ok(!ack.output.includes(secret), 'the AccessKey secret is not in the output');
      assert.ok(!ack.output.includes(k!.token), 'the kubeconfig token is not in the output');
    } finally {
      await ack.stop();
      await standIn.close();
    }
  });
});
