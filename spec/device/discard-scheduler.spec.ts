/**
 * The discard scheduler with the real worker thread of the addon, a real memfd and a real
 * mapping: batching, coalescing across buffers, and each edge of the ordering rule (a page
 * deflated, reported or reused is never punched afterwards). The batching timer runs on a manual
 * clock; the worker is real, so "in flight" means submitted and not yet reported complete on the
 * event loop (the completion callback can only run on a later turn).
 */
import { expect } from 'chai';
import { ManualClock } from '../../lib/clock';
import {
  DISCARD_BATCH_DELAY_MS,
  DISCARD_HOLD_MAX_MS,
  DISCARD_QUIET_MS,
  DiscardScheduler,
  mergeRunLists,
  subtractPfns,
} from '../../lib/device/discard-scheduler';
import { PageRun, PageTracker } from '../../lib/device/page-tracker';
import { ReclaimRegion } from '../../lib/device/reclaim';
import { MemoryLogger } from '../../lib/log';
import { closeQuietly, native } from '../../lib/native';
import { fdCount, until } from '../helpers';

const PAGE = 4096;
const PAGES = 4096; // 16 MiB of guest memory

interface Rig {
  clock: ManualClock;
  tracker: PageTracker;
  scheduler: DiscardScheduler;
  region: ReclaimRegion;
  view: DataView;
  map: ArrayBuffer;
  allocated(): number;
  /** Balloons pages as an inflate buffer does. */
  inflate(pfns: number[]): void;
  /** Deflates pages as a deflate buffer does (before the acknowledgement). */
  deflate(pfns: number[]): void;
  close(): void;
}

function rig(): Rig {
  const fd = native.memfdCreate('vballoon-test-discard');
  native.ftruncate(fd, PAGES * PAGE);
  const map = native.mmap(fd, PAGES * PAGE, 0);
  const view = new DataView(map);
  // Every page written with its own number, so a punched page (zeros) is told from a kept one.
  for (let p = 0; p < PAGES; p++) view.setUint32(p * PAGE, p + 1, true);
  const region: ReclaimRegion = { guestPhysAddr: 0, sizeBytes: PAGES * PAGE, mmapOffset: 0, pageSizeBytes: PAGE, fd };
  const clock = new ManualClock();
  const tracker = new PageTracker();
  const scheduler = new DiscardScheduler(
    {
      clock,
      findRegion: (gpa) => (gpa < region.sizeBytes ? region : undefined),
      isFull: (pfn, n) => tracker.isFull(pfn, n),
      isBallooned: (pfn) => tracker.has(pfn),
      inhibited: false,
    },
    new MemoryLogger(),
  );
  return {
    clock,
    tracker,
    scheduler,
    region,
    view,
    map,
    allocated: () => native.fstat(fd).allocatedBytes,
    inflate(pfns) {
      const fresh = tracker.add(pfns);
      scheduler.enqueue(
        fresh,
        fresh.reduce((n, r) => n + r.count, 0),
      );
    },
    deflate(pfns) {
      scheduler.beforeDeflate(pfns);
      tracker.remove(pfns);
    },
    close() {
      scheduler.flush();
      native.munmap(map);
      closeQuietly(fd);
    },
  };
}

const range = (start: number, count: number): number[] => Array.from({ length: count }, (_, i) => start + i);
const punched = (r: Rig, pfn: number): boolean => r.view.getUint32(pfn * PAGE, true) === 0;

