/**
 * The auto-ballooning engine: a pure, deterministic function
 * `step(state, event, nowMs) -> { state, actions }` over every VM one process serves.
 * No I/O, no clock, no randomness: the same inputs always give the same decisions, and every
 * action carries its reason and the inputs that triggered it. docs/policy.md explains each rule.
 *
 * Units: pages are 4 KiB balloon pages, memory in bytes, time in milliseconds.
 */

const PAGE = 4096;
const MiB = 1024 * 1024;

export type Mode = 'auto' | 'manual';

/** Why the engine acts; also the label of the actions counter. */
export type Reason =
  | 'operator'
  | 'mode_change'
  | 'guest_pressure_message'
  | 'guest_oom_kill'
  | 'guest_alloc_stall'
  | 'guest_swap_in'
  | 'guest_major_faults'
  | 'guest_low_available'
  | 'guest_deflate_on_oom'
  | 'inflate_stalled'
  | 'host_pressure'
  | 'reinflate'
  | 'floor';

export interface PolicyConfig {
  /** Deflate on inferred pressure (stats, DEFLATE_ON_OOM, stalls): this fraction of the balloon... */
  pressureStepFraction: number;
  /**
   * Deflate on a pressure message from the guest: this fraction of the balloon. The message says
   * "now", not "how much", and a second one comes only after the guest's next reclaim pass: a
   * step smaller than the overshoot lets the guest OOM (measured with the real guest driver:
   * docs/guest-driver.md). Default: the whole balloon.
   */
  messageStepFraction: number;
  /** ...but at least this much. */
  pressureStepMinBytes: number;
  /** Each repeated pressure doubles the step, up to this many doublings. */
  pressureStepMaxDoublings: number;
  /** Cooldown after pressure (no inflate at all), doubling with repeated pressure... */
  cooldownBaseMs: number;
  /** ...up to this. */
  cooldownMaxMs: number;
  /** One level of the pressure streak is forgiven per this much calm time. */
  streakDecayMs: number;
  /** Inferred pressure: swap-in rate (bytes/s) at or above this. */
  swapInBytesPerSec: number;
  /** Inferred pressure: major faults/s at or above this, while available memory is below twice the inflate floor. */
  majorFaultsPerSec: number;
  /** Inferred pressure: allocation stalls per sample at or above this. */
  allocStallsPerSample: number;
  /** Guest free floor for inflating: available must stay above max(bytes, fraction of total). */
  guestFloorBytes: number;
  guestFloorFraction: number;
  /** Inferred pressure when available falls below this fraction of the inflate floor (hysteresis). */
  lowAvailableFloorFactor: number;
  /** Inflate stall: the balloon is behind its target and moved less than this... */
  stallMinProgressBytes: number;
  /** ...over this window. */
  stallWindowMs: number;
  /** Stats older than this are not trusted for inflating. */
  statsMaxAgeMs: number;
  /** Re-inflation toward the operator's value when the host is calm: at most this per tick. */
  reinflateStepBytes: number;
  /** Host-driven inflation: at most this per VM per tick. */
  hostStepBytes: number;
  /** Host pressure starts when MemAvailable/MemTotal falls below this... */
  hostLowFraction: number;
  /** ...or PSI memory "some" avg10 reaches this (percent)... */
  hostPsiSomeHigh: number;
  /** ...and ends when MemAvailable/MemTotal is back above this and PSI some avg10 below hostPsiSomeLow. */
  hostRecoverFraction: number;
  hostPsiSomeLow: number;
  /** Changes smaller than this are skipped (except cancelling an inflate). */
  minChangeBytes: number;
}

export const DEFAULT_POLICY: PolicyConfig = {
  pressureStepFraction: 0.25,
  messageStepFraction: 1,
  pressureStepMinBytes: 64 * MiB,
  pressureStepMaxDoublings: 3,
  cooldownBaseMs: 15_000,
  cooldownMaxMs: 300_000,
  streakDecayMs: 60_000,
  swapInBytesPerSec: 1 * MiB,
  majorFaultsPerSec: 200,
  allocStallsPerSample: 1,
  guestFloorBytes: 256 * MiB,
  guestFloorFraction: 0.1,
  lowAvailableFloorFactor: 0.5,
  stallMinProgressBytes: 16 * MiB,
  stallWindowMs: 5_000,
  statsMaxAgeMs: 30_000,
  reinflateStepBytes: 32 * MiB,
  hostStepBytes: 128 * MiB,
  hostLowFraction: 0.1,
  hostPsiSomeHigh: 20,
  hostRecoverFraction: 0.15,
  hostPsiSomeLow: 5,
  minChangeBytes: 4 * MiB,
};

