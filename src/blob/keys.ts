// Blob keys are '/'-separated relative paths. The same rules guard file names read from snapshot manifests,
// because both end up joined onto a directory on disk: a key that could climb out of it must never get through.
import { TorporError } from '../core/errors.ts';

/** Why `path` is not a safe relative path, or undefined when it is. */
export function unsafePathReason(path: string): string | undefined {
  if (path.length === 0) return 'must not be empty';
  if (path.includes('\0')) return 'must not contain NUL';
  if (path.includes('\\')) return 'must not contain a backslash';
  if (path.startsWith('/')) return 'must be relative, not start with "/"';
  for (const segment of path.split('/')) {
    if (segment === '') return 'must not contain empty segments ("//" or a trailing "/")';
    if (segment === '.' || segment === '..') return 'must not contain "." or ".." segments';
  }
  return undefined;
}

/** Throws INVALID_ARGUMENT (field "key") unless `key` is a valid blob key. */
export function assertValidKey(key: string): void {
  const reason = typeof key === 'string' ? unsafePathReason(key) : 'must be a string';
  if (reason !== undefined) {
    throw new TorporError('INVALID_ARGUMENT', `blob key ${JSON.stringify(key)} ${reason}`, { field: 'key' });
  }
}
