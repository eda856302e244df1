/**
 * The rings of one front-end connection: per-ring protocol state (size, base, addresses, kick,
 * call and err descriptors, started and enabled), the translated SplitQueue over guest memory,
 * and the processing passes.
 *
 * How a kick flows: the kick eventfd becomes readable -> watchKick reads it -> runPass calls the
 * device's queueKicked inside this module's error handling -> the device pops chains
 * (lib/vhost/process.ts), pushes used entries and calls flushAndNotify, which writes the call
 * eventfd. If the device's pass stopped at its bound, runPass schedules the next one here; a
 * device never schedules passes itself, so a throw in any pass stops only that ring.
 *
 * A ring is "ready" (the device may touch it) when it is started (has a kick), enabled, not
 * broken and its addresses translate into mapped memory; every transition is reported to the
 * device (queueReady / queueStopped), and a pass runs on becoming ready so no kick is lost.
 */
import { ErrorCode, errorMessage, VhostProtocolError, VirtqueueError } from '../errors';
import { Logger } from '../log';
import { closeQuietly, native, PollHandle, POLL_EVENTFD, POLL_READABLE, POLL_STATUS_HANGUP } from '../native';
import { GuestMemory } from '../virtio/guest-memory';
import { ringSizes, SplitQueue, VIRTQUEUE_MAX_SIZE } from '../virtio/virtqueue';
import { VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC } from './constants';
import { VhostUserDevice, Vring } from './device';

/**
 * Rings a front-end may set up, even past what the device uses: QEMU's generic device takes
 * `num_vqs` from its command line and sets up that many, so a generic command line with more
 * queues than the balloon needs must work. The extra rings are kept (their descriptors owned and
 * closed like the others) but never given to the device. Bounded so a front-end cannot make us
 * keep state for thousands of rings.
 */
export const MAX_FRONTEND_RINGS = 64;

/** With a "no fd" kick (bit 8 of SET_VRING_KICK) the ring is polled at this interval. */
const NOFD_KICK_POLL_INTERVAL_MS = 5;

class RingState {
  num = 0;
  base = 0;
  addr: { desc: number; used: number; avail: number } | undefined;
  kickFd = -1;
  kickNoFd = false;
  kickWatch: PollHandle | undefined;
  kickTimer: NodeJS.Timeout | undefined;
  callFd = -1;
  /** SET_VRING_CALL was received (with an fd or "no fd"). */
  callSet = false;
  errFd = -1;
  started = false;
  enabled = false;
  broken = false;
  queue: SplitQueue | undefined;
  /** The device was told queueReady and not yet queueStopped. */
  ready = false;
  handle: Vring | undefined;
  /** A follow-up pass is scheduled (the last one stopped at its bound). */
  passScheduled = false;

  constructor(readonly index: number) {}
}

export interface RingSetOptions {
  device: VhostUserDevice;
  memory: GuestMemory;
  log: Logger;
  /** The virtio features the driver accepted (EVENT_IDX, INDIRECT_DESC shape the rings). */
  ackedFeatures(): bigint;
  /** A ring stopped on an error (counted by the session's owner). */
  onError(code: VirtqueueError['code'], detail: string): void;
  /** A ring was started (the device runs now; pending config changes may go out). */
  onStarted(): void;
  /** Guest memory shrank under a mapping (a SIGBUS the addon survived): the front-end must go. */
  onMemoryFault(): void;
}

/**
 * What a ring is, for a restarted daemon to take it over (lib/daemon/survival.ts): the protocol
 * state and the descriptors (numbers in this process; -1 for none).
 */
export interface RingImage {
  index: number;
  num: number;
  /** Where the ring stopped (GET_VRING_BASE) or was told to start; a started ring resumes at its used index. */
  base: number;
  addr: { desc: number; used: number; avail: number } | null;
  kickFd: number;
  kickNoFd: boolean;
  callFd: number;
  callSet: boolean;
  errFd: number;
  started: boolean;
  enabled: boolean;
}

function protocolError(message: string): VhostProtocolError {
  return new VhostProtocolError(ErrorCode.VHOST_BAD_VRING, message);
}

