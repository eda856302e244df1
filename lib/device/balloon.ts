/**
 * The virtio-balloon device (VIRTIO 1.2 section 5.5, plus the 2014 RFC's message queue) as a
 * vhost-user device: inflate with real host reclaim (hole punching in the guest memory file),
 * deflate, the stats queue, the pressure message queue, and free page reporting.
 *
 * Guest input never throws out of here: bad buffers are acknowledged, counted by reason and
 * logged; only an impossible ring state stops a queue (lib/vhost).
 *
 * Ordering of reclaim: an inflate is acknowledged at once and its pages are discarded in batches
 * (a few milliseconds later, or when 4 MiB are pending). A ballooned page may be touched by the
 * guest again only after a deflate of it was acknowledged, after a free page report was
 * acknowledged, or after a device reset; every pending discard is carried out synchronously
 * before any of those (the deflate and reporting handlers, queueStopped, which runs inside
 * GET_VRING_BASE before QEMU gets its reply, reset and detach). So no discard can ever hit a page
 * the guest uses again.
 */
import { EventEmitter } from 'node:events';
import { Clock, systemClock, TimerHandle } from '../clock';
import { ErrorCode, VballoonError, VirtqueueError } from '../errors';
import { Logger, NullLogger } from '../log';
import { native } from '../native';
import { VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC } from '../vhost/constants';
import { DeviceHost, VhostUserDevice, Vring } from '../vhost/device';
import { ChainHandler, processRing } from '../vhost/process';
import { Descriptor } from '../virtio/virtqueue';
import {
  BALLOON_PAGE_BYTES,
  bit,
  CONFIG_ACTUAL,
  CONFIG_NUM_PAGES,
  CONFIG_SIZES,
  MESSAGE_BYTES,
  VIRTIO_BALLOON_ARRAY_PFNS_MAX,
  VIRTIO_BALLOON_F_DEFLATE_ON_OOM,
  VIRTIO_BALLOON_F_MESSAGE_VQ,
  VIRTIO_BALLOON_F_MESSAGE_VQ_SEED,
  VIRTIO_BALLOON_F_MUST_TELL_HOST,
  VIRTIO_BALLOON_F_PAGE_REPORTING,
  VIRTIO_BALLOON_F_STATS_VQ,
  VIRTIO_BALLOON_MSG_PRESSURE,
} from './constants';
import { numQueuesFor, QueueRole, queueLayout } from './layout';
import { PageRun, PageTracker } from './page-tracker';
import { alignedFileRange, DiscardRange, planDiscards } from './reclaim';
import { namedStats, parseStats } from './stats';

/** Bytes of PFNs one inflate/deflate buffer may carry (256 le32 PFNs, as Linux sends). */
const MAX_PFN_BUFFER_BYTES = VIRTIO_BALLOON_ARRAY_PFNS_MAX * 4;
/** Bytes of one stats buffer read at most (64 entries of 10 bytes; Linux sends 16). */
const MAX_STATS_BUFFER_BYTES = 640;
/**
 * Inflate discards are batched: the ack goes out at once and the holes are punched when this
 * much is pending, or DISCARD_BATCH_DELAY_MS after the first pending page, or before anything
 * that could let the guest touch a pending page (see the ordering note in the file header).
 * Merged runs amortise the kernel's page-table and TLB work; the 4 MiB bound keeps one flush to
 * about a millisecond of kernel time, so one VM's reclaim does not stall the others' kicks.
 */
const DISCARD_BATCH_BYTES = 4 * 1024 * 1024;
const DISCARD_BATCH_DELAY_MS = 2;
/** Log lines per invalid-input reason before the device goes quiet about it (still counted). */
const MAX_LOGS_PER_REASON = 10;

/** Why a guest buffer or request was invalid (a label of the invalid-input counter). */
export type InvalidReason =
  | 'pfn_outside_ram'
  | 'too_many_pfns'
  | 'empty_buffer'
  | 'unaligned_buffer'
  | 'writable_buffer'
  | 'readable_buffer'
  | 'stats_partial_entry'
  | 'stats_too_long'
  | 'stats_extra_buffer'
  | 'message_size'
  | 'message_unknown_type'
  | 'kick_unused_queue'
  | 'bad_chain';

