/**
 * The vhost-user message codec: headers and payloads to and from bytes. Pure: no I/O, no clock,
 * no state. Every size and descriptor count is checked before a field is read; anything wrong
 * throws a VhostProtocolError with a stable code, nothing else.
 *
 * vhost-user spec, "Message Specification" and "Front-end message types"; payload layouts are
 * little-endian (x86-64 and arm64 hosts).
 */
import { ErrorCode, ErrorCodeValue, VhostProtocolError } from '../errors';
import {
  FrontendRequest,
  HEADER_BYTES,
  MAX_CONFIG_BYTES,
  MAX_FDS_PER_MESSAGE,
  MAX_MEM_TABLE_REGIONS,
  MAX_PAYLOAD_BYTES,
  MEMORY_REGION_BYTES,
  VHOST_USER_NEED_REPLY_MASK,
  VHOST_USER_REPLY_FLAGS,
  VHOST_USER_REPLY_MASK,
  VHOST_USER_VERSION,
  VHOST_USER_VERSION_MASK,
  VHOST_USER_VRING_IDX_MASK,
  VHOST_USER_VRING_NOFD_MASK,
} from './constants';

export interface Header {
  request: number;
  flags: number;
  size: number;
}

export interface RegionPayload {
  guestPhysAddr: bigint;
  sizeBytes: bigint;
  userAddr: bigint;
  mmapOffset: bigint;
}

/** Decoded payloads, by layout. */
export type Payload =
  | { kind: 'none' }
  | { kind: 'u64'; value: bigint }
  | { kind: 'vring-state'; index: number; num: number }
  | { kind: 'vring-addr'; index: number; flags: number; desc: bigint; used: bigint; avail: bigint; log: bigint }
  | { kind: 'vring-fd'; index: number; noFd: boolean }
  | { kind: 'mem-table'; regions: RegionPayload[] }
  | { kind: 'mem-region'; region: RegionPayload }
  | { kind: 'config'; offset: number; size: number; flags: number; data: Uint8Array }
  | { kind: 'raw'; bytes: Uint8Array };

type Layout =
  | 'none'
  | 'u64'
  | 'vring-state'
  | 'vring-addr'
  | 'vring-fd'
  | 'mem-table'
  | 'mem-region'
  | 'config'
  | { raw: number | 'variable' };

interface RequestSpec {
  name: string;
  layout: Layout;
  /** Descriptors expected; 'region-count' = one per mem-table region; 'vring' = 1 unless NOFD. */
  fds: number | 'region-count' | 'vring' | 'optional';
}

/**
 * Every front-end request id 1-45 with its payload layout and descriptor count. The layouts are
 * literal types, so each request's payload type follows from this table (PayloadOf).
 */
