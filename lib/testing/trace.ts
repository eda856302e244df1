/**
 * Replays a message trace recorded from a real QEMU 11.1 (spec/fixtures/qemu-traces/) through
 * the test front-end: the same requests, flags, payload sizes and descriptor counts, in the same
 * order, with payloads rebuilt from what the trace recorded (feature values, vring states,
 * memory regions) and from the front-end's own rings. Every reply is checked.
 */
import { closeQuietly, native } from '../native';
import { decodeU64Reply, Payload } from '../vhost/codec';
import { FrontendRequest, VHOST_USER_NEED_REPLY_MASK } from '../vhost/constants';
import { SplitRingDriver } from './driver';
import { REPLYING, TestFrontend } from './frontend';

export interface TraceEntry {
  request: FrontendRequest;
  name: string;
  flags: number;
  size: number;
  fdCount: number;
  /** What follows the fd list: a value, a (index, num) pair, or a region. */
  detail: string;
}

/** Parses the text format of the recorded traces; comments and EOF are skipped. */
export function parseTrace(text: string): TraceEntry[] {
  const entries: TraceEntry[] = [];
  for (const line of text.split('\n')) {
    const t = line.trim();
    if (t === '' || t.startsWith('#') || t === 'EOF') continue;
    const m = /^([A-Z_]+) flags (0x[0-9a-f]+) size (\d+) fds \[([^\]]*)\]\s*(.*)$/.exec(t);
    if (m === null) throw new Error(`unparsable trace line: ${t}`);
    const request = (FrontendRequest as unknown as Partial<Record<string, FrontendRequest>>)[m[1]];
    if (request === undefined) throw new Error(`unknown request in trace: ${m[1]}`);
    entries.push({
      request,
      name: m[1],
      flags: Number(m[2]),
      size: Number(m[3]),
      fdCount: m[4].trim() === '' ? 0 : m[4].split(',').length,
      detail: m[5],
    });
  }
  return entries;
}

export interface ReplayExpectations {
  features: bigint;
  protocolFeatures: bigint;
  numQueues: number;
  maxMemSlots?: bigint;
  /** Called for each ring right before its SET_VRING_KICK (to put buffers on it, as a guest
   * driver does at probe time). */
  beforeKick?(driver: SplitRingDriver): void;
}

/** One checked reply, for reporting. */
export interface ReplyCheck {
  name: string;
  reply: string;
}

/** The (index, num) of a vring-state request in a trace line. */
export function pair(detail: string): { index: number; num: number } {
  const m = /\((\d+), (\d+)\)/.exec(detail);
  if (m === null) throw new Error(`no (index, num) in "${detail}"`);
  return { index: Number(m[1]), num: Number(m[2]) };
}

/**
 * The ring a SET_VRING_CALL or SET_VRING_ERR of a trace is for (the trace does not record it): a
 * CALL right after a KICK is that ring's; runs of CALL (and CALL/ERR pairs) go through the queues
 * in order, as QEMU's loops do; an ERR is for the ring of the CALL before it.
 */
export function traceCallIndex(
  request: FrontendRequest,
  prev: FrontendRequest | undefined,
  lastRing: number,
  cursor: { callCursor: number },
): number {
  if (request === FrontendRequest.SET_VRING_ERR) return Math.max(0, cursor.callCursor - 1);
  if (prev === FrontendRequest.SET_VRING_KICK) return lastRing;
  if (prev !== FrontendRequest.SET_VRING_CALL && prev !== FrontendRequest.SET_VRING_ERR) cursor.callCursor = 0;
  return cursor.callCursor++;
}

function hexField(detail: string, key: string): bigint {
  const m = new RegExp(`${key}=(0x[0-9a-f]+)`).exec(detail);
  if (m === null) throw new Error(`no ${key}= in "${detail}"`);
  return BigInt(m[1]);
}

/**
 * Replays `entries` through `fe` (connected, nothing sent yet). Throws on the first reply that
 * differs from what QEMU 11.1 requires; returns every checked reply.
 */
