/**
 * Gives ballooned memory back to the host: hole punches (fallocate PUNCH_HOLE | KEEP_SIZE) on the
 * files behind guest RAM, carried out by a worker thread of the addon (lib/native/punch.c, one
 * per device), so that the event loop that answers every VM only plans and submits. Runs from
 * many inflate buffers merge into one punch: whatever arrives while the worker punches one batch
 * forms the next, and during a scattered inflate small runs that may still grow wait for their
 * neighbours (bounded in time, see DISCARD_HOLD_JOIN_RATE).
 *
 * Ordering (the rule the whole device relies on; see also docs/balloon.md): an inflate is
 * acknowledged at once and its pages wait here, first pending (not yet submitted), then in
 * flight (submitted to the worker). A ballooned page may be touched by the guest again only
 * after a deflate of it was acknowledged, after a free page report of it was acknowledged, or
 * after a device reset; a page deflated, reported or reused is never punched afterwards:
 * - deflate (beforeDeflate, called before the PFNs leave the tracker and so before the ack):
 *   pending pages are not punched if they are no longer ballooned when their batch is
 *   submitted (every submission happens on a later turn or in flush, after the deflate took
 *   them out of the tracker; held runs are pending too); a batch in flight that holds one of the
 *   pages is waited for, synchronously, before the deflate goes on. A deflate of pages not in
 *   flight waits for nothing.
 * - free page report (beforeReport): if a reported page is ballooned (a guest reporting what it
 *   gave us), everything is flushed first; the report's own ranges are punched before its ack.
 * - device reset, queue stop (inside GET_VRING_BASE, before QEMU gets its reply; a memory table
 *   change stops the rings first), detach, inhibit: flush(): submit what is pending and wait
 *   until the worker has punched everything (the only synchronous waits; they are rare and last
 *   at most one batch).
 * Nothing here throws: a failed punch is counted and logged (the memory simply stays with the
 * guest's file). The worker punches its own dup() of the region's fd, so a region unmapped and
 * closed meanwhile cannot have its descriptor number reused under a punch.
 */
import * as util from 'node:util';
import { Clock, TimerHandle } from '../clock';
import { errorMessage } from '../errors';
import { Logger } from '../log';
import { native, PUNCH_RECORD, PunchQueueHandle } from '../native';
import { BALLOON_PAGE_BYTES } from './constants';
import { PageRun } from './page-tracker';
import { DiscardRange, planDiscards, ReclaimRegion } from './reclaim';

/**
 * While the worker is idle, a batch is submitted DISCARD_BATCH_DELAY_MS after its first page
 * (runs from the buffers that follow merge into it), or at once when DISCARD_BATCH_BYTES are
 * pending; while it punches, everything that arrives waits and forms the next batch. The bounds
 * keep memory returning promptly (a few milliseconds behind the acks); event-loop fairness no
 * longer bounds a batch, since the event loop never punches.
 */
export const DISCARD_BATCH_BYTES = 128 * 1024 * 1024;
export const DISCARD_BATCH_DELAY_MS = 2;
/**
 * Holding back small runs that may still grow. A scattered inflate (random pages) makes runs
 * whose neighbours arrive later, in another batch: punched apart, they cost a punch each (a
 * hole and a cross-CPU TLB flush), merged they cost one. When at least DISCARD_HOLD_JOIN_RATE of
 * the small runs (shorter than DISCARD_HOLD_MAX_PAGES) ballooned since the inflate started
 * touched an already ballooned page (merges that came too late), small runs with a neighbour not
 * yet ballooned wait, while the inflate goes on (a buffer in the last DISCARD_QUIET_MS) and for
 * at most DISCARD_HOLD_MAX_MS; batches then go every DISCARD_QUIET_MS. Runs that never merge
 * (every other page) or are long (a contiguous inflate) are never held: nothing to gain.
 */
export const DISCARD_HOLD_JOIN_RATE = 0.01;
export const DISCARD_HOLD_MAX_PAGES = 64;
export const DISCARD_HOLD_MAX_MS = 500;
export const DISCARD_QUIET_MS = 20;
/** Failed punches logged before the scheduler goes quiet about them (still counted). */
const MAX_ERROR_LOGS = 10;

export interface DiscardCounters {
  /** Bytes given back by successful punches. */
  reclaimedBytes: number;
  /** Successful punch calls. */
  calls: number;
  /** Failed punch calls. */
  errors: number;
  /** Batches handed to the worker thread. */
  batches: number;
  /** Milliseconds the worker thread spent in fallocate. */
  workerBusyMs: number;
  /** Times the event loop waited for the worker (flush, or a deflate of pages in flight). */
  waits: number;
}

