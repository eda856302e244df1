/**
 * `vballoon serve`: one process serving many VMs. Per VM a balloon device and its vhost-user
 * back-end (listening, or connecting to a QEMU that listens), all under one policy loop; the
 * control API; the metrics endpoint; reload and graceful shutdown.
 */
import * as fs from 'node:fs';
import { Clock, systemClock } from '../clock';
import { BalloonDevice } from '../device/balloon';
import { BALLOON_PAGE_BYTES } from '../device/constants';
import { ErrorCode, errorMessage, VballoonError } from '../errors';
import { Logger } from '../log';
import { closeQuietly, native } from '../native';
import { Mode, PolicyAction, VmState } from '../policy/engine';
import { HostMemoryReaders } from '../policy/host';
import { PolicyLoop } from '../policy/loop';
import { VhostUserBackend } from '../vhost/server';
import { Session } from '../vhost/session';
import { DaemonConfig, deviceOptions, libvirtXml, MIN_STATS_INTERVAL_MS, qemuArgs, VmConfig } from './config';
import { DaemonEvents, EVENT_TYPES } from './events';
import { StateStore } from './state';
import { FdHolder, groupByVm, NamedFd, VmSurvival } from './survival';
import { SystemdNotifier } from './systemd';
import { ControlServer } from './control';
import { DaemonMetrics } from './metrics';
import { applyReload, ReloadHost, ReloadReport } from './reload';
import {
  applySocketAccess,
  guestRamBytes,
  resolveTargetBytes,
  statsOf,
  statusOf,
  VmRuntime,
  VmStats,
  VmStatus,
} from './vm-runtime';

export type { ReloadReport } from './reload';
export type { VmStats, VmStatus } from './vm-runtime';

export interface DaemonOptions {
  log: Logger;
  clock?: Clock;
  host?: HostMemoryReaders;
  /** The service manager (READY=1, STATUS=, RELOADING=1); none when not under one. */
  notifier?: SystemdNotifier;
  /** Applies new log settings (a reload); without it a log change is refused with a log line. */
  reconfigureLog?(log: DaemonConfig['log']): void;
  /**
   * Restart survival (lib/daemon/survival.ts): where descriptors are kept for the next process,
   * and what the previous one left. Without it a restart drops every VM's balloon.
   */
  survival?: {
    holder: FdHolder;
    inherited: NamedFd[];
    /**
     * A takeover (`vballoon serve --takeover`): the new process's receiving address becomes a
     * holder; `finish()` tells it everything was sent.
     */
    handoverTo?(address: string): FdHolder & { finish(): void };
    /** After a handover this process must end at once, without closing any VM (serve.ts exits). */
    onHandedOver?(): void;
  };
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
  /** Descriptors the previous process left, by VM, until each VM took its own. */
  private inherited = new Map<string, Map<string, number>>();
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
    this.metrics = new DaemonMetrics(
      () =>
        [...this.vms.values()].map((v) => ({
          name: v.config.name,
          device: v.device,
          mode: v.mode,
          connections: () => v.backend.counters.connections,
        })),
      { log: this.log.child({ component: 'metrics' }), now: () => this.clock.now() },
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
    const survival = this.options.survival;
    if (survival !== undefined && survival.inherited.length > 0) {
      const { byVm, other } = groupByVm(
        survival.inherited,
        this.config.vms.map((v) => v.name),
      );
      this.inherited = byVm;
      for (const f of other) {
        // A VM the configuration no longer has, or a name we never wrote: its VM is not served.
        closeQuietly(f.fd);
        survival.holder.remove(f.name);
      }
      if (other.length > 0)
        this.log.warn('descriptors from the previous process that no configured VM uses were dropped', {
          names: other.map((f) => f.name).join(','),
        });
      this.log.info('taking over from the previous process', {
        descriptors: survival.inherited.length,
        vms: [...byVm.keys()].join(',') || '(none)',
      });
    }
    for (const vm of this.config.vms) this.addVm(vm);
    this.inherited = new Map();
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
    const survival = this.options.survival;
    const keeper =
      survival === undefined
        ? undefined
        : new VmSurvival(vm.name, survival.holder, log, this.inherited.get(vm.name), (code) =>
            this.metrics.error(vm.name, code),
          );
    this.inherited.delete(vm.name);
    try {
      this.addVmWith(vm, fileConfig, log, keeper);
    } catch (err) {
      keeper?.forget();
      throw err;
    }
  }

