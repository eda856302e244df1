/**
 * End to end with our guest driver (guest/linux: Linux 6.12's virtio_balloon with the pressure
 * message queue, built with DKMS by scripts/e2e-env.sh) in a real QEMU 11.1 + Linux 6.12 guest,
 * against the real daemon in auto mode. Where a scenario claims the driver saved the guest, the
 * same run with the stock driver is the control and must end in an OOM kill.
 * TCG fills memory at about 40 MB/s: waits are generous and nothing here is timed (bench/ is).
 */
import { expect } from 'chai';
import * as path from 'node:path';
import { VIRTIO_BALLOON_F_MESSAGE_VQ, VIRTIO_BALLOON_F_MESSAGE_VQ_SEED } from '../../lib/device/constants';
import type { VmStatus } from '../../lib/daemon/daemon';
import { loadE2eEnv, QemuGuest } from '../../lib/testing/qemu';
import { DaemonProcess } from '../daemon/harness';
import { until } from '../helpers';

const MiB = 1024 * 1024;
const CACHE = process.env['VBALLOON_E2E_CACHE'] ?? path.resolve(__dirname, '..', '..', '..', '.cache', 'e2e');
const env = loadE2eEnv(CACHE);
/** The driver's counters (guest/linux: /sys/bus/virtio/devices/virtioN/pressure/). */
const PRESSURE = '/sys/bus/virtio/devices/virtio*/pressure';
/** Sends one message as if under pressure (the driver's debugfs test trigger; ash does not glob redirections). */
const TRIGGER = 'for f in /sys/kernel/debug/virtio_balloon-*/trigger; do echo 1 > $f; done';

