#!/usr/bin/env node
/**
 * The vballoon command line: `serve` runs the daemon; the other commands talk to it over the
 * control socket. yargs wiring and output formatting only; docs/cli.md is the reference,
 * including exit codes.
 */
import yargs, { Argv } from 'yargs';
import { hideBin } from 'yargs/helpers';
import { callDaemon, ClientError } from '../lib/daemon/client';
import { ConfigError, errorMessage } from '../lib/errors';
import { defaultControlSocket, loadConfigFile, parseVmFlag, readConfig } from '../lib/daemon/config';
import { Daemon, VmStats, VmStatus } from '../lib/daemon/daemon';
import { EVENT_TYPES } from '../lib/daemon/events';
import { SwitchableLogger } from '../lib/daemon/switchable-logger';
import { SystemdNotifier } from '../lib/daemon/systemd';
import { subscribeDaemon } from '../lib/daemon/client';
import { StreamLogger } from '../lib/log';
import { formatBytes, formatDuration, parseDuration, parseSize } from '../lib/units';

/** Exit codes (docs/cli.md). */
export const EXIT = {
  OK: 0,
  INTERNAL: 1,
  USAGE: 2,
  NO_DAEMON: 3,
  NO_VM: 4,
  TARGET: 5,
  TIMEOUT: 6,
  CONFIG: 7,
  DENIED: 8,
  STATS: 9,
} as const;

function die(code: number, message: string): never {
  process.stderr.write(`vballoon: ${message}\n`);
  process.exit(code);
}

function exitCodeFor(err: unknown): number {
  if (err instanceof ClientError) {
    switch (err.wireCode) {
      case 'ENODAEMON':
        return EXIT.NO_DAEMON;
      case 'ENOVM':
        return EXIT.NO_VM;
      case 'ETARGET':
        return EXIT.TARGET;
      case 'EUNAUTHORIZED':
      case 'EACCES':
        return EXIT.DENIED;
      case 'EBADPARAMS':
        return EXIT.USAGE;
      case 'ESTATS':
        return EXIT.STATS;
      default:
        return EXIT.INTERNAL;
    }
  }
  return err instanceof ConfigError ? EXIT.CONFIG : EXIT.INTERNAL;
}

async function call(argv: { control: string }, method: string, params: Record<string, unknown> = {}): Promise<unknown> {
  try {
    return await callDaemon(argv.control, method, params);
  } catch (err) {
    die(exitCodeFor(err), (err as Error).message);
  }
}

function size(text: string, what: string): number {
  try {
    return parseSize(text);
  } catch (err) {
    die(EXIT.USAGE, `${what}: ${(err as Error).message}`);
  }
}

function table(rows: string[][]): string {
  const widths = rows[0].map((_, c) => Math.max(...rows.map((r) => (r[c] ?? '').length)));
  return rows
    .map((r) =>
      r
        .map((cell, c) => cell.padEnd(widths[c]))
        .join('  ')
        .trimEnd(),
    )
    .join('\n');
}

const bytesOrDash = (b: number | null): string => (b === null ? '-' : formatBytes(b));

export function statusTable(list: VmStatus[]): string {
  const rows = [
    [
      'VM',
      'STATE',
      'MODE',
      'GUEST RAM',
      'BALLOON TARGET',
      'BALLOON ACTUAL',
      'GUEST SIZE',
      'HOST RESIDENT',
      'PRESSURE',
      'STATS AGE',
    ],
  ];
  for (const s of list) {
    rows.push([
      s.vm,
      s.connected ? 'connected' : 'waiting',
      s.mode +
        (s.policyCooldownSeconds > 0 ? ` (cooldown ${s.policyCooldownSeconds}s)` : '') +
        (s.discardInhibited ? ' [no discard]' : ''),
      bytesOrDash(s.guestRamBytes),
      formatBytes(s.targetBytes),
      formatBytes(s.actualBytes),
      bytesOrDash(s.guestSizeBytes),
      bytesOrDash(s.hostResidentBytes),
      String(s.pressureMessages),
      s.statsAgeSeconds === null ? '-' : `${s.statsAgeSeconds}s${s.statsStale ? ' (stale)' : ''}`,
    ]);
  }
  return table(rows);
}

