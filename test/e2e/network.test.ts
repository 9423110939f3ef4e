// Per-activation networking against real runsc, nftables and network namespaces, on two nodes (each its own
// namespace): the actor keeps its address (169.254.17.2) and in-memory state across a move between nodes,
// egress policies are enforced, and create/resume/suspend/delete cycles leave nothing behind.
import assert from 'node:assert/strict';
import { type ChildProcess, execFileSync, spawn } from 'node:child_process';
import { readdir } from 'node:fs/promises';
import { createServer, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { counterImage } from '../fixtures/images.ts';
import { gvisorSkipReason, startTorpor, type Torpor } from './harness.ts';

const BASE = 70;
const NODE0 = `torpor-node${BASE}`;
const NODE1 = `torpor-node${BASE + 1}`;
/** A network outside the node (the "internet"), attached to node 0 only, with a fake metadata service. */
const OUTSIDE = `torpor-outside${BASE}`;
const OUTSIDE_ADDRESS = `198.18.${BASE}.2`;
const METADATA = '169.254.169.254';
/** The namespaces this Torpor makes: two nodes, one worker each, and each worker's activation interior. */
const OURS = new RegExp(`^torpor-(node|net)(${BASE}|${BASE + 1})(-actor)?$`);

const skip = gvisorSkipReason() ?? nftSkipReason();

function nftSkipReason(): string | undefined {
  try {
    execFileSync('nft', ['--version'], { stdio: 'ignore' });
    return undefined;
  } catch {
    return 'nft (nftables) is not installed: run scripts/setup.sh';
  }
}

interface Actor {
  name: string;
  status: string;
  worker?: string;
  node?: string;
  address?: string;
}

function sh(program: string, args: string[]): string {
  return execFileSync(program, args, { encoding: 'utf8' });
}

describe('per-activation networking on two nodes (gVisor, nftables)', { skip }, () => {
  let t: Torpor;
  let image: string;
  let outsideServer: ChildProcess | undefined;
  let hostServer: Server;
  let hostPort: number;

  async function api<T>(method: string, path: string, body?: unknown): Promise<T> {
    const res = await fetch(`${t.url}${path}`, {
      method,
      ...(body !== undefined ? { headers: { 'content-type': 'application/json' }, body: JSON.stringify(body) } : {}),
    });
    const text = await res.text();
    assert.ok(res.ok, `${method} ${path}: ${res.status} ${text}`);
    return (text ? JSON.parse(text) : undefined) as T;
  }

  async function template(name: string, egress: unknown): Promise<void> {
    await api('POST', '/v1/templates', {
      name,
      image,
      port: 8080,
      readiness: { path: '/healthz', timeoutSeconds: 20 },
      resources: { memoryMiB: 64, vcpus: 1 },
      network: { egress },
    });
  }

  const actorPath = (name: string) => `/v1/spaces/default/actors/${name}`;

  async function exec(name: string, command: string[]): Promise<{ exitCode: number; stdout: string }> {
    return api('POST', `${actorPath(name)}/exec`, { command, timeoutSeconds: 20 });
  }

  /** Whether the actor gets an HTTP answer from host:port (busybox nc; every refusal here is an ICMP reject, so
   * the 3 s timeout only matters when something is broken). */
  async function reaches(name: string, target: string): Promise<boolean> {
    const [host, port] = target.split(':');
    const request = `printf 'GET / HTTP/1.0\\r\\n\\r\\n' | /bin/busybox nc -w 3 ${host} ${port}`;
    const r = await exec(name, ['/bin/busybox', 'sh', '-c', request]);
    return r.exitCode === 0 && r.stdout.includes('reached');
  }

  before(async () => {
    image = await counterImage();
    t = await startTorpor({ workers: 1, networkBase: BASE, args: ['--nodes', '2'] });
    // Outside world: a namespace behind node 0 holding a plain address and the metadata address.
    sh('ip', ['netns', 'add', OUTSIDE]);
    sh('ip', ['-n', NODE0, 'link', 'add', 'outside', 'type', 'veth', 'peer', 'name', 'eth0', 'netns', OUTSIDE]);
    sh('ip', ['-n', NODE0, 'addr', 'add', `198.18.${BASE}.1/24`, 'dev', 'outside']);
    sh('ip', ['-n', NODE0, 'link', 'set', 'outside', 'up']);
    sh('ip', ['-n', NODE0, 'route', 'add', `${METADATA}/32`, 'via', OUTSIDE_ADDRESS]);
    sh('ip', ['-n', OUTSIDE, 'addr', 'add', `${OUTSIDE_ADDRESS}/24`, 'dev', 'eth0']);
    sh('ip', ['-n', OUTSIDE, 'addr', 'add', `${METADATA}/32`, 'dev', 'lo']);
    sh('ip', ['-n', OUTSIDE, 'link', 'set', 'eth0', 'up']);
    sh('ip', ['-n', OUTSIDE, 'link', 'set', 'lo', 'up']);
    sh('ip', ['-n', OUTSIDE, 'route', 'add', 'default', 'via', `198.18.${BASE}.1`]);
    const serve =
      "for (const p of [80, 81]) require('http').createServer((q, s) => s.end('reached ' + p)).listen(p, '0.0.0.0')";
    outsideServer = spawn('nsenter', [`--net=/var/run/netns/${OUTSIDE}`, process.execPath, '-e', serve], {
      stdio: 'ignore',
    });
    // A service on the host (the node's own machine), on every address.
    hostServer = createServer((_q, s) => s.end('reached host'));
    await new Promise<void>((r) => hostServer.listen(0, '0.0.0.0', r));
    hostPort = (hostServer.address() as AddressInfo).port;
  });

  after(async () => {
    outsideServer?.kill();
    hostServer?.close();
    try {
      execFileSync('ip', ['netns', 'del', OUTSIDE], { stdio: 'ignore' });
    } catch {}
    await t?.stop();
  });

  test('a TCP server in the actor keeps its port, its memory and its address across a move to the other node', async () => {
    await template('net-counter', 'allow-all');
    await api('POST', '/v1/spaces/default/actors', { name: 'mover', template: 'net-counter' });
    const first = await api<Actor>('POST', `${actorPath('mover')}/resume`, { worker: 'node0-w0' });
    assert.equal(first.node, 'node0');
    const count = async (a: Actor) => (await (await fetch(`http://${a.address}/`)).text()).trim();
    assert.deepEqual([await count(first), await count(first)], ['1', '2']);
    const inside = async () => (await exec('mover', ['/bin/busybox', 'ip', '-4', '-o', 'addr', 'show', 'eth0'])).stdout;
    const route = async () => (await exec('mover', ['/bin/busybox', 'ip', 'route'])).stdout;
    const addressBefore = await inside();
    assert.match(addressBefore, /inet 169\.254\.17\.2\/30/);
    assert.match(await route(), /default via 169\.254\.17\.1/);

    await api('POST', `${actorPath('mover')}/suspend`);
    const moved = await api<Actor>('POST', `${actorPath('mover')}/resume`, { worker: 'node1-w0' });
    assert.equal(moved.node, 'node1');
    assert.notEqual(moved.address, first.address, 'another worker, another worker address');
    assert.equal(moved.address?.split(':')[1], first.address?.split(':')[1], 'the same port');
    assert.equal(await count(moved), '3', 'in-memory state survived the move');
    assert.equal(await inside(), addressBefore, 'no re-addressing inside the actor');
    assert.match(await route(), /default via 169\.254\.17\.1/);
    await api('POST', `${actorPath('mover')}/suspend`);
    await api('DELETE', actorPath('mover'));
  });

  test('egress: deny-all blocks, an allowed CIDR and port gets through, metadata and node addresses are refused', async () => {
    const outside = (port: number) => `${OUTSIDE_ADDRESS}:${port}`;
    const metadata = `${METADATA}:80`;
    const host = `10.214.${BASE}.1:${hostPort}`;
    const policies: [string, unknown][] = [
      ['deny-all', 'deny-all'],
      ['allow-list', { allow: [{ cidr: `${OUTSIDE_ADDRESS}/32`, ports: [80] }] }],
      ['allow-all', 'allow-all'],
      ['metadata-allowed', { allow: [{ cidr: '0.0.0.0/0' }, { cidr: `${METADATA}/32`, ports: [80] }] }],
    ];
    const seen: Record<string, Record<string, boolean>> = {};
    for (const [name, egress] of policies) {
      await template(`egress-${name}`, egress);
      await api('POST', '/v1/spaces/default/actors', { name: `e-${name}`, template: `egress-${name}` });
      await api('POST', `${actorPath(`e-${name}`)}/resume`, { worker: 'node0-w0' });
      seen[name] = {
        outside80: await reaches(`e-${name}`, outside(80)),
        outside81: await reaches(`e-${name}`, outside(81)),
        metadata: await reaches(`e-${name}`, metadata),
        host: await reaches(`e-${name}`, host),
      };
      await api('DELETE', actorPath(`e-${name}`));
    }
    assert.deepEqual(seen, {
      'deny-all': { outside80: false, outside81: false, metadata: false, host: false },
      'allow-list': { outside80: true, outside81: false, metadata: false, host: false },
      'allow-all': { outside80: true, outside81: true, metadata: false, host: false },
      // Only a rule naming the metadata address opens it; 0.0.0.0/0 still does not open the host.
      'metadata-allowed': { outside80: true, outside81: true, metadata: true, host: false },
    });
  });

  test('100 create/resume/suspend/delete cycles leave no namespace, link, nft rule or runtime state behind', async () => {
    const before = await networkState(t);
    for (let i = 0; i < 100; i++) {
      const name = `cycle-${i}`;
      await api('POST', '/v1/spaces/default/actors', { name, template: 'net-counter' });
      await api('POST', `${actorPath(name)}/resume`, { worker: i % 2 === 0 ? 'node0-w0' : 'node1-w0' });
      await api('POST', `${actorPath(name)}/suspend`);
      await api('DELETE', actorPath(name));
    }
    // Teardown runs in the background after a suspend: wait until every worker is free again.
    for (let i = 0; i < 50; i++) {
      const workers = await api<{ items: { state: string }[] }>('GET', '/v1/workers');
      if (workers.items.every((w) => w.state === 'free')) break;
      await new Promise((r) => setTimeout(r, 100));
    }
    await new Promise((r) => setTimeout(r, 2000));
    assert.deepEqual(await networkState(t), before);
  });

  test('stopping Torpor removes every namespace, link, route and nft table it made', async () => {
    await t.stop();
    const namespaces = sh('ip', ['netns', 'list'])
      .split('\n')
      .map((l) => l.split(' ')[0] ?? '')
      .filter((n) => OURS.test(n));
    assert.deepEqual(namespaces, []);
    assert.doesNotMatch(sh('ip', ['-o', 'link']), new RegExp(`tn${BASE}h|tn${BASE + 1}h`));
    assert.doesNotMatch(sh('ip', ['route']), new RegExp(`10\\.213\\.${BASE}\\.|10\\.213\\.${BASE + 1}\\.`));
    assert.doesNotMatch(sh('nft', ['list', 'tables']), new RegExp(`${NODE0}|${NODE1}`));
  });
});

/** Everything the activations could leave behind: namespaces, their links and nft rules, and runsc state. */
async function networkState(t: Torpor): Promise<Record<string, string>> {
  const state: Record<string, string> = {};
  const namespaces = sh('ip', ['netns', 'list'])
    .split('\n')
    .map((l) => l.split(' ')[0] ?? '')
    .filter((n) => OURS.test(n))
    .sort();
  state.namespaces = namespaces.join(' ');
  for (const ns of namespaces) {
    state[`${ns} links`] = sh('ip', ['-n', ns, '-o', 'link'])
      .split('\n')
      .map((l) => l.replace(/^\d+: /, '').split(/[:@]/)[0])
      .sort()
      .join(' ');
    state[`${ns} nft`] = sh('nsenter', [`--net=/var/run/netns/${ns}`, 'nft', 'list', 'ruleset']);
  }
  state.hostLinks = sh('ip', ['-o', 'link'])
    .split('\n')
    .map((l) => l.replace(/^\d+: /, '').split(/[:@]/)[0])
    .filter((l) => l === `tn${BASE}h` || l === `tn${BASE + 1}h`)
    .sort()
    .join(' ');
  const runscRoots = join(t.dataDir, 'nodes');
  const runsc: string[] = [];
  for (const node of await readdir(runscRoots)) {
    for (const worker of await readdir(join(runscRoots, node, 'workers'))) {
      const root = join(runscRoots, node, 'workers', worker, 'runsc');
      runsc.push(`${worker}: ${(await readdir(root).catch(() => [])).sort().join(',')}`);
    }
  }
  state.runsc = runsc.join('; ');
  return state;
}
