/**
 * The vhost-user protocol state machine for one front-end connection: features and protocol
 * features, the memory table, per-ring state (size, base, addresses, kick/call/err fds,
 * started/enabled), config space, REPLY_ACK, and the back-end channel.
 *
 * Error rule (docs/vhost-user.md): any broken front-end message -- malformed, unknown, not
 * negotiated, or with invalid values -- closes the connection; we never NACK. Broken guest rings
 * stop only that ring. Replies are always sent synchronously from the message handler; nothing
 * here ever waits for the front-end (QEMU blocks on our replies and cannot serve the back-end
 * channel meanwhile).
 */
import {
  ErrorCode,
  ErrorCodeValue,
  GuestMemoryError,
  VballoonError,
  VhostProtocolError,
  VirtqueueError,
} from '../errors';
import { Logger } from '../log';
import { closeQuietly, isSystemError, native, PollHandle, POLL_EVENTFD, POLL_READABLE } from '../native';
import { checkDisjoint, GuestMemory, MemoryRegion, validateRegion, ValidRegion } from '../virtio/guest-memory';
import { ringSizes, SplitQueue, VIRTQUEUE_MAX_SIZE } from '../virtio/virtqueue';
import { BackendChannel } from './backend-channel';
import { decodeRequest, encodeReply, FrontendMessage, needsReply, Payload, RegionPayload, requestName } from './codec';
import {
  FrontendRequest,
  MAX_CONFIG_BYTES,
  MAX_MEM_SLOTS,
  MAX_MEM_TABLE_REGIONS,
  protocolBit,
  ProtocolFeature,
  VHOST_USER_F_PROTOCOL_FEATURES,
  VHOST_VRING_F_LOG,
  VIRTIO_RING_F_EVENT_IDX,
  VIRTIO_RING_F_INDIRECT_DESC,
} from './constants';
import { Connection } from './connection';
import { DeviceHost, VhostUserDevice, Vring } from './device';
import { Frame } from './framing';

/** With a "no fd" kick (bit 8 of SET_VRING_KICK) the ring is polled at this interval. */
const NOFD_KICK_POLL_INTERVAL_MS = 5;

/** Counters a session reports to its owner (metrics come from these). */
export interface SessionEvents {
  onMessage(name: string): void;
  onError(code: ErrorCodeValue, detail: string): void;
}

class RingState {
  num = 0;
  base = 0;
  addr: { desc: number; used: number; avail: number } | undefined;
  kickFd = -1;
  /** The kick fd is in blocking mode (QEMU's are not): reads must poll first. */
  kickMayBlock = true;
  kickNoFd = false;
  kickWatch: PollHandle | undefined;
  kickTimer: NodeJS.Timeout | undefined;
  callFd = -1;
  errFd = -1;
  started = false;
  enabled = false;
  broken = false;
  queue: SplitQueue | undefined;
  /** The device was told queueReady and not yet queueStopped. */
  ready = false;
  handle: Vring | undefined;
  passScheduled = false;

  constructor(readonly index: number) {}
}

export interface SessionOptions {
  /** Protocol features to offer (a subset of SUPPORTED_PROTOCOL_FEATURES). */
  protocolFeatures: bigint;
  log: Logger;
  events: SessionEvents;
}

function protocolError(code: ErrorCodeValue, message: string): VhostProtocolError {
  return new VhostProtocolError(code, message);
}

/** Serves one front-end connection for `device`. */
export class Session implements DeviceHost {
  readonly memory = new GuestMemory();
  private readonly rings: RingState[];
  private readonly conn: Connection;
  private readonly log: Logger;
  private ackedFeatures = 0n;
  private featuresSet = false;
  private ackedProtocol = 0n;
  private status = 0;
  private channel: BackendChannel | undefined;
  private configChangePending = false;
  private closed = false;
  private firstMessage = true;
  private readonly closeListeners: Array<(error: Error | undefined) => void> = [];

  constructor(
    fd: number,
    private readonly device: VhostUserDevice,
    private readonly options: SessionOptions,
  ) {
    this.log = options.log;
    this.rings = Array.from({ length: device.numQueues }, (_, i) => new RingState(i));
    this.conn = new Connection(fd, { onFrame: (f) => this.onFrame(f), onClose: (e) => this.onClosed(e) });
    this.device.attach(this, this.log);
  }

