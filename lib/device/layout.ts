/**
 * Balloon queue numbering. Inflate is 0 and deflate 1; the optional queues follow densely in the
 * order stats, reporting, message, counting only features that were negotiated (what Linux's
 * virtio_find_vqs and the seed's driver do). Pure.
 */
import { bit, VIRTIO_BALLOON_F_PAGE_REPORTING, VIRTIO_BALLOON_F_STATS_VQ } from './constants';

export type QueueRole = 'inflate' | 'deflate' | 'stats' | 'reporting' | 'message';

/** The role of each queue index for `features` (negotiated, or offered to size the device). */
export function queueLayout(features: bigint, messageBit: number): QueueRole[] {
  const roles: QueueRole[] = ['inflate', 'deflate'];
  if (features & bit(VIRTIO_BALLOON_F_STATS_VQ)) roles.push('stats');
  if (features & bit(VIRTIO_BALLOON_F_PAGE_REPORTING)) roles.push('reporting');
  if (features & bit(messageBit)) roles.push('message');
  return roles;
}

/** `num_vqs` QEMU must be given for a device offering `offered`. */
export function numQueuesFor(offered: bigint, messageBit: number): number {
  return queueLayout(offered, messageBit).length;
}
