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

/** Renames the fields of `o` by `names`; fields the table does not know keep their name (a newer build's). */
function rename(o: object, names: Names): Record<string, unknown> {
  const out: Record<string, unknown> = {};
  for (const [k, v] of Object.entries(o)) if (v !== undefined) out[names[k] ?? k] = v;
  return out;
}

function ownPrefix(space: string, name: string): string {
  return `snapshots/${space}/${name}/`;
}

export function encodeActor(actor: Actor): string {
  const own = ownPrefix(actor.space, actor.name);
  const { space: _s, name: _n, version, ...rest } = actor;
  const fields: Record<string, unknown> = { ...rest };
  for (const f of SNAPSHOT_FIELDS) if (typeof fields[f] === 'string') fields[f] = shortKey(fields[f], own);
  fields.history = actor.history.length ? actor.history.map((k) => shortKey(k, own)) : undefined;
  if (Object.keys(actor.labels).length === 0) fields.labels = undefined;
  const op = actor.lastOperation;
  if (op) {
    const o = rename(op, OPERATION);
    if (op.snapshot) o[OPERATION.snapshot!] = rename(op.snapshot, SNAPSHOT_STATS);
    fields.lastOperation = o;
  }
  return `${version}\n${JSON.stringify(rename(fields, ACTOR))}`;
}

export function decodeActor(space: string, name: string, text: string): Actor {
  const newline = text.indexOf('\n');
  const own = ownPrefix(space, name);
  const fields = rename(JSON.parse(text.slice(newline + 1)) as object, ACTOR_LONG);
  for (const f of SNAPSHOT_FIELDS) if (typeof fields[f] === 'string') fields[f] = longKey(fields[f], own);
  fields.history = ((fields.history as string[] | undefined) ?? []).map((k) => longKey(k, own));
  fields.labels ??= {};
  if (fields.lastOperation) {
    const op = rename(fields.lastOperation as object, OPERATION_LONG);
    if (op.snapshot) op.snapshot = rename(op.snapshot as object, SNAPSHOT_STATS_LONG);
    fields.lastOperation = op as unknown as Operation;
  }
  return { space, name, version: Number(text.slice(0, newline)), ...fields } as Actor;
}
