/**
 * Daemon configuration: one schema (config-schema.ts, zod) for the file (JSON or YAML) and the
 * `--vm` flags. Sizes and durations are written with units ("512M", "5s"); every value has a
 * range; cross-field rules (hysteresis, cooldowns, floors) are checked here once, so the device,
 * the policy and the daemon can trust what they are given. Errors name the field
 * ("vms[1].memory: ...") and are ConfigErrors. Unknown keys are errors (a typo must not silently
 * fall back to a default). docs/cli.md explains every key; docs/config.schema.json is generated.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import YAML from 'yaml';
import { z } from 'zod';
import { ConfigError } from '../errors';
import { DEFAULT_POLICY, PolicyConfig } from '../policy/engine';
import { formatBytes, formatDuration } from '../units';
import { configSchema, fieldPath, issueText, POLICY_FIELDS, PolicyKey, vmSchema } from './config-schema';
import {
  DaemonConfig,
  DEFAULT_SHARES,
  defaultControlSocket,
  defaultRunDir,
  defaultStateFile,
  VmConfig,
} from './config-types';

export * from './config-types';
export { configJsonSchema, fieldPath } from './config-schema';
export { libvirtXml, qemuArgs } from './qemu-args';

// ---- from the parsed document to the daemon's configuration ---------------------------------------

type ParsedVm = z.output<typeof vmSchema>;
type Parsed = z.output<typeof configSchema>;
type Issue = { path: PropertyKey[]; message: string };

function buildVm(v: ParsedVm, runDir: string): VmConfig {
  return {
    name: v.name,
    socket: v.socket ?? path.join(runDir, `${v.name}.sock`),
    socketAccess: { uid: v.socketOwner, gid: v.socketGroup, mode: v.socketMode ?? 0o600 },
    connect: v.connect ?? false,
    memoryBytes: v.memory,
    mustTellHost: v.mustTellHost ?? true,
    statsQueue: v.stats ?? true,
    deflateOnOom: v.deflateOnOom ?? true,
    pageReporting: v.reporting ?? true,
    messageQueue: v.messageQueue ?? true,
    messageBit: v.messageBit ?? 'vballoon',
    configSize: v.configSize ?? 8,
    queueSize: v.queueSize ?? 128,
    statsIntervalMs: v.statsInterval ?? 5000,
    policy: v.policy ?? 'manual',
    targetBytes: v.target ?? 0,
    inhibitDiscard: v.inhibitDiscard ?? false,
    floorBytes: v.floor ?? 0,
    shares: v.shares ?? DEFAULT_SHARES,
  };
}

function buildPolicy(p: Parsed['policy']): DaemonConfig['policy'] {
  const out: PolicyConfig & { tickMs: number } = { ...DEFAULT_POLICY, tickMs: p?.tick ?? 1000 };
  for (const [key, [field]] of Object.entries(POLICY_FIELDS) as unknown as Array<[PolicyKey, [keyof PolicyConfig]]>) {
    const v = p?.[key];
    if (v !== undefined) out[field] = v;
  }
  return out;
}

/** Rules between fields; each names the field to change. */
function crossFieldIssues(config: DaemonConfig): Issue[] {
  const issues: Issue[] = [];
  const p = config.policy;
  const add = (where: PropertyKey[], message: string): void => void issues.push({ path: where, message });
  if (p.hostRecoverFraction <= p.hostLowFraction)
    add(
      ['policy', 'hostRecoverFraction'],
      `${p.hostRecoverFraction} must be above policy.hostLowFraction (${p.hostLowFraction}): ` +
        'host pressure would start and end at the same level (no hysteresis)',
    );
  if (p.hostPsiSomeLow >= p.hostPsiSomeHigh)
    add(
      ['policy', 'hostPsiSomeLow'],
      `${p.hostPsiSomeLow} must be below policy.hostPsiSomeHigh (${p.hostPsiSomeHigh}) (hysteresis)`,
    );
  if (p.cooldownMaxMs < p.cooldownBaseMs)
    add(
      ['policy', 'cooldownMax'],
      `${formatDuration(p.cooldownMaxMs)} is shorter than policy.cooldownBase (${formatDuration(p.cooldownBaseMs)})`,
    );
  if (p.stallWindowMs < p.tickMs)
    add(
      ['policy', 'stallWindow'],
      `${formatDuration(p.stallWindowMs)} is shorter than policy.tick (${formatDuration(p.tickMs)})`,
    );
  const names = new Map<string, number>();
  const sockets = new Map<string, number>();
  config.vms.forEach((vm, i) => {
    if (names.has(vm.name)) add(['vms', i, 'name'], `"${vm.name}" is used twice (also vms[${names.get(vm.name)}])`);
    if (sockets.has(vm.socket))
      add(['vms', i, 'socket'], `"${vm.socket}" is used twice (also vms[${sockets.get(vm.socket)}])`);
    names.set(vm.name, i);
    sockets.set(vm.socket, i);
    if (vm.socket === config.control.socket) add(['vms', i, 'socket'], 'is the control socket');
    if ((vm.queueSize & (vm.queueSize - 1)) !== 0)
      add(['vms', i, 'queueSize'], `${vm.queueSize} is not a power of two`);
    if (vm.memoryBytes !== undefined) {
      if (vm.targetBytes > vm.memoryBytes)
        add(
          ['vms', i, 'target'],
          `${formatBytes(vm.targetBytes)} is larger than the guest's memory (${formatBytes(vm.memoryBytes)})`,
        );
      else if (vm.floorBytes > vm.memoryBytes)
        add(
          ['vms', i, 'floor'],
          `${formatBytes(vm.floorBytes)} is larger than the guest's memory (${formatBytes(vm.memoryBytes)})`,
        );
      else if (vm.targetBytes > vm.memoryBytes - vm.floorBytes)
        add(
          ['vms', i, 'target'],
          `${formatBytes(vm.targetBytes)} would leave the guest ${formatBytes(vm.memoryBytes - vm.targetBytes)}, ` +
            `below its floor of ${formatBytes(vm.floorBytes)}`,
        );
    }
    if (vm.policy === 'auto' && vm.statsQueue && vm.statsIntervalMs >= p.statsMaxAgeMs)
      add(
        ['vms', i, 'statsInterval'],
        `${formatDuration(vm.statsIntervalMs)} is not shorter than policy.statsMaxAge ` +
          `(${formatDuration(p.statsMaxAgeMs)}): auto mode would never trust this guest's stats`,
      );
    if (vm.socketAccess.uid !== undefined || vm.socketAccess.gid !== undefined) {
      if (vm.connect)
        add(
          ['vms', i, 'socketOwner'],
          'socketOwner and socketGroup apply to sockets vballoon listens on (connect: false)',
        );
    }
  });
  return issues;
}

