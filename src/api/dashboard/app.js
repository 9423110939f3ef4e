// Torpor dashboard: state comes from the server's event stream (/v1/events: one snapshot, then every change);
// actions go to the REST API. Everything is rendered with textContent: names and labels are never HTML.

const STATE_ORDER = ['RUNNING', 'RESUMING', 'SUSPENDING', 'PAUSING', 'PAUSED', 'SUSPENDED', 'FAILED'];
const ACTIONS = {
  suspend: { allowed: ['RUNNING', 'PAUSED'], verb: 'Suspend', method: 'POST' },
  resume: { allowed: ['SUSPENDED', 'PAUSED'], verb: 'Resume', method: 'POST' },
  // As the server: anything not in the middle of a transition (a running actor's worker is released).
  delete: { allowed: ['RUNNING', 'PAUSED', 'SUSPENDED', 'FAILED'], verb: 'Delete', method: 'DELETE' },
};
const MAX_OPERATIONS_SHOWN = 50;

const state = {
  actors: new Map(), // "space/name" → actor
  workers: new Map(), // id → worker
  operations: [], // oldest first
  storage: null,
};

const $ = (selector) => document.querySelector(selector);

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) {
    if (k === 'dataset') Object.assign(node.dataset, v);
    else if (k === 'class') node.className = v;
    else node[k] = v;
  }
  for (const child of children) node.append(child);
  return node;
}

function formatBytes(n) {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) {
    n /= 1024;
    i++;
  }
  return `${i === 0 ? n : n.toFixed(1)} ${units[i]}`;
}

const formatPhases = (phases) =>
  Object.entries(phases ?? {})
    .map(([name, ms]) => `${name} ${Math.round(ms)}`)
    .join(' · ');

const actorKey = (a) => `${a.space}/${a.name}`;
const stateRank = (s) => (STATE_ORDER.indexOf(s) + STATE_ORDER.length + 1) % (STATE_ORDER.length + 1);

// ------------------------------------------------------------------ rendering

function renderCounts() {
  const counts = new Map();
  for (const a of state.actors.values()) counts.set(a.status, (counts.get(a.status) ?? 0) + 1);
  const list = $('#state-counts');
  list.replaceChildren(
    ...[...counts.entries()]
      .sort((x, y) => stateRank(x[0]) - stateRank(y[0]))
      .map(([s, n]) => el('li', { dataset: { state: s } }, `${s} ${n}`)),
  );
  if (counts.size === 0) list.append(el('li', {}, 'no actors'));
  const workers = [...state.workers.values()];
  $('#workers-total').textContent = String(workers.length);
  $('#workers-busy').textContent = String(workers.filter((w) => w.state === 'busy').length);
  if (state.storage) {
    $('#storage-bytes').textContent = formatBytes(state.storage.bytes);
    $('#storage-objects').textContent = String(state.storage.objects);
  }
}

function renderActors() {
  const actors = [...state.actors.values()].sort(
    (a, b) => stateRank(a.status) - stateRank(b.status) || actorKey(a).localeCompare(actorKey(b)),
  );
  const rows = actors.map((a) => {
    const op = a.lastOperation;
    const buttons = Object.entries(ACTIONS).map(([action, spec]) =>
      el('button', {
        type: 'button',
        textContent: spec.verb,
        disabled: !spec.allowed.includes(a.status),
        className: action === 'delete' ? 'danger' : '',
        dataset: { action, actor: actorKey(a) },
      }),
    );
    return el(
      'tr',
      { dataset: { actor: actorKey(a) } },
      el('td', {}, actorKey(a)),
      el('td', {}, a.template),
      el('td', { class: 'state', dataset: { state: a.status } }, a.status),
      el('td', {}, a.worker ?? '–'),
      el('td', { title: a.reason ?? '' }, op ? `${op.kind} ${formatPhases(op.phases)}` : '–'),
      el('td', {}, ...buttons),
    );
  });
  if (rows.length === 0) rows.push(el('tr', {}, el('td', { class: 'empty', colSpan: 6 }, 'no actors yet')));
  $('#actors tbody').replaceChildren(...rows);
}

