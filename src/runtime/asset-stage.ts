// Staging an asset set: every asset is fetched (verified against its sha256), copied to a shared location under a
// content-addressed name, `<name>-<sha256>`, and the set is returned with the staged URLs, ready to paste into a
// pool. Destinations: file://DIR. s3://bucket/prefix needs the S3 blob store, which is not here yet.

import { randomBytes } from 'node:crypto';
import { copyFile, mkdir, rename, rm, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { TorporError } from '../core/errors.ts';
import type { AssetSet } from '../core/schemas.ts';
import { type FetchAssetsOptions, fetchAssets, pinnedAssets } from './asset-set.ts';
import type { AssetStore } from './assets.ts';

export interface StageOptions extends FetchAssetsOptions {
  /** Where sources are fetched to (and verified) before they are copied. */
  store: AssetStore;
}

/** Copies every asset of `set` to `to` and returns the set as it is staged there (without `auth`: the staged
 * copies are read with the destination's access, not the source's). */
export async function stageAssetSet(set: AssetSet, to: string, options: StageOptions): Promise<AssetSet> {
  const dir = destinationDir(to);
  const local = await fetchAssets(options.store, pinnedAssets(set), options);
  await mkdir(dir, { recursive: true });
  const staged: AssetSet['assets'] = {};
  for (const [name, asset] of Object.entries(set.assets)) {
    const file = join(dir, `${name}-${asset.sha256}`);
    await copyOnce(local[name]!, file);
    staged[name] = { url: pathToFileURL(file).href, sha256: asset.sha256 };
  }
  return { runtime: set.runtime, arch: set.arch, assets: staged };
}

/** The directory a `--to` URL names (checked before anything is built or fetched). */
export function destinationDir(to: string): string {
  let url: URL;
  try {
    url = new URL(to);
  } catch {
    throw new TorporError('INVALID_ARGUMENT', '--to must be a file:// or s3:// URL', { field: 'to' });
  }
  if (url.protocol === 'file:') return fileURLToPath(url);
  if (url.protocol === 's3:') {
    throw new TorporError('NOT_SUPPORTED', 'staging to s3:// is not supported yet (it needs the S3 blob store)', {
      field: 'to',
    });
  }
  throw new TorporError('INVALID_ARGUMENT', `--to must be a file:// or s3:// URL, not ${url.protocol}`, {
    field: 'to',
  });
}

/** A content-addressed name already present with the right size is the same content: it is not copied again.
 * Otherwise the copy appears whole or not at all. */
async function copyOnce(source: string, target: string): Promise<void> {
  const [have, want] = await Promise.all([stat(target).catch(() => undefined), stat(source)]);
  if (have?.isFile() && have.size === want.size) return;
  const temp = `${target}.tmp-${process.pid}-${randomBytes(4).toString('hex')}`;
  try {
    await copyFile(source, temp);
    await rename(temp, target);
  } catch (err) {
    await rm(temp, { force: true });
    throw err;
  }
}
