/**
 * The device side of a split virtqueue (VIRTIO 1.2 section 2.7): walks descriptor chains the
 * driver made available, returns them on the used ring, and decides whether the driver wants an
 * interrupt (VIRTIO_RING_F_EVENT_IDX or VRING_AVAIL_F_NO_INTERRUPT).
 *
 * Every index and address the guest controls is validated, as libvhost-user and rust-vmm's
 * virtio-queue do. A malformed chain never throws out of this API: pop() reports it as
 * 'bad-chain' (the head was consumed; give it back with length 0) or, for an impossible ring
 * state, as 'broken' (stop the queue). Knows nothing of vhost-user.
 *
 * Ordering: avail->idx is read with Atomics.load (acquire) before ring entries; used elements are
 * written before used->idx, which is published with a full fence and Atomics.store (release);
 * a full fence separates publishing from reading used_event / avail->flags, and re-enabling
 * notifications from re-reading avail->idx.
 */
import { ErrorCode, VirtqueueError } from '../errors';
import { native } from '../native';
import { GuestMemory, Span } from './guest-memory';

export const VRING_DESC_F_NEXT = 1;
export const VRING_DESC_F_WRITE = 2;
export const VRING_DESC_F_INDIRECT = 4;
export const VRING_AVAIL_F_NO_INTERRUPT = 1;
export const VRING_USED_F_NO_NOTIFY = 1;

/** The largest queue size the virtio spec allows (and vhost-user accepts). */
export const VIRTQUEUE_MAX_SIZE = 32768;
/** Size of one descriptor in bytes; an indirect table's length must be a multiple of it. */
export const DESCRIPTOR_BYTES = 16;

/** Ring addresses, guest-physical. */
export interface VringAddresses {
  descGpa: number;
  availGpa: number;
  usedGpa: number;
}

export interface QueueOptions {
  /** VIRTIO_RING_F_EVENT_IDX negotiated. */
  eventIdx: boolean;
  /** VIRTIO_RING_F_INDIRECT_DESC negotiated. */
  indirect: boolean;
}

/** One buffer of a chain. `addr` is guest-physical and already checked to be guest memory. */
export interface Descriptor {
  addr: number;
  len: number;
  writable: boolean;
}

export type PopResult =
  | { kind: 'chain'; head: number; descriptors: Descriptor[] }
  | { kind: 'bad-chain'; head: number; error: VirtqueueError }
  | { kind: 'broken'; error: VirtqueueError };

/** vring_need_event() of the virtio spec. All arguments are 16-bit ring indices. */
export function vringNeedEvent(eventIdx: number, newIdx: number, oldIdx: number): boolean {
  return ((newIdx - eventIdx - 1) & 0xffff) < ((newIdx - oldIdx) & 0xffff);
}

/** Byte sizes of the three ring parts for a queue of `size` entries (with event-idx fields). */
export function ringSizes(size: number): { desc: number; avail: number; used: number } {
  return { desc: DESCRIPTOR_BYTES * size, avail: 6 + 2 * size, used: 6 + 8 * size };
}

function badVring(message: string): VirtqueueError {
  return new VirtqueueError(ErrorCode.VHOST_BAD_VRING, message);
}

/** Resolves a ring part that must lie inside one region. */
function resolvePart(memory: GuestMemory, what: string, gpa: number, len: number): Span {
  const loc = memory.locate(gpa, len);
  if (loc === undefined) {
    throw badVring(`${what} ring 0x${gpa.toString(16)} (+${len}) is not inside one guest memory region`);
  }
  return loc;
}

/** A split virtqueue over guest memory. */
export class SplitQueue {
  readonly size: number;
  readonly options: QueueOptions;
  private readonly memory: GuestMemory;
  private readonly mask: number;
  private readonly desc: DataView;
  private readonly descBase: number;
  private readonly avail: DataView;
  private readonly availBase: number;
  private readonly used: DataView;
  private readonly usedBase: number;
  // 16-bit atomics over the index and event fields (acquire/release accesses).
  private readonly availFlags: Uint16Array;
  private readonly availIdx: Uint16Array;
  private readonly usedEvent: Uint16Array;
  private readonly usedFlags: Uint16Array;
  private readonly usedIdxField: Uint16Array;
  private readonly availEvent: Uint16Array;
  private nextAvail: number;
  private nextUsed: number;
  private signalledUsed = 0;
  private signalledUsedValid = false;

