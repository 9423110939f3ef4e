// The activation ruleset as text: what nft is asked to load (the e2e network test proves nft enforces it).
import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { isTorporError } from '../../src/core/errors.ts';
import { parse, templateSpec } from '../../src/core/schemas.ts';
import { cidrWithin, parseCidr, renderActivationRules } from '../../src/net/egress.ts';

const base = {
  uplink: 'uplink',
  actorLink: 'actor0',
  workerAddress: '10.213.7.2',
  ports: [8080, 8080, 9090],
  denied: ['192.0.2.10'],
  comment: 'actor default/a "quoted"',
};

/** The forward chain's rules, in order. */
function forwardRules(script: string): string[] {
  const chain = script.slice(script.indexOf('chain forward'));
  return chain
    .split('\n')
    .slice(2)
    .map((l) => l.trim())
    .filter((l) => l.startsWith('iifname'));
}

describe('egress rules', () => {
  it('parses CIDRs and tells containment', () => {
    assert.deepEqual(parseCidr('10.1.2.3/8'), { network: 0x0a000000, prefix: 8 });
    assert.equal(parseCidr('1.2.3.4').prefix, 32);
    assert.throws(() => parseCidr('10.0.0.256/8'), RangeError);
    assert.throws(() => parseCidr('10.0.0.0/33'), RangeError);
    assert.ok(cidrWithin('169.254.169.254/32', '169.254.0.0/16'));
    assert.ok(!cidrWithin('0.0.0.0/0', '169.254.0.0/16'));
    assert.ok(!cidrWithin('169.254.0.0/15', '169.254.0.0/16'));
  });

  it('forwards the service ports (once each) to the actor and masquerades its egress', () => {
    const script = renderActivationRules({ ...base, egress: 'allow-all' });
    assert.match(script, /^add table ip torpor\ndelete table ip torpor\n/, 'replaces an earlier table atomically');
    assert.match(script, /iifname "uplink" ip daddr 10\.213\.7\.2 tcp dport \{ 8080, 9090 \} dnat to 169\.254\.17\.2/);
    assert.match(script, /oifname "uplink" ip saddr 169\.254\.17\.2 masquerade/);
    assert.match(script, /comment "actor default\/a quoted"/);
  });

  it('allow-all still refuses infrastructure and the node’s own addresses', () => {
    assert.deepEqual(forwardRules(renderActivationRules({ ...base, egress: 'allow-all' })), [
      'iifname "actor0" ct state established,related accept',
      'iifname "actor0" ip daddr { 169.254.0.0/16, 10.213.0.0/16, 10.214.0.0/16, 192.0.2.10 } reject with icmp type admin-prohibited',
      'iifname "actor0" accept',
    ]);
  });

  it('deny-all refuses everything new', () => {
    const rules = forwardRules(renderActivationRules({ ...base, egress: 'deny-all' }));
    assert.equal(rules.at(-1), 'iifname "actor0" reject with icmp type admin-prohibited');
    assert.ok(!rules.some((r) => r.endsWith(' accept') && !r.includes('established')));
  });

  it('an allow list opens infrastructure only for rules naming an address inside it, before the refusal', () => {
    const rules = forwardRules(
      renderActivationRules({
        ...base,
        egress: {
          allow: [
            { cidr: '0.0.0.0/0', ports: [443] },
            { cidr: '169.254.169.254/32', ports: [80] },
            { cidr: '10.9.0.0/16' },
          ],
        },
      }),
    );
    assert.deepEqual(rules, [
      'iifname "actor0" ct state established,related accept',
      'iifname "actor0" ip daddr 169.254.169.254 meta l4proto { tcp, udp } th dport { 80 } accept',
      'iifname "actor0" ip daddr { 169.254.0.0/16, 10.213.0.0/16, 10.214.0.0/16, 192.0.2.10 } reject with icmp type admin-prohibited',
      'iifname "actor0" ip daddr 0.0.0.0/0 meta l4proto { tcp, udp } th dport { 443 } accept',
      'iifname "actor0" ip daddr 10.9.0.0/16 accept',
      'iifname "actor0" reject with icmp type admin-prohibited',
    ]);
  });
});

describe('template network schema', () => {
  const spec = (egress: unknown) => ({ name: 't', image: 'i', port: 80, network: { egress } });
  const fieldOf = (egress: unknown) => {
    try {
      parse(templateSpec, spec(egress));
    } catch (err) {
      assert.ok(isTorporError(err) && err.code === 'INVALID_ARGUMENT');
      return err.field;
    }
    return undefined;
  };

  it('defaults to allow-all', () => {
    assert.deepEqual(parse(templateSpec, { name: 't', image: 'i', port: 80 }).network, { egress: 'allow-all' });
  });

  it('names the offending field', () => {
    assert.equal(fieldOf('allow-some'), 'network.egress');
    assert.equal(fieldOf({ allow: [{ cidr: '10.0.0.0/33' }] }), 'network.egress.allow.0.cidr');
    assert.equal(fieldOf({ allow: [{ cidr: '10.0.0.1', ports: [70000] }] }), 'network.egress.allow.0.ports.0');
    assert.equal(fieldOf({ allow: [{ cidr: '10.0.0.1', ports: [] }] }), 'network.egress.allow.0.ports');
    assert.equal(fieldOf({ allow: [{ cidr: '10.0.0.1' }] }), undefined);
  });
});
