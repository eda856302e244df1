/**
 * A real systemd (the distribution's /lib/systemd/systemd, 252 on Debian 12) running as a user
 * manager for tests, on a host whose PID 1 is not systemd. The manager refuses to run unless the
 * system looks booted with systemd (/run/systemd/system exists), so it runs inside a private
 * mount namespace (`unshare -m`) with a tmpfs over /run/systemd holding that directory; nothing
 * outside the namespace sees it. Its runtime and configuration directories live in a temporary
 * directory (XDG_RUNTIME_DIR, XDG_CONFIG_HOME), units are written to
 * `<config>/systemd/user/`, and `systemctl --user` reaches it through
 * `$XDG_RUNTIME_DIR/systemd/private`, run inside the namespace (nsenter) so that it, too, sees a
 * booted system.
 *
 * Cleanup: close() asks the manager to exit (SIGTERM stops every unit first), then SIGKILLs the
 * manager and every process left in its mount namespace; the namespace (and the tmpfs) goes with
 * the last of them. The same hard kill runs at process exit for a test that never got to close().
 * Needs root (a mount namespace), unshare and nsenter (util-linux); {@link unavailableReason}
 * says why not otherwise, so tests can skip or fall back to lib/testing/fd-supervisor.ts.
 */
import { ChildProcess, execFile, spawn } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';

export const SYSTEMD_BINARY = '/lib/systemd/systemd';
const UNSHARE = '/usr/bin/unshare';
const NSENTER = '/usr/bin/nsenter';
/** How long the manager may take to come up, and a systemctl call to return. */
const MANAGER_START_TIMEOUT_MS = 15_000;
const SYSTEMCTL_TIMEOUT_MS = 30_000;

/** Why a user manager cannot run here, or undefined when it can. */
export function unavailableReason(): string | undefined {
  if (!fs.existsSync(SYSTEMD_BINARY)) return `${SYSTEMD_BINARY} is missing`;
  if (!fs.existsSync(UNSHARE) || !fs.existsSync(NSENTER)) return 'unshare or nsenter (util-linux) is missing';
  if (process.getuid?.() !== 0) return 'a private mount namespace needs root';
  return undefined;
}

/** One unit's state, from `systemctl --user show`. */
export interface UnitStatus {
  activeState: string;
  subState: string;
  /** 0 when no main process runs. */
  mainPid: number;
  nRestarts: number;
  result: string;
  /** ExecMainStatus: the exit code or signal number of the last main process. */
  execMainStatus: number;
}

/** A Type=notify service unit for {@link SystemdUser.writeService}. */
export interface ServiceSpec {
  /** argv; argv[0] an absolute path (process.execPath for Node). */
  command: readonly string[];
  /** Extra environment for the service. */
  env?: Record<string, string>;
  /** FileDescriptorStoreMax= (default 4096). */
  fdStoreMax?: number;
  /** Restart= (default "on-failure"). */
  restart?: 'no' | 'on-failure' | 'always';
  /** RestartSec= in ms (default 100). */
  restartDelayMs?: number;
  /** More [Service] lines, verbatim. */
  extra?: readonly string[];
  /** More [Unit] lines, verbatim. The unit has StartLimitIntervalSec=0 unless this sets it. */
  unitExtra?: readonly string[];
}

export interface CommandResult {
  code: number;
  stdout: string;
  stderr: string;
}

