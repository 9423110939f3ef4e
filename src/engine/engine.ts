// The engine interface: what any sandbox engine behind Torpor's AEnvironment-compatible API must do (the
// instance lifecycle: create, get, list, delete, warm up) and what it may declare it can do besides (suspend,
// resume, pause, fork, exec). Instances travel as AEnvironment's EnvInstance JSON, so the `standard` engine
// passes them through unchanged.
import { z } from 'zod';
import { TorporError } from '../core/errors.ts';
import { labels as labelsSchema } from '../core/schemas.ts';

export const CAPABILITIES = ['suspend', 'resume', 'pause', 'fork', 'exec'] as const;
export type Capability = (typeof CAPABILITIES)[number];

export const INSTANCE_STATUSES = ['Pending', 'Creating', 'Running', 'Failed', 'Terminated'] as const;
export type InstanceStatus = (typeof INSTANCE_STATUSES)[number];

/** AEnvironment's Env object (envhub/models.Env), as much of it as Torpor knows. */
export interface EnvObject {
  id: string;
  name: string;
  description: string;
  version: string;
  tags: string[];
  code_url: string;
  /** EnvStatus: 6 = Ready. */
  status: number;
  artifacts: { id: string; type: string; content: string }[];
  build_config: Record<string, unknown>;
  test_config: Record<string, unknown>;
  deploy_config: Record<string, unknown>;
  created_at: string;
  updated_at: string;
}

/** AEnvironment's EnvInstance JSON. */
export interface Instance {
  id: string;
  env: EnvObject | null;
  status: InstanceStatus;
  created_at: string;
  updated_at: string;
  ip: string;
  /** A Go duration ("30m"), or "" for none. */
  ttl: string;
  owner: string;
  labels: Record<string, string>;
}

export interface CreateInstanceRequest {
  /** "name@version". */
  envName: string;
  datasource?: string;
  environment_variables?: Record<string, string>;
  arguments?: string[];
  ttl?: string;
  owner?: string;
  labels?: Record<string, string>;
  /** Torpor extension: a stable instance name; creating it again (same owner) returns the same instance. */
  name?: string;
}

/** Who is calling: a stated owner that differs from an instance's owner is refused. */
export interface Caller {
  owner?: string;
}

export interface CreateOptions extends Caller {
  /** Retries of a create carrying the same key (and owner) return the first instance, never a second one. */
  idempotencyKey?: string;
}

export interface ExecOutput {
  exitCode: number;
  stdout: string;
  stderr: string;
}

export interface Engine {
  /** "local", "standard", … — named in every NOT_SUPPORTED error. */
  readonly name: string;
  readonly capabilities: ReadonlySet<Capability>;
  create(req: CreateInstanceRequest, opts?: CreateOptions): Promise<Instance>;
  get(id: string, caller?: Caller): Promise<Instance>;
  /** envName: "name@version", "name", or undefined / "" / "*" for every instance. */
  list(envName?: string, caller?: Caller): Promise<Instance[]>;
  delete(id: string, caller?: Caller): Promise<void>;
  /** Prepares the environment so that the next create is fast; returns the env. */
  warmup(envName: string): Promise<EnvObject>;
  suspend(id: string, caller?: Caller): Promise<Instance>;
  resume(id: string, caller?: Caller): Promise<Instance>;
  pause(id: string, caller?: Caller): Promise<Instance>;
  fork(id: string, name: string, caller?: Caller): Promise<Instance>;
  exec(id: string, command: string[], caller?: Caller): Promise<ExecOutput>;
  close(): Promise<void>;
}

export function notSupported(engine: string, op: string): TorporError {
  return new TorporError('NOT_SUPPORTED', `${engine} engine does not support ${op}`, { field: op });
}

// ------------------------------------------------------------------ envName, ttl

/** Splits "name@version" strictly (as AEnvironment's SplitEnvNameVersionStrict does). */
export function splitEnvName(envName: string, field = 'envName'): { name: string; version: string } {
  const parts = envName.split('@');
  if (parts.length !== 2 || !parts[0] || !parts[1]) {
    throw new TorporError('INVALID_ARGUMENT', `${field}: must be "name@version", got "${envName}"`, { field });
  }
  return { name: parts[0], version: parts[1] };
}

/** The Torpor template an env maps to: "<name>-<version>" lower-cased, every other character than [a-z0-9-]
 * replaced by "-" (templates are immutable, so a version is part of the name): "counter@1.0" → "counter-1-0". */
export function templateFor(envName: string, field = 'envName'): string {
  const { name, version } = splitEnvName(envName, field);
  const t = `${name}-${version}`.toLowerCase().replace(/[^a-z0-9-]/g, '-');
  if (!/^[a-z0-9]([-a-z0-9]*[a-z0-9])?$/.test(t) || t.length > 63) {
    throw new TorporError('INVALID_ARGUMENT', `${field}: "${envName}" does not map to a template name ("${t}")`, {
      field,
    });
  }
  return t;
}

const UNIT_MS: Record<string, number> = { ns: 1e-6, us: 1e-3, µs: 1e-3, ms: 1, s: 1000, m: 60_000, h: 3_600_000 };
/** Longest TTL accepted: 30 days. */
export const MAX_TTL_MS = 30 * 24 * 3_600_000;

/** Parses a Go duration ("30m", "1h30m", "1.5h", "90s"); "" means no TTL (undefined). */
export function parseTtl(ttl: string | undefined, field = 'ttl'): number | undefined {
  if (ttl === undefined || ttl === '') return undefined;
  const re = /(\d+(?:\.\d+)?|\.\d+)(ns|us|µs|ms|s|m|h)/gy;
  let ms = 0;
  let consumed = 0;
  for (let m = re.exec(ttl); m; m = re.exec(ttl)) {
    ms += Number(m[1]) * UNIT_MS[m[2]!]!;
    consumed = re.lastIndex;
  }
  if (consumed !== ttl.length || ms <= 0 || ms > MAX_TTL_MS) {
    throw new TorporError(
      'INVALID_ARGUMENT',
      `${field}: must be a positive duration such as "30m" or "1h30m", at most 720h, got "${ttl}"`,
      { field },
    );
  }
  return Math.round(ms);
}

/** RFC 3339 without fractional seconds (AEnvironment's cleanup parses this). */
export const rfc3339 = (t: string | number | Date): string => new Date(t).toISOString().replace(/\.\d{3}Z$/, 'Z');

// ------------------------------------------------------------------ input schema

const envVarName = z.string().regex(/^[A-Za-z_][A-Za-z0-9_]*$/, 'must be a valid environment variable name');

export const createInstanceRequest = z
  .object({
    envName: z.string({ error: 'is required' }).min(1, 'is required'),
    datasource: z.string().optional(),
    environment_variables: z.record(envVarName, z.string()).nullish(),
    arguments: z.array(z.string()).nullish(),
    ttl: z.string().optional(),
    owner: z.string().max(63, 'must be at most 63 characters').optional(),
    labels: labelsSchema.nullish(),
    name: z
      .string()
      .max(63)
      .regex(/^[a-z0-9]([-a-z0-9]*[a-z0-9])?$/, 'must be a DNS-1123 label')
      .optional(),
  })
  .passthrough();
