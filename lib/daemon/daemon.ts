/**
 * `vballoon serve`: one process serving many VMs. Per VM a balloon device and its vhost-user
 * back-end (listening, or connecting to a QEMU that listens), all under one policy loop; the
 * control API; the metrics endpoint; reload and graceful shutdown.
 */
import * as fs from 'node:fs';
import { Clock, systemClock } from '../clock';
import { BalloonDevice, BalloonSnapshot, GuestStatsSnapshot } from '../device/balloon';
import { BALLOON_PAGE_BYTES } from '../device/constants';
import { ErrorCode, errorMessage, VballoonError } from '../errors';
import { formatBytes } from '../units';
import { Logger } from '../log';
import { native } from '../native';
import { Mode, PolicyAction, VmState } from '../policy/engine';
import { HostMemoryReaders } from '../policy/host';
import { PolicyLoop } from '../policy/loop';
import { VhostUserBackend } from '../vhost/server';
import {
  DaemonConfig,
  deviceOptions,
  libvirtXml,
  MIN_STATS_INTERVAL_MS,
  qemuArgs,
  SocketAccess,
  VmConfig,
} from './config';
import { DaemonEvents, EVENT_TYPES } from './events';
import { StateStore } from './state';
import { SystemdNotifier } from './systemd';
import { ControlServer } from './control';
import { DaemonMetrics } from './metrics';

export interface DaemonOptions {
  log: Logger;
  clock?: Clock;
  host?: HostMemoryReaders;
  /** The service manager (READY=1, STATUS=, RELOADING=1); none when not under one. */
  notifier?: SystemdNotifier;
  /** Applies new log settings (a reload); without it a log change is refused with a log line. */
  reconfigureLog?(log: DaemonConfig['log']): void;
}

interface VmRuntime {
  /** What runs (the file's values, less the changes a reload had to refuse). */
  config: VmConfig;
  /** The file's values as last read (to tell what a reload changes). */
  fileConfig: VmConfig;
  device: BalloonDevice;
  backend: VhostUserBackend;
  mode: Mode;
}

/** What a reload did: every changed setting is in one of the lists, with its reason when refused. */
export interface ReloadReport {
  applied: string[];
  refused: Array<{ setting: string; reason: string }>;
}

/** VM settings a reload applies in place, whether or not QEMU is connected. */
const LIVE_VM_KEYS = [
  'policy',
  'statsIntervalMs',
  'targetBytes',
  'inhibitDiscard',
  'floorBytes',
  'shares',
  'socketAccess',
  'memoryBytes',
  'queueSize',
] as const satisfies ReadonlyArray<keyof VmConfig>;

/** Config file names of VmConfig fields (for log lines that match what the operator wrote). */
const VM_FILE_KEYS: Record<keyof VmConfig, string> = {
  name: 'name',
  socket: 'socket',
  socketAccess: 'socketOwner/socketGroup/socketMode',
  connect: 'connect',
  memoryBytes: 'memory',
  mustTellHost: 'mustTellHost',
  statsQueue: 'stats',
  deflateOnOom: 'deflateOnOom',
  pageReporting: 'reporting',
  messageQueue: 'messageQueue',
  messageBit: 'messageBit',
  configSize: 'configSize',
  queueSize: 'queueSize',
  statsIntervalMs: 'statsInterval',
  policy: 'policy',
  targetBytes: 'target',
  inhibitDiscard: 'inhibitDiscard',
  floorBytes: 'floor',
  shares: 'shares',
};

/** The largest balloon: num_pages is a 32-bit count of 4 KiB pages. */
const MAX_BALLOON_BYTES = 0xffffffff * BALLOON_PAGE_BYTES;

const same = (a: unknown, b: unknown): boolean => JSON.stringify(a) === JSON.stringify(b);

