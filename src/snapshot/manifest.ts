// Snapshot format v1. A snapshot is a JSON manifest plus content-addressed chunks under `chunks/<sha256>` (and, for
// some files, a delta under `deltas/` or a page patch under `patches/`: see delta.ts and patch.ts).
// The manifest is the commit marker: it is written last, so a manifest that exists names only chunks that do.
// A manifest read back from storage is untrusted input: it is parsed here, and only here.
import { randomBytes } from 'node:crypto';
import { z } from 'zod';
import type { BlobStore } from '../blob/blob.ts';
import { unsafePathReason } from '../blob/keys.ts';
import { TorporError } from '../core/errors.ts';
import { assetAuth, runtimeClass } from '../core/schemas.ts';
import type { SnapshotManifest } from '../core/types.ts';
import { patchIssue } from './patch.ts';

export const CHUNK_PREFIX = 'chunks/';
export const DELTA_PREFIX = 'deltas/';
export const DEFAULT_MANIFEST_PREFIX = 'snapshots/';

const sha256Hex = z.string().regex(/^[0-9a-f]{64}$/, 'must be a lower-case hex sha256');

/** File names are joined onto the restore directory, so one that could escape it is rejected. */
const relativeFileName = z.string().superRefine((name, ctx) => {
  const reason = unsafePathReason(name);
  if (reason !== undefined) ctx.addIssue({ code: 'custom', message: `file name ${reason}` });
});

const chunkedContent = z.object({ size: z.number().int().min(0), chunks: z.array(sha256Hex.nullable()) }).strict();

const manifestFile = z
  .object({
    name: relativeFileName,
    size: z.number().int().min(0),
    chunks: z.array(sha256Hex.nullable()),
    delta: z
      .object({
        object: z.string().regex(/^deltas\/[0-9a-f]{64}$/, 'must be a deltas/<sha256> key'),
        sha256: sha256Hex,
        base: chunkedContent,
      })
      .strict()
      .optional(),
    patch: z
      .object({
        object: z.string().regex(/^patches\/[0-9a-f]{64}$/, 'must be a patches/<sha256> key'),
        pageSize: z.number().int().positive(),
        pages: z.array(z.number().int().min(0)).min(2),
      })
      .strict()
      .optional(),
  })
  .strict();

export const snapshotManifestSchema = z
  .object({
    version: z.literal(1),
    runtime: runtimeClass,
    template: z.string().min(1),
    assets: z.record(z.string(), z.object({ url: z.string(), sha256: sha256Hex, auth: assetAuth.optional() }).strict()),
    chunkSize: z.number().int().positive(),
    files: z.array(manifestFile),
    createdAt: z.string().min(1),
    parent: z.string().nullable(),
  })
  .strict()
  .superRefine((manifest, ctx) => {
    const seen = new Set<string>();
    manifest.files.forEach((file, index) => {
      const expected = file.delta ? 0 : Math.ceil(file.size / manifest.chunkSize);
      const baseExpected = file.delta ? Math.ceil(file.delta.base.size / manifest.chunkSize) : 0;
      if (file.delta && file.delta.base.chunks.length !== baseExpected) {
        ctx.addIssue({
          code: 'custom',
          path: ['files', index, 'delta', 'base', 'chunks'],
          message: `delta base of ${file.delta.base.size} bytes needs ${baseExpected} chunks`,
        });
      }
      if (file.chunks.length !== expected) {
        ctx.addIssue({
          code: 'custom',
          path: ['files', index, 'chunks'],
          message: `file "${file.name}" of ${file.size} bytes needs ${expected} chunks, manifest lists ${file.chunks.length}`,
        });
      }
      const patchProblem = file.chunks.length === expected ? patchIssue(file, manifest.chunkSize) : undefined;
      if (patchProblem !== undefined) {
        ctx.addIssue({
          code: 'custom',
          path: ['files', index, 'patch'],
          message: `file "${file.name}": ${patchProblem}`,
        });
      }
      if (seen.has(file.name)) {
        ctx.addIssue({ code: 'custom', path: ['files', index, 'name'], message: `duplicate file "${file.name}"` });
      }
      seen.add(file.name);
    });
  });

export function chunkKey(hash: string): string {
  return CHUNK_PREFIX + hash;
}

/** Every blob key a manifest depends on besides itself: its chunks (a patched chunk's base among them), patch and
 * delta objects, and deltas' bases' chunks. */
export function referencedKeys(manifest: SnapshotManifest): Set<string> {
  const keys = new Set<string>();
  const addChunks = (chunks: (string | null)[]) => {
    for (const hash of chunks) if (hash !== null) keys.add(chunkKey(hash));
  };
  for (const file of manifest.files) {
    addChunks(file.chunks);
    if (file.patch) keys.add(file.patch.object);
    if (file.delta) {
      keys.add(file.delta.object);
      addChunks(file.delta.base.chunks);
    }
  }
  return keys;
}

/** `<prefix>/<id>.json`; the prefix is typically per actor, e.g. `snapshots/<space>/<actor>`. */
export function manifestKeyFor(prefix: string, id: string): string {
  if (id === '' || id.includes('/')) {
    throw new TorporError('INVALID_ARGUMENT', `snapshot id "${id}" must be non-empty and contain no "/"`, {
      field: 'id',
    });
  }
  const dir = prefix.replace(/\/+$/, '');
  return dir === '' ? `${id}.json` : `${dir}/${id}.json`;
}

/** A time-ordered id (`20261122T131700123Z-ab12cd`): ids, and so manifest keys, sort by creation time. */
export function newSnapshotId(now: Date = new Date()): string {
  const stamp = now.toISOString().replace(/[-:.]/g, '');
  return `${stamp}-${randomBytes(3).toString('hex')}`;
}

export function encodeManifest(manifest: SnapshotManifest): Uint8Array {
  return Buffer.from(`${JSON.stringify(manifest, null, 2)}\n`);
}

/** Parses manifest bytes; anything that is not a valid v1 manifest is SNAPSHOT_CORRUPT. */
export function decodeManifest(bytes: Uint8Array, key: string): SnapshotManifest {
  let json: unknown;
  try {
    json = JSON.parse(Buffer.from(bytes).toString('utf8'));
  } catch (err) {
    throw corruptManifest(key, 'is not valid JSON', err);
  }
  const result = snapshotManifestSchema.safeParse(json);
  if (!result.success) {
    const issue = result.error.issues[0]!;
    const where = issue.path.length > 0 ? ` at ${issue.path.join('.')}` : '';
    throw corruptManifest(key, `is not a valid v1 manifest${where}: ${issue.message}`, result.error);
  }
  return result.data;
}

/** Reads and validates a manifest. Missing: NOT_FOUND (field "key"). Unreadable: SNAPSHOT_CORRUPT. */
export async function readManifest(blob: BlobStore, key: string): Promise<SnapshotManifest> {
  return decodeManifest(await blob.getBytes(key), key);
}

function corruptManifest(key: string, problem: string, cause: unknown): TorporError {
  return new TorporError('SNAPSHOT_CORRUPT', `snapshot manifest "${key}" ${problem}`, { field: 'snapshot', cause });
}
