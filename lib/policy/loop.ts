/**
 * Runs the policy engine against live balloon devices: turns device events (pressure messages,
 * stats, actual, unrequested deflates) and host memory samples into engine events, ticks on an
 * injected clock, applies the engine's actions to the devices, and logs and counts every
 * decision by reason. The pressure path is synchronous: a target the engine sets in answer to a
 * pressure message is in the device's config space before the message is acknowledged.
 */
import { Clock, systemClock, TimerHandle } from '../clock';
import { BalloonDevice, GuestStatsSnapshot, PressureEvent } from '../device/balloon';
import {
  VIRTIO_BALLOON_S_ALLOC_STALL,
  VIRTIO_BALLOON_S_AVAIL,
  VIRTIO_BALLOON_S_MAJFLT,
  VIRTIO_BALLOON_S_MEMFREE,
  VIRTIO_BALLOON_S_MEMTOT,
  VIRTIO_BALLOON_S_OOM_KILL,
  VIRTIO_BALLOON_S_SWAP_IN,
} from '../device/constants';
import { errorCodeOf, errorMessage } from '../errors';
import { Logger, NullLogger } from '../log';
import {
  GuestSample,
  initialState,
  Mode,
  PolicyAction,
  PolicyConfig,
  PolicyEvent,
  PolicyState,
  step,
  VmState,
} from './engine';
import { HostMemoryReaders, procReaders, readHostSample } from './host';

export interface PolicyLoopOptions {
  clock?: Clock;
  log?: Logger;
  config?: Partial<PolicyConfig>;
  /** Host memory readers (default: /proc). */
  host?: HostMemoryReaders;
  /** Engine tick and host sampling period (default 1 s). */
  tickMs?: number;
  /** Called for every action after it was applied (metrics). */
  onAction?(action: PolicyAction): void;
}

/** Maps the balloon's stats to what the engine reads. */
export function sampleFromStats(stats: GuestStatsSnapshot): GuestSample {
  const get = (tag: number): number | undefined => stats.byTag.get(tag);
  const sample: GuestSample = {};
  const available = get(VIRTIO_BALLOON_S_AVAIL) ?? get(VIRTIO_BALLOON_S_MEMFREE);
  const fields: Array<[keyof GuestSample, number | undefined]> = [
    ['availableBytes', available],
    ['totalBytes', get(VIRTIO_BALLOON_S_MEMTOT)],
    ['swapInBytes', get(VIRTIO_BALLOON_S_SWAP_IN)],
    ['majorFaults', get(VIRTIO_BALLOON_S_MAJFLT)],
    ['oomKills', get(VIRTIO_BALLOON_S_OOM_KILL)],
    ['allocStalls', get(VIRTIO_BALLOON_S_ALLOC_STALL)],
  ];
  for (const [k, v] of fields) if (v !== undefined) sample[k] = v;
  return sample;
}

interface Attached {
  device: BalloonDevice;
  detach(): void;
}

export class PolicyLoop {
  private state: PolicyState;
  private readonly clock: Clock;
  private readonly log: Logger;
  private tickMs: number;
  private readonly host: HostMemoryReaders;
  private readonly attached = new Map<string, Attached>();
  private timer: TimerHandle | undefined;
  private refused = 0;
  /** Actions applied (set-target), by reason. */
  readonly actionsByReason = new Map<string, number>();
  /** Suggestions reported in manual mode and not applied, by reason. */
  readonly suggestionsByReason = new Map<string, number>();

  constructor(private readonly options: PolicyLoopOptions = {}) {
    this.clock = options.clock ?? systemClock;
    this.log = options.log ?? new NullLogger();
    this.tickMs = options.tickMs ?? 1000;
    this.host = options.host ?? procReaders;
    this.state = initialState(options.config);
  }

  /** The engine state (read-only view, for status output and tests). */
  get engineState(): PolicyState {
    return this.state;
  }

  /**
   * Feeds one event to the engine and applies its actions. Every action is tried; if a device
   * refuses one, the first refusal is thrown after the others were applied (the caller decides
   * what a refusal means: the operator gets it as an error, a device event logs and counts it).
   */
  feed(event: PolicyEvent): PolicyAction[] {
    const result = step(this.state, event, this.clock.now());
    this.state = result.state;
    let failure: Error | undefined;
    for (const action of result.actions) {
      try {
        this.apply(action);
      } catch (err) {
        failure ??= err instanceof Error ? err : new Error(String(err));
      }
    }
    if (failure !== undefined) throw failure;
    return result.actions;
  }

  /** Number of engine actions a device refused (each also logged). */
  get refusedActions(): number {
    return this.refused;
  }

  private apply(action: PolicyAction): void {
    if (action.kind === 'report') {
      // Manual mode stays quiet: what auto mode would have done is a debug line and a count.
      this.suggestionsByReason.set(action.reason, (this.suggestionsByReason.get(action.reason) ?? 0) + 1);
      this.log.debug('policy suggestion (manual mode, not applied)', {
        vm: action.vm,
        reason: action.reason,
        ...action.inputs,
      });
    } else {
      this.actionsByReason.set(action.reason, (this.actionsByReason.get(action.reason) ?? 0) + 1);
      const device = this.attached.get(action.vm)?.device;
      try {
        device?.setTargetPages(action.pages, action.reason);
      } catch (err) {
        this.refused++;
        this.log.error("a device refused the policy's target", {
          vm: action.vm,
          reason: action.reason,
          targetPages: action.pages,
          code: errorCodeOf(err),
          error: errorMessage(err),
        });
        throw err;
      }
      this.log.info('policy sets balloon target', {
        vm: action.vm,
        reason: action.reason,
        targetPages: action.pages,
        previous: action.previous,
        ...action.inputs,
      });
    }
    this.options.onAction?.(action);
  }

