// `torpor assets build` and `torpor assets stage`, run as a user would: the printed YAML is a valid asset set and
// every asset can be fetched from where it was staged. The micro-VM set is booted with QEMU (TCG) to prove the
// kernel, the initramfs with Torpor's guest init, the firmware and QEMU itself work together.
import assert from 'node:assert/strict';
import { execFile, spawn } from 'node:child_process';
import { existsSync } from 'node:fs';
import { mkdir, mkdtemp, readdir, rm, stat, symlink, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { type TestContext, test } from 'node:test';
import { promisify } from 'node:util';
import { parseAssetSets } from '../../src/runtime/asset-set.ts';
import { AssetStore } from '../../src/runtime/assets.ts';
import { sha256File } from '../../src/runtime/gvisor/runsc.ts';

const execFileP = promisify(execFile);
const BIN = resolve(import.meta.dirname, '../../bin/torpor.js');
const CACHE = process.env.TORPOR_CACHE ?? '/var/cache/torpor';

async function torpor(...args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  try {
    const { stdout, stderr } = await execFileP(process.execPath, [BIN, ...args], {
      timeout: 600_000,
      maxBuffer: 16 << 20,
    });
    return { code: 0, stdout, stderr };
  } catch (err) {
    const e = err as { code?: number; stdout?: string; stderr?: string };
    return { code: typeof e.code === 'number' ? e.code : 1, stdout: e.stdout ?? '', stderr: e.stderr ?? '' };
  }
}

async function scratch(t: TestContext): Promise<string> {
  const dir = await mkdtemp(join(tmpdir(), 'torpor-assets-cli-'));
  t.after(() => rm(dir, { recursive: true, force: true }));
  return dir;
}

const gvisorSkip = existsSync(join(CACHE, 'assets', 'runsc'))
  ? undefined
  : `no runsc asset in ${CACHE}/assets: run scripts/setup.sh`;

test('assets build gvisor: cached, it prints the runsc asset at once, with its real sha256', {
  skip: gvisorSkip,
}, async () => {
  const t0 = performance.now();
  const built = await torpor('assets', 'build', 'gvisor', '-o', 'json');
  const ms = performance.now() - t0;
  assert.equal(built.code, 0, built.stderr);
  const [set] = parseAssetSets(built.stdout, 'build output');
  const runsc = set!.assets.runsc!;
  const path = new URL(runsc.url).pathname;
  assert.equal(path, join(CACHE, 'assets', `runsc-${runsc.sha256}`));
  assert.equal(await sha256File(path), runsc.sha256);
  // A cached build is a stat and a hash of the binary, not a download (which takes tens of seconds).
  assert.ok(ms < 10_000, `a cached build took ${Math.round(ms)} ms`);

  const table = await torpor('assets', 'build', 'gvisor');
  assert.match(table.stdout, new RegExp(`^runsc\\s+${runsc.sha256}\\s+${path}$`, 'm'));
  assert.match(table.stderr, /asset set: .*gvisor-(amd64|arm64)\.assets\.yaml/);
});

test('assets stage gvisor --to file://: content-addressed copies; the printed YAML loads and fetches', {
  skip: gvisorSkip,
}, async (t) => {
  const dir = await scratch(t);
  const to = join(dir, 'shared');
  const staged = await torpor('assets', 'stage', 'gvisor', '--to', `file://${to}`, '--cache', join(dir, 'c'));
  assert.equal(staged.code, 0, staged.stderr);
  const [set] = parseAssetSets(staged.stdout, 'stage output');
  const runsc = set!.assets.runsc!;
  assert.equal(runsc.url, `file://${to}/runsc-${runsc.sha256}`);
  assert.deepEqual(await readdir(to), [`runsc-${runsc.sha256}`]);

  // A node with an empty cache fetches every asset of the printed set from where it was staged.
  const store = new AssetStore(join(dir, 'node-cache'));
  for (const [name, asset] of Object.entries(set!.assets)) {
    const path = await store.fetch(name, asset);
    assert.equal(await sha256File(path), asset.sha256);
  }
  assert.equal(store.downloadCount, 1);

  // Staging again copies nothing: the content-addressed file is already there.
  const before = (await stat(join(to, `runsc-${runsc.sha256}`))).mtimeMs;
  const again = await torpor('assets', 'stage', 'gvisor', '--to', `file://${to}`, '--cache', join(dir, 'c'));
  assert.equal(again.stdout, staged.stdout);
  assert.equal((await stat(join(to, `runsc-${runsc.sha256}`))).mtimeMs, before);

  // A set file is staged the same way (here the set just printed, fetched from its file:// URLs).
  await writeFile(join(dir, 'set.yaml'), staged.stdout);
  const restaged = await torpor(
    'assets',
    'stage',
    join(dir, 'set.yaml'),
    '--to',
    `file://${dir}/second`,
    '--cache',
    join(dir, 'c2'),
  );
  assert.equal(restaged.code, 0, restaged.stderr);
  assert.equal(restaged.stdout, staged.stdout.replaceAll(`${to}/`, `${dir}/second/`));
});

test('assets stage and build: bad destinations and inputs are refused, naming what is wrong', async (t) => {
  const dir = await scratch(t);
  const s3 = await torpor('assets', 'stage', 'gvisor', '--to', 's3://bucket/prefix?endpoint=http://127.0.0.1:9');
  assert.equal(s3.code, 1);
  assert.match(s3.stderr, /^error: INVALID_ARGUMENT: an S3 service of its own .* needs --secret-ref/m);
  const ftp = await torpor('assets', 'stage', 'gvisor', '--to', 'ftp://host/x');
  assert.match(ftp.stderr, /^error: INVALID_ARGUMENT: --to must be a file:\/\/ or s3:\/\/ URL/m);
  const missing = await torpor('assets', 'stage', join(dir, 'none.yaml'), '--to', `file://${dir}/out`);
  assert.match(missing.stderr, /^error: INVALID_ARGUMENT: cannot read the asset-set file/m);
  const unknown = await torpor('assets', 'build', 'docker');
  assert.match(unknown.stderr, /^error: INVALID_ARGUMENT: unknown runtime class "docker"/m);
});

/** Why the micro-VM build cannot run here, or undefined. */
async function microvmSkipReason(): Promise<string | undefined> {
  for (const tool of ['busybox', 'xz', 'apt-get', 'dpkg']) {
    const found = await execFileP('sh', ['-c', `command -v ${tool}`]).then(
      () => true,
      () => false,
    );
    if (!found) return `${tool} is not installed (scripts/setup.sh installs what the micro-VM build needs)`;
  }
  return undefined;
}

/** Boots the set with QEMU's microvm machine under TCG and returns the serial console's output. */
async function boot(assets: Record<string, string>): Promise<string> {
  const modules = await mkdtemp(join(tmpdir(), 'torpor-qemu-modules-'));
  try {
    // QEMU loads its TCG accelerator as a module, by file name, from QEMU_MODULE_DIR.
    await symlink(assets['qemu-tcg']!, join(modules, 'accel-tcg-x86_64.so'));
    const args = [
      ...['-machine', 'microvm,x-option-roms=off,rtc=on,isa-serial=on', '-accel', 'tcg', '-cpu', 'max'],
      ...['-m', '128M', '-smp', '1', '-nodefaults', '-no-user-config', '-display', 'none', '-no-reboot'],
      ...['-serial', 'stdio', '-bios', assets.bios!, '-kernel', assets.kernel!, '-initrd', assets.initrd!],
      '-append',
      // A fixed TSC frequency: calibrating it under TCG on a busy host can hang the boot.
      // torpor.probe=1: the guest init answers and powers off (no disk, no control channel needed).
      'console=ttyS0 quiet pci=off panic=-1 tsc_early_khz=2000000 tsc=reliable torpor.probe=1',
    ];
    const child = spawn(assets.qemu!, args, {
      env: { ...process.env, QEMU_MODULE_DIR: modules },
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let out = '';
    child.stdout.on('data', (d: Buffer) => {
      out += d.toString();
    });
    child.stderr.on('data', (d: Buffer) => {
      out += d.toString();
    });
    const timer = setTimeout(() => child.kill('SIGKILL'), 120_000);
    await new Promise((r) => child.once('close', r));
    clearTimeout(timer);
    return out;
  } finally {
    await rm(modules, { recursive: true, force: true });
  }
}

test('assets build microvm: kernel, initramfs with the guest init, qemu, its TCG module and firmware boot into the guest init', {
  skip: await microvmSkipReason(),
  timeout: 900_000,
}, async (t) => {
  const built = await torpor('assets', 'build', 'microvm', '-o', 'json');
  assert.equal(built.code, 0, built.stderr);
  const [set] = parseAssetSets(built.stdout, 'build output');
  assert.deepEqual(Object.keys(set!.assets).sort(), ['bios', 'initrd', 'kernel', 'qemu', 'qemu-tcg']);
  const paths: Record<string, string> = {};
  for (const [name, asset] of Object.entries(set!.assets)) {
    paths[name] = new URL(asset.url).pathname;
    assert.equal(await sha256File(paths[name]), asset.sha256, name);
  }
  const { stdout: ldd } = await execFileP('ldd', [paths.qemu!]);
  const missing = [...ldd.matchAll(/^\s*(\S+) => not found/gm)].map((m) => m[1]);
  if (missing.length > 0) {
    t.skip(`qemu needs libraries this machine lacks: ${missing.join(', ')} (scripts/setup.sh installs them)`);
    return;
  }
  const serial = await boot(paths);
  assert.match(serial, /torpor-guest: probe ok/, serial);

  // Staged like any set: the YAML names all five, content-addressed.
  const dir = await scratch(t);
  await mkdir(join(dir, 'to'));
  const staged = await torpor('assets', 'stage', 'microvm', '--to', `file://${dir}/to`, '--cache', join(dir, 'c'));
  assert.equal(staged.code, 0, staged.stderr);
  const [stagedSet] = parseAssetSets(staged.stdout, 'stage output');
  assert.deepEqual(
    (await readdir(join(dir, 'to'))).sort(),
    Object.entries(stagedSet!.assets)
      .map(([name, a]) => `${name}-${a.sha256}`)
      .sort(),
  );
});
