/**
 * Daemon configuration: one schema (zod) for the file (JSON or YAML) and the `--vm` flags. Sizes
 * and durations are written with units ("512M", "5s"); every value has a range; cross-field
 * rules (hysteresis, cooldowns, floors) are checked here once, so the device, the policy and the
 * daemon can trust what they are given. Errors name the field ("vms[1].memory: ...") and are
 * ConfigErrors. Unknown keys are errors (a typo must not silently fall back to a default).
 * The same schema, exported as JSON Schema (docs/config.schema.json), documents the file;
 * docs/cli.md explains every key.
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import YAML from 'yaml';
import { z } from 'zod';
import { BalloonDevice, BalloonOptions } from '../device/balloon';
import { CONFIG_SIZES } from '../device/constants';
import { MIN_STATS_INTERVAL_MS } from '../device/stats-queue';
import { ConfigError } from '../errors';
import { DEFAULT_POLICY, Mode, PolicyConfig } from '../policy/engine';
import { formatBytes, formatDuration, parseDuration, parseSize } from '../units';

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

// ---- value types with units ----------------------------------------------------------------------

const SIZE_PATTERN = '^\\s*\\d+(\\.\\d+)?\\s*([KMGT]i?B?|[kmgt]i?b?|[KMGT]iB|B)?\\s*$';
const DURATION_PATTERN = '^\\s*\\d+(\\.\\d+)?\\s*(ms|s|m|h)?\\s*$';

interface Range {
  min?: number;
  max?: number;
}

/** A size: a number of bytes or "512M"; `range` in bytes; errors in human units. */
function size(description: string, range: Range = {}): z.ZodType<number | undefined> {
  const min = range.min ?? 0;
  const max = range.max ?? Number.MAX_SAFE_INTEGER;
  return z
    .unknown()
    .transform((v, ctx): number | undefined => {
      if (v === undefined) return undefined;
      let bytes: number;
      if (typeof v === 'number' && Number.isSafeInteger(v) && v >= 0) bytes = v;
      else if (typeof v === 'string') {
        try {
          bytes = parseSize(v);
        } catch (err) {
          ctx.addIssue({ code: 'custom', message: (err as Error).message });
          return z.NEVER;
        }
      } else {
        ctx.addIssue({ code: 'custom', message: 'expected a size such as 512M or a number of bytes' });
        return z.NEVER;
      }
      if (bytes < min || bytes > max) {
        const hi = max === Number.MAX_SAFE_INTEGER ? '' : formatBytes(max);
        ctx.addIssue({ code: 'custom', message: `${formatBytes(bytes)} is outside ${formatBytes(min)}..${hi}` });
        return z.NEVER;
      }
      return bytes;
    })
    .optional()
    .meta({
      description,
      anyOf: [
        { type: 'integer', minimum: min, maximum: max },
        { type: 'string', pattern: SIZE_PATTERN },
      ],
    });
}

/** A duration: "500ms", "5s", "2m", or a number of seconds; `range` in ms. */
function duration(description: string, range: Range = {}): z.ZodType<number | undefined> {
  const min = range.min ?? 0;
  const max = range.max ?? 7 * 24 * 3_600_000;
  return z
    .unknown()
    .transform((v, ctx): number | undefined => {
      if (v === undefined) return undefined;
      let ms: number;
      if (typeof v === 'number' && Number.isFinite(v) && v >= 0) ms = Math.round(v * 1000);
      else if (typeof v === 'string') {
        try {
          ms = parseDuration(v);
        } catch (err) {
          ctx.addIssue({ code: 'custom', message: (err as Error).message });
          return z.NEVER;
        }
      } else {
        ctx.addIssue({ code: 'custom', message: 'expected a duration such as 5s (a number means seconds)' });
        return z.NEVER;
      }
      if (ms < min || ms > max) {
        ctx.addIssue({
          code: 'custom',
          message: `${formatDuration(ms)} is outside ${formatDuration(min)}..${formatDuration(max)}`,
        });
        return z.NEVER;
      }
      return ms;
    })
    .optional()
    .meta({
      description,
      anyOf: [
        { type: 'number', minimum: min / 1000, maximum: max / 1000 },
        { type: 'string', pattern: DURATION_PATTERN },
      ],
    });
}

