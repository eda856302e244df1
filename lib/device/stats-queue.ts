/**
 * The balloon's statistics queue (VIRTIO 1.2, 5.5.6.3): the driver keeps one buffer in the queue;
 * the device holds it and returns it ("used") to ask for fresh statistics, and the driver answers
 * by adding it again, filled. This module owns that buffer, the request interval and its timer,
 * the answer timeout (stale stats), the latest values, and on-demand refreshes.
 *
 * It never throws on guest input: a second buffer or a malformed one is reported and counted.
 */
import { Clock, TimerHandle } from '../clock';
import { ErrorCode, VballoonError } from '../errors';
import { Logger } from '../log';
import { Vring } from '../vhost/device';
import { Descriptor } from '../virtio/virtqueue';
import { ReportInvalid } from './guest-input';
import { namedStats, parseStats } from './stats';

/** Bytes of one stats buffer read at most (64 entries of 10 bytes; Linux sends 16). */
const MAX_STATS_BUFFER_BYTES = 640;
/** Shortest request interval: the guest's driver does real work for each answer. */
export const MIN_STATS_INTERVAL_MS = 100;

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

export interface StatsQueueCounters {
  /** Buffers the guest filled. */
  updates: number;
  /** Buffers returned to ask for fresh values. */
  requests: number;
  /** Requests not answered within the timeout. */
  timeouts: number;
}

export interface StatsQueueOptions {
  clock: Clock;
  /** How often to ask the guest for fresh stats. */
  intervalMs: number;
  /** Stats are stale when a request is not answered within this (default 2 x interval). */
  timeoutMs: number | undefined;
  onUpdate(snapshot: GuestStatsSnapshot): void;
  onTimeout(): void;
  report: ReportInvalid;
}

interface Waiter {
  resolve(s: GuestStatsSnapshot): void;
  reject(err: Error): void;
  timer: TimerHandle;
}

/** Throws ERR_BALLOON_CONFIG for an interval the device does not accept. */
export function checkStatsInterval(ms: number): void {
  if (!Number.isFinite(ms) || ms < MIN_STATS_INTERVAL_MS)
    throw new VballoonError(ErrorCode.BALLOON_CONFIG, `stats interval ${ms} ms is below ${MIN_STATS_INTERVAL_MS} ms`);
}

export class StatsQueue {
  private readonly clock: Clock;
  private vring: Vring | undefined;
  /** Head of the buffer the device holds, if any. */
  private held: number | undefined;
  private timer: TimerHandle | undefined;
  private timeout: TimerHandle | undefined;
  private outstanding = false;
  private values = new Map<number, number>();
  private updatedWall: number | undefined;
  private updatedMono: number | undefined;
  private stale = false;
  private intervalMs: number;
  private timeoutMs: number;
  private readonly fixedTimeout: boolean;
  private readonly waiters = new Set<Waiter>();
  private readonly counters: StatsQueueCounters = { updates: 0, requests: 0, timeouts: 0 };
  private log: Logger;

  constructor(
    private readonly options: StatsQueueOptions,
    log: Logger,
  ) {
    checkStatsInterval(options.intervalMs);
    this.clock = options.clock;
    this.intervalMs = options.intervalMs;
    this.fixedTimeout = options.timeoutMs !== undefined;
    this.timeoutMs = options.timeoutMs ?? 2 * options.intervalMs;
    this.log = log;
  }

  setLogger(log: Logger): void {
    this.log = log;
  }

  get interval(): number {
    return this.intervalMs;
  }

  get stats(): Readonly<StatsQueueCounters> {
    return { ...this.counters };
  }

  /**
   * The stats ring runs (again): requests start after one interval. After a pause the buffer held
   * over it goes back to the guest then; a request still unanswered gets its timeout again.
   */
  start(vring: Vring): void {
    this.vring = vring;
    this.schedule();
    if (this.outstanding && this.timeout === undefined)
      this.timeout = this.clock.setTimer(this.timeoutMs, () => this.onAnswerTimeout());
  }

  /**
   * The ring stopped but the device did not reset (QMP stop, a memory table change): timers stop,
   * and the held buffer stays ours. The guest's driver sends its buffer once, at probe, and waits
   * for it: dropping it here means no statistics ever again after the resume.
   */
  pause(): void {
    this.vring = undefined;
    this.timer?.cancel();
    this.timer = undefined;
    this.timeout?.cancel();
    this.timeout = undefined;
    this.rejectWaiters('the stats queue stopped');
  }

  /** The front-end left (or the device reset): timers stop, the held buffer is gone with it. */
  stop(): void {
    this.vring = undefined;
    this.timer?.cancel();
    this.timer = undefined;
    this.timeout?.cancel();
    this.timeout = undefined;
    this.held = undefined;
    this.outstanding = false;
    this.rejectWaiters('the stats queue stopped');
  }

