// Prometheus metrics for lifecycle operations: counts by kind and result, and per-phase durations.
import { Counter, collectDefaultMetrics, Gauge, Histogram, Registry } from 'prom-client';
import type { Phases } from '../core/types.ts';

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

  constructor() {
    collectDefaultMetrics({ register: this.registry, prefix: 'torpor_process_' });
  }

  record(operation: string, result: 'ok' | 'error', phases: Phases): void {
    this.operations.inc({ operation, result });
    for (const [phase, ms] of Object.entries(phases)) this.phases.observe({ operation, phase }, ms / 1000);
  }
}
