/**
 * The library's public surface, for embedding vballoon's device or daemon in another program (the
 * CLI in bin/ is the usual way in). Everything else in lib/ is internal and may change.
 */
export { BalloonDevice } from './device/balloon';
export type { BalloonEvents, BalloonOptions, PressureEvent } from './device/balloon';
export type { BalloonSnapshot } from './device/snapshot';
export type { GuestStatsSnapshot } from './device/stats-queue';
export { VhostUserBackend } from './vhost/server';
export type { VhostUserDevice, Vring, DeviceHost } from './vhost/device';
export { ErrorCode, VballoonError, ConfigError, errorCodeOf } from './errors';
export type { ErrorCodeValue } from './errors';
