/**
 * The configuration schema (lib/daemon/config.ts): units, ranges, cross-field rules, `--vm` flags
 * through the same schema, error messages that name the field, and the JSON Schema that documents
 * the file (docs/config.schema.json must be what the code generates).
 */
import { expect } from 'chai';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { ConfigError } from '../../lib/errors';
import { configJsonSchema, libvirtXml, parseVmFlag, qemuArgs, readConfig } from '../../lib/daemon/config';

const GiB = 2 ** 30;
const MiB = 2 ** 20;

function refused(doc: unknown): string {
  try {
    readConfig(doc);
  } catch (err) {
    expect(err).to.be.instanceOf(ConfigError);
    return (err as Error).message;
  }
  throw new Error(`accepted: ${JSON.stringify(doc)}`);
}

describe('configuration schema', () => {
  it('reads sizes and durations with units everywhere, policy included', () => {
    const c = readConfig({
      policy: { tick: '500ms', guestFloor: '512M', cooldownBase: '20s', cooldownMax: '10m', minChange: 8 * MiB },
      vms: [{ name: 'vm0', memory: '2G', target: '512MiB', floor: '1G', statsInterval: 2, shares: 500 }],
    });
    expect(c.policy).to.include({
      tickMs: 500,
      guestFloorBytes: 512 * MiB,
      cooldownBaseMs: 20_000,
      cooldownMaxMs: 600_000,
      minChangeBytes: 8 * MiB,
    });
    expect(c.vms[0]).to.include({
      memoryBytes: 2 * GiB,
      targetBytes: 512 * MiB,
      floorBytes: GiB,
      statsIntervalMs: 2000,
      shares: 500,
    });
  });

  it('refuses out-of-range values and broken cross-field rules, naming the field, in human units', () => {
    const cases: Array<[unknown, RegExp]> = [
      [{ policy: { tick: 0 } }, /^policy\.tick: 0 ms is outside 100 ms\.\.1 min$/],
      [{ policy: { tick: '2h' } }, /^policy\.tick: 2 h is outside/],
      [
        { policy: { hostLowFraction: 0.2, hostRecoverFraction: 0.1 } },
        /^policy\.hostRecoverFraction: 0\.1 must be above policy\.hostLowFraction \(0\.2\).*hysteresis/,
      ],
      [{ policy: { hostPsiSomeLow: 30, hostPsiSomeHigh: 20 } }, /^policy\.hostPsiSomeLow: .*hysteresis/],
      [{ policy: { cooldownBase: '5m', cooldownMax: '1m' } }, /^policy\.cooldownMax: 1 min is shorter than/],
      [{ policy: { pressureStep: 0 } }, /^policy\.pressureStep: expected a number in 0\.01\.\.1$/],
      [{ policy: { guestFloorBytes: 268435456 } }, /^policy\.guestFloorBytes: renamed to policy\.guestFloor/],
      [{ policy: { tick: 'soon' } }, /^policy\.tick: "soon" is not a duration/],
      [{ vms: [{ name: 'x', memory: '1G', target: '2G' }] }, /^vms\[0\]\.target: 2 GiB is larger than .*\(1 GiB\)$/],
      [
        { vms: [{ name: 'x', memory: '1G', floor: '768M', target: '512M' }] },
        /^vms\[0\]\.target: 512 MiB would leave the guest 512 MiB, below its floor of 768 MiB$/,
      ],
      [{ vms: [{ name: 'x', statsInterval: '10ms' }] }, /^vms\[0\]\.statsInterval: 10 ms is outside 100 ms/],
      [{ vms: [{ name: 'x', queueSize: 100 }] }, /^vms\[0\]\.queueSize: 100 is not a power of two$/],
      [{ vms: [{ name: 'x', queueSize: 2048 }] }, /^vms\[0\]\.queueSize: expected an integer in 1\.\.1024$/],
      [{ vms: [{ name: 'x', configSize: 9 }] }, /^vms\[0\]\.configSize: expected 8, 12, 16$/],
      [{ vms: [{ name: 'x', memory: '100K' }] }, /^vms\[0\]\.memory: 100 KiB is outside 1 MiB\.\./],
      [{ vms: [{ name: 'x', socketGroup: 'no-such-group-here' }] }, /^vms\[0\]\.socketGroup: no group named/],
      [{ vms: [{ name: 'x', socketMode: 'rw' }] }, /^vms\[0\]\.socketMode: expected an octal mode/],
      [
        { vms: [{ name: 'x', policy: 'auto', statsInterval: '1m' }] },
        /^vms\[0\]\.statsInterval: 1 min is not shorter than policy\.statsMaxAge \(30 s\)/,
      ],
      [{ vms: [{ name: 'x', memmory: '1G' }] }, /^vms\[0\]\.memmory: unknown setting \(known: name, socket,/],
      [{ vms: [{ name: 'x' }, { name: 'x', socket: '/tmp/o' }] }, /^vms\[1\]\.name: "x" is used twice/],
      [{ metrics: 'yes' }, /^metrics: expected false or a mapping/],
      [[1], /^the configuration: /],
    ];
    for (const [doc, text] of cases) expect(refused(doc), JSON.stringify(doc)).to.match(text);
  });

  it('reports every problem at once, one line each', () => {
    const lines = refused({ policy: { tick: 0 }, vms: [{ name: 'a b', memory: 'lots' }] }).split('\n');
    expect(lines).to.have.length(3);
    expect(lines.map((l) => l.split(':')[0])).to.deep.equal(['policy.tick', 'vms[0].name', 'vms[0].memory']);
  });

  it('--vm flags go through the same schema (numbers only where the schema wants numbers)', () => {
    const vm = parseVmFlag('name=007,memory=1G,queueSize=256,socketGroup=107,socketMode=0660,policy=auto');
    expect(vm).to.deep.equal({
      name: '007',
      memory: '1G',
      queueSize: 256,
      socketGroup: '107',
      socketMode: '0660',
      policy: 'auto',
    });
    const c = readConfig({ vms: [vm] });
    expect(c.vms[0]).to.include({ name: '007', memoryBytes: GiB, queueSize: 256 });
    expect(c.vms[0].socketAccess).to.deep.equal({ uid: undefined, gid: 107, mode: 0o660 });
    expect(refused({ vms: [parseVmFlag('name=x,tick=1s')] })).to.match(/^vms\[0\]\.tick: unknown setting/);
    expect(() => parseVmFlag('name')).to.throw(ConfigError, /not key=value/);
  });

  it('qemu-args and the libvirt XML carry the same chardev and device', () => {
    const vm = readConfig({ vms: [{ name: 'vm0', socket: '/run/vballoon/vm0.sock', memory: '1G' }] }).vms[0];
    const args = qemuArgs(vm);
    const xml = libvirtXml(vm);
    expect(xml).to.contain("<memballoon model='none'/>");
    expect(xml).to.contain("<source type='memfd'/>");
    expect(xml).to.contain("<access mode='shared'/>");
    expect(xml).to.contain("<memory unit='MiB'>1024</memory>");
    expect(xml).to.contain(`<qemu:arg value='${args[7]}'/>`);
    expect(xml).to.contain(`<qemu:arg value='${args[9]},bus=pcie.0,addr=0x10'/>`);
  });

  it('docs/config.schema.json is the schema the code checks (regenerate: npm run config-schema)', () => {
    const file = path.resolve(__dirname, '..', '..', '..', 'docs', 'config.schema.json');
    const onDisk = JSON.parse(fs.readFileSync(file, 'utf8')) as unknown;
    expect(onDisk).to.deep.equal(configJsonSchema());
  });
});
