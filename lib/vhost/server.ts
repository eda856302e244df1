/**
 * Serves one device over vhost-user: listens on a socket path (the default; QEMU connects with
 * `-chardev socket,path=...`) or connects to a front-end that listens (`server=on`) and retries
 * until it answers. One front-end at a time; when it disconnects, rings and mappings are
 * dropped, device state is kept, and the next connection is served.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { ErrorCode, ErrorCodeValue, errorMessage, VballoonError } from '../errors';
import { Logger, LogRateLimiter } from '../log';
import { closeQuietly, isSystemError, native, PollHandle, POLL_READABLE } from '../native';
import { SUPPORTED_PROTOCOL_FEATURES } from './constants';
import { VhostUserDevice } from './device';
import { Session, SessionEvents, SessionImage, SessionOptions } from './session';

export interface BackendOptions {
  log: Logger;
  /** Protocol features to offer; defaults to every supported one. */
  protocolFeatures?: bigint;
  /** Called for every message and every error (metrics hook). */
  events?: Partial<SessionEvents> & { onConnectionChange?(connected: boolean): void };
  /** Drop a front-end stalled in the middle of a message after this long (default 10 s). */
  stalledMessageTimeoutMs?: number;
  /** Drop a front-end that sends nothing after connecting for this long (default 30 s). */
  firstMessageTimeoutMs?: number;
  /** After each front-end message is handled, before its reply (SessionOptions.onHandled). */
  onHandled?: SessionOptions['onHandled'];
}

/** After accept(2) fails, the listener is not watched for this long (no spin, no log flood). */
const ACCEPT_BACKOFF_MS = 1000;
/** Repeated warnings of one kind (refused front-ends, accept failures): one line per minute. */
const LOG_EVERY_MS = 60_000;
const onePerMinute = (): LogRateLimiter => new LogRateLimiter(1, LOG_EVERY_MS, () => performance.now());

/**
 * Whether a process listens on the unix socket at `socketPath`, from /proc/net/unix (flag
 * __SO_ACCEPTCON): no connection is made, so a live daemon's VM slot is never touched. Undefined
 * when /proc/net/unix cannot be read.
 */
function listenedOn(socketPath: string): boolean | undefined {
  let table: string;
  try {
    table = fs.readFileSync('/proc/net/unix', 'utf8');
  } catch {
    return undefined;
  }
  const wanted = path.resolve(socketPath);
  // Bounded by the number of unix sockets on the host; each line is one socket.
  for (const line of table.split('\n')) {
    const cols = line.trim().split(/\s+/);
    // Num RefCount Protocol Flags Type St Inode Path
    if (cols.length < 8 || cols[7] !== wanted) continue;
    if ((parseInt(cols[3], 16) & SO_ACCEPTCON) !== 0) return true;
  }
  return false;
}
/** The "listening" flag of /proc/net/unix. */
const SO_ACCEPTCON = 0x10000;

/**
 * Removes a socket file nobody listens on. A live one belongs to another process: ERR_SOCKET, and
 * the file stays (a second daemon must not take a running daemon's VMs away).
 */
function removeStaleSocket(socketPath: string): void {
  let isSocket: boolean;
  try {
    isSocket = fs.lstatSync(socketPath).isSocket();
  } catch (err) {
    if (isSystemError(err, 'ENOENT')) return;
    throw new VballoonError(ErrorCode.SOCKET, `cannot use ${socketPath}: ${errorMessage(err)}`);
  }
  if (!isSocket) return; // listen() fails with EADDRINUSE and says so
  let live = listenedOn(socketPath);
  if (live === undefined) {
    // No /proc: probe with a connection (the other daemon sees a front-end come and go).
    try {
      const fd = native.connect(socketPath);
      if (fd >= 0) native.close(fd);
      live = true;
    } catch {
      live = false; // ECONNREFUSED: stale
    }
  }
  if (live) {
    throw new VballoonError(
      ErrorCode.SOCKET,
      `${socketPath} is in use by another process (another vballoon daemon serving this VM?); leaving it alone`,
    );
  }
  fs.unlinkSync(socketPath);
}

export interface ConnectOptions {
  /** Delay between attempts. */
  retryIntervalMs?: number;
  /** Attempts before giving up (Infinity: forever). */
  maxAttempts?: number;
  /** Reconnect after the front-end goes away. */
  reconnect?: boolean;
}

/** Errors and messages counted by a back-end (the daemon turns them into metrics). */
export class BackendCounters {
  readonly messages = new Map<string, number>();
  readonly errors = new Map<string, number>();
  connections = 0;
  rejectedConnections = 0;
  /** accept(2) failures (descriptor exhaustion and the like). */
  acceptFailures = 0;

  error(code: string): number {
    return this.errors.get(code) ?? 0;
  }
}

