// The network of one worker slot, shaped like a pod: a namespace with the worker's address on `uplink` (linked to
// its node), and inside it, per activation, an interior namespace for the sandbox with `eth0` at the stable actor
// address. Because the actor side is identical on every worker of every node, a snapshot's frozen network
// configuration is valid wherever it is restored: nothing inside the actor is re-addressed after a move.
//
// gVisor's netstack takes over the addresses of the interfaces in its namespace, so every activation gets a
// fresh interior namespace and veth pair; the next one is prepared while the worker is idle. The activation's
// nftables table (DNAT of the service ports, masquerade, egress policy) is loaded when the actor is known and
// deleted with the interior namespace when the activation ends.
import type { EgressPolicy } from '../core/schemas.ts';
import { run } from '../sys/run.ts';
import {
  ACTOR_ADDRESS,
  ACTOR_MAC,
  ACTOR_PREFIX,
  GATEWAY_ADDRESS,
  GATEWAY_MAC,
  renderActivationRules,
  TABLE,
} from './egress.ts';
import { deleteLink, deleteNetns, deleteTable, ensureNetns, ip, netnsPath, nft, sysctl } from './netns.ts';
import { type NodeNetwork, UPLINK, workerPodPorts } from './node-net.ts';

export interface WorkerNetworkOptions {
  /** Small integer unique on this machine (0..255): picks the namespaces, the link name and the /30. */
  index: number;
  node: NodeNetwork;
  /** For a micro-VM: the guest, not the interior namespace, owns the actor address. The interior's eth0 then
   * carries no address and is mirrored (tc, both ways, as Kata does) to a tap device the VMM opens by name. */
  tap?: boolean;
}

export interface ActivationNetwork {
  /** Service and readiness ports of the actor, reached at the same ports of the worker address. */
  ports: number[];
  egress: EgressPolicy;
  /** Who the rules are for (`space/name`), shown in the ruleset. */
  actor: string;
}

/** The worker-side interface of the activation's veth pair (the actor's gateway). */
const ACTOR_LINK = 'actor0';
/** A micro-VM's tap in the interior namespace: the same name at every activation, so a restored VM finds it. */
export const TAP = 'tap0';

export class WorkerNetwork {
  readonly namespace: string;
  /** The worker's address: what the router and readiness checks connect to (DNAT to the actor). */
  readonly address: string;
  private readonly node: NodeNetwork;
  /** The worker's /30, which the host routes through the node. */
  readonly subnet: string;
  private readonly nodeAddress: string;
  private readonly nodeLink: string;
  private readonly interior: string;
  private readonly tap: boolean;
  private readonly index: number;
  /** The current activation's ports → where they are reached from outside the node (see endpoint). */
  private endpoints = new Map<number, string>();

  constructor(opts: WorkerNetworkOptions) {
    if (!Number.isInteger(opts.index) || opts.index < 0 || opts.index > 255) {
      throw new RangeError(`worker network index must be 0..255, got ${opts.index}`);
    }
    this.node = opts.node;
    this.index = opts.index;
    this.namespace = `torpor-net${opts.index}`;
    this.interior = `torpor-net${opts.index}-actor`;
    this.subnet = `10.213.${opts.index}.0/30`;
    this.nodeAddress = `10.213.${opts.index}.1`;
    this.address = `10.213.${opts.index}.2`;
    this.nodeLink = `tq${opts.index}h`;
    this.tap = opts.tap ?? false;
  }

  /** The address the worker is reached at from outside its node: its own, or (pod mode) the pod's. */
  get host(): string {
    return this.node.pod?.address ?? this.address;
  }

  /** Where the current activation's `port` is reached from outside the node (routers, servers, clients): the
   * worker's address and that port, or in pod mode the pod's address and the worker's pod port for it. */
  endpoint(port: number): string {
    const endpoint = this.endpoints.get(port);
    if (!endpoint) throw new RangeError(`port ${port} is not one of the activation's`);
    return endpoint;
  }

  /** The namespace the sandbox runs in (the current activation's interior). */
  get netnsPath(): string {
    return netnsPath(this.interior);
  }

