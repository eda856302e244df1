/**
 * A vhost-user front-end that behaves like QEMU 11.1 with vhost-user-test-device-pci: the same
 * message order as the recorded traces (realize, DRIVER_OK, stop), real memfd guest RAM, real
 * eventfds, a back-end channel socketpair, REPLY_ACK or the GET_FEATURES barrier without it.
 * Used by spec/ and bench/; it can run in a different process from the back-end.
 */
import { ErrorCode, VhostProtocolError } from '../errors';
import { closeQuietly, native } from '../native';
import { decodeU64Reply, encodeMessage, encodeReply, Payload } from '../vhost/codec';
import { Connection } from '../vhost/connection';
import {
  BackendRequest,
  FrontendRequest,
  protocolBit,
  ProtocolFeature,
  VHOST_USER_F_PROTOCOL_FEATURES,
  VHOST_USER_NEED_REPLY_MASK,
  VHOST_USER_REPLY_FLAGS,
  VHOST_USER_VERSION,
  VIRTIO_RING_F_EVENT_IDX,
} from '../vhost/constants';
import { Frame } from '../vhost/framing';
import { SplitRingDriver } from './driver';
import { GuestRam } from './guest-ram';

/** Protocol features QEMU 11.1 accepts (every bit below F_MAX = 24, minus the conditional ones). */
export const QEMU_PROTOCOL_MASK = (1n << 24n) - 1n;

/** Requests that always have a reply body. */
export const REPLYING = new Set<number>([
  FrontendRequest.GET_FEATURES,
  FrontendRequest.GET_PROTOCOL_FEATURES,
  FrontendRequest.GET_QUEUE_NUM,
  FrontendRequest.GET_VRING_BASE,
  FrontendRequest.GET_CONFIG,
  FrontendRequest.GET_MAX_MEM_SLOTS,
  FrontendRequest.GET_STATUS,
]);

/** Requests QEMU sends with NEED_REPLY once REPLY_ACK is negotiated. */
const QEMU_NEED_REPLY = new Set<number>([
  FrontendRequest.SET_MEM_TABLE,
  FrontendRequest.ADD_MEM_REG,
  FrontendRequest.REM_MEM_REG,
  FrontendRequest.SET_VRING_KICK,
  FrontendRequest.SET_VRING_CALL,
  FrontendRequest.SET_VRING_ERR,
  FrontendRequest.SET_BACKEND_REQ_FD,
  FrontendRequest.SET_VRING_ENABLE,
  FrontendRequest.SET_CONFIG,
]);

export interface FrontendOptions {
  numQueues: number;
  queueSize?: number;
  configSize: number;
  ramBytes?: number;
  layout?: 'q35' | 'flat';
  /** Front-end virtual address of guest RAM's file offset 0 (QEMU's mmap address). */
  userBase?: number;
  /** Use this guest RAM (owned by the caller, kept open on close), as a reconnecting QEMU does. */
  ram?: GuestRam;
  /** Mask applied to the back-end's protocol features (QEMU's F_MAX mask by default). */
  protocolMask?: bigint;
  replyTimeoutMs?: number;
}

interface Waiter {
  request: number;
  resolve(frame: Frame): void;
  reject(err: Error): void;
  timer: NodeJS.Timeout;
}

export class TestFrontend {
  readonly ram: GuestRam;
  readonly drivers = new Map<number, SplitRingDriver>();
  /** What the back-end offered. */
  backendFeatures = 0n;
  backendProtocolFeatures = 0n;
  /** What was negotiated. */
  protocolFeatures = 0n;
  /** CONFIG_CHANGE_MSG received on the back-end channel. */
  configChanges = 0;
  /** Of those, the ones that asked for an ack (NEED_REPLY). */
  configChangeAcksAsked = 0;
  /** What GET_QUEUE_NUM answered (with MQ). */
  backendQueueNum: bigint | undefined;
  /** Every request sent, by name order (for sequence checks). */
  readonly sent: number[] = [];
  readonly closed: Promise<Error | undefined>;
  private readonly conn: Connection;
  private channel: Connection | undefined;
  private waiters: Waiter[] = [];
  private configWaiters: Array<() => void> = [];
  private readonly options: Required<Omit<FrontendOptions, 'layout' | 'userBase' | 'ram'>> &
    Pick<FrontendOptions, 'userBase'> & { layout: 'q35' | 'flat' };
  private readonly ownsRam: boolean;
  private readonly errFds: number[] = [];
  private readonly setupCallFds: number[] = [];
  /** Answer CONFIG_CHANGE_MSG acks on the back-end channel (hostile tests turn it off). */
  ackConfigChanges = true;

