/**
 * A model of Linux's virtio_balloon driver (and of the 2014 RFC's message queue) running over the
 * test front-end, with a model of the guest's page allocator whose pages live in the real memfd:
 * pages the guest uses are written, so host memory use is real and measurable.
 *
 * What it does, as Linux does: negotiates the features it knows; numbers queues densely over the
 * negotiated features (stats, reporting, message); moves `actual` toward `num_pages` in buffers
 * of at most 256 PFNs, waiting for each acknowledgement and writing `actual` to config after
 * each; keeps one stats buffer filled; reports free 2 MiB blocks; deflates 256 pages by itself
 * when it runs out of memory if DEFLATE_ON_OOM was negotiated ("stock" mode), or sends a
 * pressure message, stops inflating, waits for the acknowledgement and re-reads the target
 * ("seed" mode). Out of memory with nothing to give, it "OOM-kills" (counts and fails the
 * allocation).
 */
import { VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC } from '../vhost/constants';
import { SplitRingDriver } from './driver';
import { TestFrontend } from './frontend';
import { GuestRam } from './guest-ram';

const PAGE = 4096;
const PFNS_MAX = 256;
/** Linux's VIRTIO_BALLOON_OOM_NR_PAGES: pages deflated per OOM notification. */
const OOM_NR_PAGES = 256;
/** Linux's page reporting: ranges per request and minimum order (pageblock, 2 MiB). */
const REPORTING_CAPACITY = 32;
const REPORTING_PAGES = 512;
/** Guest memory below this is the "kernel": rings, buffers, never allocated or ballooned. */
const RESERVED_BYTES = 4 * 1024 * 1024;

const F = {
  MUST_TELL_HOST: 0,
  STATS_VQ: 1,
  DEFLATE_ON_OOM: 2,
  REPORTING: 5,
};

enum PageState {
  Reserved = 0,
  Free = 1,
  Used = 2,
  Balloon = 3,
}

export interface BalloonGuestOptions {
  /** 'stock': a Linux driver that knows nothing of the message queue; 'seed': the RFC's driver. */
  mode: 'stock' | 'seed';
  /** The message-queue bit this driver knows (seed mode): 20 (vballoon) or 2 (the RFC). */
  messageBit?: number;
  ramBytes?: number;
  configSize?: number;
  numQueues: number;
  queueSize?: number;
  /** Do not accept these features even if offered. */
  refuse?: number[];
  /** How long an allocation waits for the host after a pressure message before OOM (ms). */
  pressureWaitMs?: number;
  /** Guest RAM to use (a QEMU that reconnects keeps its memory); created when omitted. */
  ram?: GuestRam;
  /** How long the front-end waits for a reply (QEMU waits forever; default 5 s). */
  replyTimeoutMs?: number;
}

/** A simple async mutex (Linux's balloon_lock). */
class Mutex {
  private tail: Promise<void> = Promise.resolve();
  run<T>(fn: () => Promise<T>): Promise<T> {
    const result = this.tail.then(fn);
    this.tail = result.then(
      () => undefined,
      () => undefined,
    );
    return result;
  }
}

export class BalloonGuest {
  readonly fe: TestFrontend;
  acked = 0n;
  /** Queue index by role, as this driver numbered them. */
  readonly queues = new Map<string, number>();
  targetPages = 0;
  actualPages = 0;
  oomKills = 0;
  allocStalls = 0;
  pressureMessages = 0;
  oomDeflates = 0;
  majorFaults = 0;
  minorFaults = 0;
  /** Targets read right after each pressure acknowledgement (what the seed's driver sees). */
  readonly targetsAfterPressure: Array<{ target: number; actual: number }> = [];
  private readonly state: Uint8Array;
  private readonly free: number[] = [];
  private readonly used: number[] = [];
  private readonly balloon: number[] = [];
  private readonly reported = new Set<number>();
  private readonly opts: Required<Omit<BalloonGuestOptions, 'refuse' | 'ram' | 'replyTimeoutMs'>> & {
    refuse: number[];
  };
  private readonly lock = new Mutex();
  private config: Uint8Array = new Uint8Array(8);
  private inflateBuf = 0;
  private deflateBuf = 0;
  private messageBuf = 0;
  private statsBuf = 0;
  private underPressure = false;
  /** vmpressure fired: the worker sends the message before any other balloon work. */
  private pressurePending = false;
  private stopped = false;
  private statsMuted = false;
  private wake: (() => void) | undefined;
  private worker: Promise<void> | undefined;
  private statsLoop: Promise<void> | undefined;
  private error: Error | undefined;

