// What an agent that starts again removes of its predecessor's guest memory on tmpfs: the files of its own slots'
// sandboxes (RAM files, memory held after a suspend, snapshots staged for a restore), never another slot's.
import assert from 'node:assert/strict';
import { mkdir, mkdtemp, readdir, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, it } from 'node:test';
import { ACTOR_ADDRESS, ACTOR_MAC, ACTOR_PREFIX, GATEWAY_ADDRESS } from '../../src/net/egress.ts';
import { QemuDriver } from '../../src/runtime/microvm/qemu.ts';
import { MicrovmRuntime } from '../../src/runtime/microvm/runtime.ts';

describe('micro-VM runtime: leftover guest memory', () => {
  it('removes the memory files of the sandboxes with the given id prefix only', async (t) => {
    const root = await mkdtemp(join(tmpdir(), 'torpor-leftovers-'));
    t.after(() => rm(root, { recursive: true, force: true }));
    const memoryDir = join(root, 'memory');
    const runtime = new MicrovmRuntime({
      driver: new QemuDriver({ binary: '/nonexistent/qemu' }),
      kernel: '/nonexistent/kernel',
      initrd: '/nonexistent/initrd',
      accel: 'tcg',
      stateRoot: join(root, 'state'),
      diskCache: join(root, 'disks'),
      memoryDir,
      network: { address: ACTOR_ADDRESS, prefix: ACTOR_PREFIX, gateway: GATEWAY_ADDRESS, mac: ACTOR_MAC, tap: 'tap0' },
    });
    await mkdir(join(memoryDir, 'node0-m0--default--a.fetched'), { recursive: true });
    await writeFile(join(memoryDir, 'node0-m0--default--a.fetched', 'memory'), 'x');
    await writeFile(join(memoryDir, 'node0-m0--default--a.ram.checkpoint-1a2b3c4d'), 'held');
    await writeFile(join(memoryDir, 'node0-m0--default--b.ram'), 'ram');
    await writeFile(join(memoryDir, 'node0-m1--default--a.ram.checkpoint-5e6f7a8b'), 'another slot');
    await writeFile(join(memoryDir, 'node1-m0--default--a.ram'), 'another node');

    await runtime.removeLeftoverMemory('node0-m0--');
    assert.deepEqual((await readdir(memoryDir)).sort(), [
      'node0-m1--default--a.ram.checkpoint-5e6f7a8b',
      'node1-m0--default--a.ram',
    ]);
    await assert.rejects(runtime.removeLeftoverMemory(''), RangeError);
    assert.equal((await readdir(memoryDir)).length, 2, 'an empty prefix removes nothing');
  });
});
