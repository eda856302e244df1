/**
 * The configuration's schema (zod): value types with units and ranges ("512M", "5s"), the VM,
 * policy and top-level mappings, and the error texts that name the offending field. config.ts
 * builds the daemon's configuration from what this accepts; the JSON Schema generated from it is
 * docs/config.schema.json.
 */
import { z } from 'zod';
import * as fs from 'node:fs';
import { CONFIG_SIZES } from '../device/constants';
import { MIN_STATS_INTERVAL_MS } from '../device/stats-queue';
import { PolicyConfig } from '../policy/engine';
import { formatBytes, formatDuration, parseDuration, parseSize } from '../units';
import { MAX_QUEUE_SIZE } from './config-types';

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

export const GiB = 2 ** 30;
export const MiB = 2 ** 20;

export const vmSchema = z.strictObject({
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
export const POLICY_FIELDS = {
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

export type PolicyKey = keyof typeof POLICY_FIELDS;

/** Policy keys as earlier versions wrote them (raw numbers in bytes or ms): say the new name. */
const RENAMED_POLICY_KEYS: Record<string, string> = Object.fromEntries(
  Object.entries(POLICY_FIELDS).map(([key, [field]]) => [field, key]),
);

export const policySchema = z.strictObject({
  tick: duration('Policy tick and host sampling period.', { min: 100, max: 60_000 }),
  ...(Object.fromEntries(Object.entries(POLICY_FIELDS).map(([k, [, s]]) => [k, s])) as {
    [K in PolicyKey]: (typeof POLICY_FIELDS)[K][1];
  }),
});

export const configSchema = z.strictObject({
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

export function issueText(issue: z.core.$ZodIssue): string[] {
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
