/**
 * The fd store layer (lib/daemon/fd-store.ts) over real datagram sockets and real memfds: the
 * sending side against the test supervisor (lib/testing/fd-supervisor.ts), which implements the
 * documented protocol; the receiving side (inheritedFds) in this process and in a child started
 * with the store at fd 3..; and the whole round trip against the real systemd 252 running as a
 * user manager in a private mount namespace (lib/testing/systemd-user.ts): a service stores a
 * memfd, is SIGKILLed or restarted, and reads the same content back.
 */
import { expect } from 'chai';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { FdStore, inheritedFds, validateFdName } from '../../lib/daemon/fd-store';
import { SystemdNotifier } from '../../lib/daemon/systemd';
import { MemoryLogger } from '../../lib/log';
import { closeQuietly, isSystemError, native } from '../../lib/native';
import { FdSupervisor } from '../../lib/testing/fd-supervisor';
import { SystemdUser, unavailableReason } from '../../lib/testing/systemd-user';
import { fdCount, tmpDir, until } from '../helpers';
import type { ChildAction, ChildReport } from './fd-store-child';

const CHILD = path.join(__dirname, 'fd-store-child.js');

function memfdWith(content: string): number {
  const fd = native.memfdCreate('fd-store-spec');
  fs.writeSync(fd, content, 0);
  return fd;
}

function contentOf(fd: number): string {
  const buf = Buffer.alloc(256);
  return buf.subarray(0, fs.readSync(fd, buf, 0, buf.length, 0)).toString();
}

/** The JSON report lines fd-store-child.js printed so far, one per start. */
function reports(logFile: string): ChildReport[] {
  if (!fs.existsSync(logFile)) return [];
  return fs
    .readFileSync(logFile, 'utf8')
    .split('\n')
    .filter((l) => l.startsWith('{'))
    .map((l) => JSON.parse(l) as ChildReport);
}

async function nthReport(logFile: string, n: number): Promise<ChildReport> {
  await until(() => reports(logFile).length >= n, `start #${n} of the child (${logFile})`, 20_000);
  return reports(logFile)[n - 1];
}

function inherited(r: ChildReport): string[] {
  return r.inherited.map((f) => `${f.name}=${f.content}`);
}