export interface BalloonOptions {
  /** Offer VIRTIO_BALLOON_F_MUST_TELL_HOST (default on). */
  mustTellHost?: boolean;
  /** Offer the stats queue (default on). */
  statsQueue?: boolean;
  /** Offer VIRTIO_BALLOON_F_DEFLATE_ON_OOM (default on; never with the seed's message bit). */
  deflateOnOom?: boolean;
  /** Offer free page reporting (default on). */
  pageReporting?: boolean;
  /** Offer the message (pressure) queue (default on). */
  messageQueue?: boolean;
  /** 'vballoon' (bit 20, default) or 'seed' (bit 2, as the 2014 RFC's driver expects). */
  messageBit?: 'vballoon' | 'seed';
  /** Config space bytes QEMU is given (`config_size`): 8 (default), 12 or 16. */
  configSize?: 8 | 12 | 16;
  /** Largest queue size accepted. */
  maxQueueSize?: number;
  /** How often to ask the guest for fresh stats (default 5 s; at least 100 ms). */
  statsIntervalMs?: number;
  /** Stats are stale when a request is not answered within this (default 2 x interval). */
  statsTimeoutMs?: number;
  /** Track and acknowledge ballooned pages but do not give them back to the host (VFIO, post-copy). */
  inhibitDiscard?: boolean;
  clock?: Clock;
  log?: Logger;
}

export interface PressureEvent {
  /** The message type (1 = pressure). */
  type: number;
  atMs: number;
  actualPages: number;
  targetPages: number;
}

export interface GuestStatsSnapshot {
  /** Values by name (`tag_<n>` for unknown tags). */
  values: Record<string, number>;
  /** Values by tag number. */
  byTag: Map<number, number>;
  /** Host wall-clock time of the last update (ms since the epoch), or undefined before any. */
  updatedAtMs: number | undefined;
  /** Milliseconds since the last update, or undefined. */
  ageMs: number | undefined;
  /** A request went unanswered for longer than the timeout. */
  stale: boolean;
}

export interface QueueCounters {
  requests: number;
  pages: number;
}

export interface BalloonSnapshot {
  connected: boolean;
  offeredFeatures: bigint;
  ackedFeatures: bigint | undefined;
  layout: QueueRole[];
  numQueues: number;
  configSize: number;
  targetPages: number;
  actualPages: number;
  balloonedPages: number;
  guestRamBytes: number | undefined;
  /** Bytes of the guest memory files the host really holds (st_blocks), or undefined offline. */
  hostResidentBytes: number | undefined;
  /** Bytes given back to the host by successful hole punches (inflate and reporting). */
  reclaimedBytes: number;
  discardCalls: number;
  discardErrors: number;
  discardInhibited: boolean;
  inflate: QueueCounters & { alreadyBallooned: number };
  deflate: QueueCounters & { notBallooned: number; unrequested: number };
  reporting: { requests: number; bytes: number };
  statsQueue: { updates: number; requests: number; timeouts: number };
  messages: { total: number; pressure: number; unknown: number };
  invalid: Partial<Record<InvalidReason, number>>;
  stats: GuestStatsSnapshot;
  ackLatency: { count: number; sumSeconds: number; lastSeconds: number | undefined; maxSeconds: number };
  trackerBytes: number;
  configChanges: number;
}

/** Events: 'pressure' (PressureEvent), 'stats' (GuestStatsSnapshot), 'stats-timeout',
 * 'actual' ({ actualPages, previous }), 'target' ({ targetPages, previous, reason }),
 * 'deflate' ({ pages, unrequested }), 'invalid' ({ reason, detail }), 'ack' ({ seconds }),
 * 'reset', 'connection' (boolean). Listeners run synchronously. */