const COUNT_STATS = new Set([
  'major_faults',
  'minor_faults',
  'hugetlb_allocations',
  'hugetlb_failures',
  'oom_kills',
  'alloc_stalls',
]);

export function statsTable(list: VmStats[]): string {
  const out: string[] = [];
  for (const s of list) {
    out.push(
      s.updatedAt === null
        ? `${s.vm}: no stats yet`
        : `${s.vm}: updated ${s.updatedAt} (${s.ageSeconds}s ago)${s.stale ? ', STALE' : ''}`,
    );
    const rows = [['STAT', 'VALUE']];
    for (const [k, v] of Object.entries(s.stats))
      rows.push([k, COUNT_STATS.has(k) || k.startsWith('tag_') ? String(v) : formatBytes(v)]);
    if (rows.length > 1) out.push(table(rows));
  }
  return out.join('\n\n');
}

function bar(done: number, total: number, width = 30): string {
  const f = total === 0 ? 1 : Math.min(1, Math.max(0, done / total));
  const n = Math.round(f * width);
  return `[${'#'.repeat(n)}${'.'.repeat(width - n)}] ${Math.round(f * 100)}%`;
}

async function waitForTarget(argv: { control: string }, vm: string, timeoutMs: number): Promise<void> {
  const start = Date.now();
  const first = (await call(argv, 'status', { vm })) as VmStatus;
  const from = first.actualBytes;
  const tty = process.stderr.isTTY;
  for (;;) {
    const s = (await call(argv, 'status', { vm })) as VmStatus;
    const total = Math.abs(s.targetBytes - from);
    const done = Math.abs(s.actualBytes - from);
    const sizes = `actual ${formatBytes(s.actualBytes)} / target ${formatBytes(s.targetBytes)}`;
    const line = `${vm} ${bar(done, total)} ${sizes}`;
    if (tty) process.stderr.write(`\r${line}`);
    if (s.actualBytes === s.targetBytes) {
      process.stderr.write(`${tty ? '\r' : ''}${line}\n`);
      return;
    }
    if (Date.now() - start > timeoutMs) {
      if (tty) process.stderr.write('\n');
      die(
        EXIT.TIMEOUT,
        `${vm} did not reach its target within ${Math.round(timeoutMs / 1000)}s ` +
          `(actual ${formatBytes(s.actualBytes)}, target ${formatBytes(s.targetBytes)})`,
      );
    }
    if (!tty && (Date.now() - start) % 5000 < 250) process.stderr.write(`${line}\n`);
    await new Promise((r) => setTimeout(r, 200));
  }
}

