// AEnvironment's own Python SDK, unchanged (test/fixtures/aenv-sdk), against a real `torpor up` with API keys:
// `Environment(...)` creates an instance on the control API (port 8080), waits for it, checks its health and calls
// its MCP tools through the gateway (port 8081, by instance id), and deletes it on exit. The SDK hard-codes those
// two ports on the host of its aenv_url, so this Torpor listens on a loopback address of its own.
import assert from 'node:assert/strict';
import { execFile, execFileSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { promisify } from 'node:util';
import { aenvEnvImage } from '../fixtures/aenv-env/image.ts';
import { applyTemplate, gvisorSkipReason, startTorpor, type Torpor } from './harness.ts';

const ROOT = resolve(import.meta.dirname, '../..');
const SDK = join(ROOT, 'test/fixtures/aenv-sdk');
const HOST = '127.0.0.177';
const ALICE = 'alice-sdk-key-9d8c7b6a5f4e';
const BOB = 'bob-sdk-key-1f2e3d4c5b6a7';

/** The Python that runs the SDK (scripts/aenv-sdk-venv.sh, idempotent), or why there is none. */
function python(): { python?: string; skip?: string } {
  try {
    const out = execFileSync('bash', [join(ROOT, 'scripts/aenv-sdk-venv.sh')], {
      encoding: 'utf8',
      timeout: 180_000,
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    return { python: out.trim().split('\n').pop()! };
  } catch (err) {
    const stderr = String((err as { stderr?: string }).stderr ?? (err as Error).message).trim();
    return { skip: `no Python for AEnvironment's SDK (scripts/aenv-sdk-venv.sh failed: ${stderr.slice(-300)})` };
  }
}

const gvisor = gvisorSkipReason();
const py = gvisor ? {} : python();

/** Git's blob id of a file, to compare with upstream's tree. */
const blobId = (file: string) => {
  const data = readFileSync(file);
  return createHash('sha1').update(`blob ${data.length}\0`).update(data).digest('hex');
};

describe("AEnvironment's Python SDK against Torpor (gVisor)", { skip: gvisor ?? py.skip }, () => {
  let t: Torpor;

  before(async () => {
    t = await startTorpor({
      workers: 2,
      networkBase: 177,
      args: ['--host', HOST, '--port', '8080', '--mcp-port', '8081'],
      env: { TORPOR_API_KEYS: `alice=${ALICE},bob=${BOB}` },
    });
    // envName "aenv-echo@v1" maps to this template.
    await applyTemplate(t.url, {
      name: 'aenv-echo-v1',
      image: await aenvEnvImage(),
      port: 8081,
      readiness: { path: '/healthz', timeoutSeconds: 20 },
      resources: { memoryMiB: 128, vcpus: 1 },
    });
  });
  after(async () => {
    await t?.stop();
  });

  test('the vendored SDK is byte for byte the upstream release', () => {
    const listed = readFileSync(join(SDK, 'UPSTREAM-BLOBS'), 'utf8').trim().split('\n');
    assert.ok(listed.length >= 10);
    for (const line of listed) {
      const [blob, path] = line.split(/\s+/);
      assert.equal(blobId(join(SDK, path!)), blob, path);
    }
  });

  test('Environment: create, wait, health, MCP tools, reward, ownership, release', async () => {
    const { stdout, stderr } = await promisify(execFile)(
      py.python!,
      [join(SDK, 'drive.py'), `http://${HOST}`, 'aenv-echo@v1', ALICE, BOB],
      { timeout: 55_000, maxBuffer: 16 * 1024 * 1024, env: { ...process.env, PYTHONDONTWRITEBYTECODE: '1' } },
    ).catch((err: { stdout?: string; stderr?: string; message: string }) => {
      throw new Error(`drive.py failed: ${err.message}\n${err.stdout ?? ''}\n${err.stderr ?? ''}`.slice(-6000));
    });
    const line = stdout.split('\n').find((l) => l.startsWith('RESULT '));
    assert.ok(line, `no RESULT line:\n${stdout.slice(-3000)}\n${stderr.slice(-3000)}`);
    const seen = JSON.parse(line.slice(7)) as {
      info: { instance_id: string; status: string; ip: string };
      tools: string[];
      counts: string[];
      env: string[];
      reward: { reward: number };
      got: { id: string; status: string; labels: Record<string, string>; env: { name: string; version: string } };
      other_owner: string;
      other_owner_deleted: boolean;
      after_release: string;
    };
    assert.equal(seen.info.status, 'Running');
    assert.match(seen.info.instance_id, /^aenv-echo-v1-.+\.aenv$/);
    assert.deepEqual(seen.tools, ['aenv-echo@v1/count', 'aenv-echo@v1/env']);
    assert.deepEqual(seen.counts, ['1', '2'], "the instance's memory, through the gateway, by id");
    assert.deepEqual(seen.env, ['aenv-echo@v1'], 'environment_variables the SDK injects reached the process');
    assert.deepEqual(seen.reward, { reward: 2 });
    assert.equal(seen.got.id, seen.info.instance_id);
    assert.deepEqual(seen.got.labels, { suite: 'aenv-sdk' });
    assert.deepEqual([seen.got.env.name, seen.got.env.version], ['aenv-echo', 'v1']);
    assert.match(seen.other_owner, /owner: instance .* belongs to another owner/, "bob's key cannot read it");
    assert.equal(seen.other_owner_deleted, false, "bob's key cannot delete it");
    assert.match(seen.after_release, /not found/, `released: deleted on exit\n${t.log().slice(-5000)}`);
  });
});
