/**
 * `vballoon serve`: one process serving many VMs. Per VM a balloon device and its vhost-user
 * back-end (listening, or connecting to a QEMU that listens), all under one policy loop; the
 * control API; the metrics endpoint; reload and graceful shutdown.
 */
import * as fs from 'node:fs';
import { Clock, systemClock } from '../clock';
import { BalloonDevice, BalloonSnapshot, GuestStatsSnapshot } from '../device/balloon';
import { BALLOON_PAGE_BYTES } from '../device/constants';
import { ErrorCode, VballoonError } from '../errors';
import { Logger } from '../log';
import { native } from '../native';
import { Mode, PolicyAction } from '../policy/engine';
import { HostMemoryReaders } from '../policy/host';
import { PolicyLoop } from '../policy/loop';
import { VhostUserBackend } from '../vhost/server';
import { DaemonConfig, deviceOptions, qemuArgs, VmConfig } from './config';
import { ControlServer } from './control';
import { DaemonMetrics } from './metrics';

export interface DaemonOptions {
  log: Logger;
  clock?: Clock;
  host?: HostMemoryReaders;
}

interface VmRuntime {
  config: VmConfig;
  device: BalloonDevice;
  backend: VhostUserBackend;
  mode: Mode;
}

/** The stable JSON of `status` (docs/control-api.md). */
export interface VmStatus {
  vm: string;
  connected: boolean;
  mode: Mode;
  socket: string;
  guestRamBytes: number | null;
  targetBytes: number;
  actualBytes: number;
  guestSizeBytes: number | null;
  balloonedBytes: number;
  hostResidentBytes: number | null;
  reclaimedBytes: number;
  discardInhibited: boolean;
  negotiatedQueues: string[];
  pressureMessages: number;
  policyCooldownSeconds: number;
  statsAgeSeconds: number | null;
  statsStale: boolean;
}

export interface VmStats {
  vm: string;
  updatedAt: string | null;
  ageSeconds: number | null;
  stale: boolean;
  stats: Record<string, number>;
}

/** Open descriptors of this process, as "fd -> target" (for the shutdown leak check). */
function openFds(): Set<string> {
  const out = new Set<string>();
  for (const fd of fs.readdirSync('/proc/self/fd')) {
    try {
      out.add(`${fd} -> ${fs.readlinkSync(`/proc/self/fd/${fd}`)}`);
    } catch {
      // closed while listing (the directory's own fd)
    }
  }
  return out;
}

export class Daemon {
  private readonly vms = new Map<string, VmRuntime>();
  private readonly log: Logger;
  private readonly clock: Clock;
  private readonly policy: PolicyLoop;
  private readonly metrics: DaemonMetrics;
  private control: ControlServer | undefined;
  private config: DaemonConfig;
  private baseline: { fds: Set<string>; mappings: number } | undefined;
  metricsAddress: { address: string; port: number } | undefined;
  controlTcpAddress: { address: string; port: number } | undefined;

  constructor(config: DaemonConfig, options: DaemonOptions) {
    this.config = config;
    this.log = options.log;
    this.clock = options.clock ?? systemClock;
    this.metrics = new DaemonMetrics(() =>
      [...this.vms.values()].map((v) => ({
        name: v.config.name,
        device: v.device,
        mode: v.mode,
        connections: () => v.backend.counters.connections,
      })),
    );
    this.policy = new PolicyLoop({
      clock: this.clock,
      log: this.log.child({ component: 'policy' }),
      config: config.policy,
      tickMs: config.policy.tickMs,
      ...(options.host === undefined ? {} : { host: options.host }),
      onAction: (a: PolicyAction) => this.metrics.policyAction(a.vm, a.reason),
    });
  }

  get metricsRegistry(): DaemonMetrics {
    return this.metrics;
  }

