/**
 * A minimal device for testing the vhost-user layer without the balloon: it completes every
 * chain at once (copying its readable bytes into its writable ones), keeps a config space whose
 * bytes 4..7 are driver-writable (like the balloon's `actual`), and records what happened.
 */
import { VirtqueueError } from '../errors';
import { Logger } from '../log';
import { DeviceHost, VhostUserDevice, Vring } from '../vhost/device';
import { processRing } from '../vhost/process';
import { VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC } from '../vhost/constants';
import { Descriptor } from '../virtio/virtqueue';

/** Chains per processing pass before yielding to the event loop. */
const MAX_CHAINS_PER_PASS = 256;

export interface EchoDeviceOptions {
  numQueues?: number;
  maxQueueSize?: number;
  configSize?: number;
  features?: bigint;
}

export class EchoDevice implements VhostUserDevice {
  readonly numQueues: number;
  readonly maxQueueSize: number;
  readonly configSize: number;
  readonly config: Uint8Array;
  acked: bigint | undefined;
  host: DeviceHost | undefined;
  /** The rings the device may process now, by index. */
  readonly ready = new Map<number, Vring>();
  readonly chains: Array<{ queue: number; head: number; descriptors: Descriptor[] }> = [];
  readonly badChains: Array<{ queue: number; head: number; error: VirtqueueError }> = [];
  readonly events: string[] = [];
  resets = 0;
  /** When true, chains are recorded but not completed. */
  hold = false;
  private readonly offered: bigint;

  constructor(options: EchoDeviceOptions = {}) {
    this.numQueues = options.numQueues ?? 4;
    this.maxQueueSize = options.maxQueueSize ?? 1024;
    this.configSize = options.configSize ?? 8;
    this.config = new Uint8Array(this.configSize);
    this.offered = options.features ?? VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX | VIRTIO_RING_F_INDIRECT_DESC;
  }

  features(): bigint {
    return this.offered;
  }
  setFeatures(acked: bigint): void {
    this.acked = acked;
    this.events.push('features');
  }
  readConfig(offset: number, size: number): Uint8Array {
    return this.config.slice(offset, offset + size);
  }
  writeConfig(offset: number, data: Uint8Array): void {
    // Only bytes 4..7 are writable.
    for (let i = 0; i < data.length; i++) {
      const at = offset + i;
      if (at >= 4 && at < 8) this.config[at] = data[i]!;
    }
  }
  attach(host: DeviceHost, _log: Logger): void {
    this.host = host;
    this.events.push('attach');
  }
  detach(): void {
    this.host = undefined;
    this.ready.clear();
    this.events.push('detach');
  }
  queueReady(vring: Vring): void {
    this.ready.set(vring.index, vring);
    this.events.push(`ready ${vring.index}`);
  }
  queueStopped(index: number): void {
    this.ready.delete(index);
    this.events.push(`stopped ${index}`);
  }
  queueKicked(vring: Vring): boolean {
    const result = processRing(
      vring,
      {
        onChain: (head, descriptors) => {
          this.chains.push({ queue: vring.index, head, descriptors });
          if (this.hold) return 'defer';
          const data = vring.queue.readChain(descriptors, 4096);
          return vring.queue.writeChain(descriptors, data);
        },
        onBadChain: (head, error) => this.badChains.push({ queue: vring.index, head, error }),
      },
      MAX_CHAINS_PER_PASS,
    );
    return result.more;
  }
  reset(): void {
    this.resets++;
    this.config.fill(0);
  }
}
