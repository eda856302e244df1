/**
 * The real daemon restarted and SIGKILLed under the real systemd (a user manager in a private
 * mount namespace; the test supervisor where systemd cannot run) while the Linux driver model
 * inflates and deflates through it over a real socket, memfd and eventfds. What it proves: the
 * front-end connection survives every restart (the guest model never reconnects; a reconnect
 * would fail its next request), every page stays accounted (guest balloon = daemon ballooned =
 * `actual`), stats keep arriving, nothing accumulates in the store. The control: the same kill
 * without a descriptor store ends the connection (the VM loses its balloon), as before this work.
 * With a real QEMU and guest: bench/soak.ts (`npm run soak`).
 */
import { expect } from 'chai';
import { spawn } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { VmStatus } from '../../lib/daemon/daemon';
import { BalloonGuest } from '../../lib/testing/balloon-guest';
import { DaemonService, runCli, VBALLOON_BIN } from '../../lib/testing/daemon-service';
import { tmpDir, until } from '../helpers';

const PAGES_PER_MIB = 256;
const MiB = 1024 * 1024;

async function status(s: DaemonService): Promise<VmStatus> {
  const r = await s.cli(['status', 'vm0', '--json']);
  if (r.code !== 0) throw new Error(`status: ${r.stderr}`);
  return JSON.parse(r.stdout) as VmStatus;
}

async function setTarget(s: DaemonService, mib: number): Promise<void> {
  const r = await s.cli(['set-target', 'vm0', `${mib}M`]);
  expect(r.code, r.stderr).to.equal(0);
}

