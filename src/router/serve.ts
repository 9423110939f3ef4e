// The router as a running HTTP server, with its activity tracking and idle policy: the same in `torpor up` (over
// the lifecycle in its process) and in `torpor router` (over a server's API).
import http, { type Server } from 'node:http';
import type { Logger } from 'pino';
import { ActivityTracker } from '../control/activity.ts';
import { IdlePolicy } from '../control/idle.ts';
import type { ActorOperations } from '../control/lifecycle.ts';
import type { Metrics } from '../control/metrics.ts';
import type { StateStore } from '../store/store.ts';
import { Router } from './router.ts';

export interface ServeRouterOptions {
  store: StateStore;
  lifecycle: ActorOperations;
  metrics: Metrics;
  log: Logger;
  host: string;
  /** 0 = any free port. */
  port: number;
  domain: string;
  queueSize?: number;
  queueDeadlineMs?: number;
  upstreamTimeoutMs?: number;
  maxBodyBytes?: number;
  ingressTokens?: Record<string, string>;
}

export interface ServedRouter {
  url: string;
  server: Server;
  router: Router;
  close: () => Promise<void>;
}

export function listeningPort(server: Server): number {
  const address = server.address();
  return typeof address === 'object' && address ? address.port : 0;
}

export async function serveRouter(o: ServeRouterOptions): Promise<ServedRouter> {
  const activity = new ActivityTracker();
  const idle = new IdlePolicy({ store: o.store, lifecycle: o.lifecycle, activity, log: o.log });
  idle.start();
  const router = new Router({
    store: o.store,
    lifecycle: o.lifecycle,
    idle,
    activity,
    metrics: o.metrics,
    log: o.log,
    domain: o.domain,
    ...(o.queueSize !== undefined ? { queueSize: o.queueSize } : {}),
    ...(o.queueDeadlineMs !== undefined ? { queueDeadlineMs: o.queueDeadlineMs } : {}),
    ...(o.ingressTokens ? { ingressTokens: o.ingressTokens } : {}),
    ...(o.upstreamTimeoutMs !== undefined ? { timeoutMs: o.upstreamTimeoutMs } : {}),
    ...(o.maxBodyBytes !== undefined ? { bodyLimit: o.maxBodyBytes } : {}),
  });
  const server = http.createServer({ keepAlive: true }, router.handle);
  server.on('upgrade', router.upgrade);
  await new Promise<void>((resolve) => server.listen(o.port, o.host, resolve));
  return {
    url: `http://${o.host}:${listeningPort(server)}`,
    server,
    router,
    close: async () => {
      idle.stop();
      router.close();
      server.closeAllConnections();
      await new Promise((r) => server.close(r));
    },
  };
}
