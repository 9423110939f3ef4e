// QEMU Machine Protocol client: JSON commands over a unix socket, answered in order; asynchronous events are
// delivered to listeners.
import type { Socket } from 'node:net';
import { TorporError } from '../../core/errors.ts';
import { connectWhenReady, readLines } from './unix-socket.ts';

interface Pending {
  command: string;
  resolve: (value: unknown) => void;
  reject: (err: Error) => void;
}

export interface QmpEvent {
  event: string;
  data?: Record<string, unknown>;
}

export class QmpClient {
  private readonly socket: Socket;
  private readonly pending: Pending[] = [];
  private readonly listeners = new Set<(e: QmpEvent) => void>();
  private closed = false;

  private constructor(socket: Socket) {
    this.socket = socket;
    readLines(socket, (line) => this.onLine(line));
    socket.on('close', () => {
      this.closed = true;
      for (const p of this.pending.splice(0)) {
        p.reject(new TorporError('RUNTIME_ERROR', `QMP connection closed during ${p.command}`));
      }
    });
    socket.on('error', () => undefined);
  }

  /** Connects, consumes the greeting and leaves capabilities negotiation done. */
  static async connect(path: string, timeoutMs: number, alive: () => boolean): Promise<QmpClient> {
    const socket = await connectWhenReady(path, timeoutMs, alive);
    const client = new QmpClient(socket);
    // The greeting is answered like a command with no id: queue a placeholder that swallows it.
    await new Promise<void>((resolve, reject) => {
      client.pending.push({ command: 'greeting', resolve: () => resolve(), reject });
    });
    await client.execute('qmp_capabilities');
    return client;
  }

  private onLine(line: string): void {
    let msg: Record<string, unknown>;
    try {
      msg = JSON.parse(line) as Record<string, unknown>;
    } catch {
      return;
    }
    if (typeof msg.event === 'string') {
      for (const l of this.listeners) l(msg as unknown as QmpEvent);
      return;
    }
    const p = this.pending.shift();
    if (!p) return;
    if ('error' in msg) {
      const e = msg.error as { class?: string; desc?: string };
      p.reject(new TorporError('RUNTIME_ERROR', `QMP ${p.command}: ${e.desc ?? e.class ?? 'error'}`));
    } else p.resolve(msg.return ?? msg.QMP);
  }

  execute<T = unknown>(command: string, args?: Record<string, unknown>): Promise<T> {
    if (this.closed) return Promise.reject(new TorporError('RUNTIME_ERROR', `QMP closed: cannot ${command}`));
    return new Promise<T>((resolve, reject) => {
      this.pending.push({ command, resolve: resolve as (v: unknown) => void, reject });
      this.socket.write(`${JSON.stringify(args ? { execute: command, arguments: args } : { execute: command })}\n`);
    });
  }

  onEvent(listener: (e: QmpEvent) => void): () => void {
    this.listeners.add(listener);
    return () => this.listeners.delete(listener);
  }

  close(): void {
    this.socket.destroy();
  }
}
