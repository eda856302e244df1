/**
 * Which 4 KiB guest pages are in the balloon. The representation follows the density:
 * - runs (sorted, disjoint [start, last] pairs of u32, 8 bytes a run) while that is smaller than
 *   a bitmap over the ballooned span: a contiguous balloon of any size costs a few bytes;
 * - a bitmap over the ballooned span (1 bit a page, from a base PFN) once the runs would cost
 *   more, so a fragmented balloon (every other page) costs what a plain bitmap costs, no more;
 *   the number of runs is kept up to date, and the tracker goes back to runs when they are four
 *   times smaller than the bitmap again (the factor keeps it from flapping).
 * The public API (add, remove, has, isFull, anyIn, runs, size, memoryBytes, clear) is the same
 * in both; runs() lists every ballooned run in order, and add() of those runs restores a tracker.
 * Pure: no I/O.
 */

/** A run of pages [start, start + count). */
export interface PageRun {
  start: number;
  count: number;
}

/** Below this many runs the tracker stays with runs whatever the span (a bitmap saves little). */
const MIN_RUNS_FOR_BITMAP = 64;
/** Bytes a run costs in the runs representation (two u32). */
const RUN_BYTES = 8;
/** Back to runs when they cost this many times less than the bitmap. */
const BACK_TO_RUNS_FACTOR = 4;
/** The bitmap grows in whole granules of this many 32-bit words (4 KiB: 128 MiB of guest). */
const MIN_GRANULE_WORDS = 1024;

export class PageTracker {
  // Runs representation (bits === undefined): starts[i]..lasts[i] inclusive, i < n, sorted.
  private starts = new Uint32Array(4);
  private lasts = new Uint32Array(4);
  private n = 0;
  // Bitmap representation: bit (pfn - base) of bits; base is a multiple of 32.
  private bits: Uint32Array | undefined;
  private base = 0;
  private bitmapRuns = 0;
  private total = 0;
  /** Where add() and remove() sort their pages (reused; as large as the largest input). */
  private scratch = new Float64Array(256);

  /** Pages in the balloon. */
  get size(): number {
    return this.total;
  }

  /** Bytes this structure's arrays use. */
  get memoryBytes(): number {
    return this.bits !== undefined ? this.bits.byteLength : this.starts.byteLength + this.lasts.byteLength;
  }

  /** Number of maximal runs of ballooned pages. */
  get runCount(): number {
    return this.bits !== undefined ? this.bitmapRuns : this.n;
  }

  /** Which representation is in use (for tests and the benchmark). */
  get representation(): 'runs' | 'bitmap' {
    return this.bits !== undefined ? 'bitmap' : 'runs';
  }

  has(pfn: number): boolean {
    if (this.bits !== undefined) return this.bit(pfn);
    const i = this.runAtOrBefore(pfn);
    return i >= 0 && this.lasts[i] >= pfn;
  }

  /**
   * Adds pages (any order, duplicates allowed); returns the runs of pages that were not in the
   * balloon before, sorted and merged. Allocates only those runs (the pages are sorted in
   * storage the tracker reuses).
   */
  add(pfns: ArrayLike<number>): PageRun[] {
    const runs = this.runsWhere(pfns, false);
    if (runs.length === 0) return runs;
    let pages = 0;
    for (const r of runs) pages += r.count;
    if (this.bits !== undefined) {
      this.ensureSpan(runs[0].start, runs[runs.length - 1].start + runs[runs.length - 1].count - 1);
      // A fresh run joins the runs it touches: one run more, minus one per neighbour.
      for (const r of runs) {
        const last = r.start + r.count - 1;
        this.bitmapRuns += 1 - (this.bit(r.start - 1) ? 1 : 0) - (this.bit(last + 1) ? 1 : 0);
        this.setBits(r.start, last, true);
      }
    } else if (runs.length === 1) {
      this.insertRun(runs[0].start, runs[0].start + runs[0].count - 1);
    } else {
      this.mergeRuns(runs);
    }
    this.total += pages;
    this.choose();
    return runs;
  }

  /** Removes pages; returns how many were in the balloon. */
  remove(pfns: ArrayLike<number>): number {
    const runs = this.runsWhere(pfns, true);
    let removed = 0;
    for (const r of runs) removed += r.count;
    if (removed === 0) return 0;
    if (this.bits !== undefined) {
      for (const r of runs) {
        const last = r.start + r.count - 1;
        // Taking a whole stretch out: its run splits in two (both neighbours stay), shrinks (one)
        // or disappears (none).
        this.bitmapRuns += (this.bit(r.start - 1) ? 1 : 0) + (this.bit(last + 1) ? 1 : 0) - 1;
        this.setBits(r.start, last, false);
      }
    } else {
      this.subtractRuns(runs);
    }
    this.total -= removed;
    this.choose();
    return removed;
  }