const SPECS = {
  [FrontendRequest.GET_FEATURES]: { name: 'GET_FEATURES', layout: 'none', fds: 0 },
  [FrontendRequest.SET_FEATURES]: { name: 'SET_FEATURES', layout: 'u64', fds: 0 },
  [FrontendRequest.SET_OWNER]: { name: 'SET_OWNER', layout: 'none', fds: 0 },
  [FrontendRequest.RESET_OWNER]: { name: 'RESET_OWNER', layout: 'none', fds: 0 },
  [FrontendRequest.SET_MEM_TABLE]: { name: 'SET_MEM_TABLE', layout: 'mem-table', fds: 'region-count' },
  [FrontendRequest.SET_LOG_BASE]: { name: 'SET_LOG_BASE', layout: { raw: 16 }, fds: 1 },
  [FrontendRequest.SET_LOG_FD]: { name: 'SET_LOG_FD', layout: 'none', fds: 1 },
  [FrontendRequest.SET_VRING_NUM]: { name: 'SET_VRING_NUM', layout: 'vring-state', fds: 0 },
  [FrontendRequest.SET_VRING_ADDR]: { name: 'SET_VRING_ADDR', layout: 'vring-addr', fds: 0 },
  [FrontendRequest.SET_VRING_BASE]: { name: 'SET_VRING_BASE', layout: 'vring-state', fds: 0 },
  [FrontendRequest.GET_VRING_BASE]: { name: 'GET_VRING_BASE', layout: 'vring-state', fds: 0 },
  [FrontendRequest.SET_VRING_KICK]: { name: 'SET_VRING_KICK', layout: 'vring-fd', fds: 'vring' },
  [FrontendRequest.SET_VRING_CALL]: { name: 'SET_VRING_CALL', layout: 'vring-fd', fds: 'vring' },
  [FrontendRequest.SET_VRING_ERR]: { name: 'SET_VRING_ERR', layout: 'vring-fd', fds: 'vring' },
  [FrontendRequest.GET_PROTOCOL_FEATURES]: { name: 'GET_PROTOCOL_FEATURES', layout: 'none', fds: 0 },
  [FrontendRequest.SET_PROTOCOL_FEATURES]: { name: 'SET_PROTOCOL_FEATURES', layout: 'u64', fds: 0 },
  [FrontendRequest.GET_QUEUE_NUM]: { name: 'GET_QUEUE_NUM', layout: 'none', fds: 0 },
  [FrontendRequest.SET_VRING_ENABLE]: { name: 'SET_VRING_ENABLE', layout: 'vring-state', fds: 0 },
  [FrontendRequest.SEND_RARP]: { name: 'SEND_RARP', layout: 'u64', fds: 0 },
  [FrontendRequest.NET_SET_MTU]: { name: 'NET_SET_MTU', layout: 'u64', fds: 0 },
  [FrontendRequest.SET_BACKEND_REQ_FD]: { name: 'SET_BACKEND_REQ_FD', layout: 'none', fds: 1 },
  [FrontendRequest.IOTLB_MSG]: { name: 'IOTLB_MSG', layout: { raw: 32 }, fds: 0 },
  [FrontendRequest.SET_VRING_ENDIAN]: { name: 'SET_VRING_ENDIAN', layout: 'vring-state', fds: 0 },
  [FrontendRequest.GET_CONFIG]: { name: 'GET_CONFIG', layout: 'config', fds: 0 },
  [FrontendRequest.SET_CONFIG]: { name: 'SET_CONFIG', layout: 'config', fds: 0 },
  [FrontendRequest.CREATE_CRYPTO_SESSION]: { name: 'CREATE_CRYPTO_SESSION', layout: { raw: 'variable' }, fds: 0 },
  [FrontendRequest.CLOSE_CRYPTO_SESSION]: { name: 'CLOSE_CRYPTO_SESSION', layout: 'u64', fds: 0 },
  [FrontendRequest.POSTCOPY_ADVISE]: { name: 'POSTCOPY_ADVISE', layout: 'none', fds: 0 },
  [FrontendRequest.POSTCOPY_LISTEN]: { name: 'POSTCOPY_LISTEN', layout: 'none', fds: 0 },
  [FrontendRequest.POSTCOPY_END]: { name: 'POSTCOPY_END', layout: 'none', fds: 0 },
  [FrontendRequest.GET_INFLIGHT_FD]: { name: 'GET_INFLIGHT_FD', layout: { raw: 24 }, fds: 0 },
  [FrontendRequest.SET_INFLIGHT_FD]: { name: 'SET_INFLIGHT_FD', layout: { raw: 24 }, fds: 1 },
  [FrontendRequest.GPU_SET_SOCKET]: { name: 'GPU_SET_SOCKET', layout: 'none', fds: 1 },
  [FrontendRequest.RESET_DEVICE]: { name: 'RESET_DEVICE', layout: 'none', fds: 0 },
  [FrontendRequest.VRING_KICK]: { name: 'VRING_KICK', layout: 'vring-state', fds: 0 },
  [FrontendRequest.GET_MAX_MEM_SLOTS]: { name: 'GET_MAX_MEM_SLOTS', layout: 'none', fds: 0 },
  [FrontendRequest.ADD_MEM_REG]: { name: 'ADD_MEM_REG', layout: 'mem-region', fds: 1 },
  [FrontendRequest.REM_MEM_REG]: { name: 'REM_MEM_REG', layout: 'mem-region', fds: 'optional' },
  [FrontendRequest.SET_STATUS]: { name: 'SET_STATUS', layout: 'u64', fds: 0 },
  [FrontendRequest.GET_STATUS]: { name: 'GET_STATUS', layout: 'none', fds: 0 },
  [FrontendRequest.GET_SHARED_OBJECT]: { name: 'GET_SHARED_OBJECT', layout: { raw: 16 }, fds: 0 },
  [FrontendRequest.SET_DEVICE_STATE_FD]: { name: 'SET_DEVICE_STATE_FD', layout: { raw: 8 }, fds: 1 },
  [FrontendRequest.CHECK_DEVICE_STATE]: { name: 'CHECK_DEVICE_STATE', layout: 'none', fds: 0 },
  [FrontendRequest.GET_SHMEM_CONFIG]: { name: 'GET_SHMEM_CONFIG', layout: 'none', fds: 0 },
  [FrontendRequest.GET_VRING_BASE_SKIP_DRAIN]: { name: 'GET_VRING_BASE_SKIP_DRAIN', layout: 'vring-state', fds: 0 },
} as const satisfies Record<number, RequestSpec>;

