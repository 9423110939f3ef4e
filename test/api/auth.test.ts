// Who a call to the AEnvironment API is from: API keys and the owner they speak for (src/api/compat.ts).
import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import { ApiKeys, authenticate } from '../../src/api/compat.ts';

const ALICE = 'alice-key-0123456789';
const SERVICE = 'service-key-0123456789';
const keys = new ApiKeys([
  ['alice', ALICE],
  ['*', SERVICE],
]);
const bearer = (key: string) => ({ authorization: `Bearer ${key}` });

describe('API keys', () => {
  test('configuration is checked: keys of at least 16 characters, owners without spaces or "*"', () => {
    assert.throws(() => new ApiKeys([['alice', 'short']]), { code: 'INVALID_ARGUMENT', field: 'api-key' });
    assert.throws(() => new ApiKeys([['a b', ALICE]]), { code: 'INVALID_ARGUMENT', field: 'api-key' });
    assert.throws(() => new ApiKeys([['', ALICE]]), { code: 'INVALID_ARGUMENT', field: 'api-key' });
    assert.equal(keys.ownerOf(ALICE), 'alice');
    assert.equal(keys.ownerOf(SERVICE), '*');
    assert.equal(keys.ownerOf(`${ALICE}x`), undefined);
    assert.equal(keys.ownerOf(''), undefined);
  });

  test('without keys, the caller is whoever it states (X-Owner, then ?owner=)', () => {
    assert.deepEqual(authenticate({}, {}, undefined, true), { caller: {}, usedKey: false });
    assert.deepEqual(authenticate({ 'x-owner': 'bob' }, {}, undefined, true).caller, { owner: 'bob' });
    assert.deepEqual(authenticate({}, { owner: 'carol' }, undefined, true).caller, { owner: 'carol' });
    assert.throws(() => authenticate({}, { owner: ['a', 'b'] }, undefined, true), { field: 'owner' });
  });

  test("with keys, the API needs one and the key's owner is the caller", () => {
    assert.throws(() => authenticate({}, {}, keys, true), { code: 'UNAUTHENTICATED', field: 'authorization' });
    assert.throws(() => authenticate(bearer('nope-nope-nope-nope'), {}, keys, true), {
      code: 'UNAUTHENTICATED',
      message: 'authorization: the API key is not valid',
    });
    assert.throws(() => authenticate({ authorization: `Basic ${ALICE}` }, {}, keys, true), {
      code: 'UNAUTHENTICATED',
    });
    assert.deepEqual(authenticate(bearer(ALICE), {}, keys, true), { caller: { owner: 'alice' }, usedKey: true });
    assert.deepEqual(authenticate({ ...bearer(ALICE), 'x-owner': 'alice' }, {}, keys, true).caller, {
      owner: 'alice',
    });
    assert.throws(() => authenticate({ ...bearer(ALICE), 'x-owner': 'bob' }, {}, keys, true), {
      code: 'PERMISSION_DENIED',
      field: 'owner',
    });
    assert.throws(() => authenticate(bearer(ALICE), { owner: 'bob' }, keys, true), { code: 'PERMISSION_DENIED' });
  });

  test('a service key acts for the owner it states, or for none', () => {
    assert.deepEqual(authenticate(bearer(SERVICE), {}, keys, true), { caller: {}, usedKey: true });
    assert.deepEqual(authenticate({ ...bearer(SERVICE), 'x-owner': 'bob' }, {}, keys, true).caller, { owner: 'bob' });
  });

  test('the MCP gateway does not require a key; a Torpor key is consumed, any other Authorization is not', () => {
    assert.deepEqual(authenticate({}, undefined, keys, false), { caller: {}, usedKey: false });
    assert.deepEqual(authenticate(bearer('the-sandbox-own-token'), undefined, keys, false), {
      caller: {},
      usedKey: false,
    });
    assert.deepEqual(authenticate(bearer(ALICE), undefined, keys, false), {
      caller: { owner: 'alice' },
      usedKey: true,
    });
  });
});
