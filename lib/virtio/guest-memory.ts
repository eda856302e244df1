/**
 * Guest memory: the regions a front-end shares with us, mapped with mmap, and bounds-checked
 * little-endian access to them by guest-physical address (descriptor addresses) and translation
 * of front-end virtual addresses (vring addresses in SET_VRING_ADDR) to guest-physical ones.
 *
 * vhost-user spec, "Memory regions description" and "Memory access". Knows nothing of vhost-user
 * messages. Addresses are JS numbers once validated: every region must lie below 2^53, which
 * covers every x86-64 and arm64 physical and user address. Regions are mapped in windows of
 * 1 GiB (see WINDOW_BYTES), so guests larger than 4 GiB work; a window is mapped the first time
 * it is touched, so mapping costs the same whatever the guest's size (a 1 TiB region used to
 * stall the event loop for seconds).
 *
 * The file behind a region belongs to the front-end, which can shrink it at any time; touching a
 * page past its end raises SIGBUS. Memfds must be sealed against shrinking (F_SEAL_SHRINK, what
 * QEMU does by default); other files cannot be sealed, and a shrink under them is survived by the
 * addon (the pages read as zeros, `faulted` becomes true): docs/vhost-user.md.
 */
import { GuestMemoryError } from '../errors';
import { closeQuietly, F_SEAL_SHRINK, native } from '../native';

/** Highest address + 1 any region may reach (Number.MAX_SAFE_INTEGER + 1). */
export const MAX_ADDRESS = 2 ** 53;

/** A region as described by the front-end. */
export interface RegionDescription {
  guestPhysAddr: bigint;
  sizeBytes: bigint;
  /** Front-end (QEMU process) virtual address of the region start. */
  userAddr: bigint;
  /** Offset of the region start inside the file behind `fd`. */
  mmapOffset: bigint;
}

/**
 * Each region is mapped as windows of WINDOW_BYTES, each extended by WINDOW_OVERLAP_BYTES into
 * the next one: Node-API buffers cannot exceed 4 GiB, and the overlap guarantees that any range
 * up to WINDOW_OVERLAP_BYTES (a ring, an indirect table, a descriptor's buffer in practice) lies
 * inside one window, so it can be read through one DataView.
 */
export const WINDOW_BYTES = 2 ** 30;
export const WINDOW_OVERLAP_BYTES = 2 * 1024 * 1024;

/** A place in a mapping: `offset` is a byte offset into `buffer` (and `view`). */
export interface Span {
  buffer: ArrayBuffer;
  view: DataView;
  offset: number;
}

interface Window {
  buffer: ArrayBuffer;
  view: DataView;
  /** Offset in `buffer` of region offset k * WINDOW_BYTES. */
  base: number;
  /** Region bytes this window maps, starting at k * WINDOW_BYTES. */
  length: number;
}

/** One mapped region. Owns its mappings and its fd. */
export class MemoryRegion {
  readonly guestPhysAddr: number;
  readonly sizeBytes: number;
  readonly userAddr: number;
  readonly mmapOffset: number;
  /** The file behind the region (a memfd for QEMU guests); kept for hole punching. */
  readonly fd: number;
  /** The file's page size: 4096, or the huge page size on hugetlbfs. */
  readonly pageSizeBytes: number;
  /** Identity of the file ("dev:ino"): regions of one memfd share it. */
  readonly fileId: string;
  /** Mapped windows by index (k * WINDOW_BYTES); sparse: a window is mapped on first use. */
  private readonly windows = new Map<number, Window>();
  private unmapped = false;

  private constructor(desc: ValidRegion, fd: number, pageSizeBytes: number, fileId: string) {
    this.guestPhysAddr = desc.guestPhysAddr;
    this.sizeBytes = desc.sizeBytes;
    this.userAddr = desc.userAddr;
    this.mmapOffset = desc.mmapOffset;
    this.fd = fd;
    this.pageSizeBytes = pageSizeBytes;
    this.fileId = fileId;
  }

  private get where(): string {
    return `region gpa=0x${this.guestPhysAddr.toString(16)} size=0x${this.sizeBytes.toString(16)}`;
  }

