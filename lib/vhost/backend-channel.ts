/**
 * The back-end -> front-end channel (SET_BACKEND_REQ_FD): we send CONFIG_CHANGE_MSG on it and,
 * with REPLY_ACK, read the front-end's acks as events. Nothing ever waits on an ack: QEMU may be
 * blocked reading our reply on the main channel, and waiting here would deadlock both.
 *
 * An ack costs the front-end a write and us a wakeup and a read, on the path of every pressure
 * message the policy answers with a new target. So a config change asks for one only as a
 * sample (at most one every ACK_SAMPLE_INTERVAL_MS, enough for pendingAcks to show a front-end
 * that stopped answering) or when the caller needs proof that the front-end's main loop runs
 * (the restart probe, Session.checkLostReply).
 */
import { ErrorCode, ErrorCodeValue } from '../errors';
import { Logger } from '../log';
import { closeQuietly, native } from '../native';
import { decodeU64Reply, encodeMessage } from './codec';
import { BackendRequest, VHOST_USER_NEED_REPLY_MASK, VHOST_USER_VERSION } from './constants';
import { Connection } from './connection';

/** The two CONFIG_CHANGE_MSGs, encoded once (one is sent per new target); only ever read. */
const CONFIG_CHANGE = encodeMessage(BackendRequest.CONFIG_CHANGE_MSG, VHOST_USER_VERSION, { kind: 'none' });
const CONFIG_CHANGE_ASKING_ACK = encodeMessage(
  BackendRequest.CONFIG_CHANGE_MSG,
  VHOST_USER_VERSION | VHOST_USER_NEED_REPLY_MASK,
  { kind: 'none' },
);

/** Acks we accept to be outstanding; beyond that the front-end is not answering. */
const MAX_OUTSTANDING_ACKS = 64;
/** Routine config changes ask for an ack at most this often. */
export const ACK_SAMPLE_INTERVAL_MS = 1000;

export class BackendChannel {
  private readonly conn: Connection;
  private outstanding = 0;
  /** When a config change last asked for an ack (performance.now()). */
  private lastAskMs = -Infinity;
  /** CONFIG_CHANGE messages sent (for tests and metrics). */
  sent = 0;
  private readonly ackListeners: Array<() => void> = [];

  constructor(
    fd: number,
    private readonly log: Logger,
    private readonly onError: (code: ErrorCodeValue, detail: string) => void,
    /** Acks the previous process asked for and may still arrive (a daemon restart). */
    outstanding = 0,
  ) {
    this.outstanding = outstanding;
    this.conn = new Connection(
      fd,
      {
        onFrame: (frame) => {
          for (const extra of frame.fds) {
            // Acks never carry descriptors; close any we were sent.
            closeQuietly(extra);
          }
          if (frame.header.request !== BackendRequest.CONFIG_CHANGE_MSG || this.outstanding === 0) {
            this.onError(
              ErrorCode.VHOST_BAD_MESSAGE,
              `unexpected reply ${frame.header.request} on the back-end channel`,
            );
            this.log.warn('unexpected reply on the back-end channel', { request: frame.header.request });
            return;
          }
          this.outstanding--;
          const listeners = this.ackListeners.splice(0);
          for (const l of listeners) l();
          const status = decodeU64Reply('CONFIG_CHANGE_MSG ack', frame.payload);
          if (status !== 0n) this.log.warn('front-end refused a config change', { status });
        },
        onClose: (error) => {
          if (error !== undefined) {
            this.onError(ErrorCode.VHOST_BAD_MESSAGE, error.message);
            this.log.warn('back-end channel closed', { error: error.message });
          }
        },
      },
      { expectReplies: true },
    );
  }

  get isClosed(): boolean {
    return this.conn.isClosed;
  }

  get fd(): number {
    return this.conn.fd;
  }

  /** Calls `listener` once, at the next ack the front-end sends. */
  onNextAck(listener: () => void): void {
    this.ackListeners.push(listener);
  }

  /**
   * Reads and drops whatever the front-end already sent on this channel (acks for a previous
   * process's messages), now, so that an ack seen later was sent after this moment.
   * Bounded: the socket's receive queue is finite and each read takes at least one byte.
   */
  discardQueued(): void {
    for (;;) {
      const msg = native.recvmsg(this.conn.fd, 64 * 1024);
      if (msg === null || msg.data.length === 0) return;
      for (const fd of msg.fds) closeQuietly(fd);
    }
  }

  /** Acks asked for and not yet received. */
  get pendingAcks(): number {
    return this.outstanding;
  }

  /**
   * Sends VHOST_USER_BACKEND_CONFIG_CHANGE_MSG. With REPLY_ACK negotiated (`replyAck`) it asks
   * for an ack when `needAck`, else as a sample (see ACK_SAMPLE_INTERVAL_MS).
   */
  sendConfigChange(replyAck: boolean, needAck = false): void {
    const now = performance.now();
    const due = needAck || now - this.lastAskMs >= ACK_SAMPLE_INTERVAL_MS;
    const ask = replyAck && due && this.outstanding < MAX_OUTSTANDING_ACKS;
    if (ask) {
      this.outstanding++;
      this.lastAskMs = now;
    }
    this.sent++;
    this.conn.send(ask ? CONFIG_CHANGE_ASKING_ACK : CONFIG_CHANGE);
  }

  close(): void {
    this.conn.close();
  }
}
