// A node's network: its own namespace (as a machine or a Kubernetes node would have), linked to this host by a
// veth pair. The host routes each of the node's worker subnets to it; the node routes them on to the workers'
// namespaces and masquerades their egress behind its own address. Several nodes on one machine each get one,
// so moving an actor between nodes crosses a real network boundary.
//
// With `self`, the calling process already lives in the node's namespace (a `torpor agent` started there by
// whoever made the namespace, e.g. `torpor node-net create` + nsenter): the node then sets up only its own side
// (forwarding, masquerade) and leaves the namespace, the host's link and the host's routes to their maker.
//
// With `pod`, the calling process's own network namespace is the node, whatever its name (a Kubernetes pod's has
// none): nothing is checked or made but the node's side, and as only the pod's address is routable in a cluster,
// each worker is exposed at that address on ports of its own (workerPodPorts), DNAT-ed to the worker's address.
import { stat } from 'node:fs/promises';
import { TorporError } from '../core/errors.ts';
import { run } from '../sys/run.ts';
import { deleteLink, deleteNetns, deleteTable, ensureNetns, ip, netnsPath, nft, sysctl } from './netns.ts';

export interface NodeNetworkOptions {
  /** Small integer unique on this machine (0..255): picks the namespace, the link names and the /30. */
  index: number;
  /** This process runs inside the node's namespace, made by someone else (see above). */
  self?: boolean;
  /** This process's namespace is the node (a pod): workers are exposed at `address` (the pod's IP). */
  pod?: { address: string };
}

/** The worker subnets (one /30 per worker: see WorkerNetwork). */
const WORKER_RANGE = '10.213.0.0/16';
/** The worker-side links of a node are named tq<index>h (see WorkerNetwork). */
const WORKER_LINKS = 'tq*';
/** In pod mode, worker `index` is reached at the pod's address on ports POD_PORT_BASE + 2·index (the service port)
 * and POD_PORT_BASE + 2·index + 1 (the readiness port, when it differs): 20000…20511, apart from the agent's. */
export const POD_PORT_BASE = 20000;

/** The pod's ports of worker `index`, in the order of the actor's distinct ports (service, then readiness). */
export function workerPodPorts(index: number): [number, number] {
  return [POD_PORT_BASE + 2 * index, POD_PORT_BASE + 2 * index + 1];
}

/** The interface inside a node's (and a worker's) namespace that leads towards the host. */
export const UPLINK = 'uplink';

export class NodeNetwork {
  readonly index: number;
  readonly namespace: string;
  /** The node's address, as seen from the host. */
  readonly address: string;
  /** The host's side of the link. */
  readonly hostAddress: string;
  private readonly hostLink: string;
  private readonly natTable: string;
  /** The host's own IPv4 addresses: actors are refused egress to them by default. */
  hostAddresses: string[] = [];
  readonly self: boolean;
  /** Set in pod mode: the pod's address, where the workers are exposed. */
  readonly pod: { address: string } | undefined;

  constructor(opts: NodeNetworkOptions) {
    if (!Number.isInteger(opts.index) || opts.index < 0 || opts.index > 255) {
      throw new RangeError(`node network index must be 0..255, got ${opts.index}`);
    }
    this.index = opts.index;
    this.pod = opts.pod;
    this.self = (opts.self ?? false) || this.pod !== undefined;
    this.namespace = `torpor-node${opts.index}`;
    this.hostAddress = `10.214.${opts.index}.1`;
    this.address = `10.214.${opts.index}.2`;
    this.hostLink = `tn${opts.index}h`;
    this.natTable = `torpor-node${opts.index}`;
  }

  /** Where `ip -n`/`nft` reach the node: its named namespace, or (pod mode) this process's own. */
  get netns(): string | undefined {
    return this.pod ? undefined : this.namespace;
  }

  /** Recreates the node's namespace from scratch: whatever an earlier process left there is gone. */
  async ensure(): Promise<void> {
    if (this.pod) return this.ensurePod();
    if (this.self) return this.ensureSelf();
    await this.destroy();
    await ensureNetns(this.namespace);
    await ip(undefined, [
      `link add ${this.hostLink} type veth peer name ${UPLINK} netns ${this.namespace}`,
      `addr add ${this.hostAddress}/30 dev ${this.hostLink}`,
      `link set ${this.hostLink} up`,
    ]);
    await ip(this.namespace, [
      `addr add ${this.address}/30 dev ${UPLINK}`,
      `link set ${UPLINK} up`,
      `route add default via ${this.hostAddress}`,
    ]);
    await sysctl(this.namespace, 'net.ipv4.ip_forward', '1');
    await nft(this.namespace, this.nodeRules());
    // Egress beyond this host: the host forwards and masquerades the node's traffic, as a container engine does.
    await sysctl(undefined, 'net.ipv4.ip_forward', '1');
    await nft(undefined, this.hostRules());
    this.hostAddresses = await hostIpv4Addresses();
  }

