// The dashboard: one static page (HTML, CSS, vanilla JS; no build step, nothing fetched from elsewhere) that
// reads the REST API and the live event stream (/v1/events) of the server that serves it.
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import type { FastifyInstance } from 'fastify';

const DIR = join(import.meta.dirname, 'dashboard');
const FILES: Record<string, string> = {
  'index.html': 'text/html; charset=utf-8',
  'app.js': 'text/javascript; charset=utf-8',
  'style.css': 'text/css; charset=utf-8',
};

export async function dashboardPlugin(app: FastifyInstance): Promise<void> {
  // Read once at start: a fixed set of files, so no request path ever reaches the filesystem.
  const content = new Map(Object.keys(FILES).map((name) => [name, readFileSync(join(DIR, name))]));
  const send = (name: string) => async (_req: unknown, reply: { type: (t: string) => unknown }) => {
    reply.type(FILES[name]!);
    return content.get(name);
  };
  app.get('/', async (_req, reply) => reply.redirect('/dashboard/'));
  app.get('/dashboard', async (_req, reply) => reply.redirect('/dashboard/'));
  app.get('/dashboard/', send('index.html'));
  for (const name of Object.keys(FILES)) app.get(`/dashboard/${name}`, send(name));
}
