// Keyset pagination shared by the store implementations. A cursor is the key of the last item a page returned,
// encoded so callers treat it as opaque: they can hand it back, but not build or edit one.
import { TorporError } from '../core/errors.ts';
import type { ListOptions } from './store.ts';

export const DEFAULT_PAGE_LIMIT = 100;
export const MAX_PAGE_LIMIT = 1000;

/** The page size to use: the default when unset, capped at the maximum (internal callers may ask for "all"). */
export function pageLimit(opts: ListOptions | undefined): number {
  const limit = opts?.limit ?? DEFAULT_PAGE_LIMIT;
  if (!Number.isInteger(limit) || limit < 1) {
    throw new TorporError('INVALID_ARGUMENT', `limit: must be a positive integer, got ${limit}`, { field: 'limit' });
  }
  return Math.min(limit, MAX_PAGE_LIMIT);
}

export function encodeCursor(key: readonly string[]): string {
  return Buffer.from(JSON.stringify(key), 'utf8').toString('base64url');
}

/** Decodes a cursor made by `encodeCursor` for a key of `parts` strings; anything else is INVALID_ARGUMENT. */
export function decodeCursor(cursor: string, parts: number): string[] {
  const key = parseCursor(cursor);
  if (!Array.isArray(key) || key.length !== parts || !key.every((part) => typeof part === 'string')) {
    throw badCursor();
  }
  return key;
}

function parseCursor(cursor: string): unknown {
  // Buffer's base64url decoder skips characters it does not know, so check the alphabet first.
  if (!/^[A-Za-z0-9_-]+$/.test(cursor)) throw badCursor();
  try {
    return JSON.parse(Buffer.from(cursor, 'base64url').toString('utf8'));
  } catch {
    throw badCursor();
  }
}

function badCursor(): TorporError {
  return new TorporError('INVALID_ARGUMENT', 'cursor: not a cursor returned by this listing', { field: 'cursor' });
}

/** Turns `limit + 1` fetched rows into a page: the extra row only tells whether another page exists. */
export function toPage<T>(rows: T[], limit: number, keyOf: (item: T) => string[]): { items: T[]; nextCursor?: string } {
  if (rows.length <= limit) return { items: rows };
  const items = rows.slice(0, limit);
  return { items, nextCursor: encodeCursor(keyOf(items[items.length - 1]!)) };
}
