/**
 * Restart and crash survival: what lets a VM never notice its balloon daemon going away
 * (docs/operations.md).
 *
 * QEMU cannot survive a new vhost-user connection, so the connection never ends: every
 * descriptor a VM's back-end holds (its listening socket, the front-end connection, the back-end
 * channel, guest memory, kick/call/err eventfds) is kept by a holder that outlives this process
 * (systemd's file descriptor store, or the next daemon during a takeover), under a stable name.
 * Beside them, two memfds kept the same way: the VM's state (features, memory table, rings,
 * target, `actual`, mode: JSON, rewritten on every change) and its ballooned-page bitmap (one bit
 * per 4 KiB page, changed in place as pages enter and leave the balloon). A new process gets them
 * all back and serves the same connection from where the guest's rings say the old one was.
 *
 * Ordering, which makes any SIGKILL recoverable:
 * - a descriptor is stored before any state naming it is written, and removed from the holder
 *   only after a state that no longer names it was written;
 * - the state is written after a front-end message was handled and before its reply goes out;
 * - the page bitmap changes before the buffer that changed it is returned to the guest.
 */
import { createHash } from 'node:crypto';
import { BalloonDevice, DeviceImage } from '../device/balloon';
import { PagesJournal } from '../device/balloon-pages';
import { bitmapRuns, PageRun, setBitRange } from '../device/page-tracker';
import { ErrorCode, ErrorCodeValue, errorMessage } from '../errors';
import { Logger, LogRateLimiter } from '../log';
import { closeQuietly, native } from '../native';
import { Mode } from '../policy/engine';
import { FrontendRequest } from '../vhost/constants';
import { VhostUserBackend } from '../vhost/server';
import { SessionImage } from '../vhost/session';

/** Whoever keeps descriptors for the next process (FdStore, lib/daemon/fd-store.ts). */
export interface FdHolder {
  readonly enabled: boolean;
  /** Stores `fds` under `name`; throws if they could not be handed over. */
  store(name: string, fds: readonly number[]): void;
  /** Forgets the descriptors stored under `name`; never throws. */
  remove(name: string): void;
}

/** A descriptor received from the previous process, with its name. */
export interface NamedFd {
  name: string;
  fd: number;
}

// ---- the state memfd ------------------------------------------------------------------------

/**
 * Two slots, each [magic u32][length u32][sequence f64][check 20 bytes][JSON]. A write goes to
 * the slot not holding the newest valid state: the body first, then the header that vouches for
 * it, so a write cut short by a SIGKILL leaves a slot whose check does not match, and the other
 * slot is read.
 *
 * The memfd is mapped and written in place: a save (after every front-end message that changes
 * state and every new target) is a copy into shared memory and a checksum, not a system call.
 * "VBS2" slots carry native.checksum (48 bits, in the first 6 check bytes); "VBS1" slots, written
 * by earlier versions with SHA-1, are still read, so a takeover from one of them works.
 */
const SLOT_BYTES = 1024 * 1024;
const SLOT_HEADER_BYTES = 36;
const SLOT_MAGIC = 0x32534256; // "VBS2"
const SLOT_MAGIC_SHA1 = 0x31534256; // "VBS1"
/**
 * After the two slots, one record of the last front-end message handled (its digest and reply),
 * written for every message: small, so a GET_CONFIG costs one short copy, not a whole state.
 * A write of it cut short is harmless: it happens before the message leaves the socket.
 */
const RECORD_OFFSET = 2 * SLOT_BYTES;
const RECORD_BYTES = 64 * 1024;
const STATE_FILE_BYTES = RECORD_OFFSET + RECORD_BYTES;

export class StateFile {
  private sequence = 0;
  private nextSlot = 0;
  private closed = false;
  private readonly mapping: ArrayBuffer;
  /** The whole memfd, mapped shared: what this process writes is what the next one reads. */
  private readonly bytes: Buffer;

