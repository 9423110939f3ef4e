// RedisStore: the StateStore for several machines, on Redis ≥ 7 or Valkey (one server or a Redis Cluster).
//
// Key design. Every read-modify-write is one Lua script (or one command), and every script touches keys of one
// hash slot only, so it is atomic and runs unchanged on a Redis Cluster. Keys are `<prefix>{<tag>}:<name>`; the
// hash tag picks the slot:
//   {g}      the global records: meta, spaces, templates, leases not named after a space.
//   {w}      every worker, its id index and the free indexes that claims pick from. The worker pool is bounded by
//            the machines, not the actors, and a claim must read a free index and flip a record atomically.
//   {s<n>}   one of `shards` slots; a space's actors, their per-space index and the space's leases live in the
//            shard crc32(space) % shards, so a fenced write checks its lease in the same script.
// Each tag has its own change stream `{tag}:changes`, appended by the script that makes the change.
//
// No KEYS or SCAN anywhere: listings walk sorted-set indexes with ZRANGEBYLEX (members are names, compared
// bytewise like SQLite's ORDER BY), a claim reads the free index of its runtime (and of each preferred node),
// ordered by lease expiry, so expired workers are skipped by the range itself.
//
// Change notifications. Each write script appends the change to its tag's stream (XADD with ids `0-<n>`, so a
// reader can see a gap) AND publishes it on one Pub/Sub channel, in the same script: a crash cannot separate the
// write from its notification. Pub/Sub alone would lose what is published while a subscriber is disconnected;
// a blocking XREAD over every stream would be one command over many slots, which a cluster refuses. So a
// subscriber takes changes from Pub/Sub as they come (in publication order) and reads a stream only to fill a
// gap: after a reconnect, or when a message's sequence number skips. Streams are trimmed to about
// `changeRetention` entries each; a watcher that falls further behind than that is ended rather than left with a
// silently stale view (it can list again and watch anew).
import { crc32 } from 'node:zlib';
import { Cluster, Redis, type RedisOptions } from 'ioredis';
import { notFound, TorporError } from '../core/errors.ts';
import type { Actor, ActorRef, Page, Space, Template, Worker, WorkerFilter } from '../core/types.ts';
import { decodeActor, encodeActor } from './actor-codec.ts';
import { ChangeFeed } from './change-feed.ts';
import { decodeCursor, pageLimit, toPage } from './cursor.ts';
import { checkFence, checkLeaseOfSpace, checkTtl, leaseLost, leaseSpace } from './fence.ts';
import {
  type ActorLease,
  type Change,
  type ChangeKind,
  type Fence,
  type ListOptions,
  SNAPSHOT_SWEEP_LEASE,
  type StateStore,
} from './store.ts';

const SCHEMA_VERSION = 1;
const DEFAULT_SHARDS = 16;
/** Per stream (16 by default): the streams only fill gaps after a reconnect, so a few seconds of changes at full
 * rate is enough, and they are a fixed cost in memory (~600 bytes an entry) whatever the number of actors. A
 * watcher further behind is ended and lists again. `?changeRetention=N` on the store URL raises it. */
const DEFAULT_CHANGE_RETENTION = 1_000;
/** How many free workers a claim looks at per round (it picks one of them at random). */
const CLAIM_WINDOW = 64;
/** How many spaces a cross-space listing reads from the space index per round. */
const SPACE_BATCH = 32;
const CONNECT_TIMEOUT_MS = 10_000;
/** How soon a change follower retries a stream read that failed. */
const RETRY_MS = 200;

export interface RedisStoreOptions {
  /** `redis://[user:password@]host:port[/db]`, or `rediss://…` for TLS. Default `redis://127.0.0.1:6379`. */
  url?: string;
  host?: string;
  port?: number;
  /** Prefix of every key and of the change channel, so several deployments (or tests) share one server. */
  prefix?: string;
  /** The url names one node of a Redis Cluster. */
  cluster?: boolean;
  /** How many slots spaces are spread over. Fixed when the store is first used (recorded in its meta). */
  shards?: number;
  /** About how many changes each stream keeps for watchers that reconnect. Writers trim, so give every client
   * the same value. */
  changeRetention?: number;
  /** Passed to ioredis (timeouts, TLS details …). */
  redis?: RedisOptions;
}

type Client = Redis | Cluster;
type Reply = string | number | null | Reply[];

// ── Lua ──────────────────────────────────────────────────────────────────────────────────────────────────────
// Write scripts share one calling convention: KEYS[1] is the stream of the slot they write, ARGV[1..3] are the
// change channel, the stream's retention and the slot's tag; their own keys and arguments follow.

const PRELUDE = `
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function emit(kind, key, value)
  local id
  if value then
    id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '0-*', 'k', kind, 'key', key, 'v', value)
  else
    id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '0-*', 'k', kind, 'key', key)
  end
  redis.call('PUBLISH', ARGV[1], cjson.encode({ARGV[3], id, kind, key, value}))
end
-- KEYS[1] a lease, KEYS[2] its slot's token counter; ARGV[1] holder, ARGV[2] ttl ms. The holding's token, or false.
-- A live lease is a key that has not expired, so an ended holding is simply absent; the counter outlives it, so
-- the next holding's token is higher.
local function acquire_lease()
  local held = redis.call('HMGET', KEYS[1], 'holder', 'token')
  if held[1] == ARGV[1] then
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
    return tonumber(held[2])
  end
  if held[1] then return false end
  local token = redis.call('INCR', KEYS[2])
  redis.call('HSET', KEYS[1], 'holder', ARGV[1], 'token', token)
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return token
end
-- The version an encoded actor starts with, or false when there is none.
local function actor_version(key)
  local s = redis.call('GET', key)
  if not s then return false end
  return string.match(s, '^%d+')
end
-- A record stored as its JSON minus the fields scripts change, which are kept as hash fields and put back here.
local function template_json(key)
  local t = redis.call('HMGET', key, 'json', 'golden')
  if not t[1] then return false end
  if not t[2] then return t[1] end
  return string.sub(t[1], 1, -2) .. ',"goldenSnapshot":' .. cjson.encode(t[2]) .. '}'
end
local function worker_json(key)
  local w = redis.call('HMGET', key, 'json', 'state', 'aspace', 'aname', 'lease')
  if not w[1] then return false end
  local s = string.sub(w[1], 1, -2) .. ',"state":' .. cjson.encode(w[2])
  if w[3] then
    s = s .. ',"actor":{"space":' .. cjson.encode(w[3]) .. ',"name":' .. cjson.encode(w[4]) .. '}'
  end
  return s .. ',"leaseExpiresAt":' .. cjson.encode(w[5]) .. '}'
end
`;

