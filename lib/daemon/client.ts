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
        response = JSON.parse(buffered.slice(0, nl));
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
