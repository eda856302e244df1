/**
 * Gives ballooned memory back to the host: hole punches (fallocate PUNCH_HOLE | KEEP_SIZE) on the
 * files behind guest RAM, batched so that runs from several inflate buffers merge into fewer,
 * longer punches.
 *
 * Ordering (the rule the whole device relies on; see also docs/balloon.md): an inflate is
 * acknowledged at once and its pages wait here. A ballooned page may be touched by the guest
 * again only after a deflate of it was acknowledged, after a free page report was acknowledged,
 * or after a device reset; the device calls flush() before each of those (and before a queue
 * stop, which runs inside GET_VRING_BASE before QEMU gets its reply, and a detach). So no
 * discard can hit a page the guest uses again. Nothing here throws: a failed punch is counted
 * and logged (the memory simply stays with the guest's file).
 */
import { Clock, TimerHandle } from '../clock';
import { errorMessage } from '../errors';
import { Logger } from '../log';
import { native } from '../native';
import { BALLOON_PAGE_BYTES } from './constants';
import { PageRun } from './page-tracker';
import { DiscardRange, planDiscards, ReclaimRegion } from './reclaim';

/**
 * A batch is punched when this much is pending, or DISCARD_BATCH_DELAY_MS after its first page,
 * or before anything that could let the guest touch a pending page. Merged runs amortise the
 * kernel's page-table and TLB work; the 4 MiB bound keeps one flush to about a millisecond of
 * kernel time, so one VM's reclaim does not stall the others' kicks.
 */
export const DISCARD_BATCH_BYTES = 4 * 1024 * 1024;
export const DISCARD_BATCH_DELAY_MS = 2;
/** Failed punches logged before the scheduler goes quiet about them (still counted). */
const MAX_ERROR_LOGS = 10;

export interface DiscardCounters {
  /** Bytes given back by successful punches. */
  reclaimedBytes: number;
  /** Successful punch calls. */
  calls: number;
  /** Failed punch calls. */
  errors: number;
}

export interface DiscardSchedulerOptions {
  clock: Clock;
  /** The region holding a guest-physical address, while a front-end's memory is mapped. */
  findRegion(gpa: number): ReclaimRegion | undefined;
  /** Whether `count` pages from `pfn` are all ballooned (for host pages larger than 4 KiB). */
  isFull(pfn: number, count: number): boolean;
  /** Start inhibited (track and acknowledge, but give nothing back). */
  inhibited: boolean;
}

/** Batches and carries out the host-side discards of one balloon device. */
export class DiscardScheduler {
  private pendingRuns: PageRun[] = [];
  private pending = 0;
  private timer: TimerHandle | undefined;
  private inhibit: boolean;
  private log: Logger;
  private readonly counters: DiscardCounters = { reclaimedBytes: 0, calls: 0, errors: 0 };

  constructor(
    private readonly options: DiscardSchedulerOptions,
    log: Logger,
  ) {
    this.inhibit = options.inhibited;
    this.log = log;
  }

  /** Logs go to the connected front-end's logger while there is one. */
  setLogger(log: Logger): void {
    this.log = log;
  }

  get inhibited(): boolean {
    return this.inhibit;
  }

  /** Pages acknowledged to the guest whose holes are not punched yet. */
  get pendingPages(): number {
    return this.pending;
  }

  get stats(): Readonly<DiscardCounters> {
    return { ...this.counters };
  }

  /** Newly ballooned runs (sorted, as PageTracker.add returns them): punched in a later batch. */
  enqueue(runs: readonly PageRun[], pages: number): void {
    if (this.inhibit || runs.length === 0) return;
    this.pendingRuns.push(...runs);
    this.pending += pages;
    if (this.pending * BALLOON_PAGE_BYTES >= DISCARD_BATCH_BYTES) this.flush();
    else this.timer ??= this.options.clock.setTimer(DISCARD_BATCH_DELAY_MS, () => this.flush());
  }

  /** Punches every pending hole now. */
  flush(): void {
    this.timer?.cancel();
    this.timer = undefined;
    if (this.pendingRuns.length === 0) return;
    const runs = this.pendingRuns;
    this.pendingRuns = [];
    this.pending = 0;
    if (this.inhibit) return;
    // Runs from several buffers merge into fewer, longer punches.
    const merged = runs.length === 1 ? runs : compactRunList(runs);
    this.punch(this.plan(merged));
  }

  /** Forgets what is pending without punching it (memory went away, or discards are inhibited). */
  drop(): void {
    this.timer?.cancel();
    this.timer = undefined;
    this.pendingRuns = [];
    this.pending = 0;
  }

  /**
   * Stops (true) or resumes (false) giving memory back. Resuming discards `ballooned` (everything
   * ballooned meanwhile) at once.
   */
  setInhibited(inhibited: boolean, ballooned: () => readonly PageRun[]): void {
    if (inhibited === this.inhibit) return;
    this.inhibit = inhibited;
    if (inhibited) this.drop();
    else this.punch(this.plan(ballooned()));
  }

  /** Punches file ranges now (free page reporting: the guest waits for the acknowledgement). */
  punchNow(ranges: readonly DiscardRange[]): void {
    if (!this.inhibit) this.punch(ranges);
  }

  private plan(runs: readonly PageRun[]): DiscardRange[] {
    return planDiscards(
      runs,
      (gpa) => this.options.findRegion(gpa),
      (pfn, n) => this.options.isFull(pfn, n),
    );
  }

  private punch(ranges: readonly DiscardRange[]): void {
    for (const r of ranges) {
      try {
        native.punchHole(r.fd, r.fileOffset, r.length);
        this.counters.calls++;
        this.counters.reclaimedBytes += r.length;
      } catch (err) {
        this.counters.errors++;
        if (this.counters.errors <= MAX_ERROR_LOGS) {
          this.log.error('cannot give memory back to the host', {
            offset: r.fileOffset,
            length: r.length,
            error: errorMessage(err),
          });
        }
      }
    }
  }
}

/** Sorts runs and merges those that touch or overlap. */
export function compactRunList(runs: readonly PageRun[]): PageRun[] {
  const sorted = [...runs].sort((a, b) => a.start - b.start);
  const out: PageRun[] = [];
  for (const r of sorted) {
    const last = out[out.length - 1];
    if (last !== undefined && r.start <= last.start + last.count)
      last.count = Math.max(last.count, r.start + r.count - last.start);
    else out.push({ ...r });
  }
  return out;
}
