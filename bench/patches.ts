// What page patches save a suspend: writeSnapshot of a micro-VM-like guest memory file against the previous
// snapshot's local copy, with page patches (a chunk that changed in few pages keeps its base chunk, its pages go into
// the file's patch object) and without (every changed chunk hashed, compressed and stored whole).
//
// The file: --size-mib (default 128) of sparse memory whose first --data-mib (default 70) hold pages of half random,
// half zero bytes (compressible about 2:1, like guest memory). Between two snapshots --pages (default 150) random
// 4 KiB pages change, spread over --chunks (default 30) 1 MiB chunks — the shape of two real consecutive suspends of
// an idle guest. Each round writes one snapshot both ways (alternating which goes first) into its own FsBlobStore
// with a node cache, as the agent does. Per round and as medians: the write's wall time, its chunk and patch phases,
// objects uploaded and bytes stored. JSON on stdout.
//
//   node bench/patches.ts [--size-mib 128] [--data-mib 70] [--pages 150] [--chunks 30] [--rounds 6] [--dir /tmp]
import { randomBytes, randomInt } from 'node:crypto';
import { cp, mkdir, mkdtemp, open, rm } from 'node:fs/promises';
import { loadavg, tmpdir } from 'node:os';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { FsBlobStore } from '../src/blob/fs.ts';
import { type SnapshotMeta, type WriteSnapshotResult, writeSnapshot } from '../src/snapshot/index.ts';

const { values } = parseArgs({
  options: {
    'size-mib': { type: 'string', default: '128' },
    'data-mib': { type: 'string', default: '70' },
    pages: { type: 'string', default: '150' },
    chunks: { type: 'string', default: '30' },
    rounds: { type: 'string', default: '6' },
    dir: { type: 'string', default: tmpdir() },
  },
});
const MiB = 1024 * 1024;
const PAGE = 4096;
const size = Number(values['size-mib']) * MiB;
const dataChunks = Number(values['data-mib']);
const pagesPerRound = Number(values.pages);
const chunksPerRound = Number(values.chunks);
const rounds = Number(values.rounds);
const META: SnapshotMeta = {
  runtime: 'microvm',
  template: 'bench',
  assets: { qemu: { url: 'https://example.invalid/qemu', sha256: 'a'.repeat(64) } },
  parent: null,
};

/** A page as guest memory often is: some data, then zeros. */
function memoryPage(): Buffer {
  const page = Buffer.alloc(PAGE);
  randomBytes(PAGE / 2).copy(page);
  return page;
}

async function writeMemory(path: string): Promise<void> {
  const handle = await open(path, 'w');
  try {
    await handle.truncate(size);
    const chunk = Buffer.alloc(MiB);
    for (let index = 0; index < dataChunks; index++) {
      for (let offset = 0; offset < MiB; offset += PAGE) memoryPage().copy(chunk, offset);
      await handle.write(chunk, 0, MiB, index * MiB);
    }
  } finally {
    await handle.close();
  }
}

/** Changes `pagesPerRound` pages spread over `chunksPerRound` random data chunks. */
async function touch(path: string): Promise<void> {
  const chunks = new Set<number>();
  while (chunks.size < Math.min(chunksPerRound, dataChunks)) chunks.add(randomInt(dataChunks));
  const list = [...chunks];
  const handle = await open(path, 'r+');
  try {
    for (let i = 0; i < pagesPerRound; i++) {
      const page = list[i % list.length]! * (MiB / PAGE) + randomInt(MiB / PAGE);
      await handle.write(memoryPage(), 0, PAGE, page * PAGE);
    }
  } finally {
    await handle.close();
  }
}

interface Variant {
  name: 'patches' | 'whole';
  blob: FsBlobStore;
  cache: FsBlobStore;
  kept: string;
  last?: WriteSnapshotResult;
  samples: { ms: number; chunk: number; patch: number; uploaded: number; storedBytes: number; patchedChunks: number }[];
}

const work = await mkdtemp(join(values.dir, 'torpor-bench-patches-'));
try {
  const src = join(work, 'src');
  await mkdir(src);
  await writeMemory(join(src, 'memory'));
  const variants: Variant[] = (['patches', 'whole'] as const).map((name) => ({
    name,
    blob: new FsBlobStore(join(work, name, 'blob')),
    cache: new FsBlobStore(join(work, name, 'cache'), { durable: false }),
    kept: join(work, name, 'kept'),
    samples: [],
  }));
  const suspend = async (v: Variant, round: number) => {
    const started = performance.now();
    const result = await writeSnapshot({
      blob: v.blob,
      cache: v.cache,
      dir: src,
      files: ['memory'],
      key: `snapshots/${round}.json`,
      meta: META,
      patches: v.name === 'patches',
      ...(v.last ? { previous: v.last.manifest, previousDir: v.kept } : {}),
    });
    const ms = performance.now() - started;
    await rm(v.kept, { recursive: true, force: true });
    await cp(join(src, 'memory'), join(v.kept, 'memory'));
    v.last = result;
    return { ms, result };
  };
  for (const v of variants) await suspend(v, 0); // the keyframe snapshot: not measured
  for (let round = 1; round <= rounds; round++) {
    await touch(join(src, 'memory'));
    const order = round % 2 === 0 ? variants : [...variants].reverse();
    for (const v of order) {
      const { ms, result } = await suspend(v, round);
      const { stats } = result;
      v.samples.push({
        ms: Math.round(ms * 10) / 10,
        chunk: stats.phases.chunk,
        patch: stats.phases.patch,
        uploaded: stats.uploadedChunks,
        storedBytes: stats.storedBytes,
        patchedChunks: stats.patchedChunks,
      });
    }
  }
  const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;
  const summary = Object.fromEntries(
    variants.map((v) => [
      v.name,
      {
        write_ms_p50: median(v.samples.map((x) => x.ms)),
        chunk_ms_p50: median(v.samples.map((x) => x.chunk)),
        patch_ms_p50: median(v.samples.map((x) => x.patch)),
        uploaded_objects_p50: median(v.samples.map((x) => x.uploaded)),
        stored_kib_p50: Math.round(median(v.samples.map((x) => x.storedBytes)) / 1024),
        rounds: v.samples,
      },
    ]),
  );
  const load = loadavg()[0]!.toFixed(2);
  console.log(
    JSON.stringify({ sizeMiB: size / MiB, dataChunks, pagesPerRound, chunksPerRound, load, ...summary }, null, 1),
  );
} finally {
  await rm(work, { recursive: true, force: true });
}
