// `torpor install`: renders deploy/ (a kustomization: resources, namespace, images, JSON 6902 patches — the subset
// Torpor's manifests use, so `kubectl apply -k deploy/` gives the same objects) and applies it with server-side
// apply, CRDs first. The agents' bootstrap token Secret is generated in the cluster, never printed.
import { randomBytes } from 'node:crypto';
import { readFile, stat } from 'node:fs/promises';
import { join, resolve } from 'node:path';
import type { KubernetesObject } from '@kubernetes/client-node';
import type { Logger } from 'pino';
import { parseAllDocuments, stringify } from 'yaml';
import { TorporError } from '../../core/errors.ts';
import { type Kube, objectPath, resourcePath } from './kube.ts';
import { generateWebhookCertificates, WEBHOOK_SECRET, type WebhookCertificates } from './webhook.ts';

export const DEPLOY_DIR = resolve(import.meta.dirname, '../../../deploy');
export const AGENT_TOKEN_SECRET = 'torpor-agent-token';

type Obj = KubernetesObject & { [key: string]: unknown };

interface Kustomization {
  namespace?: string;
  resources?: string[];
  images?: { name: string; newName?: string; newTag?: string }[];
  patches?: { target: { kind?: string; name?: string }; patch: string }[];
}

const CLUSTER_SCOPED = new Set([
  'Namespace',
  'CustomResourceDefinition',
  'ClusterRole',
  'ClusterRoleBinding',
  'AssetSet',
  'ValidatingWebhookConfiguration',
]);

async function readYaml(file: string): Promise<unknown[]> {
  const docs = parseAllDocuments(await readFile(file, 'utf8'));
  return docs.map((d) => d.toJS()).filter((d) => d !== null && d !== undefined);
}

/** The objects a kustomization directory renders to. */
export async function renderKustomization(dir: string): Promise<Obj[]> {
  const [k] = (await readYaml(join(dir, 'kustomization.yaml'))) as Kustomization[];
  if (!k) throw new TorporError('INVALID_ARGUMENT', `${dir}/kustomization.yaml is empty`, { field: 'dir' });
  let objects: Obj[] = [];
  for (const r of k.resources ?? []) {
    const path = resolve(dir, r);
    if ((await stat(path)).isDirectory()) objects.push(...(await renderKustomization(path)));
    else objects.push(...((await readYaml(path)) as Obj[]));
  }
  if (k.namespace) objects = setNamespace(objects, k.namespace);
  for (const image of k.images ?? []) objects = setImage(objects, image.name, imageRef(image));
  for (const p of k.patches ?? []) {
    const ops = parseAllDocuments(p.patch)[0]?.toJS() as JsonPatchOp[];
    for (const o of objects) {
      if ((!p.target.kind || o.kind === p.target.kind) && (!p.target.name || o.metadata?.name === p.target.name)) {
        applyJsonPatch(o, ops);
      }
    }
  }
  return objects;
}

const imageRef = (i: { name: string; newName?: string; newTag?: string }) =>
  `${i.newName ?? i.name}${i.newTag ? `:${i.newTag}` : ''}`;

/** kustomize's `namespace:` (also renaming Torpor's own Namespace object and service-account subjects). */
export function setNamespace(objects: Obj[], namespace: string): Obj[] {
  return objects.map((o) => {
    const c = structuredClone(o);
    if (c.kind === 'Namespace') c.metadata!.name = namespace;
    else if (!CLUSTER_SCOPED.has(c.kind ?? '')) c.metadata!.namespace = namespace;
    for (const s of (c.subjects as { kind: string; namespace?: string }[] | undefined) ?? []) {
      if (s.kind === 'ServiceAccount') s.namespace = namespace;
    }
    for (const w of webhooksOf(c)) if (w.clientConfig.service) w.clientConfig.service.namespace = namespace;
    return c;
  });
}

interface Webhook {
  clientConfig: { service?: { name: string; namespace: string }; caBundle?: string };
}

const webhooksOf = (o: Obj): Webhook[] =>
  o.kind === 'ValidatingWebhookConfiguration' ? ((o.webhooks as Webhook[] | undefined) ?? []) : [];

