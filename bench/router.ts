// bench/router: the router's cost, measured against going straight to the worker in the same run.
// - latency (p50/p99, sequential requests) and throughput (requests/s at a fixed concurrency) to a running
//   actor, through the router vs directly to its worker address;
// - activation: a request to a suspended actor until its first byte, vs a bare `runsc restore` (to ready).
// Prints one JSON document. Usage: node bench/router.ts [--requests N] [--concurrency C] [--activations N]

import { execFile } from 'node:child_process';
import { mkdtemp, rm } from 'node:fs/promises';
import http from 'node:http';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { parseArgs, promisify } from 'node:util';
import { pino } from 'pino';
import { buildCounterImage } from '../examples/counter/image.ts';
import { up } from '../src/cli/up.ts';
import { locateRunsc } from '../src/engine/local.ts';
import { ImageStore } from '../src/image/store.ts';
import { api } from './lib/api.ts';
import { bare, round, summary } from './lib/bare.ts';

const { values } = parseArgs({
  options: {
    requests: { type: 'string', default: '2000' },
    concurrency: { type: 'string', default: '8' },
    activations: { type: 'string', default: '10' },
  },
});
const requests = Number(values.requests);
const concurrency = Number(values.concurrency);
const activations = Number(values.activations);
const log = pino({ level: 'warn' });
const HOST = 'bench.default.actors.torpor.localhost';
const run = promisify(execFile);

/** One GET; resolves at the first byte of the body and then drains it. Returns ms to first byte. */
function get(target: URL, host: string, agent: http.Agent): Promise<number> {
  const t0 = performance.now();
  return new Promise((resolve, reject) => {
    const req = http.get({ host: target.hostname, port: target.port, path: '/', headers: { host }, agent }, (res) => {
      let first = 0;
      res.on('data', () => {
        first ||= performance.now() - t0;
      });
      res.on('end', () => (res.statusCode === 200 ? resolve(first) : reject(new Error(`HTTP ${res.statusCode}`))));
    });
    req.on('error', reject);
  });
}

async function latency(target: URL, host: string) {
  const agent = new http.Agent({ keepAlive: true });
  const samples: number[] = [];
  for (let i = 0; i < Math.min(requests, 1000); i++) samples.push(await get(target, host, agent));
  agent.destroy();
  return summary(samples);
}

/** Requests/s at `concurrency`, from a separate process (see lib/load.ts). */
async function throughput(target: URL, host: string): Promise<number> {
  const load = join(import.meta.dirname, 'lib', 'load.ts');
  const { stdout } = await run(process.execPath, [load, target.href, host, String(requests), String(concurrency)]);
  return round((JSON.parse(stdout) as { rps: number }).rps);
}

const work = await mkdtemp(join(tmpdir(), 'torpor-bench-router-'));
try {
  const { ref } = await buildCounterImage(join(work, 'image'));
  const resolved = await new ImageStore(join(work, 'images')).resolve(ref);
  const floor = await bare(locateRunsc(), resolved.rootfs, resolved.config, work, activations, log);

  const t = await up({
    dataDir: join(work, 'torpor'),
    host: '127.0.0.1',
    port: 0,
    routerPort: 0,
    workers: 2,
    networkBase: 230,
    log,
  });
  try {
    await api(t.url, 'POST', '/v1/templates', {
      name: 'bench',
      image: ref,
      port: 8080,
      readiness: { path: '/healthz' },
    });
    await api(t.url, 'POST', '/v1/spaces/default/actors', { name: 'bench', template: 'bench' });
    const actor = await api<{ address: string }>(t.url, 'POST', '/v1/spaces/default/actors/bench/resume', {});
    const direct = new URL(`http://${actor.address}`);
    const router = new URL(t.routerUrl);

    const directLatency = await latency(direct, actor.address);
    const routerLatency = await latency(router, HOST);
    const directRps = await throughput(direct, actor.address);
    const routerRps = await throughput(router, HOST);

    const activation: number[] = [];
    for (let i = 0; i < activations; i++) {
      await api(t.url, 'POST', '/v1/spaces/default/actors/bench/suspend', {});
      // Both workers free again: time the activation, not teardown capacity.
      for (let w = 0; w < 500; w++) {
        const ws = await api<{ items: { state: string }[] }>(t.url, 'GET', '/v1/workers');
        if (ws.items.every((x) => x.state === 'free')) break;
        await new Promise((r) => setTimeout(r, 20));
      }
      const agent = new http.Agent({ keepAlive: false });
      activation.push(await get(router, HOST, agent));
    }
    const act = summary(activation);
    console.log(
      JSON.stringify(
        {
          benchmark: 'router',
          requests,
          concurrency,
          latency_ms: { direct: directLatency, router: routerLatency },
          added_latency_p50_ms: round(routerLatency.p50 - directLatency.p50),
          throughput_rps: { direct: directRps, router: routerRps },
          throughput_ratio: round(routerRps / directRps),
          activation_first_byte_ms: act,
          bare_restore_to_ready_ms: floor.restore,
          activation_over_bare_p50_ms: round(act.p50 - floor.restore.p50),
          targets: { throughput_ratio: 0.7, added_latency_p50_ms: 1, activation_over_bare_p50_ms: 20 },
        },
        null,
        2,
      ),
    );
  } finally {
    await t.stop();
  }
} finally {
  await rm(work, { recursive: true, force: true });
}
