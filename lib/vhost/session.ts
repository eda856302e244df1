/**
 * The vhost-user protocol state machine for one front-end connection. What happens on each
 * request is in the HANDLERS table below (one handler per request, its payload typed by the
 * codec); rings live in rings.ts, memory-table changes in memory-table.ts, the back-end channel
 * in backend-channel.ts. This file holds features and protocol features, config space, status,
 * REPLY_ACK and the connection's lifetime.
 *
 * Error rule (docs/vhost-user.md): any broken front-end message -- malformed, unknown, not
 * negotiated, or with invalid values -- closes the connection; we never NACK. Broken guest rings
 * stop only that ring. Replies are always sent synchronously from the message handler; nothing
 * here ever waits for the front-end (QEMU blocks on our replies and cannot serve the back-end
 * channel meanwhile).
 */
import { ErrorCode, ErrorCodeValue, errorMessage, VballoonError, VhostProtocolError } from '../errors';
import { Logger } from '../log';
import { closeQuietly, isSystemError, native } from '../native';
import { GuestMemory } from '../virtio/guest-memory';
import { BackendChannel } from './backend-channel';
import {
  decodeRequest,
  encodeReply,
  FrontendMessage,
  KnownRequest,
  needsReply,
  Payload,
  RequestMessage,
  requestName,
} from './codec';
import {
  FrontendRequest,
  MAX_CONFIG_BYTES,
  MAX_MEM_SLOTS,
  protocolBit,
  ProtocolFeature,
  VHOST_USER_F_PROTOCOL_FEATURES,
  VHOST_VRING_F_LOG,
} from './constants';
import {
  Connection,
  DEFAULT_FIRST_MESSAGE_TIMEOUT_MS,
  DEFAULT_STALLED_MESSAGE_TIMEOUT_MS,
  frameDigest,
} from './connection';
import { DeviceHost, VhostUserDevice } from './device';
import { Frame } from './framing';
import { addMemRegion, MemoryChangeHooks, removeMemRegion, setMemTable } from './memory-table';
import { RingImage, RingSet } from './rings';

/**
 * A session as a restarted daemon needs it to serve the same front-end on the same connection
 * (lib/daemon/survival.ts stores it; docs/operations.md). Descriptors are numbers in the process
 * that made the image. Everything is plain JSON (bigints as hex strings).
 */
export interface SessionImage {
  connFd: number;
  channelFd: number;
  channelPendingAcks: number;
  ackedFeatures: string;
  featuresSet: boolean;
  ackedProtocol: string;
  status: number;
  configChangePending: boolean;
  regions: Array<{ guestPhysAddr: number; sizeBytes: number; userAddr: number; mmapOffset: number; fd: number }>;
  rings: RingImage[];
  stoppedBases: Array<[number, number]>;
  /** The last front-end message handled (frameDigest) and its reply, base64 (null: none). */
  lastHandled: { digest: string; reply: string | null } | null;
}

/** Counters a session reports to its owner (metrics come from these). */
export interface SessionEvents {
  onMessage(name: string): void;
  onError(code: ErrorCodeValue, detail: string): void;
}

export interface SessionOptions {
  /** Protocol features to offer (a subset of SUPPORTED_PROTOCOL_FEATURES). */
  protocolFeatures: bigint;
  log: Logger;
  events: SessionEvents;
  /** Drop a front-end stalled in the middle of a message after this long (default 10 s). */
  stalledMessageTimeoutMs?: number;
  /** Drop a front-end that sends nothing after connecting for this long (default 30 s). */
  firstMessageTimeoutMs?: number;
  /**
   * After each front-end message was handled, before it is taken off the socket and its reply
   * goes out: a restartable daemon records the new state (and the message's digest and reply)
   * here, so that a reply the front-end has seen is never one the next process does not know about.
   */
  onHandled?(request: number, last: NonNullable<SessionImage['lastHandled']>): void;
  /** Taking over a connection a previous process served (SessionImage): no first-message wait. */
  resumed?: boolean;
}

/** A handler's answer: a reply payload, or undefined (an ack is sent if REPLY_ACK asks for one). */
// eslint-disable-next-line @typescript-eslint/no-invalid-void-type -- handlers that only act return nothing
type Reply = Payload | void;
type HandlerTable = { [R in KnownRequest]?: (session: Session, msg: RequestMessage<R>) => Reply };