/** kustomize's `images:` for containers named by image `name`; also the server's --agent-image flag. */
export function setImage(objects: Obj[], name: string, ref: string): Obj[] {
  const matches = (image: string) => image === name || image.startsWith(`${name}:`) || image.startsWith(`${name}@`);
  return objects.map((o) => {
    const c = structuredClone(o);
    const pod = (c.spec as { template?: { spec?: { containers?: { image: string; args?: string[] }[] } } } | undefined)
      ?.template?.spec;
    for (const container of pod?.containers ?? []) {
      if (matches(container.image)) container.image = ref;
      container.args = container.args?.map((a) =>
        a.startsWith('--agent-image=') && matches(a.slice('--agent-image='.length)) ? `--agent-image=${ref}` : a,
      );
    }
    return c;
  });
}

interface JsonPatchOp {
  op: 'add' | 'replace' | 'remove';
  path: string;
  value?: unknown;
}

function applyJsonPatch(target: object, ops: JsonPatchOp[]): void {
  for (const op of ops) {
    const parts = op.path
      .split('/')
      .slice(1)
      .map((p) => p.replace(/~1/g, '/').replace(/~0/g, '~'));
    const last = parts.pop()!;
    let node: unknown = target;
    for (const p of parts) node = (node as Record<string, unknown>)[p];
    if (node === undefined || node === null) {
      throw new TorporError('INVALID_ARGUMENT', `patch path ${op.path} does not exist`, { field: 'patches' });
    }
    if (Array.isArray(node)) {
      const i = last === '-' ? node.length : Number(last);
      if (op.op === 'add') node.splice(i, 0, op.value);
      else if (op.op === 'replace') node[i] = op.value;
      else node.splice(i, 1);
    } else {
      const rec = node as Record<string, unknown>;
      if (op.op === 'remove') delete rec[last];
      else rec[last] = op.value;
    }
  }
}

export interface InstallSettings {
  /** deploy/ (Kubernetes) or deploy/ack (ACK). */
  dir: string;
  namespace?: string;
  image?: string;
  /** Values for the torpor-config ConfigMap (blob, store, server, domain). */
  config?: Record<string, string>;
}

/** The manifests `torpor install` applies, in apply order (CRDs and the Namespace first). */
export async function renderInstall(s: InstallSettings): Promise<Obj[]> {
  let objects = await renderKustomization(s.dir);
  if (s.namespace) objects = setNamespace(objects, s.namespace);
  if (s.image) objects = setImage(objects, 'torpor', s.image);
  for (const o of objects) {
    if (o.kind === 'ConfigMap' && o.metadata?.name === 'torpor-config' && s.config) {
      o.data = { ...(o.data as Record<string, string>), ...s.config };
    }
  }
  const rank = (o: Obj) => (o.kind === 'CustomResourceDefinition' ? 0 : o.kind === 'Namespace' ? 1 : 2);
  return objects.sort((a, b) => rank(a) - rank(b));
}

export function toYaml(objects: object[]): string {
  return objects.map((o) => stringify(o, { lineWidth: 0 })).join('---\n');
}

/** Server-side applies `objects` in order; a custom resource waits until its CRD is served. CRD validation rules
 * (x-kubernetes-validations) are left out for API servers older than 1.25, whose apply refuses the field. */
export async function applyObjects(kube: Kube, objects: Obj[], log: Logger): Promise<void> {
  const version = await kube.request<{ major: string; minor: string }>('GET', '/version');
  const rules = Number(version.major) > 1 || Number.parseInt(version.minor, 10) >= 25;
  for (const o of objects) {
    if (o.apiVersion?.startsWith('torpor.dev/')) await waitServed(kube, o);
    await kube.apply(o.kind === 'CustomResourceDefinition' && !rules ? withoutValidationRules(o) : o);
    log.info({ kind: o.kind, name: o.metadata?.name, namespace: o.metadata?.namespace }, 'applied');
  }
  for (const o of objects) if (o.kind === 'CustomResourceDefinition') await waitCrdServed(kube, o);
}

