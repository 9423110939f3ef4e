// gVisor runtime: each activation is an OCI bundle run by runsc in the worker's network namespace.
// runsc is detected, not assumed: flags that older releases lack (-net-disconnect-ok, -overlay2, checkpoint
// -compression) are used only when `runsc flags` / `runsc help checkpoint` list them.
import { createHash } from 'node:crypto';
import { closeSync, createReadStream, existsSync, openSync } from 'node:fs';
import { mkdir, readdir, readFile, rm, writeFile } from 'node:fs/promises';
import { dirname, join } from 'node:path';
import { TorporError } from '../../core/errors.ts';
import { timed } from '../../core/trace.ts';
import type { Phases } from '../../core/types.ts';
import { processRunning } from '../../sys/process.ts';
import { type RunOptions, run } from '../../sys/run.ts';
import type {
  ActivationSpec,
  CheckpointResult,
  ExecResult,
  OutputListener,
  RestoreOptions,
  Sandbox,
  SandboxRuntime,
} from '../runtime.ts';
import { buildOciSpec } from './spec.ts';

export interface RunscFeatures {
  version: string;
  netDisconnectOk: boolean;
  overlay2: boolean;
  checkpointCompression: boolean;
}

export async function detectRunsc(path: string): Promise<RunscFeatures> {
  const version = (await run(path, ['--version'])).stdout.split('\n')[0]?.trim() ?? 'unknown';
  // `runsc flags` and `runsc help <cmd>` print to stderr on some releases and exit non-zero on others.
  const flags = await run(path, ['flags'], { okCodes: [0, 1, 2] });
  const checkpointHelp = await run(path, ['help', 'checkpoint'], { okCodes: [0, 1, 2] });
  const flagText = flags.stdout + flags.stderr;
  const cpText = checkpointHelp.stdout + checkpointHelp.stderr;
  return {
    version,
    netDisconnectOk: flagText.includes('-net-disconnect-ok'),
    overlay2: flagText.includes('-overlay2'),
    checkpointCompression: cpText.includes('-compression'),
  };
}

export async function sha256File(path: string): Promise<string> {
  const hash = createHash('sha256');
  for await (const chunk of createReadStream(path)) hash.update(chunk as Buffer);
  return hash.digest('hex');
}

export interface GvisorOptions {
  /** runsc --root: per worker, so `list` and leftovers are scoped to one slot. */
  stateRoot: string;
  /** Told once per runsc binary that lacks a feature Torpor relies on. */
  onWarning?: (message: string, fields: Record<string, unknown>) => void;
}

const featuresByBinary = new Map<string, Promise<RunscFeatures>>();

/** Features of a runsc binary, detected once per path (activation assets live at content-addressed paths; a
 * failure is not kept). Called ahead of the first activation too, so that one does not pay for it. */
export function prepareRunsc(path: string, onWarning: GvisorOptions['onWarning']): Promise<RunscFeatures> {
  let features = featuresByBinary.get(path);
  if (!features) {
    features = detectRunsc(path).then(
      (f) => {
        if (!f.netDisconnectOk) {
          onWarning?.('runsc lacks -net-disconnect-ok: actors that served TCP cannot be checkpointed', {
            runsc: path,
            version: f.version,
          });
        }
        return f;
      },
      (err: unknown) => {
        featuresByBinary.delete(path);
        const reason = err instanceof Error ? err.message : String(err);
        throw new TorporError('RUNTIME_ERROR', `the runsc asset ${path} does not run: ${reason}`, {
          field: 'assets.runsc',
          cause: err,
        });
      },
    );
    featuresByBinary.set(path, features);
  }
  return features;
}

/** The runsc binary of one activation, with what it can do. */
interface Runsc {
  path: string;
  features: RunscFeatures;
}

function killQuietly(pid: number): void {
  try {
    process.kill(pid, 'SIGKILL');
  } catch {
    // already gone
  }
}

async function waitGone(pid: number, timeoutMs: number): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while ((await processRunning(pid)) && Date.now() < deadline) await new Promise((r) => setTimeout(r, 10));
}

/** runsc runs with the binary each activation's asset set names (`spec.assets.runsc`): a restore uses the one
 * its snapshot was made with. Commands about a sandbox that is already there (checkpoint, exec, state, delete)
 * use the binary that started it; the last one used on this state root is remembered in `<stateRoot>.binary`, so
 * leftovers of an earlier process are cleaned with the binary that made them. */
