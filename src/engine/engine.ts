// The engine interface: what any sandbox engine behind Torpor's AEnvironment-compatible API must do (the
// instance lifecycle: create, get, list, delete, warm up) and what it may declare it can do besides (suspend,
// resume, pause, fork, exec). Instances travel as AEnvironment's EnvInstance JSON, so the `standard` engine
// passes them through unchanged.
import { z } from 'zod';
import { TorporError } from '../core/errors.ts';
import { labels as labelsSchema } from '../core/schemas.ts';
import type { ActorRef } from '../core/types.ts';

/** What an engine may do besides the instance lifecycle. `route`: its instances are actors in this Torpor's store,
 * so tool traffic reaches them through the router (by instance id). */
export const CAPABILITIES = ['suspend', 'resume', 'pause', 'fork', 'exec', 'route'] as const;
export type Capability = (typeof CAPABILITIES)[number];

export const INSTANCE_STATUSES = ['Pending', 'Creating', 'Running', 'Failed', 'Terminated'] as const;
export type InstanceStatus = (typeof INSTANCE_STATUSES)[number];

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

/** Who is calling: a caller that states an owner sees and touches only that owner's instances. */
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
  /** The actor that tool traffic for this instance goes to (the router proxies to it; nothing else does). */
  route(id: string, caller?: Caller): Promise<ActorRef>;
  close(): Promise<void>;
}

/** The owner a create is for: the caller's, or the body's when the caller states none; both must agree. */
export function createOwner(req: { owner?: string | undefined }, caller: Caller): string | undefined {
  if (req.owner && caller.owner !== undefined && req.owner !== caller.owner) {
    throw new TorporError('PERMISSION_DENIED', 'owner: differs from the caller', { field: 'owner' });
  }
  return caller.owner ?? (req.owner || undefined);
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

const TTL_RULE = 'must be a positive duration such as "30m" or "1h30m", at most 720h';

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
    throw new TorporError('INVALID_ARGUMENT', `${field}: ${TTL_RULE}, got "${ttl}"`, { field });
  }
  return Math.round(ms);
}

/** RFC 3339 without fractional seconds (AEnvironment's cleanup parses this). */
export const rfc3339 = (t: string | number | Date): string => new Date(t).toISOString().replace(/\.\d{3}Z$/, 'Z');

// ------------------------------------------------------------------ schemas (validation and the OpenAPI document)

function validTtl(ttl: string): boolean {
  try {
    parseTtl(ttl);
    return true;
  } catch {
    return false;
  }
}

const envVarName = z.string().regex(/^[A-Za-z_][A-Za-z0-9_]*$/, 'must be a valid environment variable name');

/** What a create may carry besides the env, in AEnvironment's field names. */
const instanceFields = {
  environment_variables: z.record(envVarName, z.string()).nullish(),
  arguments: z.array(z.string()).nullish(),
  ttl: z
    .string()
    .optional()
    .refine((v) => v === undefined || validTtl(v), { error: (issue) => `${TTL_RULE}, got "${String(issue.input)}"` })
    .describe('a Go duration ("30m", "1h30m"): the instance is deleted that long after creation'),
  owner: z.string().max(63, 'must be at most 63 characters').optional(),
  labels: labelsSchema.nullish(),
};

/** Body of `POST /env-instance` (AEnvironment's CreateEnvInstanceRequest). */
export const createInstanceRequest = z
  .object({
    envName: z
      .string({ error: 'is required' })
      .min(1, 'is required')
      .regex(/^[^@]+@[^@]+$/, 'must be "name@version"')
      .describe('"name@version"'),
    datasource: z.string().optional(),
    ...instanceFields,
    name: z
      .string()
      .max(63)
      .regex(/^[a-z0-9]([-a-z0-9]*[a-z0-9])?$/, 'must be a DNS-1123 label')
      .optional()
      .describe('Torpor extension: a stable instance name; creating it again (same owner) answers the same instance'),
  })
  .passthrough();

/** Body of the standard contract's `POST /aenvironment/instance` and `PUT …/action/warmup`: AEnvironment's Env
 * object (envhub/models.Env), of which name, version and deploy_config matter (api-service puts the create's
 * fields in deploy_config); the rest passes through. */
export const standardEnvRequest = z
  .object({
    name: z.string({ error: 'is required (a non-empty string)' }).min(1, 'is required (a non-empty string)'),
    version: z.string({ error: 'is required (a non-empty string)' }).min(1, 'is required (a non-empty string)'),
    deploy_config: z
      .object({
        ...instanceFields,
        dataSource: z.string().optional(),
        instance_name: createInstanceRequest.shape.name,
      })
      .passthrough()
      .nullish(),
  })
  .passthrough();

/** AEnvironment's Env object (envhub/models.Env), as much of it as Torpor knows. */
export const envObjectSchema = z.object({
  id: z.string(),
  name: z.string(),
  description: z.string(),
  version: z.string(),
  tags: z.array(z.string()),
  code_url: z.string(),
  status: z.number().int().describe('EnvStatus: 6 = Ready'),
  artifacts: z.array(z.object({ id: z.string(), type: z.string(), content: z.string() })),
  build_config: z.record(z.string(), z.unknown()),
  test_config: z.record(z.string(), z.unknown()),
  deploy_config: z.record(z.string(), z.unknown()),
  created_at: z.string(),
  updated_at: z.string(),
});
export type EnvObject = z.infer<typeof envObjectSchema>;

/** AEnvironment's EnvInstance JSON. */
export const instanceSchema = z.object({
  id: z.string(),
  env: envObjectSchema.nullable(),
  status: z.enum(INSTANCE_STATUSES),
  created_at: z.string().describe('RFC 3339, seconds'),
  updated_at: z.string(),
  ip: z.string().describe('the address while running, else ""; tool traffic goes through the MCP gateway by id'),
  ttl: z.string().describe('a Go duration ("30m"), or "" for none'),
  owner: z.string(),
  labels: z.record(z.string(), z.string()),
});
export type Instance = z.infer<typeof instanceSchema>;
