// A crash must not leave an actor stuck: after `torpor up` is killed with actors running, the next start
// cleans the orphaned sandboxes and the reconciler rolls the actors back to their last durable snapshot.
import assert from 'node:assert/strict';
import { writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { after, describe, test } from 'node:test';
import { counterImage } from '../fixtures/images.ts';
import { gvisorSkipReason, startTorpor, type Torpor } from './harness.ts';

interface Actor {
  status: string;
  address?: string;
  worker?: string;
  snapshot?: string;
  reason?: string;
}

const get = async (address: string) => (await (await fetch(`http://${address}/`)).text()).trim();

describe('restart after a crash (gVisor)', { skip: gvisorSkipReason() }, () => {
  let second: Torpor | undefined;
  after(async () => {
    await second?.stop();
  });

  test('a RUNNING actor whose process died is reconciled to SUSPENDED at its last snapshot', async () => {
    const image = await counterImage();
    const first = await startTorpor({ workers: 2, networkBase: 50 });
    const file = join(first.dataDir, 'counter.yaml');
    await writeFile(file, `name: counter\nimage: ${image}\nport: 8080\nreadiness: { path: /healthz }\n`);
    await first.json('template', 'apply', '-f', file);
    await first.json('actor', 'create', 'r1', '--template', 'counter');
    let a = await first.json<Actor>('actor', 'resume', 'r1');
    assert.deepEqual([await get(a.address!), await get(a.address!)], ['1', '2']);
    a = await first.json<Actor>('actor', 'suspend', 'r1');
    const durable = a.snapshot;
    a = await first.json<Actor>('actor', 'resume', 'r1');
    assert.equal(await get(a.address!), '3', 'state after the durable snapshot: lost in the crash');
    await first.crash();

    second = await startTorpor({ workers: 2, networkBase: 50, dataDir: first.dataDir });
    const reconciled = await second.json<Actor>('actor', 'get', 'r1');
    assert.equal(reconciled.status, 'SUSPENDED');
    assert.equal(reconciled.snapshot, durable);
    assert.equal(reconciled.worker, undefined);
    assert.match(reconciled.reason ?? '', /reconciled: worker .* was lost/);
    const workers = await second.json<{ items: { state: string }[] }>('worker', 'list');
    assert.deepEqual(
      workers.items.map((w) => w.state),
      ['free', 'free'],
    );
    const resumed = await second.json<Actor>('actor', 'resume', 'r1');
    assert.equal(await get(resumed.address!), '3', 'resumed from the last durable snapshot (count 2)');
  });
});
