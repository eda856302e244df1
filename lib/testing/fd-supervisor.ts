/**
 * A small service manager for tests on hosts without systemd: it speaks the documented notify
 * protocol (sd_notify(3)) and keeps a file descriptor store the way systemd.service(5)
 * describes it, and (re)starts one service process with the stored descriptors passed from fd 3
 * on (sd_listen_fds(3): LISTEN_FDS, LISTEN_PID, LISTEN_FDNAMES). It stands in for the service
 * manager, not for the kernel: descriptors really travel over a datagram socket and really
 * reach the child.
 *
 * Rules kept from systemd 252 (src/core/service.c, as documented): FDSTORE=1 stores the attached
 * descriptors under FDNAME= ("stored" when missing or invalid), up to `fdStoreMax`, ignoring a
 * descriptor whose open file is already stored; FDSTOREREMOVE=1 drops every descriptor of that
 * name; descriptors on any other message are closed; with NotifyAccess=main only the main
 * process is heard. Left out: systemd drops a stored descriptor that reports POLLHUP/POLLERR
 * unless FDPOLL=0 was given; here the flag is only recorded (`StoredFd.poll`). "Already stored"
 * is judged as systemd does, by open file description (kcmp). Like systemd, the
 * store does not keep the order descriptors were stored in (here: newest first).
 */
import { ChildProcess, spawn } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { parseNotifyFields } from '../daemon/fd-store';
import { closeQuietly, native, PollHandle, POLL_READABLE } from '../native';

export interface FdSupervisorOptions {
  /** The service's argv (argv[0] an executable path or a name found on PATH). */
  command: readonly string[];
  /** $NOTIFY_SOCKET for the service: a path or "@abstract". */
  address: string;
  /** Where the service's stdout and stderr are appended (none: discarded). */
  outputFile?: string;
  env?: NodeJS.ProcessEnv;
  /** FileDescriptorStoreMax= (default 4096). */
  fdStoreMax?: number;
  /** NotifyAccess= (default "main": only the running service's datagrams count). */
  notifyAccess?: 'main' | 'all';
  /** Restart= after the service exits without stop() (default "no"). */
  restart?: 'no' | 'on-failure' | 'always';
  /** RestartSec= (default 100 ms, as systemd's). */
  restartDelayMs?: number;
  /**
   * FileDescriptorStorePreserve=yes (systemd 254+): keep the store when the service stops for
   * good. Default false, as systemd 252 (Debian 12): a stop, or an exit that is not followed by
   * an automatic restart, releases (closes) every stored descriptor; restart() keeps them.
   */
  preserve?: boolean;
}

/** One descriptor in the store. */
export interface StoredFd {
  name: string;
  fd: number;
  /** false after FDPOLL=0. */
  poll: boolean;
}

/** One notify datagram as received. */
export interface NotifyMessage {
  fields: Partial<Record<string, string>>;
  fdCount: number;
  pid: number | undefined;
  /** Refused: not from the main process (NotifyAccess=main), or truncated. */
  ignored: boolean;
}

export interface ServiceExit {
  code: number | null;
  signal: NodeJS.Signals | null;
}

/** FDNAME= as systemd accepts it (fdname_is_valid): printable ASCII but ':', at most 255. */
function validFdName(name: string): boolean {
  return name.length >= 1 && name.length <= 255 && /^[\x20-\x7e]+$/.test(name) && !name.includes(':');
}

export class FdSupervisor {
  readonly messages: NotifyMessage[] = [];
  /** Every exit of the service, in order. */
  readonly exits: ServiceExit[] = [];
  /** How many times the service was started. */
  starts = 0;
  private readonly store: StoredFd[] = [];
  private readonly socket: number;
  private readonly watch: PollHandle;
  private child: ChildProcess | undefined;
  private childExit: Promise<ServiceExit> | undefined;
  private stopping = false;
  private restartTimer: NodeJS.Timeout | undefined;
  private readyFlag = false;
  private closed = false;

  constructor(readonly options: FdSupervisorOptions) {
    this.socket = native.dgramListen(options.address, true);
    this.watch = native.pollStart(this.socket, POLL_READABLE, () => this.drain());
  }

  get address(): string {
    return this.options.address;
  }

