/**
 * SIGHUP: applies a new configuration to a running daemon. Every changed setting is either applied
 * or refused with a log line naming it; nothing is silently ignored:
 * - log and policy settings, the state file and the control socket's mode apply at once;
 * - the control socket's path, TCP and the metrics endpoint need a restart: refused;
 * - VMs are added and removed;
 * - for a VM, mode, target, discard inhibit, floor, shares, socket owner/group/mode, memory and
 *   queueSize apply in place; the other settings (socket path, features, stats interval) need
 *   its back-end restarted, which is done while QEMU is not connected and refused while it is.
 * Mode and target apply only when the file's value changed: a value the operator set at run
 * time is not overwritten by an unchanged file.
 */
import { BALLOON_PAGE_BYTES } from '../device/constants';
import { ErrorCode, errorMessage, VballoonError } from '../errors';
import { Logger } from '../log';
import { Mode } from '../policy/engine';
import { PolicyLoop } from '../policy/loop';
import { DaemonConfig, VmConfig } from './config';
import { StateStore } from './state';
import { applySocketAccess, VmRuntime } from './vm-runtime';

/** What a reload needs of the daemon. */
export interface ReloadHost {
  readonly log: Logger;
  /** The running configuration; replaced by what the reload made effective. */
  config: DaemonConfig;
  readonly vms: ReadonlyMap<string, VmRuntime>;
  readonly policy: PolicyLoop;
  readonly state: StateStore;
  /** Applies new log settings; undefined when the logger cannot change. */
  readonly reconfigureLog: ((log: DaemonConfig['log']) => void) | undefined;
  setControlMode(mode: number): void;
  addVm(vm: VmConfig, fileConfig?: VmConfig): void;
  removeVm(name: string): void;
  setMode(name: string, mode: Mode, source: 'file'): unknown;
  setTarget(name: string, p: { bytes: number }, source: 'file'): unknown;
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

const same = (a: unknown, b: unknown): boolean => JSON.stringify(a) === JSON.stringify(b);

export function applyReload(d: ReloadHost, next: DaemonConfig): ReloadReport {
  const report: ReloadReport = { applied: [], refused: [] };
  const applied = (setting: string, fields: Record<string, unknown> = {}): void => {
    report.applied.push(setting);
    d.log.info('reload: applied', { setting, ...fields });
  };
  const refused = (setting: string, reason: string): void => {
    report.refused.push({ setting, reason });
    d.log.warn('reload: refused', { setting, reason });
  };
  const cur = d.config;
  const effective: DaemonConfig = { ...next, control: cur.control, metrics: cur.metrics, vms: [] };

  if (next.control.socket !== cur.control.socket) refused('control.socket', 'takes effect at restart');
  if (!same(next.control.tcp, cur.control.tcp)) refused('control.tcp', 'takes effect at restart');
  if (next.control.mode !== cur.control.mode) {
    d.setControlMode(next.control.mode);
    effective.control = { ...cur.control, mode: next.control.mode };
    applied('control.mode', { mode: `0${next.control.mode.toString(8)}` });
  }
  if (!same(next.metrics, cur.metrics)) refused('metrics', 'the metrics endpoint moves at restart');
  if (!same(next.log, cur.log)) {
    if (d.reconfigureLog === undefined) {
      refused('log', 'this daemon was started without a reconfigurable logger');
      effective.log = cur.log;
    } else {
      d.reconfigureLog(next.log);
      applied('log', { format: next.log.format, level: next.log.level });
    }
  }
  if (!same(next.policy, cur.policy)) {
    const { tickMs, ...engine } = next.policy;
    d.policy.setConfig(engine, tickMs);
    const changed = Object.keys(next.policy).filter(
      (k) => !same(next.policy[k as keyof typeof next.policy], cur.policy[k as keyof typeof cur.policy]),
    );
    applied('policy', { changed: changed.join(',') });
  }
  if (next.stateFile !== cur.stateFile) {
    d.state.setFile(next.stateFile);
    applied('state.file', { file: next.stateFile ?? 'off' });
  }

  const wanted = new Map(next.vms.map((v) => [v.name, v]));
  for (const name of [...d.vms.keys()]) {
    if (wanted.has(name)) continue;
    d.removeVm(name);
    d.state.delete(name);
    applied(`vms[${name}]`, { removed: true });
  }
  for (const vm of next.vms) {
    const current = d.vms.get(vm.name);
    if (current === undefined) {
      try {
        d.addVm(vm);
        applied(`vms[${vm.name}]`, { added: true });
        effective.vms.push(vm);
      } catch (err) {
        refused(`vms[${vm.name}]`, `cannot add it: ${errorMessage(err)}`);
      }
      continue;
    }
    effective.vms.push(reloadVm(d, current, vm, applied, refused));
  }
  d.config = effective;
  d.log.info('configuration reloaded', {
    vms: next.vms.map((v) => v.name).join(',') || '(none)',
    applied: report.applied.length,
    refused: report.refused.length,
  });
  return report;
}

/** Reloads one VM; returns the configuration it runs with afterwards. */
function reloadVm(
  d: ReloadHost,
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
    d.removeVm(name);
    try {
      d.addVm(vm);
    } catch (err) {
      for (const k of changed) refused(at(k), `cannot restart its back-end with it: ${errorMessage(err)}`);
      d.addVm(previous, previousFile);
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
      applyLive(d, current, k as (typeof LIVE_VM_KEYS)[number], vm);
      applied(at(k), { value: JSON.stringify(vm[k]) });
    } catch (err) {
      (running as unknown as Record<string, unknown>)[k] = current.config[k];
      refused(at(k), errorMessage(err));
    }
  }
  current.config = running;
  return running;
}

function applyLive(d: ReloadHost, vm: VmRuntime, key: (typeof LIVE_VM_KEYS)[number], next: VmConfig): void {
  const name = next.name;
  switch (key) {
    case 'policy':
      d.setMode(name, next.policy, 'file');
      break;
    case 'targetBytes':
      d.setTarget(name, { bytes: next.targetBytes }, 'file');
      break;
    case 'inhibitDiscard':
      vm.device.setDiscardInhibited(next.inhibitDiscard);
      break;
    case 'statsIntervalMs':
      vm.device.setStatsIntervalMs(next.statsIntervalMs);
      break;
    case 'floorBytes':
    case 'shares':
      d.policy.setLimits(name, Math.ceil(next.floorBytes / BALLOON_PAGE_BYTES), next.shares);
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
