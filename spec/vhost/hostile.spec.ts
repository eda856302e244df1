/**
 * Hostile front-end input over a real unix socket: every case is logged with a stable code, the
 * connection is closed, the process keeps running, a second back-end's connection is unaffected,
 * and no descriptor or mapping is leaked (counted in /proc/self/fd).
 */
import { expect } from 'chai';
import * as fs from 'node:fs';
import { ErrorCode } from '../../lib/errors';
import { native } from '../../lib/native';
import { EchoDevice } from '../../lib/testing/echo-device';
import { TestFrontend } from '../../lib/testing/frontend';
import { encodeHeader, encodeMessage, Payload } from '../../lib/vhost/codec';
import { FrontendRequest, MAX_PAYLOAD_BYTES, VIRTIO_F_VERSION_1 } from '../../lib/vhost/constants';
import { fdCount, startBackend, until } from '../helpers';

type Step = (fe: TestFrontend) => Promise<void> | void;

/** A descriptor that is not a socket or an eventfd (what a hostile front-end may send instead). */
function openNonSocket(what: 'a regular file' | 'a directory' | '/dev/null'): number {
  const file = what === 'a regular file' ? __filename : what === 'a directory' ? __dirname : '/dev/null';
  return fs.openSync(file, 'r');
}

const raw =
  (request: number, payload: Payload, fds: number[] = [], flags = 1): Step =>
  (fe) =>
    fe.sendRaw(encodeMessage(request, flags, payload), fds);
const region = (gpa: bigint, size: bigint, uaddr: bigint, off = 0n) => ({
  guestPhysAddr: gpa,
  sizeBytes: size,
  userAddr: uaddr,
  mmapOffset: off,
});

