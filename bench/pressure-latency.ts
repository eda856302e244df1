/**
 * Pressure acknowledgement latency: a guest driver (another process) sends a pressure message,
 * kicks, and waits for the used buffer; in between, the device runs the pressure listener, which
 * changes the target (config space + CONFIG_CHANGE_MSG on the back-end channel) as the policy
 * does. Measured next to an eventfd ping-pong between the same two processes, again while
 * another VM's balloon inflates and deflates continuously (a second driver in a third process),
 * and while another VM inflates 4 GiB at once (its holes punched by the worker thread), with the
 * event loop's own delay measured over that inflate (perf_hooks.monitorEventLoopDelay).
 */
import { ChildProcess, execFileSync, fork } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { monitorEventLoopDelay, performance, PerformanceObserver } from 'node:perf_hooks';
import { FdStore } from '../lib/daemon/fd-store';
import { VmSurvival } from '../lib/daemon/survival';
import { BalloonDevice } from '../lib/device/balloon';
import { NullLogger } from '../lib/log';
import { native } from '../lib/native';
import { echoPings, guestExecArgv, pingPong, unitNice, Waker } from './common';
import { BalloonGuest } from '../lib/testing/balloon-guest';
import { TestFrontend } from '../lib/testing/frontend';
import { VhostUserBackend } from '../lib/vhost/server';
import { median, summarize } from './stats';

const MiB = 1024 * 1024;
const PING_FD = 4;
const PONG_FD = 5;

/** Rounds under load added when B did not inflate during the planned ones. */
const MAX_EXTRA_LOAD_ROUNDS = 20;
/** The other VM's inflate: 4 GiB of a guest with a little more RAM. */
const BIG_INFLATE_BYTES = 4096 * MiB;
const BIG_GUEST_BYTES = BIG_INFLATE_BYTES + 128 * MiB;

type Req =
  | { kind: 'pressure'; socketPath: string; iterations: number }
  | { kind: 'pressure-until-stop'; socketPath: string }
  | { kind: 'stop' }
  | { kind: 'big-guest'; socketPath: string }
  | { kind: 'touch' }
  | { kind: 'pingpong'; iterations: number }
  | { kind: 'churn'; socketPath: string; seconds: number }
  | { kind: 'exit' };

/** Set by a 'stop' request: pressureLoop(Infinity) returns at its next iteration. */
let stopRequested = false;

/**
 * Samples are kick-to-used nanoseconds; with `stamps`, pairs (start on the monotonic clock
 * shared by every process, ns) and latency, so the parent can keep those inside a window.
 */