function withoutValidationRules(o: Obj): Obj {
  const strip = (v: unknown): unknown => {
    if (Array.isArray(v)) return v.map(strip);
    if (v && typeof v === 'object') {
      return Object.fromEntries(
        Object.entries(v)
          .filter(([k]) => k !== 'x-kubernetes-validations')
          .map(([k, x]) => [k, strip(x)]),
      );
    }
    return v;
  };
  return strip(o) as Obj;
}

async function waitCrdServed(kube: Kube, crd: Obj): Promise<void> {
  const spec = crd.spec as { group: string; versions: { name: string }[]; names: { plural: string } };
  await waitFor(kube, resourcePath(`${spec.group}/${spec.versions[0]!.name}`, spec.names.plural));
}

/** Applies the manifests (see applyObjects) and makes sure the agents' token Secret exists (created with a
 * random token; an existing one is kept: agents hold it), and the Template webhook's certificate: generated with
 * a CA of its own at the first install (the Secret torpor-webhook-tls), whose CA becomes the webhook
 * configuration's caBundle; an existing one is kept. */
export async function applyInstall(kube: Kube, objects: Obj[], log: Logger): Promise<void> {
  const namespace = objects.find((o) => o.kind === 'Namespace')?.metadata?.name ?? 'torpor';
  const tlsPath = resourcePath('v1', 'secrets', namespace, WEBHOOK_SECRET);
  const hooks = objects.flatMap(webhooksOf);
  const existing = hooks.length ? await kube.get<{ data?: Record<string, string> }>(tlsPath) : undefined;
  let generated: WebhookCertificates | undefined;
  let caBundle = existing?.data?.['ca.crt'];
  if (hooks.length && !caBundle) {
    const service = hooks.find((w) => w.clientConfig.service)?.clientConfig.service;
    const host = `${service?.name ?? 'torpor-webhook'}.${namespace}.svc`;
    generated = await generateWebhookCertificates([host, `${host}.cluster.local`]);
    caBundle = Buffer.from(generated.ca).toString('base64');
  }
  for (const w of hooks) w.clientConfig.caBundle = caBundle;
  await applyObjects(kube, objects, log);
  if (generated) {
    const body = {
      apiVersion: 'v1',
      kind: 'Secret',
      metadata: { name: WEBHOOK_SECRET, labels: { 'app.kubernetes.io/part-of': 'torpor' } },
      type: 'kubernetes.io/tls',
      stringData: { 'tls.crt': generated.cert, 'tls.key': generated.key, 'ca.crt': generated.ca },
    };
    // A Secret without ca.crt (made by hand) is replaced: the caBundle now names the generated CA.
    if (existing) await kube.request('PUT', tlsPath, { body });
    else await kube.request('POST', resourcePath('v1', 'secrets', namespace), { body });
    log.info({ name: WEBHOOK_SECRET, namespace }, 'created the Template webhook’s certificate Secret');
  }
  const secretPath = resourcePath('v1', 'secrets', namespace, AGENT_TOKEN_SECRET);
  if (!(await kube.get(secretPath))) {
    await kube.request('POST', resourcePath('v1', 'secrets', namespace), {
      body: {
        apiVersion: 'v1',
        kind: 'Secret',
        metadata: { name: AGENT_TOKEN_SECRET, labels: { 'app.kubernetes.io/part-of': 'torpor' } },
        type: 'Opaque',
        stringData: { token: randomBytes(32).toString('base64url') },
      },
    });
    log.info({ name: AGENT_TOKEN_SECRET, namespace }, 'created the agents’ bootstrap token Secret');
  }
}

function waitServed(kube: Kube, o: Obj): Promise<void> {
  return waitFor(kube, objectPath(o).replace(/\/[^/]+$/, ''));
}

/** Waits (up to 10 s) until GET `path` answers. */
async function waitFor(kube: Kube, path: string): Promise<void> {
  for (let i = 0; ; i++) {
    try {
      await kube.request('GET', path);
      return;
    } catch (err) {
      if (i >= 100) throw err;
      await new Promise((r) => setTimeout(r, 100));
    }
  }
}
