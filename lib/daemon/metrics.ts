/**
 * Prometheus metrics of one daemon, in its own prom-client Registry (never the global one), and
 * the HTTP endpoint that serves them at /metrics. Every metric is documented in docs/metrics.md.
 * State gauges and snapshot-derived counters are computed once per render from the devices'
 * snapshots; event counters (policy actions, errors, pressure acknowledgement latency) are
 * incremented as the events happen.
 *
 * Anyone who can reach the port shares the daemon's event loop and descriptors with every VM, so
 * the endpoint is bounded: connections are capped (more get a 503 and are closed at once), idle
 * and slow connections time out, and scrapes within RENDER_CACHE_MS share one render.
 */
import * as fs from 'node:fs';
import * as http from 'node:http';
import * as net from 'node:net';
import * as path from 'node:path';
import { AddressInfo } from 'node:net';
import { collectDefaultMetrics, Counter, Gauge, Histogram, Registry } from 'prom-client';
import { BalloonDevice, BalloonSnapshot } from '../device/balloon';
import { errorMessage } from '../errors';
import { Logger, LogRateLimiter, NullLogger } from '../log';
import { Mode } from '../policy/engine';

/**
 * Scrapes within this long of a render get that render's text: 1,000 concurrent scrapes cost one
 * render, not 1,000 (they delayed a bystander VM by 1.7 s). Prometheus scrapes every 15 s or so.
 */
export const RENDER_CACHE_MS = 1000;
/**
 * Metrics connections open at once (Prometheus uses one per server). One more is answered 503
 * and closed at once, so a connection flood cannot take the descriptors the VMs need.
 */
export const MAX_METRICS_CONNECTIONS = 32;
/**
 * Refused connections whose 503 is still being delivered (until the client closes its end, at
 * most REFUSED_LINGER_MS). A burst accepted at once is at most the listen backlog (511), so this
 * answers every one of a burst; past it a connection is closed unanswered (a flood faster than
 * refusals drain holds at most this many descriptors).
 */
export const MAX_REFUSING_CONNECTIONS = 512;
/** A refused connection is destroyed after this even if the client does not close its end. */
export const REFUSED_LINGER_MS = 1000;
/** The request headers must arrive within this of the connection (slowloris). */
export const METRICS_HEADERS_TIMEOUT_MS = 5000;
/** The whole request must arrive within this. */
export const METRICS_REQUEST_TIMEOUT_MS = 10_000;
/** A kept-alive connection with no new request is closed after this. */
export const METRICS_KEEP_ALIVE_TIMEOUT_MS = 5000;
/** A connection with no traffic either way for this long is closed. */
export const METRICS_IDLE_TIMEOUT_MS = 10_000;
/** How often Node checks the headers and request timeouts (its default, 30 s, is too coarse). */
const TIMEOUT_CHECK_INTERVAL_MS = 1000;
/** Refused metrics connections are logged once per this interval, with a count. */
const REFUSAL_LOG_INTERVAL_MS = 60_000;

const REFUSAL_BODY = 'too many metrics connections; try again later\n';
const REFUSAL_RESPONSE =
  'HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain\r\nretry-after: 1\r\nconnection: close\r\n' +
  `content-length: ${Buffer.byteLength(REFUSAL_BODY)}\r\n\r\n${REFUSAL_BODY}`;

export interface DaemonMetricsOptions {
  /** Where refused metrics connections are logged (rate-limited); nothing is logged without it. */
  log?: Logger;
  /** Milliseconds clock (the render cache and rate-limited logging). */
  now?: () => number;
}

/** The package version (from package.json, two levels above dist/lib/daemon and lib/daemon). */
const VERSION = ((): string => {
  for (const rel of ['../../package.json', '../../../package.json']) {
    try {
      return (JSON.parse(fs.readFileSync(path.join(__dirname, rel), 'utf8')) as { version: string }).version;
    } catch {
      // Try the next layout (compiled or from source).
    }
  }
  return 'unknown';
})();

/** Stats tags whose values are bytes (the others are counts). */
const BYTE_STATS = new Set([
  'swap_in',
  'swap_out',
  'free_memory',
  'total_memory',
  'available_memory',
  'disk_caches',
  'async_scans',
  'direct_scans',
  'async_reclaims',
  'direct_reclaims',
]);

export interface MetricsVm {
  name: string;
  device: BalloonDevice;
  mode: Mode;
  connections(): number;
}

type CounterField = (s: BalloonSnapshot) => number;

