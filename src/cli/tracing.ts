// OpenTelemetry traces, on when the standard OTLP environment names a collector (OTEL_EXPORTER_OTLP_ENDPOINT or
// OTEL_EXPORTER_OTLP_TRACES_ENDPOINT; OTLP over HTTP). Spans are made throughout the code base through
// @opentelemetry/api (src/core/trace.ts); this installs the SDK that exports them.
import { OTLPTraceExporter } from '@opentelemetry/exporter-trace-otlp-http';
import { resourceFromAttributes } from '@opentelemetry/resources';
import { BatchSpanProcessor } from '@opentelemetry/sdk-trace-base';
import { NodeTracerProvider } from '@opentelemetry/sdk-trace-node';
import type { Logger } from 'pino';

export interface Tracing {
  /** Exports what is buffered and stops. */
  shutdown: () => Promise<void>;
}

export function startTracing(service: string, log: Logger): Tracing | undefined {
  const endpoint = process.env.OTEL_EXPORTER_OTLP_TRACES_ENDPOINT ?? process.env.OTEL_EXPORTER_OTLP_ENDPOINT;
  if (!endpoint) return undefined;
  const provider = new NodeTracerProvider({
    resource: resourceFromAttributes({ 'service.name': process.env.OTEL_SERVICE_NAME ?? service }),
    spanProcessors: [new BatchSpanProcessor(new OTLPTraceExporter())],
  });
  // Also installs the AsyncLocalStorage context manager (spans follow awaits) and the W3C propagator.
  provider.register();
  log.info({ endpoint: redact(endpoint) }, 'exporting traces over OTLP/HTTP');
  return { shutdown: () => provider.shutdown() };
}

/** An endpoint as it may be logged: no credentials, no query. */
function redact(endpoint: string): string {
  try {
    const url = new URL(endpoint);
    return `${url.protocol}//${url.host}${url.pathname}`;
  } catch {
    return '(invalid URL)';
  }
}
