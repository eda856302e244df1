/**
 * Kick-to-used round-trip latency through the real vhost-user back-end, with the QEMU-like test
 * front-end and guest driver in another process, next to an eventfd ping-pong between the same
 * two processes (the floor: two eventfd writes and two event-loop wake-ups), measured in the same
 * run, alternating, repeated.
 *
 *   parent: back-end (VhostUserBackend + EchoDevice) and the ping-pong echo side
 *   child:  test front-end + split-ring driver; times add buffer -> kick -> call eventfd -> used
 */
import { ChildProcess, fork } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { NullLogger } from '../lib/log';
import { native } from '../lib/native';
import { echoPings, guestExecArgv, pingPong, Waker } from './common';
import { EchoDevice } from '../lib/testing/echo-device';
import { TestFrontend } from '../lib/testing/frontend';
import { VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX } from '../lib/vhost/constants';
import { VhostUserBackend } from '../lib/vhost/server';
import { median, spreadPercent, summarize } from './stats';

const CHILD_PING_FD = 4; // written by the child, read by the parent
const CHILD_PONG_FD = 5; // written by the parent, read by the child

type Request =
  | { kind: 'pingpong'; iterations: number }
  | { kind: 'kick'; iterations: number; socketPath: string }
  | { kind: 'exit' };
type Reply = { kind: 'samples'; samplesNs: number[] } | { kind: 'error'; message: string };

async function childKick(iterations: number, socketPath: string): Promise<number[]> {
  const fe = TestFrontend.connect(socketPath, { numQueues: 1, configSize: 8, queueSize: 256 });
  try {
    await fe.realize();
    const d = (await fe.start(VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX, [0])).get(0)!;
    const waker = new Waker(d.callFd);
    const buf = fe.ram.alloc(64);
    const samples: number[] = [];
    try {
      for (let i = 0; i < iterations; i++) {
        const t0 = process.hrtime.bigint();
        const interrupted = waker.next();
        d.setUsedEvent(d.availIdxPublished); // interrupt me when this buffer is used
        d.addBuffer([{ addr: buf, len: 8 }]);
        d.kick();
        await interrupted;
        if (d.takeUsed().length !== 1) throw new Error('interrupt without a used buffer');
        samples.push(Number(process.hrtime.bigint() - t0));
      }
    } finally {
      waker.close();
    }
    await fe.stop();
    return samples;
  } finally {
    fe.close();
  }
}

function runChild(): void {
  process.on('message', (req: Request) => {
    const reply = (r: Reply): void => void process.send!(r);
    if (req.kind === 'exit') process.exit(0);
    const work =
      req.kind === 'pingpong'
        ? pingPong(CHILD_PING_FD, CHILD_PONG_FD, req.iterations)
        : childKick(req.iterations, req.socketPath);
    work.then(
      (samplesNs) => reply({ kind: 'samples', samplesNs }),
      (err: unknown) =>
        reply({ kind: 'error', message: err instanceof Error ? (err.stack ?? err.message) : String(err) }),
    );
  });
}

function ask(child: ChildProcess, req: Request): Promise<number[]> {
  return new Promise((resolve, reject) => {
    child.once('message', (r: Reply) => (r.kind === 'samples' ? resolve(r.samplesNs) : reject(new Error(r.message))));
    child.send(req);
  });
}

export interface LatencyResult {
  name: string;
  unit: 'us';
  rounds: number;
  iterations: number;
  pingpong: { p50: number; p99: number; p999: number };
  kick: { p50: number; p99: number; p999: number };
  ratioP50: number;
  ratioP99: number;
  spreadP50Percent: { pingpong: number; kick: number };
}

export async function benchKickLatency(options: { rounds?: number; iterations?: number } = {}): Promise<LatencyResult> {
  const rounds = options.rounds ?? 5;
  const iterations = options.iterations ?? 20000;
  const ping = native.eventfd(0, true);
  const pong = native.eventfd(0, true);
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vballoon-bench-'));
  const socketPath = path.join(dir, 'vhost.sock');
  const backend = new VhostUserBackend(new EchoDevice({ numQueues: 1 }), { log: new NullLogger() });
  backend.listen(socketPath);
  // The echo side of the ping-pong lives in this process, on the same event loop as the back-end.
  const echo = echoPings(ping, pong);
  const child = fork(__filename, ['child'], {
    execArgv: guestExecArgv(),
    stdio: ['inherit', 'inherit', 'inherit', 'ipc', ping, pong],
  });
  try {
    const per = {
      pingpong: [] as Array<ReturnType<typeof summarize>>,
      kick: [] as Array<ReturnType<typeof summarize>>,
    };
    // Warm up both paths (JIT, page faults), then alternate measured rounds.
    await ask(child, { kind: 'pingpong', iterations: 2000 });
    await ask(child, { kind: 'kick', iterations: 2000, socketPath });
    for (let r = 0; r < rounds; r++) {
      per.pingpong.push(summarize(await ask(child, { kind: 'pingpong', iterations })));
      per.kick.push(summarize(await ask(child, { kind: 'kick', iterations, socketPath })));
    }
    const us = (ns: number): number => Math.round(ns / 10) / 100;
    const agg = (list: Array<ReturnType<typeof summarize>>) => ({
      p50: us(median(list.map((s) => s.p50))),
      p99: us(median(list.map((s) => s.p99))),
      p999: us(median(list.map((s) => s.p999))),
    });
    const pingpong = agg(per.pingpong);
    const kick = agg(per.kick);
    return {
      name: 'kick-to-used round trip (vhost-user, separate processes)',
      unit: 'us',
      rounds,
      iterations,
      pingpong,
      kick,
      ratioP50: Math.round((kick.p50 / pingpong.p50) * 100) / 100,
      ratioP99: Math.round((kick.p99 / pingpong.p99) * 100) / 100,
      spreadP50Percent: {
        pingpong: Math.round(spreadPercent(per.pingpong.map((s) => s.p50))),
        kick: Math.round(spreadPercent(per.kick.map((s) => s.p50))),
      },
    };
  } finally {
    child.send({ kind: 'exit' });
    native.pollStop(echo);
    backend.close();
    native.close(ping);
    native.close(pong);
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

if (require.main === module && process.argv[2] === 'child') runChild();
