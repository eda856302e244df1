/**
 * A control API client (what the CLI uses): one request, one response, over the unix socket.
 */
import * as net from 'node:net';
import { ErrorCode, VballoonError } from '../errors';
import { errorCodeForWire } from './control';

/**
 * A failed call: `code` is the daemon's stable code (ERR_DAEMON_UNREACHABLE when there was no
 * answer), `wireCode` what the control API or the socket said (ETARGET, ENOVM, ENODAEMON, EACCES...).
 */
export class ClientError extends VballoonError {
  constructor(
    readonly wireCode: string,
    message: string,
    answered: boolean,
  ) {
    super(answered ? errorCodeForWire(wireCode) : ErrorCode.DAEMON_UNREACHABLE, message);
  }
}

/** Sends `method(params)` and resolves with the result, or rejects with a ClientError. */
export function callDaemon(
  socketPath: string,
  method: string,
  params: Record<string, unknown> = {},
  timeoutMs = 10_000,
): Promise<unknown> {
  return new Promise((resolve, reject) => {
    const socket = net.createConnection(socketPath);
    let buffered = '';
    const timer = setTimeout(() => {
      socket.destroy();
      reject(new ClientError('ETIMEDOUT', `the daemon did not answer within ${timeoutMs} ms`, false));
    }, timeoutMs);
    const done = (fn: () => void): void => {
      clearTimeout(timer);
      socket.destroy();
      fn();
    };
    socket.on('connect', () => socket.write(`${JSON.stringify({ id: 1, method, params })}\n`));
    socket.setEncoding('utf8');
    socket.on('data', (chunk: string) => {
      buffered += chunk;
      const nl = buffered.indexOf('\n');
      if (nl < 0) return;
      let response: { ok?: boolean; result?: unknown; error?: { code?: string; message?: string } };
      try {
        response = JSON.parse(buffered.slice(0, nl)) as typeof response;
      } catch {
        return done(() => reject(new ClientError('EBADJSON', 'the daemon sent something that is not JSON', false)));
      }
      if (response.ok === true) done(() => resolve(response.result));
      else
        done(() =>
          reject(
            new ClientError(response.error?.code ?? 'EINTERNAL', response.error?.message ?? 'unknown error', true),
          ),
        );
    });
    socket.on('error', (err: NodeJS.ErrnoException) => {
      const code = err.code ?? 'EIO';
      const message =
        code === 'ENOENT' || code === 'ECONNREFUSED'
          ? `the vballoon daemon is not running (no control socket at ${socketPath})`
          : code === 'EACCES'
            ? `permission denied on ${socketPath} (run as root or as the daemon's user)`
            : `cannot reach the daemon at ${socketPath}: ${err.message}`;
      done(() =>
        reject(new ClientError(code === 'ENOENT' || code === 'ECONNREFUSED' ? 'ENODAEMON' : code, message, false)),
      );
    });
    socket.on('end', () =>
      done(() => reject(new ClientError('ECLOSED', 'the daemon closed the connection without answering', false))),
    );
  });
}

/**
 * Subscribes to the daemon's events (`subscribe`): `onEvent` gets each event object and returns
 * false to stop. Resolves when stopped or when the daemon closes the connection; rejects with a
 * ClientError if the subscription is refused or the daemon cannot be reached.
 */
export function subscribeDaemon(
  socketPath: string,
  params: Record<string, unknown>,
  onEvent: (event: Record<string, unknown>) => boolean,
): Promise<void> {
  return new Promise((resolve, reject) => {
    const socket = net.createConnection(socketPath);
    let buffered = '';
    let subscribed = false;
    let settled = false;
    const finish = (err?: ClientError): void => {
      if (settled) return;
      settled = true;
      socket.destroy();
      if (err === undefined) resolve();
      else reject(err);
    };
    socket.on('connect', () => socket.write(`${JSON.stringify({ id: 1, method: 'subscribe', params })}\n`));
    socket.setEncoding('utf8');
    socket.on('data', (chunk: string) => {
      buffered += chunk;
      for (let nl = buffered.indexOf('\n'); nl >= 0 && !settled; nl = buffered.indexOf('\n')) {
        const line = buffered.slice(0, nl);
        buffered = buffered.slice(nl + 1);
        let msg: { ok?: boolean; error?: { code?: string; message?: string } } & Record<string, unknown>;
        try {
          msg = JSON.parse(line) as typeof msg;
        } catch {
          return finish(new ClientError('EBADJSON', 'the daemon sent something that is not JSON', false));
        }
        if (!subscribed) {
          if (msg.ok !== true)
            return finish(new ClientError(msg.error?.code ?? 'EINTERNAL', msg.error?.message ?? 'refused', true));
          subscribed = true;
          continue;
        }
        if (!onEvent(msg)) return finish();
      }
    });
    socket.on('error', (err: NodeJS.ErrnoException) => {
      const code = err.code ?? 'EIO';
      const gone = code === 'ENOENT' || code === 'ECONNREFUSED';
      finish(
        new ClientError(
          gone ? 'ENODAEMON' : code,
          gone ? `the vballoon daemon is not running (no control socket at ${socketPath})` : err.message,
          false,
        ),
      );
    });
    socket.on('close', () =>
      subscribed
        ? finish()
        : finish(new ClientError('ECLOSED', 'the daemon closed the connection without answering', false)),
    );
  });
}
