/**
 * The control API server: newline-delimited JSON requests and responses on a unix socket (mode
 * 0600 by default; TCP only if configured). Each request is checked before anything changes:
 * size, JSON, method, parameters, and the caller's credentials (SO_PEERCRED: root or the
 * daemon's own user). docs/control-api.md is the reference.
 */
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as path from 'node:path';
import { Logger } from '../log';
import { isSystemError, native } from '../native';

/** Largest request line; a longer one is refused and the connection closed. */
export const MAX_REQUEST_BYTES = 64 * 1024;
/** Connections served at once. */
const MAX_CONNECTIONS = 64;
/** A connection idle this long is closed. */
const IDLE_TIMEOUT_MS = 60_000;

/** Stable error codes of the control API. */
export type ControlErrorCode =
  | 'EBADJSON'
  | 'ETOOLARGE'
  | 'EBADREQUEST'
  | 'EUNKNOWNMETHOD'
  | 'EBADPARAMS'
  | 'ENOVM'
  | 'ETARGET'
  | 'EUNAUTHORIZED'
  | 'EINTERNAL';

export class ControlError extends Error {
  constructor(
    readonly code: ControlErrorCode,
    message: string,
  ) {
    super(message);
  }
}

export type Handler = (params: Record<string, unknown>) => unknown | Promise<unknown>;

export interface ControlServerOptions {
  log: Logger;
  handlers: Record<string, Handler>;
  /** Counts rejected requests by code (metrics). */
  onError?(code: ControlErrorCode): void;
}

function respond(socket: net.Socket, body: Record<string, unknown>): void {
  if (!socket.destroyed) socket.write(`${JSON.stringify(body)}\n`);
}

export class ControlServer {
  private readonly servers: net.Server[] = [];
  private readonly sockets = new Set<net.Socket>();
  private socketPath: string | undefined;

  constructor(private readonly options: ControlServerOptions) {}

  /**
   * Listens on `socketPath` with `mode`. A stale socket of ours is replaced; a socket owned by
   * another user, a socket in use, or a file that is not a socket is an error.
   */
  async listenUnix(socketPath: string, mode: number): Promise<void> {
    prepareSocketPath(socketPath);
    const server = this.makeServer(true);
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      // Create the socket file with no access for others, then set the configured mode.
      const oldMask = process.umask(0o177);
      server.listen(socketPath, () => {
        process.umask(oldMask);
        resolve();
      });
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
    const server = net.createServer((socket) => this.serve(socket, unix));
    server.maxConnections = MAX_CONNECTIONS;
    return server;
  }

  private serve(socket: net.Socket, unix: boolean): void {
    this.sockets.add(socket);
    socket.on('close', () => this.sockets.delete(socket));
    socket.on('error', () => socket.destroy());
    socket.setTimeout(IDLE_TIMEOUT_MS, () => socket.destroy());
    const fail = (id: unknown, code: ControlErrorCode, message: string): void => {
      this.options.onError?.(code);
      this.options.log.warn('control request refused', { code, error: message });
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
            'EUNAUTHORIZED',
            `uid ${cred?.uid ?? '?'} may not use this control socket (only root and uid ${process.geteuid?.()})`,
          );
      } catch (err) {
        fail(null, 'EINTERNAL', `cannot read peer credentials: ${(err as Error).message}`);
      }
      if (!allowed) {
        socket.end();
        return;
      }
    }
    let buffered = '';
    let chain = Promise.resolve();
    socket.setEncoding('utf8');
    socket.on('data', (chunk: string) => {
      buffered += chunk;
      // Each iteration consumes one line; the buffer is bounded by MAX_REQUEST_BYTES below.
      for (let nl = buffered.indexOf('\n'); nl >= 0; nl = buffered.indexOf('\n')) {
        const line = buffered.slice(0, nl);
        buffered = buffered.slice(nl + 1);
        if (line.trim() === '') continue;
        chain = chain.then(() => this.handleLine(socket, line, fail));
      }
      if (Buffer.byteLength(buffered) > MAX_REQUEST_BYTES) {
        buffered = '';
        fail(null, 'ETOOLARGE', `request larger than ${MAX_REQUEST_BYTES} bytes`);
        socket.end();
      }
    });
  }

  private async handleLine(
    socket: net.Socket,
    line: string,
    fail: (id: unknown, code: ControlErrorCode, message: string) => void,
  ): Promise<void> {
    if (Buffer.byteLength(line) > MAX_REQUEST_BYTES)
      return fail(null, 'ETOOLARGE', `request larger than ${MAX_REQUEST_BYTES} bytes`);
    let request: unknown;
    try {
      request = JSON.parse(line);
    } catch (err) {
      return fail(null, 'EBADJSON', `not JSON: ${(err as Error).message}`);
    }
    if (typeof request !== 'object' || request === null || Array.isArray(request))
      return fail(null, 'EBADREQUEST', 'a request is a JSON object');
    const { id, method, params } = request as { id?: unknown; method?: unknown; params?: unknown };
    if (typeof method !== 'string') return fail(id, 'EBADREQUEST', '"method" must be a string');
    if (params !== undefined && (typeof params !== 'object' || params === null || Array.isArray(params)))
      return fail(id, 'EBADPARAMS', '"params" must be an object');
    const handler = Object.prototype.hasOwnProperty.call(this.options.handlers, method)
      ? this.options.handlers[method]
      : undefined;
    if (handler === undefined)
      return fail(
        id,
        'EUNKNOWNMETHOD',
        `unknown method "${method}" (known: ${Object.keys(this.options.handlers).join(', ')})`,
      );
    try {
      const result = await handler((params ?? {}) as Record<string, unknown>);
      respond(socket, { id: id ?? null, ok: true, result });
    } catch (err) {
      if (err instanceof ControlError) return fail(id, err.code, err.message);
      this.options.log.error('control request failed', { method, error: (err as Error).message });
      return fail(id, 'EINTERNAL', (err as Error).message);
    }
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
    throw new ControlError('EINTERNAL', `${socketPath} exists and is not a socket; refusing to replace it`);
  const me = process.geteuid?.() ?? 0;
  if (st.uid !== me)
    throw new ControlError(
      'EUNAUTHORIZED',
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
  throw new ControlError('EINTERNAL', `${socketPath} is in use by another process (is a daemon already running?)`);
}
