// Errors the SDK throws: the server's own code, HTTP status and field, or UNREACHABLE when no answer came.
import type { components } from './openapi.ts';

export type ErrorCode = components['schemas']['ErrorBody']['code'];

export class TorporApiError extends Error {
  /** The server's stable code (e.g. NOT_FOUND, NO_CAPACITY), or UNREACHABLE when the server never answered. */
  readonly code: ErrorCode | 'UNREACHABLE';
  /** HTTP status; 0 when the server never answered. */
  readonly status: number;
  /** The request field the error is about, when the server named one. */
  readonly field: string | undefined;

  constructor(code: ErrorCode | 'UNREACHABLE', message: string, status: number, field?: string, cause?: unknown) {
    super(message, cause === undefined ? undefined : { cause });
    this.name = 'TorporApiError';
    this.code = code;
    this.status = status;
    this.field = field;
  }
}
