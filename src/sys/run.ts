// Running host programs (runsc, ip). One place, so every caller gets the same timeout handling and the same
// error shape: a RUNTIME_ERROR naming the program and the tail of its stderr.
import { spawn } from 'node:child_process';
import { TorporError } from '../core/errors.ts';

export interface RunOptions {
  timeoutMs?: number;
  /** Where the child's stdout/stderr go when they are not captured (e.g. a log file descriptor). */
  stdio?: [number | 'ignore', number | 'pipe', number | 'pipe'];
  /** Exit codes that are not errors. */
  okCodes?: number[];
  env?: NodeJS.ProcessEnv;
  /** How errors name the command, e.g. "runsc checkpoint" (defaults to the program and its first argument). */
  label?: string;
  /** Called with each chunk of output as it arrives (it is also captured in the result). */
  onOutput?: (stream: 'stdout' | 'stderr', chunk: Buffer) => void;
  /** Written to the child's stdin, which is then closed (e.g. a batch of `ip` commands, an nft ruleset). */
  input?: string;
}

export interface RunResult {
  code: number;
  stdout: string;
  stderr: string;
}

export function run(program: string, args: string[], opts: RunOptions = {}): Promise<RunResult> {
  const { timeoutMs = 60_000, okCodes = [0] } = opts;
  const label = opts.label ?? `${program} ${args[0] ?? ''}`.trim();
  return new Promise((resolve, reject) => {
    const stdio = opts.stdio ?? [opts.input === undefined ? 'ignore' : 'pipe', 'pipe', 'pipe'];
    const child = spawn(program, args, { stdio, env: opts.env });
    if (opts.input !== undefined) child.stdin?.end(opts.input);
    let stdout = '';
    let stderr = '';
    child.stdout?.on('data', (d: Buffer) => {
      stdout += d.toString();
      opts.onOutput?.('stdout', d);
    });
    child.stderr?.on('data', (d: Buffer) => {
      stderr += d.toString();
      opts.onOutput?.('stderr', d);
    });
    const timer = setTimeout(() => child.kill('SIGKILL'), timeoutMs);
    child.on('error', (err) => {
      clearTimeout(timer);
      reject(new TorporError('RUNTIME_ERROR', `${label}: ${err.message}`, { cause: err }));
    });
    child.on('close', (code, signal) => {
      clearTimeout(timer);
      const exit = code ?? -1;
      if (okCodes.includes(exit)) return resolve({ code: exit, stdout, stderr });
      const why = signal === 'SIGKILL' ? `timed out after ${timeoutMs} ms` : `exited ${exit}`;
      const tail = stderr.trim().split('\n').slice(-3).join(' | ');
      reject(new TorporError('RUNTIME_ERROR', `${label} ${why}${tail ? `: ${tail}` : ''}`));
    });
  });
}