export class BalloonDevice extends EventEmitter implements VhostUserDevice {
  readonly numQueues: number;
  readonly maxQueueSize: number;
  readonly configSize: number;
  readonly messageBit: number;
  private readonly offered: bigint;
  private readonly clock: Clock;
  private log: Logger;
  private readonly baseLog: Logger;
  private readonly statsIntervalMs: number;
  private readonly statsTimeoutMs: number;
  private acked: bigint | undefined;
  private layout: QueueRole[] = [];
  private host: DeviceHost | undefined;
  private readonly vrings = new Map<number, Vring>();
  private readonly tracker = new PageTracker();
  private targetPages = 0;
  /** The driver-written `actual` field, byte for byte (partial writes land here). */
  private actualBytes: Uint8Array = new Uint8Array(4);
  private configChangePending = false;
  private inhibit: boolean;
  private lastGuestRamBytes: number | undefined;
  /** Identity of the files behind guest RAM last time: a new set means a new guest. */
  private memoryIdentity: string | undefined;
  /** Newly ballooned runs whose holes are not punched yet (see the ordering note above). */
  private pendingRuns: PageRun[] = [];
  private pendingPages = 0;
  private pendingTimer: TimerHandle | undefined;
  // stats queue
  private statsHeld: number | undefined;
  private statsTimer: TimerHandle | undefined;
  private statsTimeout: TimerHandle | undefined;
  private statsOutstanding = false;
  private statsValues = new Map<number, number>();
  private statsUpdatedWall: number | undefined;
  private statsUpdatedMono: number | undefined;
  private statsStale = false;
  private readonly counters = {
    reclaimedBytes: 0,
    discardCalls: 0,
    discardErrors: 0,
    inflate: { requests: 0, pages: 0, alreadyBallooned: 0 },
    deflate: { requests: 0, pages: 0, notBallooned: 0, unrequested: 0 },
    reporting: { requests: 0, bytes: 0 },
    statsQueue: { updates: 0, requests: 0, timeouts: 0 },
    messages: { total: 0, pressure: 0, unknown: 0 },
    invalid: {} as Partial<Record<InvalidReason, number>>,
    ack: { count: 0, sumSeconds: 0, lastSeconds: undefined as number | undefined, maxSeconds: 0 },
    configChanges: 0,
  };

  constructor(options: BalloonOptions = {}) {
    super();
    this.clock = options.clock ?? systemClock;
    this.baseLog = options.log ?? new NullLogger();
    this.log = this.baseLog;
    const seedBit = options.messageBit === 'seed';
    this.messageBit = seedBit ? VIRTIO_BALLOON_F_MESSAGE_VQ_SEED : VIRTIO_BALLOON_F_MESSAGE_VQ;
    const message = options.messageQueue ?? true;
    let offered = VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX | VIRTIO_RING_F_INDIRECT_DESC;
    if (options.mustTellHost ?? true) offered |= bit(VIRTIO_BALLOON_F_MUST_TELL_HOST);
    if (options.statsQueue ?? true) offered |= bit(VIRTIO_BALLOON_F_STATS_VQ);
    // The seed's message bit is DEFLATE_ON_OOM's bit: never offer both meanings.
    if ((options.deflateOnOom ?? true) && !(message && seedBit)) offered |= bit(VIRTIO_BALLOON_F_DEFLATE_ON_OOM);
    if (options.pageReporting ?? true) offered |= bit(VIRTIO_BALLOON_F_PAGE_REPORTING);
    if (message) offered |= bit(this.messageBit);
    this.offered = offered;
    this.numQueues = numQueuesFor(offered, this.messageBit);
    this.maxQueueSize = options.maxQueueSize ?? 1024;
    const configSize = options.configSize ?? 8;
    if (!CONFIG_SIZES.includes(configSize)) {
      throw new VballoonError(
        ErrorCode.BALLOON_CONFIG,
        `config size ${configSize} is not one of ${CONFIG_SIZES.join(', ')}`,
      );
    }
    this.configSize = configSize;
    this.statsIntervalMs = options.statsIntervalMs ?? 5000;
    if (!(this.statsIntervalMs >= 100)) {
      throw new VballoonError(ErrorCode.BALLOON_CONFIG, `stats interval ${this.statsIntervalMs} ms is below 100 ms`);
    }
    this.statsTimeoutMs = options.statsTimeoutMs ?? 2 * this.statsIntervalMs;
    this.inhibit = options.inhibitDiscard ?? false;
  }

  // ---- operator-facing -------------------------------------------------------------------------

  /** The balloon target in 4 KiB pages (config `num_pages`). */
  get target(): number {
    return this.targetPages;
  }

  /** The guest's `actual` in 4 KiB pages. */
  get actual(): number {
    return this.actualPages;
  }

  private get actualPages(): number {
    return new DataView(this.actualBytes.buffer, this.actualBytes.byteOffset, 4).getUint32(0, true);
  }

  get connected(): boolean {
    return this.host !== undefined;
  }

