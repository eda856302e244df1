/**
 * Protocol state machine behaviour over a real socket: ring states, memory table replacement,
 * config change queueing, the back-end channel, broken guest rings, reset and status.
 */
import { expect } from 'chai';
import { ErrorCode } from '../../lib/errors';
import { native, PollHandle, POLL_READABLE } from '../../lib/native';
import { EchoDevice } from '../../lib/testing/echo-device';
import { TestFrontend } from '../../lib/testing/frontend';
import { ACK_SAMPLE_INTERVAL_MS } from '../../lib/vhost/backend-channel';
import {
  FrontendRequest,
  protocolBit,
  ProtocolFeature,
  SUPPORTED_PROTOCOL_FEATURES,
  VIRTIO_F_VERSION_1,
  VIRTIO_RING_F_EVENT_IDX,
} from '../../lib/vhost/constants';
import { fdCount, startBackend, tick, until, BackendFixture } from '../helpers';

const FEATURES = VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX;

describe('vhost-user session state machine', () => {
  let fx: BackendFixture;
  let device: EchoDevice;
  let fe: TestFrontend;
  let fdsBefore: number;

  beforeEach(() => {
    fdsBefore = fdCount();
    device = new EchoDevice({ numQueues: 4 });
    fx = startBackend(device);
  });
  afterEach(async () => {
    fe?.close();
    await until(() => !fx.backend.connected, 'disconnect');
    fx.close();
    expect(native.mappingCount()).to.equal(0);
    expect(fdCount(), 'descriptors leaked').to.equal(fdsBefore);
  });

  it('offers exactly the documented protocol features, never INBAND_NOTIFICATIONS', async () => {
    fe = TestFrontend.connect(fx.socketPath, { numQueues: 4, configSize: 8 });
    await fe.realize();
    expect(fe.backendProtocolFeatures).to.equal(SUPPORTED_PROTOCOL_FEATURES);
    expect(fe.backendProtocolFeatures & protocolBit(ProtocolFeature.INBAND_NOTIFICATIONS)).to.equal(0n);
    expect(fe.backendFeatures & (1n << 30n)).to.equal(1n << 30n);
  });

  it('does not lose the kick QEMU 11.1 injects before SET_VRING_ENABLE', async () => {
    fe = TestFrontend.connect(fx.socketPath, { numQueues: 4, configSize: 8 });
    await fe.realize();
    // Put a buffer on queue 0 before the ring even starts: the injected kick and the
    // enable-time pass must both find it.
    const drivers = await fe.start(FEATURES, [0]);
    const d = drivers.get(0)!;
    d.addBuffer([{ addr: fe.ram.alloc(8), len: 8 }]);
    d.kick();
    await d.waitUsed(1);
    // A buffer added while the ring is disabled (no kick processed) is served on enable.
    await fe.requestU64(FrontendRequest.SET_VRING_ENABLE, { kind: 'vring-state', index: 0, num: 0 });
    d.addBuffer([{ addr: fe.ram.alloc(8), len: 8 }]);
    d.kick();
    await tick(20);
    expect(d.usedIdx).to.equal(1);
    await fe.requestU64(FrontendRequest.SET_VRING_ENABLE, { kind: 'vring-state', index: 0, num: 1 });
    await d.waitUsed(1);
  });

  it('enables rings at once when SET_FEATURES comes without bit 30', async () => {
    fe = TestFrontend.connect(fx.socketPath, { numQueues: 4, configSize: 8 });
    await fe.realize();
    await fe.start(FEATURES, [1]);
    await fe.requestU64(FrontendRequest.SET_VRING_ENABLE, { kind: 'vring-state', index: 1, num: 0 });
    expect(device.ready.has(1)).to.equal(false);
    await fe.request(FrontendRequest.SET_FEATURES, { kind: 'u64', value: FEATURES });
    await fe.requestU64(FrontendRequest.GET_FEATURES);
    expect(device.ready.has(1)).to.equal(true);
  });

  it('replaces the memory table while running: rings re-translated, old mappings unmapped', async () => {
    fe = TestFrontend.connect(fx.socketPath, {
      numQueues: 4,
      configSize: 8,
      protocolMask: SUPPORTED_PROTOCOL_FEATURES & ~protocolBit(ProtocolFeature.CONFIGURE_MEM_SLOTS),
    });
    await fe.realize();
    const drivers = await fe.start(FEATURES, [0]);
    const mapsRunning = native.mappingCount();
    const session = fx.backend.current!;
    const before = session.memory.regionList;
    await fe.sendMemory(); // same regions again, new fds
    expect(session.memory.regionList).to.not.equal(before);
    expect(before.every((r) => !r.isMapped)).to.equal(true);
    expect(native.mappingCount()).to.equal(mapsRunning);
    const d = drivers.get(0)!;
    d.addBuffer([{ addr: fe.ram.alloc(8), len: 8 }]);
    d.kick();
    await d.waitUsed(1);
  });

  it('adds and removes memory regions (CONFIGURE_MEM_SLOTS)', async () => {
    fe = TestFrontend.connect(fx.socketPath, { numQueues: 4, configSize: 8 });
    await fe.realize();
    expect(fe.has(ProtocolFeature.CONFIGURE_MEM_SLOTS)).to.equal(true);
    expect(await fe.requestU64(FrontendRequest.GET_MAX_MEM_SLOTS)).to.equal(509n);
    await fe.sendMemory();
    const session = fx.backend.current!;
    expect(session.memory.regionList).to.have.length(2);
    await fe.requestU64(FrontendRequest.REM_MEM_REG, { kind: 'mem-region', region: fe.ram.regions[0] });
    expect(session.memory.regionList).to.have.length(1);
    await fe.requestU64(FrontendRequest.ADD_MEM_REG, { kind: 'mem-region', region: fe.ram.regions[0] }, [fe.ram.fd]);
    expect(session.memory.regionList).to.have.length(2);
  });

  it('queues CONFIG_CHANGE_MSG until a ring runs, then sends it with REPLY_ACK', async () => {
    fe = TestFrontend.connect(fx.socketPath, { numQueues: 4, configSize: 8 });
    await fe.realize();
    device.host!.notifyConfigChange();
    await tick(20);
    expect(fe.configChanges).to.equal(0); // suspended device: nothing sent
    await fe.start(FEATURES, [0]);
    await fe.waitConfigChange(1);
    device.host!.notifyConfigChange();
    await fe.waitConfigChange(2);
  });

  it('asks for an ack on a config change at most once a second: a pressure burst costs QEMU no replies', async () => {
    fe = TestFrontend.connect(fx.socketPath, { numQueues: 4, configSize: 8 });
    await fe.realize();
    await fe.start(FEATURES, [0]);
    // Bounded: 20 changes.
    for (let i = 0; i < 20; i++) {
      device.host!.notifyConfigChange();
      await fe.waitConfigChange(i + 1);
    }
    expect(fe.configChangeAcksAsked).to.equal(1);
    await until(() => fx.backend.current!.image().channelPendingAcks === 0, 'the one ack asked for arrived');
    await tick(ACK_SAMPLE_INTERVAL_MS + 50);
    device.host!.notifyConfigChange();
    await fe.waitConfigChange(21);
    expect(fe.configChangeAcksAsked).to.equal(2);
  });

  it('GET_CONFIG replies 12 + size bytes; SET_CONFIG changes only writable bytes', async () => {
    fe = TestFrontend.connect(fx.socketPath, { numQueues: 4, configSize: 8 });
    await fe.realize();
    device.config.set([1, 2, 3, 4, 0, 0, 0, 0]);
    await fe.setConfig(0, new Uint8Array([9, 9, 9, 9, 5, 6, 7, 8]));
    expect([...(await fe.getConfig(0, 8))]).to.deep.equal([1, 2, 3, 4, 5, 6, 7, 8]);
    expect([...(await fe.getConfig(5, 1))]).to.deep.equal([6]);
    await fe.setConfig(4, new Uint8Array([0xaa])); // byte-wise write
    expect((await fe.getConfig(4, 1))[0]).to.equal(0xaa);
  });

  it('GET_VRING_BASE stops the ring and returns the next avail index; restart resumes', async () => {
    fe = TestFrontend.connect(fx.socketPath, { numQueues: 4, configSize: 8 });
    await fe.realize();
    const drivers = await fe.start(FEATURES, [0]);
    const d = drivers.get(0)!;
    for (let i = 0; i < 3; i++) d.addBuffer([{ addr: fe.ram.alloc(8), len: 8 }]);
    d.kick();
    await d.waitUsed(3);
    const bases = await fe.stop();
    expect(bases.get(0)).to.equal(3);
    expect(device.ready.size).to.equal(0);
    await fe.requestU64(FrontendRequest.GET_FEATURES); // SET_STATUS has no reply: sync
    // SET_STATUS(0) alone is no reset (QEMUs before 11.1 send it on every QMP stop too).
    expect(device.resets).to.equal(0);
    // A kick while stopped is ignored.
    d.addBuffer([{ addr: fe.ram.alloc(8), len: 8 }]);
    d.kick();
    await tick(20);
    expect(d.usedIdx).to.equal(3);
    // Resumed at the base we returned (QMP cont): still no reset, and the pending buffer is served.
    await fe.resume(FEATURES, bases);
    await d.waitUsed(1);
    expect(d.usedIdx).to.equal(4);
    expect(device.resets).to.equal(0);
  });

  it('a ring restarting elsewhere than it stopped is a device reset (once); at its base it is a resume', async () => {
    fe = TestFrontend.connect(fx.socketPath, { numQueues: 4, configSize: 8 });
    await fe.realize();
    const d = (await fe.start(FEATURES, [0, 1])).get(0)!;
    for (let i = 0; i < 2; i++) d.addBuffer([{ addr: fe.ram.alloc(8), len: 8 }]);
    d.kick();
    await d.waitUsed(2);
    const bases = await fe.pause();
    expect([...bases]).to.deep.equal([
      [0, 2],
      [1, 0],
    ]);
    // What QEMU 11.1 sends after a guest reset: the same messages as a resume, every base 0.
    await fe.request(FrontendRequest.SET_VRING_BASE, { kind: 'vring-state', index: 0, num: 0 });
    await fe.request(FrontendRequest.SET_VRING_BASE, { kind: 'vring-state', index: 1, num: 0 });
    await fe.requestU64(FrontendRequest.GET_FEATURES); // sync
    expect(device.resets).to.equal(1);
  });

  it('a broken guest ring stops only that queue and signals its error fd', async () => {
    fe = TestFrontend.connect(fx.socketPath, { numQueues: 4, configSize: 8 });
    await fe.realize();
    // Watch the err fd of queue 0 that realize() sent.
    const errFd = fe.errFdOf(0);
    let errSignals = 0;
    const watch: PollHandle = native.pollStart(errFd, POLL_READABLE, () => {
      if (native.eventfdRead(errFd) !== null) errSignals++;
    });
    try {
      const drivers = await fe.start(FEATURES, [0, 1]);
      const d0 = drivers.get(0)!;
      const d1 = drivers.get(1)!;
      d0.setAvailIdx(1000); // avail index jumps by more than the queue size
      d0.kick();
      await until(() => !device.ready.has(0), 'queue 0 stopped');
      await until(() => errSignals === 1, 'error fd signalled');
      expect(fx.backend.counters.error(ErrorCode.VIRTQ_BROKEN_RING)).to.equal(1);
      expect(fx.log.find('guest ring is broken', 'error')).to.have.length(1);
      expect(fx.backend.connected).to.equal(true);
      d1.addBuffer([{ addr: fe.ram.alloc(8), len: 8 }]);
      d1.kick();
      await d1.waitUsed(1);
    } finally {
      native.pollStop(watch);
    }
  });

  it('a follow-up pass runs inside the session: a throw there stops only that ring', async () => {
    // The device says "more work" after its first pass on queue 0 and throws in the pass the
    // session schedules next. That pass used to be the device's own setImmediate, outside any
    // error handling: the throw ended the process (every VM).
    let passes = 0;
    const original = device.queueKicked.bind(device);
    device.queueKicked = (vring) => {
      if (vring.index !== 0) return original(vring);
      passes++;
      if (passes === 1) return true;
      throw new Error('device bug in a follow-up pass');
    };
    fe = TestFrontend.connect(fx.socketPath, { numQueues: 4, configSize: 8 });
    await fe.realize();
    const drivers = await fe.start(FEATURES, [0, 1]);
    await until(() => !device.ready.has(0), 'queue 0 stopped');
    expect(passes).to.equal(2);
    expect(fx.backend.counters.error(ErrorCode.VIRTQ_BROKEN_RING)).to.equal(1);
    expect(String(fx.log.find('guest ring is broken', 'error')[0]?.fields['error'])).to.match(/follow-up pass/);
    const d1 = drivers.get(1)!;
    d1.addBuffer([{ addr: fe.ram.alloc(8), len: 8 }]);
    d1.kick();
    await d1.waitUsed(1);
    expect(fx.backend.connected).to.equal(true);
  });

  it('accepts more queues than the device has (a generic num_vqs); the extra rings never reach it', async () => {
    // QEMU's generic device sets up num_vqs rings; this used to fail its realize at SET_VRING_CALL.
    fe = TestFrontend.connect(fx.socketPath, { numQueues: 7, configSize: 8 });
    await fe.realize();
    expect(fe.backendQueueNum).to.equal(4n);
    const drivers = await fe.start(FEATURES, [0, 5, 6]);
    await until(() => device.ready.has(0), 'queue 0 ready');
    const d0 = drivers.get(0)!;
    d0.addBuffer([{ addr: fe.ram.alloc(8), len: 8 }]);
    d0.kick();
    await d0.waitUsed(1);
    const extra = drivers.get(5)!;
    extra.addBuffer([{ addr: fe.ram.alloc(8), len: 8 }]);
    extra.kick();
    expect(await fe.requestU64(FrontendRequest.GET_FEATURES)).to.be.a('bigint'); // a barrier
    expect([...device.ready.keys()]).to.deep.equal([0]);
    expect(extra.usedIdx).to.equal(0);
    expect(fx.log.find('fewer queues', 'error')).to.have.length(0);
  });

  it('fewer queues than the negotiated features need: one clear error in the log', async () => {
    fe = TestFrontend.connect(fx.socketPath, { numQueues: 2, configSize: 8 });
    await fe.realize();
    await fe.start(FEATURES, [0]);
    const logged = fx.log.find('the front-end has fewer queues than the device needs', 'error');
    expect(logged).to.have.length(1);
    expect(logged[0]?.fields).to.include({ frontendQueues: 2, neededQueues: 4 });
    expect(fx.backend.connected).to.equal(true);
  });

  it('a malformed chain is returned with length 0 and the queue keeps going', async () => {
    fe = TestFrontend.connect(fx.socketPath, { numQueues: 4, configSize: 8 });
    await fe.realize();
    const d = (await fe.start(FEATURES, [0])).get(0)!;
    d.writeDescriptor(63, { addr: 0xa0000, len: 8, flags: 0, next: 0 });
    d.publish(63);
    d.addBuffer([{ addr: fe.ram.alloc(8), len: 8 }]);
    d.kick();
    const used = await d.waitUsed(2);
    expect(used[0]).to.deep.equal({ id: 63, len: 0 });
    expect(device.badChains).to.have.length(1);
    expect(device.badChains[0].error.code).to.equal(ErrorCode.VIRTQ_BAD_CHAIN);
  });

  it('supports "no fd" kick (polled) and call (no interrupt)', async () => {
    fe = TestFrontend.connect(fx.socketPath, { numQueues: 4, configSize: 8 });
    await fe.realize();
    const d = (await fe.start(FEATURES, [0])).get(0)!;
    await fe.requestU64(FrontendRequest.SET_VRING_CALL, { kind: 'vring-fd', index: 0, noFd: true });
    // GET_VRING_BASE answers a vring-state (not a u64): only wait for it.
    const stopped = await fe.request(FrontendRequest.GET_VRING_BASE, { kind: 'vring-state', index: 0, num: 0 });
    expect(stopped?.payload.length).to.equal(8);
    await fe.requestU64(FrontendRequest.SET_VRING_KICK, { kind: 'vring-fd', index: 0, noFd: true });
    d.addBuffer([{ addr: fe.ram.alloc(8), len: 8 }]); // no kick at all
    await until(() => d.usedIdx === 1, 'polled ring served');
    expect(d.interrupts).to.equal(0);
  });

  it('RESET_DEVICE stops every ring and resets the device', async () => {
    fe = TestFrontend.connect(fx.socketPath, { numQueues: 4, configSize: 8 });
    await fe.realize();
    await fe.start(FEATURES, [0, 1]);
    expect(device.ready.size).to.be.greaterThan(0);
    await fe.request(FrontendRequest.RESET_DEVICE);
    await fe.requestU64(FrontendRequest.GET_FEATURES);
    expect(device.ready.size).to.equal(0);
    expect(device.resets).to.equal(1);
  });

  it("without REPLY_ACK, answers QEMU's GET_FEATURES barriers and sends no acks", async () => {
    fe = TestFrontend.connect(fx.socketPath, {
      numQueues: 4,
      configSize: 8,
      protocolMask: protocolBit(ProtocolFeature.CONFIG),
    });
    await fe.realize();
    const d = (await fe.start(FEATURES, [0])).get(0)!;
    d.addBuffer([{ addr: fe.ram.alloc(8), len: 8 }]);
    d.kick();
    await d.waitUsed(1);
    await fe.stop();
  });

  it('serves a front-end that resumes without negotiating (QEMU reconnect) with the features it had', async () => {
    fe = TestFrontend.connect(fx.socketPath, { numQueues: 4, configSize: 8 });
    // No GET_FEATURES / SET_PROTOCOL_FEATURES: straight to SET_FEATURES and a NEED_REPLY message.
    fe.protocolFeatures = SUPPORTED_PROTOCOL_FEATURES; // what the front-end believes it negotiated
    fe.backendFeatures = device.features() | (1n << 30n);
    const drivers = await fe.start(FEATURES, [0]);
    const d = drivers.get(0)!;
    d.addBuffer([{ addr: fe.ram.alloc(8), len: 8 }]);
    d.kick();
    await d.waitUsed(1);
    expect(fx.log.find('front-end resumed without negotiating', 'warn')).to.have.length(1);
  });
});
