// SqliteStore: the embedded StateStore (no external services). Records are stored whole as JSON, next to the
// columns we filter, order and compare-and-set on. Several SqliteStore instances — in one process or in several —
// may open the same file: every read-modify-write is a single SQL statement or a BEGIN IMMEDIATE transaction, so
// SQLite's write lock makes it atomic across connections.
//
// node:sqlite is synchronous: a method never yields to the event loop between its statements, so within one
// process a transaction is never interleaved with another; across processes `busy_timeout` makes a writer wait
// for the lock instead of failing.
import { DatabaseSync, type SQLInputValue, type StatementSync } from 'node:sqlite';
import { notFound, TorporError } from '../core/errors.ts';
import type { Actor, ActorRef, Page, Space, Template, Worker, WorkerFilter } from '../core/types.ts';
import { ChangeFeed } from './change-feed.ts';
import { decodeCursor, pageLimit, toPage } from './cursor.ts';
import { checkFence, checkLeaseOfSpace, checkTtl, leaseLost } from './fence.ts';
import {
  type ActorLease,
  type Change,
  type ChangeKind,
  type Fence,
  type ListOptions,
  SNAPSHOT_SWEEP_LEASE,
  type StateStore,
} from './store.ts';

const BUSY_TIMEOUT_MS = 5000;

/** Schema migrations, applied in order; the schema version is the number applied. Never edit a released one. */
const MIGRATIONS: readonly string[] = [
  `
  CREATE TABLE spaces (name TEXT PRIMARY KEY, created_at TEXT NOT NULL) WITHOUT ROWID;
  CREATE TABLE templates (name TEXT PRIMARY KEY, json TEXT NOT NULL) WITHOUT ROWID;
  CREATE TABLE actors (
    space TEXT NOT NULL REFERENCES spaces(name),
    name TEXT NOT NULL,
    version INTEGER NOT NULL,
    status TEXT NOT NULL,
    template TEXT NOT NULL,
    json TEXT NOT NULL,
    PRIMARY KEY (space, name)
  ) WITHOUT ROWID;
  CREATE INDEX actors_status ON actors (status);
  CREATE TABLE workers (
    id TEXT PRIMARY KEY,
    node TEXT NOT NULL,
    runtime TEXT NOT NULL,
    state TEXT NOT NULL,
    lease_expires_at INTEGER NOT NULL,
    actor_space TEXT,
    actor_name TEXT,
    json TEXT NOT NULL
  ) WITHOUT ROWID;
  CREATE INDEX workers_claimable ON workers (runtime, state, lease_expires_at);
  CREATE INDEX workers_actor ON workers (actor_space, actor_name);
  CREATE TABLE leases (key TEXT PRIMARY KEY, holder TEXT NOT NULL, expires_at INTEGER NOT NULL) WITHOUT ROWID;
  `,
  // Fencing tokens. A released lease keeps its row (expired) so the key's next holding still gets a higher token.
  `ALTER TABLE leases ADD COLUMN token INTEGER NOT NULL DEFAULT 1;`,
  `CREATE TABLE snapshot_writes (key TEXT PRIMARY KEY, expires_at INTEGER NOT NULL) WITHOUT ROWID;`,
];

type Row = Record<string, unknown>;

export class SqliteStore implements StateStore {
  readonly #db: DatabaseSync;
  readonly #statements = new Map<string, StatementSync>();
  readonly #feed = new ChangeFeed();

  private constructor(db: DatabaseSync) {
    this.#db = db;
  }

  /** Opens (creating or migrating) the store at `path`; ':memory:' gives a private, throw-away store. */
  static open(path: string): SqliteStore {
    const db = new DatabaseSync(path);
    try {
      // busy_timeout first: switching to WAL itself needs the lock when another process opens the file too.
      db.exec(`PRAGMA busy_timeout = ${BUSY_TIMEOUT_MS}`);
      db.exec('PRAGMA journal_mode = WAL');
      db.exec('PRAGMA foreign_keys = ON');
      const store = new SqliteStore(db);
      store.#migrate();
      return store;
    } catch (err) {
      db.close();
      throw err;
    }
  }

