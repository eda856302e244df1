/* eslint-disable @typescript-eslint/no-unnecessary-type-assertion -- the `as` casts pin each arbitrary to the
   Payload union and each decoded message to its layout; fc.oneof and the property bodies need them */
import { expect } from 'chai';
import fc from 'fast-check';
import { ErrorCode, VhostProtocolError } from '../../lib/errors';
import {
  decodeHeader,
  decodeRequest,
  encodeMessage,
  FrontendMessage,
  Payload,
  REQUEST_SPECS,
  requestName,
} from '../../lib/vhost/codec';
import { FrontendRequest, HEADER_BYTES, MAX_PAYLOAD_BYTES } from '../../lib/vhost/constants';
import { FramingError, MessageReader } from '../../lib/vhost/framing';

function decodeBytes(bytes: Uint8Array, fds: number[] = []): FrontendMessage {
  const header = decodeHeader(bytes);
  return decodeRequest(header, bytes.subarray(HEADER_BYTES, HEADER_BYTES + header.size), fds);
}

const u64 = fc.bigInt({ min: 0n, max: (1n << 64n) - 1n });
const u32 = fc.nat({ max: 0xffffffff });
const region = fc.record({ guestPhysAddr: u64, sizeBytes: u64, userAddr: u64, mmapOffset: u64 });

/** Arbitrary valid (request, payload, fd count) triples for every layout. */
const validMessage: fc.Arbitrary<{ request: number; payload: Payload; fds: number }> = fc.oneof(
  fc
    .constantFrom(
      FrontendRequest.GET_FEATURES,
      FrontendRequest.SET_OWNER,
      FrontendRequest.GET_QUEUE_NUM,
      FrontendRequest.RESET_DEVICE,
    )
    .map((request) => ({ request, payload: { kind: 'none' } as Payload, fds: 0 })),
  fc
    .tuple(
      fc.constantFrom(FrontendRequest.SET_FEATURES, FrontendRequest.SET_PROTOCOL_FEATURES, FrontendRequest.SET_STATUS),
      u64,
    )
    .map(([request, value]) => ({ request, payload: { kind: 'u64', value } as Payload, fds: 0 })),
  fc
    .tuple(
      fc.constantFrom(
        FrontendRequest.SET_VRING_NUM,
        FrontendRequest.SET_VRING_BASE,
        FrontendRequest.GET_VRING_BASE,
        FrontendRequest.SET_VRING_ENABLE,
      ),
      u32,
      u32,
    )
    .map(([request, index, num]) => ({ request, payload: { kind: 'vring-state', index, num } as Payload, fds: 0 })),
  fc.record({ index: u32, flags: u32, desc: u64, used: u64, avail: u64, log: u64 }).map((a) => ({
    request: FrontendRequest.SET_VRING_ADDR,
    payload: { kind: 'vring-addr', ...a } as Payload,
    fds: 0,
  })),
  fc
    .tuple(
      fc.constantFrom(FrontendRequest.SET_VRING_KICK, FrontendRequest.SET_VRING_CALL, FrontendRequest.SET_VRING_ERR),
      fc.nat({ max: 255 }),
      fc.boolean(),
    )
    .map(([request, index, noFd]) => ({
      request,
      payload: { kind: 'vring-fd', index, noFd } as Payload,
      fds: noFd ? 0 : 1,
    })),
  fc.array(region, { minLength: 1, maxLength: 8 }).map((regions) => ({
    request: FrontendRequest.SET_MEM_TABLE,
    payload: { kind: 'mem-table', regions } as Payload,
    fds: regions.length,
  })),
  fc.tuple(fc.constantFrom(FrontendRequest.ADD_MEM_REG, FrontendRequest.REM_MEM_REG), region).map(([request, r]) => ({
    request,
    payload: { kind: 'mem-region', region: r } as Payload,
    fds: request === FrontendRequest.ADD_MEM_REG ? 1 : 0,
  })),
  fc
    .tuple(
      fc.constantFrom(FrontendRequest.GET_CONFIG, FrontendRequest.SET_CONFIG),
      u32,
      fc.nat({ max: 1 }),
      fc.uint8Array({ maxLength: 256 }),
    )
    .map(([request, offset, flags, data]) => ({
      request,
      payload: { kind: 'config', offset, size: data.length, flags, data } as Payload,
      fds: 0,
    })),
);

