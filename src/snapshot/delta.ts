// Delta-encoded files. A checkpoint's state file (gVisor's checkpoint.img) differs all over between two
// checkpoints of an unchanged actor — its serialisation order is not stable — so chunk dedup saves nothing on
// it. Compressed with zstd using a base version of the same file (the parent's "keyframe") as dictionary, it
// shrinks to a few percent. Bases are always chunked files, never deltas, so a restore applies at most one.
import { promisify } from 'node:util';
import { constants, zstdCompress, zstdDecompress } from 'node:zlib';
import type { BlobStore } from '../blob/blob.ts';
import { TorporError } from '../core/errors.ts';
import type { ChunkedContent, ManifestFile } from '../core/types.ts';
import { chunkKey, DELTA_PREFIX } from './manifest.ts';
import { readVerified, sha256Hex } from './transfer.ts';

const compress = promisify(zstdCompress);
const decompress = promisify(zstdDecompress);

/** Files larger than this are always chunked: a delta needs the base and the file in memory. */
export const DELTA_MAX_BYTES = 32 * 1024 * 1024;
/** A delta is kept only when it is at most this fraction of the raw file; otherwise the file becomes a keyframe. */
export const DELTA_MAX_RATIO = 0.25;
/** zstd level for deltas written by a suspend. Measured on gVisor state files (460 KB): level 3 takes ~8 ms for a
 * 29 KB delta, 12 ~15 ms for 16 KB, 19 ~230 ms for 8 KB. A suspend uses 3 and compaction later uses 19. */
export const DEFAULT_DELTA_LEVEL = 3;
export const COMPACT_DELTA_LEVEL = 19;

function windowLog(bytes: number): number {
  return Math.min(27, Math.max(21, Math.ceil(Math.log2(Math.max(bytes, 1)))));
}

export async function encodeDelta(target: Buffer, base: Buffer, level: number): Promise<Buffer> {
  return compress(target, {
    dictionary: base,
    params: {
      [constants.ZSTD_c_compressionLevel]: level,
      [constants.ZSTD_c_enableLongDistanceMatching]: 1,
      [constants.ZSTD_c_windowLog]: windowLog(base.length + target.length),
    },
  } as Parameters<typeof zstdCompress>[1]);
}

/** Deltas are named by what they decode to — the file's content and its base — not by their bytes, so a
 * re-encoding of the same delta (see compactDelta) atomically replaces it under the same key. */
export function deltaKey(contentSha256: string, base: ChunkedContent): string {
  return DELTA_PREFIX + sha256Hex(Buffer.from(`${contentSha256}\n${base.size}\n${base.chunks.join(',')}`));
}

/** The base of a new delta for a file whose previous version is `previous`: its own base if it was a delta. A
 * patched file's keyframe is its base chunks without the patch: the writer and the restore both read it with
 * readChunkedContent, so the delta applies to the same bytes it was encoded against. */
export function keyframeOf(previous: ManifestFile): ChunkedContent {
  return previous.delta ? previous.delta.base : { size: previous.size, chunks: previous.chunks };
}

/** Rebuilds a chunked file in memory (delta bases are small by construction). */
export async function readChunkedContent(
  blob: BlobStore,
  cache: BlobStore | undefined,
  content: ChunkedContent,
  chunkSize: number,
): Promise<Buffer> {
  const out = Buffer.alloc(content.size);
  await Promise.all(
    content.chunks.map(async (hash, index) => {
      if (hash === null) return;
      const offset = index * chunkSize;
      const length = Math.min(chunkSize, content.size - offset);
      const bytes = await readVerified(
        blob,
        cache,
        chunkKey(hash),
        async (compressed) => {
          const raw = await decompress(compressed, { maxOutputLength: Math.max(length, 1) });
          if (raw.length !== length || sha256Hex(raw) !== hash) throw corrupt(`base chunk ${hash} does not match`);
          return raw;
        },
        'base chunk',
      );
      bytes.copy(out, offset);
    }),
  );
  return out;
}

/** Fetches the delta object, applies it to the base and verifies the result. */
export async function applyDelta(
  blob: BlobStore,
  cache: BlobStore | undefined,
  file: ManifestFile & { delta: NonNullable<ManifestFile['delta']> },
  base: Buffer,
): Promise<Buffer> {
  const decode = async (bytes: Uint8Array): Promise<Buffer> => {
    let content: Buffer;
    try {
      content = await decompress(bytes, {
        dictionary: base,
        maxOutputLength: Math.max(file.size, 1),
        params: { [constants.ZSTD_d_windowLogMax]: 27 },
      } as Parameters<typeof zstdDecompress>[1]);
    } catch (err) {
      throw corrupt(`delta ${file.delta.object} of file "${file.name}" does not apply to its base`, err);
    }
    if (content.length !== file.size || sha256Hex(content) !== file.delta.sha256) {
      throw corrupt(`file "${file.name}" rebuilt from delta ${file.delta.object} does not match its sha256`);
    }
    return content;
  };
  return readVerified(blob, cache, file.delta.object, decode, 'delta');
}

/** Re-encodes a stored delta at a higher zstd level and replaces it in place when smaller. Suspends encode
 * fast (they are on the clock); this runs afterwards, in the background, and shrinks what stays stored.
 * Returns the bytes saved. */
export async function compactDelta(
  blob: BlobStore,
  cache: BlobStore | undefined,
  file: ManifestFile & { delta: NonNullable<ManifestFile['delta']> },
  chunkSize: number,
  level: number,
): Promise<number> {
  const current = await blob.getBytes(file.delta.object);
  const base = await readChunkedContent(blob, cache, file.delta.base, chunkSize);
  const content = await applyDelta(blob, cache, file, base);
  const smaller = await encodeDelta(content, base, level);
  if (smaller.length >= current.length) return 0;
  await blob.put(file.delta.object, smaller);
  await cache?.put(file.delta.object, smaller);
  return current.length - smaller.length;
}

function corrupt(message: string, cause?: unknown): TorporError {
  return new TorporError('SNAPSHOT_CORRUPT', message, { field: 'snapshot', cause });
}
