/**
 * A Logger whose output can be replaced at run time (a reload changing `log.format` or
 * `log.level`): every child created before the change follows it, because children write through
 * the same shared slot instead of holding the old logger.
 */
import { LogFields, Logger } from '../log';

export class SwitchableLogger implements Logger {
  private constructor(
    private readonly slot: { current: Logger },
    private readonly fields: LogFields,
  ) {}

  static wrap(initial: Logger): SwitchableLogger {
    return new SwitchableLogger({ current: initial }, {});
  }

  /** Sends everything (this logger's and every child's records) to `next` from now on. */
  replace(next: Logger): void {
    this.slot.current = next;
  }

  debug(message: string, fields?: LogFields): void {
    this.slot.current.debug(message, { ...this.fields, ...fields });
  }
  info(message: string, fields?: LogFields): void {
    this.slot.current.info(message, { ...this.fields, ...fields });
  }
  warn(message: string, fields?: LogFields): void {
    this.slot.current.warn(message, { ...this.fields, ...fields });
  }
  error(message: string, fields?: LogFields): void {
    this.slot.current.error(message, { ...this.fields, ...fields });
  }
  child(fields: LogFields): Logger {
    return new SwitchableLogger(this.slot, { ...this.fields, ...fields });
  }
}
