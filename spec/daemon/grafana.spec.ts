/**
 * The Grafana dashboard's queries, evaluated by a real Prometheus (Debian's `prometheus` package,
 * unpacked by scripts/promtool-env.sh) scraping the real daemon with a guest model attached: each
 * query must parse and return series. No Grafana runs here (neither Debian nor npm ships one that
 * runs on this machine), so Grafana's variables are substituted as Grafana would: `$vm` by `.*`,
 * `$__rate_interval` by a range of four scrape intervals.
 */
import { expect } from 'chai';
import { ChildProcess, spawn } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { BalloonGuest } from '../../lib/testing/balloon-guest';
import { DaemonProcess } from './harness';

const DASHBOARD = path.resolve(__dirname, '..', '..', '..', 'docs', 'grafana-dashboard.json');
const PROMETHEUS = [
  process.env['PROMTOOL'] === undefined ? undefined : path.join(path.dirname(process.env['PROMTOOL']), 'prometheus'),
  path.resolve(__dirname, '..', '..', '..', '.cache', 'promtool', 'root', 'usr', 'bin', 'prometheus'),
  '/usr/bin/prometheus',
].find((p) => p !== undefined && fs.existsSync(p));
const MiB = 2 ** 20;

interface Panel {
  title: string;
  targets?: Array<{ expr: string; refId: string }>;
}

async function query(port: number, expr: string): Promise<{ status: string; data?: { result: unknown[] } }> {
  const res = await fetch(`http://127.0.0.1:${port}/api/v1/query?query=${encodeURIComponent(expr)}`);
  return (await res.json()) as { status: string; data?: { result: unknown[] } };
}

(PROMETHEUS === undefined ? describe.skip : describe)(
  'Grafana dashboard queries against a real Prometheus',
  function () {
    this.timeout(120_000);
    let d: DaemonProcess;
    let guest: BalloonGuest | undefined;
    let prom: ChildProcess | undefined;

    afterEach(async () => {
      prom?.kill('SIGTERM');
      await guest?.close();
      if (d.exitCode === undefined) await d.stop();
    });

    it('every panel query parses and returns data; counters only through increase() or rate()', async () => {
      d = new DaemonProcess();
      await d.start({
        vms: [{ name: 'vm0', socket: d.vmSocket('vm0'), memory: '64M', statsInterval: '200ms', target: '8M' }],
      });
      guest = await BalloonGuest.boot(d.vmSocket('vm0'), { mode: 'seed', numQueues: 5, ramBytes: 64 * MiB });
      await guest.reach(8 * 256);
      // A pressure message in manual mode: the ack histogram and the suggestions counter get samples.
      // Eating past what is free makes the driver send one (then the model OOMs: manual mode
      // does not deflate).
      await guest.eat(60 * MiB);
      expect(guest.pressureMessages).to.be.greaterThan(0);
      await d.waitLog((l) => l.msg === 'policy suggestion (manual mode, not applied)');
      // In auto mode a lower ceiling applies at once: the applied-actions counter gets a sample.
      expect(d.cli(['mode', 'vm0', 'auto']).code).to.equal(0);
      expect((await d.cliAsync(['set-target', 'vm0', '4M'])).code).to.equal(0);
      d.cli(['status', 'nope']); // a control error
      const dir = path.join(d.dir, 'prometheus');
      fs.mkdirSync(dir);
      fs.writeFileSync(
        path.join(dir, 'prometheus.yml'),
        [
          'global: { scrape_interval: 1s, evaluation_interval: 1s }',
          'scrape_configs:',
          '  - job_name: vballoon',
          `    static_configs: [{ targets: ['127.0.0.1:${d.metricsPort}'] }]`,
          '',
        ].join('\n'),
      );
      const port = 19090 + (process.pid % 500);
      const log: string[] = [];
      prom = spawn(
        PROMETHEUS!,
        [
          `--config.file=${path.join(dir, 'prometheus.yml')}`,
          `--storage.tsdb.path=${path.join(dir, 'data')}`,
          `--web.listen-address=127.0.0.1:${port}`,
        ],
        { stdio: ['ignore', 'ignore', 'pipe'] },
      );
      prom.stderr!.on('data', (b: Buffer) => log.push(b.toString()));
      // Five scrapes, so that rate() and increase() over 4 s have at least two samples.
      let scrapes = 0;
      for (;;) {
        try {
          const r = await query(port, 'count_over_time(up{job="vballoon"}[1m])');
          scrapes = Number((r.data?.result[0] as { value?: [number, string] } | undefined)?.value?.[1] ?? 0);
        } catch {
          scrapes = 0; // not listening yet
        }
        if (scrapes >= 5) break;
        await new Promise((r) => setTimeout(r, 200));
      }
      const dashboard = JSON.parse(fs.readFileSync(DASHBOARD, 'utf8')) as { panels: Panel[] };
      const exprs = dashboard.panels.flatMap((p) => (p.targets ?? []).map((t) => ({ title: p.title, expr: t.expr })));
      expect(exprs.length).to.be.greaterThan(10);
      const empty: string[] = [];
      for (const { title, expr } of exprs) {
        const promql = expr.replace(/\$__rate_interval/g, '4s').replace(/\$vm/g, '.*');
        const r = await query(port, promql);
        expect(r.status, `${title}: ${promql}: ${JSON.stringify(r)}\n${log.join('')}`).to.equal('success');
        if (r.data!.result.length === 0) empty.push(`${title}: ${promql}`);
        // Counters are never graphed raw: through rate() or increase().
        for (const m of promql.matchAll(/(\w+_total)\b/g))
          expect(promql, `${title}: ${m[1]}`).to.match(new RegExp(`(rate|increase)\\(${m[1]}`));
      }
      // Series that exist only after an event this test did not cause may be empty; nothing else.
      expect(empty.filter((e) => !/oom_kills|alloc_stalls|errors_total\{vm/.test(e))).to.deep.equal([]);
    });
  },
);
