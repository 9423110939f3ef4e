// A node's network: its own namespace (as a machine or a Kubernetes node would have), linked to this host by a
// veth pair. The host routes each of the node's worker subnets to it; the node routes them on to the workers'
// namespaces and masquerades their egress behind its own address. Several nodes on one machine each get one,
// so moving an actor between nodes crosses a real network boundary.
import { run } from '../sys/run.ts';
import { deleteLink, deleteNetns, deleteTable, ensureNetns, ip, nft, sysctl } from './netns.ts';

export interface NodeNetworkOptions {
  /** Small integer unique on this machine (0..255): picks the namespace, the link names and the /30. */
  index: number;
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

  constructor(opts: NodeNetworkOptions) {
    if (!Number.isInteger(opts.index) || opts.index < 0 || opts.index > 255) {
      throw new RangeError(`node network index must be 0..255, got ${opts.index}`);
    }
    this.index = opts.index;
    this.namespace = `torpor-node${opts.index}`;
    this.hostAddress = `10.214.${opts.index}.1`;
    this.address = `10.214.${opts.index}.2`;
    this.hostLink = `tn${opts.index}h`;
    this.natTable = `torpor-node${opts.index}`;
  }

  /** Recreates the node's namespace from scratch: whatever an earlier process left there is gone. */
  async ensure(): Promise<void> {
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

  /** The host reaches a worker's subnet through this node. */
  async routeToHost(subnet: string): Promise<void> {
    await run('ip', ['route', 'replace', subnet, 'via', this.address, 'dev', this.hostLink]);
  }

  async unrouteFromHost(subnet: string): Promise<void> {
    await run('ip', ['route', 'del', subnet], { okCodes: [0, 1, 2] });
  }

  /** Idempotent: the namespace (and every link into it) and the host's rules for it go. */
  async destroy(): Promise<void> {
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

async function hostIpv4Addresses(): Promise<string[]> {
  const { stdout } = await run('ip', ['-j', '-4', 'addr', 'show']);
  const links = JSON.parse(stdout) as { addr_info?: { local?: string }[] }[];
  return links
    .flatMap((link) => link.addr_info ?? [])
    .map((a) => a.local)
    .filter((a): a is string => typeof a === 'string' && !a.startsWith('127.'));
}
