/**
 * The control API server: newline-delimited JSON requests and responses on a unix socket (mode
 * 0600 by default; TCP only if configured). Each request is checked before anything changes:
 * size, nesting depth, JSON, method, parameters, and the caller's credentials (SO_PEERCRED: root
 * or the daemon's own user). docs/control-api.md is the reference, docs/security.md the limits.
 *
 * A local client shares the daemon with every VM, so nothing it sends may cost unbounded memory,
 * descriptors, stack or event-loop time: connections, pipelined requests, unread replies and
 * nesting are all capped, and a refusal is answered, counted and logged (rate-limited).
 */
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as path from 'node:path';
import { ErrorCode, errorCodeOf, ErrorCodeValue, errorMessage, VballoonError } from '../errors';
import { LogRateLimiter, Logger } from '../log';
import { isSystemError, native } from '../native';

function tooLarge(): VballoonError {
  return new VballoonError(ErrorCode.CONTROL_TOO_LARGE, `request larger than ${MAX_REQUEST_BYTES} bytes`);
}

/** Largest request line; a longer one is refused and the connection closed. */
export const MAX_REQUEST_BYTES = 64 * 1024;
/**
 * Deepest nesting of objects and arrays in a request. A real request needs 3 (request, params,
 * `events`); the cap keeps JSON.parse, JSON.stringify of a reply echoing the `id`, and logging
 * far from the stack limit (5,000 levels in 10 KB used to end the daemon).
 */
export const MAX_REQUEST_DEPTH = 16;
/** Connections served at once; one more is answered EBUSY and closed. */
export const MAX_CONNECTIONS = 64;
/**
 * Requests of one connection read but not answered yet. Past it the connection is not read until
 * answers go out, so a client pipelining requests holds at most this many in the daemon.
 */
export const MAX_PIPELINED_REQUESTS = 16;
/**
 * Reply bytes queued for one client that does not read them. Past it the connection is not read
 * (no new requests, so no new replies) until the client drains it: memory per connection stays
 * bounded (a client that never read grew the daemon by 1 GB in 18 s).
 */
export const MAX_CLIENT_OUTPUT_BYTES = 1024 * 1024;
/**
 * Refusals are logged at most REFUSAL_LOG_BURST times per this interval (then one line with the
 * count of those not logged): a client sending bad requests or connections in a loop must not
 * flood the journal nor spend the event loop on log lines. Every refusal is counted in metrics.
 */
export const REFUSAL_LOG_INTERVAL_MS = 60_000;
/** Refused requests logged per interval (connections refused EBUSY: one line per interval). */
export const REFUSAL_LOG_BURST = 20;

/** A connection idle this long is closed (not a subscription: it waits for events). */
const IDLE_TIMEOUT_MS = 60_000;
/** A subscriber that lets this much output pile up unread is disconnected (bounded memory). */
export const MAX_SUBSCRIBER_BACKLOG_BYTES = 1024 * 1024;

/** Stable error codes of the control API. */
export type ControlErrorCode =
  | 'EBADJSON'
  | 'ETOOLARGE'
  | 'EBADREQUEST'
  | 'EUNKNOWNMETHOD'
  | 'EBADPARAMS'
  | 'ENOVM'
  | 'ETARGET'
  | 'ESTATS'
  | 'EUNAUTHORIZED'
  | 'EBUSY'
  | 'EINTERNAL';

/**
 * The one place where the daemon's error codes become the control API's wire codes. Handlers throw
 * VballoonErrors; anything else (or a code not listed) is a bug and answers EINTERNAL.
 */