/**
 * Validates a parsed config document (from a file, flags, or both) and fills in defaults.
 * @throws ConfigError listing every problem, one per line, each naming its field.
 */
export function readConfig(doc: unknown): DaemonConfig {
  const top = doc === undefined || doc === null ? {} : doc;
  const parsed = configSchema.safeParse(top);
  if (!parsed.success) throw new ConfigError(parsed.error.issues.flatMap(issueText).join('\n'));
  const c = parsed.data;
  const runDir = defaultRunDir();
  const metrics =
    c.metrics === false ? undefined : { host: c.metrics?.host ?? '127.0.0.1', port: c.metrics?.port ?? 9464 };
  const tcp = c.control?.tcp;
  const config: DaemonConfig = {
    control: {
      socket: c.control?.socket ?? defaultControlSocket(),
      mode: c.control?.mode ?? 0o600,
      tcp: tcp === undefined ? undefined : { host: tcp.host ?? '127.0.0.1', port: tcp.port ?? 9465 },
    },
    metrics,
    log: { format: c.log?.format ?? 'text', level: c.log?.level ?? 'info' },
    policy: buildPolicy(c.policy),
    stateFile: c.state === false ? undefined : (c.state?.file ?? defaultStateFile()),
    vms: (c.vms ?? []).map((v) => buildVm(v, runDir)),
  };
  const issues = crossFieldIssues(config);
  if (issues.length > 0) throw new ConfigError(issues.map((i) => `${fieldPath(i.path)}: ${i.message}`).join('\n'));
  return config;
}

/** Reads a JSON or YAML file (by extension; YAML accepts JSON too). */
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

/** VM keys whose flag values are numbers or booleans in the schema (the rest stay strings). */
const NUMERIC_VM_KEYS = new Set(['queueSize', 'configSize', 'shares']);

/**
 * Parses a `--vm name=vm0,socket=...,memory=1G,policy=auto` flag into a VM mapping for the same
 * schema as the file: numbers only for numeric keys, true/false for the rest; "socketGroup=107"
 * stays a string the schema reads as an id.
 */
export function parseVmFlag(text: string): Record<string, unknown> {
  const out: Record<string, unknown> = {};
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
          : NUMERIC_VM_KEYS.has(key) && /^\d+$/.test(value)
            ? Number(value)
            : value;
  }
  return out;
}
