// The behaviour every BlobStore must have. Each implementation's test file calls blobStoreConformance with a
// factory for a fresh, empty store; snapshots rely on exactly these guarantees (atomic put above all).
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { Readable } from 'node:stream';
import { buffer } from 'node:stream/consumers';
import { afterEach, beforeEach, describe, it } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import type { BlobStore } from '../../src/blob/blob.ts';
import { type ErrorCode, isTorporError } from '../../src/core/errors.ts';

export type BlobStoreFactory = () => Promise<{ store: BlobStore; cleanup: () => Promise<void> }>;

const INVALID_KEYS = ['', '/abs', 'a/../b', '..', './a', 'a/./b', 'a\\b', 'a\0b', 'a//b', 'a/'];

/** Asserts that `promise` rejects with a TorporError of `code` about `field`. */
export async function rejectsWith(promise: Promise<unknown>, code: ErrorCode, field?: string): Promise<void> {
  await assert.rejects(promise, (err: unknown) => {
    assert.ok(isTorporError(err), `expected a TorporError, got ${String(err)}`);
    assert.equal(err.code, code, err.message);
    if (field !== undefined) assert.equal(err.field, field, err.message);
    return true;
  });
}

/** The object's bytes, or undefined if it does not exist (any other error fails the test). */
async function readOrMissing(store: BlobStore, key: string): Promise<Buffer | undefined> {
  try {
    return Buffer.from(await store.getBytes(key));
  } catch (err) {
    if (isTorporError(err, 'NOT_FOUND')) return undefined;
    throw err;
  }
}

async function listAll(store: BlobStore, prefix: string, limit: number): Promise<{ keys: string[]; pages: number }> {
  const keys: string[] = [];
  let pages = 0;
  let cursor: string | undefined;
  do {
    const page = await store.list(prefix, cursor === undefined ? { limit } : { cursor, limit });
    assert.ok(page.keys.length <= limit, `page of ${page.keys.length} exceeds limit ${limit}`);
    keys.push(...page.keys);
    pages++;
    cursor = page.nextCursor;
    if (cursor !== undefined) assert.equal(cursor, page.keys.at(-1), 'cursor is the last key returned');
  } while (cursor !== undefined);
  return { keys, pages };
}

function shuffled<T>(items: T[]): T[] {
  const copy = [...items];
  for (let i = copy.length - 1; i > 0; i--) {
    const j = Math.floor(Math.random() * (i + 1));
    [copy[i], copy[j]] = [copy[j]!, copy[i]!];
  }
  return copy;
}