export interface DiscardSchedulerOptions {
  clock: Clock;
  /** The region holding a guest-physical address, while a front-end's memory is mapped. */
  findRegion(gpa: number): ReclaimRegion | undefined;
  /** Whether `count` pages from `pfn` are all ballooned (for host pages larger than 4 KiB). */
  isFull(pfn: number, count: number): boolean;
  /** Whether a page is in the balloon now (asked at submission for pages deflated meanwhile). */
  isBallooned(pfn: number): boolean;
  /** Start inhibited (track and acknowledge, but give nothing back). */
  inhibited: boolean;
}

/** A batch handed to the worker: the last native sequence number it ended with, and its pages. */
interface InFlight {
  seq: number;
  /** Sorted, disjoint. */
  runs: PageRun[];
  pages: number;
}

/** Batches and hands to a worker thread the host-side discards of one balloon device. */
export class DiscardScheduler {
  /** Runs enqueued since the last submission (unsorted), and their pages. */
  private pendingRuns: PageRun[] = [];
  private newPages = 0;
  /** Small runs held back at the last submission (sorted, disjoint). */
  private heldRuns: PageRun[] = [];
  private pending = 0;
  /** PFNs deflated while runs were pending: left out at submission if no longer ballooned. */
  private deflated: number[] = [];
  private inFlight: InFlight[] = [];
  private queue: PunchQueueHandle | undefined;
  /** Kept here: the addon holds it only weakly while the queue is idle. */
  private readonly onDone = (records: Float64Array): void => this.completed(records, false);
  private timer: TimerHandle | undefined;
  /** Since the inflate started (reset when it goes quiet): small fresh runs, and those of them
   * that touched a page ballooned before (see DISCARD_HOLD_JOIN_RATE). */
  private freshRuns = 0;
  private joinedRuns = 0;
  private lastEnqueueMs = 0;
  /** When the oldest page still pending arrived. */
  private pendingSinceMs: number | undefined;
  private inhibit: boolean;
  private log: Logger;
  private readonly counters: DiscardCounters = {
    reclaimedBytes: 0,
    calls: 0,
    errors: 0,
    batches: 0,
    workerBusyMs: 0,
    waits: 0,
  };

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

  /** Pages acknowledged to the guest whose holes are not punched yet (pending or in flight). */
  get pendingPages(): number {
    return this.inFlight.reduce((n, b) => n + b.pages, this.pending);
  }

  get stats(): Readonly<DiscardCounters> {
    return { ...this.counters };
  }

  /** Newly ballooned runs (sorted, as PageTracker.add returns them): punched in a later batch. */
  enqueue(runs: readonly PageRun[], pages: number): void {
    if (this.inhibit || runs.length === 0) return;
    for (const r of runs) {
      this.pendingRuns.push(r);
      if (r.count < DISCARD_HOLD_MAX_PAGES) {
        this.freshRuns++;
        if (this.ballooned(r.start - 1) || this.ballooned(r.start + r.count)) this.joinedRuns++;
      }
    }
    this.pending += pages;
    this.newPages += pages;
    this.lastEnqueueMs = this.options.clock.now();
    this.pendingSinceMs ??= this.lastEnqueueMs;
    // While the worker punches, what arrives forms the next batch (submitted on completion).
    if (this.inFlight.length > 0) return;
    if (this.newPages * BALLOON_PAGE_BYTES >= DISCARD_BATCH_BYTES) this.submit(false);
    else this.armTimer(this.holding() ? DISCARD_QUIET_MS : DISCARD_BATCH_DELAY_MS);
  }

  /**
   * Before a deflate of `pfns` is handled (they leave the tracker right after): pending ones will
   * be left out of their batch; a batch in flight holding one of them is waited for.
   */
  beforeDeflate(pfns: ArrayLike<number>): void {
    if (this.hasPending()) for (let i = 0; i < pfns.length; i++) this.deflated.push(pfns[i]);
    let waitFor = 0;
    for (const b of this.inFlight) {
      if (b.seq <= waitFor) continue;
      for (let i = 0; i < pfns.length; i++) {
        if (containsPfn(b.runs, pfns[i])) {
          waitFor = b.seq;
          break;
        }
      }
    }
    if (waitFor > 0) this.wait(waitFor);
  }

  /** Punches every pending hole and waits until the worker has done so. */
  flush(): void {
    this.submit(true);
    const last = this.inFlight[this.inFlight.length - 1];
    if (last !== undefined) this.wait(last.seq);
  }

