// A load generator in its own process, so it never shares an event loop with what it measures.
// Usage: node bench/lib/load.ts URL HOST REQUESTS CONCURRENCY  → prints {"rps": …}
import http from 'node:http';

const [url, host, requests, concurrency] = process.argv.slice(2);
const target = new URL(url!);
const total = Number(requests);
const agent = new http.Agent({ keepAlive: true, maxSockets: Number(concurrency) });

function get(): Promise<void> {
  return new Promise((resolve, reject) => {
    http
      .get({ host: target.hostname, port: target.port, path: '/', headers: { host }, agent }, (res) => {
        res.resume();
        res.on('end', () => (res.statusCode === 200 ? resolve() : reject(new Error(`HTTP ${res.statusCode}`))));
      })
      .on('error', reject);
  });
}

let next = 0;
const t0 = performance.now();
await Promise.all(
  Array.from({ length: Number(concurrency) }, async () => {
    while (next++ < total) await get();
  }),
);
console.log(JSON.stringify({ rps: total / ((performance.now() - t0) / 1000) }));
agent.destroy();