  /** Window `k`, mapped now if it was not yet; throws GuestMemoryError if mmap fails. */
  private window(k: number): Window | undefined {
    const known = this.windows.get(k);
    if (known !== undefined) return known;
    const start = k * WINDOW_BYTES;
    if (this.unmapped || k < 0 || start >= this.sizeBytes) return undefined;
    const length = Math.min(this.sizeBytes - start, WINDOW_BYTES + WINDOW_OVERLAP_BYTES);
    const fileOffset = this.mmapOffset + start;
    // Map from the offset rounded down to the file's block (huge page) size.
    const mapOffset = fileOffset - (fileOffset % this.pageSizeBytes);
    const base = fileOffset - mapOffset;
    let buffer: ArrayBuffer;
    try {
      buffer = native.mmap(this.fd, base + length, mapOffset, true);
    } catch (err) {
      throw new GuestMemoryError(`${this.where}: window ${k}: ${(err as Error).message}`);
    }
    const w = { buffer, view: new DataView(buffer), base, length };
    this.windows.set(k, w);
    return w;
  }

  /** Maps `fd` for `desc`. Takes ownership of `fd` only on success. */
  static map(desc: ValidRegion, fd: number): MemoryRegion {
    const where = `region gpa=0x${desc.guestPhysAddr.toString(16)} size=0x${desc.sizeBytes.toString(16)}`;
    let blockSize = 4096;
    let fileSize: number;
    let fileId: string;
    try {
      const st = native.fstat(fd);
      fileSize = st.size;
      fileId = `${st.dev}:${st.ino}`;
      if (st.fsBlockSize > 4096 && (st.fsBlockSize & (st.fsBlockSize - 1)) === 0) blockSize = st.fsBlockSize;
    } catch (err) {
      throw new GuestMemoryError(`${where}: fd ${fd} unusable: ${(err as Error).message}`);
    }
    // Touching a mapping beyond the end of its file raises SIGBUS: refuse such regions.
    if (fileSize < desc.mmapOffset + desc.sizeBytes) {
      throw new GuestMemoryError(
        `${where}: extends past the end of its file (${fileSize} bytes at offset 0x${desc.mmapOffset.toString(16)})`,
      );
    }
    // ... and one the front-end could shrink later: a memfd must be sealed against it. Other
    // files (hugetlbfs, tmpfs files of memory-backend-file) have no seals: the addon survives a
    // shrink under them (SIGBUS handler) and `faulted` tells.
    let seals: number | null;
    try {
      seals = native.fileSeals(fd);
    } catch (err) {
      throw new GuestMemoryError(`${where}: fd ${fd} unusable: ${(err as Error).message}`);
    }
    if (seals !== null && (seals & F_SEAL_SHRINK) === 0) {
      throw new GuestMemoryError(`${where}: the memfd is not sealed against shrinking (F_SEAL_SHRINK)`);
    }
    const region = new MemoryRegion(desc, fd, blockSize, fileId);
    // Map the first window now, so that an fd that cannot be mapped is refused here.
    try {
      region.window(0);
    } catch (err) {
      region.unmapWindows();
      throw err;
    }
    return region;
  }

  /** True if [gpa, gpa+len) lies inside this region. */
  containsGuest(gpa: number, len: number): boolean {
    return gpa >= this.guestPhysAddr && gpa + len <= this.guestPhysAddr + this.sizeBytes;
  }

  /**
   * The span of region offset `at` if [at, at+len) lies in one window, else undefined. Maps the
   * window on first use (throws GuestMemoryError if that fails).
   */
  span(at: number, len: number): Span | undefined {
    const k = Math.floor(at / WINDOW_BYTES);
    const inWindow = at - k * WINDOW_BYTES;
    const w = this.window(k);
    if (w === undefined || inWindow + len > w.length) return undefined;
    return { buffer: w.buffer, view: w.view, offset: w.base + inWindow };
  }

