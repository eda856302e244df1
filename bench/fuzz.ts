/**
 * A bounded, seeded, repeatable fuzz run of the real daemon process (`npm run fuzz -- --messages N
 * --seed S`): its vhost-user socket gets sessions replayed from the two QEMU 11.1 traces
 * (spec/fixtures/qemu-traces/) with mutated headers, payloads and descriptors (extra eventfds,
 * unsealed memfds, pipes, /dev/null, directories), split writes, random bytes, garbage rings
 * kicked, and abandoned sessions; its control socket gets valid, random, malformed, deep and huge
 * JSON lines, split writes, clients that never read and abandoned connections. A bystander VM
 * (the guest driver model on the daemon's second VM) must keep its kick-to-used round trip under
 * BYSTANDER_BOUND_MS throughout. Fails (exit 1) on a crash, a hang, or descriptors or memory
 * that do not come back; prints a JSON summary either way.
 *
 * The seed fixes everything sent: each session and connection is generated whole before it is
 * sent, so the same seed sends the same sessions in the same order; only where the daemon hangs
 * up on a bad message (so how many messages of a session go out) can vary with timing.
 * VBALLOON_FUZZ_TRACE_LEAKS=1 stops at the first session after which the daemon keeps an eventfd,
 * and prints what that session sent (slow; for finding a leak the end-of-run check reports).
 */
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as path from 'node:path';
import { closeQuietly, native } from '../lib/native';
import { BalloonGuest } from '../lib/testing/balloon-guest';
import { GuestRam } from '../lib/testing/guest-ram';
import { pair, parseTrace, traceCallIndex, TraceEntry } from '../lib/testing/trace';
import { encodeMessage, Payload } from '../lib/vhost/codec';
import { FrontendRequest } from '../lib/vhost/constants';
import { DaemonProcess } from '../spec/daemon/harness';

const MiB = 1024 * 1024;
/** A bystander round trip (or a control ping) slower than this is a hang (generous: slow CI). */
const BYSTANDER_BOUND_MS = 5000;
/** How often the bystander and a control ping are checked (wall clock). */
const CHECK_EVERY_MS = 250;
/** A daemon that neither answers nor closes within this is hung (session start, control reply). */
const ANSWER_TIMEOUT_MS = 10_000;
/** Descriptors the daemon may hold above its start once the run has drained (none expected). */
const FD_SLACK = 2;
/** Resident memory the daemon may gain over the run (heap and JIT warm-up, allocator slack). */
const RSS_SLACK_BYTES = 96 * MiB;
/** Control lines sent on one connection at most. */
const MAX_LINES_PER_CONNECTION = 40;
/** Vhost-user messages in one session at most (a full trace is ~60). */
const MAX_SESSION_MESSAGES = 80;

/** mulberry32: a small seeded PRNG (deterministic across runs and machines). */
class Rng {
  constructor(private state: number) {}
  next(): number {
    this.state = (this.state + 0x6d2b79f5) | 0;
    let t = this.state;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  }
  int(n: number): number {
    return Math.floor(this.next() * n);
  }
  chance(p: number): boolean {
    return this.next() < p;
  }
  pick<T>(xs: readonly T[]): T {
    return xs[this.int(xs.length)];
  }
  bytes(n: number): Uint8Array {
    const b = new Uint8Array(n);
    for (let i = 0; i < n; i++) b[i] = this.int(256);
    return b;
  }
}

const tick = (): Promise<void> => new Promise((resolve) => setImmediate(resolve));

interface Usage {
  fds: number;
  rssBytes: number;
}

/** The daemon's descriptors and RSS; zeros once it has died (a zombie has neither). */
function usage(pid: number): Usage {
  try {
    const status = fs.readFileSync(`/proc/${pid}/status`, 'utf8');
    return {
      fds: fs.readdirSync(`/proc/${pid}/fd`).length,
      rssBytes: Number(/VmRSS:\s+(\d+) kB/.exec(status)?.[1] ?? 0) * 1024,
    };
  } catch {
    return { fds: 0, rssBytes: 0 };
  }
}