  /** Called once when the connection ends (after everything was released). */
  onClose(listener: (error: Error | undefined) => void): void {
    this.closeListeners.push(listener);
  }

  get isClosed(): boolean {
    return this.closed;
  }

  /** Closes the connection (as on a broken message). */
  close(error?: Error): void {
    this.conn.close(error);
  }

  // ---- DeviceHost ---------------------------------------------------------------------------

  notifyConfigChange(): void {
    this.configChangePending = true;
    this.flushConfigChange();
  }

  /** The device runs when any ring is started (a suspended device must not message QEMU). */
  private get running(): boolean {
    return this.rings.some((r) => r.started);
  }

  private flushConfigChange(): void {
    if (!this.configChangePending || !this.running || this.channel === undefined || this.channel.isClosed) return;
    this.configChangePending = false;
    this.channel.sendConfigChange(this.has(ProtocolFeature.REPLY_ACK));
  }

  // ---- dispatch -----------------------------------------------------------------------------

  private has(f: ProtocolFeature): boolean {
    return (this.ackedProtocol & protocolBit(f)) !== 0n;
  }

  private onFrame(frame: Frame): void {
    let msg: FrontendMessage;
    try {
      msg = decodeRequest(frame.header, frame.payload, frame.fds);
    } catch (err) {
      for (const fd of frame.fds) closeQuietly(fd);
      this.reject(err, requestName(frame.header.request));
      return;
    }
    const name = requestName(msg.request);
    if (this.firstMessage) {
      this.firstMessage = false;
      // QEMU's vhost-user-base reconnects (chardev reconnect-ms) without negotiating again: it
      // goes straight to SET_FEATURES, memory and rings, and still uses what it negotiated with
      // the previous back-end. That was everything we offer (QEMU accepts every offered bit), so
      // assume it rather than leave QEMU waiting for REPLY_ACKs we would not send.
      if (msg.request !== FrontendRequest.GET_FEATURES && msg.request !== FrontendRequest.GET_PROTOCOL_FEATURES) {
        this.ackedProtocol = this.options.protocolFeatures;
        this.log.warn(
          'front-end resumed without negotiating (a QEMU reconnect): assuming the protocol features it negotiated before',
          { first: name },
        );
      }
    }
    this.options.events.onMessage(name);
    this.log.debug('front-end message', { request: name, flags: msg.flags, fds: msg.fds.length });
    let reply: Payload | undefined;
    try {
      reply = this.handle(msg);
    } catch (err) {
      // Whatever the handler did not take ownership of is still ours.
      for (const fd of msg.fds) if (fd >= 0) closeQuietly(fd);
      this.reject(err, name);
      return;
    }
    if (this.closed) return;
    if (reply !== undefined) this.conn.send(encodeReply(msg.request, reply));
    else if (needsReply(msg.flags) && this.has(ProtocolFeature.REPLY_ACK)) {
      this.conn.send(encodeReply(msg.request, { kind: 'u64', value: 0n }));
    }
  }

  private reject(err: unknown, name: string): void {
    const error =
      err instanceof VballoonError
        ? err
        : protocolError(ErrorCode.VHOST_BAD_MESSAGE, `${name}: ${err instanceof Error ? err.message : String(err)}`);
    this.log.error('closing front-end connection: bad message', {
      request: name,
      code: error.code,
      error: error.message,
    });
    this.conn.close(error); // counted in onClosed, with framing errors
  }

  /** The stable code of the error that ended a connection. */
  private static closeCode(error: Error): ErrorCodeValue {
    if (error instanceof VballoonError) return error.code;
    return isSystemError(error) ? ErrorCode.SOCKET : ErrorCode.VHOST_BAD_MESSAGE;
  }

  /** Takes the descriptor at `i` out of the message (so the error path does not close it). */
  private takeFd(msg: FrontendMessage, i = 0): number {
    const fd = msg.fds[i];
    msg.fds[i] = -1;
    return fd;
  }

