// Restore time of one actor's snapshot (--size-mib, default 64) from S3 on a cold node (empty chunk cache) against
// a warm node (its bounded chunk cache, LruBlobCache, holds the chunks: no request reaches S3), with
// restoreSnapshot — what an agent's activation runs before the runtime restores. Real S3: Ceph radosgw started by
// scripts/services/s3.sh. Bare floors in the same run: for the cold node, one raw AWS SDK GetObject of the same
// bytes (the checkpoint as one object) written to a local file; for the warm node, a plain read of the same bytes
// from a local file, written to another. Rounds are interleaved; medians (and samples) in ms. JSON on stdout.
//
// The checkpoint is one file of 4 KiB pages, random (incompressible) except --zero-percent of them, all zero, as
// in a memory image. `--link-mibps N` also measures through a TCP proxy that limits each connection to N MiB/s
// each way (a remote S3 service), where the network is what a warm node saves.
//
//   node bench/restore.ts [--size-mib 64] [--rounds 5] [--zero-percent 25] [--link-mibps 0]
import { createHash, randomBytes } from 'node:crypto';
import { createWriteStream } from 'node:fs';
import { mkdir, mkdtemp, open, readFile, rm, writeFile } from 'node:fs/promises';
import { loadavg, tmpdir } from 'node:os';
import { join } from 'node:path';
import type { Readable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { parseArgs } from 'node:util';
import { GetObjectCommand, PutObjectCommand } from '@aws-sdk/client-s3';
import { LruBlobCache } from '../src/blob/lru-cache.ts';
import { S3BlobStore, type S3Connection } from '../src/blob/s3.ts';
import { restoreSnapshot, type SnapshotMeta, writeSnapshot } from '../src/snapshot/index.ts';
import { createBucket, startS3 } from '../test/blob/s3-helpers.ts';
import { round } from './lib/bare.ts';
import { throttledLink } from './lib/link.ts';

const { values } = parseArgs({
  options: {
    'size-mib': { type: 'string', default: '64' },
    rounds: { type: 'string', default: '5' },
    'zero-percent': { type: 'string', default: '25' },
    'link-mibps': { type: 'string', default: '0' },
  },
});
const MiB = 1024 * 1024;
const PAGE = 4096;
const size = Number(values['size-mib']) * MiB;
const rounds = Number(values.rounds);
const zeroPercent = Number(values['zero-percent']);
const linkMiBps = Number(values['link-mibps']);
const FILE = 'checkpoint.img';
const META: SnapshotMeta = {
  runtime: 'gvisor',
  template: 'bench',
  assets: { runsc: { url: 'https://example.invalid/runsc', sha256: 'a'.repeat(64) } },
  parent: null,
};

const s3 = await startS3();
if (typeof s3 === 'string') {
  console.log(JSON.stringify({ skipped: s3 }));
  process.exit(0);
}
const work = await mkdtemp(join(tmpdir(), 'torpor-bench-restore-'));

/** A memory-image-like file: random pages, `zeroPercent` of them zero. */
function checkpointBytes(): Buffer {
  const data = randomBytes(size);
  const pages = size / PAGE;
  for (let p = 0; p < pages; p++) if (Math.random() * 100 < zeroPercent) data.fill(0, p * PAGE, (p + 1) * PAGE);
  return data;
}

const elapsed = async (run: () => Promise<unknown>): Promise<number> => {
  const t = performance.now();
  await run();
  return performance.now() - t;
};
const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;
const ms = (xs: number[]) => ({ median: round(median(xs)), samples: xs.map(round) });

/** Cold and warm restores of `key` through `connection`, with their bare floors, `rounds` times interleaved. */
async function measure(connection: S3Connection, bucket: string, key: string, data: Buffer) {
  const blob = new S3BlobStore({ ...connection, bucket });
  const samples = { cold: [] as number[], warm: [] as number[], bareGet: [] as number[], bareRead: [] as number[] };
  let fetchedBytes = 0;
  const localCopy = join(work, 'local-copy.img');
  await writeFile(localCopy, data);
  for (let i = 0; i < rounds; i++) {
    const node = join(work, `node-${i}`);
    const cache = new LruBlobCache(join(node, 'chunks'), { maxBytes: 4 * size });
    const cold = await restoreTimed(blob, key, join(node, 'cold'), cache);
    samples.cold.push(cold.ms);
    fetchedBytes = cold.fetchedBytes;
    if (cold.fetchedChunks === 0) throw new Error('a cold restore fetched nothing');
    const warm = await restoreTimed(blob, key, join(node, 'warm'), cache);
    samples.warm.push(warm.ms);
    if (warm.fetchedChunks !== 0) throw new Error(`a warm restore fetched ${warm.fetchedChunks} chunks from S3`);
    if (i === 0) await assertSame(join(node, 'warm', FILE), data);
    samples.bareGet.push(
      await elapsed(async () => {
        const out = await blob.client.send(new GetObjectCommand({ Bucket: bucket, Key: 'bare/checkpoint.img' }));
        await pipeline(out.Body as Readable, createWriteStream(join(node, 'bare-get.img')));
      }),
    );
    samples.bareRead.push(await elapsed(async () => writeFile(join(node, 'bare-read.img'), await readFile(localCopy))));
    await rm(node, { recursive: true, force: true });
  }
  blob.client.destroy();
  const [cold, warm, bareGet, bareRead] = [samples.cold, samples.warm, samples.bareGet, samples.bareRead].map(median);
  return {
    restore_ms: { cold_node: ms(samples.cold), warm_node: ms(samples.warm) },
    bare_ms: { s3_get_object: ms(samples.bareGet), local_file_read: ms(samples.bareRead) },
    fetched_bytes_cold: fetchedBytes,
    ratios: {
      cold_over_warm: round(cold! / warm!),
      cold_over_bare_get: round(cold! / bareGet!),
      warm_over_bare_read: round(warm! / bareRead!),
    },
  };
}

async function restoreTimed(blob: S3BlobStore, key: string, dir: string, cache: LruBlobCache) {
  const t = performance.now();
  const { stats } = await restoreSnapshot({ blob, key, dir, cache });
  return { ms: performance.now() - t, fetchedChunks: stats.fetchedChunks, fetchedBytes: stats.fetchedBytes };
}

async function assertSame(path: string, data: Buffer): Promise<void> {
  const digest = (b: Buffer) => createHash('sha256').update(b).digest('hex');
  if (digest(await readFile(path)) !== digest(data)) throw new Error('the restored file differs from the original');
}

try {
  const bucket = 'bench-restore';
  await createBucket(s3.connection, bucket);
  const data = checkpointBytes();
  const src = join(work, 'src');
  await mkdir(src);
  const handle = await open(join(src, FILE), 'w');
  await handle.writeFile(data);
  await handle.close();
  const key = 'snapshots/bench/actor/1/manifest.json';
  const blob = new S3BlobStore({ ...s3.connection, bucket });
  const written = await writeSnapshot({ blob, dir: src, files: [FILE], key, meta: META });
  await blob.client.send(
    new PutObjectCommand({ Bucket: bucket, Key: 'bare/checkpoint.img', Body: data, ContentLength: size }),
  );
  blob.client.destroy();

  const result: Record<string, unknown> = {
    benchmark: 'restore',
    size_mib: size / MiB,
    zero_percent: zeroPercent,
    rounds,
    load_average_at_start: loadavg().map(round),
    snapshot: {
      chunks: written.stats.totalChunks,
      zero_chunks: written.stats.zeroChunks,
      stored_bytes: written.stats.storedBytes,
    },
    loopback: await measure(s3.connection, bucket, key, data),
  };
  if (linkMiBps > 0) {
    const link = await throttledLink(s3.endpoint, linkMiBps);
    try {
      result.throttled = {
        link_mibps_per_connection: linkMiBps,
        ...(await measure({ ...s3.connection, endpoint: link.endpoint }, bucket, key, data)),
      };
    } finally {
      link.server.close();
    }
  }
  console.log(JSON.stringify(result, null, 2));
} finally {
  await rm(work, { recursive: true, force: true });
  await s3.stop();
}
