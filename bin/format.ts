/** How the CLI prints status, stats and progress (the --json output is the control API's JSON). */
import { VmStats, VmStatus } from '../lib/daemon/daemon';
import { formatBytes } from '../lib/units';

export function table(rows: string[][]): string {
  const widths = rows[0].map((_, c) => Math.max(...rows.map((r) => (r[c] ?? '').length)));
  return rows
    .map((r) =>
      r
        .map((cell, c) => cell.padEnd(widths[c]))
        .join('  ')
        .trimEnd(),
    )
    .join('\n');
}

const bytesOrDash = (b: number | null): string => (b === null ? '-' : formatBytes(b));

export function statusTable(list: VmStatus[]): string {
  const rows = [
    [
      'VM',
      'STATE',
      'MODE',
      'GUEST RAM',
      'BALLOON TARGET',
      'BALLOON ACTUAL',
      'GUEST SIZE',
      'HOST RESIDENT',
      'PRESSURE',
      'STATS AGE',
    ],
  ];
  for (const s of list) {
    rows.push([
      s.vm,
      s.connected ? 'connected' : 'waiting',
      s.mode +
        (s.policyCooldownSeconds > 0 ? ` (cooldown ${s.policyCooldownSeconds}s)` : '') +
        (s.discardInhibited ? ' [no discard]' : ''),
      bytesOrDash(s.guestRamBytes),
      formatBytes(s.targetBytes),
      formatBytes(s.actualBytes),
      bytesOrDash(s.guestSizeBytes),
      bytesOrDash(s.hostResidentBytes),
      String(s.pressureMessages),
      s.statsAgeSeconds === null ? '-' : `${s.statsAgeSeconds}s${s.statsStale ? ' (stale)' : ''}`,
    ]);
  }
  return table(rows);
}

const COUNT_STATS = new Set([
  'major_faults',
  'minor_faults',
  'hugetlb_allocations',
  'hugetlb_failures',
  'oom_kills',
  'alloc_stalls',
]);

export function statsTable(list: VmStats[]): string {
  const out: string[] = [];
  for (const s of list) {
    out.push(
      s.updatedAt === null
        ? `${s.vm}: no stats yet`
        : `${s.vm}: updated ${s.updatedAt} (${s.ageSeconds}s ago)${s.stale ? ', STALE' : ''}`,
    );
    const rows = [['STAT', 'VALUE']];
    for (const [k, v] of Object.entries(s.stats))
      rows.push([k, COUNT_STATS.has(k) || k.startsWith('tag_') ? String(v) : formatBytes(v)]);
    if (rows.length > 1) out.push(table(rows));
  }
  return out.join('\n\n');
}

export function bar(done: number, total: number, width = 30): string {
  const f = total === 0 ? 1 : Math.min(1, Math.max(0, done / total));
  const n = Math.round(f * width);
  return `[${'#'.repeat(n)}${'.'.repeat(width - n)}] ${Math.round(f * 100)}%`;
}