/** Guest stats the engine uses, in bytes and counts (from the balloon's stats queue). */
export interface GuestSample {
  availableBytes?: number;
  totalBytes?: number;
  swapInBytes?: number;
  majorFaults?: number;
  oomKills?: number;
  allocStalls?: number;
}

export interface VmState {
  name: string;
  mode: Mode;
  guestRamPages: number;
  /** The operator's value: exact target in manual mode, ceiling in auto mode. */
  operatorPages: number;
  /** The target the engine last set (what the device has). */
  targetPages: number;
  actualPages: number;
  /** Progress tracking for stall detection: actual at the start of the window. */
  progressMark: { atMs: number; actualPages: number };
  cooldownUntilMs: number;
  /** The guest keeps at least this many pages: the balloon never exceeds guest RAM minus this. */
  floorPages: number;
  /** Weight in host-pressure arbitration: more shares, less taken; 0 exempts the VM. */
  shares: number;
  streak: number;
  lastPressureMs: number | undefined;
  /** The latest stats, stamped with the time and the balloon size when they arrived. */
  sample: (GuestSample & { atMs: number; actualPages: number }) | undefined;
  previousSample: (GuestSample & { atMs: number; actualPages: number }) | undefined;
}

export interface HostState {
  memTotalBytes: number | undefined;
  memAvailableBytes: number | undefined;
  psiSomeAvg10: number | undefined;
  underPressure: boolean;
}

export interface PolicyState {
  config: PolicyConfig;
  vms: Record<string, VmState>;
  host: HostState;
}

export type PolicyEvent =
  | {
      kind: 'vm-added';
      vm: string;
      guestRamPages: number;
      mode: Mode;
      operatorPages: number;
      targetPages: number;
      actualPages: number;
      floorPages?: number;
      shares?: number;
    }
  | { kind: 'vm-removed'; vm: string }
  | { kind: 'limits'; vm: string; floorPages: number; shares: number }
  | { kind: 'guest-ram'; vm: string; pages: number }
  | { kind: 'operator-target'; vm: string; pages: number }
  | { kind: 'mode'; vm: string; mode: Mode }
  | { kind: 'pressure'; vm: string }
  | { kind: 'stats'; vm: string; sample: GuestSample }
  | { kind: 'progress'; vm: string; actualPages: number }
  | { kind: 'deflate'; vm: string; pages: number; unrequested: boolean }
  | { kind: 'host'; memTotalBytes: number; memAvailableBytes: number; psiSomeAvg10?: number }
  | { kind: 'tick' };

export interface SetTargetAction {
  kind: 'set-target';
  vm: string;
  pages: number;
  previous: number;
  reason: Reason;
  inputs: Record<string, number | string | boolean>;
}

/** Manual mode: what auto mode would have done, reported only. */
export interface ReportAction {
  kind: 'report';
  vm: string;
  reason: Reason;
  inputs: Record<string, number | string | boolean>;
}

export type PolicyAction = SetTargetAction | ReportAction;

export function initialState(config: Partial<PolicyConfig> = {}): PolicyState {
  return {
    config: { ...DEFAULT_POLICY, ...config },
    vms: {},
    host: { memTotalBytes: undefined, memAvailableBytes: undefined, psiSomeAvg10: undefined, underPressure: false },
  };
}

function clone(state: PolicyState): PolicyState {
  const vms: Record<string, VmState> = {};
  for (const [k, v] of Object.entries(state.vms)) vms[k] = { ...v, progressMark: { ...v.progressMark } };
  return { config: state.config, vms, host: { ...state.host } };
}

const pages = (bytes: number): number => Math.floor(bytes / PAGE);

/** The free floor an inflate must leave in the guest, in bytes. */
export function inflateFloorBytes(config: PolicyConfig, vm: VmState): number {
  return Math.max(config.guestFloorBytes, config.guestFloorFraction * vm.guestRamPages * PAGE);
}

/** The largest balloon the VM's floor allows, in pages (unbounded while guest RAM is unknown). */
export function maxBalloonPages(vm: VmState): number {
  return vm.guestRamPages > 0 ? Math.max(0, vm.guestRamPages - vm.floorPages) : Number.MAX_SAFE_INTEGER;
}

/** Bytes the guest could give without going under its floors (0 without fresh stats). */
export function reclaimableBytes(config: PolicyConfig, vm: VmState, nowMs: number): number {
  const s = vm.sample;
  if (s?.availableBytes === undefined || nowMs - s.atMs > config.statsMaxAgeMs) return 0;
  // Everything ballooned since the sample, or still on its way into the balloon, is no longer
  // available, whatever the (older) sample says.
  const since = Math.max(0, vm.targetPages - s.actualPages) * PAGE;
  const free = Math.max(0, s.availableBytes - since - inflateFloorBytes(config, vm));
  return Math.min(free, Math.max(0, maxBalloonPages(vm) - vm.targetPages) * PAGE);
}