  /** The pages of `pfns` that are (`present`) or are not in the balloon, as sorted maximal runs. */
  private runsWhere(pfns: ArrayLike<number>, present: boolean): PageRun[] {
    if (this.scratch.length < pfns.length) this.scratch = new Float64Array(pfns.length);
    let k = 0;
    // Bounded by the input's length (a guest buffer: at most 256 PFNs).
    for (let i = 0; i < pfns.length; i++) {
      const pfn = pfns[i];
      if (this.has(pfn) === present) this.scratch[k++] = pfn;
    }
    return sortedRuns(this.scratch.subarray(0, k));
  }

  /** True if every page of [start, start + count) is in the balloon. */
  isFull(start: number, count: number): boolean {
    if (count <= 0) return true;
    const last = start + count - 1;
    if (this.bits === undefined) {
      const i = this.runAtOrBefore(start);
      return i >= 0 && this.lasts[i] >= last;
    }
    return this.countBits(start, last, true);
  }

  /** True if any page of [start, start + count) is in the balloon. */
  anyIn(start: number, count: number): boolean {
    if (count <= 0) return false;
    const last = start + count - 1;
    if (this.bits === undefined) {
      const i = this.runAtOrBefore(last);
      return i >= 0 && this.lasts[i] >= start;
    }
    return !this.countBits(start, last, false);
  }

  /** Every ballooned run, in address order. */
  *runs(): Generator<PageRun> {
    if (this.bits === undefined) {
      for (let i = 0; i < this.n; i++) yield { start: this.starts[i], count: this.lasts[i] - this.starts[i] + 1 };
      return;
    }
    yield* bitmapRuns(this.bits, this.base);
  }

  clear(): void {
    this.starts = new Uint32Array(4);
    this.lasts = new Uint32Array(4);
    this.n = 0;
    this.bits = undefined;
    this.base = 0;
    this.bitmapRuns = 0;
    this.total = 0;
  }

  // ---- runs ------------------------------------------------------------------------------------

  /** Index of the last run starting at or before `pfn`, or -1. */
  private runAtOrBefore(pfn: number): number {
    let lo = 0;
    let hi = this.n - 1;
    while (lo <= hi) {
      const mid = (lo + hi) >>> 1;
      if (this.starts[mid] <= pfn) lo = mid + 1;
      else hi = mid - 1;
    }
    return hi;
  }

  private reserve(n: number): void {
    if (n <= this.starts.length) return;
    let cap = this.starts.length;
    while (cap < n) cap *= 2;
    const s = new Uint32Array(cap);
    const l = new Uint32Array(cap);
    s.set(this.starts.subarray(0, this.n));
    l.set(this.lasts.subarray(0, this.n));
    this.starts = s;
    this.lasts = l;
  }

  private shrinkRuns(): void {
    const cap = Math.max(4, 2 * this.n);
    this.starts = this.starts.slice(0, cap);
    this.lasts = this.lasts.slice(0, cap);
  }

  /** Inserts one run of pages none of which is present (the common contiguous inflate). */
  private insertRun(start: number, last: number): void {
    const i = this.runAtOrBefore(start); // run i ends before start
    const joinsLeft = i >= 0 && this.lasts[i] + 1 === start;
    const joinsRight = i + 1 < this.n && this.starts[i + 1] === last + 1;
    if (joinsLeft && joinsRight) {
      this.lasts[i] = this.lasts[i + 1];
      this.starts.copyWithin(i + 1, i + 2, this.n);
      this.lasts.copyWithin(i + 1, i + 2, this.n);
      this.n--;
    } else if (joinsLeft) {
      this.lasts[i] = last;
    } else if (joinsRight) {
      this.starts[i + 1] = start;
    } else {
      this.reserve(this.n + 1);
      this.starts.copyWithin(i + 2, i + 1, this.n);
      this.lasts.copyWithin(i + 2, i + 1, this.n);
      this.starts[i + 1] = start;
      this.lasts[i + 1] = last;
      this.n++;
    }
  }