export class VhostUserBackend {
  readonly counters = new BackendCounters();
  private session: Session | undefined;
  private listenFd = -1;
  private listenWatch: PollHandle | undefined;
  private socketPath: string | undefined;
  private connectTimer: NodeJS.Timeout | undefined;
  private stopped = false;
  private acceptTimer: NodeJS.Timeout | undefined;
  private readonly refusedLog = onePerMinute();
  private readonly acceptLog = onePerMinute();
  private readonly protocolFeatures: bigint;
  private readonly sessionListeners: Array<(session: Session) => void> = [];

  constructor(
    readonly device: VhostUserDevice,
    private readonly options: BackendOptions,
  ) {
    const offered = options.protocolFeatures ?? SUPPORTED_PROTOCOL_FEATURES;
    if ((offered & ~SUPPORTED_PROTOCOL_FEATURES) !== 0n) {
      throw new VballoonError(
        ErrorCode.VHOST_BAD_FEATURES,
        `protocol features 0x${offered.toString(16)} include unsupported ones`,
      );
    }
    this.protocolFeatures = offered;
  }

  /** The session of the connected front-end, if any. */
  get current(): Session | undefined {
    return this.session;
  }

  get connected(): boolean {
    return this.session !== undefined && !this.session.isClosed;
  }

  /** Called with each new session (tests use it to observe the protocol state). */
  onSession(listener: (session: Session) => void): void {
    this.sessionListeners.push(listener);
  }

  private readonly events: SessionEvents = {
    onMessage: (name) => {
      this.counters.messages.set(name, (this.counters.messages.get(name) ?? 0) + 1);
      this.options.events?.onMessage?.(name);
    },
    onError: (code: ErrorCodeValue, detail: string) => {
      this.counters.errors.set(code, (this.counters.errors.get(code) ?? 0) + 1);
      this.options.events?.onError?.(code, detail);
    },
  };

  /** Serves a connected socket (takes ownership of `fd`). */
  serveFd(fd: number, onEnd?: () => void): Session {
    return this.track((options) => new Session(fd, this.device, options), onEnd);
  }

  /**
   * Serves the connection a previous daemon process served (Session.resume; takes ownership of
   * the image's descriptors, also when it throws).
   */
  resume(image: SessionImage): Session {
    return this.track((options) => Session.resume(image, this.device, options));
  }

  private track(make: (options: SessionOptions) => Session, onEnd?: () => void): Session {
    this.counters.connections++;
    const log = this.options.log.child({ conn: this.counters.connections });
    const { stalledMessageTimeoutMs, firstMessageTimeoutMs } = this.options;
    const onHandled = this.options.onHandled?.bind(this.options);
    const session = make({
      protocolFeatures: this.protocolFeatures,
      log,
      events: this.events,
      ...(stalledMessageTimeoutMs === undefined ? {} : { stalledMessageTimeoutMs }),
      ...(firstMessageTimeoutMs === undefined ? {} : { firstMessageTimeoutMs }),
      ...(onHandled === undefined ? {} : { onHandled }),
    });
    this.session = session;
    this.options.events?.onConnectionChange?.(true);
    session.onClose(() => {
      if (this.session === session) this.session = undefined;
      this.options.events?.onConnectionChange?.(false);
      onEnd?.();
    });
    for (const l of this.sessionListeners) l(session);
    return session;
  }

  /** The listening socket, if this back-end listens (a restartable daemon keeps it). */
  get listener(): number {
    return this.listenFd;
  }

  /**
   * Listens on a socket a previous daemon process listened on (`fd`, bound to `socketPath`),
   * instead of binding a new one: the path never disappears while a VM may look for it.
   */
  adoptListener(fd: number, socketPath: string): void {
    if (this.listenFd >= 0) throw new VballoonError(ErrorCode.SOCKET, 'already listening');
    native.setNonBlocking(fd, true);
    this.listenFd = fd;
    this.socketPath = socketPath;
    this.listenWatch = native.pollStart(this.listenFd, POLL_READABLE, () => this.acceptPending());
    this.options.log.info('listening for a front-end (socket kept from the previous process)', {
      socket: socketPath,
    });
  }

  /**
   * Listens on `socketPath`. A stale socket file there (nobody listening) is replaced; a socket
   * another process listens on is left alone and refused (a second daemon must not take a running
   * daemon's VMs away); any other file is an error.
   */
  listen(socketPath: string): void {
    if (this.listenFd >= 0) throw new VballoonError(ErrorCode.SOCKET, 'already listening');
    removeStaleSocket(socketPath);
    try {
      this.listenFd = native.listen(socketPath, 4);
    } catch (err) {
      throw new VballoonError(ErrorCode.SOCKET, `cannot listen on ${socketPath}: ${(err as Error).message}`, {
        cause: err,
      });
    }
    this.socketPath = socketPath;
    this.listenWatch = native.pollStart(this.listenFd, POLL_READABLE, () => this.acceptPending());
    this.options.log.info('listening for a front-end', { socket: socketPath });
  }

