// Output like kubectl: a table for people, -o json|yaml for programs.
import { stringify } from 'yaml';
import type { Actor, Operation, Template, Worker } from '../core/types.ts';

export type OutputFormat = 'table' | 'json' | 'yaml';

function age(iso: string | undefined): string {
  if (!iso) return '-';
  const s = Math.max(0, Math.round((Date.now() - Date.parse(iso)) / 1000));
  return s < 120 ? `${s}s` : s < 7200 ? `${Math.round(s / 60)}m` : `${Math.round(s / 3600)}h`;
}

function table(headers: string[], rows: string[][]): string {
  const widths = headers.map((h, i) => Math.max(h.length, ...rows.map((r) => (r[i] ?? '').length)));
  const line = (cells: string[]) =>
    cells
      .map((c, i) => c.padEnd(widths[i]!))
      .join('   ')
      .trimEnd();
  return [line(headers), ...rows.map(line)].join('\n');
}

const COLUMNS = {
  actor: {
    headers: ['SPACE', 'NAME', 'TEMPLATE', 'STATUS', 'WORKER', 'ADDRESS', 'AGE'],
    row: (a: Actor) => [a.space, a.name, a.template, a.status, a.worker ?? '-', a.address ?? '-', age(a.createdAt)],
  },
  template: {
    headers: ['NAME', 'IMAGE', 'RUNTIME', 'PORT', 'GOLDEN', 'AGE'],
    row: (t: Template) => [
      t.name,
      t.image,
      t.runtime,
      String(t.port),
      t.goldenSnapshot ? 'yes' : 'no',
      age(t.createdAt),
    ],
  },
  image: {
    headers: ['REF', 'DIGEST', 'ROOTFS'],
    row: (i: { ref: string; digest: string; rootfs: string }) => [i.ref, i.digest, i.rootfs],
  },
  asset: {
    headers: ['NAME', 'SHA256', 'PATH'],
    row: (a: { name: string; sha256: string; path: string }) => [a.name, a.sha256, a.path],
  },
  worker: {
    headers: ['ID', 'NODE', 'RUNTIME', 'STATE', 'ACTOR', 'HOST'],
    row: (w: Worker) => [w.id, w.node, w.runtime, w.state, w.actor ? `${w.actor.space}/${w.actor.name}` : '-', w.host],
  },
} as const;

export type Kind = keyof typeof COLUMNS;

export function render(kind: Kind, value: unknown, format: OutputFormat): string {
  if (format === 'json') return JSON.stringify(value, null, 2);
  if (format === 'yaml') return stringify(value).trimEnd();
  const items = (value as { items?: unknown[] }).items ?? [value];
  const cols = COLUMNS[kind] as { headers: readonly string[]; row: (x: never) => string[] };
  return table(
    [...cols.headers],
    items.map((i) => cols.row(i as never)),
  );
}

/** `torpor actor describe`: the actor's fields, then its operations (newest first) with their phases. */
export function describeActor(a: Actor, operations: Operation[]): string {
  const fields: [string, string][] = [
    ['Name', a.name],
    ['Space', a.space],
    ['Template', a.template],
    ['Status', a.status],
    ['Reason', a.reason ?? '-'],
    ['Worker', a.worker ? `${a.worker} (node ${a.node ?? '?'})` : '-'],
    ['Address', a.address ?? '-'],
    ['Snapshot', a.snapshot ?? '-'],
    ['Older snapshots', String(a.history.length)],
    [
      'Labels',
      Object.entries(a.labels)
        .map(([k, v]) => `${k}=${v}`)
        .join(',') || '-',
    ],
    ['Created', `${a.createdAt} (${age(a.createdAt)} ago)`],
    ['Last activity', `${a.lastActivity} (${age(a.lastActivity)} ago)`],
  ];
  const width = Math.max(...fields.map(([k]) => k.length)) + 1;
  const head = fields.map(([k, v]) => `${`${k}:`.padEnd(width)} ${v}`).join('\n');
  if (operations.length === 0) return `${head}\nOperations:     none`;
  const rows = operations.map((op) => [
    op.kind,
    op.startedAt,
    op.error ? 'error' : op.finishedAt ? 'ok' : 'running',
    op.phases.total === undefined ? '-' : `${op.phases.total} ms`,
    Object.entries(op.phases)
      .filter(([name]) => name !== 'total')
      .map(([name, ms]) => `${name}=${ms}`)
      .join(' ') + (op.error ? `  (${op.error})` : ''),
  ]);
  return `${head}\nOperations (newest first):\n${table(['KIND', 'STARTED', 'RESULT', 'TOTAL', 'PHASES (ms)'], rows)
    .split('\n')
    .map((l) => `  ${l}`)
    .join('\n')}`;
}