  /** Merges sorted runs of absent pages into the runs: one pass over both. */
  private mergeRuns(add: readonly PageRun[]): void {
    const s = new Uint32Array(Math.max(4, this.n + add.length));
    const l = new Uint32Array(s.length);
    let m = 0;
    let i = 0;
    let j = 0;
    const push = (start: number, last: number): void => {
      if (m > 0 && l[m - 1] + 1 >= start) l[m - 1] = Math.max(l[m - 1], last);
      else {
        s[m] = start;
        l[m] = last;
        m++;
      }
    };
    // Bounded by the two inputs' lengths.
    while (i < this.n || j < add.length) {
      if (j >= add.length || (i < this.n && this.starts[i] < add[j].start)) {
        push(this.starts[i], this.lasts[i]);
        i++;
      } else {
        push(add[j].start, add[j].start + add[j].count - 1);
        j++;
      }
    }
    this.starts = s;
    this.lasts = l;
    this.n = m;
  }

  /** Takes sorted runs of present pages out of the runs: one pass over both. */
  private subtractRuns(cut: readonly PageRun[]): void {
    const s = new Uint32Array(Math.max(4, this.n + cut.length));
    const l = new Uint32Array(s.length);
    let m = 0;
    let j = 0;
    for (let i = 0; i < this.n; i++) {
      let start = this.starts[i];
      const last = this.lasts[i];
      while (j < cut.length && cut[j].start + cut[j].count - 1 < start) j++;
      // Each cut inside this run splits it once: bounded by the cuts.
      while (j < cut.length && cut[j].start <= last) {
        if (cut[j].start > start) {
          s[m] = start;
          l[m] = cut[j].start - 1;
          m++;
        }
        start = cut[j].start + cut[j].count;
        if (start > last) break;
        j++;
      }
      if (start <= last) {
        s[m] = start;
        l[m] = last;
        m++;
      }
    }
    this.starts = s;
    this.lasts = l;
    this.n = m;
  }

  // ---- bitmap ----------------------------------------------------------------------------------

  private bit(pfn: number): boolean {
    const bits = this.bits!;
    const i = pfn - this.base;
    if (i < 0 || i >= bits.length * 32) return false;
    return (bits[i >>> 5] & (1 << (i & 31))) !== 0;
  }

  /** Sets or clears the bits of pages first..last (inside the span). */
  private setBits(first: number, last: number, on: boolean): void {
    setBitRange(this.bits!, first - this.base, last - this.base, on);
  }

  /** True if every page of first..last is `on` (all set, or all clear). */
  private countBits(first: number, last: number, on: boolean): boolean {
    const bits = this.bits!;
    const spanFirst = this.base;
    const spanLast = this.base + bits.length * 32 - 1;
    // Outside the span every page is clear.
    if (on && (first < spanFirst || last > spanLast)) return false;
    let i = Math.max(first, spanFirst) - this.base;
    const end = Math.min(last, spanLast) - this.base;
    // Bounded by the range's length (whole words at once).
    while (i <= end) {
      if ((i & 31) === 0 && i + 31 <= end) {
        if (bits[i >>> 5] !== (on ? 0xffffffff : 0)) return false;
        i += 32;
      } else {
        if (((bits[i >>> 5] & (1 << (i & 31))) !== 0) !== on) return false;
        i++;
      }
    }
    return true;
  }

  /** Grows the bitmap (in granules, see MIN_GRANULE_WORDS) to hold pages first..last. */
  private ensureSpan(first: number, last: number): void {
    const bits = this.bits!;
    const loWord = this.base / 32;
    const hiWord = loWord + bits.length; // exclusive
    const needLo = Math.floor(first / 32);
    const needHi = Math.floor(last / 32) + 1;
    if (needLo >= loWord && needHi <= hiWord) return;
    const granule = granuleWords(Math.max(hiWord, needHi) - Math.min(loWord, needLo));
    const newLo = Math.min(loWord, Math.floor(needLo / granule) * granule);
    const newHi = Math.max(hiWord, Math.ceil(needHi / granule) * granule);
    const next = new Uint32Array(newHi - newLo);
    next.set(bits, loWord - newLo);
    this.bits = next;
    this.base = newLo * 32;
  }

