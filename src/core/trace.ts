// Tracing: one span per operation and per phase, through the OpenTelemetry API only (a no-op until the CLI
// installs an SDK, see src/cli/tracing.ts). Phases are measured once, here: the same reading becomes the span and
// the number in the actor's lastOperation and in the metrics.
import { type Attributes, context, propagation, type Span, SpanStatusCode, trace } from '@opentelemetry/api';
import { roundMs } from './time.ts';
import type { Phases } from './types.ts';

export const tracer = trace.getTracer('torpor');

/** Runs `fn` in a new span (a child of the active one); errors mark the span and pass through. */
export async function withSpan<T>(name: string, attributes: Attributes, fn: (span: Span) => Promise<T>): Promise<T> {
  return tracer.startActiveSpan(name, { attributes }, async (span) => {
    try {
      return await fn(span);
    } catch (err) {
      span.recordException(err as Error);
      span.setStatus({ code: SpanStatusCode.ERROR, message: (err as Error).message });
      throw err;
    } finally {
      span.end();
    }
  });
}

/** Runs one named phase: a span, and its duration in `phases[name]` (milliseconds). Both come from the same two
 * clock readings, so the trace and the record agree exactly. */
export async function timed<T>(phases: Phases, name: string, fn: () => Promise<T>): Promise<T> {
  const start = performance.now();
  const span = startPhaseSpan(name, start);
  try {
    return await context.with(trace.setSpan(context.active(), span), fn);
  } catch (err) {
    span.recordException(err as Error);
    span.setStatus({ code: SpanStatusCode.ERROR, message: (err as Error).message });
    throw err;
  } finally {
    endPhase(phases, name, span, start, performance.now());
  }
}

/** A phase measured between two `performance.now()` readings taken before it could be named (e.g. the wait for an
 * actor's lock, before the operation exists): a span, and its duration in `phases[name]`, from the same two
 * readings, as `timed` does. */
export function recordPhase(phases: Phases, name: string, start: number, end = performance.now()): void {
  endPhase(phases, name, startPhaseSpan(name, start), start, end);
}

/** `start`: a `performance.now()` reading. */
function startPhaseSpan(name: string, start: number): Span {
  return tracer.startSpan(`phase ${name}`, {
    startTime: performance.timeOrigin + start,
    attributes: { 'torpor.phase': name },
  });
}

function endPhase(phases: Phases, name: string, span: Span, start: number, end: number): void {
  phases[name] = roundMs(end - start);
  span.end(performance.timeOrigin + end);
}

/** Phases a lower layer measured on its own (e.g. a snapshot write's chunk/upload/manifest), as child spans of the
 * active span laid end to end and ending now: their order and durations are exact, their start times derived. */
export function recordPhases(phases: Phases, prefix: string): void {
  const parent = context.active();
  let at = Date.now() - Object.values(phases).reduce((sum, ms) => sum + ms, 0);
  for (const [name, ms] of Object.entries(phases)) {
    const span = tracer.startSpan(
      `phase ${prefix}.${name}`,
      { startTime: at, attributes: { 'torpor.phase': `${prefix}.${name}` } },
      parent,
    );
    at += ms;
    span.end(at);
  }
}

/** The active trace's id, for log lines (undefined when tracing is off). */
export function traceId(): string | undefined {
  const ctx = trace.getSpan(context.active())?.spanContext();
  return ctx && trace.isSpanContextValid(ctx) ? ctx.traceId : undefined;
}

/** The active trace as headers (W3C `traceparent`, `tracestate`) for a call to another Torpor process; empty when
 * tracing is off. */
export function traceHeaders(): Record<string, string> {
  const carrier: Record<string, string> = {};
  propagation.inject(context.active(), carrier);
  return carrier;
}

/** Runs `fn` in the trace a caller's headers carry (see traceHeaders), so its spans continue the caller's trace. */
export function withCallerTrace<T>(headers: Record<string, string | string[] | undefined>, fn: () => T): T {
  return context.with(propagation.extract(context.active(), headers), fn);
}
