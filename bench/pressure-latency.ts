/**
 * Pressure acknowledgement latency: a guest driver (another process) sends a pressure message,
 * kicks, and waits for the used buffer; in between, the device runs the pressure listener, which
 * changes the target (config space + CONFIG_CHANGE_MSG on the back-end channel) as the policy
 * does. Measured next to an eventfd ping-pong between the same two processes, and again while
 * another VM's balloon inflates continuously (a second driver in a third process).
 */
import { ChildProcess, fork } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { BalloonDevice } from '../lib/device/balloon';
import { NullLogger } from '../lib/log';
import { native } from '../lib/native';
import { echoPings, pingPong, Waker } from './common';
import { BalloonGuest } from '../lib/testing/balloon-guest';
import { TestFrontend } from '../lib/testing/frontend';
import { VhostUserBackend } from '../lib/vhost/server';
import { median, summarize } from './stats';

const MiB = 1024 * 1024;
const PING_FD = 4;
const PONG_FD = 5;

type Req =
  | { kind: 'pressure'; socketPath: string; iterations: number }
  | { kind: 'pingpong'; iterations: number }
  | { kind: 'churn'; socketPath: string; seconds: number }
  | { kind: 'exit' };

async function pressureLoop(socketPath: string, iterations: number): Promise<number[]> {
  // The seed's driver, reduced to its message queue: realize, start all queues, then messages.
  const fe = TestFrontend.connect(socketPath, { numQueues: 3, configSize: 8, ramBytes: 64 * MiB, layout: 'flat' });
  try {
    await fe.realize();
    const drivers = await fe.start(fe.backendFeatures & ~(1n << 30n), [0, 1, 2]);
    const d = drivers.get(2)!; // inflate 0, deflate 1, message 2 (no stats, no reporting)
    const waker = new Waker(d.callFd);
    const buf = fe.ram.alloc(4);
    fe.ram.memory.writeU32(buf, 1);
    const samples: number[] = [];
    try {
      for (let i = 0; i < iterations; i++) {
        const t0 = process.hrtime.bigint();
        const used = waker.next();
        d.setUsedEvent(d.availIdxPublished);
        d.addBuffer([{ addr: buf, len: 4 }]);
        d.kick();
        await used;
        d.takeUsed();
        samples.push(Number(process.hrtime.bigint() - t0));
      }
    } finally {
      waker.close();
    }
    return samples;
  } finally {
    fe.close();
  }
}

/** Another VM: a Linux-like guest that keeps inflating and deflating. */
async function churn(socketPath: string, seconds: number): Promise<number[]> {
  const g = await BalloonGuest.boot(socketPath, { mode: 'stock', numQueues: 5, ramBytes: 256 * MiB });
  try {
    g.touchFree();
    // The host flips B's target every 50 ms; the model follows it (inflate, deflate, ...).
    await new Promise((r) => setTimeout(r, seconds * 1000));
    return [g.actualPages];
  } finally {
    await g.close();
  }
}

function runChild(): void {
  process.on('message', (req: Req) => {
    if (req.kind === 'exit') process.exit(0);
    const work =
      req.kind === 'pressure'
        ? pressureLoop(req.socketPath, req.iterations)
        : req.kind === 'pingpong'
          ? pingPong(PING_FD, PONG_FD, req.iterations)
          : churn(req.socketPath, req.seconds);
    work.then(
      (samples) => process.send!({ ok: true, samples }),
      (err: unknown) =>
        process.send!({ ok: false, message: err instanceof Error ? (err.stack ?? err.message) : String(err) }),
    );
  });
}

function ask(child: ChildProcess, req: Req): Promise<number[]> {
  return new Promise((resolve, reject) => {
    child.once('message', (m: { ok: boolean; samples?: number[]; message?: string }) =>
      m.ok ? resolve(m.samples!) : reject(new Error(m.message)),
    );
    child.send(req);
  });
}

export interface PressureLatencyResult {
  unit: 'us';
  iterations: number;
  rounds: number;
  pingpong: { p50: number; p99: number; p999: number };
  pressure: { p50: number; p99: number; p999: number };
  pressureUnderLoad: { p50: number; p99: number; p999: number };
  ratioP50: number;
  ratioP50UnderLoad: number;
}

