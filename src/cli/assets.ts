// `torpor assets build gvisor|microvm` assembles a runtime asset set from Debian packages (scripts/runsc-asset.sh,
// scripts/microvm-assets.sh: both cache what they build, so a second build is a few stats) and prints each asset's
// name, sha256 and path; `torpor assets stage` copies a set to shared storage and prints the asset-set YAML to
// paste into a pool (`torpor up --assets FILE`).

import { writeFile } from 'node:fs/promises';
import { join, resolve } from 'node:path';
import { pathToFileURL } from 'node:url';
import { stringify } from 'yaml';
import { TorporError } from '../core/errors.ts';
import type { AssetSet, RuntimeClass } from '../core/schemas.ts';
import { hostArch, loadAssetSets, parseAssetSets } from '../runtime/asset-set.ts';
import { parseDestination, stageAssetSet } from '../runtime/asset-stage.ts';
import { AssetStore } from '../runtime/assets.ts';
import { run } from '../sys/run.ts';
import { Progress } from './progress.ts';

const SCRIPTS = resolve(import.meta.dirname, '../../scripts');
const CACHE = process.env.TORPOR_CACHE ?? '/var/cache/torpor';

export interface BuiltAsset {
  name: string;
  sha256: string;
  path: string;
}

export interface BuiltSet {
  set: AssetSet;
  assets: BuiltAsset[];
  /** The set as a file (file:// URLs), for `torpor up --assets` or `torpor assets stage`. */
  file: string;
}

/** Where `assets build` puts a class's assets: for gVisor the directory scripts/setup.sh fills. */
export function defaultAssetDir(runtime: RuntimeClass): string {
  return runtime === 'gvisor' ? join(CACHE, 'assets') : join(CACHE, 'assets', 'microvm');
}

export function runtimeOf(value: string): RuntimeClass {
  if (value === 'gvisor' || value === 'microvm') return value;
  throw new TorporError('INVALID_ARGUMENT', `unknown runtime class "${value}": use gvisor or microvm`, {
    field: 'runtime',
  });
}

export async function buildAssets(runtime: RuntimeClass, outDir = defaultAssetDir(runtime)): Promise<BuiltSet> {
  const out = resolve(outDir);
  const script = join(SCRIPTS, runtime === 'gvisor' ? 'runsc-asset.sh' : 'microvm-assets.sh');
  // The scripts' own messages (downloads, versions) go straight to the user's stderr.
  const result = await run('bash', [script, out], { stdio: ['ignore', 'pipe', 2], timeoutMs: 30 * 60_000 });
  const lines = result.stdout.trim().split('\n').filter(Boolean);
  const assets: BuiltAsset[] =
    runtime === 'gvisor'
      ? [{ name: 'runsc', sha256: lines.at(-1) ?? '', path: join(out, `runsc-${lines.at(-1)}`) }]
      : lines.map((line) => {
          const [name = '', sha256 = '', path = ''] = line.split(' ');
          return { name, sha256, path };
        });
  const set = parseAssetSets(
    stringify({
      runtime,
      arch: hostArch(),
      assets: Object.fromEntries(assets.map((a) => [a.name, { url: pathToFileURL(a.path).href, sha256: a.sha256 }])),
    }),
    `the output of ${script}`,
  )[0]!;
  const file = join(out, `${runtime}-${set.arch}.assets.yaml`);
  await writeFile(file, stringify(set));
  return { set, assets, file };
}

/** `what` is a runtime class (its built set, built now when needed: cached, that is a few stats) or a set file. */
export async function stageAssets(what: string, to: string, cacheDir: string, secretRef?: string): Promise<AssetSet> {
  parseDestination(to, secretRef);
  const set =
    what === 'gvisor' || what === 'microvm' ? (await buildAssets(what)).set : onlySet(await loadAssetSets(what), what);
  const progress = new Progress(`staging ${set.runtime} assets`);
  try {
    return await stageAssetSet(set, to, {
      store: new AssetStore(cacheDir),
      ...(secretRef ? { secretRef } : {}),
      onProgress: (name, p) => progress.update(name, p.bytesDone, p.bytesTotal),
    });
  } finally {
    progress.finish();
  }
}

function onlySet(sets: AssetSet[], file: string): AssetSet {
  if (sets.length !== 1) {
    throw new TorporError('INVALID_ARGUMENT', `${file} holds ${sets.length} asset sets; stage them one at a time`, {
      field: 'file',
    });
  }
  return sets[0]!;
}
