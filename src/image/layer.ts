// Opens one layer blob as a stream of tar entries. The compression is sniffed from the blob's first bytes
// (media types are only claims), and both the stored bytes and the uncompressed tar are hashed on the way
// through, so a tampered blob fails the unpack it is part of.

import { pipeline } from 'node:stream/promises';
import { createGunzip, createZstdDecompress } from 'node:zlib';
import tar from 'tar-stream';
import { TorporError } from '../core/errors.ts';
import { digestCheck } from './digest.ts';
import type { LayerBlob } from './manifest.ts';
import { type BlobRange, type ImageSource, readHead, streamRange } from './source.ts';

export interface OpenedLayer {
  entries: tar.Extract;
  /** Settles when every byte went through; rejects when a digest, the decompression or the tar format fails. */
  finished: Promise<void>;
}

export async function openLayer(source: ImageSource, layer: LayerBlob, label: string): Promise<OpenedLayer> {
  const range = await source.locate(layer.name);
  if (!range) {
    throw new TorporError('INVALID_ARGUMENT', `image ${source.path} is malformed: ${label} blob is missing`, {
      field: 'image',
    });
  }
  const stages = [
    ...(layer.digest ? [digestCheck(layer.digest, label, layer.size)] : []),
    ...(await decompressorFor(range, label)),
    ...(layer.diffId ? [digestCheck(layer.diffId, `${label} (uncompressed)`)] : []),
  ];
  const entries = tar.extract();
  const finished = pipeline([streamRange(range), ...stages, entries]);
  return { entries, finished };
}

async function decompressorFor(range: BlobRange, label: string) {
  const head = await readHead(range, 6);
  if (startsWith(head, [0x1f, 0x8b])) return [createGunzip()];
  if (startsWith(head, [0x28, 0xb5, 0x2f, 0xfd])) return [createZstdDecompress()];
  if (startsWith(head, [0x42, 0x5a, 0x68]) || startsWith(head, [0xfd, 0x37, 0x7a, 0x58, 0x5a, 0x00])) {
    throw new TorporError('IMAGE_REJECTED', `${label} uses an unsupported compression (bzip2 or xz)`, {
      field: 'image',
    });
  }
  return [];
}

function startsWith(data: Buffer, magic: number[]): boolean {
  return magic.every((byte, i) => data[i] === byte);
}
