// The micro-VM runtime on real QEMU (TCG unless a KVM probe boot succeeds): boot the counter image, exec over the
// guest control channel, snapshot, restore with the in-RAM counter continuing, and fork: two VMs restored from
// one snapshot, each with its own copy of its memory, counting on from the snapshot's value while the snapshot stays untouched.
import assert from 'node:assert/strict';
import { mkdir, mkdtemp, readFile, realpath, rm, stat } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, it } from 'node:test';
import { ImageStore } from '../../src/image/store.ts';
import { ACTOR_ADDRESS, ACTOR_MAC, ACTOR_PREFIX, GATEWAY_ADDRESS, GATEWAY_MAC } from '../../src/net/egress.ts';
import { sha256File } from '../../src/runtime/gvisor/runsc.ts';
import { locateMicrovm } from '../../src/runtime/microvm/locate.ts';
import { probeKvm, QemuDriver } from '../../src/runtime/microvm/qemu.ts';
import { MicrovmRuntime } from '../../src/runtime/microvm/runtime.ts';
import type { ActivationSpec } from '../../src/runtime/runtime.ts';
import { processRunning } from '../../src/sys/process.ts';
import { run } from '../../src/sys/run.ts';
import { counterImage, TEST_CACHE } from '../fixtures/images.ts';

const found = locateMicrovm();
const skip =
  process.getuid?.() !== 0 ? 'needs root (network namespaces, tap devices)' : found.missing.join('; ') || undefined;

/** A namespace with the tap the guest's eth0 is behind, and the gateway address on the tap itself. */
async function tapNamespace(name: string): Promise<string> {
  await run('ip', ['netns', 'del', name], { okCodes: [0, 1] });
  await run('ip', ['netns', 'add', name]);
  await run('ip', ['-n', name, '-batch', '-'], {
    input: [
      'link set lo up',
      'tuntap add tap0 mode tap',
      // Fixed, as the worker's gateway is: a restored guest still has the gateway's MAC in its ARP cache.
      `link set tap0 address ${GATEWAY_MAC}`,
      `addr add ${GATEWAY_ADDRESS}/${ACTOR_PREFIX} dev tap0`,
      'link set tap0 up',
      '',
    ].join('\n'),
  });
  return `/var/run/netns/${name}`;
}

/** The VMM's pid in a sandbox's pid file (its first line). */
function pidIn(text: string): number {
  return Number.parseInt(text, 10);
}

/** GET through the namespace's tap, to the guest's eth0. */
async function get(ns: string, path: string): Promise<string> {
  const url = `http://${ACTOR_ADDRESS}:8080${path}`;
  const out = await run('ip', ['netns', 'exec', ns, 'curl', '-sS', '-m', '5', url]);
  return out.stdout.trim();
}