  /** Guest RAM in 4 KiB pages, once a front-end has shared memory. */
  get guestRamPages(): number | undefined {
    return this.lastGuestRamBytes === undefined ? undefined : Math.floor(this.lastGuestRamBytes / BALLOON_PAGE_BYTES);
  }

  /**
   * Sets the balloon target. The guest learns it through CONFIG_CHANGE_MSG, sent now if the
   * device runs, else as soon as it does.
   * @throws VballoonError(ERR_BALLOON_TARGET) for a negative, fractional, >32-bit target or one
   *   larger than guest RAM.
   */
  /** Throws ERR_BALLOON_TARGET unless `pages` is a target this device can take. */
  checkTarget(pages: number): void {
    if (!Number.isInteger(pages) || pages < 0 || pages > 0xffffffff) {
      throw new VballoonError(ErrorCode.BALLOON_TARGET, `target ${pages} pages is not an integer in 0..2^32-1`);
    }
    const ram = this.guestRamPages;
    if (ram !== undefined && pages > ram) {
      throw new VballoonError(ErrorCode.BALLOON_TARGET, `target ${pages} pages exceeds guest RAM (${ram} pages)`);
    }
  }

  setTargetPages(pages: number, reason = 'operator'): void {
    this.checkTarget(pages);
    const previous = this.targetPages;
    if (pages === previous) return;
    this.targetPages = pages;
    this.emit('target', { targetPages: pages, previous, reason });
    this.log.info('balloon target changed', { targetPages: pages, previous, reason });
    this.configChangePending = true;
    this.sendConfigChange();
  }

  private sendConfigChange(): void {
    if (this.host === undefined || !this.configChangePending) return;
    this.configChangePending = false;
    this.counters.configChanges++;
    this.host.notifyConfigChange();
  }

  /** Stops (true) or resumes (false) giving ballooned memory back to the host. Resuming
   * discards everything ballooned meanwhile. */
  setDiscardInhibited(inhibited: boolean): void {
    if (inhibited === this.inhibit) return;
    this.inhibit = inhibited;
    this.log.info(inhibited ? 'discard inhibited' : 'discard allowed', { balloonedPages: this.tracker.size });
    if (inhibited) this.dropPendingDiscards();
    else if (this.host !== undefined)
      this.discard(
        planDiscards(
          [...this.tracker.runs()],
          (g) => this.host?.memory.find(g),
          (p, n) => this.tracker.isFull(p, n),
        ),
      );
  }

  get discardInhibited(): boolean {
    return this.inhibit;
  }

  // ---- VhostUserDevice -------------------------------------------------------------------------

  features(): bigint {
    return this.offered;
  }

  setFeatures(acked: bigint): void {
    this.acked = acked;
    this.layout = queueLayout(acked, this.messageBit);
    if (
      (this.offered & bit(VIRTIO_BALLOON_F_MUST_TELL_HOST)) !== 0n &&
      (acked & bit(VIRTIO_BALLOON_F_MUST_TELL_HOST)) === 0n
    ) {
      this.log.info('driver did not accept MUST_TELL_HOST: deflate notices are a courtesy');
    }
    this.log.info('features negotiated', { acked, layout: this.layout.join(',') });
  }

  private configBytes(): Uint8Array {
    const out = new Uint8Array(16);
    const v = new DataView(out.buffer);
    v.setUint32(CONFIG_NUM_PAGES, this.targetPages, true);
    out.set(this.actualBytes, CONFIG_ACTUAL);
    // free_page_hint_cmd_id (8) and poison_val (12) stay 0: FREE_PAGE_HINT and PAGE_POISON are not offered.
    return out.subarray(0, this.configSize);
  }

  readConfig(offset: number, size: number): Uint8Array {
    return this.configBytes().slice(offset, offset + size);
  }

  writeConfig(offset: number, data: Uint8Array, fromMigration: boolean): void {
    const previous = this.actualPages;
    // Only `actual` is driver-writable (poison_val would be, with PAGE_POISON, which we do not
    // offer). Partial and byte-wise writes update the bytes they cover.
    for (let i = 0; i < data.length; i++) {
      const at = offset + i;
      if (at >= CONFIG_ACTUAL && at < CONFIG_ACTUAL + 4) this.actualBytes[at - CONFIG_ACTUAL] = data[i]!;
      else if (fromMigration && at < CONFIG_ACTUAL) {
        // A migration restore may set the device-owned target too.
        const shift = 8 * (at - CONFIG_NUM_PAGES);
        this.targetPages = ((this.targetPages & ~(0xff << shift)) | (data[i] << shift)) >>> 0;
      }
      // Everything else is device-owned (QEMU sends its whole cached config on every write).
    }
    const actual = this.actualPages;
    if (actual !== previous) this.emit('actual', { actualPages: actual, previous });
  }