/** realize + memory, then `step`; the connection must close with `code`. */
const cases: Array<{ name: string; code: string; realize?: boolean; memory?: boolean; step: Step }> = [
  {
    name: 'truncated header at end of stream',
    code: ErrorCode.VHOST_BAD_MESSAGE,
    step: (fe) => fe.sendRaw(new Uint8Array([1, 0, 0, 0, 1, 0, 0])),
  },
  {
    name: 'wrong version bits',
    code: ErrorCode.VHOST_BAD_MESSAGE,
    step: raw(FrontendRequest.GET_FEATURES, { kind: 'none' }, [], 0x2),
  },
  {
    name: 'size larger than the maximum',
    code: ErrorCode.VHOST_MESSAGE_TOO_LARGE,
    step: (fe) => fe.sendRaw(encodeHeader({ request: 5, flags: 1, size: MAX_PAYLOAD_BYTES + 1 })),
  },
  { name: 'unknown request', code: ErrorCode.VHOST_UNKNOWN_REQUEST, step: raw(77, { kind: 'none' }) },
  {
    name: 'missing fd',
    code: ErrorCode.VHOST_BAD_FDS,
    step: raw(FrontendRequest.SET_VRING_CALL, { kind: 'vring-fd', index: 0, noFd: false }),
  },
  {
    name: 'extra fds',
    code: ErrorCode.VHOST_BAD_FDS,
    step: (fe) => {
      const efd = native.eventfd(0, true);
      fe.sendRaw(encodeMessage(FrontendRequest.GET_FEATURES, 1, { kind: 'none' }), [efd, efd]);
      native.close(efd);
    },
  },
  {
    name: 'more than 8 fds',
    code: ErrorCode.VHOST_BAD_FDS,
    step: (fe) => {
      const efd = native.eventfd(0, true);
      fe.sendRaw(encodeMessage(FrontendRequest.SET_OWNER, 1, { kind: 'none' }), Array(12).fill(efd));
      native.close(efd);
    },
  },
  {
    name: 'overlapping regions',
    code: ErrorCode.VHOST_BAD_MEMORY,
    step: (fe) =>
      raw(
        FrontendRequest.SET_MEM_TABLE,
        { kind: 'mem-table', regions: [region(0n, 0x200000n, 0x10000000n), region(0x100000n, 0x200000n, 0x20000000n)] },
        [fe.ram.fd, fe.ram.fd],
      )(fe),
  },
  {
    name: 'wrapping region',
    code: ErrorCode.VHOST_BAD_MEMORY,
    step: (fe) =>
      raw(
        FrontendRequest.SET_MEM_TABLE,
        { kind: 'mem-table', regions: [region(0xfffffffffff00000n, 0x200000n, 0x10000000n)] },
        [fe.ram.fd],
      )(fe),
  },
  {
    name: 'region past the end of its file',
    code: ErrorCode.VHOST_BAD_MEMORY,
    step: (fe) =>
      void raw(FrontendRequest.SET_MEM_TABLE, { kind: 'mem-table', regions: [region(0n, 0x10000000n, 0x10000000n)] }, [
        fe.ram.fd,
      ])(fe),
  },
  {
    name: 'mmap of a region that fails (an eventfd as memory)',
    code: ErrorCode.VHOST_BAD_MEMORY,
    step: (fe) => {
      const efd = native.eventfd(0, true);
      void raw(FrontendRequest.SET_MEM_TABLE, { kind: 'mem-table', regions: [region(0n, 0x1000n, 0x10000000n)] }, [
        efd,
      ])(fe);
      native.close(efd);
    },
  },
  {
    name: 'ring addresses outside memory',
    code: ErrorCode.VHOST_BAD_VRING,
    memory: true,
    step: async (fe) => {
      await fe.request(FrontendRequest.SET_VRING_NUM, { kind: 'vring-state', index: 0, num: 64 });
      void raw(FrontendRequest.SET_VRING_ADDR, {
        kind: 'vring-addr',
        index: 0,
        flags: 0,
        desc: 0x1000n,
        used: 0x2000n,
        avail: 0x3000n,
        log: 0n,
      })(fe);
    },
  },
  {
    name: 'queue index out of range (64 rings at most, whatever num_vqs says)',
    code: ErrorCode.VHOST_BAD_VRING,
    step: raw(FrontendRequest.SET_VRING_NUM, { kind: 'vring-state', index: 64, num: 64 }),
  },
  {
    name: 'vring fd index out of range',
    code: ErrorCode.VHOST_BAD_VRING,
    step: raw(FrontendRequest.SET_VRING_ERR, { kind: 'vring-fd', index: 200, noFd: true }),
  },
  ...(
    [
      ['kick', FrontendRequest.SET_VRING_KICK],
      ['call', FrontendRequest.SET_VRING_CALL],
      ['err', FrontendRequest.SET_VRING_ERR],
    ] as const
  ).map(([role, request]) => ({
    // The eventfd used to leak: taken from the message before the index was checked (found by
    // npm run fuzz).
    name: `${role} eventfd for a queue index out of range`,
    code: ErrorCode.VHOST_BAD_VRING,
    step: (fe: TestFrontend) => {
      const efd = native.eventfd(0, true);
      void raw(request, { kind: 'vring-fd', index: 200, noFd: false }, [efd])(fe);
      native.close(efd);
    },
  })),
  {
    name: 'vring size not a power of two',
    code: ErrorCode.VHOST_BAD_VRING,
    step: raw(FrontendRequest.SET_VRING_NUM, { kind: 'vring-state', index: 0, num: 100 }),
  },
  {
    name: 'vring size over 32768',
    code: ErrorCode.VHOST_BAD_VRING,
    step: raw(FrontendRequest.SET_VRING_NUM, { kind: 'vring-state', index: 0, num: 65536 }),
  },
  {
    name: 'vring size 0',
    code: ErrorCode.VHOST_BAD_VRING,
    step: raw(FrontendRequest.SET_VRING_NUM, { kind: 'vring-state', index: 0, num: 0 }),
  },
  {
    name: 'enable value other than 0/1',
    code: ErrorCode.VHOST_BAD_VRING,
    realize: true,
    step: raw(FrontendRequest.SET_VRING_ENABLE, { kind: 'vring-state', index: 0, num: 7 }),
  },
  {
    name: 'protocol features not offered',
    code: ErrorCode.VHOST_BAD_FEATURES,
    step: raw(FrontendRequest.SET_PROTOCOL_FEATURES, { kind: 'u64', value: 1n << 14n }),
  },
  {
    name: 'virtio features not offered',
    code: ErrorCode.VHOST_BAD_FEATURES,
    step: raw(FrontendRequest.SET_FEATURES, { kind: 'u64', value: 1n << 34n }),
  },
  {
    name: 'a request that needs an unnegotiated feature',
    code: ErrorCode.VHOST_NOT_NEGOTIATED,
    step: async (fe) => {
      await fe.requestU64(FrontendRequest.GET_FEATURES);
      await fe.request(FrontendRequest.SET_PROTOCOL_FEATURES, { kind: 'u64', value: 1n << 9n }); // CONFIG only
      void raw(FrontendRequest.GET_STATUS, { kind: 'none' })(fe);
    },
  },
  {
    name: 'an unsupported request',
    code: ErrorCode.VHOST_NOT_NEGOTIATED,
    realize: true,
    step: raw(FrontendRequest.SEND_RARP, { kind: 'u64', value: 0n }),
  },
  {
    name: 'config read outside the config space',
    code: ErrorCode.VHOST_BAD_CONFIG,
    realize: true,
    step: raw(FrontendRequest.GET_CONFIG, { kind: 'config', offset: 4, size: 8, flags: 0, data: new Uint8Array(8) }),
  },
  {
    name: 'removing a region that does not exist',
    code: ErrorCode.VHOST_BAD_MEMORY,
    realize: true,
    step: raw(FrontendRequest.REM_MEM_REG, { kind: 'mem-region', region: region(0x40000000n, 0x1000n, 0x1000n) }),
  },
  {
    name: 'adding a region that overlaps one in use',
    code: ErrorCode.VHOST_BAD_MEMORY,
    memory: true,
    step: (fe) =>
      raw(FrontendRequest.ADD_MEM_REG, { kind: 'mem-region', region: region(0x100000n, 0x1000n, 0x1000n) }, [
        fe.ram.fd,
      ])(fe),
  },
  ...(['a regular file', 'a directory', '/dev/null'] as const).map((what) => ({
    // Each used to leak the descriptor (300 tries: 41 -> 341 open fds).
    name: `SET_BACKEND_REQ_FD with ${what}`,
    code: ErrorCode.VHOST_BAD_FDS,
    realize: true,
    step: (fe: TestFrontend) => {
      const fd = openNonSocket(what);
      void raw(FrontendRequest.SET_BACKEND_REQ_FD, { kind: 'none' }, [fd])(fe);
      native.close(fd);
    },
  })),
  {
    // Used to be reported as a bad message.
    name: 'a kick fd that cannot be watched (a regular file)',
    code: ErrorCode.VHOST_BAD_VRING,
    realize: true,
    step: (fe) => {
      const fd = openNonSocket('a regular file');
      void raw(FrontendRequest.SET_VRING_KICK, { kind: 'vring-fd', index: 0, noFd: false }, [fd])(fe);
      native.close(fd);
    },
  },
];

