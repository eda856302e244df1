/** Shared test helpers: temporary socket paths, fd counting, a back-end on a real socket. */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { MemoryLogger } from '../lib/log';
import { VhostUserDevice } from '../lib/vhost/device';
import { BackendOptions, VhostUserBackend } from '../lib/vhost/server';

export function tmpDir(): string {
  return fs.mkdtempSync(path.join(os.tmpdir(), 'vballoon-test-'));
}

/** Open descriptors of this process. */
export function fdCount(): number {
  return fs.readdirSync('/proc/self/fd').length;
}

/** Resolves after pending I/O callbacks had a chance to run. */
export function tick(ms = 0): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/** Waits until `cond()` holds, polling the event loop (for state changed by I/O callbacks). */
export async function until(cond: () => boolean, what: string, timeoutMs = 5000): Promise<void> {
  const start = Date.now();
  while (!cond()) {
    if (Date.now() - start > timeoutMs) throw new Error(`timed out waiting for ${what}`);
    await new Promise((resolve) => setImmediate(resolve));
  }
}

export interface BackendFixture {
  backend: VhostUserBackend;
  log: MemoryLogger;
  socketPath: string;
  dir: string;
  close(): void;
}

export function startBackend(device: VhostUserDevice, options: Partial<BackendOptions> = {}): BackendFixture {
  const dir = tmpDir();
  const socketPath = path.join(dir, 'vhost.sock');
  const log = new MemoryLogger();
  const backend = new VhostUserBackend(device, { log, ...options });
  backend.listen(socketPath);
  return {
    backend,
    log,
    socketPath,
    dir,
    close() {
      backend.close();
      fs.rmSync(dir, { recursive: true, force: true });
    },
  };
}

/** Closes a front-end, waits until the back-end has dropped the connection, then stops it. */
export async function hangUp(fe: { close(): void }, fx: BackendFixture): Promise<void> {
  fe.close();
  await until(() => !fx.backend.connected, 'disconnect');
  fx.close();
}

/** The error `promise` rejects with; fails the test if it resolves. */
export async function rejectionOf(promise: Promise<unknown>): Promise<Error & { code?: string }> {
  try {
    await promise;
  } catch (err) {
    return err as Error & { code?: string };
  }
  throw new Error('expected a rejection, but the promise resolved');
}
