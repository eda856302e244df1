/** Runs the real daemon (`node dist/bin/vballoon.js serve`) and the real CLI as child processes. */
import { ChildProcess, spawn, spawnSync, SpawnSyncOptions } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { tmpDir } from '../helpers';

export const BIN = path.resolve(__dirname, '..', '..', 'bin', 'vballoon.js');

export interface LogLine {
  time: string;
  level: string;
  msg: string;
  [k: string]: unknown;
}

export class DaemonProcess {
  readonly dir = tmpDir();
  readonly control = path.join(this.dir, 'control.sock');
  readonly stateFile = path.join(this.dir, 'state.json');
  readonly logs: LogLine[] = [];
  proc: ChildProcess | undefined;
  metricsPort = 0;
  exitCode: number | null | undefined;
  private exited: Promise<number | null> | undefined;

  configFile(config: Record<string, unknown>): string {
    const file = path.join(this.dir, 'config.json');
    fs.writeFileSync(
      file,
      JSON.stringify({
        control: { socket: this.control },
        metrics: { host: '127.0.0.1', port: 0 },
        log: { format: 'json', level: 'debug' },
        state: { file: this.stateFile },
        ...config,
      }),
    );
    return file;
  }

  vmSocket(name: string): string {
    return path.join(this.dir, `${name}.sock`);
  }

  /** Starts the daemon and waits for its "started" line. */
  async start(
    config: Record<string, unknown>,
    extraArgs: string[] = [],
    env: NodeJS.ProcessEnv = process.env,
  ): Promise<void> {
    const file = this.configFile(config);
    const proc = spawn(process.execPath, [BIN, 'serve', '--config', file, ...extraArgs], {
      stdio: ['ignore', 'pipe', 'pipe'],
      env,
    });
    this.proc = proc;
    this.exitCode = undefined;
    // Only this process's exit counts (a previous daemon's late exit event must not).
    this.exited = new Promise((resolve) =>
      proc.on('exit', (code) => {
        if (this.proc === proc) this.exitCode = code;
        resolve(code);
      }),
    );
    let buffered = '';
    proc.stderr.setEncoding('utf8');
    proc.stderr.on('data', (chunk: string) => {
      buffered += chunk;
      for (let nl = buffered.indexOf('\n'); nl >= 0; nl = buffered.indexOf('\n')) {
        const line = buffered.slice(0, nl);
        buffered = buffered.slice(nl + 1);
        try {
          this.logs.push(JSON.parse(line) as LogLine);
        } catch {
          this.logs.push({ time: '', level: 'raw', msg: line });
        }
      }
    });
    await this.waitLog((l) => l.msg === 'vballoon daemon started' || l.level === 'raw', 10_000);
    const started = this.logs.find((l) => l.msg === 'vballoon daemon started');
    if (started === undefined) throw new Error(`daemon did not start: ${this.logs.map((l) => l.msg).join(' | ')}`);
    this.metricsPort = Number(String(started['metrics']).split(':').pop());
  }

  async waitLog(pred: (l: LogLine) => boolean, timeoutMs = 10_000): Promise<LogLine> {
    const start = Date.now();
    for (;;) {
      const hit = this.logs.find(pred);
      if (hit !== undefined) return hit;
      if (this.exitCode !== undefined)
        throw new Error(`daemon exited (${this.exitCode}); logs: ${this.logs.map((l) => l.msg).join(' | ')}`);
      if (Date.now() - start > timeoutMs)
        throw new Error(`log line not seen; logs: ${this.logs.map((l) => l.msg).join(' | ')}`);
      await new Promise((r) => setTimeout(r, 20));
    }
  }

  /** Runs the CLI against this daemon. */
  cli(args: string[], options: SpawnSyncOptions = {}): { code: number | null; stdout: string; stderr: string } {
    const r = spawnSync(process.execPath, [BIN, '--control', this.control, ...args], {
      encoding: 'utf8',
      timeout: 30_000,
      ...options,
    });
    return { code: r.status, stdout: String(r.stdout), stderr: String(r.stderr) };
  }

  /** Runs the CLI asynchronously (for --wait while the test drives a guest). */
  cliAsync(args: string[]): Promise<{ code: number | null; stdout: string; stderr: string }> {
    return new Promise((resolve) => {
      const p = spawn(process.execPath, [BIN, '--control', this.control, ...args], {
        stdio: ['ignore', 'pipe', 'pipe'],
      });
      let stdout = '';
      let stderr = '';
      p.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
      p.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
      p.on('exit', (code) => resolve({ code, stdout, stderr }));
    });
  }

  signal(sig: NodeJS.Signals): void {
    this.proc?.kill(sig);
  }

  /** Stops the daemon with SIGTERM and starts it again with `config` (logs start afresh). */
  async restart(config: Record<string, unknown>): Promise<void> {
    this.signal('SIGTERM');
    await this.exited;
    this.logs.length = 0;
    await this.start(config);
  }

  async stop(): Promise<number | null> {
    if (this.exitCode === undefined) this.signal('SIGTERM');
    const code = await this.exited;
    fs.rmSync(this.dir, { recursive: true, force: true });
    return code ?? null;
  }
}
