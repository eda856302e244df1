/**
 * Real guest, same QEMU: the time a stock Linux guest of 4 GiB takes to inflate a 3 GiB balloon
 * (its memory touched first) and to deflate it,
 * and the host memory released, with vballoon (vhost-user-test-device-pci) versus QEMU's built-in
 * virtio-balloon-pci driven over QMP (`balloon`, `query-balloon`), on the same QEMU binary,
 * guest kernel, memory backend and machine. Needs scripts/e2e-env.sh; skipped without it.
 */
import { ChildProcess, spawn } from 'node:child_process';
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as os from 'node:os';
import * as path from 'node:path';
import { callDaemon } from '../lib/daemon/client';
import { E2eEnv, loadE2eEnv, QemuGuest } from '../lib/testing/qemu';
import { median } from './stats';

const MiB = 1024 * 1024;
/** Issue 12's sizes: a 4 GiB guest, a 3 GiB balloon (VBALLOON_BENCH_GUEST_MIB / _BALLOON_MIB change them). */
const GUEST_MIB = Number(process.env['VBALLOON_BENCH_GUEST_MIB'] ?? '4096');
const BALLOON = Number(process.env['VBALLOON_BENCH_BALLOON_MIB'] ?? '3072') * MiB;
/** Under TCG a guest touches its memory at about 40 MB/s: generous bounds for 4 GiB. */
const TOUCH_TIMEOUT_MS = 600_000;
const BALLOON_TIMEOUT_MS = 600_000;

/** A minimal QMP client: one command at a time. */
class Qmp {
  private buffered = '';
  private waiting: ((msg: Record<string, unknown>) => void) | undefined;
  private constructor(private readonly socket: net.Socket) {
    socket.setEncoding('utf8');
    socket.on('data', (d: string) => {
      this.buffered += d;
      for (let nl = this.buffered.indexOf('\n'); nl >= 0; nl = this.buffered.indexOf('\n')) {
        const msg = JSON.parse(this.buffered.slice(0, nl)) as Record<string, unknown>;
        this.buffered = this.buffered.slice(nl + 1);
        if ('return' in msg || 'error' in msg || 'QMP' in msg) {
          const w = this.waiting;
          this.waiting = undefined;
          w?.(msg);
        }
      }
    });
  }
  static async connect(socketPath: string): Promise<Qmp> {
    const socket = net.createConnection(socketPath);
    await new Promise((resolve, reject) => socket.once('connect', resolve).once('error', reject));
    const q = new Qmp(socket);
    await q.next();
    await q.cmd('qmp_capabilities');
    return q;
  }
  private next(): Promise<Record<string, unknown>> {
    return new Promise((resolve) => (this.waiting = resolve));
  }
  async cmd(execute: string, args?: Record<string, unknown>): Promise<unknown> {
    const reply = this.next();
    this.socket.write(`${JSON.stringify(args === undefined ? { execute } : { execute, arguments: args })}\n`);
    const msg = await reply;
    if ('error' in msg) throw new Error(`QMP ${execute}: ${JSON.stringify(msg['error'])}`);
    return msg['return'];
  }
  close(): void {
    this.socket.destroy();
  }
}

/** Allocated bytes of QEMU's guest memfd, found among its descriptors. */
function qemuMemfdBytes(pid: number): number {
  for (const fd of fs.readdirSync(`/proc/${pid}/fd`)) {
    const target = fs.readlinkSync(`/proc/${pid}/fd/${fd}`);
    if (target.startsWith('/memfd:') && target.includes('mem'))
      return fs.statSync(`/proc/${pid}/fd/${fd}`).blocks * 512;
  }
  throw new Error('no guest memfd in QEMU');
}

async function until(cond: () => Promise<boolean>, timeoutMs: number): Promise<void> {
  const start = Date.now();
  while (!(await cond())) {
    if (Date.now() - start > timeoutMs) throw new Error('timeout');
    await new Promise((r) => setTimeout(r, 10));
  }
}

async function touch(g: QemuGuest): Promise<void> {
  const mem = await g.meminfo();
  await g.run(`/bin/eater ${Math.floor((mem['MemAvailable'] - 48 * MiB) / MiB)} 16 0 0`, TOUCH_TIMEOUT_MS);
}

interface Run {
  inflateSeconds: number;
  deflateSeconds: number;
  releasedBytes: number;
}