class Step {
  readonly actions: PolicyAction[] = [];
  constructor(
    readonly state: PolicyState,
    readonly now: number,
  ) {}

  get config(): PolicyConfig {
    return this.state.config;
  }

  /** Sets a VM's target (auto mode) or reports (manual mode, except operator/mode actions). */
  set(vm: VmState, pagesWanted: number, reason: Reason, inputs: Record<string, number | string | boolean>): void {
    let target = Math.max(0, Math.min(Math.round(pagesWanted), vm.operatorPages, maxBalloonPages(vm)));
    if (vm.mode === 'manual' && reason !== 'operator' && reason !== 'mode_change') {
      this.actions.push({ kind: 'report', vm: vm.name, reason, inputs });
      return;
    }
    if (vm.mode === 'manual') target = Math.min(vm.operatorPages, maxBalloonPages(vm));
    // Never inflate during a cooldown (only the operator in manual mode can).
    if (vm.mode === 'auto' && target > vm.targetPages && this.now < vm.cooldownUntilMs) return;
    if (target === vm.targetPages) return;
    const previous = vm.targetPages;
    vm.targetPages = target;
    // An inflate starts now (the balloon was not behind): stall detection measures from here.
    if (target > previous && previous <= vm.actualPages)
      vm.progressMark = { atMs: this.now, actualPages: vm.actualPages };
    this.actions.push({ kind: 'set-target', vm: vm.name, pages: target, previous, reason, inputs });
  }

  /** One more level of pressure streak, after forgiving the calm time since the last one. */
  private escalate(vm: VmState): number {
    if (vm.lastPressureMs !== undefined) {
      const forgiven = Math.floor((this.now - vm.lastPressureMs) / this.config.streakDecayMs);
      vm.streak = Math.max(0, vm.streak - forgiven);
    }
    vm.streak = Math.min(vm.streak + 1, 16);
    vm.lastPressureMs = this.now;
    return vm.streak;
  }

  /** Guest pressure: cancel the inflate in progress and deflate by a step; start a cooldown. */
  pressure(vm: VmState, reason: Reason, inputs: Record<string, number | string | boolean>): void {
    const c = this.config;
    // Manual mode only reports: the streak (and so later steps and cooldowns) stays as it is, and
    // so does the cooldown, so a guest switched to auto is not punished for what it did before.
    const streak = vm.mode === 'auto' ? this.escalate(vm) : Math.max(1, vm.streak);
    const doublings = Math.min(streak - 1, c.pressureStepMaxDoublings);
    const base = Math.min(vm.actualPages, vm.targetPages);
    const fraction = reason === 'guest_pressure_message' ? c.messageStepFraction : c.pressureStepFraction;
    const stepPages = Math.max(pages(c.pressureStepMinBytes), Math.ceil(base * fraction)) * 2 ** doublings;
    const cooldown = Math.min(c.cooldownBaseMs * 2 ** Math.min(streak - 1, 20), c.cooldownMaxMs);
    if (vm.mode === 'auto') vm.cooldownUntilMs = Math.max(vm.cooldownUntilMs, this.now + cooldown);
    this.set(vm, base - stepPages, reason, {
      ...inputs,
      streak,
      stepPages,
      cooldownMs: cooldown,
      actualPages: vm.actualPages,
    });
  }
}

function inferFromSample(step: Step, vm: VmState): void {
  const c = step.config;
  const s = vm.sample;
  const p = vm.previousSample;
  if (s === undefined) return;
  const floor = inflateFloorBytes(c, vm);
  if (p !== undefined) {
    const dt = Math.max(1, (s.atMs - p.atMs) / 1000);
    const delta = (k: keyof GuestSample): number | undefined =>
      s[k] !== undefined && p[k] !== undefined ? Math.max(0, s[k] - p[k]) : undefined;
    const oom = delta('oomKills');
    if (oom !== undefined && oom > 0) return step.pressure(vm, 'guest_oom_kill', { oomKills: oom });
    const stalls = delta('allocStalls');
    if (stalls !== undefined && stalls >= c.allocStallsPerSample)
      return step.pressure(vm, 'guest_alloc_stall', { allocStalls: stalls });
    const swapIn = delta('swapInBytes');
    if (swapIn !== undefined && swapIn / dt >= c.swapInBytesPerSec)
      return step.pressure(vm, 'guest_swap_in', { swapInBytesPerSec: Math.round(swapIn / dt) });
    const majflt = delta('majorFaults');
    if (
      majflt !== undefined &&
      majflt / dt >= c.majorFaultsPerSec &&
      s.availableBytes !== undefined &&
      s.availableBytes < 2 * floor
    ) {
      return step.pressure(vm, 'guest_major_faults', {
        majorFaultsPerSec: Math.round(majflt / dt),
        availableBytes: s.availableBytes,
      });
    }
  }
  if (s.availableBytes !== undefined && s.availableBytes < c.lowAvailableFloorFactor * floor && vm.actualPages > 0) {
    step.pressure(vm, 'guest_low_available', {
      availableBytes: s.availableBytes,
      floorBytes: Math.round(c.lowAvailableFloorFactor * floor),
    });
  }
}