const WRITE_SCRIPTS = {
  // KEYS: stream, template, template index. ARGV: …, name, json (without goldenSnapshot), golden ('' for none).
  createTemplate: `
    if redis.call('EXISTS', KEYS[2]) == 1 then return 'exists' end
    redis.call('HSET', KEYS[2], 'json', ARGV[5])
    if ARGV[6] ~= '' then redis.call('HSET', KEYS[2], 'golden', ARGV[6]) end
    redis.call('ZADD', KEYS[3], 0, ARGV[4])
    emit('template', ARGV[4], template_json(KEYS[2]))
    return 'ok'`,
  // KEYS: stream, template. ARGV: …, name, golden.
  setTemplateGolden: `
    if redis.call('EXISTS', KEYS[2]) == 0 then return false end
    redis.call('HSET', KEYS[2], 'golden', ARGV[5])
    local json = template_json(KEYS[2])
    emit('template', ARGV[4], json)
    return json`,
  // An actor is a string, `<version>\n<compact JSON>` (see actor-codec.ts): no hash around one big field.
  // KEYS: stream, actor, space's actor index. ARGV: …, name, encoded actor (version 1), change key.
  createActor: `
    if redis.call('EXISTS', KEYS[2]) == 1 then return 'exists' end
    redis.call('SET', KEYS[2], ARGV[5])
    redis.call('ZADD', KEYS[3], 0, ARGV[4])
    emit('actor', ARGV[6], ARGV[5])
    return 'ok'`,
  // KEYS: stream, actor[, fencing lease]. ARGV: …, expected version, encoded actor (the next version), change
  // key, fence token, '1' to end the lease's holding with the write. A lost lease is reported before a stale
  // version: re-reading the actor would not cure it.
  casActor: `
    local v = actor_version(KEYS[2])
    if not v then return {'not_found'} end
    if KEYS[3] and redis.call('HGET', KEYS[3], 'token') ~= ARGV[7] then return {'lease_lost'} end
    if v ~= ARGV[4] then return {'conflict', v} end
    redis.call('SET', KEYS[2], ARGV[5])
    if KEYS[3] and ARGV[8] == '1' then redis.call('DEL', KEYS[3]) end
    emit('actor', ARGV[6], ARGV[5])
    return {'ok'}`,
  // KEYS: stream, actor, space's actor index[, fencing lease]. ARGV: …, expected version, name, change key, token.
  deleteActor: `
    local v = actor_version(KEYS[2])
    if not v then return {'not_found'} end
    if KEYS[4] and redis.call('HGET', KEYS[4], 'token') ~= ARGV[7] then return {'lease_lost'} end
    if v ~= ARGV[4] then return {'conflict', v} end
    redis.call('DEL', KEYS[2])
    redis.call('ZREM', KEYS[3], ARGV[5])
    emit('actor', ARGV[6])
    return {'ok'}`,
  // KEYS: stream, worker, worker index, runtime's free index, node's free index.
  // ARGV: …, id, json (without state/actor/lease), state, actor space, actor name, lease, lease ms.
  putWorker: `
    local old = redis.call('HMGET', KEYS[2], 'idx', 'nidx')
    if old[1] then
      redis.call('ZREM', old[1], ARGV[4])
      redis.call('ZREM', old[2], ARGV[4])
    end
    redis.call('DEL', KEYS[2])
    redis.call('HSET', KEYS[2], 'json', ARGV[5], 'state', ARGV[6], 'lease', ARGV[9], 'ms', ARGV[10],
      'idx', KEYS[4], 'nidx', KEYS[5])
    if ARGV[7] ~= '' then redis.call('HSET', KEYS[2], 'aspace', ARGV[7], 'aname', ARGV[8]) end
    redis.call('ZADD', KEYS[3], 0, ARGV[4])
    if ARGV[6] == 'free' then
      redis.call('ZADD', KEYS[4], ARGV[10], ARGV[4])
      redis.call('ZADD', KEYS[5], ARGV[10], ARGV[4])
    end
    emit('worker', ARGV[4], worker_json(KEYS[2]))
    return 'ok'`,
  // KEYS: stream, worker. ARGV: …, id, lease, lease ms. Not a change watchers see (as in SqliteStore).
  renewWorkerLease: `
    local w = redis.call('HMGET', KEYS[2], 'state', 'idx', 'nidx')
    if not w[1] then return 0 end
    redis.call('HSET', KEYS[2], 'lease', ARGV[5], 'ms', ARGV[6])
    if w[1] == 'free' then
      redis.call('ZADD', w[2], ARGV[6], ARGV[4])
      redis.call('ZADD', w[3], ARGV[6], ARGV[4])
    end
    return 1`,
  // KEYS: stream, worker, worker index. ARGV: …, id.
  deleteWorker: `
    local w = redis.call('HMGET', KEYS[2], 'idx', 'nidx')
    if not w[1] then return 0 end
    redis.call('ZREM', w[1], ARGV[4])
    redis.call('ZREM', w[2], ARGV[4])
    redis.call('ZREM', KEYS[3], ARGV[4])
    redis.call('DEL', KEYS[2])
    emit('worker', ARGV[4])
    return 1`,
  // KEYS: stream, runtime's free index, then the free index of each preferred node, in order.
  // ARGV: …, worker key prefix, actor space, actor name, random in [0,1), worker id ('' for any), excluded ids…
  claimWorker: `
    local now = now_ms()
    local excluded = {}
    for i = 9, #ARGV do excluded[ARGV[i]] = true end
    local function pick(index)
      local offset = 0
      while true do
        local ids = redis.call('ZRANGEBYSCORE', index, '(' .. now, '+inf', 'LIMIT', offset, ${CLAIM_WINDOW})
        local allowed = {}
        for _, id in ipairs(ids) do
          if not excluded[id] then allowed[#allowed + 1] = id end
        end
        if #allowed > 0 then return allowed[math.floor(tonumber(ARGV[7]) * #allowed) + 1] end
        if #ids < ${CLAIM_WINDOW} then return nil end
        offset = offset + ${CLAIM_WINDOW}
      end
    end
    local id
    if ARGV[8] ~= '' then
      local score = redis.call('ZSCORE', KEYS[2], ARGV[8])
      if score and tonumber(score) > now and not excluded[ARGV[8]] then id = ARGV[8] end
    else
      for i = 3, #KEYS do
        id = pick(KEYS[i])
        if id then break end
      end
      if not id then id = pick(KEYS[2]) end
    end
    if not id then return false end
    local key = ARGV[4] .. id
    local w = redis.call('HMGET', key, 'idx', 'nidx')
    redis.call('ZREM', w[1], id)
    redis.call('ZREM', w[2], id)
    redis.call('HSET', key, 'state', 'busy', 'aspace', ARGV[5], 'aname', ARGV[6])
    local json = worker_json(key)
    emit('worker', id, json)
    return json`,
  // KEYS: stream, worker. ARGV: …, id, actor space, actor name.
  releaseWorker: `
    local w = redis.call('HMGET', KEYS[2], 'state', 'aspace', 'aname', 'idx', 'nidx', 'ms')
    if w[1] ~= 'busy' or w[2] ~= ARGV[5] or w[3] ~= ARGV[6] then return false end
    redis.call('HSET', KEYS[2], 'state', 'free')
    redis.call('HDEL', KEYS[2], 'aspace', 'aname')
    redis.call('ZADD', w[4], w[6], ARGV[4])
    redis.call('ZADD', w[5], w[6], ARGV[4])
    local json = worker_json(KEYS[2])
    emit('worker', ARGV[4], json)
    return json`,
} as const;