export function blobStoreConformance(name: string, make: BlobStoreFactory): void {
  describe(`BlobStore conformance: ${name}`, () => {
    let store: BlobStore;
    let cleanup: () => Promise<void>;
    beforeEach(async () => {
      ({ store, cleanup } = await make());
    });
    afterEach(async () => {
      await cleanup();
    });

    describe('put and get', () => {
      it('round-trips bytes through getBytes and get', async () => {
        const data = randomBytes(4096);
        await store.put('rt/bytes', data);
        assert.deepEqual(Buffer.from(await store.getBytes('rt/bytes')), data);
        assert.deepEqual(await buffer(await store.get('rt/bytes')), data);
      });

      it('round-trips a streamed body', async () => {
        const pieces = [randomBytes(70_000), randomBytes(1), randomBytes(300_000)];
        await store.put('rt/stream', Readable.from(pieces));
        assert.deepEqual(Buffer.from(await store.getBytes('rt/stream')), Buffer.concat(pieces));
      });

      it('round-trips an empty object', async () => {
        await store.put('rt/empty', new Uint8Array(0));
        assert.equal((await store.getBytes('rt/empty')).length, 0);
        assert.equal((await buffer(await store.get('rt/empty'))).length, 0);
        assert.equal(await store.has('rt/empty'), true);
      });

      it('overwrites an existing key', async () => {
        await store.put('rt/over', randomBytes(5000));
        const second = randomBytes(100);
        await store.put('rt/over', second);
        assert.deepEqual(Buffer.from(await store.getBytes('rt/over')), second);
      });
    });

    describe('atomic put', () => {
      const PIECE = 64 * 1024;
      const PIECES = 64;
      const newBytes = Buffer.alloc(PIECE * PIECES, 0x42);

      /** A 4 MiB body delivered slowly, so readers get many chances to look at the object mid-put. */
      function slowBody(): Readable {
        return Readable.from(
          (async function* () {
            for (let i = 0; i < PIECES; i++) {
              yield newBytes.subarray(i * PIECE, (i + 1) * PIECE);
              await sleep(1);
            }
          })(),
        );
      }

      /** Reads `key` in a loop while `put` runs; returns how often each acceptable state was seen. */
      async function observeWhile(put: Promise<void>, key: string, oldBytes: Buffer | undefined) {
        const seen = { old: 0, missing: 0, complete: 0 };
        let done = false;
        const putting = put.finally(() => {
          done = true;
        });
        while (!done) {
          const bytes = await readOrMissing(store, key);
          if (bytes === undefined) seen.missing++;
          else if (oldBytes !== undefined && bytes.equals(oldBytes)) seen.old++;
          else if (bytes.equals(newBytes)) seen.complete++;
          else assert.fail(`reader saw a partial object of ${bytes.length} bytes`);
        }
        await putting;
        return seen;
      }

      it('a reader during a streamed overwrite sees the old or the complete new object, never part', async () => {
        const oldBytes = Buffer.alloc(256 * 1024, 0x41);
        await store.put('atomic/over', oldBytes);
        const seen = await observeWhile(store.put('atomic/over', slowBody()), 'atomic/over', oldBytes);
        assert.ok(seen.old > 0, 'the reader ran while the put was in progress');
        assert.equal(seen.missing, 0, 'an overwrite never makes the object disappear');
        assert.ok((await readOrMissing(store, 'atomic/over'))?.equals(newBytes), 'the new object after the put');
      });

      it('a reader during a streamed put of a new key sees NOT_FOUND or the complete object', async () => {
        const seen = await observeWhile(store.put('atomic/new', slowBody()), 'atomic/new', undefined);
        assert.ok(seen.missing > 0, 'the reader ran while the put was in progress');
        assert.ok((await readOrMissing(store, 'atomic/new'))?.equals(newBytes));
      });

      it('a put whose body fails rejects and leaves the previous object intact', async () => {
        const oldBytes = randomBytes(1000);
        await store.put('atomic/fail', oldBytes);
        const failing = Readable.from(
          (async function* () {
            yield randomBytes(10_000);
            throw new Error('disk on fire');
          })(),
        );
        await assert.rejects(store.put('atomic/fail', failing), /disk on fire/);
        assert.deepEqual(await readOrMissing(store, 'atomic/fail'), oldBytes);
        assert.deepEqual((await store.list('')).keys, ['atomic/fail'], 'no staging object is visible');
      });
    });

    describe('ranged get', () => {
      const data = randomBytes(1000);
      const ranged = async (start: number, end?: number) =>
        buffer(await store.get('range/obj', end === undefined ? { start } : { start, end }));
      beforeEach(async () => {
        await store.put('range/obj', data);
      });

      it('reads start..end inclusive', async () => {
        assert.deepEqual(await ranged(100, 199), data.subarray(100, 200));
      });

      it('reads from start to the end when end is omitted', async () => {
        assert.deepEqual(await ranged(990), data.subarray(990));
      });

      it('reads a single byte', async () => {
        assert.deepEqual(await ranged(5, 5), data.subarray(5, 6));
        assert.deepEqual(await ranged(999, 999), data.subarray(999));
      });

      it('cuts a range that runs past the end at the end', async () => {
        assert.deepEqual(await ranged(990, 5000), data.subarray(990));
      });

      it('rejects a start beyond the object, a negative start and end < start with INVALID_ARGUMENT', async () => {
        await rejectsWith(store.get('range/obj', { start: 1000 }), 'INVALID_ARGUMENT', 'range');
        await rejectsWith(store.get('range/obj', { start: -1 }), 'INVALID_ARGUMENT', 'range');
        await rejectsWith(store.get('range/obj', { start: 10, end: 9 }), 'INVALID_ARGUMENT', 'range');
      });

      it('reports NOT_FOUND for a range of a missing key', async () => {
        await rejectsWith(store.get('range/missing', { start: 0, end: 1 }), 'NOT_FOUND', 'key');
      });
    });

    describe('list', () => {
      const items = Array.from({ length: 25 }, (_, i) => `list/item-${String(i).padStart(2, '0')}`);
      const siblings = ['list-sibling/x', 'lis', 'other/list/item-00'];
      beforeEach(async () => {
        for (const key of shuffled([...items, ...siblings])) await store.put(key, Buffer.from(key));
      });

      it('pages through a prefix in order without duplicates', async () => {
        const { keys, pages } = await listAll(store, 'list/', 10);
        assert.equal(pages, 3);
        assert.deepEqual(keys, [...items].sort());
        assert.equal(new Set(keys).size, keys.length);
      });

      it('returns everything in one page under the default limit, with no cursor', async () => {
        const page = await store.list('list/');
        assert.deepEqual(page.keys, items);
        assert.equal(page.nextCursor, undefined);
      });

      it('matches the prefix as a string, not a directory', async () => {
        assert.deepEqual((await store.list('list/item-1')).keys, items.slice(10, 20));
        assert.deepEqual((await store.list('list')).keys, [...items, 'list-sibling/x'].sort());
        assert.deepEqual((await store.list('')).keys, [...items, ...siblings].sort());
        assert.deepEqual((await store.list('nothing/')).keys, []);
      });

      it('orders whole keys lexicographically across "directories"', async () => {
        for (const key of ['order/a/b', 'order/a-c', 'order/a.d']) await store.put(key, Buffer.from(key));
        assert.deepEqual((await store.list('order/')).keys, ['order/a-c', 'order/a.d', 'order/a/b']);
      });

      it('resumes after a cursor', async () => {
        assert.deepEqual((await store.list('list/', { cursor: 'list/item-22' })).keys, items.slice(23));
      });
    });

    describe('has and delete', () => {
      it('has reflects put and delete', async () => {
        assert.equal(await store.has('del/a'), false);
        await store.put('del/a', randomBytes(10));
        await store.put('del/b', randomBytes(10));
        assert.equal(await store.has('del/a'), true);
        await store.delete('del/a');
        assert.equal(await store.has('del/a'), false);
        assert.equal(await store.has('del/b'), true, 'a sibling survives');
        assert.deepEqual((await store.list('del/')).keys, ['del/b']);
        await rejectsWith(store.getBytes('del/a'), 'NOT_FOUND', 'key');
      });

      it('delete is idempotent', async () => {
        await store.put('del/x', randomBytes(10));
        await store.delete('del/x');
        await store.delete('del/x');
        await store.delete('never/existed');
        assert.equal(await store.has('del/x'), false);
      });

      it('has is false for a prefix that is not itself a key', async () => {
        await store.put('dir/inner', randomBytes(10));
        assert.equal(await store.has('dir'), false);
        await rejectsWith(store.getBytes('dir'), 'NOT_FOUND', 'key');
      });
    });

    describe('errors', () => {
      it('missing keys are NOT_FOUND with field "key"', async () => {
        await rejectsWith(store.get('missing/key'), 'NOT_FOUND', 'key');
        await rejectsWith(store.getBytes('missing/key'), 'NOT_FOUND', 'key');
        assert.equal(await store.has('missing/key'), false);
      });

      for (const key of INVALID_KEYS) {
        it(`rejects the key ${JSON.stringify(key)} with INVALID_ARGUMENT`, async () => {
          await rejectsWith(store.put(key, randomBytes(1)), 'INVALID_ARGUMENT', 'key');
          await rejectsWith(store.get(key), 'INVALID_ARGUMENT', 'key');
          await rejectsWith(store.getBytes(key), 'INVALID_ARGUMENT', 'key');
          await rejectsWith(store.has(key), 'INVALID_ARGUMENT', 'key');
          await rejectsWith(store.delete(key), 'INVALID_ARGUMENT', 'key');
        });
      }

      it('rejects a non-positive list limit with INVALID_ARGUMENT', async () => {
        await rejectsWith(store.list('', { limit: 0 }), 'INVALID_ARGUMENT', 'limit');
      });
    });
  });
}