describe('fd store: FdStore against the test supervisor', () => {
  let dir: string;
  let sup: FdSupervisor | undefined;
  let fdsBefore: number;
  const open: number[] = [];

  beforeEach(() => {
    fdsBefore = fdCount();
    dir = tmpDir();
  });
  afterEach(async () => {
    await sup?.close();
    sup = undefined;
    for (const fd of open.splice(0)) closeQuietly(fd);
    fs.rmSync(dir, { recursive: true, force: true });
    expect(fdCount()).to.equal(fdsBefore, 'descriptors leaked');
  });

  function supervisor(address = path.join(dir, 'notify.sock')): FdSupervisor {
    sup = new FdSupervisor({ address, command: [], notifyAccess: 'all' });
    return sup;
  }
  function memfd(content: string): number {
    const fd = memfdWith(content);
    open.push(fd);
    return fd;
  }

  it('stores descriptors under a name with FDPOLL=0; the manager holds its own copies', () => {
    const s = supervisor();
    const store = new FdStore(new MemoryLogger(), s.address);
    expect(store.enabled).to.equal(true);
    const a = memfd('alpha');
    const b = memfd('beta');
    store.store('vm0.memory', [a, b]);
    // Synchronous: returned means queued, so the supervisor can read it right now.
    s.drain();
    closeQuietly(open.pop()!);
    closeQuietly(open.pop()!);
    expect(s.stored.map((x) => [x.name, contentOf(x.fd), x.poll])).to.have.deep.members([
      ['vm0.memory', 'alpha', false],
      ['vm0.memory', 'beta', false],
    ]);
    expect(s.messages[0].fields).to.deep.equal({ FDSTORE: '1', FDNAME: 'vm0.memory', FDPOLL: '0' });
    expect(s.messages[0].pid).to.equal(process.pid);
  });

  it('sends more than 253 descriptors in batches of 253 under the same name', () => {
    const s = supervisor();
    const store = new FdStore(new MemoryLogger(), s.address);
    const fds = Array.from({ length: 300 }, (_, i) => memfd(`m${i}`));
    store.store('many', fds);
    s.drain();
    expect(s.messages.map((m) => m.fdCount)).to.deep.equal([253, 47]);
    expect(s.messages.every((m) => m.fields['FDNAME'] === 'many' && m.fields['FDSTORE'] === '1')).to.equal(true);
    expect(s.stored.map((x) => contentOf(x.fd))).to.have.members(fds.map((_, i) => `m${i}`));
  });

  it('remove drops every descriptor of that name and only those', () => {
    const s = supervisor();
    const store = new FdStore(new MemoryLogger(), s.address);
    store.store('a', [memfd('a1'), memfd('a2')]);
    store.store('b', [memfd('b1')]);
    store.remove('a');
    s.drain();
    expect(s.messages[2].fields).to.deep.equal({ FDSTOREREMOVE: '1', FDNAME: 'a' });
    expect(s.stored.map((x) => `${x.name}=${contentOf(x.fd)}`)).to.deep.equal(['b=b1']);
  });

  it('works on an abstract address ("@name")', () => {
    const s = supervisor(`@vballoon-fd-store-${process.pid}-${Date.now()}`);
    const store = new FdStore(new MemoryLogger(), s.address);
    store.store('state', [memfd('abstract')]);
    s.drain();
    expect(s.stored.map((x) => contentOf(x.fd))).to.deep.equal(['abstract']);
  });

  const badNames: [string, string][] = [
    ['empty', ''],
    ['colon (LISTEN_FDNAMES separator)', 'vm:0'],
    ['256 characters', 'x'.repeat(256)],
    ['newline (would add a KEY=VALUE line)', 'a\nFDSTOREREMOVE=1'],
    ['tab', 'a\tb'],
    ['non-ASCII', 'vm\u00e9'],
    ['DEL', 'a\x7f'],
  ];
  for (const [what, name] of badNames) {
    it(`refuses the name: ${what}`, () => {
      const s = supervisor();
      const store = new FdStore(new MemoryLogger(), s.address);
      expect(() => store.store(name, [memfd('x')])).to.throw(RangeError);
      s.drain();
      expect(s.messages).to.deep.equal([]);
    });
  }

  it('accepts 255 printable characters, spaces and "=" included', () => {
    for (const name of ['x'.repeat(255), 'vm 0=mem', '~!@#$%^&*()']) expect(() => validateFdName(name)).to.not.throw();
  });

  it('store throws a SystemError when no manager listens; remove logs, rate-limited, and never throws', () => {
    const log = new MemoryLogger();
    let nowMs = 0;
    const store = new FdStore(log, path.join(dir, 'nobody.sock'), () => nowMs);
    let caught: unknown;
    try {
      store.store('state', [memfd('x')]);
    } catch (err) {
      caught = err;
    }
    expect(isSystemError(caught, 'ENOENT'), String(caught)).to.equal(true);
    for (let i = 0; i < 20; i++) store.remove('state');
    expect(log.find('cannot remove descriptors from the fd store', 'warn')).to.have.length(5);
    nowMs = 61_000;
    store.remove('state');
    const last = log.find('cannot remove descriptors from the fd store', 'warn').at(-1)!;
    expect(last.fields).to.include({ name: 'state', suppressed: 15 });
  });

  it('disabled without an address: store validates and does nothing, remove does nothing', () => {
    for (const store of [new FdStore(new MemoryLogger(), undefined), FdStore.fromEnv(new MemoryLogger(), {})]) {
      expect(store.enabled).to.equal(false);
      store.store('state', [memfd('x')]);
      store.remove('state');
      expect(() => store.store('a:b', [])).to.throw(RangeError);
    }
  });

  it('fromEnv reads NOTIFY_SOCKET and leaves it; SystemdNotifier.address gives it back after deleting it', () => {
    const env: NodeJS.ProcessEnv = { NOTIFY_SOCKET: '@abstract-notify' };
    expect(FdStore.fromEnv(new MemoryLogger(), env).address).to.equal('@abstract-notify');
    expect(env['NOTIFY_SOCKET']).to.equal('@abstract-notify');
    const notifier = new SystemdNotifier(new MemoryLogger(), env);
    expect(env['NOTIFY_SOCKET']).to.equal(undefined);
    expect(notifier.address).to.equal('@abstract-notify');
    expect(new FdStore(new MemoryLogger(), notifier.address).enabled).to.equal(true);
    expect(new SystemdNotifier(new MemoryLogger(), {}).address).to.equal(undefined);
  });

  it('the addon refuses more than 253 descriptors in one datagram', () => {
    const s = supervisor();
    const fd = memfd('x');
    expect(() => native.notifySend(s.address, 'FDSTORE=1\n', new Array<number>(254).fill(fd))).to.throw(/EINVAL/);
    native.notifySend(s.address, 'FDSTORE=1\nFDNAME=max\n', new Array<number>(253).fill(fd));
    s.drain();
    // 253 copies of one open file: the manager keeps it once.
    expect(s.messages[0].fdCount).to.equal(253);
    expect(s.stored).to.have.length(1);
  });
});