// Scripts outside the change convention: leases (their key expires with the holding) and space creation.
const PLAIN_SCRIPTS = {
  // KEYS: lease, the slot's token counter. ARGV: holder, ttl ms (see acquire_lease).
  acquireLease: `return acquire_lease()`,
  // KEYS: lease, the slot's token counter, the actor (same slot: the lease is named after its space). ARGV: holder,
  // ttl ms. The token and the encoded actor (false when there is none), or false when another holder has it.
  acquireActorLease: `
    local token = acquire_lease()
    if not token then return false end
    return {token, redis.call('GET', KEYS[3])}`,
  // KEYS: lease. ARGV: holder.
  releaseLease: `
    if redis.call('HGET', KEYS[1], 'holder') == ARGV[1] then redis.call('DEL', KEYS[1]) end
    return 0`,
  // KEYS: snapshot writes (a sorted set scored by expiry, ms of the server's clock), the sweep lease. ARGV: key,
  // ttl ms. A write already in flight is extended; a new one is refused while the sweep lease is held.
  recordSnapshotWrite: `
    local t = redis.call('TIME')
    local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
    local expires = tonumber(redis.call('ZSCORE', KEYS[1], ARGV[1]) or '0')
    if expires <= now and redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
    redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
    return 1`,
  // KEYS: snapshot writes. Drops the expired ones, returns the others.
  listSnapshotWrites: `
    local t = redis.call('TIME')
    local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
    redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
    return redis.call('ZRANGE', KEYS[1], 0, -1)`,
  // KEYS: spaces, space index. ARGV: name, created at.
  ensureSpace: `
    if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 1 then redis.call('ZADD', KEYS[2], 0, ARGV[1]) end
    return redis.call('HGET', KEYS[1], ARGV[1])`,
  // KEYS: meta. ARGV: schema version, shards (or '' to take what is recorded). Returns what is recorded.
  meta: `
    redis.call('HSETNX', KEYS[1], 'schema', ARGV[1])
    if ARGV[2] ~= '' then redis.call('HSETNX', KEYS[1], 'shards', ARGV[2]) end
    return redis.call('HMGET', KEYS[1], 'schema', 'shards')`,
} as const;

const READ_SCRIPTS = {
  // KEYS: a name index. ARGV: record key prefix, ZRANGEBYLEX min, count, kind ('actor' | 'template' | 'worker').
  // Actors come back as `<name>\n<encoded actor>`: the encoding leaves the name to the key.
  page: `
    local names = redis.call('ZRANGEBYLEX', KEYS[1], ARGV[2], '+', 'LIMIT', 0, ARGV[3])
    local out = {}
    for _, name in ipairs(names) do
      local key = ARGV[1] .. name
      local json
      if ARGV[4] == 'actor' then
        json = redis.call('GET', key)
        if json then json = name .. '\\n' .. json end
      elseif ARGV[4] == 'template' then json = template_json(key)
      else json = worker_json(key) end
      if json then out[#out + 1] = json end
    end
    return out`,
  // KEYS: a template or worker. ARGV: kind. (Not named `get`: that would shadow ioredis's own GET.)
  getRecord: `
    if ARGV[1] == 'template' then return template_json(KEYS[1]) end
    return worker_json(KEYS[1])`,
} as const;

type WriteScript = keyof typeof WRITE_SCRIPTS;
type PlainScript = keyof typeof PLAIN_SCRIPTS;
type ReadScript = keyof typeof READ_SCRIPTS;

/** A script defineScripts registered, as a function of (numkeys, …keys, …args). */
function script(client: Client, name: string): (...args: (string | number)[]) => Promise<Reply> {
  const command = (client as unknown as Record<string, (...args: (string | number)[]) => Promise<Reply>>)[name]!;
  return command.bind(client);
}