function num(description: string, min: number, max: number, integer = false): z.ZodOptional<z.ZodNumber> {
  const what = `${integer ? 'an integer' : 'a number'} in ${min}..${max}`;
  let s = z.number({ error: `expected ${what}` });
  if (integer) s = s.int({ error: `expected ${what}` });
  return s
    .min(min, { error: `expected ${what}` })
    .max(max, { error: `expected ${what}` })
    .optional()
    .meta({
      description,
    });
}

const bool = (description: string): z.ZodOptional<z.ZodBoolean> =>
  z.boolean({ error: 'expected true or false' }).optional().meta({ description });

function oneOf<T extends string>(values: readonly [T, ...T[]], description: string) {
  return z
    .enum(values, { error: `expected one of ${values.join(', ')}` })
    .optional()
    .meta({ description });
}

const str = (description: string): z.ZodOptional<z.ZodString> =>
  z.string({ error: 'expected a non-empty string' }).min(1, { error: 'expected a non-empty string' }).optional().meta({
    description,
  });

/** A file mode: "0660" (octal string) or a number. */
const fileMode = (description: string): z.ZodType<number | undefined> =>
  z
    .unknown()
    .transform((v, ctx): number | undefined => {
      if (v === undefined) return undefined;
      const parsed =
        typeof v === 'string' && /^0?[0-7]{3}$/.test(v) ? parseInt(v, 8) : typeof v === 'number' ? v : Number.NaN;
      if (!Number.isInteger(parsed) || parsed < 0 || parsed > 0o777) {
        ctx.addIssue({ code: 'custom', message: 'expected an octal mode such as "0600"' });
        return z.NEVER;
      }
      return parsed;
    })
    .optional()
    .meta({
      description,
      anyOf: [
        { type: 'string', pattern: '^0?[0-7]{3}$' },
        { type: 'integer', minimum: 0, maximum: 0o777 },
      ],
    });

/** Numeric id, or a name from /etc/passwd or /etc/group. */
function idOf(kind: 'user' | 'group', v: string | number): number | string {
  if (typeof v === 'number') return Number.isInteger(v) && v >= 0 && v < 2 ** 32 ? v : `${v} is not a valid id`;
  if (/^\d+$/.test(v)) return Number(v);
  let text = '';
  try {
    text = fs.readFileSync(kind === 'user' ? '/etc/passwd' : '/etc/group', 'utf8');
  } catch {
    return `cannot read the ${kind} database to look up "${v}"; give a numeric id`;
  }
  for (const line of text.split('\n')) {
    const f = line.split(':');
    const id = f[2] ?? '';
    if (f[0] === v && /^\d+$/.test(id)) return Number(id);
  }
  return `no ${kind} named "${v}" on this host (give a numeric id for a user that only exists elsewhere)`;
}

const principal = (kind: 'user' | 'group', description: string): z.ZodType<number | undefined> =>
  z
    .unknown()
    .transform((v, ctx): number | undefined => {
      if (v === undefined) return undefined;
      if (typeof v !== 'string' && typeof v !== 'number') {
        ctx.addIssue({ code: 'custom', message: `expected a ${kind} name or a numeric id` });
        return z.NEVER;
      }
      const id = idOf(kind, v);
      if (typeof id === 'string') {
        ctx.addIssue({ code: 'custom', message: id });
        return z.NEVER;
      }
      return id;
    })
    .optional()
    .meta({ description, anyOf: [{ type: 'string' }, { type: 'integer', minimum: 0 }] });

// ---- the schema ------------------------------------------------------------------------------------

const GiB = 2 ** 30;
const MiB = 2 ** 20;

