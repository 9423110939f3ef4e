// Input schemas: every request body and every file a user hands us is parsed here, and only here.
// A failed parse becomes INVALID_ARGUMENT naming the first offending field.
import { z } from 'zod';
import { TorporError } from './errors.ts';

const DNS_LABEL = /^[a-z0-9]([-a-z0-9]*[a-z0-9])?$/;

export const dnsLabel = z
  .string()
  .min(1, 'must not be empty')
  .max(63, 'must be at most 63 characters')
  .regex(DNS_LABEL, 'must be a DNS-1123 label: lower-case letters, digits and "-", starting and ending alphanumeric');

export const runtimeClass = z.enum(['gvisor', 'microvm']);
export type RuntimeClass = z.infer<typeof runtimeClass>;

// ---------------------------------------------------------------- runtime assets

/** The asset names a runtime class runs with: every `required` one, exactly one of `oneOf` when it is not empty,
 * and any of `optional`. Nothing else: an unknown name is a typo, not an extension point. */
export const RUNTIME_ASSETS = {
  gvisor: { required: ['runsc'], oneOf: [], optional: [] },
  // qemu-tcg: QEMU's TCG accelerator module, for hosts whose KVM cannot run the guest.
  microvm: { required: ['kernel', 'initrd'], oneOf: ['qemu', 'cloud-hypervisor'], optional: ['bios', 'qemu-tcg'] },
} as const satisfies Record<RuntimeClass, { required: string[]; oneOf: string[]; optional: string[] }>;

export const assetArch = z.enum(['amd64', 'arm64']);
export type AssetArch = z.infer<typeof assetArch>;

const ASSET_SCHEMES = ['file:', 'http:', 'https:', 's3:'];

/** Problems with the asset names of a set for `runtime`, as [name or undefined, message]. */
export function assetNameIssues(runtime: RuntimeClass, names: string[]): [string | undefined, string][] {
  const rule: { required: readonly string[]; oneOf: readonly string[]; optional: readonly string[] } =
    RUNTIME_ASSETS[runtime];
  const issues: [string | undefined, string][] = [];
  for (const name of rule.required) {
    if (!names.includes(name)) issues.push([undefined, `${runtime} needs the asset "${name}"`]);
  }
  const chosen = names.filter((n) => rule.oneOf.includes(n));
  if (rule.oneOf.length > 0 && chosen.length !== 1) {
    issues.push([
      undefined,
      `${runtime} needs exactly one of the assets ${rule.oneOf.map((n) => `"${n}"`).join(', ')}`,
    ]);
  }
  const known = [...rule.required, ...rule.oneOf, ...rule.optional];
  for (const name of names) {
    if (!known.includes(name)) {
      issues.push([name, `"${name}" is not a ${runtime} asset (expected ${known.map((n) => `"${n}"`).join(', ')})`]);
    }
  }
  return issues;
}

/** A URL an asset is fetched from. Never echoed in a message: it may be pre-signed. */
const assetUrl = z.string().superRefine((value, ctx) => {
  let url: URL;
  try {
    url = new URL(value);
  } catch {
    ctx.addIssue({ code: 'custom', message: 'must be a URL (file://, http://, https:// or s3://)' });
    return;
  }
  if (!ASSET_SCHEMES.includes(url.protocol)) {
    ctx.addIssue({ code: 'custom', message: 'must be a file://, http://, https:// or s3:// URL' });
  } else if (url.username || url.password) {
    ctx.addIssue({ code: 'custom', message: 'must not carry credentials: name a secret in auth.secretRef instead' });
  }
});

const assetSha256 = z
  .string()
  .regex(/^(?:sha256:)?[a-fA-F0-9]{64}$/, 'must be a sha256 of 64 hex digits')
  .overwrite((s) => s.replace(/^sha256:/, '').toLowerCase());

/** Where a credential lives: `env:NAME` (an environment variable) or `file:/absolute/path`. It is read only when
 * an asset is fetched, and only the reference is ever stored or printed. */
export const secretRef = z
  .string()
  .regex(/^(?:env:[A-Za-z_][A-Za-z0-9_]*|file:\/\S+)$/, 'must be env:NAME or file:/absolute/path');

/** bearer: the secret is the token; basic: "username:password"; s3: "accessKeyId:secretAccessKey[:sessionToken]",
 * with where the S3 service is (not secret: endpoint, region, path-style URLs for MinIO and Ceph). */
export const assetAuth = z
  .object({
    type: z.enum(['bearer', 'basic', 's3']),
    secretRef,
    endpoint: z
      .url({ protocol: /^https?$/, error: 'must be an http(s) URL' })
      .refine((u) => !new URL(u).username && !new URL(u).password, 'must not carry credentials')
      .optional(),
    region: z
      .string()
      .regex(/^[a-z0-9-]{1,64}$/, 'must be a region name')
      .optional(),
    pathStyle: z.boolean().optional(),
  })
  .strict()
  .superRefine((auth, ctx) => {
    if (auth.type === 's3') return;
    for (const key of ['endpoint', 'region', 'pathStyle'] as const) {
      if (auth[key] !== undefined) ctx.addIssue({ code: 'custom', path: [key], message: 'only for type s3' });
    }
  });
export type AssetAuthRef = z.infer<typeof assetAuth>;

export const assetRef = z.object({ url: assetUrl, sha256: assetSha256, auth: assetAuth.optional() }).strict();

