// The `standard` engine: a client of the external sandbox-engine contract (AEnvironment's EnvInstanceClient
// contract; Torpor serves it too, see src/api/compat.ts). Every answer is the envelope {success, code, message,
// data}; `success: false`, a non-2xx status or a body that is not the envelope is an error carrying the remote
// message. Each attempt has a timeout; passing failures (network errors, 502/503/504, timeouts) are retried with
// backoff, and a create always carries one Idempotency-Key for all its attempts, so a retry never makes a
// second instance on a server that honours the key (Torpor does). With an API key it authenticates as a trusted
// service (Authorization: Bearer) and states the owner it acts for in X-Owner.
import { randomUUID } from 'node:crypto';
import { Agent, request } from 'undici';
import { type ErrorCode, TorporError } from '../core/errors.ts';
import { parse } from '../core/schemas.ts';
import type { ActorRef } from '../core/types.ts';
import {
  type Caller,
  type Capability,
  type CreateInstanceRequest,
  type CreateOptions,
  createInstanceRequest,
  createOwner,
  type Engine,
  type EnvObject,
  type ExecOutput,
  type Instance,
  notSupported,
  splitEnvName,
} from './engine.ts';

export interface StandardEngineOptions {
  /** Base URL of the engine, e.g. http://10.0.0.5:8080 (the contract lives under /aenvironment/instance). */
  url: string;
  /** Per-attempt timeout. */
  timeoutMs?: number;
  /** Attempts after the first for a passing failure. */
  retries?: number;
  /** First backoff delay; doubles each attempt. */
  backoffMs?: number;
  /** Sent as `Authorization: Bearer <apiKey>` (a service key on the remote Torpor). */
  apiKey?: string;
}

const STATUS_CODE: Record<number, ErrorCode> = {
  400: 'INVALID_ARGUMENT',
  401: 'UNAUTHENTICATED',
  403: 'PERMISSION_DENIED',
  404: 'NOT_FOUND',
  409: 'CONFLICT',
  413: 'PAYLOAD_TOO_LARGE',
  422: 'IMAGE_REJECTED',
  501: 'NOT_SUPPORTED',
  503: 'NO_CAPACITY',
  504: 'TIMEOUT',
};
const RETRYABLE_STATUS = new Set([502, 503, 504]);

interface Envelope {
  success: boolean;
  code?: number;
  message?: string;
  data?: unknown;
  field?: string;
  error?: string;
}

function isEnvelope(v: unknown): v is Envelope {
  return typeof v === 'object' && v !== null && typeof (v as Envelope).success === 'boolean';
}

/** A failure worth another attempt (the request may not have been processed, or may be processed again
 * harmlessly). */
class Retryable extends Error {
  readonly final: TorporError;
  constructor(final: TorporError) {
    super(final.message);
    this.final = final;
  }
}

export class StandardEngine implements Engine {
  readonly name = 'standard';
  readonly capabilities: ReadonlySet<Capability> = new Set();
  private readonly base: string;
  private readonly timeoutMs: number;
  private readonly retries: number;
  private readonly backoffMs: number;
  private readonly dispatcher: Agent;
  private readonly apiKey: string | undefined;

  constructor(opts: StandardEngineOptions) {
    let url: URL;
    try {
      url = new URL(opts.url);
    } catch {
      throw new TorporError('INVALID_ARGUMENT', `standard-url: not a URL: "${opts.url}"`, { field: 'standard-url' });
    }
    if (url.protocol !== 'http:' && url.protocol !== 'https:') {
      throw new TorporError('INVALID_ARGUMENT', 'standard-url: must be http(s)', { field: 'standard-url' });
    }
    this.base = url.href.replace(/\/+$/, '');
    this.timeoutMs = opts.timeoutMs ?? 30_000;
    this.retries = opts.retries ?? 3;
    this.backoffMs = opts.backoffMs ?? 200;
    this.apiKey = opts.apiKey;
    this.dispatcher = new Agent({ keepAliveTimeout: 10_000, connections: 64 });
  }

  async create(input: CreateInstanceRequest, opts: CreateOptions = {}): Promise<Instance> {
    // Bad input is refused here, as by every engine, before anything is sent.
    const req = parse(createInstanceRequest, input) as CreateInstanceRequest;
    const { name, version } = splitEnvName(req.envName);
    const owner = createOwner(req, opts);
    const env = {
      name,
      version,
      deploy_config: {
        ...(req.environment_variables ? { environment_variables: req.environment_variables } : {}),
        ...(req.arguments ? { arguments: req.arguments } : {}),
        ...(req.ttl ? { ttl: req.ttl } : {}),
        ...(owner ? { owner } : {}),
        ...(req.labels ? { labels: req.labels } : {}),
        ...(req.datasource ? { dataSource: req.datasource } : {}),
        ...(req.name ? { instance_name: req.name } : {}),
      },
    };
    const key = opts.idempotencyKey ?? randomUUID();
    return (await this.call('POST', '/aenvironment/instance', 'create', {
      body: env,
      headers: { 'idempotency-key': key },
      caller: opts,
    })) as Instance;
  }

