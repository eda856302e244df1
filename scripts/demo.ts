/**
 * `npm run vm`: the quick start. Prepares QEMU and a Linux guest (scripts/e2e-env.sh, as root),
 * starts the vballoon daemon with one VM (vm0, 1 GiB), boots the guest attached to it and shows
 * the live status until Ctrl-C. From another terminal: `npx vballoon set-target vm0 256M`.
 */
import { execFileSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { statusTable } from '../bin/format';
import { defaultControlSocket, defaultRunDir, readConfig } from '../lib/daemon/config';
import { Daemon } from '../lib/daemon/daemon';
import { StreamLogger } from '../lib/log';
import { loadE2eEnv, QemuGuest } from '../lib/testing/qemu';

async function main(): Promise<void> {
  const root = path.resolve(__dirname, '..', '..');
  if (process.getuid?.() !== 0)
    throw new Error('run it as root (it prepares QEMU in a Debian root and needs /run/vballoon)');
  const cache = process.env['VBALLOON_E2E_CACHE'] ?? path.join(root, '.cache', 'e2e');
  execFileSync('bash', [path.join(root, 'scripts', 'e2e-env.sh')], {
    stdio: ['ignore', 'ignore', 'inherit'],
    env: { ...process.env, VBALLOON_E2E_CACHE: cache },
  });
  const env = loadE2eEnv(cache);
  if (env === undefined) throw new Error('the QEMU environment is missing');
  const runDir = defaultRunDir();
  fs.mkdirSync(runDir, { recursive: true });
  const logFile = path.join(runDir, 'demo.log');
  const out = fs.createWriteStream(logFile);
  const config = readConfig({
    control: { socket: defaultControlSocket() },
    metrics: { host: '127.0.0.1', port: 9464 },
    vms: [{ name: 'vm0', socket: path.join(runDir, 'vm0.sock'), memory: '1G', statsInterval: '2s', policy: 'manual' }],
  });
  const daemon = new Daemon(config, { log: new StreamLogger(out, 'text', 'info') });
  await daemon.start();
  const guest = new QemuGuest(env, { socketPath: config.vms[0].socket, memMiB: 1024, numVqs: 5, configSize: 8 });
  let stopping = false;
  const stop = async (code: number): Promise<void> => {
    if (stopping) return;
    stopping = true;
    process.stdout.write('\nstopping: powering the guest off, stopping the daemon\n');
    await guest.shutdown();
    await daemon.stop();
    out.end();
    process.exit(code);
  };
  process.on('SIGINT', () => void stop(0));
  process.on('SIGTERM', () => void stop(0));
  process.stdout.write('booting the demo guest (QEMU, TCG, 1 GiB)...\n');
  await guest.boot();
  void guest.exited.then(() => void stop(0));
  const tty = process.stdout.isTTY;
  for (;;) {
    const status = daemon.status('vm0');
    const noMeminfo: Record<string, number> = {};
    const mem = await guest.meminfo().catch(() => noMeminfo);
    const lines = [
      `vballoon demo  (daemon log: ${logFile}; metrics: http://127.0.0.1:9464/metrics)`,
      '',
      statusTable([status]),
      '',
      `guest /proc/meminfo: MemTotal ${Math.round((mem['MemTotal'] ?? 0) / 2 ** 20)} MiB, ` +
        `MemAvailable ${Math.round((mem['MemAvailable'] ?? 0) / 2 ** 20)} MiB`,
      '',
      'from another terminal:  npx vballoon set-target vm0 256M     (or: npx vballoon status, stats, watch)',
      'Ctrl-C stops the guest and the daemon.',
    ];
    process.stdout.write(`${tty ? '\x1b[H\x1b[2J' : ''}${lines.join('\n')}\n`);
    await new Promise((r) => setTimeout(r, 1000));
  }
}

main().catch((err: unknown) => {
  process.stderr.write(`vballoon demo: ${err instanceof Error ? err.message : String(err)}\n`);
  process.exit(1);
});
