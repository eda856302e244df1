/**
 * The standard processing pass over a ring, shared by every device: pop chains, hand each to
 * the device, give malformed chains back with length 0 (counted and logged by the caller's
 * hooks), stop the ring on an impossible state, publish and notify once per batch, and re-check
 * after re-enabling notifications so no kick is lost (virtio 1.2, 2.7.10 / EVENT_IDX).
 */
import { VirtqueueError } from '../errors';
import { Descriptor } from '../virtio/virtqueue';
import { Vring } from './device';

/** How many chains a pass serves between two looks at the clock (budgetMs). */
const CLOCK_EVERY_CHAINS = 8;

export interface ChainHandler {
  /** Handles a well-formed chain; returns the bytes written into it, or 'defer' to keep it
   * (the device will push it to the used ring itself later, e.g. the stats buffer). */
  onChain(head: number, descriptors: Descriptor[]): number | 'defer';
  /** A malformed chain; it has been returned to the driver with length 0. */
  onBadChain(head: number, error: VirtqueueError): void;
}

export interface PassResult {
  chains: number;
  badChains: number;
  broken: boolean;
  /** True when the pass stopped at maxChains with work left; the caller schedules another. */
  more: boolean;
}

/**
 * One pass over `vring`, at most `maxChains` chains (a bound per pass so that a guest that keeps
 * refilling its ring cannot monopolise the event loop), and no longer than `budgetMs` of this
 * thread's time when given: the rest of the ring waits for the next pass, after the event loop
 * has served everyone else's I/O (another VM's pressure message among them).
 */
export function processRing(vring: Vring, handler: ChainHandler, maxChains: number, budgetMs?: number): PassResult {
  const q = vring.queue;
  const result: PassResult = { chains: 0, badChains: 0, broken: false, more: false };
  const deadline = budgetMs === undefined ? Infinity : performance.now() + budgetMs;
  q.disableNotifications();
  for (;;) {
    while (result.chains + result.badChains < maxChains) {
      // The clock is read every CLOCK_EVERY_CHAINS chains, not for each (the ring walker is hot).
      if (result.chains > 0 && result.chains % CLOCK_EVERY_CHAINS === 0 && performance.now() > deadline) {
        // Out of time: publish what is done; the caller schedules the next pass.
        vring.flushAndNotify();
        result.more = true;
        return result;
      }
      const item = q.pop();
      if (item === null) break;
      if (item.kind === 'broken') {
        result.broken = true;
        vring.flushAndNotify();
        vring.fail(item.error);
        return result;
      }
      if (item.kind === 'bad-chain') {
        result.badChains++;
        q.pushUsed(item.head, 0);
        handler.onBadChain(item.head, item.error);
        continue;
      }
      result.chains++;
      const written = handler.onChain(item.head, item.descriptors);
      if (written !== 'defer') q.pushUsed(item.head, written);
    }
    if (result.chains + result.badChains >= maxChains) {
      vring.flushAndNotify();
      result.more = q.enableNotifications();
      return result;
    }
    if (!q.enableNotifications()) break;
    q.disableNotifications();
  }
  vring.flushAndNotify();
  return result;
}
