/**
 * What QEMU (or libvirt) needs to attach a VM's balloon: the memory backend, the chardev and the
 * vhost-user device options, and the equivalent libvirt domain XML fragment (docs/qemu.md,
 * docs/libvirt.md).
 */
import { BalloonDevice } from '../device/balloon';
import { deviceOptions, VmConfig } from './config-types';

const MiB = 2 ** 20;

/** QEMU's size syntax for the guest RAM, or a placeholder. */
function qemuMemory(vm: VmConfig): string {
  return vm.memoryBytes === undefined ? '<guest RAM, e.g. 1G>' : `${Math.round(vm.memoryBytes / MiB)}M`;
}

function chardevOption(vm: VmConfig): string {
  return vm.connect
    ? `socket,id=vb-${vm.name},path=${vm.socket},server=on,wait=off`
    : `socket,id=vb-${vm.name},path=${vm.socket}`;
}

function deviceOption(vm: VmConfig, numQueues: number): string {
  return (
    `vhost-user-test-device-pci,chardev=vb-${vm.name},virtio-id=5,num_vqs=${numQueues},` +
    `vq_size=${vm.queueSize},config_size=${vm.configSize}`
  );
}

/** The QEMU options that attach this VM's balloon (memory backend, chardev, device). */
export function qemuArgs(vm: VmConfig, device: BalloonDevice = new BalloonDevice(deviceOptions(vm))): string[] {
  const mem = qemuMemory(vm);
  return [
    '-m',
    mem,
    '-object',
    `memory-backend-memfd,id=mem-${vm.name},size=${mem},share=on`,
    '-machine',
    `memory-backend=mem-${vm.name}`,
    '-chardev',
    chardevOption(vm),
    '-device',
    deviceOption(vm, device.numQueues),
  ];
}

function xmlEscape(s: string): string {
  return s.replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;').replace(/'/g, '&apos;');
}

/**
 * The libvirt domain XML pieces that attach this VM's balloon (docs/libvirt.md): shared memfd
 * memory, no libvirt balloon, and the chardev and device through `<qemu:commandline>`. The
 * `<domain>` element needs the `xmlns:qemu` namespace shown in the first comment.
 */
export function libvirtXml(vm: VmConfig, device: BalloonDevice = new BalloonDevice(deviceOptions(vm))): string {
  const arg = (value: string): string => `  <qemu:arg value='${xmlEscape(value)}'/>`;
  return [
    `<!-- vballoon: ${vm.name}. The <domain> element needs`,
    `     xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'. -->`,
    ...(vm.memoryBytes === undefined ? [] : [`<memory unit='MiB'>${Math.round(vm.memoryBytes / MiB)}</memory>`]),
    '<memoryBacking>',
    "  <source type='memfd'/>",
    "  <access mode='shared'/>",
    '</memoryBacking>',
    '<devices>',
    '  <!-- no libvirt balloon: the guest would get two -->',
    "  <memballoon model='none'/>",
    '</devices>',
    '<qemu:commandline>',
    arg('-chardev'),
    arg(chardevOption(vm)),
    arg('-device'),
    // A fixed PCI slot on q35's root bus: libvirt numbers its own devices from slot 1 and does not
    // know this one (on an i440fx machine write bus=pci.0).
    arg(`${deviceOption(vm, device.numQueues)},bus=pcie.0,addr=0x10`),
    '</qemu:commandline>',
  ].join('\n');
}