/** What the daemon's descriptors not in `before` are (socket:[...], anon_inode:[eventfd], /memfd:...). */
function fdKinds(pid: number, before: Set<string>): string {
  const counts = new Map<string, number>();
  for (const fd of fs.readdirSync(`/proc/${pid}/fd`)) {
    if (before.has(fd)) continue;
    let target: string;
    try {
      target = fs
        .readlinkSync(`/proc/${pid}/fd/${fd}`)
        .replace(/\[\d+\]$/, '')
        .replace(/ \(deleted\)$/, '');
    } catch {
      continue;
    }
    counts.set(target, (counts.get(target) ?? 0) + 1);
  }
  return [...counts].map(([k, n]) => `${n} x ${k}`).join(', ');
}

class FuzzFailure extends Error {}

/** Descriptors a hostile front-end might attach instead of the right ones. */
class HostileFds {
  readonly unsealedMemfd: number;
  readonly devNull: number;
  readonly dir: number;
  readonly pipe: [number, number];
  constructor() {
    this.unsealedMemfd = native.memfdCreate('vballoon-fuzz-unsealed');
    native.ftruncate(this.unsealedMemfd, 64 * MiB);
    this.devNull = fs.openSync('/dev/null', 'r');
    this.dir = fs.openSync('/', 'r');
    this.pipe = native.pipe();
  }
  all(): number[] {
    return [this.unsealedMemfd, this.devNull, this.dir, ...this.pipe];
  }
  close(): void {
    for (const fd of this.all()) closeQuietly(fd);
  }
}

/** One vhost-user session: a connection, the descriptors we keep for it, counters. */
class Session {
  readonly owned: number[] = [];
  readonly kicks = new Map<number, number>();
  closedByDaemon = false;
  constructor(readonly fd: number) {}
  /** Reads whatever the daemon answered (replies are not checked: a bad message may get none). */
  drain(): void {
    for (;;) {
      let m;
      try {
        m = native.recvmsg(this.fd, 65536);
      } catch {
        this.closedByDaemon = true;
        return;
      }
      if (m === null) return;
      for (const fd of m.fds) closeQuietly(fd);
      if (m.data.length === 0) {
        this.closedByDaemon = true;
        return;
      }
    }
  }
  /** Sends; false when the daemon has closed the connection. Waits while the socket is full. */
  async send(bytes: Uint8Array, fds: readonly number[]): Promise<boolean> {
    const start = Date.now();
    let at = 0;
    let first = true;
    while (at < bytes.length || (first && bytes.length === 0)) {
      let n: number;
      try {
        n = native.sendmsg(this.fd, bytes.subarray(at), first ? fds : []);
      } catch {
        this.closedByDaemon = true;
        return false;
      }
      if (n < 0) {
        this.drain();
        if (this.closedByDaemon) return false;
        if (Date.now() - start > ANSWER_TIMEOUT_MS) throw new FuzzFailure('vhost-user socket not read for 10 s');
        await tick();
        continue;
      }
      first = false;
      at += n;
      if (bytes.length === 0) break;
    }
    this.drain();
    return !this.closedByDaemon;
  }
  close(): void {
    closeQuietly(this.fd);
    for (const fd of this.owned) closeQuietly(fd);
    for (const fd of this.kicks.values()) closeQuietly(fd);
  }
}

const FULL_PROTOCOL = 0x1a229n; // MQ | REPLY_ACK | BACKEND_REQ | CONFIG | RESET_DEVICE | CONFIGURE_MEM_SLOTS | STATUS
const MINIMAL_PROTOCOL = 0x200n; // CONFIG

/** Where queue `q`'s rings live in guest RAM (inside the second q35 region). */
function ringGpa(q: number): { desc: number; avail: number; used: number } {
  const base = 0x200000 + (q & 7) * 0x10000;
  return { desc: base, avail: base + 0x2000, used: base + 0x4000 };
}

/** The fuzzer. */
class Fuzzer {
  readonly rng: Rng;
  readonly traces: Array<{ entries: TraceEntry[]; protocol: bigint }>;
  readonly ram = new GuestRam({ sizeBytes: 64 * MiB, layout: 'q35' });
  readonly hostile = new HostileFds();
  messages = { vhost: 0, control: 0 };
  sessions = 0;
  sessionsClosedByDaemon = 0;
  controlConnections = 0;
  controlReplies = 0;
  bystanderTrips = 0;
  bystanderMaxMs = 0;
  controlPingMaxMs = 0;
  private lastCheckMs = 0;
  /** What the current vhost-user session sent (for --trace-leaks). */
  sessionLog: string[] = [];
  private readonly slowClients: net.Socket[] = [];
  private bystanderBuf = 0;
  private lastMutation = -1;