async function serve(argv: Record<string, unknown>): Promise<void> {
  const file = argv['config'] as string | undefined;
  const build = (): ReturnType<typeof readConfig> => {
    const doc = (file === undefined ? {} : loadConfigFile(file)) as Record<string, unknown>;
    if (typeof doc !== 'object' || (doc as unknown) === null || Array.isArray(doc))
      throw new ConfigError(`${file}: the configuration must be a mapping`);
    const control = { ...((doc['control'] as object | undefined) ?? {}) } as Record<string, unknown>;
    if (argv['control'] !== undefined && argv['controlExplicit'] === true) control['socket'] = argv['control'];
    if (argv['controlMode'] !== undefined) control['mode'] = argv['controlMode'];
    doc['control'] = control;
    if (argv['metrics'] === false) doc['metrics'] = false;
    else if (typeof argv['metrics'] === 'string') {
      const m = /^(.*):(\d+)$/.exec(argv['metrics']);
      if (m === null) throw new ConfigError(`--metrics ${argv['metrics']}: expected HOST:PORT`);
      doc['metrics'] = { host: m[1], port: Number(m[2]) };
    }
    const log = { ...((doc['log'] as object | undefined) ?? {}) } as Record<string, unknown>;
    if (argv['logFormat'] !== undefined) log['format'] = argv['logFormat'];
    if (argv['logLevel'] !== undefined) log['level'] = argv['logLevel'];
    doc['log'] = log;
    const flagVms = ((argv['vm'] as string[] | undefined) ?? []).map(parseVmFlag);
    doc['vms'] = [...((doc['vms'] as unknown[] | undefined) ?? []), ...flagVms];
    return readConfig(doc);
  };
  let config: ReturnType<typeof readConfig>;
  try {
    config = build();
  } catch (err) {
    die(err instanceof ConfigError ? EXIT.CONFIG : EXIT.INTERNAL, (err as Error).message);
  }
  const log = SwitchableLogger.wrap(new StreamLogger(process.stderr, config.log.format, config.log.level));
  const notifier = new SystemdNotifier(log.child({ component: 'systemd' }));
  const daemon = new Daemon(config, {
    log,
    notifier,
    reconfigureLog: (l) => log.replace(new StreamLogger(process.stderr, l.format, l.level)),
  });
  let stopping = false;
  const shutdown = (signal: string): void => {
    if (stopping) return;
    stopping = true;
    log.info('shutting down', { signal });
    daemon.stop().then(
      () => process.exit(0),
      (err: unknown) => {
        log.error('shutdown failed', { error: errorMessage(err) });
        process.exit(1);
      },
    );
  };
  process.on('SIGTERM', () => shutdown('SIGTERM'));
  process.on('SIGINT', () => shutdown('SIGINT'));
  // A reload is synchronous: a second SIGHUP is handled after the first one finished.
  // Handlers are installed before start-up (a signal then must not kill the process); a SIGHUP
  // that arrives while starting is applied once started.
  const state = { started: false, reloadPending: false };
  const reload = (): void => {
    if (!state.started) {
      state.reloadPending = true;
      return;
    }
    if (file === undefined) {
      log.warn('SIGHUP: no configuration file to reload (started without --config)');
      return;
    }
    let next: ReturnType<typeof readConfig>;
    try {
      next = build();
    } catch (err) {
      log.error('reload refused: the new configuration is invalid; keeping the old one', {
        error: errorMessage(err),
      });
      notifier.status(`${daemon.statusLine()}; last reload refused: invalid configuration`);
      return;
    }
    try {
      daemon.reload(next);
    } catch (err) {
      log.error('reload failed', { error: errorMessage(err) });
    }
  };
  process.on('SIGHUP', reload);
  try {
    await daemon.start();
  } catch (err) {
    notifier.notify({ STATUS: `failed to start: ${errorMessage(err)}`, ERRNO: 1 });
    try {
      await daemon.stop();
    } catch (stopErr) {
      log.error('cleanup after a failed start failed', { error: errorMessage(stopErr) });
    }
    die(EXIT.CONFIG, errorMessage(err));
  }
  state.started = true;
  if (state.reloadPending) reload();
}

/** Shell-quotes an argument when it needs it. */
function shellWord(a: string): string {
  return /^[\w@%+=:,./-]+$/.test(a) ? a : `'${a.replace(/'/g, "'\\''")}'`;
}

