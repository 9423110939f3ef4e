// The control plane as the controller sees it when it runs in its own process (`torpor controller`): Torpor's
// REST API. Templates are applied with POST /v1/templates, a pool's workers are counted from GET /v1/workers, and a
// drain suspends, through the API, every actor that holds a worker on the pool's pods.
import { TorporError } from '../../core/errors.ts';
import type { Actor, Page, Worker } from '../../core/types.ts';
import type { PoolControl, TemplateSink } from './controller.ts';
import { countReady, drainActors } from './pools.ts';

export class ApiControlPlane implements PoolControl, TemplateSink {
  private readonly url: string;
  private readonly timeoutMs: number;

  constructor(opts: { url: string; timeoutMs?: number }) {
    this.url = opts.url.replace(/\/$/, '');
    this.timeoutMs = opts.timeoutMs ?? 120_000;
  }

  private async call<T>(method: 'GET' | 'POST', path: string, body?: unknown): Promise<{ status: number; data: T }> {
    let res: Response;
    try {
      res = await fetch(this.url + path, {
        method,
        headers: body === undefined ? {} : { 'content-type': 'application/json' },
        ...(body === undefined ? {} : { body: JSON.stringify(body) }),
        signal: AbortSignal.timeout(this.timeoutMs),
      });
    } catch (err) {
      const cause = (err as { cause?: { code?: string } }).cause?.code ?? (err as Error).name;
      throw new TorporError('RUNTIME_ERROR', `cannot reach the Torpor server ${this.url}: ${cause}`, {
        field: 'server',
      });
    }
    const text = await res.text();
    const data = text ? (JSON.parse(text) as unknown) : undefined;
    if (!res.ok) {
      const e = (data as { error?: { code?: string; message?: string; field?: string } } | undefined)?.error;
      throw new TorporError(
        (e?.code as TorporError['code'] | undefined) ?? 'RUNTIME_ERROR',
        e?.message ?? `${method} ${path}: HTTP ${res.status}`,
        e?.field ? { field: e.field } : {},
      );
    }
    return { status: res.status, data: data as T };
  }

  private async *all<T>(path: string): AsyncGenerator<T> {
    let cursor: string | undefined;
    do {
      // No `limit`: GET /v1/workers hands the query to the store uncoerced (a string limit is refused).
      const q = cursor ? `?cursor=${encodeURIComponent(cursor)}` : '';
      const page = (await this.call<Page<T>>('GET', path + q)).data;
      yield* page.items;
      cursor = page.nextCursor;
    } while (cursor);
  }

  async applyTemplate(input: unknown): Promise<{ created: boolean }> {
    const { status } = await this.call('POST', '/v1/templates', input);
    return { created: status === 201 };
  }

  readyWorkers(nodes: string[]): Promise<number> {
    return countReady(this.all<Worker>('/v1/workers'), nodes);
  }

  drain(nodes: string[]): Promise<number> {
    return drainActors(this.all<Actor>('/v1/actors'), nodes, async (a) => {
      const path = `/v1/spaces/${encodeURIComponent(a.space)}/actors/${encodeURIComponent(a.name)}/suspend`;
      return (await this.call<Actor>('POST', path, {}).catch(() => undefined))?.data;
    });
  }
}