  /** The longest piece starting at region offset `at`, up to `len`, inside one window. */
  piece(at: number, len: number): Uint8Array {
    const k = Math.floor(at / WINDOW_BYTES);
    const w = this.window(k);
    if (w === undefined) throw new GuestMemoryError(`${this.where}: offset 0x${at.toString(16)} is outside the region`);
    const inWindow = at - k * WINDOW_BYTES;
    return new Uint8Array(w.buffer, w.base + inWindow, Math.min(len, w.length - inWindow));
  }

  /** Windows mapped so far (they are mapped on first use). */
  get mappedWindows(): number {
    return this.windows.size;
  }

  /**
   * True if the front-end shrank the file under a mapped window and we touched the lost part:
   * those pages now read as zeros (the addon survived the SIGBUS). The front-end is broken.
   */
  get faulted(): boolean {
    for (const w of this.windows.values()) if (native.mappingFaulted(w.buffer)) return true;
    return false;
  }

  private unmapWindows(): void {
    const windows = [...this.windows.values()];
    this.windows.clear();
    for (const w of windows) native.munmap(w.buffer);
  }

  /** Unmaps and closes the fd. Idempotent. */
  unmap(): void {
    if (this.unmapped) return;
    this.unmapped = true;
    try {
      this.unmapWindows();
    } finally {
      closeQuietly(this.fd);
    }
  }

  get isMapped(): boolean {
    return !this.unmapped;
  }
}

/** A region description whose numbers were checked and converted. */
export interface ValidRegion {
  guestPhysAddr: number;
  sizeBytes: number;
  userAddr: number;
  mmapOffset: number;
}

/** Checks one region description; throws GuestMemoryError with the reason. */
export function validateRegion(r: RegionDescription): ValidRegion {
  const where = `region gpa=0x${r.guestPhysAddr.toString(16)} size=0x${r.sizeBytes.toString(16)}`;
  if (r.sizeBytes === 0n) throw new GuestMemoryError(`${where}: size is zero`);
  if (r.guestPhysAddr % 4096n !== 0n || r.mmapOffset % 4096n !== 0n || r.userAddr % 4096n !== 0n) {
    throw new GuestMemoryError(`${where}: addresses and mmap offset must be 4 KiB aligned`);
  }
  // Memory is shared in whole pages: a partial last page would be mapped (and readable) past
  // the region's end, and no front-end describes one.
  if (r.sizeBytes % 4096n !== 0n) throw new GuestMemoryError(`${where}: size must be a multiple of 4 KiB`);
  const limit = BigInt(MAX_ADDRESS);
  if (r.guestPhysAddr + r.sizeBytes > limit) throw new GuestMemoryError(`${where}: guest range wraps or exceeds 2^53`);
  if (r.userAddr + r.sizeBytes > limit) throw new GuestMemoryError(`${where}: user range wraps or exceeds 2^53`);
  if (r.mmapOffset + r.sizeBytes > limit) throw new GuestMemoryError(`${where}: file range wraps or exceeds 2^53`);
  return {
    guestPhysAddr: Number(r.guestPhysAddr),
    sizeBytes: Number(r.sizeBytes),
    userAddr: Number(r.userAddr),
    mmapOffset: Number(r.mmapOffset),
  };
}

function overlaps(aStart: number, aLen: number, bStart: number, bLen: number): boolean {
  return aStart < bStart + bLen && bStart < aStart + aLen;
}

/**
 * Checks that `desc` overlaps none of `existing` in guest-physical or front-end address space,
 * and that there is room for one more region.
 */
export function checkDisjoint(existing: readonly ValidRegion[], desc: ValidRegion, maxRegions: number): void {
  if (existing.length >= maxRegions) {
    throw new GuestMemoryError(`too many memory regions (limit ${maxRegions})`);
  }
  for (const r of existing) {
    if (overlaps(desc.guestPhysAddr, desc.sizeBytes, r.guestPhysAddr, r.sizeBytes)) {
      throw new GuestMemoryError(
        `region gpa=0x${desc.guestPhysAddr.toString(16)} overlaps region gpa=0x${r.guestPhysAddr.toString(16)}`,
      );
    }
    if (overlaps(desc.userAddr, desc.sizeBytes, r.userAddr, r.sizeBytes)) {
      throw new GuestMemoryError(
        `region uaddr=0x${desc.userAddr.toString(16)} overlaps region uaddr=0x${r.userAddr.toString(16)}`,
      );
    }
  }
}

