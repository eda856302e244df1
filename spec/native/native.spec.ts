import { expect } from 'chai';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { isSystemError, native, POLL_EVENTFD, POLL_READABLE, POLL_STATUS_HANGUP, SystemError } from '../../lib/native';
import { fdCount, tmpDir } from '../helpers';

function expectSystemError(fn: () => unknown, code: string, syscall: string): void {
  let caught: unknown;
  try {
    fn();
  } catch (err) {
    caught = err;
  }
  expect(isSystemError(caught), String(caught)).to.equal(true);
  const err = caught as SystemError;
  expect(err.code).to.equal(code);
  expect(err.syscall).to.equal(syscall);
  expect(err.errno).to.be.lessThan(0);
  expect(err.message).to.contain(code);
}

describe('native addon', () => {
  let fdsBefore: number;
  beforeEach(() => {
    fdsBefore = fdCount();
  });
  afterEach(() => {
    expect(fdCount(), 'descriptors leaked').to.equal(fdsBefore);
  });

  it('passes descriptors over a unix socket with SCM_RIGHTS, 8 and more per message', () => {
    const [a, b] = native.socketpair();
    const efds = Array.from({ length: 12 }, () => native.eventfd(0, true));
    try {
      expect(native.sendmsg(a, new Uint8Array([1, 2, 3]), efds)).to.equal(3);
      const got = native.recvmsg(b, 4096)!;
      expect([...got.data]).to.deep.equal([1, 2, 3]);
      expect(got.fds).to.have.length(12);
      expect(got.truncated).to.equal(false);
      // The received descriptor is the same eventfd.
      native.eventfdWrite(efds[0], 5);
      expect(native.eventfdRead(got.fds[0])).to.equal(5);
      for (const fd of got.fds) native.close(fd);
      expect(native.recvmsg(b, 4096)).to.equal(null);
    } finally {
      for (const fd of [a, b, ...efds]) native.close(fd);
    }
  });

  it('reports end of stream as an empty read, and errors with code/errno/syscall', () => {
    const [a, b] = native.socketpair();
    native.close(a);
    expect(native.recvmsg(b, 16)!.data.length).to.equal(0);
    expectSystemError(() => native.sendmsg(b, new Uint8Array(1)), 'EPIPE', 'sendmsg');
    native.close(b);
    expectSystemError(() => native.close(b), 'EBADF', 'close');
    expectSystemError(() => native.connect('/nonexistent/vballoon.sock'), 'ENOENT', 'connect');
    expectSystemError(() => native.mmap(-1, 4096, 0), 'EBADF', 'mmap');
    expectSystemError(() => native.punchHole(-1, 0, 4096), 'EBADF', 'fallocate');
  });

  it('listens, accepts and connects on a socket path', () => {
    const dir = tmpDir();
    const sock = path.join(dir, 's');
    const l = native.listen(sock, 4);
    try {
      expect(native.accept(l)).to.equal(-1);
      const c = native.connect(sock);
      const s = native.accept(l);
      expect(s).to.be.greaterThan(0);
      native.sendmsg(c, new Uint8Array([9]));
      expect([...native.recvmsg(s, 16)!.data]).to.deep.equal([9]);
      native.close(c);
      native.close(s);
      expectSystemError(() => native.listen(sock, 4), 'EADDRINUSE', 'bind');
    } finally {
      native.close(l);
      fs.rmSync(dir, { recursive: true });
    }
  });

  it('watches an eventfd from the event loop without busy polling', async () => {
    const efd = native.eventfd(0, true);
    let calls = 0;
    const seen = new Promise<number | null>((resolve) => {
      const h = native.pollStart(efd, POLL_READABLE, (status, events) => {
        calls++;
        expect(status).to.equal(0);
        expect(events & POLL_READABLE).to.equal(POLL_READABLE);
        const v = native.eventfdRead(efd);
        native.pollStop(h);
        native.pollStop(h); // idempotent
        resolve(v);
      });
    });
    // A barrier instead of a sleep: once a second watch, armed later, has fired, the loop has
    // polled the first one too; it must not have fired without a write.
    const other = native.eventfd(0, true);
    await new Promise<void>((resolve) => {
      const h2 = native.pollStart(other, POLL_READABLE, () => {
        native.pollStop(h2);
        resolve();
      });
      native.eventfdWrite(other, 1);
    });
    native.close(other);
    expect(calls).to.equal(0);
    native.eventfdWrite(efd, 3);
    expect(await seen).to.equal(3);
    expect(native.eventfdRead(efd)).to.equal(null);
    native.close(efd);
  });

  it('never blocks reading a blocking-mode eventfd whose counter is zero', () => {
    const efd = native.eventfd(0, false);
    expect(native.fstat(efd).nonBlocking).to.equal(false);
    expect(native.eventfdRead(efd)).to.equal(null);
    native.close(efd);
    // A descriptor known to be non-blocking is read without the poll() first.
    const nb = native.eventfd(0, true);
    expect(native.fstat(nb).nonBlocking).to.equal(true);
    expect(native.eventfdRead(nb, false)).to.equal(null);
    native.eventfdWrite(nb, 2);
    expect(native.eventfdRead(nb, false)).to.equal(2);
    native.close(nb);
  });

  it('maps a memfd; munmap detaches the buffer so stale views cannot touch unmapped memory', () => {
    const fd = native.memfdCreate('t');
    native.ftruncate(fd, 1 << 20);
    const ab = native.mmap(fd, 1 << 20, 0);
    const view = new Uint8Array(ab);
    const dv = new DataView(ab);
    view[100] = 42;
    // A second mapping of the same file sees the write (MAP_SHARED).
    const ab2 = native.mmap(fd, 4096, 0);
    expect(new Uint8Array(ab2)[100]).to.equal(42);
    expect(native.mappingCount()).to.be.at.least(2);
    native.munmap(ab);
    native.munmap(ab2);
    expect(ab.byteLength).to.equal(0);
    expect(view.length).to.equal(0);
    expect(view[100]).to.equal(undefined);
    expect(() => dv.getUint8(100)).to.throw(TypeError);
    expectSystemError(() => native.munmap(ab), 'EINVAL', 'munmap');
    native.close(fd);
  });

  it('punches holes: the host really gets memory back', () => {
    const fd = native.memfdCreate('t');
    const size = 8 << 20;
    native.ftruncate(fd, size);
    const ab = native.mmap(fd, size, 0);
    new Uint8Array(ab).fill(7);
    expect(native.fstat(fd).allocatedBytes).to.equal(size);
    native.punchHole(fd, 1 << 20, 4 << 20);
    expect(native.fstat(fd).allocatedBytes).to.equal(size - (4 << 20));
    expect(new Uint8Array(ab)[(1 << 20) + 5]).to.equal(0);
    expect(new Uint8Array(ab)[5]).to.equal(7);
    expect(native.fstat(fd).size).to.equal(size);
    native.munmap(ab);
    native.close(fd);
  });

  it('checksums bytes: any change to them, their length or their place changes it; out of range is ERANGE', () => {
    const data = Buffer.alloc(4099);
    for (let i = 0; i < data.length; i++) data[i] = (i * 7919) & 0xff;
    const whole = native.checksum(data, 0, data.length);
    expect(Number.isSafeInteger(whole)).to.equal(true);
    expect(whole).to.be.below(2 ** 48);
    expect(native.checksum(Buffer.from(data), 0, data.length)).to.equal(whole);
    const seen = new Set([whole]);
    // Every single-bit flip, in the 8-byte rounds and in the tail, gives a new value.
    for (const at of [0, 7, 8, 1000, 4095, 4096, 4098])
      for (let bit = 0; bit < 8; bit++) {
        data[at] ^= 1 << bit;
        seen.add(native.checksum(data, 0, data.length));
        data[at] ^= 1 << bit;
      }
    expect(seen.size).to.equal(1 + 7 * 8);
    // A body cut short, or the same bytes further on, differ too; trailing zeros count.
    expect(native.checksum(data, 0, data.length - 1)).to.not.equal(whole);
    expect(native.checksum(Buffer.alloc(16), 0, 8)).to.not.equal(native.checksum(Buffer.alloc(16), 0, 9));
    expect(() => native.checksum(data, 1, data.length)).to.throw(/ERANGE/);
    expect(() => native.checksum(data, -1, 2)).to.throw(/offset/);
    expect(() => native.checksum([1, 2] as unknown as Uint8Array, 0, 1)).to.throw(TypeError);
  });

  it('refuses single mappings above 4 GiB (the Node-API buffer limit) cleanly', () => {
    const fd = native.memfdCreate('big');
    native.ftruncate(fd, 5 * 1024 ** 3);
    expectSystemError(() => native.mmap(fd, 5 * 1024 ** 3, 0), 'EINVAL', 'mmap');
    const ab = native.mmap(fd, 2 ** 32, 2 ** 30);
    expect(ab.byteLength).to.equal(2 ** 32);
    native.munmap(ab);
    native.close(fd);
  });

  it("connects without blocking when the listener's backlog is full (-1, then retry)", () => {
    const dir = tmpDir();
    const sock = path.join(dir, 's');
    const l = native.listen(sock, 0);
    const conns: number[] = [];
    try {
      // Nobody accepts: a blocking connect would sleep here until someone did (issue 15).
      let fd = 0;
      // Bounded: a backlog of 0 admits one or two pending connections.
      for (let i = 0; i < 16 && (fd = native.connect(sock)) >= 0; i++) conns.push(fd);
      expect(fd).to.equal(-1);
      expect(conns.length).to.be.greaterThan(0);
      expect(native.fstat(conns[0]).nonBlocking).to.equal(true);
      const s = native.accept(l);
      expect(s).to.be.greaterThan(0);
      conns.push(s);
      const again = native.connect(sock); // room again
      expect(again).to.be.greaterThan(0);
      conns.push(again);
    } finally {
      for (const fd of conns) native.close(fd);
      native.close(l);
      fs.rmSync(dir, { recursive: true });
    }
  });

  describe('I/O on descriptors a front-end controls never blocks', () => {
    /** Brings an eventfd's counter to `target` (< 2^64 - 1) with writes of at most 2^53 - 1. */
    function fillCounter(efd: number, target: bigint): void {
      const step = 2n ** 53n - 1n;
      // Bounded: target / step < 2^11 writes.
      for (let left = target; left > 0n;) {
        const v = left < step ? left : step;
        expect(native.eventfdWrite(efd, Number(v))).to.equal(true);
        left -= v;
      }
    }

    it('a blocking-mode eventfd whose counter is at 2^64-2: a write is refused, not waited for', () => {
      const efd = native.eventfd(0, false);
      fillCounter(efd, 2n ** 64n - 2n);
      expect(native.eventfdWrite(efd, 1)).to.equal(false);
      native.close(efd);
    });

    it('a write that poll() says fits but does not: the 1 ms guard interrupts it', () => {
      // POLLOUT only means "1 fits"; 2^53-1 does not fit above 2^64-2^52. Blocking mode.
      const efd = native.eventfd(0, false);
      fillCounter(efd, 2n ** 64n - 2n ** 52n);
      expect(native.eventfdWrite(efd, 2 ** 53 - 1)).to.equal(false);
      expect(native.eventfdWrite(efd, 1)).to.equal(true); // still usable
      native.close(efd);
    });

    it('an eventfd switched to blocking mode by its other holder: a read of zero returns null', () => {
      const efd = native.eventfd(0, true);
      native.setNonBlocking(efd, false); // what the peer that shares the open file can do
      expect(native.eventfdRead(efd, false)).to.equal(null); // even when told it is non-blocking
      expect(native.eventfdRead(efd)).to.equal(null);
      native.eventfdWrite(efd, 4);
      expect(native.eventfdRead(efd, false)).to.equal(4);
      native.close(efd);
    });

    it('a full blocking pipe in place of an eventfd: writes are refused, reads of an empty one too', () => {
      const [r, w] = native.pipe();
      expect(native.fstat(w).nonBlocking).to.equal(false);
      let writes = 0;
      // Bounded: a pipe holds 64 KiB by default, 8 bytes a write.
      while (writes < 100000 && native.eventfdWrite(w, 1)) writes++;
      expect(writes).to.be.greaterThan(0).and.lessThan(100000);
      expect(native.eventfdWrite(w, 1)).to.equal(false);
      expect(native.eventfdRead(r)).to.equal(1); // 8 bytes of a pipe read as a counter
      native.close(w);
      const [r2, w2] = native.pipe();
      expect(native.eventfdRead(r2)).to.equal(null);
      native.close(w2);
      expectSystemError(() => native.eventfdRead(r2), 'EPIPE', 'read'); // end of file
      for (const fd of [r, r2]) native.close(fd);
    });

    it('tells what a descriptor is (fdKind)', () => {
      const efd = native.eventfd(0, true);
      const [r, w] = native.pipe();
      const [a, b] = native.socketpair();
      const mfd = native.memfdCreate('k');
      const dir = fs.openSync('/tmp', 'r');
      const dev = fs.openSync('/dev/null', 'r');
      try {
        expect([efd, r, w, a, mfd, dir, dev].map((fd) => native.fdKind(fd))).to.deep.equal([
          'eventfd',
          'pipe',
          'pipe',
          'socket',
          'file',
          'directory',
          'char',
        ]);
      } finally {
        for (const fd of [efd, r, w, a, b, mfd, dir, dev]) native.close(fd);
      }
      expectSystemError(() => native.fdKind(efd), 'EBADF', 'fcntl');
    });
  });

  describe('an eventfd watch (POLL_EVENTFD) reports hangups and errors once, never spins', () => {
    /** Resolves after the event loop went through epoll at least `rounds` more times. */
    async function loopRounds(rounds = 3): Promise<void> {
      const efd = native.eventfd(0, true);
      try {
        for (let i = 0; i < rounds; i++) {
          await new Promise<void>((resolve) => {
            const h = native.pollStart(efd, POLL_READABLE, () => {
              native.eventfdRead(efd);
              native.pollStop(h);
              resolve();
            });
            native.eventfdWrite(efd, 1);
          });
        }
      } finally {
        native.close(efd);
      }
    }

    it('delivers kicks with their count', async () => {
      const efd = native.eventfd(0, true);
      const counts: number[] = [];
      const h = native.pollStart(efd, POLL_READABLE | POLL_EVENTFD, (status, events, count) => {
        expect(status).to.equal(0);
        expect(events).to.equal(POLL_READABLE);
        counts.push(count!);
      });
      native.eventfdWrite(efd, 3);
      await loopRounds();
      native.eventfdWrite(efd, 2);
      await loopRounds();
      native.pollStop(h);
      native.close(efd);
      expect(counts).to.deep.equal([3, 2]);
    });

    const hostile: Array<{ name: string; make(): { fd: number; others: number[] }; status: number[] }> = [
      {
        name: 'a pipe whose writer is gone',
        make: () => {
          const [r, w] = native.pipe();
          native.close(w);
          return { fd: r, others: [] };
        },
        status: [POLL_STATUS_HANGUP],
      },
      {
        name: 'a socket whose peer closed',
        make: () => {
          const [a, b] = native.socketpair();
          native.close(b);
          return { fd: a, others: [] };
        },
        status: [POLL_STATUS_HANGUP],
      },
      {
        name: 'a listening socket with a pending connection',
        make: () => {
          const dir = tmpDir();
          const sock = path.join(dir, 'l');
          const l = native.listen(sock, 4);
          const c = native.connect(sock);
          fs.rmSync(dir, { recursive: true });
          return { fd: l, others: [c] };
        },
        status: [-22, -107], // EINVAL or ENOTCONN, whichever the kernel says
      },
      {
        name: 'a pipe holding 3 bytes (a short read)',
        make: () => {
          const [r, w] = native.pipe();
          fs.writeSync(w, Buffer.from([1, 2, 3]));
          return { fd: r, others: [w] };
        },
        status: [-22],
      },
    ];
    for (const c of hostile) {
      it(`${c.name}: one status < 0, then the watch is stopped`, async () => {
        const { fd, others } = c.make();
        const seen: Array<[number, number]> = [];
        const h = native.pollStart(fd, POLL_READABLE | POLL_EVENTFD, (status, events) => seen.push([status, events]));
        try {
          await loopRounds();
          expect(seen).to.have.length(1);
          expect(c.status).to.include(seen[0][0]);
          expect(seen[0][1]).to.equal(0);
          expectSystemError(() => native.pollUpdate(h, POLL_READABLE), 'EPIPE', 'uv_poll_start');
        } finally {
          native.pollStop(h);
          native.close(fd);
          for (const o of others) native.close(o);
        }
      });
    }
  });

  it('rejects bad arguments with type errors', () => {
    expect(() => native.close('x' as unknown as number)).to.throw(TypeError);
    expect(() => native.mmap(0, -1, 0)).to.throw(TypeError);
    expect(() => native.sendmsg(0, 'x' as unknown as Uint8Array)).to.throw(TypeError);
  });
});