  /**
   * @param lastAvailIdx where to resume (SET_VRING_BASE); the used index is read from the ring.
   * @throws VirtqueueError(ERR_VHOST_BAD_VRING) if the size or any ring address is invalid.
   */
  constructor(memory: GuestMemory, size: number, addrs: VringAddresses, options: QueueOptions, lastAvailIdx = 0) {
    if (!Number.isInteger(size) || size <= 0 || size > VIRTQUEUE_MAX_SIZE || (size & (size - 1)) !== 0) {
      throw badVring(`queue size ${size} is not a power of two in 1..${VIRTQUEUE_MAX_SIZE}`);
    }
    if (addrs.descGpa % 16 !== 0)
      throw badVring(`descriptor table 0x${addrs.descGpa.toString(16)} is not 16-byte aligned`);
    if (addrs.availGpa % 2 !== 0)
      throw badVring(`available ring 0x${addrs.availGpa.toString(16)} is not 2-byte aligned`);
    if (addrs.usedGpa % 4 !== 0) throw badVring(`used ring 0x${addrs.usedGpa.toString(16)} is not 4-byte aligned`);
    const sizes = ringSizes(size);
    const d = resolvePart(memory, 'descriptor', addrs.descGpa, sizes.desc);
    const a = resolvePart(memory, 'available', addrs.availGpa, sizes.avail);
    const u = resolvePart(memory, 'used', addrs.usedGpa, sizes.used);
    this.memory = memory;
    this.size = size;
    this.mask = size - 1;
    this.options = { ...options };
    this.desc = d.view;
    this.descBase = d.offset;
    this.avail = a.view;
    this.availBase = a.offset;
    this.used = u.view;
    this.usedBase = u.offset;
    this.availFlags = new Uint16Array(a.buffer, a.offset, 1);
    this.availIdx = new Uint16Array(a.buffer, a.offset + 2, 1);
    this.usedEvent = new Uint16Array(a.buffer, a.offset + 4 + 2 * size, 1);
    this.usedFlags = new Uint16Array(u.buffer, u.offset, 1);
    this.usedIdxField = new Uint16Array(u.buffer, u.offset + 2, 1);
    this.availEvent = new Uint16Array(u.buffer, u.offset + 4 + 8 * size, 1);
    this.nextAvail = lastAvailIdx & 0xffff;
    this.nextUsed = Atomics.load(this.usedIdxField, 0);
  }

  /** The next available index to process (what GET_VRING_BASE returns). */
  get lastAvailIdx(): number {
    return this.nextAvail;
  }

  /** The used index the device will write next. */
  get usedIdx(): number {
    return this.nextUsed;
  }

  /** Chains made available and not yet popped, or -1 if the driver's index is impossible. */
  pending(): number {
    const availIdx = Atomics.load(this.availIdx, 0);
    const n = (availIdx - this.nextAvail) & 0xffff;
    return n > this.size ? -1 : n;
  }

  /** The next chain, or null when none is available. Never throws for anything the guest wrote. */
  pop(): PopResult | null {
    const availIdx = Atomics.load(this.availIdx, 0);
    if (availIdx === this.nextAvail) return null;
    const count = (availIdx - this.nextAvail) & 0xffff;
    if (count > this.size) {
      return {
        kind: 'broken',
        error: new VirtqueueError(
          ErrorCode.VIRTQ_BROKEN_RING,
          `avail index moved from ${this.nextAvail} to ${availIdx}: more than the queue size ${this.size}`,
        ),
      };
    }
    const slot = this.nextAvail & this.mask;
    const head = this.avail.getUint16(this.availBase + 4 + 2 * slot, true);
    if (head >= this.size) {
      return {
        kind: 'broken',
        error: new VirtqueueError(
          ErrorCode.VIRTQ_BROKEN_RING,
          `avail ring entry ${slot} holds head ${head} >= queue size ${this.size}`,
        ),
      };
    }
    this.nextAvail = (this.nextAvail + 1) & 0xffff;
    const descriptors: Descriptor[] = [];
    const problem = this.walk(head, descriptors);
    if (problem !== undefined) {
      return {
        kind: 'bad-chain',
        head,
        error: new VirtqueueError(ErrorCode.VIRTQ_BAD_CHAIN, `chain at head ${head}: ${problem}`),
      };
    }
    return { kind: 'chain', head, descriptors };
  }

