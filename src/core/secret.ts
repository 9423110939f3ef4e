// Comparing presented credentials (API keys, ingress tokens) with configured ones without leaking, through
// timing, how much of a guess was right: both sides are hashed to a fixed length first.
import { createHash, timingSafeEqual } from 'node:crypto';

const digest = (s: string) => createHash('sha256').update(s).digest();

export function secretEquals(presented: string, expected: string): boolean {
  return timingSafeEqual(digest(presented), digest(expected));
}

/** The token of an `Authorization: Bearer <token>` header, or undefined. */
export function bearerToken(header: string | string[] | undefined): string | undefined {
  const value = Array.isArray(header) ? header[0] : header;
  return value ? (/^Bearer (.+)$/i.exec(value)?.[1] ?? undefined) : undefined;
}
