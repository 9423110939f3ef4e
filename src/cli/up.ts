// `torpor up`: the embedded deployment in one process — SQLite state, filesystem blobs, a local engine with
// in-process node agents, the reconciler and the REST API.
import { mkdir } from 'node:fs/promises';
import { join, resolve } from 'node:path';
import { type Logger, pino } from 'pino';
import { buildApi } from '../api/server.ts';
import { FsBlobStore } from '../blob/fs.ts';
import { Lifecycle } from '../control/lifecycle.ts';
import { Metrics } from '../control/metrics.ts';
import { TorporError } from '../core/errors.ts';
import { LocalEngine, loadRunscAsset, locateRunsc } from '../engine/local.ts';
import { ImageStore } from '../image/store.ts';
import { SqliteStore } from '../store/sqlite.ts';

export interface UpOptions {
  dataDir: string;
  host: string;
  port: number;
  workers: number;
  runsc?: string;
  /** First per-worker network index: lets two Torpor instances share one machine. */
  networkBase?: number;
  /** zstd level for delta-encoded snapshot files (0: chunks only). */
  deltaLevel?: number;
  reconcileMs?: number;
  log?: Logger;
}

export interface RunningTorpor {
  url: string;
  lifecycle: Lifecycle;
  stop: () => Promise<void>;
}

export async function up(opts: UpOptions): Promise<RunningTorpor> {
  const log = opts.log ?? pino({ name: 'torpor' });
  if ((opts.networkBase ?? 0) + opts.workers > 256) {
    throw new TorporError('INVALID_ARGUMENT', 'network-base + workers must be at most 256 (one /30 per worker)', {
      field: 'workers',
    });
  }
  const dataDir = resolve(opts.dataDir);
  await mkdir(dataDir, { recursive: true });
  const store = SqliteStore.open(join(dataDir, 'state.db'));
  const blob = new FsBlobStore(join(dataDir, 'blobs'));
  const images = new ImageStore(join(dataDir, 'images'));
  const metrics = new Metrics();
  const runsc = await loadRunscAsset(locateRunsc(opts.runsc), log);
  log.info({ runsc: runsc.path, version: runsc.features.version, sha256: runsc.sha256 }, 'runtime asset');
  const engine = new LocalEngine(
    {
      dataDir,
      workers: opts.workers,
      runsc: runsc.path,
      store,
      blob,
      images,
      log,
      networkBase: opts.networkBase ?? 0,
      ...(opts.deltaLevel !== undefined ? { deltaLevel: opts.deltaLevel } : {}),
    },
    runsc,
  );
  await engine.start();
  const lifecycle = new Lifecycle({ store, blob, images, agents: engine, metrics, log });
  const reconciler = setInterval(() => {
    lifecycle.reconcile().catch((err: unknown) => log.warn({ err }, 'reconcile failed'));
  }, opts.reconcileMs ?? 5000);
  // Actors left RUNNING by a previous process lost their sandboxes: settle them now, not in 5 s.
  await lifecycle.reconcile();

  const api = buildApi({ lifecycle, store, metrics, log });
  await api.listen({ host: opts.host, port: opts.port });
  const address = api.server.address();
  const port = typeof address === 'object' && address ? address.port : opts.port;
  const url = `http://${opts.host}:${port}`;

  let stopping: Promise<void> | undefined;
  const stop = (): Promise<void> => {
    stopping ??= (async () => {
      clearInterval(reconciler);
      await api.close();
      await lifecycle.suspendAll();
      await engine.stop();
      await store.close();
    })();
    return stopping;
  };
  return { url, lifecycle, stop };
}