  private ring(index: number, name: string): RingState {
    const ring = this.rings[index];
    if (ring === undefined) {
      throw protocolError(
        ErrorCode.VHOST_BAD_VRING,
        `${name}: queue index ${index} out of range (${this.rings.length} queues)`,
      );
    }
    return ring;
  }

  private requireProtocol(f: ProtocolFeature, name: string): void {
    if (!this.has(f))
      throw protocolError(ErrorCode.VHOST_NOT_NEGOTIATED, `${name} needs protocol feature ${ProtocolFeature[f]}`);
  }

  private handle(msg: FrontendMessage): Payload | undefined {
    const p = msg.payload;
    const name = requestName(msg.request);
    switch (msg.request) {
      case FrontendRequest.GET_FEATURES:
        return { kind: 'u64', value: this.device.features() | VHOST_USER_F_PROTOCOL_FEATURES };
      case FrontendRequest.SET_FEATURES:
        this.setFeatures(u64(p));
        return undefined;
      case FrontendRequest.SET_OWNER:
        return undefined;
      case FrontendRequest.RESET_OWNER:
        this.resetRings();
        return undefined;
      case FrontendRequest.GET_PROTOCOL_FEATURES:
        return { kind: 'u64', value: this.options.protocolFeatures };
      case FrontendRequest.SET_PROTOCOL_FEATURES: {
        const value = u64(p);
        if ((value & ~this.options.protocolFeatures) !== 0n) {
          throw protocolError(
            ErrorCode.VHOST_BAD_FEATURES,
            `${name}: 0x${value.toString(16)} includes features not offered`,
          );
        }
        this.ackedProtocol = value; // REPLY_ACK applies from the next message on
        return undefined;
      }
      case FrontendRequest.GET_QUEUE_NUM:
        this.requireProtocol(ProtocolFeature.MQ, name);
        return { kind: 'u64', value: BigInt(this.device.numQueues) };
      case FrontendRequest.GET_MAX_MEM_SLOTS:
        this.requireProtocol(ProtocolFeature.CONFIGURE_MEM_SLOTS, name);
        return { kind: 'u64', value: BigInt(MAX_MEM_SLOTS) };
      case FrontendRequest.SET_BACKEND_REQ_FD:
        this.requireProtocol(ProtocolFeature.BACKEND_REQ, name);
        this.channel?.close();
        this.channel = new BackendChannel(this.takeFd(msg), this.log, (code, detail) =>
          this.options.events.onError(code, detail),
        );
        return undefined;
      case FrontendRequest.SET_MEM_TABLE:
        this.setMemTable(msg);
        return undefined;
      case FrontendRequest.ADD_MEM_REG:
        this.requireProtocol(ProtocolFeature.CONFIGURE_MEM_SLOTS, name);
        this.addMemReg(msg);
        return undefined;
      case FrontendRequest.REM_MEM_REG:
        this.requireProtocol(ProtocolFeature.CONFIGURE_MEM_SLOTS, name);
        this.remMemReg(msg);
        return undefined;
      case FrontendRequest.SET_VRING_NUM: {
        const s = vringState(p);
        const ring = this.ring(s.index, name);
        if (ring.started) throw protocolError(ErrorCode.VHOST_BAD_VRING, `${name}: queue ${s.index} is started`);
        if (
          s.num === 0 ||
          s.num > VIRTQUEUE_MAX_SIZE ||
          (s.num & (s.num - 1)) !== 0 ||
          s.num > this.device.maxQueueSize
        ) {
          throw protocolError(
            ErrorCode.VHOST_BAD_VRING,
            `${name}: queue ${s.index} size ${s.num} is not a power of two in 1..${Math.min(VIRTQUEUE_MAX_SIZE, this.device.maxQueueSize)}`,
          );
        }
        ring.num = s.num;
        return undefined;
      }
      case FrontendRequest.SET_VRING_BASE: {
        const s = vringState(p);
        const ring = this.ring(s.index, name);
        if (ring.started) throw protocolError(ErrorCode.VHOST_BAD_VRING, `${name}: queue ${s.index} is started`);
        if (s.num > 0xffff)
          throw protocolError(ErrorCode.VHOST_BAD_VRING, `${name}: base ${s.num} has reserved bits set`);
        ring.base = s.num;
        return undefined;
      }
      case FrontendRequest.SET_VRING_ADDR:
        this.setVringAddr(p);
        return undefined;
      case FrontendRequest.GET_VRING_BASE: {
        const s = vringState(p);
        const ring = this.ring(s.index, name);
        this.stopRing(ring);
        return { kind: 'vring-state', index: s.index, num: ring.base };
      }
      case FrontendRequest.SET_VRING_KICK:
        this.setVringKick(msg);
        return undefined;
      case FrontendRequest.SET_VRING_CALL:
      case FrontendRequest.SET_VRING_ERR: {
        if (p.kind !== 'vring-fd') throw new Error('unreachable');
        const ring = this.ring(p.index, name);
        const fd = p.noFd ? -1 : this.takeFd(msg);
        if (msg.request === FrontendRequest.SET_VRING_CALL) {
          closeQuietly(ring.callFd);
          ring.callFd = fd;
        } else {
          closeQuietly(ring.errFd);
          ring.errFd = fd;
        }
        return undefined;
      }
      case FrontendRequest.SET_VRING_ENABLE: {
        if ((this.ackedFeatures & VHOST_USER_F_PROTOCOL_FEATURES) === 0n && this.featuresSet) {
          throw protocolError(ErrorCode.VHOST_NOT_NEGOTIATED, `${name} without VHOST_USER_F_PROTOCOL_FEATURES`);
        }
        const s = vringState(p);
        const ring = this.ring(s.index, name);
        if (s.num > 1) throw protocolError(ErrorCode.VHOST_BAD_VRING, `${name}: value ${s.num} is not 0 or 1`);
        ring.enabled = s.num === 1;
        this.updateReady(ring);
        return undefined;
      }
      case FrontendRequest.GET_CONFIG:
      case FrontendRequest.SET_CONFIG: {
        this.requireProtocol(ProtocolFeature.CONFIG, name);
        if (p.kind !== 'config') throw new Error('unreachable');
        if (p.size === 0 || p.offset > MAX_CONFIG_BYTES || p.offset + p.size > this.device.configSize) {
          throw protocolError(
            ErrorCode.VHOST_BAD_CONFIG,
            `${name}: range ${p.offset}+${p.size} outside the ${this.device.configSize}-byte config space`,
          );
        }
        if (msg.request === FrontendRequest.GET_CONFIG) {
          const data = this.device.readConfig(p.offset, p.size);
          return { kind: 'config', offset: p.offset, size: p.size, flags: p.flags, data };
        }
        if (p.flags > 1) throw protocolError(ErrorCode.VHOST_BAD_CONFIG, `${name}: flags ${p.flags} unknown`);
        this.device.writeConfig(p.offset, p.data, p.flags === 1);
        return undefined;
      }
      case FrontendRequest.SET_STATUS: {
        this.requireProtocol(ProtocolFeature.STATUS, name);
        const value = u64(p);
        if (value > 0xffn)
          throw protocolError(ErrorCode.VHOST_BAD_MESSAGE, `${name}: status 0x${value.toString(16)} > 0xff`);
        this.status = Number(value);
        if (this.status === 0) this.device.reset();
        return undefined;
      }
      case FrontendRequest.GET_STATUS:
        this.requireProtocol(ProtocolFeature.STATUS, name);
        return { kind: 'u64', value: BigInt(this.status) };
      case FrontendRequest.RESET_DEVICE:
        this.requireProtocol(ProtocolFeature.RESET_DEVICE, name);
        this.resetRings();
        this.status = 0;
        this.device.reset();
        return undefined;
      default:
        throw protocolError(ErrorCode.VHOST_NOT_NEGOTIATED, `${name} is not supported by this back-end`);
    }
  }

