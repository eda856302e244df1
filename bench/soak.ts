/**
 * `npm run soak`: the restart soak with a real QEMU and guest (lib/testing/soak.ts): 100 SIGKILLs
 * at random moments and 20 graceful restarts by default, under the real systemd where it runs.
 * Prints the report as JSON and the figures docs/operations.md quotes.
 *
 *   npm run soak -- [--kills N] [--restarts N] [--seed S] [--manager auto|systemd|supervisor]
 */
import * as path from 'node:path';
import { loadE2eEnv } from '../lib/testing/qemu';
import { percentile, runSoak } from '../lib/testing/soak';

function arg(name: string, fallback: string): string {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 && i + 1 < process.argv.length ? process.argv[i + 1] : fallback;
}

async function main(): Promise<void> {
  const cache = process.env['VBALLOON_E2E_CACHE'] ?? path.resolve(__dirname, '..', '..', '.cache', 'e2e');
  const env = loadE2eEnv(cache);
  if (env === undefined) {
    console.error(`no end-to-end environment in ${cache}: run scripts/e2e-env.sh first`);
    process.exit(2);
  }
  const manager = arg('manager', 'auto') as 'auto' | 'systemd' | 'supervisor';
  const report = await runSoak({
    env,
    kills: Number(arg('kills', '100')),
    restarts: Number(arg('restarts', '20')),
    seed: Number(arg('seed', '1')),
    manager,
    log: (l) => console.error(l),
  });
  const ms = (v: number[]): string => {
    if (v.length === 0) return '-';
    const p = (q: number): string => percentile(v, q).toFixed(0);
    return `p50 ${p(50)} ms, p90 ${p(90)} ms, max ${Math.max(...v).toFixed(0)} ms`;
  };
  const mib = (b: number): string => `${(b / 1048576).toFixed(0)} MiB`;
  console.log(JSON.stringify(report, null, 2));
  console.error(`\n== restart soak (${report.manager}), ${report.seconds} s`);
  console.error(`SIGKILLs survived: ${report.kills}; stall ${ms(report.killStallsMs)}`);
  console.error(`graceful restarts: ${report.restarts}; stall ${ms(report.restartStallsMs)}`);
  console.error(`restarts in the middle of an inflate or deflate: ${report.midOperation}`);
  console.error(
    `final: target ${mib(report.finalTargetBytes)}, guest balloon ${mib(report.guestBalloonBytes)}, ` +
      `actual ${mib(report.actualBytes)}, ballooned ${mib(report.balloonedBytes)}, pages lost ${report.pagesLost}`,
  );
  console.error(`host memory released by the final inflate: ${mib(report.hostReleasedBytes)}`);
  console.error(
    `daemon fds ${report.daemonFds.afterFirstRestart} -> ${report.daemonFds.atEnd}; ` +
      `stored ${report.storedFds.afterFirstRestart} -> ${report.storedFds.atEnd}; ` +
      `stats age ${report.statsAgeSeconds} s`,
  );
  console.error(`lost replies sent again after a probe: ${report.lostRepliesResent}`);
  console.error(`daemon warnings and errors: ${JSON.stringify(report.problems)}`);
  const ok =
    report.pagesLost === 0 &&
    report.stillConnected &&
    report.daemonFds.atEnd === report.daemonFds.afterFirstRestart &&
    report.storedFds.atEnd === report.storedFds.afterFirstRestart &&
    (report.statsAgeSeconds ?? 99) < 5;
  if (!ok) {
    console.error('SOAK FAILED');
    process.exit(1);
  }
}

main().catch((err: unknown) => {
  console.error(err);
  process.exit(1);
});
