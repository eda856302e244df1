/**
 * What one front-end can do to the daemon it does to every VM: each case here is a hostile
 * front-end on one back-end, and a bystander front-end on a second back-end of the same process
 * that must keep working (a used buffer and a reply round trip). Descriptors and memory from a
 * front-end are hostile (issue 15): no blocking I/O on them, no busy loop on a dead one, no
 * SIGBUS from a file shrunk under us, no stall from mapping a huge guest. Real sockets, memfds,
 * eventfds and pipes; descriptor, mapping and watch counts are checked after every case.
 */
import { expect } from 'chai';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { ErrorCode } from '../../lib/errors';
import { MemoryLogger } from '../../lib/log';
import { F_SEAL_GROW, F_SEAL_SHRINK, native } from '../../lib/native';
import { SplitRingDriver } from '../../lib/testing/driver';
import { EchoDevice } from '../../lib/testing/echo-device';
import { TestFrontend } from '../../lib/testing/frontend';
import { encodeMessage } from '../../lib/vhost/codec';
import { FrontendRequest, VIRTIO_F_VERSION_1 } from '../../lib/vhost/constants';
import { VhostUserBackend } from '../../lib/vhost/server';
import { BackendFixture, fdCount, startBackend, tmpDir, until } from '../helpers';

const FEATURES = VIRTIO_F_VERSION_1;
const BIT30 = 1n << 30n;

interface World {
  victim: BackendFixture;
  bystander: BackendFixture;
  good: TestFrontend;
  goodRing: SplitRingDriver;
  /** Hostile descriptors the test made; closed at the end. */
  fds: number[];
}

/** Starts a victim back-end and a bystander back-end whose front-end has ring 0 running. */
async function world(): Promise<World> {
  const victim = startBackend(new EchoDevice({ numQueues: 2 }));
  const bystander = startBackend(new EchoDevice({ numQueues: 1 }));
  const good = TestFrontend.connect(bystander.socketPath, { numQueues: 1, configSize: 8 });
  await good.realize();
  const goodRing = (await good.start(FEATURES, [0])).get(0)!;
  return { victim, bystander, good, goodRing, fds: [] };
}

/** The bystander VM still gets its buffers used and its requests answered. */
async function bystanderWorks(w: World): Promise<void> {
  const buf = w.good.ram.alloc(16);
  const out = w.good.ram.alloc(16);
  w.good.ram.memory.write(buf, new Uint8Array([7, 7, 7]));
  w.goodRing.addBuffer([
    { addr: buf, len: 3 },
    { addr: out, len: 16, writable: true },
  ]);
  w.goodRing.kick();
  const used = await w.goodRing.waitUsed(1);
  expect(used[0].len).to.equal(3);
  expect(await w.good.requestU64(FrontendRequest.GET_FEATURES)).to.be.a('bigint');
}

async function tearDown(w: World, fe?: TestFrontend): Promise<void> {
  fe?.close();
  w.good.close();
  await until(() => !w.victim.backend.connected && !w.bystander.backend.connected, 'disconnects');
  w.victim.close();
  w.bystander.close();
  for (const fd of w.fds) native.close(fd);
}

/** Runs `body` with leak checks: descriptors, mappings and fd watches are back where they were. */
function isolated(name: string, body: (w: World) => Promise<TestFrontend | undefined>): void {
  it(name, async () => {
    const fdsBefore = fdCount();
    const mapsBefore = native.mappingCount();
    const watchesBefore = native.pollCount();
    const w = await world();
    let fe: TestFrontend | undefined;
    try {
      fe = await body(w);
      await bystanderWorks(w);
    } finally {
      await tearDown(w, fe);
    }
    expect(native.pollCount(), 'watches leaked').to.equal(watchesBefore);
    expect(native.mappingCount(), 'mappings leaked').to.equal(mapsBefore);
    expect(fdCount(), 'descriptors leaked').to.equal(fdsBefore);
  });
}

/** A victim front-end with ring 0 running. */
async function victimWithRing(w: World): Promise<{ fe: TestFrontend; ring: SplitRingDriver }> {
  const fe = TestFrontend.connect(w.victim.socketPath, { numQueues: 2, configSize: 8 });
  await fe.realize();
  const ring = (await fe.start(FEATURES, [0])).get(0)!;
  await until(() => w.victim.backend.current?.isClosed === false, 'victim session');
  return { fe, ring };
}

