// The host end of the guest control channel (virtio-serial port "torpor.0", a unix socket on the host): one
// request per line, answered by the guest's control server (guest/spawn.c, started by guest/init.sh) with the same sequence number. Fields are base64
// ("-" = empty) so that arguments may hold spaces and newlines.
import type { Socket } from 'node:net';
import { TorporError } from '../../core/errors.ts';
import type { OutputListener } from '../runtime.ts';
import { connectWhenReady, readLines } from './unix-socket.ts';

const b64 = (text: string): string => (text === '' ? '-' : Buffer.from(text).toString('base64'));
const unb64 = (field: string | undefined): Buffer =>
  field === undefined || field === '-' ? Buffer.alloc(0) : Buffer.from(field, 'base64');

export interface GuestExecResult {
  exitCode: number;
  stdout: Buffer;
  stderr: Buffer;
}

interface Pending {
  resolve: (fields: string[]) => void;
  reject: (err: Error) => void;
  timer: NodeJS.Timeout;
  /** Lines that precede the answer (exec output: "SEQ out|err CHUNK"). */
  onPartial?: (fields: string[]) => void;
}

export class GuestControl {
  private readonly socket: Socket;
  private readonly pending = new Map<number, Pending>();
  private seq = 0;
  private closed = false;

  private constructor(socket: Socket) {
    this.socket = socket;
    readLines(socket, (line) => this.onLine(line));
    socket.on('close', () => {
      this.closed = true;
      for (const [seq, p] of this.pending) {
        clearTimeout(p.timer);
        p.reject(new TorporError('RUNTIME_ERROR', 'guest control channel closed'));
        this.pending.delete(seq);
      }
    });
    socket.on('error', () => undefined);
  }

  static async connect(path: string, timeoutMs: number, alive: () => boolean): Promise<GuestControl> {
    return new GuestControl(await connectWhenReady(path, timeoutMs, alive));
  }

  private onLine(line: string): void {
    const fields = line.split(' ');
    const seq = Number(fields[0]);
    const p = this.pending.get(seq);
    if (!p) return; // an answer to a request that timed out
    // Output of a request that streams it (exec): "SEQ out|err CHUNK", one base64 field. An error answer, "SEQ err
    // MESSAGE", has words, and is the only "err" line of a request that streams nothing.
    if (p.onPartial && (fields[1] === 'out' || (fields[1] === 'err' && fields.length === 3))) {
      p.onPartial(fields.slice(1));
      return;
    }
    this.pending.delete(seq);
    clearTimeout(p.timer);
    if (fields[1] === 'err') p.reject(new TorporError('RUNTIME_ERROR', `guest: ${fields.slice(2).join(' ')}`));
    else p.resolve(fields.slice(1));
  }

  /** Sends one request. Requests written before the guest opens its port wait in the socket: the first answer
   * to a ping is the moment the guest init is serving. */
  request(verb: string, args: string[], timeoutMs: number, onPartial?: (fields: string[]) => void): Promise<string[]> {
    if (this.closed) return Promise.reject(new TorporError('RUNTIME_ERROR', 'guest control channel closed'));
    const seq = ++this.seq;
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.pending.delete(seq);
        reject(new TorporError('TIMEOUT', `guest did not answer "${verb}" within ${timeoutMs} ms`));
      }, timeoutMs);
      this.pending.set(seq, { resolve, reject, timer, ...(onPartial ? { onPartial } : {}) });
      this.socket.write(`${[seq, verb, ...args].join(' ')}\n`);
    });
  }

  async ping(timeoutMs: number): Promise<void> {
    await this.request('ping', [], timeoutMs);
  }

  async start(
    opts: { argv: string[]; env: string[]; workDir: string; actorId: string },
    timeoutMs: number,
  ): Promise<void> {
    await this.request(
      'start',
      [b64(opts.argv.join('\n')), b64(opts.env.join('\n')), b64(opts.workDir), b64(opts.actorId)],
      timeoutMs,
    );
  }

  /** After a restore: sets the guest's wall clock (it stood still while the VM was suspended) and rewrites the
   * actor id (a restore may be another actor: a fork), in one round trip. */
  /** Sets the guest's clock alone (its actor id file already names the actor). A guest from before the request
   * existed is sent a full resync instead. */
  async clock(date: Date, actorId: string, timeoutMs: number): Promise<void> {
    const ms = date.getTime();
    try {
      await this.request('clock', [String(Math.floor(ms / 1000)), String(ms % 1000)], timeoutMs);
    } catch (err) {
      if (!(err instanceof TorporError && /unknown request/.test(err.message))) throw err;
      await this.resync(date, actorId, timeoutMs);
    }
  }

  async resync(date: Date, actorId: string, timeoutMs: number): Promise<void> {
    // Sent as plain text (an older guest writes it with a shell builtin): actor ids are "space/name" DNS labels.
    if (!/^[a-z0-9_][-a-z0-9_]*\/[a-z0-9][-a-z0-9]*$/.test(actorId)) {
      throw new TorporError('INVALID_ARGUMENT', `actor id "${actorId}" is not space/name`, { field: 'actorId' });
    }
    // Seconds, then the milliseconds as a last field (which guests from before it ignore).
    const ms = date.getTime();
    await this.request('resync', [String(Math.floor(ms / 1000)), actorId, String(ms % 1000)], timeoutMs);
  }

  /** Runs a command in the actor's root. Its output reaches `onOutput` as the guest sends it ("out"/"err" lines
   * before the answer); a guest of an older init sends it all in the answer, which is passed on the same way. */
  async exec(argv: string[], timeoutMs: number, onOutput?: OutputListener): Promise<GuestExecResult> {
    const seconds = Math.max(1, Math.ceil(timeoutMs / 1000));
    const t0 = performance.now();
    const output = { stdout: [] as Buffer[], stderr: [] as Buffer[] };
    const take = (stream: 'stdout' | 'stderr', chunk: Buffer) => {
      if (chunk.length === 0) return;
      output[stream].push(chunk);
      onOutput?.(stream, chunk);
    };
    const fields = await this.request('exec', [b64(argv.join('\n')), String(seconds)], timeoutMs + 5000, (f) =>
      take(f[0] === 'out' ? 'stdout' : 'stderr', unb64(f[1])),
    );
    // "exit CODE STDOUT STDERR"; the guest kills with SIGKILL (128 + 9) once the time is up.
    take('stdout', unb64(fields[2]));
    take('stderr', unb64(fields[3]));
    const exitCode = Number(fields[1]);
    if (exitCode === 137 && performance.now() - t0 >= seconds * 1000)
      throw new TorporError('TIMEOUT', `command timed out after ${timeoutMs} ms`);
    return { exitCode, stdout: Buffer.concat(output.stdout), stderr: Buffer.concat(output.stderr) };
  }

  close(): void {
    this.socket.destroy();
  }
}