function renderWorkers() {
  const workers = [...state.workers.values()].sort((a, b) => a.id.localeCompare(b.id));
  const rows = workers.map((w) =>
    el(
      'tr',
      { dataset: { worker: w.id } },
      el('td', {}, w.id),
      el('td', {}, w.node),
      el('td', {}, w.runtime),
      el('td', {}, w.state),
      el('td', { class: 'hosts' }, w.actor ? `${w.actor.space}/${w.actor.name}` : '–'),
    ),
  );
  if (rows.length === 0) rows.push(el('tr', {}, el('td', { class: 'empty', colSpan: 5 }, 'no workers')));
  $('#workers tbody').replaceChildren(...rows);
}

function renderOperations() {
  const recent = state.operations.slice(-MAX_OPERATIONS_SHOWN).reverse();
  const rows = recent.map((op) =>
    el(
      'tr',
      { dataset: { operation: op.kind, actor: `${op.space}/${op.name}` } },
      el('td', {}, new Date(op.finishedAt).toLocaleTimeString()),
      el('td', {}, `${op.space}/${op.name}`),
      el('td', {}, op.kind),
      el('td', {}, `${Math.round(op.durationMs)} ms`),
      el('td', { class: 'phases' }, formatPhases(op.phases)),
      el('td', {}, op.error ? `error: ${op.error}` : 'ok'),
    ),
  );
  if (rows.length === 0) rows.push(el('tr', {}, el('td', { class: 'empty', colSpan: 6 }, 'no operations yet')));
  $('#operations tbody').replaceChildren(...rows);
}

const SVG = 'http://www.w3.org/2000/svg';
function svg(tag, attrs, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
  if (text !== undefined) node.textContent = text;
  return node;
}

/** Resume durations over time: one point per resume, x by finish time, y by milliseconds. */
function renderLatency() {
  const plot = $('#latency-plot');
  const resumes = state.operations.filter((op) => op.kind === 'resume' && !op.error);
  const width = plot.clientWidth || 600;
  const height = 220;
  const pad = { left: 48, right: 12, top: 12, bottom: 24 };
  plot.setAttribute('viewBox', `0 0 ${width} ${height}`);
  const nodes = [
    svg('line', { class: 'axis', x1: pad.left, y1: pad.top, x2: pad.left, y2: height - pad.bottom }),
    svg('line', {
      class: 'axis',
      x1: pad.left,
      y1: height - pad.bottom,
      x2: width - pad.right,
      y2: height - pad.bottom,
    }),
  ];
  if (resumes.length === 0) {
    nodes.push(svg('text', { x: pad.left + 8, y: height / 2, class: 'empty' }, 'no activations yet'));
    plot.replaceChildren(...nodes);
    plot.dataset.points = '0';
    return;
  }
  const times = resumes.map((op) => Date.parse(op.finishedAt));
  const t0 = Math.min(...times);
  const t1 = Math.max(...times, t0 + 1);
  const maxMs = Math.max(...resumes.map((op) => op.durationMs), 1);
  const x = (t) => pad.left + ((t - t0) / (t1 - t0)) * (width - pad.left - pad.right);
  const y = (ms) => height - pad.bottom - (ms / maxMs) * (height - pad.top - pad.bottom);
  const points = resumes.map((op, i) => [x(times[i]), y(op.durationMs)]);
  nodes.push(svg('polyline', { class: 'line', points: points.map((p) => p.join(',')).join(' ') }));
  resumes.forEach((op, i) => {
    const dot = svg('circle', { cx: points[i][0], cy: points[i][1], r: 3 });
    dot.append(svg('title', {}, `${op.space}/${op.name}: ${Math.round(op.durationMs)} ms`));
    nodes.push(dot);
  });
  const sorted = resumes.map((op) => op.durationMs).sort((a, b) => a - b);
  const p50 = sorted[Math.floor((sorted.length - 1) / 2)];
  nodes.push(svg('text', { x: 4, y: pad.top + 4 }, `${Math.round(maxMs)} ms`));
  nodes.push(svg('text', { x: 4, y: height - pad.bottom }, '0'));
  const clock = (ms) => new Date(ms).toLocaleTimeString();
  nodes.push(svg('text', { x: width - pad.right, y: height - 6, 'text-anchor': 'end' }, clock(t1)));
  nodes.push(
    svg(
      'text',
      { x: pad.left + 8, y: height - 6, class: 'summary' },
      `${resumes.length} activations since ${clock(t0)}, p50 ${Math.round(p50)} ms`,
    ),
  );
  plot.replaceChildren(...nodes);
  plot.dataset.points = String(resumes.length);
}

