// AEnvironment compatibility: a Fastify plugin serving, over any Engine,
//  - AEnvironment's public API: POST /env-instance, GET /env-instance/:id, GET /env-instance/:id/list
//    (id: name@version, name or *), DELETE /env-instance/:id, GET /health;
//  - the "standard" engine contract: POST/GET/DELETE /aenvironment/instance[/:id],
//    GET /aenvironment/instance?envName=X, PUT /aenvironment/instance/action/warmup (and …/cleanup),
//    so that a Torpor can be the standard engine of AEnvironment's api-service or of another Torpor.
// Every answer is the envelope {success, code, message, data}: code 0 on success (HTTP 200); on failure the HTTP
// status (also in `code`), the message naming the field, plus `field` and Torpor's `error` code.
// Ownership (see authenticate): without API keys the caller states who it is with `X-Owner` (or ?owner=), a guard
// against mistakes on a trusted network; with API keys (`torpor up --api-key owner=key`) every call needs
// `Authorization: Bearer <key>` — what AEnvironment's SDK (api_key) and CLI (AENV_API_KEY) send — and the key's
// owner is the caller on every call: it sees, gets, deletes and reaches through the MCP gateway only its own
// instances. `Idempotency-Key` on a create makes retries return the first instance.
import type { IncomingHttpHeaders } from 'node:http';
import type { FastifyError, FastifyInstance, FastifyReply, FastifyRequest } from 'fastify';
import { asTorporError, ERROR_STATUS, TorporError } from '../core/errors.ts';
import { parse } from '../core/schemas.ts';
import { bearerToken, secretEquals } from '../core/secret.ts';
import {
  type Caller,
  type CreateInstanceRequest,
  type CreateOptions,
  type Engine,
  standardEnvRequest,
} from '../engine/engine.ts';

export interface CompatOptions {
  engine: Engine;
  /** When given, every call needs one of these keys (see authenticate). */
  keys?: ApiKeys | undefined;
}

/** The owner a service key stands for: a trusted client (another Torpor's standard engine) that states in X-Owner
 * the owner it acts for. */
export const SERVICE_OWNER = '*';

/** API keys, each speaking for one owner (or, for SERVICE_OWNER, for whichever owner its caller states). */
export class ApiKeys {
  private readonly entries: readonly { owner: string; key: string }[];

  constructor(pairs: Iterable<readonly [owner: string, key: string]>) {
    const entries: { owner: string; key: string }[] = [];
    for (const [owner, key] of pairs) {
      if (owner !== SERVICE_OWNER && !/^\S{1,63}$/.test(owner)) {
        throw new TorporError('INVALID_ARGUMENT', 'api-key: an owner is 1 to 63 characters without spaces, or "*"', {
          field: 'api-key',
        });
      }
      if (key.length < 16) {
        throw new TorporError(
          'INVALID_ARGUMENT',
          `api-key: the key of owner "${owner}" is shorter than 16 characters`,
          {
            field: 'api-key',
          },
        );
      }
      entries.push({ owner, key });
    }
    this.entries = entries;
  }

  /** The owner a presented key speaks for, or undefined. Every key is compared, so the time taken does not tell
   * which one matched. */
  ownerOf(presented: string): string | undefined {
    let owner: string | undefined;
    for (const e of this.entries) if (secretEquals(presented, e.key) && owner === undefined) owner = e.owner;
    return owner;
  }
}

function single(v: string | string[] | undefined): string | undefined {
  return Array.isArray(v) ? v[0] : v;
}

function statedOwner(headers: IncomingHttpHeaders, query: unknown): string | undefined {
  const owner = single(headers['x-owner']) ?? (query as { owner?: unknown } | undefined)?.owner;
  if (owner !== undefined && typeof owner !== 'string') {
    throw new TorporError('INVALID_ARGUMENT', 'owner: must be a string', { field: 'owner' });
  }
  return owner || undefined;
}

/**
 * Who is calling, and whether its `Authorization` header was a Torpor API key (then it is consumed here and must
 * not travel further).
 * - No keys configured: the owner the caller states (X-Owner or ?owner=), if any.
 * - Keys configured: the presented key's owner; a stated owner must be that one (403). A service key's caller
 *   is whoever it states. Without a valid key: 401 when `required` (the API); otherwise (the MCP gateway, which
 *   AEnvironment's SDK calls without credentials) the caller is anonymous and only the unguessable instance id
 *   grants access.
 */