const vmSchema = z.strictObject({
  name: z
    .string({ error: 'expected a name (1-64 letters, digits, ".", "_" or "-")' })
    .regex(/^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$/, { error: 'must be 1-64 letters, digits, ".", "_" or "-"' })
    .meta({ description: 'The VM name used by the CLI, the control API and the `vm` metric label.' }),
  socket: str('vhost-user socket path (default <run dir>/<name>.sock).'),
  socketOwner: principal('user', 'Owner of the socket file (name or uid), e.g. root; default the daemon.'),
  socketGroup: principal('group', 'Group of the socket file (name or gid), e.g. libvirt-qemu.'),
  socketMode: fileMode('Permissions of the socket file (default "0600"; "0660" with socketGroup for libvirt).'),
  connect: bool('Connect to a QEMU that listens (chardev server=on) instead of listening.'),
  memory: size('Guest RAM (for --guest-size, target checks, qemu-args); learnt from QEMU when omitted.', {
    min: 1 * MiB,
    max: 16 * 2 ** 40,
  }),
  mustTellHost: bool('Offer VIRTIO_BALLOON_F_MUST_TELL_HOST.'),
  stats: bool('Offer the stats queue.'),
  deflateOnOom: bool('Offer VIRTIO_BALLOON_F_DEFLATE_ON_OOM.'),
  reporting: bool('Offer free page reporting.'),
  messageQueue: bool('Offer the pressure message queue.'),
  messageBit: oneOf(['vballoon', 'seed'], 'Feature bit of the message queue: 20 (vballoon) or 2 (the seed RFC).'),
  configSize: z
    .union(
      CONFIG_SIZES.map((n) => z.literal(n)),
      { error: `expected ${CONFIG_SIZES.join(', ')}` },
    )
    .optional()
    .meta({ description: 'QEMU config_size: 8, 12 or 16.' }),
  queueSize: num('QEMU vq_size (a power of two).', 1, MAX_QUEUE_SIZE, true),
  statsInterval: duration('How often the guest is asked for memory statistics.', {
    min: MIN_STATS_INTERVAL_MS,
    max: 3_600_000,
  }),
  policy: oneOf(['manual', 'auto'], 'Policy mode at start.'),
  target: size('Initial balloon size (in manual mode the exact size, in auto mode the ceiling).'),
  inhibitDiscard: bool('Keep ballooned memory (VFIO passthrough, post-copy migration).'),
  floor: size('The guest keeps at least this much memory: no target goes below it (Proxmox "minimum").'),
  shares: num('Weight in host-pressure arbitration (Proxmox "shares"); 0 exempts the VM.', 0, 50_000, true),
});

/**
 * Policy keys as the file writes them (units in the values) and the engine's fields they set.
 * Keys ending in a size or duration accept "256M" / "15s".
 */
const POLICY_FIELDS = {
  pressureStep: [
    'pressureStepFraction',
    num('Deflate on inferred pressure by this fraction of the balloon...', 0.01, 1),
  ],
  messageStep: [
    'messageStepFraction',
    num("Deflate on the guest's pressure message by this fraction of the balloon (default all).", 0.01, 1),
  ],
  pressureStepMin: ['pressureStepMinBytes', size('...but at least this much.', { min: 0, max: 64 * GiB })],
  pressureStepMaxDoublings: [
    'pressureStepMaxDoublings',
    num('Each repeated pressure doubles the step, up to this many times.', 0, 10, true),
  ],
  cooldownBase: ['cooldownBaseMs', duration('No inflate after pressure for this long (doubling)...')],
  cooldownMax: ['cooldownMaxMs', duration('...up to this.')],
  streakDecay: [
    'streakDecayMs',
    duration('One level of the pressure streak is forgiven per this much calm time.', { min: 1000 }),
  ],
  swapInPerSecond: ['swapInBytesPerSec', size('Inferred pressure: guest swap-in rate per second at or above this.')],
  majorFaultsPerSecond: ['majorFaultsPerSec', num('Inferred pressure: guest major faults/s at or above this.', 1, 1e9)],
  allocStallsPerSample: [
    'allocStallsPerSample',
    num('Inferred pressure: allocation stalls per sample at or above this.', 1, 1e9, true),
  ],
  guestFloor: ['guestFloorBytes', size('Inflating leaves the guest at least max(guestFloor, guestFloorFraction).')],
  guestFloorFraction: ['guestFloorFraction', num('Fraction of guest RAM kept free when inflating.', 0, 0.9)],
  lowAvailableFloorFactor: [
    'lowAvailableFloorFactor',
    num('Inferred pressure below this fraction of the inflate floor (hysteresis).', 0, 1),
  ],
  stallMinProgress: ['stallMinProgressBytes', size('Inflate stall: moved less than this...', { min: 4096 })],
  stallWindow: ['stallWindowMs', duration('...over this window.', { min: 100 })],
  statsMaxAge: ['statsMaxAgeMs', duration('Guest stats older than this are not trusted for inflating.', { min: 100 })],
  reinflateStep: ['reinflateStepBytes', size('Re-inflation toward the operator value: at most this per tick.')],
  hostStep: ['hostStepBytes', size('Host-driven inflation: at most this per VM per tick.')],
  hostLowFraction: ['hostLowFraction', num('Host pressure when MemAvailable/MemTotal falls below this...', 0, 1)],
  hostPsiSomeHigh: ['hostPsiSomeHigh', num('...or PSI memory some avg10 (percent) reaches this.', 0, 100)],
  hostRecoverFraction: [
    'hostRecoverFraction',
    num('Host pressure ends when MemAvailable/MemTotal is above this...', 0, 1),
  ],
  hostPsiSomeLow: ['hostPsiSomeLow', num('...and PSI some avg10 below this.', 0, 100)],
  minChange: ['minChangeBytes', size('Changes smaller than this are skipped.')],
} as const satisfies Record<string, readonly [keyof PolicyConfig, z.ZodType]>;

