/**
 * The cost of running vballoon: the daemon's resident memory and CPU, idle and while serving 1,
 * 16 and 64 VMs driven by the Linux driver model, next to a bare Node.js process doing nothing
 * (the reference) measured in the same run; and the ballooned-page tracker's memory per GiB of
 * guest RAM next to a plain bitmap (1 bit per 4 KiB page).
 */
import { spawn } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { callDaemon } from '../lib/daemon/client';
import { PageTracker } from '../lib/device/page-tracker';
import { BalloonGuest } from '../lib/testing/balloon-guest';
import { startBenchDaemon, waitFor } from './common';

const MiB = 1024 * 1024;
const TICKS_PER_SECOND = 100; // USER_HZ on Linux

function procStats(pid: number): { rssBytes: number; cpuSeconds: number } {
  const status = fs.readFileSync(`/proc/${pid}/status`, 'utf8');
  const rssKb = Number(/^VmRSS:\s+(\d+)/m.exec(status)?.[1] ?? 0);
  const stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
  const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  const ticks = Number(fields[11]) + Number(fields[12]); // utime + stime
  return { rssBytes: rssKb * 1024, cpuSeconds: ticks / TICKS_PER_SECOND };
}

async function sample(pid: number, seconds: number): Promise<{ rssMiB: number; cpuPercent: number }> {
  const a = procStats(pid);
  await new Promise((r) => setTimeout(r, seconds * 1000));
  const b = procStats(pid);
  return {
    rssMiB: Math.round((b.rssBytes / MiB) * 10) / 10,
    cpuPercent: Math.round(((b.cpuSeconds - a.cpuSeconds) / seconds) * 1000) / 10,
  };
}

export interface CostRow {
  vms: number;
  idle: { rssMiB: number; cpuPercent: number };
  serving: { rssMiB: number; cpuPercent: number };
}

export interface CostResult {
  reference: { rssMiB: number; cpuPercent: number };
  rows: CostRow[];
  trackerBytesPerGiB: {
    contiguous: number;
    everyOther: number;
    bitmap: number;
    ratioContiguous: number;
    ratioEveryOther: number;
  };
  windowSeconds: number;
}

export async function benchCost(options: { counts?: number[]; seconds?: number } = {}): Promise<CostResult> {
  const counts = options.counts ?? [1, 16, 64];
  const seconds = options.seconds ?? 5;
  // The reference: Node.js doing nothing, measured in this same run.
  const bare = spawn(process.execPath, ['-e', 'setInterval(() => {}, 1 << 30)'], { stdio: 'ignore' });
  await new Promise((r) => setTimeout(r, 500));
  const reference = await sample(bare.pid!, seconds);
  bare.kill();
  const rows: CostRow[] = [];
  for (const n of counts) {
    const vms = (dir: string): Array<{ name: string; socket: string; memory: string }> =>
      Array.from({ length: n }, (_, i) => ({ name: `vm${i}`, socket: path.join(dir, `vm${i}.sock`), memory: '64M' }));
    const bench = await startBenchDaemon('cost', vms);
    const daemon = bench.process;
    const vmList = vms(bench.dir);
    const control = bench.control;
    const guests: BalloonGuest[] = [];
    try {
      for (const vm of vmList)
        guests.push(await BalloonGuest.boot(vm.socket, { mode: 'stock', numQueues: 5, ramBytes: 64 * MiB }));
      await new Promise((r) => setTimeout(r, 1000));
      const idle = await sample(daemon.pid!, seconds);
      // Serving: every VM's balloon moves 16 MiB up and down, all the time.
      let stop = false;
      const flips = vmList.map(async (vm, i) => {
        let up = true;
        while (!stop) {
          await callDaemon(control, 'set-target', { vm: vm.name, bytes: up ? 16 * MiB : 0 });
          // A flip that does not finish in time is not a failure of this measurement (it samples
          // CPU and memory while balloons move); the next flip goes the other way.
          await waitFor(() => stop || guests[i].actualPages === (up ? 16 * 256 : 0), 30_000, 'a flip', 20).catch(
            (err: unknown) => {
              process.stderr.write(`cost: ${vm.name} flip did not finish: ${String(err)}\n`);
            },
          );
          up = !up;
        }
      });
      const serving = await sample(daemon.pid!, seconds);
      stop = true;
      await Promise.all(flips);
      rows.push({ vms: n, idle, serving });
    } finally {
      for (const g of guests) await g.close();
      await bench.stop();
    }
  }
  const pagesPerGiB = (1024 * MiB) / 4096;
  const contiguous = new PageTracker();
  for (let p = 0; p < pagesPerGiB; p += 256) contiguous.add(Array.from({ length: 256 }, (_, i) => p + i));
  const everyOther = new PageTracker();
  for (let p = 0; p < pagesPerGiB; p += 512) everyOther.add(Array.from({ length: 256 }, (_, i) => p + 2 * i));
  const bitmap = pagesPerGiB / 8;
  return {
    reference,
    rows,
    windowSeconds: seconds,
    trackerBytesPerGiB: {
      contiguous: contiguous.memoryBytes,
      everyOther: everyOther.memoryBytes,
      bitmap,
      ratioContiguous: Math.round((contiguous.memoryBytes / bitmap) * 1000) / 1000,
      ratioEveryOther: Math.round((everyOther.memoryBytes / bitmap) * 100) / 100,
    },
  };
}