/** Adds one buffer to `ring`, kicks, and waits (by reading used->idx) until it is used. */
async function useOneBuffer(fe: TestFrontend, ring: SplitRingDriver): Promise<void> {
  const buf = fe.ram.alloc(16);
  const out = fe.ram.alloc(16);
  const before = ring.usedIdx;
  ring.addBuffer([
    { addr: buf, len: 4 },
    { addr: out, len: 16, writable: true },
  ]);
  ring.kick();
  await until(() => ring.usedIdx !== before, 'the buffer to be used');
}

/** An eventfd in blocking mode whose counter is 2^64-2: one more write blocks. */
function fullBlockingEventfd(): number {
  const efd = native.eventfd(0, false);
  const step = 2n ** 53n - 1n;
  // Bounded: (2^64-2) / (2^53-1) < 2^11 writes.
  for (let left = 2n ** 64n - 2n; left > 0n;) {
    const v = left < step ? left : step;
    native.eventfdWrite(efd, Number(v));
    left -= v;
  }
  return efd;
}

/** A blocking pipe whose buffer is full; returns [readFd, writeFd]. */
function fullBlockingPipe(): [number, number] {
  const [r, w] = native.pipe();
  native.setNonBlocking(w, true);
  const chunk = Buffer.alloc(65536);
  // Bounded: a pipe holds at most 1 MiB (pipe-max-size) unless raised by root.
  for (let i = 0; i < 64; i++) {
    try {
      fs.writeSync(w, chunk);
    } catch {
      break; // EAGAIN: full
    }
  }
  native.setNonBlocking(w, false); // and now a write would block
  return [r, w];
}