/** Every ring of one connection. */
export class RingSet {
  private readonly rings: RingState[];
  private closed = false;
  /** The addon's process-wide fault count when this connection last looked. */
  private faultsSeen = native.mappingFaults();

  constructor(private readonly options: RingSetOptions) {
    const count = Math.max(options.device.numQueues, MAX_FRONTEND_RINGS);
    this.rings = Array.from({ length: count }, (_, i) => new RingState(i));
  }

  /** Rings the front-end gave a call fd (or "no fd") to: QEMU does it for each of its num_vqs at realize. */
  get setUp(): number {
    return this.rings.filter((r) => r.callSet).length;
  }

  get count(): number {
    return this.rings.length;
  }

  /** The device runs when any ring is started (a suspended device must not message QEMU). */
  get running(): boolean {
    return this.rings.some((r) => r.started);
  }

  private ring(index: number, name: string): RingState {
    const ring = this.rings[index];
    if (ring === undefined)
      throw protocolError(`${name}: queue index ${index} out of range (${this.rings.length} queues)`);
    return ring;
  }

  // ---- protocol requests --------------------------------------------------------------------

  /** SET_VRING_NUM. */
  setNum(index: number, num: number): void {
    const ring = this.ring(index, 'SET_VRING_NUM');
    if (ring.started) throw protocolError(`SET_VRING_NUM: queue ${index} is started`);
    const max = Math.min(VIRTQUEUE_MAX_SIZE, this.options.device.maxQueueSize);
    if (num === 0 || num > max || (num & (num - 1)) !== 0)
      throw protocolError(`SET_VRING_NUM: queue ${index} size ${num} is not a power of two in 1..${max}`);
    ring.num = num;
  }

  /** SET_VRING_BASE. */
  setBase(index: number, base: number): void {
    const ring = this.ring(index, 'SET_VRING_BASE');
    if (ring.started) throw protocolError(`SET_VRING_BASE: queue ${index} is started`);
    if (base > 0xffff) throw protocolError(`SET_VRING_BASE: base ${base} has reserved bits set`);
    ring.base = base;
  }

  /** SET_VRING_ADDR (addresses in the front-end's address space, checked against memory now if mapped). */
  setAddr(index: number, addr: { desc: bigint; used: bigint; avail: bigint }): void {
    const ring = this.ring(index, 'SET_VRING_ADDR');
    const limit = BigInt(Number.MAX_SAFE_INTEGER);
    if (addr.desc > limit || addr.used > limit || addr.avail > limit)
      throw protocolError(`SET_VRING_ADDR: queue ${index} address beyond 2^53`);
    this.detachQueue(ring);
    ring.addr = { desc: Number(addr.desc), used: Number(addr.used), avail: Number(addr.avail) };
    // Addresses must be inside memory now; a later memory table re-checks them.
    if (this.options.memory.regionList.length > 0) this.buildQueue(ring, true);
    this.updateReady(ring);
  }

  /** GET_VRING_BASE: stops the ring (the kick fd is closed) and returns where to resume. */
  stop(index: number): number {
    const ring = this.ring(index, 'GET_VRING_BASE');
    this.stopRing(ring);
    return ring.base;
  }

  /** The ring at `index`; `fd` (handed over with the request) is closed if there is none. */
  private ringTaking(index: number, name: string, fd: number | undefined): RingState {
    try {
      return this.ring(index, name);
    } catch (err) {
      if (fd !== undefined) closeQuietly(fd);
      throw err;
    }
  }

  /**
   * SET_VRING_KICK: `fd` undefined for "no fd" (polled). Starts the ring. Takes ownership of fd,
   * also when it throws.
   */
  setKick(index: number, fd: number | undefined): void {
    const ring = this.ringTaking(index, 'SET_VRING_KICK', fd);
    this.unwatchKick(ring);
    if (fd === undefined) {
      ring.kickNoFd = true;
    } else {
      ring.kickFd = fd;
      ring.kickNoFd = false;
    }
    ring.started = true;
    ring.broken = false;
    this.watchKick(ring);
    this.updateReady(ring);
    this.options.onStarted();
  }

