// The OpenAPI document, generated from the same zod schemas that validate requests, so it cannot drift.
import { z } from 'zod';
import { createActorRequest, execRequest, forkActorRequest, templateSpec } from '../core/schemas.ts';
import { createInstanceRequest, envObjectSchema, instanceSchema, standardEnvRequest } from '../engine/engine.ts';

const json = (schema: z.ZodType) => z.toJSONSchema(schema, { io: 'input', unrepresentable: 'any' });
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
const actorAction = (summary: string, requestBody?: object) => ({
  post: {
    summary,
    parameters: [spaceParam, nameParam],
    ...(requestBody ? { requestBody } : {}),
    responses: {
      '200': ok('Actor'),
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
      '/v1/spaces/{space}/actors/{name}/fork': actorAction('Fork from the latest snapshot', body('ForkActor')),
      '/v1/spaces/{space}/actors/{name}/exec': {
        post: {
          summary: 'Run a command in a running actor',
          parameters: [spaceParam, nameParam],
          requestBody: body('Exec'),
          responses: { '200': ok('ExecResult'), ...errors },
        },
      },
      '/v1/spaces/{space}/actors/{name}/logs': {
        get: {
          summary: 'Actor stdout/stderr (follow=true streams)',
          parameters: [spaceParam, nameParam, { name: 'follow', in: 'query', schema: { type: 'boolean' } }],
          responses: { '200': { description: 'text/plain' }, ...errors },
        },
      },
      '/v1/workers': { get: { summary: 'List workers', responses: { '200': ok('WorkerList') } } },
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
        Template: { type: 'object' },
        TemplateList: {
          type: 'object',
          properties: { items: { type: 'array', items: ref('Template') }, nextCursor: { type: 'string' } },
        },
        Actor: {
          type: 'object',
          properties: {
            space: { type: 'string' },
            name: { type: 'string' },
            status: { type: 'string' },
            version: { type: 'integer' },
          },
        },
        ActorList: {
          type: 'object',
          properties: { items: { type: 'array', items: ref('Actor') }, nextCursor: { type: 'string' } },
        },
        WorkerList: { type: 'object', properties: { items: { type: 'array' } } },
        ExecResult: {
          type: 'object',
          properties: { exitCode: { type: 'integer' }, stdout: { type: 'string' }, stderr: { type: 'string' } },
        },
        Error: {
          type: 'object',
          properties: {
            error: {
              type: 'object',
              properties: { code: { type: 'string' }, message: { type: 'string' }, field: { type: 'string' } },
            },
          },
        },
      },
    },
  };
}