export class DaemonMetrics {
  readonly registry = new Registry();
  private snapshots = new Map<string, BalloonSnapshot>();
  private readonly policyActions: Counter<'vm' | 'reason'>;
  private readonly policySuggestions: Counter<'vm' | 'reason'>;
  private readonly errors: Counter<'vm' | 'kind'>;
  private readonly controlErrors: Counter<'code'>;
  private readonly ackSeconds: Histogram<'vm'>;
  private readonly refused: Counter<'reason'>;
  private server: http.Server | undefined;
  private front: net.Server | undefined;
  private readonly open = new Set<net.Socket>();
  private readonly refusing = new Set<net.Socket>();
  private readonly log: Logger;
  private readonly now: () => number;
  /** The last render and when it started; a render in progress is shared by every scrape. */
  private cached: { atMs: number; text: Promise<string> } | undefined;
  private readonly refusalLog: LogRateLimiter;

  constructor(
    private readonly vms: () => MetricsVm[],
    options: DaemonMetricsOptions = {},
  ) {
    this.log = options.log ?? new NullLogger();
    this.now = options.now ?? ((): number => Date.now());
    this.refusalLog = new LogRateLimiter(1, REFUSAL_LOG_INTERVAL_MS, this.now);
    const registers = [this.registry];
    collectDefaultMetrics({ register: this.registry });
    // prom-client's *_total gauges break the naming rule (`promtool check metrics`: a gauge must
    // not end in _total); the same numbers are in nodejs_active_handles/requests/resources.
    for (const name of ['nodejs_active_handles_total', 'nodejs_active_requests_total', 'nodejs_active_resources_total'])
      this.registry.removeSingleMetric(name);
    new Gauge({
      name: 'vballoon_build_info',
      help: 'Always 1; labels name the vballoon and Node.js versions.',
      labelNames: ['version', 'nodejs'],
      registers,
      collect() {
        this.set({ version: VERSION, nodejs: process.version }, 1);
      },
    });
    // prom-client calls collect() with `this` bound to the metric: reach the daemon through these.
    const snaps = (): Map<string, BalloonSnapshot> => this.snapshots;
    const list = this.vms;
    const gauge = (
      name: string,
      help: string,
      value: (s: BalloonSnapshot, vm: MetricsVm) => number | undefined,
    ): void => {
      new Gauge({
        name,
        help,
        labelNames: ['vm'],
        registers,
        collect() {
          this.reset();
          for (const vm of list()) {
            const s = snaps().get(vm.name);
            const v = s === undefined ? undefined : value(s, vm);
            if (v !== undefined) this.set({ vm: vm.name }, v);
          }
        },
      });
    };
    // Counters derived from snapshots: incremented by the growth since the last scrape, so they
    // stay monotonic even when a device is replaced (its counts restart from zero).
    const counter = (name: string, help: string, field: CounterField): void => {
      const last = new Map<string, number>();
      new Counter({
        name,
        help,
        labelNames: ['vm'],
        registers,
        collect() {
          for (const vm of list()) {
            const s = snaps().get(vm.name);
            if (s === undefined) continue;
            const v = field(s);
            const prev = last.get(vm.name) ?? 0;
            this.inc({ vm: vm.name }, Math.max(0, v >= prev ? v - prev : v));
            last.set(vm.name, v);
          }
        },
      });
    };
    const PAGE = 4096;
    gauge('vballoon_connected', 'Whether a front-end (QEMU) is connected (1) or not (0).', (s) =>
      s.connected ? 1 : 0,
    );
    gauge('vballoon_target_bytes', 'Balloon target (num_pages) in bytes.', (s) => s.targetPages * PAGE);
    gauge('vballoon_actual_bytes', 'Balloon size the guest reports (actual) in bytes.', (s) => s.actualPages * PAGE);
    gauge(
      'vballoon_ballooned_bytes',
      'Guest memory tracked as ballooned by the device, in bytes.',
      (s) => s.balloonedPages * PAGE,
    );
    gauge('vballoon_guest_ram_bytes', 'Guest RAM shared by the front-end, in bytes.', (s) => s.guestRamBytes);
    gauge(
      'vballoon_host_resident_bytes',
      'Bytes of the guest memory files the host actually holds.',
      (s) => s.hostResidentBytes,
    );
    gauge(
      'vballoon_discard_inhibited',
      'Whether giving ballooned memory back to the host is inhibited (1) or not (0).',
      (s) => (s.discardInhibited ? 1 : 0),
    );
    // Deprecated: an age changes between scrapes; kept while spec/e2e/qemu.spec.ts reads it.
    gauge(
      'vballoon_guest_stats_age_seconds',
      'Deprecated: use time() - vballoon_guest_stats_last_update_timestamp_seconds.',
      (s) => (s.stats.ageMs === undefined ? undefined : s.stats.ageMs / 1000),
    );
    gauge(
      'vballoon_guest_stats_last_update_timestamp_seconds',
      'Unix time of the last memory statistics the guest sent (freshness: time() - this).',
      (s) => (s.stats.updatedAtMs === undefined ? undefined : s.stats.updatedAtMs / 1000),
    );
    gauge(
      'vballoon_guest_stats_stale',
      'Whether the last stats request went unanswered past the timeout (1) or not (0).',
      (s) => (s.stats.stale ? 1 : 0),
    );
    gauge('vballoon_tracker_bytes', 'Memory used by the ballooned-page tracker, in bytes.', (s) => s.trackerBytes);
    counter(
      'vballoon_reclaimed_bytes_total',
      'Bytes given back to the host by hole punching (inflate and free page reporting).',
      (s) => s.reclaimedBytes,
    );
    counter('vballoon_discard_calls_total', 'fallocate(PUNCH_HOLE) calls made.', (s) => s.discardCalls);
    counter('vballoon_inflate_requests_total', 'Inflate buffers received.', (s) => s.inflate.requests);
    counter('vballoon_inflate_pages_total', 'Pages newly ballooned by inflate requests.', (s) => s.inflate.pages);
    counter('vballoon_deflate_requests_total', 'Deflate buffers received.', (s) => s.deflate.requests);
    counter('vballoon_deflate_pages_total', 'Pages released by deflate requests.', (s) => s.deflate.pages);
    counter(
      'vballoon_deflate_unrequested_pages_total',
      'Pages the guest deflated without the host asking (DEFLATE_ON_OOM).',
      (s) => s.deflate.unrequested,
    );
    counter(
      'vballoon_reported_bytes_total',
      'Bytes of free memory the guest reported (free page reporting).',
      (s) => s.reporting.bytes,
    );
    counter('vballoon_guest_stats_updates_total', 'Guest statistics updates received.', (s) => s.statsQueue.updates);
    counter(
      'vballoon_guest_stats_timeouts_total',
      'Guest statistics requests that timed out.',
      (s) => s.statsQueue.timeouts,
    );
    counter(
      'vballoon_pressure_messages_total',
      'Pressure messages received on the message queue.',
      (s) => s.messages.pressure,
    );
    counter('vballoon_config_changes_total', 'Config change notifications sent to the guest.', (s) => s.configChanges);
    {
      for (const [name, unit, pick] of [
        ['vballoon_guest_stat_bytes', 'bytes', (k: string) => BYTE_STATS.has(k)],
        ['vballoon_guest_stat_events', 'events since guest boot', (k: string) => !BYTE_STATS.has(k)],
      ] as const) {
        new Gauge({
          name,
          help: `Latest guest memory statistics measured in ${unit}, by stat name (tags 0-15 named, others tag_<n>).`,
          labelNames: ['vm', 'stat'],
          registers,
          collect() {
            this.reset();
            for (const vm of list()) {
              const s = snaps().get(vm.name);
              if (s === undefined) continue;
              for (const [k, v] of Object.entries(s.stats.values)) if (pick(k)) this.set({ vm: vm.name, stat: k }, v);
            }
          },
        });
      }
      new Gauge({
        name: 'vballoon_policy_mode',
        help: 'Policy mode of the VM (1 for the current mode).',
        labelNames: ['vm', 'mode'],
        registers,
        collect() {
          this.reset();
          for (const vm of list()) this.set({ vm: vm.name, mode: vm.mode }, 1);
        },
      });
      new Counter({
        name: 'vballoon_connections_total',
        help: 'Front-end connections served.',
        labelNames: ['vm'],
        registers,
        collect() {
          this.reset();
          for (const vm of list()) this.inc({ vm: vm.name }, vm.connections());
        },
      });
    }
    this.policyActions = new Counter({
      name: 'vballoon_policy_actions_total',
      help: 'Balloon targets the policy set (auto mode, operator and mode changes), by reason.',
      labelNames: ['vm', 'reason'],
      registers,
    });
    this.policySuggestions = new Counter({
      name: 'vballoon_policy_suggestions_total',
      help: 'What auto mode would have done for a VM in manual mode (not applied), by reason.',
      labelNames: ['vm', 'reason'],
      registers,
    });
    this.errors = new Counter({
      name: 'vballoon_errors_total',
      help: 'Errors of a VM by kind: invalid guest input reasons, vhost-user error codes, discard failures.',
      labelNames: ['vm', 'kind'],
      registers,
    });
    this.controlErrors = new Counter({
      name: 'vballoon_control_errors_total',
      help: 'Control API requests refused, by wire code.',
      labelNames: ['code'],
      registers,
    });
    this.ackSeconds = new Histogram({
      name: 'vballoon_pressure_ack_seconds',
      help: 'Time from the kick of a pressure message to its acknowledgement.',
      labelNames: ['vm'],
      buckets: [0.00001, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.1, 1],
      registers,
    });
    this.refused = new Counter({
      name: 'vballoon_metrics_connections_refused_total',
      help: 'Metrics connections refused, by reason (too_many: answered 503; flood: closed unanswered).',
      labelNames: ['reason'],
      registers,
    });
  }

