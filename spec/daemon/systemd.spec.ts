/**
 * systemd integration without systemd (PID 1 here is not systemd): a test supervisor speaks the
 * documented notify protocol (sd_notify(3): datagrams of KEY=VALUE lines on the AF_UNIX socket in
 * $NOTIFY_SOCKET) to the real daemon process; and the shipped unit is checked with the real
 * `systemd-analyze verify` and `systemd-analyze security` (skipped where systemd-analyze is absent).
 */
import { expect } from 'chai';
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as path from 'node:path';
import { createSocket, UnixDgramSocket } from 'unix-dgram';
import { until } from '../helpers';
import { DaemonProcess } from './harness';
import { daemonNodeFlags, UNIT_FILE as UNIT } from '../../lib/testing/unit';

/** Receives notify datagrams, in order, each as a map of its fields. */
class Supervisor {
  readonly messages: Array<Partial<Record<string, string>>> = [];
  private readonly socket: UnixDgramSocket;
  constructor(readonly path: string) {
    this.socket = createSocket('unix_dgram', (buf: Buffer) => {
      const fields: Record<string, string> = {};
      for (const line of buf.toString().split('\n')) {
        const eq = line.indexOf('=');
        if (eq > 0) fields[line.slice(0, eq)] = line.slice(eq + 1);
      }
      this.messages.push(fields);
    });
    this.socket.bind(path);
  }
  async next(
    pred: (m: Partial<Record<string, string>>) => boolean,
    what: string,
  ): Promise<Partial<Record<string, string>>> {
    await until(() => this.messages.some(pred), what, 20_000);
    return this.messages.find(pred)!;
  }
  close(): void {
    this.socket.close();
  }
}

function connectable(file: string): Promise<boolean> {
  return new Promise((resolve) => {
    const s = net.createConnection(file);
    s.on('connect', () => {
      s.destroy();
      resolve(true);
    });
    s.on('error', () => resolve(false));
  });
}

describe('systemd: notify protocol and the shipped unit', function () {
  this.timeout(60_000);
  let d: DaemonProcess | undefined;
  let sup: Supervisor | undefined;
  afterEach(async () => {
    // Only the tests that start a daemon set `d`; each one is stopped once.
    if (d !== undefined && d.exitCode === undefined) await d.stop();
    d = undefined;
    sup?.close();
    sup = undefined;
  });

  it('READY=1 once every socket listens; STATUS=, WATCHDOG=1, RELOADING=1/READY=1 on SIGHUP, STOPPING=1', async () => {
    const daemon = (d = new DaemonProcess());
    sup = new Supervisor(path.join(d.dir, 'notify.sock'));
    const vm = { name: 'vm0', socket: d.vmSocket('vm0'), memory: '64M' };
    let readyAt: { vm: boolean; control: boolean } | undefined;
    const ready = sup
      .next((m) => m['READY'] === '1', 'READY=1')
      .then(async (m) => {
        // At READY=1 the sockets must already accept connections (no race for a VM ordered after).
        readyAt = { vm: await connectable(daemon.vmSocket('vm0')), control: await connectable(daemon.control) };
        return m;
      });
    await d.start({ vms: [vm] }, [], {
      ...process.env,
      NOTIFY_SOCKET: sup.path,
      WATCHDOG_USEC: '200000',
    });
    const r = await ready;
    expect(readyAt).to.deep.equal({ vm: true, control: true });
    expect(r['STATUS']).to.equal('serving 1 VM (0 connected)');
    expect(r['MAINPID']).to.equal(String(d.proc!.pid));
    // WATCHDOG_USEC=200 ms: pings at half of it, repeatedly.
    await until(() => sup!.messages.filter((m) => m['WATCHDOG'] === '1').length >= 3, 'three watchdog pings', 20_000);

    const before = sup.messages.length;
    d.signal('SIGHUP');
    await d.waitLog((l) => l.msg === 'configuration reloaded');
    await until(() => sup!.messages.slice(before).some((m) => m['READY'] === '1'), 'READY=1 after reload');
    const reload = sup.messages.slice(before).filter((m) => m['WATCHDOG'] === undefined);
    expect(reload[0]['RELOADING']).to.equal('1');
    expect(Number(reload[0]['MONOTONIC_USEC'])).to.be.greaterThan(0);
    expect(reload[1]).to.include({ READY: '1', STATUS: 'serving 1 VM (0 connected)' });

    await d.stop();
    await until(() => sup!.messages.some((m) => m['STOPPING'] === '1'), 'STOPPING=1');
  });

  it('a service manager that went away is logged once and does not stop the daemon', async () => {
    d = new DaemonProcess();
    await d.start({ vms: [] }, [], { ...process.env, NOTIFY_SOCKET: path.join(d.dir, 'nobody-listens.sock') });
    await d.waitLog((l) => l.msg === 'cannot notify the service manager');
    expect(d.cli(['list', '--json']).code).to.equal(0);
  });

  it("the unit and bin/vballoon.js's first line start Node with the same heap options, and Node applies them", () => {
    const flags = daemonNodeFlags(); // from docs/vballoon.service's ExecStart
    expect(flags).to.include('--max-semi-space-size=1');
    const bin = path.resolve(__dirname, '..', '..', 'bin', 'vballoon.js');
    const shebang = fs.readFileSync(bin, 'utf8').split('\n')[0];
    const m = /^#!(\S+) -S (node(?: --\S+)*)$/.exec(shebang);
    expect(m, shebang).to.not.equal(null);
    expect(m![2].split(' ').slice(1)).to.deep.equal(flags);
    // Started as the kernel starts the script (the interpreter line), Node keeps its young
    // generation at 1 MiB per semi-space under an allocation rate that grows it to 16 MiB without.
    const probe = `
      const v8 = require('v8'); let keep = [];
      for (let r = 0; r < 40; r++)
        for (let i = 0; i < 100000; i++) { const o = { i, s: 'x' + i }; if (i % 500 === 0) keep.push(o); }
      process.stdout.write(String(v8.getHeapSpaceStatistics().find((s) => s.space_name === 'new_space').space_size));`;
    const sized = (args: string[], command = process.execPath): number => {
      const r = spawnSync(command, [...args, '-e', probe], { encoding: 'utf8' });
      expect(r.status, r.stderr).to.equal(0);
      return Number(r.stdout);
    };
    const held = sized(['-S', m![2]], m![1]);
    expect(held).to.be.at.most(2 * 1024 * 1024);
    expect(sized([])).to.be.above(held); // the control: left alone, it grows
  });

  const analyze = spawnSync('systemd-analyze', ['--version'], { encoding: 'utf8' });
  (analyze.status === 0 ? it : it.skip)(
    'docs/vballoon.service: systemd-analyze verify is clean and security scores below 4',
    () => {
      const dir = fs.mkdtempSync('/tmp/vballoon-unit-');
      const unit = path.join(dir, 'vballoon.service');
      fs.copyFileSync(UNIT, unit);
      const verify = spawnSync('systemd-analyze', ['verify', unit], { encoding: 'utf8' });
      expect(verify.status, verify.stderr).to.equal(0);
      expect(verify.stderr.trim()).to.equal('');
      const security = spawnSync('systemd-analyze', ['security', '--offline=yes', unit], { encoding: 'utf8' });
      const m = /Overall exposure level for vballoon\.service: (\d+\.\d+)/.exec(`${security.stdout}${security.stderr}`);
      expect(m, security.stdout + security.stderr).to.not.equal(null);
      expect(Number(m![1])).to.be.below(4);
      fs.rmSync(dir, { recursive: true, force: true });
    },
  );
});
