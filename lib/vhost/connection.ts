/**
 * One vhost-user stream socket: reads with recvmsg (descriptors included), reassembles messages
 * with MessageReader, hands each complete message to a handler, and writes with a queue so a
 * peer that stops reading can never block the process.
 *
 * Closing is idempotent and releases everything: the watcher, the socket, descriptors of a
 * message that never completed, and descriptors of queued outgoing messages are not ours (the
 * sender keeps ownership of what it sends).
 */
import { Clock, systemClock, TimerHandle } from '../clock';
import { ErrorCode, errorMessage, VhostProtocolError } from '../errors';
import { closeQuietly, native, PollHandle, POLL_READABLE, POLL_WRITABLE } from '../native';
import { createHash } from 'node:crypto';
import { HEADER_BYTES } from './constants';
import { Frame, FramingError, MessageReader } from './framing';

/** Identifies a message (its header and payload): what a restarted daemon compares. */
export function frameDigest(frame: Frame): string {
  const h = frame.header;
  return `${h.request}:${h.flags}:${h.size}:${createHash('sha1').update(frame.payload).digest('hex')}`;
}

/** Bytes asked of one recvmsg: several messages at once, well above the largest one. */
const READ_CHUNK_BYTES = 64 * 1024;
/** Reads per readiness event; the watcher is level-triggered, so the rest waits its turn and
 * one busy peer cannot starve the other connections of the process. */
const MAX_READS_PER_WAKEUP = 16;
/** Outgoing bytes held for a peer that does not read before the connection is dropped. */
const MAX_QUEUED_OUTPUT_BYTES = 1024 * 1024;
/**
 * A peer that leaves a message incomplete this long is dropped (QEMU writes each message at once;
 * a stalled peer must not hold the VM's only slot forever).
 */
export const DEFAULT_STALLED_MESSAGE_TIMEOUT_MS = 10_000;
/** A peer that sends nothing this long after connecting is dropped (QEMU starts at once). */
export const DEFAULT_FIRST_MESSAGE_TIMEOUT_MS = 30_000;

export interface ConnectionOptions {
  /** This end reads replies (the back-end channel). */
  expectReplies?: boolean;
  /** Drop a peer stalled in the middle of a message after this long (0: never). */
  stalledMessageTimeoutMs?: number;
  /** Drop a peer that sends nothing after connecting for this long (0: never). */
  firstMessageTimeoutMs?: number;
  /**
   * Leave each message on the socket until its handler is done with it (a peek, then the
   * message is taken off by commit() or after onFrame returns): a process killed while
   * handling it leaves it for the next process (restart survival). Messages that do not arrive
   * whole are read the ordinary way.
   */
  commitAfterHandle?: boolean;
  clock?: Clock;
}

export interface ConnectionHandler {
  /** One complete message; the handler owns frame.fds. Throwing closes the connection. */
  onFrame(frame: Frame): void;
  /** The connection is closed; `error` is why, undefined for an orderly end of stream. */
  onClose(error: Error | undefined): void;
}

interface Pending {
  bytes: Uint8Array;
  fds: readonly number[];
}

export class Connection {
  private readonly reader: MessageReader;
  private watch: PollHandle | undefined;
  private readonly output: Pending[] = [];
  private queuedBytes = 0;
  private watchingWritable = false;
  private closed = false;
  private readonly clock: Clock;
  private readonly stalledTimeoutMs: number;
  private stallTimer: TimerHandle | undefined;
  private received = false;
  private readonly commitAfterHandle: boolean;
  private readonly expectReplies: boolean;
  /** Bytes of the message being handled that are still on the socket (commitAfterHandle). */
  private uncommitted = 0;

  constructor(
    readonly fd: number,
    private readonly handler: ConnectionHandler,
    options: ConnectionOptions = {},
  ) {
    this.expectReplies = options.expectReplies ?? false;
    this.commitAfterHandle = options.commitAfterHandle ?? false;
    this.reader = new MessageReader(this.expectReplies);
    this.clock = options.clock ?? systemClock;
    this.stalledTimeoutMs = options.stalledMessageTimeoutMs ?? 0;
    try {
      this.watch = native.pollStart(fd, POLL_READABLE, (status, events) => this.onEvent(status, events));
    } catch (err) {
      // Not pollable (a regular file, a directory): the descriptor is ours to close.
      closeQuietly(fd);
      throw err;
    }
    const firstMs = options.firstMessageTimeoutMs ?? 0;
    if (firstMs > 0) this.armStallTimer(firstMs, `nothing received within ${firstMs} ms of connecting`);
  }