  constructor(
    readonly d: DaemonProcess,
    readonly bystander: BalloonGuest,
    seed: number,
  ) {
    this.rng = new Rng(seed);
    const dir = path.resolve(__dirname, '..', '..', 'spec', 'fixtures', 'qemu-traces');
    this.traces = [
      {
        entries: parseTrace(fs.readFileSync(path.join(dir, 'qemu-11.1-full-protocol-features.txt'), 'utf8')),
        protocol: FULL_PROTOCOL,
      },
      {
        entries: parseTrace(fs.readFileSync(path.join(dir, 'qemu-11.1-minimal-protocol-features.txt'), 'utf8')),
        protocol: MINIMAL_PROTOCOL,
      },
    ];
    this.bystanderBuf = bystander.fe.ram.alloc(4, 4);
    bystander.fe.ram.memory.writeU32(this.bystanderBuf, (64 * MiB) / 4096 - 1);
  }

  get total(): number {
    return this.messages.vhost + this.messages.control;
  }

  /** The bystander's round trip and a control ping; fails the run if either is too slow. */
  async check(force = false): Promise<void> {
    if (this.d.exitCode !== undefined) throw new FuzzFailure(`daemon exited with code ${this.d.exitCode}`);
    const now = Date.now();
    if (!force && now - this.lastCheckMs < CHECK_EVERY_MS) return;
    this.lastCheckMs = now;
    if (this.bystander.fe.isClosed) throw new FuzzFailure('the bystander VM was disconnected');
    const d = this.bystander.driver('deflate');
    const t0 = Date.now();
    d.addBuffer([{ addr: this.bystanderBuf, len: 4 }]);
    d.kick();
    try {
      await d.waitUsed(1, BYSTANDER_BOUND_MS);
    } catch (err) {
      throw new FuzzFailure(`bystander round trip: ${(err as Error).message}`);
    }
    const trip = Date.now() - t0;
    this.bystanderTrips++;
    this.bystanderMaxMs = Math.max(this.bystanderMaxMs, trip);
    const p0 = Date.now();
    const pong = await this.controlExchange(['{"id":"check","method":"ping"}'], 1);
    if (!pong.some((l) => l.includes('"pong":true'))) throw new FuzzFailure(`control ping answered ${pong.join()}`);
    this.controlPingMaxMs = Math.max(this.controlPingMaxMs, Date.now() - p0);
    // The harness keeps every log line; this run only needs the ones since the last check.
    this.d.logs.length = 0;
  }

  /** Sends `lines` on a new control connection and collects `want` answers (or until closed). */
  controlExchange(lines: string[], want: number, chunks = 1): Promise<string[]> {
    return new Promise((resolve, reject) => {
      const s = net.createConnection(this.d.control);
      const got: string[] = [];
      let buffered = '';
      const timer = setTimeout(() => {
        s.destroy();
        reject(new FuzzFailure(`control: ${got.length}/${want} answers in ${ANSWER_TIMEOUT_MS} ms`));
      }, ANSWER_TIMEOUT_MS);
      const done = (): void => {
        clearTimeout(timer);
        s.destroy();
        resolve(got);
      };
      s.setEncoding('utf8');
      s.on('data', (c: string) => {
        buffered += c;
        for (let nl = buffered.indexOf('\n'); nl >= 0; nl = buffered.indexOf('\n')) {
          got.push(buffered.slice(0, nl));
          buffered = buffered.slice(nl + 1);
        }
        if (got.length >= want) done();
      });
      s.on('error', () => s.destroy());
      s.on('close', done);
      const text = lines.map((l) => `${l}\n`).join('');
      s.on('connect', () => {
        if (chunks <= 1) s.write(text);
        else {
          const step = Math.max(1, Math.ceil(text.length / chunks));
          for (let i = 0; i < text.length; i += step) s.write(text.slice(i, i + step));
        }
      });
    });
  }