  async start(): Promise<void> {
    this.baseline = { fds: openFds(), mappings: native.mappingCount() };
    for (const vm of this.config.vms) await this.addVm(vm);
    const control = new ControlServer({
      log: this.log.child({ component: 'control' }),
      handlers: this.handlers(),
      onError: (code) => this.metrics.error('control', code),
    });
    this.control = control;
    await control.listenUnix(this.config.control.socket, this.config.control.mode);
    if (this.config.control.tcp !== undefined)
      this.controlTcpAddress = await control.listenTcp(this.config.control.tcp.host, this.config.control.tcp.port);
    if (this.config.metrics !== undefined)
      this.metricsAddress = await this.metrics.listen(this.config.metrics.host, this.config.metrics.port);
    this.policy.start();
    this.log.info('vballoon daemon started', {
      vms: this.config.vms.map((v) => v.name).join(',') || '(none)',
      control: this.config.control.socket,
      metrics: this.metricsAddress === undefined ? 'off' : `${this.metricsAddress.address}:${this.metricsAddress.port}`,
    });
  }

  private async addVm(vm: VmConfig): Promise<void> {
    const log = this.log.child({ vm: vm.name });
    const device = new BalloonDevice({ ...deviceOptions(vm), clock: this.clock, log });
    if (vm.targetBytes > 0) device.setTargetPages(Math.floor(vm.targetBytes / BALLOON_PAGE_BYTES), 'operator');
    const backend = new VhostUserBackend(device, {
      log,
      events: {
        onError: (code) => this.metrics.error(vm.name, code),
      },
    });
    device.on('invalid', (e: { reason: string }) => this.metrics.error(vm.name, e.reason));
    device.on('ack', (e: { seconds: number }) => this.metrics.ack(vm.name, e.seconds));
    const runtime: VmRuntime = { config: vm, device, backend, mode: vm.policy };
    if (vm.connect) {
      backend
        .connect(vm.socket, { retryIntervalMs: 1000, reconnect: true })
        .catch((err: Error) => log.error('cannot connect to the front-end', { error: err.message }));
    } else {
      backend.listen(vm.socket);
    }
    this.vms.set(vm.name, runtime);
    this.policy.addVm(vm.name, device, vm.policy, device.target);
  }

  private removeVm(name: string): void {
    const vm = this.vms.get(name);
    if (vm === undefined) return;
    this.policy.removeVm(name);
    vm.backend.close();
    vm.device.removeAllListeners();
    this.vms.delete(name);
    this.log.info('VM removed', { vm: name });
  }

  /**
   * Applies a new configuration: VMs added or removed; for existing VMs the policy mode, target
   * and discard inhibit change in place. Other changes to a VM (socket, features) need it
   * removed and added again, which drops its front-end connection; those are refused with a log
   * line while a front-end is connected.
   */
  async reload(next: DaemonConfig): Promise<void> {
    const wanted = new Map(next.vms.map((v) => [v.name, v]));
    for (const name of [...this.vms.keys()]) if (!wanted.has(name)) this.removeVm(name);
    for (const vm of next.vms) {
      const current = this.vms.get(vm.name);
      if (current === undefined) {
        await this.addVm(vm);
        this.log.info('VM added', { vm: vm.name });
        continue;
      }
      const { policy: _p, targetBytes: _t, inhibitDiscard: _i, ...restNew } = vm;
      const { policy: _p2, targetBytes: _t2, inhibitDiscard: _i2, ...restOld } = current.config;
      if (JSON.stringify(restNew) !== JSON.stringify(restOld)) {
        if (current.device.connected) {
          this.log.warn(
            'VM settings changed that need a restart of its back-end; kept the old ones while QEMU is connected',
            { vm: vm.name },
          );
          continue;
        }
        this.removeVm(vm.name);
        await this.addVm(vm);
        continue;
      }
      if (vm.policy !== current.mode) this.setMode(vm.name, vm.policy);
      if (vm.inhibitDiscard !== current.config.inhibitDiscard) current.device.setDiscardInhibited(vm.inhibitDiscard);
      if (vm.targetBytes !== current.config.targetBytes) this.setTarget(vm.name, { bytes: vm.targetBytes });
      current.config = vm;
    }
    this.config = { ...next, control: this.config.control, metrics: this.config.metrics };
    this.log.info('configuration reloaded', { vms: next.vms.map((v) => v.name).join(',') || '(none)' });
  }