  private addVmWith(vm: VmConfig, fileConfig: VmConfig, log: Logger, keeper: VmSurvival | undefined): void {
    const device = new BalloonDevice({
      ...deviceOptions(vm),
      clock: this.clock,
      log,
      ...(keeper === undefined ? {} : { journal: keeper.bitmap }),
    });
    const previous = keeper?.previous;
    // A target or mode the operator set at run time survives a restart, unless the file's value
    // changed since (then the file wins).
    const saved = this.state.get(vm.name);
    const fromState = saved !== undefined && saved.fileTargetBytes === vm.targetBytes && saved.fileMode === vm.policy;
    let targetBytes = fromState ? saved.targetBytes : vm.targetBytes;
    let mode = fromState ? saved.mode : vm.policy;
    if (fromState && (saved.targetBytes !== vm.targetBytes || saved.mode !== vm.policy))
      log.info('restored the runtime target and mode', { targetBytes, mode, stateFile: this.state.path });
    if (saved !== undefined && !fromState) this.state.delete(vm.name);
    if (previous !== undefined) {
      // The previous process of this daemon was serving this VM a moment ago: it knows best.
      const restored = device.restore(previous.doc.device, keeper!.bitmap.runs());
      targetBytes = previous.doc.operatorPages * BALLOON_PAGE_BYTES;
      mode = previous.doc.mode;
      log.info('took over the VM from the previous process', {
        balloonedPages: restored,
        targetPages: previous.doc.device.targetPages,
        actualPages: device.actual,
        mode,
        connected: previous.doc.session !== null,
      });
    }
    const pages = Math.floor(targetBytes / BALLOON_PAGE_BYTES);
    if (pages > 0 && previous === undefined) device.setTargetPages(pages, 'operator');
    const limits = { floorPages: Math.ceil(vm.floorBytes / BALLOON_PAGE_BYTES), shares: vm.shares };
    const backend = new VhostUserBackend(device, {
      log,
      events: {
        onError: (code) => this.metrics.error(vm.name, code),
      },
      ...(keeper === undefined ? {} : { onHandled: (request, last) => keeper.afterMessage(request, last) }),
    });
    device.on('invalid', (e: { reason: string }) => this.metrics.error(vm.name, e.reason));
    device.on('ack', (e: { seconds: number }) => this.metrics.ack(vm.name, e.seconds));
    this.events.attach(vm.name, device);
    device.on('connection', () => this.notifier?.status(this.statusLine()));
    const runtime: VmRuntime = { config: vm, fileConfig, device, backend, mode, survival: keeper };
    const listenFd = previous?.listenFd;
    if (vm.connect) {
      if (listenFd !== undefined) closeQuietly(listenFd);
      const resumed = this.resumeSession(runtime, log);
      const connect = (): void => {
        backend
          .connect(vm.socket, { retryIntervalMs: 1000, reconnect: true })
          .catch((err: unknown) => log.error('cannot connect to the front-end', { error: errorMessage(err) }));
      };
      // A resumed connection that ends is followed by connecting again, as any other would be.
      if (resumed === undefined) connect();
      else resumed.onClose(() => this.vms.get(vm.name) === runtime && connect());
    } else {
      if (listenFd !== undefined) backend.adoptListener(listenFd, vm.socket);
      else this.listen(vm, backend);
      this.resumeSession(runtime, log);
    }
    keeper?.dropUnused();
    this.vms.set(vm.name, runtime);
    this.policy.addVm(vm.name, device, mode, pages, limits);
    keeper?.follow(device, backend, () => {
      const engine = this.policy.engineState.vms[vm.name] as VmState | undefined;
      return { mode: runtime.mode, operatorPages: engine?.operatorPages ?? device.target };
    });
  }

  /** Serves the connection the previous process served, if it was kept. */
  private resumeSession(vm: VmRuntime, log: Logger): Session | undefined {
    const image = vm.survival?.takeSession();
    if (image === undefined) return undefined;
    try {
      const session = vm.backend.resume(image);
      log.info('serving the front-end connection the previous process served', {
        rings: image.rings.filter((r) => r.started).length,
        regions: image.regions.length,
      });
      log.debug('resumed rings', {
        rings: image.rings
          .map((r) => `${r.index}:${r.started ? 'started' : 'stopped'}:kick${r.kickFd}:call${r.callFd}:err${r.errFd}`)
          .join(' '),
      });
      return session;
    } catch (err) {
      log.error('cannot take over the front-end connection: the VM loses its balloon until it reconnects', {
        error: errorMessage(err),
      });
      return undefined;
    }
  }