  /** A valid message for trace entry `e` (payload and descriptors rebuilt as QEMU would). */
  private build(
    e: TraceEntry,
    state: { lastRing: number; memRegion: number; callCursor: number; prev: FrontendRequest },
    protocol: bigint,
    session: Session,
  ): { bytes: Uint8Array; fds: number[]; kickRing?: number } {
    let payload: Payload = { kind: 'none' };
    let fds: number[] = [];
    let kickRing: number | undefined;
    const eventfd = (): number => {
      const fd = native.eventfd(0, true);
      session.owned.push(fd);
      return fd;
    };
    switch (e.request) {
      case FrontendRequest.SET_PROTOCOL_FEATURES:
        payload = { kind: 'u64', value: protocol };
        break;
      case FrontendRequest.SET_FEATURES:
        payload = { kind: 'u64', value: BigInt(e.detail.trim() || '0') };
        break;
      case FrontendRequest.SET_STATUS:
        payload = { kind: 'u64', value: BigInt(/status=(0x[0-9a-f]+)/.exec(e.detail)?.[1] ?? '0') };
        break;
      case FrontendRequest.SET_BACKEND_REQ_FD: {
        const [mine, theirs] = native.socketpair();
        session.owned.push(mine, theirs);
        fds = [theirs];
        break;
      }
      case FrontendRequest.SET_VRING_NUM:
      case FrontendRequest.SET_VRING_BASE:
      case FrontendRequest.SET_VRING_ENABLE:
      case FrontendRequest.GET_VRING_BASE: {
        const p = pair(e.detail);
        state.lastRing = p.index;
        payload = { kind: 'vring-state', ...p };
        break;
      }
      case FrontendRequest.SET_VRING_ADDR: {
        const g = ringGpa(state.lastRing);
        const ua = (gpa: number): bigint => BigInt(this.ram.userAddr(gpa));
        payload = {
          kind: 'vring-addr',
          index: state.lastRing,
          flags: 0,
          desc: ua(g.desc),
          used: ua(g.used),
          avail: ua(g.avail),
          log: 0n,
        };
        break;
      }
      case FrontendRequest.SET_VRING_KICK: {
        payload = { kind: 'vring-fd', index: state.lastRing, noFd: false };
        const fd = native.eventfd(0, true);
        closeQuietly(session.kicks.get(state.lastRing) ?? -1);
        session.kicks.set(state.lastRing, fd);
        fds = [fd];
        kickRing = state.lastRing;
        break;
      }
      case FrontendRequest.SET_VRING_CALL:
      case FrontendRequest.SET_VRING_ERR: {
        const index = traceCallIndex(e.request, state.prev, state.lastRing, state);
        payload = { kind: 'vring-fd', index, noFd: false };
        fds = [eventfd()];
        break;
      }
      case FrontendRequest.ADD_MEM_REG:
        payload = { kind: 'mem-region', region: this.ram.regions[state.memRegion++ % this.ram.regions.length] };
        fds = [this.ram.fd];
        break;
      case FrontendRequest.SET_MEM_TABLE:
        payload = { kind: 'mem-table', regions: this.ram.regions };
        fds = this.ram.regions.map(() => this.ram.fd);
        break;
      case FrontendRequest.GET_CONFIG:
        payload = { kind: 'config', offset: 0, size: e.size - 12, flags: 0, data: new Uint8Array(e.size - 12) };
        break;
      default:
        break;
    }
    state.prev = e.request;
    return { bytes: encodeMessage(e.request, e.flags, payload), fds, ...(kickRing === undefined ? {} : { kickRing }) };
  }

