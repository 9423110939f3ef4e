// Runs a real `torpor up` (as a user would) and the `torpor` CLI against it.
import { type ChildProcess, execFile, spawn } from 'node:child_process';
import { existsSync } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { counterImage } from '../fixtures/images.ts';

const ROOT = resolve(import.meta.dirname, '../..');
const BIN = join(ROOT, 'bin/torpor.js');

/** Why the runsc tests cannot run here, or undefined when they can. */
export function gvisorSkipReason(): string | undefined {
  if (process.getuid?.() !== 0) return 'needs root (network namespaces, runsc)';
  const runsc = process.env.TORPOR_RUNSC ?? '/var/cache/torpor/assets/runsc';
  if (!existsSync(runsc)) return `runsc not found at ${runsc}: run scripts/setup.sh`;
  if (!existsSync('/usr/sbin/ip') && !existsSync('/sbin/ip')) return 'iproute2 (ip) not installed';
  return undefined;
}

/** The counter as AEnvironment's env "counter@v1" (template "counter-v1"). */
export async function counterEnvTemplate(extra: Record<string, unknown> = {}): Promise<Record<string, unknown>> {
  return {
    name: 'counter-v1',
    image: await counterImage(),
    port: 8080,
    readiness: { path: '/healthz', timeoutSeconds: 20 },
    resources: { memoryMiB: 128, vcpus: 1 },
    ...extra,
  };
}

/** Applies a template over the REST API; throws unless it was created. */
export async function applyTemplate(url: string, spec: Record<string, unknown>): Promise<void> {
  const res = await fetch(`${url}/v1/templates`, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify(spec),
  });
  if (res.status !== 201) throw new Error(`template ${String(spec.name)}: ${res.status} ${await res.text()}`);
}

export interface CliResult {
  code: number;
  stdout: string;
  stderr: string;
}

export interface Torpor {
  url: string;
  routerUrl: string;
  /** The MCP gateway (tool traffic by instance id). */
  mcpUrl: string;
  dataDir: string;
  cli: (...args: string[]) => Promise<CliResult>;
  /** Runs the CLI with -o json and parses stdout; throws with stderr when it fails. */
  json: <T = Record<string, unknown>>(...args: string[]) => Promise<T>;
  stop: () => Promise<void>;
  /** SIGKILL, as a crash would: nothing is suspended, the data directory stays. */
  crash: () => Promise<void>;
  log: () => string;
}

export async function startTorpor(opts: {
  workers?: number;
  networkBase: number;
  dataDir?: string;
  /** More `torpor up` flags (a flag given again here wins over the defaults above it). */
  args?: string[];
  /** More environment for `torpor up` (secrets such as TORPOR_API_KEYS). */
  env?: Record<string, string>;
}): Promise<Torpor> {
  const dataDir = opts.dataDir ?? (await mkdtemp(join(tmpdir(), 'torpor-e2e-')));
  const child: ChildProcess = spawn(
    process.execPath,
    [
      BIN,
      'up',
      '--data-dir',
      dataDir,
      '--port',
      '0',
      '--router-port',
      '0',
      '--workers',
      String(opts.workers ?? 2),
      '--network-base',
      String(opts.networkBase),
      '--mcp-port',
      '0',
      ...(opts.args ?? []),
    ],
    { stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, ...opts.env } },
  );
  let output = '';
  child.stdout?.on('data', (d: Buffer) => {
    output += d.toString();
  });
  const [url, routerUrl, mcpUrl] = await new Promise<[string, string, string]>((resolveUrl, reject) => {
    const timer = setTimeout(() => reject(new Error(`torpor up did not start:\n${output}`)), 60_000);
    child.stderr?.on('data', (d: Buffer) => {
      output += d.toString();
      const api = /API listening on (http:\/\/\S+)/.exec(output);
      const router = /router listening on (http:\/\/\S+)/.exec(output);
      const mcp = /MCP gateway listening on (http:\/\/\S+)/.exec(output);
      if (api && router && mcp) {
        clearTimeout(timer);
        resolveUrl([api[1]!, router[1]!, mcp[1]!]);
      }
    });
    child.on('exit', (code) => {
      clearTimeout(timer);
      reject(new Error(`torpor up exited ${code}:\n${output}`));
    });
  });

  const cli = (...args: string[]) =>
    new Promise<CliResult>((done) => {
      execFile(
        process.execPath,
        [BIN, ...args],
        { env: { ...process.env, TORPOR_SERVER: url }, timeout: 180_000 },
        (err, stdout, stderr) => {
          const code = err ? (typeof err.code === 'number' ? err.code : 1) : 0;
          done({ code, stdout, stderr });
        },
      );
    });
  const json = async <T>(...args: string[]): Promise<T> => {
    const r = await cli(...args, '-o', 'json');
    if (r.code !== 0) throw new Error(`torpor ${args.join(' ')} failed (${r.code}): ${r.stderr}`);
    return JSON.parse(r.stdout) as T;
  };
  const stop = async () => {
    if (child.exitCode === null) {
      const exited = new Promise((r) => child.once('exit', r));
      child.kill('SIGTERM');
      await Promise.race([exited, new Promise((r) => setTimeout(r, 60_000).unref())]);
      if (child.exitCode === null) child.kill('SIGKILL');
    }
    await rm(dataDir, { recursive: true, force: true });
  };
  const crash = async () => {
    const exited = new Promise((r) => child.once('exit', r));
    child.kill('SIGKILL');
    await exited;
  };
  return { url, routerUrl, mcpUrl, dataDir, cli, json, stop, crash, log: () => output };
}
