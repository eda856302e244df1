import { expect } from 'chai';
import { native } from '../../lib/native';
import { EchoDevice } from '../../lib/testing/echo-device';
import { TestFrontend } from '../../lib/testing/frontend';
import { FrontendRequest, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX } from '../../lib/vhost/constants';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { MemoryLogger } from '../../lib/log';
import { VhostUserBackend } from '../../lib/vhost/server';
import { fdCount, hangUp, startBackend, tmpDir, until } from '../helpers';

describe('vhost-user back-end lifecycle (real socket, memfd, eventfds)', () => {
  it('negotiates, starts rings, completes chains and stops like QEMU', async () => {
    const fdsBefore = fdCount();
    const device = new EchoDevice({ numQueues: 4 });
    const fx = startBackend(device);
    const fe = TestFrontend.connect(fx.socketPath, { numQueues: 4, configSize: 8 });
    try {
      await fe.realize();
      const drivers = await fe.start(VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX, [0, 1, 2]);
      await until(() => device.ready.size === 4 || device.ready.size === 3, 'rings ready');
      expect([...device.ready.keys()].sort()).to.deep.equal([0, 1, 2]);
      const d0 = drivers.get(0)!;
      const buf = fe.ram.alloc(64);
      const out = fe.ram.alloc(64);
      fe.ram.memory.write(buf, new Uint8Array([1, 2, 3, 4]));
      d0.addBuffer([
        { addr: buf, len: 4 },
        { addr: out, len: 64, writable: true },
      ]);
      d0.kick();
      const used = await d0.waitUsed(1);
      expect(used).to.have.length(1);
      expect(used[0].len).to.equal(4);
      expect([...fe.ram.memory.read(out, 4)]).to.deep.equal([1, 2, 3, 4]);
      const bases = await fe.stop();
      expect(bases.get(0)).to.equal(1);
      expect(bases.get(1)).to.equal(0);
      expect(device.ready.size).to.equal(0);
    } finally {
      await hangUp(fe, fx);
    }
    expect(native.mappingCount()).to.equal(0);
    expect(fdCount()).to.equal(fdsBefore);
  });

  it('serves the next connection after a disconnect, keeping device state', async () => {
    const device = new EchoDevice({ numQueues: 2 });
    const fx = startBackend(device);
    try {
      for (let round = 0; round < 3; round++) {
        const fe = TestFrontend.connect(fx.socketPath, { numQueues: 2, configSize: 8 });
        await fe.realize();
        await fe.setConfig(4, new Uint8Array([round + 1, 0, 0, 0]));
        const cfg = await fe.getConfig(0, 8);
        expect(cfg[4]).to.equal(round + 1);
        fe.close();
        await until(() => !fx.backend.connected, 'disconnect');
      }
      expect(fx.backend.counters.connections).to.equal(3);
      expect(device.events.filter((e) => e === 'detach')).to.have.length(3);
      expect(fx.backend.counters.messages.get('GET_FEATURES')).to.be.greaterThan(0);
    } finally {
      fx.close();
    }
  });

  it('refuses a second front-end while one is connected, without disturbing the first', async () => {
    const device = new EchoDevice({ numQueues: 1 });
    const fx = startBackend(device);
    const fe = TestFrontend.connect(fx.socketPath, { numQueues: 1, configSize: 8 });
    try {
      await fe.realize();
      const second = TestFrontend.connect(fx.socketPath, { numQueues: 1, configSize: 8 });
      await second.closed;
      second.close();
      expect(fx.backend.counters.rejectedConnections).to.equal(1);
      expect(await fe.requestU64(FrontendRequest.GET_FEATURES)).to.be.a('bigint');
    } finally {
      fe.close();
      fx.close();
    }
  });

  it('refused front-ends are all counted but logged once a minute, not once each', async () => {
    const fdsBefore = fdCount();
    const fx = startBackend(new EchoDevice({ numQueues: 1 }));
    const fe = TestFrontend.connect(fx.socketPath, { numQueues: 1, configSize: 8 });
    try {
      await fe.realize();
      for (let i = 0; i < 50; i++) {
        const fd = native.connect(fx.socketPath);
        await until(() => fx.backend.counters.rejectedConnections === i + 1, `refusal ${i + 1}`);
        native.close(fd);
      }
      expect(fx.log.find('refusing a second front-end', 'warn')).to.have.length(1);
      expect(await fe.requestU64(FrontendRequest.GET_FEATURES)).to.be.a('bigint');
    } finally {
      await hangUp(fe, fx);
    }
    expect(fdCount()).to.equal(fdsBefore);
  });

  it("a second back-end on a live socket path is refused and leaves the first one's socket serving", async () => {
    const fx = startBackend(new EchoDevice({ numQueues: 1 }));
    const second = new VhostUserBackend(new EchoDevice({ numQueues: 1 }), { log: new MemoryLogger() });
    // This used to unlink the live socket (new front-ends then got ENOENT) and take its place.
    expect(() => second.listen(fx.socketPath))
      .to.throw(/in use by another process/)
      .with.property('code', 'ERR_SOCKET');
    second.close();
    const fe = TestFrontend.connect(fx.socketPath, { numQueues: 1, configSize: 8 });
    await fe.realize();
    expect(fx.backend.connected).to.equal(true);
    await hangUp(fe, fx);
  });

  it('a stale socket file (nobody listening) is replaced', async () => {
    const dir = tmpDir();
    const socketPath = path.join(dir, 'stale.sock');
    native.close(native.listen(socketPath, 1)); // the file stays, nobody listens
    const fx = startBackend(new EchoDevice({ numQueues: 1 }), {}, socketPath);
    const fe = TestFrontend.connect(socketPath, { numQueues: 1, configSize: 8 });
    await fe.realize();
    await hangUp(fe, fx);
    fs.rmSync(dir, { recursive: true, force: true });
  });
});