type PolicyKey = keyof typeof POLICY_FIELDS;

/** Policy keys as earlier versions wrote them (raw numbers in bytes or ms): say the new name. */
const RENAMED_POLICY_KEYS: Record<string, string> = Object.fromEntries(
  Object.entries(POLICY_FIELDS).map(([key, [field]]) => [field, key]),
);

const policySchema = z.strictObject({
  tick: duration('Policy tick and host sampling period.', { min: 100, max: 60_000 }),
  ...(Object.fromEntries(Object.entries(POLICY_FIELDS).map(([k, [, s]]) => [k, s])) as {
    [K in PolicyKey]: (typeof POLICY_FIELDS)[K][1];
  }),
});

const configSchema = z.strictObject({
  control: z
    .strictObject({
      socket: str('Control socket path (default /run/vballoon/control.sock for root).'),
      mode: fileMode('Control socket permissions (default "0600").'),
      tcp: z
        .strictObject({
          host: str('TCP host (default 127.0.0.1).'),
          port: num('TCP port.', 1, 65535, true),
        })
        .optional()
        .meta({ description: 'Also listen on TCP (no credentials there: anyone who reaches it controls).' }),
    })
    .optional(),
  metrics: z
    .union(
      [
        z.literal(false),
        z.strictObject({ host: str('Metrics host (default 127.0.0.1).'), port: num('Metrics port.', 0, 65535, true) }),
      ],
      { error: 'expected false or a mapping with host and port' },
    )
    .optional()
    .meta({ description: 'Prometheus endpoint (default 127.0.0.1:9464), or false.' }),
  log: z
    .strictObject({
      format: oneOf(['text', 'json'], 'Log format.'),
      level: oneOf(['debug', 'info', 'warn', 'error'], 'Lowest level logged.'),
    })
    .optional(),
  policy: policySchema.optional(),
  state: z
    .union(
      [
        z.literal(false),
        z.strictObject({ file: str('State file (default $STATE_DIRECTORY/state.json under systemd, else none).') }),
      ],
      { error: 'expected false or a mapping with file' },
    )
    .optional()
    .meta({ description: 'Keep runtime targets and modes across restarts (on under systemd), or false.' }),
  vms: z.array(vmSchema, { error: 'expected a list' }).optional(),
});

/** Keys of each mapping, for "unknown setting" messages. */
const KNOWN_KEYS = {
  top: Object.keys(configSchema.shape),
  control: ['socket', 'mode', 'tcp'],
  tcp: ['host', 'port'],
  metrics: ['host', 'port'],
  log: ['format', 'level'],
  policy: Object.keys(policySchema.shape),
  state: ['file'],
  vm: Object.keys(vmSchema.shape),
};

function knownKeysAt(p: readonly PropertyKey[]): string[] {
  if (p.length === 0) return KNOWN_KEYS.top;
  if (p[0] === 'vms') return KNOWN_KEYS.vm;
  if (p[0] === 'control' && p[1] === 'tcp') return KNOWN_KEYS.tcp;
  const known: Record<string, string[] | undefined> = KNOWN_KEYS;
  return known[String(p[0])] ?? [];
}

