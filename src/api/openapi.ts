// The OpenAPI document, generated from the same zod schemas that validate requests, so it cannot drift.
import { z } from 'zod';
import { createActorRequest, execRequest, forkActorRequest, templateSpec } from '../core/schemas.ts';

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
    },
    components: {
      schemas: {
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
