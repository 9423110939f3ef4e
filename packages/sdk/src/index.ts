// @torpor/sdk: a client for Torpor that needs nothing but the platform's fetch (Node >= 22, Bun, Deno, browsers).
//   const a = await Actor.create({ template: 'counter' });
//   await a.resume(); const res = await a.fetch('/'); await a.suspend();
export {
  Actor,
  type ActorInfo,
  type ActorStatus,
  type CreateActorOptions,
  type ExecOptions,
  type ExecResult,
  type LogsOptions,
} from './actor.ts';
export { type ErrorCode, TorporApiError } from './errors.ts';
export type { TorporOptions } from './http.ts';
export type { components, paths } from './openapi.ts';
export { Template, type TemplateInfo, type TemplateSpec } from './template.ts';