function updateHost(step: Step): void {
  const h = step.state.host;
  const c = step.config;
  if (h.memTotalBytes === undefined || h.memAvailableBytes === undefined || h.memTotalBytes <= 0) return;
  const fraction = h.memAvailableBytes / h.memTotalBytes;
  const psi = h.psiSomeAvg10 ?? 0;
  if (!h.underPressure && (fraction < c.hostLowFraction || psi >= c.hostPsiSomeHigh)) h.underPressure = true;
  else if (h.underPressure && fraction >= c.hostRecoverFraction && psi < c.hostPsiSomeLow) h.underPressure = false;
}

/** A timer tick: stall detection, host-driven inflation, re-inflation toward the operator's value. */
function tick(step: Step): void {
  const c = step.config;
  const now = step.now;
  const vms = Object.values(step.state.vms).sort((a, b) => a.name.localeCompare(b.name));
  for (const vm of vms) {
    // Inflate stall: behind the target and barely moving for a whole window.
    const behind = vm.targetPages - vm.actualPages;
    if (behind > pages(c.stallMinProgressBytes) && now - vm.progressMark.atMs >= c.stallWindowMs) {
      const moved = vm.actualPages - vm.progressMark.actualPages;
      if (moved < pages(c.stallMinProgressBytes)) {
        step.pressure(vm, 'inflate_stalled', {
          movedPages: moved,
          windowMs: now - vm.progressMark.atMs,
          behindPages: behind,
        });
      }
      vm.progressMark = { atMs: now, actualPages: vm.actualPages };
    }
  }
  const autoVms = vms.filter(
    (vm) => vm.mode === 'auto' && now >= vm.cooldownUntilMs && vm.targetPages < vm.operatorPages,
  );
  const host = step.state.host;
  if (host.underPressure && host.memTotalBytes !== undefined && host.memAvailableBytes !== undefined) {
    // Split what the host needs back (up to its recovery level) between the guests in
    // proportion to reclaimable memory / shares: a guest with more to give gives more, a guest
    // with more shares gives less, shares 0 exempts a guest. Each take is bounded by hostStep.
    const deficit = Math.max(0, c.hostRecoverFraction * host.memTotalBytes - host.memAvailableBytes);
    const ranked = autoVms
      .filter((vm) => vm.shares > 0)
      .map((vm) => ({ vm, reclaimable: reclaimableBytes(c, vm, now) }))
      .filter((x) => x.reclaimable >= c.minChangeBytes)
      .map((x) => ({ ...x, weight: x.reclaimable / x.vm.shares }))
      .sort((a, b) => b.weight - a.weight || a.vm.name.localeCompare(b.vm.name));
    const totalWeight = ranked.reduce((sum, x) => sum + x.weight, 0);
    if (deficit < c.minChangeBytes) return;
    for (const { vm, reclaimable, weight } of ranked) {
      const part = Math.ceil((deficit * weight) / totalWeight);
      const take = Math.min(c.hostStepBytes, reclaimable, part, (vm.operatorPages - vm.targetPages) * PAGE);
      if (take < c.minChangeBytes) continue;
      step.set(vm, vm.targetPages + pages(take), 'host_pressure', {
        hostAvailableBytes: host.memAvailableBytes,
        hostTotalBytes: host.memTotalBytes,
        reclaimableBytes: reclaimable,
        shares: vm.shares,
      });
    }
    return;
  }
  // The host is calm: move back toward what the operator asked for, slowly and only while the
  // guest keeps its floor.
  for (const vm of autoVms) {
    const reclaimable = reclaimableBytes(c, vm, now);
    const take = Math.min(c.reinflateStepBytes, reclaimable, (vm.operatorPages - vm.targetPages) * PAGE);
    if (take < c.minChangeBytes && vm.operatorPages - vm.targetPages > pages(c.minChangeBytes)) continue;
    if (take <= 0) continue;
    step.set(vm, vm.targetPages + pages(take), 'reinflate', {
      reclaimableBytes: reclaimable,
      operatorPages: vm.operatorPages,
    });
  }
}

