// The MCP gateway: where AEnvironment's SDK sends tool traffic (its port 8081: /mcp, /health, /task/reward,
// /functions/<name>), with the headers `AEnvCore-EnvInstance-ID: <id>` and `AEnvCore-MCPProxy-URL: http://<ip>:8081`.
// AEnvironment's own gateway forwards to whatever URL that second header names — an open proxy. Torpor's reaches
// an instance only by its id: the engine resolves the id to an actor (checking the caller's ownership), and the
// router proxies to the worker the store holds for that actor, resuming it if it was suspended. The URL header is
// ignored and never forwarded.
import type { IncomingMessage, ServerResponse } from 'node:http';
import { asTorporError, ERROR_STATUS, TorporError } from '../core/errors.ts';
import type { ActorRef } from '../core/types.ts';
import type { Engine } from '../engine/engine.ts';
import { type ApiKeys, authenticate } from './compat.ts';

export const INSTANCE_ID_HEADER = 'aenvcore-envinstance-id';
export const PROXY_URL_HEADER = 'aenvcore-mcpproxy-url';

export interface McpGatewayOptions {
  engine: Engine;
  keys?: ApiKeys | undefined;
  /** Hands a request to the router for an actor (Router.handleFor). */
  proxy: (ref: ActorRef, req: IncomingMessage, res: ServerResponse) => void;
}

export function mcpGateway(o: McpGatewayOptions): (req: IncomingMessage, res: ServerResponse) => void {
  return (req, res) => {
    target(o, req).then(
      (ref) => {
        if (ref) o.proxy(ref, req, res);
        else send(res, 200, { status: 'healthy', message: 'MCP Gateway is running' });
      },
      (err: unknown) => {
        const e = asTorporError(err);
        send(res, ERROR_STATUS[e.code], { error: e.toJSON() });
      },
    );
  };
}

/** The actor the request is for, or undefined for the gateway's own health check. */
async function target(o: McpGatewayOptions, req: IncomingMessage): Promise<ActorRef | undefined> {
  const raw = req.headers[INSTANCE_ID_HEADER];
  const id = Array.isArray(raw) ? raw[0] : raw;
  delete req.headers[PROXY_URL_HEADER];
  if (!id) {
    if (req.method === 'GET' && req.url?.split('?')[0] === '/health') return undefined;
    throw missingId();
  }
  const { caller, usedKey } = authenticate(req.headers, undefined, o.keys, false);
  // A Torpor API key is for Torpor: the sandbox never sees it.
  if (usedKey) delete req.headers.authorization;
  return o.engine.route(id, caller);
}

function missingId(): TorporError {
  return new TorporError(
    'INVALID_ARGUMENT',
    'AEnvCore-EnvInstance-ID: is required; an instance is reached by its id only, never by the address AEnvCore-MCPProxy-URL names',
    { field: 'AEnvCore-EnvInstance-ID' },
  );
}

function send(res: ServerResponse, status: number, body: unknown): void {
  const text = JSON.stringify(body);
  res.writeHead(status, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(text) });
  res.end(text);
}
