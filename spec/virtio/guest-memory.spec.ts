import { expect } from 'chai';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { GuestMemoryError } from '../../lib/errors';
import { F_SEAL_GROW, F_SEAL_SHRINK, native } from '../../lib/native';
import { GuestRam } from '../../lib/testing/guest-ram';
import { checkDisjoint, GuestMemory, MemoryRegion, validateRegion, WINDOW_BYTES } from '../../lib/virtio/guest-memory';
import { fdCount, tmpDir } from '../helpers';

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
    native.addSeals(fd, F_SEAL_SHRINK);
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
        JSON.stringify(r, (_, v: unknown) => (typeof v === 'bigint' ? `${v}` : v)),
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

  it('maps a 1 TiB region one window at a time, on first use, not counted as V8 memory', () => {
    const fd = native.memfdCreate('huge');
    native.ftruncate(fd, 2 ** 40);
    native.addSeals(fd, F_SEAL_SHRINK | F_SEAL_GROW);
    const maps = native.mappingCount();
    const external = process.memoryUsage().external;
    const region = MemoryRegion.map(
      validateRegion({ guestPhysAddr: 0n, sizeBytes: 1n << 40n, userAddr: 0n, mmapOffset: 0n }),
      fd,
    );
    try {
      // Mapping every window at once (1024 of them) stalled the loop for seconds (issue 15).
      expect(native.mappingCount() - maps).to.equal(1);
      expect(region.mappedWindows).to.equal(1);
      // Touch 16 windows across the region: each is mapped then, once.
      for (let k = 0; k < 1024; k += 64) {
        const span = region.span(k * WINDOW_BYTES + 8, 8)!;
        span.view.setUint32(span.offset, k, true);
        expect(region.span(k * WINDOW_BYTES + 8, 8)!.view.getUint32(span.offset, true)).to.equal(k);
      }
      expect(region.mappedWindows).to.equal(16);
      expect(native.mappingCount() - maps).to.equal(16);
      // 16 GiB of windows are address space, not memory: V8 must not count them (every 64 MiB
      // it counts starts a garbage collection).
      expect(process.memoryUsage().external - external).to.be.lessThan(64 * 2 ** 20);
      expect(region.span(2 ** 40 - 8, 8)).to.not.equal(undefined); // the last window
      expect(region.span(2 ** 40, 1)).to.equal(undefined);
    } finally {
      region.unmap(); // closes fd
    }
    expect(native.mappingCount()).to.equal(maps);
  });

  it('refuses a memfd that is not sealed against shrinking; other files go without seals', () => {
    const desc = validateRegion({ guestPhysAddr: 0n, sizeBytes: 65536n, userAddr: 0n, mmapOffset: 0n });
    const unsealed = native.memfdCreate('unsealed');
    native.ftruncate(unsealed, 65536);
    expect(() => MemoryRegion.map(desc, unsealed)).to.throw(GuestMemoryError, /F_SEAL_SHRINK/);
    native.addSeals(unsealed, F_SEAL_GROW); // sealed, but not against shrinking
    expect(() => MemoryRegion.map(desc, unsealed)).to.throw(GuestMemoryError, /F_SEAL_SHRINK/);
    native.close(unsealed);
    const sealed = native.memfdCreate('sealed');
    native.ftruncate(sealed, 65536);
    native.addSeals(sealed, F_SEAL_SHRINK);
    MemoryRegion.map(desc, sealed).unmap();
    const dir = tmpDir();
    try {
      const file = fs.openSync(path.join(dir, 'ram'), 'w+');
      fs.ftruncateSync(file, 65536);
      expect(native.fileSeals(file)).to.equal(null);
      MemoryRegion.map(desc, file).unmap();
    } finally {
      fs.rmSync(dir, { recursive: true });
    }
  });

  it('survives a file shrunk under its mapping (SIGBUS): zeros, `faulted`, the process lives', () => {
    const dir = tmpDir();
    const before = fdCount();
    const maps = native.mappingCount();
    const faults = native.mappingFaults();
    try {
      const file = fs.openSync(path.join(dir, 'ram'), 'w+');
      fs.ftruncateSync(file, 3 * 65536);
      const m = new GuestMemory();
      m.add(
        MemoryRegion.map(
          validateRegion({ guestPhysAddr: 0n, sizeBytes: 3n * 65536n, userAddr: 0n, mmapOffset: 0n }),
          native.dup(file),
        ),
      );
      m.writeU32(0x100, 0xaabbccdd);
      m.writeU32(2 * 65536 + 0x100, 0x11223344);
      expect(m.faulted).to.equal(false);
      fs.ftruncateSync(file, 65536); // what a hostile front-end does after SET_MEM_TABLE
      expect(m.readU32(0x100)).to.equal(0xaabbccdd); // still inside the file
      expect(m.readU32(2 * 65536 + 0x100)).to.equal(0); // was SIGBUS: the process died
      m.writeU32(2 * 65536 + 0x200, 5); // writes land in private zero pages
      expect(m.readU32(2 * 65536 + 0x200)).to.equal(5);
      expect(m.faulted).to.equal(true);
      expect(native.mappingFaults()).to.be.greaterThan(faults);
      m.clear();
      fs.closeSync(file);
    } finally {
      fs.rmSync(dir, { recursive: true });
    }
    expect(native.mappingCount()).to.equal(maps);
    expect(fdCount()).to.equal(before);
  });

  it('reports a region whose mmap fails, taking no ownership of the fd', () => {
    const fd = native.eventfd(0, true); // not mappable
    const desc = validateRegion({ guestPhysAddr: 0n, sizeBytes: 4096n, userAddr: 0n, mmapOffset: 0n });
    expect(() => MemoryRegion.map(desc, fd)).to.throw(GuestMemoryError, /past the end of its file/);
    native.close(fd);
  });
});
