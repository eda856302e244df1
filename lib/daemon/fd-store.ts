/**
 * The service manager's file descriptor store (systemd.service(5) FileDescriptorStoreMax=,
 * sd_notify(3) FDSTORE=1, sd_listen_fds(3)), without libsystemd: what lets every front-end's
 * descriptors outlive a restart or a crash of the daemon (QEMU cannot reconnect to a new
 * back-end, docs/qemu.md). {@link FdStore} hands descriptors to the manager under a name;
 * {@link inheritedFds} collects them again at the next start. The layer knows nothing of what
 * the descriptors are: the daemon names and interprets them.
 *
 * Protocol, as documented (and as systemd 252 implements it):
 * - `FDSTORE=1`, `FDNAME=<name>` with the descriptors attached as SCM_RIGHTS stores them; the
 *   same name may hold many descriptors (several datagrams add up). `FDPOLL=0` asks the manager
 *   not to drop a descriptor that reports POLLHUP/POLLERR (a front-end's socket hanging up must
 *   not silently lose the rest of that VM's set before the daemon decides).
 * - `FDSTOREREMOVE=1`, `FDNAME=<name>` removes every descriptor stored under that name.
 * - At the next start they come back from fd 3 on, with `LISTEN_FDS=<n>`, `LISTEN_PID=<pid>`
 *   and `LISTEN_FDNAMES=<name>:<name>...` in the same order.
 * - The manager keeps one copy of an open file description: storing a descriptor that shares its
 *   open file with one already stored (a dup, or the same fd under a second name) adds nothing.
 * - At most 253 descriptors ride on one datagram (the kernel's SCM_MAX_FD): bigger sets are
 *   sent in batches under the same name.
 */
import { Logger, LogRateLimiter } from '../log';
import { native, SCM_MAX_FDS } from '../native';

/** A descriptor passed to this process by its service manager, with the name it was stored under. */
export interface InheritedFd {
  name: string;
  fd: number;
}

/** sd_listen_fds(3): the first passed descriptor. */
const LISTEN_FDS_START = 3;
/** Most descriptors taken from LISTEN_FDS: far above any FileDescriptorStoreMax= we ship (4096)
 * plus sockets; bounds the loop over a number that comes from the environment. */
const INHERITED_FDS_MAX = 65_536;
/** systemd's limit for an FDNAME= (FDNAME_MAX). */
const FDNAME_MAX_LENGTH = 255;
/** Warnings about failed removals: a few per minute at most. */
const REMOVE_LOG_BURST = 5;
const REMOVE_LOG_INTERVAL_MS = 60_000;

/**
 * sd_listen_fds(3) with names: checks LISTEN_PID === process.pid, returns fds 3..3+n-1 with their
 * names (LISTEN_FDNAMES, "unknown" when missing), sets FD_CLOEXEC on them, and deletes
 * LISTEN_FDS/LISTEN_PID/LISTEN_FDNAMES from env. Empty when not for us.
 *
 * A descriptor that is not open (the variables lie) is left out rather than thrown about.
 */
export function inheritedFds(env: NodeJS.ProcessEnv = process.env): InheritedFd[] {
  const pidText = env['LISTEN_PID'];
  const countText = env['LISTEN_FDS'];
  const namesText = env['LISTEN_FDNAMES'];
  // The variables are for this process only: children must not inherit them (sd_listen_fds(3)).
  delete env['LISTEN_FDS'];
  delete env['LISTEN_PID'];
  delete env['LISTEN_FDNAMES'];
  if (pidText === undefined || countText === undefined) return [];
  if (!/^[0-9]+$/.test(pidText) || Number(pidText) !== process.pid) return [];
  if (!/^[0-9]+$/.test(countText)) return [];
  const count = Math.min(Number(countText), INHERITED_FDS_MAX);
  const names = namesText === undefined || namesText === '' ? [] : namesText.split(':');
  const out: InheritedFd[] = [];
  for (let i = 0; i < count; i++) {
    const fd = LISTEN_FDS_START + i;
    try {
      native.setCloseOnExec(fd, true);
    } catch {
      continue;
    }
    const name = names[i];
    out.push({ name: name === undefined || name === '' ? 'unknown' : name, fd });
  }
  return out;
}

