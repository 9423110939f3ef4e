// The compact text RedisStore keeps an actor as: `<version>\n<JSON>`, where the JSON omits what the key already
// says (space, name), the version (before the newline, where scripts read it) and empty defaults (labels,
// history), names fields with one or two letters, and writes the actor's own snapshot keys relative to
// `snapshots/<space>/<name>/`. A suspended actor takes about 550 bytes instead of 780, which is what keeps a
// Redis at ≤ 1 KiB per suspended actor (bench/store.ts, `memory`). Plain object renaming: no compression, whose
// CPU would land on every read and compare-and-set.
import type { Actor, Operation } from '../core/types.ts';

type Names = Record<string, string>;

const ACTOR: Names = {
  template: 't',
  status: 's',
  labels: 'l',
  snapshot: 'sn',
  history: 'h',
  worker: 'w',
  node: 'n',
  address: 'a',
  localSnapshot: 'ls',
  pendingSnapshot: 'ps',
  transitionDeadline: 'td',
  reason: 'r',
  lastOperation: 'o',
  lastActivity: 'la',
  createdAt: 'c',
  updatedAt: 'u',
};
const OPERATION: Names = {
  id: 'i',
  kind: 'k',
  startedAt: 's',
  finishedAt: 'f',
  phases: 'p',
  snapshot: 'sn',
  error: 'e',
};
const SNAPSHOT_STATS: Names = {
  rawBytes: 'r',
  storedBytes: 's',
  uploadedChunks: 'u',
  reusedChunks: 'ru',
  zeroChunks: 'z',
  deltaFiles: 'd',
};
const inverse = (names: Names): Names => Object.fromEntries(Object.entries(names).map(([k, v]) => [v, k]));
const ACTOR_LONG = inverse(ACTOR);
const OPERATION_LONG = inverse(OPERATION);
const SNAPSHOT_STATS_LONG = inverse(SNAPSHOT_STATS);

/** Fields of an actor that hold manifest keys, often the actor's own (`snapshots/<space>/<name>/…`). */
const SNAPSHOT_FIELDS = new Set(['snapshot', 'pendingSnapshot']);
const OWN = '~/';

/** A key under the actor's own prefix as `~/<rest>`; a key that happens to start with `~` gets one more. */
function shortKey(key: string, own: string): string {
  if (key.startsWith(own)) return OWN + key.slice(own.length);
  return key.startsWith('~') ? `~${key}` : key;
}

function longKey(key: string, own: string): string {
  if (key.startsWith(OWN)) return own + key.slice(OWN.length);
  return key.startsWith('~~') ? key.slice(1) : key;
}

/** Renames the fields of `o` by `names`; fields the table does not know keep their name (a newer build's). Plain
 * loops: this runs on every actor read and write. */
function rename(o: Record<string, unknown>, names: Names): Record<string, unknown> {
  const out: Record<string, unknown> = {};
  for (const k in o) {
    const v = o[k];
    if (v !== undefined) out[names[k] ?? k] = v;
  }
  return out;
}

function isEmpty(o: object): boolean {
  for (const _ in o) return false;
  return true;
}

function ownPrefix(space: string, name: string): string {
  return `snapshots/${space}/${name}/`;
}

export function encodeActor(actor: Actor): string {
  const own = ownPrefix(actor.space, actor.name);
  const fields = actor as unknown as Record<string, unknown>;
  const out: Record<string, unknown> = {};
  for (const k in fields) {
    let v = fields[k];
    if (v === undefined || k === 'space' || k === 'name' || k === 'version') continue;
    if (SNAPSHOT_FIELDS.has(k) && typeof v === 'string') v = shortKey(v, own);
    else if (k === 'history') {
      if (actor.history.length === 0) continue;
      v = actor.history.map((key) => shortKey(key, own));
    } else if (k === 'labels' && isEmpty(actor.labels)) continue;
    else if (k === 'lastOperation') v = encodeOperation(v as Operation);
    out[ACTOR[k] ?? k] = v;
  }
  return `${actor.version}\n${JSON.stringify(out)}`;
}

function encodeOperation(op: Operation): Record<string, unknown> {
  const o = rename(op as unknown as Record<string, unknown>, OPERATION);
  if (op.snapshot) o[OPERATION.snapshot!] = rename(op.snapshot, SNAPSHOT_STATS);
  return o;
}

export function decodeActor(space: string, name: string, text: string): Actor {
  const newline = text.indexOf('\n');
  const own = ownPrefix(space, name);
  const stored = JSON.parse(text.slice(newline + 1)) as Record<string, unknown>;
  const actor: Record<string, unknown> = {
    space,
    name,
    version: Number(text.slice(0, newline)),
    labels: {},
    history: [],
  };
  for (const k in stored) {
    const field = ACTOR_LONG[k] ?? k;
    let v = stored[k];
    if (SNAPSHOT_FIELDS.has(field) && typeof v === 'string') v = longKey(v, own);
    else if (field === 'history') v = (v as string[]).map((key) => longKey(key, own));
    else if (field === 'lastOperation') v = decodeOperation(v as Record<string, unknown>);
    actor[field] = v;
  }
  return actor as unknown as Actor;
}

function decodeOperation(stored: Record<string, unknown>): Operation {
  const op = rename(stored, OPERATION_LONG);
  if (op.snapshot) op.snapshot = rename(op.snapshot as Record<string, unknown>, SNAPSHOT_STATS_LONG);
  return op as unknown as Operation;
}
