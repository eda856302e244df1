/**
 * The real daemon process with the real CLI, a guest driver model on the VM socket, /metrics
 * parsed by a real Prometheus parser, control-socket abuse, SIGTERM and SIGHUP.
 */
import { expect } from 'chai';
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as path from 'node:path';
import parsePrometheus from 'parse-prometheus-text-format';
import { native } from '../../lib/native';
import { BalloonGuest } from '../../lib/testing/balloon-guest';
import { until } from '../helpers';
import { spawnSync } from 'node:child_process';
import { BIN, DaemonProcess } from './harness';
import type { VmStats, VmStatus } from '../../lib/daemon/daemon';

const MiB = 1024 * 1024;
const VM = (d: DaemonProcess, extra: Record<string, unknown> = {}) => ({
  name: 'vm0',
  socket: d.vmSocket('vm0'),
  memory: '64M',
  statsInterval: '200ms',
  ...extra,
});

type Reply = { id: unknown; ok: boolean; error: { code: string; message: string } };
const reply = (text: string): Reply => JSON.parse(text) as Reply;
const statusOf = (d: DaemonProcess, vm: string): VmStatus =>
  JSON.parse(d.cli(['status', vm, '--json']).stdout) as VmStatus;
const statsOf = (d: DaemonProcess, vm: string): VmStats => JSON.parse(d.cli(['stats', vm, '--json']).stdout) as VmStats;
const listOf = (d: DaemonProcess): Array<{ vm: string; connected: boolean; mode: string; socket: string }> =>
  JSON.parse(d.cli(['list', '--json']).stdout) as Array<{
    vm: string;
    connected: boolean;
    mode: string;
    socket: string;
  }>;

function request(socketPath: string, payload: string | Buffer): Promise<string> {
  return new Promise((resolve, reject) => {
    const s = net.createConnection(socketPath);
    let out = '';
    s.on('data', (d: Buffer) => (out += d.toString()));
    s.on('end', () => resolve(out));
    s.on('close', () => resolve(out));
    s.on('error', reject);
    // One reply line per request line; then this side ends (a refused request ends it earlier).
    const wanted = typeof payload === 'string' ? payload.split('\n').filter((l) => l !== '').length : 1;
    s.on('data', () => {
      if (out.split('\n').length - 1 >= wanted) s.end();
    });
    s.on('connect', () => s.write(payload));
  });
}

async function metrics(port: number): Promise<string> {
  const res = await fetch(`http://127.0.0.1:${port}/metrics`);
  expect(res.status).to.equal(200);
  return res.text();
}

