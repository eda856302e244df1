/**
 * What the balloon device shows the outside (status output, metrics, tests): one typed, plain
 * view of its state and counters. Taking it is a read: it never changes the device (no discard
 * is forced; pending discards are shown as such).
 */
import { native } from '../native';
import { GuestMemory } from '../virtio/guest-memory';
import { InvalidReason } from './guest-input';
import { QueueRole } from './layout';
import { GuestStatsSnapshot, StatsQueueCounters } from './stats-queue';

export interface QueueCounters {
  requests: number;
  pages: number;
}

/** Counters the device keeps (everything else in the snapshot is state). */
export interface BalloonCounters {
  inflate: QueueCounters & { alreadyBallooned: number };
  deflate: QueueCounters & { notBallooned: number; unrequested: number };
  reporting: { requests: number; bytes: number };
  messages: { total: number; pressure: number; unknown: number };
  ackLatency: { count: number; sumSeconds: number; lastSeconds: number | undefined; maxSeconds: number };
  configChanges: number;
}

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
  inflate: BalloonCounters['inflate'];
  deflate: BalloonCounters['deflate'];
  reporting: BalloonCounters['reporting'];
  statsQueue: StatsQueueCounters;
  /** The current stats request interval. */
  statsIntervalMs: number;
  messages: BalloonCounters['messages'];
  invalid: Partial<Record<InvalidReason, number>>;
  stats: GuestStatsSnapshot;
  ackLatency: BalloonCounters['ackLatency'];
  trackerBytes: number;
  configChanges: number;
}

export function newBalloonCounters(): BalloonCounters {
  return {
    inflate: { requests: 0, pages: 0, alreadyBallooned: 0 },
    deflate: { requests: 0, pages: 0, notBallooned: 0, unrequested: 0 },
    reporting: { requests: 0, bytes: 0 },
    messages: { total: 0, pressure: 0, unknown: 0 },
    ackLatency: { count: 0, sumSeconds: 0, lastSeconds: undefined, maxSeconds: 0 },
    configChanges: 0,
  };
}

/** A deep copy of the counters (a snapshot must not alias live state). */
export function copyCounters(c: BalloonCounters): BalloonCounters {
  return {
    inflate: { ...c.inflate },
    deflate: { ...c.deflate },
    reporting: { ...c.reporting },
    messages: { ...c.messages },
    ackLatency: { ...c.ackLatency },
    configChanges: c.configChanges,
  };
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
