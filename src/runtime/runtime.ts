// SandboxRuntime: runs one actor on one worker slot, and checkpoints/restores it. Implementations:
// gvisor (runsc) and microvm (a VM per activation). The agent owns orchestration; a runtime only knows sandboxes.
import type { Phases } from '../core/types.ts';

export interface ImageConfigView {
  entrypoint: string[];
  cmd: string[];
  env: string[];
  workingDir: string;
}

export interface ActivationSpec {
  /** Sandbox id, unique on the node: derived from worker and actor so retries of one actor collide on purpose. */
  id: string;
  /** `space/name`, written to /run/torpor/actor-id at every run and restore. */
  actorId: string;
  rootfs: string;
  image: ImageConfigView;
  command: string[];
  env: Record<string, string>;
  memoryMiB: number;
  vcpus: number;
  /** Path of the network namespace the sandbox joins (prepared by the worker's network). */
  netnsPath: string;
  /** Directory private to this activation (bundle, actor-id file). */
  workDir: string;
  /** The actor's stdout and stderr are appended here (kept across activations on a node). */
  logFile: string;
  /** Local paths of this activation's runtime assets by name (gVisor: `runsc`), fetched and verified by the agent
   * from the activation's asset set: a restore runs with the assets its snapshot pinned. */
  assets: Record<string, string>;
}

export interface Sandbox {
  id: string;
  spec: ActivationSpec;
  logFile: string;
}

export interface CheckpointResult {
  /** Exactly the files the runtime wrote, relative to the checkpoint directory. */
  files: string[];
  phases: Phases;
}

export interface ExecResult {
  exitCode: number;
  stdout: string;
  stderr: string;
}

/** Receives a command's output as it is produced (exec streaming). */
export type OutputListener = (stream: 'stdout' | 'stderr', chunk: Buffer) => void;

export interface Restored {
  sandbox: Sandbox;
  phases: Phases;
  settled?: Promise<Phases>;
}

export interface RestoreOptions {
  /** Work that must be done before the restored sandbox first runs (the activation's network rules, so that the
   * actor never runs unpoliced): the runtime prepares meanwhile (bundle, memory, VMM launch) and awaits it just
   * before the sandbox runs; if it rejects, the sandbox never runs and the restore fails with its error. */
  beforeRun?: Promise<void>;
  /** The caller gives `dir` up (a snapshot it fetched for this restore): the runtime may take its files instead of
   * copying them, and leaves them taken. Without it, `dir` is never modified (kept copies and forks share it). */
  disposable?: boolean;
  /** Files of this very snapshot that the caller holds elsewhere and gives up (name → path): the runtime may take
   * them instead of copying `dir`'s (the guest RAM a suspend on this worker left in memory). */
  takeable?: Record<string, string>;
}

export interface SandboxRuntime {
  readonly name: 'gvisor' | 'microvm';
  run(spec: ActivationSpec): Promise<Sandbox>;
  /** Saves the sandbox's state in `dir` and stops it; `destroy` then releases what is left (it can be slow, so the
   * caller may run it off the critical path). */
  checkpoint(sandbox: Sandbox, dir: string): Promise<CheckpointResult>;
  /** `settled`, when given, is work the restored sandbox still finishes (a micro-VM guest's clock and actor id
   * resync) while the caller waits for readiness: the activation counts as ready once both are done, so neither
   * waits for the other. It resolves with that work's phases. */
  restore(spec: ActivationSpec, dir: string, files: string[], opts?: RestoreOptions): Promise<Restored>;
  /** Where a caller that fetches a snapshot to restore sandbox `id` from should put it, when the runtime has a
   * preference: a restore told the directory is disposable can then take its files rather than copy them (a
   * micro-VM's guest memory must end up on tmpfs). `destroy(id)` removes it. */
  stagingDir?(id: string): string;
  /** Prepares, while the worker is idle, the next restore of its last checkpoint, whose files `held` the caller
   * keeps for it (RestoreOptions.takeable): a micro-VM's VMM is launched on the held guest memory. Needs the
   * worker's next network in place; best effort. */
  prelaunch?(held: Record<string, string>): Promise<void>;
  /** Ends what `prelaunch` started (the held files are going away, or the worker's network is). */
  discardPrelaunched?(): Promise<void>;
  /** Removes what sandboxes with ids starting with `prefix` left outside their run directories (a micro-VM's guest
   * memory files on tmpfs): called when an agent starts, for its own slots. */
  removeLeftoverMemory?(prefix: string): Promise<void>;
  exec(sandbox: Sandbox, command: string[], timeoutMs: number, onOutput?: OutputListener): Promise<ExecResult>;
  /** Whether the sandbox is still running (e.g. after a failed checkpoint). */
  alive(id: string): Promise<boolean>;
  /** Idempotent: destroying a sandbox that is gone (or never started) succeeds. */
  destroy(id: string): Promise<void>;
  /** Ids of sandboxes this runtime knows about on this worker root (for cleaning leftovers). */
  list(): Promise<string[]>;
  /** Runtimes that supervise a long-lived process per sandbox (a VMM) report its unexpected death here. */
  onUnexpectedExit?(listener: (id: string, why: string) => void): void;
}
