/**
 * `vballoon serve`: builds the configuration from the file and flags, runs the daemon, and wires
 * the process to it: SIGTERM/SIGINT stop it gracefully, SIGHUP reloads the file, systemd is told
 * what happens (READY, RELOADING, STOPPING, STATUS).
 */
import { loadConfigFile, parseVmFlag, readConfig } from '../lib/daemon/config';
import { Daemon } from '../lib/daemon/daemon';
import { FdStore, inheritedFds } from '../lib/daemon/fd-store';
import { NamedFd } from '../lib/daemon/survival';
import { handoverSender, receiveHandover } from '../lib/daemon/takeover';
import { SwitchableLogger } from '../lib/daemon/switchable-logger';
import { SystemdNotifier } from '../lib/daemon/systemd';
import { ConfigError, errorMessage } from '../lib/errors';
import { StreamLogger } from '../lib/log';
import { die, EXIT } from './exit';

export async function serve(argv: Record<string, unknown>): Promise<void> {
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
  // Restart survival (docs/operations.md): descriptors go to the service manager's store, and
  // come back from it (or, with --takeover, from the daemon running now).
  const holder = new FdStore(log.child({ component: 'fd-store' }), notifier.address);
  let inherited: NamedFd[] = inheritedFds();
  if (argv['takeover'] === true) {
    if (inherited.length > 0) die(EXIT.CONFIG, '--takeover: the service manager already passed descriptors');
    try {
      inherited = await receiveHandover(config.control.socket, log);
    } catch (err) {
      die(EXIT.NO_DAEMON, errorMessage(err));
    }
  }
  const daemon = new Daemon(config, {
    log,
    notifier,
    reconfigureLog: (l) => log.replace(new StreamLogger(process.stderr, l.format, l.level)),
    survival: {
      holder,
      inherited,
      handoverTo: (address) => handoverSender(log.child({ component: 'handover' }), address),
      // The successor holds every descriptor: end now, closing nothing it could notice.
      onHandedOver: () => process.exit(0),
    },
  });
  let stopping = false;
  const shutdown = (signal: string): void => {
    if (stopping) return;
    stopping = true;
    if (signal === 'SIGTERM' && holder.enabled) {
      // A restart (or a stop) under a service manager that keeps our descriptors: leave every
      // VM connected; the next process takes them over. On a stop the manager closes them.
      log.info('restarting: leaving every VM to the next process', { signal });
      daemon.suspend();
      notifier.stopping();
      process.exit(0);
    }
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
    if (holder.enabled) {
      // The VMs stay with the service manager: the next start (a fixed configuration) takes them.
      daemon.suspend();
      die(EXIT.CONFIG, errorMessage(err));
    }
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
