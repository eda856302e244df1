/**
 * Reclaim throughput: guest memory is written, then ballooned through the real back-end by a
 * Linux-like driver in another process (256 PFNs per buffer, waiting for each acknowledgement),
 * and we measure GiB/s of host memory actually released (the memfd's allocated blocks). In the
 * same run, over the same PFNs and the same amount of written memory:
 *   floor: the fewest fallocate(PUNCH_HOLE) calls over the same ranges, straight from the addon,
 *     the memory written by another process that then sleeps (its mapping idle);
 *   fair floor: the same calls while a third process maps the memfd, has touched every page and
 *     keeps running on the other CPU (pinned with taskset, the punching process on CPU 0), as
 *     QEMU's vCPU does: every punch then pays the cross-CPU TLB flush the real device pays;
 *   per-page: one punch per 4 KiB page, as QEMU's balloon does.
 * Patterns: contiguous (1 GiB), every other page, random half (of 496 MiB).
 */
import { ChildProcess, execFileSync, fork, spawn } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { BalloonDevice } from '../lib/device/balloon';
import { compactRuns } from '../lib/device/page-tracker';
import { NullLogger } from '../lib/log';
import { closeQuietly, native } from '../lib/native';
import { TestFrontend } from '../lib/testing/frontend';
import { VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX } from '../lib/vhost/constants';
import { VhostUserBackend } from '../lib/vhost/server';
import { median, spreadPercent } from './stats';
import { guestExecArgv } from './common';

const MiB = 1024 * 1024;
const RAM_BYTES = 512 * MiB;
/** Pages below this are the "kernel" (rings, buffers): never ballooned. */
const RESERVED_PAGES = (16 * MiB) / 4096;
/** The contiguous pattern balloons exactly 1 GiB; its guest has this much RAM. */
const CONTIGUOUS_RAM_BYTES = 1024 * MiB + 16 * MiB;

/** Guest RAM for a pattern. */
export function ramFor(pattern: Pattern): number {
  return pattern === 'contiguous' ? CONTIGUOUS_RAM_BYTES : RAM_BYTES;
}

export type Pattern = 'contiguous' | 'every-other' | 'random-half';

/** A deterministic PFN list for a pattern (a fixed seed, so both sides see the same pages). */
export function pfnsFor(pattern: Pattern, ramBytes: number): number[] {
  const pages = ramBytes / 4096;
  const all: number[] = [];
  for (let p = RESERVED_PAGES; p < pages; p++) all.push(p);
  if (pattern === 'contiguous') return all;
  if (pattern === 'every-other') return all.filter((p) => p % 2 === 0);
  let seed = 12345;
  const rand = (): number => (seed = (seed * 1103515245 + 12345) & 0x7fffffff) / 0x7fffffff;
  const shuffled = [...all];
  for (let i = shuffled.length - 1; i > 0; i--) {
    const j = Math.floor(rand() * (i + 1));
    [shuffled[i], shuffled[j]] = [shuffled[j], shuffled[i]];
  }
  return shuffled.slice(0, Math.floor(all.length / 2));
}

function touchAll(buffer: ArrayBuffer): void {
  const v = new Uint8Array(buffer);
  for (let i = 0; i < v.length; i += 4096) v[i] = 1;
}

/**
 * The references: punch the same pages of written memory, by runs (floor) or page by page, from
 * this process, while the memory is mapped as in the measured path: written through a mapping in
 * the other process (the "guest"/QEMU side), and mapped but untouched here (the back-end side).
 */
export function punchReference(
  file: string,
  ramBytes: number,
  pfns: readonly number[],
  mode: 'floor' | 'fair' | 'per-page',
): { seconds: number; releasedBytes: number; calls: number } {
  const fd = fs.openSync(file, 'r+');
  const map = native.mmap(fd, ramBytes, 0);
  const toucher = mode === 'fair' ? startToucher(file, ramBytes) : undefined;
  try {
    if (toucher !== undefined) pinSelf('0');
    const before = native.fstat(fd).allocatedBytes;
    const runs = mode === 'per-page' ? pfns.map((p) => ({ start: p, count: 1 })) : compactRuns(pfns);
    const t0 = process.hrtime.bigint();
    for (const r of runs) native.punchHole(fd, r.start * 4096, r.count * 4096);
    const seconds = Number(process.hrtime.bigint() - t0) / 1e9;
    return { seconds, releasedBytes: before - native.fstat(fd).allocatedBytes, calls: runs.length };
  } finally {
    if (toucher !== undefined) {
      toucher.stop();
      pinSelf(`0-${os.cpus().length - 1}`);
    }
    native.munmap(map);
    fs.closeSync(fd);
  }
}

