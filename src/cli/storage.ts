// The --store and --blob flags, defined once for every command that takes them (up, server, agent, router).
import type { Command } from 'commander';
import type { StorageMeter } from '../api/live.ts';

const STORE_HELP =
  'state store: redis://[user:password@]host:port[/db][?prefix=P&cluster=true] (rediss:// for TLS), or a SQLite ' +
  'file (PATH, sqlite:PATH)';
const BLOB_HELP =
  'blob store: s3://bucket[/prefix]?endpoint=URL&pathStyle=true (credentials from AWS_* variables), or a directory';

/** How a command takes a storage flag: required, with a note on what it must match, or optional with a default. */
export type StorageFlagUse = { required: true; note?: string } | { required: false; otherwise: string };

function addStorageOption(cmd: Command, flag: string, help: string, use: StorageFlagUse): Command {
  if (use.required) return cmd.requiredOption(flag, use.note ? `${help} (${use.note})` : help);
  return cmd.option(flag, `${help}; default: ${use.otherwise}`);
}

export function addStoreOption(cmd: Command, use: StorageFlagUse): Command {
  return addStorageOption(cmd, '--store <url>', STORE_HELP, use);
}

export function addBlobOption(cmd: Command, use: StorageFlagUse): Command {
  return addStorageOption(cmd, '--blob <url>', BLOB_HELP, use);
}

/** The blob store's usage meter, when it has one (the filesystem store does; S3 does not). */
export function storageMeter(blob: unknown): StorageMeter | undefined {
  return typeof (blob as Partial<StorageMeter>).usage === 'function' ? (blob as StorageMeter) : undefined;
}
