/**
 * End to end with our guest driver (guest/linux: Linux 6.12's virtio_balloon with the pressure
 * message queue, built with DKMS by scripts/e2e-env.sh) in a real QEMU 11.1 + Linux 6.12 guest,
 * against the real daemon in auto mode. Where a scenario claims the driver saved the guest, the
 * same run with the stock driver is the control and must end in an OOM kill.
 * TCG fills memory at about 40 MB/s: waits are generous and nothing here is timed (bench/ is).
 */
import { expect } from 'chai';
import { VIRTIO_BALLOON_F_MESSAGE_VQ, VIRTIO_BALLOON_F_MESSAGE_VQ_SEED } from '../../lib/device/constants';
import { until } from '../helpers';
import {
  BALLOON_MIB,
  bootGuestDriver,
  env,
  FILL_UNTIL,
  inflateThenAuto,
  kernelProblems,
  MiB,
  OVERSHOOT_MIB,
  oomLines,
  PRESSURE,
  PRESSURE_VM,
  pressureCounters,
  runLoad,
  status,
  teardown,
  TRIGGER,
  untilGuest,
} from './guest-driver-rig';

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
      // The default policy: a pressure message gives back the whole balloon (policy.messageStep: 1;
      // a 25 % step was measured too small under TCG: the next message comes too late).
      const policy = {};
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
            const m = /^(\w+) (\d+)$/.exec(l);
            if (m !== null) out[m[1]] = Number(m[2]);
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
          '(cd /sys/module/virtio_balloon/parameters && echo 100 > kswapd_avail_pct && echo 100 > direct_avail_pct)',
        );
        const dd2 = await g.run('dd if=/dev/nullb0 of=/dev/null bs=1M skip=3072 count=3072 2>&1 | tail -1', 300_000);
        expect(dd2.lines.join('\n')).to.match(/3072\+0 records out/);
        expect((await pressureCounters(g))['sent']).to.be.greaterThan(0);
        expect(await kernelProblems(g)).to.deep.equal([]);
      } finally {
        await teardown(r);
      }
    });

    it('4. daemon stopped under pressure: timeout, nothing stacks, guest fine; acked again after SIGCONT', async () => {
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
          // In auto mode the policy keeps re-inflating in steps, so the guest's MemTotal is compared
          // with the device's `actual` read just before and just after it (equal: nothing moved).
          const deadline = Date.now() + 60_000;
          let seen = { before: -1, memTotalDrop: -2, after: -3 };
          while (Date.now() < deadline) {
            const before = status(d).actualBytes;
            const memTotalDrop = full - (await g.meminfo())['MemTotal'];
            seen = { before, memTotalDrop, after: status(d).actualBytes };
            if (seen.before === seen.after && seen.before === seen.memTotalDrop) break;
            await new Promise((res) => setTimeout(res, 500));
          }
          expect(seen.memTotalDrop, JSON.stringify(seen)).to.equal(seen.before);
          expect(seen.after).to.equal(seen.before);
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