  /** Mutates a message in place (or replaces it); returns the descriptors to send instead. */
  private mutate(msg: { bytes: Uint8Array; fds: number[] }, session: Session): void {
    const r = this.rng;
    const b = msg.bytes;
    const view = new DataView(b.buffer, b.byteOffset, b.byteLength);
    const kind = r.int(9);
    this.lastMutation = kind;
    switch (kind) {
      case 0: // flip bits
        for (let i = r.int(4) + 1; i > 0; i--) b[r.int(b.length)] ^= 1 << r.int(8);
        break;
      case 1: // random bytes in the payload
        for (let i = 12; i < b.length; i++) if (r.chance(0.3)) b[i] = r.int(256);
        break;
      case 2: // a size that does not match
        view.setUint32(8, r.chance(0.5) ? r.int(5000) : Math.max(0, b.length - 12 + r.int(17) - 8), true);
        break;
      case 3: // a truncated message (the next one is read as its rest)
        msg.bytes = b.subarray(0, r.int(b.length));
        break;
      case 4: // another request id
        view.setUint32(0, r.int(60), true);
        break;
      case 5: // other flags
        view.setUint32(4, r.chance(0.5) ? r.int(0x10) : r.int(0x100000000), true);
        break;
      case 6: // random bytes instead of a message
        msg.bytes = r.bytes(r.int(300));
        break;
      case 7: {
        // extra or wrong descriptors
        const extra: number[] = [];
        const n = r.chance(0.3) ? 9 + r.int(12) : 1 + r.int(3);
        for (let i = 0; i < n; i++) {
          if (r.chance(0.5)) {
            const fd = native.eventfd(0, true);
            session.owned.push(fd);
            extra.push(fd);
          } else extra.push(r.pick(this.hostile.all()));
        }
        msg.fds = r.chance(0.5) ? [...msg.fds, ...extra] : extra;
        break;
      }
      default: // no descriptors
        msg.fds = [];
        break;
    }
  }

  /** Garbage in a ring's descriptor table and available ring, then a kick (a hostile guest). */
  private garbageRing(session: Session, bytes: Uint8Array): void {
    const rings = [...session.kicks.keys()];
    if (rings.length === 0) return;
    const q = rings[bytes[0] % rings.length];
    const g = ringGpa(q);
    this.ram.memory.write(g.desc, bytes.subarray(0, 16 * 8));
    this.ram.memory.write(g.avail, bytes.subarray(16 * 8));
    native.eventfdWrite(session.kicks.get(q)!, 1);
  }

  /** One vhost-user session; returns the messages sent. */
  async vhostSession(budget: number): Promise<number> {
    const r = this.rng;
    const trace = r.pick(this.traces);
    const planned = 1 + r.int(MAX_SESSION_MESSAGES);
    const mutateP = r.pick([0, 0.02, 0.08, 0.3]);
    const splitP = r.pick([0, 0.1, 0.5]);
    // Connect and wait for the answer to GET_FEATURES: the previous session may still be
    // closing (one front-end at a time; a second is refused), so retry until served.
    const start = Date.now();
    let session: Session | undefined;
    while (session === undefined) {
      if (Date.now() - start > ANSWER_TIMEOUT_MS) throw new FuzzFailure('vhost-user: no session in 10 s');
      const fd = native.connect(this.d.vmSocket('vm0'));
      if (fd < 0) {
        await tick();
        continue;
      }
      const s = new Session(fd);
      const first = trace.entries[0];
      try {
        // 12 bytes into an empty socket buffer: sent whole (not send(), which drains the answer).
        native.sendmsg(fd, encodeMessage(first.request, first.flags, { kind: 'none' }));
      } catch {
        s.closedByDaemon = true;
      }
      let answered = false;
      while (!answered && !s.closedByDaemon) {
        const m = (() => {
          try {
            return native.recvmsg(fd, 65536);
          } catch {
            return { data: Buffer.alloc(0), fds: [] as number[], truncated: false };
          }
        })();
        if (m === null) {
          if (Date.now() - start > ANSWER_TIMEOUT_MS) throw new FuzzFailure('vhost-user: GET_FEATURES unanswered');
          await tick();
          continue;
        }
        for (const x of m.fds) closeQuietly(x);
        if (m.data.length === 0) s.closedByDaemon = true;
        else answered = true;
      }
      if (answered) session = s;
      else s.close();
    }
    this.sessions++;
    this.sessionLog = [];
    // The whole session is generated before anything is sent, so the random stream does not
    // depend on where the daemon closes the connection (a timing matter): a seed always sends
    // the same sessions, in the same order, each up to where the daemon hangs up.
    const state = { lastRing: 0, memRegion: 0, callCursor: 0, prev: trace.entries[0].request };
    const plan: Array<{ bytes: Uint8Array; fds: number[]; cut: number; garbage: boolean; what: string }> = [];
    for (let i = 1; i < trace.entries.length && i < planned; i++) {
      const msg = this.build(trace.entries[i], state, trace.protocol, session);
      const mutated = r.chance(mutateP);
      if (mutated) this.mutate(msg, session);
      const cut = r.chance(splitP) && msg.bytes.length > 1 ? 1 + r.int(msg.bytes.length - 1) : 0;
      const what = `${trace.entries[i].name}${mutated ? ` mutation ${this.lastMutation}` : ''} fds=${msg.fds.length}`;
      plan.push({ ...msg, cut, garbage: r.chance(0.05), what });
    }
    const garbage = r.bytes(16 * 8 + 4 + 2 * 8);
    const goodbye = r.chance(0.8);
    let sent = 1;
    try {
      for (const m of plan) {
        if (sent >= budget || session.closedByDaemon) break;
        this.sessionLog.push(`${m.what} ${Buffer.from(m.bytes.subarray(0, 24)).toString('hex')}`);
        const ok =
          m.cut > 0
            ? (await session.send(m.bytes.subarray(0, m.cut), m.fds)) &&
              (await session.send(m.bytes.subarray(m.cut), []))
            : await session.send(m.bytes, m.fds);
        sent++;
        if (ok && m.garbage) this.garbageRing(session, garbage);
        if (sent % 16 === 0) await tick();
      }
      // Let the daemon read what is there before the session goes (or abandon it mid-way).
      if (!session.closedByDaemon && goodbye) {
        await session.send(encodeMessage(FrontendRequest.GET_FEATURES, 1, { kind: 'none' }), []);
      }
    } finally {
      if (session.closedByDaemon) this.sessionsClosedByDaemon++;
      session.close();
    }
    return sent;
  }