  async get(id: string, caller: Caller = {}): Promise<Instance> {
    return (await this.call('GET', `/aenvironment/instance/${encodeURIComponent(id)}`, 'get', { caller })) as Instance;
  }

  async list(envName?: string, caller: Caller = {}): Promise<Instance[]> {
    const q = envName && envName !== '*' ? `?envName=${encodeURIComponent(envName)}` : '';
    const data = await this.call('GET', `/aenvironment/instance${q}`, 'list', { caller });
    if (!Array.isArray(data)) throw this.malformed('list', 'data is not a list');
    return data as Instance[];
  }

  async delete(id: string, caller: Caller = {}): Promise<void> {
    await this.call('DELETE', `/aenvironment/instance/${encodeURIComponent(id)}`, 'delete', { caller });
  }

  async warmup(envName: string): Promise<EnvObject> {
    const { name, version } = splitEnvName(envName);
    return (await this.call('PUT', '/aenvironment/instance/action/warmup', 'warmup', {
      body: { name, version },
    })) as EnvObject;
  }

  suspend(_id: string): Promise<Instance> {
    return Promise.reject(notSupported(this.name, 'suspend'));
  }
  resume(_id: string): Promise<Instance> {
    return Promise.reject(notSupported(this.name, 'resume'));
  }
  pause(_id: string): Promise<Instance> {
    return Promise.reject(notSupported(this.name, 'pause'));
  }
  fork(_id: string, _name: string): Promise<Instance> {
    return Promise.reject(notSupported(this.name, 'fork'));
  }
  exec(_id: string, _command: string[]): Promise<ExecOutput> {
    return Promise.reject(notSupported(this.name, 'exec'));
  }
  /** The remote's instances are not actors of this Torpor: its router cannot reach them. */
  route(_id: string): Promise<ActorRef> {
    return Promise.reject(notSupported(this.name, 'route'));
  }

  async close(): Promise<void> {
    await this.dispatcher.close();
  }

  // ---------------------------------------------------------------- transport

  private async call(
    method: 'GET' | 'POST' | 'PUT' | 'DELETE',
    path: string,
    op: string,
    o: { body?: unknown; headers?: Record<string, string>; caller?: Caller } = {},
  ): Promise<unknown> {
    let last: TorporError | undefined;
    for (let attempt = 0; attempt <= this.retries; attempt++) {
      if (attempt > 0) await new Promise((r) => setTimeout(r, this.backoffMs * 2 ** (attempt - 1)));
      try {
        return await this.attempt(method, path, op, o);
      } catch (err) {
        if (!(err instanceof Retryable)) throw err;
        last = err.final;
      }
    }
    throw last!;
  }

  private async attempt(
    method: string,
    path: string,
    op: string,
    o: { body?: unknown; headers?: Record<string, string>; caller?: Caller },
  ): Promise<unknown> {
    const headers: Record<string, string> = { accept: 'application/json', ...o.headers };
    if (o.caller?.owner) headers['x-owner'] = o.caller.owner;
    if (this.apiKey) headers.authorization = `Bearer ${this.apiKey}`;
    if (o.body !== undefined) headers['content-type'] = 'application/json';
    let status: number;
    let text: string;
    try {
      const res = await request(`${this.base}${path}`, {
        method: method as 'GET',
        headers,
        dispatcher: this.dispatcher,
        headersTimeout: this.timeoutMs,
        bodyTimeout: this.timeoutMs,
        signal: AbortSignal.timeout(this.timeoutMs),
        ...(o.body !== undefined ? { body: JSON.stringify(o.body) } : {}),
      });
      status = res.statusCode;
      text = await res.body.text();
    } catch (err) {
      const timedOut = (err as Error).name === 'TimeoutError' || /timeout/i.test((err as { code?: string }).code ?? '');
      throw new Retryable(
        new TorporError(
          timedOut ? 'TIMEOUT' : 'RUNTIME_ERROR',
          `standard engine ${this.base}: ${op} ${timedOut ? `timed out after ${this.timeoutMs} ms` : `failed: ${(err as Error).message}`}`,
          { cause: err },
        ),
      );
    }
    let body: unknown;
    try {
      body = JSON.parse(text);
    } catch {
      body = undefined;
    }
    if (!isEnvelope(body)) {
      const e = new TorporError(
        STATUS_CODE[status] ?? 'RUNTIME_ERROR',
        `standard engine ${this.base}: ${op}: HTTP ${status}, not an envelope: ${text.slice(0, 200)}`,
      );
      if (RETRYABLE_STATUS.has(status)) throw new Retryable(e);
      throw e;
    }
    if (body.success && status >= 200 && status < 300) return body.data;
    const code: ErrorCode = STATUS_CODE[status] ?? STATUS_CODE[body.code ?? 0] ?? 'RUNTIME_ERROR';
    const e = new TorporError(
      code,
      `standard engine: ${op}: ${body.message || `HTTP ${status}, code ${body.code}`}`,
      typeof body.field === 'string' ? { field: body.field } : {},
    );
    if (RETRYABLE_STATUS.has(status)) throw new Retryable(e);
    throw e;
  }

  private malformed(op: string, why: string): TorporError {
    return new TorporError('RUNTIME_ERROR', `standard engine ${this.base}: ${op}: ${why}`);
  }
}
