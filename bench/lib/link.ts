// A TCP proxy that limits every connection's throughput each way: a single connection to a remote S3 service is
// limited like that, which loopback is not (bench/blob.ts, bench/restore.ts).
import { connect, createServer, type Server, type Socket } from 'node:net';
import { Transform } from 'node:stream';

const MiB = 1024 * 1024;

/** Passes at most `bytesPerSecond`, with no credit saved up while idle (a kept-alive connection gets no burst). */
function throttle(bytesPerSecond: number): Transform {
  let free = Date.now();
  return new Transform({
    transform(chunk: Buffer, _encoding, done) {
      const now = Date.now();
      free = Math.max(free, now) + (chunk.length / bytesPerSecond) * 1000;
      setTimeout(() => done(null, chunk), free - now);
    },
  });
}

/** A TCP proxy to `endpoint` that limits each connection to `mibps` in each direction. */
export async function throttledLink(endpoint: string, mibps: number): Promise<{ endpoint: string; server: Server }> {
  const target = new URL(endpoint);
  const sockets = new Set<Socket>();
  const server = createServer((client) => {
    const upstream = connect(Number(target.port), target.hostname);
    for (const socket of [client, upstream]) {
      sockets.add(socket);
      socket.on('close', () => sockets.delete(socket));
      socket.on('error', () => {
        client.destroy();
        upstream.destroy();
      });
    }
    client.pipe(throttle(mibps * MiB)).pipe(upstream);
    upstream.pipe(throttle(mibps * MiB)).pipe(client);
  });
  server.on('close', () => {
    for (const socket of sockets) socket.destroy();
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const { port } = server.address() as { port: number };
  return { endpoint: `http://127.0.0.1:${port}`, server };
}
