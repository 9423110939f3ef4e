// The engine conformance suite against the local engine (in-process, over a real `up` on runsc) and against the
// standard engine client pointed at a second, real `torpor up` started by the test.
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { pino } from 'pino';
import { up } from '../../src/cli/up.ts';
import { StandardEngine } from '../../src/engine/standard.ts';
import { applyTemplate, counterEnvTemplate, gvisorSkipReason, startTorpor } from '../e2e/harness.ts';
import { engineConformance } from './conformance.ts';

const skip = gvisorSkipReason();
const ENV = 'counter@v1';

engineConformance(
  'local',
  async () => {
    const dataDir = await mkdtemp(join(tmpdir(), 'torpor-conf-'));
    const torpor = await up({
      dataDir,
      host: '127.0.0.1',
      port: 0,
      routerPort: 0,
      workers: 3,
      networkBase: 100,
      log: pino({ level: 'warn' }),
    });
    await torpor.lifecycle.applyTemplate(await counterEnvTemplate());
    return {
      engine: torpor.instances,
      envName: ENV,
      teardown: async () => {
        await torpor.stop();
        await rm(dataDir, { recursive: true, force: true });
      },
    };
  },
  { skip },
);

engineConformance(
  'standard (a second Torpor)',
  async () => {
    const remote = await startTorpor({ workers: 3, networkBase: 110 });
    await applyTemplate(remote.url, await counterEnvTemplate());
    const engine = new StandardEngine({ url: remote.url, timeoutMs: 60_000 });
    return {
      engine,
      envName: ENV,
      teardown: async () => {
        await engine.close();
        await remote.stop();
      },
    };
  },
  { skip },
);
