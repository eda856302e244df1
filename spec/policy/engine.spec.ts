import { expect } from 'chai';
import fc from 'fast-check';
import {
  DEFAULT_POLICY,
  GuestSample,
  initialState,
  PolicyAction,
  PolicyEvent,
  PolicyState,
  SetTargetAction,
  step,
} from '../../lib/policy/engine';

const MiB = 1024 * 1024;
const GiB = 1024 * MiB;
const P = (bytes: number): number => Math.floor(bytes / 4096);

/** Drives the engine through timed events, like the loop does, collecting actions. */
class Sim {
  state: PolicyState;
  now = 0;
  readonly actions: PolicyAction[] = [];
  constructor(config = {}) {
    this.state = initialState(config);
  }
  at(ms: number, event: PolicyEvent): PolicyAction[] {
    this.now = ms;
    const r = step(this.state, event, ms);
    this.state = r.state;
    this.actions.push(...r.actions);
    return r.actions;
  }
  vm(name = 'vm0') {
    return this.state.vms[name];
  }
  add(
    name: string,
    opts: {
      ramBytes?: number;
      mode?: 'auto' | 'manual';
      operatorBytes?: number;
      targetBytes?: number;
      actualBytes?: number;
    } = {},
  ): void {
    this.at(this.now, {
      kind: 'vm-added',
      vm: name,
      guestRamPages: P(opts.ramBytes ?? 4 * GiB),
      mode: opts.mode ?? 'auto',
      operatorPages: P(opts.operatorBytes ?? 0),
      targetPages: P(opts.targetBytes ?? 0),
      actualPages: P(opts.actualBytes ?? opts.targetBytes ?? 0),
    });
  }
  stats(ms: number, vm: string, sample: GuestSample): PolicyAction[] {
    return this.at(ms, { kind: 'stats', vm, sample });
  }
}

const targets = (actions: PolicyAction[]): SetTargetAction[] =>
  actions.filter((a): a is SetTargetAction => a.kind === 'set-target');