  /** Feeds a device's event; a refusal was logged and counted in apply() and stays there. */
  private feedFromDevice(event: PolicyEvent): void {
    try {
      this.feed(event);
    } catch {
      // Logged and counted by apply(); the device's event handler must not fail because of it.
    }
  }

  /**
   * Replaces the engine's configuration and the tick period (a reload). Validated by the caller
   * (lib/daemon/config.ts); the next tick runs with the new values.
   */
  setConfig(config: PolicyConfig, tickMs: number): void {
    this.state = { ...this.state, config: { ...config } };
    if (tickMs !== this.tickMs) {
      this.tickMs = tickMs;
      if (this.timer !== undefined) {
        this.timer.cancel();
        this.timer = undefined;
        this.start();
      }
    }
  }

  /** Per-VM floor (pages the guest keeps) and shares (host-pressure weight). */
  setLimits(name: string, floorPages: number, shares: number): void {
    this.feed({ kind: 'limits', vm: name, floorPages, shares });
  }

  /** Puts a device under the policy. */
  addVm(
    name: string,
    device: BalloonDevice,
    mode: Mode,
    operatorPages = device.target,
    limits: { floorPages: number; shares: number } = { floorPages: 0, shares: 1000 },
  ): void {
    if (this.attached.has(name)) throw new Error(`VM ${name} is already under the policy`);
    const onPressure = (_e: PressureEvent): void => this.feedFromDevice({ kind: 'pressure', vm: name });
    const onStats = (s: GuestStatsSnapshot): void =>
      this.feedFromDevice({ kind: 'stats', vm: name, sample: sampleFromStats(s) });
    const onActual = (e: { actualPages: number }): void =>
      this.feedFromDevice({ kind: 'progress', vm: name, actualPages: e.actualPages });
    const onDeflate = (e: { pages: number; unrequested: boolean }): void =>
      this.feedFromDevice({ kind: 'deflate', vm: name, pages: e.pages, unrequested: e.unrequested });
    const onConnection = (): void => {
      const ram = device.guestRamPages;
      if (ram !== undefined) this.feedFromDevice({ kind: 'guest-ram', vm: name, pages: ram });
    };
    device.on('pressure', onPressure);
    device.on('stats', onStats);
    device.on('actual', onActual);
    device.on('deflate', onDeflate);
    device.on('connection', onConnection);
    this.attached.set(name, {
      device,
      detach: () => {
        device.off('pressure', onPressure);
        device.off('stats', onStats);
        device.off('actual', onActual);
        device.off('deflate', onDeflate);
        device.off('connection', onConnection);
      },
    });
    this.feed({
      kind: 'vm-added',
      vm: name,
      guestRamPages: device.guestRamPages ?? 0,
      mode,
      operatorPages,
      targetPages: device.target,
      actualPages: device.actual,
      floorPages: limits.floorPages,
      shares: limits.shares,
    });
  }

  removeVm(name: string): void {
    this.attached.get(name)?.detach();
    this.attached.delete(name);
    this.feed({ kind: 'vm-removed', vm: name });
  }

  /**
   * The operator's value for a VM (exact in manual mode, a ceiling in auto mode). A value the
   * device cannot take is refused (ERR_BALLOON_TARGET) before the engine records it.
   */
  setOperatorTarget(name: string, pages: number): void {
    this.attached.get(name)?.device.checkTarget(pages);
    this.feed({ kind: 'operator-target', vm: name, pages });
  }

  setMode(name: string, mode: Mode): void {
    this.feed({ kind: 'mode', vm: name, mode });
  }

  /** One engine tick, with a fresh host sample first. */
  tick(): void {
    const host = readHostSample(this.host);
    if (host !== undefined) {
      const event: PolicyEvent = {
        kind: 'host',
        memTotalBytes: host.memTotalBytes,
        memAvailableBytes: host.memAvailableBytes,
      };
      if (host.psiSomeAvg10 !== undefined) event.psiSomeAvg10 = host.psiSomeAvg10;
      this.feed(event);
    }
    // Guest RAM becomes known once a front-end shares memory.
    for (const [name, a] of this.attached) {
      const ram = a.device.guestRamPages;
      if (ram !== undefined && (this.state.vms[name] as VmState | undefined)?.guestRamPages !== ram)
        this.feed({ kind: 'guest-ram', vm: name, pages: ram });
    }
    this.feed({ kind: 'tick' });
  }

  start(): void {
    if (this.timer !== undefined) return;
    const loop = (): void => {
      this.timer = this.clock.setTimer(this.tickMs, loop);
      try {
        this.tick();
      } catch (err) {
        this.log.error('policy tick failed', { error: (err as Error).message });
      }
    };
    this.timer = this.clock.setTimer(this.tickMs, loop);
  }

  stop(): void {
    this.timer?.cancel();
    this.timer = undefined;
    for (const name of [...this.attached.keys()]) this.removeVm(name);
  }
}
