// AEnvironment compatibility: a Fastify plugin serving, over any Engine,
//  - AEnvironment's public API: POST /env-instance, GET /env-instance/:id, GET /env-instance/:id/list
//    (id: name@version, name or *), DELETE /env-instance/:id, GET /health;
//  - the "standard" engine contract: POST/GET/DELETE /aenvironment/instance[/:id],
//    GET /aenvironment/instance?envName=X, PUT /aenvironment/instance/action/warmup (and …/cleanup),
//    so that a Torpor can be the standard engine of AEnvironment's api-service or of another Torpor.
// Every answer is the envelope {success, code, message, data}: code 0 on success (HTTP 200); on failure the HTTP
// status (also in `code`), the message naming the field, plus `field` and Torpor's `error` code.
// The caller states who it is with `X-Owner` (or ?owner=); a stated owner other than the instance's is refused.
// `Idempotency-Key` on a create makes retries return the first instance.
import type { FastifyError, FastifyInstance, FastifyReply, FastifyRequest } from 'fastify';
import { asTorporError, ERROR_STATUS, TorporError } from '../core/errors.ts';
import type { Caller, CreateInstanceRequest, CreateOptions, Engine } from '../engine/engine.ts';

export interface CompatOptions {
  engine: Engine;
}

export interface Envelope<T = unknown> {
  success: boolean;
  code: number;
  message: string;
  data: T;
  field?: string;
  error?: string;
}

export const ok = <T>(data: T): Envelope<T> => ({ success: true, code: 0, message: '', data });

export function failure(e: TorporError): Envelope<null> {
  return {
    success: false,
    code: ERROR_STATUS[e.code],
    message: e.message,
    data: null,
    ...(e.field ? { field: e.field } : {}),
    error: e.code,
  };
}

function fromFastifyError(err: FastifyError): TorporError {
  if (err.code === 'FST_ERR_CTP_BODY_TOO_LARGE') {
    return new TorporError('PAYLOAD_TOO_LARGE', 'request body is larger than the server accepts', { field: '(body)' });
  }
  if (err.code?.startsWith('FST_ERR_CTP') || err instanceof SyntaxError || err.statusCode === 400) {
    return new TorporError('INVALID_ARGUMENT', `(body): ${err.message}`, { field: '(body)' });
  }
  return asTorporError(err);
}

function single(v: string | string[] | undefined): string | undefined {
  return Array.isArray(v) ? v[0] : v;
}

function callerOf(req: FastifyRequest): Caller {
  const owner = single(req.headers['x-owner']) ?? (req.query as { owner?: unknown } | undefined)?.owner;
  if (owner !== undefined && typeof owner !== 'string') {
    throw new TorporError('INVALID_ARGUMENT', 'owner: must be a string', { field: 'owner' });
  }
  return owner ? { owner } : {};
}

function createOptions(req: FastifyRequest): CreateOptions {
  const key = single(req.headers['idempotency-key']);
  if (key !== undefined && (key.length === 0 || key.length > 255)) {
    throw new TorporError('INVALID_ARGUMENT', 'Idempotency-Key: must be 1 to 255 characters', {
      field: 'Idempotency-Key',
    });
  }
  return { ...callerOf(req), ...(key ? { idempotencyKey: key } : {}) };
}

function objectBody(body: unknown, field = '(body)'): Record<string, unknown> {
  if (typeof body !== 'object' || body === null || Array.isArray(body)) {
    throw new TorporError('INVALID_ARGUMENT', `${field}: must be a JSON object`, { field });
  }
  return body as Record<string, unknown>;
}

/** The standard contract's create body is AEnvironment's Env object: name, version and deploy_config (with
 * environment_variables, arguments, ttl, owner, labels as api-service puts them there). */
export function envToCreateRequest(body: unknown): CreateInstanceRequest {
  const env = objectBody(body);
  for (const field of ['name', 'version'] as const) {
    if (typeof env[field] !== 'string' || env[field] === '') {
      throw new TorporError('INVALID_ARGUMENT', `${field}: is required (a non-empty string)`, { field });
    }
  }
  const deploy = env.deploy_config === undefined || env.deploy_config === null ? {} : env.deploy_config;
  const dc = objectBody(deploy, 'deploy_config');
  const pick = <K extends string>(k: K) => (dc[k] === undefined || dc[k] === null ? {} : { [k]: dc[k] });
  return {
    envName: `${env.name as string}@${env.version as string}`,
    ...pick('environment_variables'),
    ...pick('arguments'),
    ...pick('ttl'),
    ...pick('owner'),
    ...pick('labels'),
    ...(typeof dc.dataSource === 'string' ? { datasource: dc.dataSource } : {}),
    ...(typeof dc.instance_name === 'string' ? { name: dc.instance_name } : {}),
  } as CreateInstanceRequest;
}

export async function compatPlugin(app: FastifyInstance, opts: CompatOptions): Promise<void> {
  const { engine } = opts;

  app.setErrorHandler((err: FastifyError | TorporError, request, reply: FastifyReply) => {
    const e = err instanceof TorporError ? err : fromFastifyError(err);
    if (e.code === 'INTERNAL') request.log.error({ err }, 'internal error');
    void reply.status(ERROR_STATUS[e.code]).send(failure(e));
  });

  type Id = { Params: { id: string } };

  // ---------------------------------------------------------------- AEnvironment public API

  app.get('/health', async () => ({}));
  app.post('/env-instance', async (req) => {
    const body = objectBody(req.body) as unknown as CreateInstanceRequest;
    return ok(await engine.create(body, createOptions(req)));
  });
  app.get('/env-instance/list', async (req) => ok(await engine.list(undefined, callerOf(req))));
  app.get<Id>('/env-instance/:id/list', async (req) => ok(await engine.list(req.params.id, callerOf(req))));
  app.get<Id>('/env-instance/:id', async (req) => ok(await engine.get(req.params.id, callerOf(req))));
  app.delete<Id>('/env-instance/:id', async (req) => {
    await engine.delete(req.params.id, callerOf(req));
    return ok('Deleted successfully');
  });

  // ---------------------------------------------------------------- the standard engine contract

  app.post('/aenvironment/instance', async (req) =>
    ok(await engine.create(envToCreateRequest(req.body), createOptions(req))),
  );
  app.get<{ Querystring: { envName?: unknown } }>('/aenvironment/instance', async (req) => {
    const envName = req.query.envName;
    if (envName !== undefined && typeof envName !== 'string') {
      throw new TorporError('INVALID_ARGUMENT', 'envName: must be given once', { field: 'envName' });
    }
    return ok(await engine.list(envName, callerOf(req)));
  });
  app.get<Id>('/aenvironment/instance/:id', async (req) => ok(await engine.get(req.params.id, callerOf(req))));
  app.delete<Id>('/aenvironment/instance/:id', async (req) => {
    await engine.delete(req.params.id, callerOf(req));
    return ok(true);
  });
  app.put('/aenvironment/instance/action/warmup', async (req) => {
    // AEnvironment's own client sends no body: every template is warm already (its golden snapshot is taken
    // when it is applied), so there is nothing more to do.
    if (req.body === undefined || req.body === null || req.body === '') return ok(null);
    const { envName } = envToCreateRequest(req.body);
    return ok(await engine.warmup(envName));
  });
  // TTLs are enforced by a timer per instance: nothing is ever left for a cleanup pass to find.
  app.put('/aenvironment/instance/action/cleanup', async () => ok(0));
}
