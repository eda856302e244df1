/**
 * The real daemon (`node <the unit's Node options> dist/bin/vballoon.js serve`) run as a service
 * whose manager keeps its descriptors: the real systemd (a user manager, lib/testing/systemd-user.ts) where it can run,
 * else the test supervisor that implements the same protocol (lib/testing/fd-supervisor.ts).
 * For the restart tests (spec/daemon/restart.spec.ts) and the soak (bench/soak.ts).
 */
import { spawn } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { FdSupervisor } from './fd-supervisor';
import { SystemdUser, unavailableReason } from './systemd-user';
import { daemonNodeFlags } from './unit';

export const VBALLOON_BIN = path.resolve(__dirname, '..', '..', 'bin', 'vballoon.js');

export interface DaemonServiceOptions {
  /** A directory for the configuration, the control socket and the log. */
  dir: string;
  /** The daemon's configuration (control socket and log format are set here). */
  config: Record<string, unknown>;
  /** 'auto' (default): systemd if it can run here, else the supervisor. */
  manager?: 'auto' | 'systemd' | 'supervisor';
  /** Extra [Service] lines for systemd (e.g. StartLimit... goes in unitExtra). */
  unitExtra?: readonly string[];
}

export interface CliResult {
  code: number | null;
  stdout: string;
  stderr: string;
}