function protocolError(code: ErrorCodeValue, message: string): VhostProtocolError {
  return new VhostProtocolError(code, message);
}

/** Takes the descriptor at `i` out of the message (so the error path does not close it). */
function takeFd(msg: { fds: number[] }, i = 0): number {
  const fd = msg.fds[i];
  msg.fds[i] = -1;
  return fd;
}

/**
 * Takes a kick, call or err descriptor, which must be an eventfd: anything else (a pipe, a socket,
 * a file) could block, spin or never signal, so it is refused (ERR_VHOST_BAD_VRING).
 */
function takeEventfd(
  msg: FrontendMessage<FrontendRequest.SET_VRING_KICK | FrontendRequest.SET_VRING_CALL | FrontendRequest.SET_VRING_ERR>,
): number {
  let kind: string;
  try {
    kind = native.fdKind(msg.fds[0]);
  } catch (err) {
    kind = `unusable descriptor (${errorMessage(err)})`;
  }
  if (kind !== 'eventfd') {
    throw protocolError(
      ErrorCode.VHOST_BAD_VRING,
      `${requestName(msg.request)}: queue ${msg.payload.index}: a ${kind} where an eventfd is required`,
    );
  }
  return takeFd(msg);
}

/** The small payloads (a value, a ring's index and number) for the debug log of each message. */
function brief(msg: FrontendMessage): Record<string, unknown> {
  const p = msg.payload;
  if (p.kind === 'u64') return { value: `0x${p.value.toString(16)}` };
  if (p.kind === 'vring-state' || p.kind === 'vring-fd')
    return { queue: p.index, ...(p.kind === 'vring-state' ? { num: p.num } : {}) };
  return {};
}

/** How long a resumed session waits for a sign of life before resending a possibly lost reply. */
export const LOST_REPLY_PROBE_MS = 3000;

/** Serves one front-end connection for `device`. */
export class Session implements DeviceHost {
  readonly memory = new GuestMemory();
  private readonly rings: RingSet;
  private readonly conn: Connection;
  private readonly log: Logger;
  private readonly memoryHooks: MemoryChangeHooks;
  private ackedFeatures = 0n;
  private featuresSet = false;
  private ackedProtocol = 0n;
  private status = 0;
  private channel: BackendChannel | undefined;
  private configChangePending = false;
  private closed = false;
  private firstMessage = true;
  private queueCountReported = false;
  /**
   * The base each ring stopped at (our GET_VRING_BASE answers) until its next SET_VRING_BASE: a
   * restart at the same base is a resume (QMP stop/cont), anywhere else a device reset.
   */
  private readonly stoppedBases = new Map<number, number>();
  private readonly closeListeners: Array<(error: Error | undefined) => void> = [];
  /** The last message handled and its reply (base64), as recorded for a restart. */
  private lastHandledRecord: SessionImage['lastHandled'] = null;
  /** The next config change must ask for an ack (checkLostReply's probe). */
  private probeAck = false;
  /** The last message handled and its reply, kept as they are until someone asks (image()). */
  private lastFrame: Frame | undefined;
  private lastReply: Uint8Array | undefined;

  constructor(
    fd: number,
    private readonly device: VhostUserDevice,
    private readonly options: SessionOptions,
  ) {
    this.log = options.log;
    this.rings = new RingSet({
      device,
      memory: this.memory,
      log: this.log,
      ackedFeatures: () => this.ackedFeatures,
      onError: (code, detail) => options.events.onError(code, detail),
      onStarted: () => this.flushConfigChange(),
      onMemoryFault: () =>
        this.close(
          protocolError(ErrorCode.VHOST_BAD_MEMORY, 'guest memory file shrank under a mapping (SIGBUS survived)'),
        ),
    });
    this.memoryHooks = { beforeChange: () => this.rings.detachAll(), afterChange: () => this.rings.updateAll() };
    this.conn = new Connection(
      fd,
      { onFrame: (f) => this.onFrame(f), onClose: (e) => this.onClosed(e) },
      {
        stalledMessageTimeoutMs: options.stalledMessageTimeoutMs ?? DEFAULT_STALLED_MESSAGE_TIMEOUT_MS,
        // Leaving each message on the socket until it is recorded costs a second read per
        // message; only a daemon that records its state for a restart (onHandled) gains by it.
        commitAfterHandle: options.onHandled !== undefined,
        // A resumed front-end negotiated long ago and may send nothing for months.
        firstMessageTimeoutMs: options.resumed
          ? 0
          : (options.firstMessageTimeoutMs ?? DEFAULT_FIRST_MESSAGE_TIMEOUT_MS),
      },
    );
    if (options.resumed) this.firstMessage = false;
    this.device.attach(this, this.log);
  }

