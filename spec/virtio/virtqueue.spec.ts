import { expect } from 'chai';
import fc from 'fast-check';
import { ErrorCode } from '../../lib/errors';
import { SplitRingDriver } from '../../lib/testing/driver';
import { GuestRam } from '../../lib/testing/guest-ram';
import {
  QueueOptions,
  SplitQueue,
  VRING_AVAIL_F_NO_INTERRUPT,
  VRING_DESC_F_INDIRECT,
  VRING_DESC_F_NEXT,
  VRING_DESC_F_WRITE,
  VRING_USED_F_NO_NOTIFY,
  vringNeedEvent,
} from '../../lib/virtio/virtqueue';

const RAM = 16 << 20;

function setup(size = 8, options: Partial<QueueOptions> = {}) {
  const ram = new GuestRam({ sizeBytes: RAM });
  const driver = new SplitRingDriver(ram, 0, size);
  const queue = new SplitQueue(
    ram.memory,
    size,
    { descGpa: driver.descGpa, availGpa: driver.availGpa, usedGpa: driver.usedGpa },
    { eventIdx: false, indirect: true, ...options },
  );
  return { ram, driver, queue };
}

describe('split virtqueue', () => {
  let env: ReturnType<typeof setup>;
  afterEach(() => {
    env?.driver.close();
    env?.ram.close();
  });

  it('pops chains in order with their buffers, and returns them on the used ring', () => {
    env = setup(8);
    const { driver, queue, ram } = env;
    const a = ram.alloc(100);
    const b = ram.alloc(200);
    const h1 = driver.addBuffer([
      { addr: a, len: 100 },
      { addr: b, len: 200, writable: true },
    ]);
    const h2 = driver.addBuffer([{ addr: b, len: 8 }]);
    expect(queue.pending()).to.equal(2);
    const c1 = queue.pop();
    expect(c1).to.deep.equal({
      kind: 'chain',
      head: h1,
      descriptors: [
        { addr: a, len: 100, writable: false },
        { addr: b, len: 200, writable: true },
      ],
    });
    const c2 = queue.pop();
    expect(c2?.kind === 'chain' && c2.head).to.equal(h2);
    expect(queue.pop()).to.equal(null);
    queue.pushUsed(h1, 17);
    queue.pushUsed(h2, 0);
    expect(driver.usedIdx).to.equal(0); // not yet published
    expect(queue.flush()).to.equal(true);
    expect(driver.takeUsed()).to.deep.equal([
      { id: h1, len: 17 },
      { id: h2, len: 0 },
    ]);
    expect(queue.flush()).to.equal(false); // nothing new
  });

  it('follows indirect tables', () => {
    env = setup(8);
    const { driver, queue, ram } = env;
    const table = ram.alloc(64, 16);
    const x = ram.alloc(32);
    const head = driver.addIndirect(
      [
        { addr: x, len: 32 },
        { addr: x, len: 16, writable: true },
      ],
      table,
    );
    const c = queue.pop();
    expect(c).to.deep.equal({
      kind: 'chain',
      head,
      descriptors: [
        { addr: x, len: 32, writable: false },
        { addr: x, len: 16, writable: true },
      ],
    });
  });

  it('resumes from a base index and takes the used index from the ring', () => {
    env = setup(8);
    const { driver, ram } = env;
    driver.addBuffer([{ addr: ram.alloc(8), len: 8 }]);
    driver.addBuffer([{ addr: ram.alloc(8), len: 8 }]);
    ram.memory.writeU16(driver.usedGpa + 2, 1);
    const q = new SplitQueue(
      ram.memory,
      8,
      { descGpa: driver.descGpa, availGpa: driver.availGpa, usedGpa: driver.usedGpa },
      { eventIdx: false, indirect: false },
      1,
    );
    expect(q.lastAvailIdx).to.equal(1);
    expect(q.usedIdx).to.equal(1);
    expect(q.pending()).to.equal(1);
  });

  it('suppresses interrupts with NO_INTERRUPT, and kicks with NO_NOTIFY', () => {
    env = setup(8);
    const { driver, queue, ram } = env;
    const h = driver.addBuffer([{ addr: ram.alloc(8), len: 8 }]);
    queue.pop();
    driver.setAvailFlags(VRING_AVAIL_F_NO_INTERRUPT);
    queue.pushUsed(h, 0);
    expect(queue.flush()).to.equal(false);
    queue.disableNotifications();
    expect(driver.usedFlags & VRING_USED_F_NO_NOTIFY).to.equal(VRING_USED_F_NO_NOTIFY);
    expect(queue.enableNotifications()).to.equal(false);
    expect(driver.usedFlags & VRING_USED_F_NO_NOTIFY).to.equal(0);
    driver.addBuffer([{ addr: ram.alloc(8), len: 8 }]);
    expect(queue.enableNotifications()).to.equal(true); // work arrived: do not sleep
  });

  it('implements EVENT_IDX: used_event decides interrupts, avail_event is published', () => {
    env = setup(8, { eventIdx: true });
    const { driver, queue, ram } = env;
    const heads = [0, 1, 2].map(() => driver.addBuffer([{ addr: ram.alloc(8), len: 8 }]));
    for (let i = 0; i < 3; i++) queue.pop();
    driver.setUsedEvent(0);
    queue.pushUsed(heads[0], 0);
    expect(queue.flush()).to.equal(true); // first signal is always sent
    driver.setUsedEvent(5); // interrupt me only after used idx passes 5
    queue.pushUsed(heads[1], 0);
    expect(queue.flush()).to.equal(false);
    driver.setUsedEvent(2); // interrupt me once the entry at used index 2 is written
    queue.pushUsed(heads[2], 0);
    expect(queue.flush()).to.equal(true);
    expect(queue.enableNotifications()).to.equal(false);
    expect(driver.availEvent).to.equal(3);
    expect(vringNeedEvent(0, 1, 0)).to.equal(true);
    expect(vringNeedEvent(5, 2, 1)).to.equal(false);
    expect(vringNeedEvent(0xffff, 0, 0xfffe)).to.equal(true); // wrap-around
  });

  it('rejects invalid sizes and ring addresses', () => {
    env = setup(8);
    const { ram, driver } = env;
    const ok = { descGpa: driver.descGpa, availGpa: driver.availGpa, usedGpa: driver.usedGpa };
    const opts = { eventIdx: false, indirect: false };
    for (const size of [0, 3, 65536, 32768 * 2]) {
      expect(() => new SplitQueue(ram.memory, size, ok, opts), `size ${size}`).to.throw(/power of two/);
    }
    expect(() => new SplitQueue(ram.memory, 8, { ...ok, descGpa: RAM }, opts)).to.throw(/not inside/);
    expect(() => new SplitQueue(ram.memory, 8, { ...ok, usedGpa: 0xa0000 - 8 }, opts)).to.throw(/not inside/);
    expect(() => new SplitQueue(ram.memory, 8, { ...ok, descGpa: ok.descGpa + 8 }, opts)).to.throw(/aligned/);
  });

  describe('hostile rings (each reported, never thrown)', () => {
    const cases: Array<{
      name: string;
      code: string;
      kind: 'bad-chain' | 'broken';
      build(d: SplitRingDriver, ram: GuestRam): void;
      indirect?: boolean;
    }> = [
      {
        name: 'descriptor loop',
        code: ErrorCode.VIRTQ_BAD_CHAIN,
        kind: 'bad-chain',
        build: (d, ram) => {
          const a = ram.alloc(8);
          d.writeDescriptor(0, { addr: a, len: 8, flags: VRING_DESC_F_NEXT, next: 1 });
          d.writeDescriptor(1, { addr: a, len: 8, flags: VRING_DESC_F_NEXT, next: 0 });
          d.publish(0);
        },
      },
      {
        name: 'chain longer than the queue (self loop)',
        code: ErrorCode.VIRTQ_BAD_CHAIN,
        kind: 'bad-chain',
        build: (d, ram) => {
          d.writeDescriptor(3, { addr: ram.alloc(8), len: 8, flags: VRING_DESC_F_NEXT, next: 3 });
          d.publish(3);
        },
      },
      {
        name: 'nested indirect',
        code: ErrorCode.VIRTQ_BAD_CHAIN,
        kind: 'bad-chain',
        build: (d, ram) => {
          const t = ram.alloc(32, 16);
          d.writeDescriptor(0, { addr: t, len: 16, flags: VRING_DESC_F_INDIRECT, next: 0 }, t);
          d.writeDescriptor(0, { addr: t, len: 16, flags: VRING_DESC_F_INDIRECT, next: 0 });
          d.publish(0);
        },
      },
      {
        name: 'indirect length not a multiple of 16',
        code: ErrorCode.VIRTQ_BAD_CHAIN,
        kind: 'bad-chain',
        build: (d, ram) => {
          d.writeDescriptor(0, { addr: ram.alloc(64, 16), len: 24, flags: VRING_DESC_F_INDIRECT, next: 0 });
          d.publish(0);
        },
      },
      {
        name: 'indirect without the feature',
        code: ErrorCode.VIRTQ_BAD_CHAIN,
        kind: 'bad-chain',
        indirect: false,
        build: (d, ram) => {
          d.writeDescriptor(0, { addr: ram.alloc(64, 16), len: 32, flags: VRING_DESC_F_INDIRECT, next: 0 });
          d.publish(0);
        },
      },
      {
        name: 'buffer past the end of guest memory',
        code: ErrorCode.VIRTQ_BAD_CHAIN,
        kind: 'bad-chain',
        build: (d) => {
          d.writeDescriptor(0, { addr: RAM - 4, len: 8, flags: 0, next: 0 });
          d.publish(0);
        },
      },
      {
        name: 'buffer in the VGA hole',
        code: ErrorCode.VIRTQ_BAD_CHAIN,
        kind: 'bad-chain',
        build: (d) => {
          d.writeDescriptor(0, { addr: 0xa0000, len: 8, flags: 0, next: 0 });
          d.publish(0);
        },
      },
      {
        name: 'address above 2^53',
        code: ErrorCode.VIRTQ_BAD_CHAIN,
        kind: 'bad-chain',
        build: (d) => {
          d.writeDescriptor(0, { addr: 0xffff_ffff_ffff_f000n, len: 8, flags: 0, next: 0 });
          d.publish(0);
        },
      },
      {
        name: 'next index out of range',
        code: ErrorCode.VIRTQ_BAD_CHAIN,
        kind: 'bad-chain',
        build: (d, ram) => {
          d.writeDescriptor(0, { addr: ram.alloc(8), len: 8, flags: VRING_DESC_F_NEXT, next: 200 });
          d.publish(0);
        },
      },
      {
        name: 'readable descriptor after a writable one',
        code: ErrorCode.VIRTQ_BAD_CHAIN,
        kind: 'bad-chain',
        build: (d, ram) => {
          const a = ram.alloc(8);
          d.writeDescriptor(0, { addr: a, len: 8, flags: VRING_DESC_F_NEXT | VRING_DESC_F_WRITE, next: 1 });
          d.writeDescriptor(1, { addr: a, len: 8, flags: 0, next: 0 });
          d.publish(0);
        },
      },
      {
        name: 'head index out of range',
        code: ErrorCode.VIRTQ_BROKEN_RING,
        kind: 'broken',
        build: (d) => d.publish(8),
      },
      {
        name: 'avail index jumping by more than the queue size',
        code: ErrorCode.VIRTQ_BROKEN_RING,
        kind: 'broken',
        build: (d) => d.setAvailIdx(9),
      },
    ];
    for (const c of cases) {
      it(c.name, () => {
        env = setup(8, { indirect: c.indirect ?? true });
        c.build(env.driver, env.ram);
        const r = env.queue.pop();
        expect(r?.kind).to.equal(c.kind);
        if (r?.kind === 'bad-chain' || r?.kind === 'broken') expect(r.error.code).to.equal(c.code);
      });
    }

    it('keeps serving after a bad chain', () => {
      env = setup(8);
      const { driver, queue, ram } = env;
      driver.writeDescriptor(7, { addr: 0xa0000, len: 8, flags: 0, next: 0 });
      driver.publish(7);
      const good = driver.addBuffer([{ addr: ram.alloc(8), len: 8 }]);
      expect(queue.pop()?.kind).to.equal('bad-chain');
      const next = queue.pop();
      expect(next?.kind === 'chain' && next.head).to.equal(good);
    });
  });

  it('property: pop() on random descriptor tables never throws and always terminates', () => {
    const descriptor = fc.record({
      addr: fc.oneof(
        fc.bigInt({ min: 0n, max: (1n << 64n) - 1n }),
        fc.integer({ min: 0, max: RAM + 4096 }).map(BigInt),
      ),
      len: fc.oneof(fc.nat({ max: 70000 }), fc.constant(0xffffffff), fc.constantFrom(16, 32, 48, 24)),
      flags: fc.nat({ max: 7 }),
      next: fc.nat({ max: 20 }),
    });
    env = setup(16);
    const { driver, queue, ram } = env;
    const table2 = ram.alloc(16 * 16, 16);
    fc.assert(
      fc.property(
        fc.array(descriptor, { minLength: 16, maxLength: 16 }),
        fc.array(descriptor, { minLength: 16, maxLength: 16 }),
        fc.array(fc.nat({ max: 20 }), { minLength: 1, maxLength: 20 }),
        fc.nat({ max: 0xffff }),
        (table, indirect, heads, availJump) => {
          // Indirect descriptors in the main table point at a second random table half the time.
          table.forEach((d, i) => driver.writeDescriptor(i, d.flags & 4 && i % 2 === 0 ? { ...d, addr: table2 } : d));
          indirect.forEach((d, i) => driver.writeDescriptor(i, d, table2));
          const q = new SplitQueue(
            ram.memory,
            16,
            { descGpa: driver.descGpa, availGpa: driver.availGpa, usedGpa: driver.usedGpa },
            { eventIdx: true, indirect: true },
            queue.lastAvailIdx,
          );
          for (const h of heads) driver.publish(h);
          if (availJump % 7 === 0) driver.setAvailIdx(availJump);
          for (let i = 0; i < 40; i++) {
            const r = q.pop();
            if (r === null || r.kind === 'broken') break;
            if (r.kind === 'chain') {
              expect(r.descriptors.length).to.be.at.most(16);
              for (const d of r.descriptors) expect(ram.memory.checkRange(d.addr, d.len)).to.equal(true);
            }
            q.pushUsed(r.head, 0);
          }
          q.flush();
          driver.setAvailIdx(q.lastAvailIdx);
        },
      ),
      { numRuns: 300 },
    );
  });

  it('property: well-formed chains come back exactly as the driver wrote them', () => {
    env = setup(32);
    const { driver, queue, ram } = env;
    const pool = ram.alloc(1 << 20);
    const segment = fc.record({
      off: fc.nat({ max: (1 << 20) - 4096 }),
      len: fc.integer({ min: 1, max: 4096 }),
      writable: fc.boolean(),
    });
    fc.assert(
      fc.property(
        fc.array(fc.array(segment, { minLength: 1, maxLength: 4 }), { minLength: 1, maxLength: 8 }),
        (chains) => {
          const expected = new Map<number, Array<{ addr: number; len: number; writable: boolean }>>();
          for (const segs of chains) {
            // Readable segments first, as the spec requires.
            const ordered = [...segs]
              .sort((a, b) => Number(a.writable) - Number(b.writable))
              .map((s) => ({ addr: pool + s.off, len: s.len, writable: s.writable }));
            expected.set(driver.addBuffer(ordered), ordered);
          }
          for (let i = 0; i < chains.length; i++) {
            const r = queue.pop();
            expect(r?.kind).to.equal('chain');
            if (r?.kind !== 'chain') return;
            expect(r.descriptors).to.deep.equal(expected.get(r.head));
            queue.pushUsed(r.head, 0);
          }
          expect(queue.pop()).to.equal(null);
          queue.flush();
          driver.takeUsed();
        },
      ),
      { numRuns: 200 },
    );
  });
});