  /** Inside the node's namespace: checks that this process really is there, then sets up the node's side. The
   * addresses actors are refused by default are then this node's own (it is the machine, as far as it knows). */
  private async ensureSelf(): Promise<void> {
    const [mine, node] = await Promise.all([
      stat('/proc/self/ns/net'),
      stat(netnsPath(this.namespace)).catch(() => undefined),
    ]);
    if (!node || node.ino !== mine.ino || node.dev !== mine.dev) {
      throw new TorporError(
        'FAILED_PRECONDITION',
        `this process must run in the node's network namespace ${this.namespace}: create it (torpor node-net ` +
          `create --network-base ${this.index}) and start it with nsenter --net=${netnsPath(this.namespace)}`,
        { field: 'network-base' },
      );
    }
    await sysctl(this.namespace, 'net.ipv4.ip_forward', '1');
    await nft(this.namespace, this.nodeRules());
    this.hostAddresses = await hostIpv4Addresses();
  }

  /** In a pod: forwarding, and masquerade of the workers' egress behind whichever interface it leaves by (the
   * pod's); the addresses actors are refused by default are the pod's own. */
  private async ensurePod(): Promise<void> {
    await sysctl(undefined, 'net.ipv4.ip_forward', '1');
    await nft(undefined, this.podRules());
    this.hostAddresses = await hostIpv4Addresses();
  }

  /** Pod mode: the pod's `ports` (workerPodPorts) lead to the same-position `targets` of the worker's address,
   * from outside the pod and from inside it alike. Replaces the worker's earlier exposure atomically. */
  async expose(index: number, workerAddress: string, mappings: { port: number; target: number }[]): Promise<void> {
    if (!this.pod) return;
    const table = exposeTable(index);
    const rules = mappings.map(
      (m) => `    ip daddr ${this.pod!.address} tcp dport ${m.port} dnat to ${workerAddress}:${m.target}`,
    );
    const chain = (name: string, hook: string) => [
      `  chain ${name} {`,
      `    type nat hook ${hook} priority -100; policy accept;`,
      ...rules,
      '  }',
    ];
    await nft(
      undefined,
      [
        `add table ip ${table}`,
        `delete table ip ${table}`,
        `table ip ${table} {`,
        ...chain('prerouting', 'prerouting'),
        ...chain('output', 'output'),
        '}',
        '',
      ].join('\n'),
    );
  }

  /** Pod mode: the worker is no longer reachable at the pod's address. Idempotent. */
  async unexpose(index: number): Promise<void> {
    if (!this.pod) return;
    await deleteTable(undefined, 'ip', exposeTable(index));
  }

  /** The host reaches a worker's subnet through this node. */
  async routeToHost(subnet: string): Promise<void> {
    if (this.self) return;
    await run('ip', ['route', 'replace', subnet, 'via', this.address, 'dev', this.hostLink]);
  }

  async unrouteFromHost(subnet: string): Promise<void> {
    if (this.self) return;
    await run('ip', ['route', 'del', subnet], { okCodes: [0, 1, 2] });
  }

  /** Idempotent: the namespace (and every link into it) and the host's rules for it go. */
  async destroy(): Promise<void> {
    if (this.self) return;
    await deleteNetns(this.namespace);
    await deleteLink(undefined, this.hostLink);
    await deleteTable(undefined, 'ip', this.natTable);
  }

  private nodeRules(): string {
    return [
      'add table ip torpor',
      'delete table ip torpor',
      'table ip torpor {',
      '  chain postrouting {',
      '    type nat hook postrouting priority srcnat; policy accept;',
      `    oifname "${UPLINK}" masquerade`,
      '  }',
      '}',
      '',
    ].join('\n');
  }

  private podRules(): string {
    return [
      'add table ip torpor',
      'delete table ip torpor',
      'table ip torpor {',
      '  chain postrouting {',
      '    type nat hook postrouting priority srcnat; policy accept;',
      `    ip saddr ${WORKER_RANGE} oifname != "${WORKER_LINKS}" masquerade`,
      '  }',
      '}',
      '',
    ].join('\n');
  }

  private hostRules(): string {
    return [
      `add table ip ${this.natTable}`,
      `delete table ip ${this.natTable}`,
      `table ip ${this.natTable} {`,
      '  chain postrouting {',
      '    type nat hook postrouting priority srcnat; policy accept;',
      `    ip saddr ${this.address} oifname != "${this.hostLink}" masquerade`,
      '  }',
      '}',
      '',
    ].join('\n');
  }
}

const exposeTable = (index: number) => `torpor-expose${index}`;

async function hostIpv4Addresses(): Promise<string[]> {
  const { stdout } = await run('ip', ['-j', '-4', 'addr', 'show']);
  const links = JSON.parse(stdout) as { addr_info?: { local?: string }[] }[];
  return links
    .flatMap((link) => link.addr_info ?? [])
    .map((a) => a.local)
    .filter((a): a is string => typeof a === 'string' && !a.startsWith('127.'));
}
