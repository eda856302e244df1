/**
 * What the balloon device shows the outside (status output, metrics, tests): one typed, plain
 * view of its state and counters. Taking it is a read: it never changes the device (no discard
 * is forced; pending discards are shown as such).
 */
import { native } from '../native';
import { GuestMemory } from '../virtio/guest-memory';
import { PageCounters } from './balloon-pages';
import { InvalidReason } from './guest-input';
import { QueueRole } from './layout';
import { MessageCounters } from './message-queue';
import { GuestStatsSnapshot, StatsQueueCounters } from './stats-queue';

export interface BalloonSnapshot {
  connected: boolean;
  offeredFeatures: bigint;
  ackedFeatures: bigint | undefined;
  layout: QueueRole[];
  numQueues: number;
  configSize: number;
  targetPages: number;
  actualPages: number;
  balloonedPages: number;
  guestRamBytes: number | undefined;
  /** Bytes of the guest memory files the host really holds (st_blocks), or undefined offline. */
  hostResidentBytes: number | undefined;
  /** Ballooned pages acknowledged to the guest whose holes are not punched yet (a few ms at most). */
  pendingDiscardPages: number;
  /** Bytes given back to the host by successful hole punches (inflate and reporting). */
  reclaimedBytes: number;
  discardCalls: number;
  discardErrors: number;
  discardInhibited: boolean;
  inflate: PageCounters['inflate'];
  deflate: PageCounters['deflate'];
  reporting: PageCounters['reporting'];
  statsQueue: StatsQueueCounters;
  /** The current stats request interval. */
  statsIntervalMs: number;
  messages: MessageCounters['messages'];
  invalid: Partial<Record<InvalidReason, number>>;
  stats: GuestStatsSnapshot;
  ackLatency: MessageCounters['ackLatency'];
  trackerBytes: number;
  configChanges: number;
}

/** Bytes of the files behind guest memory that the host holds: each distinct file counted once. */
export function residentBytes(memory: GuestMemory | undefined): number | undefined {
  if (memory === undefined) return undefined;
  const seen = new Map<string, number>();
  for (const r of memory.regionList) {
    if (seen.has(r.fileId)) continue;
    try {
      seen.set(r.fileId, native.fstat(r.fd).allocatedBytes);
    } catch {
      // A file we cannot stat any more holds nothing we can account for.
      seen.set(r.fileId, 0);
    }
  }
  return [...seen.values()].reduce((a, b) => a + b, 0);
}