interface Rig {
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

const status = (d: DaemonProcess): VmStatus => JSON.parse(d.cli(['status', 'vm0', '--json']).stdout) as VmStatus;

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

async function teardown(r: Rig | undefined): Promise<void> {
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
const FILL_UNTIL = (n: number): string =>
  `i=0; while [ $(cat ${PRESSURE}/sent) -lt ${n} ] && [ $i -lt 4000 ]; do ` +
  `if [ $(awk '/MemFree/{print int($2/1024)}' /proc/meminfo) -gt 48 ]; then bs=4M; else bs=256k; fi; ` +
  `dd if=/dev/zero of=/mnt/load/f${n}_$i bs=$bs count=1 2>/dev/null; i=$((i+1)); done; ` +
  `echo FILLED $i steps; [ $(cat ${PRESSURE}/sent) -ge ${n} ]`;

/** Polls the driver's counters until `pred` holds. */
async function untilGuest(g: QemuGuest, pred: (c: Record<string, number>) => boolean, what: string): Promise<void> {
  const start = Date.now();
  for (;;) {
    const c = await pressureCounters(g);
    if (pred(c)) return;
    if (Date.now() - start > 60_000) throw new Error(`timed out waiting for ${what}: ${JSON.stringify(c)}`);
    await new Promise((res) => setTimeout(res, 500));
  }
}

/** Problems the kernel reported (the two taint notes of any unsigned out-of-tree module excepted). */
async function kernelProblems(g: QemuGuest): Promise<string[]> {
  const r = await g.run('dmesg');
  return r.lines.filter(
    (l) =>
      (/WARNING:|BUG:|Call Trace|Oops|hung_task|blocked for more than/.test(l) ||
        /virtio_balloon.*(fail|error|warn)/i.test(l)) &&
      !/loading out-of-tree module taints kernel|module verification failed/.test(l),
  );
}

/** Balloons `mib` MiB (manual), then hands the VM to the policy (auto keeps the balloon). */
async function inflateThenAuto(d: DaemonProcess, mib: number): Promise<void> {
  const set = await d.cliAsync(['set-target', 'vm0', `${mib}M`, '--wait', '--timeout', '120s']);
  expect(set.code, set.stderr).to.equal(0);
  expect(d.cli(['mode', 'vm0', 'auto']).code).to.equal(0);
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

(env === undefined || env.driverInitrd === '' ? describe.skip : describe)(
  'end to end: our guest driver (guest/linux) with the pressure message queue',
  function () {
    this.timeout(600_000);

    for (const bitChoice of ['vballoon', 'seed'] as const) {
      const n = bitChoice === 'seed' ? VIRTIO_BALLOON_F_MESSAGE_VQ_SEED : VIRTIO_BALLOON_F_MESSAGE_VQ;
      it(`1. bit ${n} negotiates, the queue layout matches, and pressure messages are acked`, async () => {
        const seed = bitChoice === 'seed';
        const r = await bootGuestDriver({
          vm: { messageBit: bitChoice },
          modArgs: seed ? `message_bit=${n}` : undefined,
        });
        try {
          const { g, d } = r;
          const features = (await g.run('cat /sys/bus/virtio/devices/virtio*/features')).lines[0];
          expect(features[n], features).to.equal('1');
          // DEFLATE_ON_OOM (bit 2) is offered with bit 20 and acked; with the seed's bit it is the message queue.
          expect(features[2]).to.equal('1');
          expect(features[20]).to.equal(seed ? '0' : '1');
          const s = status(d);
          expect(s.negotiatedQueues).to.deep.equal(['inflate', 'deflate', 'stats', 'reporting', 'message']);
          expect((await g.run(`cat ${PRESSURE}/feature_bit`)).lines[0]).to.equal(String(n));
          // No reclaim yet: nothing sent. Then five messages through the test trigger.
          expect((await pressureCounters(g))['sent']).to.equal(0);
          await g.run('echo 0 > /sys/module/virtio_balloon/parameters/min_interval_ms');
          for (let i = 0; i < 5; i++) {
            await g.run(`${TRIGGER}; sleep 0.2`);
          }
          const c = await pressureCounters(g);
          expect(c).to.include({ sent: 5, acked: 5, timed_out: 0, outstanding: 0 });
          expect(c['last_latency_us']).to.be.greaterThan(0);
          await until(() => status(d).pressureMessages === 5, 'the daemon counted 5 messages', 10_000);
          const lat = await g.run('cat /sys/kernel/debug/virtio_balloon-*/ack_latencies_us');
          expect(lat.lines.filter((l) => /^\d+$/.test(l))).to.have.length(5);
          expect(await kernelProblems(g)).to.deep.equal([]);
        } finally {
          await teardown(r);
        }
      });
    }

    describe('2. real pressure with the balloon holding most of the guest', () => {
      // The knob that exists today: a pressure message gives back the whole balloon (the default
      // 25 % step was measured too small under TCG: the next message comes too late).
      const policy = { pressureStepFraction: 1 };
      for (const kind of ['sudden', 'gradual'] as const) {
        it(`${kind}: with our driver every allocation succeeds and nothing is OOM-killed`, async () => {
          const r = await bootGuestDriver({ vm: PRESSURE_VM, policy });
          try {
            const { g, d } = r;
            await inflateThenAuto(d, BALLOON_MIB);
            const out = await runLoad(g, kind, OVERSHOOT_MIB);
            expect(out.oom, out.oom.join('\n')).to.deep.equal([]);
            expect(out.exit, `load of ${out.askedMiB} MiB`).to.equal(0);
            expect((await g.run('grep oom_kill /proc/vmstat')).lines[0]).to.equal('oom_kill 0');
            const c = await pressureCounters(g);
            expect(c['acked']).to.be.at.least(1);
            expect(c['timed_out']).to.equal(0);
            const reasons = d.logs.filter((l) => l.msg === 'policy sets balloon target').map((l) => l['reason']);
            expect(reasons).to.include('guest_pressure_message');
            expect(status(d).targetBytes).to.be.below(BALLOON_MIB * MiB);
            expect(await kernelProblems(g)).to.deep.equal([]);
          } finally {
            await teardown(r);
          }
        });

        it(`${kind}, control: the stock driver in the same run is OOM-killed`, async () => {
          const r = await bootGuestDriver({ vm: PRESSURE_VM, policy, stock: true });
          try {
            const { g, d } = r;
            await inflateThenAuto(d, BALLOON_MIB);
            const out = await runLoad(g, kind, OVERSHOOT_MIB);
            expect(out.oom.length, `exit ${out.exit}`).to.be.greaterThan(0);
            expect(status(d).pressureMessages).to.equal(0);
          } finally {
            r.g.kill(); // it may be stuck or panicked: no clean poweroff to wait for
            await teardown(r);
          }
        });
      }
    });

    it('3. harmless reclaim: 3 GiB of clean page cache streamed through the guest sends no message', async () => {
      const r = await bootGuestDriver({ vm: PRESSURE_VM });
      try {
        const { g, d } = r;
        await inflateThenAuto(d, 384);
        const vmstat = async (): Promise<Record<string, number>> => {
          const out: Record<string, number> = {};
          for (const l of (await g.run('cat /proc/vmstat')).lines) {
            const [k, v] = l.split(' ');
            if (k !== undefined && v !== undefined) out[k] = Number(v);
          }
          return out;
        };
        const before = await vmstat();
        // null_blk: a block device whose reads cost no memory; every page read lands in the page cache.
        const dd = await g.run(
          'insmod /configfs.ko; insmod /null_blk.ko && dd if=/dev/nullb0 of=/dev/null bs=1M count=3072 2>&1 | tail -1',
          300_000,
        );
        expect(dd.lines.join('\n')).to.match(/3072\+0 records out/);
        const after = await vmstat();
        // The cache really was reclaimed (kswapd and/or direct reclaim), so the shrinker was asked...
        const stolen =
          after['pgsteal_kswapd'] - before['pgsteal_kswapd'] + after['pgsteal_direct'] - before['pgsteal_direct'];
        expect(stolen * 4096, 'page cache reclaimed').to.be.greaterThan(1024 * MiB);
        const c = await pressureCounters(g);
        expect(c['filtered'], 'reclaim passes the driver saw and filtered').to.be.greaterThan(0);
        // ...and none of it counted as pressure.
        expect(c['sent']).to.equal(0);
        expect(status(d).pressureMessages).to.equal(0);
        expect(status(d).targetBytes).to.equal(384 * MiB);
        // Control: with the filter off (every reclaim pass counts) the same stream does send
        // messages, so the zero above is the filter's doing and not a lack of reclaim.
        await g.run(
          'cd /sys/module/virtio_balloon/parameters && echo 100 > kswapd_avail_pct && echo 100 > direct_avail_pct; cd /',
        );
        const dd2 = await g.run('dd if=/dev/nullb0 of=/dev/null bs=1M skip=3072 count=3072 2>&1 | tail -1', 300_000);
        expect(dd2.lines.join('\n')).to.match(/3072\+0 records out/);
        expect((await pressureCounters(g))['sent']).to.be.greaterThan(0);
        expect(await kernelProblems(g)).to.deep.equal([]);
      } finally {
        await teardown(r);
      }
    });

    it('4. daemon stopped (SIGSTOP) under pressure: the message times out, nothing stacks, the guest is fine; after SIGCONT messages are acked again', async () => {
      const r = await bootGuestDriver({ vm: PRESSURE_VM, modArgs: 'ack_timeout_ms=1000' });
      const pid = r.d.proc!.pid!;
      let stopped = false;
      try {
        const { g, d } = r;
        await inflateThenAuto(d, BALLOON_MIB);
        await g.run('mkdir -p /mnt/load; mount -t tmpfs -o size=4g tmpfs /mnt/load');
        process.kill(pid, 'SIGSTOP');
        stopped = true;
        // Real pressure: tmpfs pages until the driver sends its message to the stopped host.
        const fill = await g.run(FILL_UNTIL(1), 240_000);
        expect(fill.status, fill.lines.join('\n')).to.equal(0);
        // Step back from the edge (the stopped host cannot deflate), then more requests while the
        // message is still the host's: the test trigger takes the same path as a reclaim pass.
        await g.run('rm -f /mnt/load/f1_1 /mnt/load/f1_2 /mnt/load/f1_3 /mnt/load/f1_4');
        await g.run(`sleep 1.5; for i in 1 2 3 4 5; do ${TRIGGER}; done`);
        const during = await pressureCounters(g);
        expect(during).to.include({ sent: 1, timed_out: 1, outstanding: 1, acked: 0 });
        expect(during['coalesced']).to.be.at.least(5);
        // The guest is fine: free the load, then allocate and run programs as usual.
        await g.run('rm -f /mnt/load/f1_*');
        const eat = await g.run('/bin/eater 64 4 0 0', 120_000);
        expect(eat.lines.join('\n')).to.contain('EATER DONE 64 MiB');
        expect((await pressureCounters(g))['sent']).to.equal(1);
        process.kill(pid, 'SIGCONT');
        stopped = false;
        // The host answers the old message (late): the driver takes its buffer back.
        await untilGuest(g, (c) => c['late_acked'] === 1 && c['outstanding'] === 0, 'late acknowledgement');
        expect(status(d).pressureMessages).to.equal(1);
        // Messages are acked again. (The trigger: after the failed reclaim above, kswapd has given
        // up on the node until reclaim makes progress; see docs/guest-driver.md.)
        for (let i = 0; i < 3; i++) await g.run(`${TRIGGER}; sleep 0.3`);
        await untilGuest(g, (c) => c['acked'] === 3 && c['outstanding'] === 0, 'acknowledgements after SIGCONT');
        const c = await pressureCounters(g);
        expect(c).to.include({ sent: 4, timed_out: 1, late_acked: 1 });
        await until(() => status(d).pressureMessages === 4, 'the daemon counted 4 messages', 10_000);
        expect((await g.run('grep oom_kill /proc/vmstat')).lines[0], oomLines(g).join('\n')).to.equal('oom_kill 0');
        expect(await kernelProblems(g)).to.deep.equal([]);
      } finally {
        if (stopped) process.kill(pid, 'SIGCONT');
        await teardown(r);
      }
    });

    it('5. rmmod / insmod while the balloon is inflated, also with a message outstanding', async () => {
      const r = await bootGuestDriver({ vm: { reporting: false, deflateOnOom: false } });
      const pid = r.d.proc!.pid!;
      let stopped = false;
      try {
        const { g, d } = r;
        const full = (await g.meminfo())['MemTotal'];
        await inflateThenAuto(d, 300);
        expect(full - (await g.meminfo())['MemTotal']).to.equal(300 * MiB);
        const reinflated = async (what: string): Promise<void> => {
          await until(() => status(d).negotiatedQueues.includes('message'), `${what}: bound again`, 30_000);
          await until(
            () => status(d).actualBytes === status(d).targetBytes && status(d).targetBytes > 0,
            `${what}: the balloon is back at its target`,
            60_000,
          );
          expect(full - (await g.meminfo())['MemTotal']).to.equal(status(d).targetBytes);
        };
        // Unload with the balloon inflated: every page goes back to the guest first.
        const rm = await g.run('rmmod virtio_balloon; echo RC=$?');
        expect(rm.lines).to.include('RC=0');
        expect((await g.meminfo())['MemTotal']).to.equal(full);
        expect((await g.run('insmod /virtio_balloon.ko; echo RC=$?')).lines).to.include('RC=0');
        await reinflated('first insmod');
        // Now with a message outstanding: the host stopped, the worker waiting (long timeout).
        await g.run('echo 60000 > /sys/module/virtio_balloon/parameters/ack_timeout_ms');
        process.kill(pid, 'SIGSTOP');
        stopped = true;
        await g.run(`${TRIGGER}; sleep 0.5`);
        expect(await pressureCounters(g)).to.include({ sent: 1, outstanding: 1, acked: 0, timed_out: 0 });
        // rmmod stops the worker at once; giving the pages back then waits for the host.
        const from = g.output.length;
        g.spawnInGuest('rmmod virtio_balloon; echo RMMOD_RC=$?');
        await new Promise((res) => setTimeout(res, 2000));
        process.kill(pid, 'SIGCONT');
        stopped = false;
        const done = await g.waitLine((l) => l.startsWith('RMMOD_RC='), 60_000, from);
        expect(done).to.equal('RMMOD_RC=0');
        expect((await g.meminfo())['MemTotal']).to.equal(full);
        expect((await g.run('lsmod | grep -c virtio_balloon || true')).lines[0]).to.equal('0');
        expect((await g.run('insmod /virtio_balloon.ko; echo RC=$?')).lines).to.include('RC=0');
        await reinflated('second insmod');
        expect(await pressureCounters(g)).to.include({ sent: 0, outstanding: 0 });
        expect(await kernelProblems(g)).to.deep.equal([]);
      } finally {
        if (stopped) process.kill(pid, 'SIGCONT');
        await teardown(r);
      }
    });
  },
);