  attach(host: DeviceHost, log: Logger): void {
    this.host = host;
    this.log = log;
    this.emit('connection', true);
  }

  detach(): void {
    this.flushDiscards();
    this.stopStats();
    this.vrings.clear();
    this.host = undefined;
    this.log = this.baseLog;
    this.emit('connection', false);
  }

  queueReady(vring: Vring): void {
    this.vrings.set(vring.index, vring);
    const memory = this.host?.memory;
    if (memory !== undefined && memory.totalBytes > 0) {
      this.lastGuestRamBytes = memory.totalBytes;
      // A front-end that reconnects (same QEMU) shares the same memory file: the balloon is kept.
      // Different files mean a new QEMU process, whose guest starts with an empty balloon.
      const identity = [...new Set(memory.regionList.map((r) => r.fileId))].sort().join(',');
      if (
        this.memoryIdentity !== undefined &&
        this.memoryIdentity !== identity &&
        (this.tracker.size > 0 || this.actualPages > 0)
      ) {
        this.log.info('new guest memory: emptying the balloon state of the previous guest', {
          balloonedPages: this.tracker.size,
        });
        this.reset();
      }
      this.memoryIdentity = identity;
    }
    // A target set while no front-end (or no running ring) was there goes out now.
    this.sendConfigChange();
    if (this.layout[vring.index] === 'stats') this.scheduleStats();
  }

  queueStopped(index: number): void {
    // Before QEMU gets its GET_VRING_BASE reply (a stop, a reset, a reboot): nothing may remain
    // pending once the guest can run without the balloon.
    this.flushDiscards();
    this.vrings.delete(index);
    if (this.layout[index] === 'stats') this.stopStats();
  }

  reset(): void {
    this.flushDiscards();
    this.tracker.clear();
    this.actualBytes = new Uint8Array(4);
    this.stopStats();
    this.statsValues = new Map();
    this.statsUpdatedWall = undefined;
    this.statsUpdatedMono = undefined;
    this.statsStale = false;
    this.emit('reset');
    this.log.info('device reset: balloon emptied');
  }

  queueKicked(vring: Vring): void {
    const role = this.layout[vring.index];
    if (role === undefined) {
      // A queue that has no role in the negotiated layout: never touch its ring.
      this.invalid('kick_unused_queue', `kick on queue ${vring.index} (layout ${this.layout.join(',')})`);
      return;
    }
    const started = this.clock.now();
    let messages = 0;
    const handler: ChainHandler = {
      onChain: (head, descriptors) => {
        switch (role) {
          case 'inflate':
            this.handleInflate(descriptors);
            return 0;
          case 'deflate':
            this.handleDeflate(descriptors);
            return 0;
          case 'stats':
            return this.handleStats(vring, head, descriptors);
          case 'reporting':
            this.handleReport(descriptors);
            return 0;
          case 'message':
            messages++;
            this.handleMessage(vring, descriptors);
            return 0;
        }
      },
      onBadChain: (_head, error: VirtqueueError) =>
        this.invalid('bad_chain', `queue ${vring.index} (${role}): ${error.message}`),
    };
    // At most one ring's worth of chains per pass; the rest continues on the next turn.
    const result = processRing(vring, handler, vring.queue.size);
    if (messages > 0) {
      const seconds = (this.clock.now() - started) / 1000;
      const a = this.counters.ack;
      a.count += messages;
      a.sumSeconds += seconds * messages;
      a.lastSeconds = seconds;
      a.maxSeconds = Math.max(a.maxSeconds, seconds);
      this.emit('ack', { seconds, messages });
    }
    if (result.more) setImmediate(() => this.vrings.get(vring.index) === vring && this.queueKicked(vring));
  }

  // ---- queue handlers --------------------------------------------------------------------------