describe('daemon and CLI (real processes)', function () {
  this.timeout(30_000);
  let d: DaemonProcess;
  let guest: BalloonGuest | undefined;

  beforeEach(() => {
    d = new DaemonProcess();
  });
  afterEach(async () => {
    await guest?.close();
    guest = undefined;
    if (d.exitCode === undefined) await d.stop();
  });

  it('set-target inflates a guest; status, stats and watch show it; --json is stable', async () => {
    await d.start({ vms: [VM(d)] });
    guest = await BalloonGuest.boot(d.vmSocket('vm0'), { mode: 'stock', numQueues: 5, ramBytes: 64 * MiB });
    const set = await d.cliAsync(['set-target', 'vm0', '16M', '--wait', '--timeout', '20s']);
    expect(set.code, set.stderr).to.equal(0);
    expect(set.stdout).to.contain('balloon target 16 MiB (actual 16 MiB)');
    expect(guest.actualPages).to.equal(16 * 256);

    const status = d.cli(['status', 'vm0', '--json']);
    expect(status.code).to.equal(0);
    const s = JSON.parse(status.stdout) as VmStatus;
    expect(Object.keys(s)).to.deep.equal([
      'vm',
      'connected',
      'mode',
      'socket',
      'guestRamBytes',
      'targetBytes',
      'actualBytes',
      'guestSizeBytes',
      'balloonedBytes',
      'hostResidentBytes',
      'reclaimedBytes',
      'discardInhibited',
      'negotiatedQueues',
      'pressureMessages',
      'policyCooldownSeconds',
      'statsAgeSeconds',
      'statsStale',
      'floorBytes',
      'shares',
    ]);
    expect(s).to.include({
      vm: 'vm0',
      connected: true,
      mode: 'manual',
      targetBytes: 16 * MiB,
      actualBytes: 16 * MiB,
      balloonedBytes: 16 * MiB,
      guestRamBytes: 64 * MiB,
      guestSizeBytes: 48 * MiB,
    });
    expect(s.negotiatedQueues).to.deep.equal(['inflate', 'deflate', 'stats', 'reporting']);
    expect(d.cli(['status']).stdout).to.match(/vm0\s+connected\s+manual\s+64 MiB\s+16 MiB\s+16 MiB\s+48 MiB/);

    await until(() => statsOf(d, 'vm0').updatedAt !== null, 'stats');
    const stats = statsOf(d, 'vm0');
    expect(Object.keys(stats)).to.deep.equal(['vm', 'updatedAt', 'ageSeconds', 'stale', 'stats']);
    expect(stats.stats.total_memory).to.equal(64 * MiB);
    expect(d.cli(['stats', 'vm0']).stdout).to.match(/total_memory\s+64 MiB/);

    const watch = d.cli(['watch', 'vm0', '--count', '2', '--interval', '100ms', '--json']);
    expect(watch.code).to.equal(0);
    const frames = watch.stdout
      .trim()
      .split('\n')
      .map((l) => JSON.parse(l) as { vms: VmStatus[] });
    expect(frames).to.have.length(2);
    expect(frames[1].vms[0]).to.include({ vm: 'vm0', actualBytes: 16 * MiB });
    expect(d.cli(['watch', 'vm0', '--count', '1']).stdout).to.contain('vm0');

    // --guest-size: QMP's convention (what the guest keeps).
    const g = d.cli(['set-target', 'vm0', '--guest-size', '56M', '--json']);
    expect((JSON.parse(g.stdout) as VmStatus).targetBytes).to.equal(8 * MiB);
    await guest.reach(8 * 256);

    const list = listOf(d);
    expect(list).to.deep.equal([{ vm: 'vm0', connected: true, mode: 'manual', socket: d.vmSocket('vm0') }]);
    const q = d.cli(['qemu-args', 'vm0']);
    expect(q.stdout).to.contain(
      'vhost-user-test-device-pci,chardev=vb-vm0,virtio-id=5,num_vqs=5,vq_size=128,config_size=8',
    );
    expect(q.stdout).to.contain('memory-backend-memfd,id=mem-vm0,size=64M,share=on');
    expect(q.stdout.endsWith('\n')).to.equal(true);
    // The status table: no column that shows untouched memory as reclaimed.
    expect(d.cli(['status']).stdout.split('\n')[0]).to.not.contain('RECLAIMED');
    const completion = d.cli(['completion']);
    expect(completion.code).to.equal(0);
    expect(completion.stdout).to.contain('_vballoon_yargs_completions');
  });

  it('bad CLI input: one clear line on stderr and a documented exit code', async () => {
    await d.start({ vms: [VM(d)] });
    const cases: Array<{ args: string[]; code: number; text: RegExp }> = [
      { args: ['set-target', 'nope', '1M'], code: 4, text: /no VM named "nope"/ },
      { args: ['set-target', 'vm0', '12 parsecs'], code: 2, text: /not a size|unknown unit/ },
      { args: ['set-target', 'vm0', '1G'], code: 5, text: /exceeds guest RAM/ },
      { args: ['set-target', 'vm0'], code: 2, text: /SIZE or --guest-size/ },
      { args: ['frobnicate'], code: 2, text: /Unknown argument/ },
      { args: ['mode', 'vm0', 'turbo'], code: 2, text: /Invalid values/ },
    ];
    for (const c of cases) {
      const r = d.cli(c.args);
      expect(r.code, `${c.args.join(' ')}: ${r.stderr}`).to.equal(c.code);
      expect(r.stderr).to.match(c.text);
      expect(r.stderr.trim().split('\n')).to.have.length(1);
    }
    const r = spawnSync(process.execPath, [BIN, '--control', path.join(d.dir, 'nothing.sock'), 'status'], {
      encoding: 'utf8',
    });
    const noDaemon = { code: r.status, stderr: r.stderr };
    expect(noDaemon.code).to.equal(3);
    expect(noDaemon.stderr).to.match(/not running/);
    for (const cmd of ['serve', 'set-target', 'status', 'stats', 'watch', 'qemu-args', 'mode', 'discard', 'list']) {
      const h = d.cli([cmd, '--help']);
      expect(h.code, cmd).to.equal(0);
      expect(h.stdout).to.contain('vballoon');
    }
  });

  it('/metrics is valid Prometheus exposition and has every documented metric with its type', async () => {
    await d.start({ vms: [VM(d, { policy: 'auto', target: '8M' })] });
    guest = await BalloonGuest.boot(d.vmSocket('vm0'), { mode: 'seed', numQueues: 5, ramBytes: 64 * MiB });
    await until(() => statsOf(d, 'vm0').updatedAt !== null, 'stats');
    await guest.eat(1 * MiB);
    // A pressure message, so the histogram has an observation.
    const families = parsePrometheus(await metrics(d.metricsPort));
    const byName = new Map(families.map((f) => [f.name, f]));
    const doc = fs.readFileSync(path.resolve(__dirname, '..', '..', '..', 'docs', 'metrics.md'), 'utf8');
    const documented = [...doc.matchAll(/^\| `(vballoon_[a-z_]+)` \| (gauge|counter|histogram) \|/gm)].map((m) => ({
      name: m[1],
      type: m[2],
    }));
    expect(documented.length).to.be.greaterThan(25);
    for (const m of documented) {
      const f = byName.get(m.name);
      expect(f, `${m.name} missing`).to.not.equal(undefined);
      expect(f!.type.toLowerCase(), m.name).to.equal(m.type);
    }
    for (const f of families)
      if (f.name.startsWith('vballoon_'))
        expect(
          documented.map((m) => m.name),
          `${f.name} undocumented`,
        ).to.include(f.name);
    expect(byName.has('process_cpu_user_seconds_total')).to.equal(true);
    const value = (name: string, labels: Record<string, string> = { vm: 'vm0' }) =>
      Number(
        byName.get(name)!.metrics.find((x) => Object.entries(labels).every(([k, v]) => x.labels?.[k] === v))?.value,
      );
    expect(value('vballoon_connected')).to.equal(1);
    expect(value('vballoon_guest_ram_bytes')).to.equal(64 * MiB);
    expect(value('vballoon_guest_stat_bytes', { vm: 'vm0', stat: 'total_memory' })).to.equal(64 * MiB);
    expect(value('vballoon_policy_mode', { vm: 'vm0', mode: 'auto' })).to.equal(1);
    const res = await fetch(`http://127.0.0.1:${d.metricsPort}/other`);
    expect(res.status).to.equal(404);
  });

  const promtool = [
    process.env['PROMTOOL'],
    path.resolve(__dirname, '..', '..', '..', '.cache', 'promtool', 'root', 'usr', 'bin', 'promtool'),
    '/usr/bin/promtool',
  ].find((p) => p !== undefined && p !== '' && fs.existsSync(p));
  (promtool === undefined ? it.skip : it)(
    'promtool check metrics passes on /metrics (Prometheus naming rules)',
    async () => {
      await d.start({
        vms: [VM(d, { policy: 'auto', target: '8M' }), VM(d, { name: 'vm1', socket: d.vmSocket('vm1') })],
      });
      guest = await BalloonGuest.boot(d.vmSocket('vm0'), { mode: 'seed', numQueues: 5, ramBytes: 64 * MiB });
      await until(() => statsOf(d, 'vm0').updatedAt !== null, 'stats');
      await guest.eat(1 * MiB);
      d.cli(['set-target', 'nope', '1M']); // a control error, so that counter has a sample
      const text = await metrics(d.metricsPort);
      for (const name of ['vballoon_build_info', 'vballoon_guest_stat_events', 'vballoon_control_errors_total'])
        expect(text).to.contain(`# TYPE ${name} `);
      expect(text).to.match(/^vballoon_guest_stats_last_update_timestamp_seconds\{vm="vm0"\} \d+(\.\d+)?$/m);
      expect(text).to.not.match(/_total\{[^}]*\} .*\n# TYPE \S+ gauge/);
      const r = spawnSync(promtool!, ['check', 'metrics'], { input: text, encoding: 'utf8' });
      expect(`${r.stdout}${r.stderr}`.trim()).to.equal('');
      expect(r.status).to.equal(0);
    },
  );

  describe('control socket', () => {
    it('refuses malformed JSON, oversized requests and unknown commands, and changes nothing', async () => {
      await d.start({ vms: [VM(d)] });
      const bad = reply(await request(d.control, '{not json\n'));
      expect(bad).to.deep.include({ ok: false });
      expect(bad.error.code).to.equal('EBADJSON');
      const unknown = reply(await request(d.control, '{"id":7,"method":"explode"}\n'));
      expect(unknown).to.deep.include({ id: 7, ok: false });
      expect(unknown.error.code).to.equal('EUNKNOWNMETHOD');
      const params = reply(
        await request(d.control, '{"id":8,"method":"set-target","params":{"vm":"vm0","bytes":"lots"}}\n'),
      );
      expect(params.error.code).to.equal('EBADPARAMS');
      const notObject = reply(await request(d.control, '[1,2]\n'));
      expect(notObject.error.code).to.equal('EBADREQUEST');
      const huge = await request(d.control, Buffer.alloc(200 * 1024, 'x'));
      expect(reply(huge.split('\n')[0]).error.code).to.equal('ETOOLARGE');
      const proto = reply(await request(d.control, '{"id":9,"method":"__proto__"}\n'));
      expect(proto.error.code).to.equal('EUNKNOWNMETHOD');
      // Nothing changed, the daemon still answers.
      const s = statusOf(d, 'vm0');
      expect(s.targetBytes).to.equal(0);
      expect(fs.statSync(d.control).mode & 0o777).to.equal(0o600);
      const families = parsePrometheus(await metrics(d.metricsPort));
      const m = families.find((f) => f.name === 'vballoon_control_errors_total')!;
      expect(m.metrics.map((x) => x.labels?.code).sort()).to.include.members([
        'EBADJSON',
        'EBADPARAMS',
        'EBADREQUEST',
        'ETOOLARGE',
        'EUNKNOWNMETHOD',
      ]);
      // Control errors are not a VM's: the vm label holds VM names only.
      const errors = families.find((f) => f.name === 'vballoon_errors_total');
      expect((errors?.metrics ?? []).filter((x) => x.labels?.vm === 'control')).to.deep.equal([]);
    });

    it('refuses callers of another user', async () => {
      await d.start({ control: { socket: d.control, mode: '0666' }, vms: [VM(d)] });
      fs.chmodSync(d.dir, 0o755);
      const r = d.cli(['status'], { uid: 65534, gid: 65534 });
      expect(r.code, r.stderr).to.equal(8);
      expect(r.stderr).to.match(/uid 65534 may not use this control socket/);
    });

    it('will not replace a control socket owned by another user', () => {
      const sock = d.control;
      native.close(native.listen(sock, 1)); // a stale socket file, left behind
      fs.chownSync(sock, 65534, 65534);
      const file = d.configFile({ vms: [VM(d)] });
      const r = d.cli(['serve', '--config', file]);
      expect(r.code).to.equal(7);
      expect(r.stderr).to.match(/owned by uid 65534.*refusing to replace it/);
      expect(fs.existsSync(sock)).to.equal(true);
    });

    it("a second daemon with the same VMs leaves the running daemon's sockets alone", async () => {
      // Same configuration, then the same VMs under another control socket: the second daemon
      // used to delete the running daemon's VM socket first (new QEMUs then got ENOENT), or,
      // with another control path, take the VM over silently.
      await d.start({ vms: [VM(d)] });
      const config = path.join(d.dir, 'config.json');
      const same = d.cli(['serve', '--config', config]);
      expect(same.code).to.equal(7);
      expect(same.stderr).to.match(/in use/);
      const other = d.cli(['serve', '--config', config, '--control', path.join(d.dir, 'other.sock')]);
      expect(other.code).to.equal(7);
      expect(other.stderr, other.stderr).to.match(/vm0\.sock is in use by another process/);
      // The running daemon still serves vm0: its socket is there and a guest can attach.
      expect(fs.statSync(d.vmSocket('vm0')).isSocket()).to.equal(true);
      guest = await BalloonGuest.boot(d.vmSocket('vm0'), { mode: 'stock', numQueues: 5, ramBytes: 64 * 1024 * 1024 });
      await until(() => (JSON.parse(d.cli(['status', 'vm0', '--json']).stdout) as VmStatus).connected, 'vm0 attached');
    });
  });

  it('set-target reports a target the device refuses, and refuses bytes and guestBytes together', async () => {
    // vm1 has no configured memory and no guest yet, so only the device can refuse 2^45 bytes
    // (2^33 pages, past the 32-bit num_pages field). This used to answer ok.
    await d.start({ vms: [VM(d), { name: 'vm1', socket: d.vmSocket('vm1') }] });
    const huge = reply(
      await request(d.control, `{"id":1,"method":"set-target","params":{"vm":"vm1","bytes":${2 ** 45}}}\n`),
    );
    expect(huge).to.deep.include({ id: 1, ok: false });
    expect(huge.error.code).to.equal('ETARGET');
    expect(huge.error.message).to.equal('a balloon of 32 TiB is larger than virtio-balloon can describe (16.0 TiB)');
    const both = reply(
      await request(d.control, '{"id":2,"method":"set-target","params":{"vm":"vm0","bytes":0,"guestBytes":0}}\n'),
    );
    expect(both.error.code).to.equal('EBADPARAMS');
    expect(statusOf(d, 'vm1').targetBytes).to.equal(0);
  });

  it('validates the configuration file with clear errors', () => {
    const cases: Array<{ config: unknown; text: RegExp }> = [
      { config: { vms: [{ name: 'vm0', memmory: '1G' }] }, text: /vms\[0\]\.memmory: unknown setting/ },
      { config: { vms: [{ name: 'vm0', memory: 'lots' }] }, text: /vms\[0\]\.memory: "lots" is not a size/ },
      { config: { vms: [{ name: 'a b' }] }, text: /vms\[0\]\.name/ },
      { config: { vms: [{ name: 'x' }, { name: 'x', socket: '/tmp/other' }] }, text: /used twice/ },
      { config: { vms: [{ name: 'x', policy: 'yolo' }] }, text: /vms\[0\]\.policy: expected one of manual, auto/ },
      { config: { control: { mode: 'rw' } }, text: /control\.mode/ },
      { config: { vms: [{ name: 'x', memory: '1G', target: '2G' }] }, text: /larger than the guest's memory/ },
    ];
    for (const c of cases) {
      const file = path.join(d.dir, 'bad.json');
      fs.writeFileSync(file, JSON.stringify(c.config));
      const r = d.cli(['serve', '--config', file]);
      expect(r.code, JSON.stringify(c.config)).to.equal(7);
      expect(r.stderr).to.match(c.text);
    }
    const yaml = path.join(d.dir, 'bad.yaml');
    fs.writeFileSync(yaml, 'vms:\n  - name: vm0\n   memory: [1G\n');
    const r = d.cli(['serve', '--config', yaml]);
    expect(r.code).to.equal(7);
    expect(r.stderr).to.match(/not valid YAML/);
  });

  it('SIGHUP reloads the configuration', async () => {
    await d.start({ vms: [VM(d)] });
    fs.writeFileSync(
      path.join(d.dir, 'config.json'),
      JSON.stringify({
        control: { socket: d.control },
        metrics: { host: '127.0.0.1', port: 0 },
        log: { format: 'json' },
        vms: [VM(d, { policy: 'auto' }), { name: 'vm1', socket: d.vmSocket('vm1') }],
      }),
    );
    d.signal('SIGHUP');
    await d.waitLog((l) => l.msg === 'configuration reloaded');
    const list = listOf(d);
    expect(list.map((v) => `${v.vm}:${v.mode}`)).to.deep.equal(['vm0:auto', 'vm1:manual']);
    fs.writeFileSync(path.join(d.dir, 'config.json'), '{"vms": [{"name": 7}]}');
    d.signal('SIGHUP');
    await d.waitLog((l) => l.msg.startsWith('reload refused'));
    expect(listOf(d)).to.have.length(2);
    // A VM that cannot be served (its socket path is a regular file) is refused, the rest applies.
    const file = path.join(d.dir, 'not-a-socket');
    fs.writeFileSync(file, '');
    d.logs.length = 0;
    fs.writeFileSync(
      path.join(d.dir, 'config.json'),
      JSON.stringify({
        control: { socket: d.control },
        metrics: { host: '127.0.0.1', port: 0 },
        log: { format: 'json', level: 'debug' },
        state: { file: d.stateFile },
        vms: [VM(d), { name: 'vm2', socket: file }],
      }),
    );
    d.signal('SIGHUP');
    await d.waitLog((l) => l.msg === 'configuration reloaded');
    const refusedVm = d.logs.find((l) => l.msg === 'reload: refused')!;
    expect(refusedVm['setting']).to.equal('vms[vm2]');
    expect(String(refusedVm['reason'])).to.match(/cannot add it/);
    expect(listOf(d).map((v) => `${v.vm}:${v.mode}`)).to.deep.equal(['vm0:manual']);
  });

  it('SIGHUP applies or refuses every changed setting, one log line each; nothing is ignored', async () => {
    await d.start({ vms: [VM(d)] });
    guest = await BalloonGuest.boot(d.vmSocket('vm0'), { mode: 'stock', numQueues: 5, ramBytes: 64 * MiB });
    await until(() => statusOf(d, 'vm0').connected, 'connected');
    fs.writeFileSync(
      path.join(d.dir, 'config.json'),
      JSON.stringify({
        control: { socket: path.join(d.dir, 'other.sock') },
        metrics: { host: '127.0.0.1', port: 0 },
        log: { format: 'json', level: 'info' },
        state: { file: d.stateFile },
        policy: { tick: '2s', guestFloor: '128M' },
        vms: [VM(d, { messageQueue: false, floor: '8M', socketMode: '0660', target: '4M', statsInterval: '300ms' })],
      }),
    );
    d.signal('SIGHUP');
    const done = await d.waitLog((l) => l.msg === 'configuration reloaded');
    const applied = d.logs.filter((l) => l.msg === 'reload: applied').map((l) => String(l['setting']));
    const refused = d.logs.filter((l) => l.msg === 'reload: refused').map((l) => String(l['setting']));
    expect(applied).to.have.members([
      'log',
      'policy',
      'vms[vm0].floor',
      'vms[vm0].socketOwner/socketGroup/socketMode',
      'vms[vm0].target',
      'vms[vm0].statsInterval',
    ]);
    expect(refused).to.have.members(['control.socket', 'vms[vm0].messageQueue']);
    expect(done).to.include({ applied: 6, refused: 2 });
    const policy = d.logs.find((l) => l.msg === 'reload: applied' && l['setting'] === 'policy')!;
    expect(String(policy['changed']).split(',')).to.have.members(['tickMs', 'guestFloorBytes']);
    expect(fs.statSync(d.vmSocket('vm0')).mode & 0o777).to.equal(0o660);
    const s = statusOf(d, 'vm0');
    expect(s).to.include({ connected: true, floorBytes: 8 * MiB, targetBytes: 4 * MiB });
    // The refused feature change did not drop QEMU; the control socket did not move.
    expect(s.negotiatedQueues).to.deep.equal(['inflate', 'deflate', 'stats', 'reporting']);
    expect(fs.existsSync(path.join(d.dir, 'other.sock'))).to.equal(false);
    // A floor is a floor for the operator too, in human units.
    const low = d.cli(['set-target', 'vm0', '60M']);
    expect(low.code).to.equal(5);
    expect(low.stderr).to.match(/would leave vm0 4 MiB, below its floor of 8 MiB/);
  });

  it('the runtime target and mode survive a restart, until the file changes them', async () => {
    await d.start({ vms: [VM(d)] });
    expect(d.cli(['set-target', 'vm0', '16M']).code).to.equal(0);
    expect(d.cli(['mode', 'vm0', 'auto']).code).to.equal(0);
    await d.restart({ vms: [VM(d)] });
    expect(d.logs.some((l) => l.msg === 'restored the runtime target and mode')).to.equal(true);
    expect(statusOf(d, 'vm0')).to.include({ targetBytes: 16 * MiB, mode: 'auto' });
    // The operator edited the file's target: the file wins over the remembered value.
    await d.restart({ vms: [VM(d, { target: '4M' })] });
    expect(statusOf(d, 'vm0')).to.include({
      targetBytes: 4 * MiB,
      mode: 'manual',
    });
  });

  it('watch --events streams target, target-reached, connect and disconnect as JSON lines', async () => {
    await d.start({ vms: [VM(d)] });
    const watching = d.cliAsync(['watch', 'vm0', '--events', '--count', '4']);
    await d.waitLog((l) => l.msg === 'event subscription started');
    guest = await BalloonGuest.boot(d.vmSocket('vm0'), { mode: 'stock', numQueues: 5, ramBytes: 64 * MiB });
    expect(d.cli(['set-target', 'vm0', '8M']).code).to.equal(0);
    await guest.reach(8 * 256);
    await guest.close();
    guest = undefined;
    const out = await watching;
    expect(out.code, out.stderr).to.equal(0);
    const events = out.stdout
      .trim()
      .split('\n')
      .map((l) => JSON.parse(l) as Record<string, unknown>);
    expect(events.map((e) => e['event'])).to.deep.equal(['connect', 'target', 'target-reached', 'disconnect']);
    expect(events[1]).to.include({ vm: 'vm0', targetBytes: 8 * MiB, previousBytes: 0, reason: 'operator' });
    expect(events[2]).to.include({ vm: 'vm0', actualBytes: 8 * MiB });
    for (const e of events) expect(Object.keys(e).slice(0, 3)).to.deep.equal(['event', 'time', 'vm']);
    const bad = d.cli(['watch', '--events', 'nope']);
    expect(bad.code).to.equal(4);
  });

  it('stats --fresh asks the guest now; stats-interval changes the period at run time', async () => {
    await d.start({ vms: [VM(d, { statsInterval: '1h' }), { name: 'vm1', socket: d.vmSocket('vm1') }] });
    guest = await BalloonGuest.boot(d.vmSocket('vm0'), { mode: 'stock', numQueues: 5, ramBytes: 64 * MiB });
    await until(() => statsOf(d, 'vm0').updatedAt !== null, 'first stats');
    const first = statsOf(d, 'vm0').updatedAt!;
    // With a 1 h period nothing else asks: a newer update is the on-demand one.
    // Asynchronously: the guest model answers from this process's event loop.
    const fresh = await d.cliAsync(['stats', 'vm0', '--fresh', '--json']);
    expect(fresh.code, fresh.stderr).to.equal(0);
    expect(Date.parse((JSON.parse(fresh.stdout) as VmStats).updatedAt!)).to.be.greaterThan(Date.parse(first));
    const none = d.cli(['stats', 'vm1', '--fresh']);
    expect(none.code).to.equal(9);
    expect(none.stderr).to.match(/no running stats queue/);

    const updates = async (): Promise<number> =>
      Number(
        parsePrometheus(await metrics(d.metricsPort))
          .find((f) => f.name === 'vballoon_guest_stats_updates_total')!
          .metrics.find((m) => m.labels?.vm === 'vm0')!.value,
      );
    const before = await updates();
    const set = d.cli(['stats-interval', 'vm0', '200ms']);
    expect(set.code, set.stderr).to.equal(0);
    expect(set.stdout).to.equal('vm0: stats every 200 ms\n');
    // Polled through /metrics until three more updates came (bounded by the test's timeout).
    while ((await updates()) < before + 3) await new Promise((r) => setTimeout(r, 50));
    expect(d.cli(['stats-interval', 'vm0', '10ms']).code).to.equal(2);
  });

  it('SIGTERM during an inflate leaves no fd, mapping or socket file behind, and exits 0', async () => {
    await d.start({ vms: [VM(d)] });
    guest = await BalloonGuest.boot(d.vmSocket('vm0'), { mode: 'stock', numQueues: 5, ramBytes: 64 * MiB });
    d.cli(['set-target', 'vm0', '48M']);
    await until(() => guest!.actualPages > 256, 'inflate under way');
    d.signal('SIGTERM');
    const stopped = await d.waitLog((l) => l.msg === 'vballoon daemon stopped');
    expect(stopped['leakedFds']).to.equal(0);
    expect(stopped['mappings']).to.equal(0);
    const code = await new Promise<number | null>((resolve) => {
      const check = (): void => (d.exitCode !== undefined ? resolve(d.exitCode) : void setTimeout(check, 20));
      check();
    });
    expect(code).to.equal(0);
    expect(fs.existsSync(d.control)).to.equal(false);
    expect(fs.existsSync(d.vmSocket('vm0'))).to.equal(false);
    await until(() => guest!.fe.isClosed, 'guest sees the disconnect');
  });
});
