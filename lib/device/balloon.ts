/**
 * The virtio-balloon device (VIRTIO 1.2 section 5.5, plus the 2014 RFC's message queue) as a
 * vhost-user device. This file is the device itself: the features it offers, its config space
 * (`num_pages`, the driver-written `actual`), the operator's target, the queue roles of the
 * negotiated layout, and what each queue's buffers mean:
 *   inflate   pages leave the guest: tracked, acknowledged, given back to the host in batches
 *   deflate   pages return to the guest (pending discards are finished first)
 *   stats     the held stats buffer (stats-queue.ts)
 *   reporting free page reports: given back at once, then acknowledged
 *   message   the guest's pressure messages: listeners (the policy) run before the ack
 *
 * Where to look for the rest: discard-scheduler.ts (batching and the reclaim ordering rule),
 * stats-queue.ts, guest-input.ts (invalid input and PFN buffers), snapshot.ts (what is observable),
 * layout.ts (queue indices), lib/vhost/process.ts (the pass over a ring).
 *
 * Guest input never throws out of here: bad buffers are acknowledged, counted by reason and
 * logged; only an impossible ring state stops a queue (lib/vhost).
 */
import { EventEmitter } from 'node:events';
import { Clock, systemClock } from '../clock';
import { ErrorCode, VballoonError, VirtqueueError } from '../errors';
import { Logger, NullLogger } from '../log';
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
  VIRTIO_BALLOON_F_DEFLATE_ON_OOM,
  VIRTIO_BALLOON_F_MESSAGE_VQ,
  VIRTIO_BALLOON_F_MESSAGE_VQ_SEED,
  VIRTIO_BALLOON_F_MUST_TELL_HOST,
  VIRTIO_BALLOON_F_PAGE_REPORTING,
  VIRTIO_BALLOON_F_STATS_VQ,
  VIRTIO_BALLOON_MSG_PRESSURE,
} from './constants';
import { BalloonPages, PagesJournal } from './balloon-pages';
import { InvalidInputCounter, InvalidReason } from './guest-input';
import { numQueuesFor, QueueRole, queueLayout } from './layout';
import { PageRun } from './page-tracker';
import { MessageQueue } from './message-queue';
import { BalloonSnapshot, residentBytes } from './snapshot';
import { GuestStatsSnapshot, StatsQueue } from './stats-queue';

export type { BalloonSnapshot } from './snapshot';
export type { GuestStatsSnapshot } from './stats-queue';
export type { InvalidReason } from './guest-input';

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
  /** Told of every change to the ballooned pages (a restartable daemon's copy). */
  journal?: PagesJournal;
  clock?: Clock;
  log?: Logger;
}

/** BalloonDevice.image(): plain JSON. */
export interface DeviceImage {
  targetPages: number;
  /** The driver-written `actual` field, byte for byte. */
  actual: number[];
  statsIntervalMs: number;
  discardInhibited: boolean;
  guestRamBytes: number | null;
  memoryIdentity: string | null;
}

export interface PressureEvent {
  /** The message type (1 = pressure). */
  type: number;
  atMs: number;
  actualPages: number;
  targetPages: number;
}

/** The device's events and their arguments. Listeners run synchronously. */
export interface BalloonEvents {
  /** A pressure message, before its acknowledgement (a target set now reaches the guest first). */
  pressure: [PressureEvent];
  /** The guest sent fresh statistics. */
  stats: [GuestStatsSnapshot];
  /** A stats request went unanswered for the timeout. */
  'stats-timeout': [];
  /** The driver wrote a new `actual`. */
  actual: [{ actualPages: number; previous: number }];
  /** The target changed (operator or policy; `reason` says which rule). */
  target: [{ targetPages: number; previous: number; reason: string }];
  /** A deflate; `unrequested` when the balloon was not above its target (DEFLATE_ON_OOM). */
  deflate: [{ pages: number; unrequested: boolean }];
  /** Invalid guest input (also counted in the snapshot). */
  invalid: [{ reason: InvalidReason; detail: string }];
  /** Pressure messages acknowledged in one pass, with the time from pass start to ack. */
  ack: [{ seconds: number; messages: number }];
  /** A device reset emptied the balloon. */
  reset: [];
  /** A front-end connected (true) or went away (false). */
  connection: [boolean];
}