  private setFeatures(value: bigint): void {
    const offered = this.device.features() | VHOST_USER_F_PROTOCOL_FEATURES;
    if ((value & ~offered) !== 0n) {
      throw protocolError(
        ErrorCode.VHOST_BAD_FEATURES,
        `SET_FEATURES: 0x${value.toString(16)} includes features not offered (0x${offered.toString(16)})`,
      );
    }
    this.ackedFeatures = value;
    this.featuresSet = true;
    // Without bit 30 rings are enabled as soon as they start (vhost-user spec, "Ring states").
    if ((value & VHOST_USER_F_PROTOCOL_FEATURES) === 0n) {
      for (const ring of this.rings) {
        ring.enabled = true;
        this.updateReady(ring);
      }
    }
    this.device.setFeatures(value & ~VHOST_USER_F_PROTOCOL_FEATURES);
  }

  // ---- memory ---------------------------------------------------------------------------------

  private mapRegion(desc: ValidRegion, fd: number): MemoryRegion {
    try {
      return MemoryRegion.map(desc, fd);
    } catch (err) {
      throw protocolError(ErrorCode.VHOST_BAD_MEMORY, err instanceof Error ? err.message : String(err));
    }
  }

  private validRegion(r: RegionPayload): ValidRegion {
    try {
      return validateRegion(r);
    } catch (err) {
      throw protocolError(ErrorCode.VHOST_BAD_MEMORY, (err as GuestMemoryError).message);
    }
  }