  private invalid(reason: InvalidReason, detail: string): void {
    const n = (this.counters.invalid[reason] ?? 0) + 1;
    this.counters.invalid[reason] = n;
    if (n <= MAX_LOGS_PER_REASON) {
      this.log.warn('invalid guest input', {
        reason,
        detail,
        ...(n === MAX_LOGS_PER_REASON ? { note: 'further ones are counted, not logged' } : {}),
      });
    }
    this.emit('invalid', { reason, detail });
  }

  /** Reads the PFNs of an inflate/deflate chain, or undefined (counted) if it is unusable. */
  private readPfns(kind: string, descriptors: readonly Descriptor[]): number[] | undefined {
    const memory = this.host?.memory;
    if (memory === undefined) return undefined;
    let bytes = 0;
    for (const d of descriptors) {
      if (d.writable) {
        this.invalid('writable_buffer', `${kind} buffer has a device-writable part`);
        return undefined;
      }
      bytes += d.len;
    }
    if (bytes === 0) {
      this.invalid('empty_buffer', `${kind} buffer is empty`);
      return undefined;
    }
    if (bytes > MAX_PFN_BUFFER_BYTES) {
      this.invalid(
        'too_many_pfns',
        `${kind} buffer of ${bytes} bytes holds more than ${VIRTIO_BALLOON_ARRAY_PFNS_MAX} PFNs`,
      );
      return undefined;
    }
    if (bytes % 4 !== 0) this.invalid('unaligned_buffer', `${kind} buffer of ${bytes} bytes is not whole PFNs`);
    const raw = new Uint8Array(bytes);
    let done = 0;
    for (const d of descriptors) {
      raw.set(memory.read(d.addr, d.len), done);
      done += d.len;
    }
    const v = new DataView(raw.buffer);
    const pfns: number[] = [];
    let outside = 0;
    // Bounded by MAX_PFN_BUFFER_BYTES / 4 = 256 iterations.
    for (let i = 0; i + 4 <= bytes; i += 4) {
      const pfn = v.getUint32(i, true);
      if (memory.find(pfn * BALLOON_PAGE_BYTES) === undefined) outside++;
      else pfns.push(pfn);
    }
    if (outside > 0) this.invalid('pfn_outside_ram', `${kind}: ${outside} PFNs outside guest RAM ignored`);
    return pfns;
  }

  private handleInflate(descriptors: readonly Descriptor[]): void {
    this.counters.inflate.requests++;
    const pfns = this.readPfns('inflate', descriptors);
    if (pfns === undefined || pfns.length === 0) return;
    const fresh = this.tracker.add(pfns);
    const added = fresh.reduce((n, r) => n + r.count, 0);
    this.counters.inflate.pages += added;
    this.counters.inflate.alreadyBallooned += pfns.length - added;
    if (!this.inhibit && fresh.length > 0) this.queueDiscards(fresh, added);
  }

  private handleDeflate(descriptors: readonly Descriptor[]): void {
    // The guest touches deflated pages once this is acknowledged: finish their discards first.
    this.flushDiscards();
    this.counters.deflate.requests++;
    const pfns = this.readPfns('deflate', descriptors);
    if (pfns === undefined || pfns.length === 0) return;
    const removed = this.tracker.remove(pfns);
    this.counters.deflate.pages += removed;
    this.counters.deflate.notBallooned += pfns.length - removed;
    // The host did not ask for this deflate if the balloon was not above its target: a
    // DEFLATE_ON_OOM deflate, i.e. the guest ran out of memory.
    const unrequested = this.actualPages <= this.targetPages && removed > 0;
    if (unrequested) this.counters.deflate.unrequested += removed;
    this.emit('deflate', { pages: removed, unrequested });
  }

  private handleReport(descriptors: readonly Descriptor[]): void {
    this.flushDiscards();
    this.counters.reporting.requests++;
    const memory = this.host?.memory;
    if (memory === undefined) return;
    const ranges: DiscardRange[] = [];
    for (const d of descriptors) {
      if (!d.writable) {
        this.invalid('readable_buffer', 'reported range is not device-writable');
        continue;
      }
      this.counters.reporting.bytes += d.len;
      // A range may cross regions; each region's part is discarded on its own file.
      let at = d.addr;
      const end = d.addr + d.len;
      while (at < end) {
        const r = memory.find(at)!;
        const pieceEnd = Math.min(end, r.guestPhysAddr + r.sizeBytes);
        const range = alignedFileRange(r, at, pieceEnd - at);
        if (range !== undefined) ranges.push(range);
        at = pieceEnd;
      }
    }
    if (!this.inhibit) this.discard(ranges);
  }

