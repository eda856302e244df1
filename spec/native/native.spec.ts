import { expect } from 'chai';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { isSystemError, native, POLL_READABLE, SystemError } from '../../lib/native';
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

  it('listens, accepts and connects on a socket path', async () => {
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
    await new Promise((r) => setTimeout(r, 20));
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

  it('refuses single mappings above 4 GiB (the Node-API buffer limit) cleanly', () => {
    const fd = native.memfdCreate('big');
    native.ftruncate(fd, 5 * 1024 ** 3);
    expectSystemError(() => native.mmap(fd, 5 * 1024 ** 3, 0), 'EINVAL', 'mmap');
    const ab = native.mmap(fd, 2 ** 32, 2 ** 30);
    expect(ab.byteLength).to.equal(2 ** 32);
    native.munmap(ab);
    native.close(fd);
  });

  it('rejects bad arguments with type errors', () => {
    expect(() => native.close('x' as unknown as number)).to.throw(TypeError);
    expect(() => native.mmap(0, -1, 0)).to.throw(TypeError);
    expect(() => native.sendmsg(0, 'x' as unknown as Uint8Array)).to.throw(TypeError);
  });
});
