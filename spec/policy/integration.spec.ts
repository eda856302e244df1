/**
 * The policy with real devices over the real socket and the Linux driver model: a guest that keeps
 * allocating while the host inflates is rescued, with the message queue and, for a stock guest,
 * through inferred signals.
 */
import { expect } from 'chai';
import { BalloonDevice } from '../../lib/device/balloon';
import { MemoryLogger } from '../../lib/log';
import { PolicyAction, PolicyConfig } from '../../lib/policy/engine';
import { HostMemoryReaders } from '../../lib/policy/host';
import { PolicyLoop } from '../../lib/policy/loop';
import { BalloonGuest, BalloonGuestOptions } from '../../lib/testing/balloon-guest';
import { startBackend, until } from '../helpers';

const MiB = 1024 * 1024;
const PAGES_PER_MIB = 256;

/** Thresholds scaled to a 64 MiB test guest. */
const SMALL_GUEST: Partial<PolicyConfig> = {
  guestFloorBytes: 4 * MiB,
  guestFloorFraction: 0.05,
  pressureStepMinBytes: 8 * MiB,
  reinflateStepBytes: 4 * MiB,
  hostStepBytes: 8 * MiB,
  minChangeBytes: 1 * MiB,
  stallMinProgressBytes: 1 * MiB,
  stallWindowMs: 2000,
  cooldownBaseMs: 3000,
};

/** A host that is short of memory (8 % available). */
const hostUnderPressure: HostMemoryReaders = {
  meminfo: () => 'MemTotal:       16777216 kB\nMemFree:         1000000 kB\nMemAvailable:    1342177 kB\n',
  psi: () => 'some avg10=2.00 avg60=1.00 avg300=0.50 total=1000\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=0\n',
};

async function scenario(guestOptions: Partial<BalloonGuestOptions>) {
  const log = new MemoryLogger();
  const device = new BalloonDevice({ statsIntervalMs: 100, log });
  const fx = startBackend(device);
  const actions: PolicyAction[] = [];
  const loop = new PolicyLoop({
    tickMs: 50,
    config: SMALL_GUEST,
    host: hostUnderPressure,
    log,
    onAction: (a) => actions.push(a),
  });
  loop.addVm('vm0', device, 'auto', 48 * PAGES_PER_MIB);
  loop.start();
  const guest = await BalloonGuest.boot(fx.socketPath, {
    mode: 'stock',
    numQueues: device.numQueues,
    ramBytes: 64 * MiB,
    pressureWaitMs: 3000,
    ...guestOptions,
  });
  return {
    device,
    guest,
    actions,
    loop,
    log,
    async close() {
      loop.stop();
      await guest.close();
      await until(() => !fx.backend.connected, 'disconnect');
      fx.close();
    },
  };
}

describe('policy with the guest driver model (real socket)', function () {
  this.timeout(30_000);

  const loads: Array<{ name: string; guest: Partial<BalloonGuestOptions>; rescuedBy: string[] }> = [
    { name: 'a guest with the message queue', guest: { mode: 'seed' }, rescuedBy: ['guest_pressure_message'] },
    {
      name: 'a stock guest with DEFLATE_ON_OOM',
      guest: { mode: 'stock' },
      rescuedBy: ['guest_deflate_on_oom', 'guest_alloc_stall', 'guest_low_available'],
    },
    {
      name: 'a stock guest without DEFLATE_ON_OOM',
      guest: { mode: 'stock', refuse: [2] },
      rescuedBy: ['guest_alloc_stall', 'guest_low_available'],
    },
  ];
  for (const load of loads) {
    it(`${load.name} that keeps allocating while the host inflates is rescued`, async () => {
      const s = await scenario(load.guest);
      try {
        // The host is short of memory: the policy inflates the guest in steps, above its floor.
        await until(() => s.guest.actualPages >= 24 * PAGES_PER_MIB, 'host-driven inflate', 15_000);
        expect(s.actions.some((a) => a.reason === 'host_pressure')).to.equal(true);
        // Now the guest needs more than it has free: the balloon must give memory back.
        const need = s.guest.freePages * 4096 + 16 * MiB;
        const result = await s.guest.eat(need);
        expect(result.oomKilled, `eater stopped; actions: ${s.actions.map((a) => a.reason).join(',')}`).to.equal(false);
        expect(s.guest.oomKills).to.equal(0);
        const rescues = s.actions.filter((a) => load.rescuedBy.includes(a.reason));
        expect(rescues.length, s.actions.map((a) => a.reason).join(',')).to.be.greaterThan(0);
        const first = rescues.find((a) => a.kind === 'set-target');
        expect(first).to.not.equal(undefined);
        if (first?.kind === 'set-target') {
          // Cancelled and deflated: below what the guest had when the rescue started.
          expect(first.pages).to.be.lessThan(first.previous);
        }
        // The rescued guest is in its cooldown: the host, still short of memory, does not take it back.
        const vmState = s.loop.engineState.vms['vm0'];
        expect(vmState.cooldownUntilMs).to.be.greaterThan(0);
        expect(vmState.streak).to.be.greaterThan(0);
        expect(s.log.find('policy sets balloon target').length).to.be.greaterThan(0);
      } finally {
        await s.close();
      }
    });
  }
});
