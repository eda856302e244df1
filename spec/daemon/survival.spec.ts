/**
 * Restart survival pieces over real memfds, sockets and eventfds: the state memfd, the page
 * bitmap, and a session taken over by a second back-end (and device) while the guest runs, as a
 * restarted daemon takes it over. The whole-process version (a real SIGKILL, a real service
 * manager) is in spec/daemon/restart.spec.ts and the real-QEMU soak in bench/soak.ts.
 */
import { expect } from 'chai';
import * as fc from 'fast-check';
import { createHash } from 'node:crypto';
import * as fs from 'node:fs';
import { BalloonDevice } from '../../lib/device/balloon';
import { PageRun } from '../../lib/device/page-tracker';
import { MemoryLogger } from '../../lib/log';
import { native } from '../../lib/native';
import { FdHolder, groupByVm, NamedFd, PageBitmap, StateFile, VmSurvival } from '../../lib/daemon/survival';
import { GuestRam } from '../../lib/testing/guest-ram';
import { BalloonGuest } from '../../lib/testing/balloon-guest';
import { VhostUserBackend } from '../../lib/vhost/server';
import { SessionImage } from '../../lib/vhost/session';
import { TestFrontend } from '../../lib/testing/frontend';
import { encodeReply } from '../../lib/vhost/codec';
import { FrontendRequest } from '../../lib/vhost/constants';
import { LOST_REPLY_PROBE_MS } from '../../lib/vhost/session';

import { startBackend, until } from '../helpers';

const PAGES_PER_MIB = 256;

/** The image with every descriptor duplicated: what a service manager holds for the next process. */
function held(image: SessionImage): SessionImage {
  const dup = (fd: number): number => (fd < 0 ? -1 : native.dup(fd));
  return {
    ...image,
    connFd: dup(image.connFd),
    channelFd: dup(image.channelFd),
    regions: image.regions.map((r) => ({ ...r, fd: dup(r.fd) })),
    rings: image.rings.map((r) => ({ ...r, kickFd: dup(r.kickFd), callFd: dup(r.callFd), errFd: dup(r.errFd) })),
  };
}

function model(runs: Iterable<PageRun>): Set<number> {
  const out = new Set<number>();
  for (const r of runs) for (let p = r.start; p < r.start + r.count; p++) out.add(p);
  return out;
}

