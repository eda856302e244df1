/**
 * End to end through libvirt: the real libvirt daemon (libvirtd 11.3 from Debian trixie, in the
 * end-to-end root, scripts/libvirt-sandbox.sh) starts the real Linux guest with QEMU running as
 * `libvirt-qemu`, from a domain whose vballoon pieces are what `vballoon qemu-args --libvirt`
 * prints; vballoon serves the balloon and inflates it.
 * Needs scripts/e2e-env.sh and scripts/libvirt-env.sh (both run by .ci/run); skipped without them.
 */
import { expect } from 'chai';
import { ChildProcess, spawn, spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as path from 'node:path';
import { loadE2eEnv } from '../../lib/testing/qemu';
import { until } from '../helpers';
import { DaemonProcess } from '../daemon/harness';

const CACHE = process.env['VBALLOON_E2E_CACHE'] ?? path.resolve(__dirname, '..', '..', '..', '.cache', 'e2e');
const env = loadE2eEnv(CACHE);
const ROOT = env?.root ?? '';
const haveLibvirt = env !== undefined && ROOT !== '' && fs.existsSync(path.join(ROOT, 'usr', 'sbin', 'libvirtd'));
const SANDBOX = path.resolve(__dirname, '..', '..', '..', 'scripts', 'libvirt-sandbox.sh');
const MiB = 2 ** 20;

/** Numeric id of `name` in the root's passwd or group file (the user exists there, not on the host). */
function idIn(file: 'passwd' | 'group', name: string): number {
  const line = fs
    .readFileSync(path.join(ROOT, 'etc', file), 'utf8')
    .split('\n')
    .find((l) => l.startsWith(`${name}:`));
  if (line === undefined) throw new Error(`no ${name} in ${ROOT}/etc/${file} (run scripts/libvirt-env.sh)`);
  return Number(line.split(':')[2]);
}

/** The libvirt daemon in its sandbox, and virsh run inside its mount namespace. */
class Libvirtd {
  readonly log: string[] = [];
  private proc: ChildProcess | undefined;
  private exited: Promise<void> = Promise.resolve();

  constructor(private readonly dir: string) {}

  async start(): Promise<void> {
    const cache = path.join(CACHE, 'libvirt-cache');
    const proc = spawn('unshare', ['-m', '--propagation', 'private', 'bash', SANDBOX, ROOT, this.dir, cache], {
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    this.proc = proc;
    this.exited = new Promise((resolve) => proc.on('exit', () => resolve()));
    proc.stdout.on('data', (d: Buffer) => this.log.push(d.toString()));
    proc.stderr.on('data', (d: Buffer) => this.log.push(d.toString()));
    await until(() => this.virsh(['version']).code === 0, 'libvirtd answers', 60_000);
  }

  /** Runs a program of the root inside the daemon's mount namespace. */
  exec(args: string[]): { code: number | null; out: string } {
    if (this.proc?.pid === undefined) throw new Error('libvirtd is not running');
    const r = spawnSync('nsenter', ['-t', String(this.proc.pid), '-m', '--', 'chroot', ROOT, ...args], {
      encoding: 'utf8',
      timeout: 120_000,
    });
    return { code: r.status, out: `${r.stdout}${r.stderr}` };
  }

  virsh(args: string[]): { code: number | null; out: string } {
    return this.exec(['virsh', '-c', 'qemu:///system', ...args]);
  }

  async stop(): Promise<void> {
    this.proc?.kill('SIGTERM');
    await this.exited;
  }
}

/** The guest's serial console (a unix socket QEMU serves): commands framed by markers. */
class Console {
  private buffered = '';
  private seq = 0;
  private constructor(private readonly socket: net.Socket) {
    socket.setEncoding('utf8');
    socket.on('data', (d: string) => (this.buffered += d));
  }

  static async open(file: string): Promise<Console> {
    const socket = net.createConnection(file);
    await new Promise<void>((resolve, reject) => {
      socket.once('connect', resolve);
      socket.once('error', reject);
    });
    return new Console(socket);
  }

  async run(command: string, timeoutMs = 60_000): Promise<string> {
    const n = ++this.seq;
    const end = new RegExp(`\\n__E${n}__ (\\d+)`);
    this.socket.write(`echo __B${n}__; ${command}; echo __E${n}__ $?\n`);
    await until(() => end.test(this.buffered.replace(/\r/g, '')), `guest command: ${command}`, timeoutMs);
    const text = this.buffered.replace(/\r/g, '');
    const body = text.slice(text.lastIndexOf(`\n__B${n}__`) + `__B${n}__`.length + 2, text.search(end));
    this.buffered = '';
    return body;
  }

  close(): void {
    this.socket.destroy();
  }
}

function domainXml(dir: string, fragment: string, kernel: string, initrd: string): string {
  // The fragment's <devices> content goes into the domain's <devices>; the rest sits at the top.
  const devices = /<devices>([\s\S]*?)<\/devices>/.exec(fragment)?.[1] ?? '';
  const rest = fragment.replace(/<devices>[\s\S]*?<\/devices>/, '');
  return `<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>vballoon-e2e</name>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <kernel>${kernel}</kernel>
    <initrd>${initrd}</initrd>
    <cmdline>console=ttyS0 quiet panic=-1</cmdline>
  </os>
  <cpu mode='maximum'/>
  <on_reboot>destroy</on_reboot>
  ${rest}
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <serial type='unix'>
      <source mode='bind' path='${dir}/console.sock'/>
    </serial>
    ${devices}
  </devices>
</domain>
`;
}

(haveLibvirt ? describe : describe.skip)('end to end: libvirt starts the guest, vballoon inflates it', function () {
  this.timeout(600_000);
  let d: DaemonProcess;
  let libvirt: Libvirtd | undefined;
  let console: Console | undefined;

  before(async () => {
    d = new DaemonProcess();
    // QEMU runs as libvirt-qemu: it must be able to reach the folder of the sockets.
    fs.chmodSync(d.dir, 0o755);
    for (const f of [env!.kernel, env!.initrd]) {
      fs.copyFileSync(f, path.join(d.dir, path.basename(f)));
      fs.chmodSync(path.join(d.dir, path.basename(f)), 0o644);
    }
    const daemon = new Libvirtd(d.dir);
    libvirt = daemon;
    await daemon.start();
  });

  after(async () => {
    console?.close();
    if (libvirt !== undefined) {
      libvirt.virsh(['destroy', 'vballoon-e2e']);
      libvirt.virsh(['undefine', 'vballoon-e2e']);
      await libvirt.stop();
    }
    if (d.exitCode === undefined) await d.stop();
  });

  const vm = (extra: Record<string, unknown> = {}) => ({
    name: 'lv0',
    socket: d.vmSocket('lv0'),
    memory: '256M',
    deflateOnOom: false, // without it the guest takes ballooned pages off MemTotal: visible below
    ...extra,
  });

  it('a socket left root-only is refused to libvirt-qemu (EACCES); socketGroup/socketMode fix it', async () => {
    await d.start({ vms: [vm()] });
    const fragment = d.cli(['qemu-args', 'lv0', '--libvirt']);
    expect(fragment.code, fragment.stderr).to.equal(0);
    expect(fragment.stdout.endsWith('\n')).to.equal(true);
    const xml = domainXml(
      d.dir,
      fragment.stdout,
      path.join(d.dir, path.basename(env!.kernel)),
      path.join(d.dir, path.basename(env!.initrd)),
    );
    const file = path.join(d.dir, 'domain.xml');
    fs.writeFileSync(file, xml);
    const valid = libvirt!.exec(['virt-xml-validate', file, 'domain']);
    expect(valid.code, valid.out).to.equal(0);
    const define = libvirt!.virsh(['define', file]);
    expect(define.code, define.out).to.equal(0);
    // What libvirt will run: shared memfd RAM, no balloon of its own, our chardev and device.
    const argv = libvirt!.virsh(['domxml-to-native', 'qemu-argv', file]).out;
    expect(argv).to.match(/"qom-type":"memory-backend-memfd","id":"pc\.ram","share":true/);
    expect(argv).to.contain(`socket,id=vb-lv0,path=${d.vmSocket('lv0')}`);
    expect(argv).to.contain('vhost-user-test-device-pci,chardev=vb-lv0,virtio-id=5');
    expect(argv).to.not.contain('virtio-balloon');

    expect(fs.statSync(d.vmSocket('lv0')).mode & 0o777).to.equal(0o600);
    const refused = libvirt!.virsh(['start', 'vballoon-e2e']);
    expect(refused.code).to.not.equal(0);
    expect(refused.out).to.match(/Permission denied/);

    // The fix, applied by a reload while the daemon runs: the socket's group and mode.
    const uid = idIn('passwd', 'libvirt-qemu');
    const gid = idIn('group', 'libvirt-qemu');
    expect(uid).to.be.greaterThan(0);
    const config = JSON.parse(fs.readFileSync(path.join(d.dir, 'config.json'), 'utf8')) as Record<string, unknown>;
    fs.writeFileSync(
      path.join(d.dir, 'config.json'),
      JSON.stringify({ ...config, vms: [vm({ socketGroup: gid, socketMode: '0660' })] }),
    );
    d.signal('SIGHUP');
    await d.waitLog((l) => l.msg === 'configuration reloaded');
    const st = fs.statSync(d.vmSocket('lv0'));
    expect({ gid: st.gid, mode: st.mode & 0o777 }).to.deep.equal({ gid, mode: 0o660 });
  });

  it('libvirt starts the guest as libvirt-qemu; vballoon inflates it by 64 MiB', async () => {
    const started = libvirt!.virsh(['start', 'vballoon-e2e']);
    expect(started.code, `${started.out}\n${libvirt!.log.join('')}`).to.equal(0);
    await until(
      () => (JSON.parse(d.cli(['status', 'lv0', '--json']).stdout) as { connected: boolean }).connected,
      'QEMU (run by libvirt) connects',
      60_000,
    );
    // The QEMU process is libvirt's, running as libvirt-qemu.
    const qemu = fs.readdirSync('/proc').filter((p) => {
      try {
        return /^\d+$/.test(p) && fs.readFileSync(`/proc/${p}/cmdline`, 'utf8').includes('guest=vballoon-e2e');
      } catch {
        return false; // exited while listing
      }
    });
    expect(qemu).to.have.length(1);
    expect(fs.statSync(`/proc/${qemu[0]}`).uid).to.equal(idIn('passwd', 'libvirt-qemu'));
    console = await Console.open(path.join(d.dir, 'console.sock'));
    await console.run('true', 120_000); // the guest's /init is up
    const memTotalKiB = async (): Promise<number> =>
      Number(/MemTotal:\s+(\d+) kB/.exec(await console!.run('grep MemTotal /proc/meminfo'))![1]);
    const before = await memTotalKiB();
    const set = await d.cliAsync(['set-target', 'lv0', '64M', '--wait', '--timeout', '300s']);
    expect(set.code, set.stderr).to.equal(0);
    expect(set.stdout).to.contain('balloon target 64 MiB (actual 64 MiB)');
    expect(before - (await memTotalKiB())).to.equal((64 * MiB) / 1024);
    const status = JSON.parse(d.cli(['status', 'lv0', '--json']).stdout) as Record<string, unknown>;
    expect(status).to.include({ connected: true, actualBytes: 64 * MiB, guestRamBytes: 256 * MiB });

    const destroyed = libvirt!.virsh(['destroy', 'vballoon-e2e']);
    expect(destroyed.code, destroyed.out).to.equal(0);
    await until(
      () => !(JSON.parse(d.cli(['status', 'lv0', '--json']).stdout) as { connected: boolean }).connected,
      'vballoon sees QEMU go',
      60_000,
    );
  });
});
