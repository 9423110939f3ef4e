// The OpenAPI document, generated from the same zod schemas that validate requests, so it cannot drift.
import { z } from 'zod';
import { ERROR_STATUS } from '../core/errors.ts';
import { createActorRequest, execRequest, forkActorRequest, runtimeClass, templateSpec } from '../core/schemas.ts';
import { ACTOR_STATUSES } from '../core/types.ts';
import { createInstanceRequest, envObjectSchema, instanceSchema, standardEnvRequest } from '../engine/engine.ts';

const json = (schema: z.ZodType, io: 'input' | 'output' = 'input') =>
  z.toJSONSchema(schema, { io, unrepresentable: 'any' });
const string = { type: 'string' };
const integer = { type: 'integer' };
const number = { type: 'number' };
const time = { type: 'string', format: 'date-time' };
const stringMap = { type: 'object', additionalProperties: { type: 'string' } };
const object = (properties: Record<string, object>, required: string[] = Object.keys(properties)) => ({
  type: 'object',
  properties,
  required,
});
const list = (item: string) => object({ items: { type: 'array', items: ref(item) }, nextCursor: string }, ['items']);
const ref = (name: string) => ({ $ref: `#/components/schemas/${name}` });
const body = (name: string) => ({ required: true, content: { 'application/json': { schema: ref(name) } } });
const ok = (name: string, description = 'OK') => ({
  description,
  content: { 'application/json': { schema: ref(name) } },
});
const errors = {
  '400': ok('Error', 'Invalid argument'),
  '404': ok('Error', 'Not found'),
  '409': ok('Error', 'Conflict or failed precondition'),
};
const spaceParam = { name: 'space', in: 'path', required: true, schema: { type: 'string' } };
const nameParam = { name: 'name', in: 'path', required: true, schema: { type: 'string' } };
const actorAction = (summary: string, requestBody?: object, status = '200') => ({
  post: {
    summary,
    parameters: [spaceParam, nameParam],
    ...(requestBody ? { requestBody } : {}),
    responses: {
      [status]: ok('Actor'),
      ...errors,
      '502': ok('Error', 'Runtime failure'),
      '503': ok('Error', 'No capacity'),
    },
  },
});

// ------------------------------------------------------------------ AEnvironment compatibility (src/api/compat.ts)

/** {success, code, message, data}: code 0 and HTTP 200 on success. */
const envelope = (data: object) => ({
  type: 'object',
  required: ['success', 'code', 'message', 'data'],
  properties: {
    success: { type: 'boolean', const: true },
    code: { type: 'integer', const: 0 },
    message: { type: 'string' },
    data,
  },
});
const compatOk = (data: object) => ({
  description: 'OK',
  content: { 'application/json': { schema: envelope(data) } },
});
const compatError = (description: string) => ({
  description,
  content: { 'application/json': { schema: ref('CompatError') } },
});
const compatErrors = {
  '400': compatError('Invalid argument (`field` names it)'),
  '401': compatError('API keys are configured and none valid was presented'),
  '403': compatError("Another owner's instance, or an owner other than the API key's"),
  '404': compatError('No such instance or env'),
  '501': compatError('Not supported by this engine'),
};
const ownerHeaders = [
  {
    name: 'X-Owner',
    in: 'header',
    schema: { type: 'string' },
    description:
      'The owner acting (also ?owner=). Without API keys: a stated owner sees only its instances. With API keys: ' +
      "must be the key's owner, or anyone for a service key",
  },
];
const idParam = { name: 'id', in: 'path', required: true, schema: { type: 'string' }, description: 'instance id' };
const idempotencyKey = {
  name: 'Idempotency-Key',
  in: 'header',
  schema: { type: 'string', minLength: 1, maxLength: 255 },
  description: 'retries of a create with the same key (and owner) answer the first instance',
};
const security = [{}, { apiKey: [] }];