  private constructor(readonly fd: number) {
    // A file from an earlier process has this size already; never shrunk.
    if (native.fstat(fd).size < STATE_FILE_BYTES) native.ftruncate(fd, STATE_FILE_BYTES);
    this.mapping = native.mmap(fd, STATE_FILE_BYTES, 0, true);
    this.bytes = Buffer.from(this.mapping);
  }

  /** A new, empty state memfd. */
  static create(vm: string): StateFile {
    const fd = native.memfdCreate(`vballoon-state-${vm}`);
    try {
      return new StateFile(fd);
    } catch (err) {
      closeQuietly(fd);
      throw err;
    }
  }

  /** The state memfd a previous process wrote (takes ownership of `fd`). */
  static open(fd: number): StateFile {
    try {
      return new StateFile(fd);
    } catch (err) {
      closeQuietly(fd);
      throw err;
    }
  }

  /** The JSON in a slot at `offset` with its sequence, if its check matches. */
  private readSlot(offset: number, capacity: number): { seq: number; doc: unknown } | undefined {
    const b = this.bytes;
    const magic = b.readUInt32LE(offset);
    if (magic !== SLOT_MAGIC && magic !== SLOT_MAGIC_SHA1) return undefined;
    const length = b.readUInt32LE(offset + 4);
    if (length > capacity - SLOT_HEADER_BYTES) return undefined;
    const bodyAt = offset + SLOT_HEADER_BYTES;
    // A copy: the body must not change between its check and its parse.
    const body = Buffer.from(b.subarray(bodyAt, bodyAt + length));
    const check = b.subarray(offset + 16, offset + 36);
    const whole =
      magic === SLOT_MAGIC
        ? native.checksum(body, 0, length) === check.readUIntLE(0, 6)
        : createHash('sha1').update(body).digest().equals(check);
    if (!whole) return undefined;
    try {
      return { seq: b.readDoubleLE(offset + 8), doc: JSON.parse(body.toString('utf8')) as unknown };
    } catch {
      return undefined; // a check that matches over something that is not JSON: not ours
    }
  }

  /** The newest valid state, or undefined if neither slot holds one. */
  read(): unknown {
    let best: { seq: number; doc: unknown; slot: number } | undefined;
    for (let slot = 0; slot < 2; slot++) {
      const got = this.readSlot(slot * SLOT_BYTES, SLOT_BYTES);
      if (got !== undefined && (best === undefined || got.seq > best.seq)) best = { ...got, slot };
    }
    if (best === undefined) return undefined;
    this.sequence = best.seq;
    this.nextSlot = 1 - best.slot;
    return best.doc;
  }

  /** The last message record, if one was written whole. */
  readRecord(): unknown {
    return this.readSlot(RECORD_OFFSET, RECORD_BYTES)?.doc;
  }

  /**
   * Writes a slot at `offset` in place: the body (`text` in UTF-8, then `tail`), then the header
   * with its check. Throws, writing nothing, if the body does not fit.
   */
  private writeSlot(offset: number, capacity: number, seq: number, text: string, tail?: Uint8Array): void {
    const room = capacity - SLOT_HEADER_BYTES - (tail?.length ?? 0);
    // UTF-8 takes at most 3 bytes per UTF-16 unit: only a long text is measured first.
    const textBytes = text.length * 3 <= room ? -1 : Buffer.byteLength(text, 'utf8');
    if (room < 0 || textBytes > room) {
      const size = Math.max(textBytes, text.length) + (tail?.length ?? 0);
      throw new Error(`state of ${size} bytes does not fit the ${capacity}-byte slot`);
    }
    const b = this.bytes;
    const bodyAt = offset + SLOT_HEADER_BYTES;
    let length = b.write(text, bodyAt, room, 'utf8');
    if (tail !== undefined) {
      b.set(tail, bodyAt + length);
      length += tail.length;
    }
    const check = native.checksum(b, bodyAt, length);
    b.writeUInt32LE(SLOT_MAGIC, offset);
    b.writeUInt32LE(length, offset + 4);
    b.writeDoubleLE(seq, offset + 8);
    b.fill(0, offset + 16, offset + 36);
    b.writeUIntLE(check, offset + 16, 6);
  }

