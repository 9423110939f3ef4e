// Command-line flags of the Kubernetes and ACK engines, shared by `torpor up` and `torpor install` (and by
// `torpor server`): the cluster connection, what worker pods are given, and every --alicloud-* setting.
import { type Command, Option } from 'commander';
import { TorporError } from '../core/errors.ts';
import { type AckInput, ackSettings, envName, flagName, loadAckSettings } from '../engine/ack/settings.ts';
import type { KubeEngineName } from '../engine/k8s/engine.ts';
import type { KubeOptions } from '../engine/k8s/kube.ts';
import type { AgentSettings } from '../engine/k8s/render.ts';
import type { Toleration } from '../engine/k8s/resources.ts';

export const ENGINE_CHOICES = ['local', 'standard', 'k8s', 'kubernetes', 'ack', 'alicloud-k8s'];
/** The engines of `torpor server`: its agents register themselves (local), or a cluster's worker pods do. */
export const SERVER_ENGINE_CHOICES = ['local', 'k8s', 'kubernetes', 'ack', 'alicloud-k8s'];

/** --engine and --schedule-type (AEnvironment's name for it; alicloud-k8s = ack) on `cmd`. */
export function addEngineOptions(cmd: Command, choices: string[], help: string): Command {
  return cmd
    .addOption(new Option('--engine <engine>', help).choices(choices).default('local'))
    .addOption(
      new Option('--schedule-type <engine>', "alias of --engine (AEnvironment's name; alicloud-k8s = ack)").choices(
        choices,
      ),
    );
}

/** The cluster settings of a Kubernetes engine from the flags (--kubeconfig, --context, --watch-namespace and
 * for ack every --alicloud-* one). */
export async function kubeEngineSettings(engine: KubeEngineName, o: Record<string, unknown>) {
  return {
    engine,
    kube: kubeOptions(o as { kubeconfig?: string; context?: string }),
    ...(engine === 'ack' ? { ack: await ackSettingsFrom(o) } : {}),
    ...(o.watchNamespace ? { namespace: String(o.watchNamespace) } : {}),
    ...(o.webhookListen ? { webhook: webhookSettings(o) } : {}),
  };
}

function webhookSettings(o: Record<string, unknown>): { listen: string; certDir: string } {
  if (!o.webhookCertDir) {
    throw new TorporError('INVALID_ARGUMENT', '--webhook-listen needs --webhook-cert-dir (tls.crt, tls.key)', {
      field: 'webhook-cert-dir',
    });
  }
  return { listen: String(o.webhookListen), certDir: String(o.webhookCertDir) };
}

const ACK_HELP: Record<string, string> = {
  region: 'ACK cluster region, e.g. cn-hangzhou',
  clusterId: 'ACK cluster id',
  accessKeyId: 'AccessKey id (or ALIBABA_CLOUD_ACCESS_KEY_ID)',
  accessKeySecret:
    'AccessKey secret (prefer ALIBABA_CLOUD_ACCESS_KEY_SECRET or the config file: flags are visible in ps)',
  securityToken: 'STS security token, with an STS AccessKey pair',
  roleArn: 'RAM role to assume (with the AccessKey, or the OIDC token for RRSA)',
  roleSessionName: 'session name for the assumed role',
  roleSessionSeconds: 'lifetime of assumed-role credentials, 900..43200',
  externalId: 'external id for AssumeRole',
  ecsRamRole: "use the ECS instance's RAM role (optionally naming it)",
  oidcProviderArn: 'RRSA: the OIDC provider ARN',
  oidcTokenFile: 'RRSA: the OIDC token file mounted in the pod',
  kubeconfigPath: 'use this kubeconfig file instead of asking ACK for one',
  privateEndpoint: "ask for the API server's private (VPC) endpoint",
  kubeconfigMinutes: 'lifetime of the temporary kubeconfig, 15..4320 minutes',
  csEndpoint: 'ACK API endpoint host[:port] (default cs.<region>.aliyuncs.com)',
  csProtocol: 'ACK API scheme: https | http',
  stsEndpoint: 'STS endpoint host[:port]',
};

const ACK_KEYS = Object.keys(ackSettings.shape);
const camel = (flag: string) => flag.replace(/-([a-z])/g, (_, c: string) => c.toUpperCase());

export function addAckOptions(cmd: Command): Command {
  cmd.option(
    '--alicloud-config <file>',
    'ACK settings as a YAML file (or TORPOR_ALICLOUD_CONFIG); e.g. a mounted Secret',
  );
  for (const key of ACK_KEYS) {
    const flag = flagName(key);
    const help = `${ACK_HELP[key] ?? key} (env ${envName(key)})`;
    if (key === 'privateEndpoint') cmd.option(`--${flag}`, help);
    else if (key === 'ecsRamRole') cmd.option(`--${flag} [name]`, help);
    else cmd.option(`--${flag} <value>`, help);
  }
  return cmd;
}