/** The request ids this back-end knows (all of 1-45). */
export type KnownRequest = keyof typeof SPECS;
type KindOfLayout<L> = L extends string ? L : 'raw';
/** The decoded payload type of request `R`. */
export type PayloadOf<R extends KnownRequest> = Extract<Payload, { kind: KindOfLayout<(typeof SPECS)[R]['layout']> }>;

/** A decoded request `R`, its payload typed by the table. `fds` are owned by whoever holds it. */
export interface RequestMessage<R extends KnownRequest> {
  request: R;
  flags: number;
  payload: PayloadOf<R>;
  fds: number[];
}

/** Any decoded front-end request (of the requests `K`): narrowing on `request` narrows `payload`. */
export type FrontendMessage<K extends KnownRequest = KnownRequest> = { [R in K]: RequestMessage<R> }[K];

/** The table by request id (for code that looks requests up by number). */
export const REQUEST_SPECS: ReadonlyMap<number, RequestSpec> = new Map(
  Object.entries(SPECS).map(([id, spec]): [number, RequestSpec] => [Number(id), spec]),
);

/** The spec name of a request id, or `UNKNOWN(n)`. */
export function requestName(request: number): string {
  return REQUEST_SPECS.get(request)?.name ?? `UNKNOWN(${request})`;
}

function fail(code: ErrorCodeValue, message: string): never {
  throw new VhostProtocolError(code, message);
}

/** Decodes and validates a 12-byte header. Replies are rejected unless `expectReply`. */
export function decodeHeader(bytes: Uint8Array, expectReply = false): Header {
  if (bytes.length < HEADER_BYTES) fail(ErrorCode.VHOST_BAD_MESSAGE, `truncated header (${bytes.length} bytes)`);
  const v = new DataView(bytes.buffer, bytes.byteOffset, HEADER_BYTES);
  const request = v.getUint32(0, true);
  const flags = v.getUint32(4, true);
  const size = v.getUint32(8, true);
  if ((flags & VHOST_USER_VERSION_MASK) !== VHOST_USER_VERSION) {
    fail(
      ErrorCode.VHOST_BAD_MESSAGE,
      `${requestName(request)}: version bits ${flags & VHOST_USER_VERSION_MASK}, expected 1`,
    );
  }
  if (((flags & VHOST_USER_REPLY_MASK) !== 0) !== expectReply) {
    fail(
      ErrorCode.VHOST_BAD_MESSAGE,
      `${requestName(request)}: REPLY flag ${expectReply ? 'missing' : 'set on a request'}`,
    );
  }
  if (size > MAX_PAYLOAD_BYTES) {
    fail(
      ErrorCode.VHOST_MESSAGE_TOO_LARGE,
      `${requestName(request)}: payload of ${size} bytes exceeds ${MAX_PAYLOAD_BYTES}`,
    );
  }
  return { request, flags, size };
}

/** Encodes a header. */
export function encodeHeader(h: Header): Uint8Array {
  const out = new Uint8Array(HEADER_BYTES);
  const v = new DataView(out.buffer);
  v.setUint32(0, h.request, true);
  v.setUint32(4, h.flags, true);
  v.setUint32(8, h.size, true);
  return out;
}

function expectSize(name: string, payload: Uint8Array, size: number): DataView {
  if (payload.length !== size) {
    fail(ErrorCode.VHOST_BAD_MESSAGE, `${name}: payload of ${payload.length} bytes, expected ${size}`);
  }
  return new DataView(payload.buffer, payload.byteOffset, payload.byteLength);
}

function readRegion(v: DataView, at: number): RegionPayload {
  return {
    guestPhysAddr: v.getBigUint64(at, true),
    sizeBytes: v.getBigUint64(at + 8, true),
    userAddr: v.getBigUint64(at + 16, true),
    mmapOffset: v.getBigUint64(at + 24, true),
  };
}

