/**
 * The interface a virtio device implements to be served over vhost-user (lib/device implements
 * it for the balloon), and what the back-end gives the device in return: a handle per running
 * ring and a host interface for config-change notifications.
 *
 * Small on purpose, like rust-vmm's VhostUserBackend and crosvm's VhostUserDevice: features,
 * config space, ring started/kicked/stopped, reset.
 */
import { VirtqueueError } from '../errors';
import { Logger } from '../log';
import { GuestMemory } from '../virtio/guest-memory';
import { SplitQueue } from '../virtio/virtqueue';

/** A ring the device may process: started, enabled, and inside mapped memory. */
export interface Vring {
  readonly index: number;
  readonly queue: SplitQueue;
  /** Publishes used entries and signals the driver if it asked for it. */
  flushAndNotify(): void;
  /** Reports an impossible ring state: the back-end stops this ring and signals its error fd. */
  fail(error: VirtqueueError): void;
}

/** What the back-end offers a device while a front-end is connected. */
export interface DeviceHost {
  readonly memory: GuestMemory;
  /** Sends VHOST_USER_BACKEND_CONFIG_CHANGE_MSG now if the device runs, else once it does. */
  notifyConfigChange(): void;
}

export interface VhostUserDevice {
  /** Queues the device has (what GET_QUEUE_NUM answers and the highest index + 1 accepted). */
  readonly numQueues: number;
  /** Largest queue size accepted in SET_VRING_NUM (a power of two <= 32768). */
  readonly maxQueueSize: number;
  /** Bytes of device config space. */
  readonly configSize: number;
  /** Virtio features offered: device bits and transport bits (VERSION_1, EVENT_IDX, ...). */
  features(): bigint;
  /** The features the driver accepted (bit 30 removed). */
  setFeatures(acked: bigint): void;
  /** Queues the device uses with these accepted features (defaults to numQueues). */
  queuesFor?(acked: bigint): number;
  /** `size` bytes of config space at `offset` (the back-end checked the range). */
  readConfig(offset: number, size: number): Uint8Array;
  /** A driver write (or a migration restore): apply only what the driver may write. */
  writeConfig(offset: number, data: Uint8Array, fromMigration: boolean): void;
  /** A front-end connected. */
  attach(host: DeviceHost, log: Logger): void;
  /** The front-end went away: rings and memory are gone, device state stays. */
  detach(): void;
  /** The ring can be processed. A processing pass (queueKicked) follows immediately. */
  queueReady(vring: Vring): void;
  /**
   * One processing pass: the driver kicked, or a pass is due after queueReady. Returns true when
   * the pass stopped at its bound with work left; the back-end then runs another pass on a later
   * turn of the event loop, inside its own error handling (a device never schedules passes).
   */
  queueKicked(vring: Vring): boolean;
  /** The ring must not be touched any more (stopped, disabled, or its memory went away). */
  queueStopped(index: number): void;
  /** RESET_DEVICE, or SET_STATUS(0): back to the state after power-on. */
  reset(): void;
}
