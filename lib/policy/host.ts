/**
 * Host memory sources for the policy: /proc/meminfo (MemTotal, MemAvailable) and
 * /proc/pressure/memory (PSI). Parsers are pure; the reader takes injected file readers so tests
 * can drive it with any text.
 */
import * as fs from 'node:fs';

export interface HostSample {
  memTotalBytes: number;
  memAvailableBytes: number;
  /** PSI memory "some" avg10 in percent, if the kernel has PSI. */
  psiSomeAvg10?: number;
  /** PSI memory "full" avg10 in percent. */
  psiFullAvg10?: number;
}

/** Parses /proc/meminfo; undefined if MemTotal or MemAvailable is missing. */
export function parseMeminfo(text: string): { memTotalBytes: number; memAvailableBytes: number } | undefined {
  const field = (name: string): number | undefined => {
    const m = new RegExp(`^${name}:\\s+(\\d+)\\s*kB`, 'm').exec(text);
    return m === null ? undefined : Number(m[1]) * 1024;
  };
  const memTotalBytes = field('MemTotal');
  const memAvailableBytes = field('MemAvailable');
  if (memTotalBytes === undefined || memAvailableBytes === undefined) return undefined;
  return { memTotalBytes, memAvailableBytes };
}

/** Parses /proc/pressure/memory ("some avg10=0.00 avg60=... total=..."). */
export function parsePsi(text: string): { someAvg10?: number; fullAvg10?: number } {
  const avg = (kind: string): number | undefined => {
    const m = new RegExp(`^${kind}\\s+avg10=([0-9.]+)`, 'm').exec(text);
    return m === null ? undefined : Number(m[1]);
  };
  const out: { someAvg10?: number; fullAvg10?: number } = {};
  const some = avg('some');
  const full = avg('full');
  if (some !== undefined) out.someAvg10 = some;
  if (full !== undefined) out.fullAvg10 = full;
  return out;
}

export interface HostMemoryReaders {
  meminfo(): string;
  /** Returns undefined when PSI is not available (no /proc/pressure). */
  psi(): string | undefined;
}

export const procReaders: HostMemoryReaders = {
  meminfo: () => fs.readFileSync('/proc/meminfo', 'utf8'),
  psi: () => {
    try {
      return fs.readFileSync('/proc/pressure/memory', 'utf8');
    } catch {
      return undefined;
    }
  },
};

/** Reads one host sample; undefined (and no throw) if the sources are unreadable. */
export function readHostSample(readers: HostMemoryReaders = procReaders): HostSample | undefined {
  let mem: ReturnType<typeof parseMeminfo>;
  try {
    mem = parseMeminfo(readers.meminfo());
  } catch {
    return undefined;
  }
  if (mem === undefined) return undefined;
  const psiText = readers.psi();
  const psi = psiText === undefined ? {} : parsePsi(psiText);
  const sample: HostSample = { ...mem };
  if (psi.someAvg10 !== undefined) sample.psiSomeAvg10 = psi.someAvg10;
  if (psi.fullAvg10 !== undefined) sample.psiFullAvg10 = psi.fullAvg10;
  return sample;
}