function decodePayload(name: string, layout: Layout, p: Uint8Array): Payload {
  switch (layout) {
    case 'none':
      expectSize(name, p, 0);
      return { kind: 'none' };
    case 'u64':
      return { kind: 'u64', value: expectSize(name, p, 8).getBigUint64(0, true) };
    case 'vring-state': {
      const v = expectSize(name, p, 8);
      return { kind: 'vring-state', index: v.getUint32(0, true), num: v.getUint32(4, true) };
    }
    case 'vring-addr': {
      const v = expectSize(name, p, 40);
      return {
        kind: 'vring-addr',
        index: v.getUint32(0, true),
        flags: v.getUint32(4, true),
        desc: v.getBigUint64(8, true),
        used: v.getBigUint64(16, true),
        avail: v.getBigUint64(24, true),
        log: v.getBigUint64(32, true),
      };
    }
    case 'vring-fd': {
      const value = expectSize(name, p, 8).getBigUint64(0, true);
      if ((value & ~(VHOST_USER_VRING_IDX_MASK | VHOST_USER_VRING_NOFD_MASK)) !== 0n) {
        fail(ErrorCode.VHOST_BAD_MESSAGE, `${name}: reserved bits set in 0x${value.toString(16)}`);
      }
      return {
        kind: 'vring-fd',
        index: Number(value & VHOST_USER_VRING_IDX_MASK),
        noFd: (value & VHOST_USER_VRING_NOFD_MASK) !== 0n,
      };
    }
    case 'mem-table': {
      if (p.length < 8) fail(ErrorCode.VHOST_BAD_MESSAGE, `${name}: payload of ${p.length} bytes is shorter than 8`);
      const v = new DataView(p.buffer, p.byteOffset, p.byteLength);
      const n = v.getUint32(0, true);
      if (n === 0 || n > MAX_MEM_TABLE_REGIONS) {
        fail(ErrorCode.VHOST_BAD_MEMORY, `${name}: ${n} regions (must be 1..${MAX_MEM_TABLE_REGIONS})`);
      }
      expectSize(name, p, 8 + MEMORY_REGION_BYTES * n);
      const regions: RegionPayload[] = [];
      for (let i = 0; i < n; i++) regions.push(readRegion(v, 8 + MEMORY_REGION_BYTES * i));
      return { kind: 'mem-table', regions };
    }
    case 'mem-region':
      return { kind: 'mem-region', region: readRegion(expectSize(name, p, 8 + MEMORY_REGION_BYTES), 8) };
    case 'config': {
      if (p.length < 12) fail(ErrorCode.VHOST_BAD_MESSAGE, `${name}: payload of ${p.length} bytes is shorter than 12`);
      const v = new DataView(p.buffer, p.byteOffset, p.byteLength);
      const offset = v.getUint32(0, true);
      const size = v.getUint32(4, true);
      const flags = v.getUint32(8, true);
      if (size > MAX_CONFIG_BYTES)
        fail(ErrorCode.VHOST_BAD_CONFIG, `${name}: config size ${size} exceeds ${MAX_CONFIG_BYTES}`);
      expectSize(name, p, 12 + size);
      return { kind: 'config', offset, size, flags, data: p.slice(12) };
    }
    default:
      if (layout.raw !== 'variable') expectSize(name, p, layout.raw);
      return { kind: 'raw', bytes: p.slice() };
  }
}

function expectedFds(spec: RequestSpec, payload: Payload): { min: number; max: number } {
  switch (spec.fds) {
    case 'region-count': {
      const n = payload.kind === 'mem-table' ? payload.regions.length : 0;
      return { min: n, max: n };
    }
    case 'vring': {
      const n = payload.kind === 'vring-fd' && payload.noFd ? 0 : 1;
      return { min: n, max: n };
    }
    case 'optional':
      return { min: 0, max: 1 };
    default:
      return { min: spec.fds, max: spec.fds };
  }
}

/**
 * Decodes a front-end request. Does not close `fds` on failure (the caller owns them).
 * @throws VhostProtocolError for an unknown request, a bad payload or a wrong descriptor count.
 */
