// bench/lifecycle: Torpor's suspend and resume (through the REST API, as a user drives them) next to a bare
// `runsc checkpoint` / `runsc restore` of the same image with the same runsc, in the same run.
// Prints one JSON document: medians and p95 in ms, ratios (ours / bare), and snapshot bytes.
// Usage: node bench/lifecycle.ts [--cycles N]     (root; runsc from scripts/setup.sh or TORPOR_RUNSC)
import { mkdtemp, readFile, rm, stat } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { pino } from 'pino';
import { buildCounterImage } from '../examples/counter/image.ts';
import { up } from '../src/cli/up.ts';
import type { SnapshotManifest } from '../src/core/types.ts';
import { locateRunsc } from '../src/engine/local.ts';
import { ImageStore } from '../src/image/store.ts';
import { referencedKeys } from '../src/snapshot/index.ts';
import { api } from './lib/api.ts';
import { bare, round, summary } from './lib/bare.ts';

const { values } = parseArgs({
  options: { cycles: { type: 'string', default: '20' }, 'delta-level': { type: 'string' } },
});
const cycles = Number(values.cycles);
const deltaLevel = values['delta-level'] === undefined ? undefined : Number(values['delta-level']);
const log = pino({ level: 'warn' });

interface Actor {
  address?: string;
  snapshot?: string;
  lastOperation?: { phases: Record<string, number>; snapshot?: { rawBytes: number; storedBytes: number } };
}

/** Median of every phase across operations: where the time goes. */
function phaseMedians(ops: Record<string, number>[]): Record<string, number> {
  const names = new Set(ops.flatMap((o) => Object.keys(o)));
  return Object.fromEntries([...names].map((n) => [n, round(summary(ops.map((o) => o[n] ?? 0)).p50)]));
}

async function torpor(ref: string, work: string) {
  const dataDir = join(work, 'torpor');
  const t = await up({
    dataDir,
    host: '127.0.0.1',
    port: 0,
    workers: 2,
    networkBase: 240,
    log,
    ...(deltaLevel !== undefined ? { deltaLevel } : {}),
  });
  const suspend: number[] = [];
  const resume: number[] = [];
  const suspendPhases: Record<string, number>[] = [];
  const resumePhases: Record<string, number>[] = [];
  const actorPath = '/v1/spaces/bench/actors/counter';
  try {
    await api(t.url, 'POST', '/v1/templates', {
      name: 'bench-counter',
      image: ref,
      port: 8080,
      readiness: { path: '/healthz' },
      // Keep every snapshot: the byte figures read the first two back after the run (GC would take them).
      snapshot: { retain: 100 },
    });
    await api(t.url, 'POST', '/v1/spaces/bench/actors', { name: 'counter', template: 'bench-counter' });
    let actor = await api<Actor>(t.url, 'POST', `${actorPath}/resume`, {});
    let expected = 1;
    const bytes: { rawBytes: number; storedBytes: number }[] = [];
    const snapshots: string[] = [];
    for (let i = 0; i < cycles; i++) {
      // Traffic before every suspend but the second: that one snapshots an unchanged actor (dedup measure).
      if (i !== 1) {
        const got = Number(await (await fetch(`http://${actor.address}/`)).text());
        if (got !== expected) throw new Error(`counter returned ${got}, expected ${expected}: memory was lost`);
        expected++;
      }
      let t0 = performance.now();
      actor = await api<Actor>(t.url, 'POST', `${actorPath}/suspend`, {});
      suspend.push(performance.now() - t0);
      suspendPhases.push(actor.lastOperation?.phases ?? {});
      if (actor.lastOperation?.snapshot) bytes.push(actor.lastOperation.snapshot);
      snapshots.push(actor.snapshot!);
      await waitForFreeWorker(t.url);
      t0 = performance.now();
      actor = await api<Actor>(t.url, 'POST', `${actorPath}/resume`, {});
      resume.push(performance.now() - t0);
      resumePhases.push(actor.lastOperation?.phases ?? {});
    }
    const golden = (await api<{ goldenSnapshot: string }>(t.url, 'GET', '/v1/templates/bench-counter')).goldenSnapshot;
    await t.stop(); // waits for background delta compaction
    const blobs = join(dataDir, 'blobs');
    return {
      fullStored: await storedSize(blobs, golden),
      // What the unchanged actor's snapshot added to the store, once compacted: objects no earlier snapshot has.
      secondCompacted: await addedSize(blobs, snapshots[1]!, [golden, snapshots[0]!]),
      suspend: summary(suspend),
      resume: summary(resume),
      suspendPhases: phaseMedians(suspendPhases),
      resumePhases: phaseMedians(resumePhases),
      first: bytes[0]!,
      second: bytes[1]!,
    };
  } finally {
    await t.stop();
  }
}