  /** The err eventfd realize() sent for queue `index` (tests watch it). */
  errFdOf(index: number): number {
    const fd = this.errFds[index];
    if (fd === undefined) throw new Error(`no err fd for queue ${index}`);
    return fd;
  }

  /** Writes raw bytes (and descriptors) on the back-end channel (hostile tests). */
  sendOnBackendChannel(bytes: Uint8Array, fds: readonly number[] = []): void {
    if (this.channel === undefined) throw new Error('no back-end channel (BACKEND_REQ not negotiated)');
    this.channel.send(bytes, fds);
  }

  private constructor(fd: number, options: FrontendOptions) {
    this.options = {
      queueSize: 64,
      ramBytes: 64 * 1024 * 1024,
      layout: 'q35',
      protocolMask: QEMU_PROTOCOL_MASK,
      replyTimeoutMs: 5000,
      ...options,
    };
    this.ownsRam = options.ram === undefined;
    this.ram =
      options.ram ??
      new GuestRam({
        sizeBytes: this.options.ramBytes,
        layout: this.options.layout,
        ...(options.userBase === undefined ? {} : { userBase: options.userBase }),
      });
    let onClose: (e: Error | undefined) => void = () => {};
    this.closed = new Promise((resolve) => (onClose = resolve));
    this.conn = new Connection(
      fd,
      {
        onFrame: (frame) => this.onReply(frame),
        onClose: (error) => {
          for (const w of this.waiters) {
            clearTimeout(w.timer);
            w.reject(error ?? new Error('back-end closed the connection'));
          }
          this.waiters = [];
          onClose(error);
        },
      },
      { expectReplies: true },
    );
  }

  /** Connects to a back-end listening on `socketPath`; throws EAGAIN if its backlog is full. */
  static connect(socketPath: string, options: FrontendOptions): TestFrontend {
    const fd = native.connect(socketPath);
    if (fd < 0) {
      throw Object.assign(new Error(`connect ${socketPath}: the listen backlog is full (EAGAIN)`), {
        code: 'EAGAIN',
        errno: -11,
        syscall: 'connect',
      });
    }
    return new TestFrontend(fd, options);
  }

  /**
   * Connects without blocking the event loop, retrying every `retryMs` while the back-end's
   * listen backlog is full (a non-blocking unix connect cannot be polled for completion).
   */
  static async connectAsync(
    socketPath: string,
    options: FrontendOptions,
    retryMs = 5,
    timeoutMs = 5000,
  ): Promise<TestFrontend> {
    const start = Date.now();
    for (;;) {
      const fd = native.connect(socketPath);
      if (fd >= 0) return new TestFrontend(fd, options);
      if (Date.now() - start > timeoutMs)
        throw new Error(`connect ${socketPath}: backlog still full after ${timeoutMs} ms`);
      await new Promise((resolve) => setTimeout(resolve, retryMs));
    }
  }

  /** Uses an already connected socket (takes ownership). */
  static fromFd(fd: number, options: FrontendOptions): TestFrontend {
    return new TestFrontend(fd, options);
  }

  get isClosed(): boolean {
    return this.conn.isClosed;
  }

  has(f: ProtocolFeature): boolean {
    return (this.protocolFeatures & protocolBit(f)) !== 0n;
  }

  private onReply(frame: Frame): void {
    for (const fd of frame.fds) closeQuietly(fd);
    const w = this.waiters.shift();
    if (w === undefined)
      throw new VhostProtocolError(ErrorCode.VHOST_BAD_MESSAGE, `unsolicited reply ${frame.header.request}`);
    clearTimeout(w.timer);
    if (frame.header.flags !== VHOST_USER_REPLY_FLAGS) {
      w.reject(new Error(`reply flags 0x${frame.header.flags.toString(16)} instead of 0x5`));
    } else if (frame.header.request !== w.request) {
      w.reject(new Error(`reply to ${frame.header.request} while waiting for ${w.request}`));
    } else w.resolve(frame);
  }

