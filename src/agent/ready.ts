// Readiness: HTTP GET until a 2xx or the deadline. Polls fast at first (restores are ready in tens of ms) and
// backs off so a slow boot does not hammer the actor.
import { TorporError } from '../core/errors.ts';

export async function waitReady(url: string, timeoutMs: number, signal?: AbortSignal): Promise<number> {
  const t0 = performance.now();
  let delay = 2;
  let last = 'no response';
  while (performance.now() - t0 < timeoutMs) {
    signal?.throwIfAborted();
    try {
      const res = await fetch(url, { signal: AbortSignal.timeout(Math.max(100, Math.min(2000, timeoutMs))) });
      await res.arrayBuffer();
      if (res.ok) return Math.round(performance.now() - t0);
      last = `HTTP ${res.status}`;
    } catch (err) {
      last = err instanceof Error ? ((err.cause as Error | undefined)?.message ?? err.message) : String(err);
    }
    await new Promise((r) => setTimeout(r, delay));
    delay = Math.min(delay * 2, 100);
  }
  throw new TorporError('TIMEOUT', `actor not ready at ${url} within ${timeoutMs} ms (last: ${last})`, {
    field: 'readiness',
  });
}