describe('micro-VM runtime (QEMU)', { skip, timeout: 300_000 }, () => {
  it('boots, execs, snapshots, restores with memory intact, and forks', async (t) => {
    const paths = found.paths!;
    const root = await mkdtemp(join(tmpdir(), 'torpor-microvm-'));
    const namespaces = ['torpor-mvt-a', 'torpor-mvt-b', 'torpor-mvt-c'];
    const kvm = await probeKvm(paths.qemu, paths.kernel, paths.initrd);
    t.diagnostic(`KVM: ${kvm.usable ? 'usable' : 'not usable'} (${kvm.detail})`);
    const runtime = new MicrovmRuntime({
      driver: new QemuDriver({ binary: paths.qemu }),
      kernel: paths.kernel,
      initrd: paths.initrd,
      accel: kvm.usable ? 'kvm' : 'tcg',
      stateRoot: join(root, 'state'),
      diskCache: join(TEST_CACHE, 'microvm-disks'),
      memoryDir: `/dev/shm/torpor-test-${process.pid}`,
      network: { address: ACTOR_ADDRESS, prefix: ACTOR_PREFIX, gateway: GATEWAY_ADDRESS, mac: ACTOR_MAC, tap: 'tap0' },
    });
    const crashed: string[] = [];
    runtime.onUnexpectedExit((id) => crashed.push(id));
    t.after(async () => {
      for (const id of await runtime.list()) await runtime.destroy(id);
      for (const ns of namespaces) await run('ip', ['netns', 'del', ns], { okCodes: [0, 1] });
      await rm(root, { recursive: true, force: true });
      await rm(`/dev/shm/torpor-test-${process.pid}`, { recursive: true, force: true });
    });
    const image = await new ImageStore(join(TEST_CACHE, 'microvm-images')).resolve(await counterImage());
    await mkdir(join(root, 'logs'), { recursive: true });
    const spec = async (id: string, ns: string, actorId: string, freshNetwork = true): Promise<ActivationSpec> => ({
      id,
      actorId,
      rootfs: image.rootfs,
      image: image.config,
      command: [],
      env: { GREETING: 'hello world' },
      memoryMiB: 128,
      vcpus: 1,
      netnsPath: freshNetwork ? await tapNamespace(ns) : `/var/run/netns/${ns}`,
      workDir: join(root, id),
      logFile: join(root, 'logs', `${id}.log`),
      assets: {},
    });

    // Boot: the counter serves on the guest's eth0, behind the tap.
    const a = await spec('vm-a', 'torpor-mvt-a', 'default/a');
    const booted = await runtime.run(a);
    let body = '';
    for (let i = 0; i < 100 && body !== 'ok'; i++) body = await get('torpor-mvt-a', '/healthz').catch(() => '');
    assert.equal(body, 'ok');
    assert.equal(await get('torpor-mvt-a', '/'), '1');
    assert.equal(await get('torpor-mvt-a', '/'), '2');
    assert.equal(await get('torpor-mvt-a', '/id'), 'default/a');
    assert.equal(await runtime.alive('vm-a'), true);

    // Exec runs in the image's root with the workload's environment; writes land in the RAM overlay.
    const echoed = await runtime.exec(
      booted,
      ['/bin/busybox', 'sh', '-c', 'echo "$GREETING" > /tmp/note; cat /tmp/note; echo oops >&2; exit 3'],
      10_000,
    );
    assert.deepEqual(echoed, { exitCode: 3, stdout: 'hello world\n', stderr: 'oops\n' });

    // Checkpoint: exactly the files written, per-phase durations, the VMM gone.
    const snap = join(root, 'snap');
    const cp = await runtime.checkpoint(booted, snap);
    t.diagnostic(`checkpoint phases ${JSON.stringify(cp.phases)}`);
    assert.deepEqual(cp.files, ['memory', 'state', 'vm.json']);
    for (const phase of ['pause', 'snapshot', 'capture', 'shutdown', 'teardown']) {
      assert.equal(typeof cp.phases[phase], 'number', phase);
    }
    assert.equal((await stat(join(snap, 'memory'))).size, 128 * 2 ** 20);
    assert.equal(await runtime.alive('vm-a'), false);
    assert.deepEqual(crashed, [], 'a checkpoint is not a crash');
    const memorySha = await sha256File(join(snap, 'memory'));
    const checkpointedAt = Date.now();

    // Restore elsewhere (another namespace, another id and actor): the counter and the overlay's file continue.
    const b = await spec('vm-b', 'torpor-mvt-b', 'default/b');
    // Suspended for 6 s at least: a guest whose clock were not resynced would be that far behind.
    await new Promise((r) => setTimeout(r, Math.max(0, 6000 - (Date.now() - checkpointedAt))));
    const restoredB = await runtime.restore(b, snap, cp.files);
    // The clock and actor id resync finishes after restore returns (callers probe readiness meanwhile).
    const late = await restoredB.settled;
    t.diagnostic(`restore phases ${JSON.stringify({ ...restoredB.phases, ...late })}`);
    assert.equal(typeof late?.resync, 'number');
    assert.equal(await get('torpor-mvt-b', '/'), '3');
    assert.equal(await get('torpor-mvt-b', '/id'), 'default/b', 'the actor id is rewritten at every restore');
    const note = await runtime.exec(restoredB.sandbox, ['/bin/busybox', 'cat', '/tmp/note'], 10_000);
    assert.equal(note.stdout, 'hello world\n');
    const clock = await runtime.exec(restoredB.sandbox, ['/bin/busybox', 'date', '+%s'], 10_000);
    assert.ok(Math.abs(Number(clock.stdout) - Date.now() / 1000) < 3, `guest clock resynced: ${clock.stdout}`);

    // Fork: a second VM from the same snapshot, at the same time, with its own copy of the memory.
    const c = await spec('vm-c', 'torpor-mvt-c', 'default/c');
    await (await runtime.restore(c, snap, cp.files)).settled;
    assert.equal(await get('torpor-mvt-c', '/'), '3');
    assert.equal(await get('torpor-mvt-c', '/'), '4');
    assert.equal(await get('torpor-mvt-b', '/'), '4');
    assert.equal(await sha256File(join(snap, 'memory')), memorySha, 'restores never write the snapshot');

    // A restored VM owns a copy of the snapshot's memory: it checkpoints with a memory file of its own again
    // (the snapshot's stays untouched), and restores from that.
    const snap2 = join(root, 'snap2');
    const cp2 = await runtime.checkpoint(restoredB.sandbox, snap2);
    assert.deepEqual(cp2.files, ['memory', 'state', 'vm.json']);
    assert.equal(
      await sha256File(join(snap, 'memory')),
      memorySha,
      'a checkpoint of a restored VM leaves its snapshot',
    );
    // A snapshot fetched for one restore (disposable) in the runtime's staging directory gives its memory file
    // up: the VM's RAM file is that file, renamed, not a copy. destroy() removes what is left of the staging.
    const staged = runtime.stagingDir('vm-b2');
    await run('cp', ['-r', '--sparse=always', snap2, staged]);
    const stagedMemory = await stat(join(staged, 'memory'));
    const again = await runtime.restore(await spec('vm-b2', 'torpor-mvt-b', 'default/b'), staged, cp2.files, {
      disposable: true,
    });
    await again.settled;
    assert.equal(await get('torpor-mvt-b', '/'), '5');
    await assert.rejects(stat(join(staged, 'memory')), /ENOENT/, 'the staged memory file was taken');
    const ram = await stat(join(`/dev/shm/torpor-test-${process.pid}`, 'vm-b2.ram'));
    assert.equal(ram.ino, stagedMemory.ino, 'the RAM file is the staged file itself');
    const cp3 = await runtime.checkpoint(again.sandbox, join(root, 'snap3'));
    assert.deepEqual(cp3.files, ['memory', 'state', 'vm.json']);
    await runtime.destroy('vm-b2');
    await assert.rejects(stat(staged), /ENOENT/, 'destroy removes the staging directory');

    // Prelaunch: while the worker is idle, the VMM that restoring its last checkpoint needs starts on the guest
    // memory held for it. A restore of that checkpoint (same sandbox, network and model) adopts it: no QEMU launch.
    const sameB2 = () => spec('vm-b2', 'torpor-mvt-b', 'default/b', false);
    const held = await realpath(join(root, 'snap3', 'memory'));
    const checkpointed3 = Date.now();
    await runtime.prelaunch({ memory: held });
    assert.ok((await runtime.list()).includes('prelaunched'));
    const standbyPid = pidIn(await readFile(join(root, 'state', 'prelaunched', 'pid'), 'utf8'));
    assert.ok(await processRunning(standbyPid), 'the prelaunched VMM runs');
    // Suspended for 6 s at least, so a clock left alone would show it.
    await new Promise((r) => setTimeout(r, Math.max(0, 6000 - (Date.now() - checkpointed3))));
    const adopted = await runtime.restore(await sameB2(), join(root, 'snap3'), cp3.files, {
      takeable: { memory: held },
    });
    await adopted.settled;
    t.diagnostic(`adopting restore phases ${JSON.stringify(adopted.phases)}`);
    assert.equal(typeof adopted.phases.adopt, 'number', 'the restore adopted the prelaunched VMM');
    assert.equal(typeof adopted.phases.take, 'number');
    assert.equal(pidIn(await readFile(join(root, 'state', 'vm-b2', 'pid'), 'utf8')), standbyPid);
    assert.equal(await get('torpor-mvt-b', '/'), '6', 'the count continues in the adopted VMM');
    // The same actor as the snapshot's: the guest's clock was set, its id file left as it was (not rewritten).
    const guestNow = await runtime.exec(adopted.sandbox, ['/bin/busybox', 'date', '+%s'], 10_000);
    assert.ok(Math.abs(Number(guestNow.stdout) - Date.now() / 1000) < 3, `guest clock set: ${guestNow.stdout}`);
    const idWritten = await runtime.exec(
      adopted.sandbox,
      ['/bin/busybox', 'stat', '-c', '%Y', '/run/torpor/actor-id'],
      10_000,
    );
    assert.ok(Number(idWritten.stdout) < Date.now() / 1000 - 5, `id file not rewritten: ${idWritten.stdout}`);
    assert.equal(await get('torpor-mvt-b', '/id'), 'default/b');
    assert.equal(await runtime.alive('vm-b2'), true);
    assert.ok(!(await runtime.list()).includes('prelaunched'));

    // A prelaunched VMM that does not fit the restore (here: the memory is copied from the snapshot, not the held
    // file taken) is stopped before the restore launches its own (it holds the tap).
    const cp4 = await runtime.checkpoint(adopted.sandbox, join(root, 'snap4'));
    const held4 = await realpath(join(root, 'snap4', 'memory'));
    await runtime.prelaunch({ memory: held4 });
    const standby4 = pidIn(await readFile(join(root, 'state', 'prelaunched', 'pid'), 'utf8'));
    const copied = await runtime.restore(await sameB2(), join(root, 'snap4'), cp4.files);
    await copied.settled;
    assert.equal(copied.phases.adopt, undefined);
    assert.equal(await processRunning(standby4), false, 'the unfit prelaunched VMM was stopped');
    assert.equal(await get('torpor-mvt-b', '/'), '7');
    const cp5 = await runtime.checkpoint(copied.sandbox, join(root, 'snap5'));
    assert.deepEqual(cp5.files, ['memory', 'state', 'vm.json']);
    // Discarded (the worker moves on): the VMM stops and nothing of it is left.
    await runtime.prelaunch({ memory: await realpath(join(root, 'snap5', 'memory')) });
    const standby5 = pidIn(await readFile(join(root, 'state', 'prelaunched', 'pid'), 'utf8'));
    await runtime.discardPrelaunched();
    assert.equal(await processRunning(standby5), false);
    await runtime.destroy('vm-b2');
    assert.ok(!(await runtime.list()).includes('prelaunched'));

    // A VMM that dies is noticed.
    const pid = pidIn(await readFile(join(root, 'state', 'vm-c', 'pid'), 'utf8'));
    process.kill(pid, 'SIGKILL');
    for (let i = 0; i < 200 && crashed.length === 0; i++) await new Promise((r) => setTimeout(r, 10));
    assert.deepEqual(crashed, ['vm-c']);
    assert.equal(await runtime.alive('vm-c'), false);
    await runtime.destroy('vm-c');
    assert.deepEqual(await runtime.list(), []);
  });
});