  /** Sends raw bytes (hostile tests). */
  sendRaw(bytes: Uint8Array, fds: readonly number[] = []): void {
    this.conn.send(bytes, fds);
  }

  /**
   * Sends a request the way QEMU would: NEED_REPLY where QEMU sets it under REPLY_ACK. Resolves
   * with the reply frame when one is expected.
   */
  async request(
    request: FrontendRequest,
    payload: Payload = { kind: 'none' },
    fds: readonly number[] = [],
  ): Promise<Frame | undefined> {
    const needAck = this.has(ProtocolFeature.REPLY_ACK) && QEMU_NEED_REPLY.has(request);
    const flags = VHOST_USER_VERSION | (needAck ? VHOST_USER_NEED_REPLY_MASK : 0);
    return this.send(request, flags, payload, fds, REPLYING.has(request) || needAck);
  }

  /** Sends with explicit flags; waits for a reply if `expectReply`. */
  send(
    request: number,
    flags: number,
    payload: Payload,
    fds: readonly number[],
    expectReply: boolean,
  ): Promise<Frame | undefined> {
    this.sent.push(request);
    const p = expectReply
      ? new Promise<Frame>((resolve, reject) => {
          const timer = setTimeout(() => {
            this.waiters = this.waiters.filter((w) => w.timer !== timer);
            reject(new Error(`no reply to request ${request} within ${this.options.replyTimeoutMs} ms`));
          }, this.options.replyTimeoutMs);
          this.waiters.push({ request, resolve, reject, timer });
        })
      : Promise.resolve(undefined);
    this.conn.send(encodeMessage(request, flags, payload), fds);
    return p;
  }

  /** Sends and checks a u64 reply (a GET_* answer or a REPLY_ACK ack of 0). */
  async requestU64(
    request: FrontendRequest,
    payload: Payload = { kind: 'none' },
    fds: readonly number[] = [],
  ): Promise<bigint | undefined> {
    const frame = await this.request(request, payload, fds);
    if (frame === undefined) return undefined;
    const value = decodeU64Reply('reply', frame.payload);
    if (!REPLYING.has(request) && value !== 0n) throw new Error(`back-end NACKed request ${request} with ${value}`);
    return value;
  }

  /** What QEMU does at realize (vhost_dev_init): features, protocol, back-end channel, owner, call/err fds. */
  async realize(): Promise<void> {
    this.backendFeatures = (await this.requestU64(FrontendRequest.GET_FEATURES))!;
    if (this.backendFeatures & VHOST_USER_F_PROTOCOL_FEATURES) {
      this.backendProtocolFeatures = (await this.requestU64(FrontendRequest.GET_PROTOCOL_FEATURES))!;
      const chosen = this.backendProtocolFeatures & this.options.protocolMask;
      await this.request(FrontendRequest.SET_PROTOCOL_FEATURES, { kind: 'u64', value: chosen });
      this.protocolFeatures = chosen;
    }
    if (this.has(ProtocolFeature.MQ)) {
      // Asked, as QEMU does, and not enforced, as QEMU's generic device does not: it sets up its
      // num_vqs rings whatever the answer.
      this.backendQueueNum = await this.requestU64(FrontendRequest.GET_QUEUE_NUM);
    }
    if (this.has(ProtocolFeature.CONFIGURE_MEM_SLOTS)) await this.requestU64(FrontendRequest.GET_MAX_MEM_SLOTS);
    if (this.has(ProtocolFeature.BACKEND_REQ)) {
      const [mine, theirs] = native.socketpair();
      this.channel = new Connection(mine, { onFrame: (f) => this.onBackendRequest(f), onClose: () => {} });
      try {
        await this.requestU64(FrontendRequest.SET_BACKEND_REQ_FD, { kind: 'none' }, [theirs]);
      } finally {
        closeQuietly(theirs);
      }
    }
    await this.request(FrontendRequest.SET_OWNER);
    await this.requestU64(FrontendRequest.GET_FEATURES);
    for (let q = 0; q < this.options.numQueues; q++) {
      const call = native.eventfd(0, true);
      const err = native.eventfd(0, true);
      this.setupCallFds.push(call);
      this.errFds.push(err);
      await this.requestU64(FrontendRequest.SET_VRING_CALL, { kind: 'vring-fd', index: q, noFd: false }, [call]);
      await this.requestU64(FrontendRequest.SET_VRING_ERR, { kind: 'vring-fd', index: q, noFd: false }, [err]);
    }
  }

