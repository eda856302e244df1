/**
 * The driver side of one split virtqueue, as a guest's virtio driver does it: rings in guest
 * RAM, buffers added to the descriptor table and the available ring, a kick on the kick eventfd,
 * and used buffers collected when the call eventfd fires. Also raw writers for hostile tests
 * (arbitrary descriptors, avail indices, heads).
 */
import { closeQuietly, native, PollHandle, POLL_READABLE } from '../native';
import { GuestMemory } from '../virtio/guest-memory';
import { ringSizes, VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE } from '../virtio/virtqueue';
import { GuestRam } from './guest-ram';

export interface Segment {
  addr: number;
  len: number;
  writable?: boolean;
}

export interface UsedEntry {
  id: number;
  len: number;
}

export interface RawDescriptor {
  addr: number | bigint;
  len: number;
  flags: number;
  next: number;
}

export class SplitRingDriver {
  readonly descGpa: number;
  readonly availGpa: number;
  readonly usedGpa: number;
  readonly kickFd: number;
  readonly callFd: number;
  private readonly mem: GuestMemory;
  private freeHeads: number[];
  private availIdx = 0;
  private lastUsed = 0;
  private watch: PollHandle | undefined;
  private waiters: Array<() => void> = [];
  private closedError: Error | undefined;
  private readonly rejecters = new Set<(err: Error) => void>();
  /** Interrupts seen on the call eventfd. */
  interrupts = 0;

  constructor(
    private readonly ram: GuestRam,
    readonly index: number,
    readonly size: number,
    /** VIRTIO_RING_F_EVENT_IDX negotiated: publish used_event as Linux does. */
    readonly eventIdx = false,
  ) {
    this.mem = ram.memory;
    const sizes = ringSizes(size);
    this.descGpa = ram.alloc(sizes.desc, 16);
    this.availGpa = ram.alloc(sizes.avail, 2);
    this.usedGpa = ram.alloc(sizes.used, 4096);
    this.mem.write(this.descGpa, new Uint8Array(sizes.desc));
    this.mem.write(this.availGpa, new Uint8Array(sizes.avail));
    this.mem.write(this.usedGpa, new Uint8Array(sizes.used));
    this.freeHeads = Array.from({ length: size }, (_, i) => i);
    this.kickFd = native.eventfd(0, true);
    this.callFd = native.eventfd(0, true);
  }

  /** Ring addresses as the front-end sends them (front-end virtual addresses). */
  get userAddrs(): { desc: bigint; used: bigint; avail: bigint } {
    return {
      desc: BigInt(this.ram.userAddr(this.descGpa)),
      used: BigInt(this.ram.userAddr(this.usedGpa)),
      avail: BigInt(this.ram.userAddr(this.availGpa)),
    };
  }

  /** Starts counting interrupts (and waking waitUsed) from the call eventfd. */
  watchInterrupts(): void {
    if (this.watch !== undefined) return;
    this.watch = native.pollStart(this.callFd, POLL_READABLE, () => {
      if (native.eventfdRead(this.callFd) !== null) this.interrupts++;
      const waiters = this.waiters;
      this.waiters = [];
      for (const w of waiters) w();
    });
  }

  writeDescriptor(i: number, d: RawDescriptor, tableGpa = this.descGpa): void {
    const at = tableGpa + 16 * i;
    this.mem.writeU64(at, BigInt(d.addr));
    this.mem.writeU32(at + 8, d.len >>> 0);
    this.mem.writeU16(at + 12, d.flags);
    this.mem.writeU16(at + 14, d.next);
  }

  /** Puts `head` in the next avail slot and publishes the new avail index. */
  publish(head: number): void {
    this.mem.writeU16(this.availGpa + 4 + 2 * (this.availIdx % this.size), head);
    this.availIdx = (this.availIdx + 1) & 0xffff;
    native.fence();
    this.mem.writeU16(this.availGpa + 2, this.availIdx);
  }

  /** Writes avail->idx directly (hostile tests). */
  setAvailIdx(idx: number): void {
    this.availIdx = idx & 0xffff;
    this.mem.writeU16(this.availGpa + 2, this.availIdx);
  }

  /** Writes an avail ring slot directly (hostile tests). */
  setAvailEntry(slot: number, head: number): void {
    this.mem.writeU16(this.availGpa + 4 + 2 * slot, head);
  }

  /** avail->flags (VRING_AVAIL_F_NO_INTERRUPT). */
  setAvailFlags(flags: number): void {
    this.mem.writeU16(this.availGpa, flags);
  }

  /** used_event (EVENT_IDX). */
  setUsedEvent(idx: number): void {
    this.mem.writeU16(this.availGpa + 4 + 2 * this.size, idx);
  }