async function runVballoon(env: E2eEnv, dir: string): Promise<Run> {
  const bin = path.resolve(__dirname, '..', 'bin', 'vballoon.js');
  const control = path.join(dir, 'control.sock');
  const sock = path.join(dir, 'vm0.sock');
  const config = path.join(dir, 'vb.json');
  fs.writeFileSync(
    config,
    JSON.stringify({
      control: { socket: control },
      metrics: false,
      log: { level: 'warn' },
      vms: [
        {
          name: 'vm0',
          socket: sock,
          memory: `${GUEST_MIB}M`,
          reporting: false,
          messageQueue: false,
          deflateOnOom: false,
        },
      ],
    }),
  );
  const daemon: ChildProcess = spawn(process.execPath, [bin, 'serve', '--config', config], { stdio: 'ignore' });
  const g = new QemuGuest(env, { socketPath: sock, memMiB: GUEST_MIB, numVqs: 3, configSize: 8 });
  try {
    const deadline = Date.now() + 10_000;
    while (!fs.existsSync(control) && Date.now() < deadline) await new Promise((r) => setTimeout(r, 20));
    await g.boot();
    const status = async (): Promise<{ actualBytes: number; hostResidentBytes: number; negotiatedQueues: string[] }> =>
      (await callDaemon(control, 'status', { vm: 'vm0' })) as never;
    await until(async () => (await status()).negotiatedQueues.length > 0, 20_000);
    await touch(g);
    const before = (await status()).hostResidentBytes;
    let t0 = process.hrtime.bigint();
    await callDaemon(control, 'set-target', { vm: 'vm0', bytes: BALLOON });
    await until(async () => (await status()).actualBytes === BALLOON, BALLOON_TIMEOUT_MS);
    const inflateSeconds = Number(process.hrtime.bigint() - t0) / 1e9;
    // Holes are punched off the event loop: read host memory once it has stopped falling.
    let last = -1;
    for (let i = 0; i < 500; i++) {
      const now = (await status()).hostResidentBytes;
      if (now === last) break;
      last = now;
      await new Promise((r) => setTimeout(r, 50));
    }
    const releasedBytes = before - last;
    t0 = process.hrtime.bigint();
    await callDaemon(control, 'set-target', { vm: 'vm0', bytes: 0 });
    await until(async () => (await status()).actualBytes === 0, BALLOON_TIMEOUT_MS);
    const deflateSeconds = Number(process.hrtime.bigint() - t0) / 1e9;
    return { inflateSeconds, deflateSeconds, releasedBytes };
  } finally {
    await g.shutdown();
    daemon.kill('SIGTERM');
    await new Promise((r) => daemon.once('exit', r));
  }
}

async function runBuiltin(env: E2eEnv, dir: string): Promise<Run> {
  const qmpSock = path.join(dir, 'qmp.sock');
  // The same guest, memory backend and machine; the balloon is QEMU's own.
  const g = new QemuGuest(env, {
    socketPath: '',
    builtinBalloonQmp: qmpSock,
    memMiB: GUEST_MIB,
    numVqs: 0,
    configSize: 8,
  });
  try {
    await g.boot();
    const qmp = await Qmp.connect(qmpSock);
    try {
      const pid = g.pid!;
      const actual = async (): Promise<number> => ((await qmp.cmd('query-balloon')) as { actual: number }).actual;
      await touch(g);
      const before = qemuMemfdBytes(pid);
      const ram = GUEST_MIB * MiB;
      let t0 = process.hrtime.bigint();
      await qmp.cmd('balloon', { value: ram - BALLOON }); // QMP's value: what the guest keeps
      await until(async () => (await actual()) === ram - BALLOON, BALLOON_TIMEOUT_MS);
      const inflateSeconds = Number(process.hrtime.bigint() - t0) / 1e9;
      const releasedBytes = before - qemuMemfdBytes(pid);
      t0 = process.hrtime.bigint();
      await qmp.cmd('balloon', { value: ram });
      await until(async () => (await actual()) === ram, BALLOON_TIMEOUT_MS);
      const deflateSeconds = Number(process.hrtime.bigint() - t0) / 1e9;
      return { inflateSeconds, deflateSeconds, releasedBytes };
    } finally {
      qmp.close();
    }
  } finally {
    await g.shutdown();
  }
}

export interface QemuCompareResult {
  skipped?: string;
  rounds: number;
  balloonMiB: number;
  vballoon?: { inflateSeconds: number; deflateSeconds: number; releasedMiB: number };
  builtin?: { inflateSeconds: number; deflateSeconds: number; releasedMiB: number };
  inflateRatio?: number;
  deflateRatio?: number;
}

export async function benchQemuCompare(rounds = 3): Promise<QemuCompareResult> {
  const env = loadE2eEnv(process.env['VBALLOON_E2E_CACHE'] ?? path.resolve(__dirname, '..', '..', '.cache', 'e2e'));
  if (env === undefined)
    return { skipped: 'no QEMU environment (run scripts/e2e-env.sh as root)', rounds: 0, balloonMiB: BALLOON / MiB };
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vballoon-qemu-bench-'));
  const v: Run[] = [];
  const b: Run[] = [];
  try {
    for (let r = 0; r < rounds; r++) {
      v.push(await runVballoon(env, dir));
      b.push(await runBuiltin(env, dir));
    }
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
  const agg = (runs: Run[]) => ({
    inflateSeconds: Math.round(median(runs.map((x) => x.inflateSeconds)) * 1000) / 1000,
    deflateSeconds: Math.round(median(runs.map((x) => x.deflateSeconds)) * 1000) / 1000,
    releasedMiB: Math.round(median(runs.map((x) => x.releasedBytes)) / MiB),
  });
  const vb = agg(v);
  const bi = agg(b);
  return {
    rounds,
    balloonMiB: BALLOON / MiB,
    vballoon: vb,
    builtin: bi,
    inflateRatio: Math.round((vb.inflateSeconds / bi.inflateSeconds) * 100) / 100,
    deflateRatio: Math.round((vb.deflateSeconds / bi.deflateSeconds) * 100) / 100,
  };
}
