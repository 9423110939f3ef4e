// The host end of the guest control protocol against a peer on a real unix socket that speaks it line by line:
// the clock-only request, and its fallback for a guest from before that request existed (which answers it "err
// unknown request", as guest/spawn.c always has for verbs it does not know).
import assert from 'node:assert/strict';
import { mkdtemp, rm } from 'node:fs/promises';
import { createServer, type Server, type Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, it } from 'node:test';
import { GuestControl } from '../../src/runtime/microvm/control.ts';
import { readLines } from '../../src/runtime/microvm/unix-socket.ts';

/** A guest control server knowing only `verbs`; every request line it receives is recorded. */
async function fakeGuest(path: string, verbs: string[]): Promise<{ server: Server; received: string[] }> {
  const received: string[] = [];
  const server = createServer((socket: Socket) => {
    readLines(socket, (line) => {
      received.push(line);
      const [seq, verb] = line.split(' ');
      socket.write(verbs.includes(verb ?? '') ? `${seq} ok\n` : `${seq} err unknown request ${verb}\n`);
    });
  });
  await new Promise<void>((resolve) => server.listen(path, resolve));
  return { server, received };
}

describe('guest control: clock', () => {
  const at = new Date('2026-11-23T01:02:03.456Z');
  const seconds = String(Math.floor(at.getTime() / 1000));

  for (const [title, verbs, expected] of [
    ['a current guest is sent the clock alone', ['clock', 'resync'], [`1 clock ${seconds} 456`]],
    [
      'an older guest (no "clock" request) gets a full resync instead',
      ['resync'],
      [`1 clock ${seconds} 456`, `2 resync ${seconds} default/a 456`],
    ],
  ] as const) {
    it(title, async (t) => {
      const dir = await mkdtemp(join(tmpdir(), 'torpor-control-'));
      const { server, received } = await fakeGuest(join(dir, 'control.sock'), [...verbs]);
      const control = await GuestControl.connect(join(dir, 'control.sock'), 5000, () => true);
      t.after(async () => {
        control.close();
        await new Promise((r) => server.close(r));
        await rm(dir, { recursive: true, force: true });
      });
      await control.clock(at, 'default/a', 5000);
      assert.deepEqual(received, expected);
    });
  }

  it('a guest that cannot set its clock fails the request', async (t) => {
    const dir = await mkdtemp(join(tmpdir(), 'torpor-control-'));
    const server = createServer((socket: Socket) => {
      readLines(socket, (line) => socket.write(`${line.split(' ')[0]} err cannot set the clock\n`));
    });
    await new Promise<void>((resolve) => server.listen(join(dir, 'control.sock'), resolve));
    const control = await GuestControl.connect(join(dir, 'control.sock'), 5000, () => true);
    t.after(async () => {
      control.close();
      await new Promise((r) => server.close(r));
      await rm(dir, { recursive: true, force: true });
    });
    await assert.rejects(control.clock(at, 'default/a', 5000), /cannot set the clock/);
  });
});
