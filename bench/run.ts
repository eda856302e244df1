/**
 * `npm run bench`: runs every benchmark, prints one table (figure, reference, ratio) and writes
 * machine-readable results to bench/results/latest.json.
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { benchKickLatency } from './kick-latency';

async function main(): Promise<void> {
  const quick = process.argv.includes('--quick');
  const latency = await benchKickLatency(quick ? { rounds: 2, iterations: 3000 } : {});
  const rows = [
    ['figure', 'vballoon', 'reference (eventfd ping-pong)', 'ratio'],
    ['kick-to-used p50 (us)', String(latency.kick.p50), String(latency.pingpong.p50), String(latency.ratioP50)],
    ['kick-to-used p99 (us)', String(latency.kick.p99), String(latency.pingpong.p99), String(latency.ratioP99)],
    ['kick-to-used p99.9 (us)', String(latency.kick.p999), String(latency.pingpong.p999), String(Math.round((latency.kick.p999 / latency.pingpong.p999) * 100) / 100)],
  ];
  const widths = rows[0]!.map((_, c) => Math.max(...rows.map((r) => r[c]!.length)));
  for (const r of rows) console.log(r.map((cell, c) => cell.padEnd(widths[c]!)).join('  '));
  console.log(`(${latency.rounds} rounds x ${latency.iterations} round trips, medians of per-round percentiles; p50 spread across rounds: vballoon ${latency.spreadP50Percent.kick}%, reference ${latency.spreadP50Percent.pingpong}%)`);
  const out = {
    date: new Date().toISOString(),
    node: process.version,
    cpus: os.cpus().length,
    cpuModel: os.cpus()[0]?.model,
    results: [latency],
  };
  const dir = path.resolve(__dirname, '..', '..', 'bench', 'results');
  fs.mkdirSync(dir, { recursive: true });
  fs.writeFileSync(path.join(dir, 'latest.json'), `${JSON.stringify(out, null, 2)}\n`);
  console.log(`wrote ${path.join(dir, 'latest.json')}`);
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
