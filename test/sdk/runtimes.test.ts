// The SDK outside Node: the same script, through the same SDK source, under Bun and under Deno, against a real
// `torpor up` — create, resume, fetch through the router (memory kept across a suspend), typed errors, delete.
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { existsSync } from 'node:fs';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { gvisorSkipReason, startTorpor, type Torpor } from '../e2e/harness.ts';
import { counterImage } from '../fixtures/images.ts';

const ROOT = resolve(import.meta.dirname, '../..');
const RUNTIMES = process.env.TORPOR_RUNTIMES ?? '/var/cache/torpor/runtimes';
const SCRIPT = `
import { Actor, Template, TorporApiError } from '${join(ROOT, 'packages/sdk/src/index.ts')}';
const opts = { apiUrl: process.env.TORPOR_API_URL, routerUrl: process.env.TORPOR_ROUTER_URL, space: 'rt' };
const name = process.env.ACTOR_NAME;
await Template.apply({ name: 'rt-counter', image: process.env.IMAGE, port: 8080,
  readiness: { path: '/healthz', timeoutSeconds: 20 }, resources: { memoryMiB: 64, vcpus: 1 } }, opts);
const a = await Actor.create({ ...opts, template: 'rt-counter', name });
await a.resume();
const counts = [await (await a.fetch('/')).text(), await (await a.fetch('/')).text()];
await a.suspend();
counts.push(await (await a.fetch('/')).text());
let error = '';
try { await Actor.connect('nobody', opts); } catch (e) { error = e instanceof TorporApiError ? e.code + ' ' + e.status : String(e); }
await a.suspend();
await a.delete();
console.log(JSON.stringify({ counts: counts.map((c) => c.trim()), status: a.status, error }));
`;

const runtimes: [string, string, string[]][] = [
  ['bun', join(RUNTIMES, 'bun'), ['run']],
  ['deno', join(RUNTIMES, 'deno'), ['run', '--allow-net', '--allow-env', '--allow-read']],
];

describe('the SDK under Bun and Deno', { skip: gvisorSkipReason() }, () => {
  let t: Torpor;
  let dir: string;
  let image: string;

  before(async () => {
    t = await startTorpor({ workers: 1, networkBase: 148 });
    dir = await mkdtemp(join(tmpdir(), 'torpor-runtimes-'));
    await writeFile(join(dir, 'script.ts'), SCRIPT);
    image = await counterImage();
  });
  after(async () => {
    await t?.stop();
    if (dir) await rm(dir, { recursive: true, force: true });
  });

  for (const [name, binary, args] of runtimes) {
    const skip = existsSync(binary) ? false : `${name} not installed at ${binary}: run scripts/js-runtimes.sh`;
    test(`${name}: create, resume, fetch, suspend, fetch resumes with memory kept, typed errors, delete`, {
      skip,
    }, async () => {
      const out = await new Promise<string>((done, fail) => {
        execFile(
          binary,
          [...args, join(dir, 'script.ts')],
          {
            env: {
              ...process.env,
              TORPOR_API_URL: t.url,
              TORPOR_ROUTER_URL: t.routerUrl,
              ACTOR_NAME: `via-${name}`,
              IMAGE: image,
              NO_COLOR: '1',
            },
            timeout: 120_000,
          },
          (err, stdout, stderr) => (err ? fail(new Error(`${name} failed: ${stderr || err.message}`)) : done(stdout)),
        );
      });
      assert.deepEqual(JSON.parse(out.trim().split('\n').at(-1)!), {
        counts: ['1', '2', '3'],
        status: 'SUSPENDED',
        error: 'NOT_FOUND 404',
      });
    });
  }
});