describe('policy engine: scenarios over simulated time', () => {
  it('manual mode obeys the operator exactly and only reports what auto mode would do', () => {
    const sim = new Sim();
    sim.add('vm0', { mode: 'manual', operatorBytes: 1 * GiB, targetBytes: 0 });
    expect(targets(sim.actions).map((a) => [a.pages, a.reason])).to.deep.equal([[P(1 * GiB), 'operator']]);
    sim.at(1000, { kind: 'operator-target', vm: 'vm0', pages: P(2 * GiB) });
    expect(sim.vm().targetPages).to.equal(P(2 * GiB));
    const r = sim.at(2000, { kind: 'pressure', vm: 'vm0' });
    expect(r).to.deep.equal([{ kind: 'report', vm: 'vm0', reason: 'guest_pressure_message', inputs: r[0].inputs }]);
    expect(sim.vm().targetPages).to.equal(P(2 * GiB));
  });

  it('auto mode: the operator value is a ceiling; lowering it applies at once, raising it is approached slowly', () => {
    const sim = new Sim();
    sim.add('vm0', { operatorBytes: 1 * GiB, targetBytes: 1 * GiB });
    sim.at(1000, { kind: 'operator-target', vm: 'vm0', pages: P(512 * MiB) });
    expect(sim.vm().targetPages).to.equal(P(512 * MiB));
    sim.at(2000, { kind: 'operator-target', vm: 'vm0', pages: P(2 * GiB) });
    expect(sim.vm().targetPages).to.equal(P(512 * MiB)); // not at once
    sim.at(2000, { kind: 'progress', vm: 'vm0', actualPages: P(512 * MiB) });
    sim.stats(2500, 'vm0', { availableBytes: 2 * GiB, totalBytes: 4 * GiB });
    const r = sim.at(3000, { kind: 'tick' });
    expect(targets(r)).to.have.length(1);
    expect(targets(r)[0].reason).to.equal('reinflate');
    expect(targets(r)[0].pages - P(512 * MiB)).to.equal(P(DEFAULT_POLICY.reinflateStepBytes));
  });

  it('re-inflation stops at the guest free floor and without fresh stats', () => {
    const sim = new Sim();
    sim.add('vm0', { operatorBytes: 3 * GiB });
    // 4 GiB guest: floor = max(256 MiB, 10%) = 409.6 MiB; available 500 MiB leaves ~90 MiB.
    sim.stats(0, 'vm0', { availableBytes: 500 * MiB });
    for (let t = 1000; t <= 10_000; t += 1000) {
      sim.at(t, { kind: 'tick' });
      sim.at(t, { kind: 'progress', vm: 'vm0', actualPages: sim.vm().targetPages }); // the guest keeps up
    }
    const grown = sim.vm().targetPages * 4096;
    expect(grown).to.be.at.most(500 * MiB - 0.1 * 4 * GiB);
    expect(grown).to.be.greaterThan(0);
    // Stats older than statsMaxAgeMs: no more inflation.
    const before = sim.vm().targetPages;
    sim.at(100_000, { kind: 'progress', vm: 'vm0', actualPages: before });
    sim.at(100_001, { kind: 'tick' });
    expect(sim.vm().targetPages).to.equal(before);
  });

  it('a pressure message cancels the inflate in progress and gives back the whole balloon by default', () => {
    const sim = new Sim();
    sim.add('vm0', { operatorBytes: 2 * GiB, targetBytes: 2 * GiB, actualBytes: 1 * GiB });
    const [a] = targets(sim.at(1000, { kind: 'pressure', vm: 'vm0' }));
    expect(a.pages).to.equal(0);
    expect(a.reason).to.equal('guest_pressure_message');
    expect(a.inputs).to.include({ streak: 1, cooldownMs: DEFAULT_POLICY.cooldownBaseMs });
  });

  it('with a smaller message step, a pressure message cancels the inflate and deflates by that step', () => {
    const sim = new Sim({ messageStepFraction: 0.25 });
    sim.add('vm0', { operatorBytes: 2 * GiB, targetBytes: 2 * GiB, actualBytes: 1 * GiB });
    const [a] = targets(sim.at(1000, { kind: 'pressure', vm: 'vm0' }));
    // target := actual (1 GiB), minus max(64 MiB, 25% of 1 GiB) = 256 MiB.
    expect(a.pages).to.equal(P(1 * GiB) - P(256 * MiB));
    expect(a.reason).to.equal('guest_pressure_message');
    expect(a.inputs).to.include({ streak: 1, cooldownMs: DEFAULT_POLICY.cooldownBaseMs });
    // A small balloon deflates by the floor step, never below zero.
    const small = new Sim({ messageStepFraction: 0.25 });
    small.add('vm0', { operatorBytes: 100 * MiB, targetBytes: 100 * MiB });
    expect(targets(small.at(10, { kind: 'pressure', vm: 'vm0' }))[0].pages).to.equal(P(100 * MiB) - P(64 * MiB));
    expect(targets(small.at(20, { kind: 'pressure', vm: 'vm0' }))[0].pages).to.equal(0);
  });

  it('repeated pressure grows the step and the cooldown (bounded); calm time decays them', () => {
    const sim = new Sim({ messageStepFraction: 0.25 });
    sim.add('vm0', { operatorBytes: 4 * GiB, targetBytes: 4 * GiB });
    const steps: number[] = [];
    const cooldowns: number[] = [];
    for (let i = 0; i < 6; i++) {
      const base = sim.vm().targetPages;
      const a = targets(sim.at(1000 + i * 100, { kind: 'pressure', vm: 'vm0' })).at(0);
      if (a === undefined) break;
      // Step = max(64 MiB, 25 % of the balloon), doubled per repeat, at most 3 doublings.
      expect(a.inputs['stepPages']).to.equal(Math.max(P(64 * MiB), Math.ceil(base * 0.25)) * 2 ** Math.min(i, 3));
      steps.push(a.inputs['stepPages'] as number);
      cooldowns.push(a.inputs['cooldownMs'] as number);
      sim.at(1000 + i * 100, { kind: 'progress', vm: 'vm0', actualPages: a.pages });
    }
    expect(steps.length).to.be.greaterThan(2);
    expect(cooldowns[0]).to.equal(15_000);
    expect(cooldowns[1]).to.equal(30_000);
    expect(Math.max(...cooldowns)).to.be.at.most(DEFAULT_POLICY.cooldownMaxMs);
    // After a long calm period the streak is forgiven.
    const vm = sim.vm();
    const streak = vm.streak;
    sim.at(1000 + 10 * DEFAULT_POLICY.streakDecayMs, { kind: 'pressure', vm: 'vm0' });
    expect(sim.vm().streak).to.be.lessThan(streak);
    expect(sim.vm().streak).to.equal(1);
  });

  it('never inflates during a cooldown, even under host pressure', () => {
    const sim = new Sim();
    sim.add('vm0', { operatorBytes: 3 * GiB, targetBytes: 1 * GiB });
    sim.stats(0, 'vm0', { availableBytes: 3 * GiB });
    sim.at(100, { kind: 'pressure', vm: 'vm0' });
    sim.at(200, { kind: 'host', memTotalBytes: 64 * GiB, memAvailableBytes: 1 * GiB });
    expect(sim.state.host.underPressure).to.equal(true);
    const t = sim.vm().targetPages;
    for (let ms = 1000; ms < 15_000; ms += 1000) {
      sim.stats(ms - 1, 'vm0', { availableBytes: 3 * GiB });
      sim.at(ms, { kind: 'tick' });
    }
    expect(sim.vm().targetPages).to.equal(t);
    sim.stats(15_099, 'vm0', { availableBytes: 3 * GiB });
    sim.at(15_100, { kind: 'tick' });
    expect(sim.vm().targetPages).to.be.greaterThan(t);
  });

  describe('inferred pressure for guests without the message queue', () => {
    const cases: Array<{ name: string; reason: string; before: GuestSample; after: GuestSample; gapMs?: number }> = [
      {
        name: 'an OOM kill',
        reason: 'guest_oom_kill',
        before: { oomKills: 0, availableBytes: 2 * GiB },
        after: { oomKills: 1, availableBytes: 2 * GiB },
      },
      {
        name: 'allocation stalls',
        reason: 'guest_alloc_stall',
        before: { allocStalls: 10, availableBytes: 2 * GiB },
        after: { allocStalls: 11, availableBytes: 2 * GiB },
      },
      {
        name: 'swap-in at 1 MiB/s or more',
        reason: 'guest_swap_in',
        before: { swapInBytes: 0, availableBytes: 2 * GiB },
        after: { swapInBytes: 5 * MiB, availableBytes: 2 * GiB },
        gapMs: 5000,
      },
      {
        name: 'major faults with little available memory',
        reason: 'guest_major_faults',
        before: { majorFaults: 0, availableBytes: 500 * MiB },
        after: { majorFaults: 2000, availableBytes: 500 * MiB },
        gapMs: 5000,
      },
      {
        name: 'available memory under the floor',
        reason: 'guest_low_available',
        before: { availableBytes: 2 * GiB },
        after: { availableBytes: 100 * MiB },
      },
    ];
    for (const c of cases) {
      it(c.name, () => {
        const sim = new Sim();
        sim.add('vm0', { operatorBytes: 2 * GiB, targetBytes: 2 * GiB });
        sim.stats(1000, 'vm0', c.before);
        expect(targets(sim.actions).filter((a) => a.reason !== 'operator')).to.have.length(0);
        const a = targets(sim.stats(1000 + (c.gapMs ?? 5000), 'vm0', c.after)).at(0);
        expect(a?.reason).to.equal(c.reason);
        expect(a?.pages).to.be.lessThan(P(2 * GiB));
      });
    }

    it('ignores slow swap-in and major faults with plenty of memory', () => {
      const sim = new Sim();
      sim.add('vm0', { operatorBytes: 1 * GiB, targetBytes: 1 * GiB });
      sim.stats(0, 'vm0', { swapInBytes: 0, majorFaults: 0, availableBytes: 2 * GiB });
      expect(
        targets(sim.stats(10_000, 'vm0', { swapInBytes: 1 * MiB, majorFaults: 50_000, availableBytes: 2 * GiB })),
      ).to.have.length(0);
    });

    it('a deflate the host did not ask for (DEFLATE_ON_OOM)', () => {
      const sim = new Sim();
      sim.add('vm0', { operatorBytes: 2 * GiB, targetBytes: 2 * GiB });
      const a = targets(sim.at(100, { kind: 'deflate', vm: 'vm0', pages: 256, unrequested: true })).at(0);
      expect(a?.reason).to.equal('guest_deflate_on_oom');
      expect(targets(sim.at(200, { kind: 'deflate', vm: 'vm0', pages: 256, unrequested: false }))).to.have.length(0);
    });

    it('an inflate that stalls', () => {
      const sim = new Sim();
      sim.add('vm0', { operatorBytes: 2 * GiB, targetBytes: 0 });
      sim.at(0, { kind: 'operator-target', vm: 'vm0', pages: P(2 * GiB) });
      sim.stats(0, 'vm0', { availableBytes: 3.5 * GiB });
      sim.at(1000, { kind: 'tick' });
      const target = sim.vm().targetPages;
      expect(target).to.be.greaterThan(0);
      sim.at(1500, { kind: 'progress', vm: 'vm0', actualPages: 10 }); // barely moving
      for (let t = 2000; t <= 7000; t += 1000) sim.at(t, { kind: 'tick' });
      const stalled = targets(sim.actions).find((a) => a.reason === 'inflate_stalled');
      expect(stalled, JSON.stringify(sim.actions.map((a) => a.reason))).to.not.equal(undefined);
      expect(stalled!.pages).to.equal(0); // cancelled to actual (10 pages) then a step below
    });
  });

  describe('host pressure', () => {
    function hostSim() {
      const sim = new Sim();
      sim.add('a', { operatorBytes: 3 * GiB });
      sim.add('b', { operatorBytes: 3 * GiB });
      sim.add('c', { operatorBytes: 3 * GiB });
      sim.stats(0, 'a', { availableBytes: 1 * GiB });
      sim.stats(0, 'b', { availableBytes: 3 * GiB });
      sim.stats(0, 'c', { availableBytes: 2 * GiB });
      return sim;
    }

    it('takes from the guests with the most reclaimable memory first, in bounded steps, above their floor', () => {
      const sim = hostSim();
      sim.at(10, { kind: 'pressure', vm: 'c' }); // c is cooling down
      sim.at(100, { kind: 'host', memTotalBytes: 16 * GiB, memAvailableBytes: 1 * GiB });
      const r = targets(sim.at(1000, { kind: 'tick' }));
      expect(r.map((a) => a.vm)).to.deep.equal(['b', 'a']);
      for (const a of r) {
        expect(a.reason).to.equal('host_pressure');
        expect(a.pages * 4096).to.be.at.most(DEFAULT_POLICY.hostStepBytes);
      }
    });

    it('stops when the host recovers (with hysteresis) and skips tiny changes', () => {
      const sim = hostSim();
      sim.at(100, { kind: 'host', memTotalBytes: 16 * GiB, memAvailableBytes: 1 * GiB });
      expect(sim.state.host.underPressure).to.equal(true);
      sim.at(200, { kind: 'host', memTotalBytes: 16 * GiB, memAvailableBytes: 2 * GiB }); // 12.5%: not recovered
      expect(sim.state.host.underPressure).to.equal(true);
      sim.at(300, { kind: 'host', memTotalBytes: 16 * GiB, memAvailableBytes: 2.5 * GiB }); // 15.6%
      expect(sim.state.host.underPressure).to.equal(false);
      // Deficit smaller than the minimum change: nothing happens.
      const tiny = hostSim();
      tiny.at(100, { kind: 'host', memTotalBytes: 16 * GiB, memAvailableBytes: 0.15 * 16 * GiB - 1 * MiB });
      tiny.state.host.underPressure = true;
      expect(targets(tiny.at(1000, { kind: 'tick' }))).to.have.length(0);
    });

    it('splits the host deficit by reclaimable / shares: more shares, less taken; shares 0 exempt', () => {
      const sim = new Sim({ hostStepBytes: 8 * GiB });
      for (const name of ['a', 'b', 'c']) sim.add(name, { operatorBytes: 3 * GiB });
      sim.at(0, { kind: 'limits', vm: 'a', floorPages: 0, shares: 1000 });
      sim.at(0, { kind: 'limits', vm: 'b', floorPages: 0, shares: 3000 });
      sim.at(0, { kind: 'limits', vm: 'c', floorPages: 0, shares: 0 });
      for (const name of ['a', 'b', 'c']) sim.stats(0, name, { availableBytes: 3 * GiB });
      // Deficit: 15% of 16 GiB - 0.4 GiB = 2 GiB.
      sim.at(100, { kind: 'host', memTotalBytes: 16 * GiB, memAvailableBytes: 0.4 * GiB });
      const r = targets(sim.at(1000, { kind: 'tick' }));
      expect(r.map((x) => x.vm)).to.deep.equal(['a', 'b']);
      const [a, b] = r.map((x) => x.pages - x.previous) as [number, number];
      // Same reclaimable memory, shares 1000 vs 3000: a gives three times what b gives.
      expect(a / b).to.be.closeTo(3, 0.01);
      expect((a + b) * 4096).to.be.closeTo(2 * GiB, 8 * MiB);
    });

    it('PSI counts as host pressure', () => {
      const sim = hostSim();
      sim.at(100, { kind: 'host', memTotalBytes: 16 * GiB, memAvailableBytes: 2 * GiB, psiSomeAvg10: 35 });
      expect(sim.state.host.underPressure).to.equal(true);
      sim.at(200, { kind: 'host', memTotalBytes: 16 * GiB, memAvailableBytes: 4 * GiB, psiSomeAvg10: 8 });
      expect(sim.state.host.underPressure).to.equal(true);
      sim.at(300, { kind: 'host', memTotalBytes: 16 * GiB, memAvailableBytes: 4 * GiB, psiSomeAvg10: 1 });
      expect(sim.state.host.underPressure).to.equal(false);
    });
  });

  it('a per-VM floor bounds every target: operator, host pressure, and a floor raised later', () => {
    const sim = new Sim();
    sim.add('vm0', { ramBytes: 4 * GiB, operatorBytes: 3 * GiB, targetBytes: 3 * GiB });
    sim.at(0, { kind: 'limits', vm: 'vm0', floorPages: P(2 * GiB), shares: 1000 });
    // The balloon may hold at most RAM - floor = 2 GiB: lowered at once.
    expect(sim.vm().targetPages).to.equal(P(2 * GiB));
    expect(targets(sim.actions).at(-1)!.reason).to.equal('floor');
    sim.stats(10, 'vm0', { availableBytes: 3.5 * GiB });
    sim.at(100, { kind: 'host', memTotalBytes: 16 * GiB, memAvailableBytes: 0.5 * GiB });
    for (let ms = 1000; ms < 10_000; ms += 1000) {
      sim.stats(ms - 1, 'vm0', { availableBytes: 3.5 * GiB });
      sim.at(ms, { kind: 'tick' });
    }
    expect(sim.vm().targetPages).to.equal(P(2 * GiB));
    const manual = new Sim();
    manual.add('m', { ramBytes: 1 * GiB, mode: 'manual', operatorBytes: 0 });
    manual.at(0, { kind: 'limits', vm: 'm', floorPages: P(768 * MiB), shares: 1000 });
    manual.at(1, { kind: 'operator-target', vm: 'm', pages: P(512 * MiB) });
    expect(manual.state.vms['m'].targetPages).to.equal(P(256 * MiB));
  });

  it('manual mode stays quiet: pressure is a suggestion only, and no cooldown or streak escalates', () => {
    const sim = new Sim();
    sim.add('vm0', { mode: 'manual', operatorBytes: 2 * GiB, targetBytes: 2 * GiB });
    for (let i = 0; i < 5; i++) {
      const r = sim.at(100 * i, { kind: 'pressure', vm: 'vm0' });
      expect(r.map((a) => a.kind)).to.deep.equal(['report']);
    }
    expect(sim.vm()).to.include({ streak: 0, cooldownUntilMs: 0, targetPages: P(2 * GiB) });
    // Switched to auto afterwards, the first pressure is treated as the first (base cooldown).
    sim.at(1000, { kind: 'mode', vm: 'vm0', mode: 'auto' });
    sim.at(1100, { kind: 'pressure', vm: 'vm0' });
    expect(sim.vm().streak).to.equal(1);
    expect(sim.vm().cooldownUntilMs).to.equal(1100 + DEFAULT_POLICY.cooldownBaseMs);
  });

  it('is pure: the input state is never modified', () => {
    const sim = new Sim();
    sim.add('vm0', { operatorBytes: 2 * GiB, targetBytes: 2 * GiB });
    const frozen = JSON.stringify(sim.state);
    step(sim.state, { kind: 'pressure', vm: 'vm0' }, 5);
    expect(JSON.stringify(sim.state)).to.equal(frozen);
  });
});