  private setMemTable(msg: FrontendMessage): void {
    if (msg.payload.kind !== 'mem-table') throw new Error('unreachable');
    const descs = msg.payload.regions.map((r) => this.validRegion(r));
    // Check the whole table before mapping anything.
    const staged: MemoryRegion[] = [];
    try {
      descs.forEach((d, i) => checkDisjoint(descs.slice(0, i), d, MAX_MEM_TABLE_REGIONS));
      descs.forEach((d, i) => staged.push(this.mapRegion(d, msg.fds[i])));
    } catch (err) {
      // mapRegion took no ownership on failure; regions mapped so far own their fds.
      for (const r of staged) r.unmap();
      const mapped = new Set(staged.map((r) => r.fd));
      msg.fds.forEach((fd, i) => {
        if (mapped.has(fd)) msg.fds[i] = -1;
      });
      if (err instanceof GuestMemoryError)
        throw protocolError(ErrorCode.VHOST_BAD_MEMORY, `SET_MEM_TABLE: ${err.message}`);
      throw err;
    }
    msg.fds.fill(-1);
    // Replace the table: rings stop using the old mappings, are re-translated over the new ones.
    for (const ring of this.rings) this.detachQueue(ring);
    this.memory.clear();
    for (const r of staged) this.memory.add(r);
    for (const ring of this.rings) this.updateReady(ring);
  }

  private addMemReg(msg: FrontendMessage): void {
    if (msg.payload.kind !== 'mem-region') throw new Error('unreachable');
    const desc = this.validRegion(msg.payload.region);
    try {
      this.memory.checkAddable(desc, MAX_MEM_SLOTS);
    } catch (err) {
      throw protocolError(ErrorCode.VHOST_BAD_MEMORY, `ADD_MEM_REG: ${(err as Error).message}`);
    }
    const region = this.mapRegion(desc, msg.fds[0]);
    this.takeFd(msg);
    this.memory.add(region);
    for (const ring of this.rings) this.updateReady(ring);
  }

  private remMemReg(msg: FrontendMessage): void {
    if (msg.payload.kind !== 'mem-region') throw new Error('unreachable');
    const desc = this.validRegion(msg.payload.region);
    const region = this.memory.remove(desc);
    if (region === undefined) {
      throw protocolError(
        ErrorCode.VHOST_BAD_MEMORY,
        `REM_MEM_REG: no region at gpa 0x${desc.guestPhysAddr.toString(16)}`,
      );
    }
    // Rings are re-translated without the removed region; those inside it stay down until the
    // memory comes back.
    for (const ring of this.rings) this.detachQueue(ring);
    region.unmap();
    for (const ring of this.rings) this.updateReady(ring);
    for (const fd of msg.fds) closeQuietly(fd);
    msg.fds.fill(-1);
  }

  // ---- rings ----------------------------------------------------------------------------------

