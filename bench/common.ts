/** Pieces shared by the benchmarks that run a child process. */
import { ChildProcess, spawn, spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { native, PollHandle, POLL_READABLE } from '../lib/native';
import { daemonNodeFlags } from '../lib/testing/unit';

export { daemonNodeFlags, unitNice } from '../lib/testing/unit';

/**
 * Runs this script again under the daemon's Node options if it lacks them, and exits with its
 * status: a bench that stands in for the daemon runs with the heap the daemon runs with.
 */
export function asDaemonProcess(): void {
  const flags = daemonNodeFlags();
  if (flags.every((f) => process.execArgv.includes(f))) return;
  const script = process.argv[1];
  const r = spawnSync(process.execPath, [...flags, ...process.execArgv, script, ...process.argv.slice(2)], {
    stdio: 'inherit',
  });
  process.exit(r.status ?? 1);
}

/** This process's Node options without the daemon's: for the processes that stand in for guests. */
export function guestExecArgv(): string[] {
  const flags = new Set(daemonNodeFlags());
  return process.execArgv.filter((f) => !flags.has(f));
}

/** Polls `cond` every `pollMs` until it holds; rejects naming `what` after `timeoutMs`. */
export function waitFor(cond: () => boolean, timeoutMs: number, what: string, pollMs = 10): Promise<void> {
  const start = Date.now();
  return new Promise((resolve, reject) => {
    const check = (): void => {
      if (cond()) resolve();
      else if (Date.now() - start > timeoutMs) reject(new Error(`timed out waiting for ${what}`));
      else setTimeout(check, pollMs);
    };
    check();
  });
}

/** The real daemon (`vballoon serve`) in a child process with `vms`, in a fresh directory. */
export interface BenchDaemon {
  dir: string;
  control: string;
  process: ChildProcess;
  /** Stops it (SIGTERM) and removes the directory. */
  stop(): Promise<void>;
}

/** Starts the daemon with one VM per entry of `vms(dir)` and waits for its control socket. */
export async function startBenchDaemon(
  prefix: string,
  vms: (dir: string) => Array<Record<string, unknown>>,
): Promise<BenchDaemon> {
  const bin = path.resolve(__dirname, '..', 'bin', 'vballoon.js');
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), `vballoon-${prefix}-`));
  const control = path.join(dir, 'control.sock');
  const config = path.join(dir, 'config.json');
  fs.writeFileSync(
    config,
    JSON.stringify({ control: { socket: control }, metrics: false, log: { level: 'warn' }, vms: vms(dir) }),
  );
  const child = spawn(process.execPath, [...daemonNodeFlags(), bin, 'serve', '--config', config], { stdio: 'ignore' });
  const stop = async (): Promise<void> => {
    child.kill('SIGTERM');
    await new Promise((r) => (child.exitCode !== null ? r(undefined) : child.once('exit', r)));
    fs.rmSync(dir, { recursive: true, force: true });
  };
  try {
    await waitFor(() => fs.existsSync(control), 10_000, 'the control socket');
  } catch (err) {
    await stop();
    throw err;
  }
  return { dir, control, process: child, stop };
}

/**
 * A persistent watcher on an eventfd; next() resolves at its next readiness. Every measured path
 * and its reference wait through one of these, so they pay the same event-loop cost.
 */
export class Waker {
  private resolve: (() => void) | undefined;
  private readonly handle: PollHandle;
  constructor(private readonly fd: number) {
    this.handle = native.pollStart(fd, POLL_READABLE, () => {
      if (native.eventfdRead(this.fd) === null) return;
      const r = this.resolve;
      this.resolve = undefined;
      r?.();
    });
  }
  next(): Promise<void> {
    return new Promise((resolve) => (this.resolve = resolve));
  }
  close(): void {
    native.pollStop(this.handle);
  }
}

/** The child's side of the eventfd ping-pong reference: write `pingFd`, wait for `pongFd`. */
export async function pingPong(pingFd: number, pongFd: number, iterations: number): Promise<number[]> {
  const waker = new Waker(pongFd);
  const samples: number[] = [];
  try {
    for (let i = 0; i < iterations; i++) {
      const t0 = process.hrtime.bigint();
      const back = waker.next();
      native.eventfdWrite(pingFd, 1);
      await back;
      samples.push(Number(process.hrtime.bigint() - t0));
    }
  } finally {
    waker.close();
  }
  return samples;
}

/** The parent's side: echo every ping as a pong. Returns the watcher (stop it when done). */
export function echoPings(pingFd: number, pongFd: number): PollHandle {
  return native.pollStart(pingFd, POLL_READABLE, () => {
    if (native.eventfdRead(pingFd) !== null) native.eventfdWrite(pongFd, 1);
  });
}
