import { expect } from 'chai';
import fc from 'fast-check';
import { compactRuns, PageTracker } from '../../lib/device/page-tracker';
import { alignedFileRange, planDiscards, ReclaimRegion } from '../../lib/device/reclaim';

describe('ballooned page tracking', () => {
  it('property: behaves like a set of PFNs', () => {
    const op = fc.record({
      add: fc.boolean(),
      pfns: fc.array(fc.oneof(fc.nat({ max: 5000 }), fc.integer({ min: 0, max: 2 ** 22 })), { maxLength: 300 }),
    });
    fc.assert(
      fc.property(fc.array(op, { maxLength: 30 }), (ops) => {
        const t = new PageTracker();
        const model = new Set<number>();
        for (const o of ops) {
          if (o.add) {
            const fresh = t.add(o.pfns);
            const expected = [...new Set(o.pfns.filter((p) => !model.has(p)))].sort((a, b) => a - b);
            expect(fresh.flatMap((r) => Array.from({ length: r.count }, (_, i) => r.start + i))).to.deep.equal(
              expected,
            );
            for (const p of o.pfns) model.add(p);
          } else {
            const before = model.size;
            for (const p of o.pfns) model.delete(p);
            expect(t.remove(o.pfns)).to.equal(before - model.size);
          }
          expect(t.size).to.equal(model.size);
        }
        for (const p of [...model].slice(0, 50)) expect(t.has(p)).to.equal(true);
        const listed = [...t.runs()].flatMap((r) => Array.from({ length: r.count }, (_, i) => r.start + i));
        expect(listed).to.deep.equal([...model].sort((a, b) => a - b));
      }),
      { numRuns: 300 },
    );
  });

  it('property: behaves like a set of PFNs through every change of representation', () => {
    // Blocks that are contiguous, strided (every k-th page: fragmented) or scattered, added and
    // removed in any order, so the tracker moves between runs and bitmap in both directions.
    const block = fc.record({
      add: fc.boolean(),
      start: fc.nat({ max: 200_000 }),
      length: fc.integer({ min: 1, max: 3000 }),
      stride: fc.constantFrom(1, 1, 2, 3, 7),
    });
    const modes = new Set<string>();
    fc.assert(
      fc.property(fc.array(block, { maxLength: 25 }), (ops) => {
        const t = new PageTracker();
        const model = new Set<number>();
        for (const o of ops) {
          const pfns: number[] = [];
          for (let p = o.start; p < o.start + o.length; p += o.stride) pfns.push(p);
          if (o.add) {
            const fresh = t.add(pfns);
            const expected = pfns.filter((p) => !model.has(p));
            expect(fresh.reduce((n, r) => n + r.count, 0)).to.equal(expected.length);
            for (const r of fresh)
              for (let p = r.start; p < r.start + r.count; p++) expect(model.has(p)).to.equal(false);
            for (const p of pfns) model.add(p);
          } else {
            const before = model.size;
            for (const p of pfns) model.delete(p);
            expect(t.remove(pfns)).to.equal(before - model.size);
          }
          modes.add(t.representation);
          expect(t.size).to.equal(model.size);
          // Spot checks around the block's edges.
          for (const p of [o.start - 1, o.start, o.start + 1, o.start + o.length - 1, o.start + o.length])
            expect(t.has(p), `has(${p})`).to.equal(model.has(p));
          let all = true;
          let any = false;
          for (let p = o.start; p < o.start + o.length; p++) {
            all &&= model.has(p);
            any ||= model.has(p);
          }
          expect(t.isFull(o.start, o.length)).to.equal(all);
          expect(t.anyIn(o.start, o.length)).to.equal(any);
        }
        const sorted = [...model].sort((a, b) => a - b);
        const listed = [...t.runs()];
        expect(listed.flatMap((r) => Array.from({ length: r.count }, (_, i) => r.start + i))).to.deep.equal(sorted);
        // Runs are maximal: never adjacent.
        for (let i = 1; i < listed.length; i++)
          expect(listed[i].start).to.be.greaterThan(listed[i - 1].start + listed[i - 1].count);
        expect(t.runCount).to.equal(listed.length);
        // Restoring through add(runs()) gives the same set (how a saved balloon comes back).
        const restored = new PageTracker();
        for (const r of listed) restored.add(Array.from({ length: r.count }, (_, i) => r.start + i));
        expect([...restored.runs()]).to.deep.equal(listed);
        // Never more than the smaller representation, within its growth granule.
        if (sorted.length > 0) {
          const span = sorted[sorted.length - 1] - sorted[0] + 1;
          expect(t.memoryBytes).to.be.at.most(Math.max(2 * listed.length * 8 * 4, span / 8 + 8192, 64));
        }
      }),
      { numRuns: 200 },
    );
    expect([...modes].sort()).to.deep.equal(['bitmap', 'runs']);
  });

  it('picks a bitmap for every other page: no more than a plain bitmap over the same GiB', () => {
    const t = new PageTracker();
    const pages = 1024 ** 3 / 4096;
    for (let p = 0; p < pages; p += 512) t.add(Array.from({ length: 256 }, (_, i) => p + 2 * i));
    expect(t.representation).to.equal('bitmap');
    expect(t.size).to.equal(pages / 2);
    expect(t.memoryBytes).to.be.at.most(pages / 8);
    expect(t.runCount).to.equal(pages / 2);
    // Deflating the odd ones out again leaves a few runs: back to runs.
    t.add(Array.from({ length: pages / 2 }, (_, i) => 2 * i + 1));
    expect(t.representation).to.equal('runs');
    expect(t.runCount).to.equal(1);
    expect(t.memoryBytes).to.be.at.most(64);
  });

  it('costs about 1 KiB per GiB when whole chunks are ballooned', () => {
    const t = new PageTracker();
    const pages = 1024 ** 3 / 4096;
    for (let p = 0; p < pages; p += 256) t.add(Array.from({ length: 256 }, (_, i) => p + i));
    expect(t.size).to.equal(pages);
    expect(t.memoryBytes).to.be.at.most(2048);
    expect(t.isFull(0, pages)).to.equal(true);
    t.remove([12345]);
    expect(t.isFull(0, pages)).to.equal(false);
    expect(t.isFull(0, 512)).to.equal(true);
    expect(t.memoryBytes).to.be.at.most(2048 + 256);
  });

  it('compacts PFNs into sorted runs', () => {
    expect(compactRuns([5, 3, 4, 10, 4, 11, 1])).to.deep.equal([
      { start: 1, count: 1 },
      { start: 3, count: 3 },
      { start: 10, count: 2 },
    ]);
  });
});

