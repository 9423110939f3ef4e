// Real `torpor server`, `torpor agent` (each in its node's network namespace, via nsenter) and `torpor router`
// processes for the distributed tests: started as a user would, restarted as an operator would, killed with -9.
import { type ChildProcess, execFile, spawn } from 'node:child_process';
import { appendFileSync } from 'node:fs';
import { resolve } from 'node:path';
import { promisify } from 'node:util';

const ROOT = resolve(import.meta.dirname, '../..');
const BIN = resolve(ROOT, 'bin/torpor.js');

export const run = promisify(execFile);

export interface Exit {
  code: number | null;
  signal: NodeJS.Signals | null;
}

/** One long-lived torpor process; `restart` starts the same command again (with other environment variables). */
export class TorporProcess {
  readonly name: string;
  private readonly args: string[];
  private readonly netns: string | undefined;
  private readonly env: NodeJS.ProcessEnv;
  private readonly logFile: string | undefined;
  private child: ChildProcess | undefined;
  private output = '';
  exited: Promise<Exit> = Promise.resolve({ code: 0, signal: null });
  url = '';

  /** `logFile`: everything the process writes is appended there too (to read after a failed test). */
  constructor(name: string, args: string[], opts: { netns?: string; env?: NodeJS.ProcessEnv; logFile?: string } = {}) {
    this.logFile = opts.logFile;
    this.name = name;
    this.args = args;
    this.netns = opts.netns;
    this.env = opts.env ?? {};
  }

  get running(): boolean {
    return this.child !== undefined && this.child.exitCode === null && this.child.signalCode === null;
  }

  private write(text: string): void {
    this.output += text;
    if (this.logFile) appendFileSync(this.logFile, text);
  }

  /** Everything the process wrote (all its incarnations). */
  log(): string {
    return this.output;
  }

  /** Starts the process and waits until it says where it listens. */
  async start(extraEnv: NodeJS.ProcessEnv = {}): Promise<void> {
    const argv = [BIN, ...this.args];
    const [program, args] = this.netns
      ? ['nsenter', [`--net=/var/run/netns/${this.netns}`, '--', process.execPath, ...argv]]
      : [process.execPath, argv];
    const child = spawn(program, args, {
      stdio: ['ignore', 'pipe', 'pipe'],
      env: { ...process.env, ...this.env, ...extraEnv },
    });
    this.child = child;
    const marker = `\n----- ${this.name} started${extraEnv.TORPOR_CRASH_AT ? ` (crash at ${extraEnv.TORPOR_CRASH_AT})` : ''}\n`;
    const seen = this.output.length;
    this.write(marker);
    child.stdout?.on('data', (d: Buffer) => this.write(d.toString()));
    child.stderr?.on('data', (d: Buffer) => this.write(d.toString()));
    this.exited = new Promise((done) => child.once('exit', (code, signal) => done({ code, signal })));
    this.url = await new Promise<string>((resolveUrl, reject) => {
      const timer = setInterval(() => {
        const url = /listening on (http:\/\/\S+)/.exec(this.output.slice(seen))?.[1];
        if (url) {
          clearInterval(timer);
          resolveUrl(url);
        }
      }, 20);
      void this.exited.then((exit) => {
        clearInterval(timer);
        reject(new Error(`${this.name} exited (${exit.code ?? exit.signal}) before listening:\n${this.tail()}`));
      });
      setTimeout(() => {
        clearInterval(timer);
        reject(new Error(`${this.name} did not start within 60 s:\n${this.tail()}`));
      }, 60_000).unref();
    });
  }

  /** Starts it again (after a crash or a kill). */
  async restart(extraEnv: NodeJS.ProcessEnv = {}): Promise<void> {
    if (this.running) await this.kill();
    await this.start(extraEnv);
  }

  /** SIGKILL, as a crash would. */
  async kill(): Promise<void> {
    if (!this.running) return;
    this.child!.kill('SIGKILL');
    await this.exited;
  }

  /** SIGTERM, then SIGKILL after 30 s. */
  async stop(): Promise<void> {
    if (!this.running) return;
    this.child!.kill('SIGTERM');
    const timer = setTimeout(() => this.child?.kill('SIGKILL'), 30_000);
    await this.exited;
    clearTimeout(timer);
  }

  tail(lines = 40): string {
    return this.output.split('\n').slice(-lines).join('\n');
  }
}

/** The `torpor` CLI, once (e.g. node-net). */
export async function torpor(...args: string[]): Promise<string> {
  const { stdout } = await run(process.execPath, [BIN, ...args], { timeout: 60_000 });
  return stdout;
}
