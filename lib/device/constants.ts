/**
 * virtio-balloon constants (VIRTIO 1.2 section 5.5, Linux include/uapi/linux/virtio_balloon.h,
 * and the 2014 message-queue RFC). Spec names are kept. Pure data.
 */

export const VIRTIO_ID_BALLOON = 5;

// Feature bits (numbers).
export const VIRTIO_BALLOON_F_MUST_TELL_HOST = 0;
export const VIRTIO_BALLOON_F_STATS_VQ = 1;
export const VIRTIO_BALLOON_F_DEFLATE_ON_OOM = 2;
export const VIRTIO_BALLOON_F_FREE_PAGE_HINT = 3;
export const VIRTIO_BALLOON_F_PAGE_POISON = 4;
export const VIRTIO_BALLOON_F_PAGE_REPORTING = 5;
/**
 * The message-queue feature. The seed RFC used bit 2, which the spec later gave to
 * DEFLATE_ON_OOM; by default we use 20, a device-specific bit (0..23) that no known
 * implementation uses (16 is StratoVirt's auto-balloon with another message format; 6-8 are
 * crosvm's and spec proposals). See docs/balloon.md.
 */
export const VIRTIO_BALLOON_F_MESSAGE_VQ = 20;
/** The seed RFC's bit for the message queue (selectable; then DEFLATE_ON_OOM is not offered). */
export const VIRTIO_BALLOON_F_MESSAGE_VQ_SEED = 2;

export function bit(n: number): bigint {
  return 1n << BigInt(n);
}

/** PFNs are in 4 KiB units whatever the guest page size. */
export const VIRTIO_BALLOON_PFN_SHIFT = 12;
export const BALLOON_PAGE_BYTES = 1 << VIRTIO_BALLOON_PFN_SHIFT;
/** Linux sends at most this many PFNs per inflate/deflate descriptor; we accept no more. */
export const VIRTIO_BALLOON_ARRAY_PFNS_MAX = 256;

/** Message types on the message queue (the seed: one u32). */
export const VIRTIO_BALLOON_MSG_PRESSURE = 1;
export const MESSAGE_BYTES = 4;

/** Stats entries: `{le16 tag; le64 val}`, packed. */
export const STAT_ENTRY_BYTES = 10;

/** Stats tags 0-15 (0-9 in the spec, 10-15 Linux extensions since 6.12). */
export const STAT_TAG_NAMES: readonly string[] = [
  'swap_in',
  'swap_out',
  'major_faults',
  'minor_faults',
  'free_memory',
  'total_memory',
  'available_memory',
  'disk_caches',
  'hugetlb_allocations',
  'hugetlb_failures',
  'oom_kills',
  'alloc_stalls',
  'async_scans',
  'direct_scans',
  'async_reclaims',
  'direct_reclaims',
];

export const VIRTIO_BALLOON_S_SWAP_IN = 0;
export const VIRTIO_BALLOON_S_SWAP_OUT = 1;
export const VIRTIO_BALLOON_S_MAJFLT = 2;
export const VIRTIO_BALLOON_S_MINFLT = 3;
export const VIRTIO_BALLOON_S_MEMFREE = 4;
export const VIRTIO_BALLOON_S_MEMTOT = 5;
export const VIRTIO_BALLOON_S_AVAIL = 6;
export const VIRTIO_BALLOON_S_CACHES = 7;
export const VIRTIO_BALLOON_S_HTLB_PGALLOC = 8;
export const VIRTIO_BALLOON_S_HTLB_PGFAIL = 9;
export const VIRTIO_BALLOON_S_OOM_KILL = 10;
export const VIRTIO_BALLOON_S_ALLOC_STALL = 11;
export const VIRTIO_BALLOON_S_ASYNC_SCAN = 12;
export const VIRTIO_BALLOON_S_DIRECT_SCAN = 13;
export const VIRTIO_BALLOON_S_ASYNC_RECLAIM = 14;
export const VIRTIO_BALLOON_S_DIRECT_RECLAIM = 15;

/** The name of a stats tag, or `tag_<n>` for one we do not know. */
export function statTagName(tag: number): string {
  return STAT_TAG_NAMES[tag] ?? `tag_${tag}`;
}

/** Config space: le32 num_pages @0, le32 actual @4, le32 free_page_hint_cmd_id @8, le32 poison_val @12. */
export const CONFIG_NUM_PAGES = 0;
export const CONFIG_ACTUAL = 4;
export const CONFIG_FREE_PAGE_HINT_CMD_ID = 8;
export const CONFIG_POISON_VAL = 12;
export const CONFIG_SIZES = [8, 12, 16] as const;