/** Pins every thread of this process to `cpus` (taskset list syntax). */
function pinSelf(cpus: string): void {
  execFileSync('taskset', ['-a', '-p', '-c', cpus, String(process.pid)], { stdio: 'ignore' });
}

/**
 * The fair floor's third process: on CPU 1, maps the memfd (MAP_SHARED), reads every page so it
 * maps them all, then spins reading its first page (never punched) until stopped, so its address
 * space stays live on the other CPU while holes are punched (as a running vCPU's does). Returns
 * once it is ready.
 */
function startToucher(file: string, ramBytes: number): { stop(): void } {
  const ready = path.join(os.tmpdir(), `vballoon-toucher-${process.pid}-${Date.now()}`);
  const child = spawn('taskset', ['-c', '1', process.execPath, __filename, 'toucher', file, String(ramBytes), ready], {
    stdio: 'inherit',
  });
  // Bounded: the toucher maps and reads the file within seconds, or the bench fails.
  const deadline = Date.now() + 60_000;
  while (!fs.existsSync(ready)) {
    if (Date.now() > deadline) throw new Error('toucher did not start');
    Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, 5);
  }
  fs.rmSync(ready, { force: true });
  return { stop: () => void child.kill('SIGKILL') };
}

/** The toucher process (see startToucher). */
function runToucher(file: string, ramBytes: number, readyPath: string): void {
  const fd = fs.openSync(file, 'r+');
  const map = native.mmap(fd, ramBytes, 0);
  const bytes = new Uint8Array(map);
  let sum = 0;
  for (let i = 0; i < bytes.length; i += 4096) sum += bytes[i];
  fs.writeFileSync(readyPath, String(sum));
  // Bounded: the parent kills it when done; a lost parent leaves it two minutes at most.
  const deadline = Date.now() + 120_000;
  for (let i = 0; ; i++) {
    sum += bytes[i & 4095];
    if ((i & 0xfffff) === 0 && Date.now() > deadline) process.exit(1);
  }
}

/** Child side of a reference: guest memory written through this process's mapping. */
let refMemory: { fd: number; map: ArrayBuffer } | undefined;
function prepareReference(ramBytes: number): string {
  const fd = native.memfdCreate('vballoon-bench-ref');
  native.ftruncate(fd, ramBytes);
  const map = native.mmap(fd, ramBytes, 0);
  touchAll(map);
  refMemory = { fd, map };
  return `/proc/${process.pid}/fd/${fd}`;
}
function releaseReference(): void {
  if (refMemory === undefined) return;
  native.munmap(refMemory.map);
  closeQuietly(refMemory.fd);
  refMemory = undefined;
}