  private handleMessage(vring: Vring, descriptors: readonly Descriptor[]): void {
    this.counters.messages.total++;
    const bytes = vring.queue.readChain(descriptors, MESSAGE_BYTES + 1);
    if (bytes.length !== MESSAGE_BYTES || descriptors.some((d) => d.writable)) {
      this.invalid('message_size', `message of ${bytes.length} readable bytes (expected ${MESSAGE_BYTES})`);
      return;
    }
    const type = new DataView(bytes.buffer).getUint32(0, true);
    if (type !== VIRTIO_BALLOON_MSG_PRESSURE) {
      this.counters.messages.unknown++;
      this.invalid('message_unknown_type', `message type ${type}`);
      return;
    }
    this.counters.messages.pressure++;
    const event: PressureEvent = {
      type,
      atMs: this.clock.now(),
      actualPages: this.actualPages,
      targetPages: this.targetPages,
    };
    this.log.info('guest reports memory pressure', { actualPages: event.actualPages, targetPages: event.targetPages });
    // Listeners (the policy) run now: a target they set is in config space, and its
    // CONFIG_CHANGE_MSG sent, before this buffer is returned to the guest.
    this.emit('pressure', event);
  }

  private handleStats(vring: Vring, head: number, descriptors: readonly Descriptor[]): number | 'defer' {
    if (this.statsHeld !== undefined) {
      // The spec allows one buffer; give the older one back and keep the newest.
      this.invalid('stats_extra_buffer', 'a second stats buffer while one is held');
      vring.queue.pushUsed(this.statsHeld, 0);
    }
    this.statsHeld = head;
    const bytes = vring.queue.readChain(descriptors, MAX_STATS_BUFFER_BYTES + 1);
    const parsed = parseStats(bytes.subarray(0, MAX_STATS_BUFFER_BYTES));
    if (parsed.partialEntry)
      this.invalid('stats_partial_entry', `stats buffer of ${bytes.length} bytes ends inside an entry`);
    if (parsed.truncated || bytes.length > MAX_STATS_BUFFER_BYTES)
      this.invalid('stats_too_long', 'stats buffer longer than 64 entries');
    this.statsValues = parsed.values;
    this.statsUpdatedWall = this.clock.wallNow();
    this.statsUpdatedMono = this.clock.now();
    this.statsStale = false;
    this.statsOutstanding = false;
    this.statsTimeout?.cancel();
    this.statsTimeout = undefined;
    this.counters.statsQueue.updates++;
    this.emit('stats', this.statsSnapshot());
    return 'defer';
  }

  private scheduleStats(): void {
    this.statsTimer?.cancel();
    this.statsTimer = this.clock.setTimer(this.statsIntervalMs, () => this.requestStats());
  }

  /** Returns the held stats buffer to the guest: "send fresh stats". */
  private requestStats(): void {
    this.statsTimer = undefined;
    const index = this.layout.indexOf('stats');
    const vring = this.vrings.get(index);
    if (vring === undefined) return;
    if (this.statsHeld !== undefined) {
      const head = this.statsHeld;
      this.statsHeld = undefined;
      vring.queue.pushUsed(head, 0);
      vring.flushAndNotify();
      this.counters.statsQueue.requests++;
      this.statsOutstanding = true;
      this.statsTimeout?.cancel();
      this.statsTimeout = this.clock.setTimer(this.statsTimeoutMs, () => {
        this.statsTimeout = undefined;
        if (!this.statsOutstanding || this.statsStale) return;
        this.statsStale = true;
        this.counters.statsQueue.timeouts++;
        this.log.warn('guest did not answer a stats request', { timeoutMs: this.statsTimeoutMs });
        this.emit('stats-timeout');
      });
    }
    this.scheduleStats();
  }

  private stopStats(): void {
    this.statsTimer?.cancel();
    this.statsTimer = undefined;
    this.statsTimeout?.cancel();
    this.statsTimeout = undefined;
    this.statsHeld = undefined;
    this.statsOutstanding = false;
  }

  private queueDiscards(runs: readonly PageRun[], pages: number): void {
    this.pendingRuns.push(...runs);
    this.pendingPages += pages;
    if (this.pendingPages * BALLOON_PAGE_BYTES >= DISCARD_BATCH_BYTES) this.flushDiscards();
    else this.pendingTimer ??= this.clock.setTimer(DISCARD_BATCH_DELAY_MS, () => this.flushDiscards());
  }

