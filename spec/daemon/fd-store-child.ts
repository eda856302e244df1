/**
 * A tiny service for spec/daemon/fd-store.spec.ts, run under real systemd or the test
 * supervisor. At each start it collects what its manager passed (inheritedFds), reads each
 * memfd's content, prints one JSON report line to stdout, performs the actions in the JSON file
 * named by $FD_CHILD_ACTIONS (store a memfd with some content under a name, remove a name),
 * sends READY=1 and waits to be killed.
 */
import * as fs from 'node:fs';
import { FdStore, inheritedFds } from '../../lib/daemon/fd-store';
import { NullLogger } from '../../lib/log';
import { closeQuietly, native } from '../../lib/native';

export type ChildAction =
  | { store: string; contents: string[] }
  | { remove: string }
  /** Stores one memfd under two names (the manager keeps an open file once). */
  | { storeTwice: [string, string]; content: string }
  /** Stores one end of a socketpair whose other end is then closed (it reports POLLHUP), with
   * FdStore (FDPOLL=0) or, poll: true, with a bare FDSTORE=1 that lets the manager watch it. */
  | { storeHungUp: string; poll: boolean };

export interface ChildReport {
  pid: number;
  /** content: the memfd's first bytes, or "socket" for a socket. */
  inherited: { name: string; fd: number; content: string; cloexec: boolean }[];
  /** LISTEN_* variables still in the environment after inheritedFds() (must be none). */
  listenEnvLeft: string[];
  notifySocket: boolean;
}

function memfdWith(content: string): number {
  const fd = native.memfdCreate('fd-store-child');
  fs.writeSync(fd, content, 0);
  return fd;
}

function readContent(fd: number): string {
  const buf = Buffer.alloc(256);
  const n = fs.readSync(fd, buf, 0, buf.length, 0);
  return buf.subarray(0, n).toString();
}

function cloexec(fd: number): boolean {
  // /proc/self/fdinfo/<fd> "flags:" is octal; O_CLOEXEC is 02000000.
  const m = /flags:\s*([0-7]+)/.exec(fs.readFileSync(`/proc/self/fdinfo/${fd}`, 'utf8'));
  return m !== null && (parseInt(m[1], 8) & 0o2000000) !== 0;
}

function main(): void {
  const inherited = inheritedFds();
  const report: ChildReport = {
    pid: process.pid,
    inherited: inherited.map((f) => {
      let content: string;
      try {
        content = native.fdKind(f.fd) === 'socket' ? 'socket' : readContent(f.fd);
      } catch (err) {
        content = `unreadable: ${(err as Error).message}`;
      }
      return { ...f, content, cloexec: cloexec(f.fd) };
    }),
    listenEnvLeft: Object.keys(process.env).filter((k) => k.startsWith('LISTEN_')),
    notifySocket: process.env['NOTIFY_SOCKET'] !== undefined,
  };
  process.stdout.write(`${JSON.stringify(report)}\n`);
  const store = FdStore.fromEnv(new NullLogger());
  const file = process.env['FD_CHILD_ACTIONS'];
  const actions =
    file !== undefined && fs.existsSync(file) ? (JSON.parse(fs.readFileSync(file, 'utf8')) as ChildAction[]) : [];
  for (const a of actions) {
    if ('store' in a) {
      const fds = a.contents.map(memfdWith);
      store.store(a.store, fds);
      for (const fd of fds) closeQuietly(fd);
    } else if ('remove' in a) {
      store.remove(a.remove);
    } else if ('storeHungUp' in a) {
      const [mine, peer] = native.socketpair();
      if (a.poll) native.notifySend(store.address!, `FDSTORE=1\nFDNAME=${a.storeHungUp}\n`, [mine]);
      else store.store(a.storeHungUp, [mine]);
      closeQuietly(mine);
      closeQuietly(peer);
    } else {
      const fd = memfdWith(a.content);
      store.store(a.storeTwice[0], [fd]);
      store.store(a.storeTwice[1], [fd]);
      closeQuietly(fd);
    }
  }
  if (store.address !== undefined) native.notifySend(store.address, 'READY=1\nSTATUS=fd-store child ready\n');
  setInterval(() => undefined, 1 << 30);
}

main();
