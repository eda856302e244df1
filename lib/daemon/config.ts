/**
 * Daemon configuration: from a JSON or YAML file and/or command-line flags, validated with errors
 * that name the offending field ("vms[1].memory: ..."). Unknown keys are errors (a typo must not
 * silently fall back to a default). docs/cli.md documents every key.
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import YAML from 'yaml';
import { BalloonDevice, BalloonOptions } from '../device/balloon';
import { ConfigError } from '../errors';
import { DEFAULT_POLICY, Mode, PolicyConfig } from '../policy/engine';
import { parseDuration, parseSize } from '../units';

export interface VmConfig {
  name: string;
  /** vhost-user socket path. */
  socket: string;
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
}

export interface DaemonConfig {
  control: { socket: string; mode: number; tcp: { host: string; port: number } | undefined };
  metrics: { host: string; port: number } | undefined;
  log: { format: 'text' | 'json'; level: 'debug' | 'info' | 'warn' | 'error' };
  policy: Partial<PolicyConfig> & { tickMs: number };
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

type Obj = Record<string, unknown>;

function isObj(v: unknown): v is Obj {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

class Reader {
  constructor(
    private readonly obj: Obj,
    private readonly where: string,
    allowed: readonly string[],
  ) {
    for (const key of Object.keys(obj)) {
      if (!allowed.includes(key))
        throw new ConfigError(`${this.at(key)}: unknown setting (known: ${allowed.join(', ')})`);
    }
  }
  at(key: string): string {
    return this.where === '' ? key : `${this.where}.${key}`;
  }
  has(key: string): boolean {
    return this.obj[key] !== undefined;
  }
  raw(key: string): unknown {
    return this.obj[key];
  }
  str(key: string, def?: string): string {
    const v = this.obj[key] ?? def;
    if (typeof v !== 'string' || v === '') throw new ConfigError(`${this.at(key)}: expected a non-empty string`);
    return v;
  }
  bool(key: string, def: boolean): boolean {
    const v = this.obj[key] ?? def;
    if (typeof v !== 'boolean') throw new ConfigError(`${this.at(key)}: expected true or false`);
    return v;
  }
  int(key: string, def: number, min: number, max: number): number {
    const v = this.obj[key] ?? def;
    if (typeof v !== 'number' || !Number.isInteger(v) || v < min || v > max) {
      throw new ConfigError(`${this.at(key)}: expected an integer in ${min}..${max}`);
    }
    return v;
  }
  size(key: string, def?: number): number | undefined {
    const v = this.obj[key];
    if (v === undefined) return def;
    try {
      if (typeof v === 'number' && Number.isSafeInteger(v) && v >= 0) return v;
      if (typeof v === 'string') return parseSize(v);
    } catch (err) {
      throw new ConfigError(`${this.at(key)}: ${(err as Error).message}`);
    }
    throw new ConfigError(`${this.at(key)}: expected a size such as 512M or a number of bytes`);
  }
  duration(key: string, def: number): number {
    const v = this.obj[key];
    if (v === undefined) return def;
    try {
      if (typeof v === 'number' && v >= 0) return v * 1000;
      if (typeof v === 'string') return parseDuration(v);
    } catch (err) {
      throw new ConfigError(`${this.at(key)}: ${(err as Error).message}`);
    }
    throw new ConfigError(`${this.at(key)}: expected a duration such as 5s`);
  }
  oneOf<T extends string>(key: string, values: readonly T[], def: T): T {
    const v = this.obj[key] ?? def;
    if (typeof v !== 'string' || !values.includes(v as T))
      throw new ConfigError(`${this.at(key)}: expected one of ${values.join(', ')}`);
    return v as T;
  }
  sub(key: string, allowed: readonly string[]): Reader {
    const v = this.obj[key] ?? {};
    if (!isObj(v)) throw new ConfigError(`${this.at(key)}: expected a mapping`);
    return new Reader(v, this.at(key), allowed);
  }
}

const VM_KEYS = [
  'name',
  'socket',
  'connect',
  'memory',
  'mustTellHost',
  'stats',
  'deflateOnOom',
  'reporting',
  'messageQueue',
  'messageBit',
  'configSize',
  'queueSize',
  'statsInterval',
  'policy',
  'target',
  'inhibitDiscard',
] as const;

function readVm(v: unknown, where: string, runDir: string): VmConfig {
  if (!isObj(v)) throw new ConfigError(`${where}: expected a mapping`);
  const r = new Reader(v, where, VM_KEYS);
  const name = r.str('name');
  if (!/^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$/.test(name))
    throw new ConfigError(`${r.at('name')}: "${name}" must be 1-64 letters, digits, '.', '_' or '-'`);
  const memoryBytes = r.size('memory');
  const targetBytes = r.size('target', 0)!;
  if (memoryBytes !== undefined && targetBytes > memoryBytes)
    throw new ConfigError(`${r.at('target')}: larger than the guest's memory`);
  const configSize = r.int('configSize', 8, 8, 16);
  if (![8, 12, 16].includes(configSize)) throw new ConfigError(`${r.at('configSize')}: expected 8, 12 or 16`);
  const queueSize = r.int('queueSize', 128, 1, 1024);
  if ((queueSize & (queueSize - 1)) !== 0) throw new ConfigError(`${r.at('queueSize')}: expected a power of two`);
  const statsIntervalMs = r.duration('statsInterval', 5000);
  if (statsIntervalMs < 100) throw new ConfigError(`${r.at('statsInterval')}: at least 100ms`);
  return {
    name,
    socket: r.has('socket') ? r.str('socket') : path.join(runDir, `${name}.sock`),
    connect: r.bool('connect', false),
    memoryBytes,
    mustTellHost: r.bool('mustTellHost', true),
    statsQueue: r.bool('stats', true),
    deflateOnOom: r.bool('deflateOnOom', true),
    pageReporting: r.bool('reporting', true),
    messageQueue: r.bool('messageQueue', true),
    messageBit: r.oneOf('messageBit', ['vballoon', 'seed'] as const, 'vballoon'),
    configSize: configSize as 8 | 12 | 16,
    queueSize,
    statsIntervalMs,
    policy: r.oneOf('policy', ['manual', 'auto'] as const, 'manual'),
    targetBytes,
    inhibitDiscard: r.bool('inhibitDiscard', false),
  };
}

/** Validates a parsed config document (from a file, or built from flags). */
export function readConfig(doc: unknown): DaemonConfig {
  const top = isObj(doc) ? doc : doc === undefined || doc === null ? {} : undefined;
  if (top === undefined) throw new ConfigError('the configuration must be a mapping');
  const r = new Reader(top, '', ['control', 'metrics', 'log', 'policy', 'vms']);
  const runDir = defaultRunDir();
  const control = r.sub('control', ['socket', 'mode', 'tcp']);
  const modeRaw = control.raw('mode');
  let mode = 0o600;
  if (modeRaw !== undefined) {
    const parsed =
      typeof modeRaw === 'string' && /^0?[0-7]{3}$/.test(modeRaw)
        ? parseInt(modeRaw, 8)
        : typeof modeRaw === 'number'
          ? modeRaw
          : NaN;
    if (!Number.isInteger(parsed) || parsed < 0 || parsed > 0o777)
      throw new ConfigError(`control.mode: expected an octal mode such as "0600"`);
    mode = parsed;
  }
  let tcp: { host: string; port: number } | undefined;
  if (control.has('tcp')) {
    const t = control.sub('tcp', ['host', 'port']);
    tcp = { host: t.str('host', '127.0.0.1'), port: t.int('port', 0, 1, 65535) };
  }
  let metrics: DaemonConfig['metrics'] = { host: '127.0.0.1', port: 9464 };
  if (r.raw('metrics') === false) metrics = undefined;
  else {
    const m = r.sub('metrics', ['host', 'port']);
    metrics = { host: m.str('host', '127.0.0.1'), port: m.int('port', 9464, 0, 65535) };
  }
  const log = r.sub('log', ['format', 'level']);
  const policyReader = r.sub('policy', ['tick', ...Object.keys(DEFAULT_POLICY)]);
  const policy: DaemonConfig['policy'] = { tickMs: policyReader.duration('tick', 1000) };
  for (const key of Object.keys(DEFAULT_POLICY) as Array<keyof PolicyConfig>) {
    if (!policyReader.has(key)) continue;
    const v = policyReader.raw(key);
    if (typeof v !== 'number' || !Number.isFinite(v) || v < 0)
      throw new ConfigError(`policy.${key}: expected a non-negative number`);
    policy[key] = v;
  }
  const vmsRaw = r.raw('vms') ?? [];
  if (!Array.isArray(vmsRaw)) throw new ConfigError('vms: expected a list');
  const vms = vmsRaw.map((v, i) => readVm(v, `vms[${i}]`, runDir));
  const names = new Set<string>();
  const sockets = new Set<string>();
  vms.forEach((vm, i) => {
    if (names.has(vm.name)) throw new ConfigError(`vms[${i}].name: "${vm.name}" is used twice`);
    if (sockets.has(vm.socket)) throw new ConfigError(`vms[${i}].socket: "${vm.socket}" is used twice`);
    names.add(vm.name);
    sockets.add(vm.socket);
  });
  return {
    control: { socket: control.has('socket') ? control.str('socket') : defaultControlSocket(), mode, tcp },
    metrics,
    log: {
      format: log.oneOf('format', ['text', 'json'] as const, 'text'),
      level: log.oneOf('level', ['debug', 'info', 'warn', 'error'] as const, 'info'),
    },
    policy,
    vms,
  };
}

/** Reads and validates a JSON or YAML file (by extension; YAML accepts JSON too). */
export function loadConfigFile(file: string): unknown {
  let text: string;
  try {
    text = fs.readFileSync(file, 'utf8');
  } catch (err) {
    throw new ConfigError(`cannot read ${file}: ${(err as Error).message}`);
  }
  try {
    return file.endsWith('.json') ? JSON.parse(text) : YAML.parse(text);
  } catch (err) {
    throw new ConfigError(`${file}: not valid ${file.endsWith('.json') ? 'JSON' : 'YAML'}: ${(err as Error).message}`);
  }
}

/** Parses a `--vm name=vm0,socket=...,memory=1G,policy=auto` flag into a VM mapping. */
export function parseVmFlag(text: string): Obj {
  const out: Obj = {};
  for (const part of text.split(',')) {
    const eq = part.indexOf('=');
    if (eq <= 0) throw new ConfigError(`--vm ${text}: "${part}" is not key=value`);
    const key = part.slice(0, eq).trim();
    const value = part.slice(eq + 1).trim();
    out[key] =
      value === 'true'
        ? true
        : value === 'false'
          ? false
          : /^\d+$/.test(value) && key !== 'name' && key !== 'memory' && key !== 'target'
            ? Number(value)
            : value;
  }
  return out;
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
    maxQueueSize: 1024,
    statsIntervalMs: vm.statsIntervalMs,
    inhibitDiscard: vm.inhibitDiscard,
  };
}

/** The QEMU options that attach this VM's balloon (memory backend, chardev, device). */
export function qemuArgs(vm: VmConfig, device: BalloonDevice = new BalloonDevice(deviceOptions(vm))): string[] {
  const mem = vm.memoryBytes === undefined ? '<guest RAM, e.g. 1G>' : `${Math.round(vm.memoryBytes / 2 ** 20)}M`;
  const chardev = vm.connect
    ? `socket,id=vb-${vm.name},path=${vm.socket},server=on,wait=off`
    : `socket,id=vb-${vm.name},path=${vm.socket}`;
  return [
    '-m',
    mem,
    '-object',
    `memory-backend-memfd,id=mem-${vm.name},size=${mem},share=on`,
    '-machine',
    `memory-backend=mem-${vm.name}`,
    '-chardev',
    chardev,
    '-device',
    `vhost-user-test-device-pci,chardev=vb-${vm.name},virtio-id=5,num_vqs=${device.numQueues},vq_size=${vm.queueSize},config_size=${vm.configSize}`,
  ];
}