function defineScripts(client: Client): void {
  for (const [name, body] of Object.entries({ ...WRITE_SCRIPTS, ...PLAIN_SCRIPTS })) {
    client.defineCommand(name, { lua: `#!lua\n${PRELUDE}${body}` });
  }
  // flags=no-writes lets a cluster run them on replicas and guarantees they change nothing.
  for (const [name, body] of Object.entries(READ_SCRIPTS)) {
    client.defineCommand(name, { lua: `#!lua flags=no-writes\n${PRELUDE}${body}`, readOnly: true });
  }
}

// ── keys ─────────────────────────────────────────────────────────────────────────────────────────────────────

/** Key names. A component followed by another is URI-encoded (so `:` cannot make two names collide); the
 * last component is kept verbatim. */
class Keys {
  readonly prefix: string;
  readonly shards: number;
  /** The Pub/Sub channel every change is published on. */
  readonly channel: string;

  constructor(prefix: string, shards: number) {
    this.prefix = prefix;
    this.shards = shards;
    this.channel = `${prefix}changes`;
  }

  tagOfSpace(space: string): string {
    return `s${crc32(space) % this.shards}`;
  }

  /** Every slot tag that has a change stream. */
  tags(): string[] {
    return ['g', 'w', ...Array.from({ length: this.shards }, (_, i) => `s${i}`)];
  }

  key(tag: string, name: string): string {
    return `${this.prefix}{${tag}}:${name}`;
  }

  stream(tag: string): string {
    return this.key(tag, 'changes');
  }

  spaces = (): string => this.key('g', 'spaces');
  spaceIndex = (): string => this.key('g', 'space-index');
  templatePrefix = (): string => this.key('g', 'template:');
  templateIndex = (): string => this.key('g', 'template-index');

  actorPrefix(space: string): string {
    return this.key(this.tagOfSpace(space), `actor:${encodeURIComponent(space)}:`);
  }
  actorIndex(space: string): string {
    return this.key(this.tagOfSpace(space), `actors:${space}`);
  }

  workerPrefix = (): string => this.key('w', 'worker:');
  workerIndex = (): string => this.key('w', 'workers');
  freeIndex(runtime: string, node?: string): string {
    return this.key('w', `free:${encodeURIComponent(runtime)}${node === undefined ? '' : `:${node}`}`);
  }

  /** The slot of a lease: its space's shard for `<space>/…` (see Fence), else the global slot. */
  leaseTag(lease: string): string {
    const space = leaseSpace(lease);
    return space === undefined ? 'g' : this.tagOfSpace(space);
  }
  lease(lease: string): string {
    return this.key(this.leaseTag(lease), `lease:${lease}`);
  }
  snapshotWrites = (): string => this.key('g', 'snapshot-writes');
  leaseCounter(lease: string): string {
    return this.key(this.leaseTag(lease), 'lease-seq');
  }
}

// ── the store ────────────────────────────────────────────────────────────────────────────────────────────────

export class RedisStore implements StateStore {
  readonly #client: Client;
  readonly #keys: Keys;
  readonly #retention: number;
  readonly #feed = new ChangeFeed();
  readonly #follower: ChangeFollower;
  readonly #options: RedisStoreOptions;
  #closed = false;

  private constructor(client: Client, keys: Keys, follower: ChangeFollower, options: RedisStoreOptions) {
    this.#client = client;
    this.#keys = keys;
    this.#follower = follower;
    this.#retention = options.changeRetention ?? DEFAULT_CHANGE_RETENTION;
    this.#options = options;
  }

