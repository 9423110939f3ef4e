// A throw-away redis-server for tests and benchmarks, started by scripts/services/redis.sh on a free port.
import { execFile } from 'node:child_process';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { Redis } from 'ioredis';

const run = promisify(execFile);
const SCRIPT = join(import.meta.dirname, '..', '..', 'scripts', 'services', 'redis.sh');

export interface RedisServer {
  port: number;
  url: string;
  /** A one-node Redis Cluster owning every slot. */
  cluster: boolean;
  stop(): Promise<void>;
}

/** Starts a server, or answers why it cannot (the caller then skips, saying so). */
export async function startRedis(opts: { cluster?: boolean } = {}): Promise<RedisServer | string> {
  const dir = await mkdtemp(join(tmpdir(), 'torpor-redis-'));
  let stdout: string;
  try {
    ({ stdout } = await run('bash', [SCRIPT, 'start', dir, ...(opts.cluster ? ['--cluster'] : [])], {
      timeout: 30_000,
    }));
  } catch (err) {
    await rm(dir, { recursive: true, force: true });
    const e = err as { code?: number; stderr?: string };
    if (e.code === 3) return `redis-server is not installed (scripts/setup.sh installs it): ${e.stderr?.trim()}`;
    return `redis-server could not be started: ${e.stderr ?? String(err)}`;
  }
  const port = Number(/port=(\d+)/.exec(stdout)?.[1]);
  if (!port) throw new Error(`redis.sh printed no port: ${stdout}`);
  return {
    port,
    url: `redis://127.0.0.1:${port}`,
    cluster: opts.cluster ?? false,
    stop: async () => {
      await run('bash', [SCRIPT, 'stop', dir], { timeout: 30_000 });
      await rm(dir, { recursive: true, force: true });
    },
  };
}

/** A plain connection to the server (its only node when a cluster), for what tests inspect or do behind the
 * store's back. */
export function rawClient(server: RedisServer): Redis {
  return new Redis(server.port, '127.0.0.1');
}

/** Every key under `prefix` (SCAN: fine in a test, never on the store's own paths). */
export async function keysWithPrefix(server: RedisServer, prefix: string): Promise<string[]> {
  const client = rawClient(server);
  try {
    const keys: string[] = [];
    let cursor = '0';
    do {
      const [next, batch] = await client.scan(cursor, 'MATCH', `${prefix}*`, 'COUNT', 1000);
      keys.push(...batch);
      cursor = next;
    } while (cursor !== '0');
    return keys;
  } finally {
    client.disconnect();
  }
}

/** Removes every key under `prefix`. */
export async function dropPrefix(server: RedisServer, prefix: string): Promise<void> {
  const keys = await keysWithPrefix(server, prefix);
  if (keys.length === 0) return;
  const client = rawClient(server);
  try {
    // One key per command: on a cluster, a multi-key DEL must stay within one slot.
    await Promise.all(keys.map((key) => client.unlink(key)));
  } finally {
    client.disconnect();
  }
}
