// ACK settings: where they come from (flags, then environment variables, then a config file — a mounted
// Kubernetes Secret works as that file or as environment), which authentication method they select, and how
// they may be described in a log line (never with a secret in it).
import { readFile } from 'node:fs/promises';
import { parse as parseYaml } from 'yaml';
import { z } from 'zod';
import { TorporError } from '../../core/errors.ts';
import { parse } from '../../core/schemas.ts';

/** Every ACK setting: the flag is --alicloud-<kebab-case>, the variable TORPOR_ALICLOUD_<UPPER_SNAKE>, the config
 * file key the camelCase name. Credentials are also read from Alibaba Cloud's own variables (ALIBABA_CLOUD_*). */
export const ackSettings = z
  .object({
    region: z
      .string({ error: 'is required' })
      .regex(/^[a-z]{2}(-[a-z0-9]+)+$/, 'must be a region id such as cn-hangzhou'),
    clusterId: z.string({ error: 'is required' }).regex(/^[A-Za-z0-9-]{1,64}$/, 'must be an ACK cluster id'),
    accessKeyId: z.string().min(1).optional(),
    accessKeySecret: z.string().min(1).optional(),
    /** With an AccessKey pair issued by STS. */
    securityToken: z.string().min(1).optional(),
    /** Assume this RAM role (with the AccessKey, or with the OIDC token for RRSA). */
    roleArn: z
      .string()
      .regex(/^acs:ram::\d+:role\/[\w.@-]+$/, 'must be a RAM role ARN: acs:ram::<account>:role/<name>')
      .optional(),
    roleSessionName: z
      .string()
      .regex(/^[\w.@-]{2,64}$/, 'must be 2–64 letters, digits or . @ - _')
      .default('torpor'),
    /** Seconds an assumed role's credentials last (900–43200). */
    roleSessionSeconds: z.coerce.number().int().min(900).max(43200).default(3600),
    externalId: z.string().optional(),
    /** Use the ECS instance's RAM role: its name, or "" to discover it from the metadata service. */
    ecsRamRole: z.string().optional(),
    /** RRSA (OIDC): the provider's ARN and the token file the pod gets (with roleArn). */
    oidcProviderArn: z.string().optional(),
    oidcTokenFile: z.string().optional(),
    /** Skip the ACK API: use this kubeconfig file for the cluster. */
    kubeconfigPath: z.string().min(1).optional(),
    /** Ask for the API server's VPC-internal endpoint (Torpor runs inside the cluster's VPC). */
    privateEndpoint: z
      .union([z.boolean(), z.enum(['true', 'false', '1', '0'])])
      .transform((v) => v === true || v === 'true' || v === '1')
      .default(false),
    /** Lifetime asked for the temporary kubeconfig (ACK allows 15–4320 minutes). */
    kubeconfigMinutes: z.coerce.number().int().min(15).max(4320).default(60),
    /** Overrides: the ACK (CS) API endpoint (host[:port]) and scheme, and the STS endpoint. */
    csEndpoint: z.string().min(1).optional(),
    csProtocol: z.enum(['https', 'http']).default('https'),
    stsEndpoint: z.string().min(1).optional(),
  })
  .strict();
export type AckSettings = z.infer<typeof ackSettings>;
export type AckInput = { [K in keyof AckSettings]?: string | boolean | number | undefined };

const KEYS = Object.keys(ackSettings.shape) as (keyof AckSettings)[];
/** Values that must never be printed. */
const SECRET_KEYS = ['accessKeySecret', 'securityToken'] as const;

export const flagName = (key: string) => `alicloud-${key.replace(/[A-Z]/g, (c) => `-${c.toLowerCase()}`)}`;
export const envName = (key: string) => `TORPOR_ALICLOUD_${key.replace(/[A-Z]/g, (c) => `_${c}`).toUpperCase()}`;

/** Alibaba Cloud's own variable names (what its CLI and SDKs read). */
const ALIBABA_ENV: Partial<Record<keyof AckSettings, string>> = {
  accessKeyId: 'ALIBABA_CLOUD_ACCESS_KEY_ID',
  accessKeySecret: 'ALIBABA_CLOUD_ACCESS_KEY_SECRET',
  securityToken: 'ALIBABA_CLOUD_SECURITY_TOKEN',
  roleArn: 'ALIBABA_CLOUD_ROLE_ARN',
  roleSessionName: 'ALIBABA_CLOUD_ROLE_SESSION_NAME',
  ecsRamRole: 'ALIBABA_CLOUD_ECS_METADATA',
  oidcProviderArn: 'ALIBABA_CLOUD_OIDC_PROVIDER_ARN',
  oidcTokenFile: 'ALIBABA_CLOUD_OIDC_TOKEN_FILE',
  region: 'ALIBABA_CLOUD_REGION_ID',
};