  /** Writes the last message record. */
  writeRecord(json: string): void {
    this.writeSlot(RECORD_OFFSET, RECORD_BYTES, 0, json);
  }

  /**
   * Writes `doc` (or its JSON: `head`, then the bytes of `tail` if given) as the newest state.
   * Throws if it does not fit a slot.
   */
  write(doc: unknown, tail?: Uint8Array): void {
    const text = typeof doc === 'string' ? doc : JSON.stringify(doc);
    this.writeSlot(this.nextSlot * SLOT_BYTES, SLOT_BYTES, this.sequence + 1, text, tail);
    this.sequence++;
    this.nextSlot = 1 - this.nextSlot;
  }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    native.munmap(this.mapping);
    closeQuietly(this.fd);
  }
}

// ---- the page bitmap ------------------------------------------------------------------------

/** The bitmap starts this large and doubles; at most one 4 GiB mapping (pfns below 2^35). */
const BITMAP_MIN_BYTES = 64 * 1024;
const BITMAP_MAX_BYTES = 2 ** 32;

/**
 * One bit per 4 KiB guest page in a memfd, set while the page is in the balloon (the page
 * tracker's bitmap layout: bit pfn % 32 of 32-bit word pfn / 32). Changed in place through a
 * shared mapping, so what a killed process set is what the next one reads.
 */
export class PageBitmap implements PagesJournal {
  private words: Uint32Array;
  private mapping: ArrayBuffer;
  private failed = false;

  private constructor(
    readonly fd: number,
    private readonly log: () => Logger,
  ) {
    const size = native.fstat(fd).size;
    this.mapping = native.mmap(fd, size, 0, true);
    this.words = new Uint32Array(this.mapping);
  }

  static create(vm: string, log: () => Logger): PageBitmap {
    const fd = native.memfdCreate(`vballoon-pages-${vm}`);
    try {
      native.ftruncate(fd, BITMAP_MIN_BYTES);
      return new PageBitmap(fd, log);
    } catch (err) {
      closeQuietly(fd);
      throw err;
    }
  }

  /** A bitmap a previous process kept (takes ownership of `fd`). */
  static open(fd: number, log: () => Logger): PageBitmap {
    try {
      return new PageBitmap(fd, log);
    } catch (err) {
      closeQuietly(fd);
      throw err;
    }
  }

  /** Pages the bitmap describes now. */
  private get pages(): number {
    return this.words.length * 32;
  }

  /** Makes room for `pfn`; false (logged once) if it is beyond what one mapping can describe. */
  private reach(pfn: number): boolean {
    if (pfn < this.pages) return true;
    let size = this.words.byteLength;
    while (size * 8 <= pfn && size < BITMAP_MAX_BYTES) size *= 2;
    if (size * 8 <= pfn) {
      if (!this.failed)
        this.log().error('ballooned page beyond what the restart bitmap describes: it will be forgotten by a restart', {
          pfn,
        });
      this.failed = true;
      return false;
    }
    native.ftruncate(this.fd, size);
    native.munmap(this.mapping);
    this.mapping = native.mmap(this.fd, size, 0, true);
    this.words = new Uint32Array(this.mapping);
    return true;
  }

  added(runs: readonly PageRun[]): void {
    for (const run of runs) {
      const last = run.start + run.count - 1;
      if (this.reach(last)) setBitRange(this.words, run.start, last, true);
    }
  }

  removed(pfns: ArrayLike<number>): void {
    for (let i = 0; i < pfns.length; i++) {
      const pfn = pfns[i];
      if (pfn < this.pages) setBitRange(this.words, pfn, pfn, false);
    }
  }

