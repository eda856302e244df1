/**
 * The daemon's configuration as the rest of the daemon sees it (already checked by config.ts):
 * the types, the defaults that depend on the environment, and the balloon options of a VM.
 */
import * as os from 'node:os';
import * as path from 'node:path';
import { BalloonOptions } from '../device/balloon';
import { MIN_STATS_INTERVAL_MS } from '../device/stats-queue';
import { Mode, PolicyConfig } from '../policy/engine';

/** The shortest stats period the device accepts (checked here once, with the device's constant). */
export { MIN_STATS_INTERVAL_MS };

/** Largest vq_size QEMU accepts for a virtqueue (VIRTQUEUE_MAX_SIZE). */
export const MAX_QUEUE_SIZE = 1024;
/** Default weight of a VM in host-pressure arbitration (Proxmox's default too). */
export const DEFAULT_SHARES = 1000;

/** Who may connect to a VM's socket (libvirt runs QEMU as `libvirt-qemu`). */
export interface SocketAccess {
  /** Owner uid, or undefined to keep the daemon's. */
  uid: number | undefined;
  /** Group gid, or undefined to keep the daemon's. */
  gid: number | undefined;
  /** Permission bits of the socket file. */
  mode: number;
}

export interface VmConfig {
  name: string;
  /** vhost-user socket path. */
  socket: string;
  socketAccess: SocketAccess;
  /** Connect to a front-end listening there (QEMU `server=on`) instead of listening. */
  connect: boolean;
  /** Guest RAM (for --guest-size, target checks and qemu-args); learnt from QEMU when omitted. */
  memoryBytes: number | undefined;
  mustTellHost: boolean;
  statsQueue: boolean;
  deflateOnOom: boolean;
  pageReporting: boolean;
  messageQueue: boolean;
  messageBit: 'vballoon' | 'seed';
  configSize: 8 | 12 | 16;
  /** QEMU's vq_size for qemu-args. */
  queueSize: number;
  statsIntervalMs: number;
  policy: Mode;
  /** Initial balloon size (the operator's value). */
  targetBytes: number;
  inhibitDiscard: boolean;
  /** The guest keeps at least this much: no target (operator's or policy's) goes below it. */
  floorBytes: number;
  /** Weight in host-pressure arbitration: a VM gives in proportion to its shares. */
  shares: number;
}

export type LogLevel = 'debug' | 'info' | 'warn' | 'error';

export interface DaemonConfig {
  control: { socket: string; mode: number; tcp: { host: string; port: number } | undefined };
  metrics: { host: string; port: number } | undefined;
  log: { format: 'text' | 'json'; level: LogLevel };
  policy: PolicyConfig & { tickMs: number };
  /** Where runtime targets and modes are kept across restarts (undefined: not kept). */
  stateFile: string | undefined;
  vms: VmConfig[];
}

/** The default runtime directory: /run/vballoon for root, else $XDG_RUNTIME_DIR/vballoon. */
export function defaultRunDir(): string {
  if (process.getuid?.() === 0) return '/run/vballoon';
  return path.join(process.env['XDG_RUNTIME_DIR'] ?? os.tmpdir(), 'vballoon');
}

export function defaultControlSocket(): string {
  return process.env['VBALLOON_CONTROL'] ?? path.join(defaultRunDir(), 'control.sock');
}

/**
 * Default state file: in $STATE_DIRECTORY when systemd gives one (StateDirectory= in the shipped
 * unit), else none: a daemon started by hand (tests, benchmarks, demos) keeps no state unless
 * `state.file` says where.
 */
export function defaultStateFile(): string | undefined {
  const dir = process.env['STATE_DIRECTORY']?.split(':')[0];
  return dir === undefined || dir === '' ? undefined : path.join(dir, 'state.json');
}

/** Balloon device options for a VM. */
export function deviceOptions(vm: VmConfig): BalloonOptions {
  return {
    mustTellHost: vm.mustTellHost,
    statsQueue: vm.statsQueue,
    deflateOnOom: vm.deflateOnOom,
    pageReporting: vm.pageReporting,
    messageQueue: vm.messageQueue,
    messageBit: vm.messageBit,
    configSize: vm.configSize,
    maxQueueSize: MAX_QUEUE_SIZE,
    statsIntervalMs: vm.statsIntervalMs,
    inhibitDiscard: vm.inhibitDiscard,
  };
}