  /** Connects, checks the server (Redis ≥ 7) and the store's meta, and starts following changes. */
  static async open(options: RedisStoreOptions = {}): Promise<RedisStore> {
    const prefix = options.prefix ?? 'torpor:';
    if (/[{}]/.test(prefix)) {
      throw new TorporError('INVALID_ARGUMENT', `prefix: must not contain "{" or "}" (they pick hash slots)`, {
        field: 'prefix',
      });
    }
    for (const field of ['shards', 'changeRetention'] as const) {
      const value = options[field];
      if (value !== undefined && (!Number.isInteger(value) || value < 1)) {
        throw new TorporError('INVALID_ARGUMENT', `${field}: must be a positive integer, got ${value}`, { field });
      }
    }
    const client = createClient(options);
    const subscriber = client instanceof Cluster ? client.duplicate() : client.duplicate();
    try {
      await connect(client, options);
      await connect(subscriber, options);
      await checkServer(client);
      defineScripts(client);
      const shards = await readMeta(client, prefix, options.shards);
      const keys = new Keys(prefix, shards);
      const follower = new ChangeFollower(client, subscriber, keys);
      const store = new RedisStore(client, keys, follower, options);
      await follower.start(store.#feed);
      return store;
    } catch (err) {
      subscriber.disconnect();
      client.disconnect();
      throw err;
    }
  }

  /** Another client on the same data (its own connections), e.g. for a second worker in this process. */
  openAnother(): Promise<RedisStore> {
    return RedisStore.open({ ...this.#options, shards: this.#keys.shards });
  }

  // ── templates ────────────────────────────────────────────────────────────────────────────────────────────

  async createTemplate(t: Template): Promise<Template> {
    const { goldenSnapshot, ...rest } = t;
    const k = this.#keys;
    const result = await this.#write(
      'createTemplate',
      'g',
      [k.templatePrefix() + t.name, k.templateIndex()],
      [t.name, JSON.stringify(rest), goldenSnapshot ?? ''],
    );
    if (result === 'exists') {
      throw new TorporError('ALREADY_EXISTS', `template "${t.name}" already exists`, { field: 'name' });
    }
    return t;
  }

  async getTemplate(name: string): Promise<Template | undefined> {
    return parse<Template>(await this.#read('getRecord', [this.#keys.templatePrefix() + name], ['template']));
  }

  async listTemplates(opts?: ListOptions): Promise<Page<Template>> {
    const limit = pageLimit(opts);
    const [after] = opts?.cursor === undefined ? [] : decodeCursor(opts.cursor, 1);
    const k = this.#keys;
    const rows = await this.#page(k.templateIndex(), k.templatePrefix(), after, limit + 1, 'template');
    return toPage(
      rows.map((row) => parse<Template>(row)!),
      limit,
      (t) => [t.name],
    );
  }

  async setTemplateGolden(name: string, manifestKey: string): Promise<Template> {
    const json = await this.#write('setTemplateGolden', 'g', [this.#keys.templatePrefix() + name], [name, manifestKey]);
    const template = parse<Template>(json);
    if (!template) throw notFound('template', name);
    return template;
  }

  // ── spaces ───────────────────────────────────────────────────────────────────────────────────────────────

  async getSpace(name: string): Promise<Space | undefined> {
    const createdAt = await this.#client.hget(this.#keys.spaces(), name);
    return createdAt === null ? undefined : { name, createdAt };
  }

  async ensureSpace(name: string): Promise<Space> {
    const k = this.#keys;
    const createdAt = (await this.#plain('ensureSpace', [k.spaces(), k.spaceIndex()], [name, nowIso()])) as string;
    return { name, createdAt };
  }

  // ── actors ───────────────────────────────────────────────────────────────────────────────────────────────

  async createActor(a: Omit<Actor, 'version'>): Promise<Actor> {
    const actor: Actor = { ...a, version: 1 };
    // The space is recorded first, in its own slot: a crash in between leaves an empty space, never an actor
    // missing from the space index that cross-space listings walk.
    await this.ensureSpace(actor.space);
    const k = this.#keys;
    const result = await this.#write(
      'createActor',
      k.tagOfSpace(actor.space),
      [k.actorPrefix(actor.space) + actor.name, k.actorIndex(actor.space)],
      [actor.name, encodeActor(actor), actorKey(actor)],
    );
    if (result === 'exists') {
      throw new TorporError('ALREADY_EXISTS', `actor "${actorKey(actor)}" already exists`, { field: 'name' });
    }
    return actor;
  }

  async getActor(space: string, name: string): Promise<Actor | undefined> {
    const text = await this.#client.get(this.#keys.actorPrefix(space) + name);
    return text === null ? undefined : decodeActor(space, name, text);
  }

  async casActor(next: Actor, expectedVersion: number, fence?: Fence): Promise<Actor> {
    if (fence) checkFence(fence, next.space);
    const actor: Actor = { ...next, version: expectedVersion + 1, updatedAt: nowIso() };
    const k = this.#keys;
    const keys = [k.actorPrefix(actor.space) + actor.name, ...(fence ? [k.lease(fence.lease)] : [])];
    const [outcome, found] = (await this.#write('casActor', k.tagOfSpace(actor.space), keys, [
      String(expectedVersion),
      encodeActor(actor),
      actorKey(actor),
      String(fence?.token ?? ''),
      fence?.release ? '1' : '',
    ])) as [string, string?];
    if (outcome !== 'ok') throw casFailure(outcome, actor, expectedVersion, found, fence);
    return actor;
  }

  async deleteActor(space: string, name: string, expectedVersion: number, fence?: Fence): Promise<void> {
    if (fence) checkFence(fence, space);
    const k = this.#keys;
    const keys = [k.actorPrefix(space) + name, k.actorIndex(space), ...(fence ? [k.lease(fence.lease)] : [])];
    const [outcome, found] = (await this.#write('deleteActor', k.tagOfSpace(space), keys, [
      String(expectedVersion),
      name,
      actorKey({ space, name }),
      String(fence?.token ?? ''),
    ])) as [string, string?];
    if (outcome !== 'ok') throw casFailure(outcome, { space, name }, expectedVersion, found, fence);
  }

  async listActors(space: string | undefined, opts?: ListOptions): Promise<Page<Actor>> {
    const limit = pageLimit(opts);
    const after = opts?.cursor === undefined ? undefined : decodeCursor(opts.cursor, 2);
    const want = limit + 1;
    const rows: Actor[] = [];
    if (space !== undefined) {
      // As SQLite's `(space, name) > cursor` within one space.
      if (after === undefined || after[0]! < space) rows.push(...(await this.#actorPage(space, undefined, want)));
      else if (after[0] === space) rows.push(...(await this.#actorPage(space, after[1], want)));
    } else {
      let from = after === undefined ? '-' : `[${after[0]}`;
      for (;;) {
        const spaces = await this.#client.zrangebylex(this.#keys.spaceIndex(), from, '+', 'LIMIT', 0, SPACE_BATCH);
        for (const s of spaces) {
          const nameAfter = after !== undefined && s === after[0] ? after[1] : undefined;
          rows.push(...(await this.#actorPage(s, nameAfter, want - rows.length)));
          if (rows.length >= want) break;
        }
        if (rows.length >= want || spaces.length < SPACE_BATCH) break;
        from = `(${spaces[spaces.length - 1]}`;
      }
    }
    return toPage(rows, limit, (a) => [a.space, a.name]);
  }

  async #actorPage(space: string, after: string | undefined, count: number): Promise<Actor[]> {
    const k = this.#keys;
    const rows = await this.#page(k.actorIndex(space), k.actorPrefix(space), after, count, 'actor');
    return rows.map((row) => {
      const newline = row.indexOf('\n');
      return decodeActor(space, row.slice(0, newline), row.slice(newline + 1));
    });
  }

  // ── workers ──────────────────────────────────────────────────────────────────────────────────────────────

  /** Writes the record exactly as given, state and actor included (see SqliteStore.putWorker). */
  async putWorker(w: Worker): Promise<Worker> {
    const leaseMs = leaseTime(w.leaseExpiresAt);
    const { state, actor, leaseExpiresAt, ...rest } = w;
    const k = this.#keys;
    await this.#write(
      'putWorker',
      'w',
      [k.workerPrefix() + w.id, k.workerIndex(), k.freeIndex(w.runtime), k.freeIndex(w.runtime, w.node)],
      [w.id, JSON.stringify(rest), state, actor?.space ?? '', actor?.name ?? '', leaseExpiresAt, leaseMs],
    );
    return w;
  }

  async renewWorkerLease(id: string, leaseExpiresAt: string): Promise<boolean> {
    const leaseMs = leaseTime(leaseExpiresAt);
    const renewed = await this.#write(
      'renewWorkerLease',
      'w',
      [this.#keys.workerPrefix() + id],
      [id, leaseExpiresAt, leaseMs],
    );
    return renewed === 1;
  }

  async getWorker(id: string): Promise<Worker | undefined> {
    return parse<Worker>(await this.#read('getRecord', [this.#keys.workerPrefix() + id], ['worker']));
  }

  async listWorkers(opts?: ListOptions): Promise<Page<Worker>> {
    const limit = pageLimit(opts);
    const [after] = opts?.cursor === undefined ? [] : decodeCursor(opts.cursor, 1);
    const k = this.#keys;
    const rows = await this.#page(k.workerIndex(), k.workerPrefix(), after, limit + 1, 'worker');
    return toPage(
      rows.map((row) => parse<Worker>(row)!),
      limit,
      (w) => [w.id],
    );
  }

  /** Idempotent: deleting a worker that is already gone is not an error. */
  async deleteWorker(id: string): Promise<void> {
    const k = this.#keys;
    await this.#write('deleteWorker', 'w', [k.workerPrefix() + id, k.workerIndex()], [id]);
  }

  /** One script: preferred nodes' free indexes first, in order, then the runtime's; among the first free
   * workers of an index, one at random, so concurrent schedulers spread over the pool. */
  async claimWorker(filter: WorkerFilter, actor: ActorRef): Promise<Worker | undefined> {
    const k = this.#keys;
    const preferred = filter.workerId === undefined ? (filter.preferNodes ?? []) : [];
    const json = await this.#write(
      'claimWorker',
      'w',
      [k.freeIndex(filter.runtime), ...preferred.map((node) => k.freeIndex(filter.runtime, node))],
      [
        k.workerPrefix(),
        actor.space,
        actor.name,
        Math.random(),
        filter.workerId ?? '',
        ...(filter.excludeWorkers ?? []),
      ],
    );
    return parse<Worker>(json);
  }

  async releaseWorker(id: string, actor: ActorRef): Promise<boolean> {
    const json = await this.#write(
      'releaseWorker',
      'w',
      [this.#keys.workerPrefix() + id],
      [id, actor.space, actor.name],
    );
    return json !== null;
  }

  // ── leases ───────────────────────────────────────────────────────────────────────────────────────────────

  async acquireLease(key: string, holder: string, ttlMs: number): Promise<number | undefined> {
    checkTtl(ttlMs);
    const k = this.#keys;
    const token = await this.#plain('acquireLease', [k.lease(key), k.leaseCounter(key)], [holder, Math.ceil(ttlMs)]);
    return token === null ? undefined : Number(token);
  }

  async acquireActorLease(
    key: string,
    holder: string,
    ttlMs: number,
    actor: ActorRef,
  ): Promise<ActorLease | undefined> {
    checkTtl(ttlMs);
    checkLeaseOfSpace(key, actor.space, 'key');
    const k = this.#keys;
    const keys = [k.lease(key), k.leaseCounter(key), k.actorPrefix(actor.space) + actor.name];
    const reply = (await this.#plain('acquireActorLease', keys, [holder, Math.ceil(ttlMs)])) as
      | [number, string | null]
      | null;
    if (reply === null) return undefined;
    const [token, text] = reply;
    return { token: Number(token), actor: text === null ? undefined : decodeActor(actor.space, actor.name, text) };
  }

  async releaseLease(key: string, holder: string): Promise<void> {
    await this.#plain('releaseLease', [this.#keys.lease(key)], [holder]);
  }

  // ── snapshot writes ──────────────────────────────────────────────────────────────────────────────────────

  async recordSnapshotWrite(key: string, ttlMs: number): Promise<boolean> {
    checkTtl(ttlMs);
    const k = this.#keys;
    const keys = [k.snapshotWrites(), k.lease(SNAPSHOT_SWEEP_LEASE)];
    return Number(await this.#plain('recordSnapshotWrite', keys, [key, Math.ceil(ttlMs)])) === 1;
  }

  async endSnapshotWrite(key: string): Promise<void> {
    await this.#client.zrem(this.#keys.snapshotWrites(), key);
  }

  async listSnapshotWrites(): Promise<string[]> {
    return ((await this.#plain('listSnapshotWrites', [this.#keys.snapshotWrites()], [])) as string[]).map(String);
  }

  // ── watch, lifecycle ─────────────────────────────────────────────────────────────────────────────────────

  /** Changes made through any client of this store (any process) from now on, in the order they were made.
   * A change this client made just before calling watch may still be delivered. */
  watch(kinds: ChangeKind[], signal: AbortSignal): AsyncIterable<Change> {
    return this.#feed.subscribe(kinds, signal);
  }

  async close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    this.#feed.close();
    await this.#follower.stop();
    await this.#client.quit().catch(() => this.#client.disconnect());
  }

  // ── internals ────────────────────────────────────────────────────────────────────────────────────────────

  /** Runs a write script of the slot `tag`: its stream and the change convention come first. */
  #write(name: WriteScript, tag: string, keys: string[], args: (string | number)[]): Promise<Reply> {
    const k = this.#keys;
    return this.#plain(name, [k.stream(tag), ...keys], [k.channel, this.#retention, tag, ...args]);
  }

  #plain(name: WriteScript | PlainScript | ReadScript, keys: string[], args: (string | number)[]): Promise<Reply> {
    return script(this.#client, name)(keys.length, ...keys, ...args);
  }

  #read(name: ReadScript, keys: string[], args: string[]): Promise<Reply> {
    return this.#plain(name, keys, args);
  }

  async #page(index: string, recordPrefix: string, after: string | undefined, count: number, kind: string) {
    const min = after === undefined ? '-' : `(${after}`;
    return (await this.#read('page', [index], [recordPrefix, min, String(count), kind])) as string[];
  }
}

// ── following changes ────────────────────────────────────────────────────────────────────────────────────────

interface Sequenced {
  tag: string;
  seq: number;
  /** The change as published; read only when someone watches (a message is parsed then). */
  change: () => { kind: string; key: string; value: string | undefined };
}

/** Feeds a ChangeFeed from the change channel, filling gaps from the streams (see the top of this file). All
 * work runs through one queue, so changes are delivered in the order they were published. */
class ChangeFollower {
  readonly #client: Client;
  readonly #subscriber: Client;
  readonly #keys: Keys;
  /** The sequence number of the last change delivered (or skipped: no watcher) per tag. */
  readonly #last = new Map<string, number>();
  readonly #queue: (Sequenced | 'catch-up')[] = [];
  #feed: ChangeFeed | undefined;
  #draining: Promise<void> | undefined;
  #busy = false;
  #stopped = false;

  constructor(client: Client, subscriber: Client, keys: Keys) {
    this.#client = client;
    this.#subscriber = subscriber;
    this.#keys = keys;
  }

  /** Subscribes, then reads where each stream ends: changes published after that are delivered. */
  async start(feed: ChangeFeed): Promise<void> {
    this.#subscriber.on('message', (channel: string, message: string) => {
      if (channel === this.#keys.channel) this.#enqueue(parseMessage(message));
    });
    await this.#subscriber.subscribe(this.#keys.channel);
    await Promise.all(this.#keys.tags().map(async (tag) => this.#last.set(tag, await this.#lastSeq(tag))));
    this.#feed = feed;
    // After a reconnect ioredis re-subscribes without waiting for the reply; our own SUBSCRIBE's reply comes
    // after it, so once it is back every later change reaches us by Pub/Sub, and the streams hold the rest.
    this.#subscriber.on('ready', () => {
      this.#subscriber.subscribe(this.#keys.channel).then(
        () => this.#enqueue('catch-up'),
        () => {}, // disconnected again: the next 'ready' retries
      );
    });
    this.#drain();
  }

  async stop(): Promise<void> {
    this.#stopped = true;
    this.#queue.length = 0;
    await this.#draining;
    await this.#subscriber.quit().catch(() => this.#subscriber.disconnect());
  }

  #enqueue(item: Sequenced | 'catch-up'): void {
    if (this.#stopped) return;
    this.#queue.push(item);
    if (this.#feed) this.#drain();
  }

  #drain(): void {
    if (this.#busy) return;
    this.#busy = true; // before the loop runs: with nothing to await it finishes synchronously
    this.#draining = (async () => {
      try {
        for (let item = this.#queue.shift(); item && !this.#stopped; item = this.#queue.shift()) {
          try {
            if (item === 'catch-up') await this.#catchUp();
            else await this.#deliver(item);
          } catch {
            // A read failed (the connection broke): keep the item and try again shortly.
            this.#queue.unshift(item);
            setTimeout(() => this.#drain(), RETRY_MS).unref();
            break;
          }
        }
      } finally {
        this.#busy = false;
      }
    })();
  }

  async #deliver(item: Sequenced): Promise<void> {
    const last = this.#last.get(item.tag) ?? 0;
    if (item.seq <= last) return; // already delivered by a catch-up
    if (item.seq > last + 1 && this.#watched()) {
      const missed = await this.#range(item.tag, last, item.seq - 1);
      if (!this.#publish(item.tag, last, missed)) return;
    }
    this.#publish(item.tag, item.seq - 1, [item]);
  }

  async #catchUp(): Promise<void> {
    for (const tag of this.#keys.tags()) {
      if (!this.#watched()) {
        this.#last.set(tag, Math.max(this.#last.get(tag) ?? 0, await this.#lastSeq(tag)));
        continue;
      }
      for (;;) {
        const last = this.#last.get(tag) ?? 0;
        const missed = await this.#range(tag, last, undefined);
        if (missed.length === 0 || !this.#publish(tag, last, missed)) break;
      }
    }
  }

  /** Delivers `items` (consecutive changes of `tag` that should follow `after`); a hole means the stream was
   * trimmed past what we had: watchers are ended (they would otherwise keep a stale view without knowing). */
  #publish(tag: string, after: number, items: Sequenced[]): boolean {
    let expected = after + 1;
    for (const item of items) {
      if (item.seq !== expected) {
        this.#feed?.close();
        this.#last.set(tag, items[items.length - 1]!.seq);
        return false;
      }
      if (this.#watched()) this.#feed!.publish(toChange(item.change()));
      this.#last.set(tag, item.seq);
      expected++;
    }
    return true;
  }

  #watched(): boolean {
    return this.#feed?.watched ?? false;
  }

  async #lastSeq(tag: string): Promise<number> {
    const entries = (await this.#client.xrevrange(this.#keys.stream(tag), '+', '-', 'COUNT', 1)) as StreamEntry[];
    return entries.length === 0 ? 0 : sequence(entries[0]![0]);
  }

  /** Entries of `tag` after `after`, up to `until` (inclusive) or the end, at most 1000. */
  async #range(tag: string, after: number, until: number | undefined): Promise<Sequenced[]> {
    const end = until === undefined ? '+' : `0-${until}`;
    const entries = (await this.#client.xrange(
      this.#keys.stream(tag),
      `(0-${after}`,
      end,
      'COUNT',
      1000,
    )) as StreamEntry[];
    return entries.map(([id, fields]) => {
      const f = new Map<string, string>();
      for (let i = 0; i < fields.length; i += 2) f.set(fields[i]!, fields[i + 1]!);
      const change = { kind: f.get('k')!, key: f.get('key')!, value: f.get('v') };
      return { tag, seq: sequence(id), change: () => change };
    });
  }
}

