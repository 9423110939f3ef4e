// Helpers of the page patch tests: a memory-like sparse file, pages to change, and a Suspender that writes snapshots
// one after another as the agent does (against the previous manifest and a local copy of its files).
import assert from 'node:assert/strict';
import { cp, readFile, rm } from 'node:fs/promises';
import { join } from 'node:path';
import type { BlobStore } from '../../src/blob/blob.ts';
import type { ManifestFile } from '../../src/core/types.ts';
import { PATCH_PAGE_SIZE, restoreSnapshot, type WriteSnapshotResult, writeSnapshot } from '../../src/snapshot/index.ts';
import { CHUNK, META, type scratch, scribble, writeSparse } from './helpers.ts';

type Scratch = Awaited<ReturnType<typeof scratch>>;

export const PAGE = PATCH_PAGE_SIZE;
export const PAGES_PER_CHUNK = CHUNK / PAGE; // 16
export const MAX_PAGES = PAGES_PER_CHUNK / 4; // a patched chunk has at most 4 pages
export const FILE_CHUNKS = 32;
/** Chunks 0..11 hold data; the rest of the file is a hole (the last chunk ends 100 bytes short of a page). */
export const DATA_CHUNKS = 12;
export const FILE_SIZE = FILE_CHUNKS * CHUNK - 100;

/** Writes snapshots of `dir/memory` one after another, each against the previous, keeping a local copy of the last
 * one's files as the agent does; restores each and checks its bytes. */
export class Suspender {
  readonly s: Scratch;
  readonly blob: BlobStore;
  readonly patches: boolean;
  last: WriteSnapshotResult | undefined;
  keys: string[] = [];

  constructor(s: Scratch, blob: BlobStore, patches = true) {
    this.s = s;
    this.blob = blob;
    this.patches = patches;
  }

  get memory(): string {
    return join(this.s.src, 'memory');
  }

  get kept(): string {
    return join(this.s.root, this.patches ? 'kept' : 'kept-whole');
  }

  async suspend(): Promise<WriteSnapshotResult> {
    const key = `snapshots/web/${String(this.keys.length).padStart(3, '0')}.json`;
    const result = await writeSnapshot({
      blob: this.blob,
      dir: this.s.src,
      files: ['memory'],
      key,
      meta: { ...META, parent: this.keys.at(-1) ?? null },
      chunkSize: CHUNK,
      deltaLevel: 0,
      patches: this.patches,
      ...(this.last ? { previous: this.last.manifest, previousDir: this.kept } : {}),
    });
    await rm(this.kept, { recursive: true, force: true });
    await cp(this.memory, join(this.kept, 'memory'));
    this.keys.push(key);
    this.last = result;
    await this.assertRestores(key);
    return result;
  }

  async assertRestores(key: string): Promise<void> {
    const out = join(this.s.root, `out-${this.keys.length}`);
    await restoreSnapshot({ blob: this.blob, key, dir: out });
    assert.ok((await readFile(join(out, 'memory'))).equals(await readFile(this.memory)), `${key} restores exactly`);
    await rm(out, { recursive: true, force: true });
  }
}

export async function memoryLike(path: string): Promise<void> {
  await writeSparse(path, FILE_SIZE, [
    { offset: 0, length: DATA_CHUNKS * CHUNK },
    { offset: (FILE_CHUNKS - 1) * CHUNK, length: CHUNK - 100 },
  ]);
}

/** Overwrites whole pages (file page indices) with fresh random bytes. */
export async function touchPages(path: string, pages: number[]): Promise<void> {
  for (const page of pages) await scribble(path, page * PAGE, Math.min(PAGE, FILE_SIZE - page * PAGE));
}

export const page = (chunk: number, inChunk: number) => chunk * PAGES_PER_CHUNK + inChunk;

/** The file's patched pages, decoded here independently of the writer's encoding. */
export function patchedPages(file: ManifestFile): number[] {
  if (!file.patch) return [];
  assert.equal(file.patch.pageSize, PAGE);
  const pages: number[] = [];
  for (let i = 0; i < file.patch.pages.length; i += 2) {
    for (let p = 0; p < file.patch.pages[i + 1]!; p++) pages.push(file.patch.pages[i]! + p);
  }
  return pages;
}

export const memoryOf = (result: WriteSnapshotResult) => result.manifest.files[0]!;
