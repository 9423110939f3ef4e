// Transfer progress on stderr: bytes, rate and time left, redrawn in place. Only on a terminal: piped or captured
// output gets nothing (scripts read stdout; a log file does not want a hundred carriage returns). The lower layers
// report bytes through callbacks; only this file draws.

export interface ProgressStream {
  isTTY?: boolean;
  columns?: number;
  write(text: string): unknown;
}

const UNITS = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
const REDRAW_MS = 100;

export function formatBytes(n: number): string {
  let value = n;
  let unit = 0;
  while (value >= 1024 && unit < UNITS.length - 1) {
    value /= 1024;
    unit++;
  }
  return unit === 0 ? `${value} B` : `${value.toFixed(1)} ${UNITS[unit]}`;
}

export function formatDuration(seconds: number): string {
  const s = Math.max(0, Math.round(seconds));
  if (s < 60) return `${s}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m${String(s % 60).padStart(2, '0')}s`;
  return `${Math.floor(s / 3600)}h${String(Math.floor((s % 3600) / 60)).padStart(2, '0')}m`;
}

/** "label  3.0 MiB / 12.0 MiB  25%  1.5 MiB/s  ETA 6s" (no total: no percentage and no ETA). */
export function formatProgress(label: string, done: number, total: number | undefined, elapsedMs: number): string {
  const rate = elapsedMs > 0 ? (done * 1000) / elapsedMs : 0;
  const parts = [label];
  if (total !== undefined && total > 0) {
    parts.push(`${formatBytes(done)} / ${formatBytes(total)}`, `${Math.min(100, Math.floor((done * 100) / total))}%`);
  } else {
    parts.push(formatBytes(done));
  }
  parts.push(`${formatBytes(Math.round(rate))}/s`);
  if (total !== undefined && total > done && rate > 0) parts.push(`ETA ${formatDuration((total - done) / rate)}`);
  return parts.join('  ');
}

/** One transfer of one or more parts (say, the layers of an image or the assets of a set), drawn as one line. */
export class Progress {
  readonly #stream: ProgressStream;
  readonly #label: string;
  readonly #parts = new Map<string, { done: number; total: number | undefined }>();
  readonly #start = performance.now();
  #lastDraw = 0;

  constructor(label: string, stream: ProgressStream = process.stderr) {
    this.#label = label;
    this.#stream = stream;
  }

  get enabled(): boolean {
    return this.#stream.isTTY === true;
  }

  /** The bytes of one part so far (and its size, when known). */
  update(part: string, done: number, total?: number): void {
    this.#parts.set(part, { done, total });
    const now = performance.now();
    if (now - this.#lastDraw >= REDRAW_MS) this.#draw(now);
  }

  /** Draws the final figures and ends the line (nothing when nothing was drawn: a cache hit moves no bytes). */
  finish(): void {
    if (!this.enabled || this.#parts.size === 0) return;
    this.#draw(performance.now());
    this.#stream.write('\n');
  }

  #draw(now: number): void {
    if (!this.enabled) return;
    this.#lastDraw = now;
    let done = 0;
    let total: number | undefined = 0;
    for (const p of this.#parts.values()) {
      done += p.done;
      total = total === undefined || p.total === undefined ? undefined : total + p.total;
    }
    // The figures always fit; a label too long for the terminal is cut (with "…").
    const figures = formatProgress('', done, total, now - this.#start).trimStart();
    const room = Math.max(1, (this.#stream.columns || 100) - 1 - figures.length - 2);
    const label = this.#label.length > room ? `${this.#label.slice(0, room - 1)}…` : this.#label;
    // Carriage return, the line, then "erase to the end of the line".
    this.#stream.write(`\r${label}  ${figures}\x1b[K`);
  }
}