  /** A control line of some kind. */
  private controlLine(): string {
    const r = this.rng;
    const id = r.pick<unknown>([r.int(1000), `s${r.int(1000)}`, null, [1, [2, [3]]], { a: { b: 1 } }, true]);
    const valid = (method: string, params?: Record<string, unknown>): string =>
      JSON.stringify({ id, method, ...(params === undefined ? {} : { params }) });
    switch (r.int(14)) {
      case 0:
        return valid('ping');
      case 1:
        return valid('list');
      case 2:
        return valid('status', r.chance(0.5) ? { vm: 'vm0' } : undefined);
      case 3:
        return valid('stats', { vm: r.pick(['vm0', 'vm9', 7]) });
      case 4:
        return valid('set-target', {
          vm: r.pick(['vm0', 'nope']),
          bytes: r.pick<unknown>([r.int(64) * MiB, -1, 2 ** 60, 'lots', 1.5, null]),
        });
      case 5:
        return valid('set-mode', { vm: 'vm0', mode: r.pick(['auto', 'manual', 'turbo']) });
      case 6:
        return valid('set-discard', { vm: 'vm0', inhibit: r.pick<unknown>([true, false, 'yes']) });
      case 7:
        return valid(r.pick(['__proto__', 'constructor', 'toString', 'hasOwnProperty', 'explode', '']));
      case 8: {
        // random bytes (no newline)
        const b = r.bytes(r.int(200));
        for (let i = 0; i < b.length; i++) if (b[i] === 0x0a) b[i] = 0x20;
        return `x${Buffer.from(b).toString('latin1')}`; // never blank: a blank line gets no answer
      }
      case 9: {
        // truncated JSON
        const v = valid('status', { vm: 'vm0' });
        return v.slice(0, 1 + r.int(v.length - 1));
      }
      case 10: {
        // deep nesting, within the line limit
        const depth = 10 + r.int(20_000);
        const inner = `${'['.repeat(depth)}${']'.repeat(depth)}`;
        return r.chance(0.5) ? `{"id":${inner},"method":"ping"}` : `{"id":1,"method":"ping","params":{"x":${inner}}}`;
      }
      case 11:
        return valid('qemu-args', { vm: r.pick(['vm0', 'x']) });
      case 12:
        return JSON.stringify({ id, method: 'status', params: { vm: 'x'.repeat(r.int(30_000)) } });
      default:
        return r.chance(0.5) ? '{}' : '[]';
    }
  }

