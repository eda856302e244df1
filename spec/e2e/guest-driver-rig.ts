/**
 * The rig for runs with our guest driver (guest/linux) in a real QEMU + Linux guest: boot with our
 * initramfs or the stock one, the driver's counters, the pressure loads and their outcome. Shared by
 * spec/e2e/guest-driver.spec.ts and bench/guest-pressure.ts. Needs scripts/e2e-env.sh.
 */
import * as path from 'node:path';
import type { VmStatus } from '../../lib/daemon/daemon';
import { loadE2eEnv, QemuGuest } from '../../lib/testing/qemu';
import { DaemonProcess } from '../daemon/harness';
import { until } from '../helpers';

export const MiB = 1024 * 1024;
export const CACHE = process.env['VBALLOON_E2E_CACHE'] ?? path.resolve(__dirname, '..', '..', '..', '.cache', 'e2e');
export const env = loadE2eEnv(CACHE);
/** The driver's counters (guest/linux: /sys/bus/virtio/devices/virtioN/pressure/). */
export const PRESSURE = '/sys/bus/virtio/devices/virtio*/pressure';
/** Sends one message as if under pressure (the driver's debugfs test trigger; ash does not glob redirections). */
export const TRIGGER = 'for f in /sys/kernel/debug/virtio_balloon-*/trigger; do echo 1 > $f; done';

export interface Rig {
  d: DaemonProcess;
  g: QemuGuest;
}

export interface GuestDriverBoot {
  /** VM settings for the daemon (merged over a 1 GiB VM with 1 s stats). */
  vm?: Record<string, unknown>;
  policy?: Record<string, unknown>;
  /** Boot the stock initramfs (the control) instead of ours. */
  stock?: boolean;
  /** Our module's parameters, e.g. 'message_bit=2,ack_timeout_ms=500'. */
  modArgs?: string;
}

export const status = (d: DaemonProcess): VmStatus => JSON.parse(d.cli(['status', 'vm0', '--json']).stdout) as VmStatus;

/** `num_vqs` for what the daemon offers with these VM settings (docs/balloon.md). */
function numVqs(vm: Record<string, unknown>): number {
  const message = vm['messageQueue'] !== false;
  return 2 + (vm['stats'] === false ? 0 : 1) + (vm['reporting'] === false ? 0 : 1) + (message ? 1 : 0);
}

export async function bootGuestDriver(o: GuestDriverBoot): Promise<Rig> {
  const d = new DaemonProcess();
  const vm = { name: 'vm0', socket: d.vmSocket('vm0'), memory: '1G', statsInterval: '1s', ...o.vm };
  await d.start({ policy: o.policy ?? {}, vms: [vm] });
  const g = new QemuGuest(env!, {
    socketPath: d.vmSocket('vm0'),
    memMiB: 1024,
    numVqs: numVqs(vm),
    configSize: 8,
    initrd: o.stock === true ? env!.initrd : env!.driverInitrd,
    appendExtra: o.stock !== true && o.modArgs !== undefined ? `VBALLOON_MODARGS=${o.modArgs}` : undefined,
  });
  try {
    await g.boot();
    await until(() => status(d).negotiatedQueues.length > 0, 'driver bound', 30_000);
  } catch (err) {
    await g.shutdown();
    await d.stop();
    throw err;
  }
  return { d, g };
}

export async function teardown(r: Rig | undefined): Promise<void> {
  if (r === undefined) return;
  await r.g.shutdown();
  await r.d.stop();
}

/** The driver's pressure counters, by name. */
export async function pressureCounters(g: QemuGuest): Promise<Record<string, number>> {
  const r = await g.run(`for f in ${PRESSURE}/*; do echo "P $(basename $f) $(cat $f)"; done`);
  const out: Record<string, number> = {};
  for (const l of r.lines) {
    const m = /^P (\w+) (-?\d+)$/.exec(l);
    if (m !== null) out[m[1]] = Number(m[2]);
  }
  return out;
}

/** Kernel lines that say a process was OOM-killed or the kernel ran out of memory. */
export function oomLines(g: QemuGuest): string[] {
  return g.output.filter((l) => /Out of memory|oom-kill|Kernel panic/.test(l));
}

/**
 * Guest shell: fills /mnt/load with tmpfs pages until the driver has sent `n` messages: 4 MiB at a
 * time while MemFree is above 48 MiB, then 256 KiB. Reclaim (and so the driver's shrinker) starts
 * once free memory is under the low watermark, about 1 MiB above the point where an OOM kill is
 * possible: the fill stops in that band.
 */