async function untilAsync(cond: () => Promise<boolean>, what: string, timeoutMs = 30_000): Promise<void> {
  const start = Date.now();
  while (!(await cond())) {
    if (Date.now() - start > timeoutMs) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

describe('daemon restart and crash under a service manager (real processes)', function () {
  this.timeout(180_000);
  let dir = '';
  let service: DaemonService | undefined;
  let guest: BalloonGuest | undefined;

  beforeEach(async () => {
    dir = tmpDir();
    service = await DaemonService.start({
      dir,
      config: {
        vms: [{ name: 'vm0', socket: path.join(dir, 'vm0.sock'), statsInterval: '200ms', reporting: false }],
      },
    });
    guest = await BalloonGuest.boot(path.join(dir, 'vm0.sock'), {
      mode: 'seed',
      numQueues: 5,
      ramBytes: 128 * MiB,
      replyTimeoutMs: 60_000,
    });
  });

  afterEach(async function () {
    if (this.currentTest?.state === 'failed' && service !== undefined)
      for (const l of service.logs().slice(-60)) console.log(JSON.stringify(l));
    await guest?.close();
    await service?.close();
    guest = undefined;
    service = undefined;
    fs.rmSync(dir, { recursive: true, force: true });
  });

  it('SIGKILLs in the middle of inflates and deflates, and graceful restarts: the guest never notices', async () => {
    const s = service!;
    const g = guest!;
    const storedAtStart = await s.storedDescriptors();
    expect(storedAtStart, 'listener, connection, memory, rings, state and bitmap are stored').to.be.at.least(10);
    const targets = [48, 8, 64, 16, 40, 0, 56, 24];
    for (let i = 0; i < targets.length; i++) {
      await setTarget(s, targets[i]);
      // Let the guest get going, then kill (or restart) in the middle of its work.
      await new Promise((r) => setTimeout(r, 15 + i * 7));
      if (i % 3 === 2) await s.restart();
      else await s.crash();
      await g.reach(targets[i] * PAGES_PER_MIB, 60_000);
      g.check();
      const st = await status(s);
      expect(st.connected, `after restart ${i + 1}`).to.equal(true);
      expect(st.actualBytes).to.equal(targets[i] * MiB);
      expect(st.balloonedBytes).to.equal(g.balloonPages * 4096);
    }
    // Stats keep arriving through the daemon that runs now.
    const before = (await status(s)).statsAgeSeconds;
    expect(before).to.not.equal(null);
    await untilAsync(async () => ((await status(s)).statsAgeSeconds ?? 99) < 1, 'fresh stats');
    // The guest model's connection is the one it opened at boot (it cannot reconnect).
    expect(g.fe.isClosed, 'the connection of the boot').to.equal(false);
    // Nothing accumulates in the manager's store: what one VM needs, no more.
    expect(await s.storedDescriptors()).to.equal(storedAtStart);
    const logs = s.logs();
    expect(logs.filter((l) => l.msg === 'serving the front-end connection the previous process served')).to.have.length(
      targets.length,
    );
    expect(
      logs.filter((l) => l.level === 'error'),
      JSON.stringify(logs.filter((l) => l.level === 'error')),
    ).to.deep.equal([]);
  });
});

describe('daemon takeover without a service manager (vballoon serve --takeover)', function () {
  this.timeout(120_000);

  it('a new daemon takes the VM from the running one; the guest goes on on the same connection', async () => {
    const dir = tmpDir();
    const config = path.join(dir, 'config.json');
    const control = path.join(dir, 'control.sock');
    fs.writeFileSync(
      config,
      JSON.stringify({
        control: { socket: control },
        log: { format: 'json', level: 'info' },
        metrics: false,
        vms: [{ name: 'vm0', socket: path.join(dir, 'vm0.sock'), statsInterval: '200ms' }],
      }),
    );
    const startDaemon = (extra: string[]) => {
      const p = spawn(process.execPath, [VBALLOON_BIN, 'serve', '--config', config, ...extra], {
        stdio: ['ignore', 'ignore', 'pipe'],
      });
      let err = '';
      p.stderr.setEncoding('utf8').on('data', (c: string) => (err += c));
      return { p, err: () => err, exited: new Promise<number | null>((r) => p.on('exit', (c) => r(c))) };
    };
    const cli = (args: string[]) => runCli(control, args);
    const first = startDaemon([]);
    let second: ReturnType<typeof startDaemon> | undefined;
    let g: BalloonGuest | undefined;
    try {
      await until(
        () => fs.existsSync(path.join(dir, 'vm0.sock')) && first.err().includes('daemon started'),
        'first',
        20_000,
      );
      g = await BalloonGuest.boot(path.join(dir, 'vm0.sock'), { mode: 'seed', numQueues: 5, replyTimeoutMs: 60_000 });
      expect((await cli(['set-target', 'vm0', '16M'])).code).to.equal(0);
      await g.reach(16 * PAGES_PER_MIB);
      second = startDaemon(['--takeover']);
      expect(await first.exited, first.err()).to.equal(0);
      await until(() => second!.err().includes('daemon started'), 'second started', 20_000);
      expect(second.err()).to.contain('serving the front-end connection the previous process served');
      expect((await cli(['set-target', 'vm0', '4M'])).code).to.equal(0);
      await g.reach(4 * PAGES_PER_MIB);
      const st = JSON.parse((await cli(['status', 'vm0', '--json'])).stdout) as VmStatus;
      expect(st).to.deep.include({ connected: true, actualBytes: 4 * MiB, balloonedBytes: 4 * MiB });
      expect(g.fe.isClosed).to.equal(false);
      g.check();
    } finally {
      await g?.close();
      second?.p.kill('SIGINT');
      first.p.kill('SIGKILL');
      if (second !== undefined) await second.exited;
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });
});

describe('the control: a SIGKILL without a descriptor store', function () {
  this.timeout(60_000);

  it('ends the front-end connection: the VM loses its balloon (what the store prevents)', async () => {
    const dir = tmpDir();
    const config = path.join(dir, 'config.json');
    fs.writeFileSync(
      config,
      JSON.stringify({
        control: { socket: path.join(dir, 'control.sock') },
        log: { format: 'json' },
        metrics: false,
        vms: [{ name: 'vm0', socket: path.join(dir, 'vm0.sock') }],
      }),
    );
    const p = spawn(process.execPath, [VBALLOON_BIN, 'serve', '--config', config], {
      stdio: ['ignore', 'ignore', 'pipe'],
    });
    let err = '';
    p.stderr.setEncoding('utf8').on('data', (c: string) => (err += c));
    const g = await BalloonGuest.boot(path.join(dir, 'vm0.sock'), { mode: 'seed', numQueues: 5 }).catch(async () => {
      await until(() => err.includes('daemon started'), 'started', 20_000);
      return BalloonGuest.boot(path.join(dir, 'vm0.sock'), { mode: 'seed', numQueues: 5 });
    });
    try {
      p.kill('SIGKILL');
      await until(() => g.fe.isClosed, 'the connection to end', 20_000);
    } finally {
      await g.close();
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });
});