describe('fd store: inheritedFds', () => {
  // fds 3 and 4 are open in any Node process (libuv's own); FD_CLOEXEC on them changes nothing.
  const pid = String(process.pid);

  it('returns fds 3.. with their names and clears the variables', () => {
    const env: NodeJS.ProcessEnv = { LISTEN_PID: pid, LISTEN_FDS: '2', LISTEN_FDNAMES: 'state:vm0.sock', KEEP: '1' };
    expect(inheritedFds(env)).to.deep.equal([
      { name: 'state', fd: 3 },
      { name: 'vm0.sock', fd: 4 },
    ]);
    expect(env).to.deep.equal({ KEEP: '1' });
  });

  it('names missing or empty are "unknown"', () => {
    expect(inheritedFds({ LISTEN_PID: pid, LISTEN_FDS: '2' })).to.deep.equal([
      { name: 'unknown', fd: 3 },
      { name: 'unknown', fd: 4 },
    ]);
    expect(inheritedFds({ LISTEN_PID: pid, LISTEN_FDS: '2', LISTEN_FDNAMES: ':b' })).to.deep.equal([
      { name: 'unknown', fd: 3 },
      { name: 'b', fd: 4 },
    ]);
    expect(inheritedFds({ LISTEN_PID: pid, LISTEN_FDS: '1', LISTEN_FDNAMES: 'a:b:c' })).to.deep.equal([
      { name: 'a', fd: 3 },
    ]);
  });

  const notForUs: [string, NodeJS.ProcessEnv][] = [
    ['another pid (inherited from a parent)', { LISTEN_PID: '1', LISTEN_FDS: '1', LISTEN_FDNAMES: 'a' }],
    ['no LISTEN_PID', { LISTEN_FDS: '1' }],
    ['no LISTEN_FDS', { LISTEN_PID: pid }],
    ['LISTEN_FDS not a number', { LISTEN_PID: pid, LISTEN_FDS: 'x' }],
    ['LISTEN_FDS negative', { LISTEN_PID: pid, LISTEN_FDS: '-1' }],
    ['LISTEN_PID not a number', { LISTEN_PID: `${pid}x`, LISTEN_FDS: '1' }],
    ['LISTEN_FDS=0', { LISTEN_PID: pid, LISTEN_FDS: '0', LISTEN_FDNAMES: '' }],
  ];
  for (const [what, env] of notForUs) {
    it(`empty, variables cleared: ${what}`, () => {
      const copy = { ...env };
      expect(inheritedFds(copy)).to.deep.equal([]);
      expect(copy).to.deep.equal({});
    });
  }
});

