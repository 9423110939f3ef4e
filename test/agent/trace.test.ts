// Traces cross process boundaries: every call between Torpor processes (src/sys/http.ts) carries the caller's
// trace as a W3C traceparent header, and the receiving side (agent API, server API) continues it.
import assert from 'node:assert/strict';
import { createServer, type IncomingHttpHeaders } from 'node:http';
import type { AddressInfo } from 'node:net';
import { after, before, describe, test } from 'node:test';
import { trace } from '@opentelemetry/api';
import { InMemorySpanExporter, SimpleSpanProcessor } from '@opentelemetry/sdk-trace-base';
import { NodeTracerProvider } from '@opentelemetry/sdk-trace-node';
import { RemoteAgent } from '../../src/agent/remote.ts';
import { traceId, withCallerTrace, withSpan } from '../../src/core/trace.ts';

describe('trace propagation between processes', () => {
  const provider = new NodeTracerProvider({ spanProcessors: [new SimpleSpanProcessor(new InMemorySpanExporter())] });
  const seen: IncomingHttpHeaders[] = [];
  const server = createServer((req, res) => {
    seen.push(req.headers);
    res.writeHead(200, { 'content-type': 'application/json' });
    res.end('{"alive":false}');
  });
  let url: string;

  before(async () => {
    provider.register();
    await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
    url = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
  });
  after(async () => {
    server.close();
    await provider.shutdown();
    trace.disable();
  });

  test('a call to an agent carries the active trace', async () => {
    const agent = new RemoteAgent({ node: 'n1', url, token: 't'.repeat(32) });
    let caller: string | undefined;
    await withSpan('caller', {}, async () => {
      caller = traceId();
      await agent.sandboxAlive('n1-w0');
    });
    assert.ok(caller, 'tracing is on');
    const traceparent = String(seen.at(-1)?.traceparent ?? '');
    assert.match(traceparent, new RegExp(`^00-${caller}-[0-9a-f]{16}-0[01]$`));
    await agent.sandboxAlive('n1-w0');
    assert.equal(seen.at(-1)?.traceparent, undefined, 'no trace, no header');
  });

  test('the receiving side continues the caller’s trace', () => {
    const id = '4bf92f3577b34da6a3ce929d0e0e4736';
    const inside = withCallerTrace({ traceparent: `00-${id}-00f067aa0ba902b7-01` }, () => traceId());
    assert.equal(inside, id);
    assert.equal(
      withCallerTrace({}, () => traceId()),
      undefined,
    );
  });
});
