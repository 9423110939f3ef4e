// A real S3 server for tests and benchmarks: Ceph radosgw started by scripts/services/s3.sh (once per test
// file: it takes a few seconds), stopped by the PIDs the script recorded. And a loopback proxy in front of it
// that can fail chosen requests, to test retries against the real server.

import { execFile } from 'node:child_process';
import { mkdtemp, rm } from 'node:fs/promises';
import { createServer, type IncomingMessage, request } from 'node:http';
import type { AddressInfo } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { CreateBucketCommand } from '@aws-sdk/client-s3';
import { type S3Connection, s3Client } from '../../src/blob/s3.ts';

const run = promisify(execFile);
const SCRIPT = join(import.meta.dirname, '..', '..', 'scripts', 'services', 's3.sh');

export interface RunningS3 {
  endpoint: string;
  accessKeyId: string;
  secretAccessKey: string;
  /** What S3BlobStore / s3Client need to reach it (path-style, as Ceph wants). */
  connection: S3Connection;
  stop(): Promise<void>;
}

/** Starts radosgw, or answers why it cannot (then the caller skips, saying so). */
export async function startS3(): Promise<RunningS3 | string> {
  const dir = await mkdtemp(join(tmpdir(), 'torpor-s3-'));
  let stdout: string;
  try {
    ({ stdout } = await run('bash', [SCRIPT, 'start', dir], { timeout: 120_000 }));
  } catch (err) {
    await rm(dir, { recursive: true, force: true });
    const e = err as { code?: number; stderr?: string };
    if (e.code === 3) return `radosgw is not installed (scripts/setup.sh installs it): ${e.stderr?.trim()}`;
    return `radosgw could not be started: ${e.stderr?.trim() ?? String(err)}`;
  }
  const field = (name: string) => {
    const value = new RegExp(`(?:^| )${name}=(\\S+)`).exec(stdout)?.[1];
    if (value === undefined) throw new Error(`s3.sh printed no ${name}`);
    return value;
  };
  const endpoint = field('endpoint');
  const accessKeyId = field('access_key');
  const secretAccessKey = field('secret_key');
  return {
    endpoint,
    accessKeyId,
    secretAccessKey,
    connection: { endpoint, forcePathStyle: true, credentials: { accessKeyId, secretAccessKey } },
    async stop() {
      await run('bash', [SCRIPT, 'stop', dir], { timeout: 60_000 });
      await rm(dir, { recursive: true, force: true });
    },
  };
}

export async function createBucket(connection: S3Connection, bucket: string): Promise<void> {
  const client = s3Client(connection);
  try {
    await client.send(new CreateBucketCommand({ Bucket: bucket }));
  } finally {
    client.destroy();
  }
}

export interface ProxyRequest {
  method: string;
  url: string;
  range?: string;
  /** What the proxy did: forwarded it, or answered/cut it itself. */
  outcome: 'forwarded' | 'failed';
}

export interface FaultyProxy {
  endpoint: string;
  requests: ProxyRequest[];
  /** The most requests that were in flight at once. */
  maxInFlight: number;
  /** Decides, per request, whether to fail it: an HTTP status to answer with, 'reset' to cut the connection. */
  fail: (req: IncomingMessage, index: number) => number | 'reset' | undefined;
  close(): Promise<void>;
}

/** A loopback HTTP proxy to `target` (the Host header is kept, so S3 signatures stay valid). */
export async function faultyProxy(target: string): Promise<FaultyProxy> {
  const upstream = new URL(target);
  let inFlight = 0;
  const proxy: FaultyProxy = {
    endpoint: '',
    requests: [],
    maxInFlight: 0,
    fail: () => undefined,
    close: async () => {},
  };
  const server = createServer((req, res) => {
    const index = proxy.requests.length;
    const failure = proxy.fail(req, index);
    proxy.requests.push({
      method: req.method ?? '',
      url: req.url ?? '',
      ...(req.headers.range !== undefined ? { range: req.headers.range } : {}),
      outcome: failure === undefined ? 'forwarded' : 'failed',
    });
    if (failure !== undefined) {
      req.resume();
      req.on('end', () => {
        if (failure === 'reset') {
          req.socket.destroy();
          return;
        }
        const body = `<?xml version="1.0" encoding="UTF-8"?><Error><Code>${failure === 503 ? 'ServiceUnavailable' : 'InvalidRequest'}</Code><Message>injected by the test proxy</Message></Error>`;
        res.writeHead(failure, { 'content-type': 'application/xml', 'content-length': Buffer.byteLength(body) });
        res.end(body);
      });
      return;
    }
    inFlight++;
    proxy.maxInFlight = Math.max(proxy.maxInFlight, inFlight);
    const done = () => {
      inFlight--;
    };
    const out = request(
      { host: upstream.hostname, port: upstream.port, method: req.method, path: req.url, headers: req.headers },
      (answer) => {
        res.writeHead(answer.statusCode ?? 502, answer.headers);
        answer.pipe(res);
        answer.on('end', done);
        answer.on('error', done);
      },
    );
    out.on('error', () => {
      done();
      res.destroy();
    });
    req.pipe(out);
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  proxy.endpoint = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
  proxy.close = () =>
    new Promise<void>((resolve) => {
      server.closeAllConnections();
      server.close(() => resolve());
    });
  return proxy;
}
