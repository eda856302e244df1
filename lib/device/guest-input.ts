/**
 * Checking what a guest hands the balloon: the invalid-input reasons (a metric label), their
 * counting with rate-limited logging, and the reading of inflate/deflate PFN buffers.
 *
 * Guest input never throws out of here: a bad buffer is reported as a reason and skipped (the
 * device still acknowledges it), so a broken or hostile guest cannot stop its own balloon, let
 * alone the daemon.
 */
import { Logger } from '../log';
import { GuestMemory } from '../virtio/guest-memory';
import { Descriptor } from '../virtio/virtqueue';
import { BALLOON_PAGE_BYTES, VIRTIO_BALLOON_ARRAY_PFNS_MAX } from './constants';

/** Bytes of PFNs one inflate/deflate buffer may carry (256 le32 PFNs, as Linux sends). */
export const MAX_PFN_BUFFER_BYTES = VIRTIO_BALLOON_ARRAY_PFNS_MAX * 4;
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

/** Called for each invalid input: counts it, and logs the first few of each reason. */
export type ReportInvalid = (reason: InvalidReason, detail: string) => void;

/** Invalid-input counts by reason, with logging that stops after MAX_LOGS_PER_REASON per reason. */
export class InvalidInputCounter {
  private readonly counts: Partial<Record<InvalidReason, number>> = {};

  /** Counts one, logs it if under the limit; returns the new count. */
  count(reason: InvalidReason, detail: string, log: Logger): number {
    const n = (this.counts[reason] ?? 0) + 1;
    this.counts[reason] = n;
    if (n <= MAX_LOGS_PER_REASON) {
      log.warn('invalid guest input', {
        reason,
        detail,
        ...(n === MAX_LOGS_PER_REASON ? { note: 'further ones are counted, not logged' } : {}),
      });
    }
    return n;
  }

  /** A copy of the counts. */
  snapshot(): Partial<Record<InvalidReason, number>> {
    return { ...this.counts };
  }
}

/** Reused storage for reading PFN buffers: at most one buffer's worth, so it never grows. */
export class PfnScratch {
  readonly bytes = new Uint8Array(MAX_PFN_BUFFER_BYTES);
  private readonly view = new DataView(this.bytes.buffer);
  readonly pfns = new Uint32Array(VIRTIO_BALLOON_ARRAY_PFNS_MAX);

  u32(at: number): number {
    return this.view.getUint32(at, true);
  }
}

/**
 * Reads the PFNs of an inflate or deflate chain into `scratch` and returns a view of them
 * (valid until the scratch is used again), or undefined for an unusable buffer; PFNs outside
 * guest RAM are dropped. Each problem is reported. At most 256 PFNs (MAX_PFN_BUFFER_BYTES) are
 * read, whatever the chain claims. Nothing is allocated but the returned view.
 */
export function readPfnBuffer(
  kind: 'inflate' | 'deflate',
  descriptors: readonly Descriptor[],
  memory: GuestMemory,
  report: ReportInvalid,
  scratch: PfnScratch,
): Uint32Array | undefined {
  let bytes = 0;
  for (const d of descriptors) {
    if (d.writable) {
      report('writable_buffer', `${kind} buffer has a device-writable part`);
      return undefined;
    }
    bytes += d.len;
  }
  if (bytes === 0) {
    report('empty_buffer', `${kind} buffer is empty`);
    return undefined;
  }
  if (bytes > MAX_PFN_BUFFER_BYTES) {
    report('too_many_pfns', `${kind} buffer of ${bytes} bytes holds more than ${VIRTIO_BALLOON_ARRAY_PFNS_MAX} PFNs`);
    return undefined;
  }
  if (bytes % 4 !== 0) report('unaligned_buffer', `${kind} buffer of ${bytes} bytes is not whole PFNs`);
  let done = 0;
  for (const d of descriptors) {
    memory.copyInto(d.addr, d.len, scratch.bytes, done);
    done += d.len;
  }
  let n = 0;
  let outside = 0;
  // Bounded by MAX_PFN_BUFFER_BYTES / 4 = 256 iterations.
  for (let i = 0; i + 4 <= bytes; i += 4) {
    const pfn = scratch.u32(i);
    if (memory.find(pfn * BALLOON_PAGE_BYTES) === undefined) outside++;
    else scratch.pfns[n++] = pfn;
  }
  if (outside > 0) report('pfn_outside_ram', `${kind}: ${outside} PFNs outside guest RAM ignored`);
  return scratch.pfns.subarray(0, n);
}