  get isClosed(): boolean {
    return this.closed;
  }

  private onEvent(status: number, events: number): void {
    if (this.closed) return;
    try {
      if (status < 0) throw new Error(`socket poll failed with status ${status}`);
      if (events & POLL_WRITABLE) this.flush();
      if (events & POLL_READABLE) this.readSome();
    } catch (err) {
      this.close(err instanceof Error ? err : new Error(String(err)));
    }
    if (!this.closed) this.updateStallTimer();
  }

  private armStallTimer(ms: number, why: string): void {
    this.stallTimer?.cancel();
    this.stallTimer = this.clock.setTimer(ms, () => {
      this.stallTimer = undefined;
      this.close(new VhostProtocolError(ErrorCode.VHOST_BAD_MESSAGE, `peer stalled: ${why}`));
    });
  }

  /** A partial message starts the stall clock; a complete one (or nothing pending) stops it. */
  private updateStallTimer(): void {
    if (!this.received) return; // the first-message timer, if any, keeps running
    if (this.reader.midMessage && this.stalledTimeoutMs > 0) {
      if (this.stallTimer === undefined)
        this.armStallTimer(this.stalledTimeoutMs, `a message left incomplete for ${this.stalledTimeoutMs} ms`);
    } else {
      this.stallTimer?.cancel();
      this.stallTimer = undefined;
    }
  }

  private readSome(): void {
    for (let i = 0; i < MAX_READS_PER_WAKEUP && !this.closed; i++) {
      if (this.commitAfterHandle && !this.reader.midMessage) {
        const outcome = this.readCommitted();
        if (outcome === 'empty') return;
        if (outcome === 'handled') continue;
      }
      const msg = native.recvmsg(this.fd, READ_CHUNK_BYTES);
      if (msg === null) return;
      if (!this.received) {
        this.received = true;
        this.stallTimer?.cancel();
        this.stallTimer = undefined;
      }
      if (msg.data.length === 0) {
        for (const fd of msg.fds) closeQuietly(fd);
        const truncated = this.reader.midMessage;
        this.close(
          truncated
            ? new VhostProtocolError(ErrorCode.VHOST_BAD_MESSAGE, 'stream ended in the middle of a message')
            : undefined,
        );
        return;
      }
      let frames: Frame[];
      try {
        if (msg.truncated) {
          throw new FramingError(
            new VhostProtocolError(ErrorCode.VHOST_FDS_LOST, 'descriptors were truncated (MSG_CTRUNC)'),
            [],
          );
        }
        frames = this.reader.push(msg.data, msg.fds);
      } catch (err) {
        if (err instanceof FramingError) for (const fd of err.orphanFds) closeQuietly(fd);
        throw err;
      }
      // Frames not handed to the handler -- because an earlier one closed the connection or
      // threw -- still own their descriptors: close them, whatever happened.
      let handed = 0;
      try {
        while (handed < frames.length && !this.closed) this.handler.onFrame(frames[handed++]);
      } finally {
        for (const rest of frames.slice(handed)) for (const fd of rest.fds) closeQuietly(fd);
      }
    }
  }

  /**
   * Peeks at what is queued and hands each whole message to the handler, taking it off the
   * socket only once handled (or when the handler calls commit()). Anything unusual (the end of
   * the stream, a truncation, a framing error, a message not yet whole) is left to the ordinary
   * read, which reports it the usual way.
   */
  private readCommitted(): 'empty' | 'handled' | 'ordinary' {
    const frames = this.peekFrames();
    if (frames === 'empty') return 'empty';
    if (frames.length === 0) return 'ordinary';
    if (!this.received) {
      this.received = true;
      this.stallTimer?.cancel();
      this.stallTimer = undefined;
    }
    let handed = 0;
    try {
      while (handed < frames.length && !this.closed) {
        const frame = frames[handed++];
        this.uncommitted = HEADER_BYTES + frame.header.size;
        this.handler.onFrame(frame);
        this.commit();
      }
    } finally {
      this.uncommitted = 0;
      for (const rest of frames.slice(handed)) for (const fd of rest.fds) closeQuietly(fd);
    }
    return 'handled';
  }