let pending = false;
function render() {
  if (pending) return;
  pending = true;
  requestAnimationFrame(() => {
    pending = false;
    renderCounts();
    renderActors();
    renderWorkers();
    renderOperations();
    renderLatency();
  });
}

// ------------------------------------------------------------------ live updates

function connect() {
  const events = new EventSource('/v1/events');
  const status = $('#connection');
  events.addEventListener('open', () => {
    status.dataset.state = 'live';
    status.textContent = 'live';
  });
  events.addEventListener('error', () => {
    status.dataset.state = 'reconnecting';
    status.textContent = 'reconnecting…';
  });
  events.addEventListener('snapshot', (e) => {
    const data = JSON.parse(e.data);
    state.actors = new Map(data.actors.map((a) => [actorKey(a), a]));
    state.workers = new Map(data.workers.map((w) => [w.id, w]));
    state.operations = data.operations;
    if (data.storage) state.storage = data.storage;
    render();
  });
  events.addEventListener('actor', (e) => {
    const { key, actor } = JSON.parse(e.data);
    const known = state.actors.get(key);
    if (!actor) state.actors.delete(key);
    else if (!known || known.version <= actor.version) state.actors.set(key, actor);
    render();
  });
  events.addEventListener('worker', (e) => {
    const { key, worker } = JSON.parse(e.data);
    if (worker) state.workers.set(key, worker);
    else state.workers.delete(key);
    render();
  });
  events.addEventListener('operation', (e) => {
    state.operations.push(JSON.parse(e.data));
    if (state.operations.length > 500) state.operations.shift();
    render();
  });
  events.addEventListener('storage', (e) => {
    state.storage = JSON.parse(e.data);
    render();
  });
}

// ------------------------------------------------------------------ actions

function showMessage(text, kind = 'error') {
  const box = $('#message');
  box.textContent = text;
  box.dataset.kind = kind;
  box.hidden = false;
}

/** Resolves true when the user confirms. */
function confirmAction(text) {
  const dialog = $('#confirm');
  $('#confirm-text').textContent = text;
  return new Promise((resolve) => {
    dialog.addEventListener('close', () => resolve(dialog.returnValue === 'ok'), { once: true });
    dialog.returnValue = '';
    dialog.showModal();
  });
}

async function runAction(action, key) {
  const spec = ACTIONS[action];
  const [space, name] = key.split('/');
  if (!(await confirmAction(`${spec.verb} actor ${key}?`))) return;
  const base = `/v1/spaces/${encodeURIComponent(space)}/actors/${encodeURIComponent(name)}`;
  const url = action === 'delete' ? base : `${base}/${action}`;
  showMessage(`${spec.verb} ${key}…`, 'info');
  const res = await fetch(url, {
    method: spec.method,
    headers: spec.method === 'POST' ? { 'content-type': 'application/json' } : {},
    body: spec.method === 'POST' ? '{}' : undefined,
  }).catch((err) => ({ ok: false, status: 0, json: async () => ({ error: { message: String(err) } }) }));
  if (res.ok) {
    showMessage(`${spec.verb} ${key}: done`, 'info');
    return;
  }
  const body = await res.json().catch(() => ({}));
  const e = body.error ?? {};
  showMessage(`${spec.verb} ${key} failed: ${e.code ?? res.status}: ${e.message ?? 'unknown error'}`);
}

document.addEventListener('click', (e) => {
  const button = e.target.closest('button[data-action]');
  if (!button || button.disabled) return;
  void runAction(button.dataset.action, button.dataset.actor);
});
window.addEventListener('resize', render);

connect();
render();
