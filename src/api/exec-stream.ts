// Exec with streamed output: NDJSON lines {"stdout": text} / {"stderr": text} as the command writes, then one
// {"exitCode": n} (or {"error": {code, message}} when the run fails midway). A failure before any output is an
// ordinary HTTP error, so clients see the same codes as for the buffered exec.
import { PassThrough, type Readable } from 'node:stream';
import { asTorporError } from '../core/errors.ts';
import type { OutputListener } from '../runtime/runtime.ts';

type Run = (onOutput: OutputListener) => Promise<{ exitCode: number }>;

/** Resolves with the NDJSON stream once the command has produced output or finished; rejects when it fails
 * before that. */
export function execStream(run: Run): Promise<Readable> {
  const out = new PassThrough();
  const decoders = { stdout: new TextDecoder(), stderr: new TextDecoder() };
  const line = (value: object) => out.write(`${JSON.stringify(value)}\n`);
  return new Promise((resolve, reject) => {
    let started = false;
    const start = () => {
      if (started) return;
      started = true;
      resolve(out);
    };
    const onOutput: OutputListener = (stream, chunk) => {
      const text = decoders[stream].decode(chunk, { stream: true });
      if (text) line({ [stream]: text });
      start();
    };
    run(onOutput).then(
      (result) => {
        for (const stream of ['stdout', 'stderr'] as const) {
          const rest = decoders[stream].decode();
          if (rest) line({ [stream]: rest });
        }
        line({ exitCode: result.exitCode });
        out.end();
        start();
      },
      (err: unknown) => {
        if (!started) return reject(err);
        line({ error: asTorporError(err).toJSON() });
        out.end();
      },
    );
  });
}