describe('restart survival (lib/daemon/survival.ts)', () => {
  describe('state memfd', () => {
    it('reads back the newest state; a write cut short leaves the previous one', () => {
      const f = StateFile.create('t');
      try {
        expect(f.read()).to.equal(undefined);
        f.write({ n: 1 });
        f.write({ n: 2, big: 'x'.repeat(5000) });
        const again = StateFile.open(native.dup(f.fd));
        expect(again.read()).to.deep.include({ n: 2 });
        again.close();
        // A third write that a SIGKILL cut short: its slot (slot 0 again) has a torn body.
        f.write({ n: 3, pad: 'y'.repeat(2000) });
        fs.writeSync(f.fd, Buffer.from('garbage'), 0, 7, 36 + 100);
        const torn = StateFile.open(native.dup(f.fd));
        expect(torn.read()).to.deep.include({ n: 2 });
        // The next write goes to the other slot, never over the last good one.
        torn.write({ n: 4 });
        expect(StateFile.open(native.dup(f.fd)).read()).to.deep.equal({ n: 4 });
      } finally {
        f.close();
      }
    });

    it('is written in place through its mapping: another descriptor reads each save at once', () => {
      const f = StateFile.create('t');
      try {
        for (let n = 1; n <= 5; n++) {
          f.write(`{"n":${n}`, Buffer.from(',"tail":"z"}'));
          f.writeRecord(JSON.stringify({ digest: `d${n}`, reply: null }));
          const other = StateFile.open(native.dup(f.fd));
          expect(other.read()).to.deep.equal({ n, tail: 'z' });
          expect(other.readRecord()).to.deep.equal({ digest: `d${n}`, reply: null });
          other.close();
        }
        // A header cut short (its check not written yet) is not trusted either.
        fs.writeSync(f.fd, Buffer.alloc(6), 0, 6, 16);
        fs.writeSync(f.fd, Buffer.alloc(6), 0, 6, 1024 * 1024 + 16);
        expect(StateFile.open(native.dup(f.fd)).read()).to.equal(undefined);
      } finally {
        f.close();
        f.close(); // idempotent
      }
    });

    it('reads a state an earlier version wrote ("VBS1" slots checked with SHA-1), then writes after it', () => {
      const fd = native.memfdCreate('old-state');
      native.ftruncate(fd, 2 * 1024 * 1024 + 64 * 1024);
      const slot = (seq: number, doc: unknown, offset: number, check = true): void => {
        const body = Buffer.from(JSON.stringify(doc));
        const header = Buffer.alloc(36);
        header.writeUInt32LE(0x31534256, 0);
        header.writeUInt32LE(body.length, 4);
        header.writeDoubleLE(seq, 8);
        createHash('sha1')
          .update(check ? body : Buffer.from('other'))
          .digest()
          .copy(header, 16);
        fs.writeSync(fd, Buffer.concat([header, body]), 0, 36 + body.length, offset);
      };
      slot(7, { old: 7 }, 0);
      slot(8, { old: 8 }, 1024 * 1024);
      slot(0, { digest: 'x', reply: null }, 2 * 1024 * 1024);
      const f = StateFile.open(fd);
      try {
        expect(f.read()).to.deep.equal({ old: 8 });
        expect(f.readRecord()).to.deep.equal({ digest: 'x', reply: null });
        f.write({ now: 9 }); // over the older slot (seq 7), never over the newest
        const again = StateFile.open(native.dup(fd));
        expect(again.read()).to.deep.equal({ now: 9 });
        again.close();
        // An old slot whose hash does not match its body is refused, as before.
        slot(10, { bad: 10 }, 1024 * 1024, false);
        const third = StateFile.open(native.dup(fd));
        expect(third.read()).to.deep.equal({ now: 9 });
        third.close();
      } finally {
        f.close();
      }
    });

    it('refuses a state larger than its slot (the caller logs and counts it)', () => {
      const f = StateFile.create('t');
      try {
        expect(() => f.write({ s: 'z'.repeat(2 * 1024 * 1024) })).to.throw(/does not fit/);
      } finally {
        f.close();
      }
    });
  });

  describe('page bitmap', () => {
    it('property: what added/removed/cleared leave is what runs() reads back, also from another process view', () => {
      fc.assert(
        fc.property(
          fc.array(
            fc.oneof(
              fc.record({
                op: fc.constant('add' as const),
                start: fc.nat(3_000_000),
                count: fc.integer({ min: 1, max: 70 }),
              }),
              fc.record({ op: fc.constant('remove' as const), pfns: fc.array(fc.nat(3_000_000), { maxLength: 20 }) }),
              fc.record({ op: fc.constant('clear' as const) }),
            ),
            { maxLength: 40 },
          ),
          (ops) => {
            const b = PageBitmap.create('t', () => new MemoryLogger());
            const expected = new Set<number>();
            try {
              for (const o of ops) {
                if (o.op === 'add') {
                  b.added([{ start: o.start, count: o.count }]);
                  for (let p = o.start; p < o.start + o.count; p++) expected.add(p);
                } else if (o.op === 'remove') {
                  b.removed(o.pfns);
                  for (const p of o.pfns) expected.delete(p);
                } else {
                  b.cleared();
                  expected.clear();
                }
              }
              const reopened = PageBitmap.open(native.dup(b.fd), () => new MemoryLogger());
              const runs = [...reopened.runs()];
              reopened.close();
              // Runs are sorted, disjoint and not adjacent.
              for (let i = 1; i < runs.length; i++)
                expect(runs[i].start).to.be.above(runs[i - 1].start + runs[i - 1].count);
              expect([...model(runs)].sort((x, y) => x - y)).to.deep.equal([...expected].sort((x, y) => x - y));
            } finally {
              b.close();
            }
          },
        ),
        { numRuns: 60 },
      );
    });
  });

  it('groups descriptors by VM name, the longest name first', () => {
    const { byVm, other } = groupByVm(
      [
        { name: 'a.state', fd: 3 },
        { name: 'a.b.state', fd: 4 },
        { name: 'a.b.conn.7', fd: 5 },
        { name: 'zz.state', fd: 6 },
      ],
      ['a', 'a.b'],
    );
    expect([...byVm.get('a')!]).to.deep.equal([['state', 3]]);
    expect([...byVm.get('a.b')!]).to.deep.equal([
      ['state', 4],
      ['conn.7', 5],
    ]);
    expect(other).to.deep.equal([{ name: 'zz.state', fd: 6 }]);
  });

  it('a second back-end and device take over a live session: the guest goes on, nothing is lost', async () => {
    const bitmap = PageBitmap.create('vm', () => new MemoryLogger());
    const deviceA = new BalloonDevice({ statsIntervalMs: 100, journal: bitmap });
    const fx = startBackend(deviceA);
    const guest = await BalloonGuest.boot(fx.socketPath, { mode: 'seed', numQueues: deviceA.numQueues });
    const deviceB = new BalloonDevice({ statsIntervalMs: 100, journal: bitmap });
    const backendB = new VhostUserBackend(deviceB, { log: new MemoryLogger() });
    try {
      deviceA.setTargetPages(8 * PAGES_PER_MIB);
      await guest.reach(8 * PAGES_PER_MIB);
      await until(() => deviceA.snapshot().statsQueue.updates >= 1, 'stats before');
      deviceA.flushDiscards();
      // What the previous process leaves: the image (descriptors held elsewhere), the device's
      // state and the bitmap. Then it goes away without the front-end noticing.
      const image = held(fx.backend.current!.image());
      const deviceImage = deviceA.image();
      fx.backend.current!.close();
      const restored = deviceB.restore(deviceImage, bitmap.runs());
      expect(restored).to.equal(8 * PAGES_PER_MIB);
      const session = backendB.resume(image);
      expect(session.isClosed).to.equal(false);
      expect(deviceB.target).to.equal(8 * PAGES_PER_MIB);
      expect(deviceB.actual).to.equal(8 * PAGES_PER_MIB);
      // The guest deflates and inflates through the new back-end only.
      deviceB.setTargetPages(3 * PAGES_PER_MIB);
      await guest.reach(3 * PAGES_PER_MIB);
      deviceB.setTargetPages(12 * PAGES_PER_MIB);
      await guest.reach(12 * PAGES_PER_MIB);
      // Stats keep arriving (the held stats buffer came back with the ring).
      const before = deviceB.snapshot().statsQueue.updates;
      await until(() => deviceB.snapshot().statsQueue.updates > before + 1, 'stats after');
      guest.check();
      const snap = deviceB.snapshot();
      expect(snap.balloonedPages).to.equal(12 * PAGES_PER_MIB);
      expect(snap.actualPages).to.equal(guest.balloonPages);
      expect(guest.balloonPages).to.equal(12 * PAGES_PER_MIB);
      expect(model(bitmap.runs()).size).to.equal(12 * PAGES_PER_MIB);
      expect(deviceA.snapshot().balloonedPages, 'the old device took no part').to.equal(8 * PAGES_PER_MIB);
    } finally {
      await guest.close();
      backendB.close();
      fx.close();
      bitmap.close();
    }
  });

  describe('the last crash window: a reply the killed process may not have sent', function () {
    this.timeout(30_000);

    /**
     * A front-end that asked for the config, a previous process that took the request off the
     * socket and recorded its reply, then died (its descriptors held elsewhere). `blocked`: the
     * front-end waits for that reply holding its big lock (QEMU's vCPU in a config read), so it
     * answers nothing on the back-end channel meanwhile; otherwise it got the reply and is idle.
     */
    async function scenario(
      blocked: boolean,
    ): Promise<{ logB: MemoryLogger; reply: unknown; next: bigint | undefined }> {
      const deviceA = new BalloonDevice();
      const fx = startBackend(deviceA);
      const fe = TestFrontend.connect(fx.socketPath, {
        numQueues: deviceA.numQueues,
        configSize: 8,
        ramBytes: 32 * 1024 * 1024,
        queueSize: 64,
        layout: 'flat',
        replyTimeoutMs: 20_000,
      });
      const deviceB = new BalloonDevice();
      const logB = new MemoryLogger();
      const backendB = new VhostUserBackend(deviceB, { log: logB });
      try {
        await fe.realize();
        await fe.start(fe.backendFeatures & 0x100000007n, [0, 1]);
        deviceA.setTargetPages(4096);
        await fe.waitConfigChange(1);
        const session = fx.backend.current!;
        const configReply = Buffer.from(
          encodeReply(FrontendRequest.GET_CONFIG, {
            kind: 'config',
            offset: 0,
            size: 8,
            flags: 0,
            data: deviceA.readConfig(0, 8),
          }),
        ).toString('base64');
        let pending: Promise<unknown> = Promise.resolve(undefined);
        if (blocked) {
          fe.ackConfigChanges = false;
          const configRequest = { kind: 'config' as const, offset: 0, size: 8, flags: 0, data: new Uint8Array(8) };
          pending = fe.request(FrontendRequest.GET_CONFIG, configRequest);
          // The previous process took the request off the socket... and was killed.
          const taken = native.recvmsg(session.image().connFd, 64 * 1024);
          expect(taken?.data.length).to.equal(12 + 20);
        }
        const image = held(session.image());
        image.lastHandled = { digest: 'the GET_CONFIG', reply: configReply };
        const deviceImage = deviceA.image();
        session.close();
        deviceB.restore(deviceImage, []);
        backendB.resume(image);
        const reply = await pending;
        fe.ackConfigChanges = true;
        await new Promise((r) => setTimeout(r, LOST_REPLY_PROBE_MS + 500));
        // The stream is still in step: the next request gets its own reply.
        const next = await fe.requestU64(FrontendRequest.GET_FEATURES);
        return { logB, reply, next };
      } finally {
        fe.close();
        backendB.close();
        fx.close();
      }
    }

    it('a front-end blocked on it gets it once the probe shows its main loop stuck', async () => {
      const { logB, reply, next } = await scenario(true);
      expect(reply, 'the GET_CONFIG reply arrived').to.not.equal(undefined);
      expect(next).to.equal(new BalloonDevice().features() | (1n << 30n));
      expect(
        logB.records.some((r) => r.message.includes('waits for a reply the previous process did not send')),
      ).to.equal(true);
    });

    it('an idle front-end that had it gets no second one (the probe is answered)', async () => {
      const { logB, next } = await scenario(false);
      expect(next).to.equal(new BalloonDevice().features() | (1n << 30n));
      expect(logB.records.some((r) => r.message.includes('waits for a reply'))).to.equal(false);
    });
  });

  it("QEMU's one memfd for several regions, kept once by a deduplicating store, serves them all", async () => {
    /** Keeps an open file once, under its first name (what systemd 252 does). */
    class DedupingStore implements FdHolder {
      readonly enabled = true;
      readonly kept: NamedFd[] = [];
      store(name: string, fds: readonly number[]): void {
        for (const fd of fds)
          if (!this.kept.some((k) => native.sameFile(k.fd, fd))) this.kept.push({ name, fd: native.dup(fd) });
      }
      remove(name: string): void {
        for (const k of this.kept.filter((x) => x.name === name)) native.close(k.fd);
        this.kept.splice(0, this.kept.length, ...this.kept.filter((x) => x.name !== name));
      }
    }
    const holder = new DedupingStore();
    const policy = () => ({ mode: 'manual' as const, operatorPages: 0 });
    const keeperA = new VmSurvival('vm0', holder, new MemoryLogger());
    const deviceA = new BalloonDevice({ journal: keeperA.bitmap });
    let crashed = false;
    const fx = startBackend(deviceA, {
      onHandled: (request, last) => crashed || keeperA.afterMessage(request, last),
    });
    keeperA.follow(deviceA, fx.backend, policy);
    // q35 above 3 GiB: low and high memory are two regions of one memfd.
    const ram = new GuestRam({ sizeBytes: 4 * 1024 * 1024 * 1024, layout: 'q35' });
    const guest = await BalloonGuest.boot(fx.socketPath, { mode: 'seed', numQueues: deviceA.numQueues, ram });
    const deviceB = new BalloonDevice();
    const backendB = new VhostUserBackend(deviceB, { log: new MemoryLogger() });
    let keeperB: VmSurvival | undefined;
    try {
      const regionsA = fx.backend.current!.image().regions;
      expect(regionsA.length, 'regions').to.be.at.least(2);
      expect(native.sameFile(regionsA[0].fd, regionsA[1].fd), 'one open file').to.equal(true);
      deviceA.setTargetPages(8 * PAGES_PER_MIB);
      await guest.reach(8 * PAGES_PER_MIB);
      // SIGKILL: nothing more is saved; the store passes its descriptors to the next process.
      crashed = true;
      deviceA.removeAllListeners();
      const inherited = holder.kept.map((k) => ({ name: k.name, fd: native.dup(k.fd) }));
      expect(
        inherited.filter((k) => k.name.includes('.mem')),
        'the memfd is stored once',
      ).to.have.length(1);
      fx.backend.current!.close();
      const { byVm } = groupByVm(inherited, ['vm0']);
      keeperB = new VmSurvival('vm0', holder, new MemoryLogger(), byVm.get('vm0'));
      deviceB.restore(keeperB.previous!.doc.device, keeperB.bitmap.runs());
      backendB.resume(keeperB.takeSession()!);
      keeperB.dropUnused();
      keeperB.follow(deviceB, backendB, policy);
      expect(backendB.current!.memory.regionList.length).to.equal(regionsA.length);
      deviceB.setTargetPages(2 * PAGES_PER_MIB);
      await guest.reach(2 * PAGES_PER_MIB);
      deviceB.setTargetPages(16 * PAGES_PER_MIB);
      await guest.reach(16 * PAGES_PER_MIB);
      guest.check();
      expect(deviceB.snapshot().balloonedPages).to.equal(guest.balloonPages);
      // The store still holds the memfd once, under the name both regions share.
      expect(holder.kept.filter((k) => k.name.includes('.mem'))).to.have.length(1);
    } finally {
      await guest.close();
      backendB.close();
      fx.close();
      keeperA.forget();
      keeperB?.forget();
      ram.close();
      for (const k of holder.kept) native.close(k.fd);
    }
  });
});
