/**
 * `vballoon serve --takeover`: a new daemon takes every VM from the running one without a service
 * manager (hosts without systemd, and the zero-downtime upgrade path). Same protocol as systemd's
 * file descriptor store, between the two processes:
 *
 * 1. The new process binds a datagram socket beside the control socket and asks the running
 *    daemon, over its control socket, to `handover` to it.
 * 2. The running daemon suspends (the policy stops, pending discards are carried out, every VM's
 *    state is written), sends each descriptor as `FDSTORE=1` / `FDNAME=<name>` datagrams (what
 *    lib/daemon/fd-store.ts sends systemd), then `READY=1`, and exits at once: it closes its
 *    copies, which the new process already holds, so no front-end notices.
 * 3. The new process waits for that exit (its control connection ends), then starts as if its
 *    service manager had passed it those descriptors: every VM is taken over
 *    (lib/daemon/survival.ts), and the control socket is bound again.
 */
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as path from 'node:path';
import { ErrorCode, VballoonError } from '../errors';
import { Logger } from '../log';
import { closeQuietly, native, PollHandle, POLL_READABLE } from '../native';
import { FdStore, parseNotifyFields } from './fd-store';
import { NamedFd } from './survival';

/** How long the new process waits for the running daemon to hand everything over and exit. */
export const TAKEOVER_TIMEOUT_MS = 30_000;
/** Datagrams read per wake-up (the socket is level-triggered; the rest waits its turn). */
const DATAGRAMS_PER_WAKEUP = 64;

/** The running daemon's side: a holder that sends to the new process, then READY=1. */
export function handoverSender(log: Logger, address: string): FdStore & { finish(): void } {
  const store = new FdStore(log, address);
  return Object.assign(store, {
    finish: (): void => native.notifySend(address, 'READY=1\n'),
  });
}

/**
 * The new process's side: asks the daemon on `controlSocket` for its VMs and returns their
 * descriptors once it has exited. Throws (with nothing left open) if it refuses or does not
 * finish within TAKEOVER_TIMEOUT_MS.
 */
export async function receiveHandover(controlSocket: string, log: Logger): Promise<NamedFd[]> {
  const address = path.join(path.dirname(controlSocket), `.takeover-${process.pid}.sock`);
  try {
    fs.unlinkSync(address);
  } catch {
    // None left over.
  }
  const oldMask = process.umask(0o177);
  let fd: number;
  try {
    fd = native.dgramListen(address, true);
  } finally {
    process.umask(oldMask);
  }
  const received: NamedFd[] = [];
  let watch: PollHandle | undefined;
  let control: net.Socket | undefined;
  let timer: NodeJS.Timeout | undefined;
  try {
    await new Promise<void>((resolve, reject) => {
      let ready = false;
      let exited = false;
      let reply = '';
      const fail = (message: string): void =>
        reject(new VballoonError(ErrorCode.DAEMON_UNREACHABLE, `takeover: ${message}`));
      const check = (): void => {
        if (ready && exited) resolve();
      };
      timer = setTimeout(
        () => fail(`the running daemon did not hand over and exit within ${TAKEOVER_TIMEOUT_MS} ms`),
        TAKEOVER_TIMEOUT_MS,
      );
      watch = native.pollStart(fd, POLL_READABLE, () => {
        for (let i = 0; i < DATAGRAMS_PER_WAKEUP; i++) {
          const d = native.dgramRecv(fd);
          if (d === null) return;
          const fields = parseNotifyFields(d.text);
          const name = fields['FDNAME'];
          if (fields['FDSTORE'] === '1' && name !== undefined) {
            for (const f of d.fds) received.push({ name, fd: f });
          } else {
            for (const f of d.fds) closeQuietly(f);
          }
          if (fields['READY'] === '1') {
            ready = true;
            check();
          }
        }
      });
      control = net.createConnection(controlSocket);
      control.setEncoding('utf8');
      control.on('connect', () =>
        control!.write(`${JSON.stringify({ id: 'takeover', method: 'handover', params: { to: address } })}\n`),
      );
      control.on('data', (chunk: string) => {
        reply += chunk;
        // The daemon exits without replying when the handover worked; a reply is a refusal.
        const nl = reply.indexOf('\n');
        if (nl < 0) return;
        try {
          const r = JSON.parse(reply.slice(0, nl)) as { ok?: boolean; error?: { message?: string } };
          if (r.ok !== true) fail(`the running daemon refused: ${r.error?.message ?? 'no reason given'}`);
        } catch {
          fail('the running daemon answered something that is not JSON');
        }
      });
      control.on('error', (err) => fail(`cannot reach the running daemon at ${controlSocket}: ${err.message}`));
      control.on('close', () => {
        exited = true;
        if (!ready) fail('the running daemon ended the connection before handing everything over');
        else check();
      });
    });
    log.info('took over from the running daemon', { descriptors: received.length });
    return received;
  } catch (err) {
    for (const f of received) closeQuietly(f.fd);
    throw err;
  } finally {
    if (timer !== undefined) clearTimeout(timer);
    if (watch !== undefined) native.pollStop(watch);
    control?.destroy();
    closeQuietly(fd);
    try {
      fs.unlinkSync(address);
    } catch {
      // Already gone.
    }
  }
}