function compatPaths(): Record<string, object> {
  const instance = ref('EnvInstance');
  const list = { type: 'array', items: instance };
  const create = (summary: string, schema: string) => ({
    post: {
      summary,
      security,
      parameters: [...ownerHeaders, idempotencyKey],
      requestBody: body(schema),
      responses: { '200': compatOk(instance), ...compatErrors },
    },
  });
  const getAndDelete = (deleted: object) => ({
    get: {
      summary: 'Get an instance',
      security,
      parameters: [idParam, ...ownerHeaders],
      responses: { '200': compatOk(instance), ...compatErrors },
    },
    delete: {
      summary: 'Delete an instance',
      security,
      parameters: [idParam, ...ownerHeaders],
      responses: { '200': compatOk(deleted), ...compatErrors },
    },
  });
  return {
    '/health': { get: { summary: "AEnvironment's health check", responses: { '200': { description: '{}' } } } },
    '/env-instance': create('Create an instance of env "name@version" (AEnvironment public API)', 'CreateEnvInstance'),
    '/env-instance/{id}': getAndDelete({ type: 'string', const: 'Deleted successfully' }),
    '/env-instance/{id}/list': {
      get: {
        summary: 'List instances of an env: id is "name@version", "name" or "*"',
        security,
        parameters: [{ ...idParam, description: '"name@version", "name" or "*"' }, ...ownerHeaders],
        responses: { '200': compatOk(list), ...compatErrors },
      },
    },
    '/aenvironment/instance': {
      ...create('Create an instance from an Env object (the standard engine contract)', 'StandardEnv'),
      get: {
        summary: 'List instances (of envName, when given)',
        security,
        parameters: [{ name: 'envName', in: 'query', schema: { type: 'string' } }, ...ownerHeaders],
        responses: { '200': compatOk(list), ...compatErrors },
      },
    },
    '/aenvironment/instance/{id}': getAndDelete({ type: 'boolean', const: true }),
    '/aenvironment/instance/action/warmup': {
      put: {
        summary: 'Warm an env up (no body: nothing to do, every template is warm once applied)',
        security,
        requestBody: { required: false, content: { 'application/json': { schema: ref('StandardEnv') } } },
        responses: { '200': compatOk({ oneOf: [ref('Env'), { type: 'null' }] }), ...compatErrors },
      },
    },
    '/aenvironment/instance/action/cleanup': {
      put: {
        summary: 'Expired-instance cleanup: always 0 (every TTL is enforced by its own timer)',
        security,
        responses: { '200': compatOk({ type: 'integer', const: 0 }), ...compatErrors },
      },
    },
  };
}