/** Child: a Linux-like driver that balloons `pfns`, one 256-PFN buffer at a time. */
async function childInflate(
  socketPath: string,
  pattern: Pattern,
  vcpu: boolean,
): Promise<{ seconds: number; releasedBytes: number; buffers: number }> {
  const ramBytes = ramFor(pattern);
  const fe = TestFrontend.connect(socketPath, {
    numQueues: 2,
    configSize: 8,
    ramBytes,
    layout: 'flat',
    queueSize: 128,
  });
  try {
    await fe.realize();
    const d = (await fe.start(VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX, [0, 1])).get(0)!;
    for (let gpa = 0; gpa < ramBytes; gpa += 4096) fe.ram.memory.writeU8(gpa, 1); // written guest memory
    const pfns = pfnsFor(pattern, ramBytes);
    const buf = fe.ram.alloc(1024);
    if (vcpu) {
      // The parent starts a process that keeps this memory mapped and running on CPU 1.
      const go = new Promise((resolve) => process.once('message', resolve));
      process.send!({ touch: `/proc/${process.pid}/fd/${fe.ram.fd}`, ramBytes });
      await go;
    }
    const before = fe.ram.residentBytes();
    const t0 = process.hrtime.bigint();
    let buffers = 0;
    for (let i = 0; i < pfns.length; i += 256) {
      const chunk = pfns.slice(i, i + 256);
      const bytes = new Uint8Array(chunk.length * 4);
      const v = new DataView(bytes.buffer);
      chunk.forEach((p, k) => v.setUint32(k * 4, p, true));
      fe.ram.memory.write(buf, bytes);
      d.setUsedEvent(d.availIdxPublished);
      d.addBuffer([{ addr: buf, len: bytes.length }]);
      d.kick();
      await d.waitUsed(1);
      buffers++;
    }
    // The last batch of holes is punched a few milliseconds after the last ack: the clock stops
    // when the host has really released the memory (looked at every millisecond: a busy loop
    // here would take a CPU from the worker thread that punches).
    const expected = pfns.length * 4096;
    for (let spin = 0; before - fe.ram.residentBytes() < expected && spin < 100_000; spin++)
      await new Promise((r) => setTimeout(r, 1));
    const seconds = Number(process.hrtime.bigint() - t0) / 1e9;
    return { seconds, releasedBytes: before - fe.ram.residentBytes(), buffers };
  } finally {
    fe.close();
  }
}

type ChildRequest =
  { socketPath: string; pattern: Pattern; vcpu: boolean } | 'exit' | 'go' | { prepare: number } | 'ref-release';

function runChild(): void {
  process.on('message', (req: ChildRequest) => {
    if (req === 'exit') process.exit(0);
    if (typeof req === 'object' && 'prepare' in req)
      return void process.send!({ ok: true, file: prepareReference(req.prepare) });
    if (req === 'ref-release') return void process.send!({ ok: true, released: (releaseReference(), true) });
    if (req === 'go') return;
    childInflate(req.socketPath, req.pattern, req.vcpu).then(
      (r) => process.send!({ ok: true, r }),
      (err: unknown) =>
        process.send!({ ok: false, message: err instanceof Error ? (err.stack ?? err.message) : String(err) }),
    );
  });
}

function control(child: ChildProcess, req: { prepare: number } | 'ref-release'): Promise<{ file?: string }> {
  return new Promise((resolve) => {
    child.once('message', (m: { file?: string }) => resolve(m));
    child.send(req);
  });
}

/** Runs one reference with the memory written by the child. */
async function reference(
  child: ChildProcess,
  pattern: Pattern,
  mode: 'floor' | 'fair' | 'per-page',
): Promise<ReturnType<typeof punchReference>> {
  const ramBytes = ramFor(pattern);
  const { file } = await control(child, { prepare: ramBytes });
  try {
    return punchReference(file!, ramBytes, pfnsFor(pattern, ramBytes), mode);
  } finally {
    await control(child, 'ref-release');
  }
}

type InflateResult = { seconds: number; releasedBytes: number; buffers: number };

/** Runs one measured inflate in the child; with `vcpu`, a toucher runs on CPU 1 meanwhile. */
function ask(child: ChildProcess, socketPath: string, pattern: Pattern, vcpu: boolean): Promise<InflateResult> {
  return new Promise((resolve, reject) => {
    let toucher: { stop(): void } | undefined;
    const onMessage = (m: {
      ok?: boolean;
      r?: InflateResult;
      message?: string;
      touch?: string;
      ramBytes?: number;
    }): void => {
      if (m.touch !== undefined) {
        try {
          toucher = startToucher(m.touch, m.ramBytes!);
        } catch (err) {
          child.off('message', onMessage);
          reject(err instanceof Error ? err : new Error(String(err)));
          return;
        }
        child.send('go');
        return;
      }
      child.off('message', onMessage);
      toucher?.stop();
      if (m.ok === true) resolve(m.r!);
      else reject(new Error(m.message));
    };
    child.on('message', onMessage);
    child.send({ socketPath, pattern, vcpu });
  });
}

