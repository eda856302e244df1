/**
 * Real guest with our driver (guest/linux) in QEMU 11.1 + Linux 6.12 under TCG:
 *  - message-to-ack latency as the guest measures it (the driver's ack_latencies_us, kick to used
 *    buffer), over messages sent through the driver's test trigger;
 *  - time from the onset of pressure (the first reclaim pass, seen by scripts/pressure-watch.c in
 *    the guest) to the first deflated page (MemTotal rises), with the pressure message versus the
 *    stats-inferred policy at a 1 s and a 5 s stats interval (same driver, message queue not offered);
 *  - OOM kills of each under the sudden (tmpfs) and the gradual (anonymous) load of scenario 2.
 * Needs scripts/e2e-env.sh (with the guest-driver initramfs); skipped without it.
 */
import {
  BALLOON_MIB,
  bootGuestDriver,
  env,
  inflateThenAuto,
  LoadKind,
  OVERSHOOT_MIB,
  PRESSURE_VM,
  pressureCounters,
  Rig,
  runLoad,
  teardown,
  TRIGGER,
} from '../spec/e2e/guest-driver-rig';
import { median, percentile } from './stats';

export interface PathResult {
  path: string;
  load: LoadKind;
  /**
   * Per round: ms from the onset of pressure (first reclaim pass) to the first deflated page;
   * 'before onset' when the balloon gave back its first page before any reclaim; null without a deflate.
   */
  firstDeflateMs: (number | 'before onset' | null)[];
  /** Per round: ms from the start of the load to the first deflated page (null: none). */
  loadToDeflateMs: (number | null)[];
  oomKills: number[];
  messages: number[];
}

export interface GuestPressureResult {
  skipped?: string;
  ackLatencyUs?: { n: number; p50: number; p99: number; max: number };
  paths?: PathResult[];
}

/** The ways the host can learn of the pressure. */
const PATHS: { name: string; vm: Record<string, unknown>; policy: Record<string, unknown> }[] = [
  { name: 'message (step: whole balloon, default)', vm: PRESSURE_VM, policy: {} },
  { name: 'message (step: 25 %)', vm: PRESSURE_VM, policy: { messageStep: 0.25 } },
  { name: 'stats 1 s', vm: { ...PRESSURE_VM, messageQueue: false, statsInterval: '1s' }, policy: {} },
  { name: 'stats 5 s', vm: { ...PRESSURE_VM, messageQueue: false, statsInterval: '5s' }, policy: {} },
  // The default inflate floor (256 MiB) makes the stats rule act at 128 MiB available, before any
  // reclaim at TCG fill speeds; with a lean floor it acts near the onset, like the message.
  {
    name: 'stats 1 s, lean floor',
    vm: { ...PRESSURE_VM, messageQueue: false, statsInterval: '1s' },
    policy: { guestFloor: '32M', guestFloorFraction: 0.03 },
  },
];

async function ackLatency(messages: number): Promise<GuestPressureResult['ackLatencyUs']> {
  // Manual mode: the daemon acknowledges and only reports, so the balloon stays as it is.
  const r: Rig = await bootGuestDriver({ vm: { reporting: false }, modArgs: 'min_interval_ms=0' });
  try {
    const wait = 'while [ "$(cat /sys/bus/virtio/devices/virtio*/pressure/outstanding)" != 0 ]; do :; done';
    await r.g.run(`i=0; while [ $i -lt ${messages} ]; do ${TRIGGER}; ${wait}; i=$((i+1)); done`, 600_000);
    const log = await r.g.run('cat /sys/kernel/debug/virtio_balloon-*/ack_latencies_us');
    const us = log.lines
      .filter((l) => /^\d+$/.test(l))
      .map(Number)
      .sort((a, b) => a - b);
    return { n: us.length, p50: percentile(us, 50), p99: percentile(us, 99), max: us[us.length - 1] };
  } finally {
    await teardown(r);
  }
}

