// Where an image's files come from: an OCI layout directory, or a tar archive (an OCI archive or a
// `docker save` tarball) read in place by byte range. Names are layout-relative, e.g. "index.json".

import { createReadStream } from 'node:fs';
import { open, stat } from 'node:fs/promises';
import { join, posix } from 'node:path';
import { Readable } from 'node:stream';
import { TorporError } from '../core/errors.ts';
import { indexTar, memberKey, type TarMember } from './tar-index.ts';

export interface BlobRange {
  file: string;
  start: number;
  size: number;
}

export interface ImageSource {
  /** The path the image was given as, for messages. */
  path: string;
  locate(name: string): Promise<BlobRange | undefined>;
}

/** Small JSON documents only: a manifest or config larger than this is hostile or broken. */
const MAX_METADATA_BYTES = 8 << 20;

export async function openSource(path: string): Promise<ImageSource> {
  const info = await stat(path);
  if (info.isDirectory()) return directorySource(path);
  await refuseCompressedArchive(path);
  return archiveSource(path, await indexTar(path));
}

export function streamRange(range: BlobRange): Readable {
  if (range.size === 0) return Readable.from([]);
  return createReadStream(range.file, { start: range.start, end: range.start + range.size - 1 });
}

export async function readRange(range: BlobRange, what: string): Promise<Buffer> {
  if (range.size > MAX_METADATA_BYTES) {
    throw new TorporError('INVALID_ARGUMENT', `${what} is ${range.size} bytes, more than a metadata file may be`, {
      field: 'image',
    });
  }
  const handle = await open(range.file, 'r');
  try {
    const data = Buffer.alloc(range.size);
    const { bytesRead } = await handle.read(data, 0, range.size, range.start);
    return data.subarray(0, bytesRead);
  } finally {
    await handle.close();
  }
}

export async function readHead(range: BlobRange, length: number): Promise<Buffer> {
  return readRange({ ...range, size: Math.min(length, range.size) }, 'blob header');
}

function directorySource(dir: string): ImageSource {
  return {
    path: dir,
    async locate(name) {
      const file = join(dir, memberKey(name));
      const info = await stat(file).catch(() => undefined);
      return info?.isFile() ? { file, start: 0, size: info.size } : undefined;
    },
  };
}

function archiveSource(file: string, members: Map<string, TarMember>): ImageSource {
  return {
    path: file,
    async locate(name) {
      const member = followLinks(members, memberKey(name));
      return member ? { file, start: member.offset, size: member.size } : undefined;
    },
  };
}

/** `docker save` stores a layer shared by two images once and links the other name to it. */
function followLinks(members: Map<string, TarMember>, key: string): TarMember | undefined {
  let member = members.get(key);
  for (let hops = 0; member && hops < 8; hops++) {
    if (member.kind === 'file') return member;
    if (member.kind === 'symlink') key = memberKey(posix.join(posix.dirname(key), member.linkname));
    else if (member.kind === 'hardlink') key = memberKey(member.linkname);
    else return undefined;
    member = members.get(key);
  }
  return undefined;
}

async function refuseCompressedArchive(path: string): Promise<void> {
  const head = await readHead({ file: path, start: 0, size: (await stat(path)).size }, 4);
  if (head[0] === 0x1f && head[1] === 0x8b) {
    throw new TorporError('INVALID_ARGUMENT', `image archive ${path} is gzip-compressed; decompress it first`, {
      field: 'image',
    });
  }
}
