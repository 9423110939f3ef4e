// Content addressing: every blob an image names by digest is checked against that digest as it is read,
// so a tampered layout or archive is rejected instead of unpacked.

import { createHash } from 'node:crypto';
import { Transform } from 'node:stream';
import { TorporError } from '../core/errors.ts';

const SHA256 = /^sha256:([a-f0-9]{64})$/;

export function sha256Digest(data: Uint8Array | string): string {
  return `sha256:${createHash('sha256').update(data).digest('hex')}`;
}

/** Returns the hex part of a sha256 digest; anything else is a malformed image (and could be a path trick). */
export function digestHex(digest: unknown, what: string): string {
  const match = typeof digest === 'string' ? SHA256.exec(digest) : null;
  if (!match?.[1]) {
    throw new TorporError(
      'INVALID_ARGUMENT',
      `${what} has an unsupported or malformed digest ${JSON.stringify(digest)}`,
      {
        field: 'image',
      },
    );
  }
  return match[1];
}

export function blobName(digest: string, what: string): string {
  return `blobs/sha256/${digestHex(digest, what)}`;
}

export function verifyDigest(data: Uint8Array, expected: string, what: string): void {
  const actual = sha256Digest(data);
  if (actual !== expected) throw digestMismatch(what, expected, actual);
}

/** A pass-through stream that fails at its end when the bytes that went through do not hash to `expected`. */
export function digestCheck(expected: string, what: string, expectedSize?: number): Transform {
  const hash = createHash('sha256');
  let size = 0;
  return new Transform({
    transform(chunk: Buffer, _encoding, callback) {
      hash.update(chunk);
      size += chunk.length;
      callback(null, chunk);
    },
    flush(callback) {
      const actual = `sha256:${hash.digest('hex')}`;
      if (actual !== expected) return callback(digestMismatch(what, expected, actual));
      if (expectedSize !== undefined && size !== expectedSize) {
        return callback(
          new TorporError('IMAGE_REJECTED', `${what} is ${size} bytes, its descriptor says ${expectedSize}`, {
            field: 'image',
          }),
        );
      }
      callback();
    },
  });
}

function digestMismatch(what: string, expected: string, actual: string): TorporError {
  return new TorporError('IMAGE_REJECTED', `${what} does not match its digest: expected ${expected}, got ${actual}`, {
    field: 'image',
  });
}
