// Prometheus metrics, named torpor_… with units in the names: lifecycle operations and their phases, the API,
// the router, the state store, the blob store, snapshots, workers and actors.

import type { Readable } from 'node:stream';
import { Counter, collectDefaultMetrics, Gauge, Histogram, Registry } from 'prom-client';
import type { BlobStore } from '../blob/blob.ts';
import { ACTOR_STATUSES, type Phases } from '../core/types.ts';
import { allActors, allWorkers } from '../store/all.ts';
import type { StateStore } from '../store/store.ts';

export class Metrics {
  readonly registry = new Registry();
  readonly operations = new Counter({
    name: 'torpor_operations_total',
    help: 'Lifecycle operations by kind and result',
    labelNames: ['operation', 'result'] as const,
    registers: [this.registry],
  });
  readonly phases = new Histogram({
    name: 'torpor_operation_phase_seconds',
    help: 'Duration of each phase of a lifecycle operation',
    labelNames: ['operation', 'phase'] as const,
    buckets: [0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30],
    registers: [this.registry],
  });
  readonly snapshotBytes = new Counter({
    name: 'torpor_snapshot_bytes_total',
    help: 'Snapshot bytes: raw (as checkpointed) and stored (compressed, new chunks only)',
    labelNames: ['kind'] as const,
    registers: [this.registry],
  });

  readonly gcDeleted = new Counter({
    name: 'torpor_snapshot_gc_deleted_total',
    help: 'Snapshot manifests and objects deleted by garbage collection',
    labelNames: ['kind'] as const,
    registers: [this.registry],
  });
  readonly routerRequests = new Histogram({
    name: 'torpor_router_request_seconds',
    help: 'Router requests until the response head, by outcome',
    labelNames: ['outcome'] as const,
    buckets: [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10, 30],
    registers: [this.registry],
  });
  readonly routerResumes = new Counter({
    name: 'torpor_router_resumes_total',
    help: 'Resumes the router triggered (concurrent requests for one actor share one)',
    registers: [this.registry],
  });
  readonly routerQueueWait = new Histogram({
    name: 'torpor_router_queue_wait_seconds',
    help: 'Time requests waited for their actor to be resumed',
    buckets: [0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30],
    registers: [this.registry],
  });
  readonly routerConnections = new Gauge({
    name: 'torpor_router_active_connections',
    help: 'Requests and upgraded connections the router is proxying now',
    registers: [this.registry],
  });

  readonly apiRequests = new Histogram({
    name: 'torpor_api_request_seconds',
    help: 'Control API requests by method, route and status',
    labelNames: ['method', 'route', 'status'] as const,
    buckets: [0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30],
    registers: [this.registry],
  });
  readonly storeOperations = new Histogram({
    name: 'torpor_store_operation_seconds',
    help: 'State store calls by method',
    labelNames: ['operation'] as const,
    buckets: [0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1],
    registers: [this.registry],
  });
  readonly blobOperations = new Histogram({
    name: 'torpor_blob_operation_seconds',
    help: 'Blob store calls by method (get: until the body starts)',
    labelNames: ['operation'] as const,
    buckets: [0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 30],
    registers: [this.registry],
  });
  readonly blobBytes = new Counter({
    name: 'torpor_blob_bytes_total',
    help: 'Bytes written to and read from the blob store (whole-object calls)',
    labelNames: ['direction'] as const,
    registers: [this.registry],
  });

  constructor() {
    collectDefaultMetrics({ register: this.registry, prefix: 'torpor_process_' });
  }

  /** Gauges read from the store at scrape time: workers by node, runtime and state; actors by status. */
  observeStore(store: StateStore): void {
    new Gauge({
      name: 'torpor_workers',
      help: 'Registered workers by node, runtime class and state',
      labelNames: ['node', 'runtime', 'state'] as const,
      registers: [this.registry],
      async collect() {
        this.reset();
        for await (const w of allWorkers(store)) this.inc({ node: w.node, runtime: w.runtime, state: w.state });
      },
    });
    new Gauge({
      name: 'torpor_actors',
      help: 'Actors by status',
      labelNames: ['status'] as const,
      registers: [this.registry],
      async collect() {
        this.reset();
        for (const status of ACTOR_STATUSES) this.set({ status }, 0);
        for await (const a of allActors(store)) this.inc({ status: a.status });
      },
    });
  }

  /** The same object, with every method call timed into `histogram` by method name. */
  timed<T extends object>(target: T, histogram: Histogram<'operation'>): T {
    return new Proxy(target, {
      get(obj, prop) {
        const value = Reflect.get(obj, prop, obj) as unknown;
        if (typeof value !== 'function') return value;
        const method = value as (...args: unknown[]) => unknown;
        // watch() is a long-lived stream, not a call: it is passed through untimed.
        if (prop === 'watch' || typeof prop !== 'string') return method.bind(obj);
        return (...args: unknown[]) => {
          const end = histogram.startTimer({ operation: prop });
          const result = method.apply(obj, args);
          if (result instanceof Promise) return result.finally(() => end());
          end();
          return result;
        };
      },
    });
  }

  /** A blob store whose calls are timed and whose whole-object transfers are counted. */
  blob(blob: BlobStore): BlobStore {
    const timed = this.timed(blob, this.blobOperations);
    const bytes = this.blobBytes;
    return Object.assign(Object.create(timed) as BlobStore, {
      put: (key: string, body: Uint8Array | Readable) => {
        if (body instanceof Uint8Array) bytes.inc({ direction: 'out' }, body.byteLength);
        return timed.put(key, body);
      },
      getBytes: async (key: string) => {
        const data = await timed.getBytes(key);
        bytes.inc({ direction: 'in' }, data.byteLength);
        return data;
      },
    });
  }

  record(operation: string, result: 'ok' | 'error', phases: Phases): void {
    this.operations.inc({ operation, result });
    for (const [phase, ms] of Object.entries(phases)) this.phases.observe({ operation, phase }, ms / 1000);
  }
}