  cleared(): void {
    // Punching the whole file zeroes it without touching (allocating) the untouched parts.
    native.punchHole(this.fd, 0, this.words.byteLength);
  }

  /** Every ballooned run, in order. */
  runs(): Generator<PageRun> {
    return bitmapRuns(this.words, 0);
  }

  close(): void {
    native.munmap(this.mapping);
    closeQuietly(this.fd);
  }
}

// ---- one VM ---------------------------------------------------------------------------------

/** A SessionImage with descriptor names instead of numbers. */
type NamedSessionImage = Omit<SessionImage, 'connFd' | 'channelFd' | 'regions' | 'rings' | 'lastHandled'> & {
  conn: string;
  channel: string | null;
  regions: Array<Omit<SessionImage['regions'][number], 'fd'> & { fd: string }>;
  rings: Array<
    Omit<SessionImage['rings'][number], 'kickFd' | 'callFd' | 'errFd'> & {
      kick: string | null;
      call: string | null;
      err: string | null;
    }
  >;
};

/** The state memfd's document. */
export interface VmStateDoc {
  version: 1;
  vm: string;
  /** The next descriptor name's number (names are never reused). */
  nextName: number;
  /** The policy's mode and the operator's target (exact in manual mode, ceiling in auto). */
  mode: Mode;
  operatorPages: number;
  device: DeviceImage;
  session: NamedSessionImage | null;
}

/** What a VM's restore found, for the daemon to finish setting it up. */
export interface Restored {
  doc: VmStateDoc;
  /** The listening socket, if the previous process listened. */
  listenFd: number | undefined;
}

/** Front-end requests that change nothing: their handling writes only the message record. */
const READ_ONLY_REQUESTS: ReadonlySet<number> = new Set([
  FrontendRequest.GET_FEATURES,
  FrontendRequest.GET_PROTOCOL_FEATURES,
  FrontendRequest.GET_QUEUE_NUM,
  FrontendRequest.GET_MAX_MEM_SLOTS,
  FrontendRequest.GET_CONFIG,
  FrontendRequest.GET_STATUS,
]);

/** Names are `<vm>.<what>`; systemd allows printable ASCII without ':' (VM names have none). */
const STATE_NAME = 'state';
const PAGES_NAME = 'pages';
const LISTEN_NAME = 'listen';

/**
 * Keeps one VM restartable: its descriptors in the holder under stable names, its state memfd
 * and page bitmap current.
 */
export class VmSurvival {
  private readonly state: StateFile;
  readonly bitmap: PageBitmap;
  /**
   * What the holder keeps, by full name: our own duplicate of each stored open file. It stays
   * valid whatever the session closes, so a descriptor seen later can be recognised as an open
   * file the holder already keeps (QEMU sends the same call eventfd again at every start; the
   * holder keeps an open file once, under its first name, and would drop it with that name).
   */
  private readonly entries = new Map<string, number>();
  /** Which name each descriptor number had at the last save (checked before it is trusted). */
  private hint = new Map<number, string>();
  private nextName = 1;
  private device: BalloonDevice | undefined;
  private backend: VhostUserBackend | undefined;
  private policy: () => { mode: Mode; operatorPages: number } = () => ({ mode: 'manual', operatorPages: 0 });
  private broken = false;
  private readonly errorLog = new LogRateLimiter(1, 60_000, () => performance.now());
  private readonly restored: Restored | undefined;
  /** The last message record the previous process left. */
  private readonly lastRecord: SessionImage['lastHandled'] = null;
  /**
   * The end of the state document as last written: `,"session":<named session JSON>}` in UTF-8.
   * Kept until the session changes (undefined then): every save writes it after the head without
   * serializing it again.
   */
  private sessionTail: Buffer | undefined;

