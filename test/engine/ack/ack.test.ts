// The ACK engine against a local stand-in for Alibaba Cloud's ACK and STS APIs that verifies signatures like the
// cloud, serving kubeconfigs for a real local kube-apiserver: AccessKey, STS token, RAM role and OIDC (RRSA)
// flows, wrong secrets refused with clear errors, refresh before expiry with open watches surviving, the
// Kubernetes engine running unchanged on top, and no secret in any log line or error.
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Writable } from 'node:stream';
import { after, before, describe, it } from 'node:test';
import tls from 'node:tls';
import { Watch } from '@kubernetes/client-node';
import { pino } from 'pino';
import { TorporError } from '../../../src/core/errors.ts';
import { AckCluster, credentialFor } from '../../../src/engine/ack/cluster.ts';
import { type AckInput, authMethod, loadAckSettings } from '../../../src/engine/ack/settings.ts';
import { KubeController } from '../../../src/engine/k8s/controller.ts';
import { resourcePath } from '../../../src/engine/k8s/kube.ts';
import { deploymentName } from '../../../src/engine/k8s/render.ts';
import { API_VERSION } from '../../../src/engine/k8s/resources.ts';
import { eventually, installCrds, type RunningKube, startKube } from '../k8s/kube-helpers.ts';
import { type StandIn, startStandIn } from './alicloud-standin.ts';

const secret = (n = 24) => randomBytes(n).toString('base64url');
const AK = { id: 'LTAI5tTestKey0001', secret: secret() };
const CLUSTER = 'c0a1b2c3d4e5f60718293a4b5c6d7e8f9';
const ROLE = 'acs:ram::1234567890123456:role/torpor-ack';
const OIDC_PROVIDER = 'acs:ram::1234567890123456:oidc-provider/ack-rrsa-c0a1b2';
const OIDC_TOKEN = `eyJ${secret(48)}`;
const kubeTokens = [1, 2, 3, 4, 5, 6, 7, 8].map((i) => ({ token: secret(), user: `ack-${i}` }));

const started = await startKube({ extraTokens: kubeTokens.map((t) => `${t.token},${t.user},${t.user}`) });
const skip = typeof started === 'string' ? started : false;
const k = typeof started === 'string' ? undefined : started;

/** Every log line the engine writes during this file, to grep for secrets at the end. */
const logLines: string[] = [];
const errors: string[] = [];
const log = pino(
  { level: 'debug' },
  new Writable({
    write(chunk, _enc, cb) {
      logLines.push(String(chunk));
      cb();
    },
  }),
);

let standIn: StandIn;
let workDir: string;
const stsSecrets: string[] = [];

function base(extra: AckInput = {}): AckInput {
  return {
    region: 'cn-hangzhou',
    clusterId: CLUSTER,
    csEndpoint: standIn.csEndpoint,
    csProtocol: 'http',
    stsEndpoint: standIn.stsEndpoint,
    ...extra,
  };
}

async function connect(flags: AckInput, opts: { refreshMarginMs?: number; retryMs?: number } = {}) {
  const settings = await loadAckSettings(flags, { env: {} });
  return AckCluster.connect({ settings, log, ...opts });
}

async function refused(flags: AckInput): Promise<TorporError> {
  try {
    (await connect(flags)).close();
  } catch (err) {
    assert.ok(err instanceof TorporError, String(err));
    errors.push(err.message, JSON.stringify(err));
    return err;
  }
  assert.fail('connected with bad credentials');
}