/** The --alicloud-* flags as loadAckSettings takes them. */
export function ackInput(o: Record<string, unknown>): AckInput {
  const out: AckInput = {};
  for (const key of ACK_KEYS) {
    let v = o[camel(flagName(key))];
    if (key === 'ecsRamRole' && v === true) v = '';
    if (v !== undefined) (out as Record<string, unknown>)[key] = v;
  }
  return out;
}

export function ackSettingsFrom(o: Record<string, unknown>) {
  return loadAckSettings(ackInput(o), o.alicloudConfig ? { configFile: String(o.alicloudConfig) } : {});
}

export function addKubeOptions(cmd: Command): Command {
  return cmd
    .option('--kubeconfig <file>', 'kubeconfig (default: in-cluster, $KUBECONFIG, ~/.kube/config)')
    .option('--context <name>', 'kubeconfig context')
    .addOption(new Option('--watch-namespace <ns>', 'reconcile pools and templates of one namespace (default: all)'))
    .option(
      '--webhook-listen <addr:port>',
      'serve the Template admission webhook (spec immutability on API servers < 1.25) here, over TLS',
    )
    .option('--webhook-cert-dir <dir>', "the webhook's tls.crt and tls.key (the Secret torpor-webhook-tls)");
}

export function kubeOptions(o: { kubeconfig?: string; context?: string }): KubeOptions {
  return { ...(o.kubeconfig ? { kubeconfig: o.kubeconfig } : {}), ...(o.context ? { context: o.context } : {}) };
}

export function addAgentOptions(cmd: Command): Command {
  return cmd
    .option('--agent-server-url <url>', 'the control plane URL worker pods register with')
    .option('--agent-image <image>', 'the torpor image worker pods run', 'torpor:latest')
    .option(
      '--agent-token-secret <name>',
      "Secret holding the agents' bootstrap token (key: token)",
      'torpor-agent-token',
    )
    .option('--agent-blob <url>', 'the blob store worker pods use (the server’s), e.g. s3://bucket/prefix')
    .option(
      '--agent-blob-secret <name>',
      'Secret with the blob store credentials (AWS_ACCESS_KEY_ID, …) for worker pods',
    )
    .option('--agent-network-base <n>', "worker pods' network index (each pod is its own namespace: 0 is fine)")
    .option('--pool-node-selector <key=value...>', 'node selector every worker pod gets (e.g. ACK virtual nodes)')
    .option('--pool-toleration <key[=value]:Effect...>', 'toleration every worker pod gets');
}

export interface AgentFlags {
  agentServerUrl?: string;
  agentImage: string;
  agentTokenSecret: string;
  agentBlob?: string;
  agentBlobSecret?: string;
  agentNetworkBase?: string;
  poolNodeSelector?: string[];
  poolToleration?: string[];
}

export function agentSettings(o: AgentFlags, defaults: { serverUrl: string; blobUrl: string }): AgentSettings {
  const nodeSelector: Record<string, string> = {};
  for (const kv of o.poolNodeSelector ?? []) {
    const eq = kv.indexOf('=');
    if (eq <= 0) {
      throw new TorporError('INVALID_ARGUMENT', `--pool-node-selector must be key=value, got "${kv}"`, {
        field: 'pool-node-selector',
      });
    }
    nodeSelector[kv.slice(0, eq)] = kv.slice(eq + 1);
  }
  return {
    serverUrl: o.agentServerUrl ?? defaults.serverUrl,
    image: o.agentImage,
    tokenSecret: o.agentTokenSecret,
    blobUrl: o.agentBlob ?? defaults.blobUrl,
    ...(o.agentBlobSecret ? { blobSecret: o.agentBlobSecret } : {}),
    ...(o.agentNetworkBase !== undefined ? { networkBase: networkIndex(o.agentNetworkBase) } : {}),
    ...(Object.keys(nodeSelector).length ? { nodeSelector } : {}),
    ...(o.poolToleration?.length ? { tolerations: o.poolToleration.map(parseToleration) } : {}),
  };
}

/** `key=value:Effect`, `key:Effect` (Exists) or `key=value` (any effect). */
export function parseToleration(s: string): Toleration {
  const m = /^([^=:]+)(?:=([^:]*))?(?::(NoSchedule|PreferNoSchedule|NoExecute))?$/.exec(s);
  if (!m) {
    throw new TorporError('INVALID_ARGUMENT', `--pool-toleration must be key[=value][:Effect], got "${s}"`, {
      field: 'pool-toleration',
    });
  }
  const [, key, value, effect] = m;
  return {
    key: key!,
    ...(value !== undefined ? { operator: 'Equal' as const, value } : { operator: 'Exists' as const }),
    ...(effect ? { effect: effect as Toleration['effect'] } : {}),
  };
}

function networkIndex(value: string): number {
  const n = Number(value);
  if (!Number.isInteger(n) || n < 0 || n > 255) {
    throw new TorporError('INVALID_ARGUMENT', `--agent-network-base must be an integer from 0 to 255, got "${value}"`, {
      field: 'agent-network-base',
    });
  }
  return n;
}