export function openApiDocument(): object {
  return {
    openapi: '3.1.0',
    info: { title: 'Torpor API', version: '1' },
    paths: {
      '/healthz': { get: { summary: 'Liveness', responses: { '200': { description: 'OK' } } } },
      '/metrics': { get: { summary: 'Prometheus metrics', responses: { '200': { description: 'text/plain' } } } },
      '/v1/templates': {
        get: { summary: 'List templates', responses: { '200': ok('TemplateList') } },
        post: {
          summary: 'Create a template (JSON or YAML; idempotent for an identical spec)',
          requestBody: body('TemplateSpec'),
          responses: { '200': ok('Template'), '201': ok('Template'), ...errors },
        },
      },
      '/v1/templates/{name}': {
        get: { summary: 'Get a template', parameters: [nameParam], responses: { '200': ok('Template'), ...errors } },
      },
      '/v1/spaces/{space}/actors': {
        get: { summary: 'List actors', parameters: [spaceParam], responses: { '200': ok('ActorList') } },
        post: {
          summary: 'Create an actor (SUSPENDED)',
          parameters: [spaceParam],
          requestBody: body('CreateActor'),
          responses: { '201': ok('Actor'), ...errors },
        },
      },
      '/v1/spaces/{space}/actors/{name}': {
        get: {
          summary: 'Get an actor',
          parameters: [spaceParam, nameParam],
          responses: { '200': ok('Actor'), ...errors },
        },
        delete: {
          summary: 'Delete an actor',
          parameters: [spaceParam, nameParam],
          responses: { '204': { description: 'Deleted' }, ...errors },
        },
      },
      '/v1/spaces/{space}/actors/{name}/resume': actorAction('Resume (restore on a free worker)', {
        required: false,
        content: { 'application/json': { schema: { type: 'object', properties: { worker: { type: 'string' } } } } },
      }),
      '/v1/spaces/{space}/actors/{name}/suspend': actorAction('Suspend to durable storage'),
      '/v1/spaces/{space}/actors/{name}/pause': actorAction('Pause (checkpoint kept on the node)'),
      '/v1/spaces/{space}/actors/{name}/fork': actorAction('Fork from the latest snapshot', body('ForkActor'), '201'),
      '/v1/spaces/{space}/actors/{name}/exec': {
        post: {
          summary:
            'Run a command in a running actor. With Accept: application/x-ndjson the output streams as it is ' +
            'produced: one ExecEvent per line ({stdout} / {stderr} chunks, then {exitCode}, or {error} when the ' +
            'run fails midway); a failure before any output is an ordinary error response.',
          parameters: [spaceParam, nameParam],
          requestBody: body('Exec'),
          responses: {
            '200': {
              description: 'OK',
              content: {
                'application/json': { schema: ref('ExecResult') },
                'application/x-ndjson': { schema: ref('ExecEvent') },
              },
            },
            ...errors,
            '502': ok('Error', 'Runtime failure'),
          },
        },
      },
      '/v1/spaces/{space}/actors/{name}/logs': {
        get: {
          summary: 'Actor stdout/stderr (follow=true streams)',
          parameters: [spaceParam, nameParam, { name: 'follow', in: 'query', schema: { type: 'boolean' } }],
          responses: { '200': { description: 'text/plain' }, ...errors },
        },
      },
      '/v1/spaces/{space}/actors/{name}/transfers': {
        get: {
          summary:
            'Snapshot transfer progress of the actor as Server-Sent Events (`progress`: {direction: upload|download, ' +
            'bytesDone, bytesTotal}) while the client listens; a comment line first confirms the subscription',
          parameters: [spaceParam, nameParam],
          responses: { '200': { description: 'text/event-stream' }, ...errors },
        },
      },
      '/v1/actors': { get: { summary: 'List actors of every space', responses: { '200': ok('ActorList') } } },
      '/v1/workers': { get: { summary: 'List workers', responses: { '200': ok('WorkerList') } } },
      '/v1/operations': {
        get: {
          summary: 'Recent finished operations (kept in memory since the server started), oldest first',
          parameters: [
            { name: 'limit', in: 'query', schema: { type: 'integer', minimum: 1, maximum: 500 } },
            { name: 'actor', in: 'query', description: "only this actor's", schema: { type: 'string' } },
            {
              name: 'space',
              in: 'query',
              description: 'the actor\'s space (default "default")',
              schema: { type: 'string' },
            },
          ],
          responses: { '200': ok('OperationList'), ...errors },
        },
      },
      '/v1/storage': {
        get: {
          summary: 'Snapshot storage used (measured at most every 5 s)',
          responses: { '200': ok('StorageUsage'), '501': ok('Error', 'Not measured by this server') },
        },
      },
      '/v1/events': {
        get: {
          summary:
            'Server-Sent Events: `snapshot` ({actors, workers, operations, storage}) once, then `actor` ' +
            '({key, actor|null}), `worker` ({key, worker|null}), `operation` (Operation) and `storage` ' +
            '(StorageUsage) as they change',
          responses: { '200': { description: 'text/event-stream' } },
        },
      },
      '/dashboard/': { get: { summary: 'The web dashboard', responses: { '200': { description: 'text/html' } } } },
      ...compatPaths(),
    },
    components: {
      securitySchemes: {
        apiKey: { type: 'http', scheme: 'bearer', description: 'an API key (torpor up --api-key owner=key)' },
      },
      schemas: {
        CreateEnvInstance: json(createInstanceRequest),
        StandardEnv: json(standardEnvRequest),
        Env: json(envObjectSchema),
        EnvInstance: json(instanceSchema),
        CompatError: {
          type: 'object',
          required: ['success', 'code', 'message', 'data'],
          properties: {
            success: { type: 'boolean', const: false },
            code: { type: 'integer', description: 'the HTTP status' },
            message: { type: 'string', description: 'names the field' },
            data: { type: 'null' },
            field: { type: 'string' },
            error: { type: 'string', description: "Torpor's stable error code" },
          },
        },
        TemplateSpec: json(templateSpec),
        CreateActor: json(createActorRequest),
        ForkActor: json(forkActorRequest),
        Exec: json(execRequest),
        Template: {
          allOf: [json(templateSpec, 'output'), object({ createdAt: time, goldenSnapshot: string }, ['createdAt'])],
        },
        TemplateList: list('Template'),
        ActorStatus: { type: 'string', enum: [...ACTOR_STATUSES] },
        Phases: { type: 'object', additionalProperties: number, description: 'milliseconds per phase' },
        Operation: object(
          {
            kind: { type: 'string', enum: ['create', 'resume', 'suspend', 'pause', 'fork', 'delete', 'reconcile'] },
            startedAt: time,
            finishedAt: time,
            phases: ref('Phases'),
            snapshot: object({
              rawBytes: integer,
              storedBytes: integer,
              uploadedChunks: integer,
              reusedChunks: integer,
              zeroChunks: integer,
              deltaFiles: integer,
            }),
            error: string,
          },
          ['kind', 'startedAt', 'phases'],
        ),
        Actor: object(
          {
            space: string,
            name: string,
            template: string,
            status: ref('ActorStatus'),
            version: integer,
            labels: stringMap,
            snapshot: { ...string, description: 'manifest key of the latest durable snapshot' },
            history: { type: 'array', items: string },
            worker: string,
            node: string,
            address: { ...string, description: 'host:port on the worker, while RUNNING' },
            localSnapshot: string,
            transitionDeadline: time,
            reason: string,
            lastOperation: ref('Operation'),
            lastActivity: time,
            createdAt: time,
            updatedAt: time,
          },
          [
            'space',
            'name',
            'template',
            'status',
            'version',
            'labels',
            'history',
            'lastActivity',
            'createdAt',
            'updatedAt',
          ],
        ),
        ActorList: list('Actor'),
        Worker: object(
          {
            id: string,
            node: string,
            runtime: json(runtimeClass),
            state: { type: 'string', enum: ['free', 'busy'] },
            host: string,
            actor: object({ space: string, name: string }),
            leaseExpiresAt: time,
          },
          ['id', 'node', 'runtime', 'state', 'host', 'leaseExpiresAt'],
        ),
        WorkerList: list('Worker'),
        OperationRecord: {
          allOf: [ref('Operation'), object({ space: string, name: string, durationMs: number })],
        },
        OperationList: object({ items: { type: 'array', items: ref('OperationRecord') } }),
        StorageUsage: object({ objects: integer, bytes: integer }),
        ExecResult: object({ exitCode: integer, stdout: string, stderr: string }),
        ExecEvent: object({ stdout: string, stderr: string, exitCode: integer, error: ref('ErrorBody') }, []),
        ErrorBody: object(
          { code: { type: 'string', enum: Object.keys(ERROR_STATUS) }, message: string, field: string },
          ['code', 'message'],
        ),
        Error: object({ error: ref('ErrorBody') }),
      },
    },
  };
}
