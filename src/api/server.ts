// The REST API under /v1: thin handlers over the lifecycle. Every error leaves as
// { error: { code, message, field? } } with the status its code maps to.
import Fastify, { type FastifyError } from 'fastify';
import type { Logger } from 'pino';
import { parse as parseYaml } from 'yaml';
import type { Lifecycle } from '../control/lifecycle.ts';
import type { Metrics } from '../control/metrics.ts';
import { asTorporError, ERROR_STATUS, TorporError } from '../core/errors.ts';
import { listQuery, parse } from '../core/schemas.ts';
import { withCallerTrace } from '../core/trace.ts';
import { DEFAULT_SPACE } from '../core/types.ts';
import type { Engine } from '../engine/engine.ts';
import type { StateStore } from '../store/store.ts';
import { type ApiKeys, compatPlugin } from './compat.ts';
import { dashboardPlugin } from './dashboard.ts';
import { execStream } from './exec-stream.ts';
import { CachedUsage, RecentOperations, type StorageMeter, streamEvents } from './live.ts';
import { type NodesOptions, nodesPlugin } from './nodes.ts';
import { openApiDocument } from './openapi.ts';

export interface ApiOptions {
  lifecycle: Lifecycle;
  store: StateStore;
  metrics: Metrics;
  log: Logger;
  /** Largest request body accepted, in bytes. */
  bodyLimit?: number;
  /** Serves the AEnvironment API and the standard engine contract over this engine (src/api/compat.ts). */
  instances?: Engine;
  /** The snapshot store, for `GET /v1/storage` and the dashboard (FsBlobStore measures itself). */
  storage?: StorageMeter;
  /** When given, the AEnvironment API needs one of these keys. */
  instanceKeys?: ApiKeys | undefined;
  /** Node registration for agents in other processes (torpor server): /v1/nodes, with the agent token. */
  nodes?: Omit<NodesOptions, 'store'>;
}

type Params = { space: string; name: string };

function fromFastifyError(err: FastifyError): TorporError {
  if (err.code === 'FST_ERR_CTP_BODY_TOO_LARGE') {
    return new TorporError('PAYLOAD_TOO_LARGE', 'request body is larger than the server accepts', { field: '(body)' });
  }
  if (err.code?.startsWith('FST_ERR_CTP') || err instanceof SyntaxError || err.statusCode === 400) {
    return new TorporError('INVALID_ARGUMENT', `request body: ${err.message}`, { field: '(body)' });
  }
  return asTorporError(err);
}

