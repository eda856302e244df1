/**
 * What the shipped unit (docs/vballoon.service) gives the daemon, read from the file itself so
 * that whatever stands in for it (the bench's daemon process, the restart tests' service, the
 * soak) runs the daemon as the unit does.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';

/** docs/vballoon.service (from dist/lib/testing). */
export const UNIT_FILE = path.resolve(__dirname, '..', '..', '..', 'docs', 'vballoon.service');

/** The unit's Nice= (0 without one). */
export function unitNice(): number {
  const m = /^Nice=(-?\d+)$/m.exec(fs.readFileSync(UNIT_FILE, 'utf8'));
  return m === null ? 0 : Number(m[1]);
}

/** The options the unit's ExecStart gives Node before the script (its heap settings). */
export function daemonNodeFlags(): string[] {
  const m = /^ExecStart=\S*node((?:\s+--\S+)*)\s+\S+vballoon\.js\s/m.exec(fs.readFileSync(UNIT_FILE, 'utf8'));
  if (m === null) throw new Error(`no ExecStart running node with vballoon.js in ${UNIT_FILE}`);
  return m[1].split(/\s+/).filter((f) => f !== '');
}