type StreamEntry = [string, string[]];

function parseMessage(message: string): Sequenced {
  // `["<tag>","0-<n>",…]` (cjson.encode in emit): the tag and the sequence number are read without parsing the
  // record, which only a watcher needs. Tags and stream ids have no characters JSON escapes.
  const tagEnd = message.indexOf('"', 2);
  const idEnd = message.indexOf('"', tagEnd + 3);
  if (!message.startsWith('["') || message.slice(tagEnd, tagEnd + 3) !== '","' || idEnd < 0) {
    const [tag, id, kind, key, value] = JSON.parse(message) as [string, string, string, string, string?];
    return { tag, seq: sequence(id), change: () => ({ kind, key, value }) };
  }
  return {
    tag: message.slice(2, tagEnd),
    seq: sequence(message.slice(tagEnd + 3, idEnd)),
    change: () => {
      const [, , kind, key, value] = JSON.parse(message) as [string, string, string, string, string?];
      return { kind, key, value };
    },
  };
}

function toChange({ kind, key, value }: ReturnType<Sequenced['change']>): Change {
  if (value === undefined) return { kind: kind as ChangeKind, key, value: undefined };
  if (kind !== 'actor') return { kind: kind as ChangeKind, key, value: JSON.parse(value) };
  const slash = key.indexOf('/'); // an actor's change key is `<space>/<name>`; a space has no slash
  return { kind, key, value: decodeActor(key.slice(0, slash), key.slice(slash + 1), value) };
}

