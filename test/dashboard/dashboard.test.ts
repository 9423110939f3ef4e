// The dashboard in real headless Chromium against a real `torpor up` on runsc: it shows actors, workers,
// operations, the activation plot and storage; suspend, resume and delete are clicked and confirmed, and the
// page follows the changes live (no reload). Assertions are on the page's content, never on pixels.
import assert from 'node:assert/strict';
import { existsSync } from 'node:fs';
import { stat } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { type Browser, chromium, type Page } from 'playwright-core';
import { gvisorSkipReason, startTorpor, type Torpor } from '../e2e/harness.ts';

const CHROMIUM = process.env.TORPOR_CHROMIUM ?? '/usr/bin/chromium';
const skip =
  gvisorSkipReason() ?? (existsSync(CHROMIUM) ? undefined : `chromium not found at ${CHROMIUM}: run scripts/setup.sh`);

// From the recipe for headless Chromium on a machine without a display or internet.
const CHROMIUM_FLAGS = [
  '--no-sandbox',
  '--disable-gpu',
  '--disable-quic',
  '--no-first-run',
  '--disable-background-networking',
  '--disable-component-update',
  '--disable-sync',
];

const WAIT = { timeout: 60_000 };

describe('dashboard in headless Chromium (gVisor)', { skip }, () => {
  let t: Torpor;
  let browser: Browser;
  let page: Page;

  const api = async (method: string, path: string, body?: unknown) => {
    const res = await fetch(t.url + path, {
      method,
      ...(body === undefined ? {} : { headers: { 'content-type': 'application/json' }, body: JSON.stringify(body) }),
    });
    const text = await res.text();
    assert.ok(res.ok, `${method} ${path}: ${res.status} ${text}`);
    return text ? (JSON.parse(text) as Record<string, unknown>) : {};
  };
  const stateCell = (key: string) => page.locator(`#actors tr[data-actor="${key}"] td.state`);

  before(async () => {
    t = await startTorpor({ workers: 2, networkBase: 150, args: ['--sample'] });
    // --sample creates the template and actor "counter" just after the server starts; wait for its golden
    // snapshot so the first resume is a restore.
    const deadline = Date.now() + 120_000;
    for (;;) {
      const template = await fetch(`${t.url}/v1/templates/counter`);
      const golden = template.ok && ((await template.json()) as { goldenSnapshot?: string }).goldenSnapshot;
      if (golden && (await fetch(`${t.url}/v1/spaces/default/actors/counter`)).ok) break;
      assert.ok(Date.now() < deadline, 'the sample actor exists and its template has a golden snapshot');
      await new Promise((r) => setTimeout(r, 200));
    }
    await api('POST', '/v1/spaces/default/actors/counter/resume', {});
    browser = await chromium.launch({ executablePath: CHROMIUM, headless: true, args: CHROMIUM_FLAGS });
    page = await browser.newPage({ viewport: { width: 1280, height: 1000 } });
    await page.goto(`${t.url}/dashboard/`);
  });
  after(async () => {
    await browser?.close();
    await t?.stop();
  });

  test('shows actors by state, workers and what they host, operations, latency and storage', async () => {
    await page.locator('#connection[data-state="live"]').waitFor(WAIT);
    assert.equal(await stateCell('default/counter').textContent(), 'RUNNING');
    assert.equal(await page.locator('#state-counts').textContent(), 'RUNNING 1');
    const actor = (await api('GET', '/v1/spaces/default/actors/counter')) as { worker: string };
    const hosting = page.locator(`#workers tr[data-worker="${actor.worker}"] td.hosts`);
    assert.equal(await hosting.textContent(), 'default/counter');
    assert.equal(await page.locator('#workers-busy').textContent(), '1');
    assert.equal(await page.locator('#workers-total').textContent(), '2');
    // The resume is a recent operation, with its phases.
    const resume = page.locator('#operations tr[data-operation="resume"][data-actor="default/counter"]').first();
    assert.match((await resume.locator('td.phases').textContent()) ?? '', /restore \d+/);
    // Storage holds the golden snapshot.
    await page.locator('#storage-bytes', { hasText: /\d/ }).waitFor(WAIT);
    assert.match((await page.locator('#storage-bytes').textContent()) ?? '', /^\d+(\.\d)? (B|KiB|MiB|GiB)$/);
    assert.ok(Number(await page.locator('#storage-objects').textContent()) > 0);
  });

  test('suspend and resume by clicking, with confirmation; the page follows live', async () => {
    // A marker on the window proves the page is never reloaded: every change below arrives over the stream.
    await page.evaluate(() => {
      (window as unknown as { marker: number }).marker = 42;
    });
    const suspend = page.locator('button[data-action="suspend"][data-actor="default/counter"]');
    const resume = page.locator('button[data-action="resume"][data-actor="default/counter"]');
    assert.equal(await resume.isDisabled(), true, 'a running actor cannot be resumed');

    // Cancelling the confirmation does nothing.
    await suspend.click();
    await page.locator('#confirm[open]').waitFor(WAIT);
    assert.equal(await page.locator('#confirm-text').textContent(), 'Suspend actor default/counter?');
    await page.locator('#confirm-cancel').click();
    await page.locator('#confirm').waitFor({ state: 'hidden' });
    await new Promise((r) => setTimeout(r, 500));
    assert.equal(((await api('GET', '/v1/spaces/default/actors/counter')) as { status: string }).status, 'RUNNING');

    await suspend.click();
    await page.locator('#confirm-ok').click();
    await page.locator('#actors tr[data-actor="default/counter"] td.state', { hasText: 'SUSPENDED' }).waitFor(WAIT);
    assert.equal(((await api('GET', '/v1/spaces/default/actors/counter')) as { status: string }).status, 'SUSPENDED');
    await page.locator('#workers-busy', { hasText: /^0$/ }).waitFor(WAIT); // once the worker is torn down
    await page.locator('#operations tr[data-operation="suspend"][data-actor="default/counter"]').first().waitFor(WAIT);

    await resume.click();
    assert.equal(await page.locator('#confirm-text').textContent(), 'Resume actor default/counter?');
    await page.locator('#confirm-ok').click();
    await page.locator('#actors tr[data-actor="default/counter"] td.state', { hasText: 'RUNNING' }).waitFor(WAIT);
    assert.equal(((await api('GET', '/v1/spaces/default/actors/counter')) as { status: string }).status, 'RUNNING');
    assert.equal(await page.evaluate(() => (window as unknown as { marker?: number }).marker), 42, 'no reload');

    // Two activations now: the latency plot has a point for each, and says so.
    await page.locator('#latency-plot[data-points="2"]').waitFor(WAIT);
    assert.equal(await page.locator('#latency-plot circle').count(), 2);
    assert.match((await page.locator('#latency-plot').textContent()) ?? '', /2 activations since .+, p50 \d+ ms/);

    const screenshot = join(tmpdir(), 'torpor-dashboard.png');
    await page.screenshot({ path: screenshot, fullPage: true });
    assert.ok((await stat(screenshot)).size > 10_000, `screenshot written to ${screenshot}`);
    const body = (await page.locator('main').textContent()) ?? '';
    for (const expected of ['Actors by state', 'RUNNING 1', 'default/counter', 'Activation latency', 'resume']) {
      assert.ok(body.includes(expected), `the page shows "${expected}"`);
    }
  });

  test('an actor created elsewhere appears live and is deleted by clicking', async () => {
    await api('POST', '/v1/spaces/default/actors', { name: 'scratch', template: 'counter' });
    await stateCell('default/scratch').waitFor(WAIT);
    assert.equal(await stateCell('default/scratch').textContent(), 'SUSPENDED');
    await page.locator('button[data-action="delete"][data-actor="default/scratch"]').click();
    assert.equal(await page.locator('#confirm-text').textContent(), 'Delete actor default/scratch?');
    await page.locator('#confirm-ok').click();
    await page.locator('#actors tr[data-actor="default/scratch"]').waitFor({ state: 'detached', ...WAIT });
    const res = await fetch(`${t.url}/v1/spaces/default/actors/scratch`);
    assert.equal(res.status, 404);
  });

  test('a refused action shows the server error and changes nothing', async () => {
    // Both workers busy: resuming a third actor is refused with NO_CAPACITY.
    await api('POST', '/v1/spaces/default/actors', { name: 'second', template: 'counter' });
    await api('POST', '/v1/spaces/default/actors/second/resume', {});
    await api('POST', '/v1/spaces/default/actors', { name: 'third', template: 'counter' });
    await stateCell('default/second').filter({ hasText: 'RUNNING' }).waitFor(WAIT);
    await stateCell('default/third').waitFor(WAIT);
    await page.locator('#workers-busy', { hasText: /^2$/ }).waitFor(WAIT);
    await page.locator('button[data-action="resume"][data-actor="default/third"]').click();
    await page.locator('#confirm-ok').click();
    const message = page.locator('#message', { hasText: 'failed' });
    await message.waitFor(WAIT);
    assert.match(
      (await message.textContent()) ?? '',
      /^Resume default\/third failed: NO_CAPACITY: no free gvisor worker/,
    );
    assert.equal(await stateCell('default/third').textContent(), 'SUSPENDED');
    assert.equal(((await api('GET', '/v1/spaces/default/actors/third')) as { status: string }).status, 'SUSPENDED');
  });
});
