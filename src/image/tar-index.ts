// Indexes an uncompressed tar archive (an OCI archive or a `docker save` tarball) by reading only its
// headers, so a blob can later be streamed straight from its byte range. Resolving an image from an
// archive therefore never reads layer bytes unless the rootfs has to be unpacked.

import { open } from 'node:fs/promises';
import { posix } from 'node:path';
import { TorporError } from '../core/errors.ts';

const BLOCK = 512;

export interface TarMember {
  /** Offset of the member's data within the archive. */
  offset: number;
  size: number;
  kind: 'file' | 'dir' | 'symlink' | 'hardlink' | 'other';
  linkname: string;
}

interface RawHeader {
  name: string;
  linkname: string;
  size: number;
  typeflag: string;
}

/** Normalises a member name to the form used for look-ups: no leading "./" or "/", no trailing "/". */
export function memberKey(name: string): string {
  const clean = posix.normalize(`/${name}`).slice(1);
  return clean.endsWith('/') ? clean.slice(0, -1) : clean;
}

export async function indexTar(file: string): Promise<Map<string, TarMember>> {
  const handle = await open(file, 'r');
  try {
    const members = new Map<string, TarMember>();
    const { size: fileSize } = await handle.stat();
    let offset = 0;
    let pending: Partial<Pick<RawHeader, 'name' | 'linkname' | 'size'>> = {};
    while (offset + BLOCK <= fileSize) {
      const block = Buffer.alloc(BLOCK);
      await handle.read(block, 0, BLOCK, offset);
      if (block.every((b) => b === 0)) break;
      const header = { ...parseHeader(block, file, offset), ...pending };
      pending = {};
      const dataOffset = offset + BLOCK;
      if (dataOffset + header.size > fileSize) throw malformed(file, `member "${header.name}" is truncated`);
      offset = dataOffset + Math.ceil(header.size / BLOCK) * BLOCK;
      if (isMetaHeader(header.typeflag)) {
        pending = await readMeta(handle, header, dataOffset);
        continue;
      }
      members.set(memberKey(header.name), {
        offset: dataOffset,
        size: header.size,
        kind: kindOf(header.typeflag),
        linkname: header.linkname,
      });
    }
    return members;
  } finally {
    await handle.close();
  }
}

function isMetaHeader(typeflag: string): boolean {
  return typeflag === 'x' || typeflag === 'g' || typeflag === 'L' || typeflag === 'K';
}

/** Long names come from a PAX extended header ('x') or a GNU long-name member ('L'/'K'); both describe the next header. */
async function readMeta(
  handle: Awaited<ReturnType<typeof open>>,
  header: RawHeader,
  dataOffset: number,
): Promise<Partial<RawHeader>> {
  if (header.typeflag === 'g') return {};
  if (header.size > 1 << 20) throw malformed('archive', `extended header of ${header.size} bytes is too large`);
  const data = Buffer.alloc(header.size);
  await handle.read(data, 0, header.size, dataOffset);
  if (header.typeflag === 'L') return { name: cString(data) };
  if (header.typeflag === 'K') return { linkname: cString(data) };
  return parsePax(data);
}

function parsePax(data: Buffer): Partial<RawHeader> {
  const out: Partial<RawHeader> = {};
  let pos = 0;
  while (pos < data.length) {
    const space = data.indexOf(0x20, pos);
    const length = Number.parseInt(data.toString('ascii', pos, space), 10);
    if (space < 0 || !Number.isFinite(length) || length <= 0) break;
    const record = data.toString('utf8', space + 1, pos + length - 1);
    const eq = record.indexOf('=');
    const key = record.slice(0, eq);
    const value = record.slice(eq + 1);
    if (key === 'path') out.name = value;
    else if (key === 'linkpath') out.linkname = value;
    else if (key === 'size') out.size = Number(value);
    pos += length;
  }
  return out;
}

function parseHeader(block: Buffer, file: string, offset: number): RawHeader {
  if (!checksumMatches(block)) throw malformed(file, `no valid tar header at byte ${offset}`);
  const name = cString(block.subarray(0, 100));
  const isUstar = block.toString('ascii', 257, 262) === 'ustar';
  const prefix = isUstar ? cString(block.subarray(345, 500)) : '';
  return {
    name: prefix ? `${prefix}/${name}` : name,
    linkname: cString(block.subarray(157, 257)),
    size: parseNumber(block.subarray(124, 136)),
    typeflag: String.fromCharCode(block[156] ?? 0),
  };
}

function checksumMatches(block: Buffer): boolean {
  let sum = 0;
  for (let i = 0; i < BLOCK; i++) sum += i >= 148 && i < 156 ? 0x20 : (block[i] ?? 0);
  return parseNumber(block.subarray(148, 156)) === sum;
}

/** Tar numbers are octal text, or big-endian base-256 when the high bit of the first byte is set. */
function parseNumber(field: Buffer): number {
  if (((field[0] ?? 0) & 0x80) !== 0) {
    let value = (field[0] ?? 0) & 0x7f;
    for (let i = 1; i < field.length; i++) value = value * 256 + (field[i] ?? 0);
    return value;
  }
  const text = cString(field).trim();
  return text === '' ? 0 : Number.parseInt(text, 8);
}

function cString(buf: Buffer): string {
  const end = buf.indexOf(0);
  return buf.toString('utf8', 0, end < 0 ? buf.length : end);
}

function kindOf(typeflag: string): TarMember['kind'] {
  if (typeflag === '0' || typeflag === '\0' || typeflag === '7') return 'file';
  if (typeflag === '5') return 'dir';
  if (typeflag === '2') return 'symlink';
  if (typeflag === '1') return 'hardlink';
  return 'other';
}

function malformed(file: string, reason: string): TorporError {
  return new TorporError('INVALID_ARGUMENT', `image archive ${file} is malformed: ${reason}`, { field: 'image' });
}
