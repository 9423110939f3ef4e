// An ACK cluster as a Kube: credentials from @alicloud/credentials (AccessKey, STS token, RAM role, OIDC/RRSA, ECS
// instance role, or the SDK's default chain), a temporary kubeconfig from DescribeClusterUserKubeconfig
// (@alicloud/cs20151215), refreshed before its `expiration` by swapping the KubeConfig's contents in place, so
// open watches keep going. With --alicloud-kubeconfig-path the file is used as it is and the ACK API is not called.
import CredentialModule, { type Config as CredentialConfig } from '@alicloud/credentials';
import CsModule, * as cs from '@alicloud/cs20151215';
import { $OpenApiUtil } from '@alicloud/openapi-core';
import type { Logger } from 'pino';
import { TorporError } from '../../core/errors.ts';
import { Kube, kubeConfigFromString, loadKubeConfig } from '../k8s/kube.ts';
import { type AckSettings, authMethod, describeAck, redact, secretsOf } from './settings.ts';

// Both packages are CommonJS with `exports.default`: under Node's ESM loader the default import is the module.
const Credential = CredentialModule.default;
type CredentialClass = typeof Credential;
const CsClientClass = CsModule.default;
type CsClient = InstanceType<typeof CsClientClass>;

/** The credential provider the settings select (see authMethod). */
export function credentialFor(s: AckSettings): InstanceType<CredentialClass> {
  const method = authMethod(s);
  const common = { roleSessionName: s.roleSessionName, roleSessionExpiration: s.roleSessionSeconds };
  const sts = s.stsEndpoint ? { stsEndpoint: s.stsEndpoint } : {};
  let config: Partial<CredentialConfig> | undefined;
  switch (method) {
    case 'access_key':
      config = { type: 'access_key', accessKeyId: s.accessKeyId, accessKeySecret: s.accessKeySecret };
      break;
    case 'sts':
      config = {
        type: 'sts',
        accessKeyId: s.accessKeyId,
        accessKeySecret: s.accessKeySecret,
        securityToken: s.securityToken,
      };
      break;
    case 'ram_role_arn':
      config = {
        type: 'ram_role_arn',
        accessKeyId: s.accessKeyId,
        accessKeySecret: s.accessKeySecret,
        ...(s.securityToken ? { securityToken: s.securityToken } : {}),
        roleArn: s.roleArn,
        ...(s.externalId ? { externalId: s.externalId } : {}),
        ...common,
        ...sts,
      };
      break;
    case 'oidc_role_arn':
      config = {
        type: 'oidc_role_arn',
        roleArn: s.roleArn,
        oidcProviderArn: s.oidcProviderArn!,
        oidcTokenFilePath: s.oidcTokenFile!,
        ...common,
        ...sts,
      };
      break;
    case 'ecs_ram_role':
      config = { type: 'ecs_ram_role', ...(s.ecsRamRole ? { roleName: s.ecsRamRole } : {}) };
      break;
    case 'default':
    case 'kubeconfig':
      config = undefined;
  }
  return config ? new Credential(config as CredentialConfig) : new Credential();
}

export interface FetchedKubeconfig {
  kubeconfig: string;
  /** When the kubeconfig's credentials stop working (undefined: ACK gave none). */
  expiration?: Date;
}

/** ACK's API for one cluster. */
export class AckApi {
  private readonly s: AckSettings;
  private readonly client: CsClient;

  constructor(settings: AckSettings) {
    this.s = settings;
    this.client = new CsClientClass(
      new $OpenApiUtil.Config({
        credential: credentialFor(settings),
        regionId: settings.region,
        endpoint: settings.csEndpoint ?? `cs.${settings.region}.aliyuncs.com`,
        protocol: settings.csProtocol,
      }),
    );
  }

  /** DescribeClusterUserKubeconfig: a kubeconfig with temporary credentials for this cluster. */
  async describeClusterUserKubeconfig(): Promise<FetchedKubeconfig> {
    const request = new cs.DescribeClusterUserKubeconfigRequest({
      privateIpAddress: this.s.privateEndpoint,
      temporaryDurationMinutes: this.s.kubeconfigMinutes,
    });
    let body: { config?: string; expiration?: string } | undefined;
    try {
      body = (await this.client.describeClusterUserKubeconfig(this.s.clusterId, request)).body;
    } catch (err) {
      throw ackError(err, this.s);
    }
    if (!body?.config) {
      throw new TorporError('RUNTIME_ERROR', `ACK returned no kubeconfig for cluster ${this.s.clusterId}`, {
        field: 'alicloud-cluster-id',
      });
    }
    const expiration = body.expiration ? new Date(body.expiration) : undefined;
    return {
      kubeconfig: body.config,
      ...(expiration && !Number.isNaN(expiration.getTime()) ? { expiration } : {}),
    };
  }
}

