/**
 * Runs a real QEMU (>= 10.2) with a real Linux guest attached to a vballoon socket, for the
 * end-to-end tests and the demo. The environment comes from scripts/e2e-env.sh: either a system
 * QEMU, or QEMU 11.1 from a Debian trixie root, started through that root's dynamic loader (no
 * chroot, no bind mounts: every path stays a host path). Commands run in the guest over the
 * serial console, framed by markers.
 */
import { ChildProcess, spawn } from 'node:child_process';
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as path from 'node:path';

export interface E2eEnv {
  qemu: string;
  /** The trixie root QEMU comes from, or '' for a system QEMU. */
  root: string;
  kernel: string;
  initrd: string;
  /** The initramfs with our guest driver (guest/linux) instead of the stock one; '' when not built. */
  driverInitrd: string;
}

/** Reads $CACHE/env.sh written by scripts/e2e-env.sh. */
export function loadE2eEnv(cacheDir: string): E2eEnv | undefined {
  const file = path.join(cacheDir, 'env.sh');
  if (!fs.existsSync(file)) return undefined;
  const vars: Record<string, string> = {};
  for (const line of fs.readFileSync(file, 'utf8').split('\n')) {
    const m = /^([A-Z0-9_]+)=(.*)$/.exec(line.trim());
    if (m !== null) vars[m[1]] = m[2]!;
  }
  return {
    qemu: vars['E2E_QEMU'] ?? '',
    root: vars['E2E_CHROOT'] ?? '',
    kernel: vars['E2E_KERNEL'] ?? '',
    initrd: vars['E2E_INITRD'] ?? '',
    driverInitrd: vars['E2E_DRIVER_INITRD'] ?? '',
  };
}

export interface GuestOptions {
  /** The vballoon socket; unused with `builtinBalloonQmp`. */
  socketPath: string;
  /** Use QEMU's own virtio-balloon-pci instead, with QMP on this unix socket (benchmarks). */
  builtinBalloonQmp?: string;
  memMiB: number;
  numVqs: number;
  configSize: number;
  vqSize?: number;
  /** Extra chardev options, e.g. 'reconnect-ms=1000'. */
  chardevExtra?: string;
  /** Another initramfs than `env.initrd` (e.g. `env.driverInitrd`). */
  initrd?: string;
  /** Appended to the kernel command line (e.g. `VBALLOON_MODARGS=message_bit=2` for the driver initramfs). */
  appendExtra?: string;
  /** A QMP monitor on this unix socket (stop, cont, system_reset: see Qmp below). */
  qmpSocket?: string;
  /** Let a guest reboot (or QMP system_reset) restart the guest instead of ending QEMU. */
  allowReboot?: boolean;
}

/** The argv that runs QEMU from `env` (through the trixie root's loader when needed). */
export function qemuCommand(env: E2eEnv, args: string[]): { file: string; args: string[] } {
  if (env.root === '') return { file: env.qemu, args };
  const r = env.root;
  return {
    file: path.join(r, 'lib64', 'ld-linux-x86-64.so.2'),
    args: [
      '--library-path',
      `${r}/lib/x86_64-linux-gnu:${r}/usr/lib/x86_64-linux-gnu`,
      path.join(r, env.qemu),
      '-L',
      `${r}/usr/share/qemu`,
      '-L',
      `${r}/usr/share/seabios`,
      ...args,
    ],
  };
}

export class QemuGuest {
  readonly output: string[] = [];
  private proc: ChildProcess | undefined;
  private buffered = '';
  private waiters: Array<() => void> = [];
  private seq = 0;
  exitCode: number | null | undefined;
  exited: Promise<number | null> = Promise.resolve(null);

  constructor(
    private readonly env: E2eEnv,
    private readonly options: GuestOptions,
  ) {}

  get pid(): number | undefined {
    return this.proc?.pid;
  }

