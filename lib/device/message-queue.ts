/**
 * The message queue of the 2014 RFC: the guest sends a 4-byte little-endian message (1 = memory
 * pressure) and waits until the device returns the buffer. The device must have acted on it by
 * then: listeners of the pressure event (the policy) run synchronously from here, so a target
 * they lower is in config space, and its CONFIG_CHANGE_MSG sent, before the acknowledgement.
 *
 * It never throws on guest input: a wrongly sized buffer or an unknown type is reported, counted
 * and acknowledged.
 */
import { Vring } from '../vhost/device';
import { Descriptor } from '../virtio/virtqueue';
import { MESSAGE_BYTES, VIRTIO_BALLOON_MSG_PRESSURE } from './constants';
import { ReportInvalid } from './guest-input';

export interface MessageCounters {
  messages: { total: number; pressure: number; unknown: number };
  /** Time from the start of the pass that saw a message to its acknowledgement. */
  ackLatency: { count: number; sumSeconds: number; lastSeconds: number | undefined; maxSeconds: number };
}

export class MessageQueue {
  /** Where each message is read (one per pressure message: no allocation for it). */
  private readonly scratch = new Uint8Array(MESSAGE_BYTES + 1);
  private readonly scratchView = new DataView(this.scratch.buffer);
  private readonly counters: MessageCounters = {
    messages: { total: 0, pressure: 0, unknown: 0 },
    ackLatency: { count: 0, sumSeconds: 0, lastSeconds: undefined, maxSeconds: 0 },
  };

  constructor(
    private readonly report: ReportInvalid,
    /** A pressure message, before its buffer is returned. */
    private readonly onPressure: () => void,
  ) {}

  get stats(): MessageCounters {
    return { messages: { ...this.counters.messages }, ackLatency: { ...this.counters.ackLatency } };
  }

  /** One message chain; the pass returns it to the guest afterwards. */
  onChain(vring: Vring, descriptors: readonly Descriptor[]): void {
    this.counters.messages.total++;
    // One byte more than a message, to tell a longer buffer from a message.
    const length = vring.queue.readChainInto(descriptors, this.scratch);
    let writable = false;
    for (const d of descriptors) writable ||= d.writable;
    if (length !== MESSAGE_BYTES || writable) {
      this.report('message_size', `message of ${length} readable bytes (expected ${MESSAGE_BYTES})`);
      return;
    }
    const type = this.scratchView.getUint32(0, true);
    if (type !== VIRTIO_BALLOON_MSG_PRESSURE) {
      this.counters.messages.unknown++;
      this.report('message_unknown_type', `message type ${type}`);
      return;
    }
    this.counters.messages.pressure++;
    this.onPressure();
  }

  /** `messages` were acknowledged `seconds` after their pass started. */
  countAcks(messages: number, seconds: number): void {
    const a = this.counters.ackLatency;
    a.count += messages;
    a.sumSeconds += seconds * messages;
    a.lastSeconds = seconds;
    a.maxSeconds = Math.max(a.maxSeconds, seconds);
  }
}
