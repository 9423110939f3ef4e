// The node agent's API with a real NodeAgent behind it (not started: these calls need no sandbox) and the
// server's client for it, RemoteAgent: only the agent token gets in, the token never reaches a log line, errors
// come back as the agent raised them, node-local paths outside the agent's own directories are refused, and
// logs stream (followed logs included). Activation, checkpoint, upload and exec over this API run against
// real runsc in test/e2e/distributed.test.ts.
import assert from 'node:assert/strict';
import { appendFile, mkdir, mkdtemp, rm, writeFile } from 'node:fs/promises';
import type { AddressInfo } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Writable } from 'node:stream';
import { after, before, describe, test } from 'node:test';
import { pino } from 'pino';
import { NodeAgent } from '../../src/agent/agent.ts';
import { buildAgentApi } from '../../src/agent/api.ts';
import { StoreRegistry } from '../../src/agent/registry.ts';
import { RemoteAgent } from '../../src/agent/remote.ts';
import { FsBlobStore } from '../../src/blob/fs.ts';
import { isTorporError } from '../../src/core/errors.ts';
import { ImageStore } from '../../src/image/store.ts';
import { NodeNetwork } from '../../src/net/node-net.ts';
import { AssetStore } from '../../src/runtime/assets.ts';
import { GvisorRuntime } from '../../src/runtime/gvisor/runsc.ts';
import { SqliteStore } from '../../src/store/sqlite.ts';
import { Unreachable } from '../../src/sys/http.ts';

const TOKEN = 'agent-token-that-must-never-be-logged-7f3a9c';