  /** Creates the worker's namespace and its link to the node, replacing any leftovers (the node's namespace
   * must exist). */
  async ensure(): Promise<void> {
    await deleteNetns(this.interior);
    await deleteNetns(this.namespace);
    // The node's end goes with the namespace only once nothing holds that any more: remove it by name, as a node
    // that outlived the agent that made it (torpor agent in its own namespace) still has it.
    await deleteLink(this.node.netns, this.nodeLink);
    await ensureNetns(this.namespace);
    await ip(this.node.netns, [
      `link add ${this.nodeLink} type veth peer name ${UPLINK} netns ${this.namespace}`,
      `addr add ${this.nodeAddress}/30 dev ${this.nodeLink}`,
      `link set ${this.nodeLink} up`,
    ]);
    await ip(this.namespace, [
      `addr add ${this.address}/30 dev ${UPLINK}`,
      `link set ${UPLINK} up`,
      `route add default via ${this.nodeAddress}`,
    ]);
    await sysctl(this.namespace, 'net.ipv4.ip_forward', '1');
    await this.node.routeToHost(this.subnet);
  }

  /** Ends the previous activation's network (rules, interior namespace, veth) and makes the next one's interior
   * namespace and veth pair. Idempotent, and safe after a crash: whatever exists under these names is replaced. */
  async prepare(): Promise<void> {
    await this.clear();
    // The old pair goes with the interior namespace only once nothing holds that (a sandbox still exiting may):
    // remove it by name.
    await deleteLink(this.namespace, ACTOR_LINK);
    await ensureNetns(this.interior);
    await ip(this.namespace, [
      `link add ${ACTOR_LINK} address ${GATEWAY_MAC} type veth peer name eth0 address ${ACTOR_MAC} netns ${this.interior}`,
      `addr add ${GATEWAY_ADDRESS}/${ACTOR_PREFIX} dev ${ACTOR_LINK}`,
      `link set ${ACTOR_LINK} up`,
    ]);
    if (this.tap) return this.mirrorToTap();
    await ip(this.interior, [
      `addr add ${ACTOR_ADDRESS}/${ACTOR_PREFIX} dev eth0`,
      'link set eth0 up',
      `route add default via ${GATEWAY_ADDRESS}`,
    ]);
  }

  /** Every frame arriving on eth0 leaves through the tap and the other way round: the guest behind the tap is
   * the actor, with the actor's MAC and address, and the veth is only a wire. */
  private async mirrorToTap(): Promise<void> {
    await ip(this.interior, [`tuntap add ${TAP} mode tap`, `link set ${TAP} up`, 'link set eth0 up']);
    const mirror = (from: string, to: string) => [
      `qdisc add dev ${from} ingress`,
      `filter add dev ${from} parent ffff: protocol all u32 match u8 0 0 action mirred egress redirect dev ${to}`,
    ];
    await run('tc', ['-n', this.interior, '-batch', '-'], {
      input: `${[...mirror('eth0', TAP), ...mirror(TAP, 'eth0')].join('\n')}\n`,
      label: 'tc mirror',
    });
  }

  /** Loads the activation's rules: the worker address's ports lead to the actor, its egress is policed. Must run
   * before the sandbox does, so the actor never runs unpoliced. */
  async activate(activation: ActivationNetwork): Promise<void> {
    await nft(
      this.namespace,
      renderActivationRules({
        uplink: UPLINK,
        actorLink: ACTOR_LINK,
        workerAddress: this.address,
        ports: activation.ports,
        egress: activation.egress,
        denied: this.node.hostAddresses,
        comment: `actor ${activation.actor} on ${this.namespace}`,
      }),
    );
    const ports = [...new Set(activation.ports)];
    if (this.node.pod) {
      const podPorts = workerPodPorts(this.index);
      const mappings = ports.map((target, i) => ({ port: podPorts[i]!, target }));
      await this.node.expose(this.index, this.address, mappings);
      this.endpoints = new Map(mappings.map((m) => [m.target, `${this.node.pod!.address}:${m.port}`]));
    } else {
      this.endpoints = new Map(ports.map((port) => [port, `${this.address}:${port}`]));
    }
  }

  /** Removes the activation's rules and interior namespace (its veth pair goes with it). Idempotent. */
  async clear(): Promise<void> {
    this.endpoints.clear();
    await this.node.unexpose(this.index).catch(() => undefined);
    await deleteTable(this.namespace, 'ip', TABLE).catch(() => undefined);
    await deleteNetns(this.interior);
  }

  async destroy(): Promise<void> {
    await this.node.unexpose(this.index).catch(() => undefined);
    await deleteNetns(this.interior);
    await deleteNetns(this.namespace);
    await this.node.unrouteFromHost(this.subnet);
  }
}