  /** One control connection; returns the lines sent. */
  async controlConnection(budget: number): Promise<number> {
    const r = this.rng;
    const lines = Array.from({ length: 1 + r.int(MAX_LINES_PER_CONNECTION) }, () => this.controlLine());
    lines.length = Math.min(lines.length, Math.max(1, budget)); // generated whole: the stream stays the same
    const n = lines.length;
    this.controlConnections++;
    const mode = r.int(10);
    if (mode === 0) {
      // a huge line: ETOOLARGE, closed
      lines.push('x'.repeat(70 * 1024));
      const got = await this.controlExchange(lines, n + 1, 1 + r.int(4));
      this.controlReplies += got.length;
      return n + 1;
    }
    if (mode === 1 || mode === 2) {
      // abandoned: written (maybe half a line) and closed without reading, or kept unread
      const s = net.createConnection(this.d.control);
      s.on('error', () => s.destroy());
      const text = lines.join('\n') + (r.chance(0.5) ? '\n' : '');
      s.write(text);
      if (mode === 1) s.end();
      else {
        this.slowClients.push(s);
        if (this.slowClients.length > 8) this.slowClients.shift()!.destroy();
      }
      return n;
    }
    if (r.chance(0.1)) lines.push(JSON.stringify({ id: 'sub', method: 'subscribe', params: { vm: 'vm0' } }));
    const got = await this.controlExchange(lines, lines.length, r.chance(0.3) ? 2 + r.int(30) : 1);
    this.controlReplies += got.length;
    return lines.length;
  }

  readonly timeMs = { vhost: 0, control: 0, check: 0 };

  private eventfdBaseline: number | undefined;
  private eventfds(): number {
    const pid = this.d.proc!.pid!;
    let n = 0;
    for (const fd of fs.readdirSync(`/proc/${pid}/fd`)) {
      try {
        if (fs.readlinkSync(`/proc/${pid}/fd/${fd}`) === 'anon_inode:[eventfd]') n++;
      } catch {
        // closed meanwhile
      }
    }
    return n;
  }
  /** Debugging aid: stops at the first session after which the daemon keeps eventfds. */
  private async traceLeaks(): Promise<void> {
    this.eventfdBaseline ??= this.eventfds();
    const deadline = Date.now() + 2000;
    while (this.eventfds() > this.eventfdBaseline && Date.now() < deadline) await tick();
    if (this.eventfds() > this.eventfdBaseline)
      throw new FuzzFailure(`eventfds kept after session ${this.sessions}:\n${this.sessionLog.join('\n')}`);
  }

  async run(total: number, onProgress: (f: Fuzzer) => void): Promise<void> {
    while (this.total < total) {
      const left = total - this.total;
      const t = Date.now();
      if (this.rng.chance(0.75)) {
        this.messages.vhost += await this.vhostSession(left);
        this.timeMs.vhost += Date.now() - t;
        if (process.env['VBALLOON_FUZZ_TRACE_LEAKS'] === '1') await this.traceLeaks();
      } else {
        this.messages.control += await this.controlConnection(left);
        this.timeMs.control += Date.now() - t;
      }
      const c = Date.now();
      await this.check();
      this.timeMs.check += Date.now() - c;
      onProgress(this);
    }
    for (const s of this.slowClients.splice(0)) s.destroy();
    await this.check(true);
  }

  close(): void {
    for (const s of this.slowClients.splice(0)) s.destroy();
    this.hostile.close();
    this.ram.close();
  }
}

export interface FuzzResult {
  seed: number;
  messages: { vhost: number; control: number; total: number };
  seconds: number;
  sessions: number;
  /** Where the run's time went. */
  timeMs: { vhost: number; control: number; check: number };
  sessionsClosedByDaemon: number;
  controlConnections: number;
  controlReplies: number;
  crashes: number;
  hangs: number;
  bystander: { roundTrips: number; maxMs: number; controlPingMaxMs: number };
  daemon: { start: Usage; afterWarmup: Usage; end: Usage; samples: Array<Usage & { messages: number }> };
  failure?: string;
}

