/**
 * The balloon's pages: which guest pages are in the balloon (PageTracker), what inflate, deflate
 * and free page report buffers do to them, and when their memory goes back to the host
 * (DiscardScheduler, which holds the reclaim ordering rule).
 *
 * Guest input never throws out of here: unusable buffers are reported (guest-input.ts) and
 * skipped; the device acknowledges every buffer either way.
 */
import { Clock } from '../clock';
import { Logger } from '../log';
import { GuestMemory } from '../virtio/guest-memory';
import { Descriptor } from '../virtio/virtqueue';
import { DiscardScheduler } from './discard-scheduler';
import { PfnScratch, readPfnBuffer, ReportInvalid } from './guest-input';
import { PageRun, PageTracker } from './page-tracker';
import { alignedFileRange, DiscardRange } from './reclaim';
import { BALLOON_PAGE_BYTES } from './constants';

/** 4 KiB pages touched by the byte range [addr, addr + len). */
function pagesSpanned(addr: number, len: number): number {
  return Math.ceil((addr + len) / BALLOON_PAGE_BYTES) - Math.floor(addr / BALLOON_PAGE_BYTES);
}

export interface PageCounters {
  inflate: { requests: number; pages: number; alreadyBallooned: number };
  deflate: { requests: number; pages: number; notBallooned: number; unrequested: number };
  reporting: { requests: number; bytes: number };
}

/**
 * Told of every change to the set of ballooned pages, synchronously, before the buffer that
 * caused it is returned to the guest: a restartable daemon keeps a copy that survives the
 * process (lib/daemon/survival.ts).
 */
export interface PagesJournal {
  added(runs: readonly PageRun[]): void;
  removed(pfns: ArrayLike<number>): void;
  cleared(): void;
}

export interface BalloonPagesOptions {
  journal?: PagesJournal;
  clock: Clock;
  /** The connected front-end's guest memory, if any. */
  memory(): GuestMemory | undefined;
  /** Start with discards inhibited. */
  inhibited: boolean;
  report: ReportInvalid;
}

/** Pages handed to the tracker at once when a restarted daemon restores its balloon. */
const RESTORE_BATCH_PAGES = 65536;

export class BalloonPages {
  private readonly tracker = new PageTracker();
  /** Where inflate and deflate buffers are read (one at a time, synchronously). */
  private readonly scratch = new PfnScratch();
  private readonly discards: DiscardScheduler;
  private readonly counters: PageCounters = {
    inflate: { requests: 0, pages: 0, alreadyBallooned: 0 },
    deflate: { requests: 0, pages: 0, notBallooned: 0, unrequested: 0 },
    reporting: { requests: 0, bytes: 0 },
  };

  constructor(
    private readonly options: BalloonPagesOptions,
    log: Logger,
  ) {
    this.discards = new DiscardScheduler(
      {
        clock: options.clock,
        findRegion: (gpa) => options.memory()?.find(gpa),
        isFull: (pfn, n) => this.tracker.isFull(pfn, n),
        isBallooned: (pfn) => this.tracker.has(pfn),
        inhibited: options.inhibited,
      },
      log,
    );
  }

  setLogger(log: Logger): void {
    this.discards.setLogger(log);
  }

  /** Pages in the balloon. */
  get size(): number {
    return this.tracker.size;
  }

  get trackerBytes(): number {
    return this.tracker.memoryBytes;
  }

  get discardInhibited(): boolean {
    return this.discards.inhibited;
  }

  /** Pages acknowledged as ballooned whose memory is not given back yet. */
  get pendingDiscardPages(): number {
    return this.discards.pendingPages;
  }

  get discardStats(): DiscardScheduler['stats'] {
    return this.discards.stats;
  }

  /** A copy of the counters. */
  get stats(): PageCounters {
    const c = this.counters;
    return { inflate: { ...c.inflate }, deflate: { ...c.deflate }, reporting: { ...c.reporting } };
  }

  /** Stops or resumes giving memory back; resuming gives back everything ballooned meanwhile. */
  setDiscardInhibited(inhibited: boolean): void {
    this.discards.setInhibited(inhibited, () => [...this.tracker.runs()]);
  }

  /**
   * Carries out every pending discard and waits until the worker has punched it (before the guest
   * may touch a ballooned page again: a queue stop, a detach).
   */
  flush(): void {
    this.discards.flush();
  }

