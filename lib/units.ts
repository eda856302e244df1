/**
 * Sizes and durations as people write them. Pure; imports nothing.
 * Sizes: bytes, or a number with K, M, G, T (binary, as QEMU reads `-m 512M`), KiB, MiB, GiB,
 * TiB (binary) or KB, MB, GB, TB (decimal). Durations: ms, s, m, h.
 */

const BINARY: Record<string, number | undefined> = {
  k: 2 ** 10,
  m: 2 ** 20,
  g: 2 ** 30,
  t: 2 ** 40,
  kib: 2 ** 10,
  mib: 2 ** 20,
  gib: 2 ** 30,
  tib: 2 ** 40,
};
const DECIMAL: Record<string, number | undefined> = { kb: 1e3, mb: 1e6, gb: 1e9, tb: 1e12 };

/** Bytes for `text`, or throws an Error saying what is wrong. */
export function parseSize(text: string): number {
  const m = /^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$/.exec(text);
  if (m === null) throw new Error(`"${text}" is not a size (examples: 512M, 2GiB, 1073741824)`);
  const unit = m[2].toLowerCase();
  const factor = unit === '' || unit === 'b' ? 1 : (BINARY[unit] ?? DECIMAL[unit]);
  if (factor === undefined)
    throw new Error(`"${text}": unknown unit "${m[2]}" (use K, M, G, T, KiB, MiB, GiB, TiB, KB, MB, GB, TB)`);
  const bytes = Number(m[1]) * factor;
  if (!Number.isSafeInteger(Math.round(bytes))) throw new Error(`"${text}" is too large`);
  return Math.round(bytes);
}

/** "512 MiB", "1.5 GiB", "4096 B". */
export function formatBytes(bytes: number): string {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let v = bytes;
  let i = 0;
  while (Math.abs(v) >= 1024 && i < units.length - 1) {
    v /= 1024;
    i++;
  }
  const text = i === 0 ? String(v) : v.toFixed(v >= 100 || Number.isInteger(v) ? 0 : v >= 10 ? 1 : 2);
  return `${text} ${units[i]}`;
}

/** Milliseconds for "500ms", "5s", "2m", "1h" or a plain number of seconds. */
export function parseDuration(text: string): number {
  const m = /^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$/.exec(text);
  if (m === null) throw new Error(`"${text}" is not a duration (examples: 500ms, 5s, 2m)`);
  const unit = (m[2] as 'ms' | 's' | 'm' | 'h' | undefined) ?? 's';
  const factor = { ms: 1, s: 1000, m: 60_000, h: 3_600_000 }[unit];
  return Math.round(Number(m[1]) * factor);
}

/** "500 ms", "5 s", "1.5 s", "2 min", "1 h" (the largest unit that keeps it readable). */
export function formatDuration(ms: number): string {
  if (ms < 1000) return `${ms} ms`;
  if (ms < 60_000) return `${Number((ms / 1000).toFixed(3))} s`;
  if (ms < 3_600_000) return `${Number((ms / 60_000).toFixed(2))} min`;
  return `${Number((ms / 3_600_000).toFixed(2))} h`;
}
