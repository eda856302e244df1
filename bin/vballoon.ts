#!/usr/bin/env -S node --max-semi-space-size=1
/**
 * The vballoon command line: `serve` runs the daemon; the other commands talk to it over the
 * control socket. yargs wiring and output formatting only; docs/cli.md is the reference,
 * including exit codes.
 *
 * The first line starts Node with the daemon's heap option, as the shipped unit does
 * (docs/vballoon.service, docs/systemd.md): a young generation held at 1 MiB, whose collections
 * pause the event loop 0.2-0.5 ms each. `node dist/bin/vballoon.js` runs without it.
 */
import yargs, { Argv } from 'yargs';
import { hideBin } from 'yargs/helpers';
import { callDaemon, subscribeDaemon } from '../lib/daemon/client';
import { errorMessage } from '../lib/errors';
import { defaultControlSocket } from '../lib/daemon/config';
import { VmStats, VmStatus } from '../lib/daemon/daemon';
import { EVENT_TYPES } from '../lib/daemon/events';
import { die, EXIT, exitCodeFor } from './exit';
import { bar, statsTable, statusTable, table } from './format';
import { serve } from './serve';
import { formatBytes, formatDuration, parseDuration, parseSize } from '../lib/units';

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
      // Given twice (a wrapper's default, then the user's), the last one wins.
      coerce: (v: string | string[]) => (Array.isArray(v) ? v[v.length - 1] : v),
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
          .option('log-level', { choices: ['debug', 'info', 'warn', 'error'] as const })
          .option('takeover', {
            type: 'boolean',
            default: false,
            describe: 'take every VM over from the daemon running on the same control socket (upgrade without systemd)',
          }),
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