const assetName = z.string().regex(/^[a-z0-9][a-z0-9-]{0,62}$/, 'must be an asset name (lower-case, digits, "-")');
/** Assets by name, as a template overrides them and a checkpoint records them. */
export const assetMap = z.record(assetName, assetRef);

function checkAssetNames(runtime: RuntimeClass, assets: Record<string, unknown>, ctx: z.RefinementCtx, at: string[]) {
  for (const [name, message] of assetNameIssues(runtime, Object.keys(assets))) {
    ctx.addIssue({ code: 'custom', path: name ? [...at, name] : at, message });
  }
}

/** The runtime binaries of one runtime class on one architecture: what a pool declares (defaulted per class), a
 * template may override, and every snapshot manifest pins. `auth` applies to every asset of the set. */
export const assetSet = z
  .object({ runtime: runtimeClass, arch: assetArch, assets: assetMap, auth: assetAuth.optional() })
  .strict()
  .superRefine((set, ctx) => checkAssetNames(set.runtime, set.assets, ctx, ['assets']));
export type AssetSet = z.infer<typeof assetSet>;

/** An asset-set file holds one set, or a list of them (one per runtime class and architecture). */
export const assetSetList = z.array(assetSet).min(1, 'must hold at least one asset set');

const port = z.number().int().min(1).max(65535);
const envName = z.string().regex(/^[A-Za-z_][A-Za-z0-9_]*$/, 'must be a valid environment variable name');

const IPV4_CIDR = /^((25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(\/(3[0-2]|[12]?\d))?$/;

/** Where an actor may connect: everything, nothing, or listed CIDRs (optionally only some ports). Link-local
 * (cloud metadata) and the node's own addresses are refused unless a rule names an address inside them. */
export const egressPolicy = z.union(
  [
    z.enum(['allow-all', 'deny-all']),
    z
      .object({
        allow: z
          .array(
            z
              .object({
                cidr: z.string().regex(IPV4_CIDR, 'must be an IPv4 address or CIDR, e.g. 10.0.0.0/8'),
                ports: z.array(port).min(1, 'must list at least one port, or be omitted for all').optional(),
              })
              .strict(),
          )
          .max(64, 'must have at most 64 rules'),
      })
      .strict(),
  ],
  { error: 'must be "allow-all", "deny-all" or { allow: [{ cidr, ports? }] }' },
);
export type EgressPolicy = z.infer<typeof egressPolicy>;

export const templateSpec = z
  .object({
    name: dnsLabel,
    image: z.string().min(1, 'must name an OCI image layout directory or archive'),
    command: z.array(z.string()).default([]),
    env: z.record(envName, z.string()).default({}),
    port: port,
    readiness: z
      .object({
        path: z.string().startsWith('/', 'must start with "/"').default('/'),
        port: port.optional(),
        timeoutSeconds: z.number().positive().max(600).default(30),
      })
      .strict()
      .default({ path: '/', timeoutSeconds: 30 }),
    runtime: runtimeClass.default('gvisor'),
    resources: z
      .object({
        memoryMiB: z.number().int().min(16).max(65536).default(256),
        vcpus: z.number().int().min(1).max(64).default(1),
      })
      .strict()
      .default({ memoryMiB: 256, vcpus: 1 }),
    idleTimeoutSeconds: z.number().int().min(0).max(604800).default(300),
    snapshot: z
      .object({ retain: z.number().int().min(1).max(100).default(3) })
      .strict()
      .default({ retain: 3 }),
    network: z
      .object({ egress: egressPolicy.default('allow-all') })
      .strict()
      .default({ egress: 'allow-all' }),
    /** Overrides the pool's asset set for this template's boots (snapshots restore with what they pinned). */
    assets: assetMap.optional(),
  })
  .strict()
  .superRefine((t, ctx) => {
    if (t.assets) checkAssetNames(t.runtime, t.assets, ctx, ['assets']);
  });
export type TemplateSpec = z.infer<typeof templateSpec>;

export const labels = z.record(
  z.string().regex(/^[a-zA-Z0-9._/-]{1,63}$/, 'must be a label key'),
  z.string().max(63, 'must be at most 63 characters'),
);

export const createActorRequest = z
  .object({
    name: dnsLabel,
    template: dnsLabel,
    labels: labels.default({}),
  })
  .strict();
export type CreateActorRequest = z.infer<typeof createActorRequest>;

export const forkActorRequest = z.object({ name: dnsLabel, labels: labels.default({}) }).strict();

export const execRequest = z
  .object({
    command: z.array(z.string()).min(1, 'must name a command'),
    timeoutSeconds: z.number().positive().max(3600).default(60),
  })
  .strict();

export const listQuery = z
  .object({
    limit: z.coerce.number().int().min(1).max(1000).default(100),
    cursor: z.string().optional(),
  })
  .strict();

/** Parses `input` with `schema`, turning the first issue into INVALID_ARGUMENT with a dotted field path. */
export function parse<S extends z.ZodType>(schema: S, input: unknown, fieldPrefix = ''): z.infer<S> {
  const result = schema.safeParse(input);
  if (result.success) return result.data;
  const issue = result.error.issues[0]!;
  const path = [fieldPrefix, ...issue.path.map(String)].filter(Boolean).join('.');
  const field = path || '(body)';
  throw new TorporError('INVALID_ARGUMENT', `${field}: ${issue.message}`, { field });
}
