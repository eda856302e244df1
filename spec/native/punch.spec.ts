/**
 * The punch queue of the addon (lib/native/punch.c): a real worker thread punching a real memfd,
 * completions on the event loop, argument checks, and a process that exits with queues alive.
 */
import { expect } from 'chai';
import { execFileSync } from 'node:child_process';
import * as path from 'node:path';
import { closeQuietly, isSystemError, native, PUNCH_RECORD } from '../../lib/native';
import { fdCount, until } from '../helpers';

const PAGE = 4096;

describe('native punch queue (worker thread)', () => {
  let fdsBefore: number;
  beforeEach(() => {
    fdsBefore = fdCount();
  });
  afterEach(() => {
    expect(fdCount(), 'descriptors leaked').to.equal(fdsBefore);
  });

  function writtenMemfd(pages: number): { fd: number; map: ArrayBuffer; view: Uint8Array } {
    const fd = native.memfdCreate('vballoon-test-punch');
    native.ftruncate(fd, pages * PAGE);
    const map = native.mmap(fd, pages * PAGE, 0);
    const view = new Uint8Array(map);
    for (let i = 0; i < view.length; i += PAGE) view[i] = 1;
    return { fd, map, view };
  }

  it('punches batches in order and reports each one once, through the callback or a wait', async () => {
    const m = writtenMemfd(64);
    const seen: number[][] = [];
    const q = native.punchQueueCreate((records) => seen.push(Array.from(records)));
    try {
      const a = native.punchQueueSubmit(q, m.fd, Float64Array.from([0, 8 * PAGE, 16 * PAGE, 8 * PAGE]));
      const b = native.punchQueueSubmit(q, m.fd, Float64Array.from([32 * PAGE, PAGE]));
      expect([a, b]).to.deep.equal([1, 2]);
      await until(() => seen.flat().length === 2 * PUNCH_RECORD.size, 'two completions');
      const records = seen.flat();
      expect(records[PUNCH_RECORD.seq]).to.equal(1);
      expect(records[PUNCH_RECORD.calls]).to.equal(2);
      expect(records[PUNCH_RECORD.bytes]).to.equal(16 * PAGE);
      expect(records[PUNCH_RECORD.size + PUNCH_RECORD.seq]).to.equal(2);
      expect(native.fstat(m.fd).allocatedBytes).to.equal((64 - 17) * PAGE);
      expect(m.view[0]).to.equal(0);
      expect(m.view[8 * PAGE]).to.equal(1);
      // A wait hands back what completed since; the callback then never sees it.
      const c = native.punchQueueSubmit(q, m.fd, Float64Array.from([40 * PAGE, PAGE]));
      const waited = native.punchQueueWait(q, c);
      expect(Array.from(waited)).to.have.length(PUNCH_RECORD.size);
      expect(waited[PUNCH_RECORD.seq]).to.equal(3);
      expect(m.view[40 * PAGE]).to.equal(0);
      await new Promise((resolve) => setTimeout(resolve, 10));
      expect(seen.flat()).to.have.length(2 * PUNCH_RECORD.size);
      // Waiting for a batch already handed back returns at once, with nothing.
      expect(native.punchQueueWait(q, a)).to.have.length(0);
    } finally {
      native.punchQueueClose(q);
      native.punchQueueClose(q); // idempotent
      native.munmap(m.map);
      closeQuietly(m.fd);
    }
  });

  it('counts a failed punch with its errno and keeps going', () => {
    const m = writtenMemfd(4);
    const [r, w] = native.pipe();
    const q = native.punchQueueCreate(() => undefined);
    try {
      native.punchQueueSubmit(q, r, Float64Array.from([0, PAGE]));
      const seq = native.punchQueueSubmit(q, m.fd, Float64Array.from([0, PAGE]));
      const rec = native.punchQueueWait(q, seq);
      expect(rec[PUNCH_RECORD.errors]).to.equal(1);
      expect(rec[PUNCH_RECORD.firstErrno]).to.be.greaterThan(0);
      expect(rec[PUNCH_RECORD.size + PUNCH_RECORD.calls]).to.equal(1);
    } finally {
      native.punchQueueClose(q);
      native.munmap(m.map);
      closeQuietly(m.fd);
      closeQuietly(r);
      closeQuietly(w);
    }
  });

  it('rejects bad arguments and a closed queue', () => {
    const q = native.punchQueueCreate(() => undefined);
    const m = writtenMemfd(1);
    try {
      const throwsCode = (fn: () => unknown): string => {
        try {
          fn();
        } catch (err) {
          return (err as { code: string }).code;
        }
        return 'none';
      };
      expect(throwsCode(() => native.punchQueueSubmit(q, m.fd, new Float64Array(3)))).to.equal('ERR_INVALID_ARG_TYPE');
      expect(throwsCode(() => native.punchQueueSubmit(q, m.fd, Float64Array.from([-1, 1])))).to.equal(
        'ERR_INVALID_ARG_TYPE',
      );
      expect(throwsCode(() => native.punchQueueSubmit(q, m.fd, Float64Array.from([0.5, 1])))).to.equal(
        'ERR_INVALID_ARG_TYPE',
      );
      expect(throwsCode(() => native.punchQueueWait(q, 5))).to.equal('EINVAL');
      let caught: unknown;
      try {
        native.punchQueueSubmit(q, 1 << 20, Float64Array.from([0, PAGE]));
      } catch (err) {
        caught = err;
      }
      expect(isSystemError(caught, 'EBADF')).to.equal(true);
      native.punchQueueClose(q);
      expect(throwsCode(() => native.punchQueueSubmit(q, m.fd, Float64Array.from([0, PAGE])))).to.equal('EBADF');
    } finally {
      native.punchQueueClose(q);
      native.munmap(m.map);
      closeQuietly(m.fd);
    }
  });

  it('a worker started at a raised priority (the unit runs the daemon at Nice=-10) punches at nice 0', function () {
    const addon = path.resolve(__dirname, '..', '..', 'lib', 'native', 'index.js');
    // The child raises its event loop thread's priority as systemd's Nice= would, then reports
    // the nice value of each of its threads while the worker is alive.
    const script = `
      const fs = require('node:fs');
      const os = require('node:os');
      const { native } = require(${JSON.stringify(addon)});
      try { os.setPriority(-5); } catch { console.log('not permitted'); process.exit(0); }
      const nice = (tid) => {
        const stat = fs.readFileSync('/proc/self/task/' + tid + '/stat', 'utf8');
        return Number(stat.slice(stat.lastIndexOf(')') + 2).split(' ')[16]);
      };
      const fd = native.memfdCreate('nice-test');
      native.ftruncate(fd, 1 << 20);
      const q = native.punchQueueCreate(() => {
        const out = {};
        for (const tid of fs.readdirSync('/proc/self/task')) {
          const comm = fs.readFileSync('/proc/self/task/' + tid + '/comm', 'utf8').trim();
          if (comm === 'vb-punch') out.worker = nice(tid);
        }
        out.loop = nice(process.pid);
        console.log(JSON.stringify(out));
        native.punchQueueClose(q);
      });
      native.punchQueueSubmit(q, fd, Float64Array.from([0, 1 << 20]));
    `;
    const out = execFileSync(process.execPath, ['-e', script], { timeout: 20_000, encoding: 'utf8' }).trim();
    if (out === 'not permitted') this.skip(); // raising a priority needs CAP_SYS_NICE
    expect(JSON.parse(out)).to.deep.equal({ worker: 0, loop: -5 });
  });

  it('a process with idle queues and a batch in flight exits on its own', () => {
    const addon = path.resolve(__dirname, '..', '..', 'lib', 'native', 'index.js');
    const script = `
      const { native } = require(${JSON.stringify(addon)});
      const fd = native.memfdCreate('exit-test');
      native.ftruncate(fd, 64 << 20);
      const idle = native.punchQueueCreate(() => {});
      const busy = native.punchQueueCreate(() => { console.log('done'); });
      native.punchQueueSubmit(busy, fd, Float64Array.from([0, 64 << 20]));
    `;
    const out = execFileSync(process.execPath, ['-e', script], { timeout: 20_000, encoding: 'utf8' });
    expect(out.trim()).to.equal('done');
  });
});