  /**
   * `inherited`: this VM's descriptors from the previous process (names without the VM prefix);
   * those the restored state does not use are closed and removed from the holder.
   */
  constructor(
    private readonly vm: string,
    private readonly holder: FdHolder,
    private log: Logger,
    private readonly inherited: Map<string, number> = new Map(),
    /** Counts a failed save (metrics: ERR_RESTART_STATE). */
    private readonly onError: (code: ErrorCodeValue) => void = () => undefined,
  ) {
    const stateFd = inherited.get(STATE_NAME);
    const pagesFd = inherited.get(PAGES_NAME);
    let doc: VmStateDoc | undefined;
    if (stateFd !== undefined && pagesFd !== undefined) {
      this.state = StateFile.open(stateFd);
      this.bitmap = PageBitmap.open(pagesFd, () => this.log);
      doc = this.parse(this.state.read());
      if (doc === undefined) {
        log.warn('the previous process left no usable state for this VM; starting afresh');
        this.bitmap.cleared(); // an inherited bitmap without a state to go with it describes nothing
      }
      const record = this.state.readRecord() as SessionImage['lastHandled'] | undefined;
      if (record !== undefined && record !== null && typeof record.digest === 'string') this.lastRecord = record;
    } else {
      if (stateFd !== undefined) closeQuietly(stateFd);
      if (pagesFd !== undefined) closeQuietly(pagesFd);
      this.state = StateFile.create(vm);
      this.bitmap = PageBitmap.create(vm, () => this.log);
    }
    inherited.delete(STATE_NAME);
    inherited.delete(PAGES_NAME);
    this.holder.store(this.fullName(STATE_NAME), [this.state.fd]);
    this.holder.store(this.fullName(PAGES_NAME), [this.bitmap.fd]);
    if (doc !== undefined) {
      this.nextName = doc.nextName;
      const listenFd = inherited.get(LISTEN_NAME);
      inherited.delete(LISTEN_NAME);
      this.restored = { doc, listenFd };
      if (listenFd !== undefined) this.keep(this.fullName(LISTEN_NAME), listenFd);
    }
  }

  private fullName(short: string): string {
    return `${this.vm}.${short}`;
  }

  /** Records that the holder keeps `fd`'s open file under `name` (a duplicate is kept here). */
  private keep(name: string, fd: number): void {
    const old = this.entries.get(name);
    if (old !== undefined) closeQuietly(old);
    this.entries.set(name, native.dup(fd));
    this.hint.set(fd, name);
  }

  /** The name the holder keeps `fd`'s open file under, if it keeps it. */
  private nameOf(fd: number): string | undefined {
    const hinted = this.hint.get(fd);
    if (hinted !== undefined) {
      const copy = this.entries.get(hinted);
      if (copy !== undefined && native.sameFile(fd, copy)) return hinted;
    }
    for (const [name, copy] of this.entries) if (native.sameFile(fd, copy)) return name;
    return undefined;
  }

  private parse(doc: unknown): VmStateDoc | undefined {
    const d = doc as Partial<VmStateDoc> | undefined;
    if (d?.version !== 1 || d.vm !== this.vm || typeof d.device !== 'object' || typeof d.nextName !== 'number')
      return undefined;
    return d as VmStateDoc;
  }

  /** What the previous process left (undefined for a fresh VM). */
  get previous(): Restored | undefined {
    return this.restored;
  }

  /**
   * The previous session with descriptors in this process (ownership passes to the caller),
   * or undefined if there was none or its connection was not kept.
   */
  takeSession(): SessionImage | undefined {
    const s = this.restored?.doc.session;
    if (s === undefined || s === null) return undefined;
    const taken = new Map<string, number>();
    const take = (name: string | null): number => {
      if (name === null) return -1;
      let fd = this.inherited.get(name);
      if (fd !== undefined) {
        this.inherited.delete(name);
        taken.set(name, fd);
      } else {
        // A name two descriptors shared (one open file): each user gets its own descriptor.
        const first = taken.get(name);
        if (first === undefined) return -1;
        fd = native.dup(first);
      }
      this.keep(this.fullName(name), fd);
      return fd;
    };
    const connFd = take(s.conn);
    if (connFd < 0) {
      this.log.warn('the previous front-end connection was not kept: waiting for a new one');
      return undefined;
    }
    return {
      ...s,
      lastHandled: this.lastRecord,
      connFd,
      channelFd: take(s.channel),
      regions: s.regions.map((r) => ({ ...r, fd: take(r.fd) })),
      rings: s.rings.map((r) => {
        const { kick, call, err, ...rest } = r;
        return {
          ...rest,
          kickFd: take(kick),
          callFd: take(call),
          errFd: take(err),
        };
      }),
    };
  }