/** Stream ids are `0-<n>`: n counts the stream's changes. */
function sequence(id: string): number {
  return Number(id.slice(id.indexOf('-') + 1));
}

// ── connecting ───────────────────────────────────────────────────────────────────────────────────────────────

function createClient(options: RedisStoreOptions): Client {
  const common: RedisOptions = {
    lazyConnect: true,
    enableAutoPipelining: true,
    ...options.redis,
  };
  const url = options.url ? new URL(options.url) : undefined;
  const host = url?.hostname || options.host || '127.0.0.1';
  const port = Number(url?.port || options.port || 6379);
  if (!options.cluster) {
    return options.url ? new Redis(options.url, common) : new Redis({ ...common, host, port });
  }
  const auth: RedisOptions = {
    ...(url?.username ? { username: decodeURIComponent(url.username) } : {}),
    ...(url?.password ? { password: decodeURIComponent(url.password) } : {}),
    ...(url?.protocol === 'rediss:' ? { tls: {} } : {}),
  };
  return new Cluster([{ host, port }], {
    lazyConnect: true,
    enableAutoPipelining: true,
    redisOptions: { ...common, ...auth },
  });
}

async function connect(client: Client, options: RedisStoreOptions): Promise<void> {
  // Without a listener ioredis prints every connection error; they surface as rejected commands anyway.
  client.on('error', () => {});
  let timer: NodeJS.Timeout | undefined;
  try {
    // A cluster whose slots cannot be routed leaves connect() pending forever: bound it.
    const timeout = new Promise<never>((_, reject) => {
      timer = setTimeout(() => reject(new Error(`no answer in ${CONNECT_TIMEOUT_MS} ms`)), CONNECT_TIMEOUT_MS);
    });
    await Promise.race([client.connect(), timeout]);
  } catch (err) {
    throw new TorporError('RUNTIME_ERROR', `store: cannot reach redis at ${describeServer(options)}: ${message(err)}`, {
      field: 'store',
      cause: err,
    });
  } finally {
    clearTimeout(timer);
  }
}