  /** The store, in the order the service will receive it (newest first). */
  get stored(): readonly StoredFd[] {
    return this.store;
  }

  /** READY=1 arrived from the running service. */
  get ready(): boolean {
    return this.readyFlag;
  }

  get mainPid(): number | undefined {
    return this.child?.pid;
  }

  /** Handles every queued datagram now (tests call it right after a synchronous send). */
  drain(): void {
    for (;;) {
      const d = native.dgramRecv(this.socket);
      if (d === null) return;
      const fields = parseNotifyFields(d.text);
      const fromMain = d.pid !== undefined && d.pid === this.child?.pid;
      const ignored = d.truncated || ((this.options.notifyAccess ?? 'main') === 'main' && !fromMain);
      this.messages.push({ fields, fdCount: d.fds.length, pid: d.pid, ignored });
      if (ignored) {
        for (const fd of d.fds) closeQuietly(fd);
        continue;
      }
      this.apply(fields, d.fds);
    }
  }

  private apply(fields: Partial<Record<string, string>>, fds: number[]): void {
    if (fields['READY'] === '1') this.readyFlag = true;
    const rawName = fields['FDNAME'];
    const name = rawName !== undefined && validFdName(rawName) ? rawName : undefined;
    if (fields['FDSTOREREMOVE'] === '1' && name !== undefined) {
      for (let i = this.store.length - 1; i >= 0; i--) {
        if (this.store[i].name === name) {
          closeQuietly(this.store[i].fd);
          this.store.splice(i, 1);
        }
      }
    }
    if (fields['FDSTORE'] !== '1') {
      for (const fd of fds) closeQuietly(fd);
      return;
    }
    const poll = fields['FDPOLL'] !== '0';
    const max = this.options.fdStoreMax ?? 4096;
    for (const fd of fds) {
      // systemd keeps an open file once (it compares open file descriptions, as kcmp does).
      const held = this.store.some((s) => native.sameFile(s.fd, fd));
      if (this.store.length >= max || held) {
        closeQuietly(fd);
        continue;
      }
      // systemd 252 prepends each descriptor to its list (and takes a datagram's set from a hash
      // set): the order passed back is not the order stored. Newest first here, so that code
      // relying on the order fails here too; only names (and contents) identify a descriptor.
      this.store.unshift({ name: name ?? 'stored', fd, poll });
    }
  }

  /** Starts the service with the store at fd 3.. and resolves with its pid. */
  async start(): Promise<number> {
    if (this.closed) throw new Error('supervisor closed');
    if (this.child !== undefined) throw new Error('the service is running');
    this.stopping = false;
    this.readyFlag = false;
    const passed = [...this.store];
    const env: NodeJS.ProcessEnv = { ...(this.options.env ?? process.env), NOTIFY_SOCKET: this.address };
    delete env['LISTEN_FDS'];
    delete env['LISTEN_PID'];
    delete env['LISTEN_FDNAMES'];
    let script = 'exec "$@"';
    if (passed.length > 0) {
      env['LISTEN_FDS'] = String(passed.length);
      env['LISTEN_FDNAMES'] = passed.map((s) => s.name).join(':');
      // LISTEN_PID must be the service's own pid: the shell's, which exec keeps.
      script = 'LISTEN_PID=$$; export LISTEN_PID; exec "$@"';
    }
    const out = this.options.outputFile === undefined ? 'ignore' : fs.openSync(this.options.outputFile, 'a');
    let child: ChildProcess;
    try {
      child = spawn('/bin/sh', ['-c', script, 'sh', ...this.options.command], {
        stdio: ['ignore', out, out, ...passed.map((s) => s.fd)],
        env,
      });
    } finally {
      if (typeof out === 'number') fs.closeSync(out);
    }
    const pid = child.pid;
    if (pid === undefined) {
      // spawn() failed (the error event follows on the next tick).
      throw await new Promise<Error>((resolve) => child.once('error', resolve));
    }
    this.child = child;
    this.starts++;
    this.childExit = new Promise((resolve) =>
      child.once('exit', (code, signal) => {
        const exit = { code, signal };
        this.exits.push(exit);
        if (this.child === child) {
          // What it sent before dying still counts (the manager reads it with the exit).
          this.drain();
          this.child = undefined;
          this.readyFlag = false;
          this.maybeRestart(exit);
        }
        resolve(exit);
      }),
    );
    return pid;
  }

