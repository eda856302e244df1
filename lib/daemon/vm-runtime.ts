/**
 * One VM as the daemon runs it (its configuration, balloon device, back-end and mode), and what
 * the control API says about it: the `status` and `stats` JSON, and the checks of an operator's
 * target (guest RAM, the 32-bit num_pages field, the VM's floor) with errors in human units.
 */
import * as fs from 'node:fs';
import { BalloonDevice, BalloonSnapshot, GuestStatsSnapshot } from '../device/balloon';
import { BALLOON_PAGE_BYTES } from '../device/constants';
import { ErrorCode, VballoonError } from '../errors';
import { Mode } from '../policy/engine';
import { formatBytes } from '../units';
import { VhostUserBackend } from '../vhost/server';
import { SocketAccess, VmConfig } from './config';
import { VmSurvival } from './survival';

export interface VmRuntime {
  /** What runs (the file's values, less the changes a reload had to refuse). */
  config: VmConfig;
  /** The file's values as last read (to tell what a reload changes). */
  fileConfig: VmConfig;
  device: BalloonDevice;
  backend: VhostUserBackend;
  mode: Mode;
  /** Keeps the VM across a restart of this daemon (lib/daemon/survival.ts). */
  survival: VmSurvival | undefined;
}

/** The largest balloon: num_pages is a 32-bit count of 4 KiB pages. */
export const MAX_BALLOON_BYTES = 0xffffffff * BALLOON_PAGE_BYTES;

/** Gives a listening socket file its configured owner, group and mode. */
export function applySocketAccess(socketPath: string, access: SocketAccess): void {
  if (access.uid !== undefined || access.gid !== undefined)
    fs.chownSync(socketPath, access.uid ?? -1, access.gid ?? -1);
  fs.chmodSync(socketPath, access.mode);
}

/** The stable JSON of `status` (docs/control-api.md). */
export interface VmStatus {
  vm: string;
  connected: boolean;
  mode: Mode;
  socket: string;
  guestRamBytes: number | null;
  targetBytes: number;
  actualBytes: number;
  guestSizeBytes: number | null;
  balloonedBytes: number;
  hostResidentBytes: number | null;
  reclaimedBytes: number;
  discardInhibited: boolean;
  negotiatedQueues: string[];
  pressureMessages: number;
  policyCooldownSeconds: number;
  statsAgeSeconds: number | null;
  statsStale: boolean;
  /** The guest never goes below this (config `floor`). */
  floorBytes: number;
  /** Host-pressure weight (config `shares`). */
  shares: number;
}

export interface VmStats {
  vm: string;
  updatedAt: string | null;
  ageSeconds: number | null;
  stale: boolean;
  stats: Record<string, number>;
}

/** Guest RAM: as the front-end shared it, else as configured, else unknown. */
export function guestRamBytes(vm: VmRuntime): number | undefined {
  const known = vm.device.guestRamPages;
  return known !== undefined ? known * BALLOON_PAGE_BYTES : vm.config.memoryBytes;
}

/** The `status` JSON of a VM. */
export function statusOf(vm: VmRuntime, s: BalloonSnapshot, cooldownSeconds: number): VmStatus {
  const ram = guestRamBytes(vm);
  return {
    vm: vm.config.name,
    connected: s.connected,
    mode: vm.mode,
    socket: vm.config.socket,
    guestRamBytes: ram ?? null,
    targetBytes: s.targetPages * BALLOON_PAGE_BYTES,
    actualBytes: s.actualPages * BALLOON_PAGE_BYTES,
    guestSizeBytes: ram === undefined ? null : ram - s.actualPages * BALLOON_PAGE_BYTES,
    balloonedBytes: s.balloonedPages * BALLOON_PAGE_BYTES,
    hostResidentBytes: s.hostResidentBytes ?? null,
    reclaimedBytes: s.reclaimedBytes,
    discardInhibited: s.discardInhibited,
    negotiatedQueues: s.layout,
    pressureMessages: s.messages.pressure,
    policyCooldownSeconds: cooldownSeconds,
    statsAgeSeconds: s.stats.ageMs === undefined ? null : Math.round(s.stats.ageMs / 100) / 10,
    statsStale: s.stats.stale,
    floorBytes: vm.config.floorBytes,
    shares: vm.config.shares,
  };
}

/** The `stats` JSON of a VM. */
export function statsOf(name: string, s: GuestStatsSnapshot): VmStats {
  return {
    vm: name,
    updatedAt: s.updatedAtMs === undefined ? null : new Date(s.updatedAtMs).toISOString(),
    ageSeconds: s.ageMs === undefined ? null : Math.round(s.ageMs / 100) / 10,
    stale: s.stale,
    stats: s.values,
  };
}

/**
 * The balloon size an operator asked for: `bytes`, or guest RAM minus `guestBytes` (QMP's
 * convention). Refused (CONTROL_BAD_PARAMS, or BALLOON_TARGET with sizes in human units) past
 * guest RAM, past what num_pages can describe, or below the VM's floor.
 */
export function resolveTargetBytes(vm: VmRuntime, p: { bytes?: unknown; guestBytes?: unknown }): number {
  const name = vm.config.name;
  const ram = guestRamBytes(vm);
  let bytes: number;
  if (p.guestBytes !== undefined && p.bytes !== undefined)
    throw new VballoonError(ErrorCode.CONTROL_BAD_PARAMS, 'give "bytes" or "guestBytes", not both');
  if (p.guestBytes !== undefined) {
    if (typeof p.guestBytes !== 'number' || !Number.isSafeInteger(p.guestBytes) || p.guestBytes < 0)
      throw new VballoonError(ErrorCode.CONTROL_BAD_PARAMS, '"guestBytes" must be a non-negative integer');
    if (ram === undefined)
      throw new VballoonError(
        ErrorCode.BALLOON_TARGET,
        `guest RAM of ${name} is unknown (not connected and no "memory" configured)`,
      );
    if (p.guestBytes > ram)
      throw new VballoonError(
        ErrorCode.BALLOON_TARGET,
        `guest size ${formatBytes(p.guestBytes)} exceeds guest RAM ${formatBytes(ram)}`,
      );
    bytes = ram - p.guestBytes;
  } else {
    if (typeof p.bytes !== 'number' || !Number.isSafeInteger(p.bytes) || p.bytes < 0)
      throw new VballoonError(ErrorCode.CONTROL_BAD_PARAMS, '"bytes" (or "guestBytes") must be a non-negative integer');
    bytes = p.bytes;
  }
  // virtio-balloon's num_pages is 32 bits of 4 KiB pages: the device refuses more (in pages);
  // said here in bytes for the operator.
  if (bytes > MAX_BALLOON_BYTES)
    throw new VballoonError(
      ErrorCode.BALLOON_TARGET,
      `a balloon of ${formatBytes(bytes)} is larger than virtio-balloon can describe ` +
        `(${formatBytes(MAX_BALLOON_BYTES)})`,
    );
  if (ram !== undefined && bytes > ram)
    throw new VballoonError(
      ErrorCode.BALLOON_TARGET,
      `a balloon of ${formatBytes(bytes)} exceeds guest RAM of ${formatBytes(ram)}`,
    );
  if (ram !== undefined && ram - bytes < vm.config.floorBytes)
    throw new VballoonError(
      ErrorCode.BALLOON_TARGET,
      `a balloon of ${formatBytes(bytes)} would leave ${name} ${formatBytes(ram - bytes)}, ` +
        `below its floor of ${formatBytes(vm.config.floorBytes)}`,
    );
  return bytes;
}
