// The server's side of node registration (torpor agent → torpor server): agents register their workers, renew
// their leases and unregister, with the shared agent token. The server writes the records with its own clock
// (StoreRegistry), so whether a node is alive is judged by one clock, and agents never need store credentials.
import type { FastifyInstance } from 'fastify';
import { z } from 'zod';
import { StoreRegistry } from '../agent/registry.ts';
import { TorporError } from '../core/errors.ts';
import { dnsLabel, parse, runtimeClass } from '../core/schemas.ts';
import { bearerToken, secretEquals } from '../core/secret.ts';
import type { StateStore } from '../store/store.ts';

export interface NodesOptions {
  store: StateStore;
  /** The agent token: agents present it to register. */
  token: string;
  /** Lease length given to every worker; agents heartbeat three times within it. */
  leaseMs: number;
  /** Suspends an actor (the lifecycle's suspend): what a draining agent asks for its running actors. Without it,
   * /v1/nodes/:node/drain is NOT_SUPPORTED. */
  suspend?: (space: string, name: string) => Promise<unknown>;
}

const workerId = z.string().regex(/^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$/, 'must be a worker id');
const workerInfo = z
  .object({
    id: workerId,
    node: dnsLabel,
    runtime: runtimeClass,
    state: z.enum(['free', 'busy']),
    host: z.ipv4(),
    actor: z.object({ space: z.string(), name: z.string() }).strict().optional(),
  })
  .strict();
const registration = z
  .object({
    agent: z.url({ protocol: /^https?$/ }),
    workers: z.array(workerInfo).min(1).max(256),
  })
  .strict();
const workerList = z.object({ workers: z.array(workerId).max(256) }).strict();

type Node = { Params: { node: string } };

export async function nodesPlugin(app: FastifyInstance, opts: NodesOptions): Promise<void> {
  app.addHook('onRequest', async (req) => {
    const presented = bearerToken(req.headers.authorization);
    if (presented === undefined) {
      throw new TorporError('UNAUTHENTICATED', 'node registration needs the agent token', { field: 'authorization' });
    }
    if (!secretEquals(presented, opts.token)) {
      throw new TorporError('PERMISSION_DENIED', 'the agent token is not valid', { field: 'authorization' });
    }
  });

  /** The ids of `ids` that are registered to `node` (an agent may only touch its own node's workers). */
  const ownWorkers = async (node: string, ids: string[]) => {
    const own: string[] = [];
    for (const id of ids) if ((await opts.store.getWorker(id))?.node === node) own.push(id);
    return own;
  };

  app.put<Node>('/v1/nodes/:node', async (req) => {
    const node = parse(dnsLabel, req.params.node, 'node');
    const body = parse(registration, req.body);
    const stranger = body.workers.find((w) => w.node !== node);
    if (stranger) {
      throw new TorporError('INVALID_ARGUMENT', `workers.${stranger.id}: belongs to node "${stranger.node}"`, {
        field: 'workers',
      });
    }
    const registry = new StoreRegistry(opts.store, { leaseMs: opts.leaseMs, agentUrl: body.agent });
    const workers = body.workers.map(({ actor, ...w }) => (actor ? { ...w, actor } : w));
    req.log.info({ node, agent: body.agent, workers: workers.length }, 'node registered');
    return registry.register(workers);
  });

  // Heartbeats come every few seconds from every node: logged only when something goes wrong.
  app.post<Node>('/v1/nodes/:node/heartbeat', { logLevel: 'warn' }, async (req) => {
    const node = parse(dnsLabel, req.params.node, 'node');
    const { workers } = parse(workerList, req.body);
    const own = await ownWorkers(node, workers);
    const { unknown } = await new StoreRegistry(opts.store, { leaseMs: opts.leaseMs }).heartbeat(own);
    return { unknown: [...workers.filter((id) => !own.includes(id)), ...unknown] };
  });

  app.post<Node>('/v1/nodes/:node/unregister', async (req) => {
    const node = parse(dnsLabel, req.params.node, 'node');
    const { workers } = parse(workerList, req.body);
    await new StoreRegistry(opts.store, { leaseMs: opts.leaseMs }).unregister(await ownWorkers(node, workers));
    return {};
  });

  // A draining agent (stopping on SIGTERM): suspends the actors running on the given workers of its node, all at
  // once; answers once every suspend ended, with those that failed (their actors stay where they are).
  app.post<Node>('/v1/nodes/:node/drain', async (req) => {
    const node = parse(dnsLabel, req.params.node, 'node');
    const { workers } = parse(workerList, req.body);
    const suspend = opts.suspend;
    if (!suspend) throw new TorporError('NOT_SUPPORTED', 'this server does not drain nodes', { field: 'node' });
    const actors: { space: string; name: string }[] = [];
    for (const id of await ownWorkers(node, workers)) {
      const ref = (await opts.store.getWorker(id))?.actor;
      const actor = ref && (await opts.store.getActor(ref.space, ref.name));
      if (actor && actor.worker === id && actor.status === 'RUNNING') actors.push(ref);
    }
    req.log.info({ node, actors: actors.length }, 'draining a node: suspending its actors');
    const results = await Promise.allSettled(actors.map((a) => suspend(a.space, a.name)));
    const failed = results.flatMap((r, i) =>
      r.status === 'rejected' ? [{ actor: `${actors[i]!.space}/${actors[i]!.name}`, error: String(r.reason) }] : [],
    );
    return { suspended: actors.length - failed.length, failed };
  });

  app.post<Node>('/v1/nodes/:node/expire', async (req) => {
    const node = parse(dnsLabel, req.params.node, 'node');
    const { workers } = parse(workerList, req.body);
    await new StoreRegistry(opts.store, { leaseMs: opts.leaseMs }).expire(await ownWorkers(node, workers));
    return {};
  });
}
