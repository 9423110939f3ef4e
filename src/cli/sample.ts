// The sample actor `torpor up --sample` creates: an HTTP server that counts requests in memory.
import { join } from 'node:path';
import { buildCounterImage } from '../../examples/counter/image.ts';
import type { Lifecycle } from '../control/lifecycle.ts';
import { isTorporError } from '../core/errors.ts';

export async function createSample(lifecycle: Lifecycle, dataDir: string, routerHost: string): Promise<void> {
  const { ref } = await buildCounterImage(join(dataDir, 'sample-image'));
  await lifecycle.applyTemplate({
    name: 'counter',
    image: ref,
    port: 8080,
    readiness: { path: '/healthz', timeoutSeconds: 30 },
    idleTimeoutSeconds: 300,
  });
  try {
    await lifecycle.createActor('default', { name: 'counter', template: 'counter' });
  } catch (err) {
    if (!isTorporError(err, 'ALREADY_EXISTS')) throw err;
  }
  process.stderr.write(
    [
      'Sample actor "counter" created (SUSPENDED). Try:',
      `  curl http://counter.default.actors.${routerHost}/   # the router resumes it on demand`,
      '  torpor actor resume counter          # restore it on a free worker',
      '  curl $(torpor actor url counter)/    # 1, 2, 3… counted in memory',
      '  torpor actor suspend counter         # snapshot to storage, free the worker',
      '  torpor actor resume counter && curl $(torpor actor url counter)/   # the count continues',
      '  torpor actor get counter -o yaml     # status, worker, per-phase timings',
      '',
    ].join('\n'),
  );
}
