// Upload and download throughput of one large object through S3BlobStore (multipart upload, parallel ranged
// download) against the raw AWS SDK on the same client (one PutObject, one GetObject), in the same run, on a
// real S3 server: Ceph radosgw started by scripts/services/s3.sh on loopback. Prints one JSON document.
//
// Two links: `loopback` (radosgw directly: CPU-bound, parallel requests cannot help there) and `throttled`
// (through a TCP proxy limiting every connection to --link-mibps each way, as a single connection to a remote
// S3 service is limited; that is what parallel parts are for). The raw PutObject is measured with and without
// the Content-MD5 that S3BlobStore always sends, to separate the cost of integrity from the store's own.
// The machine is shared: compare figures from one run, and look at the samples, not only the medians.
//
//   node bench/blob.ts [--size-mib 64] [--rounds 3] [--part-mib 8] [--concurrency 4] [--link-mibps 32]

import { createHash, randomBytes } from 'node:crypto';
import { Readable, Writable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { parseArgs } from 'node:util';
import { DeleteObjectCommand, GetObjectCommand, PutObjectCommand } from '@aws-sdk/client-s3';
import { S3BlobStore, type S3Connection } from '../src/blob/s3.ts';
import { createBucket, startS3 } from '../test/blob/s3-helpers.ts';
import { round } from './lib/bare.ts';
import { throttledLink } from './lib/link.ts';

const { values } = parseArgs({
  options: {
    'size-mib': { type: 'string', default: '64' },
    rounds: { type: 'string', default: '3' },
    'part-mib': { type: 'string', default: '8' },
    concurrency: { type: 'string', default: '4' },
    'link-mibps': { type: 'string', default: '32' },
  },
});
const MiB = 1024 * 1024;
const size = Number(values['size-mib']) * MiB;
const rounds = Number(values.rounds);
const partSize = Number(values['part-mib']) * MiB;
const concurrency = Number(values.concurrency);
const linkMiBps = Number(values['link-mibps']);

const s3 = await startS3();
if (typeof s3 === 'string') {
  console.log(JSON.stringify({ skipped: s3 }));
  process.exit(0);
}

/** Consumes a stream, counting its bytes (nothing is kept). */
async function drain(body: Readable): Promise<number> {
  let bytes = 0;
  await pipeline(
    body,
    new Writable({
      write(chunk: Buffer, _encoding, done) {
        bytes += chunk.length;
        done();
      },
    }),
  );
  return bytes;
}

async function timed(expectedBytes: number, run: () => Promise<number | undefined>): Promise<number> {
  const started = process.hrtime.bigint();
  const bytes = await run();
  const seconds = Number(process.hrtime.bigint() - started) / 1e9;
  if (bytes !== undefined && bytes !== expectedBytes) throw new Error(`read ${bytes} bytes, expected ${expectedBytes}`);
  return expectedBytes / MiB / seconds;
}

const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;
const mibs = (xs: number[]) => ({ median: round(median(xs)), samples: xs.map(round) });

async function measure(connection: S3Connection, bucket: string, data: Buffer) {
  const store = new S3BlobStore({ ...connection, bucket, partSize, concurrency });
  const client = store.client;
  const samples = {
    sdkPut: [] as number[],
    sdkPutMd5: [] as number[],
    storePutBytes: [] as number[],
    storePutStream: [] as number[],
    sdkGet: [] as number[],
    storeGet: [] as number[],
    storeGetOfRaw: [] as number[],
  };
  const sdkPut = (md5: boolean) => async () => {
    const ContentMD5 = md5 ? createHash('md5').update(data).digest('base64') : undefined;
    await client.send(
      new PutObjectCommand({ Bucket: bucket, Key: 'raw', Body: data, ContentLength: size, ContentMD5 }),
    );
    return undefined;
  };
  for (let i = 0; i < rounds; i++) {
    samples.sdkPut.push(await timed(size, sdkPut(false)));
    samples.sdkPutMd5.push(await timed(size, sdkPut(true)));
    samples.storePutBytes.push(
      await timed(size, async () => {
        await store.put('store', data);
        return undefined;
      }),
    );
    samples.storePutStream.push(
      await timed(size, async () => {
        // As a snapshot file arrives from disk: 64 KiB pieces of unknown total length.
        const pieces = (function* () {
          for (let at = 0; at < size; at += 64 * 1024) yield data.subarray(at, at + 64 * 1024);
        })();
        await store.put('store', Readable.from(pieces));
        return undefined;
      }),
    );
    samples.sdkGet.push(
      await timed(size, async () => {
        const out = await client.send(new GetObjectCommand({ Bucket: bucket, Key: 'raw' }));
        return drain(out.Body as Readable);
      }),
    );
    samples.storeGet.push(await timed(size, async () => drain(await store.get('store'))));
    samples.storeGetOfRaw.push(await timed(size, async () => drain(await store.get('raw'))));
  }
  await client.send(new DeleteObjectCommand({ Bucket: bucket, Key: 'raw' }));
  await store.delete('store');
  store.close();
  return {
    uploadMiBps: {
      sdkPutObject: mibs(samples.sdkPut),
      sdkPutObjectWithMd5: mibs(samples.sdkPutMd5),
      s3BlobStoreBytes: mibs(samples.storePutBytes),
      s3BlobStoreStream: mibs(samples.storePutStream),
    },
    downloadMiBps: {
      sdkGetObject: mibs(samples.sdkGet),
      s3BlobStore: mibs(samples.storeGet),
      // The object the raw PutObject wrote (one part), so that only the download path differs.
      s3BlobStoreOfRawObject: mibs(samples.storeGetOfRaw),
    },
    ratios: {
      upload: round(median(samples.storePutBytes) / median(samples.sdkPut)),
      uploadVsMd5: round(median(samples.storePutBytes) / median(samples.sdkPutMd5)),
      uploadStream: round(median(samples.storePutStream) / median(samples.sdkPut)),
      download: round(median(samples.storeGet) / median(samples.sdkGet)),
      downloadOfRawObject: round(median(samples.storeGetOfRaw) / median(samples.sdkGet)),
    },
  };
}

try {
  const bucket = 'torpor-bench';
  await createBucket(s3.connection, bucket);
  const data = randomBytes(size);
  const loopback = await measure(s3.connection, bucket, data);
  const link = await throttledLink(s3.endpoint, linkMiBps);
  let throttled: Awaited<ReturnType<typeof measure>>;
  try {
    throttled = await measure({ ...s3.connection, endpoint: link.endpoint }, bucket, data);
  } finally {
    await new Promise<void>((resolve) => link.server.close(() => resolve()));
  }
  const result = {
    benchmark: 'blob-s3',
    server: 'ceph radosgw (Debian 12, memstore OSD) on loopback',
    objectMiB: size / MiB,
    rounds,
    partMiB: partSize / MiB,
    concurrency,
    loopback,
    throttled: { perConnectionMiBps: linkMiBps, ...throttled },
  };
  console.log(JSON.stringify(result, null, 2));
} finally {
  await s3.stop();
}