  private constructor(fe: TestFrontend, opts: BalloonGuestOptions) {
    this.fe = fe;
    this.opts = {
      messageBit: 20,
      ramBytes: fe.ram.sizeBytes,
      configSize: 8,
      queueSize: 64,
      refuse: [],
      pressureWaitMs: 2000,
      ...opts,
    };
    const pages = Math.floor(fe.ram.sizeBytes / PAGE);
    this.state = new Uint8Array(pages);
    for (const r of fe.ram.memory.regionList) {
      for (let g = r.guestPhysAddr; g < r.guestPhysAddr + r.sizeBytes; g += PAGE) {
        const pfn = g / PAGE;
        if (pfn >= pages || g < RESERVED_BYTES) continue;
        this.state[pfn] = PageState.Free;
      }
    }
    // The allocator hands out the highest free pages first (as the buddy allocator tends to),
    // so balloon PFNs come in long runs.
    for (let pfn = 0; pfn < pages; pfn++) if (this.state[pfn] === PageState.Free) this.free.push(pfn);
  }

  /**
   * Connects to a back-end, negotiates like the driver's probe, starts the queues (DRIVER_OK)
   * and starts the balloon worker.
   */
  static async boot(socketPath: string, opts: BalloonGuestOptions): Promise<BalloonGuest> {
    const fe = TestFrontend.connect(socketPath, {
      numQueues: opts.numQueues,
      configSize: opts.configSize ?? 8,
      ramBytes: opts.ramBytes ?? 64 * 1024 * 1024,
      queueSize: opts.queueSize ?? 64,
      layout: 'flat',
      ...(opts.ram === undefined ? {} : { ram: opts.ram }),
      ...(opts.replyTimeoutMs === undefined ? {} : { replyTimeoutMs: opts.replyTimeoutMs }),
    });
    const g = new BalloonGuest(fe, opts);
    try {
      await g.probe();
    } catch (err) {
      fe.close();
      throw err;
    }
    return g;
  }

  private knows(bitNo: number): boolean {
    if (this.opts.refuse.includes(bitNo)) return false;
    if (this.opts.mode === 'seed' && bitNo === this.opts.messageBit) return true;
    if (this.opts.mode === 'seed' && this.opts.messageBit === F.DEFLATE_ON_OOM && bitNo === F.DEFLATE_ON_OOM)
      return false;
    return [F.MUST_TELL_HOST, F.STATS_VQ, F.DEFLATE_ON_OOM, F.REPORTING].includes(bitNo);
  }

  has(bitNo: number): boolean {
    return (this.acked & (1n << BigInt(bitNo))) !== 0n;
  }

  private async probe(): Promise<void> {
    const fe = this.fe;
    await fe.realize();
    let acked = fe.backendFeatures & (VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX | VIRTIO_RING_F_INDIRECT_DESC);
    for (let b = 0; b < 24; b++) if (fe.backendFeatures & (1n << BigInt(b)) && this.knows(b)) acked |= 1n << BigInt(b);
    this.acked = acked;
    // Dense numbering over negotiated features: inflate, deflate, stats, reporting, message.
    const roles = ['inflate', 'deflate'];
    if (this.has(F.STATS_VQ)) roles.push('stats');
    if (this.has(F.REPORTING)) roles.push('reporting');
    if (this.opts.mode === 'seed' && this.has(this.opts.messageBit)) roles.push('message');
    roles.forEach((r, i) => this.queues.set(r, i));
    this.config = await fe.getConfig(0, this.opts.configSize);
    this.targetPages = this.u32(0);
    const ram = fe.ram;
    this.inflateBuf = ram.alloc(PFNS_MAX * 4);
    this.deflateBuf = ram.alloc(PFNS_MAX * 4);
    this.messageBuf = ram.alloc(4);
    this.statsBuf = ram.alloc(16 * 10);
    await fe.start(
      acked,
      roles.map((_, i) => i),
    );
    // The stats buffer goes in at probe, filled, as Linux does.
    if (this.has(F.STATS_VQ)) {
      this.fillStats();
      this.driver('stats').addBuffer([{ addr: this.statsBuf, len: 160 }]);
      this.driver('stats').kick();
      this.statsLoop = this.runStats();
    }
    this.worker = this.runWorker();
  }

  private u32(at: number): number {
    return new DataView(this.config.buffer, this.config.byteOffset).getUint32(at, true);
  }

  driver(role: string): SplitRingDriver {
    const index = this.queues.get(role);
    const d = index === undefined ? undefined : this.fe.drivers.get(index);
    if (d === undefined) throw new Error(`no ${role} queue`);
    return d;
  }