export function decodeRequest(header: Header, payload: Uint8Array, fds: readonly number[]): FrontendMessage {
  const spec = REQUEST_SPECS.get(header.request);
  if (spec === undefined) fail(ErrorCode.VHOST_UNKNOWN_REQUEST, `unknown request ${header.request}`);
  if (payload.length !== header.size) {
    fail(ErrorCode.VHOST_BAD_MESSAGE, `${spec.name}: header says ${header.size} bytes, got ${payload.length}`);
  }
  if (fds.length > MAX_FDS_PER_MESSAGE) {
    fail(ErrorCode.VHOST_BAD_FDS, `${spec.name}: ${fds.length} descriptors exceed ${MAX_FDS_PER_MESSAGE}`);
  }
  const decoded = decodePayload(spec.name, spec.layout, payload);
  const want = expectedFds(spec, decoded);
  if (fds.length < want.min || fds.length > want.max) {
    const expected = want.min === want.max ? `${want.min}` : `${want.min}..${want.max}`;
    fail(ErrorCode.VHOST_BAD_FDS, `${spec.name}: ${fds.length} descriptors, expected ${expected}`);
  }
  // The one cast of the codec: `spec` was found for this id, and decodePayload followed its layout
  // in SPECS, which is exactly what PayloadOf reads.
  const request = header.request as KnownRequest;
  return { request, flags: header.flags, payload: decoded, fds: [...fds] } as FrontendMessage;
}

function writeRegion(v: DataView, at: number, r: RegionPayload): void {
  v.setBigUint64(at, r.guestPhysAddr, true);
  v.setBigUint64(at + 8, r.sizeBytes, true);
  v.setBigUint64(at + 16, r.userAddr, true);
  v.setBigUint64(at + 24, r.mmapOffset, true);
}

/** Encodes a payload to bytes (the inverse of decodePayload). */
export function encodePayload(p: Payload): Uint8Array {
  switch (p.kind) {
    case 'none':
      return new Uint8Array(0);
    case 'u64':
    case 'vring-fd': {
      const out = new Uint8Array(8);
      const value = p.kind === 'u64' ? p.value : BigInt(p.index) | (p.noFd ? VHOST_USER_VRING_NOFD_MASK : 0n);
      new DataView(out.buffer).setBigUint64(0, value, true);
      return out;
    }
    case 'vring-state': {
      const out = new Uint8Array(8);
      const v = new DataView(out.buffer);
      v.setUint32(0, p.index, true);
      v.setUint32(4, p.num, true);
      return out;
    }
    case 'vring-addr': {
      const out = new Uint8Array(40);
      const v = new DataView(out.buffer);
      v.setUint32(0, p.index, true);
      v.setUint32(4, p.flags, true);
      v.setBigUint64(8, p.desc, true);
      v.setBigUint64(16, p.used, true);
      v.setBigUint64(24, p.avail, true);
      v.setBigUint64(32, p.log, true);
      return out;
    }
    case 'mem-table': {
      const out = new Uint8Array(8 + MEMORY_REGION_BYTES * p.regions.length);
      const v = new DataView(out.buffer);
      v.setUint32(0, p.regions.length, true);
      p.regions.forEach((r, i) => writeRegion(v, 8 + MEMORY_REGION_BYTES * i, r));
      return out;
    }
    case 'mem-region': {
      const out = new Uint8Array(8 + MEMORY_REGION_BYTES);
      writeRegion(new DataView(out.buffer), 8, p.region);
      return out;
    }
    case 'config': {
      const out = new Uint8Array(12 + p.data.length);
      const v = new DataView(out.buffer);
      v.setUint32(0, p.offset, true);
      v.setUint32(4, p.size, true);
      v.setUint32(8, p.flags, true);
      out.set(p.data, 12);
      return out;
    }
    case 'raw':
      return p.bytes.slice();
  }
}

/** Header + payload bytes of one message. */
export function encodeMessage(request: number, flags: number, payload: Payload): Uint8Array {
  const body = encodePayload(payload);
  const out = new Uint8Array(HEADER_BYTES + body.length);
  out.set(encodeHeader({ request, flags, size: body.length }), 0);
  out.set(body, HEADER_BYTES);
  return out;
}

/** A reply to `request` (flags exactly VERSION | REPLY). */
export function encodeReply(request: number, payload: Payload): Uint8Array {
  return encodeMessage(request, VHOST_USER_REPLY_FLAGS, payload);
}

/** True if the header asks for a REPLY_ACK. */
export function needsReply(flags: number): boolean {
  return (flags & VHOST_USER_NEED_REPLY_MASK) !== 0;
}

/** Decodes a u64 reply payload (the back-end channel's acks, GET_* replies in the test front-end). */
export function decodeU64Reply(name: string, payload: Uint8Array): bigint {
  return expectSize(name, payload, 8).getBigUint64(0, true);
}