describe('hostile front-end input (real socket)', () => {
  for (const c of cases) {
    it(c.name, async () => {
      const fdsBefore = fdCount();
      const mapsBefore = native.mappingCount();
      const victim = startBackend(new EchoDevice({ numQueues: 4 }));
      const bystander = startBackend(new EchoDevice({ numQueues: 1 }));
      const good = TestFrontend.connect(bystander.socketPath, { numQueues: 1, configSize: 8 });
      const fe = TestFrontend.connect(victim.socketPath, { numQueues: 4, configSize: 8 });
      try {
        await good.realize();
        if (c.realize || c.memory) await fe.realize();
        if (c.memory) {
          await fe.request(FrontendRequest.SET_FEATURES, { kind: 'u64', value: VIRTIO_F_VERSION_1 | (1n << 30n) });
          await fe.sendMemory();
        }
        await c.step(fe);
        if (c.name.startsWith('truncated')) fe.close();
        await fe.closed; // the back-end hung up
        await until(() => !victim.backend.connected, 'back-end to drop the connection');
        expect(
          victim.backend.counters.error(c.code),
          `error counted as ${c.code}: ${JSON.stringify([...victim.backend.counters.errors])}`,
        ).to.equal(1);
        const logged = victim.log.records.filter((r) => r.level === 'error' || r.level === 'warn');
        expect(logged.length, 'logged').to.be.greaterThan(0);
        // The other back-end's front-end still works.
        expect(await good.requestU64(FrontendRequest.GET_FEATURES)).to.be.a('bigint');
        // And the victim serves the next front-end.
        const next = TestFrontend.connect(victim.socketPath, { numQueues: 4, configSize: 8 });
        await next.realize();
        next.close();
        await until(() => !victim.backend.connected, 'second disconnect');
      } finally {
        fe.close();
        good.close();
        await until(() => !bystander.backend.connected, 'bystander disconnect');
        victim.close();
        bystander.close();
      }
      expect(native.mappingCount(), 'mappings leaked').to.equal(mapsBefore);
      expect(fdCount(), 'descriptors leaked').to.equal(fdsBefore);
    });
  }
});