  /** Graceful stop: stop accepting, close every connection, socket and mapping. */
  async stop(): Promise<void> {
    this.policy.stop();
    await this.control?.close();
    this.control = undefined;
    for (const name of [...this.vms.keys()]) this.removeVm(name);
    await this.metrics.close();
    // Descriptors opened since start and still open: none, except libuv's reserve descriptor
    // on /dev/null that the first listening server creates for the life of the process.
    const before = this.baseline?.fds ?? new Set<string>();
    const leaked = [...openFds()].filter((f) => !before.has(f) && !f.endsWith(' -> /dev/null'));
    this.log.info('vballoon daemon stopped', {
      leakedFds: leaked.length,
      mappings: native.mappingCount(),
      ...(leaked.length > 0 ? { fds: leaked.join(', ') } : {}),
    });
  }

  // ---- operations (control API) ----------------------------------------------------------------

  private vm(name: unknown): VmRuntime {
    if (typeof name !== 'string') throw new VballoonError(ErrorCode.CONTROL_BAD_PARAMS, '"vm" must be a string');
    const vm = this.vms.get(name);
    if (vm === undefined)
      throw new VballoonError(
        ErrorCode.CONTROL_NO_VM,
        `no VM named "${name}" (known: ${[...this.vms.keys()].join(', ') || 'none'})`,
      );
    return vm;
  }

  private guestRamBytes(vm: VmRuntime): number | undefined {
    const known = vm.device.guestRamPages;
    return known !== undefined ? known * BALLOON_PAGE_BYTES : vm.config.memoryBytes;
  }

  status(name: string): VmStatus {
    const vm = this.vm(name);
    const s: BalloonSnapshot = vm.device.snapshot();
    const ram = this.guestRamBytes(vm);
    const engine = this.policy.engineState.vms[name];
    return {
      vm: name,
      connected: s.connected,
      mode: vm.mode,
      socket: vm.config.socket,
      guestRamBytes: ram ?? null,
      targetBytes: s.targetPages * BALLOON_PAGE_BYTES,
      actualBytes: s.actualPages * BALLOON_PAGE_BYTES,
      guestSizeBytes: ram === undefined ? null : ram - s.actualPages * BALLOON_PAGE_BYTES,
      balloonedBytes: s.balloonedPages * BALLOON_PAGE_BYTES,
      hostResidentBytes: s.hostResidentBytes ?? null,
      reclaimedBytes: s.reclaimedBytes,
      discardInhibited: s.discardInhibited,
      negotiatedQueues: s.layout,
      pressureMessages: s.messages.pressure,
      policyCooldownSeconds:
        engine === undefined ? 0 : Math.max(0, Math.round((engine.cooldownUntilMs - this.clock.now()) / 1000)),
      statsAgeSeconds: s.stats.ageMs === undefined ? null : Math.round(s.stats.ageMs / 100) / 10,
      statsStale: s.stats.stale,
    };
  }

  stats(name: string): VmStats {
    const s: GuestStatsSnapshot = this.vm(name).device.snapshot().stats;
    return {
      vm: name,
      updatedAt: s.updatedAtMs === undefined ? null : new Date(s.updatedAtMs).toISOString(),
      ageSeconds: s.ageMs === undefined ? null : Math.round(s.ageMs / 100) / 10,
      stale: s.stale,
      stats: s.values,
    };
  }