describe('discard scheduler (worker thread)', () => {
  let fdsBefore: number;
  let r: Rig | undefined;
  beforeEach(() => {
    fdsBefore = fdCount();
  });
  afterEach(() => {
    r?.close();
    r = undefined;
    expect(native.mappingCount(), 'mappings leaked').to.equal(0);
    expect(fdCount(), 'descriptors leaked (the worker closes its copies when a batch is done)').to.equal(fdsBefore);
  });

  it('punches nothing on the event loop: a batch goes to the worker after the delay', async () => {
    r = rig();
    const before = r.allocated();
    r.inflate(range(100, 256));
    expect(r.scheduler.pendingPages).to.equal(256);
    r.clock.advance(DISCARD_BATCH_DELAY_MS - 1);
    expect(r.scheduler.stats.batches).to.equal(0);
    r.clock.advance(1);
    expect(r.scheduler.stats.batches).to.equal(1);
    // In flight: acknowledged, not yet reported complete on this thread.
    expect(r.scheduler.pendingPages).to.equal(256);
    await until(() => r!.scheduler.pendingPages === 0, 'completion');
    expect(before - r.allocated()).to.equal(256 * PAGE);
    expect(r.scheduler.stats).to.include({ calls: 1, reclaimedBytes: 256 * PAGE, errors: 0, waits: 0 });
    for (const p of range(100, 256)) expect(punched(r, p)).to.equal(true);
    expect(punched(r, 99)).to.equal(false);
    expect(punched(r, 356)).to.equal(false);
  });

  it('merges adjacent and overlapping runs from many buffers into one punch', async () => {
    r = rig();
    // 32 buffers of 64 pages, out of order, the last overlapping two others.
    const order = range(0, 32).sort((a, b) => ((a * 7) % 32) - ((b * 7) % 32));
    for (const b of order) r.inflate(range(1000 + b * 64, 64));
    r.scheduler.enqueue([{ start: 1000 + 60, count: 80 }], 0); // overlaps buffers 0-2
    r.clock.advance(DISCARD_BATCH_DELAY_MS);
    await until(() => r!.scheduler.pendingPages === 0, 'completion');
    expect(r.scheduler.stats).to.include({ calls: 1, reclaimedBytes: 32 * 64 * PAGE, batches: 1 });
  });

  it('what arrives while the worker punches forms the next batch, submitted on completion', async () => {
    r = rig();
    r.inflate(range(0, 512));
    r.clock.advance(DISCARD_BATCH_DELAY_MS);
    expect(r.scheduler.stats.batches).to.equal(1);
    // In flight now: these wait for the completion, not for a timer.
    r.inflate(range(512, 256));
    r.inflate(range(768, 256));
    await until(() => r!.scheduler.pendingPages === 0, 'both batches');
    expect(r.scheduler.stats).to.include({ batches: 2, calls: 2, reclaimedBytes: 1024 * PAGE });
  });

  it('holds small runs that may still grow while a scattered inflate goes on, then punches them merged', async () => {
    r = rig();
    r.inflate([10]);
    r.inflate([11]); // joins a ballooned page: a merge that came late, so small runs are held
    r.clock.advance(DISCARD_BATCH_DELAY_MS);
    expect(r.scheduler.stats.batches).to.equal(0);
    r.inflate([12, 500]);
    r.clock.advance(DISCARD_QUIET_MS - 1);
    expect(r.scheduler.stats.batches).to.equal(0);
    expect(r.scheduler.pendingPages).to.equal(4);
    r.clock.advance(DISCARD_QUIET_MS); // quiet: everything goes
    await until(() => r!.scheduler.pendingPages === 0, 'completion');
    expect(r.scheduler.stats).to.include({ batches: 1, calls: 2, reclaimedBytes: 4 * PAGE });
  });

  it('holds small runs at most DISCARD_HOLD_MAX_MS while the inflate never pauses', async () => {
    r = rig();
    r.inflate([10]);
    r.inflate([11]);
    // Buffers every few milliseconds, never quiet, each pair joining (so holding goes on).
    let t = 0;
    for (; t < 2 * DISCARD_HOLD_MAX_MS && r.scheduler.stats.batches === 0; t += 5) {
      r.inflate([1000 + 4 * t]);
      r.inflate([1001 + 4 * t]);
      r.clock.advance(5);
    }
    expect(r.scheduler.stats.batches).to.equal(1);
    expect(t).to.be.within(DISCARD_HOLD_MAX_MS, DISCARD_HOLD_MAX_MS + DISCARD_QUIET_MS + 5);
    await until(() => {
      r!.clock.advance(DISCARD_QUIET_MS);
      return r!.scheduler.pendingPages === 0;
    }, 'completion');
  });

  it('merges sorted run lists', () => {
    expect(
      mergeRunLists(
        [
          { start: 0, count: 2 },
          { start: 10, count: 1 },
        ],
        [
          { start: 2, count: 3 },
          { start: 8, count: 2 },
          { start: 20, count: 1 },
        ],
      ),
    ).to.deep.equal([
      { start: 0, count: 5 },
      { start: 8, count: 3 },
      { start: 20, count: 1 },
    ]);
  });

  it('flush() submits and waits: the holes exist when it returns', () => {
    r = rig();
    const before = r.allocated();
    r.inflate(range(2000, 300));
    r.scheduler.flush();
    expect(before - r.allocated()).to.equal(300 * PAGE);
    expect(r.scheduler.pendingPages).to.equal(0);
    expect(r.scheduler.stats.waits).to.equal(1);
  });

  it('a deflate of pages in flight waits for their batch; what the guest writes afterwards survives', async () => {
    r = rig();
    r.inflate(range(0, 1024));
    r.clock.advance(DISCARD_BATCH_DELAY_MS); // submitted: in flight on this turn, whatever the worker does
    r.deflate(range(500, 8));
    expect(r.scheduler.stats.waits).to.equal(1);
    expect(r.scheduler.pendingPages).to.equal(0);
    for (const p of range(500, 8)) r.view.setUint32(p * PAGE, 0xabc0 + p, true); // the guest reuses them
    r.inflate(range(2000, 16)); // more work for the worker afterwards
    r.clock.advance(DISCARD_BATCH_DELAY_MS);
    await until(() => r!.scheduler.pendingPages === 0, 'completion');
    for (const p of range(500, 8)) expect(r.view.getUint32(p * PAGE, true), `page ${p}`).to.equal(0xabc0 + p);
  });

  it('a deflate of pending pages leaves them out of their batch and waits for nothing', async () => {
    r = rig();
    const before = r.allocated();
    r.inflate(range(0, 256));
    r.deflate([10, 11, 200]);
    expect(r.scheduler.stats.waits).to.equal(0);
    for (const p of [10, 11, 200]) r.view.setUint32(p * PAGE, 0x5000 + p, true);
    r.clock.advance(DISCARD_BATCH_DELAY_MS);
    await until(() => r!.scheduler.pendingPages === 0, 'completion');
    for (const p of [10, 11, 200]) expect(r.view.getUint32(p * PAGE, true)).to.equal(0x5000 + p);
    expect(before - r.allocated()).to.equal(253 * PAGE);
    expect(r.scheduler.stats.calls).to.equal(3); // [0,10) [12,200) [201,256)
  });

  it('a page deflated and inflated again inside the window is punched once', async () => {
    r = rig();
    r.inflate(range(0, 64));
    r.deflate([5]);
    r.inflate([5]);
    r.clock.advance(DISCARD_BATCH_DELAY_MS);
    await until(() => r!.scheduler.pendingPages === 0, 'completion');
    expect(punched(r, 5)).to.equal(true);
    expect(r.scheduler.stats).to.include({ calls: 1, reclaimedBytes: 64 * PAGE });
  });

  it('a deflate of other pages does not wait for the batch in flight', async () => {
    r = rig();
    r.inflate(range(0, 512));
    r.clock.advance(DISCARD_BATCH_DELAY_MS);
    r.tracker.add(range(3000, 4)); // ballooned earlier, long punched
    r.deflate(range(3000, 4));
    expect(r.scheduler.stats.waits).to.equal(0);
    await until(() => r!.scheduler.pendingPages === 0, 'completion');
  });

  it('the worker punches its own copy of the descriptor: closing the region meanwhile is safe', () => {
    r = rig();
    const fd2 = native.memfdCreate('vballoon-test-other');
    native.ftruncate(fd2, PAGES * PAGE);
    const map2 = native.mmap(fd2, PAGES * PAGE, 0);
    const view2 = new DataView(map2);
    try {
      for (let p = 0; p < PAGES; p++) view2.setUint32(p * PAGE, p + 1, true);
      const q = native.punchQueueCreate(() => undefined);
      const seq = native.punchQueueSubmit(q, fd2, Float64Array.from([0, PAGES * PAGE]));
      closeQuietly(fd2); // the number may be reused at once...
      const fd3 = native.memfdCreate('vballoon-test-reuse');
      native.ftruncate(fd3, PAGE);
      try {
        native.punchQueueWait(q, seq);
        // ...the punch still went to the file it was submitted for, through the mapping we kept.
        expect(view2.getUint32(0, true)).to.equal(0);
        expect(view2.getUint32((PAGES - 1) * PAGE, true)).to.equal(0);
      } finally {
        closeQuietly(fd3);
        native.punchQueueClose(q);
      }
    } finally {
      native.munmap(map2);
    }
  });

  it('reports a failed punch as a counted error, and goes on', () => {
    r = rig();
    const log = new MemoryLogger();
    r.scheduler.setLogger(log);
    const pipe = native.pipe();
    try {
      const bad: ReclaimRegion = { ...r.region, fd: pipe[0] };
      const s = new DiscardScheduler(
        { clock: r.clock, findRegion: () => bad, isFull: () => true, isBallooned: () => true, inhibited: false },
        log,
      );
      s.enqueue([{ start: 0, count: 4 }], 4);
      s.flush();
      expect(s.stats).to.include({ errors: 1, calls: 0 });
      expect(log.records.some((x) => x.message === 'cannot give memory back to the host')).to.equal(true);
    } finally {
      closeQuietly(pipe[0]);
      closeQuietly(pipe[1]);
    }
  });

  it('property: under random inflates, deflates, reuse and flushes, no reused page is ever punched', async () => {
    let seed = 42;
    const rand = (n: number): number => (seed = (seed * 1103515245 + 12345) & 0x7fffffff) % n;
    for (let round = 0; round < 8; round++) {
      r?.close();
      r = rig();
      const reused = new Map<number, number>(); // pfn -> value the guest wrote after its deflate
      for (let step = 0; step < 60; step++) {
        const op = rand(10);
        if (op < 5) {
          const start = rand(PAGES - 300);
          const pfns = rand(2) === 0 ? range(start, 1 + rand(256)) : range(0, 64).map(() => rand(PAGES));
          r.inflate(pfns);
          for (const p of pfns) reused.delete(p);
        } else if (op < 8) {
          const ballooned = [...r.tracker.runs()].flatMap((x: PageRun) => range(x.start, x.count));
          if (ballooned.length === 0) continue;
          const pick = range(0, 1 + rand(32)).map(() => ballooned[rand(ballooned.length)]);
          r.deflate(pick);
          for (const p of pick) {
            const value = 0x10000 + step * 4096 + p;
            r.view.setUint32(p * PAGE, value, true);
            reused.set(p, value);
          }
        } else if (op < 9) {
          r.clock.advance(DISCARD_BATCH_DELAY_MS);
        } else {
          r.scheduler.flush();
        }
        if (rand(3) === 0) await new Promise((resolve) => setImmediate(resolve)); // let completions in
      }
      // Held runs go once the inflate is quiet; completions may arm the timer again.
      await until(() => {
        r!.clock.advance(DISCARD_QUIET_MS);
        return r!.scheduler.pendingPages === 0;
      }, 'completion');
      for (const [p, value] of reused)
        expect(r.view.getUint32(p * PAGE, true), `page ${p} (round ${round})`).to.equal(value);
      for (const run of r.tracker.runs())
        for (const p of range(run.start, run.count)) expect(punched(r, p)).to.equal(true);
    }
  });

  it('subtracts deflated pages from runs', () => {
    expect(
      subtractPfns(
        [
          { start: 0, count: 10 },
          { start: 20, count: 5 },
        ],
        [0, 5, 5, 9, 22, 30],
      ),
    ).to.deep.equal([
      { start: 1, count: 4 },
      { start: 6, count: 3 },
      { start: 20, count: 2 },
      { start: 23, count: 2 },
    ]);
  });
});
