// openBlobStore: the blob store a URL names.
//   /path, ./path, file:///path                      → FsBlobStore rooted there
//   s3://bucket[/prefix][?endpoint=URL&region=R&pathStyle=true|false]  → S3BlobStore
// S3 credentials come from the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN), or
// else from the SDK's default chain (shared config files, web identity, instance metadata) — never from the
// URL, which ends up in command lines, logs and process listings. Errors never echo the URL as a whole.
import { fileURLToPath } from 'node:url';
import { TorporError } from '../core/errors.ts';
import type { BlobStore } from './blob.ts';
import { FsBlobStore } from './fs.ts';
import { S3BlobStore, type S3Credentials } from './s3.ts';

const SCHEME = /^[a-z][a-z0-9+.-]+:/i;
const S3_PARAMS = new Set(['endpoint', 'region', 'pathStyle']);

export function openBlobStore(url: string, env: NodeJS.ProcessEnv = process.env): BlobStore {
  if (typeof url !== 'string' || url.trim() === '') throw invalid('the blob store location is empty');
  if (!SCHEME.test(url)) return new FsBlobStore(url);
  let parsed: URL;
  try {
    parsed = new URL(url);
  } catch {
    throw invalid('the blob store URL is malformed');
  }
  switch (parsed.protocol) {
    case 'file:':
      return new FsBlobStore(filePath(parsed));
    case 's3:':
      return s3Store(parsed, env);
    default:
      throw invalid(`unsupported blob store scheme ${JSON.stringify(parsed.protocol)}: use a path, file:// or s3://`);
  }
}

function filePath(url: URL): string {
  try {
    return fileURLToPath(url);
  } catch {
    throw invalid('a file:// blob store URL must name a local absolute path');
  }
}

function s3Store(url: URL, env: NodeJS.ProcessEnv): S3BlobStore {
  if (url.username !== '' || url.password !== '') {
    throw invalid('credentials do not belong in the blob store URL: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY');
  }
  for (const name of url.searchParams.keys()) {
    if (!S3_PARAMS.has(name))
      throw invalid(`unknown s3:// parameter ${JSON.stringify(name)} (endpoint, region, pathStyle)`);
  }
  const bucket = url.hostname;
  if (bucket === '') throw invalid('an s3:// blob store URL needs a bucket: s3://bucket/prefix');
  const prefix = decodeURIComponent(url.pathname).replace(/^\/+|\/+$/g, '');
  const endpoint = url.searchParams.get('endpoint') ?? undefined;
  if (endpoint !== undefined) checkEndpoint(endpoint);
  const pathStyle = url.searchParams.get('pathStyle');
  if (pathStyle !== null && pathStyle !== 'true' && pathStyle !== 'false') {
    throw invalid('pathStyle must be true or false');
  }
  const region = url.searchParams.get('region') ?? env.AWS_REGION ?? env.AWS_DEFAULT_REGION;
  const credentials = credentialsFromEnv(env);
  try {
    return new S3BlobStore({
      bucket,
      ...(prefix !== '' ? { prefix } : {}),
      ...(endpoint !== undefined ? { endpoint } : {}),
      ...(region !== undefined && region !== '' ? { region } : {}),
      ...(pathStyle !== null ? { forcePathStyle: pathStyle === 'true' } : {}),
      ...(credentials !== undefined ? { credentials } : {}),
    });
  } catch (err) {
    if (err instanceof TorporError) throw invalid(`s3:// blob store: ${err.message}`);
    throw err;
  }
}

/** The static credentials the environment holds, if any (otherwise the SDK's default chain looks further). */
export function credentialsFromEnv(env: NodeJS.ProcessEnv): S3Credentials | undefined {
  const accessKeyId = env.AWS_ACCESS_KEY_ID;
  const secretAccessKey = env.AWS_SECRET_ACCESS_KEY;
  if (!accessKeyId && !secretAccessKey) return undefined;
  if (!accessKeyId || !secretAccessKey) {
    throw invalid('AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY must be set together');
  }
  const sessionToken = env.AWS_SESSION_TOKEN;
  return sessionToken ? { accessKeyId, secretAccessKey, sessionToken } : { accessKeyId, secretAccessKey };
}

function checkEndpoint(endpoint: string): void {
  let parsed: URL;
  try {
    parsed = new URL(endpoint);
  } catch {
    throw invalid('the s3:// endpoint parameter must be an http(s) URL');
  }
  if (parsed.protocol !== 'http:' && parsed.protocol !== 'https:') {
    throw invalid('the s3:// endpoint parameter must be an http(s) URL');
  }
  if (parsed.username !== '' || parsed.password !== '') {
    throw invalid('credentials do not belong in the endpoint URL: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY');
  }
}

function invalid(message: string): TorporError {
  return new TorporError('INVALID_ARGUMENT', message, { field: 'blob' });
}
