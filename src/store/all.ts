// Every actor (or template, or worker), page by page: for the background loops that must see them all.
import type { Actor, Template, Worker } from '../core/types.ts';
import type { StateStore } from './store.ts';

export async function* allActors(store: StateStore): AsyncGenerator<Actor> {
  let cursor: string | undefined;
  do {
    const page = await store.listActors(undefined, { limit: 1000, ...(cursor ? { cursor } : {}) });
    yield* page.items;
    cursor = page.nextCursor;
  } while (cursor);
}

export async function* allTemplates(store: StateStore): AsyncGenerator<Template> {
  let cursor: string | undefined;
  do {
    const page = await store.listTemplates({ limit: 1000, ...(cursor ? { cursor } : {}) });
    yield* page.items;
    cursor = page.nextCursor;
  } while (cursor);
}

export async function* allWorkers(store: StateStore): AsyncGenerator<Worker> {
  let cursor: string | undefined;
  do {
    const page = await store.listWorkers({ limit: 1000, ...(cursor ? { cursor } : {}) });
    yield* page.items;
    cursor = page.nextCursor;
  } while (cursor);
}
