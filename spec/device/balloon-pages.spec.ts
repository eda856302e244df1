/**
 * BalloonPages with the real worker thread over a real memfd mapped as guest memory: the free
 * page report edge of the ordering rule (a reported page is never punched after the report's
 * acknowledgement, even when the guest reports pages it had ballooned).
 */
import { expect } from 'chai';
import { ManualClock } from '../../lib/clock';
import { BalloonPages } from '../../lib/device/balloon-pages';
import { MemoryLogger } from '../../lib/log';
import { F_SEAL_GROW, F_SEAL_SHRINK, native } from '../../lib/native';
import { GuestMemory, MemoryRegion } from '../../lib/virtio/guest-memory';
import { fdCount, until } from '../helpers';

const PAGE = 4096;
const PAGES = 4096;

describe('balloon pages: free page reports and the worker thread', () => {
  let fdsBefore: number;
  let memory: GuestMemory;
  let clock: ManualClock;
  let pages: BalloonPages;
  beforeEach(() => {
    fdsBefore = fdCount();
    const fd = native.memfdCreate('vballoon-test-pages');
    native.ftruncate(fd, PAGES * PAGE);
    native.addSeals(fd, F_SEAL_SHRINK | F_SEAL_GROW); // as QEMU seals its guest memfds
    memory = new GuestMemory();
    memory.add(MemoryRegion.map({ guestPhysAddr: 0, sizeBytes: PAGES * PAGE, userAddr: 0, mmapOffset: 0 }, fd));
    for (let p = 0; p < PAGES; p++) memory.writeU32(p * PAGE, p + 1);
    clock = new ManualClock();
    pages = new BalloonPages(
      { clock, memory: () => memory, inhibited: false, report: () => undefined },
      new MemoryLogger(),
    );
  });
  afterEach(() => {
    pages.flush();
    memory.clear();
    expect(native.mappingCount(), 'mappings leaked').to.equal(0);
    expect(fdCount(), 'descriptors leaked').to.equal(fdsBefore);
  });

  /** An inflate buffer at page 1 holding `pfns`. */
  function inflate(pfns: number[]): void {
    pfns.forEach((p, i) => memory.writeU32(PAGE + 4 * i, p));
    pages.inflate([{ addr: PAGE, len: 4 * pfns.length, writable: false }]);
  }

  it('a report of free pages punches them before its acknowledgement and waits for nothing else', () => {
    inflate(Array.from({ length: 64 }, (_, i) => 100 + i)); // pending (the clock is not advanced)
    pages.report([{ addr: 1024 * PAGE, len: 512 * PAGE, writable: true }]);
    expect(memory.readU32(1024 * PAGE)).to.equal(0);
    expect(memory.readU32(1535 * PAGE)).to.equal(0);
    expect(pages.discardStats.waits).to.equal(0);
    expect(pages.pendingDiscardPages).to.equal(64);
  });

  it('a report of ballooned pages (pending) punches what is pending first: the reused page survives', async () => {
    inflate(Array.from({ length: 64 }, (_, i) => 100 + i));
    pages.report([{ addr: 96 * PAGE, len: 16 * PAGE, writable: true }]); // covers 100..111
    expect(pages.pendingDiscardPages).to.equal(0);
    expect(pages.discardStats.waits).to.equal(1);
    // Acknowledged: the guest reuses the reported pages.
    for (let p = 96; p < 112; p++) memory.writeU32(p * PAGE, 0xbeef0000 + p);
    clock.advance(1000);
    await until(() => pages.pendingDiscardPages === 0, 'nothing pending');
    await new Promise((resolve) => setTimeout(resolve, 5));
    for (let p = 96; p < 112; p++) expect(memory.readU32(p * PAGE), `page ${p}`).to.equal(0xbeef0000 + p);
    for (let p = 112; p < 164; p++) expect(memory.readU32(p * PAGE), `page ${p}`).to.equal(0);
  });
});
