// Small wrappers over iproute2 and nft, run in a named network namespace. Batches keep an activation's network
// setup to a few process spawns.
import { existsSync } from 'node:fs';
import { run } from '../sys/run.ts';

export function netnsPath(name: string): string {
  return `/var/run/netns/${name}`;
}

export function netnsExists(name: string): boolean {
  return existsSync(netnsPath(name));
}

/** Creates the namespace if it does not exist, with loopback up. */
export async function ensureNetns(name: string): Promise<void> {
  if (!netnsExists(name)) await run('ip', ['netns', 'add', name]);
  await ip(name, ['link set lo up']);
}

/** Deletes the namespace and, with it, every interface inside (a veth's peer goes too). Idempotent. */
export async function deleteNetns(name: string): Promise<void> {
  if (netnsExists(name)) await run('ip', ['netns', 'del', name], { okCodes: [0, 1] });
}

/** Runs `ip` commands (without the leading "ip") in one process, in `netns` (undefined: this namespace). */
export async function ip(netns: string | undefined, commands: string[]): Promise<void> {
  const args = netns ? ['-n', netns, '-batch', '-'] : ['-batch', '-'];
  await run('ip', args, { input: `${commands.join('\n')}\n`, label: `ip ${commands[0]}` });
}

/** Deletes a link if it exists (deleting one end of a veth removes the pair). */
export async function deleteLink(netns: string | undefined, link: string): Promise<void> {
  const args = netns ? ['-n', netns, 'link', 'del', link] : ['link', 'del', link];
  await run('ip', args, { okCodes: [0, 1, 2] });
}

/** Loads an nft script in the namespace. */
export async function nft(netns: string | undefined, script: string): Promise<void> {
  const [program, args] = netns ? ['nsenter', [`--net=${netnsPath(netns)}`, 'nft', '-f', '-']] : ['nft', ['-f', '-']];
  await run(program, args, { input: script, label: 'nft -f' });
}

/** Deletes an nft table if it exists. */
export async function deleteTable(netns: string | undefined, family: string, table: string): Promise<void> {
  await nft(netns, `add table ${family} ${table}\ndelete table ${family} ${table}\n`);
}

/** Sets an IPv4 sysctl (e.g. net.ipv4.ip_forward) inside the namespace: /proc/sys/net is per namespace. */
export async function sysctl(netns: string | undefined, key: string, value: string): Promise<void> {
  const args = ['-q', '-w', `${key}=${value}`];
  if (netns) await run('nsenter', [`--net=${netnsPath(netns)}`, 'sysctl', ...args], { label: 'sysctl' });
  else await run('sysctl', args, { label: 'sysctl' });
}
