// A unix socket that a freshly started VMM creates a moment after it starts: connect with retries until it
// answers or the deadline passes, and read it line by line.
import { connect, type Socket } from 'node:net';
import { TorporError } from '../../core/errors.ts';

export async function connectWhenReady(path: string, timeoutMs: number, alive: () => boolean): Promise<Socket> {
  const deadline = Date.now() + timeoutMs;
  let last = 'not created';
  while (Date.now() < deadline) {
    if (!alive()) throw new TorporError('RUNTIME_ERROR', `VMM exited before ${path} answered`);
    try {
      return await new Promise<Socket>((resolve, reject) => {
        const socket = connect(path);
        socket.once('connect', () => {
          socket.off('error', reject);
          resolve(socket);
        });
        socket.once('error', reject);
      });
    } catch (err) {
      last = (err as Error).message;
      await new Promise((r) => setTimeout(r, 5));
    }
  }
  throw new TorporError('TIMEOUT', `cannot connect to ${path} within ${timeoutMs} ms (${last})`);
}

/** Calls `onLine` with every complete line the socket receives. */
export function readLines(socket: Socket, onLine: (line: string) => void): void {
  let buffered = '';
  socket.setEncoding('utf8');
  socket.on('data', (chunk: string) => {
    buffered += chunk;
    for (let nl = buffered.indexOf('\n'); nl >= 0; nl = buffered.indexOf('\n')) {
      const line = buffered.slice(0, nl).replace(/\r$/, '');
      buffered = buffered.slice(nl + 1);
      if (line) onLine(line);
    }
  });
}