  args(): string[] {
    const o = this.options;
    return [
      '-nodefaults',
      '-display',
      'none',
      '-serial',
      'stdio',
      '-monitor',
      'none',
      '-accel',
      'tcg',
      '-cpu',
      'max',
      '-m',
      `${o.memMiB}M`,
      '-smp',
      '1',
      ...(o.allowReboot === true ? [] : ['-no-reboot']),
      ...(o.qmpSocket !== undefined && o.builtinBalloonQmp === undefined
        ? ['-qmp', `unix:${o.qmpSocket},server=on,wait=off`]
        : []),
      '-object',
      `memory-backend-memfd,id=mem,size=${o.memMiB}M,share=on`,
      '-machine',
      'q35,memory-backend=mem',
      ...(o.builtinBalloonQmp === undefined
        ? [
            '-chardev',
            `socket,id=vb,path=${o.socketPath}${o.chardevExtra ? `,${o.chardevExtra}` : ''}`,
            '-device',
            `vhost-user-test-device-pci,chardev=vb,virtio-id=5,num_vqs=${o.numVqs},` +
              `vq_size=${o.vqSize ?? 128},config_size=${o.configSize}`,
          ]
        : ['-device', 'virtio-balloon-pci', '-qmp', `unix:${o.builtinBalloonQmp},server=on,wait=off`]),
      '-kernel',
      this.env.kernel,
      '-initrd',
      o.initrd ?? this.env.initrd,
      '-append',
      `console=ttyS0 quiet panic=-1${o.appendExtra ? ` ${o.appendExtra}` : ''}`,
    ];
  }

  /** Boots and waits until the guest's /init is ready for commands. */
  async boot(timeoutMs = 60_000): Promise<void> {
    const cmd = qemuCommand(this.env, this.args());
    const proc = spawn(cmd.file, cmd.args, { stdio: ['pipe', 'pipe', 'pipe'] });
    this.proc = proc;
    this.exited = new Promise((resolve) => proc.on('exit', (code) => resolve((this.exitCode = code))));
    const onData = (chunk: Buffer): void => {
      this.buffered += chunk.toString('utf8');
      const lines = this.buffered.split(/\r?\n/);
      this.buffered = lines.pop() ?? '';
      this.output.push(...lines);
      const w = this.waiters;
      this.waiters = [];
      for (const f of w) f();
    };
    proc.stdout.on('data', onData);
    proc.stderr.on('data', onData);
    proc.stdin.on('error', () => undefined);
    await this.waitLine((l) => l.startsWith('VBALLOON_GUEST_READY'), timeoutMs);
    await this.run('stty -echo 2>/dev/null; true');
  }

  /** Resolves with the first output line (from now or earlier) matching `pred`. */
  waitLine(pred: (line: string) => boolean, timeoutMs = 30_000, from = 0): Promise<string> {
    return new Promise((resolve, reject) => {
      const timer = setTimeout(
        () =>
          reject(
            new Error(`guest output not seen in ${timeoutMs} ms; last lines:\n${this.output.slice(-15).join('\n')}`),
          ),
        timeoutMs,
      );
      const check = (): void => {
        const hit = this.output.slice(from).find(pred);
        if (hit !== undefined) {
          clearTimeout(timer);
          resolve(hit);
        } else if (this.exitCode !== undefined) {
          clearTimeout(timer);
          reject(new Error(`QEMU exited (${this.exitCode}); last lines:\n${this.output.slice(-15).join('\n')}`));
        } else this.waiters.push(check);
      };
      check();
    });
  }

  /** Runs a shell command in the guest; resolves with its output lines and exit status. */
  async run(command: string, timeoutMs = 60_000): Promise<{ lines: string[]; status: number }> {
    const n = ++this.seq;
    const start = this.output.length;
    this.proc!.stdin!.write(`echo __B${n}__; ${command}; echo __E${n}__ $?\n`);
    const end = await this.waitLine((l) => l.startsWith(`__E${n}__`), timeoutMs, start);
    const all = this.output.slice(start);
    const b = all.findIndex((l) => l === `__B${n}__`);
    const e = all.findIndex((l) => l.startsWith(`__E${n}__`));
    return { lines: all.slice(b + 1, e), status: Number(end.split(' ')[1]) };
  }