  policyAction(vm: string, reason: string, applied: boolean): void {
    (applied ? this.policyActions : this.policySuggestions).inc({ vm, reason });
  }

  controlError(code: string): void {
    this.controlErrors.inc({ code });
  }

  error(vm: string, kind: string): void {
    this.errors.inc({ vm, kind });
  }

  ack(vm: string, seconds: number): void {
    this.ackSeconds.observe({ vm }, seconds);
  }

  /** The exposition text, rendered now (snapshots taken once for the whole render). */
  async render(): Promise<string> {
    this.snapshots = new Map(this.vms().map((vm) => [vm.name, vm.device.snapshot()]));
    return this.registry.metrics();
  }

  /**
   * The exposition text for a scrape: the render started less than RENDER_CACHE_MS ago (or still
   * running), else a new one. A failed render is not kept.
   */
  scrape(): Promise<string> {
    const now = this.now();
    if (this.cached !== undefined && now - this.cached.atMs < RENDER_CACHE_MS) return this.cached.text;
    const entry = { atMs: now, text: this.render() };
    this.cached = entry;
    entry.text.catch(() => {
      if (this.cached === entry) this.cached = undefined; // the scrape that asked reports the error
    });
    return entry.text;
  }

  /** Serves GET /metrics; resolves with the bound address. */
  listen(host: string, port: number): Promise<AddressInfo> {
    const server = http.createServer(
      {
        headersTimeout: METRICS_HEADERS_TIMEOUT_MS,
        requestTimeout: METRICS_REQUEST_TIMEOUT_MS,
        keepAliveTimeout: METRICS_KEEP_ALIVE_TIMEOUT_MS,
        connectionsCheckingInterval: TIMEOUT_CHECK_INTERVAL_MS,
      },
      (req, res) => {
        if (req.method !== 'GET' || (req.url ?? '').split('?')[0] !== '/metrics') {
          res.writeHead(404, { 'content-type': 'text/plain' }).end('not found: try /metrics\n');
          return;
        }
        this.scrape().then(
          (text) => res.writeHead(200, { 'content-type': this.registry.contentType }).end(text),
          (err: unknown) => res.writeHead(500, { 'content-type': 'text/plain' }).end(`${errorMessage(err)}\n`),
        );
      },
    );
    // No socket 'timeout' listener: Node destroys a connection idle this long.
    server.timeout = METRICS_IDLE_TIMEOUT_MS;
    this.server = server;
    // Connections are accepted here, counted, and handed to the HTTP server only under the cap.
    const front = net.createServer((socket) => this.accept(socket));
    this.front = front;
    return new Promise((resolve, reject) => {
      front.once('error', reject);
      front.listen(port, host, () => {
        // The HTTP server never listens itself; 'listening' starts its connection tracking, which
        // enforces the headers and request timeouts.
        server.emit('listening');
        resolve(front.address() as AddressInfo);
      });
    });
  }