  /** Walks the chain starting at `head`; returns the problem, or undefined if it is well formed. */
  private walk(head: number, out: Descriptor[]): string | undefined {
    let table = this.desc;
    let tableBase = this.descBase;
    let tableSize = this.size;
    let index = head;
    // A chain can hold at most `size` descriptors (spec 2.7.5.3.1), an indirect table at most its
    // own entry count: this bounds the walk, so a descriptor loop ends here.
    let ttl = this.size;
    let indirect = false;
    let seenWritable = false;
    for (;;) {
      if (ttl === 0)
        return indirect
          ? 'indirect chain loops or is longer than its table'
          : `chain loops or is longer than the queue size ${this.size}`;
      ttl--;
      const at = tableBase + DESCRIPTOR_BYTES * index;
      const lo = table.getUint32(at, true);
      const hi = table.getUint32(at + 4, true);
      const len = table.getUint32(at + 8, true);
      const flags = table.getUint16(at + 12, true);
      const next = table.getUint16(at + 14, true);
      // Addresses above 2^53 cannot be guest memory: hi >= 2^21 means addr >= 2^53.
      const addr = hi >= 0x200000 ? Number.MAX_SAFE_INTEGER : hi * 0x100000000 + lo;
      if (flags & VRING_DESC_F_INDIRECT) {
        if (indirect) return 'nested indirect descriptor';
        if (!this.options.indirect) return 'indirect descriptor without VIRTIO_RING_F_INDIRECT_DESC';
        if (flags & VRING_DESC_F_NEXT) return 'indirect descriptor with NEXT set';
        if (len === 0 || len % DESCRIPTOR_BYTES !== 0)
          return `indirect table length ${len} is not a non-zero multiple of 16`;
        const entries = len / DESCRIPTOR_BYTES;
        if (entries > this.size) return `indirect table of ${entries} entries exceeds the queue size ${this.size}`;
        if (!this.memory.checkRange(addr, len))
          return `indirect table 0x${addr.toString(16)} (+${len}) is outside guest memory`;
        // Copy the table: it may span regions, and the guest cannot change it under us.
        const copy = this.memory.read(addr, len);
        table = new DataView(copy.buffer, copy.byteOffset, copy.byteLength);
        tableBase = 0;
        tableSize = entries;
        index = 0;
        ttl = entries;
        indirect = true;
        continue;
      }
      if (!this.memory.checkRange(addr, len)) return `buffer 0x${addr.toString(16)} (+${len}) is outside guest memory`;
      const writable = (flags & VRING_DESC_F_WRITE) !== 0;
      if (!writable && seenWritable) return 'device-readable descriptor after a device-writable one';
      seenWritable ||= writable;
      out.push({ addr, len, writable });
      if ((flags & VRING_DESC_F_NEXT) === 0) return undefined;
      if (next >= tableSize) return `next index ${next} out of range (${tableSize})`;
      index = next;
    }
  }

  /** Puts `head` on the used ring with `len` bytes written; published by flush(). */
  pushUsed(head: number, len: number): void {
    const at = this.usedBase + 4 + 8 * (this.nextUsed & this.mask);
    this.used.setUint32(at, head, true);
    this.used.setUint32(at + 4, len >>> 0, true);
    this.nextUsed = (this.nextUsed + 1) & 0xffff;
  }

  /**
   * Publishes every pushUsed() so far and tells whether the driver wants an interrupt now.
   * Returns false when nothing new was published.
   */
  flush(): boolean {
    const published = Atomics.load(this.usedIdxField, 0);
    if (published === this.nextUsed) return false;
    native.fence(); // used elements before used->idx
    Atomics.store(this.usedIdxField, 0, this.nextUsed);
    native.fence(); // used->idx before reading used_event / avail->flags
    return this.needsNotification();
  }

  private needsNotification(): boolean {
    const newUsed = this.nextUsed;
    if (this.options.eventIdx) {
      const old = this.signalledUsed;
      const valid = this.signalledUsedValid;
      this.signalledUsed = newUsed;
      this.signalledUsedValid = true;
      if (!valid) return true;
      return vringNeedEvent(Atomics.load(this.usedEvent, 0), newUsed, old);
    }
    return (Atomics.load(this.availFlags, 0) & VRING_AVAIL_F_NO_INTERRUPT) === 0;
  }

  /** Asks the driver not to kick (advisory). */
  disableNotifications(): void {
    if (!this.options.eventIdx)
      Atomics.store(this.usedFlags, 0, Atomics.load(this.usedFlags, 0) | VRING_USED_F_NO_NOTIFY);
  }

  /**
   * Asks the driver to kick on new buffers. Returns true if buffers arrived meanwhile (process
   * them before sleeping, or a kick is lost).
   */
  enableNotifications(): boolean {
    if (this.options.eventIdx) Atomics.store(this.availEvent, 0, this.nextAvail);
    else Atomics.store(this.usedFlags, 0, Atomics.load(this.usedFlags, 0) & ~VRING_USED_F_NO_NOTIFY);
    native.fence();
    return Atomics.load(this.availIdx, 0) !== this.nextAvail;
  }

  /** Reads the device-readable bytes of a chain (copied), up to `maxBytes`. */
  readChain(descriptors: readonly Descriptor[], maxBytes: number): Uint8Array {
    let total = 0;
    for (const d of descriptors) if (!d.writable) total += d.len;
    const out = new Uint8Array(Math.min(total, maxBytes));
    this.readChainInto(descriptors, out);
    return out;
  }

  /**
   * Copies the device-readable bytes of a chain into `out`, up to its length, and returns how
   * many were copied: the hot paths (a pressure message per chain) read into storage they reuse.
   */
  readChainInto(descriptors: readonly Descriptor[], out: Uint8Array): number {
    let done = 0;
    for (const d of descriptors) {
      if (d.writable || done >= out.length) continue;
      const n = Math.min(d.len, out.length - done);
      this.memory.copyInto(d.addr, n, out, done);
      done += n;
    }
    return done;
  }

  /** Writes `data` into the device-writable buffers of a chain; returns the bytes written. */
  writeChain(descriptors: readonly Descriptor[], data: Uint8Array): number {
    let done = 0;
    for (const d of descriptors) {
      if (!d.writable || done >= data.length) continue;
      const n = Math.min(d.len, data.length - done);
      this.memory.write(d.addr, data.subarray(done, done + n));
      done += n;
    }
    return done;
  }
}
