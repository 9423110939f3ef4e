// A real Kubernetes API server for tests: etcd + kube-apiserver 1.20 started by scripts/services/kube.sh (built
// once by scripts/setup.sh), stopped by the PIDs the script recorded. No kubelet: pods never run.
import { execFile } from 'node:child_process';
import { existsSync } from 'node:fs';
import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { pino } from 'pino';
import { applyObjects } from '../../../src/engine/k8s/install.ts';
import { Kube, loadKubeConfig } from '../../../src/engine/k8s/kube.ts';
import { crds } from '../../../src/engine/k8s/resources.ts';

const run = promisify(execFile);
const SCRIPT = join(import.meta.dirname, '..', '..', '..', 'scripts', 'services', 'kube.sh');
const KUBE_BIN = join(process.env.KUBE_CACHE ?? '/var/cache/torpor/kube-1.20', 'src', '_output', 'bin');

export interface RunningKube {
  dir: string;
  server: string;
  token: string;
  kubeconfig: string;
  kube: Kube;
  /** The API server's audit log: one JSON event per request (user, verb, URI). */
  audit(): Promise<{ user: { username: string }; verb: string; requestURI: string; stage: string }[]>;
  stop(): Promise<void>;
}

/** Starts etcd + kube-apiserver, or answers why it cannot (the caller skips, saying so). `extraTokens`:
 * `token,user,uid` lines the API server also accepts. */
export async function startKube(
  opts: { extraTokens?: string[]; rbac?: boolean; controllers?: boolean } = {},
): Promise<RunningKube | string> {
  if (opts.controllers && !existsSync(join(KUBE_BIN, 'kube-controller-manager'))) {
    return `kube-controller-manager is not built (scripts/setup.sh builds it: kube.sh build with WITH_CONTROLLERS=1)`;
  }
  const dir = await mkdtemp(join(tmpdir(), 'torpor-kube-'));
  const env: NodeJS.ProcessEnv = {
    ...process.env,
    ...(opts.rbac ? { AUTHZ: 'RBAC' } : {}),
    ...(opts.controllers ? { START_CONTROLLERS: '1' } : {}),
  };
  if (opts.extraTokens?.length) {
    env.EXTRA_TOKENS = join(dir, 'extra-tokens.csv');
    await writeFile(env.EXTRA_TOKENS, `${opts.extraTokens.join('\n')}\n`, { mode: 0o600 });
  }
  let stdout: string;
  try {
    ({ stdout } = await run('bash', [SCRIPT, 'start', dir], { timeout: 120_000, env }));
  } catch (err) {
    await rm(dir, { recursive: true, force: true });
    const e = err as { code?: number; stderr?: string };
    if (e.code === 3) return `kube-apiserver is not available (scripts/setup.sh builds it): ${e.stderr?.trim()}`;
    return `kube-apiserver could not be started: ${e.stderr?.trim() ?? String(err)}`;
  }
  const field = (name: string) => {
    const value = new RegExp(`(?:^| )${name}=(\\S+)`).exec(stdout)?.[1];
    if (value === undefined) throw new Error(`kube.sh printed no ${name}`);
    return value;
  };
  const kubeconfig = field('kubeconfig');
  return {
    dir,
    server: field('server'),
    token: field('token'),
    kubeconfig,
    kube: new Kube(loadKubeConfig({ kubeconfig })),
    async audit() {
      const text = await readFile(join(dir, 'audit.log'), 'utf8').catch(() => '');
      return text
        .split('\n')
        .filter(Boolean)
        .map((line) => JSON.parse(line));
    },
    async stop() {
      await run('bash', [SCRIPT, 'stop', dir], { timeout: 60_000 });
      await rm(dir, { recursive: true, force: true });
    },
  };
}

/** Installs Torpor's CRDs as `torpor install` does and waits until the API server serves them. */
export async function installCrds(kube: Kube): Promise<void> {
  await applyObjects(kube, crds(), pino({ level: 'silent' }));
}

/** Polls `fn` until it returns a value other than undefined (or throws after `ms`). */
export async function eventually<T>(fn: () => Promise<T | undefined>, ms = 15_000, what = 'condition'): Promise<T> {
  const deadline = Date.now() + ms;
  let last: unknown;
  for (;;) {
    try {
      const v = await fn();
      if (v !== undefined) return v;
    } catch (err) {
      last = err;
    }
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}${last ? `: ${String(last)}` : ''}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

export const quietLog = () => pino({ level: 'silent' });