export class GvisorRuntime implements SandboxRuntime {
  readonly name = 'gvisor' as const;
  private readonly opts: GvisorOptions;
  private current: Runsc | undefined;
  private loaded = false;

  constructor(opts: GvisorOptions) {
    this.opts = opts;
  }

  /** The runsc of an activation (detected once per binary). */
  private async binaryOf(spec: ActivationSpec): Promise<Runsc> {
    const path = spec.assets.runsc;
    if (!path) {
      throw new TorporError('FAILED_PRECONDITION', 'the activation has no runsc asset', { field: 'assets.runsc' });
    }
    return { path, features: await prepareRunsc(path, this.opts.onWarning) };
  }

  /** Makes `runsc` the binary of the commands that follow (state, delete, list), also for a later process. */
  private async use(runsc: Runsc): Promise<Runsc> {
    const path = runsc.path;
    if (this.current?.path !== path) {
      await mkdir(dirname(this.opts.stateRoot), { recursive: true });
      await writeFile(`${this.opts.stateRoot}.binary`, path);
    }
    this.current = runsc;
    this.loaded = true;
    return runsc;
  }

  /** The runsc that last ran on this state root (in this process or an earlier one), if it is still there. */
  private async last(): Promise<Runsc | undefined> {
    if (!this.loaded) {
      this.loaded = true;
      const path = (await readFile(`${this.opts.stateRoot}.binary`, 'utf8').catch(() => '')).trim();
      if (path && existsSync(path)) {
        this.current = await prepareRunsc(path, this.opts.onWarning).then(
          (features) => ({ path, features }),
          () => undefined,
        );
      }
    }
    return this.current;
  }

  private globalArgs(features: RunscFeatures): string[] {
    const args = ['--root', this.opts.stateRoot];
    // Without it any TCP connection the actor ever closed (TIME_WAIT) makes checkpoint fail.
    if (features.netDisconnectOk) args.push('--net-disconnect-ok');
    // The rootfs is a shared, cached unpack of the image: writes go to sandbox memory (and so into the
    // checkpoint), never into the cache.
    if (features.overlay2) args.push('--overlay2=root:memory');
    return args;
  }

  private runsc(runsc: Runsc, args: string[], opts: RunOptions = {}) {
    return run(runsc.path, [...this.globalArgs(runsc.features), ...args], { label: `runsc ${args[0]}`, ...opts });
  }

  private async prepareBundle(spec: ActivationSpec): Promise<string> {
    const bundle = join(spec.workDir, 'bundle');
    const identity = join(spec.workDir, 'identity');
    await mkdir(bundle, { recursive: true });
    await mkdir(identity, { recursive: true });
    // Written fresh at every run and restore: an env var would be frozen in the snapshot.
    await writeFile(join(identity, 'actor-id'), spec.actorId);
    await writeFile(join(bundle, 'config.json'), JSON.stringify(buildOciSpec(spec, identity)));
    await mkdir(this.opts.stateRoot, { recursive: true });
    return bundle;
  }

  /** Starts a detached runsc command whose sandbox writes stdout/stderr to the activation's log file. */
  private async startDetached(runsc: Runsc, args: string[], logFile: string): Promise<void> {
    // A detached sandbox inherits the caller's stdio: hand it a file, or pipes never close.
    const fd = openSync(logFile, 'a');
    try {
      await this.runsc(runsc, args, { stdio: ['ignore', fd, fd] });
    } catch (err) {
      const tail = (await readFile(logFile, 'utf8').catch(() => '')).trim().split('\n').slice(-3).join(' | ');
      throw new TorporError('RUNTIME_ERROR', `runsc ${args[0]} failed${tail ? `: ${tail}` : ''}`, { cause: err });
    } finally {
      closeSync(fd);
    }
  }

  /** Removes what is left of an earlier sandbox with this id, then switches to the activation's binary. */
  private async fresh(spec: ActivationSpec): Promise<Runsc> {
    const runsc = await this.binaryOf(spec);
    await this.destroyWith(spec.id, (await this.last()) ?? runsc);
    return this.use(runsc);
  }