  /** Pages the guest can still allocate. */
  get freePages(): number {
    return this.free.length;
  }

  get usedPages(): number {
    return this.used.length;
  }

  get balloonPages(): number {
    return this.balloon.length;
  }

  /** Throws if the background worker failed. */
  check(): void {
    if (this.error !== undefined) throw this.error;
  }

  private poke(): void {
    const w = this.wake;
    this.wake = undefined;
    w?.();
  }

  /** The balloon worker: follows config changes, inflates/deflates toward the target. */
  private async runWorker(): Promise<void> {
    try {
      let seen = this.fe.configChanges;
      while (!this.stopped) {
        if (this.pressurePending && this.queues.has('message')) {
          this.pressurePending = false;
          await this.lock.run(() => this.tellHostPressure());
          seen = this.fe.configChanges; // the target was just re-read
          continue;
        }
        if (this.fe.configChanges !== seen) {
          seen = this.fe.configChanges;
          await this.readTarget();
        }
        const diff = this.targetPages - this.actualPages;
        let progressed = false;
        if (diff > 0 && !this.underPressure && !this.pressurePending)
          progressed = await this.lock.run(() => this.inflate(Math.min(PFNS_MAX, diff)));
        else if (diff < 0) progressed = await this.lock.run(() => this.deflate(Math.min(PFNS_MAX, -diff)));
        if (progressed) continue;
        // Sleep until a config change or a poke (pressure handled, memory freed), or retry later.
        await new Promise<void>((resolve) => {
          this.wake = resolve;
          const t = setTimeout(resolve, diff > 0 ? 50 : 200);
          t.unref();
          this.fe.waitConfigChange(seen + 1, 60_000).then(resolve, () => undefined);
        });
      }
    } catch (err) {
      if (!this.stopped) this.error = err as Error;
    }
  }

  private async readTarget(): Promise<void> {
    this.config = await this.fe.getConfig(0, this.opts.configSize);
    this.targetPages = this.u32(0);
  }

  private async writeActual(): Promise<void> {
    // QEMU forwards a guest config write as the whole cached config at offset 0.
    const c = this.config.slice();
    new DataView(c.buffer).setUint32(4, this.actualPages, true);
    this.config = c;
    await this.fe.setConfig(0, c);
  }

  private async tellHost(role: 'inflate' | 'deflate', pfns: number[]): Promise<void> {
    const buf = role === 'inflate' ? this.inflateBuf : this.deflateBuf;
    const bytes = new Uint8Array(pfns.length * 4);
    const v = new DataView(bytes.buffer);
    pfns.forEach((p, i) => v.setUint32(i * 4, p, true));
    this.fe.ram.memory.write(buf, bytes);
    const d = this.driver(role);
    d.addBuffer([{ addr: buf, len: bytes.length }]);
    d.kick();
    await d.waitUsed(1);
  }

  /** fill_balloon: takes up to `n` free pages; false if none could be taken. */
  private async inflate(n: number): Promise<boolean> {
    const pfns: number[] = [];
    // Prefer free pages; Linux allocates with __GFP_NORETRY so it never steals used memory.
    while (pfns.length < n && this.free.length > 0) pfns.push(this.free.pop()!);
    if (pfns.length === 0) return false;
    for (const p of pfns) {
      this.state[p] = PageState.Balloon;
      this.reported.delete(p);
    }
    await this.tellHost('inflate', pfns);
    this.balloon.push(...pfns);
    this.actualPages += pfns.length;
    await this.writeActual();
    return true;
  }

  /** leak_balloon: gives back up to `n` balloon pages; with MUST_TELL_HOST only after the ack. */
  private async deflate(n: number): Promise<boolean> {
    const pfns = this.balloon.splice(Math.max(0, this.balloon.length - n), n);
    if (pfns.length === 0) return false;
    await this.tellHost('deflate', pfns);
    for (const p of pfns) {
      this.state[p] = PageState.Free;
      this.free.push(p);
    }
    this.actualPages -= pfns.length;
    await this.writeActual();
    this.poke();
    return true;
  }

  /** The seed's tell_host_pressure(): send the message, wait for the ack, re-read the target. */
  private async tellHostPressure(): Promise<void> {
    this.underPressure = true;
    try {
      const v = new Uint8Array(4);
      new DataView(v.buffer).setUint32(0, 1, true);
      this.fe.ram.memory.write(this.messageBuf, v);
      const d = this.driver('message');
      d.addBuffer([{ addr: this.messageBuf, len: 4 }]);
      d.kick();
      await d.waitUsed(1);
      this.pressureMessages++;
      // The target must already be the new one when the message is acknowledged.
      await this.readTarget();
      this.targetsAfterPressure.push({ target: this.targetPages, actual: this.actualPages });
    } finally {
      this.underPressure = false;
      this.poke();
    }
  }