  /** Forgets what is pending without punching it (memory went away, or discards are inhibited). */
  drop(): void {
    this.timer?.cancel();
    this.timer = undefined;
    this.pendingRuns = [];
    this.heldRuns = [];
    this.pending = 0;
    this.newPages = 0;
    this.pendingSinceMs = undefined;
    this.deflated = [];
  }

  private hasPending(): boolean {
    return this.pendingRuns.length > 0 || this.heldRuns.length > 0;
  }

  /**
   * Stops (true) or resumes (false) giving memory back. Stopping waits for a batch in flight;
   * resuming hands `ballooned` (everything ballooned meanwhile) to the worker at once.
   */
  setInhibited(inhibited: boolean, ballooned: () => readonly PageRun[]): void {
    if (inhibited === this.inhibit) return;
    this.inhibit = inhibited;
    if (inhibited) {
      this.drop();
      const last = this.inFlight[this.inFlight.length - 1];
      if (last !== undefined) this.wait(last.seq);
    } else {
      const runs = [...ballooned()];
      this.submitRuns(
        runs,
        runs.reduce((n, r) => n + r.count, 0),
      );
    }
  }

  /**
   * Punches file ranges now, on the event loop (free page reporting: the guest waits for the
   * acknowledgement, and the ranges are whole free blocks, a few calls).
   */
  punchNow(ranges: readonly DiscardRange[]): void {
    if (this.inhibit) return;
    for (const r of ranges) {
      try {
        native.punchHole(r.fd, r.fileOffset, r.length);
        this.counters.calls++;
        this.counters.reclaimedBytes += r.length;
      } catch (err) {
        this.failed(1, r.length, errorMessage(err));
      }
    }
  }

  /** Whether page `pfn` is in the balloon (false below page 0: a run's left neighbour). */
  private ballooned(pfn: number): boolean {
    return pfn >= 0 && this.options.isBallooned(pfn);
  }

  /** Whether small runs that may still grow are held back (see DISCARD_HOLD_JOIN_RATE). */
  private holding(): boolean {
    return this.joinedRuns > 0 && this.joinedRuns >= this.freshRuns * DISCARD_HOLD_JOIN_RATE;
  }

  private armTimer(ms: number): void {
    this.timer ??= this.options.clock.setTimer(ms, () => {
      this.timer = undefined;
      this.submit(false);
    });
  }

  /**
   * Hands what is pending to the worker: everything (`all`, or once the inflate went quiet or
   * the oldest page waited DISCARD_HOLD_MAX_MS), else all but the small runs that may still grow.
   */
  private submit(all: boolean): void {
    this.timer?.cancel();
    this.timer = undefined;
    if (!this.hasPending()) return;
    const now = this.options.clock.now();
    const since = this.pendingSinceMs ?? now;
    const quiet = now - this.lastEnqueueMs >= DISCARD_QUIET_MS;
    const aged = now - since >= DISCARD_HOLD_MAX_MS;
    const hold = !all && !quiet && !aged && this.holding();
    if (quiet) {
      this.freshRuns = 0;
      this.joinedRuns = 0;
    }
    // The held runs are sorted already: only what is new is sorted, then merged in one pass.
    let runs = mergeRunLists(this.heldRuns, compactRunList(this.pendingRuns));
    this.pendingRuns = [];
    this.heldRuns = [];
    this.pending = 0;
    this.newPages = 0;
    this.pendingSinceMs = undefined;
    if (this.deflated.length > 0) {
      const gone = this.deflated.filter((p) => !this.options.isBallooned(p));
      this.deflated = [];
      if (gone.length > 0) runs = subtractPfns(runs, gone);
    }
    if (this.inhibit) return;
    if (hold) {
      const ready: PageRun[] = [];
      for (const r of runs) {
        const open = !this.ballooned(r.start - 1) || !this.ballooned(r.start + r.count);
        if (r.count < DISCARD_HOLD_MAX_PAGES && open) {
          this.heldRuns.push(r);
          this.pending += r.count;
        } else ready.push(r);
      }
      if (this.heldRuns.length > 0) {
        this.pendingSinceMs = since;
        this.armTimer(DISCARD_QUIET_MS);
      }
      runs = ready;
    }
    this.submitRuns(
      runs,
      runs.reduce((n, r) => n + r.count, 0),
    );
  }

