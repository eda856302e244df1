/**
 * The control server's socket file: created with no access for others, then given its mode; the
 * process umask is the same afterwards, also when listening fails (a real unix socket).
 */
import { expect } from 'chai';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { ControlServer } from '../../lib/daemon/control';
import { MemoryLogger } from '../../lib/log';
import { rejectionOf, tmpDir } from '../helpers';

/** The process umask, read without changing it (currentUmask() with no argument sets it twice). */
function currentUmask(): number {
  const line = /^Umask:\s*([0-7]+)$/m.exec(fs.readFileSync('/proc/self/status', 'utf8'));
  if (line === null) throw new Error('no Umask line in /proc/self/status');
  return parseInt(line[1], 8);
}

describe('control socket listening', () => {
  const server = (): ControlServer => new ControlServer({ log: new MemoryLogger(), handlers: {} });

  it('restores the umask after a listen that fails, and after one that succeeds', async () => {
    const before = currentUmask();
    const dir = tmpDir();
    try {
      // /proc refuses new files even to root: bind fails (EACCES) after the umask was set.
      const failing = server();
      expect((await rejectionOf(failing.listenUnix('/proc/vballoon-test-control.sock', 0o600))).code).to.equal(
        'EACCES',
      );
      await failing.close();
      expect(currentUmask(), 'umask after a failed listen').to.equal(before);
      const ok = server();
      const sock = path.join(dir, 'control.sock');
      await ok.listenUnix(sock, 0o660);
      expect(currentUmask(), 'umask after a listen').to.equal(before);
      expect(fs.statSync(sock).mode & 0o777).to.equal(0o660);
      await ok.close();
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });
});