  /** A device reset: the values belonged to the guest that was running. */
  clear(): void {
    this.stop();
    this.values = new Map();
    this.updatedWall = undefined;
    this.updatedMono = undefined;
    this.stale = false;
  }

  /** Changes the request interval at run time (and the timeout with it, unless one was configured). */
  setIntervalMs(ms: number): void {
    checkStatsInterval(ms);
    this.intervalMs = ms;
    if (!this.fixedTimeout) this.timeoutMs = 2 * ms;
    if (this.vring !== undefined) this.schedule();
  }

  /**
   * Asks the guest for fresh statistics now and resolves with them once it answers. Rejects with
   * ERR_BALLOON_STATS if the stats queue is not running or no answer comes within `timeoutMs`.
   */
  refresh(timeoutMs = this.timeoutMs): Promise<GuestStatsSnapshot> {
    if (this.vring === undefined)
      return Promise.reject(new VballoonError(ErrorCode.BALLOON_STATS, 'the guest has no running stats queue'));
    return new Promise((resolve, reject) => {
      const waiter: Waiter = {
        resolve,
        reject,
        timer: this.clock.setTimer(timeoutMs, () => {
          this.waiters.delete(waiter);
          reject(new VballoonError(ErrorCode.BALLOON_STATS, `the guest did not send stats within ${timeoutMs} ms`));
        }),
      };
      this.waiters.add(waiter);
      // With the buffer held, ask now; otherwise a request is out and its answer will do.
      if (this.held !== undefined) this.request();
    });
  }

  /** A chain on the stats queue: the guest's answer. The device keeps the buffer ('defer'). */
  onChain(vring: Vring, head: number, descriptors: readonly Descriptor[]): 'defer' {
    if (this.held !== undefined) {
      // The spec allows one buffer; give the older one back and keep the newest.
      this.options.report('stats_extra_buffer', 'a second stats buffer while one is held');
      vring.queue.pushUsed(this.held, 0);
    }
    this.held = head;
    const bytes = vring.queue.readChain(descriptors, MAX_STATS_BUFFER_BYTES + 1);
    const parsed = parseStats(bytes.subarray(0, MAX_STATS_BUFFER_BYTES));
    if (parsed.partialEntry)
      this.options.report('stats_partial_entry', `stats buffer of ${bytes.length} bytes ends inside an entry`);
    if (parsed.truncated || bytes.length > MAX_STATS_BUFFER_BYTES)
      this.options.report('stats_too_long', 'stats buffer longer than 64 entries');
    this.values = parsed.values;
    this.updatedWall = this.clock.wallNow();
    this.updatedMono = this.clock.now();
    this.stale = false;
    this.outstanding = false;
    this.timeout?.cancel();
    this.timeout = undefined;
    this.counters.updates++;
    const snapshot = this.snapshot();
    for (const w of this.waiters) {
      w.timer.cancel();
      w.resolve(snapshot);
    }
    this.waiters.clear();
    this.options.onUpdate(snapshot);
    return 'defer';
  }

  snapshot(): GuestStatsSnapshot {
    return {
      values: namedStats(this.values),
      byTag: new Map(this.values),
      updatedAtMs: this.updatedWall,
      ageMs: this.updatedMono === undefined ? undefined : this.clock.now() - this.updatedMono,
      stale: this.stale,
    };
  }

  private schedule(): void {
    this.timer?.cancel();
    this.timer = this.clock.setTimer(this.intervalMs, () => {
      this.timer = undefined;
      this.request();
    });
  }

  /** Returns the held buffer to the guest ("send fresh stats") and starts the answer timeout. */
  private request(): void {
    const vring = this.vring;
    if (vring === undefined) return;
    if (this.held !== undefined) {
      const head = this.held;
      this.held = undefined;
      vring.queue.pushUsed(head, 0);
      vring.flushAndNotify();
      this.counters.requests++;
      this.outstanding = true;
      this.timeout?.cancel();
      this.timeout = this.clock.setTimer(this.timeoutMs, () => this.onAnswerTimeout());
    }
    this.schedule();
  }

  private onAnswerTimeout(): void {
    this.timeout = undefined;
    if (!this.outstanding || this.stale) return;
    this.stale = true;
    this.counters.timeouts++;
    this.log.warn('guest did not answer a stats request', { timeoutMs: this.timeoutMs });
    this.options.onTimeout();
  }

  private rejectWaiters(message: string): void {
    for (const w of this.waiters) {
      w.timer.cancel();
      w.reject(new VballoonError(ErrorCode.BALLOON_STATS, message));
    }
    this.waiters.clear();
  }
}
