// Every error Torpor reports carries a stable machine-readable code, the field it is about (when there is
// one) and a human message. The HTTP status is derived from the code, so the API, the CLI and the SDK agree.

export const ERROR_STATUS = {
  INVALID_ARGUMENT: 400,
  UNAUTHENTICATED: 401,
  PERMISSION_DENIED: 403,
  NOT_FOUND: 404,
  ALREADY_EXISTS: 409,
  CONFLICT: 409,
  FAILED_PRECONDITION: 409,
  /** A write fenced by a lease whose holding has ended (expired, released or taken over). */
  LEASE_LOST: 409,
  PAYLOAD_TOO_LARGE: 413,
  IMAGE_REJECTED: 422,
  SNAPSHOT_CORRUPT: 422,
  NOT_SUPPORTED: 501,
  RUNTIME_ERROR: 502,
  NO_CAPACITY: 503,
  TIMEOUT: 504,
  INTERNAL: 500,
} as const;

export type ErrorCode = keyof typeof ERROR_STATUS;

export interface ErrorBody {
  code: ErrorCode;
  message: string;
  field?: string;
}

export class TorporError extends Error {
  readonly code: ErrorCode;
  readonly field: string | undefined;

  constructor(code: ErrorCode, message: string, options: { field?: string; cause?: unknown } = {}) {
    super(message, { cause: options.cause });
    this.name = 'TorporError';
    this.code = code;
    this.field = options.field;
  }

  get status(): number {
    return ERROR_STATUS[this.code];
  }

  toJSON(): ErrorBody {
    return this.field === undefined
      ? { code: this.code, message: this.message }
      : { code: this.code, message: this.message, field: this.field };
  }
}

export function isTorporError(err: unknown, code?: ErrorCode): err is TorporError {
  return err instanceof TorporError && (code === undefined || err.code === code);
}

/** Wraps anything thrown into a TorporError without leaking stack traces or secrets into the message. */
export function asTorporError(err: unknown, fallback: ErrorCode = 'INTERNAL'): TorporError {
  if (err instanceof TorporError) return err;
  const message = err instanceof Error ? err.message : String(err);
  return new TorporError(fallback, message, { cause: err });
}

export const notFound = (kind: string, name: string): TorporError =>
  new TorporError('NOT_FOUND', `${kind} "${name}" not found`, { field: 'name' });
