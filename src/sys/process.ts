// Whether a host process is still alive. A killed process whose parent has not reaped it yet still has a /proc
// entry (a zombie): it counts as gone.
import { readFile } from 'node:fs/promises';

export async function processRunning(pid: number): Promise<boolean> {
  const stat = await readFile(`/proc/${pid}/stat`, 'utf8').catch(() => '');
  const end = stat.lastIndexOf(')');
  const state = end < 0 ? '' : stat.slice(end + 2, end + 3);
  return state !== '' && state !== 'Z' && state !== 'X';
}
