// The node agent's API (torpor agent): what the server asks of this node, over HTTP. Only the server may call it:
// every request must carry `Authorization: Bearer <agent token>` (401 without, 403 with another one; compared in
// constant time, never logged). Errors leave as { error: { code, message, field? } } with the status of their
// code, so RemoteAgent raises the same TorporErrors a NodeAgent in the server's process would.
import type { Readable } from 'node:stream';
import { PassThrough } from 'node:stream';
import Fastify, { type FastifyError } from 'fastify';
import type { Logger } from 'pino';
import { z } from 'zod';
import { asTorporError, ERROR_STATUS, TorporError } from '../core/errors.ts';
import { parse, templateSpec } from '../core/schemas.ts';
import { bearerToken, secretEquals } from '../core/secret.ts';
import { withCallerTrace } from '../core/trace.ts';
import type { AgentClient, TransferEvent } from './client.ts';

export interface AgentApiOptions {
  agent: AgentClient;
  token: string;
  log: Logger;
  /** Until this says so, calls are refused with NO_CAPACITY (503): the API listens before the agent has prepared
   * its slots, and a server that still knows this node's workers (from before a restart) must wait. */
  ready?: () => boolean;
}

const segment = z.string().min(1).max(128);
const actorRef = z.object({ space: segment, name: segment }).strict();
const template = templateSpec.extend({ createdAt: z.string(), goldenSnapshot: z.string().optional() });
const manifestKey = z.string().min(1).max(1024);

const schemas = {
  activate: z
    .object({ actor: actorRef, template, snapshot: manifestKey.optional(), localSnapshot: z.string().optional() })
    .strict(),
  checkpoint: z
    .object({
      target: z.object({ kind: z.enum(['suspend', 'pause']), actor: actorRef, id: segment }).strict(),
      deferTeardown: z.boolean().optional(),
    })
    .strict(),
  golden: z
    .object({ workerId: segment, actor: actorRef, template, manifestKey, parent: manifestKey.nullable() })
    .strict(),
  upload: z
    .object({
      request: z.object({ actor: actorRef, template, manifestKey, parent: manifestKey.nullable() }).strict(),
      dir: z.string().min(1),
      files: z.array(z.string()).optional(),
    })
    .strict(),
  keep: z.object({ dir: z.string().min(1), manifestKey }).strict(),
  discard: z.object({ dir: z.string().min(1) }).strict(),
  compact: z.object({ manifestKey }).strict(),
  exec: z.object({ command: z.array(z.string()).min(1), timeoutMs: z.number().positive() }).strict(),
};

type Worker = { Params: { worker: string } };

/** One NDJSON line per output chunk (`{"stream": "stdout", "data": base64}`: bytes exactly as produced), then
 * `{"result": ExecResult}` or `{"error": {code, message}}`. */
function execLines(run: (out: PassThrough) => Promise<unknown>): Readable {
  const out = new PassThrough();
  run(out).then(
    (result) => out.end(`${JSON.stringify({ result })}\n`),
    (err: unknown) => out.end(`${JSON.stringify({ error: asTorporError(err).toJSON() })}\n`),
  );
  return out;
}

