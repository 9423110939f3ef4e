// Instances over time: a TTL is a timer per instance that survives a crash of Torpor (re-armed from the store at
// start; one that expired while Torpor was down goes at once), and an idle instance is suspended, not deleted,
// and answers its next tool call with its memory intact.
import assert from 'node:assert/strict';
import { after, describe, test } from 'node:test';
import { applyTemplate, counterEnvTemplate, gvisorSkipReason, startTorpor, type Torpor } from './harness.ts';

interface Instance {
  id: string;
  created_at: string;
  status: string;
  ip: string;
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, Math.max(0, ms)));

async function create(t: Torpor, body: Record<string, unknown>): Promise<Instance> {
  const res = await fetch(`${t.url}/env-instance`, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ envName: 'counter@v1', ...body }),
  });
  const env = (await res.json()) as { data: Instance };
  assert.equal(res.status, 200, JSON.stringify(env));
  return env.data;
}

/** The instance's creation time to the millisecond (its actor's). */
async function createdAt(t: Torpor, id: string): Promise<number> {
  const [name, space] = id.split('.');
  const actor = (await (await fetch(`${t.url}/v1/spaces/${space}/actors/${name}`)).json()) as { createdAt: string };
  return Date.parse(actor.createdAt);
}

const exists = async (t: Torpor, id: string): Promise<boolean> => (await fetch(`${t.url}/env-instance/${id}`)).ok;

/** When the instance disappears (polling every 50 ms), or 0 if it is still there at `until`. */
async function goneAt(t: Torpor, id: string, until: number): Promise<number> {
  while (Date.now() < until) {
    if (!(await exists(t, id))) return Date.now();
    await sleep(50);
  }
  return 0;
}

describe('instances over time (gVisor)', { skip: gvisorSkipReason() }, () => {
  const running: Torpor[] = [];
  after(async () => {
    for (const t of running) await t.stop();
  });

  test('TTL timers survive a crash: re-armed from the store, an overdue one fires at start', async (ctx) => {
    const first = await startTorpor({ workers: 2, networkBase: 170 });
    await applyTemplate(first.url, await counterEnvTemplate());
    const short = await create(first, { ttl: '4s' });
    const long = await create(first, { ttl: '16s' });
    // created_at has second precision; the timer counts from the actor's creation, to the millisecond.
    const shortExpiry = (await createdAt(first, short.id)) + 4000;
    const longExpiry = (await createdAt(first, long.id)) + 16_000;
    assert.ok(longExpiry - Date.parse(long.created_at) - 16_000 < 1000);
    await first.crash();

    // Down past the short TTL: nobody is there to delete it.
    await sleep(shortExpiry + 1000 - Date.now());
    const second = await startTorpor({ workers: 2, networkBase: 170, dataDir: first.dataDir });
    running.push(second);
    const started = Date.now();
    const shortGone = await goneAt(second, short.id, started + 5000);
    assert.ok(shortGone > 0, 'the overdue instance is deleted once Torpor is back');
    assert.ok(shortGone - started < 2000, `deleted ${shortGone - started} ms after the start`);

    assert.ok(Date.now() < longExpiry - 1500, 'the test reached the long TTL with time to spare');
    await sleep(longExpiry - 1000 - Date.now());
    assert.ok(await exists(second, long.id), 'still there a second before its expiry');
    const longGone = await goneAt(second, long.id, longExpiry + 5000);
    assert.ok(longGone > 0, 'deleted by its re-armed timer');
    // The delete itself takes a moment (more on a loaded machine); a periodic sweep would be minutes late.
    assert.ok(longGone - longExpiry < 1500, `deleted ${longGone - longExpiry} ms after its expiry`);
    ctx.diagnostic(`overdue TTL deleted ${shortGone - started} ms after the start`);
    ctx.diagnostic(`re-armed TTL: deleted ${longGone - longExpiry} ms after creation + ttl`);
  });

  test('an idle instance is suspended, not deleted, and its next tool call finds its memory', async () => {
    const t = await startTorpor({ workers: 1, networkBase: 175 });
    running.push(t);
    await applyTemplate(t.url, await counterEnvTemplate({ idleTimeoutSeconds: 2 }));
    const i = await create(t, {});
    const tool = async () => {
      const res = await fetch(`${t.mcpUrl}/`, { headers: { 'AEnvCore-EnvInstance-ID': i.id } });
      assert.equal(res.status, 200);
      return (await res.text()).trim();
    };
    assert.equal(await tool(), '1');
    const [name, space] = i.id.split('.');
    const actor = async () =>
      (await (await fetch(`${t.url}/v1/spaces/${space}/actors/${name}`)).json()) as { status: string };
    const deadline = Date.now() + 20_000;
    while ((await actor()).status !== 'SUSPENDED' && Date.now() < deadline) await sleep(200);
    assert.equal((await actor()).status, 'SUSPENDED', 'suspended after 2 s idle');
    const got = (await (await fetch(`${t.url}/env-instance/${i.id}`)).json()) as { data: Instance };
    assert.equal(got.data.status, 'Running', 'to its user the instance is still there');
    assert.equal(got.data.ip, '', 'with no address while suspended');
    assert.equal(await tool(), '2', 'resumed by the call, counter intact');
  });
});