const WIRE_CODES: Partial<Record<ErrorCodeValue, ControlErrorCode>> = {
  [ErrorCode.CONTROL_BAD_JSON]: 'EBADJSON',
  [ErrorCode.CONTROL_TOO_LARGE]: 'ETOOLARGE',
  [ErrorCode.CONTROL_BAD_REQUEST]: 'EBADREQUEST',
  [ErrorCode.CONTROL_UNKNOWN_METHOD]: 'EUNKNOWNMETHOD',
  [ErrorCode.CONTROL_BAD_PARAMS]: 'EBADPARAMS',
  [ErrorCode.CONTROL_NO_VM]: 'ENOVM',
  [ErrorCode.CONTROL_UNAUTHORIZED]: 'EUNAUTHORIZED',
  [ErrorCode.CONTROL_BUSY]: 'EBUSY',
  [ErrorCode.BALLOON_TARGET]: 'ETARGET',
  [ErrorCode.BALLOON_STATS]: 'ESTATS',
  [ErrorCode.CONFIG]: 'EBADPARAMS',
};

/** The control API code for a thrown value. */
export function wireCodeOf(err: unknown): ControlErrorCode {
  return WIRE_CODES[errorCodeOf(err)] ?? 'EINTERNAL';
}

/** The daemon code behind a control API code (for the client side). */
export function errorCodeForWire(wire: string): ErrorCodeValue {
  for (const [code, w] of Object.entries(WIRE_CODES)) if (w === wire) return code as ErrorCodeValue;
  return ErrorCode.INTERNAL;
}

export type Handler = (params: Record<string, unknown>) => unknown;

/** A subscription's filter (the `subscribe` method's params). */
export interface SubscribeFilter {
  vm?: string;
  events?: string[];
}

export interface ControlServerOptions {
  log: Logger;
  handlers: Record<string, Handler>;
  /**
   * Event source for the `subscribe` method: called with a sender; returns the unsubscribe
   * function. Without it `subscribe` is an unknown method.
   */
  subscribe?(send: (event: { event: string; vm: string } & Record<string, unknown>) => void): () => void;
  /** Checks a subscription's params (unknown VM or event type: a VballoonError). */
  checkSubscription?(filter: SubscribeFilter): void;
  /** Counts rejected requests by code (metrics). */
  onError?(code: ControlErrorCode): void;
  /** Milliseconds clock for rate-limited logging (Date.now by default). */
  now?: () => number;
}

/**
 * Whether `text` nests objects and arrays deeper than `max` (brackets inside strings do not
 * count). One linear pass without recursion, bounded by the line limit; run before JSON.parse.
 */
export function nestingDeeperThan(text: string, max: number): boolean {
  let depth = 0;
  let inString = false;
  for (let i = 0; i < text.length; i++) {
    const c = text.charCodeAt(i);
    if (inString) {
      if (c === 0x5c /* \\ */) i++;
      else if (c === 0x22 /* " */) inString = false;
    } else if (c === 0x22) inString = true;
    else if (c === 0x7b /* { */ || c === 0x5b /* [ */) {
      if (++depth > max) return true;
    } else if (c === 0x7d /* } */ || c === 0x5d /* ] */) depth--;
  }
  return false;
}

function respond(socket: net.Socket, body: Record<string, unknown>): void {
  if (!socket.destroyed) socket.write(`${JSON.stringify(body)}\n`);
}

export class ControlServer {
  private readonly servers: net.Server[] = [];
  private readonly sockets = new Set<net.Socket>();
  private socketPath: string | undefined;
  private readonly busyLog: LogRateLimiter;
  private readonly refusalLog: LogRateLimiter;

  constructor(private readonly options: ControlServerOptions) {
    const now = options.now ?? ((): number => Date.now());
    this.busyLog = new LogRateLimiter(1, REFUSAL_LOG_INTERVAL_MS, now);
    this.refusalLog = new LogRateLimiter(REFUSAL_LOG_BURST, REFUSAL_LOG_INTERVAL_MS, now);
  }

  /** Changes the unix socket's permissions (a reload). */
  setMode(mode: number): void {
    if (this.socketPath !== undefined) fs.chmodSync(this.socketPath, mode);
  }

