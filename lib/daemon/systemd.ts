/**
 * The service manager's notify protocol (sd_notify(3)), without libsystemd: `KEY=VALUE` lines in
 * one datagram to the AF_UNIX socket named by $NOTIFY_SOCKET (a path, or an abstract name
 * starting with "@"). The daemon sends READY=1 once every socket listens, STATUS= lines, the
 * RELOADING=1 / READY=1 pair around a reload (with MONOTONIC_USEC, as systemd 253+ expects for
 * Type=notify-reload), STOPPING=1, and WATCHDOG=1 at half of $WATCHDOG_USEC when the unit sets
 * WatchdogSec=. Without $NOTIFY_SOCKET every call does nothing. A send that fails is logged once,
 * never thrown: the manager going away must not stop the daemon.
 */
import { createSocket, UnixDgramSocket } from 'unix-dgram';
import { Logger } from '../log';

/** Nanoseconds per microsecond, and the clock systemd compares MONOTONIC_USEC against. */
function monotonicUsec(): bigint {
  return process.hrtime.bigint() / 1000n;
}

export class SystemdNotifier {
  private socket: UnixDgramSocket | undefined;
  /** The kernel's form of the address ("@name" becomes a leading NUL) for unix-dgram. */
  private readonly socketAddress: string | undefined;
  private readonly rawAddress: string | undefined;
  private watchdog: NodeJS.Timeout | undefined;
  private failed = false;

  constructor(
    private readonly log: Logger,
    env: NodeJS.ProcessEnv = process.env,
  ) {
    const raw = env['NOTIFY_SOCKET'];
    if (raw !== undefined && raw !== '') {
      this.rawAddress = raw;
      this.socketAddress = raw.startsWith('@') ? `\0${raw.slice(1)}` : raw;
    }
    const usec = Number(env['WATCHDOG_USEC'] ?? '');
    const pid = env['WATCHDOG_PID'];
    const forUs = pid === undefined || pid === '' || Number(pid) === process.pid;
    this.watchdogMs = Number.isFinite(usec) && usec > 0 && forUs ? Math.max(1, Math.floor(usec / 2000)) : undefined;
    // The variables are for this process only (sd_notify(3)): children must not inherit them.
    delete env['NOTIFY_SOCKET'];
    delete env['WATCHDOG_USEC'];
    delete env['WATCHDOG_PID'];
  }

  /** Watchdog ping period (half of $WATCHDOG_USEC), if the unit has a watchdog. */
  readonly watchdogMs: number | undefined;

  /** Whether a service manager listens. */
  get enabled(): boolean {
    return this.socketAddress !== undefined;
  }

  /** $NOTIFY_SOCKET as it was (a path or "@abstract"), for the fd store (lib/daemon/fd-store.ts):
   * the constructor removes it from the environment. */
  get address(): string | undefined {
    return this.rawAddress;
  }

  /** Sends `fields` as one datagram. */
  notify(fields: Record<string, string | number>): void {
    if (this.socketAddress === undefined) return;
    const text = Object.entries(fields)
      .map(([k, v]) => `${k}=${String(v).replace(/\n/g, ' ')}`)
      .join('\n');
    try {
      this.socket ??= createSocket('unix_dgram');
      const buf = Buffer.from(`${text}\n`);
      this.socket.send(buf, 0, buf.length, this.socketAddress, (err?: Error) => {
        if (err) this.reportFailure(err);
      });
    } catch (err) {
      this.reportFailure(err as Error);
    }
  }

  private reportFailure(err: Error): void {
    if (this.failed) return;
    this.failed = true;
    this.log.warn('cannot notify the service manager', { error: err.message });
  }

  ready(status: string): void {
    this.notify({ READY: 1, STATUS: status, MAINPID: process.pid });
    if (this.watchdogMs !== undefined && this.watchdog === undefined) {
      this.watchdog = setInterval(() => this.notify({ WATCHDOG: 1 }), this.watchdogMs);
      this.watchdog.unref();
    }
  }

  status(status: string): void {
    this.notify({ STATUS: status });
  }

  reloading(): void {
    this.notify({ RELOADING: 1, MONOTONIC_USEC: monotonicUsec().toString() });
  }

  reloaded(status: string): void {
    this.notify({ READY: 1, STATUS: status });
  }

  stopping(): void {
    this.notify({ STOPPING: 1, STATUS: 'stopping' });
    this.close();
  }

  close(): void {
    if (this.watchdog !== undefined) clearInterval(this.watchdog);
    this.watchdog = undefined;
    try {
      this.socket?.close();
    } catch {
      // Already closed: nothing to release.
    }
    this.socket = undefined;
  }
}