  /** SET_VRING_CALL (`fd` -1 for none). Takes ownership of fd, also when it throws. */
  setCall(index: number, fd: number): void {
    const ring = this.ringTaking(index, 'SET_VRING_CALL', fd);
    closeQuietly(ring.callFd);
    ring.callFd = fd;
    ring.callSet = true;
  }

  /** SET_VRING_ERR (`fd` -1 for none). Takes ownership of fd, also when it throws. */
  setErr(index: number, fd: number): void {
    const ring = this.ringTaking(index, 'SET_VRING_ERR', fd);
    closeQuietly(ring.errFd);
    ring.errFd = fd;
  }

  /** SET_VRING_ENABLE. */
  setEnabled(index: number, enabled: boolean): void {
    const ring = this.ring(index, 'SET_VRING_ENABLE');
    ring.enabled = enabled;
    this.updateReady(ring);
  }

  /** Without VHOST_USER_F_PROTOCOL_FEATURES rings are enabled as soon as they start. */
  enableAll(): void {
    for (const ring of this.rings) {
      ring.enabled = true;
      this.updateReady(ring);
    }
  }

  /** RESET_OWNER / RESET_DEVICE: every ring back to its initial state. */
  resetAll(): void {
    for (const ring of this.rings) {
      this.stopRing(ring);
      ring.enabled = false;
      ring.base = 0;
      ring.num = 0;
      ring.addr = undefined;
    }
  }

  /** Memory is about to change: every ring lets go of its translated queue. */
  detachAll(): void {
    for (const ring of this.rings) this.detachQueue(ring);
  }

  /** Memory changed: rings are translated again where they can be. */
  updateAll(): void {
    for (const ring of this.rings) this.updateReady(ring);
  }

  /** The connection ended: the device stops, every descriptor is closed. */
  close(): void {
    this.detachAll();
    this.closed = true;
    for (const ring of this.rings) {
      this.unwatchKick(ring);
      closeQuietly(ring.callFd);
      closeQuietly(ring.errFd);
      ring.callFd = -1;
      ring.errFd = -1;
    }
  }

  // ---- restart survival ---------------------------------------------------------------------

  /** Every ring the front-end set anything up on. */
  images(): RingImage[] {
    return this.rings
      .filter((r) => r.num !== 0 || r.callSet || r.started || r.addr !== undefined || r.errFd >= 0)
      .map((r) => ({
        index: r.index,
        num: r.num,
        base: r.queue?.lastAvailIdx ?? r.base,
        addr: r.addr === undefined ? null : { ...r.addr },
        kickFd: r.kickFd,
        kickNoFd: r.kickNoFd,
        callFd: r.callFd,
        callSet: r.callSet,
        errFd: r.errFd,
        started: r.started,
        enabled: r.enabled,
      }));
  }

  /**
   * Sets a ring up again from its image, as the messages that built it did (memory must be set
   * already). A started ring resumes at the used index the guest's ring holds, not at the base
   * the image recorded: the chains popped but not yet returned when the previous process ended
   * are served again (inflate, deflate and reports are idempotent; docs/operations.md). Takes
   * ownership of the image's descriptors, also when it throws.
   */
  restore(img: RingImage): void {
    const fds = [img.kickFd, img.callFd, img.errFd];
    try {
      if (img.num !== 0) this.setNum(img.index, img.num);
      // Before the addresses, as QEMU sends them: the queue is built at this base.
      this.setBase(img.index, img.started ? (this.usedIndex(img) ?? img.base) : img.base);
      if (img.addr !== null)
        this.setAddr(img.index, {
          desc: BigInt(img.addr.desc),
          used: BigInt(img.addr.used),
          avail: BigInt(img.addr.avail),
        });
    } catch (err) {
      for (const fd of fds) closeQuietly(fd);
      throw err;
    }
    if (img.callSet) this.setCall(img.index, img.callFd);
    else closeQuietly(img.callFd);
    this.setErr(img.index, img.errFd);
    this.ring(img.index, 'restore').enabled = img.enabled;
    if (img.started) this.setKick(img.index, img.kickNoFd ? undefined : img.kickFd);
    else closeQuietly(img.kickFd);
  }