export const FILL_UNTIL = (n: number): string =>
  `i=0; while [ $(cat ${PRESSURE}/sent) -lt ${n} ] && [ $i -lt 4000 ]; do ` +
  `if [ $(awk '/MemFree/{print int($2/1024)}' /proc/meminfo) -gt 48 ]; then bs=4M; else bs=256k; fi; ` +
  `dd if=/dev/zero of=/mnt/load/f${n}_$i bs=$bs count=1 2>/dev/null; i=$((i+1)); done; ` +
  `echo FILLED $i steps; [ $(cat ${PRESSURE}/sent) -ge ${n} ]`;

/** Polls the driver's counters until `pred` holds. */
export async function untilGuest(
  g: QemuGuest,
  pred: (c: Record<string, number>) => boolean,
  what: string,
): Promise<void> {
  const start = Date.now();
  for (;;) {
    const c = await pressureCounters(g);
    if (pred(c)) return;
    if (Date.now() - start > 60_000) throw new Error(`timed out waiting for ${what}: ${JSON.stringify(c)}`);
    await new Promise((res) => setTimeout(res, 500));
  }
}

/** Problems the kernel reported (the two taint notes of any unsigned out-of-tree module excepted). */
export async function kernelProblems(g: QemuGuest): Promise<string[]> {
  const r = await g.run('dmesg');
  return r.lines.filter(
    (l) =>
      (/WARNING:|BUG:|Call Trace|Oops|hung_task|blocked for more than/.test(l) ||
        /virtio_balloon.*(fail|error|warn)/i.test(l)) &&
      !/loading out-of-tree module taints kernel|module verification failed/.test(l),
  );
}

/** Balloons `mib` MiB (manual), then hands the VM to the policy (auto keeps the balloon). */
export async function inflateThenAuto(d: DaemonProcess, mib: number): Promise<void> {
  const set = await d.cliAsync(['set-target', 'vm0', `${mib}M`, '--wait', '--timeout', '120s']);
  if (set.code !== 0) throw new Error(`set-target ${mib}M failed: ${set.stderr}`);
  if (d.cli(['mode', 'vm0', 'auto']).code !== 0) throw new Error('mode auto failed');
}

/** The pressure loads of scenario 2: each prints LOAD_EXIT=<status of the allocating program>. */
export const LOADS = {
  /** Unreclaimable tmpfs pages, as fast as the guest can write them. */
  sudden: (mib: number) =>
    `mkdir -p /mnt/load; mount -t tmpfs -o size=4g tmpfs /mnt/load; ` +
    `dd if=/dev/zero of=/mnt/load/fill bs=1M count=${mib} 2>/dev/null; echo LOAD_EXIT=$?`,
  /** Anonymous memory, 2 MiB every 40 ms. */
  gradual: (mib: number) => `/bin/eater ${mib} 2 40 0 >/dev/null; echo LOAD_EXIT=$?`,
};
export type LoadKind = keyof typeof LOADS;

export interface LoadOutcome {
  /** The allocating program's exit status (0: every allocation succeeded), or undefined if the guest died. */
  exit: number | undefined;
  /** Kernel lines reporting an OOM kill or a panic. */
  oom: string[];
  /** MiB asked for (available memory at the start plus the overshoot). */
  askedMiB: number;
}

/**
 * Runs a load of `overMiB` beyond what the guest has available, and waits until it ends or the
 * kernel reports an OOM kill (a killed shell loop may leave the guest stuck or panicking).
 */
export async function runLoad(g: QemuGuest, kind: LoadKind, overMiB: number): Promise<LoadOutcome> {
  const avail = Math.floor((await g.meminfo())['MemAvailable'] / MiB);
  const askedMiB = avail + overMiB;
  const from = g.output.length;
  let exit: number | undefined;
  const state = { done: false };
  const run = g.run(LOADS[kind](askedMiB), 240_000).then(
    (r) => {
      const m = r.lines.map((l) => /^LOAD_EXIT=(\d+)/.exec(l)).find((x) => x !== null);
      exit = m ? Number(m[1]) : undefined;
      state.done = true;
    },
    () => {
      state.done = true;
    },
  );
  // Poll (no dangling timers): the load ends, or the kernel reports an OOM kill or a panic.
  let oomAt: number | undefined;
  while (!state.done && (oomAt === undefined || Date.now() - oomAt < 3000)) {
    if (oomAt === undefined && g.output.slice(from).some((l) => /Out of memory|Kernel panic/.test(l)))
      oomAt = Date.now();
    await new Promise((res) => setTimeout(res, 200));
  }
  void run;
  return { exit, oom: oomLines(g).filter((l) => g.output.indexOf(l) >= from), askedMiB };
}

/** The scenario 2 VM: no DEFLATE_ON_OOM, stats only every 60 s, a large balloon; the policy in auto mode. */
export const PRESSURE_VM = { reporting: false, deflateOnOom: false, statsInterval: '60s' };
export const BALLOON_MIB = 600;
export const OVERSHOOT_MIB = 150;