async function pressureLoop(socketPath: string, iterations: number, stamps = false): Promise<number[]> {
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
      // Bounded by `iterations`, or by the parent's stop request.
      for (let i = 0; i < iterations && !stopRequested; i++) {
        const t0 = process.hrtime.bigint();
        const used = waker.next();
        d.setUsedEvent(d.availIdxPublished);
        d.addBuffer([{ addr: buf, len: 4 }]);
        d.kick();
        await used;
        d.takeUsed();
        if (stamps) samples.push(Number(t0));
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

/** The other VM of the 4 GiB inflate: boots, writes all its memory, then follows its target. */
let bigGuest: BalloonGuest | undefined;
async function startBigGuest(socketPath: string): Promise<number[]> {
  bigGuest = await BalloonGuest.boot(socketPath, {
    mode: 'stock',
    numQueues: 5,
    ramBytes: BIG_GUEST_BYTES,
    queueSize: 256,
  });
  return [];
}

/** The big guest writes every free page (a memory-hungry guest before it is ballooned). */
async function touchBigGuest(): Promise<number[]> {
  if (bigGuest === undefined) throw new Error('no big guest');
  bigGuest.touchFree();
  return Promise.resolve([]);
}

function runChild(): void {
  process.on('message', (req: Req) => {
    if (req.kind === 'exit') {
      void bigGuest?.close().finally(() => process.exit(0));
      if (bigGuest === undefined) process.exit(0);
      return;
    }
    if (req.kind === 'stop') {
      stopRequested = true;
      return;
    }
    stopRequested = false;
    const work = ((): Promise<number[]> => {
      switch (req.kind) {
        case 'pressure':
          return pressureLoop(req.socketPath, req.iterations);
        case 'pressure-until-stop':
          return pressureLoop(req.socketPath, Infinity, true);
        case 'big-guest':
          return startBigGuest(req.socketPath);
        case 'touch':
          return touchBigGuest();
        case 'pingpong':
          return pingPong(PING_FD, PONG_FD, req.iterations);
        case 'churn':
          return churn(req.socketPath, req.seconds);
      }
    })();
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
  /**
   * While another VM inflates 4 GiB (several times; every message sent during those inflates),
   * with the daemon at the priority the shipped unit gives it (Nice= in docs/vballoon.service)...
   */
  bigInflate: BigInflateResult;
  /** ...and the same at the default priority (nice 0), as when run without the unit. */
  bigInflateDefaultPriority: BigInflateResult;
}

/** One 4 GiB inflate, measured (see measureBigInflate). */
interface BigInflateRound {
  /** From the target change to the last hole punched. */
  seconds: number;
  releasedGiB: number;
  /** A's kick-to-used samples (ns) that started inside the inflate. */
  inside: number[];
  /** The event loop's delay over the inflate (monitorEventLoopDelay, 1 ms resolution), us. */
  eventLoopDelay: { p50: number; p99: number; max: number };
  /** The same over a second with only A's messages (the machine's own noise). */
  eventLoopDelayWithoutInflate: { p50: number; p99: number; max: number };
  /** Share of the inflate the event loop spent running (not waiting for events). */
  eventLoopUtilization: number;
  /** Involuntary context switches of the event loop's thread per second of the inflate. */
  preemptionsPerSecond: number;
  /** Garbage collection pauses of this process during the inflate. */
  gc: GcStats;
  /** The same figures over the second without the inflate. */
  withoutInflate: { preemptionsPerSecond: number; gc: GcStats };
}

/**
 * Several 4 GiB inflates at one priority: A's acks pooled over all of them; every other figure
 * of a round (see BigInflateRound) the median over the rounds (maxima: the largest; GC pauses over
 * 1 ms: the sum), with each round's event-loop delay p99 as the spread.
 */
export type BigInflateResult = Omit<BigInflateRound, 'inside'> & {
  /** The daemon's nice value during the measurement, or why it could not be set. */
  nice: number | 'not permitted';
  /** Inflates measured. */
  rounds: number;
  pressure: { p50: number; p99: number; p999: number; n: number };
  ratioP50: number;
  /** Each round's event-loop delay p99, us. */
  eventLoopDelayP99Rounds: number[];
};

export async function benchPressureLatency(
  options: { rounds?: number; iterations?: number; bigRounds?: number } = {},
): Promise<PressureLatencyResult> {
  const rounds = options.rounds ?? 3;
  const bigRounds = options.bigRounds ?? 5;
  const iterations = options.iterations ?? 5000;
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vballoon-bench-'));
  const ping = native.eventfd(0, true);
  const pong = native.eventfd(0, true);
  const echo = echoPings(ping, pong);
  // VM A: message queue only; its pressure listener flips the target like the policy would.
  const vmA = servedVm('a', { statsQueue: false, pageReporting: false, messageQueue: true });
  const { device: a, backend: backendA } = vmA;
  let flip = 0;
  a.on('pressure', () => a.setTargetPages((flip ^= 1) === 1 ? 256 : 0, 'pressure'));
  const sockA = path.join(dir, 'a.sock');
  backendA.listen(sockA);
  // VM B: a balloon the host keeps resizing while A measures.
  const vmB = servedVm('b', { statsIntervalMs: 1000 });
  const { device: b, backend: backendB } = vmB;
  const sockB = path.join(dir, 'b.sock');
  backendB.listen(sockB);
  // VM C: the 4 GiB inflate.
  const vmC = servedVm('c', { statsQueue: false, pageReporting: false, messageQueue: false });
  const { device: c, backend: backendC } = vmC;
  const sockC = path.join(dir, 'c.sock');
  backendC.listen(sockC);
  // Each guest process stands in for a vCPU: one thread. V8's parallel collector would wake
  // helper threads on every CPU at each of its collections, which no vCPU does.
  const guest = { execArgv: [...guestExecArgv(), '--single-threaded-gc'] };
  const child = fork(__filename, ['child'], { ...guest, stdio: ['inherit', 'inherit', 'inherit', 'ipc', ping, pong] });
  const loadChild = fork(__filename, ['child'], { ...guest, stdio: ['inherit', 'inherit', 'inherit', 'ipc'] });
  const bigChild = fork(__filename, ['child'], { ...guest, stdio: ['inherit', 'inherit', 'inherit', 'ipc'] });
  // VBALLOON_BENCH_PIN=1: the guest processes on CPU 1 (as vCPUs elsewhere), the daemon's
  // event loop thread on CPU 0, to separate CPU contention from the daemon's own pauses.
  if (process.env['VBALLOON_BENCH_PIN'] === '1') {
    for (const c of [child, loadChild, bigChild])
      execFileSync('taskset', ['-a', '-p', '-c', '1', String(c.pid)], { stdio: 'ignore' });
    execFileSync('taskset', ['-p', '-c', '0', String(process.pid)], { stdio: 'ignore' });
  }
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
    // A quick round (1000 messages) can fall between two of B's inflates (its target flips every
    // 50 ms): rounds go on until B inflated during them, at most MAX_EXTRA_LOAD_ROUNDS more.
    let inflatesDuring = 0;
    for (let r = 0; r < rounds + MAX_EXTRA_LOAD_ROUNDS && (r < rounds || inflatesDuring === 0); r++) {
      pl.push(summarize(await ask(child, { kind: 'pressure', socketPath: sockA, iterations })));
      inflatesDuring = b.snapshot().inflate.requests - inflatesBefore;
    }
    clearInterval(resize);
    await load;
    if (inflatesDuring === 0) throw new Error('the other VM did not inflate during the measurement');
    await ask(bigChild, { kind: 'big-guest', socketPath: sockC });
    const measure = async (nice: number): Promise<BigInflateResult> => {
      const set = setDaemonNice(nice);
      try {
        const list: BigInflateRound[] = [];
        for (let r = 0; r < bigRounds; r++) list.push(await measureBigInflate(child, sockA, bigChild, c));
        return { nice: set ? nice : 'not permitted', ...combineRounds(list), ratioP50: 0 };
      } finally {
        setDaemonNice(0);
      }
    };
    const bigDefault = await measure(0);
    const big = await measure(unitNice());
    const us = (ns: number): number => Math.round(ns / 10) / 100;
    const agg = (list: Array<ReturnType<typeof summarize>>) => ({
      p50: us(median(list.map((s) => s.p50))),
      p99: us(median(list.map((s) => s.p99))),
      p999: us(median(list.map((s) => s.p999))),
    });
    const pingpong = agg(pp);
    const withRatio = (b: BigInflateResult): BigInflateResult => ({
      ...b,
      pressure: { p50: us(b.pressure.p50), p99: us(b.pressure.p99), p999: us(b.pressure.p999), n: b.pressure.n },
      ratioP50: Math.round((us(b.pressure.p50) / pingpong.p50) * 100) / 100,
    });
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
      bigInflate: withRatio(big),
      bigInflateDefaultPriority: withRatio(bigDefault),
    };
  } finally {
    child.send({ kind: 'exit' } satisfies Req);
    if (loadChild.connected) loadChild.send({ kind: 'exit' } satisfies Req);
    if (bigChild.connected) bigChild.send({ kind: 'exit' } satisfies Req);
    await new Promise((res) => (bigChild.exitCode !== null ? res(undefined) : bigChild.once('exit', res)));
    backendC.close();
    for (const vm of [vmA, vmB, vmC]) vm.keeper.forget();
    native.pollStop(echo);
    backendA.close();
    backendB.close();
    native.close(ping);
    native.close(pong);
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

/**
 * A VM wired as `vballoon serve` wires it (lib/daemon/daemon.ts, addVmWith): the device journals
 * its pages and the back-end records each front-end message for a restart (VmSurvival), which a
 * serving daemon always does, so the bench pays the same state writes and reads messages the same
 * way (peeked, then taken off the socket). The store is disabled, as for a daemon started without
 * systemd; with systemd it is only written to when a descriptor changes.
 */
function servedVm(
  name: string,
  options: ConstructorParameters<typeof BalloonDevice>[0],
): { device: BalloonDevice; backend: VhostUserBackend; keeper: VmSurvival } {
  const log = new NullLogger();
  const keeper = new VmSurvival(name, new FdStore(log, undefined), log);
  const device = new BalloonDevice({ ...options, journal: keeper.bitmap });
  const backend = new VhostUserBackend(device, {
    log,
    onHandled: (request, last) => keeper.afterMessage(request, last),
  });
  keeper.follow(device, backend, () => ({ mode: 'manual', operatorPages: device.target }));
  return { device, backend, keeper };
}

/**
 * Gives every thread of this process (the daemon's stand-in) the nice value `nice`, as systemd
 * does for the unit's process, except the punching threads, which drop to the default priority
 * themselves when they start (lib/native/punch.c). False if that is not permitted (not root).
 */
function setDaemonNice(nice: number): boolean {
  let ok = true;
  for (const tid of fs.readdirSync('/proc/self/task')) {
    let comm = '';
    try {
      comm = fs.readFileSync(`/proc/self/task/${tid}/comm`, 'utf8').trim();
    } catch {
      continue; // the thread ended
    }
    if (comm === 'vb-punch') continue;
    try {
      os.setPriority(Number(tid), nice);
    } catch {
      ok = false;
    }
  }
  return ok;
}

/** The rounds at one priority as one result (see BigInflateResult). */
function combineRounds(list: BigInflateRound[]): Omit<BigInflateResult, 'nice' | 'ratioP50'> {
  const mid = (f: (r: BigInflateRound) => number): number => median(list.map(f));
  const top = (f: (r: BigInflateRound) => number): number => Math.max(...list.map(f));
  const sum = (f: (r: BigInflateRound) => number): number => list.reduce((a, r) => a + f(r), 0);
  const gc = (g: (r: BigInflateRound) => GcStats): GcStats => ({
    pauses: mid((r) => g(r).pauses),
    totalMs: mid((r) => g(r).totalMs),
    maxMs: top((r) => g(r).maxMs),
    over1ms: sum((r) => g(r).over1ms),
  });
  return {
    rounds: list.length,
    seconds: mid((r) => r.seconds),
    releasedGiB: mid((r) => r.releasedGiB),
    pressure: summarize(list.flatMap((r) => r.inside)),
    eventLoopDelay: {
      p50: mid((r) => r.eventLoopDelay.p50),
      p99: mid((r) => r.eventLoopDelay.p99),
      max: top((r) => r.eventLoopDelay.max),
    },
    eventLoopDelayP99Rounds: list.map((r) => r.eventLoopDelay.p99),
    eventLoopDelayWithoutInflate: {
      p50: mid((r) => r.eventLoopDelayWithoutInflate.p50),
      p99: mid((r) => r.eventLoopDelayWithoutInflate.p99),
      max: top((r) => r.eventLoopDelayWithoutInflate.max),
    },
    eventLoopUtilization: mid((r) => r.eventLoopUtilization),
    preemptionsPerSecond: mid((r) => r.preemptionsPerSecond),
    gc: gc((r) => r.gc),
    withoutInflate: {
      preemptionsPerSecond: mid((r) => r.withoutInflate.preemptionsPerSecond),
      gc: gc((r) => r.withoutInflate.gc),
    },
  };
}

/** Garbage collection pauses seen while watching. */
export interface GcStats {
  pauses: number;
  totalMs: number;
  maxMs: number;
  over1ms: number;
}

function watchGc(): { stop(): GcStats } {
  const pauses: number[] = [];
  const observer = new PerformanceObserver((list) => {
    for (const e of list.getEntries()) pauses.push(e.duration);
  });
  observer.observe({ entryTypes: ['gc'] });
  return {
    stop(): GcStats {
      observer.disconnect();
      return {
        pauses: pauses.length,
        totalMs: Math.round(pauses.reduce((a, b) => a + b, 0) * 10) / 10,
        maxMs: Math.round(Math.max(0, ...pauses) * 100) / 100,
        over1ms: pauses.filter((d) => d > 1).length,
      };
    },
  };
}

/** Involuntary context switches of this process's main thread (the event loop) so far. */
function preemptions(): number {
  const status = fs.readFileSync('/proc/self/status', 'utf8');
  return Number(/^nonvoluntary_ctxt_switches:\s+(\d+)/m.exec(status)?.[1] ?? 0);
}

/** Microseconds by which a 1 ms timer tick (ns) came late. */
function beyondTick(ns: number): number {
  return Math.max(0, Math.round((ns - 1e6) / 1000));
}

/**
 * VM C's guest (in `bigChild`) inflates 4 GiB of written memory while VM A's driver sends
 * pressure messages back to back; returns A's samples taken inside the inflate, the event loop's
 * delay over it, and how long it took until the last hole was punched.
 */
async function measureBigInflate(
  child: ChildProcess,
  sockA: string,
  bigChild: ChildProcess,
  c: BalloonDevice,
): Promise<BigInflateRound> {
  // The balloon of a previous round is gone and the guest has written all its memory again, so
  // every round punches 4 GiB of resident memory. Bounded: a deflate takes seconds.
  const emptyBy = Date.now() + 120_000;
  for (let s = c.snapshot(); s.actualPages > 0 || s.balloonedPages > 0; s = c.snapshot()) {
    if (Date.now() > emptyBy) throw new Error(`4 GiB balloon not deflated: ${s.balloonedPages} pages left`);
    await new Promise((res) => setTimeout(res, 20));
  }
  await ask(bigChild, { kind: 'touch' });
  const pages = BIG_INFLATE_BYTES / 4096;
  const sampling = ask(child, { kind: 'pressure-until-stop', socketPath: sockA });
  await new Promise((res) => setTimeout(res, 200)); // A's driver is up and sending
  // The same measurement for a second with A sending and no inflate: what the machine does to
  // the loop (other processes and threads contending for its 2 CPUs) without our reclaim.
  const baseline = monitorEventLoopDelay({ resolution: 1 });
  const baselineGc = watchGc();
  const baselinePreempted0 = preemptions();
  baseline.enable();
  await new Promise((res) => setTimeout(res, 1000));
  baseline.disable();
  const baselineGcStats = baselineGc.stop();
  const baselinePreempted = preemptions() - baselinePreempted0;
  const reclaimedBefore = c.snapshot().reclaimedBytes;
  const delay = monitorEventLoopDelay({ resolution: 1 });
  const elu0 = performance.eventLoopUtilization();
  const gc = watchGc();
  const preempted0 = preemptions();
  const t0 = process.hrtime.bigint();
  delay.enable();
  c.setTargetPages(pages, 'bench');
  // Bounded: 4 GiB inflates in seconds; two minutes is a broken run.
  const deadline = Date.now() + 120_000;
  for (;;) {
    const snap = c.snapshot();
    if (snap.actualPages >= pages && snap.pendingDiscardPages === 0) break;
    if (Date.now() > deadline) throw new Error(`4 GiB inflate stuck at ${snap.actualPages} pages`);
    await new Promise((res) => setTimeout(res, 5));
  }
  const t1 = process.hrtime.bigint();
  delay.disable();
  const elu = performance.eventLoopUtilization(elu0).utilization;
  const gcStats = gc.stop();
  const preempted = preemptions() - preempted0;
  child.send({ kind: 'stop' } satisfies Req);
  const stamped = await sampling;
  const inside: number[] = [];
  for (let i = 0; i + 1 < stamped.length; i += 2)
    if (stamped[i] >= Number(t0) && stamped[i] <= Number(t1)) inside.push(stamped[i + 1]);
  const snap = c.snapshot();
  c.setTargetPages(0, 'bench');
  return {
    seconds: Math.round((Number(t1 - t0) / 1e9) * 1000) / 1000,
    releasedGiB: Math.round(((snap.reclaimedBytes - reclaimedBefore) / 2 ** 30) * 100) / 100,
    inside,
    // The histogram holds the time between ticks of a 1 ms timer: the delay is what exceeds 1 ms.
    eventLoopDelay: {
      p50: beyondTick(delay.percentile(50)),
      p99: beyondTick(delay.percentile(99)),
      max: beyondTick(delay.max),
    },
    eventLoopDelayWithoutInflate: {
      p50: beyondTick(baseline.percentile(50)),
      p99: beyondTick(baseline.percentile(99)),
      max: beyondTick(baseline.max),
    },
    eventLoopUtilization: Math.round(elu * 1000) / 1000,
    preemptionsPerSecond: Math.round(preempted / (Number(t1 - t0) / 1e9)),
    gc: gcStats,
    withoutInflate: { preemptionsPerSecond: baselinePreempted, gc: baselineGcStats },
  };
}

if (require.main === module && process.argv[2] === 'child') runChild();
