// The micro-VM runtime's guest memory copy into a full-sized RAM file (sizeAs, then copyExtents): byte-for-byte equal to
// its source, holes kept as holes, and the target at full size even where it was longer or held other data.
import assert from 'node:assert/strict';
import { mkdtemp, open, readFile, rm, stat, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, describe, it } from 'node:test';
import { copyExtents, sizeAs } from '../../src/runtime/microvm/runtime.ts';

async function copyExtentsInto(from: string, to: string, opts: { sendfile?: boolean } = {}): Promise<void> {
  await sizeAs(from, to);
  await copyExtents(from, to, opts);
}

const MiB = 1024 * 1024;

/** A sparse file of `size` bytes with random data at each [offset, length]. */
async function sparseFile(path: string, size: number, extents: [number, number][]): Promise<void> {
  const file = await open(path, 'w');
  try {
    await file.truncate(size);
    for (const [offset, length] of extents) {
      const data = Buffer.alloc(length);
      for (let i = 0; i < length; i += 4096) data.writeUInt32LE((offset + i) ^ 0x5a5a5a5a, i);
      data[length - 1] = 0xa5;
      await file.write(data, 0, length, offset);
    }
  } finally {
    await file.close();
  }
}

describe('sizeAs + copyExtents', () => {
  let dir: string | undefined;
  after(() => (dir ? rm(dir, { recursive: true, force: true }) : undefined));

  // sendfile(2) where the architecture's number is known (x64, arm64), else reads and writes through a buffer.
  for (const sendfile of [true, false]) {
    it(`copies the data extents at their offsets into a full-sized file; holes stay holes (sendfile: ${sendfile})`, async () => {
      dir ??= await mkdtemp(join(tmpdir(), 'torpor-copy-extents-'));
      const from = join(dir, `memory-${sendfile}`);
      const to = join(dir, `vm-${sendfile}.ram`);
      // Data at the start, in the middle (over 4 MiB: more than one read), ending unaligned, and at the very end.
      await sparseFile(from, 64 * MiB, [
        [0, 8192],
        [3 * MiB, 9 * MiB + 4096],
        [20 * MiB + 512, 3000],
        [64 * MiB - 4096, 4096],
      ]);
      // A leftover RAM file, longer and full of other data: nothing of it may remain.
      await writeFile(to, Buffer.alloc(80 * MiB, 0xff));
      await copyExtentsInto(from, to, { sendfile });
      assert.equal((await stat(to)).size, 64 * MiB);
      assert.ok((await readFile(to)).equals(await readFile(from)), 'the copy differs from its source');
      const blocks = (await stat(to)).blocks * 512;
      assert.ok(blocks < 16 * MiB, `holes were filled: ${blocks} bytes allocated for ~9.5 MiB of data`);
    });
  }

  it('copies a file that is all hole as a full-sized hole, and fails on a missing source', async () => {
    dir ??= await mkdtemp(join(tmpdir(), 'torpor-copy-extents-'));
    const from = join(dir, 'empty');
    const to = join(dir, 'empty.ram');
    await sparseFile(from, 16 * MiB, []);
    await copyExtentsInto(from, to);
    assert.equal((await stat(to)).size, 16 * MiB);
    assert.ok((await readFile(to)).equals(Buffer.alloc(16 * MiB)));
    await assert.rejects(copyExtentsInto(join(dir, 'missing'), join(dir, 'x.ram')), /ENOENT/);
  });
});