  // ── templates ────────────────────────────────────────────────────────────────────────────────────────────

  async createTemplate(t: Template): Promise<Template> {
    const inserted = this.#run('INSERT INTO templates (name, json) VALUES (?, ?) ON CONFLICT DO NOTHING', [
      t.name,
      JSON.stringify(t),
    ]);
    if (inserted === 0) {
      throw new TorporError('ALREADY_EXISTS', `template "${t.name}" already exists`, { field: 'name' });
    }
    this.#publish('template', t.name, t);
    return t;
  }

  async getTemplate(name: string): Promise<Template | undefined> {
    return parseJson<Template>(this.#get('SELECT json FROM templates WHERE name = ?', [name]));
  }

  async listTemplates(opts?: ListOptions): Promise<Page<Template>> {
    const limit = pageLimit(opts);
    const [after] = opts?.cursor === undefined ? [] : decodeCursor(opts.cursor, 1);
    const rows = this.#all(
      after === undefined
        ? 'SELECT json FROM templates ORDER BY name LIMIT ?'
        : 'SELECT json FROM templates WHERE name > ? ORDER BY name LIMIT ?',
      after === undefined ? [limit + 1] : [after, limit + 1],
    );
    return toPage(
      rows.map((row) => parseJson<Template>(row)!),
      limit,
      (t) => [t.name],
    );
  }

  async setTemplateGolden(name: string, manifestKey: string): Promise<Template> {
    const row = this.#get(
      `UPDATE templates SET json = json_set(json, '$.goldenSnapshot', ?) WHERE name = ? RETURNING json`,
      [manifestKey, name],
    );
    const template = parseJson<Template>(row);
    if (!template) throw notFound('template', name);
    this.#publish('template', name, template);
    return template;
  }

  // ── spaces ───────────────────────────────────────────────────────────────────────────────────────────────

  async getSpace(name: string): Promise<Space | undefined> {
    return toSpace(this.#get('SELECT name, created_at FROM spaces WHERE name = ?', [name]));
  }

  async ensureSpace(name: string): Promise<Space> {
    return this.#ensureSpace(name);
  }

  #ensureSpace(name: string): Space {
    this.#run('INSERT INTO spaces (name, created_at) VALUES (?, ?) ON CONFLICT DO NOTHING', [name, nowIso()]);
    return toSpace(this.#get('SELECT name, created_at FROM spaces WHERE name = ?', [name]))!;
  }

  // ── actors ───────────────────────────────────────────────────────────────────────────────────────────────

  async createActor(a: Omit<Actor, 'version'>): Promise<Actor> {
    const actor: Actor = { ...a, version: 1 };
    const inserted = this.#immediate(() => {
      this.#ensureSpace(actor.space);
      return this.#run(
        `INSERT INTO actors (space, name, version, status, template, json) VALUES (?, ?, ?, ?, ?, ?)
         ON CONFLICT DO NOTHING`,
        [actor.space, actor.name, actor.version, actor.status, actor.template, JSON.stringify(actor)],
      );
    });
    if (inserted === 0) {
      throw new TorporError('ALREADY_EXISTS', `actor "${actorKey(actor)}" already exists`, { field: 'name' });
    }
    this.#publish('actor', actorKey(actor), actor);
    return actor;
  }

  async getActor(space: string, name: string): Promise<Actor | undefined> {
    return parseJson<Actor>(this.#get('SELECT json FROM actors WHERE space = ? AND name = ?', [space, name]));
  }

  async casActor(next: Actor, expectedVersion: number, fence?: Fence): Promise<Actor> {
    if (fence) checkFence(fence, next.space);
    const actor: Actor = { ...next, version: expectedVersion + 1, updatedAt: nowIso() };
    const changed = this.#run(
      `UPDATE actors SET version = :version, status = :status, template = :template, json = :json
       WHERE space = :space AND name = :name AND version = :expected AND ${FENCE_HOLDS}`,
      {
        version: actor.version,
        status: actor.status,
        template: actor.template,
        json: JSON.stringify(actor),
        space: actor.space,
        name: actor.name,
        expected: expectedVersion,
        ...fenceParams(fence),
      },
    );
    if (changed === 0) throw this.#casFailure(actor, expectedVersion, fence);
    if (fence?.release)
      this.#run('UPDATE leases SET expires_at = 0 WHERE key = ? AND token = ?', [fence.lease, fence.token]);
    this.#publish('actor', actorKey(actor), actor);
    return actor;
  }

  async deleteActor(space: string, name: string, expectedVersion: number, fence?: Fence): Promise<void> {
    if (fence) checkFence(fence, space);
    const changed = this.#run(
      `DELETE FROM actors WHERE space = :space AND name = :name AND version = :expected AND ${FENCE_HOLDS}`,
      { space, name, expected: expectedVersion, ...fenceParams(fence) },
    );
    if (changed === 0) throw this.#casFailure({ space, name }, expectedVersion, fence);
    this.#publish('actor', actorKey({ space, name }), undefined);
  }

  /** Explains why a versioned write changed nothing. Read after the fact: each answer was true at some point
   * after the write was attempted, which is all a caller holding a stale version or lease can act on. A lost
   * lease is reported before a stale version: re-reading the actor cannot cure it. */
  #casFailure(ref: ActorRef, expectedVersion: number, fence: Fence | undefined): TorporError {
    const row = this.#get('SELECT version FROM actors WHERE space = ? AND name = ?', [ref.space, ref.name]);
    if (!row) return notFound('actor', actorKey(ref));
    if (fence && !this.#get(`SELECT ${FENCE_HOLDS} AS holds`, fenceParams(fence))?.['holds']) return leaseLost(fence);
    return new TorporError(
      'CONFLICT',
      `actor "${actorKey(ref)}" changed: expected version ${expectedVersion}, found version ${row['version']}`,
      { field: 'version' },
    );
  }

  async listActors(space: string | undefined, opts?: ListOptions): Promise<Page<Actor>> {
    const limit = pageLimit(opts);
    const after = opts?.cursor === undefined ? undefined : decodeCursor(opts.cursor, 2);
    const where: string[] = [];
    const params: SQLInputValue[] = [];
    if (space !== undefined) {
      where.push('space = ?');
      params.push(space);
    }
    if (after !== undefined) {
      where.push('(space, name) > (?, ?)');
      params.push(...after);
    }
    const filter = where.length === 0 ? '' : `WHERE ${where.join(' AND ')}`;
    const rows = this.#all(`SELECT json FROM actors ${filter} ORDER BY space, name LIMIT ?`, [...params, limit + 1]);
    return toPage(
      rows.map((row) => parseJson<Actor>(row)!),
      limit,
      (a) => [a.space, a.name],
    );
  }

  // ── workers ──────────────────────────────────────────────────────────────────────────────────────────────

  /** Writes the record exactly as given, state and actor included: the agent that owns a worker is the source
   * of truth for it, so a lease renewal must carry the worker's current state and actor (re-read it first).
   * Renewing with a stale `state: 'free'` would free a worker that is still serving an actor. */
  async putWorker(w: Worker): Promise<Worker> {
    const leaseExpiresAt = Date.parse(w.leaseExpiresAt);
    if (Number.isNaN(leaseExpiresAt)) {
      throw new TorporError('INVALID_ARGUMENT', `leaseExpiresAt: not a timestamp: "${w.leaseExpiresAt}"`, {
        field: 'leaseExpiresAt',
      });
    }
    this.#run(
      `INSERT INTO workers (id, node, runtime, state, lease_expires_at, actor_space, actor_name, json)
       VALUES (?, ?, ?, ?, ?, ?, ?, ?)
       ON CONFLICT (id) DO UPDATE SET node = excluded.node, runtime = excluded.runtime, state = excluded.state,
         lease_expires_at = excluded.lease_expires_at, actor_space = excluded.actor_space,
         actor_name = excluded.actor_name, json = excluded.json`,
      [
        w.id,
        w.node,
        w.runtime,
        w.state,
        leaseExpiresAt,
        w.actor?.space ?? null,
        w.actor?.name ?? null,
        JSON.stringify(w),
      ],
    );
    this.#publish('worker', w.id, w);
    return w;
  }

  async getWorker(id: string): Promise<Worker | undefined> {
    return parseJson<Worker>(this.#get('SELECT json FROM workers WHERE id = ?', [id]));
  }

  async listWorkers(opts?: ListOptions): Promise<Page<Worker>> {
    const limit = pageLimit(opts);
    const [after] = opts?.cursor === undefined ? [] : decodeCursor(opts.cursor, 1);
    const rows = this.#all(
      after === undefined
        ? 'SELECT json FROM workers ORDER BY id LIMIT ?'
        : 'SELECT json FROM workers WHERE id > ? ORDER BY id LIMIT ?',
      after === undefined ? [limit + 1] : [after, limit + 1],
    );
    return toPage(
      rows.map((row) => parseJson<Worker>(row)!),
      limit,
      (w) => [w.id],
    );
  }

  /** Idempotent: deleting a worker that is already gone is not an error (agents and reconcilers race to it). */
  async renewWorkerLease(id: string, leaseExpiresAt: string): Promise<boolean> {
    const at = Date.parse(leaseExpiresAt);
    if (Number.isNaN(at)) {
      throw new TorporError('INVALID_ARGUMENT', `leaseExpiresAt: not a timestamp: "${leaseExpiresAt}"`, {
        field: 'leaseExpiresAt',
      });
    }
    const row = this.#get(
      `UPDATE workers SET lease_expires_at = ?, json = json_set(json, '$.leaseExpiresAt', ?) WHERE id = ? RETURNING json`,
      [at, leaseExpiresAt, id],
    );
    return row !== undefined;
  }

  async deleteWorker(id: string): Promise<void> {
    const deleted = this.#run('DELETE FROM workers WHERE id = ?', [id]);
    if (deleted > 0) this.#publish('worker', id, undefined);
  }

  /** One UPDATE whose subquery picks the candidate: SQLite takes the write lock before the statement reads, so
   * no other connection can claim the same worker between the pick and the write. Preferred nodes come first,
   * in the order given; ties are broken at random so concurrent schedulers spread over the pool. */
  async claimWorker(filter: WorkerFilter, actor: ActorRef): Promise<Worker | undefined> {
    const row = this.#get(
      `UPDATE workers
       SET state = 'busy', actor_space = :space, actor_name = :name,
           json = json_set(json, '$.state', 'busy', '$.actor', json(:actor))
       WHERE state = 'free' AND id = (
         SELECT w.id FROM workers w
         LEFT JOIN (SELECT value AS node, min(key) AS rank FROM json_each(:prefer) GROUP BY value) p
           ON p.node = w.node
         WHERE w.runtime = :runtime AND w.state = 'free' AND w.lease_expires_at > :now
           AND (:workerId IS NULL OR w.id = :workerId)
           AND w.id NOT IN (SELECT value FROM json_each(:exclude))
         ORDER BY p.rank IS NULL, p.rank, random()
         LIMIT 1)
       RETURNING json`,
      {
        space: actor.space,
        name: actor.name,
        actor: JSON.stringify({ space: actor.space, name: actor.name }),
        prefer: JSON.stringify(filter.preferNodes ?? []),
        runtime: filter.runtime,
        now: Date.now(),
        workerId: filter.workerId ?? null,
        exclude: JSON.stringify(filter.excludeWorkers ?? []),
      },
    );
    const worker = parseJson<Worker>(row);
    if (worker) this.#publish('worker', worker.id, worker);
    return worker;
  }

  async releaseWorker(id: string, actor: ActorRef): Promise<boolean> {
    const row = this.#get(
      `UPDATE workers
       SET state = 'free', actor_space = NULL, actor_name = NULL,
           json = json_set(json_remove(json, '$.actor'), '$.state', 'free')
       WHERE id = ? AND state = 'busy' AND actor_space = ? AND actor_name = ?
       RETURNING json`,
      [id, actor.space, actor.name],
    );
    const worker = parseJson<Worker>(row);
    if (worker) this.#publish('worker', worker.id, worker);
    return worker !== undefined;
  }

  // ── leases ───────────────────────────────────────────────────────────────────────────────────────────────

  async acquireLease(key: string, holder: string, ttlMs: number): Promise<number | undefined> {
    checkTtl(ttlMs);
    const now = Date.now();
    // The upsert's WHERE decides: take over an ended lease or extend our own live one, else leave it (no row).
    // Only an extension of a live holding keeps the token; every new holding gets the next one.
    const row = this.#get(
      `INSERT INTO leases (key, holder, expires_at, token) VALUES (:key, :holder, :expires, 1)
       ON CONFLICT (key) DO UPDATE SET holder = excluded.holder, expires_at = excluded.expires_at,
         token = CASE WHEN leases.holder = excluded.holder AND leases.expires_at > :now
                 THEN leases.token ELSE leases.token + 1 END
       WHERE leases.holder = excluded.holder OR leases.expires_at <= :now
       RETURNING token`,
      { key, holder, expires: now + Math.ceil(ttlMs), now },
    );
    return row === undefined ? undefined : Number(row['token']);
  }

  async acquireActorLease(
    key: string,
    holder: string,
    ttlMs: number,
    actor: ActorRef,
  ): Promise<ActorLease | undefined> {
    checkLeaseOfSpace(key, actor.space, 'key');
    // The read follows the acquisition, as one call would: a file has no round-trip to save.
    const token = await this.acquireLease(key, holder, ttlMs);
    return token === undefined ? undefined : { token, actor: await this.getActor(actor.space, actor.name) };
  }

  /** Ends the holding but keeps the row, so the key's token keeps growing. */
  async releaseLease(key: string, holder: string): Promise<void> {
    this.#run('UPDATE leases SET expires_at = 0 WHERE key = ? AND holder = ?', [key, holder]);
  }

  // ── snapshot writes ──────────────────────────────────────────────────────────────────────────────────────

  async recordSnapshotWrite(key: string, ttlMs: number): Promise<boolean> {
    checkTtl(ttlMs);
    const now = Date.now();
    // One statement, so the check of the sweep lease and the insert are atomic: a write already in flight is
    // extended; a new one is refused while a sweep holds its lease.
    const row = this.#get(
      `INSERT INTO snapshot_writes (key, expires_at)
         SELECT :key, :expires WHERE NOT EXISTS (SELECT 1 FROM leases WHERE key = :sweep AND expires_at > :now)
           OR EXISTS (SELECT 1 FROM snapshot_writes WHERE key = :key AND expires_at > :now)
       ON CONFLICT (key) DO UPDATE SET expires_at = excluded.expires_at
       RETURNING key`,
      { key, expires: now + Math.ceil(ttlMs), now, sweep: SNAPSHOT_SWEEP_LEASE },
    );
    return row !== undefined;
  }

  async endSnapshotWrite(key: string): Promise<void> {
    this.#run('DELETE FROM snapshot_writes WHERE key = ?', [key]);
  }

  async listSnapshotWrites(): Promise<string[]> {
    const now = Date.now();
    this.#run('DELETE FROM snapshot_writes WHERE expires_at <= ?', [now]);
    return this.#all('SELECT key FROM snapshot_writes', []).map((row) => String(row['key']));
  }

  // ── watch, lifecycle ─────────────────────────────────────────────────────────────────────────────────────

  watch(kinds: ChangeKind[], signal: AbortSignal): AsyncIterable<Change> {
    return this.#feed.subscribe(kinds, signal);
  }

  async close(): Promise<void> {
    if (!this.#db.isOpen) return;
    this.#feed.close();
    this.#statements.clear();
    this.#db.close();
  }

  // ── internals ────────────────────────────────────────────────────────────────────────────────────────────

  #migrate(): void {
    this.#immediate(() => {
      this.#db.exec('CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID');
      const current = Number(this.#get(`SELECT value FROM meta WHERE key = 'schema_version'`, [])?.['value'] ?? 0);
      if (current > MIGRATIONS.length) {
        // A newer Torpor wrote this file; guessing at its schema could corrupt it.
        throw new TorporError(
          'FAILED_PRECONDITION',
          `state store schema version ${current} is newer than this build supports (${MIGRATIONS.length})`,
        );
      }
      for (const migration of MIGRATIONS.slice(current)) this.#db.exec(migration);
      this.#run(
        `INSERT INTO meta (key, value) VALUES ('schema_version', ?)
         ON CONFLICT (key) DO UPDATE SET value = excluded.value`,
        [String(MIGRATIONS.length)],
      );
    });
  }

  /** Runs `fn` holding the database's write lock from the start, so what it reads is still true when it writes. */
  #immediate<T>(fn: () => T): T {
    this.#db.exec('BEGIN IMMEDIATE');
    try {
      const result = fn();
      this.#db.exec('COMMIT');
      return result;
    } catch (err) {
      this.#db.exec('ROLLBACK');
      throw err;
    }
  }

  #statement(sql: string): StatementSync {
    let statement = this.#statements.get(sql);
    if (!statement) {
      statement = this.#db.prepare(sql);
      this.#statements.set(sql, statement);
    }
    return statement;
  }

  #run(sql: string, params: SQLInputValue[] | Record<string, SQLInputValue>): number {
    const statement = this.#statement(sql);
    const result = Array.isArray(params) ? statement.run(...params) : statement.run(params);
    return Number(result.changes);
  }

  #get(sql: string, params: SQLInputValue[] | Record<string, SQLInputValue>): Row | undefined {
    const statement = this.#statement(sql);
    return (Array.isArray(params) ? statement.get(...params) : statement.get(params)) as Row | undefined;
  }

  #all(sql: string, params: SQLInputValue[]): Row[] {
    return this.#statement(sql).all(...params) as Row[];
  }

  #publish(kind: ChangeKind, key: string, value: Change['value']): void {
    this.#feed.publish({ kind, key, value });
  }
}

/** SQL condition (on the leases table, or as a subquery) that the write's fence, if any, is still current. */
const FENCE_HOLDS = `(:lease IS NULL OR EXISTS (
  SELECT 1 FROM leases WHERE key = :lease AND token = :token AND expires_at > :now))`;

function fenceParams(fence: Fence | undefined): Record<string, SQLInputValue> {
  return { lease: fence?.lease ?? null, token: fence?.token ?? null, now: Date.now() };
}

function actorKey(ref: ActorRef): string {
  return `${ref.space}/${ref.name}`;
}

function nowIso(): string {
  return new Date().toISOString();
}

function parseJson<T>(row: Row | undefined): T | undefined {
  return row === undefined ? undefined : (JSON.parse(row['json'] as string) as T);
}

function toSpace(row: Row | undefined): Space | undefined {
  return row === undefined ? undefined : { name: row['name'] as string, createdAt: row['created_at'] as string };
}
