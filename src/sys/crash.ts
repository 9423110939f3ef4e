// Fault injection for crash tests: `TORPOR_CRASH_AT=<step>` (read once, when this module loads) makes the process
// kill itself with SIGKILL when it reaches the named step — a real crash, with no cleanup, no flushed buffers and
// no answer to whoever was waiting. Steps are named where they are reached (e.g. `suspend.uploaded`); unset, a
// crash point costs one string comparison.
import { writeSync } from 'node:fs';

const armed = process.env.TORPOR_CRASH_AT || undefined;

export function crashPoint(step: string): void {
  if (armed !== step) return;
  writeSync(2, `TORPOR_CRASH_AT=${step}: killing this process (pid ${process.pid})\n`);
  process.kill(process.pid, 'SIGKILL');
}
