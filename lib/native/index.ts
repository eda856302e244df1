/**
 * The only module that loads the native addon (lib/native/vballoon.c). It exports one typed
 * interface over the syscalls Node cannot make by itself. No protocol logic lives here or in C.
 *
 * Every function throws a {@link SystemError} (code "EBADF", errno -9, syscall "mmap", ...) when
 * its syscall fails; "would block" is reported by a return value, never by an exception.
 */
import * as path from 'node:path';

/** An Error raised by a failing syscall, shaped like Node's own system errors. */
export interface SystemError extends Error {
  code: string;
  errno: number;
  syscall: string;
}

/** One recvmsg result. `data.length === 0` means the peer closed the stream. */
export interface ReceivedMessage {
  data: Buffer;
  /** Descriptors that arrived with this read; the caller owns (and must close) them. */
  fds: number[];
  /** MSG_CTRUNC: descriptors were lost; those that arrived were already closed. */
  truncated: boolean;
}

/** One datagram read by dgramRecv. */
export interface ReceivedDatagram {
  text: string;
  /** Descriptors that came with it (close-on-exec); the caller owns (and must close) them. */
  fds: number[];
  /** The sender's pid (SCM_CREDENTIALS), when the socket was bound with passCred. */
  pid?: number;
  /** The datagram or its descriptors did not fit: those that arrived were closed, fds is empty. */
  truncated: boolean;
}

/** Descriptors the kernel carries in one SCM_RIGHTS message (SCM_MAX_FD): batch bigger sets. */
export const SCM_MAX_FDS = 253;

export interface FileStatus {
  size: number;
  /** Bytes the file system really holds for the file (st_blocks * 512). */
  allocatedBytes: number;
  blockSize: number;
  /** File system block size: the huge page size on hugetlbfs. */
  fsBlockSize: number;
  fsType: number;
  /** Device and inode: the identity of the open file (regions often share one memfd). */
  dev: number;
  ino: number;
  nonBlocking: boolean;
}

/** Opaque handle of a punch queue (a worker thread that punches holes). */
export type PunchQueueHandle = { readonly __punchQueue: unique symbol };

/**
 * Layout of the completion records of a punch queue: RECORD doubles per batch, at these offsets.
 * `firstErrno` is the positive errno of the first failed punch (0 if none); `busyNs` the time
 * the worker spent in fallocate for the batch.
 */
export const PUNCH_RECORD = { size: 6, seq: 0, calls: 1, bytes: 2, errors: 3, firstErrno: 4, busyNs: 5 } as const;

/** Opaque handle of an fd watcher. */
export type PollHandle = { readonly __pollHandle: unique symbol };

/** memfd seals (fcntl F_ADD_SEALS / F_GET_SEALS). */
export const F_SEAL_SEAL = 0x1;
export const F_SEAL_SHRINK = 0x2;
export const F_SEAL_GROW = 0x4;
export const F_SEAL_WRITE = 0x8;

/** Largest single mmap() (Node's Buffer limit); bigger regions are mapped as windows. */
export const MAX_MAPPING_BYTES = 2 ** 32;

export const POLL_READABLE = 1;
export const POLL_WRITABLE = 2;
/**
 * pollStart flag: the fd is an eventfd (a kick). The watcher reads the counter itself before
 * each callback (passed as `count`), so a level-triggered watch can never spin; any error,
 * hangup or failing read stops the watch and is reported once as status < 0.
 */
export const POLL_EVENTFD = 0x100;
/** libuv's UV_EOF: the status of an eventfd watch whose fd hung up (a pipe, a closed socket). */
export const POLL_STATUS_HANGUP = -4095;

/** What a descriptor is (fdKind); vhost-user wants an eventfd for kick, call and err. */
export type FdKind = 'eventfd' | 'pipe' | 'socket' | 'file' | 'directory' | 'char' | 'block' | 'anon' | 'other';

