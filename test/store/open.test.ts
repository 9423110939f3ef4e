import assert from 'node:assert/strict';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { it } from 'node:test';
import { isTorporError } from '../../src/core/errors.ts';
import { openStore } from '../../src/store/open.ts';
import { SqliteStore } from '../../src/store/sqlite.ts';
import { actor } from './conformance.ts';

it('a plain path and sqlite:PATH open the same SQLite file', async () => {
  const dir = await mkdtemp(join(tmpdir(), 'torpor-open-'));
  try {
    const path = join(dir, 'state.db');
    const plain = await openStore(path);
    assert.ok(plain instanceof SqliteStore);
    await plain.createActor(actor('default', 'a1'));
    await plain.close();
    const prefixed = await openStore(`sqlite:${path}`);
    assert.ok(prefixed instanceof SqliteStore);
    assert.equal((await prefixed.getActor('default', 'a1'))?.version, 1);
    await prefixed.close();
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
});

it('anything else is INVALID_ARGUMENT on field store, without echoing the URL', async () => {
  const secret = 'hunter2-secret';
  for (const url of ['', 'sqlite:', `http://u:${secret}@example.com/`, `redis://u:${secret}@[bad`, 'etcd://x']) {
    await assert.rejects(openStore(url), (err: unknown) => {
      assert.ok(isTorporError(err, 'INVALID_ARGUMENT'), `${url}: ${String(err)}`);
      assert.equal(err.field, 'store');
      assert.ok(!err.message.includes(secret), err.message);
      return true;
    });
  }
});

it('redis URL options are checked before connecting: a bad changeRetention or an unknown option is named', async () => {
  await assert.rejects(openStore('redis://127.0.0.1:1/?changeRetention=0'), (err: unknown) => {
    assert.ok(isTorporError(err, 'INVALID_ARGUMENT'), String(err));
    assert.equal(err.field, 'changeRetention');
    return true;
  });
  await assert.rejects(openStore('redis://127.0.0.1:1/?retention=5'), (err: unknown) => {
    assert.ok(isTorporError(err, 'INVALID_ARGUMENT'), String(err));
    assert.match(err.message, /unknown option "retention" \(known: .*changeRetention\)/);
    return true;
  });
});
