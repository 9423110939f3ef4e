// The two directions between a server and a `torpor agent`, both over HTTP with the shared agent token:
// RemoteAgent is the server's AgentClient for a node agent in another process (it calls src/agent/api.ts), and
// ServerRegistry is the agent's WorkerRegistry (it calls the server's /v1/nodes routes, src/api/nodes.ts).
// Every call has a deadline, so a node that vanished costs a timeout at most, never a wait forever; a node that
// died outright (its sockets reset) fails at once with Unreachable.
import type { Readable } from 'node:stream';
import { type ErrorBody, TorporError } from '../core/errors.ts';
import type { ActorRef } from '../core/types.ts';
import type { ExecResult, OutputListener } from '../runtime/runtime.ts';
import { type CallOptions, callJson, callStream, Unreachable } from '../sys/http.ts';
import type {
  ActivateRequest,
  ActivateResult,
  AgentClient,
  CheckpointRequest,
  CheckpointResult,
  LocalCheckpoint,
  LocalCheckpointTarget,
  LogOptions,
  TransferEvent,
  UploadRequest,
} from './client.ts';
import type { WorkerInfo, WorkerRegistry } from './registry.ts';

export interface RemoteAgentOptions {
  node: string;
  /** Base URL of the agent's API. */
  url: string;
  token: string;
  /** Deadline of calls that restore, checkpoint or upload (default 5 min). */
  longCallMs?: number;
  /** Deadline of every other call (default 30 s). */
  shortCallMs?: number;
}

const worker = (id: string, action: string) => `/v1/workers/${encodeURIComponent(id)}/${action}`;

export class RemoteAgent implements AgentClient {
  readonly node: string;
  readonly url: string;
  private readonly token: string;
  private readonly longCallMs: number;
  private readonly shortCallMs: number;

  constructor(opts: RemoteAgentOptions) {
    this.node = opts.node;
    this.url = opts.url;
    this.token = opts.token;
    this.longCallMs = opts.longCallMs ?? 300_000;
    this.shortCallMs = opts.shortCallMs ?? 30_000;
  }

  private call<T>(method: 'GET' | 'POST', path: string, body: unknown, long = false): Promise<T> {
    const opts: CallOptions = { token: this.token, timeoutMs: long ? this.longCallMs : this.shortCallMs };
    return callJson<T>(this.url, method, path, body, opts);
  }

  activate(req: ActivateRequest): Promise<ActivateResult> {
    const { workerId, ...body } = req;
    return this.call('POST', worker(workerId, 'activate'), body, true);
  }

  checkpointLocal(
    workerId: string,
    target: LocalCheckpointTarget,
    opts: { deferTeardown?: boolean } = {},
  ): Promise<LocalCheckpoint> {
    return this.call('POST', worker(workerId, 'checkpoint'), { target, deferTeardown: opts.deferTeardown }, true);
  }

  upload(request: UploadRequest, dir: string, files?: string[]): Promise<CheckpointResult> {
    return this.call('POST', '/v1/snapshots/upload', { request, dir, ...(files ? { files } : {}) }, true);
  }

  checkpoint(req: CheckpointRequest): Promise<CheckpointResult> {
    return this.call('POST', '/v1/snapshots/golden', req, true);
  }

  async keepLocal(dir: string, manifestKey: string): Promise<void> {
    await this.call('POST', '/v1/snapshots/keep', { dir, manifestKey });
  }

  async discardLocal(dir: string): Promise<void> {
    await this.call('POST', '/v1/snapshots/discard', { dir });
  }

  async compact(manifestKey: string): Promise<number> {
    return (await this.call<{ saved: number }>('POST', '/v1/snapshots/compact', { manifestKey }, true)).saved;
  }

  async sandboxAlive(workerId: string): Promise<boolean> {
    return (await this.call<{ alive: boolean }>('GET', worker(workerId, 'alive'), undefined)).alive;
  }

  async settled(workerId: string): Promise<void> {
    await this.call('POST', worker(workerId, 'settled'), {}, true);
  }

  async release(workerId: string): Promise<void> {
    await this.call('POST', worker(workerId, 'release'), {}, true);
  }

  async exec(workerId: string, command: string[], timeoutMs: number, onOutput?: OutputListener): Promise<ExecResult> {
    const body = await callStream(
      this.url,
      'POST',
      worker(workerId, 'exec'),
      { command, timeoutMs },
      { token: this.token, timeoutMs: timeoutMs + this.shortCallMs },
    );
    return readExecLines(body, onOutput, this.node);
  }

  /** Opens the agent's stream of transfer events (GET /v1/transfers) for this listener; resolves once the agent
   * said the subscription is live. */
  async watchTransfers(listener: (event: TransferEvent) => void): Promise<() => void> {
    const stop = new AbortController();
    const body = await callStream(this.url, 'GET', '/v1/transfers', undefined, {
      token: this.token,
      timeoutMs: this.shortCallMs,
      bodyTimeoutMs: 0,
      signal: stop.signal,
    });
    const lines = readLines(body, (line) => {
      const event = JSON.parse(line) as Partial<TransferEvent>;
      if (event.direction) listener(event as TransferEvent);
    });
    void lines.done.catch(() => undefined); // the stream ends when unwatched, or with the agent
    try {
      await lines.first;
    } catch (err) {
      stop.abort();
      throw err;
    }
    return () => stop.abort();
  }