  /** Closes what the previous process left and nothing uses now, and forgets it in the holder. */
  dropUnused(): void {
    for (const [name, fd] of this.inherited) {
      closeQuietly(fd);
      this.holder.remove(this.fullName(name));
      this.log.info('dropped a descriptor the previous process kept and nothing uses now', { name });
    }
    this.inherited.clear();
  }

  /** Starts following `device` and `backend` (call after restoring them). */
  follow(device: BalloonDevice, backend: VhostUserBackend, policy: () => { mode: Mode; operatorPages: number }): void {
    this.device = device;
    this.backend = backend;
    this.policy = policy;
    // `actual` changes only through SET_CONFIG, which afterMessage saves.
    const changed = (): void => {
      this.sessionTail = undefined;
      this.save();
    };
    // A new target (the policy's answer to every pressure message) changes the device part
    // only: the session part (its descriptors named, each compared with kcmp) is reused. The one
    // session field it touches, configChangePending, a resume sets anyway.
    device.on('target', () => this.save());
    device.on('reset', changed);
    device.on('connection', changed);
    backend.onSession(changed);
    this.save();
  }

  /**
   * A front-end message was handled (SessionOptions.onHandled): the state it changed is written
   * (the session part too unless it was a config write), then its record. Requests that only
   * read write the record alone.
   */
  afterMessage(request: number, last: NonNullable<SessionImage['lastHandled']>): void {
    if (!READ_ONLY_REQUESTS.has(request)) {
      if (request !== FrontendRequest.SET_CONFIG) this.sessionTail = undefined;
      this.save();
    }
    try {
      this.state.writeRecord(JSON.stringify(last));
    } catch (err) {
      this.failed(err);
    }
  }

  setLogger(log: Logger): void {
    this.log = log;
  }

  /**
   * Writes the current state, storing new descriptors first and forgetting the ones no longer
   * used after. A failure is logged (once a minute) and the VM carries on, but a restart would
   * lose what was not written: counted in `errors`.
   */
  save(): void {
    const device = this.device;
    const backend = this.backend;
    if (device === undefined || backend === undefined) return;
    try {
      // The session part is written again as it was unless something in it changed (a new target,
      // the policy's answer to every pressure message, does not): no descriptor is compared then.
      const fresh = this.sessionTail === undefined ? this.nameSession(backend) : undefined;
      const sessionTail = fresh === undefined ? this.sessionTail! : Buffer.from(`,"session":${fresh.json}}`, 'utf8');
      const head: Omit<VmStateDoc, 'session'> = {
        version: 1,
        vm: this.vm,
        nextName: this.nextName,
        ...this.policy(),
        device: device.image(),
      };
      this.state.write(JSON.stringify(head).slice(0, -1), sessionTail);
      this.sessionTail = sessionTail;
      if (fresh !== undefined) {
        // Only now that no state names them: what the session let go of.
        for (const [full, copy] of [...this.entries]) {
          if (fresh.used.has(full)) continue;
          this.holder.remove(full);
          closeQuietly(copy);
          this.entries.delete(full);
        }
        this.hint = fresh.hint;
      }
      this.broken = false;
    } catch (err) {
      this.failed(err);
    }
  }

