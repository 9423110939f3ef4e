// Which actor a request names. Only the Host header counts, and only in the form
// <actor>.<space>.actors.<domain>[:port]; absolute-form targets are refused, so a client can never steer the
// router at an address or port of its choosing.
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
