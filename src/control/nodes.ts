// The server's directory of node agents in other processes (torpor agent), fed by the store: a node is known as
// long as one of its workers is registered with an agent URL (the reconciler removes workers whose lease expired,
// so a lost node drops out). Lookups read the store at most once a second (a node not found, at most every
// 100 ms); an agent that moved (restarted on another port) is found at the next read.
import { RemoteAgent } from '../agent/remote.ts';
import { allWorkers } from '../store/all.ts';
import type { StateStore } from '../store/store.ts';
import type { AgentDirectory } from './lifecycle.ts';

export interface NodeDirectoryOptions {
  store: StateStore;
  /** The agent token, presented on every call to an agent. */
  token: string;
  /** How stale the node list may be (default 1 s). */
  refreshMs?: number;
}

export class NodeDirectory implements AgentDirectory {
  private readonly o: NodeDirectoryOptions;
  /** node → its agent (one client per agent URL, reused: it keeps its connections). */
  private nodes = new Map<string, RemoteAgent>();
  private readAt = 0;
  private reading: Promise<void> | undefined;

  constructor(opts: NodeDirectoryOptions) {
    this.o = opts;
  }

  private async fresh(maxAgeMs = this.o.refreshMs ?? 1000): Promise<Map<string, RemoteAgent>> {
    if (Date.now() - this.readAt >= maxAgeMs) {
      this.reading ??= this.read().finally(() => {
        this.reading = undefined;
      });
      await this.reading;
    }
    return this.nodes;
  }

  private async read(): Promise<void> {
    const next = new Map<string, RemoteAgent>();
    for await (const w of allWorkers(this.o.store)) {
      if (!w.agent || next.has(w.node)) continue;
      const known = this.nodes.get(w.node);
      next.set(
        w.node,
        known?.url === w.agent ? known : new RemoteAgent({ node: w.node, url: w.agent, token: this.o.token }),
      );
    }
    this.nodes = next;
    this.readAt = Date.now();
  }

  /** A node not in the list is looked up again at once (it may just have registered). */
  async agent(node: string): Promise<RemoteAgent | undefined> {
    return (await this.fresh()).get(node) ?? (await this.fresh(100)).get(node);
  }

  async agents(): Promise<RemoteAgent[]> {
    return [...(await this.fresh()).values()];
  }
}
