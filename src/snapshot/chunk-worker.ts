// A worker thread of the chunk pool (chunk-pool.ts): scans and compresses chunks (chunk-work.ts) on request.
import { parentPort } from 'node:worker_threads';
import { compress, ScanBuffers, type ScanRequest, scanChunk } from './chunk-work.ts';

type Request =
  | ({ op: 'scan'; id: number } & ScanRequest)
  | { op: 'compress'; id: number; buffer: ArrayBuffer; offset: number; length: number; level: number };

const port = parentPort;
if (!port) throw new Error('chunk-worker.ts runs as a worker thread');
const buffers = new ScanBuffers();
port.on('message', (req: Request) => {
  try {
    const value =
      req.op === 'scan'
        ? scanChunk(req, buffers)
        : compress(new Uint8Array(req.buffer, req.offset, req.length), req.level);
    const moved = value instanceof Uint8Array ? value : 'bytes' in value ? value.bytes : undefined;
    port.postMessage({ id: req.id, value }, moved ? [moved.buffer as ArrayBuffer] : []);
  } catch (error) {
    port.postMessage({ id: req.id, error });
  }
});