function shellQuote(arg: string): string {
  return `'${arg.replace(/'/g, `'\\''`)}'`;
}

function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/** Every pid whose mount namespace is `ns` (the link text of /proc/<pid>/ns/mnt). */
function pidsInNamespace(ns: string): number[] {
  const out: number[] = [];
  for (const entry of fs.readdirSync('/proc')) {
    if (!/^[0-9]+$/.test(entry)) continue;
    try {
      if (fs.readlinkSync(`/proc/${entry}/ns/mnt`) === ns) out.push(Number(entry));
    } catch {
      // Gone already.
    }
  }
  return out;
}

const live = new Set<SystemdUser>();
let exitHookInstalled = false;

export class SystemdUser {
  readonly runtimeDir: string;
  readonly configDir: string;
  readonly unitDir: string;
  /** The manager's own output. */
  readonly managerLog: string;
  private namespace: string | undefined;
  private exited = false;
  private readonly exit: Promise<void>;

  private constructor(
    /** A temporary directory holding everything (removed by close()). */
    readonly dir: string,
    private readonly proc: ChildProcess,
  ) {
    this.runtimeDir = path.join(dir, 'run');
    this.configDir = path.join(dir, 'config');
    this.unitDir = path.join(this.configDir, 'systemd', 'user');
    this.managerLog = path.join(dir, 'manager.log');
    this.exit = new Promise((resolve) =>
      proc.once('exit', () => {
        this.exited = true;
        resolve();
      }),
    );
  }

  /** The manager's pid (it is also the pid that entered the namespace). */
  get pid(): number {
    return this.proc.pid!;
  }

  /**
   * Starts a user manager in a new private mount namespace and waits until systemctl reaches
   * it. Throws with the reason when it cannot run here (see {@link unavailableReason}).
   */
  static async launch(): Promise<SystemdUser> {
    const reason = unavailableReason();
    if (reason !== undefined) throw new Error(`systemd user manager unavailable: ${reason}`);
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vballoon-systemd-'));
    const runtimeDir = path.join(dir, 'run');
    fs.mkdirSync(runtimeDir, { mode: 0o700 });
    fs.mkdirSync(path.join(dir, 'config', 'systemd', 'user'), { recursive: true });
    const log = fs.openSync(path.join(dir, 'manager.log'), 'a');
    // In the namespace: a tmpfs over /run/systemd (mount propagation private, so the host never
    // sees it) holding /run/systemd/system, the "booted with systemd" marker; then the manager
    // replaces the shell (same pid).
    const script = [
      'set -e',
      'mkdir -p /run/systemd',
      'mount -t tmpfs -o mode=0755 tmpfs /run/systemd',
      'mkdir -p /run/systemd/system',
      `exec ${SYSTEMD_BINARY} --user`,
    ].join('\n');
    const env: NodeJS.ProcessEnv = {
      ...process.env,
      XDG_RUNTIME_DIR: runtimeDir,
      XDG_CONFIG_HOME: path.join(dir, 'config'),
      SYSTEMD_LOG_TARGET: 'console',
    };
    delete env['NOTIFY_SOCKET'];
    delete env['DBUS_SESSION_BUS_ADDRESS'];
    delete env['LISTEN_FDS'];
    delete env['LISTEN_PID'];
    delete env['LISTEN_FDNAMES'];
    let proc: ChildProcess;
    try {
      proc = spawn(UNSHARE, ['--mount', '--propagation', 'private', '/bin/sh', '-c', script], {
        stdio: ['ignore', log, log],
        env,
      });
    } finally {
      fs.closeSync(log);
    }
    const manager = new SystemdUser(dir, proc);
    live.add(manager);
    if (!exitHookInstalled) {
      exitHookInstalled = true;
      process.once('exit', () => {
        for (const m of live) m.killSync();
      });
    }
    try {
      await manager.waitUp();
    } catch (err) {
      await manager.close();
      throw err;
    }
    return manager;
  }

  private async waitUp(): Promise<void> {
    const start = Date.now();
    const privateSocket = path.join(this.runtimeDir, 'systemd', 'private');
    for (;;) {
      if (this.exited) throw new Error(`the user manager exited: ${this.tail()}`);
      if (this.namespace === undefined) {
        try {
          const ns = fs.readlinkSync(`/proc/${this.pid}/ns/mnt`);
          if (ns !== fs.readlinkSync('/proc/self/ns/mnt')) this.namespace = ns;
        } catch {
          // Not yet.
        }
      }
      if (this.namespace !== undefined && fs.existsSync(privateSocket)) {
        const r = await this.systemctl(['show', '--property=Version']);
        if (r.code === 0) return;
      }
      if (Date.now() - start > MANAGER_START_TIMEOUT_MS) {
        throw new Error(`the user manager did not come up: ${this.tail()}`);
      }
      await sleep(50);
    }
  }

  private tail(): string {
    try {
      return fs.readFileSync(this.managerLog, 'utf8').slice(-2000);
    } catch {
      return '(no manager log)';
    }
  }

  /** Runs `systemctl --user <args>` inside the manager's namespace; never throws on exit code. */
  systemctl(args: readonly string[], timeoutMs = SYSTEMCTL_TIMEOUT_MS): Promise<CommandResult> {
    return new Promise((resolve) => {
      execFile(
        NSENTER,
        ['--mount', '--target', String(this.pid), 'systemctl', '--user', '--no-pager', ...args],
        {
          env: { ...process.env, XDG_RUNTIME_DIR: this.runtimeDir, DBUS_SESSION_BUS_ADDRESS: '' },
          timeout: timeoutMs,
          encoding: 'utf8',
        },
        (err, stdout, stderr) => {
          const code = err === null ? 0 : typeof err.code === 'number' ? err.code : -1;
          resolve({ code, stdout, stderr });
        },
      );
    });
  }

  private async must(args: readonly string[], timeoutMs?: number): Promise<CommandResult> {
    const r = await this.systemctl(args, timeoutMs);
    if (r.code !== 0) throw new Error(`systemctl --user ${args.join(' ')} failed (${r.code}): ${r.stderr.trim()}`);
    return r;
  }

  /** Writes `<unitDir>/<name>` and reloads the manager. */
  async writeUnit(name: string, text: string): Promise<string> {
    const file = path.join(this.unitDir, name);
    fs.writeFileSync(file, text);
    await this.must(['daemon-reload']);
    return file;
  }

  /**
   * Writes a Type=notify service `<name>.service` running `spec.command` with stdout and stderr
   * appended to the returned log file (the user journal is not readable here), and reloads.
   */
  async writeService(name: string, spec: ServiceSpec): Promise<{ unit: string; logFile: string }> {
    const logFile = path.join(this.dir, `${name}.log`);
    const wrapper = path.join(this.dir, `${name}.sh`);
    // exec keeps the pid: the service's main process (NotifyAccess=main) is the command itself.
    fs.writeFileSync(
      wrapper,
      `#!/bin/sh\nexec ${spec.command.map(shellQuote).join(' ')} >>${shellQuote(logFile)} 2>&1\n`,
      { mode: 0o755 },
    );
    const lines = [
      '[Unit]',
      `Description=vballoon test service ${name}`,
      // systemd's default start limit (5 starts in 10 s, then the unit fails and its fd store is
      // released) would end a kill loop after five kills: off in tests unless asked for.
      ...((spec.unitExtra ?? []).some((l) => l.startsWith('StartLimit')) ? [] : ['StartLimitIntervalSec=0']),
      ...(spec.unitExtra ?? []),
      '',
      '[Service]',
      'Type=notify',
      'NotifyAccess=main',
      `ExecStart=${wrapper}`,
      `FileDescriptorStoreMax=${spec.fdStoreMax ?? 4096}`,
      `Restart=${spec.restart ?? 'on-failure'}`,
      `RestartSec=${spec.restartDelayMs ?? 100}ms`,
      'TimeoutStartSec=20s',
      'TimeoutStopSec=10s',
      ...Object.entries(spec.env ?? {}).map(([k, v]) => `Environment=${JSON.stringify(`${k}=${v}`)}`),
      ...(spec.extra ?? []),
      '',
    ];
    const unit = `${name}.service`;
    await this.writeUnit(unit, lines.join('\n'));
    return { unit, logFile };
  }

  /** systemctl start: returns once the job is done (for Type=notify: READY=1 arrived). */
  async start(unit: string): Promise<void> {
    await this.must(['start', unit]);
  }

  async stop(unit: string): Promise<void> {
    await this.must(['stop', unit]);
  }

  async restart(unit: string): Promise<void> {
    await this.must(['restart', unit]);
  }

  /** systemctl kill -s <signal> (the main process and the rest of the unit's processes). */
  async kill(unit: string, signal: NodeJS.Signals = 'SIGKILL'): Promise<void> {
    await this.must(['kill', '--signal', signal, unit]);
  }

  async status(unit: string): Promise<UnitStatus> {
    const r = await this.must([
      'show',
      '--property=ActiveState,SubState,MainPID,NRestarts,Result,ExecMainStatus',
      unit,
    ]);
    const p: Record<string, string> = {};
    for (const line of r.stdout.split('\n')) {
      const eq = line.indexOf('=');
      if (eq > 0) p[line.slice(0, eq)] = line.slice(eq + 1);
    }
    return {
      activeState: p['ActiveState'] ?? '',
      subState: p['SubState'] ?? '',
      mainPid: Number(p['MainPID'] ?? 0),
      nRestarts: Number(p['NRestarts'] ?? 0),
      result: p['Result'] ?? '',
      execMainStatus: Number(p['ExecMainStatus'] ?? 0),
    };
  }

  /** The unit's main pid, 0 when none runs. */
  async mainPid(unit: string): Promise<number> {
    return (await this.status(unit)).mainPid;
  }

  /** Polls status until `pred` holds (e.g. active/running with a new main pid after a crash). */
  async waitFor(unit: string, pred: (s: UnitStatus) => boolean, what: string, timeoutMs = 20_000): Promise<UnitStatus> {
    const start = Date.now();
    for (;;) {
      const s = await this.status(unit);
      if (pred(s)) return s;
      if (Date.now() - start > timeoutMs)
        throw new Error(`timed out waiting for ${unit}: ${what} (${JSON.stringify(s)})`);
      await sleep(50);
    }
  }

  /** SIGKILLs the manager and everything left in its namespace, synchronously. */
  private killSync(): void {
    live.delete(this);
    const pids = this.namespace === undefined ? [] : pidsInNamespace(this.namespace);
    for (const pid of [this.pid, ...pids]) {
      if (pid === process.pid || pid === process.ppid) continue;
      try {
        process.kill(pid, 'SIGKILL');
      } catch {
        // Already gone.
      }
    }
  }

  /** Stops every unit and the manager (SIGKILL after 10 s), then removes the directory. */
  async close(): Promise<void> {
    if (!this.exited) {
      try {
        process.kill(this.pid, 'SIGTERM');
      } catch {
        // Already gone.
      }
      await Promise.race([this.exit, sleep(10_000)]);
    }
    // Whatever outlived the manager (a service it could not stop) goes now: the namespace and its
    // tmpfs disappear with the last process in it.
    this.killSync();
    const ns = this.namespace;
    if (ns !== undefined) {
      const start = Date.now();
      while (pidsInNamespace(ns).length > 0 && Date.now() - start < 5000) await sleep(20);
    }
    await Promise.race([this.exit, sleep(1000)]);
    fs.rmSync(this.dir, { recursive: true, force: true });
  }
}
