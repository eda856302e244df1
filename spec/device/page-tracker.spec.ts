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