  /** Punches every pending hole now. */
  flushDiscards(): void {
    this.pendingTimer?.cancel();
    this.pendingTimer = undefined;
    if (this.pendingRuns.length === 0) return;
    const runs = this.pendingRuns;
    this.pendingRuns = [];
    this.pendingPages = 0;
    if (this.inhibit || this.host === undefined) return;
    // Runs from several buffers merge into fewer, longer punches.
    const merged = runs.length === 1 ? runs : compactRunList(runs);
    this.discard(
      planDiscards(
        merged,
        (g) => this.host?.memory.find(g),
        (p, n) => this.tracker.isFull(p, n),
      ),
    );
  }

  private dropPendingDiscards(): void {
    this.pendingTimer?.cancel();
    this.pendingTimer = undefined;
    this.pendingRuns = [];
    this.pendingPages = 0;
  }

  /** Punches the planned holes; failures are counted and logged, never thrown. */
  private discard(ranges: readonly DiscardRange[]): void {
    for (const r of ranges) {
      try {
        native.punchHole(r.fd, r.fileOffset, r.length);
        this.counters.discardCalls++;
        this.counters.reclaimedBytes += r.length;
      } catch (err) {
        this.counters.discardErrors++;
        if (this.counters.discardErrors <= MAX_LOGS_PER_REASON) {
          this.log.error('cannot give memory back to the host', {
            offset: r.fileOffset,
            length: r.length,
            error: (err as Error).message,
          });
        }
      }
    }
  }

  // ---- observable state ------------------------------------------------------------------------

  private statsSnapshot(): GuestStatsSnapshot {
    return {
      values: namedStats(this.statsValues),
      byTag: new Map(this.statsValues),
      updatedAtMs: this.statsUpdatedWall,
      ageMs: this.statsUpdatedMono === undefined ? undefined : this.clock.now() - this.statsUpdatedMono,
      stale: this.statsStale,
    };
  }

  /** Bytes of guest memory files the host holds: each distinct file counted once. */
  private residentBytes(): number | undefined {
    const memory = this.host?.memory;
    if (memory === undefined) return undefined;
    const seen = new Map<string, number>();
    for (const r of memory.regionList) {
      if (seen.has(r.fileId)) continue;
      try {
        seen.set(r.fileId, native.fstat(r.fd).allocatedBytes);
      } catch {
        seen.set(r.fileId, 0);
      }
    }
    return [...seen.values()].reduce((a, b) => a + b, 0);
  }

  /** One typed view of everything observable (the daemon publishes it as metrics). */
  snapshot(): BalloonSnapshot {
    this.flushDiscards(); // so host-resident bytes reflect every acknowledged inflate
    const c = this.counters;
    return {
      connected: this.host !== undefined,
      offeredFeatures: this.offered,
      ackedFeatures: this.acked,
      layout: [...this.layout],
      numQueues: this.numQueues,
      configSize: this.configSize,
      targetPages: this.targetPages,
      actualPages: this.actualPages,
      balloonedPages: this.tracker.size,
      guestRamBytes: this.lastGuestRamBytes,
      hostResidentBytes: this.residentBytes(),
      reclaimedBytes: c.reclaimedBytes,
      discardCalls: c.discardCalls,
      discardErrors: c.discardErrors,
      discardInhibited: this.inhibit,
      inflate: { ...c.inflate },
      deflate: { ...c.deflate },
      reporting: { ...c.reporting },
      statsQueue: { ...c.statsQueue },
      messages: { ...c.messages },
      invalid: { ...c.invalid },
      stats: this.statsSnapshot(),
      ackLatency: { ...c.ack },
      trackerBytes: this.tracker.memoryBytes,
      configChanges: c.configChanges,
    };
  }
}

/** Sorts runs and merges those that touch or overlap. */
function compactRunList(runs: readonly PageRun[]): PageRun[] {
  const sorted = [...runs].sort((a, b) => a.start - b.start);
  const out: PageRun[] = [];
  for (const r of sorted) {
    const last = out[out.length - 1];
    if (last !== undefined && r.start <= last.start + last.count)
      last.count = Math.max(last.count, r.start + r.count - last.start);
    else out.push({ ...r });
  }
  return out;
}
