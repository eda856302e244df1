/**
 * Parsing of the guest's memory statistics buffer: packed `{le16 tag; le64 val}` entries
 * (VIRTIO 1.2, 5.5.6.3). Pure: no I/O, no clock.
 */
import { STAT_ENTRY_BYTES, statTagName } from './constants';

/** Entries read from one buffer at most; Linux sends 16. More is a hostile guest. */
export const MAX_STATS_ENTRIES = 64;

export interface ParsedStats {
  /** Value by tag (u64 as a number; exact below 2^53). */
  values: Map<number, number>;
  /** The buffer ended in the middle of an entry. */
  partialEntry: boolean;
  /** Entries beyond MAX_STATS_ENTRIES were ignored. */
  truncated: boolean;
  /** Tags seen more than once (the last value wins). */
  duplicates: number;
}

export function parseStats(bytes: Uint8Array): ParsedStats {
  const v = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const n = Math.floor(bytes.length / STAT_ENTRY_BYTES);
  const values = new Map<number, number>();
  let duplicates = 0;
  for (let i = 0; i < Math.min(n, MAX_STATS_ENTRIES); i++) {
    const at = i * STAT_ENTRY_BYTES;
    const tag = v.getUint16(at, true);
    const value = Number(v.getBigUint64(at + 2, true));
    if (values.has(tag)) duplicates++;
    values.set(tag, value);
  }
  return { values, partialEntry: bytes.length % STAT_ENTRY_BYTES !== 0, truncated: n > MAX_STATS_ENTRIES, duplicates };
}

/** Stats values keyed by name (`tag_<n>` for tags we do not know). */
export function namedStats(values: ReadonlyMap<number, number>): Record<string, number> {
  const out: Record<string, number> = {};
  for (const [tag, value] of [...values].sort((a, b) => a[0] - b[0])) out[statTagName(tag)] = value;
  return out;
}

/** Encodes stats entries (the guest driver model's side). */
export function encodeStats(entries: ReadonlyArray<[number, number | bigint]>): Uint8Array {
  const out = new Uint8Array(entries.length * STAT_ENTRY_BYTES);
  const v = new DataView(out.buffer);
  entries.forEach(([tag, value], i) => {
    v.setUint16(i * STAT_ENTRY_BYTES, tag, true);
    v.setBigUint64(i * STAT_ENTRY_BYTES + 2, BigInt(value), true);
  });
  return out;
}