  /**
   * Listens on `socketPath` with `mode`. A stale socket of ours is replaced; a socket owned by
   * another user, a socket in use, or a file that is not a socket is an error.
   */
  async listenUnix(socketPath: string, mode: number): Promise<void> {
    prepareSocketPath(socketPath);
    const server = this.makeServer(true);
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      // Create the socket file with no access for others, then set the configured mode. Node binds
      // a unix path inside listen() itself, so the umask is restored right after it, whatever
      // happens (it used to stay 0177 for the whole process when listening failed).
      const oldMask = process.umask(0o177);
      try {
        server.listen(socketPath, () => resolve());
      } finally {
        process.umask(oldMask);
      }
    });
    fs.chmodSync(socketPath, mode);
    this.socketPath = socketPath;
    this.servers.push(server);
  }

  /** Listens on TCP (only when configured; no credentials are available there). */
  async listenTcp(host: string, port: number): Promise<net.AddressInfo> {
    const server = this.makeServer(false);
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen(port, host, () => resolve());
    });
    this.servers.push(server);
    this.options.log.warn('control API listening on TCP: anyone who can reach it can control the balloons', {
      host,
      port,
    });
    return server.address() as net.AddressInfo;
  }

  private makeServer(unix: boolean): net.Server {
    // No server.maxConnections: Node would close the connections past it without a word.
    return net.createServer((socket) =>
      this.sockets.size >= MAX_CONNECTIONS ? this.refuseBusy(socket) : this.serve(socket, unix),
    );
  }

  /** Answers EBUSY and closes; counted every time, logged once per REFUSAL_LOG_INTERVAL_MS. */
  private refuseBusy(socket: net.Socket): void {
    socket.on('error', () => socket.destroy());
    const message = `the daemon already serves ${MAX_CONNECTIONS} control connections; try again later`;
    this.options.onError?.('EBUSY');
    // The reply fits in the socket buffer: end() flushes it and releases the descriptor now.
    socket.end(`${JSON.stringify({ id: null, ok: false, error: { code: 'EBUSY', message } })}\n`);
    socket.destroySoon();
    const suppressed = this.busyLog.take();
    if (suppressed !== undefined)
      this.options.log.warn('control connection refused: too many open (logged once a minute)', {
        code: 'EBUSY',
        maxConnections: MAX_CONNECTIONS,
        refusedSinceLastLine: suppressed + 1,
      });
  }

  private serve(socket: net.Socket, unix: boolean): void {
    this.sockets.add(socket);
    socket.on('close', () => this.sockets.delete(socket));
    socket.on('error', () => socket.destroy());
    socket.setTimeout(IDLE_TIMEOUT_MS, () => socket.destroy());
    const fail = (id: unknown, err: VballoonError): void => {
      const code = wireCodeOf(err);
      const message = err.message;
      this.options.onError?.(code);
      const suppressed = this.refusalLog.take();
      if (suppressed !== undefined)
        this.options.log.warn('control request refused', {
          code,
          error: message,
          ...(suppressed > 0 ? { notLogged: suppressed } : {}),
        });
      respond(socket, { id: id ?? null, ok: false, error: { code, message } });
    };
    if (unix) {
      const fd = (socket as unknown as { _handle?: { fd?: number } })._handle?.fd;
      let allowed = false;
      try {
        const cred = fd === undefined ? undefined : native.peerCred(fd);
        allowed = cred !== undefined && (cred.uid === 0 || cred.uid === process.geteuid?.());
        if (!allowed)
          fail(
            null,
            new VballoonError(
              ErrorCode.CONTROL_UNAUTHORIZED,
              `uid ${cred?.uid ?? '?'} may not use this control socket (only root and uid ${process.geteuid?.()})`,
            ),
          );
      } catch (err) {
        fail(null, new VballoonError(ErrorCode.INTERNAL, `cannot read peer credentials: ${errorMessage(err)}`));
      }
      if (!allowed) {
        socket.end();
        return;
      }
    }
    let buffered = '';
    let chain = Promise.resolve();
    /** Requests read and not answered yet (bounded by MAX_PIPELINED_REQUESTS). */
    let pending = 0;
    let tooLargeSent = false;
    let saidSlow = false;
    // Takes complete lines while this connection may have more in flight, then reads on only if
    // there is room for more requests and its unread replies are under MAX_CLIENT_OUTPUT_BYTES.
    const pump = (): void => {
      if (socket.destroyed || tooLargeSent) return;
      // Bounded by MAX_PIPELINED_REQUESTS; lines left over wait in `buffered` (reading is paused).
      while (pending < MAX_PIPELINED_REQUESTS && socket.writableLength <= MAX_CLIENT_OUTPUT_BYTES) {
        const nl = buffered.indexOf('\n');
        if (nl < 0) break;
        const line = buffered.slice(0, nl);
        buffered = buffered.slice(nl + 1);
        if (line.trim() === '') continue;
        pending++;
        chain = chain
          .then(() => this.handleLine(socket, line, fail))
          .catch((err: unknown) => {
            // A bug, not bad input (handleLine answers every refusal): say so and drop the client.
            this.options.log.error('control request handling failed', { error: errorMessage(err) });
            socket.destroy();
          })
          .finally(() => {
            pending--;
            pump();
          });
      }
      // A line with no end yet: `length` is a cheap lower bound of its bytes, exact check after.
      if (
        buffered.indexOf('\n') < 0 &&
        buffered.length * 3 > MAX_REQUEST_BYTES &&
        Buffer.byteLength(buffered) > MAX_REQUEST_BYTES
      ) {
        buffered = '';
        tooLargeSent = true;
        fail(null, tooLarge());
        socket.end();
        return;
      }
      const outputFull = socket.writableLength > MAX_CLIENT_OUTPUT_BYTES;
      if (outputFull && !saidSlow) {
        saidSlow = true; // once per connection
        this.options.log.debug('control client does not read its replies; not reading its requests', {
          backlogBytes: socket.writableLength,
        });
      }
      const full = outputFull || buffered.indexOf('\n') >= 0;
      if (full && !socket.isPaused()) socket.pause();
      else if (!full && socket.isPaused()) socket.resume();
    };
    socket.setEncoding('utf8');
    socket.on('drain', pump);
    socket.on('data', (chunk: string) => {
      buffered += chunk;
      pump();
    });
  }

  private async handleLine(
    socket: net.Socket,
    line: string,
    fail: (id: unknown, err: VballoonError) => void,
  ): Promise<void> {
    if (Buffer.byteLength(line) > MAX_REQUEST_BYTES) return fail(null, tooLarge());
    if (nestingDeeperThan(line, MAX_REQUEST_DEPTH))
      return fail(
        null,
        new VballoonError(ErrorCode.CONTROL_BAD_REQUEST, `nested deeper than ${MAX_REQUEST_DEPTH} levels`),
      );
    let request: unknown;
    try {
      request = JSON.parse(line);
    } catch (err) {
      return fail(null, new VballoonError(ErrorCode.CONTROL_BAD_JSON, `not JSON: ${errorMessage(err)}`));
    }
    const bad = (id: unknown, message: string): void =>
      fail(id, new VballoonError(ErrorCode.CONTROL_BAD_REQUEST, message));
    if (typeof request !== 'object' || request === null || Array.isArray(request))
      return bad(null, 'a request is a JSON object');
    const { id, method, params } = request as { id?: unknown; method?: unknown; params?: unknown };
    if (typeof method !== 'string') return bad(id, '"method" must be a string');
    if (params !== undefined && (typeof params !== 'object' || params === null || Array.isArray(params)))
      return fail(id, new VballoonError(ErrorCode.CONTROL_BAD_PARAMS, '"params" must be an object'));
    if (method === 'subscribe' && this.options.subscribe !== undefined)
      return this.subscribe(socket, id, (params ?? {}) as Record<string, unknown>, fail);
    const handler = Object.prototype.hasOwnProperty.call(this.options.handlers, method)
      ? this.options.handlers[method]
      : undefined;
    if (handler === undefined) {
      const known = [...Object.keys(this.options.handlers), ...(this.options.subscribe ? ['subscribe'] : [])].join(
        ', ',
      );
      return fail(
        id,
        new VballoonError(ErrorCode.CONTROL_UNKNOWN_METHOD, `unknown method "${method}" (known: ${known})`),
      );
    }
    try {
      const result = await handler((params ?? {}) as Record<string, unknown>);
      respond(socket, { id: id ?? null, ok: true, result });
    } catch (err) {
      if (!(err instanceof VballoonError) || wireCodeOf(err) === 'EINTERNAL')
        this.options.log.error('control request failed', { method, code: errorCodeOf(err), error: errorMessage(err) });
      return fail(id, err instanceof VballoonError ? err : new VballoonError(ErrorCode.INTERNAL, errorMessage(err)));
    }
  }

  /**
   * `subscribe`: answers `{ok: true, result: {subscribed: true}}`, then writes one
   * `{"event": ...}` line per event until the client closes the connection. Params: optional
   * `vm` and `events` (a list of types) filter what is sent.
   */
  private subscribe(
    socket: net.Socket,
    id: unknown,
    params: Record<string, unknown>,
    fail: (id: unknown, err: VballoonError) => void,
  ): void {
    const { vm, events } = params;
    const bad = (message: string): void => fail(id, new VballoonError(ErrorCode.CONTROL_BAD_PARAMS, message));
    if (vm !== undefined && typeof vm !== 'string') return bad('"vm" must be a string');
    if (events !== undefined && (!Array.isArray(events) || !events.every((e) => typeof e === 'string')))
      return bad('"events" must be a list of event types');
    const filter: SubscribeFilter = {
      ...(vm === undefined ? {} : { vm }),
      ...(events === undefined ? {} : { events }),
    };
    try {
      this.options.checkSubscription?.(filter);
    } catch (err) {
      return fail(id, err instanceof VballoonError ? err : new VballoonError(ErrorCode.INTERNAL, errorMessage(err)));
    }
    socket.setTimeout(0);
    respond(socket, { id: id ?? null, ok: true, result: { subscribed: true } });
    this.options.log.debug('event subscription started', {
      vm: filter.vm ?? '*',
      events: filter.events?.join(',') ?? '*',
    });
    const unsubscribe = this.options.subscribe!((e) => {
      if (filter.vm !== undefined && e.vm !== filter.vm) return;
      if (filter.events !== undefined && !filter.events.includes(e.event)) return;
      if (socket.writableLength > MAX_SUBSCRIBER_BACKLOG_BYTES) {
        this.options.log.warn('event subscriber too slow; disconnected', { backlogBytes: socket.writableLength });
        socket.destroy();
        return;
      }
      respond(socket, e);
    });
    socket.once('close', unsubscribe);
  }

  async close(): Promise<void> {
    for (const s of this.sockets) s.destroy();
    await Promise.all(this.servers.map((s) => new Promise<void>((resolve) => s.close(() => resolve()))));
    this.servers.length = 0;
    if (this.socketPath !== undefined) {
      try {
        fs.unlinkSync(this.socketPath);
      } catch {
        // Already gone.
      }
      this.socketPath = undefined;
    }
  }
}

/** Makes `socketPath` usable: parent directory, no foreign or live socket, no other file. */
export function prepareSocketPath(socketPath: string): void {
  fs.mkdirSync(path.dirname(socketPath), { recursive: true, mode: 0o755 });
  let st: fs.Stats;
  try {
    st = fs.lstatSync(socketPath);
  } catch (err) {
    if (isSystemError(err, 'ENOENT')) return;
    throw err;
  }
  if (!st.isSocket())
    throw new VballoonError(ErrorCode.SOCKET, `${socketPath} exists and is not a socket; refusing to replace it`);
  const me = process.geteuid?.() ?? 0;
  if (st.uid !== me)
    throw new VballoonError(
      ErrorCode.SOCKET,
      `${socketPath} is owned by uid ${st.uid}, not by us (uid ${me}); refusing to replace it`,
    );
  let fd = -1;
  try {
    fd = native.connect(socketPath);
  } catch {
    fs.unlinkSync(socketPath); // stale: nobody listens
    return;
  }
  if (fd >= 0) native.close(fd); // -1: a full backlog, so someone listens there too
  throw new VballoonError(
    ErrorCode.SOCKET,
    `${socketPath} is in use by another process (is a daemon already running?)`,
  );
}