describe('vhost-user codec', () => {
  it('knows every front-end request 1-45 by name', () => {
    for (let id = 1; id <= 45; id++) {
      expect(REQUEST_SPECS.has(id), `request ${id}`).to.equal(true);
      expect(requestName(id)).to.equal(FrontendRequest[id]);
    }
    expect(requestName(46)).to.equal('UNKNOWN(46)');
  });

  it('decodes golden bytes of a QEMU SET_VRING_ADDR', () => {
    const bytes = Uint8Array.from(
      Buffer.from(
        '09000000010000002800000002000000000000000000f0b77e7f00000040f0b77e7f00000020f0b77e7f00000000000000000000',
        'hex',
      ),
    );
    const msg = decodeBytes(bytes);
    expect(msg.payload).to.deep.equal({
      kind: 'vring-addr',
      index: 2,
      flags: 0,
      desc: 0x7f7eb7f00000n,
      used: 0x7f7eb7f04000n,
      avail: 0x7f7eb7f02000n,
      log: 0n,
    });
  });

  it('property: decode(encode(x)) == x for every payload layout', () => {
    fc.assert(
      fc.property(validMessage, fc.constantFrom(0x1, 0x9), ({ request, payload, fds }, flags) => {
        const bytes = encodeMessage(request, flags, payload);
        const fdList = Array.from({ length: fds }, (_, i) => 100 + i);
        const msg = decodeBytes(bytes, fdList);
        expect(msg.request).to.equal(request);
        expect(msg.flags).to.equal(flags);
        expect(msg.payload).to.deep.equal(payload);
        expect(msg.fds).to.deep.equal(fdList);
      }),
      { numRuns: 2000 },
    );
  });

  it('property: random bytes never throw anything but a protocol error', () => {
    fc.assert(
      fc.property(
        fc.uint8Array({ minLength: 0, maxLength: 600 }),
        fc.nat({ max: 50 }),
        fc.nat({ max: 10 }),
        (bytes, request, nfds) => {
          // Make the header plausible half of the time so payload decoders are reached.
          if (bytes.length >= 12 && request % 2 === 0) {
            const v = new DataView(bytes.buffer);
            v.setUint32(0, request, true);
            v.setUint32(4, 1, true);
            v.setUint32(8, bytes.length - 12, true);
          }
          try {
            decodeBytes(
              bytes,
              Array.from({ length: nfds }, (_, i) => i),
            );
          } catch (err) {
            expect(err).to.be.instanceOf(VhostProtocolError);
          }
        },
      ),
      { numRuns: 5000 },
    );
  });

  describe('rejects', () => {
    const table: Array<{ name: string; bytes: Uint8Array; fds?: number; code: string }> = [
      { name: 'a truncated header', bytes: new Uint8Array(7), code: ErrorCode.VHOST_BAD_MESSAGE },
      { name: 'wrong version bits', bytes: encodeMessage(1, 0x2, { kind: 'none' }), code: ErrorCode.VHOST_BAD_MESSAGE },
      {
        name: 'a reply flag on a request',
        bytes: encodeMessage(1, 0x5, { kind: 'none' }),
        code: ErrorCode.VHOST_BAD_MESSAGE,
      },
      {
        name: 'an unknown request',
        bytes: encodeMessage(99, 0x1, { kind: 'none' }),
        code: ErrorCode.VHOST_UNKNOWN_REQUEST,
      },
      { name: 'request 0', bytes: encodeMessage(0, 0x1, { kind: 'none' }), code: ErrorCode.VHOST_UNKNOWN_REQUEST },
      {
        name: 'a payload of the wrong size',
        bytes: encodeMessage(FrontendRequest.SET_FEATURES, 0x1, { kind: 'raw', bytes: new Uint8Array(4) }),
        code: ErrorCode.VHOST_BAD_MESSAGE,
      },
      {
        name: 'a payload where none is expected',
        bytes: encodeMessage(FrontendRequest.GET_FEATURES, 0x1, { kind: 'raw', bytes: new Uint8Array(8) }),
        code: ErrorCode.VHOST_BAD_MESSAGE,
      },
      {
        name: 'a missing fd',
        bytes: encodeMessage(FrontendRequest.SET_VRING_KICK, 0x1, { kind: 'vring-fd', index: 0, noFd: false }),
        code: ErrorCode.VHOST_BAD_FDS,
      },
      {
        name: 'an fd with the no-fd flag',
        bytes: encodeMessage(FrontendRequest.SET_VRING_CALL, 0x1, { kind: 'vring-fd', index: 0, noFd: true }),
        fds: 1,
        code: ErrorCode.VHOST_BAD_FDS,
      },
      {
        name: 'an extra fd',
        bytes: encodeMessage(FrontendRequest.GET_FEATURES, 0x1, { kind: 'none' }),
        fds: 1,
        code: ErrorCode.VHOST_BAD_FDS,
      },
      {
        name: 'reserved bits in a vring fd message',
        bytes: encodeMessage(FrontendRequest.SET_VRING_KICK, 0x1, { kind: 'u64', value: 0x200n }),
        fds: 1,
        code: ErrorCode.VHOST_BAD_MESSAGE,
      },
      {
        name: 'a memory table of 0 regions',
        bytes: encodeMessage(FrontendRequest.SET_MEM_TABLE, 0x1, { kind: 'raw', bytes: new Uint8Array(8) }),
        code: ErrorCode.VHOST_BAD_MEMORY,
      },
      {
        name: 'a memory table of 9 regions',
        bytes: (() => {
          const b = new Uint8Array(8 + 9 * 32);
          b[0] = 9;
          return encodeMessage(FrontendRequest.SET_MEM_TABLE, 0x1, { kind: 'raw', bytes: b });
        })(),
        fds: 8,
        code: ErrorCode.VHOST_BAD_MEMORY,
      },
      {
        name: 'fewer fds than regions',
        bytes: encodeMessage(FrontendRequest.SET_MEM_TABLE, 0x1, {
          kind: 'mem-table',
          regions: [
            { guestPhysAddr: 0n, sizeBytes: 4096n, userAddr: 0n, mmapOffset: 0n },
            { guestPhysAddr: 8192n, sizeBytes: 4096n, userAddr: 8192n, mmapOffset: 0n },
          ],
        }),
        fds: 1,
        code: ErrorCode.VHOST_BAD_FDS,
      },
      {
        name: 'a config size over 256',
        bytes: encodeMessage(FrontendRequest.GET_CONFIG, 0x1, {
          kind: 'config',
          offset: 0,
          size: 300,
          flags: 0,
          data: new Uint8Array(300),
        }),
        code: ErrorCode.VHOST_BAD_CONFIG,
      },
      {
        name: 'a config size that disagrees with the payload',
        bytes: encodeMessage(FrontendRequest.GET_CONFIG, 0x1, {
          kind: 'config',
          offset: 0,
          size: 16,
          flags: 0,
          data: new Uint8Array(8),
        }),
        code: ErrorCode.VHOST_BAD_MESSAGE,
      },
    ];
    for (const c of table) {
      it(c.name, () => {
        expect(() =>
          decodeBytes(
            c.bytes,
            Array.from({ length: c.fds ?? 0 }, (_, i) => i),
          ),
        )
          .to.throw(VhostProtocolError)
          .with.property('code', c.code);
      });
    }

    it('a size larger than the maximum, before buffering the payload', () => {
      const reader = new MessageReader();
      const header = new Uint8Array(12);
      const v = new DataView(header.buffer);
      v.setUint32(0, 1, true);
      v.setUint32(4, 1, true);
      v.setUint32(8, MAX_PAYLOAD_BYTES + 1, true);
      expect(() => reader.push(header, [5]))
        .to.throw(FramingError)
        .that.satisfies((e: FramingError) => e.code === ErrorCode.VHOST_MESSAGE_TOO_LARGE && e.orphanFds.includes(5));
    });
  });
});

