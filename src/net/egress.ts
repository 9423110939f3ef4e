// The nftables rules of one activation, rendered as text (pure, so it is tested without root): inbound DNAT of
// the worker address's service ports to the actor, masquerade of the actor's egress, and the template's egress
// policy. Rules live in one table of the worker's namespace, replaced atomically at every activation and deleted
// when it ends, so nothing of an earlier actor survives into the next.
import type { EgressPolicy } from '../core/schemas.ts';

/** The actor's side of every activation: the same on every worker and node, so a snapshot's network
 * configuration (address, routes, the gateway's ARP entry) is valid wherever it is restored. */
export const ACTOR_ADDRESS = '169.254.17.2';
export const GATEWAY_ADDRESS = '169.254.17.1';
export const ACTOR_PREFIX = 30;
/** Locally administered MACs: the gateway's is fixed because a micro-VM snapshot freezes its ARP cache. */
export const GATEWAY_MAC = '02:74:70:11:00:01';
export const ACTOR_MAC = '02:74:70:11:00:02';

/** Always denied unless a rule names an address inside them explicitly: link-local (cloud metadata services
 * live at 169.254.169.254) plus Torpor's own node and worker ranges. */
export const INFRASTRUCTURE_CIDRS = ['169.254.0.0/16', '10.213.0.0/16', '10.214.0.0/16'];

export const TABLE = 'torpor';

export interface ActivationRules {
  /** Worker-namespace interface towards the node (carries the worker address). */
  uplink: string;
  /** Worker-namespace interface towards the actor (the gateway side). */
  actorLink: string;
  workerAddress: string;
  /** TCP ports of the worker address forwarded to the same ports of the actor (service and readiness). */
  ports: number[];
  egress: EgressPolicy;
  /** Addresses denied by default besides INFRASTRUCTURE_CIDRS: the node's own (e.g. the host's interfaces). */
  denied: string[];
  /** Names the activation in the ruleset (`nft list ruleset` shows whose rules these are). */
  comment: string;
}

interface Cidr {
  network: number;
  prefix: number;
}

export function parseCidr(text: string): Cidr {
  const [address, prefixText] = text.split('/');
  const octets = (address ?? '').split('.').map(Number);
  const prefix = prefixText === undefined ? 32 : Number(prefixText);
  if (octets.length !== 4 || octets.some((o) => !Number.isInteger(o) || o < 0 || o > 255)) {
    throw new RangeError(`not an IPv4 address: ${text}`);
  }
  if (!Number.isInteger(prefix) || prefix < 0 || prefix > 32) throw new RangeError(`bad prefix length: ${text}`);
  const value = ((octets[0]! << 24) | (octets[1]! << 16) | (octets[2]! << 8) | octets[3]!) >>> 0;
  return { network: (value & mask(prefix)) >>> 0, prefix };
}

function mask(prefix: number): number {
  return prefix === 0 ? 0 : (0xffffffff << (32 - prefix)) >>> 0;
}

/** Whether every address of `inner` lies in `outer`. */
export function cidrWithin(inner: string, outer: string): boolean {
  const a = parseCidr(inner);
  const b = parseCidr(outer);
  return a.prefix >= b.prefix && (a.network & mask(b.prefix)) >>> 0 === b.network;
}

function formatCidr(text: string): string {
  const { network, prefix } = parseCidr(text);
  const dotted = [24, 16, 8, 0].map((shift) => (network >>> shift) & 255).join('.');
  return prefix === 32 ? dotted : `${dotted}/${prefix}`;
}

function allowRule(iif: string, rule: { cidr: string; ports?: number[] | undefined }): string {
  const ports = rule.ports?.length ? ` meta l4proto { tcp, udp } th dport { ${rule.ports.join(', ')} }` : '';
  return `${iif} ip daddr ${formatCidr(rule.cidr)}${ports} accept`;
}

/** The activation's table, as an `nft -f` script that replaces any earlier one atomically. */
export function renderActivationRules(r: ActivationRules): string {
  const iif = `iifname "${r.actorLink}"`;
  const denied = [...INFRASTRUCTURE_CIDRS, ...r.denied];
  const rules = typeof r.egress === 'string' ? [] : r.egress.allow;
  // A rule reaches a denied range only by naming an address inside it: "0.0.0.0/0" does not open the metadata
  // service, "169.254.169.254/32" does.
  const exceptions = rules.filter((rule) => denied.some((d) => cidrWithin(rule.cidr, d)));
  const ordinary = rules.filter((rule) => !exceptions.includes(rule));
  const finalVerdict = r.egress === 'allow-all' ? 'accept' : 'reject with icmp type admin-prohibited';
  const comment = JSON.stringify(r.comment.replace(/["\\]/g, ''));
  return [
    `add table ip ${TABLE}`,
    `delete table ip ${TABLE}`,
    `table ip ${TABLE} {`,
    `  comment ${comment}`,
    '  chain prerouting {',
    '    type nat hook prerouting priority dstnat; policy accept;',
    `    iifname "${r.uplink}" ip daddr ${r.workerAddress} tcp dport { ${[...new Set(r.ports)].join(', ')} } dnat to ${ACTOR_ADDRESS}`,
    '  }',
    '  chain postrouting {',
    '    type nat hook postrouting priority srcnat; policy accept;',
    `    oifname "${r.uplink}" ip saddr ${ACTOR_ADDRESS} masquerade`,
    '  }',
    '  chain input {',
    '    type filter hook input priority filter; policy accept;',
    `    ${iif} ct state established,related accept`,
    `    ${iif} reject with icmp type admin-prohibited`,
    '  }',
    '  chain forward {',
    '    type filter hook forward priority filter; policy accept;',
    `    ${iif} ct state established,related accept`,
    ...exceptions.map((rule) => `    ${allowRule(iif, rule)}`),
    `    ${iif} ip daddr { ${denied.map(formatCidr).join(', ')} } reject with icmp type admin-prohibited`,
    ...ordinary.map((rule) => `    ${allowRule(iif, rule)}`),
    `    ${iif} ${finalVerdict}`,
    '  }',
    '}',
    '',
  ].join('\n');
}