  logs(actor: ActorRef, opts: LogOptions = {}): Promise<Readable> {
    const path = `/v1/logs/${encodeURIComponent(actor.space)}/${encodeURIComponent(actor.name)}`;
    return callStream(this.url, 'GET', opts.follow ? `${path}?follow=true` : path, undefined, {
      token: this.token,
      timeoutMs: this.shortCallMs,
      ...(opts.follow ? { bodyTimeoutMs: 0 } : {}),
      ...(opts.signal ? { signal: opts.signal } : {}),
    });
  }
}

/** Calls `onLine` with each line of an NDJSON stream; `first` settles with the first line. */
function readLines(body: Readable, onLine: (line: string) => void): { first: Promise<void>; done: Promise<void> } {
  let seen!: () => void;
  let failed!: (err: unknown) => void;
  const first = new Promise<void>((resolve, reject) => {
    seen = resolve;
    failed = reject;
  });
  const done = (async () => {
    let pending = '';
    try {
      for await (const chunk of body) {
        pending += (chunk as Buffer).toString('utf8');
        for (let nl = pending.indexOf('\n'); nl >= 0; nl = pending.indexOf('\n')) {
          const line = pending.slice(0, nl);
          pending = pending.slice(nl + 1);
          seen();
          if (line.trim()) onLine(line);
        }
      }
      failed(new Error('the stream ended before its first line'));
    } catch (err) {
      failed(err);
      throw err;
    }
  })();
  return { first, done };
}

type ExecLine = { stream?: 'stdout' | 'stderr'; data?: string; result?: ExecResult; error?: ErrorBody };

/** Decodes the agent's exec stream (see execLines in api.ts): output to `onOutput` as it comes, then the result. */
async function readExecLines(body: Readable, onOutput: OutputListener | undefined, node: string): Promise<ExecResult> {
  let pending = '';
  const handle = (text: string): ExecResult | undefined => {
    if (!text.trim()) return undefined;
    const line = JSON.parse(text) as ExecLine;
    if (line.error) {
      const { code, message, field } = line.error;
      throw new TorporError(code, message, field === undefined ? {} : { field });
    }
    if (line.result) return line.result;
    if (line.stream && line.data !== undefined) onOutput?.(line.stream, Buffer.from(line.data, 'base64'));
    return undefined;
  };
  try {
    for await (const chunk of body) {
      pending += (chunk as Buffer).toString('utf8');
      for (let nl = pending.indexOf('\n'); nl >= 0; nl = pending.indexOf('\n')) {
        const result = handle(pending.slice(0, nl));
        pending = pending.slice(nl + 1);
        if (result) return result;
      }
    }
  } catch (err) {
    if (err instanceof TorporError) throw err;
    throw new Unreachable(`the agent of node ${node} went away during exec: ${(err as Error).message}`, err);
  }
  const last = handle(pending);
  if (last) return last;
  throw new Unreachable(`the agent of node ${node} ended the exec stream without a result`, undefined);
}

export interface ServerRegistryOptions {
  /** The server's API. */
  server: string;
  token: string;
  node: string;
}

/** Registers a `torpor agent`'s workers through the server, which keeps them in the store with its own clock. */
export class ServerRegistry implements WorkerRegistry {
  private readonly o: ServerRegistryOptions;
  /** Where the server reaches this agent's API: set once it listens, before the first registration. */
  agentUrl = '';

  constructor(opts: ServerRegistryOptions) {
    this.o = opts;
  }

  private path(action = ''): string {
    return `/v1/nodes/${encodeURIComponent(this.o.node)}${action}`;
  }

  register(workers: WorkerInfo[]): Promise<{ leaseMs: number }> {
    if (!this.agentUrl) throw new TorporError('FAILED_PRECONDITION', 'the agent API is not listening yet');
    return callJson(this.o.server, 'PUT', this.path(), { agent: this.agentUrl, workers }, { token: this.o.token });
  }

  heartbeat(ids: string[]): Promise<{ unknown: string[] }> {
    return callJson(this.o.server, 'POST', this.path('/heartbeat'), { workers: ids }, { token: this.o.token });
  }

  async unregister(ids: string[]): Promise<void> {
    await callJson(this.o.server, 'POST', this.path('/unregister'), { workers: ids }, { token: this.o.token });
  }

  async expire(ids: string[]): Promise<void> {
    await callJson(this.o.server, 'POST', this.path('/expire'), { workers: ids }, { token: this.o.token });
  }

  /** Asks the server to suspend the actors running on these workers (a draining agent, see NodeAgent.drain). */
  async suspendActors(ids: string[], timeoutMs: number): Promise<void> {
    await callJson(this.o.server, 'POST', this.path('/drain'), { workers: ids }, { token: this.o.token, timeoutMs });
  }
}