/**
 * A pass over one queue stops after this much time (more follows after the event loop served
 * other I/O): a 4 GiB inflate must not delay another VM's pressure acknowledgement by the
 * milliseconds its thousands of buffers take to read.
 */
export const PASS_BUDGET_MS = 0.25;

export class BalloonDevice extends EventEmitter<BalloonEvents> implements VhostUserDevice {
  readonly numQueues: number;
  readonly maxQueueSize: number;
  readonly configSize: number;
  readonly messageBit: number;
  private readonly offered: bigint;
  private readonly clock: Clock;
  private log: Logger;
  private readonly baseLog: Logger;
  private acked: bigint | undefined;
  private layout: QueueRole[] = [];
  private host: DeviceHost | undefined;
  private readonly pages: BalloonPages;
  private readonly statsQueue: StatsQueue;
  private readonly invalidInput = new InvalidInputCounter();
  private readonly messageQueue: MessageQueue;
  private configChanges = 0;
  private targetPages = 0;
  /** The driver-written `actual` field, byte for byte (partial writes land here). */
  private actualBytes: Uint8Array = new Uint8Array(4);
  private configChangePending = false;
  private lastGuestRamBytes: number | undefined;
  /** Identity of the files behind guest RAM last time: a new set means a new guest. */
  private memoryIdentity: string | undefined;

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
    const report = (reason: InvalidReason, detail: string): void => this.invalid(reason, detail);
    this.statsQueue = new StatsQueue(
      {
        clock: this.clock,
        intervalMs: options.statsIntervalMs ?? 5000,
        timeoutMs: options.statsTimeoutMs,
        onUpdate: (s) => this.emit('stats', s),
        onTimeout: () => this.emit('stats-timeout'),
        report,
      },
      this.log,
    );
    this.messageQueue = new MessageQueue(report, () => this.onPressure());
    this.pages = new BalloonPages(
      {
        clock: this.clock,
        memory: () => this.host?.memory,
        inhibited: options.inhibitDiscard ?? false,
        report,
        ...(options.journal === undefined ? {} : { journal: options.journal }),
      },
      this.log,
    );
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