  private setVringAddr(p: Payload): void {
    if (p.kind !== 'vring-addr') throw new Error('unreachable');
    const ring = this.ring(p.index, 'SET_VRING_ADDR');
    if (p.flags & VHOST_VRING_F_LOG)
      throw protocolError(ErrorCode.VHOST_NOT_NEGOTIATED, 'SET_VRING_ADDR: used-ring logging is not supported');
    const limit = BigInt(Number.MAX_SAFE_INTEGER);
    if (p.desc > limit || p.used > limit || p.avail > limit) {
      throw protocolError(ErrorCode.VHOST_BAD_VRING, `SET_VRING_ADDR: queue ${p.index} address beyond 2^53`);
    }
    this.dropQueue(ring);
    ring.addr = { desc: Number(p.desc), used: Number(p.used), avail: Number(p.avail) };
    if (this.memory.regionList.length > 0) {
      // Addresses must be inside memory now; a later mem table re-checks them.
      this.buildQueue(ring, true);
    }
    this.updateReady(ring);
  }

  private setVringKick(msg: FrontendMessage): void {
    const p = msg.payload;
    if (p.kind !== 'vring-fd') throw new Error('unreachable');
    const ring = this.ring(p.index, 'SET_VRING_KICK');
    this.unwatchKick(ring);
    if (p.noFd) {
      ring.kickNoFd = true;
    } else {
      ring.kickFd = this.takeFd(msg);
      ring.kickNoFd = false;
      try {
        ring.kickMayBlock = !native.fstat(ring.kickFd).nonBlocking;
      } catch {
        ring.kickMayBlock = true;
      }
    }
    ring.started = true;
    ring.broken = false;
    this.watchKick(ring);
    this.updateReady(ring);
    this.flushConfigChange();
  }

  private watchKick(ring: RingState): void {
    if (ring.kickNoFd) {
      ring.kickTimer = setInterval(() => this.onKick(ring), NOFD_KICK_POLL_INTERVAL_MS);
      ring.kickTimer.unref();
      return;
    }
    ring.kickWatch = native.pollStart(ring.kickFd, POLL_READABLE | POLL_EVENTFD, (status) => {
      if (status < 0) {
        this.failRing(
          ring,
          new VirtqueueError(ErrorCode.VHOST_BAD_VRING, `kick fd of queue ${ring.index} failed (status ${status})`),
        );
        return;
      }
      try {
        native.eventfdRead(ring.kickFd, ring.kickMayBlock);
      } catch (err) {
        this.failRing(
          ring,
          new VirtqueueError(ErrorCode.VHOST_BAD_VRING, `kick fd of queue ${ring.index}: ${(err as Error).message}`),
        );
        return;
      }
      this.onKick(ring);
    });
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
    if (!ring.ready || ring.handle === undefined) return; // a kick on a disabled ring: the pass on enable covers it
    this.runPass(ring);
  }

  private runPass(ring: RingState): void {
    const handle = ring.handle;
    if (handle === undefined) return;
    try {
      this.device.queueKicked(handle);
    } catch (err) {
      // A device must not throw on guest input; if it does, that ring is not trustworthy any more.
      this.failRing(
        ring,
        new VirtqueueError(
          ErrorCode.VIRTQ_BROKEN_RING,
          `device failed on queue ${ring.index}: ${(err as Error).message}`,
        ),
      );
    }
  }

  /** Builds the SplitQueue if everything it needs is known. */
  private buildQueue(ring: RingState, strict: boolean): void {
    if (ring.queue !== undefined || ring.addr === undefined || ring.num === 0) return;
    const sizes = ringSizes(ring.num);
    const desc = this.memory.userToGuest(ring.addr.desc, sizes.desc);
    const avail = this.memory.userToGuest(ring.addr.avail, sizes.avail);
    const used = this.memory.userToGuest(ring.addr.used, sizes.used);
    if (desc === undefined || avail === undefined || used === undefined) {
      if (strict) {
        throw protocolError(
          ErrorCode.VHOST_BAD_VRING,
          `queue ${ring.index}: ring addresses are not inside front-end memory`,
        );
      }
      return;
    }
    const features = this.ackedFeatures;
    try {
      ring.queue = new SplitQueue(
        this.memory,
        ring.num,
        { descGpa: desc, availGpa: avail, usedGpa: used },
        {
          eventIdx: (features & VIRTIO_RING_F_EVENT_IDX) !== 0n,
          indirect: (features & VIRTIO_RING_F_INDIRECT_DESC) !== 0n,
        },
        ring.base,
      );
    } catch (err) {
      if (strict) throw protocolError(ErrorCode.VHOST_BAD_VRING, `queue ${ring.index}: ${(err as Error).message}`);
    }
  }

