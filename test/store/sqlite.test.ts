import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { DatabaseSync } from 'node:sqlite';
import { describe, it } from 'node:test';
import { promisify } from 'node:util';
import { SqliteStore } from '../../src/store/sqlite.ts';
import { actor, stateStoreConformance, worker } from './conformance.ts';

stateStoreConformance('sqlite in memory', async () => {
  const store = SqliteStore.open(':memory:');
  return { store, cleanup: () => store.close() };
});

stateStoreConformance('sqlite file, two clients', async () => {
  const dir = await mkdtemp(join(tmpdir(), 'torpor-store-'));
  const path = join(dir, 'state.db');
  const store = SqliteStore.open(path);
  return {
    store,
    second: async () => SqliteStore.open(path),
    cleanup: async () => {
      await store.close();
      await rm(dir, { recursive: true, force: true });
    },
  };
});

async function withDir(body: (dir: string) => Promise<void>): Promise<void> {
  const dir = await mkdtemp(join(tmpdir(), 'torpor-store-'));
  try {
    await body(dir);
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}

describe('SqliteStore specifics', () => {
  it('keeps data across close and reopen, in WAL mode, at schema version 3', async () => {
    await withDir(async (dir) => {
      const path = join(dir, 'state.db');
      const first = SqliteStore.open(path);
      await first.createActor(actor('default', 'a1'));
      await first.close();
      const reopened = SqliteStore.open(path);
      assert.equal((await reopened.getActor('default', 'a1'))?.version, 1);
      await reopened.close();

      const raw = new DatabaseSync(path, { readOnly: true });
      assert.deepEqual({ ...raw.prepare('PRAGMA journal_mode').get() }, { journal_mode: 'wal' });
      assert.deepEqual({ ...raw.prepare(`SELECT value FROM meta WHERE key = 'schema_version'`).get() }, { value: '3' });
      raw.close();
    });
  });

  it('refuses a file written by a newer schema', async () => {
    await withDir(async (dir) => {
      const path = join(dir, 'state.db');
      await SqliteStore.open(path).close();
      const raw = new DatabaseSync(path);
      raw.exec(`UPDATE meta SET value = '99' WHERE key = 'schema_version'`);
      raw.close();
      assert.throws(() => SqliteStore.open(path), /schema version 99 is newer/);
    });
  });

  it('claims are exclusive across processes sharing one file', { timeout: 30_000 }, async () => {
    await withDir(async (dir) => {
      const path = join(dir, 'state.db');
      const store = SqliteStore.open(path);
      for (let i = 0; i < 40; i++) await store.putWorker(worker(`w${String(i).padStart(2, '0')}`));
      const child = join(import.meta.dirname, 'claim-child.ts');
      const run = promisify(execFile);
      const outputs = await Promise.all(
        [0, 1, 2, 3].map((p) => run(process.execPath, [child, path, '25', `p${p}`], { timeout: 20_000 })),
      );
      const won = outputs.flatMap(({ stdout }) => JSON.parse(stdout) as string[]);
      assert.equal(won.length, 40);
      assert.equal(new Set(won).size, 40);
      const busy = (await store.listWorkers({ limit: 1000 })).items.filter((w) => w.state === 'busy');
      assert.equal(busy.length, 40);
      await store.close();
    });
  });

  it('clamps the page size to 1000 and rejects a non-positive limit', async () => {
    const store = SqliteStore.open(':memory:');
    for (let i = 0; i < 1001; i++) await store.putWorker(worker(`w${String(i).padStart(4, '0')}`));
    const page = await store.listWorkers({ limit: 5000 });
    assert.equal(page.items.length, 1000);
    assert.ok(page.nextCursor);
    await assert.rejects(store.listWorkers({ limit: 0 }), { code: 'INVALID_ARGUMENT', field: 'limit' });
    await store.close();
  });

  it('close ends open watches', async () => {
    const store = SqliteStore.open(':memory:');
    const stream = store.watch(['actor'], new AbortController().signal);
    const drained = (async () => {
      for await (const _ of stream) {
        // nothing is written: the loop must end because the store closed
      }
    })();
    await store.close();
    await drained;
  });
});