export function buildApi(opts: ApiOptions) {
  const { lifecycle, store, metrics } = opts;
  const app = Fastify({
    loggerInstance: opts.log,
    bodyLimit: opts.bodyLimit ?? 1024 * 1024,
  });

  app.addContentTypeParser(
    ['application/yaml', 'application/x-yaml', 'text/yaml'],
    { parseAs: 'string' },
    (_req, text, done) => {
      try {
        done(null, parseYaml(text as string));
      } catch (err) {
        done(
          new TorporError('INVALID_ARGUMENT', `request body: ${(err as Error).message}`, { field: '(body)' }),
          undefined,
        );
      }
    },
  );

  app.setErrorHandler((err: FastifyError | TorporError, request, reply) => {
    const e = err instanceof TorporError ? err : fromFastifyError(err);
    if (e.code === 'INTERNAL') request.log.error({ err }, 'internal error');
    void reply.status(ERROR_STATUS[e.code]).send({ error: e.toJSON() });
  });
  app.setNotFoundHandler((request, reply) => {
    void reply.status(404).send({ error: { code: 'NOT_FOUND', message: `no route ${request.method} ${request.url}` } });
  });

  const operations = new RecentOperations(store);
  const storage = opts.storage ? new CachedUsage(opts.storage) : undefined;
  const shutdown = new AbortController();
  // A call from another Torpor process (a router resuming an actor) continues that process's trace.
  app.addHook('preHandler', (req, _reply, done) => {
    withCallerTrace(req.headers, done);
  });
  app.addHook('preClose', async () => shutdown.abort());
  app.addHook('onClose', async () => operations.close());
  app.addHook('onResponse', async (req, reply) => {
    // The route pattern, not the URL: actor names must not become label values.
    const route = req.routeOptions.url ?? 'unmatched';
    metrics.apiRequests.observe(
      { method: req.method, route, status: String(reply.statusCode) },
      reply.elapsedTime / 1000,
    );
  });

  app.get('/healthz', async () => ({ status: 'ok' }));
  app.get('/openapi.json', async () => openApiDocument());
  app.get('/metrics', async (_req, reply) => {
    void reply.type(metrics.registry.contentType);
    return metrics.registry.metrics();
  });

  app.post('/v1/templates', async (req, reply) => {
    const { template, created } = await lifecycle.applyTemplate(req.body);
    void reply.status(created ? 201 : 200);
    return template;
  });
  app.get('/v1/templates', async (req) => lifecycle.listTemplates(req.query));
  app.get<{ Params: { name: string } }>('/v1/templates/:name', async (req) => lifecycle.getTemplate(req.params.name));

  app.get<{ Params: Params }>('/v1/spaces/:space/actors', async (req) =>
    lifecycle.listActors(req.params.space, req.query),
  );
  app.get('/v1/actors', async (req) => lifecycle.listActors(undefined, req.query));
  app.post<{ Params: Params }>('/v1/spaces/:space/actors', async (req, reply) => {
    void reply.status(201);
    return lifecycle.createActor(req.params.space, req.body);
  });
  app.get<{ Params: Params }>('/v1/spaces/:space/actors/:name', async (req) =>
    lifecycle.getActor(req.params.space, req.params.name),
  );
  app.delete<{ Params: Params }>('/v1/spaces/:space/actors/:name', async (req, reply) => {
    await lifecycle.deleteActor(req.params.space, req.params.name);
    void reply.status(204);
  });
  app.post<{ Params: Params; Body: { worker?: unknown } | undefined }>(
    '/v1/spaces/:space/actors/:name/resume',
    async (req) => {
      const worker = req.body?.worker;
      if (worker !== undefined && typeof worker !== 'string') {
        throw new TorporError('INVALID_ARGUMENT', 'worker: must be a worker id', { field: 'worker' });
      }
      return lifecycle.resume(req.params.space, req.params.name, worker ? { worker } : {});
    },
  );
  app.post<{ Params: Params }>('/v1/spaces/:space/actors/:name/suspend', async (req) =>
    lifecycle.suspend(req.params.space, req.params.name),
  );
  app.post<{ Params: Params }>('/v1/spaces/:space/actors/:name/pause', async (req) =>
    lifecycle.pause(req.params.space, req.params.name),
  );
  app.post<{ Params: Params }>('/v1/spaces/:space/actors/:name/fork', async (req, reply) => {
    void reply.status(201);
    return lifecycle.fork(req.params.space, req.params.name, req.body);
  });
  app.post<{ Params: Params }>('/v1/spaces/:space/actors/:name/exec', async (req, reply) => {
    // Accept: application/x-ndjson streams the output as it is produced (see exec-stream.ts).
    if (!String(req.headers.accept ?? '').includes('application/x-ndjson')) {
      return lifecycle.exec(req.params.space, req.params.name, req.body);
    }
    void reply.type('application/x-ndjson; charset=utf-8');
    return execStream((onOutput) => lifecycle.exec(req.params.space, req.params.name, req.body, onOutput));
  });
  app.get<{ Params: Params; Querystring: { follow?: string } }>(
    '/v1/spaces/:space/actors/:name/logs',
    async (req, reply) => {
      const stop = new AbortController();
      reply.raw.on('close', () => stop.abort());
      const follow = req.query.follow === 'true';
      const logs = await lifecycle.logs(req.params.space, req.params.name, { follow, signal: stop.signal });
      void reply.type('text/plain; charset=utf-8');
      return logs;
    },
  );

  // Snapshot transfer progress of one actor (its suspend's upload, its resume's download) as Server-Sent Events, for
  // as long as the client listens. A comment line is sent first: the subscription is live once it arrives.
  app.get<{ Params: Params }>('/v1/spaces/:space/actors/:name/transfers', async (req, reply) => {
    const { space, name } = req.params;
    reply.hijack();
    const res = reply.raw;
    const unsubscribe = await lifecycle.onTransfer((event) => {
      if (event.space !== space || event.name !== name) return;
      const { direction, bytesDone, bytesTotal } = event;
      res.write(`event: progress\ndata: ${JSON.stringify({ direction, bytesDone, bytesTotal })}\n\n`);
    });
    res.writeHead(200, { 'content-type': 'text/event-stream', 'cache-control': 'no-cache' });
    res.write(': subscribed\n\n');
    const end = () => {
      unsubscribe();
      res.end();
    };
    req.raw.once('close', end);
    shutdown.signal.addEventListener('abort', end, { once: true });
  });
  app.get('/v1/workers', async (req) => store.listWorkers(parse(listQuery, req.query ?? {})));
  app.get<{ Querystring: { limit?: string; space?: string; actor?: string } }>('/v1/operations', async (req) => {
    const limit = req.query.limit === undefined ? undefined : Number(req.query.limit);
    if (limit !== undefined && !(Number.isInteger(limit) && limit >= 1 && limit <= 500)) {
      throw new TorporError('INVALID_ARGUMENT', 'limit: must be an integer from 1 to 500', { field: 'limit' });
    }
    const { actor, space = DEFAULT_SPACE } = req.query;
    return { items: operations.list(limit, actor === undefined ? undefined : { space, name: actor }) };
  });
  app.get('/v1/storage', async () => {
    if (!storage) throw new TorporError('NOT_SUPPORTED', 'this server does not measure its snapshot store');
    return storage.get();
  });
  app.get('/v1/events', (req, reply) => {
    reply.hijack();
    streamEvents({ store, operations, storage }, reply.raw, shutdown.signal).catch((err: unknown) => {
      req.log.warn({ err }, 'event stream failed');
      reply.raw.destroy();
    });
  });
  void app.register(dashboardPlugin);
  if (opts.instances) void app.register(compatPlugin, { engine: opts.instances, keys: opts.instanceKeys });
  if (opts.nodes) void app.register(nodesPlugin, { ...opts.nodes, store });
  return app;
}