describe('reclaim planning', () => {
  const small: ReclaimRegion = { guestPhysAddr: 0, sizeBytes: 64 << 20, mmapOffset: 0, pageSizeBytes: 4096, fd: 7 };
  const high: ReclaimRegion = {
    guestPhysAddr: 2 ** 32,
    sizeBytes: 64 << 20,
    mmapOffset: 64 << 20,
    pageSizeBytes: 4096,
    fd: 7,
  };
  const find = (gpa: number) =>
    [small, high].find((r) => gpa >= r.guestPhysAddr && gpa < r.guestPhysAddr + r.sizeBytes);

  it('punches one range per contiguous run, split at region boundaries, in file offsets', () => {
    const plan = planDiscards(
      [
        { start: 10, count: 3 },
        { start: 100, count: 1 },
        { start: 2 ** 20, count: 2 },
      ],
      find,
      () => true,
    );
    expect(plan).to.deep.equal([
      { fd: 7, fileOffset: 10 * 4096, length: 3 * 4096 },
      { fd: 7, fileOffset: 100 * 4096, length: 4096 },
      { fd: 7, fileOffset: 64 << 20, length: 2 * 4096 },
    ]);
  });

  it('with 2 MiB host pages, discards a host page only when all of it is ballooned', () => {
    const huge: ReclaimRegion = { ...small, pageSizeBytes: 2 << 20 };
    const t = new PageTracker();
    const runs = t.add(Array.from({ length: 600 }, (_, i) => 500 + i)); // pages 500..1099
    const plan = planDiscards(
      runs,
      () => huge,
      (p, n) => t.isFull(p, n),
    );
    expect(plan).to.deep.equal([{ fd: 7, fileOffset: 2 << 20, length: 2 << 20 }]); // only pages 512..1023
    const more = t.add(
      Array.from({ length: 12 }, (_, i) => 500 - 12 + i).concat(Array.from({ length: 10 }, (_, i) => 1100 + i)),
    );
    expect(
      planDiscards(
        more,
        () => huge,
        (p, n) => t.isFull(p, n),
      ),
    ).to.deep.equal([]);
  });

  it('property: a plan never covers a page that is not ballooned, and covers every ballooned 4 KiB page', () => {
    fc.assert(
      fc.property(
        fc.array(fc.nat({ max: 40000 }), { maxLength: 400 }),
        fc.constantFrom(4096, 65536, 2 << 20),
        (pfns, pageSize) => {
          const region: ReclaimRegion = { ...small, sizeBytes: 256 << 20, pageSizeBytes: pageSize };
          const t = new PageTracker();
          const runs = t.add(pfns);
          const plan = planDiscards(
            runs,
            () => region,
            (p, n) => t.isFull(p, n),
          );
          for (const r of plan) {
            expect(r.fileOffset % pageSize).to.equal(0);
            expect(r.length % pageSize).to.equal(0);
            expect(t.isFull(r.fileOffset / 4096, r.length / 4096)).to.equal(true);
          }
          if (pageSize === 4096) expect(plan.reduce((n, r) => n + r.length, 0)).to.equal(t.size * 4096);
        },
      ),
      { numRuns: 300 },
    );
  });

  it('aligns reported ranges inward to whole host pages', () => {
    expect(alignedFileRange(small, 4000, 10000)).to.deep.equal({ fd: 7, fileOffset: 4096, length: 8192 });
    expect(alignedFileRange({ ...small, pageSizeBytes: 2 << 20 }, 4096, 2 << 20)).to.equal(undefined);
  });
});