/** Runs the fuzzer against a fresh daemon; never throws (the result says what failed). */
export async function fuzz(total: number, seed: number, progress = false): Promise<FuzzResult> {
  const d = new DaemonProcess();
  const vm = (name: string): Record<string, unknown> => ({
    name,
    socket: d.vmSocket(name),
    memory: '64M',
    statsInterval: '1s',
  });
  await d.start({ vms: [vm('vm0'), vm('vm1')], log: { format: 'json', level: 'info' } });
  const pid = d.proc!.pid!;
  const bystander = await BalloonGuest.boot(d.vmSocket('vm1'), { mode: 'stock', numQueues: 5, ramBytes: 64 * MiB });
  const f = new Fuzzer(d, bystander, seed);
  const t0 = Date.now();
  const start = usage(pid);
  const startFds = new Set(fs.readdirSync(`/proc/${pid}/fd`));
  let afterWarmup: Usage | undefined;
  /** Descriptors and RSS at every tenth of the run (flat, or a leak). */
  const samples: Array<Usage & { messages: number }> = [];
  let failure: string | undefined;
  let crashes = 0;
  let hangs = 0;
  let lastReport = 0;
  try {
    await f.run(total, (x) => {
      if (afterWarmup === undefined && x.total >= Math.min(20_000, total / 10)) afterWarmup = usage(pid);
      if (x.total >= ((samples.length + 1) * total) / 10) samples.push({ messages: x.total, ...usage(pid) });
      if (progress && Date.now() - lastReport > 5000) {
        lastReport = Date.now();
        process.stderr.write(`fuzz: ${x.total}/${total} messages, ${Math.round((Date.now() - t0) / 1000)} s\n`);
      }
    });
  } catch (err) {
    failure = (err as Error).message;
    // A connection the daemon dropped may be its death: give its exit a moment to be seen.
    const deadline = Date.now() + 2000;
    while (d.exitCode === undefined && Date.now() < deadline) await new Promise((r) => setTimeout(r, 20));
    if (d.exitCode !== undefined) {
      crashes++;
      failure = `daemon exited with code ${d.exitCode} (${failure}); last log lines: ${d.logs
        .slice(-3)
        .map((l) => l.msg)
        .join(' | ')}`;
    } else if (err instanceof FuzzFailure) hangs++;
  }
  const seconds = (Date.now() - t0) / 1000;
  let end: Usage = start;
  if (d.exitCode === undefined) {
    // Sessions and connections the daemon is still closing: wait until its descriptors are back.
    const deadline = Date.now() + ANSWER_TIMEOUT_MS;
    while (usage(pid).fds > start.fds + FD_SLACK && Date.now() < deadline) await tick();
    end = usage(pid);
    if (failure === undefined && end.fds > start.fds + FD_SLACK)
      failure = `daemon descriptors ${start.fds} -> ${end.fds}: ${fdKinds(pid, startFds)}`;
    const base = afterWarmup ?? start;
    if (failure === undefined && end.rssBytes > base.rssBytes + RSS_SLACK_BYTES)
      failure = `daemon RSS ${Math.round(base.rssBytes / MiB)} -> ${Math.round(end.rssBytes / MiB)} MiB`;
  } else crashes = Math.max(crashes, 1);
  f.close();
  await bystander.close();
  if (d.exitCode === undefined) await d.stop();
  return {
    seed,
    messages: { ...f.messages, total: f.total },
    seconds,
    sessions: f.sessions,
    timeMs: f.timeMs,
    sessionsClosedByDaemon: f.sessionsClosedByDaemon,
    controlConnections: f.controlConnections,
    controlReplies: f.controlReplies,
    crashes,
    hangs,
    bystander: { roundTrips: f.bystanderTrips, maxMs: f.bystanderMaxMs, controlPingMaxMs: f.controlPingMaxMs },
    daemon: { start, afterWarmup: afterWarmup ?? start, end, samples },
    ...(failure === undefined ? {} : { failure }),
  };
}

if (require.main === module) {
  const arg = (name: string, def: number): number => {
    const i = process.argv.indexOf(`--${name}`);
    const v = i < 0 ? def : Number(process.argv[i + 1]);
    if (!Number.isSafeInteger(v) || v < 0) {
      console.error(`--${name}: expected a non-negative integer`);
      process.exit(2);
    }
    return v;
  };
  fuzz(arg('messages', 1_000_000), arg('seed', 1), true).then(
    (r) => {
      console.log(JSON.stringify(r, null, 2));
      process.exit(r.failure === undefined ? 0 : 1);
    },
    (err: unknown) => {
      console.error(err);
      process.exit(1);
    },
  );
}