  /**
   * Takes the message being handled off the socket (commitAfterHandle; nothing otherwise). The
   * session calls it after recording what the message changed and before replying.
   */
  commit(): void {
    // Bounded: each read takes at least one byte of what is left.
    while (this.uncommitted > 0 && !this.closed) {
      const msg = native.recvmsg(this.fd, this.uncommitted);
      if (msg === null || msg.data.length === 0) {
        this.uncommitted = 0;
        return;
      }
      for (const fd of msg.fds) closeQuietly(fd); // the handler has its own duplicates
      this.uncommitted -= Math.min(this.uncommitted, msg.data.length);
    }
  }

  /**
   * A restarted daemon's first look at the socket: nothing queued ('empty'), or the digest of
   * the first whole message (frameDigest), or 'partial'. Nothing is taken off the socket.
   */
  peekHead(): string {
    const frames = this.peekFrames();
    if (frames === 'empty') return 'empty';
    for (const fd of frames.flatMap((f) => f.fds)) closeQuietly(fd);
    return frames[0] === undefined ? 'partial' : frameDigest(frames[0]);
  }

  /**
   * The whole messages queued on the socket, left there (MSG_PEEK; their descriptors are new
   * duplicates, the caller's). None when what is queued is not a whole message, ends the stream,
   * was truncated or does not parse: the ordinary read reports those.
   */
  private peekFrames(): Frame[] | 'empty' {
    const msg = native.recvmsg(this.fd, READ_CHUNK_BYTES, true);
    if (msg === null) return 'empty';
    const peek = new MessageReader(this.expectReplies);
    let frames: Frame[] = [];
    try {
      if (msg.data.length > 0 && !msg.truncated) frames = peek.push(msg.data, msg.fds);
      else for (const fd of msg.fds) closeQuietly(fd);
    } catch (err) {
      if (err instanceof FramingError) for (const fd of err.orphanFds) closeQuietly(fd);
      return [];
    }
    for (const fd of peek.takeFds()) closeQuietly(fd); // a trailing partial message: peeked again later
    return frames;
  }

  /**
   * Queues `bytes` (with `fds` attached to the first byte) and writes as much as possible now.
   * Never throws: a failed write (the peer went away) closes the connection with that error.
   */
  send(bytes: Uint8Array, fds: readonly number[] = []): void {
    if (this.closed) return;
    this.output.push({ bytes, fds });
    this.queuedBytes += bytes.length;
    if (this.queuedBytes > MAX_QUEUED_OUTPUT_BYTES) {
      this.close(new Error(`peer does not read: ${this.queuedBytes} bytes queued`));
      return;
    }
    if (this.output.length !== 1) return;
    try {
      this.flush();
    } catch (err) {
      this.close(err instanceof Error ? err : new Error(errorMessage(err)));
    }
  }

  private flush(): void {
    // Bounded by the queue length; a full socket stops the loop.
    while (this.output.length > 0) {
      const head = this.output[0];
      const n = native.sendmsg(this.fd, head.bytes, head.fds);
      if (n < 0) break;
      this.queuedBytes -= n;
      if (n < head.bytes.length) {
        this.output[0] = { bytes: head.bytes.subarray(n), fds: [] };
        break;
      }
      this.output.shift();
    }
    const wantWritable = this.output.length > 0;
    if (this.watch !== undefined && wantWritable !== this.watchingWritable) {
      this.watchingWritable = wantWritable;
      native.pollUpdate(this.watch, POLL_READABLE | (wantWritable ? POLL_WRITABLE : 0));
    }
  }

  /** Closes the connection (idempotent) and reports it to the handler once. */
  close(error?: Error): void {
    if (this.closed) return;
    this.closed = true;
    this.stallTimer?.cancel();
    this.stallTimer = undefined;
    if (this.watch !== undefined) native.pollStop(this.watch);
    this.watch = undefined;
    for (const fd of this.reader.takeFds()) closeQuietly(fd);
    this.output.length = 0;
    closeQuietly(this.fd);
    this.handler.onClose(error);
  }
}