/** A clear error from whatever the SDK threw, with every secret scrubbed (SDK messages may echo requests). */
export function ackError(err: unknown, s: AckSettings): TorporError {
  const e = err as { code?: string; statusCode?: number; message?: string; data?: { Code?: string; Message?: string } };
  // @alicloud/credentials throws plain Errors: its "secret is invalid" verdict, or STS's JSON answer in the text.
  const secretInvalid = /access key secret is invalid/i.test(e.message ?? '');
  const embedded = /"Code":"([^"]+)"/.exec(e.message ?? '')?.[1];
  const code = e.data?.Code ?? e.code ?? embedded ?? (secretInvalid ? 'SignatureDoesNotMatch' : 'Error');
  const status = e.statusCode;
  const hint =
    code === 'SignatureDoesNotMatch'
      ? 'the AccessKey secret is wrong'
      : code.startsWith('InvalidAccessKeyId')
        ? 'the AccessKey id is unknown or disabled'
        : code.startsWith('InvalidSecurityToken')
          ? 'the STS security token is invalid or expired'
          : code === 'ErrorClusterNotFound' || status === 404
            ? `cluster ${s.clusterId} was not found in ${s.region}`
            : status === 403 || code.startsWith('Forbidden') || code === 'NoPermission'
              ? 'the credentials lack permission for cs:DescribeClusterUserKubeconfig'
              : undefined;
  const detail = redact(e.data?.Message ?? e.message ?? String(err), secretsOf(s))
    // The SDK appends the request it made; it names headers, never needed here.
    .split('\n')[0]!
    .slice(0, 300);
  const field = code.startsWith('InvalidSecurityToken')
    ? 'alicloud-security-token'
    : code === 'SignatureDoesNotMatch'
      ? 'alicloud-access-key-secret'
      : code.startsWith('InvalidAccessKeyId')
        ? 'alicloud-access-key-id'
        : code === 'ErrorClusterNotFound'
          ? 'alicloud-cluster-id'
          : code.startsWith('AuthenticationFail.OIDC')
            ? 'alicloud-oidc-token-file'
            : code.startsWith('EntityNotExist.Role')
              ? 'alicloud-role-arn'
              : 'alicloud';
  const reason = hint ?? detail;
  return new TorporError(
    status === 404
      ? 'NOT_FOUND'
      : status === 403 || status === 400 || status === 401
        ? 'PERMISSION_DENIED'
        : 'RUNTIME_ERROR',
    `ACK DescribeClusterUserKubeconfig failed (${describeAck(s).auth}, ${code}${status ? ` ${status}` : ''}): ${reason}`,
    { field },
  );
}

export interface AckClusterOptions {
  settings: AckSettings;
  log: Logger;
  /** Refresh this long before expiry (default: a fifth of the lifetime, at least 5 s, at most 10 min). */
  refreshMarginMs?: number;
  /** Retry a failed refresh after this long (default 10 s). */
  retryMs?: number;
}

/** A Kube for an ACK cluster, kept valid by refreshing its temporary kubeconfig before it expires. */
export class AckCluster {
  readonly kube: Kube;
  private readonly o: AckClusterOptions;
  private readonly api: AckApi | undefined;
  private timer: NodeJS.Timeout | undefined;
  private closed = false;
  /** When the current kubeconfig expires. */
  expiration: Date | undefined;
  refreshes = 0;

  private constructor(opts: AckClusterOptions, kube: Kube, api: AckApi | undefined, expiration?: Date) {
    this.o = opts;
    this.kube = kube;
    this.api = api;
    this.expiration = expiration;
  }

  static async connect(opts: AckClusterOptions): Promise<AckCluster> {
    const s = opts.settings;
    if (authMethod(s) === 'kubeconfig') {
      opts.log.info(describeAck(s), 'ACK: using the kubeconfig file');
      return new AckCluster(opts, new Kube(loadKubeConfig({ kubeconfig: s.kubeconfigPath! })), undefined);
    }
    const api = new AckApi(s);
    const first = await api.describeClusterUserKubeconfig();
    const cluster = new AckCluster(opts, new Kube(kubeConfigFromString(first.kubeconfig)), api, first.expiration);
    opts.log.info({ ...describeAck(s), expiration: first.expiration?.toISOString() }, 'ACK: kubeconfig obtained');
    cluster.schedule();
    return cluster;
  }

  /** Fetches a fresh kubeconfig now and swaps it in. */
  async refresh(): Promise<void> {
    if (!this.api) return;
    const next = await this.api.describeClusterUserKubeconfig();
    this.kube.swap(kubeConfigFromString(next.kubeconfig));
    this.expiration = next.expiration;
    this.refreshes++;
    this.o.log.info(
      { clusterId: this.o.settings.clusterId, expiration: next.expiration?.toISOString() },
      'ACK: kubeconfig refreshed',
    );
  }

  private schedule(delayMs?: number): void {
    if (this.closed || !this.expiration) return;
    const lifetime = this.expiration.getTime() - Date.now();
    const margin = this.o.refreshMarginMs ?? Math.min(600_000, Math.max(5_000, lifetime / 5));
    const wait = delayMs ?? Math.max(0, lifetime - margin);
    this.timer = setTimeout(() => {
      this.refresh().then(
        () => this.schedule(),
        (err: unknown) => {
          const e = err instanceof TorporError ? err : ackError(err, this.o.settings);
          this.o.log.warn({ code: e.code, err: e.message }, 'ACK: kubeconfig refresh failed; retrying');
          this.schedule(this.o.retryMs ?? 10_000);
        },
      );
    }, wait);
    this.timer.unref();
  }

  close(): void {
    this.closed = true;
    clearTimeout(this.timer);
  }
}