export async function replayTrace(
  entries: readonly TraceEntry[],
  fe: TestFrontend,
  expect: ReplayExpectations,
): Promise<ReplyCheck[]> {
  const checks: ReplyCheck[] = [];
  const drivers = new Map<number, SplitRingDriver>();
  const owned: number[] = [];
  let lastRing = 0;
  const cursor = { callCursor: 0 };
  let prev: FrontendRequest | undefined;
  let status = 0n;
  const fail = (e: TraceEntry, why: string): never => {
    throw new Error(`${e.name} (#${checks.length}): ${why}`);
  };
  try {
    for (const e of entries) {
      let payload: Payload = { kind: 'none' };
      let fds: number[] = [];
      const eventfd = (): number => {
        const fd = native.eventfd(0, true);
        owned.push(fd);
        return fd;
      };
      switch (e.request) {
        case FrontendRequest.SET_PROTOCOL_FEATURES:
          payload = { kind: 'u64', value: expect.protocolFeatures };
          break;
        case FrontendRequest.SET_FEATURES:
          payload = { kind: 'u64', value: BigInt(e.detail.trim()) };
          break;
        case FrontendRequest.SET_STATUS:
          status = hexField(e.detail, 'status');
          payload = { kind: 'u64', value: status };
          break;
        case FrontendRequest.SET_BACKEND_REQ_FD: {
          const [mine, theirs] = native.socketpair();
          owned.push(mine, theirs);
          fds = [theirs];
          break;
        }
        case FrontendRequest.SET_VRING_NUM:
        case FrontendRequest.SET_VRING_BASE:
        case FrontendRequest.SET_VRING_ENABLE:
        case FrontendRequest.GET_VRING_BASE: {
          const p = pair(e.detail);
          lastRing = p.index;
          if (e.request === FrontendRequest.SET_VRING_NUM && !drivers.has(p.index)) {
            drivers.set(p.index, new SplitRingDriver(fe.ram, p.index, p.num));
          }
          payload = { kind: 'vring-state', ...p };
          break;
        }
        case FrontendRequest.SET_VRING_ADDR: {
          const a = drivers.get(lastRing)!.userAddrs;
          payload = {
            kind: 'vring-addr',
            index: lastRing,
            flags: 0,
            desc: a.desc,
            used: a.used,
            avail: a.avail,
            log: 0n,
          };
          break;
        }
        case FrontendRequest.SET_VRING_KICK:
          expect.beforeKick?.(drivers.get(lastRing)!);
          payload = { kind: 'vring-fd', index: lastRing, noFd: false };
          fds = [drivers.get(lastRing)!.kickFd];
          break;
        case FrontendRequest.SET_VRING_CALL:
        case FrontendRequest.SET_VRING_ERR: {
          const index = traceCallIndex(e.request, prev, lastRing, cursor);
          payload = { kind: 'vring-fd', index, noFd: false };
          fds = [prev === FrontendRequest.SET_VRING_KICK ? drivers.get(lastRing)!.callFd : eventfd()];
          break;
        }
        case FrontendRequest.ADD_MEM_REG: {
          const region = {
            guestPhysAddr: hexField(e.detail, 'gpa'),
            sizeBytes: hexField(e.detail, 'size'),
            userAddr: hexField(e.detail, 'uaddr'),
            mmapOffset: hexField(e.detail, 'off'),
          };
          if (
            !fe.ram.regions.some(
              (r) =>
                r.guestPhysAddr === region.guestPhysAddr &&
                r.sizeBytes === region.sizeBytes &&
                r.userAddr === region.userAddr &&
                r.mmapOffset === region.mmapOffset,
            )
          ) {
            fail(e, 'the test front-end lays out guest RAM differently from the trace');
          }
          payload = { kind: 'mem-region', region };
          fds = [fe.ram.fd];
          break;
        }
        case FrontendRequest.SET_MEM_TABLE:
          payload = { kind: 'mem-table', regions: fe.ram.regions };
          fds = fe.ram.regions.map(() => fe.ram.fd);
          break;
        case FrontendRequest.GET_CONFIG:
          payload = { kind: 'config', offset: 0, size: e.size - 12, flags: 0, data: new Uint8Array(e.size - 12) };
          break;
        default:
          break;
      }
      if (fds.length !== e.fdCount) fail(e, `trace has ${e.fdCount} fds, replay built ${fds.length}`);
      const replying = REPLYING.has(e.request);
      const needAck = (e.flags & VHOST_USER_NEED_REPLY_MASK) !== 0;
      const frame = await fe.send(e.request, e.flags, payload, fds, replying || needAck);
      if (e.request === FrontendRequest.SET_VRING_KICK) drivers.get(lastRing)!.kick(); // QEMU 11.1 injects a kick
      prev = e.request;
      if (frame === undefined) continue;
      // fe.send already checked flags == 0x5 and the request id.
      let reply: string;
      if (e.request === FrontendRequest.GET_CONFIG) {
        if (frame.payload.length !== e.size) fail(e, `reply of ${frame.payload.length} bytes, QEMU requires ${e.size}`);
        reply = `config ${Buffer.from(frame.payload.subarray(12)).toString('hex')}`;
      } else if (e.request === FrontendRequest.GET_VRING_BASE) {
        if (frame.payload.length !== 8) fail(e, `reply of ${frame.payload.length} bytes, QEMU requires 8`);
        const v = new DataView(frame.payload.buffer, frame.payload.byteOffset, 8);
        const index = v.getUint32(0, true);
        const num = v.getUint32(4, true);
        const driver = drivers.get(index);
        const expected = driver === undefined ? 0 : driver.availIdxPublished;
        if (index !== pair(e.detail).index || num !== expected)
          fail(e, `reply (${index}, ${num}), expected (${pair(e.detail).index}, ${expected})`);
        reply = `(${index}, ${num})`;
      } else {
        const value = decodeU64Reply(e.name, frame.payload);
        const want = ((): bigint | undefined => {
          if (!replying) return 0n; // REPLY_ACK: success
          switch (e.request) {
            case FrontendRequest.GET_FEATURES:
              return expect.features;
            case FrontendRequest.GET_PROTOCOL_FEATURES:
              return expect.protocolFeatures;
            case FrontendRequest.GET_QUEUE_NUM:
              return BigInt(expect.numQueues);
            case FrontendRequest.GET_MAX_MEM_SLOTS:
              return expect.maxMemSlots;
            case FrontendRequest.GET_STATUS:
              return status;
            default:
              return undefined;
          }
        })();
        if (want !== undefined && value !== want)
          fail(e, `reply 0x${value.toString(16)}, expected 0x${want.toString(16)}`);
        reply = `0x${value.toString(16)}`;
      }
      checks.push({ name: e.name, reply });
    }
    return checks;
  } finally {
    for (const d of drivers.values()) d.close();
    for (const fd of owned) closeQuietly(fd);
  }
}