  // ---- restart survival ---------------------------------------------------------------------

  /** The session's state and descriptors (SessionImage). */
  image(): SessionImage {
    return {
      connFd: this.conn.fd,
      channelFd: this.channel !== undefined && !this.channel.isClosed ? this.channel.fd : -1,
      channelPendingAcks: this.channel?.pendingAcks ?? 0,
      ackedFeatures: this.ackedFeatures.toString(16),
      featuresSet: this.featuresSet,
      ackedProtocol: this.ackedProtocol.toString(16),
      status: this.status,
      configChangePending: this.configChangePending,
      regions: this.memory.regionList.map((r) => ({
        guestPhysAddr: r.guestPhysAddr,
        sizeBytes: r.sizeBytes,
        userAddr: r.userAddr,
        mmapOffset: r.mmapOffset,
        fd: r.fd,
      })),
      rings: this.rings.images(),
      stoppedBases: [...this.stoppedBases],
      lastHandled: this.lastHandled(),
    };
  }

  /**
   * Serves, in this process, a connection another process served (its image, with descriptors
   * valid here): memory, features and rings are set up again as the front-end's messages had set
   * them, started rings resume at their used index, every started ring is interrupted once, and
   * a config change is announced (the previous process may have ended before sending one). The
   * front-end sees nothing but that interrupt and a config re-read. Takes ownership of every
   * descriptor in the image, also when it throws (the session is then closed).
   */
  static resume(image: SessionImage, device: VhostUserDevice, options: SessionOptions): Session {
    const session = new Session(image.connFd, device, { ...options, resumed: true });
    // Descriptors not yet owned by anything: closed if the resume fails half-way.
    const pending = new Set([image.channelFd, ...image.regions.map((r) => r.fd)]);
    for (const r of image.rings) for (const fd of [r.kickFd, r.callFd, r.errFd]) pending.add(fd);
    pending.delete(-1);
    try {
      session.ackedProtocol = BigInt(`0x${image.ackedProtocol}`);
      session.status = image.status;
      if (image.channelFd >= 0) {
        pending.delete(image.channelFd);
        session.channel = new BackendChannel(
          image.channelFd,
          session.log,
          (code, detail) => options.events.onError(code, detail),
          image.channelPendingAcks,
        );
        // Acks already queued were sent before this moment: an ack seen from now on proves the
        // front-end's main loop runs (checkLostReply).
        session.channel.discardQueued();
      }
      const fds = image.regions.map((r) => r.fd);
      const big = (n: number): bigint => BigInt(n);
      try {
        setMemTable(
          session.memory,
          image.regions.map((r) => ({
            guestPhysAddr: big(r.guestPhysAddr),
            sizeBytes: big(r.sizeBytes),
            userAddr: big(r.userAddr),
            mmapOffset: big(r.mmapOffset),
          })),
          fds,
          session.memoryHooks,
        );
      } finally {
        // Mapped regions own their descriptors; setMemTable left the others (-1 = taken).
        image.regions.forEach((r, i) => {
          if (fds[i] === -1) pending.delete(r.fd);
        });
      }
      if (image.featuresSet) session.setFeatures(BigInt(`0x${image.ackedFeatures}`));
      for (const r of image.rings) {
        for (const fd of [r.kickFd, r.callFd, r.errFd]) pending.delete(fd);
        session.rings.restore(r); // owns them now, also when it throws
      }
      for (const [index, base] of image.stoppedBases) session.stoppedBases.set(index, base);
    } catch (err) {
      for (const fd of pending) closeQuietly(fd);
      session.close(err instanceof Error ? err : new Error(String(err)));
      throw err;
    }
    session.lastHandledRecord = image.lastHandled;
    session.checkLostReply(image.lastHandled);
    session.rings.signalAll();
    session.configChangePending = true;
    session.flushConfigChange();
    return session;
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

  /**
   * The one crash window a restart cannot see through (docs/operations.md): the previous process
   * took the last message off the socket and may have been killed before its reply went out.
   * If the front-end sent anything since, it had the reply. If nothing is queued, QEMU is either
   * idle or blocked waiting for that reply, holding its big lock, so its main loop cannot answer
   * the config change a resume announces (with REPLY_ACK): no ack within LOST_REPLY_PROBE_MS
   * means blocked, and the recorded reply is sent. Without the back-end channel and REPLY_ACK
   * and with the device stopped there is no probe: the reply is assumed delivered (a duplicate
   * would desynchronise QEMU).
   */
  private checkLostReply(last: SessionImage['lastHandled']): void {
    if (last === null || last.reply === null) return;
    if (this.conn.peekHead() !== 'empty') return;
    const channel = this.channel;
    // The probe is the config change a resume announces; a stopped device announces nothing.
    if (channel === undefined || channel.isClosed || !this.has(ProtocolFeature.REPLY_ACK) || !this.rings.running) {
      this.log.debug('cannot tell whether the last reply reached the front-end; assuming it did');
      return;
    }
    let answered = false;
    this.probeAck = true; // the config change the resume announces next asks for an ack
    channel.onNextAck(() => (answered = true));
    const timer = setTimeout(() => {
      if (answered || this.closed) return;
      this.log.warn('the front-end waits for a reply the previous process did not send: sending it', {
        waitedMs: LOST_REPLY_PROBE_MS,
      });
      this.options.events.onError(ErrorCode.RESTART_STATE, 'reply lost by a killed process, sent again');
      this.conn.send(Buffer.from(last.reply!, 'base64'));
    }, LOST_REPLY_PROBE_MS);
    timer.unref();
    this.onClose(() => clearTimeout(timer));
  }

  // ---- DeviceHost ---------------------------------------------------------------------------

  notifyConfigChange(): void {
    this.configChangePending = true;
    this.flushConfigChange();
  }

  private flushConfigChange(): void {
    const channel = this.channel;
    if (!this.configChangePending || !this.rings.running || channel === undefined || channel.isClosed) return;
    this.configChangePending = false;
    channel.sendConfigChange(this.has(ProtocolFeature.REPLY_ACK), this.probeAck);
    this.probeAck = false;
  }

  // ---- dispatch -----------------------------------------------------------------------------

  private has(f: ProtocolFeature): boolean {
    return (this.ackedProtocol & protocolBit(f)) !== 0n;
  }

  private requireProtocol(f: ProtocolFeature, name: string): void {
    if (!this.has(f))
      throw protocolError(ErrorCode.VHOST_NOT_NEGOTIATED, `${name} needs protocol feature ${ProtocolFeature[f]}`);
  }

  /** The last front-end message handled (its digest) and its reply, or null before the first. */
  private lastHandled(): SessionImage['lastHandled'] {
    if (this.lastFrame !== undefined) {
      this.lastHandledRecord = {
        digest: frameDigest(this.lastFrame),
        reply: this.lastReply === undefined ? null : Buffer.from(this.lastReply).toString('base64'),
      };
      this.lastFrame = this.lastReply = undefined;
    }
    return this.lastHandledRecord;
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
    if (this.firstMessage) this.onFirstMessage(msg.request, name);
    this.options.events.onMessage(name);
    this.log.debug('front-end message', { request: name, flags: msg.flags, fds: msg.fds.length, ...brief(msg) });
    let reply: Reply;
    try {
      reply = this.dispatch(msg);
    } catch (err) {
      // Whatever the handler did not take ownership of is still ours.
      for (const fd of msg.fds) if (fd >= 0) closeQuietly(fd);
      this.reject(err, name);
      return;
    }
    if (this.closed) return;
    let out: Uint8Array | undefined;
    if (reply !== undefined) out = encodeReply(msg.request, reply);
    else if (needsReply(msg.flags) && this.has(ProtocolFeature.REPLY_ACK))
      out = encodeReply(msg.request, { kind: 'u64', value: 0n });
    // Restart survival (docs/operations.md, "crash windows"): record what the message did and
    // the reply it gets, then take the message off the socket, then reply. A process killed
    // before the commit leaves the message for the next one, which handles it again (the effect
    // is idempotent) and replies; killed between the commit and the reply, the next one finds
    // out whether QEMU waits for it (checkLostReply).
    this.lastFrame = frame;
    this.lastReply = out;
    this.lastHandledRecord = null;
    if (this.options.onHandled !== undefined) this.options.onHandled(msg.request, this.lastHandled()!);
    this.conn.commit();
    if (out !== undefined) this.conn.send(out);
  }

  private dispatch<K extends KnownRequest>(msg: FrontendMessage<K>): Reply {
    const handler = HANDLERS[msg.request];
    if (handler === undefined) {
      throw protocolError(
        ErrorCode.VHOST_NOT_NEGOTIATED,
        `${requestName(msg.request)} is not supported by this back-end`,
      );
    }
    return handler(this, msg);
  }

  private onFirstMessage(request: KnownRequest, name: string): void {
    this.firstMessage = false;
    // QEMU's vhost-user-base reconnects (chardev reconnect-ms) without negotiating again: it goes
    // straight to SET_FEATURES, memory and rings, and still uses what it negotiated with the
    // previous back-end. That was everything we offer (QEMU accepts every offered bit), so assume
    // it rather than leave QEMU waiting for REPLY_ACKs we would not send.
    if (request === FrontendRequest.GET_FEATURES || request === FrontendRequest.GET_PROTOCOL_FEATURES) return;
    this.ackedProtocol = this.options.protocolFeatures;
    this.log.warn('front-end resumed without negotiating (a QEMU reconnect): assuming its protocol features', {
      first: name,
    });
  }

  private reject(err: unknown, name: string): void {
    const error =
      err instanceof VballoonError ? err : protocolError(ErrorCode.VHOST_BAD_MESSAGE, `${name}: ${errorMessage(err)}`);
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

  // ---- request handlers (called from HANDLERS) -----------------------------------------------

  /** @internal */
  features(): bigint {
    return this.device.features() | VHOST_USER_F_PROTOCOL_FEATURES;
  }

  /** @internal SET_FEATURES */
  setFeatures(value: bigint): void {
    const offered = this.features();
    if ((value & ~offered) !== 0n) {
      throw protocolError(
        ErrorCode.VHOST_BAD_FEATURES,
        `SET_FEATURES: 0x${value.toString(16)} includes features not offered (0x${offered.toString(16)})`,
      );
    }
    this.ackedFeatures = value;
    this.featuresSet = true;
    // Without bit 30 rings are enabled as soon as they start (vhost-user spec, "Ring states").
    if ((value & VHOST_USER_F_PROTOCOL_FEATURES) === 0n) this.rings.enableAll();
    const acked = value & ~VHOST_USER_F_PROTOCOL_FEATURES;
    this.device.setFeatures(acked);
    this.checkQueueCount(acked);
  }

  /**
   * QEMU sets up its `num_vqs` rings at realize (a call fd each), before any SET_FEATURES. Fewer
   * than the negotiated features need means a command line the guest's driver cannot use: say so.
   */
  private checkQueueCount(acked: bigint): void {
    const needed = this.device.queuesFor?.(acked) ?? this.device.numQueues;
    const setUp = this.rings.setUp;
    if (setUp === 0 || setUp >= needed || this.queueCountReported) return;
    this.queueCountReported = true;
    this.log.error('the front-end has fewer queues than the device needs: start QEMU with a larger num_vqs', {
      frontendQueues: setUp,
      neededQueues: needed,
      hint: `num_vqs=${needed} (vballoon qemu-args prints the whole command line)`,
    });
    this.options.events.onError(ErrorCode.VHOST_BAD_VRING, `front-end has ${setUp} queues, ${needed} needed`);
  }

  /** @internal SET_PROTOCOL_FEATURES */
  setProtocolFeatures(value: bigint): void {
    if ((value & ~this.options.protocolFeatures) !== 0n) {
      throw protocolError(
        ErrorCode.VHOST_BAD_FEATURES,
        `SET_PROTOCOL_FEATURES: 0x${value.toString(16)} includes features not offered`,
      );
    }
    this.ackedProtocol = value; // REPLY_ACK applies from the next message on
  }

  /** @internal GET_PROTOCOL_FEATURES */
  get offeredProtocolFeatures(): bigint {
    return this.options.protocolFeatures;
  }

  /** @internal */
  require(f: ProtocolFeature, request: KnownRequest): void {
    this.requireProtocol(f, requestName(request));
  }

  /** @internal SET_BACKEND_REQ_FD */
  setBackendChannel(fd: number): void {
    this.channel?.close();
    this.channel = undefined;
    try {
      this.channel = new BackendChannel(fd, this.log, (code, detail) => this.options.events.onError(code, detail));
    } catch (err) {
      // The channel's connection closed the descriptor (a regular file, a directory, /dev/null).
      throw protocolError(
        ErrorCode.VHOST_BAD_FDS,
        `SET_BACKEND_REQ_FD: the descriptor cannot be watched as a socket: ${errorMessage(err)}`,
      );
    }
  }

  /** @internal */
  get ringSet(): RingSet {
    return this.rings;
  }

  /** @internal */
  get memoryChangeHooks(): MemoryChangeHooks {
    return this.memoryHooks;
  }

  /** @internal SET_VRING_ENABLE needs bit 30 once features are set. */
  checkEnableAllowed(): void {
    if ((this.ackedFeatures & VHOST_USER_F_PROTOCOL_FEATURES) === 0n && this.featuresSet) {
      throw protocolError(ErrorCode.VHOST_NOT_NEGOTIATED, 'SET_VRING_ENABLE without VHOST_USER_F_PROTOCOL_FEATURES');
    }
  }

  /** @internal GET_CONFIG / SET_CONFIG */
  config(msg: FrontendMessage<FrontendRequest.GET_CONFIG | FrontendRequest.SET_CONFIG>): Reply {
    const name = requestName(msg.request);
    this.requireProtocol(ProtocolFeature.CONFIG, name);
    const p = msg.payload;
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

  /** @internal GET_VRING_BASE: stops the ring; remembers where, to tell a resume from a reset. */
  stopRing(index: number): number {
    const base = this.rings.stop(index);
    this.stoppedBases.set(index, base);
    return base;
  }

  /**
   * @internal SET_VRING_BASE. A device stop (QMP `stop`, `virsh suspend`) and a guest reset look
   * the same until here: QEMU disables and stops every ring either way (GET_VRING_BASE), and
   * sends no SET_STATUS 0 (QEMU 11.1; older ones send it on every stop). What differs is the
   * restart: after a stop QEMU resumes each ring at the base we returned; after a reset the guest
   * set its rings up anew and they start at 0. So a ring restarting elsewhere than it stopped
   * means a reset: the balloon of the previous guest is emptied once, before any ring runs again
   * (QEMU sets every ring's base before enabling any, docs/qemu.md). A ring that stopped at 0
   * holds nothing, so restarting it at 0 decides nothing.
   */
  setVringBase(index: number, base: number): void {
    this.rings.setBase(index, base);
    const stoppedAt = this.stoppedBases.get(index);
    if (stoppedAt === undefined) return;
    this.stoppedBases.delete(index);
    if (stoppedAt === base) {
      this.log.debug('ring resumes where it stopped', { queue: index, base });
      return;
    }
    this.stoppedBases.clear();
    this.log.info('ring restarts elsewhere than it stopped: the guest reset the device', {
      queue: index,
      stoppedAt,
      base,
    });
    this.device.reset();
  }

  /** @internal SET_STATUS. Status 0 alone resets nothing: the ring bases tell (setVringBase). */
  setStatus(value: bigint): void {
    this.requireProtocol(ProtocolFeature.STATUS, 'SET_STATUS');
    if (value > 0xffn)
      throw protocolError(ErrorCode.VHOST_BAD_MESSAGE, `SET_STATUS: status 0x${value.toString(16)} > 0xff`);
    this.status = Number(value);
  }

  /** @internal GET_STATUS */
  getStatus(): bigint {
    this.requireProtocol(ProtocolFeature.STATUS, 'GET_STATUS');
    return BigInt(this.status);
  }

  /** @internal RESET_DEVICE */
  resetDevice(): void {
    this.requireProtocol(ProtocolFeature.RESET_DEVICE, 'RESET_DEVICE');
    this.rings.resetAll();
    this.stoppedBases.clear();
    this.status = 0;
    this.device.reset();
  }

  /** @internal */
  get numQueues(): number {
    return this.device.numQueues;
  }

  private onClosed(error: Error | undefined): void {
    if (this.closed) return;
    // Stop the device first, then release rings, fds, mappings.
    this.rings.close();
    this.closed = true;
    this.channel?.close();
    this.channel = undefined;
    this.device.detach();
    this.memory.clear();
    if (error !== undefined) {
      const code = Session.closeCode(error);
      this.options.events.onError(code, error.message);
      // A broken message is the front-end's fault (error, as docs/errors.md says); a socket
      // failure is usually a QEMU that went away (warn).
      const fields = { code, error: error.message };
      if (code === ErrorCode.SOCKET) this.log.warn('front-end connection closed on error', fields);
      else this.log.error('front-end connection closed on error', fields);
    } else this.log.info('front-end disconnected');
    for (const listener of this.closeListeners) listener(error);
  }
}

const R = FrontendRequest;
const u64 = (value: bigint | number): Payload => ({ kind: 'u64', value: BigInt(value) });

/**
 * One handler per request this back-end serves; a request not listed closes the connection with
 * ERR_VHOST_NOT_NEGOTIATED. Each handler's `msg.payload` has its request's type.
 */
const HANDLERS: HandlerTable = {
  [R.GET_FEATURES]: (s) => u64(s.features()),
  [R.SET_FEATURES]: (s, m) => s.setFeatures(m.payload.value),
  [R.SET_OWNER]: () => undefined,
  [R.RESET_OWNER]: (s) => s.ringSet.resetAll(),
  [R.GET_PROTOCOL_FEATURES]: (s) => u64(s.offeredProtocolFeatures),
  [R.SET_PROTOCOL_FEATURES]: (s, m) => s.setProtocolFeatures(m.payload.value),
  [R.GET_QUEUE_NUM]: (s, m) => {
    s.require(ProtocolFeature.MQ, m.request);
    return u64(s.numQueues);
  },
  [R.GET_MAX_MEM_SLOTS]: (s, m) => {
    s.require(ProtocolFeature.CONFIGURE_MEM_SLOTS, m.request);
    return u64(MAX_MEM_SLOTS);
  },
  [R.SET_BACKEND_REQ_FD]: (s, m) => {
    s.require(ProtocolFeature.BACKEND_REQ, m.request);
    s.setBackendChannel(takeFd(m));
  },
  [R.SET_MEM_TABLE]: (s, m) => setMemTable(s.memory, m.payload.regions, m.fds, s.memoryChangeHooks),
  [R.ADD_MEM_REG]: (s, m) => {
    s.require(ProtocolFeature.CONFIGURE_MEM_SLOTS, m.request);
    addMemRegion(s.memory, m.payload.region, m.fds, s.memoryChangeHooks);
  },
  [R.REM_MEM_REG]: (s, m) => {
    s.require(ProtocolFeature.CONFIGURE_MEM_SLOTS, m.request);
    removeMemRegion(s.memory, m.payload.region, m.fds, s.memoryChangeHooks);
  },
  [R.SET_VRING_NUM]: (s, m) => s.ringSet.setNum(m.payload.index, m.payload.num),
  [R.SET_VRING_BASE]: (s, m) => s.setVringBase(m.payload.index, m.payload.num),
  [R.SET_VRING_ADDR]: (s, m) => {
    if (m.payload.flags & VHOST_VRING_F_LOG)
      throw protocolError(ErrorCode.VHOST_NOT_NEGOTIATED, 'SET_VRING_ADDR: used-ring logging is not supported');
    s.ringSet.setAddr(m.payload.index, m.payload);
  },
  [R.GET_VRING_BASE]: (s, m) => ({
    kind: 'vring-state',
    index: m.payload.index,
    num: s.stopRing(m.payload.index),
  }),
  [R.SET_VRING_KICK]: (s, m) => s.ringSet.setKick(m.payload.index, m.payload.noFd ? undefined : takeEventfd(m)),
  [R.SET_VRING_CALL]: (s, m) => s.ringSet.setCall(m.payload.index, m.payload.noFd ? -1 : takeEventfd(m)),
  [R.SET_VRING_ERR]: (s, m) => s.ringSet.setErr(m.payload.index, m.payload.noFd ? -1 : takeEventfd(m)),
  [R.SET_VRING_ENABLE]: (s, m) => {
    s.checkEnableAllowed();
    if (m.payload.num > 1)
      throw protocolError(ErrorCode.VHOST_BAD_VRING, `SET_VRING_ENABLE: value ${m.payload.num} is not 0 or 1`);
    s.ringSet.setEnabled(m.payload.index, m.payload.num === 1);
  },
  [R.GET_CONFIG]: (s, m) => s.config(m),
  [R.SET_CONFIG]: (s, m) => s.config(m),
  [R.SET_STATUS]: (s, m) => s.setStatus(m.payload.value),
  [R.GET_STATUS]: (s) => u64(s.getStatus()),
  [R.RESET_DEVICE]: (s) => s.resetDevice(),
};
