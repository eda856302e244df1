/**
 * The restart soak: a real QEMU 11.1 and Linux guest, the real daemon under the real systemd
 * (or the test supervisor where systemd cannot run), an operator moving the balloon up and down
 * all along, and the daemon SIGKILLed at random moments (and restarted gracefully) while the
 * guest inflates and deflates. Used by `npm run soak` (bench/soak.ts, 100 + 20) and by the
 * end-to-end suite (spec/e2e/restart.spec.ts, a short seeded run).
 *
 * What it measures per restart: the VM-visible stall, from the kill to the moment the new
 * process answers for the VM again (its rings are served from then on). What it checks at the
 * end: the guest's balloon (MemTotal), the daemon's `actual` and ballooned pages agree exactly
 * with the last target; the host got the memory back; stats still arrive; the daemon's
 * descriptors and the manager's store are what they were after the first restart.
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { callDaemon } from '../daemon/client';
import { VmStatus } from '../daemon/daemon';
import { DaemonService } from './daemon-service';
import { E2eEnv, QemuGuest } from './qemu';

const MiB = 1024 * 1024;

export interface SoakOptions {
  env: E2eEnv;
  kills: number;
  restarts: number;
  seed: number;
  /** Progress lines (default: none). */
  log?: (line: string) => void;
  manager?: 'auto' | 'systemd' | 'supervisor';
}

export interface SoakReport {
  manager: 'systemd' | 'supervisor';
  fallbackReason: string | undefined;
  kills: number;
  restarts: number;
  /** VM-visible stall per kill and per graceful restart, ms. */
  killStallsMs: number[];
  restartStallsMs: number[];
  /** How many restarts landed while the guest was inflating or deflating (actual != target). */
  midOperation: number;
  finalTargetBytes: number;
  guestBalloonBytes: number;
  actualBytes: number;
  balloonedBytes: number;
  /** |guest balloon - daemon ballooned| + |actual - target|, in 4 KiB pages: must be 0. */
  pagesLost: number;
  /** Host memory of the guest before the final inflate minus after, vs the balloon. */
  hostReleasedBytes: number;
  statsAgeSeconds: number | null;
  daemonFds: { afterFirstRestart: number; atEnd: number };
  storedFds: { afterFirstRestart: number; atEnd: number };
  stillConnected: boolean;
  /** Replies the new process sent again because QEMU proved blocked waiting (docs/operations.md). */
  lostRepliesResent: number;
  /** Warning and error lines in the daemon's log, by message. */
  problems: Record<string, number>;
  seconds: number;
}

/** A small seeded PRNG (mulberry32): the same seed, the same kill moments and targets. */
function prng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/**
 * The daemon's open descriptors at a quiet moment: the least of a few looks 50 ms apart (the
 * control connection of the status request just answered may not be closed on its side yet).
 */
async function fdCount(pid: number): Promise<number> {
  let least = Infinity;
  for (let i = 0; i < 5; i++) {
    least = Math.min(least, fs.readdirSync(`/proc/${pid}/fd`).length);
    await sleep(50);
  }
  return least;
}

export function percentile(values: readonly number[], p: number): number {
  if (values.length === 0) return NaN;
  const sorted = [...values].sort((a, b) => a - b);
  return sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))];
}

