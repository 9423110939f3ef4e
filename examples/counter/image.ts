// Builds the sample actor image: a static HTTP counter (counter.c) at /counter, with the directories the
// runtime mounts into (/run/torpor for the actor-id file) and /tmp. The layout is rebuilt only when the
// source changes: a marker in the output records the source hash and the image digest it produced.

import { execFile } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { existsSync } from 'node:fs';
import { mkdir, mkdtemp, readFile, rename, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import { writeOciLayout } from '../../src/image/pack.ts';

const SOURCE = fileURLToPath(new URL('./counter.c', import.meta.url));
const COMPILE_FLAGS = ['-O2', '-static'];
const MARKER = 'torpor-build.json';
const TAG = 'latest';

interface BuildMarker {
  sourceHash: string;
  digest: string;
}

export async function buildCounterImage(outDir: string): Promise<{ ref: string; digest: string }> {
  const source = await readFile(SOURCE);
  const sourceHash = createHash('sha256')
    .update(source)
    .update(COMPILE_FLAGS.join(' '))
    .update(existsSync(BUSYBOX) ? 'busybox' : '')
    .digest('hex');
  const built = await readMarker(outDir);
  if (built?.sourceHash === sourceHash) return { ref: `${outDir}:${TAG}`, digest: built.digest };
  const digest = await buildFresh(outDir, sourceHash);
  return { ref: `${outDir}:${TAG}`, digest };
}

/** Builds into a sibling staging dir and renames it into place, so a reader never sees half a layout. */
async function buildFresh(outDir: string, sourceHash: string): Promise<string> {
  await mkdir(dirname(outDir), { recursive: true });
  const staging = `${outDir}.staging-${process.pid}-${randomBytes(4).toString('hex')}`;
  const work = await mkdtemp(join(tmpdir(), 'torpor-counter-'));
  try {
    const binary = await compile(work);
    const { digest } = await writeOciLayout(staging, counterImageSpec(binary));
    await writeFile(join(staging, MARKER), JSON.stringify({ sourceHash, digest } satisfies BuildMarker));
    await replaceDir(staging, outDir);
    return digest;
  } finally {
    await rm(work, { recursive: true, force: true });
    await rm(staging, { recursive: true, force: true });
  }
}

async function compile(workDir: string): Promise<string> {
  const output = join(workDir, 'counter');
  // Compiling from the source's own directory with a relative name keeps the binary reproducible.
  await promisify(execFile)('cc', [...COMPILE_FLAGS, '-o', output, 'counter.c'], { cwd: dirname(SOURCE) });
  return output;
}

/** A static busybox (Debian's busybox-static) gives the sample a shell for `torpor actor exec`. */
const BUSYBOX = '/bin/busybox';

function counterImageSpec(binary: string) {
  const busybox = existsSync(BUSYBOX)
    ? [
        { path: 'bin/', type: 'dir' as const },
        { path: 'bin/busybox', type: 'file' as const, sourcePath: BUSYBOX, mode: 0o755 },
      ]
    : [];
  return {
    layers: [
      [
        { path: 'counter', type: 'file' as const, sourcePath: binary, mode: 0o755 },
        ...busybox,
        { path: 'run/', type: 'dir' as const },
        { path: 'run/torpor/', type: 'dir' as const },
        { path: 'tmp/', type: 'dir' as const, mode: 0o1777 },
      ],
    ],
    config: {
      entrypoint: ['/counter', '8080'],
      env: ['PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin'],
      workingDir: '/',
    },
    tag: TAG,
  };
}

/** Moves a stale layout aside before renaming the new one in; if another process won the race, keep theirs. */
async function replaceDir(staging: string, outDir: string): Promise<void> {
  const old = `${outDir}.old-${process.pid}-${randomBytes(4).toString('hex')}`;
  await rename(outDir, old).catch(() => {});
  try {
    await rename(staging, outDir);
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    if (code !== 'ENOTEMPTY' && code !== 'EEXIST') throw err;
  } finally {
    await rm(old, { recursive: true, force: true });
  }
}

async function readMarker(outDir: string): Promise<BuildMarker | undefined> {
  const text = await readFile(join(outDir, MARKER), 'utf8').catch(() => undefined);
  if (text === undefined) return undefined;
  try {
    return JSON.parse(text) as BuildMarker;
  } catch {
    return undefined;
  }
}
