/**
 * Runtime state kept across daemon restarts: per VM the operator's target and the policy mode set
 * through the control API. Written atomically (temporary file + rename) on every change; read once
 * at start. Each entry also records the configuration file's values it overrode: when the file
 * changes that value later, the file wins (the operator edited it on purpose).
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { Mode } from '../policy/engine';

export interface PersistedVm {
  targetBytes: number;
  mode: Mode;
  /** The file's target and mode when this entry was written. */
  fileTargetBytes: number;
  fileMode: Mode;
}

export interface PersistedState {
  version: 1;
  vms: Record<string, PersistedVm>;
}

export class StateStore {
  private state: PersistedState = { version: 1, vms: {} };

  constructor(private file: string | undefined) {}

  get path(): string | undefined {
    return this.file;
  }

  /** Reads the file; a missing file is an empty state; a broken one is reported and ignored. */
  load(): { error?: string } {
    if (this.file === undefined) return {};
    let text: string;
    try {
      text = fs.readFileSync(this.file, 'utf8');
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') return {};
      return { error: `cannot read ${this.file}: ${(err as Error).message}` };
    }
    try {
      const doc = JSON.parse(text) as { version?: unknown; vms?: Record<string, Partial<Record<string, unknown>>> };
      if (doc.version !== 1 || typeof doc.vms !== 'object') throw new Error('unknown format');
      const vms: Record<string, PersistedVm> = {};
      for (const [name, v] of Object.entries(doc.vms)) {
        if (
          Number.isSafeInteger(v.targetBytes) &&
          (v.targetBytes as number) >= 0 &&
          (v.mode === 'auto' || v.mode === 'manual') &&
          Number.isSafeInteger(v.fileTargetBytes) &&
          (v.fileMode === 'auto' || v.fileMode === 'manual')
        )
          vms[name] = v as unknown as PersistedVm;
      }
      this.state = { version: 1, vms };
      return {};
    } catch (err) {
      return { error: `${this.file} is not a vballoon state file (${(err as Error).message}); starting without it` };
    }
  }

  get(name: string): PersistedVm | undefined {
    return Object.prototype.hasOwnProperty.call(this.state.vms, name) ? this.state.vms[name] : undefined;
  }

  /** Moves to another file (a reload); the current state is written there on the next change. */
  setFile(file: string | undefined): void {
    this.file = file;
  }

  set(name: string, entry: PersistedVm): void {
    this.state.vms[name] = entry;
    this.save();
  }

  delete(name: string): void {
    if (this.get(name) === undefined) return;
    this.state.vms = Object.fromEntries(Object.entries(this.state.vms).filter(([k]) => k !== name));
    this.save();
  }

  private save(): void {
    if (this.file === undefined) return;
    fs.mkdirSync(path.dirname(this.file), { recursive: true, mode: 0o700 });
    const tmp = `${this.file}.${process.pid}.tmp`;
    fs.writeFileSync(tmp, `${JSON.stringify(this.state, null, 2)}\n`, { mode: 0o600 });
    fs.renameSync(tmp, this.file);
  }
}