/** The engine. Returns a new state; `state` is not modified. */
export function step(
  state: PolicyState,
  event: PolicyEvent,
  nowMs: number,
): { state: PolicyState; actions: PolicyAction[] } {
  const next = clone(state);
  const s = new Step(next, nowMs);
  const vmOf = (name: string): VmState | undefined => next.vms[name];
  switch (event.kind) {
    case 'vm-added':
      next.vms[event.vm] = {
        name: event.vm,
        mode: event.mode,
        guestRamPages: event.guestRamPages,
        operatorPages: event.operatorPages,
        targetPages: event.targetPages,
        actualPages: event.actualPages,
        progressMark: { atMs: nowMs, actualPages: event.actualPages },
        cooldownUntilMs: 0,
        floorPages: event.floorPages ?? 0,
        shares: event.shares ?? 1000,
        streak: 0,
        lastPressureMs: undefined,
        sample: undefined,
        previousSample: undefined,
      };
      // A balloon above the ceiling (auto) or off the operator's value (manual) is corrected.
      if (event.mode === 'manual' || event.targetPages > event.operatorPages) {
        s.set(next.vms[event.vm], event.operatorPages, 'operator', { operatorPages: event.operatorPages });
      }
      break;
    case 'guest-ram': {
      const vm = vmOf(event.vm);
      if (vm === undefined) break;
      vm.guestRamPages = event.pages;
      if (vm.targetPages > maxBalloonPages(vm))
        s.set(vm, maxBalloonPages(vm), vm.mode === 'manual' ? 'operator' : 'floor', { floorPages: vm.floorPages });
      break;
    }
    case 'vm-removed':
      next.vms = Object.fromEntries(Object.entries(next.vms).filter(([k]) => k !== event.vm));
      break;
    case 'limits': {
      const vm = vmOf(event.vm);
      if (vm === undefined) break;
      vm.floorPages = Math.max(0, Math.round(event.floorPages));
      vm.shares = Math.max(0, event.shares);
      // A higher floor applies at once (in both modes): the guest is never left below it.
      if (vm.targetPages > maxBalloonPages(vm))
        s.set(vm, maxBalloonPages(vm), vm.mode === 'manual' ? 'operator' : 'floor', {
          floorPages: vm.floorPages,
        });
      break;
    }
    case 'operator-target': {
      const vm = vmOf(event.vm);
      if (vm === undefined) break;
      vm.operatorPages = Math.max(0, Math.round(event.pages));
      // Manual: obey. Auto: a lower ceiling applies at once; a higher one is approached by ticks.
      if (vm.mode === 'manual' || vm.targetPages > vm.operatorPages)
        s.set(vm, vm.operatorPages, 'operator', { operatorPages: vm.operatorPages });
      break;
    }
    case 'mode': {
      const vm = vmOf(event.vm);
      if (vm === undefined || vm.mode === event.mode) break;
      vm.mode = event.mode;
      // Entering auto keeps the balloon as it is (the operator's value becomes the ceiling);
      // entering manual obeys the operator's value at once.
      if (event.mode === 'manual') s.set(vm, vm.operatorPages, 'mode_change', { mode: event.mode });
      break;
    }
    case 'pressure': {
      const vm = vmOf(event.vm);
      if (vm !== undefined) s.pressure(vm, 'guest_pressure_message', {});
      break;
    }
    case 'stats': {
      const vm = vmOf(event.vm);
      if (vm === undefined) break;
      vm.previousSample = vm.sample;
      vm.sample = { ...event.sample, atMs: nowMs, actualPages: vm.actualPages };
      inferFromSample(s, vm);
      break;
    }
    case 'progress': {
      const vm = vmOf(event.vm);
      if (vm === undefined) break;
      vm.actualPages = event.actualPages;
      break;
    }
    case 'deflate': {
      const vm = vmOf(event.vm);
      if (vm !== undefined && event.unrequested && event.pages > 0)
        s.pressure(vm, 'guest_deflate_on_oom', { deflatedPages: event.pages });
      break;
    }
    case 'host':
      next.host.memTotalBytes = event.memTotalBytes;
      next.host.memAvailableBytes = event.memAvailableBytes;
      next.host.psiSomeAvg10 = event.psiSomeAvg10;
      updateHost(s);
      break;
    case 'tick':
      tick(s);
      break;
  }
  return { state: next, actions: s.actions };
}
