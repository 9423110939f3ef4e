// Makes Node resolve *.localhost to loopback, as RFC 6761 asks and as browsers and curl already do (glibc does
// not). The router is reached at <actor>.<space>.actors.torpor.localhost; with real DNS for the router's domain
// this is not needed. Import it first, or load it with `node --import ./test/sdk/localhost-dns.ts`.
import dns, { type LookupAddress, type LookupOptions } from 'node:dns';

type Callback = (err: NodeJS.ErrnoException | null, address: string | LookupAddress[], family?: number) => void;

const original = dns.lookup;
const LOCALHOST = /(^|\.)localhost\.?$/i;

function lookup(hostname: string, options: LookupOptions | number | Callback, callback?: Callback): void {
  const cb = (typeof options === 'function' ? options : callback) as Callback;
  const opts: LookupOptions =
    typeof options === 'object' ? options : typeof options === 'number' ? { family: options } : {};
  if (!LOCALHOST.test(hostname)) {
    (original as (h: string, o: LookupOptions, c: Callback) => void)(hostname, opts, cb);
    return;
  }
  process.nextTick(() => (opts.all ? cb(null, [{ address: '127.0.0.1', family: 4 }]) : cb(null, '127.0.0.1', 4)));
}

(dns as { lookup: unknown }).lookup = lookup;
