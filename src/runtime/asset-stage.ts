// Staging an asset set: every asset is fetched (verified against its sha256), copied to a shared location under a
// content-addressed name, `<name>-<sha256>`, and the set is returned with the staged URLs, ready to paste into a
// pool. Destinations: file://DIR, and s3://bucket/prefix[?endpoint=URL&region=R&pathStyle=true] (written with the
// credentials of the environment, as every s3:// blob store; nodes read with the secret `secretRef` names).

import { randomBytes } from 'node:crypto';
import { createReadStream } from 'node:fs';
import { copyFile, mkdir, rename, rm, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { openBlobStore } from '../blob/open.ts';
import { TorporError } from '../core/errors.ts';
import { type AssetAuthRef, type AssetSet, assetAuth, parse } from '../core/schemas.ts';
import { type FetchAssetsOptions, fetchAssets, pinnedAssets } from './asset-set.ts';
import type { AssetStore } from './assets.ts';

export interface StageOptions extends FetchAssetsOptions {
  /** Where sources are fetched to (and verified) before they are copied. */
  store: AssetStore;
  /** s3:// only: where nodes find the credentials to read the staged copies (`env:NAME` or `file:/path`). */
  secretRef?: string;
  /** s3:// only: the environment the upload's credentials come from (default: this process's). */
  env?: NodeJS.ProcessEnv;
}

export type Destination = { kind: 'file'; dir: string } | { kind: 's3'; url: URL; auth?: AssetAuthRef };

/** Copies every asset of `set` to `to` and returns the set as it is staged there. The source's `auth` is not
 * carried over: the staged copies are read with the destination's access. */
export async function stageAssetSet(set: AssetSet, to: string, options: StageOptions): Promise<AssetSet> {
  const destination = parseDestination(to, options.secretRef);
  const local = await fetchAssets(options.store, pinnedAssets(set), options);
  const staged: AssetSet['assets'] = {};
  if (destination.kind === 'file') {
    await mkdir(destination.dir, { recursive: true });
    for (const [name, asset] of Object.entries(set.assets)) {
      const file = join(destination.dir, `${name}-${asset.sha256}`);
      await copyOnce(local[name]!, file);
      staged[name] = { url: pathToFileURL(file).href, sha256: asset.sha256 };
    }
    return { runtime: set.runtime, arch: set.arch, assets: staged };
  }
  const { url, auth } = destination;
  const blob = openBlobStore(to, options.env);
  const prefix = decodeURIComponent(url.pathname).replace(/^\/+|\/+$/g, '');
  try {
    for (const [name, asset] of Object.entries(set.assets)) {
      const key = `${name}-${asset.sha256}`;
      // Content-addressed: an object already under this key holds these bytes.
      if (!(await blob.has(key))) await blob.put(key, createReadStream(local[name]!));
      staged[name] = { url: `s3://${url.hostname}/${prefix ? `${prefix}/` : ''}${key}`, sha256: asset.sha256 };
    }
  } finally {
    (blob as { close?: () => void }).close?.();
  }
  return { runtime: set.runtime, arch: set.arch, assets: staged, ...(auth ? { auth } : {}) };
}

/** Where `--to` points (checked before anything is built or fetched). */
export function parseDestination(to: string, secretRef?: string): Destination {
  let url: URL;
  try {
    url = new URL(to);
  } catch {
    throw new TorporError('INVALID_ARGUMENT', '--to must be a file:// or s3:// URL', { field: 'to' });
  }
  if (url.protocol === 'file:') return { kind: 'file', dir: fileURLToPath(url) };
  if (url.protocol !== 's3:') {
    throw new TorporError('INVALID_ARGUMENT', `--to must be a file:// or s3:// URL, not ${url.protocol}`, {
      field: 'to',
    });
  }
  const endpoint = url.searchParams.get('endpoint');
  const region = url.searchParams.get('region');
  const pathStyle = url.searchParams.get('pathStyle');
  const connection = {
    ...(endpoint ? { endpoint } : {}),
    ...(region ? { region } : {}),
    ...(pathStyle === 'true' || pathStyle === 'false' ? { pathStyle: pathStyle === 'true' } : {}),
  };
  if (!secretRef) {
    if (Object.keys(connection).length > 0) {
      throw new TorporError(
        'INVALID_ARGUMENT',
        'an S3 service of its own (endpoint, region, pathStyle) needs --secret-ref: where nodes find the keys to read it',
        { field: 'secret-ref' },
      );
    }
    // AWS S3 with the nodes' default credential chain (environment, instance or pod role).
    return { kind: 's3', url };
  }
  return { kind: 's3', url, auth: parse(assetAuth, { type: 's3', secretRef, ...connection }, 'secret-ref') };
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
