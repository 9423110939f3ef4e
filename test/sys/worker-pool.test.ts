import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { WorkerPool } from '../../src/sys/worker-pool.ts';

const ECHO = new URL('./fixtures/echo-worker.ts', import.meta.url);

describe('WorkerPool', () => {
  it('answers requests across its threads and moves transferred buffers', async (t) => {
    const pool = new WorkerPool(ECHO, 2);
    t.after(() => pool.close());
    const answers = await Promise.all([1, 2, 3, 4, 5].map((n) => pool.run<number>({ op: 'echo', value: n })));
    assert.deepEqual(answers, [1, 2, 3, 4, 5]);
    const bytes = new Uint8Array([1, 2, 3]);
    const back = await pool.run<Uint8Array>({ op: 'echo', value: bytes }, [bytes.buffer]);
    assert.deepEqual([...back], [1, 2, 3]);
    assert.equal(bytes.byteLength, 0, 'the buffer was moved, not copied');
  });

  it("propagates a request's failure, and the worker keeps serving", async (t) => {
    const pool = new WorkerPool(ECHO, 1);
    t.after(() => pool.close());
    await assert.rejects(pool.run({ op: 'fail' }), (err: Error) => {
      assert.match(err.message, /request failed on purpose/);
      return true;
    });
    assert.equal(await pool.run<string>({ op: 'echo', value: 'still here' }), 'still here');
  });

  it('fails the requests of a crashed worker and replaces it', async (t) => {
    const pool = new WorkerPool(ECHO, 1);
    t.after(() => pool.close());
    await assert.rejects(pool.run({ op: 'crash' }), /worker crashed on purpose/);
    assert.equal(await pool.run<number>({ op: 'echo', value: 7 }), 7);
  });

  it('does not keep the process alive when idle', async () => {
    // The test process itself would hang at exit otherwise: the pool is never closed here.
    const pool = new WorkerPool(ECHO, 1);
    assert.equal(await pool.run<number>({ op: 'echo', value: 1 }), 1);
  });
});