  /**
   * The session image (and the listening socket) with descriptor names instead of numbers, as
   * JSON. A descriptor not stored yet is stored (before any state names it) under a new name.
   */
  private nameSession(backend: VhostUserBackend): { json: string; used: Set<string>; hint: Map<number, string> } {
    const used = new Set<string>();
    const hint = new Map<number, string>();
    const name = (fd: number, role: string): string | null => {
      if (fd < 0) return null;
      let full = this.nameOf(fd);
      if (full === undefined) {
        full = this.fullName(role === 'listen' ? LISTEN_NAME : `${role}.${this.nextName++}`);
        this.holder.store(full, [fd]);
        this.keep(full, fd);
      }
      used.add(full);
      hint.set(fd, full);
      return full.slice(this.vm.length + 1);
    };
    if (backend.listener >= 0) name(backend.listener, 'listen');
    const session = backend.current;
    let named: NamedSessionImage | null = null;
    const image = session === undefined || session.isClosed ? undefined : session.image();
    if (image !== undefined) {
      const { connFd, channelFd, regions, rings, lastHandled: _recordedApart, ...rest } = image;
      named = {
        ...rest,
        conn: name(connFd, 'conn')!,
        channel: name(channelFd, 'channel'),
        regions: regions.map((r, i) => ({ ...r, fd: name(r.fd, `mem${i}`)! })),
        rings: rings.map((r) => {
          const { kickFd, callFd, errFd, ...ring } = r;
          return {
            ...ring,
            kick: name(kickFd, `kick${r.index}`),
            call: name(callFd, `call${r.index}`),
            err: name(errFd, `err${r.index}`),
          };
        }),
      };
    }
    return { json: JSON.stringify(named), used, hint };
  }

  private failed(err: unknown): void {
    this.broken = true;
    this.errors++;
    this.onError(ErrorCode.RESTART_STATE);
    if (this.errorLog.take() !== undefined)
      this.log.error('cannot record the state a restart needs: a restart now would drop this VM', {
        error: errorMessage(err),
      });
  }

  /** State writes that failed (a restart at that moment would have lost the VM). */
  errors = 0;

  /** Whether the last write failed. */
  get failing(): boolean {
    return this.broken;
  }

  /**
   * The VM is removed from the daemon (a reload, or a stop that ends its VMs): everything it
   * stored is forgotten by the holder, and the memfds are closed.
   */
  forget(): void {
    for (const [full, copy] of this.entries) {
      this.holder.remove(full);
      closeQuietly(copy);
    }
    this.entries.clear();
    this.holder.remove(this.fullName(STATE_NAME));
    this.holder.remove(this.fullName(PAGES_NAME));
    this.dropUnused();
    this.state.close();
    this.bitmap.close();
  }

  /** Every descriptor a successor needs, by full name (a takeover hands these over). */
  descriptors(): NamedFd[] {
    const out: NamedFd[] = [
      { name: this.fullName(STATE_NAME), fd: this.state.fd },
      { name: this.fullName(PAGES_NAME), fd: this.bitmap.fd },
    ];
    for (const [full, copy] of this.entries) out.push({ name: full, fd: copy });
    return out;
  }
}

/** Groups descriptors named `<vm>.<rest>` by VM; other names are returned apart. */
export function groupByVm(
  fds: readonly NamedFd[],
  vms: readonly string[],
): {
  byVm: Map<string, Map<string, number>>;
  other: NamedFd[];
} {
  const byVm = new Map<string, Map<string, number>>();
  const other: NamedFd[] = [];
  // The longest matching VM name wins ("a.b" over "a" for "a.b.state").
  const names = [...vms].sort((a, b) => b.length - a.length);
  for (const f of fds) {
    const vm = names.find((n) => f.name.startsWith(`${n}.`));
    if (vm === undefined) {
      other.push(f);
      continue;
    }
    let m = byVm.get(vm);
    if (m === undefined) byVm.set(vm, (m = new Map<string, number>()));
    m.set(f.name.slice(vm.length + 1), f.fd);
  }
  return { byVm, other };
}
