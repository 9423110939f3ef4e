// Comparing secrets (API and agent tokens) without leaking, through timing, how much of a guess was right: both
// sides are hashed first, so the comparison takes the same time whatever their lengths.
import { createHash, timingSafeEqual } from 'node:crypto';

const digest = (s: string) => createHash('sha256').update(s).digest();

export function secretsEqual(presented: string, expected: string): boolean {
  return timingSafeEqual(digest(presented), digest(expected));
}

/** The token of an `Authorization: Bearer <token>` header; undefined without one (another scheme included). */
export function bearerToken(header: string | undefined): string | undefined {
  return header === undefined ? undefined : /^Bearer (.+)$/i.exec(header)?.[1];
}