  /**
   * Sets the balloon target. The guest learns it through CONFIG_CHANGE_MSG, sent now if the
   * device runs, else as soon as it does.
   * @throws VballoonError(ERR_BALLOON_TARGET) for a target checkTarget refuses.
   */
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
    this.configChanges++;
    this.host.notifyConfigChange();
  }

  /**
   * Stops (true) or resumes (false) giving ballooned memory back to the host. Resuming discards
   * everything ballooned meanwhile.
   */
  setDiscardInhibited(inhibited: boolean): void {
    if (inhibited === this.pages.discardInhibited) return;
    this.log.info(inhibited ? 'discard inhibited' : 'discard allowed', { balloonedPages: this.pages.size });
    this.pages.setDiscardInhibited(inhibited);
  }

  get discardInhibited(): boolean {
    return this.pages.discardInhibited;
  }

  /** Changes how often the guest is asked for statistics. @throws ERR_BALLOON_CONFIG below 100 ms. */
  setStatsIntervalMs(ms: number): void {
    this.statsQueue.setIntervalMs(ms);
    this.log.info('stats interval changed', { statsIntervalMs: ms });
  }

  /**
   * Asks the guest for fresh statistics now; resolves with them. @throws ERR_BALLOON_STATS (as a
   * rejection) without a running stats queue or an answer within `timeoutMs`.
   */
  requestStats(timeoutMs?: number): Promise<GuestStatsSnapshot> {
    return this.statsQueue.refresh(timeoutMs);
  }

  /** Punches every pending hole now (tests and benchmarks that measure host memory use it). */
  flushDiscards(): void {
    this.pages.flush();
  }

  // ---- restart survival ----------------------------------------------------------------------

  /** What a restarted daemon needs of this device besides its pages (which the journal keeps). */
  image(): DeviceImage {
    return {
      targetPages: this.targetPages,
      actual: Array.from(this.actualBytes),
      statsIntervalMs: this.statsQueue.interval,
      discardInhibited: this.pages.discardInhibited,
      guestRamBytes: this.lastGuestRamBytes ?? null,
      memoryIdentity: this.memoryIdentity ?? null,
    };
  }

  /**
   * Takes over the state a previous process left (before any front-end attaches): target,
   * `actual`, stats interval, discard inhibition, and the ballooned pages, whose memory is given
   * back again. No event is emitted: nothing changed for the guest.
   */
  restore(image: DeviceImage, runs: Iterable<PageRun>): number {
    this.targetPages = image.targetPages;
    this.actualBytes = Uint8Array.from(image.actual.slice(0, 4));
    if (this.actualBytes.length !== 4) this.actualBytes = new Uint8Array(4);
    if (image.statsIntervalMs !== this.statsQueue.interval) this.statsQueue.setIntervalMs(image.statsIntervalMs);
    this.lastGuestRamBytes = image.guestRamBytes ?? undefined;
    this.memoryIdentity = image.memoryIdentity ?? undefined;
    if (image.discardInhibited !== this.pages.discardInhibited) this.pages.setDiscardInhibited(image.discardInhibited);
    return this.pages.restore(runs);
  }

  // ---- VhostUserDevice -------------------------------------------------------------------------

  features(): bigint {
    return this.offered;
  }

  setFeatures(acked: bigint): void {
    this.acked = acked;
    this.layout = queueLayout(acked, this.messageBit);
    const mustTell = bit(VIRTIO_BALLOON_F_MUST_TELL_HOST);
    if ((this.offered & mustTell) !== 0n && (acked & mustTell) === 0n) {
      this.log.info('driver did not accept MUST_TELL_HOST: deflate notices are a courtesy');
    }
    this.log.info('features negotiated', { acked, layout: this.layout.join(',') });
  }

  queuesFor(acked: bigint): number {
    return queueLayout(acked, this.messageBit).length;
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
    this.setLogger(log);
    this.emit('connection', true);
  }

  detach(): void {
    this.pages.flush();
    this.statsQueue.stop();
    this.host = undefined;
    this.setLogger(this.baseLog);
    this.emit('connection', false);
  }

  private setLogger(log: Logger): void {
    this.log = log;
    this.pages.setLogger(log);
    this.statsQueue.setLogger(log);
  }

  queueReady(vring: Vring): void {
    const memory = this.host?.memory;
    if (memory !== undefined && memory.totalBytes > 0) {
      this.lastGuestRamBytes = memory.totalBytes;
      // A front-end that reconnects (same QEMU) shares the same memory file: the balloon is kept.
      // Different files mean a new QEMU process, whose guest starts with an empty balloon.
      const identity = [...new Set(memory.regionList.map((r) => r.fileId))].sort().join(',');
      const changed = this.memoryIdentity !== undefined && this.memoryIdentity !== identity;
      if (changed && (this.pages.size > 0 || this.actualPages > 0)) {
        this.log.info('new guest memory: emptying the balloon state of the previous guest', {
          balloonedPages: this.pages.size,
        });
        this.reset();
      }
      this.memoryIdentity = identity;
    }
    // A target set while no front-end (or no running ring) was there goes out now.
    this.sendConfigChange();
    if (this.layout[vring.index] === 'stats') this.statsQueue.start(vring);
  }

  queueStopped(index: number): void {
    // Before QEMU gets its GET_VRING_BASE reply (a stop, a reset, a reboot): nothing may remain
    // pending once the guest can run without the balloon. Everything else is kept: a stop is
    // resumed where it was; a reset is only known when the rings restart (the session then calls
    // reset()).
    this.pages.flush();
    if (this.layout[index] === 'stats') this.statsQueue.pause();
  }

  reset(): void {
    this.pages.clear();
    this.actualBytes = new Uint8Array(4);
    this.statsQueue.clear();
    this.emit('reset');
    this.log.info('device reset: balloon emptied');
  }

  queueKicked(vring: Vring): boolean {
    const role = this.layout[vring.index];
    if (role === undefined) {
      // A queue that has no role in the negotiated layout: never touch its ring.
      this.invalid('kick_unused_queue', `kick on queue ${vring.index} (layout ${this.layout.join(',')})`);
      return false;
    }
    const started = this.clock.now();
    let messages = 0;
    const handler: ChainHandler = {
      onChain: (head, descriptors) => {
        switch (role) {
          case 'inflate':
            this.pages.inflate(descriptors);
            return 0;
          case 'deflate':
            this.deflate(descriptors);
            return 0;
          case 'stats':
            return this.statsQueue.onChain(vring, head, descriptors);
          case 'reporting':
            this.pages.report(descriptors);
            return 0;
          case 'message':
            messages++;
            this.messageQueue.onChain(vring, descriptors);
            return 0;
        }
      },
      onBadChain: (_head, error: VirtqueueError) =>
        this.invalid('bad_chain', `queue ${vring.index} (${role}): ${error.message}`),
    };
    // At most one ring's worth of chains per pass; the back-end runs another pass for the rest.
    const result = processRing(vring, handler, vring.queue.size, PASS_BUDGET_MS);
    if (messages > 0) {
      const seconds = (this.clock.now() - started) / 1000;
      this.messageQueue.countAcks(messages, seconds);
      this.emit('ack', { seconds, messages });
    }
    return result.more;
  }

  // ---- queue handlers --------------------------------------------------------------------------

  private invalid(reason: InvalidReason, detail: string): void {
    this.invalidInput.count(reason, detail, this.log);
    this.emit('invalid', { reason, detail });
  }

  private deflate(descriptors: readonly Descriptor[]): void {
    // The host did not ask for this deflate if the balloon was not above its target: a
    // DEFLATE_ON_OOM deflate, i.e. the guest ran out of memory.
    const requested = this.actualPages > this.targetPages;
    const removed = this.pages.deflate(descriptors, requested);
    if (removed !== undefined) this.emit('deflate', { pages: removed, unrequested: !requested && removed > 0 });
  }

  private onPressure(): void {
    const event: PressureEvent = {
      type: VIRTIO_BALLOON_MSG_PRESSURE,
      atMs: this.clock.now(),
      actualPages: this.actualPages,
      targetPages: this.targetPages,
    };
    this.log.info('guest reports memory pressure', { actualPages: event.actualPages, targetPages: event.targetPages });
    // Listeners (the policy) run now, before the message's buffer is returned to the guest.
    this.emit('pressure', event);
  }

  // ---- observable state ------------------------------------------------------------------------

  /** One typed view of everything observable (the daemon publishes it as metrics). A pure read. */
  snapshot(): BalloonSnapshot {
    const d = this.pages.discardStats;
    const p = this.pages.stats;
    const m = this.messageQueue.stats;
    return {
      connected: this.host !== undefined,
      offeredFeatures: this.offered,
      ackedFeatures: this.acked,
      layout: [...this.layout],
      numQueues: this.numQueues,
      configSize: this.configSize,
      targetPages: this.targetPages,
      actualPages: this.actualPages,
      balloonedPages: this.pages.size,
      guestRamBytes: this.lastGuestRamBytes,
      hostResidentBytes: residentBytes(this.host?.memory),
      pendingDiscardPages: this.pages.pendingDiscardPages,
      reclaimedBytes: d.reclaimedBytes,
      discardCalls: d.calls,
      discardErrors: d.errors,
      discardInhibited: this.pages.discardInhibited,
      inflate: p.inflate,
      deflate: p.deflate,
      reporting: p.reporting,
      statsQueue: this.statsQueue.stats,
      statsIntervalMs: this.statsQueue.interval,
      messages: m.messages,
      invalid: this.invalidInput.snapshot(),
      stats: this.statsQueue.snapshot(),
      ackLatency: m.ackLatency,
      trackerBytes: this.pages.trackerBytes,
      configChanges: this.configChanges,
    };
  }
}
