/**
 * The one error base class of vballoon. Every failure has a stable `code` (documented in
 * docs/errors.md); messages are for people and may change, codes may not.
 * This module imports nothing, so every layer can use it.
 */

/** All stable error codes. */
export const ErrorCode = {
  /** A front-end message is malformed (header, size, payload, fds). */
  VHOST_BAD_MESSAGE: 'ERR_VHOST_BAD_MESSAGE',
  /** A front-end message exceeds the maximum size; rejected before buffering. */
  VHOST_MESSAGE_TOO_LARGE: 'ERR_VHOST_MESSAGE_TOO_LARGE',
  /** A request id the back-end does not know. */
  VHOST_UNKNOWN_REQUEST: 'ERR_VHOST_UNKNOWN_REQUEST',
  /** A known request that needs a protocol feature that was not negotiated. */
  VHOST_NOT_NEGOTIATED: 'ERR_VHOST_NOT_NEGOTIATED',
  /** Wrong number of file descriptors for a request. */
  VHOST_BAD_FDS: 'ERR_VHOST_BAD_FDS',
  /** A vring index, size or address that is invalid. */
  VHOST_BAD_VRING: 'ERR_VHOST_BAD_VRING',
  /** A memory table that is invalid (overlap, wrap, too many regions) or cannot be mapped. */
  VHOST_BAD_MEMORY: 'ERR_VHOST_BAD_MEMORY',
  /** Features that were not offered. */
  VHOST_BAD_FEATURES: 'ERR_VHOST_BAD_FEATURES',
  /** A config space access out of range. */
  VHOST_BAD_CONFIG: 'ERR_VHOST_BAD_CONFIG',
  /** Descriptors were lost in transit (MSG_CTRUNC) or arrived without a message. */
  VHOST_FDS_LOST: 'ERR_VHOST_FDS_LOST',
  /** A guest address outside guest memory. */
  GUEST_MEMORY_RANGE: 'ERR_GUEST_MEMORY_RANGE',
  /** A malformed descriptor chain; the chain is skipped, the queue keeps running. */
  VIRTQ_BAD_CHAIN: 'ERR_VIRTQ_BAD_CHAIN',
  /** An impossible ring state (index jump, head out of range); the queue is stopped. */
  VIRTQ_BROKEN_RING: 'ERR_VIRTQ_BROKEN_RING',
  /** A balloon target that is not a page count the guest can reach. */
  BALLOON_TARGET: 'ERR_BALLOON_TARGET',
  /** An invalid balloon device configuration. */
  BALLOON_CONFIG: 'ERR_BALLOON_CONFIG',
  /** Fresh guest statistics were asked for, but the stats queue is not running or the guest did not answer. */
  BALLOON_STATS: 'ERR_BALLOON_STATS',
  /** A socket could not be listened on or connected to. */
  SOCKET: 'ERR_SOCKET',
  /** An invalid daemon configuration (file, flag or reload); the message names the field. */
  CONFIG: 'ERR_CONFIG',
  /** The state a restart needs could not be kept (a descriptor not stored, a state not written). */
  RESTART_STATE: 'ERR_RESTART_STATE',
  /** A control request that is not JSON. */
  CONTROL_BAD_JSON: 'ERR_CONTROL_BAD_JSON',
  /** A control request over the size limit. */
  CONTROL_TOO_LARGE: 'ERR_CONTROL_TOO_LARGE',
  /** A control request that is JSON but not a request (no method, not an object, too deep). */
  CONTROL_BAD_REQUEST: 'ERR_CONTROL_BAD_REQUEST',
  /** A control method that does not exist. */
  CONTROL_UNKNOWN_METHOD: 'ERR_CONTROL_UNKNOWN_METHOD',
  /** Control parameters of the wrong type or out of range. */
  CONTROL_BAD_PARAMS: 'ERR_CONTROL_BAD_PARAMS',
  /** A control request names a VM the daemon does not serve. */
  CONTROL_NO_VM: 'ERR_CONTROL_NO_VM',
  /** A control client whose uid may not use the control socket. */
  CONTROL_UNAUTHORIZED: 'ERR_CONTROL_UNAUTHORIZED',
  /** A control connection refused because the daemon already serves the maximum number. */
  CONTROL_BUSY: 'ERR_CONTROL_BUSY',
  /** The CLI cannot reach the daemon, or the daemon did not answer (timeout, closed, not JSON). */
  DAEMON_UNREACHABLE: 'ERR_DAEMON_UNREACHABLE',
  /** A failure that is a bug or an unexpected system error, not bad input. */
  INTERNAL: 'ERR_INTERNAL',
} as const;

export type ErrorCodeValue = (typeof ErrorCode)[keyof typeof ErrorCode];

/** Base class for every vballoon error. */
export class VballoonError extends Error {
  readonly code: ErrorCodeValue;
  constructor(code: ErrorCodeValue, message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.code = code;
    this.name = new.target.name;
  }
}

/** The stable code of any thrown value: its own for a VballoonError, else `ERR_INTERNAL`. */
export function errorCodeOf(err: unknown): ErrorCodeValue {
  return err instanceof VballoonError ? err.code : ErrorCode.INTERNAL;
}

/** The message of any thrown value, for logs and replies. */
export function errorMessage(err: unknown): string {
  return err instanceof Error ? err.message : String(err);
}

/** An invalid daemon configuration (file, flags or reload). */
export class ConfigError extends VballoonError {
  constructor(message: string) {
    super(ErrorCode.CONFIG, message);
  }
}

/** A front-end broke the vhost-user protocol; the connection is closed. */
export class VhostProtocolError extends VballoonError {}

/** A guest address is outside guest memory. */
export class GuestMemoryError extends VballoonError {
  constructor(message: string) {
    super(ErrorCode.GUEST_MEMORY_RANGE, message);
  }
}

/** A virtqueue is malformed (chain-level or ring-level, see the code). */
export class VirtqueueError extends VballoonError {}
