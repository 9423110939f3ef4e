// The CLI's transfer progress: figures (bytes, rate, ETA), drawn in place on a terminal, nothing elsewhere.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { formatBytes, formatDuration, formatProgress, Progress } from '../../src/cli/progress.ts';

test('bytes, durations and one progress line', () => {
  assert.equal(formatBytes(512), '512 B');
  assert.equal(formatBytes(1536), '1.5 KiB');
  assert.equal(formatBytes(30 * 1024 * 1024), '30.0 MiB');
  assert.equal(formatDuration(4.4), '4s');
  assert.equal(formatDuration(125), '2m05s');
  assert.equal(formatDuration(3 * 3600 + 61), '3h01m');
  // 3 MiB of 12 MiB in 2 s: 1.5 MiB/s, 9 MiB left: 6 s.
  assert.equal(formatProgress('pull', 3 << 20, 12 << 20, 2000), 'pull  3.0 MiB / 12.0 MiB  25%  1.5 MiB/s  ETA 6s');
  // No total: no percentage, no ETA.
  assert.equal(formatProgress('fetch', 2048, undefined, 1000), 'fetch  2.0 KiB  2.0 KiB/s');
  assert.equal(formatProgress('done', 100, 100, 1000), 'done  100 B / 100 B  100%  100 B/s');
});

function fakeStream(isTTY: boolean) {
  const writes: string[] = [];
  return { writes, stream: { isTTY, columns: 80, write: (s: string) => writes.push(s) } };
}

test('on a terminal: parts add up into one line redrawn in place, ended by finish()', async () => {
  const { writes, stream } = fakeStream(true);
  const p = new Progress('assets', stream);
  p.update('kernel', 1024, 4096);
  await new Promise((r) => setTimeout(r, 120));
  p.update('initrd', 1024, 4096);
  p.finish();
  assert.ok(writes.length >= 3, writes.join('|'));
  const ERASE = '\x1b[K';
  for (const w of writes.slice(0, -1)) assert.ok(w.startsWith('\r') && w.endsWith(ERASE), JSON.stringify(w));
  assert.match(
    writes.at(-2)!.slice(1, -ERASE.length),
    /^assets {2}2\.0 KiB \/ 8\.0 KiB {2}25% {2}\S+ \S+\/s {2}ETA \d+s$/,
  );
  assert.equal(writes.at(-1), '\n');
  // A part of unknown size makes the total unknown.
  const other = fakeStream(true);
  const q = new Progress('x', other.stream);
  q.update('a', 10, 100);
  q.update('b', 10);
  q.finish();
  assert.doesNotMatch(other.writes.at(-2)!, /%|ETA/);
});

test('on a narrow terminal the label is cut, never the figures', () => {
  const { writes, stream } = fakeStream(true);
  stream.columns = 90;
  const p = new Progress(`pulling registry.example/${'x'.repeat(80)}:v1`, stream);
  p.update('layer', 3 << 20, 12 << 20);
  const line = writes[0]!.slice(1, -'\x1b[K'.length);
  assert.ok(line.length <= 89, line);
  assert.match(line, /^pulling registry\.example\/x+… {2}3\.0 MiB \/ 12\.0 MiB {2}25% {2}\S+ \S+\/s/);
});

test('redraws are throttled, and nothing is drawn when not on a terminal or when nothing moved', () => {
  const tty = fakeStream(true);
  const p = new Progress('many', tty.stream);
  for (let i = 1; i <= 1000; i++) p.update('blob', i, 1000);
  assert.ok(tty.writes.length <= 2, `${tty.writes.length} draws for 1000 updates`);

  const piped = fakeStream(false);
  const q = new Progress('quiet', piped.stream);
  q.update('blob', 10, 100);
  q.finish();
  assert.deepEqual(piped.writes, []);

  const idle = fakeStream(true);
  new Progress('hit', idle.stream).finish();
  assert.deepEqual(idle.writes, []);
});
