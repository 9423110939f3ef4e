// Lease fencing shared by the store implementations: which leases may fence which writes, and the errors.
import { TorporError } from '../core/errors.ts';
import type { Fence } from './store.ts';

/** The space a lease key is scoped to: the part before its first `/`, or undefined for a global lease. */
export function leaseSpace(key: string): string | undefined {
  const slash = key.indexOf('/');
  return slash > 0 ? key.slice(0, slash) : undefined;
}

/** Checks that `fence` is well formed and names a lease of `space` (see Fence); throws INVALID_ARGUMENT. */
export function checkFence(fence: Fence, space: string): void {
  checkLeaseOfSpace(fence.lease, space, 'fence.lease');
  if (!Number.isSafeInteger(fence.token) || fence.token < 1) {
    throw new TorporError(
      'INVALID_ARGUMENT',
      `fence.token: must be a token acquireLease returned, got ${fence.token}`,
      {
        field: 'fence.token',
      },
    );
  }
}

/** Checks that `lease` is named `<space>/…` (it fences writes to `space`); throws INVALID_ARGUMENT naming `field`. */
export function checkLeaseOfSpace(lease: string, space: string, field: string): void {
  if (typeof lease !== 'string' || leaseSpace(lease) !== space) {
    throw new TorporError(
      'INVALID_ARGUMENT',
      `${field}: a lease fencing writes to space "${space}" must be named "${space}/…", got "${lease}"`,
      { field },
    );
  }
}

export function leaseLost(fence: Fence): TorporError {
  return new TorporError(
    'LEASE_LOST',
    `lease "${fence.lease}" is no longer held with token ${fence.token}: it expired, was released or was taken over`,
    { field: 'fence' },
  );
}

export function checkTtl(ttlMs: number): void {
  if (!Number.isFinite(ttlMs) || ttlMs <= 0) {
    throw new TorporError('INVALID_ARGUMENT', `ttlMs: must be a positive number, got ${ttlMs}`, { field: 'ttlMs' });
  }
}
