// Template: apply (create, idempotent for an identical spec) and read templates.
import { type Config, json, resolveConfig, type TorporOptions } from './http.ts';
import type { components } from './openapi.ts';

export type TemplateSpec = components['schemas']['TemplateSpec'];
export type TemplateInfo = components['schemas']['Template'];

export const Template = {
  /** Creates the template (taking its golden snapshot) or, for an identical spec, returns the existing one;
   * ALREADY_EXISTS when the name is taken by a different spec (templates are immutable). */
  apply(spec: TemplateSpec, opts: TorporOptions = {}): Promise<TemplateInfo> {
    // Idempotent by the server's contract, so a lost answer may be asked again.
    return json<TemplateInfo>(resolveConfig(opts), 'POST', '/v1/templates', { body: spec, idempotent: true });
  },

  get(name: string, opts: TorporOptions = {}): Promise<TemplateInfo> {
    return json<TemplateInfo>(resolveConfig(opts), 'GET', `/v1/templates/${encodeURIComponent(name)}`, {
      idempotent: true,
    });
  },

  async list(opts: TorporOptions = {}): Promise<TemplateInfo[]> {
    const config: Config = resolveConfig(opts);
    const out: TemplateInfo[] = [];
    let cursor: string | undefined;
    do {
      const query = new URLSearchParams({ limit: '1000', ...(cursor ? { cursor } : {}) });
      const page = await json<components['schemas']['TemplateList']>(config, 'GET', `/v1/templates?${query}`, {
        idempotent: true,
      });
      out.push(...page.items);
      cursor = page.nextCursor;
    } while (cursor);
    return out;
  },
};