  /**
   * Sends one pressure message now, outside the balloon thread (benchmarks: the host's
   * acknowledgement latency while the balloon moves), and resolves with the kick-to-used time in
   * nanoseconds. Seed mode with the message queue negotiated; not while eat() may send one.
   */
  async measurePressureAck(): Promise<number> {
    const d = this.driver('message');
    const v = new Uint8Array(4);
    new DataView(v.buffer).setUint32(0, 1, true);
    this.fe.ram.memory.write(this.messageBuf, v);
    const t0 = process.hrtime.bigint();
    d.addBuffer([{ addr: this.messageBuf, len: 4 }]);
    d.kick();
    await d.waitUsed(1);
    this.pressureMessages++;
    return Number(process.hrtime.bigint() - t0);
  }

  /** Writes `pfn` in guest RAM (the host allocates it). */
  private touch(pfn: number, value: number): void {
    this.fe.ram.memory.writeU32(pfn * PAGE, value);
  }

  /**
   * The guest's workload allocates and writes `bytes`. Under memory pressure it sends a pressure
   * message (seed mode) or deflates through DEFLATE_ON_OOM (stock mode) and waits; if nothing
   * helps it "OOM-kills": the allocation fails and oomKills counts it.
   * @returns the pages obtained.
   */
  async eat(bytes: number): Promise<{ pages: number; oomKilled: boolean }> {
    const want = Math.ceil(bytes / PAGE);
    let got = 0;
    let waitedSince: number | undefined;
    // Bounded: each iteration takes a page, or waits for the host with a deadline.
    while (got < want) {
      this.check();
      const pfn = this.free.pop();
      if (pfn !== undefined) {
        this.state[pfn] = PageState.Used;
        this.reported.delete(pfn);
        this.used.push(pfn);
        this.touch(pfn, 0xeaeaeaea);
        this.minorFaults++;
        got++;
        waitedSince = undefined;
        continue;
      }
      this.allocStalls++;
      if (this.opts.mode === 'seed' && this.queues.has('message')) {
        // vmpressure: flag it and wake the balloon thread, which tells the host (the RFC).
        if (waitedSince === undefined && !this.underPressure) {
          this.pressurePending = true;
          this.poke();
        }
        waitedSince ??= Date.now();
        if (Date.now() - waitedSince > this.opts.pressureWaitMs) break;
        await new Promise((r) => setTimeout(r, 10));
        continue;
      }
      if (this.has(F.DEFLATE_ON_OOM) && this.balloon.length > 0) {
        // The OOM notifier: deflate without changing the target.
        this.oomDeflates++;
        await this.lock.run(() => this.deflate(OOM_NR_PAGES));
        continue;
      }
      waitedSince ??= Date.now();
      if (Date.now() - waitedSince > this.opts.pressureWaitMs) break;
      await new Promise((r) => setTimeout(r, 10));
    }
    const oomKilled = got < want;
    if (oomKilled) this.oomKills++;
    return { pages: got, oomKilled };
  }

  /** Frees `bytes` of what eat() took (the memory stays resident on the host: it was written). */
  release(bytes: number): number {
    const n = Math.min(this.used.length, Math.ceil(bytes / PAGE));
    for (let i = 0; i < n; i++) {
      const pfn = this.used.pop()!;
      this.state[pfn] = PageState.Free;
      this.free.push(pfn);
    }
    this.poke();
    return n;
  }

  /** Writes every free page (a guest that used all its memory once, e.g. for page cache). */
  touchFree(): void {
    for (const pfn of this.free) this.touch(pfn, 0x5a5a5a5a);
  }

  /** Deflated pages are the guest's again: writing them works and costs host memory again. */
  touchAll(): void {
    for (let pfn = 0; pfn < this.state.length; pfn++)
      if (this.state[pfn] === PageState.Free || this.state[pfn] === PageState.Used) this.touch(pfn, pfn);
  }

  /** Reads back a page's first word (to check guest memory contents). */
  peek(pfn: number): number {
    return this.fe.ram.memory.readU32(pfn * PAGE);
  }

  /** PFNs currently in the balloon. */
  balloonPfns(): readonly number[] {
    return this.balloon;
  }