describe('fd store: a service restarted by the test supervisor', function () {
  this.timeout(30_000);
  let dir: string;
  let sup: FdSupervisor | undefined;
  let fdsBefore: number;
  beforeEach(() => {
    fdsBefore = fdCount();
  });
  afterEach(async () => {
    await sup?.close();
    sup = undefined;
    fs.rmSync(dir, { recursive: true, force: true });
    expect(fdCount()).to.equal(fdsBefore, 'descriptors leaked');
  });

  function setup(
    restart: 'no' | 'on-failure' = 'no',
    preserve = false,
  ): { actions: (a: ChildAction[]) => void; logFile: string } {
    dir = tmpDir();
    const actionsFile = path.join(dir, 'actions.json');
    const logFile = path.join(dir, 'service.log');
    sup = new FdSupervisor({
      address: path.join(dir, 'notify.sock'),
      command: [process.execPath, CHILD],
      env: { ...process.env, FD_CHILD_ACTIONS: actionsFile },
      outputFile: logFile,
      restart,
      preserve,
    });
    return { actions: (a) => fs.writeFileSync(actionsFile, JSON.stringify(a)), logFile };
  }

  it('a SIGKILLed service gets its memfd back at fd 3, close-on-exec, LISTEN_* cleared; removal sticks', async () => {
    const { actions, logFile } = setup('on-failure');
    actions([{ store: 'state', contents: ['state v1'] }]);
    await sup!.start();
    await sup!.waitReady();
    expect((await nthReport(logFile, 1)).inherited).to.deep.equal([]);
    expect(sup!.stored.map((s) => s.name)).to.deep.equal(['state']);

    actions([{ remove: 'state' }]);
    sup!.kill('SIGKILL');
    await sup!.waitStarts(2);
    await sup!.waitReady();
    const second = await nthReport(logFile, 2);
    expect(second.inherited).to.deep.equal([{ name: 'state', fd: 3, content: 'state v1', cloexec: true }]);
    expect(second.listenEnvLeft).to.deep.equal([]);
    expect(sup!.stored).to.deep.equal([]);

    actions([]);
    await sup!.restart();
    await sup!.waitReady();
    expect((await nthReport(logFile, 3)).inherited).to.deep.equal([]);
  });

  it('stop releases the store, as systemd 252 does; preserve keeps it', async () => {
    for (const preserve of [false, true]) {
      const { actions, logFile } = setup('no', preserve);
      actions([{ store: 'state', contents: ['v'] }]);
      await sup!.start();
      await sup!.waitReady();
      actions([]);
      await sup!.stop();
      expect(sup!.stored).to.have.length(preserve ? 1 : 0);
      await sup!.start();
      await sup!.waitReady();
      expect(inherited(await nthReport(logFile, 2))).to.deep.equal(preserve ? ['state=v'] : []);
      await sup!.close();
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });

  it('passes 300 descriptors stored in two batches, with their names', async () => {
    const { actions, logFile } = setup();
    const contents = Array.from({ length: 300 }, (_, i) => `m${i}`);
    actions([
      { store: 'many', contents },
      { store: 'one', contents: ['single'] },
    ]);
    await sup!.start();
    await sup!.waitReady();
    actions([]);
    await sup!.restart();
    await sup!.waitReady();
    const r = await nthReport(logFile, 2);
    expect(r.inherited).to.have.length(301);
    expect(r.inherited.map((f) => f.fd)).to.deep.equal(Array.from({ length: 301 }, (_, i) => 3 + i));
    expect(inherited(r).sort()).to.deep.equal([...contents.map((c) => `many=${c}`), 'one=single'].sort());
  });
});

const noSystemd = unavailableReason();
(noSystemd === undefined ? describe : describe.skip)(
  `fd store: real systemd user manager${noSystemd === undefined ? '' : ` (skipped: ${noSystemd})`}`,
  function () {
    this.timeout(60_000);
    let manager: SystemdUser | undefined;
    let dir: string;
    const actionsFile = (): string => path.join(dir, 'actions.json');
    const actions = (a: ChildAction[]): void => fs.writeFileSync(actionsFile(), JSON.stringify(a));

    before(async function () {
      try {
        manager = await SystemdUser.launch();
      } catch (err) {
        // The binary is there but the manager would not come up (cgroups, namespaces): the
        // supervisor tests above cover the protocol; say why these did not run.
        console.log(`      real systemd could not start here: ${(err as Error).message}`);
        this.skip();
      }
      dir = manager.dir;
    });
    after(async () => {
      await manager?.close();
    });

    async function service(name: string): Promise<{ unit: string; logFile: string }> {
      return manager!.writeService(name, {
        command: [process.execPath, CHILD],
        env: { FD_CHILD_ACTIONS: actionsFile() },
        restart: 'on-failure',
      });
    }

    /** The service came back after a crash: active with a main pid other than `old`. */
    async function restartedFrom(unit: string, old: number): Promise<number> {
      const s = await manager!.waitFor(
        unit,
        (st) => st.activeState === 'active' && st.subState === 'running' && st.mainPid !== 0 && st.mainPid !== old,
        'running again with a new main pid',
      );
      return s.mainPid;
    }

    it('a memfd stored with FDSTORE=1 survives SIGKILL and systemctl restart', async () => {
      const { unit, logFile } = await service('crash');
      actions([{ store: 'state', contents: ['state before the crash'] }]);
      await manager!.start(unit);
      const first = await nthReport(logFile, 1);
      expect(first.inherited).to.deep.equal([]);
      expect(await manager!.mainPid(unit)).to.equal(first.pid);

      actions([]);
      await manager!.kill(unit, 'SIGKILL');
      const pid2 = await restartedFrom(unit, first.pid);
      const second = await nthReport(logFile, 2);
      expect(second.pid).to.equal(pid2);
      expect(second.inherited).to.deep.equal([
        { name: 'state', fd: 3, content: 'state before the crash', cloexec: true },
      ]);
      expect(second.listenEnvLeft).to.deep.equal([]);
      expect((await manager!.status(unit)).nRestarts).to.equal(1);

      await manager!.restart(unit);
      const third = await nthReport(logFile, 3);
      expect(inherited(third)).to.deep.equal(['state=state before the crash']);
      await manager!.stop(unit);
    });

    it('ten quick SIGKILLs in a row: restarted each time (no start limit), the store intact', async () => {
      const { unit, logFile } = await service('loop');
      actions([{ store: 'state', contents: ['kept through the loop'] }]);
      await manager!.start(unit);
      let pid = (await nthReport(logFile, 1)).pid;
      actions([]);
      for (let i = 2; i <= 11; i++) {
        await manager!.kill(unit, 'SIGKILL');
        pid = await restartedFrom(unit, pid);
        const r = await nthReport(logFile, i);
        expect(r.pid).to.equal(pid);
        expect(inherited(r)).to.deep.equal(['state=kept through the loop']);
      }
      expect((await manager!.status(unit)).nRestarts).to.equal(10);
      await manager!.stop(unit);
    });

    it('FDSTOREREMOVE=1 really removes: the next start has no such fd', async () => {
      const { unit, logFile } = await service('remove');
      actions([
        { store: 'keep', contents: ['kept'] },
        { store: 'drop', contents: ['dropped 1', 'dropped 2'] },
      ]);
      await manager!.start(unit);
      await nthReport(logFile, 1);
      actions([{ remove: 'drop' }]);
      await manager!.restart(unit);
      expect(inherited(await nthReport(logFile, 2)).sort()).to.deep.equal(
        ['drop=dropped 1', 'drop=dropped 2', 'keep=kept'].sort(),
      );
      actions([]);
      const pid = await manager!.mainPid(unit);
      await manager!.kill(unit, 'SIGKILL');
      await restartedFrom(unit, pid);
      expect(inherited(await nthReport(logFile, 3))).to.deep.equal(['keep=kept']);
      await manager!.stop(unit);
    });

    it('more than 253 descriptors (batched) come back, each with its name', async () => {
      const { unit, logFile } = await service('batch');
      const contents = Array.from({ length: 300 }, (_, i) => `m${i}`);
      actions([{ store: 'many', contents }]);
      await manager!.start(unit);
      await nthReport(logFile, 1);
      actions([]);
      await manager!.restart(unit);
      const r = await nthReport(logFile, 2);
      expect(r.inherited.map((f) => f.fd)).to.deep.equal(Array.from({ length: 300 }, (_, i) => 3 + i));
      expect(inherited(r).sort()).to.deep.equal(contents.map((c) => `many=${c}`).sort());
      await manager!.stop(unit);
    });

    it('FDPOLL=0 keeps a socket whose peer hung up; without it the manager drops it', async () => {
      const { unit, logFile } = await service('poll');
      actions([
        { storeHungUp: 'kept', poll: false },
        { storeHungUp: 'watched', poll: true },
      ]);
      await manager!.start(unit);
      await nthReport(logFile, 1);
      actions([]);
      await manager!.restart(unit);
      expect(inherited(await nthReport(logFile, 2))).to.deep.equal(['kept=socket']);
      await manager!.stop(unit);
    });

    it('systemctl stop releases the store (systemd 252 has no FileDescriptorStorePreserve=)', async () => {
      const { unit, logFile } = await service('stop');
      actions([{ store: 'state', contents: ['lost on stop'] }]);
      await manager!.start(unit);
      await nthReport(logFile, 1);
      actions([]);
      await manager!.stop(unit);
      await manager!.start(unit);
      expect(inherited(await nthReport(logFile, 2))).to.deep.equal([]);
      await manager!.stop(unit);
    });

    it('an open file stored under two names is kept once, under the first', async () => {
      const { unit, logFile } = await service('twice');
      actions([{ storeTwice: ['first', 'second'], content: 'shared' }]);
      await manager!.start(unit);
      await nthReport(logFile, 1);
      actions([]);
      await manager!.restart(unit);
      expect(inherited(await nthReport(logFile, 2))).to.deep.equal(['first=shared']);
      await manager!.stop(unit);
    });
  },
);
