import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import { TorporError } from '../../src/core/errors.ts';
import { createActorRequest, parse, templateSpec } from '../../src/core/schemas.ts';
import { assertTransition, canTransition } from '../../src/core/state.ts';

function invalid(fn: () => unknown, field: string): void {
  assert.throws(fn, (err: unknown) => {
    assert.ok(err instanceof TorporError);
    assert.equal(err.code, 'INVALID_ARGUMENT');
    assert.equal(err.field, field);
    assert.equal(err.status, 400);
    return true;
  });
}

describe('template schema', () => {
  test('fills defaults', () => {
    const t = parse(templateSpec, { name: 'counter', image: '/img', port: 8080 });
    assert.equal(t.runtime, 'gvisor');
    assert.deepEqual(t.resources, { memoryMiB: 256, vcpus: 1 });
    assert.deepEqual(t.readiness, { path: '/', timeoutSeconds: 30 });
    assert.deepEqual(t.snapshot, { retain: 3 });
    assert.deepEqual(t.command, []);
  });

  test('names the offending field, nested ones with a dotted path', () => {
    invalid(() => parse(templateSpec, { name: 'Counter', image: '/i', port: 80 }), 'name');
    invalid(() => parse(templateSpec, { name: 'c', image: '/i', port: 70000 }), 'port');
    invalid(() => parse(templateSpec, { name: 'c', image: '/i', port: 80, runtime: 'docker' }), 'runtime');
    invalid(
      () => parse(templateSpec, { name: 'c', image: '/i', port: 80, resources: { memoryMiB: 1 } }),
      'resources.memoryMiB',
    );
    invalid(
      () => parse(templateSpec, { name: 'c', image: '/i', port: 80, readiness: { path: 'healthz' } }),
      'readiness.path',
    );
    invalid(() => parse(templateSpec, { name: 'c', image: '/i', port: 80, env: { '1BAD': 'x' } }), 'env.1BAD');
  });

  test('unknown fields are rejected rather than ignored', () => {
    invalid(() => parse(templateSpec, { name: 'c', image: '/i', port: 80, prot: 81 }), '(body)');
  });

  test('actor names are DNS-1123 labels of at most 63 characters', () => {
    assert.equal(parse(createActorRequest, { name: 'a-1', template: 't' }).name, 'a-1');
    invalid(() => parse(createActorRequest, { name: 'a'.repeat(64), template: 't' }), 'name');
    invalid(() => parse(createActorRequest, { name: '-a', template: 't' }), 'name');
    invalid(() => parse(createActorRequest, { name: 'a_b', template: 't' }), 'name');
    invalid(() => parse(createActorRequest, { template: 't' }), 'name');
  });
});

describe('actor state machine', () => {
  test('the lifecycle loop is allowed', () => {
    for (const [from, to] of [
      ['SUSPENDED', 'RESUMING'],
      ['RESUMING', 'RUNNING'],
      ['RUNNING', 'SUSPENDING'],
      ['SUSPENDING', 'SUSPENDED'],
      ['RUNNING', 'PAUSING'],
      ['PAUSING', 'PAUSED'],
      ['PAUSED', 'RESUMING'],
    ] as const) {
      assert.ok(canTransition(from, to), `${from} -> ${to}`);
    }
  });

  test('shortcuts are refused with FAILED_PRECONDITION', () => {
    assert.throws(() => assertTransition('SUSPENDED', 'RUNNING'), { code: 'FAILED_PRECONDITION' });
    assert.throws(() => assertTransition('SUSPENDED', 'SUSPENDING'), { code: 'FAILED_PRECONDITION' });
    assert.throws(() => assertTransition('PAUSED', 'RUNNING'), { code: 'FAILED_PRECONDITION' });
  });
});