  private submitRuns(runs: PageRun[], pages: number): void {
    const ranges = planDiscards(
      runs,
      (gpa) => this.options.findRegion(gpa),
      (pfn, n) => this.options.isFull(pfn, n),
    );
    if (ranges.length === 0) return;
    // One native batch per file (regions usually share one memfd).
    const byFd = new Map<number, number[]>();
    for (const r of ranges) {
      let list = byFd.get(r.fd);
      if (list === undefined) byFd.set(r.fd, (list = []));
      list.push(r.fileOffset, r.length);
    }
    let seq = 0;
    try {
      this.queue ??= native.punchQueueCreate(this.onDone);
      for (const [fd, list] of byFd) {
        seq = native.punchQueueSubmit(this.queue, fd, Float64Array.from(list));
        this.counters.batches++;
      }
    } catch (err) {
      // No thread or no descriptor: the memory stays with the file; counted like failed punches.
      this.failed(ranges.length, 0, errorMessage(err));
    }
    if (seq > 0) this.inFlight.push({ seq, runs, pages });
  }

  /** Blocks the event loop until batch `seq` is punched (see the ordering rule above). */
  private wait(seq: number): void {
    if (this.queue === undefined) return;
    this.counters.waits++;
    this.completed(native.punchQueueWait(this.queue, seq), true);
  }

  private completed(records: Float64Array, fromWait: boolean): void {
    let last = 0;
    for (let i = 0; i + PUNCH_RECORD.size <= records.length; i += PUNCH_RECORD.size) {
      last = records[i + PUNCH_RECORD.seq];
      this.counters.calls += records[i + PUNCH_RECORD.calls];
      this.counters.reclaimedBytes += records[i + PUNCH_RECORD.bytes];
      this.counters.workerBusyMs += records[i + PUNCH_RECORD.busyNs] / 1e6;
      const errors = records[i + PUNCH_RECORD.errors];
      if (errors > 0) {
        const errno = records[i + PUNCH_RECORD.firstErrno];
        this.failed(errors, 0, errno > 0 ? util.getSystemErrorName(-errno) : 'unknown error');
      }
    }
    if (last === 0) return;
    while (this.inFlight.length > 0 && this.inFlight[0].seq <= last) this.inFlight.shift();
    if (this.inFlight.length > 0 || !this.hasPending()) return;
    // The worker is idle and runs arrived meanwhile: they go now, unless we are inside a wait
    // (a deflate has not taken its pages out of the tracker yet): then on a later turn.
    if (fromWait) this.armTimer(0);
    else if (this.holding()) this.armTimer(DISCARD_QUIET_MS);
    else this.submit(false);
  }

  private failed(calls: number, length: number, error: string): void {
    this.counters.errors += calls;
    if (this.counters.errors - calls < MAX_ERROR_LOGS) {
      this.log.error('cannot give memory back to the host', { calls, length, error });
    }
  }
}

/** Merges two sorted lists of runs, joining those that touch or overlap: one pass. */
export function mergeRunLists(a: readonly PageRun[], b: readonly PageRun[]): PageRun[] {
  if (a.length === 0) return b as PageRun[];
  const out: PageRun[] = [];
  let i = 0;
  let j = 0;
  // Bounded by the two lists' lengths.
  while (i < a.length || j < b.length) {
    const r = j >= b.length || (i < a.length && a[i].start <= b[j].start) ? a[i++] : b[j++];
    const last = out[out.length - 1];
    if (last !== undefined && r.start <= last.start + last.count)
      last.count = Math.max(last.count, r.start + r.count - last.start);
    else out.push({ start: r.start, count: r.count });
  }
  return out;
}

/** True if `pfn` lies in one of `runs` (sorted, disjoint). */
function containsPfn(runs: readonly PageRun[], pfn: number): boolean {
  let lo = 0;
  let hi = runs.length - 1;
  while (lo <= hi) {
    const mid = (lo + hi) >>> 1;
    const r = runs[mid];
    if (pfn < r.start) hi = mid - 1;
    else if (pfn >= r.start + r.count) lo = mid + 1;
    else return true;
  }
  return false;
}

/** `runs` (sorted, disjoint) without the pages in `pfns`. */
export function subtractPfns(runs: readonly PageRun[], pfns: readonly number[]): PageRun[] {
  const holes = [...new Set(pfns)].sort((a, b) => a - b);
  const out: PageRun[] = [];
  let h = 0;
  for (const r of runs) {
    let start = r.start;
    const end = r.start + r.count;
    while (h < holes.length && holes[h] < start) h++;
    // Each hole inside the run splits it once: bounded by the number of holes.
    while (h < holes.length && holes[h] < end) {
      if (holes[h] > start) out.push({ start, count: holes[h] - start });
      start = holes[h] + 1;
      h++;
    }
    if (end > start) out.push({ start, count: end - start });
  }
  return out;
}

/** Sorts runs and merges those that touch or overlap. */
export function compactRunList(runs: readonly PageRun[]): PageRun[] {
  const sorted = [...runs].sort((a, b) => a.start - b.start);
  return mergeRunLists(sorted, []);
}