  async run(spec: ActivationSpec): Promise<Sandbox> {
    const runsc = await this.fresh(spec);
    const bundle = await this.prepareBundle(spec);
    const logFile = spec.logFile;
    await this.startDetached(runsc, ['run', '--detach', '--bundle', bundle, spec.id], logFile);
    return { id: spec.id, spec, logFile };
  }

  async checkpoint(sandbox: Sandbox, dir: string): Promise<CheckpointResult> {
    const phases: Phases = {};
    await rm(dir, { recursive: true, force: true });
    await mkdir(dir, { recursive: true });
    // Our snapshot layer compresses and deduplicates chunks; runsc's own compression would defeat dedup.
    const runsc = await this.binaryOf(sandbox.spec);
    const compression = runsc.features.checkpointCompression ? ['--compression=none'] : [];
    await timed(phases, 'checkpoint', () =>
      this.runsc(runsc, ['checkpoint', ...compression, '--image-path', dir, sandbox.id], { timeoutMs: 120_000 }),
    );
    const files = (await readdir(dir, { withFileTypes: true })).filter((e) => e.isFile()).map((e) => e.name);
    return { files: files.sort(), phases };
  }

  async restore(
    spec: ActivationSpec,
    dir: string,
    _files: string[],
    opts: RestoreOptions = {},
  ): Promise<{ sandbox: Sandbox; phases: Phases }> {
    const phases: Phases = {};
    const { runsc, bundle } = await timed(phases, 'bundle', async () => {
      const runsc = await this.fresh(spec);
      return { runsc, bundle: await this.prepareBundle(spec) };
    });
    await opts.beforeRun;
    const logFile = spec.logFile;
    const args = ['restore', '--detach', '--image-path', dir, '--bundle', bundle, spec.id];
    await timed(phases, 'restore', () => this.startDetached(runsc, args, logFile));
    return { sandbox: { id: spec.id, spec, logFile }, phases };
  }

  async exec(sandbox: Sandbox, command: string[], timeoutMs: number, onOutput?: OutputListener): Promise<ExecResult> {
    const result = await this.runsc(await this.binaryOf(sandbox.spec), ['exec', sandbox.id, ...command], {
      timeoutMs,
      okCodes: Array.from({ length: 256 }, (_, i) => i),
      ...(onOutput ? { onOutput } : {}),
    });
    return { exitCode: result.code, stdout: result.stdout, stderr: result.stderr };
  }

  async alive(id: string): Promise<boolean> {
    const runsc = await this.last();
    if (!runsc || !(await this.knows(id))) return false;
    const state = await this.runsc(runsc, ['state', id], { okCodes: [0, 1, 128] });
    if (state.code !== 0) return false;
    const { status, pid } = JSON.parse(state.stdout) as { status?: string; pid?: number };
    return status === 'running' && pid !== undefined && (await processRunning(pid));
  }

  async destroy(id: string): Promise<void> {
    const runsc = await this.last();
    if (runsc) await this.destroyWith(id, runsc);
  }

  private async destroyWith(id: string, runsc: Runsc): Promise<void> {
    if (!(await this.knows(id))) return;
    // A stopped sandbox takes over a second to exit on its own (the kernel tears down its address space);
    // SIGKILL first so `delete` does not wait out its own grace period on top of that.
    const state = await this.runsc(runsc, ['state', id], { okCodes: [0, 1, 128] });
    const pid = state.code === 0 ? (JSON.parse(state.stdout) as { pid?: number }).pid : undefined;
    if (pid && pid > 0) killQuietly(pid);
    await this.runsc(runsc, ['delete', '--force', id], { okCodes: [0, 1, 128] });
    if (pid && pid > 0) await waitGone(pid, 10_000);
  }

  /** Whether runsc has state for `id` under this root (cheaper than spawning runsc for a sandbox never run). */
  private async knows(id: string): Promise<boolean> {
    const entries = await readdir(this.opts.stateRoot).catch(() => [] as string[]);
    return entries.some((e) => e.includes(id));
  }

  async list(): Promise<string[]> {
    const runsc = await this.last();
    if (!runsc) return [];
    const out = await this.runsc(runsc, ['list', '--quiet'], { okCodes: [0, 1] });
    return out.stdout.split('\n').filter(Boolean);
  }
}
