// The actor state machine. Every change of an actor's status goes through `assertTransition`, so an
// illegal transition is a bug caught at the point it is attempted, not a corrupt record found later.
import { TorporError } from './errors.ts';
import type { ActorStatus } from './types.ts';

const TRANSITIONS: Record<ActorStatus, readonly ActorStatus[]> = {
  SUSPENDED: ['RESUMING', 'FAILED'],
  RESUMING: ['RUNNING', 'SUSPENDED', 'PAUSED', 'FAILED'],
  RUNNING: ['SUSPENDING', 'PAUSING', 'SUSPENDED', 'FAILED'],
  // SUSPENDING → PAUSED: the upload failed, so the checkpoint is kept on its node.
  SUSPENDING: ['SUSPENDED', 'RUNNING', 'PAUSED', 'FAILED'],
  PAUSING: ['PAUSED', 'RUNNING', 'SUSPENDED', 'FAILED'],
  PAUSED: ['RESUMING', 'SUSPENDING', 'SUSPENDED', 'FAILED'],
  FAILED: ['RESUMING', 'SUSPENDED'],
};

/** States in which an operation is in flight: they must end by a deadline, or the reconciler ends them. */
export const TRANSITIONAL: ReadonlySet<ActorStatus> = new Set(['RESUMING', 'SUSPENDING', 'PAUSING']);

export function canTransition(from: ActorStatus, to: ActorStatus): boolean {
  return TRANSITIONS[from].includes(to);
}

export function assertTransition(from: ActorStatus, to: ActorStatus): void {
  if (!canTransition(from, to)) {
    throw new TorporError('FAILED_PRECONDITION', `actor cannot go from ${from} to ${to}`, { field: 'status' });
  }
}
