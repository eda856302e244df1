/**
 * A small structured logger interface, injected everywhere something is logged. The daemon
 * supplies a human-readable or JSON-lines implementation; tests use {@link MemoryLogger}.
 * Imports nothing.
 */

export type LogLevel = 'debug' | 'info' | 'warn' | 'error';
export type LogFields = Record<string, unknown>;

export interface Logger {
  debug(message: string, fields?: LogFields): void;
  info(message: string, fields?: LogFields): void;
  warn(message: string, fields?: LogFields): void;
  error(message: string, fields?: LogFields): void;
  /** A logger that adds `fields` to every record. */
  child(fields: LogFields): Logger;
}

export interface LogRecord {
  level: LogLevel;
  message: string;
  fields: LogFields;
}

const LEVELS: Record<LogLevel, number> = { debug: 10, info: 20, warn: 30, error: 40 };

/** Base class: subclasses implement write(). */
export abstract class BaseLogger implements Logger {
  constructor(
    protected readonly minLevel: LogLevel = 'info',
    protected readonly bound: LogFields = {},
  ) {}
  protected abstract write(record: LogRecord): void;
  protected abstract derive(fields: LogFields): Logger;
  private log(level: LogLevel, message: string, fields?: LogFields): void {
    if (LEVELS[level] < LEVELS[this.minLevel]) return;
    this.write({ level, message, fields: { ...this.bound, ...fields } });
  }
  debug(message: string, fields?: LogFields): void {
    this.log('debug', message, fields);
  }
  info(message: string, fields?: LogFields): void {
    this.log('info', message, fields);
  }
  warn(message: string, fields?: LogFields): void {
    this.log('warn', message, fields);
  }
  error(message: string, fields?: LogFields): void {
    this.log('error', message, fields);
  }
  child(fields: LogFields): Logger {
    return this.derive({ ...this.bound, ...fields });
  }
}

/** Keeps records in memory (tests assert on them). Children share the parent's record list. */
export class MemoryLogger extends BaseLogger {
  constructor(
    readonly records: LogRecord[] = [],
    minLevel: LogLevel = 'debug',
    bound: LogFields = {},
  ) {
    super(minLevel, bound);
  }
  protected write(record: LogRecord): void {
    this.records.push(record);
  }
  protected derive(fields: LogFields): Logger {
    return new MemoryLogger(this.records, this.minLevel, fields);
  }
  /** Records at `level` (default: all) whose message contains `text`. */
  find(text: string, level?: LogLevel): LogRecord[] {
    return this.records.filter((r) => r.message.includes(text) && (level === undefined || r.level === level));
  }
}

function formatValue(v: unknown): string {
  if (typeof v === 'bigint') return `0x${v.toString(16)}`;
  if (typeof v === 'string') return /\s/.test(v) ? JSON.stringify(v) : v;
  if (v instanceof Error) return JSON.stringify(v.message);
  return JSON.stringify(v) ?? String(v);
}

/** Writes to a stream: `time level message key=value ...` or JSON lines. */
export class StreamLogger extends BaseLogger {
  constructor(
    private readonly out: { write(s: string): unknown },
    private readonly format: 'text' | 'json' = 'text',
    minLevel: LogLevel = 'info',
    bound: LogFields = {},
    private readonly now: () => Date = () => new Date(),
  ) {
    super(minLevel, bound);
  }
  protected write(record: LogRecord): void {
    const time = this.now().toISOString();
    if (this.format === 'json') {
      const fields: LogFields = {};
      for (const [k, v] of Object.entries(record.fields)) {
        fields[k] = typeof v === 'bigint' ? `0x${v.toString(16)}` : v instanceof Error ? v.message : v;
      }
      this.out.write(`${JSON.stringify({ time, level: record.level, msg: record.message, ...fields })}\n`);
      return;
    }
    const kv = Object.entries(record.fields)
      .map(([k, v]) => `${k}=${formatValue(v)}`)
      .join(' ');
    this.out.write(`${time} ${record.level.padEnd(5)} ${record.message}${kv ? ` ${kv}` : ''}\n`);
  }
  protected derive(fields: LogFields): Logger {
    return new StreamLogger(this.out, this.format, this.minLevel, fields, this.now);
  }
}

/** Discards everything. */
export class NullLogger extends BaseLogger {
  protected write(): void {}
  protected derive(): Logger {
    return this;
  }
}

/**
 * Allows `burst` log lines per `intervalMs`; reports how many were suppressed before a line.
 * Repeated warnings of one kind (refused connections, failed accepts) must not flood the journal
 * nor spend the event loop on log lines: every one is counted elsewhere, this decides which are
 * logged.
 */
export class LogRateLimiter {
  private windowStartMs: number | undefined;
  private logged = 0;
  private suppressed = 0;
  constructor(
    private readonly burst: number,
    private readonly intervalMs: number,
    private readonly now: () => number,
  ) {}
  /** undefined: do not log this one; a number: log it, with that many suppressed before it. */
  take(): number | undefined {
    const now = this.now();
    if (this.windowStartMs === undefined || now - this.windowStartMs >= this.intervalMs) {
      this.windowStartMs = now;
      this.logged = 0;
    }
    if (this.logged >= this.burst) {
      this.suppressed++;
      return undefined;
    }
    this.logged++;
    const s = this.suppressed;
    this.suppressed = 0;
    return s;
  }
}