  /** Starts a command in the background in the guest (output goes to the console). */
  spawnInGuest(command: string): void {
    this.proc!.stdin!.write(`(${command}) &\n`);
  }

  async meminfo(): Promise<Record<string, number>> {
    const r = await this.run('cat /proc/meminfo');
    const out: Record<string, number> = {};
    for (const l of r.lines) {
      const m = /^(\w+):\s+(\d+)\s*kB/.exec(l);
      if (m !== null) out[m[1]] = Number(m[2]) * 1024;
    }
    return out;
  }

  kill(signal: NodeJS.Signals = 'SIGKILL'): void {
    this.proc?.kill(signal);
  }

  /** Powers the guest off (or kills QEMU after `timeoutMs`). */
  async shutdown(timeoutMs = 15_000): Promise<void> {
    if (this.proc === undefined || this.exitCode !== undefined) return;
    this.proc.stdin!.write('poweroff -f\n');
    const t = setTimeout(() => this.kill('SIGKILL'), timeoutMs);
    await this.exited;
    clearTimeout(t);
  }
}

/**
 * A minimal QMP client (one command at a time): connects, negotiates capabilities, then
 * `execute` sends a command and resolves with its `return` (rejects on `error`). Events are
 * collected in `events`.
 */
export class Qmp {
  readonly events: Array<{ event: string; data?: unknown }> = [];
  private buffered = '';
  private pending: { resolve(v: unknown): void; reject(e: Error): void } | undefined;
  private greeted: (() => void) | undefined;

  private constructor(private readonly sock: net.Socket) {
    sock.setEncoding('utf8');
    sock.on('data', (chunk: string) => this.onData(chunk));
    sock.on('error', (err) => this.pending?.reject(err));
  }

  /** Connects to QEMU's QMP socket (retrying until QEMU has created it) and enters command mode. */
  static async connect(socketPath: string, timeoutMs = 30_000): Promise<Qmp> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      try {
        const sock = await new Promise<net.Socket>((resolve, reject) => {
          const s = net.connect(socketPath, () => resolve(s));
          s.once('error', reject);
        });
        const qmp = new Qmp(sock);
        await new Promise<void>((resolve) => (qmp.greeted = resolve));
        await qmp.execute('qmp_capabilities');
        return qmp;
      } catch (err) {
        if (Date.now() > deadline) throw err;
        await new Promise((r) => setTimeout(r, 200));
      }
    }
  }

  execute(command: string, args?: Record<string, unknown>): Promise<unknown> {
    if (this.pending !== undefined) return Promise.reject(new Error('QMP: one command at a time'));
    return new Promise((resolve, reject) => {
      this.pending = { resolve, reject };
      this.sock.write(
        JSON.stringify(args === undefined ? { execute: command } : { execute: command, arguments: args }),
      );
    });
  }

  close(): void {
    this.sock.destroy();
  }

  private onData(chunk: string): void {
    this.buffered += chunk;
    const lines = this.buffered.split('\n');
    this.buffered = lines.pop() ?? '';
    for (const line of lines) {
      if (line.trim() === '') continue;
      const msg = JSON.parse(line) as {
        QMP?: unknown;
        event?: string;
        data?: unknown;
        return?: unknown;
        error?: { desc: string };
      };
      if (msg.QMP !== undefined) this.greeted?.();
      else if (msg.event !== undefined) this.events.push({ event: msg.event, data: msg.data });
      else {
        const p = this.pending;
        this.pending = undefined;
        if (msg.error !== undefined) p?.reject(new Error(`QMP: ${msg.error.desc}`));
        else p?.resolve(msg.return);
      }
    }
  }
}