describe('ACK engine (local ACK/STS stand-in, real kube-apiserver)', { skip }, () => {
  before(async () => {
    standIn = await startStandIn({
      accessKeys: { [AK.id]: AK.secret },
      clusterId: CLUSTER,
      apiServer: (k as RunningKube).server,
      tokens: kubeTokens.map((t) => t.token),
      roles: { [ROLE]: { oidcProviderArn: OIDC_PROVIDER, oidcToken: OIDC_TOKEN } },
    });
    // The credentials SDK talks to STS over HTTPS only: trust the stand-in's CA (as a private CA would be).
    tls.setDefaultCACertificates([...tls.getCACertificates('default'), standIn.caPem]);
    workDir = await mkdtemp(join(tmpdir(), 'torpor-ack-'));
  });

  after(async () => {
    await standIn?.close();
    await k?.stop();
    if (workDir) await rm(workDir, { recursive: true, force: true });
  });

  it('AccessKey pair: signs DescribeClusterUserKubeconfig and reaches the real API server', async () => {
    const cluster = await connect(base({ accessKeyId: AK.id, accessKeySecret: AK.secret }));
    try {
      const ns = await cluster.kube.request<{ items: { metadata: { name: string } }[] }>('GET', '/api/v1/namespaces');
      assert.ok(ns.items.some((n) => n.metadata.name === 'default'));
      const issue = standIn.issues.at(-1)!;
      assert.equal(issue.accessKeyId, AK.id);
      assert.equal(issue.viaSecurityToken, false);
      assert.equal(issue.privateIpAddress, 'false');
      assert.equal(issue.temporaryDurationMinutes, '60');
      assert.equal(cluster.kube.server(), k!.server);
      assert.ok(cluster.expiration && cluster.expiration.getTime() > Date.now() + 50 * 60_000);
    } finally {
      cluster.close();
    }
  });

  it('a wrong secret fails with a clear error that does not contain it', async () => {
    const wrong = secret();
    const err = await refused(base({ accessKeyId: AK.id, accessKeySecret: wrong }));
    assert.equal(err.field, 'alicloud-access-key-secret');
    assert.match(err.message, /SignatureDoesNotMatch/);
    assert.match(err.message, /AccessKey secret is wrong/);
    assert.ok(!err.message.includes(wrong));
    assert.equal(standIn.refusals.at(-1)?.code, 'SignatureDoesNotMatch');
    const unknown = await refused(base({ accessKeyId: 'LTAI5tNoSuchKey', accessKeySecret: AK.secret }));
    assert.equal(unknown.field, 'alicloud-access-key-id');
    const noCluster = await refused(base({ accessKeyId: AK.id, accessKeySecret: AK.secret, clusterId: 'cdeadbeef' }));
    assert.equal(noCluster.code, 'NOT_FOUND');
    assert.equal(noCluster.field, 'alicloud-cluster-id');
  });

  it('STS token: the temporary key and its token sign the request', async () => {
    const creds = standIn.issueSts();
    stsSecrets.push(creds.accessKeySecret, creds.securityToken);
    const cluster = await connect(
      base({
        accessKeyId: creds.accessKeyId,
        accessKeySecret: creds.accessKeySecret,
        securityToken: creds.securityToken,
      }),
    );
    cluster.close();
    assert.equal(standIn.issues.at(-1)?.accessKeyId, creds.accessKeyId);
    assert.equal(standIn.issues.at(-1)?.viaSecurityToken, true);
    const badToken = secret(32);
    const err = await refused(
      base({ accessKeyId: creds.accessKeyId, accessKeySecret: creds.accessKeySecret, securityToken: badToken }),
    );
    assert.equal(err.field, 'alicloud-security-token');
    assert.match(err.message, /security token is invalid or expired/);
    assert.ok(!err.message.includes(badToken));
  });

  it('RAM role: AssumeRole (signed) at STS, then ACK with the assumed credentials', async () => {
    const cluster = await connect(
      base({ accessKeyId: AK.id, accessKeySecret: AK.secret, roleArn: ROLE, roleSessionName: 'torpor-test' }),
    );
    cluster.close();
    const assumed = standIn.stsIssues.at(-1)!;
    assert.equal(assumed.action, 'AssumeRole');
    assert.equal(assumed.accessKeyId, AK.id);
    assert.equal(assumed.roleArn, ROLE);
    assert.equal(standIn.issues.at(-1)?.accessKeyId, assumed.issuedKeyId);
    assert.equal(standIn.issues.at(-1)?.viaSecurityToken, true);
    const wrong = secret();
    const err = await refused(base({ accessKeyId: AK.id, accessKeySecret: wrong, roleArn: ROLE }));
    assert.match(err.message, /AccessKey secret is wrong/);
    assert.equal(err.field, 'alicloud-access-key-secret');
    assert.ok(!err.message.includes(wrong));
    assert.equal(standIn.refusals.at(-1)?.api, 'sts');
  });

  it('OIDC (RRSA): the pod’s token assumes the role', async () => {
    const tokenFile = join(workDir, 'oidc-token');
    await writeFile(tokenFile, OIDC_TOKEN, { mode: 0o600 });
    const cluster = await connect(base({ oidcProviderArn: OIDC_PROVIDER, oidcTokenFile: tokenFile, roleArn: ROLE }));
    cluster.close();
    assert.equal(standIn.stsIssues.at(-1)?.action, 'AssumeRoleWithOIDC');
    assert.equal(standIn.issues.at(-1)?.accessKeyId, standIn.stsIssues.at(-1)?.issuedKeyId);
    await writeFile(tokenFile, 'eyJforged');
    const err = await refused(base({ oidcProviderArn: OIDC_PROVIDER, oidcTokenFile: tokenFile, roleArn: ROLE }));
    assert.match(err.message, /AuthenticationFail\.OIDCToken\.Invalid/);
    assert.equal(err.field, 'alicloud-oidc-token-file');
  });

  it('a kubeconfig file is used as it is, without calling ACK', async () => {
    const before = standIn.issues.length;
    const cluster = await connect(base({ kubeconfigPath: k!.kubeconfig }));
    cluster.close();
    assert.ok((await cluster.kube.request<{ items: unknown[] }>('GET', '/api/v1/namespaces')).items.length > 0);
    assert.equal(standIn.issues.length, before);
    assert.equal(cluster.expiration, undefined);
  });

  it('asks for the private (VPC) endpoint when told to', async () => {
    (
      await connect(
        base({ accessKeyId: AK.id, accessKeySecret: AK.secret, privateEndpoint: true, kubeconfigMinutes: 30 }),
      )
    ).close();
    assert.equal(standIn.issues.at(-1)?.privateIpAddress, 'true');
    assert.equal(standIn.issues.at(-1)?.temporaryDurationMinutes, '30');
  });

  it('refreshes the kubeconfig before it expires; watches and the controller carry on', async () => {
    const short = await startStandIn({
      accessKeys: { [AK.id]: AK.secret },
      clusterId: CLUSTER,
      apiServer: k!.server,
      tokens: kubeTokens.slice(4).map((t) => t.token),
      roles: {},
      kubeconfigLifetimeMs: 4000,
    });
    const cluster = await connect(
      { ...base({ accessKeyId: AK.id, accessKeySecret: AK.secret }), csEndpoint: short.csEndpoint },
      { refreshMarginMs: 2500 },
    );
    const kube = cluster.kube;
    const controller = new KubeController({
      kube,
      namespace: 'default',
      agent: {
        serverUrl: 'http://torpor-server:7070',
        image: 'torpor:test',
        tokenSecret: 'agent-token',
        blobUrl: 's3://torpor/snapshots',
      },
      pools: { readyWorkers: async () => 0, drain: async () => 0 },
      templates: { applyTemplate: async () => ({ created: true }) },
      log,
    });
    const seen: string[] = [];
    let watchEnded: unknown = false;
    try {
      await installCrds(kube);
      await kube.request('POST', '/api/v1/namespaces/default/secrets', {
        body: { apiVersion: 'v1', kind: 'Secret', metadata: { name: 'agent-token' }, stringData: { token: 'x' } },
      });
      await controller.start();
      const watch = await new Watch(kube.kc).watch(
        '/api/v1/namespaces/default/configmaps',
        {},
        (type, obj: { metadata: { name: string } }) => seen.push(`${type} ${obj.metadata.name}`),
        (err) => {
          watchEnded = err ?? 'closed';
        },
      );
      const firstToken = short.issues[0]!.token;
      await eventually(async () => (cluster.refreshes >= 1 ? true : undefined), 10_000, 'a refresh');
      // Refreshed before the first kubeconfig expired, with a new one that expires later.
      assert.ok(short.issues.length >= 2);
      assert.notEqual(short.issues[1]!.token, firstToken);
      assert.ok(cluster.expiration!.getTime() > Date.now());
      await kube.request('POST', '/api/v1/namespaces/default/configmaps', {
        body: { apiVersion: 'v1', kind: 'ConfigMap', metadata: { name: 'after-refresh' }, data: { a: 'b' } },
      });
      await eventually(async () => (seen.includes('ADDED after-refresh') ? true : undefined), 10_000, 'watch event');
      assert.equal(watchEnded, false, 'the watch opened before the refresh is still open');
      // The API server saw the new credentials: requests after the refresh come from the second user.
      // Under load more than one refresh may have happened by now: any identity after the first one counts, and
      // the audit log is written asynchronously.
      const userOf = (token: string) => kubeTokens.find((t) => t.token === token)!.user;
      const firstUser = userOf(firstToken);
      await eventually(
        async () => {
          const refreshed = new Set(short.issues.slice(1).map((i) => userOf(i.token)));
          refreshed.delete(firstUser);
          const audit = await k!.audit();
          const found = audit.some(
            (e) => refreshed.has(e.user.username) && e.verb === 'create' && /configmaps/.test(e.requestURI),
          );
          return found ? true : undefined;
        },
        10_000,
        'create by the refreshed identity',
      );
      // The Kubernetes engine runs unchanged on the ACK kubeconfig: a pool created now is reconciled.
      await kube.request('POST', resourcePath(API_VERSION, 'workerpools', 'default'), {
        body: {
          apiVersion: API_VERSION,
          kind: 'WorkerPool',
          metadata: { name: 'on-ack' },
          spec: { runtime: 'gvisor' },
        },
      });
      await eventually(
        () => kube.get(resourcePath('apps/v1', 'deployments', 'default', deploymentName('on-ack'))),
        15_000,
        'deployment via ACK',
      );
      watch.abort();
    } finally {
      await controller.stop();
      cluster.close();
      await short.close();
    }
  });

  it('a failed refresh is retried (and logged without secrets) until ACK answers again', async () => {
    const keys: Record<string, string> = { [AK.id]: AK.secret };
    const flaky = await startStandIn({
      accessKeys: keys,
      clusterId: CLUSTER,
      apiServer: k!.server,
      tokens: [kubeTokens[0]!.token],
      roles: {},
      kubeconfigLifetimeMs: 3000,
    });
    const cluster = await connect(
      { ...base({ accessKeyId: AK.id, accessKeySecret: AK.secret }), csEndpoint: flaky.csEndpoint },
      { refreshMarginMs: 2000, retryMs: 300 },
    );
    try {
      delete keys[AK.id]; // ACK stops knowing the key: refreshes fail
      await eventually(async () => (flaky.refusals.length >= 2 ? true : undefined), 10_000, 'failed refreshes');
      assert.equal(cluster.refreshes, 0);
      assert.ok(logLines.some((l) => l.includes('kubeconfig refresh failed') && l.includes('InvalidAccessKeyId')));
      keys[AK.id] = AK.secret;
      await eventually(async () => (cluster.refreshes >= 1 ? true : undefined), 10_000, 'a refresh after recovery');
    } finally {
      cluster.close();
      await flaky.close();
    }
  });

  it('torpor install --engine ack applies deploy/ack with the cluster credentials ACK hands out', async () => {
    const bin = join(import.meta.dirname, '..', '..', '..', 'bin', 'torpor.js');
    const before = standIn.issues.length;
    const { stdout, stderr } = await new Promise<{ stdout: string; stderr: string }>((done, fail) =>
      execFile(
        process.execPath,
        [
          bin,
          'install',
          '--engine',
          'ack',
          ...['--namespace', 'torpor-ack', '--image', 'registry.example/torpor:9'],
          ...['--alicloud-region', 'cn-hangzhou', '--alicloud-cluster-id', CLUSTER],
          ...['--alicloud-cs-endpoint', standIn.csEndpoint, '--alicloud-cs-protocol', 'http'],
        ],
        { env: { ...process.env, ALIBABA_CLOUD_ACCESS_KEY_ID: AK.id, ALIBABA_CLOUD_ACCESS_KEY_SECRET: AK.secret } },
        (err, out, errOut) =>
          err ? fail(new Error(`${err.message}\n${errOut}`)) : done({ stdout: out, stderr: errOut }),
      ),
    );
    logLines.push(stdout, stderr);
    assert.equal(standIn.issues.length, before + 1, 'one kubeconfig from ACK');
    const controller = await k!.kube.get<{
      spec: { template: { spec: { containers: { image: string; args: string[] }[] } } };
    }>(resourcePath('apps/v1', 'deployments', 'torpor-ack', 'torpor-controller'));
    const c = controller!.spec.template.spec.containers[0]!;
    assert.equal(c.image, 'registry.example/torpor:9');
    assert.ok(c.args.includes('--pool-node-selector=type=virtual-kubelet'), 'the ACK overlay');
    assert.ok(await k!.kube.get(resourcePath('v1', 'secrets', 'torpor-ack', 'torpor-agent-token')));
    assert.match(stderr, /Torpor installed in namespace torpor-ack/);
  });

  it('never writes a secret into a log line or an error', () => {
    const secrets = [
      AK.secret,
      OIDC_TOKEN,
      ...stsSecrets,
      ...kubeTokens.map((t) => t.token),
      ...standIn.issues.map((i) => i.token),
    ];
    assert.ok(logLines.length > 5, 'the engine logged');
    const text = [...logLines, ...errors].join('\n');
    for (const s of secrets) assert.ok(!text.includes(s), 'a secret leaked into the logs or errors');
  });
});