  /** Re-evaluates whether the device may process `ring`, and tells it on every transition. */
  private updateReady(ring: RingState): void {
    if (this.closed) return;
    if (ring.started && !ring.broken) this.buildQueue(ring, false);
    const ready = ring.started && ring.enabled && !ring.broken && ring.queue !== undefined;
    if (ready === ring.ready) return;
    if (ready) {
      const queue = ring.queue!;
      ring.ready = true;
      ring.handle = {
        index: ring.index,
        queue,
        flushAndNotify: () => {
          if (ring.handle === undefined || ring.queue !== queue) return;
          if (!queue.flush() || ring.callFd < 0) return;
          try {
            native.eventfdWrite(ring.callFd, 1);
          } catch (err) {
            this.failRing(
              ring,
              new VirtqueueError(
                ErrorCode.VHOST_BAD_VRING,
                `call fd of queue ${ring.index}: ${(err as Error).message}`,
              ),
            );
          }
        },
        fail: (error) => this.failRing(ring, error),
      };
      this.device.queueReady(ring.handle);
      // A kick that arrived while the ring was disabled must not be lost (rust-vmm/vhost#247).
      this.runPass(ring);
    } else {
      ring.ready = false;
      ring.handle = undefined;
      this.device.queueStopped(ring.index);
    }
  }

  private failRing(ring: RingState, error: VirtqueueError): void {
    if (ring.broken) return;
    this.options.events.onError(error.code, error.message);
    this.log.error('queue stopped: guest ring is broken', {
      queue: ring.index,
      code: error.code,
      error: error.message,
    });
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
    if (ring.ready) {
      ring.ready = false;
      ring.handle = undefined;
      this.device.queueStopped(ring.index);
    }
  }

  /** Forgets the ring's translated queue and rebuilds it over the current memory if possible. */
  private dropQueue(ring: RingState): void {
    this.detachQueue(ring);
    this.updateReady(ring);
  }

  /** GET_VRING_BASE: stop the ring; the kick fd is closed, `base` is where to resume. */
  private stopRing(ring: RingState): void {
    if (ring.queue !== undefined) ring.base = ring.queue.lastAvailIdx;
    ring.started = false;
    this.unwatchKick(ring);
    ring.queue = undefined;
    ring.broken = false;
    this.updateReady(ring);
  }

  private resetRings(): void {
    for (const ring of this.rings) {
      this.stopRing(ring);
      ring.enabled = false;
      ring.base = 0;
      ring.num = 0;
      ring.addr = undefined;
    }
  }

  private onClosed(error: Error | undefined): void {
    if (this.closed) return;
    // Stop the device first, then release rings, fds, mappings.
    for (const ring of this.rings) this.detachQueue(ring);
    this.closed = true;
    for (const ring of this.rings) {
      this.unwatchKick(ring);
      closeQuietly(ring.callFd);
      closeQuietly(ring.errFd);
      ring.callFd = -1;
      ring.errFd = -1;
    }
    this.channel?.close();
    this.channel = undefined;
    this.device.detach();
    this.memory.clear();
    if (error !== undefined) {
      const code = Session.closeCode(error);
      this.options.events.onError(code, error.message);
      this.log.warn('front-end connection closed on error', { code, error: error.message });
    } else this.log.info('front-end disconnected');
    for (const listener of this.closeListeners) listener(error);
  }
}

function u64(p: Payload): bigint {
  if (p.kind !== 'u64') throw new Error('unreachable');
  return p.value;
}

function vringState(p: Payload): { index: number; num: number } {
  if (p.kind !== 'vring-state') throw new Error('unreachable');
  return p;
}