  /** Picks the representation for the current density. */
  private choose(): void {
    if (this.bits === undefined) {
      // A big deflate leaves few runs in large arrays: give the memory back (at 4x, so a
      // balloon moving up and down around one size does not reallocate each time).
      if (this.starts.length > 4 * Math.max(4, this.n)) this.shrinkRuns();
      if (this.n < MIN_RUNS_FOR_BITMAP) return;
      const first = this.starts[0];
      const last = this.lasts[this.n - 1];
      if (this.n * RUN_BYTES <= spanBounds(first, last).words * 4) return;
      this.toBitmap(first, last);
    } else if (this.total === 0) {
      this.clear();
    } else if (this.bitmapRuns * RUN_BYTES * BACK_TO_RUNS_FACTOR < this.bits.byteLength) {
      this.toRuns();
    }
  }

  private toBitmap(first: number, last: number): void {
    const { loWord, words } = spanBounds(first, last);
    this.bits = new Uint32Array(words);
    this.base = loWord * 32;
    for (let i = 0; i < this.n; i++) this.setBits(this.starts[i], this.lasts[i], true);
    this.bitmapRuns = this.n;
    this.starts = new Uint32Array(4);
    this.lasts = new Uint32Array(4);
    this.n = 0;
  }

  private toRuns(): void {
    const bits = this.bits!;
    const base = this.base;
    this.bits = undefined;
    this.base = 0;
    this.n = 0;
    this.reserve(Math.max(4, this.bitmapRuns));
    for (const r of bitmapRuns(bits, base)) {
      this.starts[this.n] = r.start;
      this.lasts[this.n] = r.start + r.count - 1;
      this.n++;
    }
    this.bitmapRuns = 0;
  }
}

/** The first word and the number of words of a bitmap over pages first..last, in whole granules. */
function spanBounds(first: number, last: number): { loWord: number; words: number } {
  const lo = Math.floor(first / 32);
  const hi = Math.floor(last / 32) + 1;
  const granule = granuleWords(hi - lo);
  const loWord = Math.floor(lo / granule) * granule;
  return { loWord, words: Math.ceil(hi / granule) * granule - loWord };
}

/** Growth granule for a bitmap of `words`: 4 KiB, or a sixteenth of it for big ones (amortised). */
function granuleWords(words: number): number {
  let g = MIN_GRANULE_WORDS;
  while (g * 16 < words) g *= 2;
  return g;
}

/**
 * Sets or clears bits first..last of a bitmap (bit i is bit i % 32 of word i / 32). Partial words
 * bit by bit, whole words at once: bounded by the range's length.
 */
export function setBitRange(bits: Uint32Array, first: number, last: number, on: boolean): void {
  let i = first;
  while (i <= last) {
    if ((i & 31) === 0 && i + 31 <= last) {
      bits[i >>> 5] = on ? 0xffffffff : 0;
      i += 32;
    } else {
      const mask = 1 << (i & 31);
      if (on) bits[i >>> 5] |= mask;
      else bits[i >>> 5] &= ~mask;
      i++;
    }
  }
}

/** The runs of set bits of a bitmap (laid out as for setBitRange) whose bit 0 is page `base`. */
export function* bitmapRuns(bits: Uint32Array, base: number): Generator<PageRun> {
  let open: PageRun | undefined;
  // Bounded by the bitmap's length; empty and full words are skipped or taken whole.
  for (let w = 0; w < bits.length; w++) {
    const word = bits[w];
    const pfn0 = base + w * 32;
    if (word === 0) {
      if (open !== undefined) {
        yield open;
        open = undefined;
      }
      continue;
    }
    if (word === 0xffffffff) {
      if (open !== undefined) open.count += 32;
      else open = { start: pfn0, count: 32 };
      continue;
    }
    for (let b = 0; b < 32; b++) {
      if ((word & (1 << b)) !== 0) {
        if (open !== undefined) open.count++;
        else open = { start: pfn0 + b, count: 1 };
      } else if (open !== undefined) {
        yield open;
        open = undefined;
      }
    }
  }
  if (open !== undefined) yield open;
}

/** Sorts PFNs and merges them into maximal runs (duplicates collapse). */
export function compactRuns(pfns: ArrayLike<number>): PageRun[] {
  return sortedRuns(Float64Array.from(pfns));
}

/** Sorts `pfns` in place (numerically: a typed array) and merges them into maximal runs. */
function sortedRuns(pfns: Float64Array): PageRun[] {
  pfns.sort();
  const runs: PageRun[] = [];
  let last: PageRun | undefined;
  for (let i = 0; i < pfns.length; i++) {
    const pfn = pfns[i];
    if (last !== undefined && pfn < last.start + last.count) continue;
    if (last !== undefined && pfn === last.start + last.count) last.count++;
    else runs.push((last = { start: pfn, count: 1 }));
  }
  return runs;
}