describe('ACK settings', () => {
  it('--schedule-type alicloud-k8s selects ACK on the command line (settings checked before anything starts)', async () => {
    const bin = join(import.meta.dirname, '..', '..', '..', 'bin', 'torpor.js');
    const env = Object.fromEntries(
      Object.entries(process.env).filter(([k]) => !k.startsWith('ALIBABA_CLOUD_') && !k.startsWith('TORPOR_ALICLOUD_')),
    );
    for (const args of [
      ['up', '--schedule-type', 'alicloud-k8s', '--data-dir', join(tmpdir(), 'torpor-never-created')],
      ['install', '--engine', 'alicloud-k8s', '--alicloud-cluster-id', 'c1'],
    ]) {
      const r = await new Promise<{ code: number; stderr: string }>((done) =>
        execFile(process.execPath, [bin, ...args], { env }, (err, _out, stderr) =>
          done({ code: err ? Number(err.code) : 0, stderr }),
        ),
      );
      assert.equal(r.code, 1, args.join(' '));
      assert.match(r.stderr, /^error: INVALID_ARGUMENT: --alicloud-region \(or TORPOR_ALICLOUD_REGION\)/, r.stderr);
    }
  });

  it('selects the authentication method the settings describe', async () => {
    const at = async (flags: AckInput, env: NodeJS.ProcessEnv = {}) =>
      authMethod(await loadAckSettings({ region: 'cn-hangzhou', clusterId: 'c1', ...flags }, { env }));
    assert.equal(await at({ accessKeyId: 'LTAIa', accessKeySecret: 's' }), 'access_key');
    assert.equal(await at({ accessKeyId: 'STS.a', accessKeySecret: 's', securityToken: 't' }), 'sts');
    assert.equal(await at({ accessKeyId: 'LTAIa', accessKeySecret: 's', roleArn: ROLE }), 'ram_role_arn');
    assert.equal(
      await at(
        {},
        {
          ALIBABA_CLOUD_ROLE_ARN: ROLE,
          ALIBABA_CLOUD_OIDC_PROVIDER_ARN: OIDC_PROVIDER,
          ALIBABA_CLOUD_OIDC_TOKEN_FILE: '/t',
        },
      ),
      'oidc_role_arn',
    );
    assert.equal(await at({ ecsRamRole: '' }), 'ecs_ram_role');
    assert.equal(await at({}, { ALIBABA_CLOUD_ECS_METADATA: 'TorporRole' }), 'ecs_ram_role');
    assert.equal(await at({ kubeconfigPath: '/k', accessKeyId: 'LTAIa', accessKeySecret: 's' }), 'kubeconfig');
    assert.equal(await at({}), 'default');
    // The ECS role's credential is built without a request (the metadata service is only asked when used).
    const ecs = credentialFor(
      await loadAckSettings({ region: 'cn-hangzhou', clusterId: 'c1', ecsRamRole: 'R' }, { env: {} }),
    );
    assert.equal(ecs.getType(), 'ecs_ram_role');
  });

  it('takes flags over environment over the config file, and names the flag when one is wrong', async () => {
    const dir = await mkdtemp(join(tmpdir(), 'torpor-ack-settings-'));
    try {
      const file = join(dir, 'ack.yaml');
      await writeFile(file, 'region: cn-beijing\nclusterId: cfile\naccessKeyId: LTAIfile\naccessKeySecret: fromfile\n');
      const env = { TORPOR_ALICLOUD_CLUSTER_ID: 'cenv', ALIBABA_CLOUD_ACCESS_KEY_SECRET: 'fromenv' };
      const s = await loadAckSettings({ clusterId: 'cflag' }, { configFile: file, env });
      assert.equal(s.region, 'cn-beijing');
      assert.equal(s.clusterId, 'cflag');
      assert.equal(s.accessKeySecret, 'fromenv');
      assert.equal(s.accessKeyId, 'LTAIfile');
      const fromEnv = await loadAckSettings({}, { configFile: file, env });
      assert.equal(fromEnv.clusterId, 'cenv');

      await assert.rejects(loadAckSettings({ region: 'Hangzhou', clusterId: 'c1' }, { env: {} }), (e: TorporError) => {
        assert.equal(e.field, 'alicloud-region');
        return true;
      });
      await assert.rejects(
        loadAckSettings({ region: 'cn-hangzhou', clusterId: 'c1', accessKeyId: 'LTAIx' }, { env: {} }),
        (e: TorporError) => e.field === 'alicloud-access-key-secret',
      );
      await assert.rejects(
        loadAckSettings({ region: 'cn-hangzhou', clusterId: 'c1', roleArn: 'not-an-arn' }, { env: {} }),
        (e: TorporError) => e.field === 'alicloud-role-arn',
      );
      await assert.rejects(
        loadAckSettings({ region: 'cn-hangzhou', clusterId: 'c1', roleArn: ROLE }, { env: {} }),
        (e: TorporError) => e.field === 'alicloud-role-arn' && /AccessKey or an OIDC token/.test(e.message),
      );
      await writeFile(file, 'region: cn-beijing\nclusterId: c1\naccessKeySecret: [unclosed\n');
      await assert.rejects(loadAckSettings({}, { configFile: file, env: {} }), (e: TorporError) => {
        assert.ok(!e.message.includes('unclosed'), 'the parser message (which quotes the line) is not echoed');
        return true;
      });
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });
});
