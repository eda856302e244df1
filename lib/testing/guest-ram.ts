/**
 * Guest RAM for the test front-end, laid out as QEMU lays out a q35 guest's memfd: a region
 * below the legacy VGA hole, one from 0xc0000 to the low-memory top, and one above 4 GiB for
 * the rest. Real memfd, really mapped here too so the guest driver model can write rings.
 */
import { closeQuietly, F_SEAL_GROW, F_SEAL_SHRINK, native } from '../native';
import { GuestMemory, MemoryRegion } from '../virtio/guest-memory';
import { RegionPayload } from '../vhost/codec';

/** Where QEMU's q35 stops low memory for guests larger than this. */
const LOW_MEMORY_TOP = 0x80000000;
const VGA_HOLE_START = 0xa0000;
const VGA_HOLE_END = 0xc0000;
const HIGH_MEMORY_START = 0x100000000;
/** A made-up front-end virtual base address, like QEMU's mmap of the memfd. */
const FRONTEND_VA_BASE = 0x7f0000000000;

export interface GuestRamOptions {
  sizeBytes: number;
  /** 'q35' (default): three regions like QEMU; 'flat': one region at 0. */
  layout?: 'q35' | 'flat';
  /** Front-end virtual address of file offset 0. */
  userBase?: number;
}

/** Guest RAM backed by one memfd. */
export class GuestRam {
  readonly fd: number;
  readonly sizeBytes: number;
  readonly regions: RegionPayload[];
  /** The front-end's own mapping (the "guest" side writes through it). */
  readonly memory = new GuestMemory();
  /** Next free guest-physical address for alloc(); starts at 1 MiB. */
  private nextFree = 0x100000;

  constructor(options: GuestRamOptions) {
    this.sizeBytes = options.sizeBytes;
    const userBase = options.userBase ?? FRONTEND_VA_BASE;
    this.fd = native.memfdCreate('vballoon-test-guest');
    try {
      native.ftruncate(this.fd, options.sizeBytes);
      native.addSeals(this.fd, F_SEAL_SHRINK | F_SEAL_GROW); // as QEMU's memory-backend-memfd (seal=on)
      this.regions = layoutRegions(options.sizeBytes, options.layout ?? 'q35', userBase);
      for (const r of this.regions) {
        const desc = {
          guestPhysAddr: Number(r.guestPhysAddr),
          sizeBytes: Number(r.sizeBytes),
          userAddr: Number(r.userAddr),
          mmapOffset: Number(r.mmapOffset),
        };
        this.memory.add(MemoryRegion.map(desc, native.dup(this.fd)));
      }
    } catch (err) {
      this.memory.clear();
      closeQuietly(this.fd);
      throw err;
    }
  }

  /** Allocates `len` bytes of guest memory aligned to `align` (never freed; tests are short). */
  alloc(len: number, align = 16): number {
    let at = Math.ceil(this.nextFree / align) * align;
    if (!this.memory.checkRange(at, len)) {
      // Skip to the next region when this one is full.
      const next = this.memory.regionList.find((r) => r.guestPhysAddr > at);
      if (next === undefined) throw new Error(`guest RAM exhausted allocating ${len} bytes`);
      at = Math.ceil(next.guestPhysAddr / align) * align;
    }
    this.nextFree = at + len;
    return at;
  }

  /** The front-end virtual address of a guest-physical address. */
  userAddr(gpa: number): number {
    const r = this.memory.find(gpa);
    if (r === undefined) throw new Error(`0x${gpa.toString(16)} is not guest RAM`);
    return r.userAddr + (gpa - r.guestPhysAddr);
  }

  /** Bytes of the memfd the host really holds. */
  residentBytes(): number {
    return native.fstat(this.fd).allocatedBytes;
  }

  close(): void {
    this.memory.clear();
    closeQuietly(this.fd);
  }
}

/** The regions QEMU would describe for a guest of `sizeBytes`. */
export function layoutRegions(sizeBytes: number, layout: 'q35' | 'flat', userBase: number): RegionPayload[] {
  const region = (gpa: number, size: number, offset: number): RegionPayload => ({
    guestPhysAddr: BigInt(gpa),
    sizeBytes: BigInt(size),
    userAddr: BigInt(userBase + offset),
    mmapOffset: BigInt(offset),
  });
  if (layout === 'flat') return [region(0, sizeBytes, 0)];
  const low = Math.min(sizeBytes, LOW_MEMORY_TOP);
  const regions = [region(0, VGA_HOLE_START, 0), region(VGA_HOLE_END, low - VGA_HOLE_END, VGA_HOLE_END)];
  if (sizeBytes > low) regions.push(region(HIGH_MEMORY_START, sizeBytes - low, low));
  return regions;
}
