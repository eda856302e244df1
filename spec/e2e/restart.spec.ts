/**
 * End to end: the daemon SIGKILLed at random moments and restarted gracefully while a real
 * QEMU 11.1 and Linux 6.12 guest inflates and deflates (lib/testing/soak.ts; a short seeded run:
 * `npm run soak` does 100 kills and 20 restarts). Under the real systemd (a user manager in a
 * private mount namespace) where it runs, else the test supervisor.
 *
 * What it proves: the VM keeps its device through every restart (QEMU 11.1 cannot reconnect: a
 * dropped connection would leave the guest without a balloon for good, as the control in
 * spec/daemon/restart.spec.ts shows), and every page stays accounted.
 */
import { expect } from 'chai';
import * as path from 'node:path';
import { loadE2eEnv } from '../../lib/testing/qemu';
import { runSoak } from '../../lib/testing/soak';

const CACHE = process.env['VBALLOON_E2E_CACHE'] ?? path.resolve(__dirname, '..', '..', '..', '.cache', 'e2e');
const env = loadE2eEnv(CACHE);

(env === undefined ? describe.skip : describe)('end to end: daemon restarts and crashes under a real VM', function () {
  this.timeout(900_000);

  it('8 SIGKILLs and 3 graceful restarts mid-inflate/deflate: device kept, no page lost, no leak', async () => {
    const r = await runSoak({ env: env!, kills: 8, restarts: 3, seed: 7 });
    expect(r.kills + r.restarts).to.equal(11);
    expect(r.midOperation, 'some restarts landed in the middle of an inflate or deflate').to.be.at.least(1);
    expect(r.stillConnected).to.equal(true);
    expect(r.pagesLost).to.equal(0);
    expect(r.guestBalloonBytes).to.equal(r.finalTargetBytes);
    expect(r.actualBytes).to.equal(r.finalTargetBytes);
    // The guest's own activity moves a few pages; the balloon's memory went back to the host.
    expect(r.hostReleasedBytes).to.be.at.least(0.9 * r.finalTargetBytes);
    expect(r.statsAgeSeconds).to.not.equal(null);
    expect(r.statsAgeSeconds!).to.be.below(5);
    expect(r.daemonFds.atEnd).to.equal(r.daemonFds.afterFirstRestart);
    expect(r.storedFds.atEnd).to.equal(r.storedFds.afterFirstRestart);
  });
});