  private acceptPending(): void {
    // Bounded: a listen backlog of 4, and each iteration consumes one pending connection.
    for (let i = 0; i < 8; i++) {
      let fd: number;
      try {
        fd = native.accept(this.listenFd);
      } catch (err) {
        this.acceptFailed(err);
        return;
      }
      if (fd < 0) return;
      if (this.connected) {
        this.counters.rejectedConnections++;
        if (this.refusedLog.take() !== undefined)
          this.options.log.warn('refusing a second front-end: one is already connected', {
            refused: this.counters.rejectedConnections,
          });
        closeQuietly(fd);
        continue;
      }
      this.options.log.info('front-end connected', { socket: this.socketPath });
      this.serveFd(fd);
    }
  }

  /**
   * accept(2) failed (EMFILE, ENFILE, ENOMEM...): the pending connection stays, so the listener
   * would wake again at once and spin. Stop watching it for ACCEPT_BACKOFF_MS, then try again.
   */
  private acceptFailed(err: unknown): void {
    this.counters.acceptFailures++;
    if (this.acceptLog.take() !== undefined)
      this.options.log.error('accept failed; pausing this socket', {
        socket: this.socketPath,
        error: errorMessage(err),
        failures: this.counters.acceptFailures,
        pauseMs: ACCEPT_BACKOFF_MS,
      });
    if (this.listenWatch !== undefined) native.pollStop(this.listenWatch);
    this.listenWatch = undefined;
    this.acceptTimer ??= setTimeout(() => {
      this.acceptTimer = undefined;
      if (this.stopped || this.listenFd < 0) return;
      this.listenWatch = native.pollStart(this.listenFd, POLL_READABLE, () => this.acceptPending());
    }, ACCEPT_BACKOFF_MS);
    this.acceptTimer.unref();
  }

  /**
   * Connects to a listening front-end, retrying; resolves once connected the first time. The
   * connect itself never blocks the event loop (other VMs keep running): a front-end whose
   * listen backlog is full is retried like one that is not there yet.
   */
  connect(socketPath: string, opts: ConnectOptions = {}): Promise<void> {
    const interval = opts.retryIntervalMs ?? 1000;
    const maxAttempts = opts.maxAttempts ?? Infinity;
    let attempts = 0;
    return new Promise<void>((resolve, reject) => {
      let settled = false;
      const attempt = (): void => {
        this.connectTimer = undefined;
        if (this.stopped) return;
        attempts++;
        let fd: number;
        try {
          // Never blocks: -1 means the front-end's listen backlog is full; retry like ENOENT.
          fd = native.connect(socketPath);
          if (fd < 0) throw new Error("the front-end's listen backlog is full (EAGAIN)");
        } catch (err) {
          if (attempts >= maxAttempts) {
            const error = new VballoonError(
              ErrorCode.SOCKET,
              `cannot connect to ${socketPath}: ${(err as Error).message}`,
            );
            if (!settled) {
              settled = true;
              reject(error);
            } else this.options.log.error('giving up reconnecting', { socket: socketPath, attempts });
            return;
          }
          if (attempts === 1 || attempts % 30 === 0) {
            this.options.log.info('front-end not reachable yet, retrying', {
              socket: socketPath,
              error: (err as Error).message,
            });
          }
          this.connectTimer = setTimeout(attempt, interval);
          return;
        }
        this.options.log.info('connected to front-end', { socket: socketPath });
        attempts = 0;
        this.serveFd(fd, () => {
          if (opts.reconnect !== false && !this.stopped) this.connectTimer = setTimeout(attempt, interval);
        });
        if (!settled) {
          settled = true;
          resolve();
        }
      };
      attempt();
    });
  }

  /** Stops listening/connecting and closes the current connection. Removes the socket file. */
  close(): void {
    this.stopped = true;
    if (this.connectTimer !== undefined) clearTimeout(this.connectTimer);
    this.connectTimer = undefined;
    if (this.acceptTimer !== undefined) clearTimeout(this.acceptTimer);
    this.acceptTimer = undefined;
    if (this.listenWatch !== undefined) native.pollStop(this.listenWatch);
    this.listenWatch = undefined;
    closeQuietly(this.listenFd);
    this.listenFd = -1;
    if (this.socketPath !== undefined) {
      try {
        fs.unlinkSync(this.socketPath);
      } catch {
        // Already gone.
      }
      this.socketPath = undefined;
    }
    this.session?.close();
    this.session = undefined;
  }
}
