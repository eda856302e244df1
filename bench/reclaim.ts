/**
 * Reclaim throughput: guest memory is written, then ballooned through the real back-end by a
 * Linux-like driver in another process (256 PFNs per buffer, waiting for each acknowledgement),
 * and we measure GiB/s of host memory actually released (the memfd's allocated blocks). In the
 * same run, over the same PFNs and the same amount of written memory:
 *   floor: the fewest fallocate(PUNCH_HOLE) calls over the same ranges, straight from the addon;
 *   per-page: one punch per 4 KiB page, as QEMU's balloon does.
 * Patterns: contiguous, every other page, random half.
 */
import { ChildProcess, fork } from 'node:child_process';
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

const MiB = 1024 * 1024;
const RAM_BYTES = 512 * MiB;
/** Pages below this are the "kernel" (rings, buffers): never ballooned. */
const RESERVED_PAGES = (16 * MiB) / 4096;

export type Pattern = 'contiguous' | 'every-other' | 'random-half';

/** A deterministic PFN list for a pattern (a fixed seed, so both sides see the same pages). */
export function pfnsFor(pattern: Pattern, ramBytes: number): number[] {
  const pages = ramBytes / 4096;
  const all: number[] = [];
  for (let p = RESERVED_PAGES; p < pages; p++) all.push(p);
  if (pattern === 'contiguous') return all.slice(0, Math.floor(all.length * 0.75));
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
  pfns: readonly number[],
  mode: 'floor' | 'per-page',
): { seconds: number; releasedBytes: number; calls: number } {
  const fd = fs.openSync(file, 'r+');
  const map = native.mmap(fd, RAM_BYTES, 0);
  try {
    const before = native.fstat(fd).allocatedBytes;
    const runs = mode === 'floor' ? compactRuns(pfns) : pfns.map((p) => ({ start: p, count: 1 }));
    const t0 = process.hrtime.bigint();
    for (const r of runs) native.punchHole(fd, r.start * 4096, r.count * 4096);
    const seconds = Number(process.hrtime.bigint() - t0) / 1e9;
    return { seconds, releasedBytes: before - native.fstat(fd).allocatedBytes, calls: runs.length };
  } finally {
    native.munmap(map);
    fs.closeSync(fd);
  }
}

/** Child side of a reference: guest memory written through this process's mapping. */
let refMemory: { fd: number; map: ArrayBuffer } | undefined;
function prepareReference(): string {
  const fd = native.memfdCreate('vballoon-bench-ref');
  native.ftruncate(fd, RAM_BYTES);
  const map = native.mmap(fd, RAM_BYTES, 0);
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
): Promise<{ seconds: number; releasedBytes: number; buffers: number }> {
  const fe = TestFrontend.connect(socketPath, {
    numQueues: 2,
    configSize: 8,
    ramBytes: RAM_BYTES,
    layout: 'flat',
    queueSize: 128,
  });
  try {
    await fe.realize();
    const d = (await fe.start(VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX, [0, 1])).get(0)!;
    for (let gpa = 0; gpa < RAM_BYTES; gpa += 4096) fe.ram.memory.writeU8(gpa, 1); // written guest memory
    const pfns = pfnsFor(pattern, RAM_BYTES);
    const buf = fe.ram.alloc(1024);
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
    // The last batch of holes is punched at most a few milliseconds after the last ack: the
    // clock stops when the host has really released the memory.
    const expected = pfns.length * 4096;
    for (let spin = 0; before - fe.ram.residentBytes() < expected && spin < 100_000; spin++)
      await new Promise((r) => setImmediate(r));
    const seconds = Number(process.hrtime.bigint() - t0) / 1e9;
    return { seconds, releasedBytes: before - fe.ram.residentBytes(), buffers };
  } finally {
    fe.close();
  }
}

