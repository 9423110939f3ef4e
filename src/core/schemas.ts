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

const port = z.number().int().min(1).max(65535);
const envName = z.string().regex(/^[A-Za-z_][A-Za-z0-9_]*$/, 'must be a valid environment variable name');

const IPV4_CIDR = /^((25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(\/(3[0-2]|[12]?\d))?$/;

/** Where an actor may connect: everything, nothing, or listed CIDRs (optionally only some ports). Link-local
 * (cloud metadata) and the node's own addresses are refused unless a rule names an address inside them. */
export const egressPolicy = z.union([
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
]);
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
  })
  .strict();
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
