/** Pieces shared by the benchmarks that run a child process. */
import { native, PollHandle, POLL_READABLE } from '../lib/native';

/**
 * A persistent watcher on an eventfd; next() resolves at its next readiness. Every measured path
 * and its reference wait through one of these, so they pay the same event-loop cost.
 */
export class Waker {
  private resolve: (() => void) | undefined;
  private readonly handle: PollHandle;
  constructor(private readonly fd: number) {
    this.handle = native.pollStart(fd, POLL_READABLE, () => {
      if (native.eventfdRead(this.fd) === null) return;
      const r = this.resolve;
      this.resolve = undefined;
      r?.();
    });
  }
  next(): Promise<void> {
    return new Promise((resolve) => (this.resolve = resolve));
  }
  close(): void {
    native.pollStop(this.handle);
  }
}

/** The child's side of the eventfd ping-pong reference: write `pingFd`, wait for `pongFd`. */
export async function pingPong(pingFd: number, pongFd: number, iterations: number): Promise<number[]> {
  const waker = new Waker(pongFd);
  const samples: number[] = [];
  try {
    for (let i = 0; i < iterations; i++) {
      const t0 = process.hrtime.bigint();
      const back = waker.next();
      native.eventfdWrite(pingFd, 1);
      await back;
      samples.push(Number(process.hrtime.bigint() - t0));
    }
  } finally {
    waker.close();
  }
  return samples;
}

/** The parent's side: echo every ping as a pong. Returns the watcher (stop it when done). */
export function echoPings(pingFd: number, pongFd: number): PollHandle {
  return native.pollStart(pingFd, POLL_READABLE, () => {
    if (native.eventfdRead(pingFd) !== null) native.eventfdWrite(pongFd, 1);
  });
}