function runChild(): void {
  process.on('message', (req: { socketPath: string; pattern: Pattern } | 'exit' | 'ref-prepare' | 'ref-release') => {
    if (req === 'exit') process.exit(0);
    if (req === 'ref-prepare') return void process.send!({ ok: true, file: prepareReference() });
    if (req === 'ref-release') return void process.send!({ ok: true, released: (releaseReference(), true) });
    childInflate(req.socketPath, req.pattern).then(
      (r) => process.send!({ ok: true, r }),
      (err: unknown) =>
        process.send!({ ok: false, message: err instanceof Error ? (err.stack ?? err.message) : String(err) }),
    );
  });
}

function control(child: ChildProcess, req: 'ref-prepare' | 'ref-release'): Promise<{ file?: string }> {
  return new Promise((resolve) => {
    child.once('message', (m: { file?: string }) => resolve(m));
    child.send(req);
  });
}

/** Runs one reference with the memory written by the child. */
async function reference(
  child: ChildProcess,
  pfns: readonly number[],
  mode: 'floor' | 'per-page',
): Promise<ReturnType<typeof punchReference>> {
  const { file } = await control(child, 'ref-prepare');
  try {
    return punchReference(file!, pfns, mode);
  } finally {
    await control(child, 'ref-release');
  }
}

function ask(
  child: ChildProcess,
  socketPath: string,
  pattern: Pattern,
): Promise<{ seconds: number; releasedBytes: number; buffers: number }> {
  return new Promise((resolve, reject) => {
    child.once(
      'message',
      (m: { ok: boolean; r?: { seconds: number; releasedBytes: number; buffers: number }; message?: string }) =>
        m.ok ? resolve(m.r!) : reject(new Error(m.message)),
    );
    child.send({ socketPath, pattern });
  });
}

export interface ReclaimResult {
  pattern: Pattern;
  releasedMiB: number;
  vballoonGiBps: number;
  floorGiBps: number;
  perPageGiBps: number;
  ratioToFloor: number;
  speedupOverPerPage: number;
  punchCalls: { vballoon: number; floor: number; perPage: number };
  spreadPercent: number;
}

export async function benchReclaim(rounds = 5): Promise<ReclaimResult[]> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vballoon-bench-'));
  const child = fork(__filename, ['child'], { stdio: ['inherit', 'inherit', 'inherit', 'ipc'] });
  const results: ReclaimResult[] = [];
  try {
    for (const pattern of ['contiguous', 'every-other', 'random-half'] as Pattern[]) {
      const v: number[] = [];
      const f: number[] = [];
      const pp: number[] = [];
      let released = 0;
      let calls = { vballoon: 0, floor: 0, perPage: 0 };
      for (let r = 0; r < rounds; r++) {
        // A fresh device per round: every page is new to the balloon.
        const device = new BalloonDevice({ statsQueue: false, pageReporting: false, messageQueue: false });
        const socketPath = path.join(dir, `vm-${pattern}-${r}.sock`);
        const backend = new VhostUserBackend(device, { log: new NullLogger() });
        backend.listen(socketPath);
        try {
          const m = await ask(child, socketPath, pattern);
          const gibps = (bytes: number, s: number): number => bytes / 2 ** 30 / s;
          v.push(gibps(m.releasedBytes, m.seconds));
          released = m.releasedBytes;
          const fl = await reference(child, pfnsFor(pattern, RAM_BYTES), 'floor');
          const pg = await reference(child, pfnsFor(pattern, RAM_BYTES), 'per-page');
          f.push(gibps(fl.releasedBytes, fl.seconds));
          pp.push(gibps(pg.releasedBytes, pg.seconds));
          calls = { vballoon: device.snapshot().discardCalls, floor: fl.calls, perPage: pg.calls };
        } finally {
          backend.close();
        }
      }
      const round2 = (x: number): number => Math.round(x * 100) / 100;
      results.push({
        pattern,
        releasedMiB: Math.round(released / MiB),
        vballoonGiBps: round2(median(v)),
        floorGiBps: round2(median(f)),
        perPageGiBps: round2(median(pp)),
        ratioToFloor: round2(median(f) / median(v)),
        speedupOverPerPage: round2(median(v) / median(pp)),
        punchCalls: calls,
        spreadPercent: Math.round(spreadPercent(v)),
      });
    }
    return results;
  } finally {
    child.send('exit');
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

if (require.main === module && process.argv[2] === 'child') runChild();
