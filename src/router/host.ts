// Which actor a request names: the Host header, in the form <actor>.<space>.actors.<domain>[:port], or — for
// clients that cannot set Host (Node's fetch, browsers) or resolve wildcard names — the X-Torpor-Actor header,
// `<actor>.<space>`. Either names an actor, never an address: absolute-form targets are refused, so a client can
// never steer the router at an address or port of its choosing.
import type { IncomingHttpHeaders } from 'node:http';
import { TorporError } from '../core/errors.ts';
import type { ActorRef } from '../core/types.ts';

const LABEL = /^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$/;

/** The request target must be origin-form (`/path?query`). */
export function originFormPath(url: string | undefined): string {
  if (!url?.startsWith('/') || url.startsWith('//')) {
    throw new TorporError(
      'INVALID_ARGUMENT',
      'request target must be a path (origin-form); absolute URIs are refused',
      {
        field: 'target',
      },
    );
  }
  return url;
}

export const ACTOR_HEADER = 'x-torpor-actor';

/** The actor a request names: X-Torpor-Actor when present, else Host. */
export function actorOf(headers: IncomingHttpHeaders, domain: string): ActorRef {
  const named = headers[ACTOR_HEADER];
  if (named === undefined) return actorFromHost(headers.host, domain);
  const value = Array.isArray(named) ? '' : named;
  const [name, space, ...rest] = value.toLowerCase().split('.');
  if (rest.length > 0 || !name || !space || !LABEL.test(name) || !LABEL.test(space)) {
    throw new TorporError('NOT_FOUND', `${ACTOR_HEADER} "${value}" does not name an actor: use <actor>.<space>`, {
      field: ACTOR_HEADER,
    });
  }
  return { space, name };
}

export function actorFromHost(host: string | undefined, domain: string): ActorRef {
  const name = (host ?? '').toLowerCase().replace(/:\d+$/, '').replace(/\.$/, '');
  const suffix = `.actors.${domain.toLowerCase()}`;
  const labels = name.endsWith(suffix) ? name.slice(0, -suffix.length).split('.') : [];
  const [actor, space] = labels;
  if (labels.length !== 2 || !actor || !space || !LABEL.test(actor) || !LABEL.test(space)) {
    throw new TorporError('NOT_FOUND', `Host "${host ?? ''}" does not name an actor: use <actor>.<space>${suffix}`, {
      field: 'host',
    });
  }
  return { space, name: actor };
}