describe('agent API', () => {
  let dir: string;
  let agent: NodeAgent;
  let url: string;
  let app: ReturnType<typeof buildAgentApi>;
  const logLines: string[] = [];

  before(async () => {
    dir = await mkdtemp(join(tmpdir(), 'torpor-agent-api-'));
    const store = SqliteStore.open(':memory:');
    agent = new NodeAgent({
      node: 'n1',
      dataDir: dir,
      workers: 1,
      indexBase: 250,
      network: new NodeNetwork({ index: 250 }),
      registry: new StoreRegistry(store),
      blob: new FsBlobStore(join(dir, 'blobs')),
      images: new ImageStore(join(dir, 'images')),
      assets: new AssetStore(join(dir, 'assets')),
      poolAssets: () => undefined,
      makeRuntime: (stateRoot) => new GvisorRuntime({ stateRoot }),
      log: pino({ level: 'silent' }),
    });
    const sink = new Writable({
      write(chunk: Buffer, _enc, done) {
        logLines.push(chunk.toString());
        done();
      },
    });
    app = buildAgentApi({ agent, token: TOKEN, log: pino({ level: 'debug' }, sink) });
    await app.listen({ host: '127.0.0.1', port: 0 });
    url = `http://127.0.0.1:${(app.server.address() as AddressInfo).port}`;
  });
  after(async () => {
    await app.close();
    await rm(dir, { recursive: true, force: true });
  });

  const remote = (token = TOKEN) => new RemoteAgent({ node: 'n1', url, token });

  test('only the agent token gets in; it is never logged', async () => {
    const none = await fetch(`${url}/healthz`);
    assert.equal(none.status, 401);
    assert.equal(((await none.json()) as { error: { code: string } }).error.code, 'UNAUTHENTICATED');
    const wrong = await fetch(`${url}/healthz`, { headers: { authorization: `Bearer ${TOKEN}x` } });
    assert.equal(wrong.status, 403);
    const basic = await fetch(`${url}/v1/workers/n1-w0/release`, {
      method: 'POST',
      headers: { authorization: `Basic ${Buffer.from(`x:${TOKEN}`).toString('base64')}` },
    });
    assert.equal(basic.status, 401, 'only a bearer token counts');
    await assert.rejects(remote('guess').sandboxAlive('n1-w0'), (err) => isTorporError(err, 'PERMISSION_DENIED'));
    const ok = await fetch(`${url}/healthz`, { headers: { authorization: `Bearer ${TOKEN}` } });
    assert.equal(ok.status, 200);
    assert.deepEqual(await ok.json(), { status: 'ok', node: 'n1' });
    assert.ok(logLines.length > 0, 'requests were logged');
    const logged = logLines.join('');
    assert.ok(!logged.includes(TOKEN), 'the token appears in no log line');
    assert.ok(!logged.includes(TOKEN.slice(0, 20)), 'nor any part of it');
  });

  test('errors come back as the agent raised them', async () => {
    await assert.rejects(remote().sandboxAlive('n9-w0'), (err) => {
      assert.ok(isTorporError(err, 'NOT_FOUND'));
      assert.equal(err.field, 'worker');
      return true;
    });
    assert.equal(await remote().sandboxAlive('n1-w0'), false);
    await assert.rejects(
      remote().checkpointLocal('n1-w0', { kind: 'suspend', actor: { space: 'default', name: 'a' }, id: 's1' }),
      (err) => isTorporError(err, 'FAILED_PRECONDITION'),
    );
    await assert.rejects(
      remote().checkpointLocal('n1-w0', { kind: 'suspend', actor: { space: '..', name: 'a' }, id: 's1' }),
      (err) => isTorporError(err, 'INVALID_ARGUMENT'),
    );
  });

  test('paths outside the agent’s checkpoint directories are refused and left alone', async () => {
    const outside = join(dir, 'precious');
    await mkdir(outside, { recursive: true });
    await writeFile(join(outside, 'file'), 'keep me');
    for (const path of [outside, join(agent.nodeDir, 'checkpoints'), join(agent.nodeDir, 'checkpoints', '..', '..')]) {
      await assert.rejects(remote().discardLocal(path), (err) => isTorporError(err, 'INVALID_ARGUMENT'));
    }
    await assert.rejects(remote().keepLocal(outside, 'snapshots/x/y/z/manifest.json'), (err) =>
      isTorporError(err, 'INVALID_ARGUMENT'),
    );
    assert.equal((await import('node:fs')).readFileSync(join(outside, 'file'), 'utf8'), 'keep me');
  });

  test('a checkpoint that did not complete is never uploaded', async () => {
    const cut = agent.checkpointDir({ kind: 'suspend', actor: { space: 'default', name: 'a' }, id: 'cut' });
    await mkdir(cut, { recursive: true });
    await writeFile(join(cut, 'checkpoint.img'), 'half of it');
    const template = {
      name: 'counter',
      image: '/nonexistent',
      command: [],
      env: {},
      port: 8080,
      readiness: { path: '/', timeoutSeconds: 30 },
      runtime: 'gvisor' as const,
      resources: { memoryMiB: 64, vcpus: 1 },
      idleTimeoutSeconds: 300,
      snapshot: { retain: 3 },
      network: { egress: 'allow-all' as const },
      createdAt: new Date().toISOString(),
    };
    const request = {
      actor: { space: 'default', name: 'a' },
      template,
      manifestKey: 'snapshots/default/a/cut/manifest.json',
      parent: null,
    };
    await assert.rejects(remote().upload(request, cut), (err) => isTorporError(err, 'FAILED_PRECONDITION'));
    await remote().discardLocal(cut);
    assert.equal((await import('node:fs')).existsSync(cut), false, 'discarded');
  });

  test('logs stream, and followed logs keep streaming until the reader stops', async () => {
    const actor = { space: 'default', name: 'logger' };
    const empty = await remote().logs(actor);
    assert.equal(await textOf(empty), '', 'no log yet: empty');
    await mkdir(join(agent.nodeDir, 'logs', 'default'), { recursive: true });
    await writeFile(agent.logPath(actor), 'line 1\n');
    assert.equal(await textOf(await remote().logs(actor)), 'line 1\n');
    const stop = new AbortController();
    const followed = await remote().logs(actor, { follow: true, signal: stop.signal });
    let seen = '';
    const reading = (async () => {
      try {
        for await (const chunk of followed) {
          seen += (chunk as Buffer).toString();
          if (seen.includes('line 2')) stop.abort();
        }
      } catch {
        // aborting the request ends the stream with an error: expected
      }
    })();
    await new Promise((r) => setTimeout(r, 300));
    await appendFile(agent.logPath(actor), 'line 2\n');
    await Promise.race([reading, new Promise((_, reject) => setTimeout(() => reject(new Error('no line 2')), 5000))]);
    assert.equal(seen, 'line 1\nline 2\n');
  });

  test('an agent that is gone is Unreachable at once', async () => {
    const gone = new RemoteAgent({ node: 'n1', url: 'http://127.0.0.1:1', token: TOKEN });
    const t0 = Date.now();
    await assert.rejects(gone.release('n1-w0'), (err) => err instanceof Unreachable);
    assert.ok(Date.now() - t0 < 5000);
  });
});

async function textOf(stream: AsyncIterable<unknown>): Promise<string> {
  let text = '';
  for await (const chunk of stream) text += (chunk as Buffer).toString();
  return text;
}
