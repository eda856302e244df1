/**
 * Reassembles vhost-user messages from a byte stream that may split or merge them across reads,
 * and attaches the descriptors that arrived with a read to the last message whose header starts
 * in that read (the spec: descriptors travel with the first byte of a message's header; Linux
 * ends a read right after the segment that carried them).
 *
 * An explicit state machine (header, then payload); the payload size is checked against the
 * maximum as soon as the header is complete, before any payload byte is buffered. Pure: no I/O.
 */
import { ErrorCode, VhostProtocolError } from '../errors';
import { decodeHeader, Header } from './codec';
import { HEADER_BYTES, MAX_FDS_PER_MESSAGE } from './constants';

export interface Frame {
  header: Header;
  payload: Uint8Array;
  /** Owned by the receiver of the frame. */
  fds: number[];
}

/** Thrown by push(); carries the descriptors the reader held, so the caller can close them. */
export class FramingError extends VhostProtocolError {
  constructor(
    cause: VhostProtocolError,
    readonly orphanFds: number[],
  ) {
    super(cause.code, cause.message);
  }
}

export class MessageReader {
  private readonly header = new Uint8Array(HEADER_BYTES);
  private headerFilled = 0;
  private current: Header | undefined;
  private payload = new Uint8Array(0);
  private payloadFilled = 0;
  private currentFds: number[] = [];
  private broken = false;

  /** @param expectReply true on a channel where we receive replies (the back-end channel). */
  constructor(private readonly expectReply = false) {}

  /** True while a message is partly received. */
  get midMessage(): boolean {
    return this.headerFilled > 0;
  }

  /**
   * Feeds one read. Returns the messages completed by it.
   * @throws FramingError (with every descriptor the reader still owned) on a protocol error;
   *   the reader is then unusable.
   */
  push(data: Uint8Array, fds: readonly number[] = []): Frame[] {
    if (this.broken)
      throw new FramingError(new VhostProtocolError(ErrorCode.VHOST_BAD_MESSAGE, 'stream already broken'), [...fds]);
    const frames: Frame[] = [];
    // The last message whose header starts in this read: a completed frame, or 'current'.
    let startedHere: Frame | 'current' | undefined;
    let pos = 0;
    try {
      if (fds.length > MAX_FDS_PER_MESSAGE) {
        throw new VhostProtocolError(
          ErrorCode.VHOST_BAD_FDS,
          `${fds.length} descriptors in one read exceed ${MAX_FDS_PER_MESSAGE}`,
        );
      }
      // Each iteration consumes at least one byte, so this ends after data.length iterations.
      while (pos < data.length) {
        if (this.current === undefined) {
          if (this.headerFilled === 0) startedHere = 'current';
          const n = Math.min(HEADER_BYTES - this.headerFilled, data.length - pos);
          this.header.set(data.subarray(pos, pos + n), this.headerFilled);
          this.headerFilled += n;
          pos += n;
          if (this.headerFilled < HEADER_BYTES) break;
          this.current = decodeHeader(this.header, this.expectReply); // checks the size limit first
          this.payload = new Uint8Array(this.current.size);
          this.payloadFilled = 0;
        } else {
          const n = Math.min(this.current.size - this.payloadFilled, data.length - pos);
          this.payload.set(data.subarray(pos, pos + n), this.payloadFilled);
          this.payloadFilled += n;
          pos += n;
        }
        if (this.current !== undefined && this.payloadFilled === this.current.size) {
          const frame: Frame = { header: this.current, payload: this.payload, fds: this.currentFds };
          frames.push(frame);
          if (startedHere === 'current') startedHere = frame;
          this.current = undefined;
          this.headerFilled = 0;
          this.currentFds = [];
        }
      }
      if (fds.length > 0) {
        // Linux ends a read right after the segment that carried descriptors, and the sender
        // attaches them to the sendmsg holding a header's first byte: so they belong to the last
        // message that starts in this read.
        if (startedHere === undefined) {
          throw new VhostProtocolError(
            ErrorCode.VHOST_FDS_LOST,
            `${fds.length} descriptors arrived in the middle of a message`,
          );
        }
        if (startedHere === 'current') this.currentFds = [...fds];
        else startedHere.fds = [...fds];
      }
      return frames;
    } catch (err) {
      this.broken = true;
      // Descriptors are attached only after the loop, which is the last thing that can throw.
      const orphans = [...this.currentFds, ...fds, ...frames.flatMap((f) => f.fds)];
      this.currentFds = [];
      if (err instanceof VhostProtocolError) throw new FramingError(err, orphans);
      throw err;
    }
  }

  /** Descriptors held for an incomplete message (to close when the stream ends). */
  takeFds(): number[] {
    const fds = this.currentFds;
    this.currentFds = [];
    return fds;
  }
}