async function checkServer(client: Client): Promise<void> {
  const info = await client.info('server');
  const version = /redis_version:(\S+)/.exec(info)?.[1] ?? '0';
  if (Number(version.split('.')[0]) < 7) {
    throw new TorporError('FAILED_PRECONDITION', `store: Redis 7 or newer is needed, the server is ${version}`, {
      field: 'store',
    });
  }
}

async function readMeta(client: Client, prefix: string, shards: number | undefined): Promise<number> {
  // Shards are not known yet, and the meta key does not depend on them.
  const meta = new Keys(prefix, 1).key('g', 'meta');
  const [schema, recorded] = (await script(client, 'meta')(1, meta, SCHEMA_VERSION, shards ?? DEFAULT_SHARDS)) as [
    string,
    string,
  ];
  if (Number(schema) > SCHEMA_VERSION) {
    throw new TorporError(
      'FAILED_PRECONDITION',
      `state store schema version ${schema} is newer than this build supports (${SCHEMA_VERSION})`,
    );
  }
  if (shards !== undefined && Number(recorded) !== shards) {
    throw new TorporError(
      'FAILED_PRECONDITION',
      `shards: this store was created with ${recorded} shards, not ${shards} (it cannot be changed)`,
      { field: 'shards' },
    );
  }
  return Number(recorded);
}

/** host:port only: never the URL, which may carry a password. */
function describeServer(options: RedisStoreOptions): string {
  if (options.url) {
    try {
      const url = new URL(options.url);
      return `${url.hostname}:${url.port || 6379}`;
    } catch {
      return 'an unparsable url';
    }
  }
  return `${options.host ?? '127.0.0.1'}:${options.port ?? 6379}`;
}

function message(err: unknown): string {
  return err instanceof Error ? err.message : String(err);
}

// ── helpers ──────────────────────────────────────────────────────────────────────────────────────────────────

function casFailure(
  outcome: string,
  ref: ActorRef,
  expectedVersion: number,
  found: string | undefined,
  fence: Fence | undefined,
): TorporError {
  if (outcome === 'not_found') return notFound('actor', actorKey(ref));
  if (outcome === 'lease_lost' && fence) return leaseLost(fence);
  return new TorporError(
    'CONFLICT',
    `actor "${actorKey(ref)}" changed: expected version ${expectedVersion}, found version ${found}`,
    { field: 'version' },
  );
}

function leaseTime(leaseExpiresAt: string): number {
  const at = Date.parse(leaseExpiresAt);
  if (Number.isNaN(at)) {
    throw new TorporError('INVALID_ARGUMENT', `leaseExpiresAt: not a timestamp: "${leaseExpiresAt}"`, {
      field: 'leaseExpiresAt',
    });
  }
  return at;
}

function parse<T>(json: Reply | undefined): T | undefined {
  return typeof json === 'string' ? (JSON.parse(json) as T) : undefined;
}

function actorKey(ref: ActorRef): string {
  return `${ref.space}/${ref.name}`;
}

function nowIso(): string {
  return new Date().toISOString();
}
