/**
 * A control API client (what the CLI uses): one request, one response, over the unix socket.
 */
import * as net from 'node:net';

export class ClientError extends Error {
  constructor(
    readonly code: string,
    message: string,
  ) {
    super(message);
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
      reject(new ClientError('ETIMEDOUT', `the daemon did not answer within ${timeoutMs} ms`));
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
        return done(() => reject(new ClientError('EBADJSON', 'the daemon sent something that is not JSON')));
      }
      if (response.ok === true) done(() => resolve(response.result));
      else
        done(() =>
          reject(new ClientError(response.error?.code ?? 'EINTERNAL', response.error?.message ?? 'unknown error')),
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
      done(() => reject(new ClientError(code === 'ENOENT' || code === 'ECONNREFUSED' ? 'ENODAEMON' : code, message)));
    });
    socket.on('end', () =>
      done(() => reject(new ClientError('ECLOSED', 'the daemon closed the connection without answering'))),
    );
  });
}
