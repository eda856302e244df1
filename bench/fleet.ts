/**
 * Many VMs reclaiming at once: the real daemon serving 64 VMs, each a Linux-like guest model
 * (with the message queue) whose memory was written; every target is raised at the same moment,
 * and while the balloons inflate every guest keeps sending pressure messages. Reports the
 * aggregate rate at which host memory was released (the memfds' allocated blocks, to the last
 * hole) and each VM's acknowledgement latency as its guest sees it (kick to used buffer), with
 * the slowest VM's. The guest models share this one process (and the machine's CPUs with the
 * daemon), so their latencies include their own scheduling: an upper bound on the daemon's.
 */
import * as path from 'node:path';
import { callDaemon } from '../lib/daemon/client';
import { BalloonGuest } from '../lib/testing/balloon-guest';
import { startBenchDaemon, waitFor } from './common';
import { summarize } from './stats';

const MiB = 1024 * 1024;
/** Each VM's RAM, and how much of it goes into its balloon. */
const VM_RAM_BYTES = 64 * MiB;
const VM_INFLATE_BYTES = 48 * MiB;
/** Pause between one VM's pressure messages (each VM sends one at a time). */
const PRESSURE_GAP_MS = 2;

export interface FleetResult {
  vms: number;
  inflatedGiB: number;
  releasedGiB: number;
  seconds: number;
  aggregateGiBps: number;
  /** Per VM p50/p99 of its pressure acks during the inflate, then over VMs. In us. */
  pressure: { messages: number; medianVmP50: number; medianVmP99: number; slowestVmP99: number; slowestMax: number };
}

export async function benchFleet(options: { vms?: number } = {}): Promise<FleetResult> {
  const n = options.vms ?? 64;
  const vms = (dir: string): Array<{ name: string; socket: string; [k: string]: unknown }> =>
    Array.from({ length: n }, (_, i) => ({
      name: `vm${i}`,
      socket: path.join(dir, `vm${i}.sock`),
      memory: `${VM_RAM_BYTES / MiB}M`,
      messageQueue: true,
      policy: 'manual',
    }));
  const daemon = await startBenchDaemon('fleet', vms);
  const vmList = vms(daemon.dir);
  const control = daemon.control;
  const guests: BalloonGuest[] = [];
  try {
    for (const vm of vmList)
      guests.push(await BalloonGuest.boot(vm.socket, { mode: 'seed', numQueues: 5, ramBytes: VM_RAM_BYTES }));
    for (const g of guests) g.touchFree();
    const before = guests.map((g) => g.fe.ram.residentBytes());
    const pages = VM_INFLATE_BYTES / 4096;
    let inflating = true;
    const acks: number[][] = guests.map(() => []);
    // Every guest sends pressure messages, one after another, for as long as the inflate runs.
    const senders = guests.map(async (g, i) => {
      // Bounded by the inflate (its own two-minute bound below).
      while (inflating) {
        acks[i].push(await g.measurePressureAck());
        await new Promise((r) => setTimeout(r, PRESSURE_GAP_MS));
      }
    });
    const t0 = process.hrtime.bigint();
    await Promise.all(vmList.map((vm) => callDaemon(control, 'set-target', { vm: vm.name, bytes: VM_INFLATE_BYTES })));
    const expected = n * VM_INFLATE_BYTES;
    const released = (): number => guests.reduce((sum, g, i) => sum + before[i] - g.fe.ram.residentBytes(), 0);
    await waitFor(() => guests.every((g) => g.actualPages >= pages) && released() >= expected, 120_000, 'every hole');
    const seconds = Number(process.hrtime.bigint() - t0) / 1e9;
    inflating = false;
    await Promise.all(senders);
    const us = (ns: number): number => Math.round(ns / 100) / 10;
    const perVm = acks.filter((a) => a.length > 0).map((a) => summarize(a));
    const byP99 = perVm.map((s) => s.p99).sort((a, b) => a - b);
    const byP50 = perVm.map((s) => s.p50).sort((a, b) => a - b);
    return {
      vms: n,
      inflatedGiB: expected / 2 ** 30,
      releasedGiB: Math.round((released() / 2 ** 30) * 100) / 100,
      seconds: Math.round(seconds * 1000) / 1000,
      aggregateGiBps: Math.round((released() / 2 ** 30 / seconds) * 100) / 100,
      pressure: {
        messages: acks.reduce((m, a) => m + a.length, 0),
        medianVmP50: us(byP50[Math.floor(byP50.length / 2)] ?? NaN),
        medianVmP99: us(byP99[Math.floor(byP99.length / 2)] ?? NaN),
        slowestVmP99: us(byP99[byP99.length - 1] ?? NaN),
        slowestMax: us(Math.max(...acks.flat())),
      },
    };
  } finally {
    for (const g of guests) await g.close();
    await daemon.stop();
  }
}