export async function runSoak(o: SoakOptions): Promise<SoakReport> {
  const log = o.log ?? ((): void => undefined);
  const random = prng(o.seed);
  const started = Date.now();
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vballoon-soak-'));
  const socket = path.join(dir, 'vm0.sock');
  // No free page reporting, no DEFLATE_ON_OOM: MemTotal and host memory show exactly the balloon.
  const service = await DaemonService.start({
    dir,
    manager: o.manager ?? 'auto',
    config: {
      vms: [{ name: 'vm0', socket, memory: '1G', statsInterval: '1s', reporting: false, deflateOnOom: false }],
    },
  });
  log(`daemon under ${service.kind}${service.fallbackReason ? ` (systemd: ${service.fallbackReason})` : ''}`);
  const status = async (timeoutMs = 5000): Promise<VmStatus> =>
    (await callDaemon(service.control, 'status', { vm: 'vm0' }, timeoutMs)) as VmStatus;
  const setTarget = (bytes: number): Promise<unknown> =>
    callDaemon(service.control, 'set-target', { vm: 'vm0', bytes }, 10_000);
  const guest = new QemuGuest(o.env, { socketPath: socket, memMiB: 1024, numVqs: 4, configSize: 8 });
  try {
    await guest.boot(180_000);
    for (let t = Date.now(); !(await status()).negotiatedQueues.includes('stats'); await sleep(200))
      if (Date.now() - t > 60_000) throw new Error('the guest driver did not bind');
    // Touch (and free) what the guest can spare, so the host really holds the guest's memory.
    const mem = await guest.meminfo();
    const mib = Math.floor((mem['MemAvailable'] - 48 * MiB) / MiB);
    const eat = await guest.run(`/bin/eater ${mib} 16 0 0`, 240_000);
    if (!eat.lines.join('\n').includes('EATER DONE')) throw new Error('the guest could not touch its memory');
    const memTotal0 = (await guest.meminfo())['MemTotal'];

    const killStallsMs: number[] = [];
    const restartStallsMs: number[] = [];
    let midOperation = 0;
    let firstFds: { daemon: number; stored: number } | undefined;
    const total = o.kills + o.restarts;
    // Graceful restarts spread among the kills.
    const graceful = new Set<number>();
    while (graceful.size < o.restarts) graceful.add(Math.floor(random() * total));
    for (let i = 0; i < total; i++) {
      // An operator moves the balloon between 64 MiB and 640 MiB; the guest follows.
      const target = (1 + Math.floor(random() * 10)) * 64 * MiB;
      await setTarget(target);
      await sleep(30 + random() * 1500);
      const before = await status();
      if (before.actualBytes !== before.targetBytes) midOperation++;
      const t0 = performance.now();
      if (graceful.has(i)) await service.restart();
      else await service.crash();
      // The VM's device answers again: the new process serves the rings and the control socket.
      for (;;) {
        try {
          if ((await status(1000)).connected) break;
        } catch {
          // Not yet.
        }
        if (performance.now() - t0 > 60_000) throw new Error(`restart ${i + 1}: the daemon did not come back`);
        await sleep(2);
      }
      const stall = performance.now() - t0;
      (graceful.has(i) ? restartStallsMs : killStallsMs).push(stall);
      log(`${graceful.has(i) ? 'restart' : 'kill'} ${i + 1}/${total}: stall ${stall.toFixed(0)} ms`);
      if (firstFds === undefined)
        firstFds = { daemon: await fdCount(await service.pid()), stored: await service.storedDescriptors() };
    }
    // The end: one last target, reached exactly; everything must agree.
    const finalTarget = 256 * MiB;
    const resident0 = (await status()).hostResidentBytes ?? 0;
    await setTarget(0);
    for (let t = Date.now(); (await status()).actualBytes !== 0; await sleep(200))
      if (Date.now() - t > 300_000) throw new Error('the balloon did not empty');
    const residentEmpty = (await status()).hostResidentBytes ?? 0;
    // Touch again what the deflate gave back, so the final inflate has host memory to release.
    await guest.run(`/bin/eater ${mib} 16 0 0`, 240_000);
    const residentFull = (await status()).hostResidentBytes ?? 0;
    await setTarget(finalTarget);
    for (let t = Date.now(); (await status()).actualBytes !== finalTarget; await sleep(200))
      if (Date.now() - t > 300_000) throw new Error('the final target was not reached');
    await sleep(2500); // one more stats interval, and the last discards
    const end = await status();
    const memTotal = (await guest.meminfo())['MemTotal'];
    const guestBalloon = memTotal0 - memTotal;
    const pagesLost =
      Math.abs(guestBalloon - end.balloonedBytes) / 4096 + Math.abs(end.actualBytes - end.targetBytes) / 4096;
    const report: SoakReport = {
      manager: service.kind,
      fallbackReason: service.fallbackReason,
      kills: killStallsMs.length,
      restarts: restartStallsMs.length,
      killStallsMs,
      restartStallsMs,
      midOperation,
      finalTargetBytes: finalTarget,
      guestBalloonBytes: guestBalloon,
      actualBytes: end.actualBytes,
      balloonedBytes: end.balloonedBytes,
      pagesLost,
      hostReleasedBytes: residentFull - (end.hostResidentBytes ?? 0),
      statsAgeSeconds: end.statsAgeSeconds,
      daemonFds: { afterFirstRestart: firstFds?.daemon ?? -1, atEnd: await fdCount(await service.pid()) },
      storedFds: { afterFirstRestart: firstFds?.stored ?? -1, atEnd: await service.storedDescriptors() },
      stillConnected: end.connected,
      lostRepliesResent: 0,
      problems: {},
      seconds: Math.round((Date.now() - started) / 1000),
    };
    log(
      `resident: before the last deflate ${(resident0 / MiB) | 0} MiB, empty ${(residentEmpty / MiB) | 0} MiB, ` +
        `touched ${(residentFull / MiB) | 0} MiB, final ${((end.hostResidentBytes ?? 0) / MiB) | 0} MiB`,
    );
    for (const line of service.logs()) {
      if (line.level !== 'warn' && line.level !== 'error') continue;
      report.problems[line.msg] = (report.problems[line.msg] ?? 0) + 1;
      if (line.msg.includes('waits for a reply the previous process did not send')) report.lostRepliesResent++;
    }
    return report;
  } finally {
    await guest.shutdown().catch(() => undefined);
    await service.close();
    fs.rmSync(dir, { recursive: true, force: true });
  }
}