export function cli(args: string[]): Argv {
  const controlExplicit = args.some((a) => a === '--control' || a.startsWith('--control='));
  return yargs(args)
    .scriptName('vballoon')
    .usage('$0 <command> [options]')
    .option('control', {
      type: 'string',
      default: defaultControlSocket(),
      describe: 'control socket of the daemon (env VBALLOON_CONTROL)',
    })
    .command(
      'serve',
      'run the daemon: serve the VMs given by --config and --vm',
      (y) =>
        y
          .option('config', { type: 'string', describe: 'configuration file (JSON or YAML)' })
          .option('vm', {
            type: 'string',
            array: true,
            describe: 'a VM: name=vm0,socket=PATH,memory=1G,policy=auto|manual,... (repeatable)',
          })
          .option('control-mode', { type: 'string', describe: 'control socket permissions (octal, default 0600)' })
          .option('metrics', { describe: 'metrics HOST:PORT (default 127.0.0.1:9464); --no-metrics to disable' })
          .option('log-format', { choices: ['text', 'json'] as const })
          .option('log-level', { choices: ['debug', 'info', 'warn', 'error'] as const }),
      (argv) => serve({ ...argv, controlExplicit }),
    )
    .command(
      'set-target <vm> [size]',
      'set the balloon size (SIZE), or what the guest keeps (--guest-size)',
      (y) =>
        y
          .positional('vm', { type: 'string', demandOption: true })
          .positional('size', { type: 'string', describe: 'balloon size: 512M, 2GiB, bytes' })
          .option('guest-size', {
            type: 'string',
            describe: "memory the guest should keep (QMP's `balloon` convention)",
          })
          .option('wait', {
            type: 'boolean',
            default: false,
            describe: 'show progress until actual reaches the target',
          })
          .option('timeout', { type: 'string', default: '120s', describe: 'how long --wait waits' })
          .option('json', { type: 'boolean', default: false })
          .check((a) => {
            if ((a.size === undefined) === (a['guest-size'] === undefined))
              throw new Error('give either SIZE or --guest-size');
            return true;
          }),
      async (argv) => {
        const params: Record<string, unknown> = { vm: argv.vm };
        if (argv.size !== undefined) params['bytes'] = size(argv.size, 'SIZE');
        else params['guestBytes'] = size(argv['guest-size']!, '--guest-size');
        const status = (await call(argv, 'set-target', params)) as VmStatus;
        if (argv.wait) {
          let timeoutMs: number;
          try {
            timeoutMs = parseDuration(argv.timeout);
          } catch (err) {
            die(EXIT.USAGE, `--timeout: ${(err as Error).message}`);
          }
          await waitForTarget(argv, argv.vm, timeoutMs);
        }
        const final = argv.wait ? ((await call(argv, 'status', { vm: argv.vm })) as VmStatus) : status;
        process.stdout.write(
          argv.json
            ? `${JSON.stringify(final)}\n`
            : `${final.vm}: balloon target ${formatBytes(final.targetBytes)} ` +
                `(actual ${formatBytes(final.actualBytes)})\n`,
        );
      },
    )
    .command(
      'status [vm]',
      'show balloon state',
      (y) => y.positional('vm', { type: 'string' }).option('json', { type: 'boolean', default: false }),
      async (argv) => {
        const r = await call(argv, 'status', argv.vm === undefined ? {} : { vm: argv.vm });
        const list = Array.isArray(r) ? (r as VmStatus[]) : [r as VmStatus];
        process.stdout.write(argv.json ? `${JSON.stringify(r)}\n` : `${statusTable(list)}\n`);
      },
    )
    .command(
      'stats [vm]',
      "show the guests' memory statistics",
      (y) =>
        y
          .positional('vm', { type: 'string' })
          .option('json', { type: 'boolean', default: false })
          .option('fresh', { type: 'boolean', default: false, describe: 'ask the guest for statistics now' }),
      async (argv) => {
        const params: Record<string, unknown> = argv.vm === undefined ? {} : { vm: argv.vm };
        if (argv.fresh) params['fresh'] = true;
        const r = await call(argv, 'stats', params);
        const list = Array.isArray(r) ? (r as VmStats[]) : [r as VmStats];
        process.stdout.write(argv.json ? `${JSON.stringify(r)}\n` : `${statsTable(list)}\n`);
      },
    )
    .command(
      'watch [vm]',
      'live view of target, actual, guest memory and pressure',
      (y) =>
        y
          .positional('vm', { type: 'string' })
          .option('interval', { type: 'string', default: '1s' })
          .option('count', { type: 'number', describe: 'stop after this many refreshes' })
          .option('json', { type: 'boolean', default: false, describe: 'one JSON line per refresh' })
          .option('events', {
            type: 'boolean',
            default: false,
            describe: 'print events (target, target-reached, pressure, ...) as JSON lines instead',
          })
          .option('event', {
            type: 'string',
            array: true,
            choices: EVENT_TYPES,
            describe: 'with --events: only these types (repeatable)',
          }),
      async (argv) => {
        if (argv.events) {
          const params: Record<string, unknown> = {};
          if (argv.vm !== undefined) params['vm'] = argv.vm;
          if (argv.event !== undefined) params['events'] = argv.event;
          let seen = 0;
          try {
            await subscribeDaemon(argv.control, params, (e) => {
              process.stdout.write(`${JSON.stringify(e)}\n`);
              seen++;
              return argv.count === undefined || seen < argv.count;
            });
          } catch (err) {
            die(exitCodeFor(err), errorMessage(err));
          }
          return;
        }
        let intervalMs: number;
        try {
          intervalMs = parseDuration(argv.interval);
        } catch (err) {
          die(EXIT.USAGE, `--interval: ${(err as Error).message}`);
        }
        const tty = process.stdout.isTTY && !argv.json;
        for (let i = 0; argv.count === undefined || i < argv.count; i++) {
          const r = await call(argv, 'status', argv.vm === undefined ? {} : { vm: argv.vm });
          const list = Array.isArray(r) ? (r as VmStatus[]) : [r as VmStatus];
          if (argv.json) process.stdout.write(`${JSON.stringify({ time: new Date().toISOString(), vms: list })}\n`);
          else
            process.stdout.write(
              `${tty ? '\x1b[H\x1b[2J' : ''}${new Date().toISOString()}\n${statusTable(list)}\n${tty ? '' : '\n'}`,
            );
          if (argv.count !== undefined && i + 1 >= argv.count) break;
          await new Promise((res) => setTimeout(res, intervalMs));
        }
      },
    )
    .command(
      'qemu-args <vm>',
      "print the QEMU options that attach this VM's balloon (--libvirt: the domain XML pieces)",
      (y) =>
        y
          .positional('vm', { type: 'string', demandOption: true })
          .option('libvirt', { type: 'boolean', default: false, describe: 'print libvirt domain XML instead' }),
      async (argv) => {
        const r = (await call(argv, 'qemu-args', { vm: argv.vm })) as { args: string[]; libvirtXml: string };
        process.stdout.write(argv.libvirt ? `${r.libvirtXml}\n` : `${r.args.map(shellWord).join(' ')}\n`);
      },
    )
    .command(
      'stats-interval <vm> <interval>',
      'change how often the guest is asked for statistics (until a restart; the file sets it at start)',
      (y) =>
        y
          .positional('vm', { type: 'string', demandOption: true })
          .positional('interval', { type: 'string', demandOption: true, describe: 'e.g. 500ms, 5s, 1m' }),
      async (argv) => {
        let ms: number;
        try {
          ms = parseDuration(argv.interval);
        } catch (err) {
          die(EXIT.USAGE, `INTERVAL: ${errorMessage(err)}`);
        }
        await call(argv, 'set-stats-interval', { vm: argv.vm, ms });
        process.stdout.write(`${argv.vm}: stats every ${formatDuration(ms)}\n`);
      },
    )
    .command(
      'mode <vm> <mode>',
      'switch the policy mode of a VM',
      (y) =>
        y
          .positional('vm', { type: 'string', demandOption: true })
          .positional('mode', { choices: ['auto', 'manual'] as const, demandOption: true }),
      async (argv) => {
        const s = (await call(argv, 'set-mode', { vm: argv.vm, mode: argv.mode })) as VmStatus;
        process.stdout.write(`${s.vm}: policy ${s.mode}\n`);
      },
    )
    .command(
      'discard <vm> <action>',
      'inhibit or allow giving ballooned memory back to the host',
      (y) =>
        y
          .positional('vm', { type: 'string', demandOption: true })
          .positional('action', { choices: ['inhibit', 'allow'] as const, demandOption: true }),
      async (argv) => {
        const s = (await call(argv, 'set-discard', { vm: argv.vm, inhibit: argv.action === 'inhibit' })) as VmStatus;
        process.stdout.write(`${s.vm}: discard ${s.discardInhibited ? 'inhibited' : 'allowed'}\n`);
      },
    )
    .command(
      'list',
      'list the VMs the daemon serves',
      (y) => y.option('json', { type: 'boolean', default: false }),
      async (argv) => {
        const r = (await call(argv, 'list')) as Array<{ vm: string; connected: boolean; mode: string; socket: string }>;
        if (argv.json) process.stdout.write(`${JSON.stringify(r)}\n`);
        else
          process.stdout.write(
            `${table([
              ['VM', 'STATE', 'MODE', 'SOCKET'],
              ...r.map((v) => [v.vm, v.connected ? 'connected' : 'waiting', v.mode, v.socket]),
            ])}\n`,
          );
      },
    )
    .completion('completion', 'print a bash/zsh completion script (eval "$(vballoon completion)")')
    .demandCommand(1, 'a command is required')
    .strict()
    .help()
    .alias('help', 'h')
    .fail((msg, err) => {
      // A message means a usage problem (yargs validation or a failed check); an error alone
      // comes from a command handler.
      if (msg) die(EXIT.USAGE, `${msg.replace(/\s*\n\s*/g, ' ')} (see vballoon --help)`);
      die(exitCodeFor(err), errorMessage(err));
    });
}

if (require.main === module) {
  cli(hideBin(process.argv))
    .parseAsync()
    .catch((err: unknown) => die(exitCodeFor(err), errorMessage(err)));
}