/** The KEY=VALUE lines of one notify datagram (sd_notify(3)); later keys win. */
export function parseNotifyFields(text: string): Partial<Record<string, string>> {
  const fields: Partial<Record<string, string>> = {};
  for (const line of text.split('\n')) {
    const eq = line.indexOf('=');
    if (eq > 0) fields[line.slice(0, eq)] = line.slice(eq + 1);
  }
  return fields;
}

/** Throws unless `name` is acceptable as an FDNAME=: 1..255 printable ASCII characters, no ':'. */
export function validateFdName(name: string): void {
  if (name.length < 1 || name.length > FDNAME_MAX_LENGTH) {
    throw new RangeError(`fd store name must have 1..${FDNAME_MAX_LENGTH} characters: ${JSON.stringify(name)}`);
  }
  // LISTEN_FDNAMES separates names with ':', and the message is KEY=VALUE lines.
  if (!/^[\x20-\x7e]+$/.test(name) || name.includes(':')) {
    throw new RangeError(`fd store name must be printable ASCII without ':': ${JSON.stringify(name)}`);
  }
}

/** The manager's fd store ($NOTIFY_SOCKET). */
export class FdStore {
  private readonly removeLog: LogRateLimiter;

  /** `address` as in $NOTIFY_SOCKET (a path or "@abstract"); undefined (or '') = disabled. */
  constructor(
    private readonly log: Logger,
    address: string | undefined,
    now: () => number = Date.now,
  ) {
    this.address = address === '' ? undefined : address;
    this.removeLog = new LogRateLimiter(REMOVE_LOG_BURST, REMOVE_LOG_INTERVAL_MS, now);
  }

  /** Where datagrams go, or undefined when disabled. */
  readonly address: string | undefined;

  /** Reads NOTIFY_SOCKET (does not delete it: SystemdNotifier does). */
  static fromEnv(log: Logger, env: NodeJS.ProcessEnv = process.env): FdStore {
    return new FdStore(log, env['NOTIFY_SOCKET']);
  }

  /** Whether a service manager listens. */
  get enabled(): boolean {
    return this.address !== undefined;
  }

  /**
   * Stores fds under `name` (FDSTORE=1, FDNAME=name, FDPOLL=0), batching by 253. Throws on
   * failure (the caller decides); validates name: 1..255 chars, printable ASCII, no ':'.
   * Returned means the manager has every descriptor queued; the caller may close its copies.
   * After a failure part of the set may be stored: remove(name) before trying again.
   * Disabled: does nothing (after validating).
   */
  store(name: string, fds: readonly number[]): void {
    validateFdName(name);
    for (const fd of fds) {
      if (!Number.isInteger(fd) || fd < 0) throw new RangeError(`not a descriptor: ${String(fd)}`);
    }
    if (this.address === undefined || fds.length === 0) return;
    const text = `FDSTORE=1\nFDNAME=${name}\nFDPOLL=0\n`;
    for (let i = 0; i < fds.length; i += SCM_MAX_FDS) {
      native.notifySend(this.address, text, fds.slice(i, i + SCM_MAX_FDS));
    }
  }

  /** FDSTOREREMOVE=1 + FDNAME=name. Never throws (logs, rate-limited). */
  remove(name: string): void {
    if (this.address === undefined) return;
    try {
      validateFdName(name);
      native.notifySend(this.address, `FDSTOREREMOVE=1\nFDNAME=${name}\n`);
    } catch (err) {
      const suppressed = this.removeLog.take();
      if (suppressed === undefined) return;
      this.log.warn('cannot remove descriptors from the fd store', {
        name,
        error: err instanceof Error ? err.message : String(err),
        ...(suppressed > 0 ? { suppressed } : {}),
      });
    }
  }
}
