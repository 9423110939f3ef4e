// The network of one worker slot: a network namespace that lives as long as the worker, and a fresh veth pair
// per activation. gVisor's netstack takes over the addresses of the interfaces in its namespace, so an
// activation cannot reuse the previous one's link. Each worker gets its own /30 so host routes never overlap.
import { existsSync } from 'node:fs';
import { run } from '../sys/run.ts';

export interface WorkerNetworkOptions {
  /** Small integer unique on this machine (0..255): picks the link names and the /30. */
  index: number;
  /** Namespace name; the OCI spec names it by path (/var/run/netns/<name>). */
  namespace: string;
  /** First two octets of the /16 that per-worker /30s are carved from. */
  subnetPrefix?: string;
}

export class WorkerNetwork {
  readonly namespace: string;
  readonly hostAddress: string;
  /** The address the sandbox serves on, reachable from the host. */
  readonly sandboxAddress: string;
  private readonly hostLink: string;
  private readonly peerLink: string;

  constructor(opts: WorkerNetworkOptions) {
    if (!Number.isInteger(opts.index) || opts.index < 0 || opts.index > 255) {
      throw new RangeError(`worker network index must be 0..255, got ${opts.index}`);
    }
    const prefix = opts.subnetPrefix ?? '10.213';
    this.namespace = opts.namespace;
    this.hostAddress = `${prefix}.${opts.index}.1`;
    this.sandboxAddress = `${prefix}.${opts.index}.2`;
    this.hostLink = `tq${opts.index}h`;
    this.peerLink = `tq${opts.index}c`;
  }

  get netnsPath(): string {
    return `/var/run/netns/${this.namespace}`;
  }

  /** Creates the namespace if missing (idempotent). */
  async ensureNamespace(): Promise<void> {
    if (!existsSync(this.netnsPath)) await run('ip', ['netns', 'add', this.namespace]);
    await this.inNamespace(['link', 'set', 'lo', 'up']);
  }

  /** Replaces any previous activation's link with a new veth pair, addressed and routed. */
  async freshLink(): Promise<void> {
    await this.removeLink();
    await run('ip', ['link', 'add', this.hostLink, 'type', 'veth', 'peer', 'name', this.peerLink]);
    await run('ip', ['link', 'set', this.peerLink, 'netns', this.namespace]);
    await run('ip', ['addr', 'add', `${this.hostAddress}/30`, 'dev', this.hostLink]);
    await run('ip', ['link', 'set', this.hostLink, 'up']);
    await this.inNamespace(['addr', 'add', `${this.sandboxAddress}/30`, 'dev', this.peerLink]);
    await this.inNamespace(['link', 'set', this.peerLink, 'up']);
    await this.inNamespace(['route', 'add', 'default', 'via', this.hostAddress]);
  }

  /** Idempotent: deleting the host end removes the pair. */
  async removeLink(): Promise<void> {
    await run('ip', ['link', 'del', this.hostLink], { okCodes: [0, 1, 2] });
  }

  async destroy(): Promise<void> {
    await this.removeLink();
    if (existsSync(this.netnsPath)) await run('ip', ['netns', 'del', this.namespace], { okCodes: [0, 1] });
  }

  private inNamespace(args: string[]): Promise<unknown> {
    return run('ip', ['-n', this.namespace, ...args]);
  }
}
