// `torpor image pull REF`: puts an image in this node's caches (the layer cache and the unpacked rootfs), with
// download progress on a terminal.
import { join, resolve } from 'node:path';
import { ImageStore } from '../image/store.ts';
import { Progress } from './progress.ts';

export interface PulledImage {
  ref: string;
  digest: string;
  rootfs: string;
  /** False when the rootfs was already in the cache. */
  unpacked: boolean;
}

export async function pullImage(ref: string, dataDir: string): Promise<PulledImage> {
  const images = new ImageStore(join(resolve(dataDir), 'images'));
  const progress = new Progress(`pulling ${ref}`);
  try {
    const image = await images.resolve(ref, {
      onProgress: (p) => progress.update('layers', p.bytesDone, p.bytesTotal),
    });
    return { ref, digest: image.digest, rootfs: image.rootfs, unpacked: image.unpacked };
  } finally {
    progress.finish();
  }
}
