import { expect } from 'chai';
import { GuestMemoryError } from '../../lib/errors';
import { native } from '../../lib/native';
import { GuestRam } from '../../lib/testing/guest-ram';
import { checkDisjoint, GuestMemory, MemoryRegion, validateRegion, WINDOW_BYTES } from '../../lib/virtio/guest-memory';
import { fdCount } from '../helpers';

describe('guest memory', () => {
  it('translates guest-physical and front-end addresses over a q35-like layout', () => {
    const ram = new GuestRam({ sizeBytes: 64 << 20 });
    try {
      const m = ram.memory;
      expect(m.regionList).to.have.length(2);
      expect(m.find(0x9ffff)).to.equal(m.regionList[0]);
      expect(m.find(0xa0000)).to.equal(undefined); // the VGA hole
      expect(m.find(0xc0000)).to.equal(m.regionList[1]);
      expect(m.userToGuest(0x7f0000000000 + 0xc1000, 16)).to.equal(0xc1000);
      expect(m.userToGuest(0x7f0000000000 + 0xa0000, 16)).to.equal(undefined);
      m.writeU32(0x100000, 0x11223344);
      expect(m.readU16(0x100000)).to.equal(0x3344); // little-endian
      expect(m.readU64(0x100000)).to.equal(0x11223344n);
      expect(m.checkRange(0x9fff0, 0x10)).to.equal(true);
      expect(m.checkRange(0x9fff0, 0x11)).to.equal(false);
      expect(m.checkRange((64 << 20) - 4, 4)).to.equal(true);
      expect(m.checkRange((64 << 20) - 4, 5)).to.equal(false);
      expect(m.checkRange(-1, 1)).to.equal(false);
      expect(m.checkRange(2 ** 60, 1)).to.equal(false);
      expect(() => m.readU32((64 << 20) - 2)).to.throw(GuestMemoryError);
      expect(() => m.writeU8(0xa0000, 1)).to.throw(GuestMemoryError);
    } finally {
      ram.close();
    }
  });

  it('copies ranges that span adjacent regions', () => {
    const fd = native.memfdCreate('t');
    native.ftruncate(fd, 2 << 20);
    const m = new GuestMemory();
    m.add(
      MemoryRegion.map(
        validateRegion({ guestPhysAddr: 0n, sizeBytes: 1n << 20n, userAddr: 0x10000000n, mmapOffset: 0n }),
        native.dup(fd),
      ),
    );
    m.add(
      MemoryRegion.map(
        validateRegion({
          guestPhysAddr: 1n << 20n,
          sizeBytes: 1n << 20n,
          userAddr: 0x20000000n,
          mmapOffset: 1n << 20n,
        }),
        native.dup(fd),
      ),
    );
    const data = Uint8Array.from({ length: 64 }, (_, i) => i);
    m.write((1 << 20) - 32, data);
    expect([...m.read((1 << 20) - 32, 64)]).to.deep.equal([...data]);
    expect(m.checkRange((1 << 20) - 32, 64)).to.equal(true);
    expect(m.view((1 << 20) - 32, 64)).to.equal(undefined);
    expect(m.userToGuest(0x10000000 + (1 << 20) - 32, 64)).to.equal(undefined);
    m.clear();
    native.close(fd);
  });

  it('works for guests larger than 4 GiB, across mapping windows', () => {
    const before = fdCount();
    const ram = new GuestRam({ sizeBytes: 6 * 1024 ** 3 });
    try {
      const m = ram.memory;
      expect(m.regionList).to.have.length(3);
      const high = 0x100000000 + 3 * 1024 ** 3 + 123;
      m.writeU64(high, 0x0102030405060708n);
      expect(m.readU64(high)).to.equal(0x0102030405060708n);
      // A copy that crosses a window boundary inside the high region.
      const boundary = 0x100000000 + WINDOW_BYTES;
      const data = Uint8Array.from({ length: 4096 }, (_, i) => i & 0xff);
      m.write(boundary - 2048, data);
      expect([...m.read(boundary - 2048, 4096)]).to.deep.equal([...data]);
      // Small ranges across the boundary are still one view (windows overlap).
      expect(m.view(boundary - 8, 16)).to.not.equal(undefined);
    } finally {
      ram.close();
    }
    expect(native.mappingCount()).to.equal(0);
    expect(fdCount()).to.equal(before);
  });

  it('rejects invalid region descriptions', () => {
    const bad = [
      { guestPhysAddr: 0n, sizeBytes: 0n, userAddr: 0n, mmapOffset: 0n },
      { guestPhysAddr: 2n ** 64n - 4096n, sizeBytes: 8192n, userAddr: 0n, mmapOffset: 0n },
      { guestPhysAddr: 0n, sizeBytes: 4096n, userAddr: 2n ** 64n - 4096n, mmapOffset: 0n },
      { guestPhysAddr: 0n, sizeBytes: 4096n, userAddr: 0n, mmapOffset: 2n ** 63n },
      { guestPhysAddr: 1n, sizeBytes: 4096n, userAddr: 0n, mmapOffset: 0n },
      { guestPhysAddr: 0n, sizeBytes: 4097n, userAddr: 0n, mmapOffset: 0n }, // not whole pages
      { guestPhysAddr: 0n, sizeBytes: 0x1ffn, userAddr: 0n, mmapOffset: 0n },
    ];
    for (const r of bad)
      expect(
        () => validateRegion(r),
        JSON.stringify(r, (_, v) => (typeof v === 'bigint' ? `${v}` : v)),
      ).to.throw(GuestMemoryError);
    const a = validateRegion({ guestPhysAddr: 0n, sizeBytes: 8192n, userAddr: 0x1000000n, mmapOffset: 0n });
    const overlapGpa = validateRegion({ guestPhysAddr: 4096n, sizeBytes: 8192n, userAddr: 0x2000000n, mmapOffset: 0n });
    const overlapUser = validateRegion({
      guestPhysAddr: 0x100000n,
      sizeBytes: 8192n,
      userAddr: 0x1001000n,
      mmapOffset: 0n,
    });
    expect(() => checkDisjoint([a], overlapGpa, 8)).to.throw(/overlaps/);
    expect(() => checkDisjoint([a], overlapUser, 8)).to.throw(/overlaps/);
    expect(() => checkDisjoint([a], a, 1)).to.throw(/too many/);
  });

  it('reports a region whose mmap fails, taking no ownership of the fd', () => {
    const fd = native.eventfd(0, true); // not mappable
    const desc = validateRegion({ guestPhysAddr: 0n, sizeBytes: 4096n, userAddr: 0n, mmapOffset: 0n });
    expect(() => MemoryRegion.map(desc, fd)).to.throw(GuestMemoryError, /past the end of its file/);
    native.close(fd);
  });
});
