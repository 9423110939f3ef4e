// Runtime assets are chosen per activation and pinned in every snapshot: after a pool's asset set changes (here to
// a runsc that does not run), snapshots made with the old set still restore with the binary they pinned, fetched
// again from its URL; fresh boots use the new set and fail clearly, unless their template overrides it; a snapshot
// whose pinned asset cannot be fetched fails its resume and stays restorable.
import assert from 'node:assert/strict';
import { copyFile, mkdir, mkdtemp, readdir, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, describe, test } from 'node:test';
import { pathToFileURL } from 'node:url';
import { stringify } from 'yaml';
import { hostArch } from '../../src/runtime/asset-set.ts';
import { sha256File } from '../../src/runtime/gvisor/runsc.ts';
import { counterImage } from '../fixtures/images.ts';
import { gvisorSkipReason, startTorpor, type Torpor } from './harness.ts';

interface Actor {
  status: string;
  address?: string;
  snapshot?: string;
}

const get = async (address: string) => (await (await fetch(`http://${address}/`)).text()).trim();
const RUNSC = process.env.TORPOR_RUNSC ?? '/var/cache/torpor/assets/runsc';

async function assetSetFile(dir: string, runsc: string): Promise<{ file: string; url: string; sha256: string }> {
  const url = pathToFileURL(runsc).href;
  const sha256 = await sha256File(runsc);
  const file = join(dir, 'assets.yaml');
  await writeFile(file, stringify({ runtime: 'gvisor', arch: hostArch(), assets: { runsc: { url, sha256 } } }));
  return { file, url, sha256 };
}

/** What a node holds locally (its asset cache and its copies of snapshots): gone, as on a fresh node. */
async function forgetLocalCopies(dataDir: string): Promise<void> {
  await rm(join(dataDir, 'assets'), { recursive: true, force: true });
  await rm(join(dataDir, 'nodes', 'node0', 'snapshots'), { recursive: true, force: true });
}

async function pinnedRunsc(t: Torpor, snapshot: string): Promise<{ url: string; sha256: string }> {
  const manifest = JSON.parse(await readFile(join(t.dataDir, 'blobs', ...snapshot.split('/')), 'utf8'));
  return manifest.assets.runsc;
}

describe('runtime assets pinned in snapshots (gVisor)', { skip: gvisorSkipReason() }, () => {
  let torpor: Torpor | undefined;
  let work: string | undefined;
  after(async () => {
    await torpor?.stop();
    if (work) await rm(work, { recursive: true, force: true });
  });

  test('a pool upgrade never breaks restoring older snapshots', async () => {
    const image = await counterImage();
    work = await mkdtemp(join(tmpdir(), 'torpor-assets-e2e-'));
    await mkdir(join(work, 'a'));
    await mkdir(join(work, 'b'));
    const runscA = join(work, 'a', 'runsc');
    await copyFile(RUNSC, runscA);
    const setA = await assetSetFile(join(work, 'a'), runscA);
    const brokenB = join(work, 'b', 'runsc');
    await writeFile(brokenB, '#!/bin/sh\necho "this runsc is broken" >&2\nexit 3\n', { mode: 0o755 });
    const setB = await assetSetFile(join(work, 'b'), brokenB);

    // 1. Pool set A: the actor's snapshots pin A's runsc.
    torpor = await startTorpor({ workers: 2, networkBase: 180, args: ['--assets', setA.file] });
    const dataDir = torpor.dataDir;
    const template = (name: string) => `name: ${name}\nimage: ${image}\nport: 8080\nreadiness: { path: /healthz }\n`;
    await writeFile(join(work, 'counter.yaml'), template('counter'));
    await torpor.json('template', 'apply', '-f', join(work, 'counter.yaml'));
    await torpor.json('actor', 'create', 'p1', '--template', 'counter');
    let a = await torpor.json<Actor>('actor', 'resume', 'p1');
    assert.deepEqual([await get(a.address!), await get(a.address!)], ['1', '2']);
    a = await torpor.json<Actor>('actor', 'suspend', 'p1');
    assert.deepEqual(await pinnedRunsc(torpor, a.snapshot!), { url: setA.url, sha256: setA.sha256 });
    await torpor.crash();

    // 2. Pool set B (a runsc that does not run), on a node that holds no copy of anything.
    await forgetLocalCopies(dataDir);
    torpor = await startTorpor({ workers: 2, networkBase: 180, dataDir, args: ['--assets', setB.file] });
    a = await torpor.json<Actor>('actor', 'resume', 'p1');
    assert.equal(await get(a.address!), '3', 'restored with the pinned runsc, memory intact');
    const cached = await readdir(join(dataDir, 'assets'));
    assert.ok(cached.includes(setA.sha256), 'the pinned runsc was fetched again from its URL');
    assert.ok(cached.includes(setB.sha256), 'the pool set was fetched at start');

    await writeFile(join(work, 'fresh.yaml'), template('fresh'));
    await torpor.json('template', 'apply', '-f', join(work, 'fresh.yaml'));
    await torpor.json('actor', 'create', 'f1', '--template', 'fresh');
    const boot = await torpor.cli('actor', 'resume', 'f1');
    assert.equal(boot.code, 1, 'a fresh boot runs with the pool set B');
    assert.match(boot.stderr, /runsc asset .* does not run/);
    assert.equal((await torpor.json<Actor>('actor', 'get', 'f1')).status, 'SUSPENDED');

    // A template that overrides the pool's set boots with its own runsc (here A's, under another URL).
    const runscO = join(work, 'override-runsc');
    await copyFile(RUNSC, runscO);
    const override = { url: pathToFileURL(runscO).href, sha256: setA.sha256 };
    await writeFile(
      join(work, 'override.yaml'),
      `${template('override')}assets: { runsc: { url: "${override.url}", sha256: "${override.sha256}" } }\n`,
    );
    await torpor.json('template', 'apply', '-f', join(work, 'override.yaml'));
    await torpor.json('actor', 'create', 'o1', '--template', 'override');
    const o1 = await torpor.json<Actor>('actor', 'resume', 'o1');
    assert.equal(await get(o1.address!), '1');
    assert.deepEqual(await pinnedRunsc(torpor, o1.snapshot!), override, 'its golden snapshot pins the override');
    await torpor.json<Actor>('actor', 'suspend', 'o1');

    a = await torpor.json<Actor>('actor', 'suspend', 'p1');
    const pinned = a.snapshot!;
    assert.deepEqual(
      await pinnedRunsc(torpor, pinned),
      { url: setA.url, sha256: setA.sha256 },
      'a snapshot of an actor restored with A pins A again: its state was made by that runsc',
    );
    await torpor.crash();

    // 3. The pinned runsc is gone from its URL: the resume fails clearly and the snapshot stays restorable.
    await forgetLocalCopies(dataDir);
    await rm(runscA);
    torpor = await startTorpor({ workers: 2, networkBase: 180, dataDir, args: ['--assets', setB.file] });
    const failed = await torpor.cli('actor', 'resume', 'p1');
    assert.equal(failed.code, 1);
    assert.match(failed.stderr, /asset "runsc" from file:\/\/\S+\/a\/runsc: no such file/);
    a = await torpor.json<Actor>('actor', 'get', 'p1');
    assert.equal(a.status, 'SUSPENDED');
    assert.equal(a.snapshot, pinned, 'the actor still points at its snapshot');

    await copyFile(RUNSC, runscA);
    a = await torpor.json<Actor>('actor', 'resume', 'p1');
    assert.equal(await get(a.address!), '4', 'once the asset is back, the same snapshot restores');
  });
});