/** Reads the settings: flags win over the environment, the environment over the config file. */
export async function loadAckSettings(
  flags: AckInput,
  opts: { configFile?: string; env?: NodeJS.ProcessEnv } = {},
): Promise<AckSettings> {
  const env = opts.env ?? process.env;
  const configFile = opts.configFile ?? env.TORPOR_ALICLOUD_CONFIG;
  let file: Record<string, unknown> = {};
  if (configFile) {
    let text: string;
    try {
      text = await readFile(configFile, 'utf8');
    } catch (err) {
      throw new TorporError(
        'INVALID_ARGUMENT',
        `cannot read the ACK config file ${configFile}: ${(err as NodeJS.ErrnoException).code ?? 'error'}`,
        { field: 'alicloud-config' },
      );
    }
    let doc: unknown;
    try {
      doc = parseYaml(text);
    } catch {
      // The parser's message quotes the line, which may hold a secret.
      throw new TorporError('INVALID_ARGUMENT', `the ACK config file ${configFile} is not YAML`, {
        field: 'alicloud-config',
      });
    }
    if (typeof doc !== 'object' || doc === null || Array.isArray(doc)) {
      throw new TorporError('INVALID_ARGUMENT', `the ACK config file ${configFile} must hold a mapping`, {
        field: 'alicloud-config',
      });
    }
    file = doc as Record<string, unknown>;
    const unknown = Object.keys(file).find((k) => !KEYS.includes(k as keyof AckSettings));
    if (unknown) {
      throw new TorporError('INVALID_ARGUMENT', `${configFile}: unknown setting "${unknown}"`, { field: unknown });
    }
  }
  const merged: Record<string, unknown> = {};
  for (const key of KEYS) {
    const alibaba = ALIBABA_ENV[key];
    const value =
      flags[key] ?? env[envName(key)] ?? (alibaba ? env[alibaba] : undefined) ?? (file[key] as unknown) ?? undefined;
    if (value !== undefined && value !== '') merged[key] = value;
    // An empty ECS role name means "discover it".
    if (key === 'ecsRamRole' && value === '') merged[key] = '';
  }
  let settings: AckSettings;
  try {
    settings = parse(ackSettings, merged);
  } catch (err) {
    const e = err as TorporError;
    // Name the flag, and never echo a value (it may be a secret).
    const key = (e.field ?? '').split('.')[0] ?? '';
    const message = e.message.replace(/^[^:]*:\s*/, '');
    throw new TorporError(
      'INVALID_ARGUMENT',
      `--${flagName(key)} (or ${envName(key)}): ${SECRET_KEYS.includes(key as never) ? 'is invalid' : message}`,
      { field: flagName(key) },
    );
  }
  authMethod(settings); // refuses incomplete combinations now, not at the first request
  return settings;
}

export type AuthMethod =
  | 'kubeconfig'
  | 'access_key'
  | 'sts'
  | 'ram_role_arn'
  | 'oidc_role_arn'
  | 'ecs_ram_role'
  | 'default';

/** Which authentication the settings select: a kubeconfig file needs none; an AccessKey pair (with an STS token,
 * or used to assume a RAM role); RRSA's OIDC token with a role; the ECS instance's role; else the SDK's default
 * chain (Alibaba Cloud's environment variables, ~/.alibabacloud/credentials, the instance's role). */
export function authMethod(s: AckSettings): AuthMethod {
  if (s.kubeconfigPath) return 'kubeconfig';
  if (s.accessKeyId || s.accessKeySecret) {
    if (!s.accessKeyId || !s.accessKeySecret) {
      const missing = s.accessKeyId ? 'accessKeySecret' : 'accessKeyId';
      throw new TorporError('INVALID_ARGUMENT', `--${flagName(missing)} is required with an AccessKey`, {
        field: flagName(missing),
      });
    }
    if (s.roleArn) return 'ram_role_arn';
    return s.securityToken ? 'sts' : 'access_key';
  }
  if (s.securityToken) {
    throw new TorporError('INVALID_ARGUMENT', '--alicloud-security-token needs the STS AccessKey pair with it', {
      field: 'alicloud-access-key-id',
    });
  }
  if (s.oidcProviderArn || s.oidcTokenFile) {
    for (const key of ['oidcProviderArn', 'oidcTokenFile', 'roleArn'] as const) {
      if (!s[key]) {
        throw new TorporError('INVALID_ARGUMENT', `--${flagName(key)} is required for OIDC (RRSA)`, {
          field: flagName(key),
        });
      }
    }
    return 'oidc_role_arn';
  }
  if (s.roleArn) {
    throw new TorporError('INVALID_ARGUMENT', '--alicloud-role-arn needs an AccessKey or an OIDC token to assume it', {
      field: 'alicloud-role-arn',
    });
  }
  if (s.ecsRamRole !== undefined) return 'ecs_ram_role';
  return 'default';
}

/** The settings as a log line may show them: no secret, the AccessKey id masked. */
export function describeAck(s: AckSettings): Record<string, unknown> {
  return {
    auth: authMethod(s),
    region: s.region,
    clusterId: s.clusterId,
    ...(s.accessKeyId ? { accessKeyId: maskId(s.accessKeyId) } : {}),
    ...(s.roleArn ? { roleArn: s.roleArn } : {}),
    privateEndpoint: s.privateEndpoint,
  };
}

export const maskId = (id: string): string => (id.length <= 6 ? '***' : `${id.slice(0, 3)}***${id.slice(-3)}`);

/** Every secret the settings hold (to scrub from any text that might echo them). */
export function secretsOf(s: AckSettings): string[] {
  return SECRET_KEYS.map((k) => s[k]).filter((v): v is string => typeof v === 'string' && v.length > 0);
}

/** `text` with every occurrence of `secrets` replaced. */
export function redact(text: string, secrets: string[]): string {
  let out = text;
  for (const s of secrets) if (s.length >= 4) out = out.split(s).join('[redacted]');
  return out;
}
