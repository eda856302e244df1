/**
 * Connection-level faults a front-end can cause, over real unix sockets and descriptors, each
 * with a bystander back-end (a second VM) whose front-end must not notice: descriptors of
 * messages that arrive behind a failing one, replies to a peer that already left, a malformed
 * ack on the back-end channel, and peers that stall. Each case here leaked descriptors or held a
 * VM's slot forever before the fix that goes with it (issue 15).
 */
import { expect } from 'chai';
import { ErrorCode } from '../../lib/errors';
import { native } from '../../lib/native';
import { EchoDevice } from '../../lib/testing/echo-device';
import { TestFrontend } from '../../lib/testing/frontend';
import { encodeHeader, encodeMessage, encodeReply } from '../../lib/vhost/codec';
import { BackendRequest, FrontendRequest, VHOST_USER_REPLY_FLAGS } from '../../lib/vhost/constants';
import { BackendOptions } from '../../lib/vhost/server';
import { BackendFixture, fdCount, startBackend, until } from '../helpers';

interface Pair {
  victim: BackendFixture;
  victimDevice: EchoDevice;
  bystander: BackendFixture;
  good: TestFrontend;
}

async function pair(options: Partial<BackendOptions> = {}): Promise<Pair> {
  const victimDevice = new EchoDevice({ numQueues: 2 });
  const victim = startBackend(victimDevice, options);
  const bystander = startBackend(new EchoDevice({ numQueues: 1 }));
  const good = TestFrontend.connect(bystander.socketPath, { numQueues: 1, configSize: 8 });
  await good.realize();
  return { victim, victimDevice, bystander, good };
}

async function close(p: Pair): Promise<void> {
  // The bystander noticed nothing: it still answers.
  expect(await p.good.requestU64(FrontendRequest.GET_FEATURES)).to.be.a('bigint');
  p.good.close();
  await until(() => !p.bystander.backend.connected, 'bystander disconnect');
  await until(() => !p.victim.backend.connected, 'victim disconnect');
  p.victim.close();
  p.bystander.close();
}

describe('front-end connection faults (real sockets, with a bystander VM)', () => {
  let fdsBefore: number;
  beforeEach(() => {
    fdsBefore = fdCount();
  });
  afterEach(() => {
    expect(native.mappingCount(), 'mappings leaked').to.equal(0);
    expect(fdCount(), 'descriptors leaked').to.equal(fdsBefore);
  });

  it('a reply to a peer that already left does not leak the descriptors of the messages behind it', async () => {
    // One write carries GET_FEATURES (which needs a reply) and SET_VRING_CALL with an eventfd; the
    // front-end hangs up before the back-end reads. The reply fails (EPIPE) in the middle of the
    // batch; SET_VRING_CALL's eventfd used to stay open, once per connection.
    const p = await pair();
    const rounds = 100;
    for (let i = 0; i < rounds; i++) {
      const fd = native.connect(p.victim.socketPath);
      const efd = native.eventfd(0, true);
      const bytes = new Uint8Array([
        ...encodeMessage(FrontendRequest.GET_FEATURES, 1, { kind: 'none' }),
        ...encodeMessage(FrontendRequest.SET_VRING_CALL, 1, { kind: 'vring-fd', index: 0, noFd: false }),
      ]);
      native.sendmsg(fd, bytes, [efd]);
      native.close(efd);
      native.close(fd);
      await until(() => p.victim.backend.counters.connections === i + 1, `connection ${i + 1} accepted`);
      await until(() => !p.victim.backend.connected, `connection ${i + 1} closed`);
    }
    expect(p.victim.backend.counters.error(ErrorCode.SOCKET)).to.equal(rounds);
    await close(p);
  });

  it('a malformed ack on the back-end channel closes that channel and the descriptors behind it', async () => {
    const p = await pair();
    const fe = TestFrontend.connect(p.victim.socketPath, { numQueues: 2, configSize: 8 });
    await fe.realize();
    fe.ackConfigChanges = false;
    // A config change that asks for an ack (REPLY_ACK), which the test answers itself, badly:
    // an ack of 4 bytes instead of 8, then another message carrying an eventfd, in one write.
    p.victimDevice.host!.notifyConfigChange();
    await fe.start(0n, [0]);
    await fe.waitConfigChange(1);
    const efd = native.eventfd(0, true);
    const malformed = encodeHeader({
      request: BackendRequest.CONFIG_CHANGE_MSG,
      flags: VHOST_USER_REPLY_FLAGS,
      size: 4,
    });
    const bytes = new Uint8Array([
      ...malformed,
      0,
      0,
      0,
      0,
      ...encodeReply(BackendRequest.CONFIG_CHANGE_MSG, { kind: 'u64', value: 0n }),
    ]);
    fe.sendOnBackendChannel(bytes, [efd]);
    native.close(efd);
    await until(() => p.victim.backend.counters.error(ErrorCode.VHOST_BAD_MESSAGE) === 1, 'the malformed ack counted');
    // The main connection keeps working.
    expect(await fe.requestU64(FrontendRequest.GET_FEATURES)).to.be.a('bigint');
    fe.close();
    await close(p);
  });

  it('a peer stalled in the middle of a message is dropped, and the VM slot serves the next front-end', async () => {
    const p = await pair({ stalledMessageTimeoutMs: 200 });
    const fe = TestFrontend.connect(p.victim.socketPath, { numQueues: 2, configSize: 8 });
    await fe.realize();
    // Half a header, then nothing.
    fe.sendRaw(encodeHeader({ request: FrontendRequest.GET_FEATURES, flags: 1, size: 0 }).subarray(0, 6));
    const why = await fe.closed;
    expect(why?.message ?? 'closed by the back-end').to.be.a('string');
    await until(() => !p.victim.backend.connected, 'stalled peer dropped');
    expect(p.victim.backend.counters.error(ErrorCode.VHOST_BAD_MESSAGE)).to.equal(1);
    expect(p.victim.log.find('front-end connection closed on error', 'error')[0]?.fields['error']).to.match(/stalled/);
    fe.close(); // its guest RAM
    const next = TestFrontend.connect(p.victim.socketPath, { numQueues: 2, configSize: 8 });
    await next.realize();
    next.close();
    await close(p);
  });

  it('a peer that connects and sends nothing is dropped after the first-message timeout', async () => {
    const p = await pair({ firstMessageTimeoutMs: 200 });
    const fd = native.connect(p.victim.socketPath);
    await until(() => p.victim.backend.counters.connections === 1, 'accepted');
    await until(() => !p.victim.backend.connected, 'silent peer dropped');
    native.close(fd);
    const next = TestFrontend.connect(p.victim.socketPath, { numQueues: 2, configSize: 8 });
    await next.realize();
    next.close();
    await close(p);
  });
});