  /** The used index in the guest's ring (what the previous process returned), if it translates. */
  private usedIndex(img: RingImage): number | undefined {
    if (img.addr === null) return undefined;
    const gpa = this.options.memory.userToGuest(img.addr.used, 4);
    if (gpa === undefined) return undefined;
    return this.options.memory.readU16(gpa + 2);
  }

  /**
   * Interrupts every started ring once: the previous process may have returned buffers and
   * ended before it signalled them. A spurious interrupt costs the guest one look at its ring.
   */
  signalAll(): void {
    for (const ring of this.rings) {
      if (!ring.started || ring.callFd < 0) continue;
      this.options.log.debug('interrupting a resumed ring once', { queue: ring.index, callFd: ring.callFd });
      try {
        native.eventfdWrite(ring.callFd, 1);
      } catch {
        // A call fd that cannot be written fails the ring on its next use.
      }
    }
  }

  // ---- kicks and passes ---------------------------------------------------------------------

  private watchKick(ring: RingState): void {
    if (ring.kickNoFd) {
      ring.kickTimer = setInterval(() => this.onKick(ring), NOFD_KICK_POLL_INTERVAL_MS);
      ring.kickTimer.unref();
      return;
    }
    try {
      // POLL_EVENTFD: the watcher drains the counter itself (never blocking, whatever the peer does
      // to the fd's flags) and reports a hangup or failure once, then stops: no busy loop.
      ring.kickWatch = native.pollStart(ring.kickFd, POLL_READABLE | POLL_EVENTFD, (status) =>
        this.onKickReadable(ring, status),
      );
    } catch (err) {
      // A regular file, a directory, /dev/null...: a kick fd must be an eventfd. The ring keeps
      // the fd (closed with the connection, which this error ends).
      throw protocolError(`SET_VRING_KICK: queue ${ring.index}: the kick fd cannot be watched: ${errorMessage(err)}`);
    }
  }

  private onKickReadable(ring: RingState, status: number): void {
    if (status < 0) {
      // The watch has stopped itself; forget it so unwatchKick does not stop it twice.
      ring.kickWatch = undefined;
      const why = status === POLL_STATUS_HANGUP ? 'hung up' : `failed (status ${status})`;
      this.failRing(ring, `kick fd of queue ${ring.index} ${why}`, ErrorCode.VHOST_BAD_VRING);
      return;
    }
    this.onKick(ring);
  }

  private unwatchKick(ring: RingState): void {
    if (ring.kickWatch !== undefined) native.pollStop(ring.kickWatch);
    ring.kickWatch = undefined;
    if (ring.kickTimer !== undefined) clearInterval(ring.kickTimer);
    ring.kickTimer = undefined;
    closeQuietly(ring.kickFd);
    ring.kickFd = -1;
    ring.kickNoFd = false;
  }

  private onKick(ring: RingState): void {
    // A kick on a disabled ring: the pass on enable covers it.
    if (ring.ready) this.runPass(ring);
  }

  /** One device pass, inside the error handling; schedules the next if the device has more. */
  private runPass(ring: RingState): void {
    const handle = ring.handle;
    if (handle === undefined) return;
    let more: boolean;
    try {
      more = this.options.device.queueKicked(handle);
    } catch (err) {
      // A device must not throw on guest input; if it does, that ring is not trustworthy any more.
      this.failRing(ring, `device failed on queue ${ring.index}: ${errorMessage(err)}`, ErrorCode.VIRTQ_BROKEN_RING);
      return;
    }
    const faults = native.mappingFaults();
    if (faults !== this.faultsSeen) {
      this.faultsSeen = faults;
      if (this.options.memory.faulted) {
        this.options.onMemoryFault();
        return;
      }
    }
    if (!more || ring.passScheduled) return;
    ring.passScheduled = true;
    setImmediate(() => {
      ring.passScheduled = false;
      // Only if the ring is still the one that asked (not stopped, rebuilt or closed meanwhile).
      if (!this.closed && ring.handle === handle) this.runPass(ring);
    });
  }

