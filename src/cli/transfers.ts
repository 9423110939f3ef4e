// Snapshot transfer progress for `torpor actor suspend|resume` on a terminal: listens to the actor's transfer
// events (GET …/transfers, Server-Sent Events) while the command runs, and draws them with the CLI's progress line.
import { request } from 'undici';
import { Progress, type ProgressStream } from './progress.ts';

interface TransferEvent {
  direction: 'upload' | 'download';
  bytesDone: number;
  bytesTotal: number;
}

/** Runs `action` while showing the actor's snapshot transfers; on a non-terminal it only runs `action`. */
export async function withTransferProgress<T>(
  server: string,
  actorPath: string,
  label: string,
  action: () => Promise<T>,
  stream: ProgressStream = process.stderr,
): Promise<T> {
  const progress = new Progress(label, stream);
  if (!progress.enabled) return action();
  const stop = new AbortController();
  const listening = listen(`${server}${actorPath}/transfers`, progress, stop.signal);
  // Subscribed (or unable to): either way the command goes ahead; progress is a display, never a precondition.
  await listening.subscribed.catch(() => undefined);
  try {
    return await action();
  } finally {
    stop.abort();
    await listening.done.catch(() => undefined);
    progress.finish();
  }
}

function listen(url: string, progress: Progress, signal: AbortSignal) {
  let subscribed!: () => void;
  const ready = new Promise<void>((resolve) => {
    subscribed = resolve;
  });
  const done = (async () => {
    const res = await request(url, { method: 'GET', signal, bodyTimeout: 0 });
    if (res.statusCode !== 200) {
      subscribed();
      await res.body.dump();
      return;
    }
    let buffer = '';
    for await (const chunk of res.body) {
      buffer += (chunk as Buffer).toString();
      let end = buffer.indexOf('\n\n');
      while (end >= 0) {
        const message = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        if (message.startsWith(':')) subscribed();
        const data = /^data: (.*)$/m.exec(message)?.[1];
        if (/^event: progress$/m.test(message) && data) {
          const event = JSON.parse(data) as TransferEvent;
          progress.update(event.direction, event.bytesDone, event.bytesTotal);
        }
        end = buffer.indexOf('\n\n');
      }
    }
  })().finally(() => subscribed());
  return { subscribed: ready, done };
}