  /** Sets the balloon size (`bytes`) or what the guest keeps (`guestBytes`, QMP's convention). */
  setTarget(name: string, p: { bytes?: unknown; guestBytes?: unknown }): VmStatus {
    const vm = this.vm(name);
    const ram = this.guestRamBytes(vm);
    let bytes: number;
    if (p.guestBytes !== undefined && p.bytes !== undefined)
      throw new VballoonError(ErrorCode.CONTROL_BAD_PARAMS, 'give "bytes" or "guestBytes", not both');
    if (p.guestBytes !== undefined) {
      if (typeof p.guestBytes !== 'number' || !Number.isSafeInteger(p.guestBytes) || p.guestBytes < 0)
        throw new VballoonError(ErrorCode.CONTROL_BAD_PARAMS, '"guestBytes" must be a non-negative integer');
      if (ram === undefined)
        throw new VballoonError(
          ErrorCode.BALLOON_TARGET,
          `guest RAM of ${name} is unknown (not connected and no "memory" configured)`,
        );
      if (p.guestBytes > ram)
        throw new VballoonError(ErrorCode.BALLOON_TARGET, `guest size ${p.guestBytes} exceeds guest RAM ${ram}`);
      bytes = ram - p.guestBytes;
    } else {
      if (typeof p.bytes !== 'number' || !Number.isSafeInteger(p.bytes) || p.bytes < 0)
        throw new VballoonError(
          ErrorCode.CONTROL_BAD_PARAMS,
          '"bytes" (or "guestBytes") must be a non-negative integer',
        );
      bytes = p.bytes;
    }
    if (ram !== undefined && bytes > ram)
      throw new VballoonError(ErrorCode.BALLOON_TARGET, `balloon of ${bytes} bytes exceeds guest RAM of ${ram} bytes`);
    const pages = Math.floor(bytes / BALLOON_PAGE_BYTES);
    this.policy.setOperatorTarget(name, pages);
    this.log.info('operator set the balloon', { vm: name, bytes, mode: vm.mode });
    return this.status(name);
  }

  setMode(name: string, mode: unknown): VmStatus {
    const vm = this.vm(name);
    if (mode !== 'auto' && mode !== 'manual')
      throw new VballoonError(ErrorCode.CONTROL_BAD_PARAMS, '"mode" must be "auto" or "manual"');
    vm.mode = mode;
    this.policy.setMode(name, mode);
    this.log.info('policy mode changed', { vm: name, mode });
    return this.status(name);
  }

  setDiscard(name: string, inhibit: unknown): VmStatus {
    const vm = this.vm(name);
    if (typeof inhibit !== 'boolean')
      throw new VballoonError(ErrorCode.CONTROL_BAD_PARAMS, '"inhibit" must be true or false');
    vm.device.setDiscardInhibited(inhibit);
    return this.status(name);
  }

  list(): Array<{ vm: string; connected: boolean; mode: Mode; socket: string }> {
    return [...this.vms.values()].map((v) => ({
      vm: v.config.name,
      connected: v.device.connected,
      mode: v.mode,
      socket: v.config.socket,
    }));
  }

  private handlers(): Record<string, (p: Record<string, unknown>) => unknown> {
    const all = <T>(p: Record<string, unknown>, one: (name: string) => T): T | T[] =>
      p['vm'] === undefined ? [...this.vms.keys()].map(one) : one(this.vm(p['vm']).config.name);
    return {
      ping: () => ({ pong: true, pid: process.pid }),
      list: () => this.list(),
      status: (p) => all(p, (n) => this.status(n)),
      stats: (p) => all(p, (n) => this.stats(n)),
      'set-target': (p) => this.setTarget(this.vm(p['vm']).config.name, p),
      'set-mode': (p) => this.setMode(this.vm(p['vm']).config.name, p['mode']),
      'set-discard': (p) => this.setDiscard(this.vm(p['vm']).config.name, p['inhibit']),
      'qemu-args': (p) => {
        const vm = this.vm(p['vm']);
        const config = { ...vm.config, memoryBytes: this.guestRamBytes(vm) };
        return { args: qemuArgs(config, vm.device) };
      },
    };
  }
}
