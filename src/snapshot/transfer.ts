// Shared bits of snapshot transfers: progress reporting, timing, hashing, option checks.
import { createHash } from 'node:crypto';
import { TorporError } from '../core/errors.ts';
import { elapsedMs, roundMs } from '../core/time.ts';

export { elapsedMs, roundMs };

export interface TransferProgress {
  bytesDone: number;
  bytesTotal: number;
}

export type ProgressListener = (progress: TransferProgress) => void;

/** Counts bytes done against a known total and tells the listener after every step. */
export class ProgressCounter {
  readonly #listener: ProgressListener | undefined;
  readonly #total: number;
  #done = 0;

  constructor(total: number, listener: ProgressListener | undefined) {
    this.#total = total;
    this.#listener = listener;
  }

  add(bytes: number): void {
    this.#done += bytes;
    this.#listener?.({ bytesDone: this.#done, bytesTotal: this.#total });
  }
}

export function sha256Hex(bytes: Uint8Array): string {
  return createHash('sha256').update(bytes).digest('hex');
}

export function positiveInteger(value: number, field: string): number {
  if (!Number.isSafeInteger(value) || value < 1) {
    throw new TorporError('INVALID_ARGUMENT', `${field} must be a positive integer, got ${value}`, { field });
  }
  return value;
}