  /** Adds a chain of segments (direct descriptors); returns its head. */
  addBuffer(segments: readonly Segment[]): number {
    if (segments.length === 0 || segments.length > this.freeHeads.length) throw new Error('no room for the chain');
    const ids = this.freeHeads.splice(0, segments.length);
    segments.forEach((s, i) => {
      const last = i === segments.length - 1;
      this.writeDescriptor(ids[i], {
        addr: s.addr,
        len: s.len,
        flags: (s.writable ? VRING_DESC_F_WRITE : 0) | (last ? 0 : VRING_DESC_F_NEXT),
        next: last ? 0 : ids[i + 1],
      });
    });
    this.publish(ids[0]);
    this.chains.set(ids[0], ids);
    return ids[0];
  }

  /** Adds a chain through an indirect table written at `tableGpa`. */
  addIndirect(segments: readonly Segment[], tableGpa: number): number {
    const [head] = this.freeHeads.splice(0, 1);
    if (head === undefined) throw new Error('no room for the chain');
    segments.forEach((s, i) => {
      const last = i === segments.length - 1;
      this.writeDescriptor(
        i,
        {
          addr: s.addr,
          len: s.len,
          flags: (s.writable ? VRING_DESC_F_WRITE : 0) | (last ? 0 : VRING_DESC_F_NEXT),
          next: last ? 0 : i + 1,
        },
        tableGpa,
      );
    });
    this.writeDescriptor(head, { addr: tableGpa, len: 16 * segments.length, flags: VRING_DESC_F_INDIRECT, next: 0 });
    this.publish(head);
    this.chains.set(head, [head]);
    return head;
  }

  private readonly chains = new Map<number, number[]>();

  /** The avail index this driver published last. */
  get availIdxPublished(): number {
    return this.availIdx;
  }

  kick(): void {
    native.eventfdWrite(this.kickFd, 1);
  }

  /** The device's used->idx. */
  get usedIdx(): number {
    return this.mem.readU16(this.usedGpa + 2);
  }

  /** used->flags (VRING_USED_F_NO_NOTIFY). */
  get usedFlags(): number {
    return this.mem.readU16(this.usedGpa);
  }

  /** avail_event written by the device (EVENT_IDX). */
  get availEvent(): number {
    return this.mem.readU16(this.usedGpa + 4 + 8 * this.size);
  }

  /** Used entries since the last call; their descriptors become free again. */
  takeUsed(): UsedEntry[] {
    const out: UsedEntry[] = [];
    const usedIdx = this.usedIdx;
    // Bounded by the ring size: the device cannot have used more than it was given.
    while (this.lastUsed !== usedIdx && out.length < this.size) {
      const at = this.usedGpa + 4 + 8 * (this.lastUsed % this.size);
      const entry = { id: this.mem.readU32(at), len: this.mem.readU32(at + 4) };
      out.push(entry);
      const ids = this.chains.get(entry.id);
      if (ids !== undefined) {
        this.chains.delete(entry.id);
        this.freeHeads.push(...ids);
      }
      this.lastUsed = (this.lastUsed + 1) & 0xffff;
    }
    return out;
  }

  /** Resolves once used->idx has moved `count` entries past what takeUsed() returned. */
  waitUsed(count = 1, timeoutMs = 5000): Promise<UsedEntry[]> {
    this.watchInterrupts();
    return new Promise((resolve, rejectOuter) => {
      if (this.closedError !== undefined) {
        rejectOuter(this.closedError);
        return;
      }
      const reject = (err: Error): void => {
        this.rejecters.delete(reject);
        clearTimeout(timer);
        rejectOuter(err);
      };
      this.rejecters.add(reject);
      const started = Date.now();
      const check = (): void => {
        // Ask for an interrupt once the entry we wait for is used (virtqueue_enable_cb), then
        // re-check, so an entry used in between is not missed.
        if (this.eventIdx) this.setUsedEvent((this.lastUsed + count - 1) & 0xffff);
        native.fence();
        if (((this.usedIdx - this.lastUsed) & 0xffff) >= count) {
          clearTimeout(timer);
          this.rejecters.delete(reject);
          resolve(this.takeUsed());
          return;
        }
        if (Date.now() - started > timeoutMs) return;
        this.waiters.push(check);
      };
      const timer = setTimeout(() => {
        reject(
          new Error(
            `queue ${this.index}: ${count} used entries not seen within ${timeoutMs} ms ` +
              `(used idx ${this.usedIdx}, seen ${this.lastUsed})`,
          ),
        );
      }, timeoutMs);
      timer.unref();
      check();
    });
  }

  close(): void {
    this.closedError ??= new Error(`queue ${this.index}: driver closed`);
    for (const reject of [...this.rejecters]) reject(this.closedError);
    if (this.watch !== undefined) native.pollStop(this.watch);
    this.watch = undefined;
    closeQuietly(this.kickFd);
    closeQuietly(this.callFd);
  }
}