/**
 * The guest's memory as a set of non-overlapping regions, sorted by guest-physical address.
 * All accessors are bounds-checked and little-endian; they throw GuestMemoryError outside memory.
 */
export class GuestMemory {
  private regions: MemoryRegion[] = [];
  private last: MemoryRegion | undefined;

  /** Regions sorted by guest-physical address. */
  get regionList(): readonly MemoryRegion[] {
    return this.regions;
  }

  get totalBytes(): number {
    return this.regions.reduce((sum, r) => sum + r.sizeBytes, 0);
  }

  /** Checks that `desc` can join the current regions (no overlap in either address space). */
  checkAddable(desc: ValidRegion, maxRegions: number): void {
    checkDisjoint(this.regions, desc, maxRegions);
  }

  /** Adds a mapped region (already validated with checkAddable). */
  add(region: MemoryRegion): void {
    this.regions.push(region);
    this.regions.sort((a, b) => a.guestPhysAddr - b.guestPhysAddr);
    this.last = undefined;
  }

  /** Removes and returns the region matching guest address, user address and size. */
  remove(desc: ValidRegion): MemoryRegion | undefined {
    const i = this.regions.findIndex(
      (r) => r.guestPhysAddr === desc.guestPhysAddr && r.userAddr === desc.userAddr && r.sizeBytes === desc.sizeBytes,
    );
    if (i < 0) return undefined;
    const [region] = this.regions.splice(i, 1);
    this.last = undefined;
    return region;
  }

  /** True if any region's file shrank under us (see MemoryRegion.faulted). */
  get faulted(): boolean {
    return this.regions.some((r) => r.faulted);
  }

  /** Unmaps every region and closes their fds. */
  clear(): void {
    const regions = this.regions;
    this.regions = [];
    this.last = undefined;
    for (const r of regions) r.unmap();
  }

  /** The region holding guest-physical address `gpa`, if any. */
  find(gpa: number): MemoryRegion | undefined {
    const last = this.last;
    if (last !== undefined && gpa >= last.guestPhysAddr && gpa < last.guestPhysAddr + last.sizeBytes) return last;
    // Binary search over regions sorted by address; bounded by log2(region count).
    let lo = 0;
    let hi = this.regions.length - 1;
    while (lo <= hi) {
      const mid = (lo + hi) >>> 1;
      const r = this.regions[mid];
      if (gpa < r.guestPhysAddr) hi = mid - 1;
      else if (gpa >= r.guestPhysAddr + r.sizeBytes) lo = mid + 1;
      else {
        this.last = r;
        return r;
      }
    }
    return undefined;
  }

  /**
   * Where [gpa, gpa+len) is mapped, if it lies in one mapping window (always the case for
   * ranges up to WINDOW_OVERLAP_BYTES inside one region), else undefined.
   */
  locate(gpa: number, len: number): Span | undefined {
    if (!Number.isSafeInteger(gpa) || !Number.isSafeInteger(len) || gpa < 0 || len < 0) return undefined;
    const r = this.find(gpa);
    if (r === undefined || gpa + len > r.guestPhysAddr + r.sizeBytes) return undefined;
    return r.span(gpa - r.guestPhysAddr, len);
  }

  /** True if every byte of [gpa, gpa+len) is guest memory (possibly across adjacent regions). */
  checkRange(gpa: number, len: number): boolean {
    if (!Number.isSafeInteger(gpa) || !Number.isSafeInteger(len) || gpa < 0 || len < 0) return false;
    if (gpa + len > MAX_ADDRESS) return false;
    if (len === 0) return this.find(gpa) !== undefined;
    let at = gpa;
    const end = gpa + len;
    // Each step consumes a whole region, so this runs at most once per region.
    for (;;) {
      const r = this.find(at);
      if (r === undefined) return false;
      const regionEnd = r.guestPhysAddr + r.sizeBytes;
      if (end <= regionEnd) return true;
      at = regionEnd;
    }
  }

