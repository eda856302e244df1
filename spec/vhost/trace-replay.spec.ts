/**
 * Replays the two message traces recorded from a real QEMU 11.1 against the back-end over a real
 * unix socket, and checks every reply the way QEMU does (flags 0x5, request id, sizes, values).
 */
import { expect } from 'chai';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { native } from '../../lib/native';
import { EchoDevice } from '../../lib/testing/echo-device';
import { TestFrontend } from '../../lib/testing/frontend';
import { parseTrace, replayTrace } from '../../lib/testing/trace';
import {
  MAX_MEM_SLOTS,
  protocolBit,
  ProtocolFeature,
  SUPPORTED_PROTOCOL_FEATURES,
  VHOST_USER_F_PROTOCOL_FEATURES,
  VIRTIO_F_VERSION_1,
} from '../../lib/vhost/constants';
import { fdCount, hangUp, startBackend } from '../helpers';

// Kept in the repository (recorded from QEMU 11.1; copies of shared/reference/traces), so that
// `npm test` passes on any clone. dist/spec/vhost -> spec/fixtures/qemu-traces.
const TRACES = path.resolve(__dirname, '..', '..', '..', 'spec', 'fixtures', 'qemu-traces');
// Balloon features the trace's back-end offered: VERSION_1 | STATS_VQ | MUST_TELL_HOST.
const FEATURES = VIRTIO_F_VERSION_1 | 0b11n;

const traces = [
  { file: 'qemu-11.1-full-protocol-features.txt', protocol: SUPPORTED_PROTOCOL_FEATURES },
  { file: 'qemu-11.1-minimal-protocol-features.txt', protocol: protocolBit(ProtocolFeature.CONFIG) },
];

describe('QEMU 11.1 trace replay (real socket)', () => {
  for (const t of traces) {
    it(t.file, async () => {
      const entries = parseTrace(fs.readFileSync(path.join(TRACES, t.file), 'utf8'));
      expect(entries.length).to.be.greaterThan(40);
      const fdsBefore = fdCount();
      const device = new EchoDevice({ numQueues: 4, configSize: 8, features: FEATURES });
      device.config.set([0x00, 0x10, 0, 0, 0x00, 0x08, 0, 0]);
      const fx = startBackend(device, { protocolFeatures: t.protocol });
      // 1 GiB guest, laid out and addressed as in the trace.
      const fe = TestFrontend.connect(fx.socketPath, {
        numQueues: 4,
        configSize: 8,
        ramBytes: 1 << 30,
        userBase: 0x7f7eb7fff000,
      });
      try {
        const checks = await replayTrace(entries, fe, {
          features: FEATURES | VHOST_USER_F_PROTOCOL_FEATURES,
          protocolFeatures: t.protocol,
          numQueues: 4,
          maxMemSlots: BigInt(MAX_MEM_SLOTS),
          // The guest driver puts its stats buffer on queue 2 before kicking, as Linux does.
          beforeKick: (d) => {
            if (d.index === 2) d.addBuffer([{ addr: fe.ram.alloc(160), len: 160 }]);
          },
        });
        const replies = entries.filter((e) => e.name.startsWith('GET_') || (e.flags & 0x8) !== 0).length;
        expect(checks).to.have.length(replies);
        expect(checks.find((c) => c.name === 'GET_CONFIG')?.reply).to.equal('config 0010000000080000');
        expect(checks.filter((c) => c.name === 'GET_VRING_BASE').map((c) => c.reply)).to.deep.equal([
          '(0, 0)',
          '(1, 0)',
          '(2, 1)',
        ]);
        // Queues 0-2 ran; queue 3 was enabled but never started, so the device never saw it.
        expect(device.events).to.include.members([
          'ready 0',
          'ready 1',
          'ready 2',
          'stopped 0',
          'stopped 1',
          'stopped 2',
        ]);
        expect(device.events).to.not.include('ready 3');
        expect(device.acked).to.equal(0x100000003n);
        expect(device.chains.filter((c) => c.queue === 2)).to.have.length(1);
        expect(fx.backend.counters.errors.size).to.equal(0);
        expect(fx.backend.connected).to.equal(true);
      } finally {
        await hangUp(fe, fx);
      }
      expect(native.mappingCount()).to.equal(0);
      expect(fdCount()).to.equal(fdsBefore);
    });
  }
});
