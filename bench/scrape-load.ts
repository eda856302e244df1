/**
 * What a burst of /metrics scrapes costs the VMs: the real daemon process serves two VMs; a child
 * process sends rounds of 1,000 concurrent scrapes while this process drives a bystander VM (the
 * guest driver model) and times its kick-to-used round trips, before and during the load.
 *
 *   node dist/bench/scrape-load.js [--concurrency 1000] [--rounds 3]
 */
import { fork } from 'node:child_process';
import * as http from 'node:http';
import { BalloonGuest } from '../lib/testing/balloon-guest';
import { DaemonProcess } from '../spec/daemon/harness';
import { summarize } from './stats';

const MiB = 1024 * 1024;

/** The child: `rounds` rounds of `concurrency` scrapes at once; prints status counts as JSON. */
async function scraper(port: number, concurrency: number, rounds: number): Promise<void> {
  const agent = new http.Agent({ keepAlive: false, maxSockets: Infinity });
  const codes: Record<string, number> = {};
  for (let r = 0; r < rounds; r++) {
    await Promise.all(
      Array.from(
        { length: concurrency },
        () =>
          new Promise<void>((resolve) => {
            const req = http.get({ host: '127.0.0.1', port, path: '/metrics', agent }, (res) => {
              res.resume();
              res.on('end', () => {
                codes[String(res.statusCode)] = (codes[String(res.statusCode)] ?? 0) + 1;
                resolve();
              });
            });
            req.on('error', (err: NodeJS.ErrnoException) => {
              codes[err.code ?? 'error'] = (codes[err.code ?? 'error'] ?? 0) + 1;
              resolve();
            });
          }),
      ),
    );
  }
  process.send!(codes);
}

async function roundTrip(g: BalloonGuest, buf: number): Promise<number> {
  const d = g.driver('deflate');
  const t0 = process.hrtime.bigint();
  d.addBuffer([{ addr: buf, len: 4 }]);
  d.kick();
  await d.waitUsed(1, 30_000);
  return Number(process.hrtime.bigint() - t0) / 1e6;
}

export async function benchScrapeLoad(concurrency = 1000, rounds = 3): Promise<Record<string, unknown>> {
  const d = new DaemonProcess();
  const vm = (name: string): Record<string, unknown> => ({ name, socket: d.vmSocket(name), memory: '64M' });
  await d.start({ vms: [vm('vm0'), vm('vm1')], log: { format: 'json', level: 'info' } });
  const g = await BalloonGuest.boot(d.vmSocket('vm1'), { mode: 'stock', numQueues: 5, ramBytes: 64 * MiB });
  try {
    const buf = g.fe.ram.alloc(4, 4);
    g.fe.ram.memory.writeU32(buf, (64 * MiB) / 4096 - 1);
    const idle: number[] = [];
    for (let i = 0; i < 500; i++) idle.push(await roundTrip(g, buf));
    const child = fork(__filename, ['scraper', String(d.metricsPort), String(concurrency), String(rounds)]);
    const state = { done: false };
    const codes = new Promise<Record<string, number>>((resolve) =>
      child.once('message', (m: Record<string, number>) => {
        state.done = true;
        resolve(m);
      }),
    );
    const loaded: number[] = [];
    const t0 = Date.now();
    while (!state.done) loaded.push(await roundTrip(g, buf));
    const ms = (x: number): number => Math.round(x * 100) / 100;
    const s = (xs: number[]) => {
      const r = summarize(xs.map((x) => x * 1e6));
      return { n: xs.length, p50: ms(r.p50 / 1e6), p99: ms(r.p99 / 1e6), max: ms(Math.max(...xs)) };
    };
    return {
      name: `bystander kick-to-used round trip (ms) during ${rounds} x ${concurrency} concurrent scrapes`,
      idle: s(idle),
      duringScrapes: s(loaded),
      scrapeSeconds: (Date.now() - t0) / 1000,
      responses: await codes,
      refusedByDaemon: (await (await fetch(`http://127.0.0.1:${d.metricsPort}/metrics`)).text())
        .split('\n')
        .filter((l) => l.startsWith('vballoon_metrics_connections_refused_total')),
    };
  } finally {
    await g.close();
    await d.stop();
  }
}

if (require.main === module) {
  if (process.argv[2] === 'scraper') {
    void scraper(Number(process.argv[3]), Number(process.argv[4]), Number(process.argv[5]));
  } else {
    const arg = (name: string, def: number): number => {
      const i = process.argv.indexOf(`--${name}`);
      return i < 0 ? def : Number(process.argv[i + 1]);
    };
    benchScrapeLoad(arg('concurrency', 1000), arg('rounds', 3)).then(
      (r) => console.log(JSON.stringify(r, null, 2)),
      (err: unknown) => {
        console.error(err);
        process.exit(1);
      },
    );
  }
}