  private onBackendRequest(frame: Frame): void {
    for (const fd of frame.fds) closeQuietly(fd);
    if (frame.header.request === BackendRequest.CONFIG_CHANGE_MSG) {
      this.configChanges++;
      if (frame.header.flags & VHOST_USER_NEED_REPLY_MASK) this.configChangeAcksAsked++;
      const waiters = this.configWaiters;
      this.configWaiters = [];
      for (const w of waiters) w();
    }
    if (frame.header.flags & VHOST_USER_NEED_REPLY_MASK && this.ackConfigChanges) {
      this.channel?.send(encodeReply(frame.header.request, { kind: 'u64', value: 0n }));
    }
  }

  /** Resolves when CONFIG_CHANGE_MSG number `count` has arrived. */
  waitConfigChange(count = this.configChanges + 1, timeoutMs = 5000): Promise<void> {
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`no config change #${count} within ${timeoutMs} ms`)), timeoutMs);
      timer.unref();
      const check = (): void => {
        if (this.configChanges >= count) {
          clearTimeout(timer);
          resolve();
        } else this.configWaiters.push(check);
      };
      check();
    });
  }

  /** Sends the memory table as QEMU does (ADD_MEM_REG per region with CONFIGURE_MEM_SLOTS). */
  async sendMemory(): Promise<void> {
    if (this.has(ProtocolFeature.CONFIGURE_MEM_SLOTS)) {
      for (const region of this.ram.regions) {
        await this.requestU64(FrontendRequest.ADD_MEM_REG, { kind: 'mem-region', region }, [this.ram.fd]);
      }
    } else {
      const fds = this.ram.regions.map(() => this.ram.fd);
      await this.requestU64(FrontendRequest.SET_MEM_TABLE, { kind: 'mem-table', regions: this.ram.regions }, fds);
    }
  }

  /**
   * What QEMU does when the guest sets DRIVER_OK: SET_FEATURES, memory, then for each queue the
   * driver set up NUM/BASE/ADDR/KICK(+kick)/CALL, then ENABLE for every queue, then CALL again.
   */
  async start(
    ackedFeatures: bigint,
    queues: readonly number[],
    bases?: ReadonlyMap<number, number>,
  ): Promise<Map<number, SplitRingDriver>> {
    const bit30 = this.backendFeatures & VHOST_USER_F_PROTOCOL_FEATURES;
    await this.request(FrontendRequest.SET_FEATURES, { kind: 'u64', value: ackedFeatures | bit30 });
    // A restart (bases given) sends neither memory (unchanged) nor a status (already DRIVER_OK).
    if (this.has(ProtocolFeature.STATUS)) {
      await this.requestU64(FrontendRequest.GET_STATUS);
      if (bases === undefined) await this.request(FrontendRequest.SET_STATUS, { kind: 'u64', value: 0x8n });
    }
    if (bases === undefined) await this.sendMemory();
    for (const q of queues) {
      let driver = this.drivers.get(q);
      if (driver === undefined) {
        driver = new SplitRingDriver(
          this.ram,
          q,
          this.options.queueSize,
          (ackedFeatures & VIRTIO_RING_F_EVENT_IDX) !== 0n,
        );
        this.drivers.set(q, driver);
      }
      await this.request(FrontendRequest.SET_VRING_NUM, { kind: 'vring-state', index: q, num: driver.size });
      const base = bases?.get(q) ?? 0;
      await this.request(FrontendRequest.SET_VRING_BASE, { kind: 'vring-state', index: q, num: base });
      const a = driver.userAddrs;
      await this.request(FrontendRequest.SET_VRING_ADDR, {
        kind: 'vring-addr',
        index: q,
        flags: 0,
        desc: a.desc,
        used: a.used,
        avail: a.avail,
        log: 0n,
      });
      await this.requestU64(FrontendRequest.SET_VRING_KICK, { kind: 'vring-fd', index: q, noFd: false }, [
        driver.kickFd,
      ]);
      driver.kick(); // QEMU 11.1 injects a kick right after SET_VRING_KICK
      await this.requestU64(FrontendRequest.SET_VRING_CALL, { kind: 'vring-fd', index: q, noFd: false }, [
        driver.callFd,
      ]);
    }
    if (bit30 !== 0n) {
      for (let q = 0; q < this.options.numQueues; q++) {
        await this.requestU64(FrontendRequest.SET_VRING_ENABLE, { kind: 'vring-state', index: q, num: 1 });
        if (!this.has(ProtocolFeature.REPLY_ACK)) await this.requestU64(FrontendRequest.GET_FEATURES);
      }
    }
    for (const q of queues) {
      const driver = this.drivers.get(q)!;
      await this.requestU64(FrontendRequest.SET_VRING_CALL, { kind: 'vring-fd', index: q, noFd: false }, [
        driver.callFd,
      ]);
    }
    return this.drivers;
  }

  /**
   * What QEMU 11.1 does on QMP `stop` (and, identically, first on a guest reset): disable every
   * queue, then GET_VRING_BASE on each started one; no SET_STATUS. Returns the bases.
   */
  async pause(): Promise<Map<number, number>> {
    return this.stop(false);
  }

  /**
   * What QEMU 11.1 does on QMP `cont`: start again (features, GET_STATUS, each ring; no memory
   * table) with each ring at the base GET_VRING_BASE returned (docs/qemu.md).
   */
  async resume(ackedFeatures: bigint, bases: ReadonlyMap<number, number>): Promise<Map<number, SplitRingDriver>> {
    return this.start(ackedFeatures, [...bases.keys()], bases);
  }

  /**
   * What a front-end does on guest reset or shutdown: disable every queue, then GET_VRING_BASE,
   * then SET_STATUS 0 if negotiated (older QEMUs send it on every stop; `sendStatus` false: not).
   */
  async stop(sendStatus = true): Promise<Map<number, number>> {
    const bases = new Map<number, number>();
    if (this.backendFeatures & VHOST_USER_F_PROTOCOL_FEATURES) {
      for (let q = 0; q < this.options.numQueues; q++) {
        await this.requestU64(FrontendRequest.SET_VRING_ENABLE, { kind: 'vring-state', index: q, num: 0 });
        if (!this.has(ProtocolFeature.REPLY_ACK)) await this.requestU64(FrontendRequest.GET_FEATURES);
      }
    }
    for (const q of this.drivers.keys()) {
      const frame = (await this.request(FrontendRequest.GET_VRING_BASE, { kind: 'vring-state', index: q, num: 0 }))!;
      const v = new DataView(frame.payload.buffer, frame.payload.byteOffset, 8);
      bases.set(q, v.getUint32(4, true));
    }
    if (sendStatus && this.has(ProtocolFeature.STATUS))
      await this.request(FrontendRequest.SET_STATUS, { kind: 'u64', value: 0n });
    return bases;
  }

  async getConfig(offset: number, size: number): Promise<Uint8Array> {
    const frame = (await this.request(FrontendRequest.GET_CONFIG, {
      kind: 'config',
      offset,
      size,
      flags: 0,
      data: new Uint8Array(size),
    }))!;
    if (frame.payload.length !== 12 + size)
      throw new Error(`GET_CONFIG reply of ${frame.payload.length} bytes, expected ${12 + size}`);
    return frame.payload.slice(12);
  }

  async setConfig(offset: number, data: Uint8Array, flags = 0): Promise<void> {
    await this.requestU64(FrontendRequest.SET_CONFIG, { kind: 'config', offset, size: data.length, flags, data });
  }

  /** Closes everything this front-end owns. */
  close(): void {
    this.conn.close();
    this.channel?.close();
    for (const d of this.drivers.values()) d.close();
    this.drivers.clear();
    for (const fd of [...this.errFds, ...this.setupCallFds]) closeQuietly(fd);
    this.errFds.length = 0;
    this.setupCallFds.length = 0;
    if (this.ownsRam) this.ram.close();
  }
}