  /**
   * Free page reporting: reports free, aligned 2 MiB blocks not reported yet, at most 32 per
   * request, and waits for each acknowledgement. Returns the bytes reported.
   */
  async reportFree(): Promise<number> {
    if (!this.queues.has('reporting')) return 0;
    const blocks: number[] = [];
    for (let pfn = 0; pfn + REPORTING_PAGES <= this.state.length; pfn += REPORTING_PAGES) {
      let ok = !this.reported.has(pfn);
      for (let i = 0; ok && i < REPORTING_PAGES; i++) ok = this.state[pfn + i] === PageState.Free;
      if (ok) blocks.push(pfn);
    }
    const d = this.driver('reporting');
    let reported = 0;
    for (let i = 0; i < blocks.length; i += REPORTING_CAPACITY) {
      const batch = blocks.slice(i, i + REPORTING_CAPACITY);
      // Isolated from the allocator while reported (as Linux does).
      const taken = new Set(batch.flatMap((b) => Array.from({ length: REPORTING_PAGES }, (_, k) => b + k)));
      const kept = this.free.filter((p) => !taken.has(p));
      this.free.length = 0;
      this.free.push(...kept);
      d.addBuffer(batch.map((b) => ({ addr: b * PAGE, len: REPORTING_PAGES * PAGE, writable: true })));
      d.kick();
      await d.waitUsed(1);
      for (const b of batch) this.reported.add(b);
      this.free.unshift(...taken);
      reported += batch.length * REPORTING_PAGES * PAGE;
    }
    return reported;
  }

  /** The stats Linux would report now. */
  statsEntries(): Array<[number, number]> {
    const total = (this.state.length - (this.has(F.DEFLATE_ON_OOM) ? 0 : this.balloon.length)) * PAGE;
    const free = this.free.length * PAGE;
    return [
      [0, 0],
      [1, 0],
      [2, this.majorFaults],
      [3, this.minorFaults],
      [4, free],
      [5, total],
      [6, free],
      [7, 0],
      [8, 0],
      [9, 0],
      [10, this.oomKills],
      [11, this.allocStalls],
      [12, 0],
      [13, 0],
      [14, 0],
      [15, 0],
    ];
  }

  private fillStats(): void {
    const bytes = new Uint8Array(160);
    const v = new DataView(bytes.buffer);
    this.statsEntries().forEach(([tag, value], i) => {
      v.setUint16(i * 10, tag, true);
      v.setBigUint64(i * 10 + 2, BigInt(value), true);
    });
    this.fe.ram.memory.write(this.statsBuf, bytes);
  }

  /** Answers each stats request: refill the buffer and give it back. */
  private async runStats(): Promise<void> {
    const d = this.driver('stats');
    try {
      while (!this.stopped) {
        await d.waitUsed(1, 3_600_000);
        if (this.stopped) return;
        if (this.statsMuted) continue; // keeps the buffer: the host's request goes unanswered
        this.fillStats();
        d.addBuffer([{ addr: this.statsBuf, len: 160 }]);
        d.kick();
      }
    } catch (err) {
      if (!this.stopped) this.error = err as Error;
    }
  }

  /**
   * QMP `stop` then `cont` as QEMU 11.1 sends them (TestFrontend.pause/resume): the driver is not
   * told and keeps going; whatever it adds or kicks meanwhile is served after the resume, as a
   * paused guest's pending buffers are. `whilePaused` runs between the two (e.g. a new target).
   * Deliberately not under the balloon lock: a pause lands in the middle of an inflate.
   * `sendStatus`: SET_STATUS 0 after the stop, as QEMUs before 11.1 do.
   */
  async pauseResume(whilePaused?: () => Promise<void> | void, sendStatus = false): Promise<Map<number, number>> {
    const bases = await this.fe.stop(sendStatus);
    await whilePaused?.();
    await this.fe.resume(this.acked, bases);
    return bases;
  }

  /** From now on the guest does not answer stats requests (a hung stats handler). */
  muteStats(): void {
    this.statsMuted = true;
  }

  /** Resolves when the guest has read `target` and reached it. */
  async reach(target: number, timeoutMs = 10_000): Promise<void> {
    const start = Date.now();
    while (this.targetPages !== target || this.actualPages !== target) {
      this.check();
      if (Date.now() - start > timeoutMs) {
        throw new Error(`balloon did not reach ${target}: actual ${this.actualPages}, target ${this.targetPages}`);
      }
      await new Promise((r) => setTimeout(r, 5));
    }
  }

  async close(): Promise<void> {
    this.stopped = true;
    this.poke();
    this.fe.close();
    await Promise.allSettled([this.worker, this.statsLoop].filter((p) => p !== undefined));
  }
}