/** Runs `vballoon ARGS --control CONTROL` as a child process (SIGKILLed after `timeoutMs`). */
export function runCli(control: string, args: readonly string[], timeoutMs = 60_000): Promise<CliResult> {
  return new Promise((resolve) => {
    const p = spawn(process.execPath, [VBALLOON_BIN, ...args, '--control', control], {
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let stdout = '';
    let stderr = '';
    p.stdout.setEncoding('utf8').on('data', (c: string) => (stdout += c));
    p.stderr.setEncoding('utf8').on('data', (c: string) => (stderr += c));
    const t = setTimeout(() => p.kill('SIGKILL'), timeoutMs);
    p.on('close', (code) => {
      clearTimeout(t);
      resolve({ code, stdout, stderr });
    });
  });
}

export interface ServiceLogLine {
  msg: string;
  level: string;
  [k: string]: unknown;
}

function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

export class DaemonService {
  readonly control: string;
  readonly configFile: string;
  private systemd: SystemdUser | undefined;
  private unit = '';
  private supervisor: FdSupervisor | undefined;
  private logFile = '';
  /** Why systemd was not used (undefined when it was). */
  readonly fallbackReason: string | undefined;

  private constructor(options: DaemonServiceOptions, fallbackReason: string | undefined) {
    this.control = path.join(options.dir, 'control.sock');
    this.configFile = path.join(options.dir, 'config.json');
    this.fallbackReason = fallbackReason;
    fs.writeFileSync(
      this.configFile,
      JSON.stringify({
        control: { socket: this.control },
        log: { format: 'json', level: 'info' },
        metrics: false,
        ...options.config,
      }),
    );
  }

  /** Which manager keeps the descriptors. */
  get kind(): 'systemd' | 'supervisor' {
    return this.systemd !== undefined ? 'systemd' : 'supervisor';
  }

  /** Starts the daemon under its manager and waits for READY=1. */
  static async start(options: DaemonServiceOptions): Promise<DaemonService> {
    const want = options.manager ?? 'auto';
    let reason = want === 'supervisor' ? 'asked for the supervisor' : unavailableReason();
    if (want === 'systemd' && reason !== undefined) throw new Error(`systemd cannot run here: ${reason}`);
    let manager: SystemdUser | undefined;
    if (reason === undefined) {
      try {
        manager = await SystemdUser.launch();
      } catch (err) {
        if (want === 'systemd') throw err;
        reason = `the user manager did not start: ${(err as Error).message}`;
      }
    }
    const s = new DaemonService(options, reason);
    // Started as the shipped unit starts it (its Node options).
    const command = [process.execPath, ...daemonNodeFlags(), VBALLOON_BIN, 'serve', '--config', s.configFile];
    if (manager !== undefined) {
      s.systemd = manager;
      const { unit, logFile } = await s.systemd.writeService('vballoon', {
        command,
        restart: 'on-failure',
        restartDelayMs: 100,
        ...(options.unitExtra === undefined ? {} : { unitExtra: options.unitExtra }),
      });
      s.unit = unit;
      s.logFile = logFile;
      await s.systemd.start(unit);
    } else {
      s.logFile = path.join(options.dir, 'service.log');
      s.supervisor = new FdSupervisor({
        command,
        address: path.join(options.dir, 'notify.sock'),
        outputFile: s.logFile,
        restart: 'on-failure',
        restartDelayMs: 100,
      });
      await s.supervisor.start();
      await s.supervisor.waitReady(20_000);
    }
    return s;
  }

  /** The daemon's pid now. */
  async pid(): Promise<number> {
    if (this.systemd !== undefined) return this.systemd.mainPid(this.unit);
    return this.supervisor!.mainPid ?? 0;
  }

  /** Waits until a daemon other than `old` has said READY=1. */
  private async waitNew(old: number, timeoutMs = 30_000): Promise<number> {
    if (this.systemd !== undefined) {
      const s = await this.systemd.waitFor(
        this.unit,
        (u) => u.activeState === 'active' && u.mainPid !== 0 && u.mainPid !== old,
        'the restarted daemon',
        timeoutMs,
      );
      return s.mainPid;
    }
    const sup = this.supervisor!;
    const start = Date.now();
    while (sup.mainPid === old || sup.mainPid === undefined || !sup.ready) {
      if (Date.now() - start > timeoutMs) throw new Error('timed out waiting for the restarted daemon');
      await sleep(5);
    }
    return sup.mainPid;
  }

  /** SIGKILLs the daemon; the manager restarts it. Resolves with the new pid once it is ready. */
  async crash(): Promise<number> {
    const old = await this.pid();
    if (this.systemd !== undefined) await this.systemd.kill(this.unit, 'SIGKILL');
    else this.supervisor!.kill('SIGKILL');
    return this.waitNew(old);
  }

  /** A graceful restart (`systemctl restart`). Resolves with the new pid once it is ready. */
  async restart(): Promise<number> {
    const old = await this.pid();
    if (this.systemd !== undefined) await this.systemd.restart(this.unit);
    else await this.supervisor!.restart();
    return this.waitNew(old);
  }

  /** Descriptors the manager holds for the daemon (systemd's NFileDescriptorStore). */
  async storedDescriptors(): Promise<number> {
    if (this.systemd !== undefined) {
      const r = await this.systemd.systemctl(['show', '-p', 'NFileDescriptorStore', '--value', this.unit]);
      return Number(r.stdout.trim());
    }
    return this.supervisor!.stored.length;
  }

  /** The daemon's log lines so far (JSON lines; others as `raw`). */
  logs(): ServiceLogLine[] {
    let text = '';
    try {
      text = fs.readFileSync(this.logFile, 'utf8');
    } catch {
      return [];
    }
    return text
      .split('\n')
      .filter((l) => l !== '')
      .map((l) => {
        try {
          return JSON.parse(l) as ServiceLogLine;
        } catch {
          return { msg: l, level: 'raw' };
        }
      });
  }

  /** Runs the CLI against this daemon's control socket. */
  cli(args: readonly string[], timeoutMs = 60_000): Promise<CliResult> {
    return runCli(this.control, args, timeoutMs);
  }

  /** Stops the daemon for good (its manager releases the store) and the manager. */
  async close(): Promise<void> {
    if (this.systemd !== undefined) {
      await this.systemd.stop(this.unit).catch(() => undefined);
      await this.systemd.close();
      this.systemd = undefined;
    }
    if (this.supervisor !== undefined) {
      await this.supervisor.stop().catch(() => undefined);
      await this.supervisor.close();
      this.supervisor = undefined;
    }
  }
}