  private maybeRestart(exit: ServiceExit): void {
    if (this.stopping || this.closed) return;
    const policy = this.options.restart ?? 'no';
    if (policy === 'no' || (policy === 'on-failure' && exit.code === 0)) {
      this.releaseStore();
      return;
    }
    this.restartTimer = setTimeout(() => {
      this.restartTimer = undefined;
      if (this.child === undefined && !this.closed && !this.stopping) void this.start().catch(() => undefined);
    }, this.options.restartDelayMs ?? 100);
  }

  /** Sends `signal` to the running service (a crash: SIGKILL; the restart policy applies). */
  kill(signal: NodeJS.Signals = 'SIGKILL'): void {
    this.child?.kill(signal);
  }

  /** Resolves when the running service (if any) has exited. */
  async waitExit(timeoutMs = 10_000): Promise<ServiceExit | undefined> {
    const exit = this.childExit;
    if (this.child === undefined || exit === undefined) return undefined;
    return Promise.race([
      exit,
      new Promise<never>((_, reject) =>
        setTimeout(() => reject(new Error('timed out waiting for the service to exit')), timeoutMs).unref(),
      ),
    ]);
  }

  /** Resolves once READY=1 arrived from the running service. */
  async waitReady(timeoutMs = 10_000): Promise<void> {
    const start = Date.now();
    while (!this.readyFlag) {
      if (Date.now() - start > timeoutMs) throw new Error('timed out waiting for READY=1');
      await new Promise((resolve) => setTimeout(resolve, 5));
    }
  }

  /** Resolves once the service has been started `count` times in all (after a restart). */
  async waitStarts(count: number, timeoutMs = 10_000): Promise<void> {
    const start = Date.now();
    while (this.starts < count || this.child === undefined) {
      if (Date.now() - start > timeoutMs) throw new Error(`timed out waiting for start #${count}`);
      await new Promise((resolve) => setTimeout(resolve, 5));
    }
  }

  /** The unit went inactive: without `preserve` the manager closes the store. */
  private releaseStore(): void {
    if (this.options.preserve === true) return;
    for (const s of this.store.splice(0)) closeQuietly(s.fd);
  }

  /** systemctl stop: `signal`, then SIGKILL after `timeoutMs`; releases the store (see `preserve`). */
  async stop(signal: NodeJS.Signals = 'SIGTERM', timeoutMs = 10_000): Promise<ServiceExit | undefined> {
    try {
      return await this.terminate(signal, timeoutMs);
    } finally {
      this.releaseStore();
    }
  }

  private async terminate(signal: NodeJS.Signals, timeoutMs: number): Promise<ServiceExit | undefined> {
    this.stopping = true;
    if (this.restartTimer !== undefined) clearTimeout(this.restartTimer);
    this.restartTimer = undefined;
    const child = this.child;
    const exit = this.childExit;
    if (child === undefined || exit === undefined) return undefined;
    child.kill(signal);
    const timer = setTimeout(() => child.kill('SIGKILL'), timeoutMs);
    try {
      return await exit;
    } finally {
      clearTimeout(timer);
    }
  }

  /** systemctl restart: SIGTERM (SIGKILL after 10 s), then start again with the store. */
  async restart(): Promise<number> {
    await this.terminate('SIGTERM', 10_000);
    return this.start();
  }

  /** Stops the service (SIGKILL after 5 s), closes the socket and every stored descriptor. */
  async close(): Promise<void> {
    if (this.closed) return;
    await this.stop('SIGTERM', 5000);
    this.closed = true;
    native.pollStop(this.watch);
    closeQuietly(this.socket);
    for (const s of this.store.splice(0)) closeQuietly(s.fd);
    if (!this.address.startsWith('@')) fs.rmSync(this.address, { force: true });
  }
}

/** A supervisor whose notify socket is `<dir>/notify.sock` and whose output is `<dir>/service.log`. */
export function supervisorIn(dir: string, options: Omit<FdSupervisorOptions, 'address'>): FdSupervisor {
  return new FdSupervisor({
    outputFile: path.join(dir, 'service.log'),
    ...options,
    address: path.join(dir, 'notify.sock'),
  });
}
