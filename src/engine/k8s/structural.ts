// A CRD's openAPIV3Schema generated from the zod schema that Torpor itself parses with, so the API server and
// the control plane validate one definition. Kubernetes accepts only "structural" schemas: every node typed,
// no `additionalProperties` beside `properties`, no free-form unions. What cannot be said structurally is left
// to the controller (it parses with the zod schema and reports the field in a status condition).
import { z } from 'zod';

export type JsonSchema = { [key: string]: unknown };

/** Formats the API server knows; zod's own (e.g. "starts_with") would be rejected or ignored. */
const KUBE_FORMATS = new Set(['int32', 'int64', 'float', 'double', 'byte', 'date', 'date-time', 'password']);
const SCALAR_TYPES = new Set(['string', 'integer', 'number']);

/** The structural openAPIV3Schema of a zod schema (its input side: defaults make fields optional). */
export function structuralSchema(schema: z.ZodType): JsonSchema {
  const json = z.toJSONSchema(schema, { target: 'openapi-3.0', io: 'input', unrepresentable: 'any', reused: 'inline' });
  return structural(json as JsonSchema);
}

function structural(node: JsonSchema): JsonSchema {
  const out: JsonSchema = {};
  for (const [key, value] of Object.entries(node)) {
    if (key === '$schema' || key === 'id' || key === '$id' || key === 'propertyNames') continue;
    if (key === 'format' && !KUBE_FORMATS.has(String(value))) continue;
    if (key === 'const') {
      out.enum = [value];
      continue;
    }
    out[key] = value;
  }
  const union = (out.anyOf ?? out.oneOf) as JsonSchema[] | undefined;
  if (union) return unionNode(out, union);
  if (out.properties) {
    const props: JsonSchema = {};
    for (const [name, child] of Object.entries(out.properties as Record<string, JsonSchema>)) {
      props[name] = structural(child);
    }
    out.properties = props;
    // A closed object is said by pruning in Kubernetes; `additionalProperties` may not sit beside `properties`.
    if (isEmptySchema(out.additionalProperties)) out['x-kubernetes-preserve-unknown-fields'] = true;
    delete out.additionalProperties;
  } else if (out.additionalProperties !== undefined && typeof out.additionalProperties === 'object') {
    if (isEmptySchema(out.additionalProperties)) {
      delete out.additionalProperties;
      out['x-kubernetes-preserve-unknown-fields'] = true;
    } else {
      out.additionalProperties = structural(out.additionalProperties as JsonSchema);
    }
  } else if (out.type === undefined && !out.enum) {
    // z.unknown(): anything goes (the controller checks it).
    out['x-kubernetes-preserve-unknown-fields'] = true;
  }
  if (out.items && typeof out.items === 'object') out.items = structural(out.items as JsonSchema);
  return out;
}

function isEmptySchema(value: unknown): boolean {
  return typeof value === 'object' && value !== null && Object.keys(value).length === 0;
}

/** int-or-string (a resource quantity) is the one union Kubernetes types; any other union becomes a field the API
 * server keeps as sent and the controller validates. */
function unionNode(node: JsonSchema, branches: JsonSchema[]): JsonSchema {
  const { anyOf: _a, oneOf: _o, ...rest } = node;
  const types = new Set(branches.map((b) => String(b.type)));
  const scalars = [...types].every((t) => SCALAR_TYPES.has(t));
  if (scalars && types.has('string') && (types.has('integer') || types.has('number'))) {
    return { ...rest, 'x-kubernetes-int-or-string': true };
  }
  if (types.size === 1 && scalars) {
    // e.g. two string enums: one string schema with the enums merged.
    const enums = branches.flatMap((b) => (Array.isArray(b.enum) ? b.enum : []));
    return { ...rest, type: [...types][0], ...(enums.length ? { enum: enums } : {}) };
  }
  return { ...rest, 'x-kubernetes-preserve-unknown-fields': true };
}
