// Durations for per-phase timings.

/** Milliseconds since `start` (a performance.now() reading), to 0.01 ms. */
export function elapsedMs(start: number): number {
  return roundMs(performance.now() - start);
}

export function roundMs(ms: number): number {
  return Math.round(ms * 100) / 100;
}