export interface NativeAddon {
  listen(path: string, backlog: number): number;
  /** -1 when no connection is pending. */
  accept(fd: number): number;
  /** A connected non-blocking socket, or -1 when the listener's backlog is full (retry later).
   * Never blocks (a blocking unix connect sleeps until the listener accepts). */
  connect(path: string): number;
  socketpair(): [number, number];
  /** A blocking pipe [readFd, writeFd] (tests use it as a hostile front-end's descriptor). */
  pipe(): [number, number];
  /** Sets or clears O_NONBLOCK on the open file description (shared with every holder). */
  setNonBlocking(fd: number, on: boolean): void;
  /** null when nothing can be read now. */
  /** `peek`: MSG_PEEK (the bytes stay queued; descriptors arrive as new duplicates). */
  recvmsg(fd: number, maxBytes: number, peek?: boolean): ReceivedMessage | null;
  /** Bytes sent, or -1 when the socket buffer is full. */
  sendmsg(fd: number, data: Uint8Array, fds?: readonly number[]): number;
  /**
   * Watches `fd`; `callback(status, events)` runs on the event loop; status < 0 is a libuv error.
   * With POLL_EVENTFD, `count` is the counter the watcher read; status < 0 (POLL_STATUS_HANGUP for
   * end of file, else -errno) means the watch has stopped for good: stop using the fd.
   */
  pollStart(fd: number, events: number, callback: (status: number, events: number, count?: number) => void): PollHandle;
  pollUpdate(handle: PollHandle, events: number): void;
  /** Idempotent. Always stop watching before closing the fd. */
  pollStop(handle: PollHandle): void;
  /** Watches libuv is actively polling (stopped and failed ones are not), for tests. */
  pollCount(): number;
  eventfd(initial: number, nonBlocking: boolean): number;
  /**
   * The counter (reset to 0), or null when it was 0. Never blocks, whatever the fd's mode now
   * or later (the front-end shares it and may flip O_NONBLOCK): RWF_NOWAIT. Throws EPIPE at end
   * of file and EINVAL on a short read (not an eventfd). `mayBlock` is accepted and ignored.
   */
  eventfdRead(fd: number, mayBlock?: boolean): number | null;
  /**
   * false when it would block (the counter is full, or a pipe in its place is full). Never
   * blocks: poll first, then the write under a 1 ms signal guard (the kernel has no per-call
   * non-blocking write for eventfds), so a front-end racing us costs at most 1 ms.
   */
  eventfdWrite(fd: number, value?: number): boolean;
  /** What the descriptor is, to refuse anything but an eventfd where vhost-user wants one. */
  fdKind(fd: number): FdKind;
  /** A MAP_SHARED mapping as an ArrayBuffer; offset must be page-aligned, length <= 4 GiB
   * (MAX_MAPPING_BYTES: Node-API external buffers cannot be larger). */
  mmap(fd: number, length: number, offset: number, writable?: boolean): ArrayBuffer;
  /** Unmaps and detaches: every view over the buffer becomes empty instead of dangling. */
  munmap(buffer: ArrayBuffer): void;
  /** Mappings made by mmap() and not yet unmapped (for leak checks). */
  mappingCount(): number;
  /**
   * True if the file behind the mapping shrank under it: the SIGBUS that touching it raised was
   * survived by replacing the rest of the mapping with private zero pages. The front-end did it.
   */
  mappingFaulted(buffer: ArrayBuffer): boolean;
  /** SIGBUS faults in mappings survived since the process started. */
  mappingFaults(): number;
  /** A memfd's F_SEAL_* bits, or null for a file without seals (not a memfd). */
  fileSeals(fd: number): number | null;
  /** F_ADD_SEALS, as QEMU seals its guest memfds. */
  addSeals(fd: number, seals: number): void;
  /** fallocate(PUNCH_HOLE | KEEP_SIZE). */
  punchHole(fd: number, offset: number, length: number): void;
  /**
   * A punch queue: a worker thread that punches submitted batches of file ranges in order, off
   * the event loop. `onDone` runs on the event loop with the records of completed batches (see
   * {@link PUNCH_RECORD}) that punchQueueWait did not already hand back. An idle queue keeps
   * neither the process alive nor `onDone` from being collected (keep a reference to it).
   */
  punchQueueCreate(onDone: (records: Float64Array) => void): PunchQueueHandle;
  /**
   * Queues one batch: `ranges` holds (offset, length) pairs on `fd`, punched on the worker's own
   * dup() of `fd` (closing `fd` meanwhile is safe). Returns the batch's sequence number (from 1).
   */
  punchQueueSubmit(queue: PunchQueueHandle, fd: number, ranges: Float64Array): number;
  /**
   * Blocks until batch `seq` and every batch before it are punched; returns the records of every
   * completed batch not yet handed back. Only for what the device must not go on without.
   */
  punchQueueWait(queue: PunchQueueHandle, seq: number): Float64Array;
  /** Drops batches not started, waits for the one in progress, stops the thread. Idempotent. */
  punchQueueClose(queue: PunchQueueHandle): void;
  memfdCreate(name: string, hugetlb?: boolean): number;
  ftruncate(fd: number, size: number): void;
  fstat(fd: number): FileStatus;
  /** Credentials of the peer of a connected unix socket (SO_PEERCRED). */
  peerCred(fd: number): { pid: number; uid: number; gid: number };
  /** A new close-on-exec descriptor for the same open file. */
  dup(fd: number): number;
  /** Whether two descriptors share one open file description (kcmp KCMP_FILE). */
  sameFile(a: number, b: number): boolean;
  close(fd: number): void;
  /** A full memory barrier. */
  fence(): void;
  /**
   * A 48-bit hash of `length` bytes of `data` from `offset` (ERANGE beyond its end): tells a
   * record written whole from one a SIGKILL cut short. Not cryptographic.
   */
  checksum(data: Uint8Array, offset: number, length: number): number;
  /**
   * Sends `text` as one datagram to the AF_UNIX datagram socket at `address` (a path, or an
   * abstract name written "@name"), with `fds` (at most SCM_MAX_FDS, else EINVAL) as SCM_RIGHTS.
   * Synchronous: when it returns, the receiver has the datagram and its descriptors queued (the
   * caller may close its copies). Waits at most 5 s for room in the receiver's queue (EAGAIN).
   */
  notifySend(address: string, text: string, fds?: readonly number[]): void;
  /** A bound, non-blocking, close-on-exec datagram socket at `address` (path or "@name");
   * `passCred` (default true) sets SO_PASSCRED so dgramRecv reports the sender's pid. */
  dgramListen(address: string, passCred?: boolean): number;
  /** One datagram with up to SCM_MAX_FDS descriptors, or null when none is queued. */
  dgramRecv(fd: number): ReceivedDatagram | null;
  /** Sets (default) or clears FD_CLOEXEC on `fd`. */
  setCloseOnExec(fd: number, on?: boolean): void;
}