describe('policy engine: invariants (property tests)', () => {
  const event = (vms: string[]): fc.Arbitrary<{ dt: number; e: PolicyEvent }> =>
    fc.record({
      dt: fc.integer({ min: 0, max: 5000 }),
      e: fc.oneof(
        fc.record({ kind: fc.constant('tick' as const) }),
        fc.record({ kind: fc.constant('pressure' as const), vm: fc.constantFrom(...vms) }),
        fc.record({
          kind: fc.constant('operator-target' as const),
          vm: fc.constantFrom(...vms),
          pages: fc.integer({ min: 0, max: P(4 * GiB) }),
        }),
        fc.record({
          kind: fc.constant('mode' as const),
          vm: fc.constantFrom(...vms),
          mode: fc.constantFrom('auto' as const, 'manual' as const),
        }),
        fc.record({
          kind: fc.constant('stats' as const),
          vm: fc.constantFrom(...vms),
          sample: fc.record({
            availableBytes: fc.integer({ min: 0, max: 4 * GiB }),
            oomKills: fc.nat({ max: 3 }),
            allocStalls: fc.nat({ max: 50 }),
            swapInBytes: fc.nat({ max: 100 * MiB }),
            majorFaults: fc.nat({ max: 10000 }),
          }),
        }),
        fc.record({
          kind: fc.constant('progress' as const),
          vm: fc.constantFrom(...vms),
          actualPages: fc.integer({ min: 0, max: P(4 * GiB) }),
        }),
        fc.record({
          kind: fc.constant('deflate' as const),
          vm: fc.constantFrom(...vms),
          pages: fc.nat({ max: 256 }),
          unrequested: fc.boolean(),
        }),
        fc.record({
          kind: fc.constant('limits' as const),
          vm: fc.constantFrom(...vms),
          floorPages: fc.integer({ min: 0, max: P(4 * GiB) }),
          shares: fc.integer({ min: 0, max: 5000 }),
        }),
        fc.record({
          kind: fc.constant('host' as const),
          memTotalBytes: fc.constant(16 * GiB),
          memAvailableBytes: fc.integer({ min: 0, max: 16 * GiB }),
          psiSomeAvg10: fc.integer({ min: 0, max: 100 }),
        }),
      ),
    });

  it('never above the ceiling, never below zero, never an inflate in cooldown, never below the guest floor', () => {
    const vms = ['a', 'b'];
    fc.assert(
      fc.property(fc.array(event(vms), { maxLength: 120 }), (events) => {
        const sim = new Sim();
        sim.add('a', { mode: 'auto', operatorBytes: 2 * GiB });
        sim.add('b', { mode: 'auto', operatorBytes: 1 * GiB });
        let now = 0;
        for (const { dt, e } of events) {
          now += dt;
          const before = sim.state;
          const r = step(before, e, now);
          for (const a of targets(r.actions)) {
            const vmBefore = before.vms[a.vm];
            const vmAfter = r.state.vms[a.vm];
            expect(a.pages).to.be.at.least(0);
            expect(Number.isInteger(a.pages)).to.equal(true);
            expect(a.pages).to.be.at.most(vmAfter.operatorPages);
            if (a.reason === 'host_pressure') expect(vmBefore.shares, 'host took from shares 0').to.be.greaterThan(0);
            // The per-VM floor: the guest keeps at least floorPages of its RAM, in both modes.
            expect(a.pages, 'balloon past the VM floor').to.be.at.most(
              Math.max(0, vmAfter.guestRamPages - vmAfter.floorPages),
            );
            if (vmAfter.mode === 'auto' && a.pages > a.previous) {
              expect(now, 'inflate during cooldown').to.be.at.least(vmBefore.cooldownUntilMs);
              // The increase fits in what the guest had above its floor (fresh stats required).
              const s = vmBefore.sample!;
              expect(s, 'inflate without stats').to.not.equal(undefined);
              const floor = Math.max(
                DEFAULT_POLICY.guestFloorBytes,
                DEFAULT_POLICY.guestFloorFraction * vmBefore.guestRamPages * 4096,
              );
              const room = s.availableBytes! - Math.max(0, a.previous - s.actualPages) * 4096 - floor;
              expect((a.pages - a.previous) * 4096, 'inflate below the floor').to.be.at.most(room + 4096);
            }
          }
          sim.state = r.state;
        }
      }),
      { numRuns: 400 },
    );
  });

  it('no oscillation: for constant input the target changes direction a bounded number of times', () => {
    fc.assert(
      fc.property(
        fc.integer({ min: 0, max: 3 * 1024 }), // guest used MiB (constant)
        fc.integer({ min: 0, max: 3 * 1024 }), // operator ceiling MiB
        fc.integer({ min: 1, max: 16 }), // host available GiB of 16 (constant)
        (usedMiB, ceilingMiB, hostGiB) => {
          const sim = new Sim();
          const ram = 4 * GiB;
          sim.add('vm0', { mode: 'auto', ramBytes: ram, operatorBytes: ceilingMiB * MiB });
          let directionChanges = 0;
          let lastDirection = 0;
          let actual = 0;
          for (let t = 0; t < 3_600_000; t += 1000) {
            // The guest follows the target within a second; its stats reflect the balloon.
            actual = sim.vm().targetPages;
            sim.at(t, { kind: 'progress', vm: 'vm0', actualPages: actual });
            const available = Math.max(0, ram - usedMiB * MiB - actual * 4096);
            if (t % 5000 === 0)
              sim.stats(t, 'vm0', {
                availableBytes: available,
                oomKills: 0,
                allocStalls: 0,
                swapInBytes: 0,
                majorFaults: 0,
              });
            sim.at(t, { kind: 'host', memTotalBytes: 16 * GiB, memAvailableBytes: hostGiB * GiB });
            for (const a of targets(sim.at(t + 1, { kind: 'tick' })).concat()) {
              const dir = Math.sign(a.pages - a.previous);
              if (dir !== 0 && lastDirection !== 0 && dir !== lastDirection) directionChanges++;
              if (dir !== 0) lastDirection = dir;
            }
          }
          expect(directionChanges).to.be.at.most(2);
        },
      ),
      { numRuns: 60 },
    );
  });
});