  /** Translates a front-end virtual address range (must lie in one region) to guest-physical. */
  userToGuest(userAddr: number, len: number): number | undefined {
    for (const r of this.regions) {
      if (userAddr >= r.userAddr && userAddr + len <= r.userAddr + r.sizeBytes) {
        return r.guestPhysAddr + (userAddr - r.userAddr);
      }
    }
    return undefined;
  }

  private at(gpa: number, len: number): Span {
    const loc = this.locate(gpa, len);
    if (loc === undefined) {
      throw new GuestMemoryError(`guest address 0x${gpa.toString(16)} (+${len}) is outside guest memory`);
    }
    return loc;
  }

  readU8(gpa: number): number {
    const { view, offset } = this.at(gpa, 1);
    return view.getUint8(offset);
  }

  readU16(gpa: number): number {
    const { view, offset } = this.at(gpa, 2);
    return view.getUint16(offset, true);
  }

  readU32(gpa: number): number {
    const { view, offset } = this.at(gpa, 4);
    return view.getUint32(offset, true);
  }

  readU64(gpa: number): bigint {
    const { view, offset } = this.at(gpa, 8);
    return view.getBigUint64(offset, true);
  }

  writeU8(gpa: number, value: number): void {
    const { view, offset } = this.at(gpa, 1);
    view.setUint8(offset, value);
  }

  writeU16(gpa: number, value: number): void {
    const { view, offset } = this.at(gpa, 2);
    view.setUint16(offset, value, true);
  }

  writeU32(gpa: number, value: number): void {
    const { view, offset } = this.at(gpa, 4);
    view.setUint32(offset, value, true);
  }

  writeU64(gpa: number, value: bigint): void {
    const { view, offset } = this.at(gpa, 8);
    view.setBigUint64(offset, value, true);
  }

  /** Calls `fn` for each piece of [gpa, gpa+len) that lies in one region; throws outside memory. */
  private forEachPiece(gpa: number, len: number, fn: (bytes: Uint8Array, done: number) => void): void {
    if (!this.checkRange(gpa, len)) {
      throw new GuestMemoryError(`guest range 0x${gpa.toString(16)} (+${len}) is outside guest memory`);
    }
    let done = 0;
    // Bounded by the number of regions and mapping windows the range crosses.
    while (done < len) {
      const at = gpa + done;
      const r = this.find(at)!;
      const bytes = r.piece(at - r.guestPhysAddr, Math.min(len - done, r.guestPhysAddr + r.sizeBytes - at));
      fn(bytes, done);
      done += bytes.length;
    }
  }

  /** Copies [gpa, gpa+len) out of guest memory. */
  read(gpa: number, len: number): Uint8Array {
    const out = new Uint8Array(len);
    this.copyInto(gpa, len, out, 0);
    return out;
  }

  /**
   * Copies [gpa, gpa+len) into `out` at `outOffset` (which must have room): the hot paths read
   * guest buffers into storage they reuse instead of a new array each time.
   */
  copyInto(gpa: number, len: number, out: Uint8Array, outOffset: number): void {
    const loc = this.locate(gpa, len);
    if (loc !== undefined) out.set(new Uint8Array(loc.buffer, loc.offset, len), outOffset);
    else this.forEachPiece(gpa, len, (bytes, done) => out.set(bytes, outOffset + done));
  }

  /** Copies `data` into guest memory at `gpa`. */
  write(gpa: number, data: Uint8Array): void {
    this.forEachPiece(gpa, data.length, (bytes, done) => bytes.set(data.subarray(done, done + bytes.length)));
  }

  /** A live view of [gpa, gpa+len) when it lies in one region (no copy), else undefined. */
  view(gpa: number, len: number): Uint8Array | undefined {
    const loc = this.locate(gpa, len);
    return loc === undefined ? undefined : new Uint8Array(loc.buffer, loc.offset, len);
  }
}