export async function benchPressureLatency(
  options: { rounds?: number; iterations?: number } = {},
): Promise<PressureLatencyResult> {
  const rounds = options.rounds ?? 3;
  const iterations = options.iterations ?? 5000;
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vballoon-bench-'));
  const ping = native.eventfd(0, true);
  const pong = native.eventfd(0, true);
  const echo = echoPings(ping, pong);
  // VM A: message queue only; its pressure listener flips the target like the policy would.
  const a = new BalloonDevice({ statsQueue: false, pageReporting: false, messageQueue: true });
  let flip = 0;
  a.on('pressure', () => a.setTargetPages((flip ^= 1) === 1 ? 256 : 0, 'pressure'));
  const backendA = new VhostUserBackend(a, { log: new NullLogger() });
  const sockA = path.join(dir, 'a.sock');
  backendA.listen(sockA);
  // VM B: a balloon the host keeps resizing while A measures.
  const b = new BalloonDevice({ statsIntervalMs: 1000 });
  const backendB = new VhostUserBackend(b, { log: new NullLogger() });
  const sockB = path.join(dir, 'b.sock');
  backendB.listen(sockB);
  const child = fork(__filename, ['child'], { stdio: ['inherit', 'inherit', 'inherit', 'ipc', ping, pong] });
  const loadChild = fork(__filename, ['child'], { stdio: ['inherit', 'inherit', 'inherit', 'ipc'] });
  try {
    await ask(child, { kind: 'pingpong', iterations: 1000 });
    await ask(child, { kind: 'pressure', socketPath: sockA, iterations: 1000 });
    const pp: Array<ReturnType<typeof summarize>> = [];
    const pr: Array<ReturnType<typeof summarize>> = [];
    const pl: Array<ReturnType<typeof summarize>> = [];
    for (let r = 0; r < rounds; r++) {
      pp.push(summarize(await ask(child, { kind: 'pingpong', iterations })));
      pr.push(summarize(await ask(child, { kind: 'pressure', socketPath: sockA, iterations })));
    }
    // Under load: B's guest inflates and deflates 64 MiB back and forth while A measures.
    const load = ask(loadChild, { kind: 'churn', socketPath: sockB, seconds: 2 + rounds * 3 });
    const resize = setInterval(() => {
      try {
        b.setTargetPages(b.target === 0 ? 64 * 256 : 0, 'bench');
      } catch {
        // not connected yet
      }
    }, 50);
    await new Promise((res) => setTimeout(res, 1000));
    const inflatesBefore = b.snapshot().inflate.requests;
    for (let r = 0; r < rounds; r++)
      pl.push(summarize(await ask(child, { kind: 'pressure', socketPath: sockA, iterations })));
    const inflatesDuring = b.snapshot().inflate.requests - inflatesBefore;
    clearInterval(resize);
    await load;
    if (inflatesDuring === 0) throw new Error('the other VM did not inflate during the measurement');
    const us = (ns: number): number => Math.round(ns / 10) / 100;
    const agg = (list: Array<ReturnType<typeof summarize>>) => ({
      p50: us(median(list.map((s) => s.p50))),
      p99: us(median(list.map((s) => s.p99))),
      p999: us(median(list.map((s) => s.p999))),
    });
    const pingpong = agg(pp);
    const pressure = agg(pr);
    const pressureUnderLoad = agg(pl);
    return {
      unit: 'us',
      iterations,
      rounds: pr.length,
      pingpong,
      pressure,
      pressureUnderLoad,
      ratioP50: Math.round((pressure.p50 / pingpong.p50) * 100) / 100,
      ratioP50UnderLoad: Math.round((pressureUnderLoad.p50 / pingpong.p50) * 100) / 100,
    };
  } finally {
    child.send({ kind: 'exit' } satisfies Req);
    if (loadChild.connected) loadChild.send({ kind: 'exit' } satisfies Req);
    native.pollStop(echo);
    backendA.close();
    backendB.close();
    native.close(ping);
    native.close(pong);
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

if (require.main === module && process.argv[2] === 'child') runChild();