export interface ReclaimResult {
  pattern: Pattern;
  releasedMiB: number;
  vballoonGiBps: number;
  /** The same inflate while a process keeps the guest memory mapped and running on CPU 1. */
  vballoonVcpuGiBps: number;
  floorGiBps: number;
  fairFloorGiBps: number;
  perPageGiBps: number;
  /** Median floor time over median vballoon time, both ways (> 1: slower than the floor). */
  ratioToFloor: number;
  /** The vCPU-running inflate against the fair floor (the same condition). */
  ratioToFairFloor: number;
  speedupOverPerPage: number;
  punchCalls: { vballoon: number; floor: number; perPage: number };
  /** vballoon's punch calls over the floor's (the random-half goal: within 5 %). */
  callsRatio: number;
  /** (max - min) / median of each series, in percent. */
  spreadPercent: { vballoon: number; vballoonVcpu: number; floor: number; fairFloor: number };
  rounds: number;
}

export async function benchReclaim(
  rounds = 5,
  patterns: readonly Pattern[] = ['contiguous', 'every-other', 'random-half'],
): Promise<ReclaimResult[]> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vballoon-bench-'));
  const child = fork(__filename, ['child'], {
    execArgv: guestExecArgv(),
    stdio: ['inherit', 'inherit', 'inherit', 'ipc'],
  });
  const results: ReclaimResult[] = [];
  try {
    for (const pattern of patterns) {
      const v: number[] = [];
      const vv: number[] = [];
      const f: number[] = [];
      const ff: number[] = [];
      const pp: number[] = [];
      let released = 0;
      let calls = { vballoon: 0, floor: 0, perPage: 0 };
      for (let r = 0; r < rounds; r++) {
        // A fresh device per round: every page is new to the balloon. Measured path and
        // references alternate within the round, so drift on this shared machine hits all alike.
        const gibps = (bytes: number, s: number): number => bytes / 2 ** 30 / s;
        for (const vcpu of [true, false]) {
          const device = new BalloonDevice({ statsQueue: false, pageReporting: false, messageQueue: false });
          const socketPath = path.join(dir, `vm-${pattern}-${r}-${vcpu}.sock`);
          const backend = new VhostUserBackend(device, { log: new NullLogger() });
          backend.listen(socketPath);
          try {
            const m = await ask(child, socketPath, pattern, vcpu);
            (vcpu ? vv : v).push(gibps(m.releasedBytes, m.seconds));
            released = m.releasedBytes;
            if (!vcpu) calls = { ...calls, vballoon: device.snapshot().discardCalls };
          } finally {
            backend.close();
          }
        }
        {
          const fl = await reference(child, pattern, 'floor');
          const fa = await reference(child, pattern, 'fair');
          f.push(gibps(fl.releasedBytes, fl.seconds));
          ff.push(gibps(fa.releasedBytes, fa.seconds));
          // Per-page is the slow, well-known reference: one round is enough.
          if (r === 0) {
            const pg = await reference(child, pattern, 'per-page');
            pp.push(gibps(pg.releasedBytes, pg.seconds));
            calls.perPage = pg.calls;
          }
          calls = { ...calls, floor: fl.calls };
        }
      }
      const round2 = (x: number): number => Math.round(x * 100) / 100;
      results.push({
        pattern,
        releasedMiB: Math.round(released / MiB),
        vballoonGiBps: round2(median(v)),
        vballoonVcpuGiBps: round2(median(vv)),
        floorGiBps: round2(median(f)),
        fairFloorGiBps: round2(median(ff)),
        perPageGiBps: round2(median(pp)),
        ratioToFloor: round2(median(f) / median(v)),
        ratioToFairFloor: round2(median(ff) / median(vv)),
        speedupOverPerPage: round2(median(v) / median(pp)),
        punchCalls: calls,
        callsRatio: Math.round((calls.vballoon / calls.floor) * 1000) / 1000,
        spreadPercent: {
          vballoon: Math.round(spreadPercent(v)),
          vballoonVcpu: Math.round(spreadPercent(vv)),
          floor: Math.round(spreadPercent(f)),
          fairFloor: Math.round(spreadPercent(ff)),
        },
        rounds,
      });
    }
    return results;
  } finally {
    child.send('exit');
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

if (require.main === module && process.argv[2] === 'toucher')
  runToucher(process.argv[3], Number(process.argv[4]), process.argv[5]);
if (require.main === module && process.argv[2] === 'child') runChild();
