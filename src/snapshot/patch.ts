// Page patches. Between two suspends of an idle guest, a few dozen of its memory's 1 MiB chunks differ from the
// parent's, each in a few 4 KiB pages only. Hashing and compressing those chunks whole was most of a suspend's CPU.
// Instead such a chunk keeps the parent's chunk as its base (a "keyframe", already stored) and the pages that differ
// from that base go, with every other such page of the file, into one patch object per file and snapshot.
// A patch is always relative to the base chunks, never to another patch: a chunk's pages accumulate from snapshot to
// snapshot until they pass PATCH_MAX_FRACTION of it, and then the chunk is stored whole again (a new keyframe).
import { promisify } from 'node:util';
import { zstdDecompress } from 'node:zlib';
import type { BlobStore } from '../blob/blob.ts';
import { TorporError } from '../core/errors.ts';
import type { FilePatch, ManifestFile } from '../core/types.ts';
import { readVerified, sha256Hex } from './transfer.ts';

const decompress = promisify(zstdDecompress);

export const PATCH_PREFIX = 'patches/';
/** The guest's page size: the granularity at which its memory changes (at 64 KiB, 8x more bytes differ). */
export const PATCH_PAGE_SIZE = 4096;
/** A chunk whose differing pages exceed this fraction of it is stored whole: past it, the patch's bytes, carried
 * and recompressed by every later snapshot until the chunk changes enough, cost more than a new keyframe. */
export const PATCH_MAX_FRACTION = 1 / 4;

export function patchKey(contentSha256: string): string {
  return PATCH_PREFIX + contentSha256;
}

/** Sorted, distinct page indices as the manifest's flattened runs `[first, count, …]`. */
export function encodePageRuns(pages: readonly number[]): number[] {
  const runs: number[] = [];
  for (const page of pages) {
    const last = runs.length - 2;
    if (last >= 0 && runs[last]! + runs[last + 1]! === page) runs[last + 1]!++;
    else runs.push(page, 1);
  }
  return runs;
}

/** The runs of a patch as byte ranges of the file (the last page may end at the file's end). */
export function patchRanges(patch: FilePatch, fileSize: number): { start: number; end: number }[] {
  const ranges: { start: number; end: number }[] = [];
  for (let i = 0; i < patch.pages.length; i += 2) {
    const start = patch.pages[i]! * patch.pageSize;
    ranges.push({ start, end: Math.min(fileSize, start + patch.pages[i + 1]! * patch.pageSize) });
  }
  return ranges;
}

/** Why `file.patch` is not a valid patch of `file` with chunks of `chunkSize`, or undefined when it is. Checks
 * everything a restore relies on: runs in range, sorted and apart, every page in a chunk the file stores. */
export function patchIssue(file: ManifestFile, chunkSize: number): string | undefined {
  const patch = file.patch;
  if (!patch) return undefined;
  if (file.delta) return 'a file stored as a delta has no patch';
  if (chunkSize % patch.pageSize !== 0) return `page size ${patch.pageSize} does not divide chunk size ${chunkSize}`;
  if (patch.pages.length % 2 !== 0) return 'pages must be [first, count] pairs';
  const pageCount = Math.ceil(file.size / patch.pageSize);
  const pagesPerChunk = chunkSize / patch.pageSize;
  let next = 0;
  for (let i = 0; i < patch.pages.length; i += 2) {
    const first = patch.pages[i]!;
    const count = patch.pages[i + 1]!;
    if (count < 1) return `run ${i / 2} has no pages`;
    if (first < next) return `run ${i / 2} starts at page ${first}, before the end of the previous run or touching it`;
    if (first + count > pageCount) return `run ${i / 2} ends past the file's ${pageCount} pages`;
    const lastChunk = Math.floor((first + count - 1) / pagesPerChunk);
    for (let chunk = Math.floor(first / pagesPerChunk); chunk <= lastChunk; chunk++) {
      if (file.chunks[chunk] == null) return `run ${i / 2} patches chunk ${chunk}, which has no base`;
    }
    next = first + count + 1;
  }
  return undefined;
}

/** The pages `previous`'s patch lists within each of its chunks, as sorted indices of `pageSize` pages within the
 * chunk (a patch of another page size is mapped to the pages it overlaps). */
export function patchedPagesByChunk(
  previous: ManifestFile,
  chunkSize: number,
  pageSize = previous.patch?.pageSize,
): Map<number, number[]> {
  const byChunk = new Map<number, number[]>();
  if (!previous.patch || pageSize === undefined) return byChunk;
  const pagesPerChunk = chunkSize / pageSize;
  for (const { start, end } of patchRanges(previous.patch, previous.size)) {
    for (let page = Math.floor(start / pageSize); page * pageSize < end; page++) {
      const chunk = Math.floor(page / pagesPerChunk);
      const pages = byChunk.get(chunk) ?? [];
      const inChunk = page - chunk * pagesPerChunk;
      if (pages.at(-1) !== inChunk) pages.push(inChunk);
      byChunk.set(chunk, pages);
    }
  }
  return byChunk;
}

/** Fetches a file's patch object (from the node cache when it holds a good copy, else from the store, then cached),
 * checks it against its hash and the runs' length, and returns the pages' bytes in run order. */
export async function readPatch(
  blob: BlobStore,
  cache: BlobStore | undefined,
  file: ManifestFile & { patch: FilePatch },
  snapshotKey: string,
): Promise<Buffer> {
  const where = `of file "${file.name}" in snapshot "${snapshotKey}"`;
  const length = patchRanges(file.patch, file.size).reduce((sum, { start, end }) => sum + end - start, 0);
  const hash = file.patch.object.slice(PATCH_PREFIX.length);
  return readVerified(
    blob,
    cache,
    file.patch.object,
    async (compressed) => {
      let bytes: Buffer;
      try {
        // The cap stops a hostile object from inflating into gigabytes before the checks can reject it.
        bytes = await decompress(compressed, { maxOutputLength: Math.max(length, 1) });
      } catch (err) {
        throw corrupt(`patch ${file.patch.object} ${where} does not decompress`, err);
      }
      if (bytes.length !== length) {
        throw corrupt(`patch ${file.patch.object} ${where} has ${bytes.length} bytes where ${length} are expected`);
      }
      if (sha256Hex(bytes) !== hash) throw corrupt(`patch ${file.patch.object} ${where} does not match its sha256`);
      return bytes;
    },
    `patch ${where}:`,
  );
}

function corrupt(message: string, cause?: unknown): TorporError {
  return new TorporError('SNAPSHOT_CORRUPT', message, { field: 'snapshot', cause });
}