export function buildAgentApi(opts: AgentApiOptions) {
  const { agent, token } = opts;
  const app = Fastify({ loggerInstance: opts.log, bodyLimit: 4 * 1024 * 1024 });
  // Ends the streams that last as long as their caller listens, so closing the API does not wait for them.
  const closing = new AbortController();
  app.addHook('preClose', (done) => {
    closing.abort();
    done();
  });

  app.addHook('onRequest', async (req) => {
    const presented = bearerToken(req.headers.authorization);
    if (presented === undefined) {
      throw new TorporError('UNAUTHENTICATED', 'the agent API needs the agent token', { field: 'authorization' });
    }
    if (!secretEquals(presented, token)) {
      throw new TorporError('PERMISSION_DENIED', 'the agent token is not valid', { field: 'authorization' });
    }
    if (opts.ready && !opts.ready() && req.url !== '/healthz') {
      throw new TorporError('NO_CAPACITY', `the agent of node ${agent.node} is starting`, { field: 'node' });
    }
  });
  app.setErrorHandler((err: FastifyError | TorporError, request, reply) => {
    const e =
      err instanceof TorporError
        ? err
        : err.code?.startsWith('FST_ERR_CTP') || err.statusCode === 400
          ? new TorporError('INVALID_ARGUMENT', `request body: ${err.message}`, { field: '(body)' })
          : asTorporError(err);
    if (e.code === 'INTERNAL') request.log.error({ err }, 'internal error');
    void reply.status(ERROR_STATUS[e.code]).send({ error: e.toJSON() });
  });
  app.setNotFoundHandler((request, reply) => {
    void reply.status(404).send({ error: { code: 'NOT_FOUND', message: `no route ${request.method} ${request.url}` } });
  });

  app.get('/healthz', async () => ({ status: 'ok', node: agent.node }));

  // Work the server asks for continues the server's trace (it sends traceparent with every call).
  app.addHook('preHandler', (req, _reply, done) => {
    withCallerTrace(req.headers, done);
  });

  app.post<Worker>('/v1/workers/:worker/activate', async (req) => {
    const body = parse(schemas.activate, req.body);
    return agent.activate({ workerId: req.params.worker, ...body });
  });
  app.post<Worker>('/v1/workers/:worker/checkpoint', async (req) => {
    const body = parse(schemas.checkpoint, req.body);
    return agent.checkpointLocal(req.params.worker, body.target, { deferTeardown: body.deferTeardown ?? false });
  });
  app.post<Worker>('/v1/workers/:worker/settled', async (req) => {
    await agent.settled(req.params.worker);
    return {};
  });
  app.post<Worker>('/v1/workers/:worker/release', async (req) => {
    await agent.release(req.params.worker);
    return {};
  });
  app.get<Worker>('/v1/workers/:worker/alive', async (req) => ({ alive: await agent.sandboxAlive(req.params.worker) }));
  app.post<Worker>('/v1/workers/:worker/exec', async (req, reply) => {
    const body = parse(schemas.exec, req.body);
    void reply.type('application/x-ndjson');
    return execLines((out) =>
      agent.exec(req.params.worker, body.command, body.timeoutMs, (stream, chunk) => {
        out.write(`${JSON.stringify({ stream, data: chunk.toString('base64') })}\n`);
      }),
    );
  });

  app.post('/v1/snapshots/golden', async (req) => agent.checkpoint(parse(schemas.golden, req.body)));
  app.post('/v1/snapshots/upload', async (req) => {
    const body = parse(schemas.upload, req.body);
    return agent.upload(body.request, body.dir, body.files);
  });
  app.post('/v1/snapshots/keep', async (req) => {
    const body = parse(schemas.keep, req.body);
    await agent.keepLocal(body.dir, body.manifestKey);
    return {};
  });
  app.post('/v1/snapshots/discard', async (req) => {
    await agent.discardLocal(parse(schemas.discard, req.body).dir);
    return {};
  });
  app.post('/v1/snapshots/compact', async (req) => ({
    saved: await agent.compact(parse(schemas.compact, req.body).manifestKey),
  }));

  // Snapshot transfer progress on this node as NDJSON, one TransferEvent a line, for as long as the caller listens
  // (a server forwards them to its own /transfers subscribers). The first line, {}, says the subscription is live.
  app.get('/v1/transfers', async (req, reply) => {
    const out = new PassThrough();
    const unwatch = await agent.watchTransfers((event: TransferEvent) => out.write(`${JSON.stringify(event)}\n`));
    const end = () => {
      unwatch();
      out.end();
    };
    req.raw.once('close', end);
    closing.signal.addEventListener('abort', end, { once: true });
    out.write('{}\n');
    void reply.type('application/x-ndjson');
    return out;
  });

  app.get<{ Params: { space: string; name: string }; Querystring: { follow?: string } }>(
    '/v1/logs/:space/:name',
    async (req, reply) => {
      const stop = new AbortController();
      reply.raw.on('close', () => stop.abort());
      const stream = await agent.logs(
        { space: req.params.space, name: req.params.name },
        { follow: req.query.follow === 'true', signal: stop.signal },
      );
      void reply.type('text/plain; charset=utf-8');
      return stream;
    },
  );
  return app;
}
