/** The CLI's exit codes (docs/cli.md) and how an error maps to one. */
import { ClientError } from '../lib/daemon/client';
import { ConfigError } from '../lib/errors';

/** Exit codes (docs/cli.md). */
export const EXIT = {
  OK: 0,
  INTERNAL: 1,
  USAGE: 2,
  NO_DAEMON: 3,
  NO_VM: 4,
  TARGET: 5,
  TIMEOUT: 6,
  CONFIG: 7,
  DENIED: 8,
  STATS: 9,
} as const;

export function die(code: number, message: string): never {
  process.stderr.write(`vballoon: ${message}\n`);
  process.exit(code);
}

export function exitCodeFor(err: unknown): number {
  if (err instanceof ClientError) {
    switch (err.wireCode) {
      case 'ENODAEMON':
        return EXIT.NO_DAEMON;
      case 'ENOVM':
        return EXIT.NO_VM;
      case 'ETARGET':
        return EXIT.TARGET;
      case 'EUNAUTHORIZED':
      case 'EACCES':
        return EXIT.DENIED;
      case 'EBADPARAMS':
        return EXIT.USAGE;
      case 'ESTATS':
        return EXIT.STATS;
      default:
        return EXIT.INTERNAL;
    }
  }
  return err instanceof ConfigError ? EXIT.CONFIG : EXIT.INTERNAL;
}