/** Gives a listening socket file its configured owner, group and mode. */
function applySocketAccess(socketPath: string, access: SocketAccess): void {
  if (access.uid !== undefined || access.gid !== undefined)
    fs.chownSync(socketPath, access.uid ?? -1, access.gid ?? -1);
  fs.chmodSync(socketPath, access.mode);
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
  /** The guest never goes below this (config `floor`). */
  floorBytes: number;
  /** Host-pressure weight (config `shares`). */
  shares: number;
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
  private readonly state: StateStore;
  private readonly notifier: SystemdNotifier | undefined;
  private control: ControlServer | undefined;
  private config: DaemonConfig;
  private baseline: { fds: Set<string>; mappings: number } | undefined;
  /** Events for control API subscribers (`subscribe`, `vballoon watch --events`). */
  readonly events = new DaemonEvents();
  metricsAddress: { address: string; port: number } | undefined;
  controlTcpAddress: { address: string; port: number } | undefined;

  constructor(
    config: DaemonConfig,
    private readonly options: DaemonOptions,
  ) {
    this.config = config;
    this.log = options.log;
    this.clock = options.clock ?? systemClock;
    this.notifier = options.notifier;
    this.state = new StateStore(config.stateFile);
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
      onAction: (a: PolicyAction) => this.metrics.policyAction(a.vm, a.reason, a.kind === 'set-target'),
    });
  }

  get metricsRegistry(): DaemonMetrics {
    return this.metrics;
  }

  async start(): Promise<void> {
    this.baseline = { fds: openFds(), mappings: native.mappingCount() };
    const loaded = this.state.load();
    if (loaded.error !== undefined) this.log.warn('runtime state not restored', { error: loaded.error });
    for (const vm of this.config.vms) this.addVm(vm);
    const control = new ControlServer({
      log: this.log.child({ component: 'control' }),
      handlers: this.handlers(),
      subscribe: (send) => this.events.subscribe(send),
      checkSubscription: (f) => {
        if (f.vm !== undefined) this.vm(f.vm);
        const unknown = (f.events ?? []).filter((e) => !(EVENT_TYPES as readonly string[]).includes(e));
        if (unknown.length > 0)
          throw new VballoonError(
            ErrorCode.CONTROL_BAD_PARAMS,
            `unknown event type(s) ${unknown.join(', ')} (known: ${EVENT_TYPES.join(', ')})`,
          );
      },
      onError: (code) => this.metrics.controlError(code),
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
    // Every socket listens now: a VM ordered after vballoon.service finds its socket.
    this.notifier?.ready(this.statusLine());
  }

  /** One line for systemd's STATUS= (systemctl status). */
  statusLine(): string {
    const vms = [...this.vms.values()];
    const connected = vms.filter((v) => v.device.connected).length;
    return `serving ${vms.length} VM${vms.length === 1 ? '' : 's'} (${connected} connected)`;
  }

  private addVm(vm: VmConfig, fileConfig: VmConfig = vm): void {
    const log = this.log.child({ vm: vm.name });
    const device = new BalloonDevice({ ...deviceOptions(vm), clock: this.clock, log });
    // A target or mode the operator set at run time survives a restart, unless the file's value
    // changed since (then the file wins).
    const saved = this.state.get(vm.name);
    const fromState = saved !== undefined && saved.fileTargetBytes === vm.targetBytes && saved.fileMode === vm.policy;
    const targetBytes = fromState ? saved.targetBytes : vm.targetBytes;
    const mode = fromState ? saved.mode : vm.policy;
    if (fromState && (saved.targetBytes !== vm.targetBytes || saved.mode !== vm.policy))
      log.info('restored the runtime target and mode', { targetBytes, mode, stateFile: this.state.path });
    if (saved !== undefined && !fromState) this.state.delete(vm.name);
    const pages = Math.floor(targetBytes / BALLOON_PAGE_BYTES);
    if (pages > 0) device.setTargetPages(pages, 'operator');
    const limits = { floorPages: Math.ceil(vm.floorBytes / BALLOON_PAGE_BYTES), shares: vm.shares };
    const backend = new VhostUserBackend(device, {
      log,
      events: {
        onError: (code) => this.metrics.error(vm.name, code),
      },
    });
    device.on('invalid', (e: { reason: string }) => this.metrics.error(vm.name, e.reason));
    device.on('ack', (e: { seconds: number }) => this.metrics.ack(vm.name, e.seconds));
    this.events.attach(vm.name, device);
    device.on('connection', () => this.notifier?.status(this.statusLine()));
    const runtime: VmRuntime = { config: vm, fileConfig, device, backend, mode };
    if (vm.connect) {
      backend
        .connect(vm.socket, { retryIntervalMs: 1000, reconnect: true })
        .catch((err: unknown) => log.error('cannot connect to the front-end', { error: errorMessage(err) }));
    } else {
      // Created with no access for others, then given its configured owner, group and mode.
      const oldMask = process.umask(0o177);
      try {
        backend.listen(vm.socket);
      } finally {
        process.umask(oldMask);
      }
      try {
        applySocketAccess(vm.socket, vm.socketAccess);
      } catch (err) {
        backend.close();
        throw new VballoonError(
          ErrorCode.SOCKET,
          `${vm.name}: cannot give ${vm.socket} its owner, group or mode: ${errorMessage(err)}`,
        );
      }
    }
    this.vms.set(vm.name, runtime);
    this.policy.addVm(vm.name, device, mode, pages, limits);
  }

  private removeVm(name: string): void {
    const vm = this.vms.get(name);
    if (vm === undefined) return;
    this.policy.removeVm(name);
    vm.backend.close();
    this.events.detach(name);
    vm.device.removeAllListeners();
    this.vms.delete(name);
    this.log.info('VM removed', { vm: name });
  }

  /**
   * Applies a new configuration (SIGHUP). Every changed setting is either applied or refused
   * with a log line naming it; nothing is silently ignored:
   * - log and policy settings, the state file and the control socket's mode apply at once;
   * - the control socket's path, TCP and the metrics endpoint need a restart: refused;
   * - VMs are added and removed;
   * - for a VM, mode, target, discard inhibit, floor, shares, socket owner/group/mode, memory and
   *   queueSize apply in place; the other settings (socket path, features, stats interval) need
   *   its back-end restarted, which is done while QEMU is not connected and refused while it is.
   * Mode and target apply only when the file's value changed: a value the operator set at run
   * time is not overwritten by an unchanged file.
   */
  reload(next: DaemonConfig): ReloadReport {
    this.notifier?.reloading();
    try {
      return this.applyReload(next);
    } catch (err) {
      // Never leave the service manager waiting in "reloading".
      this.notifier?.reloaded(`${this.statusLine()}; reload failed: ${errorMessage(err)}`);
      throw err;
    }
  }

  private applyReload(next: DaemonConfig): ReloadReport {
    const report: ReloadReport = { applied: [], refused: [] };
    const applied = (setting: string, fields: Record<string, unknown> = {}): void => {
      report.applied.push(setting);
      this.log.info('reload: applied', { setting, ...fields });
    };
    const refused = (setting: string, reason: string): void => {
      report.refused.push({ setting, reason });
      this.log.warn('reload: refused', { setting, reason });
    };
    const cur = this.config;
    const effective: DaemonConfig = { ...next, control: cur.control, metrics: cur.metrics, vms: [] };

    if (next.control.socket !== cur.control.socket) refused('control.socket', 'takes effect at restart');
    if (!same(next.control.tcp, cur.control.tcp)) refused('control.tcp', 'takes effect at restart');
    if (next.control.mode !== cur.control.mode) {
      this.control?.setMode(next.control.mode);
      effective.control = { ...cur.control, mode: next.control.mode };
      applied('control.mode', { mode: `0${next.control.mode.toString(8)}` });
    }
    if (!same(next.metrics, cur.metrics)) refused('metrics', 'the metrics endpoint moves at restart');
    if (!same(next.log, cur.log)) {
      if (this.options.reconfigureLog === undefined) {
        refused('log', 'this daemon was started without a reconfigurable logger');
        effective.log = cur.log;
      } else {
        this.options.reconfigureLog(next.log);
        applied('log', { format: next.log.format, level: next.log.level });
      }
    }
    if (!same(next.policy, cur.policy)) {
      const { tickMs, ...engine } = next.policy;
      this.policy.setConfig(engine, tickMs);
      const changed = Object.keys(next.policy).filter(
        (k) => !same(next.policy[k as keyof typeof next.policy], cur.policy[k as keyof typeof cur.policy]),
      );
      applied('policy', { changed: changed.join(',') });
    }
    if (next.stateFile !== cur.stateFile) {
      this.state.setFile(next.stateFile);
      applied('state.file', { file: next.stateFile ?? 'off' });
    }

    const wanted = new Map(next.vms.map((v) => [v.name, v]));
    for (const name of [...this.vms.keys()]) {
      if (wanted.has(name)) continue;
      this.removeVm(name);
      this.state.delete(name);
      applied(`vms[${name}]`, { removed: true });
    }
    for (const vm of next.vms) {
      const current = this.vms.get(vm.name);
      if (current === undefined) {
        try {
          this.addVm(vm);
          applied(`vms[${vm.name}]`, { added: true });
          effective.vms.push(vm);
        } catch (err) {
          refused(`vms[${vm.name}]`, `cannot add it: ${errorMessage(err)}`);
        }
        continue;
      }
      effective.vms.push(this.reloadVm(current, vm, applied, refused));
    }
    this.config = effective;
    const status = this.statusLine();
    this.log.info('configuration reloaded', {
      vms: next.vms.map((v) => v.name).join(',') || '(none)',
      applied: report.applied.length,
      refused: report.refused.length,
    });
    this.notifier?.reloaded(
      report.refused.length === 0 ? status : `${status}; reload refused ${report.refused.length} change(s), see log`,
    );
    return report;
  }

  /** Reloads one VM; returns the configuration it runs with afterwards. */
  private reloadVm(
    current: VmRuntime,
    vm: VmConfig,
    applied: (setting: string, fields?: Record<string, unknown>) => void,
    refused: (setting: string, reason: string) => void,
  ): VmConfig {
    const name = vm.name;
    const old = current.fileConfig;
    const changed = (Object.keys(vm) as Array<keyof VmConfig>).filter((k) => !same(vm[k], old[k]));
    if (changed.length === 0) return current.config;
    const restartKeys = changed.filter((k) => !(LIVE_VM_KEYS as readonly string[]).includes(k));
    const at = (k: keyof VmConfig): string => `vms[${name}].${VM_FILE_KEYS[k]}`;
    if (restartKeys.length > 0 && !current.device.connected) {
      // Not connected: restart its back-end with the new settings (nothing to drop). If the new
      // settings cannot be served (socket in use...), the old ones are put back.
      const previous = current.config;
      const previousFile = current.fileConfig;
      this.removeVm(name);
      try {
        this.addVm(vm);
      } catch (err) {
        for (const k of changed) refused(at(k), `cannot restart its back-end with it: ${errorMessage(err)}`);
        this.addVm(previous, previousFile);
        return previous;
      }
      for (const k of changed) applied(at(k), { restartedBackend: true });
      return vm;
    }
    for (const k of restartKeys)
      refused(at(k), 'needs the back-end restarted, which would drop QEMU; kept the old value while connected');
    // The live settings apply in place; refused ones keep their running values. The file's
    // values are recorded first: a target or mode persisted from here records them.
    current.fileConfig = vm;
    const running: VmConfig = { ...vm };
    for (const k of restartKeys) (running as unknown as Record<string, unknown>)[k] = current.config[k];
    const live = changed.filter((k) => (LIVE_VM_KEYS as readonly string[]).includes(k));
    for (const k of live) {
      try {
        this.applyLive(current, k as (typeof LIVE_VM_KEYS)[number], vm);
        applied(at(k), { value: JSON.stringify(vm[k]) });
      } catch (err) {
        (running as unknown as Record<string, unknown>)[k] = current.config[k];
        refused(at(k), errorMessage(err));
      }
    }
    current.config = running;
    return running;
  }

  private applyLive(vm: VmRuntime, key: (typeof LIVE_VM_KEYS)[number], next: VmConfig): void {
    const name = next.name;
    switch (key) {
      case 'policy':
        this.setMode(name, next.policy, 'file');
        break;
      case 'targetBytes':
        this.setTarget(name, { bytes: next.targetBytes }, 'file');
        break;
      case 'inhibitDiscard':
        vm.device.setDiscardInhibited(next.inhibitDiscard);
        break;
      case 'statsIntervalMs':
        vm.device.setStatsIntervalMs(next.statsIntervalMs);
        break;
      case 'floorBytes':
      case 'shares':
        this.policy.setLimits(name, Math.ceil(next.floorBytes / BALLOON_PAGE_BYTES), next.shares);
        break;
      case 'socketAccess':
        if (next.connect) throw new VballoonError(ErrorCode.CONFIG, 'vballoon connects to this VM: no socket of ours');
        applySocketAccess(vm.config.socket, next.socketAccess);
        break;
      case 'memoryBytes':
      case 'queueSize':
        // Used for checks before QEMU connects and for qemu-args: the runtime config is enough.
        break;
    }
  }

  /** Graceful stop: stop accepting, close every connection, socket and mapping. */
  async stop(): Promise<void> {
    this.notifier?.stopping();
    this.policy.stop();
    this.events.close();
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
    const engine = this.policy.engineState.vms[name] as VmState | undefined;
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
      floorBytes: vm.config.floorBytes,
      shares: vm.config.shares,
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

  /** Keeps the operator's runtime target and mode for the next start. */
  private persist(vm: VmRuntime, targetBytes: number): void {
    try {
      this.state.set(vm.config.name, {
        targetBytes,
        mode: vm.mode,
        fileTargetBytes: vm.fileConfig.targetBytes,
        fileMode: vm.fileConfig.policy,
      });
    } catch (err) {
      this.log.error('cannot write the runtime state', { file: this.state.path, error: errorMessage(err) });
    }
  }

  /**
   * Sets the balloon size (`bytes`) or what the guest keeps (`guestBytes`, QMP's convention).
   * Refused (ETARGET, sizes in human units) past guest RAM or below the VM's floor.
   */
  setTarget(
    name: string,
    p: { bytes?: unknown; guestBytes?: unknown },
    source: 'operator' | 'file' = 'operator',
  ): VmStatus {
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
        throw new VballoonError(
          ErrorCode.BALLOON_TARGET,
          `guest size ${formatBytes(p.guestBytes)} exceeds guest RAM ${formatBytes(ram)}`,
        );
      bytes = ram - p.guestBytes;
    } else {
      if (typeof p.bytes !== 'number' || !Number.isSafeInteger(p.bytes) || p.bytes < 0)
        throw new VballoonError(
          ErrorCode.CONTROL_BAD_PARAMS,
          '"bytes" (or "guestBytes") must be a non-negative integer',
        );
      bytes = p.bytes;
    }
    // virtio-balloon's num_pages is 32 bits of 4 KiB pages: the device refuses more (in pages);
    // said here in bytes for the operator.
    if (bytes > MAX_BALLOON_BYTES)
      throw new VballoonError(
        ErrorCode.BALLOON_TARGET,
        `a balloon of ${formatBytes(bytes)} is larger than virtio-balloon can describe ` +
          `(${formatBytes(MAX_BALLOON_BYTES)})`,
      );
    if (ram !== undefined && bytes > ram)
      throw new VballoonError(
        ErrorCode.BALLOON_TARGET,
        `a balloon of ${formatBytes(bytes)} exceeds guest RAM of ${formatBytes(ram)}`,
      );
    if (ram !== undefined && ram - bytes < vm.config.floorBytes)
      throw new VballoonError(
        ErrorCode.BALLOON_TARGET,
        `a balloon of ${formatBytes(bytes)} would leave ${name} ${formatBytes(ram - bytes)}, ` +
          `below its floor of ${formatBytes(vm.config.floorBytes)}`,
      );
    const pages = Math.floor(bytes / BALLOON_PAGE_BYTES);
    this.policy.setOperatorTarget(name, pages);
    this.log.info(source === 'file' ? 'configuration set the balloon' : 'operator set the balloon', {
      vm: name,
      bytes,
      mode: vm.mode,
    });
    this.persist(vm, bytes);
    return this.status(name);
  }

  setMode(name: string, mode: unknown, source: 'operator' | 'file' = 'operator'): VmStatus {
    const vm = this.vm(name);
    if (mode !== 'auto' && mode !== 'manual')
      throw new VballoonError(ErrorCode.CONTROL_BAD_PARAMS, '"mode" must be "auto" or "manual"');
    const previous = vm.mode;
    vm.mode = mode;
    this.policy.setMode(name, mode);
    this.log.info('policy mode changed', { vm: name, mode, source });
    if (previous !== mode) this.events.emitEvent({ type: 'mode', vm: name, mode, previous });
    const engine = this.policy.engineState.vms[name] as VmState | undefined;
    this.persist(vm, (engine?.operatorPages ?? vm.device.target) * BALLOON_PAGE_BYTES);
    return this.status(name);
  }

  /** Changes how often a VM's guest is asked for statistics (kept until a restart or reload). */
  setStatsInterval(name: string, ms: unknown): VmStatus {
    const vm = this.vm(name);
    if (typeof ms !== 'number' || !Number.isInteger(ms) || ms < MIN_STATS_INTERVAL_MS || ms > 3_600_000)
      throw new VballoonError(
        ErrorCode.CONTROL_BAD_PARAMS,
        `"ms" must be an integer in ${MIN_STATS_INTERVAL_MS}..3600000 (100 ms..1 h)`,
      );
    vm.device.setStatsIntervalMs(ms);
    vm.config = { ...vm.config, statsIntervalMs: ms };
    return this.status(name);
  }

  /** Asks the guest(s) for statistics now and answers with them (`stats --fresh`). */
  async freshStats(name: string): Promise<VmStats> {
    await this.vm(name).device.requestStats();
    return this.stats(name);
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
      stats: (p) => {
        if (p['fresh'] !== undefined && typeof p['fresh'] !== 'boolean')
          throw new VballoonError(ErrorCode.CONTROL_BAD_PARAMS, '"fresh" must be true or false');
        if (p['fresh'] !== true) return all(p, (n) => this.stats(n));
        const one = all(p, (n) => this.freshStats(n));
        return Array.isArray(one) ? Promise.all(one) : one;
      },
      'set-stats-interval': (p) => this.setStatsInterval(this.vm(p['vm']).config.name, p['ms']),
      'set-target': (p) => this.setTarget(this.vm(p['vm']).config.name, p),
      'set-mode': (p) => this.setMode(this.vm(p['vm']).config.name, p['mode']),
      'set-discard': (p) => this.setDiscard(this.vm(p['vm']).config.name, p['inhibit']),
      'qemu-args': (p) => {
        const vm = this.vm(p['vm']);
        const config = { ...vm.config, memoryBytes: this.guestRamBytes(vm) };
        return { args: qemuArgs(config, vm.device), libvirtXml: libvirtXml(config, vm.device) };
      },
    };
  }
}