  /** A device reset: the balloon is empty (pending discards are finished first). */
  clear(): void {
    this.discards.flush();
    this.tracker.clear();
    this.options.journal?.cleared();
  }

  /** Every ballooned run, in order. */
  runs(): Iterable<PageRun> {
    return this.tracker.runs();
  }

  /**
   * A restarted daemon's balloon: `runs` were ballooned when the previous process ended. Their
   * memory is given back again (punching a hole twice is harmless; the previous process may
   * have ended before its last batch).
   */
  restore(runs: Iterable<PageRun>): number {
    let restored = 0;
    const batch: number[] = [];
    const add = (): void => {
      const fresh = this.tracker.add(batch);
      const n = fresh.reduce((sum, r) => sum + r.count, 0);
      restored += n;
      this.discards.enqueue(fresh, n);
      batch.length = 0;
    };
    // Bounded memory: pages are added in batches of RESTORE_BATCH_PAGES.
    for (const run of runs) {
      for (let p = run.start; p < run.start + run.count; p++) {
        batch.push(p);
        if (batch.length === RESTORE_BATCH_PAGES) add();
      }
    }
    add();
    return restored;
  }

  /** An inflate buffer: its pages enter the balloon; their memory goes back in a later batch. */
  inflate(descriptors: readonly Descriptor[]): void {
    this.counters.inflate.requests++;
    const pfns = this.readPfns('inflate', descriptors);
    if (pfns === undefined || pfns.length === 0) return;
    const fresh = this.tracker.add(pfns);
    this.options.journal?.added(fresh);
    const added = fresh.reduce((n, r) => n + r.count, 0);
    this.counters.inflate.pages += added;
    this.counters.inflate.alreadyBallooned += pfns.length - added;
    this.discards.enqueue(fresh, added);
  }

  /**
   * A deflate buffer: its pages leave the balloon. `requested` says whether the host asked for
   * it (the balloon was above its target); otherwise it counts as unrequested (DEFLATE_ON_OOM).
   * Returns the pages that really left, or undefined for an unusable buffer.
   */
  deflate(descriptors: readonly Descriptor[], requested: boolean): number | undefined {
    this.counters.deflate.requests++;
    const pfns = this.readPfns('deflate', descriptors);
    if (pfns === undefined || pfns.length === 0) return undefined;
    // The guest touches deflated pages once this is acknowledged: none of them may be punched
    // afterwards (a batch in flight holding one is waited for; pending ones are left out).
    this.discards.beforeDeflate(pfns);
    const removed = this.tracker.remove(pfns);
    this.options.journal?.removed(pfns);
    this.counters.deflate.pages += removed;
    this.counters.deflate.notBallooned += pfns.length - removed;
    if (!requested) this.counters.deflate.unrequested += removed;
    return removed;
  }

  /** A free page report: the ranges go back to the host now, before the acknowledgement. */
  report(descriptors: readonly Descriptor[]): void {
    this.counters.reporting.requests++;
    const memory = this.options.memory();
    if (memory === undefined) return;
    const ranges: DiscardRange[] = [];
    let flushed = false;
    for (const d of descriptors) {
      if (!d.writable) {
        this.options.report('readable_buffer', 'reported range is not device-writable');
        continue;
      }
      this.counters.reporting.bytes += d.len;
      // A range may cross regions; each region's part is discarded on its own file. The chain
      // walker checked that the whole range is inside guest memory.
      let at = d.addr;
      const end = d.addr + d.len;
      while (at < end) {
        const r = memory.find(at)!;
        const pieceEnd = Math.min(end, r.guestPhysAddr + r.sizeBytes);
        const range = alignedFileRange(r, at, pieceEnd - at);
        if (range !== undefined) ranges.push(range);
        at = pieceEnd;
      }
      // Reported pages are the guest's again at the ack: if one is ballooned (a guest reporting
      // what it gave us), whatever is pending or in flight is punched first, never after.
      if (!flushed && this.tracker.anyIn(Math.floor(d.addr / BALLOON_PAGE_BYTES), pagesSpanned(d.addr, d.len))) {
        this.discards.flush();
        flushed = true;
      }
    }
    this.discards.punchNow(ranges);
  }

  private readPfns(kind: 'inflate' | 'deflate', descriptors: readonly Descriptor[]): Uint32Array | undefined {
    const memory = this.options.memory();
    if (memory === undefined) return undefined;
    return readPfnBuffer(kind, descriptors, memory, this.options.report, this.scratch);
  }
}