describe('isolation: a hostile front-end cannot reach another VM (real sockets, bystander VM)', () => {
  describe('descriptors', () => {
    isolated('a blocking call eventfd at 2^64-2, then one used buffer: no freeze', async (w) => {
      const { fe, ring } = await victimWithRing(w);
      const efd = fullBlockingEventfd();
      w.fds.push(efd);
      await fe.requestU64(FrontendRequest.SET_VRING_CALL, { kind: 'vring-fd', index: 0, noFd: false }, [efd]);
      await useOneBuffer(fe, ring); // the daemon blocked in write(2) here, every VM with it
      expect(await fe.requestU64(FrontendRequest.GET_FEATURES)).to.be.a('bigint');
      return fe;
    });

    isolated('one eventfd as kick fd of two rings, switched to blocking, then one kick: no freeze', async (w) => {
      const fe = TestFrontend.connect(w.victim.socketPath, { numQueues: 2, configSize: 8 });
      await fe.realize();
      const rings = await fe.start(FEATURES, [0, 1]);
      const kick = native.eventfd(0, true);
      w.fds.push(kick);
      for (const q of [0, 1]) {
        await fe.requestU64(FrontendRequest.SET_VRING_KICK, { kind: 'vring-fd', index: q, noFd: false }, [kick]);
      }
      native.setNonBlocking(kick, false); // the peer shares the open file description
      const buf = fe.ram.alloc(16);
      rings.get(0)!.addBuffer([{ addr: buf, len: 4 }]);
      rings.get(1)!.addBuffer([{ addr: buf, len: 4 }]);
      native.eventfdWrite(kick, 1); // both watches wake; the second read found 0 and blocked
      await until(() => rings.get(0)!.usedIdx + rings.get(1)!.usedIdx > 0, 'a ring to run');
      expect(await fe.requestU64(FrontendRequest.GET_FEATURES)).to.be.a('bigint');
      return fe;
    });

    // Kick, call and err must be eventfds: anything else is refused when it is handed over, so
    // the write-blocks, read-spins and busy loops these descriptors caused (a full blocking pipe
    // as call or err fd froze the daemon; a hung-up pipe, a closed or a listening socket as kick
    // fd spun it at ~90 % CPU) cannot start. The addon's own defences against them (never-blocking
    // writes, watches that stop on a hangup) are tested in spec/native.
    const notEventfds: Array<{ name: string; make(w: World): number }> = [
      {
        name: 'a full blocking pipe',
        make: (w) => {
          const [r, wr] = fullBlockingPipe();
          w.fds.push(r, wr);
          return wr;
        },
      },
      {
        name: 'a pipe whose writer is gone',
        make: (w) => {
          const [r, wr] = native.pipe();
          native.close(wr);
          w.fds.push(r);
          return r;
        },
      },
      {
        name: 'a socket whose peer closed',
        make: (w) => {
          const [a, b] = native.socketpair();
          native.close(b);
          w.fds.push(a);
          return a;
        },
      },
      {
        name: 'a listening socket with a pending connection',
        make: (w) => {
          const dir = tmpDir();
          const sock = path.join(dir, 'l');
          const l = native.listen(sock, 4);
          w.fds.push(l, native.connect(sock));
          fs.rmSync(dir, { recursive: true });
          return l;
        },
      },
    ];
    const vringFdRequests = [
      ['kick', FrontendRequest.SET_VRING_KICK],
      ['call', FrontendRequest.SET_VRING_CALL],
      ['err', FrontendRequest.SET_VRING_ERR],
    ] as const;
    for (const c of notEventfds) {
      for (const [role, request] of vringFdRequests) {
        isolated(`${c.name} as ${role} fd: refused (ERR_VHOST_BAD_VRING), no freeze, no busy loop`, async (w) => {
          const { fe } = await victimWithRing(w);
          const fd = c.make(w);
          const watches = native.pollCount();
          fe.sendRaw(encodeMessage(request, 1, { kind: 'vring-fd', index: 1, noFd: false }), [fd]);
          await fe.closed;
          await until(() => !w.victim.backend.connected, 'the victim connection to close');
          expect(w.victim.backend.counters.error(ErrorCode.VHOST_BAD_VRING)).to.equal(1);
          expect(w.victim.backend.counters.error(ErrorCode.VHOST_BAD_MESSAGE)).to.equal(0);
          expect(native.pollCount()).to.be.at.most(watches);
          return fe;
        });
      }
    }

    it('a client-mode back-end connecting to a front-end whose backlog is full: no freeze', async () => {
      const fdsBefore = fdCount();
      const w = await world();
      const dir = tmpDir();
      const sock = path.join(dir, 'frontend.sock');
      const listener = native.listen(sock, 0);
      const pending: number[] = [];
      // Bounded: a backlog of 0 admits one or two pending connections.
      for (let fd = 0, i = 0; i < 16 && (fd = native.connect(sock)) >= 0; i++) pending.push(fd);
      const client = new VhostUserBackend(new EchoDevice({ numQueues: 1 }), { log: new MemoryLogger() });
      let fe: TestFrontend | undefined;
      try {
        const connected = client.connect(sock, { retryIntervalMs: 2, reconnect: false });
        await bystanderWorks(w); // a blocking connect(2) froze everything right here
        // Drain the backlog: the next retry gets through.
        for (let fd = native.accept(listener); fd >= 0; fd = native.accept(listener)) native.close(fd);
        await connected;
        let conn = -1;
        await until(() => (conn = native.accept(listener)) >= 0, 'the back-end to connect');
        fe = TestFrontend.fromFd(conn, { numQueues: 1, configSize: 8 });
        await fe.realize();
      } finally {
        fe?.close();
        await until(() => !client.connected, 'client disconnect');
        client.close();
        for (const fd of pending) native.close(fd);
        native.close(listener);
        fs.rmSync(dir, { recursive: true });
        await tearDown(w);
      }
      expect(fdCount(), 'descriptors leaked').to.equal(fdsBefore);
    });
  });

  describe('memory', () => {
    const region = (size: bigint, uaddr = 0x10000000n) => ({
      guestPhysAddr: 0n,
      sizeBytes: size,
      userAddr: uaddr,
      mmapOffset: 0n,
    });

    /** The victim realizes and acks features, ready for a memory table. */
    async function victim(w: World): Promise<TestFrontend> {
      const fe = TestFrontend.connect(w.victim.socketPath, { numQueues: 2, configSize: 8 });
      await fe.realize();
      await fe.request(FrontendRequest.SET_FEATURES, { kind: 'u64', value: FEATURES | BIT30 });
      return fe;
    }

    isolated('a file shrunk after SET_MEM_TABLE, then a kick: no SIGBUS; that front-end is dropped', async (w) => {
      const fe = await victim(w);
      const dir = tmpDir();
      const file = fs.openSync(path.join(dir, 'ram'), 'w+');
      fs.rmSync(dir, { recursive: true });
      w.fds.push(file);
      fs.ftruncateSync(file, 2 << 20);
      const base = 0x10000000n;
      const kick = native.eventfd(0, true);
      w.fds.push(kick);
      await fe.requestU64(FrontendRequest.SET_MEM_TABLE, { kind: 'mem-table', regions: [region(2n << 20n, base)] }, [
        file,
      ]);
      await fe.request(FrontendRequest.SET_VRING_NUM, { kind: 'vring-state', index: 0, num: 64 });
      await fe.request(FrontendRequest.SET_VRING_BASE, { kind: 'vring-state', index: 0, num: 0 });
      await fe.request(FrontendRequest.SET_VRING_ADDR, {
        kind: 'vring-addr',
        index: 0,
        flags: 0,
        desc: base + 0x100000n, // past the first page: still in the file now, not after the shrink
        avail: base + 0x101000n,
        used: base + 0x102000n,
        log: 0n,
      });
      await fe.requestU64(FrontendRequest.SET_VRING_KICK, { kind: 'vring-fd', index: 0, noFd: false }, [kick]);
      await fe.requestU64(FrontendRequest.SET_VRING_ENABLE, { kind: 'vring-state', index: 0, num: 1 });
      const faults = native.mappingFaults();
      fs.ftruncateSync(file, 4096); // the front-end shrinks guest memory under us
      native.eventfdWrite(kick, 1); // the next access to the ring raised SIGBUS: every VM died
      await until(() => native.mappingFaults() > faults, 'the fault to be survived');
      // The pass that faulted saw zeros; the session then drops the front-end whose memory shrank.
      await fe.closed;
      await until(() => !w.victim.backend.connected, 'the victim connection to close');
      expect(w.victim.backend.counters.error(ErrorCode.VHOST_BAD_MEMORY)).to.equal(1);
      return fe;
    });

    const refused: Array<{ name: string; make(w: World): { fd: number; size: bigint } }> = [
      {
        name: 'a memfd that is not sealed against shrinking',
        make: () => {
          const fd = native.memfdCreate('unsealed');
          native.ftruncate(fd, 2 << 20);
          return { fd, size: 2n << 20n };
        },
      },
      {
        name: 'a region size that is not a multiple of 4 KiB',
        make: () => {
          const fd = native.memfdCreate('odd');
          native.ftruncate(fd, 2 << 20);
          native.addSeals(fd, F_SEAL_SHRINK | F_SEAL_GROW);
          return { fd, size: (1n << 20n) + 100n };
        },
      },
    ];
    for (const c of refused) {
      isolated(`${c.name}: refused with ERR_VHOST_BAD_MEMORY`, async (w) => {
        const fe = await victim(w);
        const { fd, size } = c.make(w);
        w.fds.push(fd);
        fe.sendRaw(
          encodeMessage(FrontendRequest.SET_MEM_TABLE, 1, {
            kind: 'mem-table',
            regions: [region(size)],
          }),
          [fd],
        );
        await fe.closed;
        await until(() => !w.victim.backend.connected, 'the victim to be dropped');
        expect(w.victim.backend.counters.error(ErrorCode.VHOST_BAD_MEMORY)).to.equal(1);
        return fe;
      });
    }

    isolated('a 1 TiB sparse region maps one window, not 1024 (a GC each stalled every VM)', async (w) => {
      const fe = await victim(w);
      const fd = native.memfdCreate('huge');
      w.fds.push(fd);
      native.ftruncate(fd, 2 ** 40);
      native.addSeals(fd, F_SEAL_SHRINK | F_SEAL_GROW);
      const maps = native.mappingCount();
      await fe.requestU64(FrontendRequest.SET_MEM_TABLE, { kind: 'mem-table', regions: [region(1n << 40n)] }, [fd]);
      expect(await fe.requestU64(FrontendRequest.GET_FEATURES)).to.be.a('bigint'); // barrier
      expect(native.mappingCount() - maps).to.equal(1);
      return fe;
    });
  });
});