  // ---- readiness ----------------------------------------------------------------------------

  /** Builds the SplitQueue if everything it needs is known. */
  private buildQueue(ring: RingState, strict: boolean): void {
    if (ring.queue !== undefined || ring.addr === undefined || ring.num === 0) return;
    const memory = this.options.memory;
    const sizes = ringSizes(ring.num);
    const desc = memory.userToGuest(ring.addr.desc, sizes.desc);
    const avail = memory.userToGuest(ring.addr.avail, sizes.avail);
    const used = memory.userToGuest(ring.addr.used, sizes.used);
    if (desc === undefined || avail === undefined || used === undefined) {
      if (strict) throw protocolError(`queue ${ring.index}: ring addresses are not inside front-end memory`);
      return;
    }
    const features = this.options.ackedFeatures();
    try {
      ring.queue = new SplitQueue(
        memory,
        ring.num,
        { descGpa: desc, availGpa: avail, usedGpa: used },
        {
          eventIdx: (features & VIRTIO_RING_F_EVENT_IDX) !== 0n,
          indirect: (features & VIRTIO_RING_F_INDIRECT_DESC) !== 0n,
        },
        ring.base,
      );
    } catch (err) {
      if (strict) throw protocolError(`queue ${ring.index}: ${errorMessage(err)}`);
    }
  }

  /** Re-evaluates whether the device may process `ring`, and tells it on every transition. */
  private updateReady(ring: RingState): void {
    if (this.closed) return;
    if (ring.started && !ring.broken) this.buildQueue(ring, false);
    const queue = ring.queue;
    const used = ring.index < this.options.device.numQueues; // extra rings never reach the device
    const ready = used && ring.started && ring.enabled && !ring.broken && queue !== undefined;
    if (ready === ring.ready) return;
    if (queue !== undefined && ready) {
      ring.ready = true;
      ring.handle = this.makeHandle(ring, queue);
      this.options.device.queueReady(ring.handle);
      // A kick that arrived while the ring was disabled must not be lost (rust-vmm/vhost#247).
      this.runPass(ring);
    } else {
      this.markNotReady(ring);
    }
  }

  private makeHandle(ring: RingState, queue: SplitQueue): Vring {
    const handle: Vring = {
      index: ring.index,
      queue,
      flushAndNotify: () => {
        if (ring.handle !== handle) return;
        if (!queue.flush() || ring.callFd < 0) return;
        try {
          native.eventfdWrite(ring.callFd, 1);
        } catch (err) {
          this.failRing(ring, `call fd of queue ${ring.index}: ${errorMessage(err)}`, ErrorCode.VHOST_BAD_VRING);
        }
      },
      fail: (error) => this.failRing(ring, error.message, error.code),
    };
    return handle;
  }

  private markNotReady(ring: RingState): void {
    if (!ring.ready) return;
    ring.ready = false;
    ring.handle = undefined;
    this.options.device.queueStopped(ring.index);
  }

  private failRing(ring: RingState, message: string, code: VirtqueueError['code']): void {
    if (ring.broken) return;
    this.options.onError(code, message);
    this.options.log.error('queue stopped: guest ring is broken', { queue: ring.index, code, error: message });
    ring.broken = true;
    if (ring.queue !== undefined) ring.base = ring.queue.lastAvailIdx;
    this.updateReady(ring);
    if (ring.errFd >= 0) {
      try {
        native.eventfdWrite(ring.errFd, 1);
      } catch {
        // The error fd is only a courtesy to the front-end; the ring is stopped either way.
      }
    }
  }

  /** Forgets the ring's translated queue (memory is about to change), without rebuilding it. */
  private detachQueue(ring: RingState): void {
    if (ring.queue !== undefined) ring.base = ring.queue.lastAvailIdx;
    ring.queue = undefined;
    this.markNotReady(ring);
  }

  private stopRing(ring: RingState): void {
    if (ring.queue !== undefined) ring.base = ring.queue.lastAvailIdx;
    ring.started = false;
    this.unwatchKick(ring);
    ring.queue = undefined;
    ring.broken = false;
    this.updateReady(ring);
  }
}
