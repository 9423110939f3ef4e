// Opens the StateStore a URL names:
//   PATH, sqlite:PATH                     SqliteStore (embedded; `:memory:` for a throw-away store)
//   redis://[user:password@]host:port[/db][?prefix=P&cluster=true&shards=N&changeRetention=N]
//   rediss://…                            RedisStore (TLS)
// Errors name the field `store` and never echo the URL (it may carry a password).
import { TorporError } from '../core/errors.ts';
import { RedisStore, type RedisStoreOptions } from './redis.ts';
import { SqliteStore } from './sqlite.ts';
import type { StateStore } from './store.ts';

const SCHEME = /^([a-z][a-z0-9+.-]*):/i;

export async function openStore(url: string): Promise<StateStore> {
  const scheme = SCHEME.exec(url)?.[1]?.toLowerCase();
  if (scheme === undefined) {
    if (url.trim() === '') throw invalid('a path, sqlite:PATH, redis://… or rediss://… is needed');
    return SqliteStore.open(url);
  }
  if (scheme === 'sqlite') {
    const path = url.slice('sqlite:'.length);
    if (path === '') throw invalid('sqlite: needs a path (sqlite:PATH)');
    return SqliteStore.open(path);
  }
  if (scheme === 'redis' || scheme === 'rediss') return RedisStore.open(redisOptions(url));
  throw invalid(`unsupported scheme "${scheme}:" (use a path, sqlite:PATH, redis://… or rediss://…)`);
}

/** The URL without its query, which carries the store's own options. */
function redisOptions(url: string): RedisStoreOptions {
  let parsed: URL;
  try {
    parsed = new URL(url);
  } catch {
    throw invalid('not a valid redis URL');
  }
  const options: RedisStoreOptions = {};
  for (const [name, value] of parsed.searchParams) {
    if (name === 'prefix') options.prefix = value;
    else if (name === 'cluster') options.cluster = value === 'true' || value === '1';
    else if (name === 'shards') options.shards = Number(value);
    else if (name === 'changeRetention') options.changeRetention = Number(value);
    else throw invalid(`unknown option "${name}" (known: prefix, cluster, shards, changeRetention)`);
  }
  parsed.search = '';
  options.url = parsed.toString();
  return options;
}

function invalid(reason: string): TorporError {
  return new TorporError('INVALID_ARGUMENT', `store: ${reason}`, { field: 'store' });
}