  /** Listens on a VM's socket: created with no access for others, then given its owner, group and mode. */
  private listen(vm: VmConfig, backend: VhostUserBackend): void {
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

  private removeVm(name: string): void {
    const vm = this.vms.get(name);
    if (vm === undefined) return;
    this.policy.removeVm(name);
    vm.backend.close();
    vm.survival?.forget();
    this.events.detach(name);
    vm.device.removeAllListeners();
    this.vms.delete(name);
    this.log.info('VM removed', { vm: name });
  }

  /** Applies a new configuration (SIGHUP): lib/daemon/reload.ts says what applies and what is refused. */
  reload(next: DaemonConfig): ReloadReport {
    this.notifier?.reloading();
    let report: ReloadReport;
    try {
      report = applyReload(this.reloadHost(), next);
    } catch (err) {
      // Never leave the service manager waiting in "reloading".
      this.notifier?.reloaded(`${this.statusLine()}; reload failed: ${errorMessage(err)}`);
      throw err;
    }
    const status = this.statusLine();
    const refused = report.refused.length;
    this.notifier?.reloaded(refused === 0 ? status : `${status}; reload refused ${refused} change(s), see log`);
    return report;
  }

  /** What reload.ts may use of this daemon. */
  private reloadHost(): ReloadHost {
    // eslint-disable-next-line @typescript-eslint/no-this-alias -- the host object forwards to this daemon
    const daemon = this;
    return {
      log: this.log,
      get config() {
        return daemon.config;
      },
      set config(c: DaemonConfig) {
        daemon.config = c;
      },
      vms: this.vms,
      policy: this.policy,
      state: this.state,
      reconfigureLog: this.options.reconfigureLog?.bind(this.options),
      setControlMode: (mode) => this.control?.setMode(mode),
      addVm: (vm, file) => this.addVm(vm, file),
      removeVm: (name) => this.removeVm(name),
      setMode: (name, mode, source) => this.setMode(name, mode, source),
      setTarget: (name, p, source) => this.setTarget(name, p, source),
    };
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

  // ---- restart survival ----------------------------------------------------------------------

  /**
   * Ends this process's service without ending any VM's (a restart under a service manager that
   * keeps our descriptors): the policy stops, pending discards are carried out, and every VM's
   * state is written once more. The caller exits next; nothing is closed, so no front-end notices.
   */
  suspend(): void {
    this.policy.stop();
    for (const vm of this.vms.values()) {
      vm.device.flushDiscards();
      vm.survival?.save();
    }
    this.log.info('suspended for a restart: every VM stays connected', { vms: this.vms.size });
  }

  /**
   * `handover` (control API): gives every VM to a new process listening at `to` (a takeover):
   * suspends, sends each VM's descriptors under their names, then this process ends.
   */
  handover(to: unknown): { vms: number; descriptors: number } {
    const survival = this.options.survival;
    if (survival?.handoverTo === undefined)
      throw new VballoonError(ErrorCode.CONTROL_BAD_PARAMS, 'this daemon cannot hand its VMs over');
    if (typeof to !== 'string' || !to.startsWith('/'))
      throw new VballoonError(ErrorCode.CONTROL_BAD_PARAMS, '"to" must be the absolute path of the receiving socket');
    const target = survival.handoverTo(to);
    this.suspend();
    let descriptors = 0;
    for (const vm of this.vms.values()) {
      for (const f of vm.survival?.descriptors() ?? []) {
        target.store(f.name, [f.fd]);
        descriptors++;
      }
    }
    target.finish();
    this.log.info('handed every VM over to the new process', { to, vms: this.vms.size, descriptors });
    survival.onHandedOver?.();
    return { vms: this.vms.size, descriptors };
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

  status(name: string): VmStatus {
    const vm = this.vm(name);
    const engine = this.policy.engineState.vms[name] as VmState | undefined;
    const cooldown =
      engine === undefined ? 0 : Math.max(0, Math.round((engine.cooldownUntilMs - this.clock.now()) / 1000));
    return statusOf(vm, vm.device.snapshot(), cooldown);
  }

  stats(name: string): VmStats {
    return statsOf(name, this.vm(name).device.snapshot().stats);
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
    const bytes = resolveTargetBytes(vm, p);
    const pages = Math.floor(bytes / BALLOON_PAGE_BYTES);
    this.policy.setOperatorTarget(name, pages);
    this.log.info(source === 'file' ? 'configuration set the balloon' : 'operator set the balloon', {
      vm: name,
      bytes,
      mode: vm.mode,
    });
    this.persist(vm, bytes);
    vm.survival?.save();
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
    vm.survival?.save();
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
    vm.survival?.save();
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
    vm.survival?.save();
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
      handover: (p) => this.handover(p['to']),
      'set-mode': (p) => this.setMode(this.vm(p['vm']).config.name, p['mode']),
      'set-discard': (p) => this.setDiscard(this.vm(p['vm']).config.name, p['inhibit']),
      'qemu-args': (p) => {
        const vm = this.vm(p['vm']);
        const config = { ...vm.config, memoryBytes: guestRamBytes(vm) };
        return { args: qemuArgs(config, vm.device), libvirtXml: libvirtXml(config, vm.device) };
      },
    };
  }
}