  private accept(socket: net.Socket): void {
    if (this.open.size < MAX_METRICS_CONNECTIONS) {
      this.open.add(socket);
      socket.once('close', () => this.open.delete(socket));
      this.server!.emit('connection', socket);
      return;
    }
    socket.on('error', () => socket.destroy());
    if (this.refusing.size >= MAX_REFUSING_CONNECTIONS) {
      this.refused.inc({ reason: 'flood' });
      socket.destroy();
    } else {
      this.refused.inc({ reason: 'too_many' });
      this.refusing.add(socket);
      const timer = setTimeout(() => socket.destroy(), REFUSED_LINGER_MS);
      socket.once('close', () => {
        clearTimeout(timer);
        this.refusing.delete(socket);
      });
      socket.resume(); // the request is read and dropped, so closing does not reset the answer
      socket.end(REFUSAL_RESPONSE);
    }
    const notLogged = this.refusalLog.take();
    if (notLogged !== undefined) {
      this.log.warn('metrics connections refused: too many open (logged once a minute)', {
        maxConnections: MAX_METRICS_CONNECTIONS,
        refusedSinceLastLine: notLogged + 1,
      });
    }
  }

  close(): Promise<void> {
    const s = this.server;
    const front = this.front;
    this.server = undefined;
    this.front = undefined;
    if (s === undefined || front === undefined) return Promise.resolve();
    s.closeAllConnections();
    for (const socket of [...this.open, ...this.refusing]) socket.destroy();
    return new Promise((resolve) => front.close(() => s.close(() => resolve())));
  }
}
