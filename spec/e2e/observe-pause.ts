/**
 * Records the vhost-user messages QEMU sends on QMP stop, cont and system_reset (the sequences
 * in docs/qemu.md come from it). Not a test: run `node dist/spec/e2e/observe-pause.js` with
 * VBALLOON_E2E_CACHE set.
 */
import * as os from 'node:os';
import * as path from 'node:path';
import { loadE2eEnv, Qmp, QemuGuest } from '../../lib/testing/qemu';
import { DaemonProcess } from '../daemon/harness';

async function main(): Promise<void> {
  const env = loadE2eEnv(process.env['VBALLOON_E2E_CACHE']!)!;
  const d = new DaemonProcess();
  await d.start({ vms: [{ name: 'vm0', socket: d.vmSocket('vm0'), memory: '1G', statsInterval: '1s' }] });
  const qmpPath = path.join(os.tmpdir(), `observe-qmp-${process.pid}.sock`);
  const g = new QemuGuest(env, {
    socketPath: d.vmSocket('vm0'),
    memMiB: 1024,
    numVqs: 5,
    configSize: 8,
    qmpSocket: qmpPath,
    allowReboot: true,
  });
  await g.boot(120_000);
  const qmp = await Qmp.connect(qmpPath);
  await new Promise((r) => setTimeout(r, 3000));
  const dump = (label: string, from: number): void => {
    console.log(`==== ${label}`);
    for (const l of d.logs.slice(from)) {
      const x = l as unknown as Record<string, unknown>;
      const fields = ['value', 'queue', 'num'].map((k) => x[k] ?? '');
      if (x['msg'] === 'front-end message') console.log('  ', x['request'], ...fields);
      else console.log('   #', x['msg'], JSON.stringify(x).slice(0, 200));
    }
  };
  let mark = d.logs.length;
  await qmp.execute('stop');
  await new Promise((r) => setTimeout(r, 2000));
  dump('stop', mark);
  mark = d.logs.length;
  await qmp.execute('cont');
  await new Promise((r) => setTimeout(r, 4000));
  dump('cont', mark);
  mark = d.logs.length;
  const outMark = g.output.length;
  await qmp.execute('system_reset');
  await g.waitLine((l) => l.startsWith('VBALLOON_GUEST_READY'), 180_000, outMark);
  await new Promise((r) => setTimeout(r, 4000));
  dump('system_reset', mark);
  qmp.close();
  g.kill();
  await d.stop();
}
main().catch((e: unknown) => {
  console.error(e);
  process.exit(1);
});
