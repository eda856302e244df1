/**
 * What happens on SET_MEM_TABLE, ADD_MEM_REG and REM_MEM_REG: the front-end's regions are
 * validated (each one, then the table as a whole) before anything is mapped; on success the
 * rings let go of the old mappings, the memory changes, and the rings are translated again.
 *
 * Descriptor ownership: a function here takes a region's fd out of `fds` (sets it to -1) only
 * once a mapping owns it; on any error every fd still in `fds` belongs to the caller, which
 * closes it. Errors are VhostProtocolErrors (ERR_VHOST_BAD_MEMORY): the connection is closed.
 */
import { ErrorCode, errorMessage, VhostProtocolError } from '../errors';
import { closeQuietly } from '../native';
import { checkDisjoint, GuestMemory, MemoryRegion, validateRegion, ValidRegion } from '../virtio/guest-memory';
import { RegionPayload } from './codec';
import { MAX_MEM_SLOTS, MAX_MEM_TABLE_REGIONS } from './constants';

/** What must happen around a memory change (the session's rings). */
export interface MemoryChangeHooks {
  /** Before: every ring lets go of its translated queue. */
  beforeChange(): void;
  /** After: rings are translated over the new memory. */
  afterChange(): void;
}

function badMemory(message: string): VhostProtocolError {
  return new VhostProtocolError(ErrorCode.VHOST_BAD_MEMORY, message);
}

function validRegion(name: string, r: RegionPayload): ValidRegion {
  try {
    return validateRegion(r);
  } catch (err) {
    throw badMemory(`${name}: ${errorMessage(err)}`);
  }
}

function mapRegion(name: string, desc: ValidRegion, fd: number): MemoryRegion {
  try {
    return MemoryRegion.map(desc, fd);
  } catch (err) {
    throw badMemory(`${name}: ${errorMessage(err)}`);
  }
}

/** SET_MEM_TABLE: replaces the whole table, or changes nothing. */
export function setMemTable(
  memory: GuestMemory,
  regions: readonly RegionPayload[],
  fds: number[],
  hooks: MemoryChangeHooks,
): void {
  const name = 'SET_MEM_TABLE';
  const descs = regions.map((r) => validRegion(name, r));
  // Check the whole table before mapping anything.
  try {
    descs.forEach((d, i) => checkDisjoint(descs.slice(0, i), d, MAX_MEM_TABLE_REGIONS));
  } catch (err) {
    throw badMemory(`${name}: ${errorMessage(err)}`);
  }
  const staged: MemoryRegion[] = [];
  try {
    descs.forEach((d, i) => {
      staged.push(mapRegion(name, d, fds[i]));
      fds[i] = -1; // the mapping owns it now
    });
  } catch (err) {
    // Regions mapped so far own (and close) their fds; the rest stay the caller's.
    for (const r of staged) r.unmap();
    throw err;
  }
  hooks.beforeChange();
  memory.clear();
  for (const r of staged) memory.add(r);
  hooks.afterChange();
}

/** ADD_MEM_REG: one more region (CONFIGURE_MEM_SLOTS). */
export function addMemRegion(
  memory: GuestMemory,
  region: RegionPayload,
  fds: number[],
  hooks: MemoryChangeHooks,
): void {
  const desc = validRegion('ADD_MEM_REG', region);
  try {
    memory.checkAddable(desc, MAX_MEM_SLOTS);
  } catch (err) {
    throw badMemory(`ADD_MEM_REG: ${errorMessage(err)}`);
  }
  const mapped = mapRegion('ADD_MEM_REG', desc, fds[0]);
  fds[0] = -1;
  memory.add(mapped);
  hooks.afterChange();
}

/** REM_MEM_REG: the region must match one that is mapped. A descriptor sent with it is closed. */
export function removeMemRegion(
  memory: GuestMemory,
  region: RegionPayload,
  fds: number[],
  hooks: MemoryChangeHooks,
): void {
  const desc = validRegion('REM_MEM_REG', region);
  const mapped = memory.remove(desc);
  if (mapped === undefined) throw badMemory(`REM_MEM_REG: no region at gpa 0x${desc.guestPhysAddr.toString(16)}`);
  // Rings are translated again without the removed region; those inside it stay down until the
  // memory comes back.
  hooks.beforeChange();
  mapped.unmap();
  hooks.afterChange();
  for (let i = 0; i < fds.length; i++) {
    closeQuietly(fds[i]);
    fds[i] = -1;
  }
}
