/**
 * Which 4 KiB guest pages are in the balloon. Compact: a 16-bit count per 2 MiB chunk of guest
 * physical address space (1 KiB per GiB), plus a 64-byte bitmap only for chunks that are
 * partly ballooned. An empty or full chunk costs its count alone, so a fully ballooned 1 GiB
 * costs 1 KiB; only scattered balloons cost up to 1 bit per page. Pure: no I/O.
 */

/** 4 KiB pages per chunk: 2 MiB, the common huge page size. */
export const CHUNK_PAGES = 512;
const CHUNK_SHIFT = 9;
const WORDS_PER_CHUNK = CHUNK_PAGES / 32;
/** PFNs are u32: the highest chunk index + 1. */
const MAX_CHUNKS = 2 ** 32 / CHUNK_PAGES;

/** A run of pages [start, start + count). */
export interface PageRun {
  start: number;
  count: number;
}

export class PageTracker {
  private counts = new Uint16Array(0);
  private readonly partial = new Map<number, Uint32Array>();
  private total = 0;

  /** Pages in the balloon. */
  get size(): number {
    return this.total;
  }

  /** Approximate bytes this structure uses. */
  get memoryBytes(): number {
    return this.counts.byteLength + this.partial.size * (WORDS_PER_CHUNK * 4 + 64);
  }

  private ensure(chunk: number): void {
    if (chunk < this.counts.length) return;
    if (chunk >= MAX_CHUNKS) throw new RangeError(`pfn chunk ${chunk} beyond the 32-bit PFN space`);
    let n = Math.max(64, this.counts.length);
    while (n <= chunk) n *= 2;
    const next = new Uint16Array(Math.min(n, MAX_CHUNKS));
    next.set(this.counts);
    this.counts = next;
  }

  has(pfn: number): boolean {
    const chunk = pfn >>> CHUNK_SHIFT;
    const c = chunk < this.counts.length ? this.counts[chunk] : 0;
    if (c === 0) return false;
    if (c === CHUNK_PAGES) return true;
    const idx = pfn & (CHUNK_PAGES - 1);
    return (this.partial.get(chunk)![idx >>> 5] & (1 << (idx & 31))) !== 0;
  }

  private bitmap(chunk: number, fill: boolean): Uint32Array {
    let bm = this.partial.get(chunk);
    if (bm === undefined) {
      bm = new Uint32Array(WORDS_PER_CHUNK);
      if (fill) bm.fill(0xffffffff);
      this.partial.set(chunk, bm);
    }
    return bm;
  }

  /** Marks one page; returns true if it was not in the balloon. */
  private set(pfn: number): boolean {
    const chunk = pfn >>> CHUNK_SHIFT;
    this.ensure(chunk);
    const c = this.counts[chunk];
    if (c === CHUNK_PAGES) return false;
    const idx = pfn & (CHUNK_PAGES - 1);
    const bm = this.bitmap(chunk, false);
    const mask = 1 << (idx & 31);
    if (bm[idx >>> 5] & mask) return false;
    bm[idx >>> 5] |= mask;
    this.counts[chunk] = c + 1;
    if (c + 1 === CHUNK_PAGES) this.partial.delete(chunk);
    this.total++;
    return true;
  }

  /** Clears one page; returns true if it was in the balloon. */
  private unset(pfn: number): boolean {
    const chunk = pfn >>> CHUNK_SHIFT;
    const c = chunk < this.counts.length ? this.counts[chunk] : 0;
    if (c === 0) return false;
    const idx = pfn & (CHUNK_PAGES - 1);
    const bm = this.bitmap(chunk, c === CHUNK_PAGES);
    const mask = 1 << (idx & 31);
    if ((bm[idx >>> 5] & mask) === 0) return false;
    bm[idx >>> 5] &= ~mask;
    this.counts[chunk] = c - 1;
    if (c - 1 === 0) this.partial.delete(chunk);
    this.total--;
    return true;
  }

  /**
   * Adds pages (any order, duplicates allowed); returns the runs of pages that were not in the
   * balloon before, sorted and merged.
   */
  add(pfns: readonly number[]): PageRun[] {
    const fresh: number[] = [];
    for (const pfn of pfns) if (this.set(pfn)) fresh.push(pfn);
    return compactRuns(fresh);
  }

  /** Removes pages; returns how many were in the balloon. */
  remove(pfns: readonly number[]): number {
    let removed = 0;
    for (const pfn of pfns) if (this.unset(pfn)) removed++;
    return removed;
  }

  /** True if every page of [start, start + count) is in the balloon. */
  isFull(start: number, count: number): boolean {
    let pfn = start;
    const end = start + count;
    // Whole chunks are checked by their count; bounded by count / 512 + 2 iterations of chunks.
    while (pfn < end) {
      const chunk = pfn >>> CHUNK_SHIFT;
      const chunkEnd = (chunk + 1) * CHUNK_PAGES;
      const c = chunk < this.counts.length ? this.counts[chunk] : 0;
      if (pfn % CHUNK_PAGES === 0 && end >= chunkEnd) {
        if (c !== CHUNK_PAGES) return false;
      } else {
        for (let p = pfn; p < Math.min(end, chunkEnd); p++) if (!this.has(p)) return false;
      }
      pfn = chunkEnd;
    }
    return true;
  }

  /** True if any page of [start, start + count) is in the balloon. */
  anyIn(start: number, count: number): boolean {
    // Bounded by count (a reported range, at most the guest's RAM).
    for (let p = start; p < start + count; p++) if (this.has(p)) return true;
    return false;
  }

  /** Every ballooned run, in address order. */
  *runs(): Generator<PageRun> {
    let open: PageRun | undefined;
    for (let chunk = 0; chunk < this.counts.length; chunk++) {
      const c = this.counts[chunk];
      if (c === 0) continue;
      const base = chunk * CHUNK_PAGES;
      for (let i = 0; i < CHUNK_PAGES; i++) {
        if (c !== CHUNK_PAGES && !this.has(base + i)) continue;
        const pfn = base + i;
        if (open !== undefined && open.start + open.count === pfn) open.count++;
        else {
          if (open !== undefined) yield open;
          open = { start: pfn, count: 1 };
        }
      }
    }
    if (open !== undefined) yield open;
  }

  clear(): void {
    this.counts = new Uint16Array(0);
    this.partial.clear();
    this.total = 0;
  }
}

/** Sorts PFNs and merges them into maximal runs (duplicates collapse). */
export function compactRuns(pfns: readonly number[]): PageRun[] {
  const sorted = Float64Array.from(pfns).sort();
  const runs: PageRun[] = [];
  for (const pfn of sorted) {
    const last = runs[runs.length - 1];
    if (last !== undefined && pfn < last.start + last.count) continue;
    if (last !== undefined && pfn === last.start + last.count) last.count++;
    else runs.push({ start: pfn, count: 1 });
  }
  return runs;
}