function loadAddon(): NativeAddon {
  // dist/lib/native/index.js and lib/native/index.ts both sit three levels under the root.
  const root = path.resolve(__dirname, '..', '..', '..');
  const candidates = [
    path.join(root, 'build', 'Release', 'vballoon.node'),
    path.resolve(__dirname, '..', '..', 'build', 'Release', 'vballoon.node'),
  ];
  let lastError: unknown;
  for (const candidate of candidates) {
    try {
      // eslint-disable-next-line @typescript-eslint/no-require-imports -- a .node addon loads only through require
      return require(candidate) as NativeAddon;
    } catch (err) {
      lastError = err;
    }
  }
  throw new Error(
    `vballoon: the native addon is not built (run "npm install" to build it with node-gyp): ${String(lastError)}`,
  );
}

/** The addon. */
export const native: NativeAddon = loadAddon();

/** True if `err` is a SystemError from the addon (or from Node) with the given code. */
export function isSystemError(err: unknown, code?: string): err is SystemError {
  return (
    err instanceof Error &&
    typeof (err as SystemError).code === 'string' &&
    typeof (err as SystemError).syscall === 'string' &&
    (code === undefined || (err as SystemError).code === code)
  );
}

/** Closes `fd`, ignoring errors (for cleanup paths where the fd may already be gone). */
export function closeQuietly(fd: number): void {
  if (fd < 0) return;
  try {
    native.close(fd);
  } catch {
    // Cleanup path: the descriptor is released by the kernel whatever close() reports.
  }
}
