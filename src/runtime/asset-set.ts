// Asset sets: which runtime binaries an activation runs with, and getting them onto this node.
//
// A pool declares one set per runtime class and architecture (its default), a template may override the set for
// its boots, and every snapshot manifest pins the set it was made with: a restore fetches those, never the pool's
// current ones, so upgrading a pool's assets never breaks restoring an older snapshot.
//
// Credentials are referenced by name (`env:NAME` or `file:/path`) and read here, only when an asset is fetched
// and not in the cache (bearer token, basic "user:password", or S3 keys with the service's endpoint). Only the
// reference is ever stored, printed or written into a manifest.

import { readFile } from 'node:fs/promises';
import { arch } from 'node:process';
import { parse as parseYaml } from 'yaml';
import { TorporError } from '../core/errors.ts';
import {
  type AssetArch,
  type AssetAuthRef,
  type AssetSet,
  assetNameIssues,
  assetSet,
  assetSetList,
  parse,
  type RuntimeClass,
} from '../core/schemas.ts';
import type { Asset } from '../core/types.ts';
import type { AssetAuth, AssetFetchOptions, AssetProgress, AssetStore } from './assets.ts';

/** This node's architecture, as asset sets name it. */
export function hostArch(): AssetArch {
  return arch === 'arm64' ? 'arm64' : 'amd64';
}

/** Parses an asset-set file (YAML or JSON: one set or a list of sets); `source` names it in errors. */
export function parseAssetSets(text: string, source: string): AssetSet[] {
  let doc: unknown;
  try {
    doc = parseYaml(text);
  } catch (err) {
    throw new TorporError('INVALID_ARGUMENT', `${source}: ${(err as Error).message}`, { field: 'assets' });
  }
  const list = Array.isArray(doc) ? parse(assetSetList, doc, 'assets') : [parse(assetSet, doc, 'assets')];
  const seen = new Set<string>();
  for (const set of list) {
    const key = `${set.runtime}/${set.arch}`;
    if (seen.has(key)) {
      throw new TorporError('INVALID_ARGUMENT', `${source}: more than one asset set for ${key}`, { field: 'assets' });
    }
    seen.add(key);
  }
  return list;
}

export async function loadAssetSets(file: string): Promise<AssetSet[]> {
  let text: string;
  try {
    text = await readFile(file, 'utf8');
  } catch (err) {
    throw new TorporError(
      'INVALID_ARGUMENT',
      `cannot read the asset-set file ${file}: ${(err as NodeJS.ErrnoException).code ?? 'error'}`,
      { field: 'assets' },
    );
  }
  return parseAssetSets(text, file);
}

/** The set of `sets` for this runtime class on this node's architecture. */
export function selectAssetSet(sets: AssetSet[], runtime: RuntimeClass, onArch = hostArch()): AssetSet | undefined {
  return sets.find((s) => s.runtime === runtime && s.arch === onArch);
}

/** A set as it is pinned: each asset carries the set's auth reference (a name, not a secret). */
export function pinnedAssets(set: Pick<AssetSet, 'assets' | 'auth'>): Record<string, Asset> {
  const out: Record<string, Asset> = {};
  for (const [name, a] of Object.entries(set.assets)) {
    const auth = a.auth ?? set.auth;
    out[name] = { url: a.url, sha256: a.sha256, ...(auth ? { auth } : {}) };
  }
  return out;
}

/** Fails unless `assets` are exactly what `runtime` runs with (say, a manifest that pins no runsc). */
export function checkAssetNames(runtime: RuntimeClass, assets: Record<string, Asset>, what: string): void {
  const issue = assetNameIssues(runtime, Object.keys(assets))[0];
  if (issue) {
    throw new TorporError('FAILED_PRECONDITION', `${what}: ${issue[1]}`, {
      field: issue[0] ? `assets.${issue[0]}` : 'assets',
    });
  }
}

/** Reads a secret by reference. The value never appears in an error: only the reference does. */
export async function readSecret(ref: string, field: string): Promise<string> {
  if (ref.startsWith('env:')) {
    const value = process.env[ref.slice(4)];
    if (!value) throw new TorporError('FAILED_PRECONDITION', `secret ${ref} is not set`, { field });
    return value;
  }
  if (ref.startsWith('file:/')) {
    let value: string;
    try {
      value = await readFile(ref.slice(5), 'utf8');
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code ?? 'error';
      throw new TorporError('FAILED_PRECONDITION', `cannot read secret ${ref}: ${code}`, { field });
    }
    // A file written with `echo` ends with a newline that is not part of the secret.
    value = value.replace(/\r?\n$/, '');
    if (!value) throw new TorporError('FAILED_PRECONDITION', `secret ${ref} is empty`, { field });
    return value;
  }
  throw new TorporError('INVALID_ARGUMENT', 'a secret reference must be env:NAME or file:/absolute/path', { field });
}

/** The credential an auth reference names, read now. */
export async function resolveAuth(name: string, ref: AssetAuthRef): Promise<AssetAuth> {
  const field = `assets.${name}.auth.secretRef`;
  const secret = await readSecret(ref.secretRef, field);
  switch (ref.type) {
    case 'bearer':
      return { bearer: secret };
    case 'basic': {
      const colon = secret.indexOf(':');
      if (colon <= 0) {
        throw new TorporError('FAILED_PRECONDITION', `secret ${ref.secretRef} must hold "username:password"`, {
          field,
        });
      }
      return { username: secret.slice(0, colon), password: secret.slice(colon + 1) };
    }
    case 's3': {
      const [accessKeyId, secretAccessKey, sessionToken, ...rest] = secret.split(':');
      if (!accessKeyId || !secretAccessKey || rest.length > 0) {
        throw new TorporError(
          'FAILED_PRECONDITION',
          `secret ${ref.secretRef} must hold "accessKeyId:secretAccessKey[:sessionToken]"`,
          { field },
        );
      }
      return {
        s3: {
          accessKeyId,
          secretAccessKey,
          ...(sessionToken ? { sessionToken } : {}),
          ...(ref.endpoint ? { endpoint: ref.endpoint } : {}),
          ...(ref.region ? { region: ref.region } : {}),
          ...(ref.pathStyle !== undefined ? { forcePathStyle: ref.pathStyle } : {}),
        },
      };
    }
  }
}

export interface FetchAssetsOptions {
  /** Bytes of one asset's download (only called for assets that are not in the cache). */
  onProgress?: (name: string, progress: AssetProgress) => void;
}

/** Puts every asset of a pinned set in the node's cache (a hit is a stat) and returns their local paths by name.
 * Secrets are read only for assets that must be downloaded. */
export async function fetchAssets(
  store: AssetStore,
  assets: Record<string, Asset>,
  options: FetchAssetsOptions = {},
): Promise<Record<string, string>> {
  const entries = await Promise.all(
    Object.entries(assets).map(async ([name, asset]) => {
      const ref = { url: asset.url, sha256: asset.sha256 };
      const onProgress = options.onProgress;
      const fetchOptions: AssetFetchOptions = {
        ...(onProgress ? { onProgress: (p: AssetProgress) => onProgress(name, p) } : {}),
      };
      const cached = await store.cached(ref.sha256);
      if (!cached && asset.auth) fetchOptions.auth = await resolveAuth(name, asset.auth);
      return [name, cached ?? (await store.fetch(name, ref, fetchOptions))] as const;
    }),
  );
  return Object.fromEntries(entries);
}