async function onePressureRun(
  p: (typeof PATHS)[number],
  load: LoadKind,
  overMiB: number,
): Promise<{
  firstDeflateMs: number | 'before onset' | null;
  loadToDeflateMs: number | null;
  oomKills: number;
  messages: number;
}> {
  const r = await bootGuestDriver({ vm: p.vm, policy: p.policy });
  try {
    const { g, d } = r;
    await inflateThenAuto(d, BALLOON_MIB);
    const from = g.output.length;
    g.spawnInGuest('/bin/pressure-watch 120');
    await g.waitLine((l) => l === 'WATCH START', 30_000, from);
    const out = await runLoad(g, load, overMiB);
    const watched = (what: string): number | undefined => {
      const l = g.output.slice(from).find((x) => x.startsWith(`WATCH ${what} `));
      return l === undefined ? undefined : Number(l.split(' ')[2]);
    };
    let oomKills = out.oom.filter((l) => /Out of memory|Kernel panic/.test(l)).length;
    let messages = 0;
    if (out.exit !== undefined) {
      // The guest lives: give a late deflate time to show, then read the kernel's own count.
      for (let i = 0; i < 50 && watched('DEFLATED') === undefined; i++)
        await new Promise((res) => setTimeout(res, 200));
      oomKills = Number((await g.run('grep oom_kill /proc/vmstat')).lines[0]?.split(' ')[1] ?? oomKills);
      messages = p.vm['messageQueue'] === false ? 0 : ((await pressureCounters(g))['sent'] ?? 0);
    }
    const onset = watched('ONSET');
    const deflated = watched('DEFLATED');
    return {
      firstDeflateMs:
        deflated === undefined
          ? null
          : onset === undefined || deflated < onset
            ? 'before onset'
            : Math.round(deflated - onset),
      loadToDeflateMs: deflated === undefined ? null : Math.round(deflated),
      oomKills,
      messages,
    };
  } finally {
    if (r.g.exitCode === undefined) r.g.kill();
    await teardown(r);
  }
}

export async function benchGuestPressure(
  options: { rounds?: number; messages?: number; paths?: string[]; overMiB?: number } = {},
): Promise<GuestPressureResult> {
  if (env === undefined || env.driverInitrd === '')
    return { skipped: 'no guest-driver initramfs (scripts/e2e-env.sh)' };
  const rounds = options.rounds ?? 2;
  const messages = options.messages ?? 200;
  const result: GuestPressureResult = {
    ackLatencyUs: messages > 0 ? await ackLatency(messages) : undefined,
    paths: [],
  };
  const paths = PATHS.filter((p) => options.paths === undefined || options.paths.includes(p.name));
  for (const load of ['sudden', 'gradual'] as const) {
    for (const p of paths) {
      const row: PathResult = {
        path: p.name,
        load,
        firstDeflateMs: [],
        loadToDeflateMs: [],
        oomKills: [],
        messages: [],
      };
      for (let i = 0; i < rounds; i++) {
        const one = await onePressureRun(p, load, options.overMiB ?? OVERSHOOT_MIB);
        row.firstDeflateMs.push(one.firstDeflateMs);
        row.loadToDeflateMs.push(one.loadToDeflateMs);
        row.oomKills.push(one.oomKills);
        row.messages.push(one.messages);
      }
      result.paths!.push(row);
    }
  }
  return result;
}

/** Each round's onset-to-first-deflate, as text. */
export function firstDeflateText(row: PathResult): string {
  return row.firstDeflateMs.map((x) => (x === null ? 'none' : String(x))).join(', ');
}

/** The median onset-to-first-deflate of the rounds that measured one (undefined: none did). */
export function firstDeflateMedian(row: PathResult): number | undefined {
  const seen = row.firstDeflateMs.filter((x): x is number => typeof x === 'number');
  return seen.length === 0 ? undefined : median(seen);
}

if (require.main === module) {
  // node dist/bench/guest-pressure.js [ROUNDS] [MESSAGES] ['PATH;PATH'] [OVERSHOOT_MIB]
  const rounds = Number(process.argv[2] ?? 1);
  const messages = Number(process.argv[3] ?? 200);
  benchGuestPressure({
    rounds,
    messages,
    paths: process.argv[4]?.split(';'),
    overMiB: Number(process.argv[5] ?? OVERSHOOT_MIB),
  })
    .then((r) => console.log(JSON.stringify(r, null, 2)))
    .catch((err: unknown) => {
      console.error(err);
      process.exit(1);
    });
}
