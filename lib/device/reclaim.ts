/**
 * Turns runs of ballooned 4 KiB guest pages into the fewest hole punches on the files behind guest
 * memory: one range per contiguous run inside a region, split at region boundaries, and, where
 * the file's pages are larger than 4 KiB (hugetlbfs), only host pages whose every 4 KiB page is
 * ballooned. Pure: the caller does the fallocate calls.
 */
import { BALLOON_PAGE_BYTES } from './constants';
import { PageRun } from './page-tracker';

/** What the planner needs of a memory region (lib/virtio MemoryRegion has all of it). */
export interface ReclaimRegion {
  readonly guestPhysAddr: number;
  readonly sizeBytes: number;
  readonly mmapOffset: number;
  readonly pageSizeBytes: number;
  readonly fd: number;
}

export interface DiscardRange {
  fd: number;
  fileOffset: number;
  length: number;
}

/**
 * Plans discards for `runs` (sorted, as PageTracker.add returns them). `isFull(pfn, count)` says
 * whether a whole host page is ballooned (only asked for regions with huge pages).
 */
export function planDiscards(
  runs: readonly PageRun[],
  findRegion: (gpa: number) => ReclaimRegion | undefined,
  isFull: (pfn: number, count: number) => boolean,
): DiscardRange[] {
  const out: DiscardRange[] = [];
  const push = (fd: number, fileOffset: number, length: number): void => {
    const last = out[out.length - 1];
    if (last !== undefined && last.fd === fd && last.fileOffset + last.length === fileOffset) last.length += length;
    else out.push({ fd, fileOffset, length });
  };
  for (const run of runs) {
    let gpa = run.start * BALLOON_PAGE_BYTES;
    const end = (run.start + run.count) * BALLOON_PAGE_BYTES;
    // Each step finishes a region (or skips one page outside memory): bounded by the run length.
    while (gpa < end) {
      const r = findRegion(gpa);
      if (r === undefined) {
        gpa += BALLOON_PAGE_BYTES;
        continue;
      }
      const pieceEnd = Math.min(end, r.guestPhysAddr + r.sizeBytes);
      const toFile = (g: number): number => r.mmapOffset + (g - r.guestPhysAddr);
      const h = r.pageSizeBytes;
      if (h <= BALLOON_PAGE_BYTES) {
        push(r.fd, toFile(gpa), pieceEnd - gpa);
      } else {
        // Host pages overlapping [gpa, pieceEnd), aligned in file offsets.
        const regionFileEnd = toFile(r.guestPhysAddr + r.sizeBytes);
        for (let fo = Math.floor(toFile(gpa) / h) * h; fo < toFile(pieceEnd); fo += h) {
          if (fo < r.mmapOffset || fo + h > regionFileEnd) continue; // host page not wholly in the region
          const hpGpa = r.guestPhysAddr + (fo - r.mmapOffset);
          if (isFull(hpGpa / BALLOON_PAGE_BYTES, h / BALLOON_PAGE_BYTES)) push(r.fd, fo, h);
        }
      }
      gpa = pieceEnd;
    }
  }
  return out;
}

/**
 * The largest host-page-aligned part of the guest range [gpa, gpa + len) in `r`, as a file range
 * (free page reporting hands whole free ranges; only whole host pages can be discarded).
 */
export function alignedFileRange(r: ReclaimRegion, gpa: number, len: number): DiscardRange | undefined {
  const h = Math.max(r.pageSizeBytes, BALLOON_PAGE_BYTES);
  const start = r.mmapOffset + (gpa - r.guestPhysAddr);
  const end = start + len;
  const a = Math.ceil(start / h) * h;
  const b = Math.floor(end / h) * h;
  return b > a ? { fd: r.fd, fileOffset: a, length: b - a } : undefined;
}