/** Bytes a snapshot occupies on its own: every object it references (the golden snapshot is a full one). */
async function storedSize(blobDir: string, manifestKey: string): Promise<number> {
  const manifest = JSON.parse(await readFile(join(blobDir, manifestKey), 'utf8')) as SnapshotManifest;
  let bytes = 0;
  for (const key of referencedKeys(manifest)) bytes += (await stat(join(blobDir, key))).size;
  return bytes;
}

async function addedSize(blobDir: string, manifestKey: string, earlier: string[]): Promise<number> {
  const read = async (key: string) =>
    referencedKeys(JSON.parse(await readFile(join(blobDir, key), 'utf8')) as SnapshotManifest);
  const seen = new Set<string>();
  for (const key of earlier) for (const k of await read(key)) seen.add(k);
  let bytes = 0;
  for (const key of await read(manifestKey)) if (!seen.has(key)) bytes += (await stat(join(blobDir, key))).size;
  return bytes;
}

/** A suspended actor's old worker frees itself after teardown; the benchmark times resume, not capacity. */
async function waitForFreeWorker(base: string): Promise<void> {
  for (let i = 0; i < 500; i++) {
    const workers = await api<{ items: { state: string }[] }>(base, 'GET', '/v1/workers');
    if (workers.items.filter((w) => w.state === 'free').length >= 2) return;
    await new Promise((r) => setTimeout(r, 20));
  }
}

const work = await mkdtemp(join(tmpdir(), 'torpor-bench-'));
try {
  const { ref } = await buildCounterImage(join(work, 'image'));
  const images = new ImageStore(join(work, 'images'));
  const resolved = await images.resolve(ref);
  const runscPath = locateRunsc();
  const b = await bare(runscPath, resolved.rootfs, resolved.config, work, cycles, log);
  const o = await torpor(ref, work);
  console.log(
    JSON.stringify(
      {
        benchmark: 'lifecycle',
        cycles,
        runsc: runscPath,
        bare: { checkpoint_ms: b.checkpoint, restore_to_ready_ms: b.restore, checkpoint_bytes: b.rawBytes },
        torpor: {
          suspend_ms: o.suspend,
          resume_ms: o.resume,
          suspend_phase_p50_ms: o.suspendPhases,
          resume_phase_p50_ms: o.resumePhases,
        },
        ratios: {
          resume_p50: round(o.resume.p50 / b.restore.p50),
          resume_p95: round(o.resume.p95 / b.restore.p95),
          suspend_p50: round(o.suspend.p50 / b.checkpoint.p50),
          suspend_p95: round(o.suspend.p95 / b.checkpoint.p95),
        },
        bytes: {
          raw_checkpoint: o.first.rawBytes,
          full_snapshot_stored: o.fullStored,
          full_stored_over_raw: round(o.fullStored / o.first.rawBytes),
          first_actor_snapshot_stored: o.first.storedBytes,
          second_unchanged_stored_at_suspend: o.second.storedBytes,
          second_unchanged_stored_compacted: o.secondCompacted,
          second_over_full_at_suspend: round(o.second.storedBytes / o.fullStored),
          second_over_full: round(o.secondCompacted / o.fullStored),
        },
        delta_level: deltaLevel ?? 'default',
        targets: { resume_ratio: 1.25, suspend_ratio: 1.25, second_over_full: 0.1 },
      },
      null,
      2,
    ),
  );
} finally {
  await rm(work, { recursive: true, force: true });
}