/** "vms[1].memory" for ['vms', 1, 'memory']. */
export function fieldPath(p: readonly PropertyKey[]): string {
  return p.reduce<string>(
    (out, k) => (typeof k === 'number' ? `${out}[${k}]` : out === '' ? String(k) : `${out}.${String(k)}`),
    '',
  );
}

function issueText(issue: z.core.$ZodIssue): string[] {
  if (issue.code === 'unrecognized_keys') {
    return issue.keys.map((key) => {
      const at = fieldPath([...issue.path, key]);
      const renamed = issue.path[0] === 'policy' ? RENAMED_POLICY_KEYS[key] : undefined;
      if (renamed !== undefined) return `${at}: renamed to ${fieldPath([...issue.path, renamed])} (units allowed)`;
      return `${at}: unknown setting (known: ${knownKeysAt(issue.path).join(', ')})`;
    });
  }
  const at = fieldPath(issue.path);
  return [`${at === '' ? 'the configuration' : at}: ${issue.message}`];
}

/** The JSON Schema of the configuration file (docs/config.schema.json is generated from it). */
export function configJsonSchema(): Record<string, unknown> {
  return {
    ...z.toJSONSchema(configSchema, { io: 'input', unrepresentable: 'any', target: 'draft-2020-12' }),
    title: 'vballoon daemon configuration',
  };
}

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

/** QEMU's size syntax for the guest RAM, or a placeholder. */
function qemuMemory(vm: VmConfig): string {
  return vm.memoryBytes === undefined ? '<guest RAM, e.g. 1G>' : `${Math.round(vm.memoryBytes / MiB)}M`;
}

function chardevOption(vm: VmConfig): string {
  return vm.connect
    ? `socket,id=vb-${vm.name},path=${vm.socket},server=on,wait=off`
    : `socket,id=vb-${vm.name},path=${vm.socket}`;
}

function deviceOption(vm: VmConfig, numQueues: number): string {
  return (
    `vhost-user-test-device-pci,chardev=vb-${vm.name},virtio-id=5,num_vqs=${numQueues},` +
    `vq_size=${vm.queueSize},config_size=${vm.configSize}`
  );
}

/** The QEMU options that attach this VM's balloon (memory backend, chardev, device). */
export function qemuArgs(vm: VmConfig, device: BalloonDevice = new BalloonDevice(deviceOptions(vm))): string[] {
  const mem = qemuMemory(vm);
  return [
    '-m',
    mem,
    '-object',
    `memory-backend-memfd,id=mem-${vm.name},size=${mem},share=on`,
    '-machine',
    `memory-backend=mem-${vm.name}`,
    '-chardev',
    chardevOption(vm),
    '-device',
    deviceOption(vm, device.numQueues),
  ];
}

function xmlEscape(s: string): string {
  return s.replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;').replace(/'/g, '&apos;');
}

/**
 * The libvirt domain XML pieces that attach this VM's balloon (docs/libvirt.md): shared memfd
 * memory, no libvirt balloon, and the chardev and device through `<qemu:commandline>`. The
 * `<domain>` element needs the `xmlns:qemu` namespace shown in the first comment.
 */
export function libvirtXml(vm: VmConfig, device: BalloonDevice = new BalloonDevice(deviceOptions(vm))): string {
  const arg = (value: string): string => `  <qemu:arg value='${xmlEscape(value)}'/>`;
  return [
    `<!-- vballoon: ${vm.name}. The <domain> element needs`,
    `     xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'. -->`,
    ...(vm.memoryBytes === undefined ? [] : [`<memory unit='MiB'>${Math.round(vm.memoryBytes / MiB)}</memory>`]),
    '<memoryBacking>',
    "  <source type='memfd'/>",
    "  <access mode='shared'/>",
    '</memoryBacking>',
    '<devices>',
    '  <!-- no libvirt balloon: the guest would get two -->',
    "  <memballoon model='none'/>",
    '</devices>',
    '<qemu:commandline>',
    arg('-chardev'),
    arg(chardevOption(vm)),
    arg('-device'),
    // A fixed PCI slot on q35's root bus: libvirt numbers its own devices from slot 1 and does not
    // know this one (on an i440fx machine write bus=pci.0).
    arg(`${deviceOption(vm, device.numQueues)},bus=pcie.0,addr=0x10`),
    '</qemu:commandline>',
  ].join('\n');
}
