/**
 * Daemon events for control API subscribers (`subscribe`, `vballoon watch --events`), like QMP's
 * BALLOON_CHANGE: one JSON object per event with a stable schema (docs/control-api.md):
 * `{"event": TYPE, "time": ISO-8601, "vm": NAME, ...fields}`. Types: `target` (a new balloon
 * target, with its reason), `target-reached` (the guest's actual equals the target), `pressure`
 * (a pressure message), `oom-deflate` (the guest deflated without being asked), `connect`,
 * `disconnect`, `mode`. Fed from the devices' events; never blocks a device (a slow subscriber is
 * the control server's problem, see MAX_SUBSCRIBER_BACKLOG_BYTES there).
 */
import { BalloonDevice, PressureEvent } from '../device/balloon';
import { BALLOON_PAGE_BYTES } from '../device/constants';

export const EVENT_TYPES = [
  'target',
  'target-reached',
  'pressure',
  'oom-deflate',
  'connect',
  'disconnect',
  'mode',
] as const;
export type EventType = (typeof EVENT_TYPES)[number];

export interface DaemonEvent {
  type: EventType;
  vm: string;
  [field: string]: unknown;
}

/** What a subscriber receives (the wire form). */
export type WireEvent = { event: EventType; time: string; vm: string } & Record<string, unknown>;

type Listener = (e: WireEvent) => void;

export class DaemonEvents {
  private readonly listeners = new Set<Listener>();
  private readonly detachers = new Map<string, () => void>();

  /** Subscribes; returns the unsubscribe function. */
  subscribe(listener: Listener): () => void {
    this.listeners.add(listener);
    return () => this.listeners.delete(listener);
  }

  get subscribers(): number {
    return this.listeners.size;
  }

  emitEvent(e: DaemonEvent): void {
    if (this.listeners.size === 0) return;
    const { type, vm, ...fields } = e;
    const wire: WireEvent = { event: type, time: new Date().toISOString(), vm, ...fields };
    for (const l of this.listeners) l(wire);
  }

  /** Turns a device's events into daemon events for `vm`. */
  attach(vm: string, device: BalloonDevice): void {
    this.detach(vm);
    const onTarget = (e: { targetPages: number; previous: number; reason: string }): void =>
      this.emitEvent({
        type: 'target',
        vm,
        targetBytes: e.targetPages * BALLOON_PAGE_BYTES,
        previousBytes: e.previous * BALLOON_PAGE_BYTES,
        reason: e.reason,
        actualBytes: device.actual * BALLOON_PAGE_BYTES,
      });
    const onActual = (e: { actualPages: number; previous: number }): void => {
      if (e.actualPages === device.target && e.previous !== device.target)
        this.emitEvent({ type: 'target-reached', vm, actualBytes: e.actualPages * BALLOON_PAGE_BYTES });
    };
    const onPressure = (e: PressureEvent): void =>
      this.emitEvent({ type: 'pressure', vm, actualBytes: e.actualPages * BALLOON_PAGE_BYTES });
    const onDeflate = (e: { pages: number; unrequested: boolean }): void => {
      if (e.unrequested && e.pages > 0)
        this.emitEvent({ type: 'oom-deflate', vm, bytes: e.pages * BALLOON_PAGE_BYTES });
    };
    const onConnection = (up: boolean): void => this.emitEvent({ type: up ? 'connect' : 'disconnect', vm });
    device.on('target', onTarget);
    device.on('actual', onActual);
    device.on('pressure', onPressure);
    device.on('deflate', onDeflate);
    device.on('connection', onConnection);
    this.detachers.set(vm, () => {
      device.off('target', onTarget);
      device.off('actual', onActual);
      device.off('pressure', onPressure);
      device.off('deflate', onDeflate);
      device.off('connection', onConnection);
    });
  }

  detach(vm: string): void {
    this.detachers.get(vm)?.();
    this.detachers.delete(vm);
  }

  close(): void {
    for (const vm of [...this.detachers.keys()]) this.detach(vm);
    this.listeners.clear();
  }
}