export function authenticate(
  headers: IncomingHttpHeaders,
  query: unknown,
  keys: ApiKeys | undefined,
  required: boolean,
): { caller: Caller; usedKey: boolean } {
  const stated = statedOwner(headers, query);
  if (!keys) return { caller: stated ? { owner: stated } : {}, usedKey: false };
  const presented = bearerToken(headers.authorization);
  const owner = presented === undefined ? undefined : keys.ownerOf(presented);
  if (owner === undefined) {
    if (!required) return { caller: {}, usedKey: false };
    throw new TorporError(
      'UNAUTHENTICATED',
      presented === undefined
        ? 'authorization: an API key is required (Authorization: Bearer <key>)'
        : 'authorization: the API key is not valid',
      { field: 'authorization' },
    );
  }
  if (owner === SERVICE_OWNER) return { caller: stated ? { owner: stated } : {}, usedKey: true };
  if (stated !== undefined && stated !== owner) {
    throw new TorporError('PERMISSION_DENIED', "owner: differs from the API key's owner", { field: 'owner' });
  }
  return { caller: { owner }, usedKey: true };
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

function createOptions(req: FastifyRequest, callerOf: (req: FastifyRequest) => Caller): CreateOptions {
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
  const env = parse(standardEnvRequest, objectBody(body));
  const dc = env.deploy_config ?? {};
  const pick = <K extends 'environment_variables' | 'arguments' | 'ttl' | 'owner' | 'labels'>(k: K) =>
    dc[k] === undefined || dc[k] === null ? {} : { [k]: dc[k] };
  return {
    envName: `${env.name}@${env.version}`,
    ...pick('environment_variables'),
    ...pick('arguments'),
    ...pick('ttl'),
    ...pick('owner'),
    ...pick('labels'),
    ...(dc.dataSource ? { datasource: dc.dataSource } : {}),
    ...(dc.instance_name ? { name: dc.instance_name } : {}),
  } as CreateInstanceRequest;
}

export async function compatPlugin(app: FastifyInstance, opts: CompatOptions): Promise<void> {
  const { engine } = opts;
  const callerOf = (req: FastifyRequest): Caller => authenticate(req.headers, req.query, opts.keys, true).caller;

  app.setErrorHandler((err: FastifyError | TorporError, request, reply: FastifyReply) => {
    const e = err instanceof TorporError ? err : fromFastifyError(err);
    if (e.code === 'INTERNAL') request.log.error({ err }, 'internal error');
    void reply.status(ERROR_STATUS[e.code]).send(failure(e));
  });

  // AEnvironment's clients send `Content-Type: application/json` on every request, bodiless GETs and DELETEs too
  // (httpx client defaults): an empty body is no body here, as it is to api-service.
  const json = app.getDefaultJsonParser('error', 'error');
  app.removeContentTypeParser('application/json');
  app.addContentTypeParser('application/json', { parseAs: 'string' }, (req, body, done) => {
    if (body === '') done(null, undefined);
    else json(req, body as string, done);
  });

  type Id = { Params: { id: string } };

  // ---------------------------------------------------------------- AEnvironment public API

  app.get('/health', async () => ({}));
  app.post('/env-instance', async (req) => {
    // Every engine validates the body (createInstanceRequest) and its owner (createOwner) before doing anything.
    const options = createOptions(req, callerOf);
    return ok(await engine.create(objectBody(req.body) as unknown as CreateInstanceRequest, options));
  });
  app.get('/env-instance/list', async (req) => ok(await engine.list(undefined, callerOf(req))));
  app.get<Id>('/env-instance/:id/list', async (req) => ok(await engine.list(req.params.id, callerOf(req))));
  app.get<Id>('/env-instance/:id', async (req) => ok(await engine.get(req.params.id, callerOf(req))));
  app.delete<Id>('/env-instance/:id', async (req) => {
    await engine.delete(req.params.id, callerOf(req));
    return ok('Deleted successfully');
  });

  // ---------------------------------------------------------------- the standard engine contract

  app.post('/aenvironment/instance', async (req) => {
    const options = createOptions(req, callerOf);
    return ok(await engine.create(envToCreateRequest(req.body), options));
  });
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
    callerOf(req);
    // AEnvironment's own client sends no body: every template is warm already (its golden snapshot is taken
    // when it is applied), so there is nothing more to do.
    if (req.body === undefined || req.body === null || req.body === '') return ok(null);
    const { envName } = envToCreateRequest(req.body);
    return ok(await engine.warmup(envName));
  });
  // TTLs are enforced by a timer per instance: nothing is ever left for a cleanup pass to find.
  app.put('/aenvironment/instance/action/cleanup', async (req) => {
    callerOf(req);
    return ok(0);
  });
}