describe('vhost-user framing', () => {
  const stream = [
    { bytes: encodeMessage(FrontendRequest.GET_FEATURES, 1, { kind: 'none' }), fds: [] as number[] },
    { bytes: encodeMessage(FrontendRequest.SET_VRING_KICK, 9, { kind: 'vring-fd', index: 1, noFd: false }), fds: [7] },
    { bytes: encodeMessage(FrontendRequest.SET_STATUS, 1, { kind: 'u64', value: 8n }), fds: [] },
    {
      bytes: encodeMessage(FrontendRequest.SET_MEM_TABLE, 9, {
        kind: 'mem-table',
        regions: [
          { guestPhysAddr: 0n, sizeBytes: 4096n, userAddr: 0n, mmapOffset: 0n },
          { guestPhysAddr: 8192n, sizeBytes: 4096n, userAddr: 8192n, mmapOffset: 0n },
        ],
      }),
      fds: [8, 9],
    },
  ];

  it('reassembles messages split at every byte position, with fds on the right message', () => {
    const all = Buffer.concat(stream.map((s) => s.bytes));
    const starts: number[] = [];
    stream.reduce((at, s) => (starts.push(at), at + s.bytes.length), 0);
    for (let cut = 1; cut < all.length; cut++) {
      const reader = new MessageReader();
      // A read carries the fds of the messages whose header starts in it; the kernel ends a read
      // after a segment with fds, so split there too.
      const boundaries = new Set([0, cut, all.length]);
      for (const [i, s] of stream.entries()) if (s.fds.length > 0) boundaries.add(starts[i]! + s.bytes.length);
      const points = [...boundaries].sort((a, b) => a - b);
      const frames = [];
      for (let p = 0; p + 1 < points.length; p++) {
        const from = points[p]!;
        const to = points[p + 1]!;
        // fds of a message go with the read holding its first header byte.
        const fds = stream.flatMap((s, i) => (starts[i]! >= from && starts[i]! < to ? s.fds : []));
        frames.push(...reader.push(all.subarray(from, to), fds));
      }
      expect(
        frames.map((f) => f.header.request),
        `cut ${cut}`,
      ).to.deep.equal(stream.map((s) => new DataView(s.bytes.buffer).getUint32(0, true)));
      expect(
        frames.map((f) => f.fds),
        `cut ${cut}`,
      ).to.deep.equal(stream.map((s) => s.fds));
    }
  });

  it('attaches fds to the last message starting in a merged read (SET_STATUS then ADD_MEM_REG)', () => {
    const reader = new MessageReader();
    const frames = reader.push(Buffer.concat([stream[2]!.bytes, stream[1]!.bytes]), [7]);
    expect(frames.map((f) => f.fds)).to.deep.equal([[], [7]]);
  });

  it('reports fds arriving in the middle of a message', () => {
    const reader = new MessageReader();
    const bytes = stream[3]!.bytes;
    reader.push(bytes.subarray(0, 20), []);
    expect(() => reader.push(bytes.subarray(20, 30), [4]))
      .to.throw(FramingError)
      .with.property('code', ErrorCode.VHOST_FDS_LOST);
  });
});
