/**
 * echo_udp.ts: the tutorial's datagram echo server and client (RFC 862), and a UDP latency probe.
 *
 *     deno run -A echo_udp.ts server                  # echo on UDP port 23000, all interfaces
 *     deno run -A echo_udp.ts client Hello World      # in a second terminal: the echo and its round trip
 *     nc -u localhost 23000                           # or type lines at it
 *     deno run -A echo_udp.ts bench --window 8        # round trips/s, loss and latency
 *
 * UDP has no connection and no delivery guarantee, so the client does what the tutorial's does
 * not: it waits for the echo only so long (`--timeout`), tries again (`--retries`), and ignores
 * any datagram that is not the echo it is waiting for, from the address it asked. The server
 * echoes each datagram to its sender, up to the largest UDP payload (65,507 bytes), and a peer
 * that vanishes (an ICMP "port unreachable" on the next send) costs it nothing.
 *
 * UDP's source address can be forged, so an echo server is a reflector: a datagram "from" a victim
 * sends the echo to the victim, and one "from" another echo server (or this one) bounces for ever.
 * The server never answers its own port, a privileged port (below 1024, where echo, chargen, DNS
 * and NTP live) or another service known to answer datagrams, and bounds what it sends to each
 * address (`--rate`) and in all (`--total-rate`). Loopback is spared by default, as no packet
 * from outside can carry a loopback source.
 *
 * @module
 */

import { lookup } from "node:dns/promises";
import { parseArgs, type ParseArgsOptionsConfig } from "node:util";

// ---------------------------------------------------------------------------------------------
// Constants and options

/** The tutorial's echo port. */
export const DEFAULT_PORT = 23000;
/** The largest UDP payload over IPv4: 65,535 minus the IP and UDP headers. */
export const MAX_DATAGRAM = 65_507;
/** Seconds the client waits for each echo. */
export const DEFAULT_TIMEOUT = 1;
/** Times the client sends again after a timeout. */
export const DEFAULT_RETRIES = 3;
/** Bytes a second the server echoes to one address, in bursts of twice that; 0 is no limit. */
export const DEFAULT_RATE = 1024 * 1024;
/** Bytes a second the server echoes in all, to addresses other than loopback. */
export const DEFAULT_TOTAL_RATE = 16 * 1024 * 1024;
/**
 * Source ports above 1023 of services that answer a datagram with one or more (SSDP, Apple Remote
 * Desktop, WS-Discovery, mDNS, CoAP, Ubiquiti discovery, memcached): never answered, as a forged
 * datagram from one would set the two of us bouncing.
 */
const REFLECTING_PORTS = new Set([1900, 3283, 3702, 5353, 5683, 10001, 11211]);
/** Addresses whose rate is tracked at once; past that the oldest is forgotten. */
const TRACKED_SOURCES = 4096;

/** Options for {@linkcode startUdpEchoServer}. */
export interface UdpServerOptions {
  /** Port to listen on; 0 picks a free one. Default {@linkcode DEFAULT_PORT}. */
  port?: number;
  /** Interface to bind. Default: all interfaces, IPv6 and IPv4, or IPv4 alone without IPv6. */
  host?: string;
  /**
   * Bytes a second echoed to one address, bursts of twice that; 0 is no limit. Default
   * {@linkcode DEFAULT_RATE}, which spares loopback; a rate that is given applies to loopback too.
   */
  rate?: number;
  /** Bytes a second echoed in all (loopback spared, as by `rate`). Default {@linkcode DEFAULT_TOTAL_RATE}. */
  totalRate?: number;
}

/** A running UDP echo server. */
export interface UdpServer {
  /** The address actually bound. */
  readonly addr: Deno.NetAddr;
  /** Stops the server; resolves when its socket is closed. */
  close(): Promise<void>;
  /** Settles when the server has stopped. */
  readonly finished: Promise<void>;
  /** Datagrams echoed so far. */
  readonly echoed: number;
  /** Datagrams not answered: from a port never answered, or over a rate. */
  readonly refused: number;
}

// ---------------------------------------------------------------------------------------------
// The server

/**
 * Starts a UDP echo server: each datagram goes back to its sender, byte for byte.
 *
 * @example
 * ```ts
 * import { startUdpEchoServer, udpEcho } from "./echo_udp.ts";
 * const server = startUdpEchoServer({ port: 0, host: "127.0.0.1" });
 * const r = await udpEcho({ host: "127.0.0.1", port: server.addr.port, timeout: 1, retries: 0 }, "hi");
 * console.assert(new TextDecoder().decode(r.echo) === "hi");
 * await server.close();
 * ```
 */
export function startUdpEchoServer(options: UdpServerOptions = {}): UdpServer {
  const socket = listenUdp(options.host, options.port ?? DEFAULT_PORT);
  const guard = new ReflectionGuard((socket.addr as Deno.NetAddr).port, options);
  let closing = false;
  let echoed = 0;

  // The receive loop: one reused buffer, and a send straight from it, as a C server would.
  async function echoLoop(): Promise<void> {
    const buffer = new Uint8Array(MAX_DATAGRAM + 1);
    while (!closing) {
      let datagram: Uint8Array, from: Deno.Addr;
      try {
        [datagram, from] = await socket.receive(buffer);
      } catch (e) {
        if (closing) return;
        if (isPeerError(e)) continue; // an ICMP error for an earlier send: that peer is gone
        throw e;
      }
      if (!guard.allows(from as Deno.NetAddr, datagram.length)) continue;
      try {
        await socket.send(datagram, from);
        echoed++;
      } catch (e) {
        if (closing) return;
        if (!isPeerError(e)) console.error(`echo to ${formatPeer(from as Deno.NetAddr)} failed: ${e}`);
      }
    }
  }

  const finished = echoLoop();
  return {
    addr: socket.addr as Deno.NetAddr,
    finished,
    get echoed() {
      return echoed;
    },
    get refused() {
      return guard.refused;
    },
    async close() {
      if (!closing) {
        closing = true;
        socket.close();
      }
      await finished;
    },
  };
}

/**
 * Decides whether a datagram gets its echo: never to this server's own port, a privileged port
 * or a known reflecting service; and within a token bucket of bytes per source address, and one
 * for everyone. Reads the clock once per datagram that is counted.
 */
export class ReflectionGuard {
  /** Datagrams not answered. */
  refused = 0;
  readonly #ownPort: number;
  readonly #rate: number;
  readonly #totalRate: number;
  readonly #limitsLoopback: boolean;
  readonly #sources = new Map<string, { tokens: number; at: number }>();
  readonly #total: { tokens: number; at: number };

  constructor(ownPort: number, options: { rate?: number; totalRate?: number } = {}) {
    this.#ownPort = ownPort;
    this.#rate = options.rate ?? DEFAULT_RATE;
    this.#totalRate = options.totalRate ?? DEFAULT_TOTAL_RATE;
    this.#limitsLoopback = options.rate !== undefined || options.totalRate !== undefined;
    this.#total = { tokens: 2 * this.#totalRate, at: performance.now() };
  }

  /** True if `from` may be sent `size` bytes back now; counts it, if not. */
  allows(from: Deno.NetAddr, size: number): boolean {
    const port = from.port;
    if (port < 1024 || port === this.#ownPort || REFLECTING_PORTS.has(port)) return this.#refuse();
    const host = from.hostname;
    if (
      !this.#limitsLoopback && (host.startsWith("127.") || host === "::1" || host.startsWith("::ffff:127."))
    ) {
      return true;
    }
    const cost = size + 28; // the IP and UDP headers: an empty datagram costs too
    const now = performance.now();
    if (this.#rate > 0) {
      let bucket = this.#sources.get(host);
      if (!bucket) {
        if (this.#sources.size >= TRACKED_SOURCES) this.#sources.delete(this.#sources.keys().next().value!);
        this.#sources.set(host, bucket = { tokens: 2 * this.#rate, at: now });
      }
      if (!take(bucket, this.#rate, cost, now)) return this.#refuse();
    }
    if (this.#totalRate > 0 && !take(this.#total, this.#totalRate, cost, now)) return this.#refuse();
    return true;
  }

  #refuse(): false {
    this.refused++;
    return false;
  }
}

/** Takes `cost` tokens from a bucket refilled at `rate` a second up to twice that; false if short. */
function take(bucket: { tokens: number; at: number }, rate: number, cost: number, now: number): boolean {
  bucket.tokens = Math.min(2 * rate, bucket.tokens + (now - bucket.at) * rate / 1000);
  bucket.at = now;
  if (bucket.tokens < cost) return false;
  bucket.tokens -= cost;
  return true;
}

// ---------------------------------------------------------------------------------------------
// The client

/** Options for {@linkcode udpEcho}. */
export interface UdpClientOptions {
  host: string;
  port: number;
  /** Seconds to wait for each echo. */
  timeout: number;
  /** Times to send again after a timeout. */
  retries: number;
}

/** What came back, from whom, and how fast. */
export interface UdpEchoResult {
  echo: Uint8Array;
  from: Deno.NetAddr;
  /** Round trip of the attempt that was answered, in milliseconds. */
  rttMs: number;
  /** Which attempt was answered, from 1. */
  attempt: number;
}

/** A failure the CLI reports in one line with exit code 1. */
export class ClientError extends Error {}

/** Resolves a host name as the system does (so /etc/hosts counts) to one address. */
export async function resolveHost(host: string): Promise<string> {
  try {
    return (await lookup(host)).address;
  } catch (e) {
    const code = (e as { code?: string }).code;
    if (code === "ENOTFOUND" || code === "EAI_AGAIN" || code === "EAI_NONAME") {
      throw new ClientError(`cannot resolve ${host}`);
    }
    throw e;
  }
}

/**
 * The tutorial's datagram client, made reliable enough to use: sends `message`, waits up to
 * `timeout` seconds for the same bytes to come back from the same address, and tries again up to
 * `retries` times. Anything else that arrives is ignored.
 */
export async function udpEcho(
  options: UdpClientOptions,
  message: string | Uint8Array,
): Promise<UdpEchoResult> {
  const payload = typeof message === "string" ? new TextEncoder().encode(message) : message;
  if (payload.length > MAX_DATAGRAM) {
    throw new ClientError(`a datagram holds at most ${MAX_DATAGRAM} bytes, not ${payload.length}`);
  }
  const address = await resolveHost(options.host);
  const target: Deno.NetAddr = { transport: "udp", hostname: address, port: options.port };
  const socket = Deno.listenDatagram({
    transport: "udp",
    hostname: address.includes(":") ? "::" : "0.0.0.0",
    port: 0,
  });
  const buffer = new Uint8Array(MAX_DATAGRAM + 1);
  let receiving: Promise<[Uint8Array, Deno.Addr]> | null = null;
  try {
    for (let attempt = 1; attempt <= options.retries + 1; attempt++) {
      const sent = performance.now();
      const deadline = sent + options.timeout * 1000;
      try {
        await socket.send(payload, target);
      } catch (e) {
        if (!isPeerError(e)) throw e; // refused by an earlier attempt's ICMP error: try again
      }
      while (performance.now() < deadline) {
        receiving ??= socket.receive(buffer);
        const got = await raceTimer(receiving, deadline - performance.now());
        if (got === "timeout") break;
        receiving = null;
        if (got instanceof Error) continue; // ICMP port unreachable: nobody there yet
        const [data, from] = got;
        if (!sameAddress(from as Deno.NetAddr, target) || !sameBytes(data, payload)) continue;
        return { echo: data.slice(), from: from as Deno.NetAddr, rttMs: performance.now() - sent, attempt };
      }
    }
  } finally {
    socket.close();
    if (receiving) await receiving.catch(() => {});
  }
  const tries = options.retries + 1;
  throw new ClientError(
    `no echo from ${formatPeer(target)} after ${tries} ${
      tries === 1 ? "try" : "tries"
    } of ${options.timeout} s`,
  );
}

/** Waits for `promise` at most `ms`; a rejection comes back as the error, not thrown. */
async function raceTimer<T>(promise: Promise<T>, ms: number): Promise<T | "timeout" | Error> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  const timeout = new Promise<"timeout">((resolve) => timer = setTimeout(() => resolve("timeout"), ms));
  try {
    return await Promise.race([
      promise.catch((e) => {
        if (isPeerError(e)) return e as Error;
        throw e;
      }),
      timeout,
    ]);
  } finally {
    clearTimeout(timer);
  }
}

// ---------------------------------------------------------------------------------------------
// The latency probe

/** Options for {@linkcode runUdpBench}. */
export interface UdpBenchOptions {
  host: string;
  port: number;
  /** Bytes per datagram, at least 8 (a sequence number and a check word). */
  size: number;
  /** Datagrams in flight at once. */
  window: number;
  /** Seconds to run. */
  duration: number;
  /** Seconds after which a datagram is counted lost and replaced. */
  timeout: number;
  /** Called once a second with that second's round trips. */
  onSecond?: (second: number, roundTrips: number) => void;
}

/** What {@linkcode runUdpBench} measured. */
export interface UdpBenchResult {
  size: number;
  window: number;
  seconds: number;
  sent: number;
  roundTrips: number;
  roundTripsPerSecond: number;
  lossPercent: number;
  p50Us: number;
  p99Us: number;
}

/**
 * UDP ping-pong for `duration` seconds with `window` datagrams in flight. Each datagram carries a
 * sequence number, so a late or foreign reply is recognised and not counted twice.
 */
export async function runUdpBench(options: UdpBenchOptions): Promise<UdpBenchResult> {
  const address = await resolveHost(options.host);
  const target: Deno.NetAddr = { transport: "udp", hostname: address, port: options.port };
  const socket = Deno.listenDatagram({
    transport: "udp",
    hostname: address.includes(":") ? "::" : "0.0.0.0",
    port: 0,
  });
  const size = Math.max(8, options.size);
  const out = new Uint8Array(size);
  const outView = new DataView(out.buffer);
  const sentAt = new Map<number, number>(); // sequence number -> send time, for those in flight
  const latencies: number[] = [];
  let seq = 0, sent = 0, roundTrips = 0, lastRoundTrips = 0, second = 0, closing = false;
  const start = performance.now();
  const end = start + options.duration * 1000;

  async function sendNext(): Promise<void> {
    const n = seq++;
    outView.setUint32(0, n);
    outView.setUint32(4, n ^ 0x5eed5eed);
    sentAt.set(n, performance.now());
    sent++;
    try {
      await socket.send(out, target);
    } catch (e) {
      if (!isPeerError(e)) throw e;
    }
  }

  // Replaces datagrams that have waited longer than the timeout: they are lost.
  const reaper = setInterval(() => {
    const now = performance.now();
    for (const [n, t] of sentAt) {
      if (now - t < options.timeout * 1000) break; // in send order: the rest are younger
      sentAt.delete(n);
      if (now < end) sendNext().catch(() => {});
    }
  }, Math.max(10, options.timeout * 250));
  const ticker = setInterval(() => {
    options.onSecond?.(++second, roundTrips - lastRoundTrips);
    lastRoundTrips = roundTrips;
  }, 1000);

  const stopTimer = setTimeout(() => {
    closing = true;
    socket.close();
  }, options.duration * 1000 + options.timeout * 1000);

  try {
    for (let i = 0; i < options.window; i++) await sendNext();
    const buffer = new Uint8Array(MAX_DATAGRAM + 1);
    const view = new DataView(buffer.buffer);
    while (!closing) {
      let data: Uint8Array, from: Deno.Addr;
      try {
        [data, from] = await socket.receive(buffer);
      } catch (e) {
        if (closing) break;
        if (isPeerError(e)) continue;
        throw e;
      }
      if (data.length !== size || !sameAddress(from as Deno.NetAddr, target)) continue;
      const n = view.getUint32(0);
      if (view.getUint32(4) !== (n ^ 0x5eed5eed)) continue;
      const t = sentAt.get(n);
      if (t === undefined) continue; // stale: already counted lost
      sentAt.delete(n);
      const now = performance.now();
      latencies.push((now - t) * 1000);
      roundTrips++;
      if (now < end) await sendNext();
      else if (sentAt.size === 0) break;
    }
  } finally {
    clearInterval(reaper);
    clearInterval(ticker);
    clearTimeout(stopTimer);
    if (!closing) {
      closing = true;
      socket.close();
    }
  }
  const seconds = Math.min(performance.now(), end) / 1000 - start / 1000;
  latencies.sort((a, b) => a - b);
  const pct = (p: number) =>
    latencies.length ? Math.round(latencies[Math.floor(p * (latencies.length - 1))]) : 0;
  return {
    size,
    window: options.window,
    seconds: Number(seconds.toFixed(3)),
    sent,
    roundTrips,
    roundTripsPerSecond: Math.round(roundTrips / seconds),
    lossPercent: sent ? Number((100 * (sent - roundTrips) / sent).toFixed(3)) : 0,
    p50Us: pct(0.5),
    p99Us: pct(0.99),
  };
}

// ---------------------------------------------------------------------------------------------
// Small helpers

/** Binds `host`, or by default all interfaces: IPv6 and IPv4, or IPv4 alone. */
function listenUdp(host: string | undefined, port: number): Deno.DatagramConn {
  if (host !== undefined) return Deno.listenDatagram({ transport: "udp", hostname: host, port });
  try {
    return Deno.listenDatagram({ transport: "udp", hostname: "::", port });
  } catch (e) {
    if (e instanceof Deno.errors.AddrInUse || e instanceof Deno.errors.PermissionDenied) throw e;
    return Deno.listenDatagram({ transport: "udp", hostname: "0.0.0.0", port });
  }
}

/** Errors that an unreachable or vanished peer causes (ICMP), not faults of ours. */
function isPeerError(e: unknown): boolean {
  return e instanceof Deno.errors.ConnectionRefused || e instanceof Deno.errors.ConnectionReset ||
    e instanceof Deno.errors.NotConnected || e instanceof Deno.errors.AddrNotAvailable;
}

function sameAddress(a: Deno.NetAddr, b: Deno.NetAddr): boolean {
  const plain = (h: string) => h.startsWith("::ffff:") ? h.slice(7) : h;
  return a.port === b.port && plain(a.hostname) === plain(b.hostname);
}

function sameBytes(a: Uint8Array, b: Uint8Array): boolean {
  if (a.length !== b.length) return false;
  for (let i = 0; i < a.length; i++) if (a[i] !== b[i]) return false;
  return true;
}

/** `host:port`, with IPv4-mapped IPv6 addresses shown as plain IPv4 and IPv6 in brackets. */
function formatPeer(addr: Deno.NetAddr): string {
  const host = addr.hostname.startsWith("::ffff:") && addr.hostname.includes(".")
    ? addr.hostname.slice(7)
    : addr.hostname;
  return host.includes(":") ? `[${host}]:${addr.port}` : `${host}:${addr.port}`;
}

// ---------------------------------------------------------------------------------------------
// Command line

const USAGE = `usage: echo_udp.ts server [--host H] [--port P] [--rate BYTES] [--total-rate BYTES]
       echo_udp.ts client [--host H] [--port P] [--timeout S] [--retries N] [MESSAGE...]
       echo_udp.ts bench  [--host H] [--port P] [--size B] [--window N] [--duration S] [--timeout S] [--json]`;

const HELP = `${USAGE}

  server   echo each datagram to its sender (default port ${DEFAULT_PORT}, all interfaces)
  client   send MESSAGE (plus a newline), print the echo and the round trip; exit 1 if none comes back
  bench    UDP ping-pong: round trips/s, loss and latency

  --host H        server: interface to bind (default all); others: where to send (default localhost)
  --port P        port (default ${DEFAULT_PORT})
  --timeout S     client: seconds to wait for each echo (default ${DEFAULT_TIMEOUT}); bench: when a datagram counts lost
  --retries N     client: times to send again after a timeout (default ${DEFAULT_RETRIES})
  --rate B        server: bytes a second echoed to one address, bursts of twice that (default 1M,
                  loopback spared; K and M work; 0: no limit)
  --total-rate B  server: bytes a second echoed in all (default 16M, loopback spared; 0: no limit)
  --size B        bench: bytes per datagram (default 64)
  --window N      bench: datagrams in flight at once (default 1)
  --duration S    bench: seconds to run (default 5)
  --json          bench: print the summary as JSON`;

/** A bad command line: main() prints it with the usage and exits 2. */
class UsageError extends Error {}

/**
 * node:util's parseArgs, with a bad flag said in one line of our own words, decided from the
 * parser's own tokens: never from the wording of its messages, which any release may change.
 */
function parseFlags<T extends ParseArgsOptionsConfig>(args: string[], options: T) {
  const { tokens } = parseArgs({ args, options, allowPositionals: true, strict: false, tokens: true });
  for (const token of tokens) {
    if (token.kind !== "option") continue;
    const flag = token.rawName, type = Object.hasOwn(options, token.name) ? options[token.name].type : null;
    if (type === null) throw new UsageError(`unknown option ${flag}; try --help`);
    if (type === "boolean" && token.value !== undefined) throw new UsageError(`${flag} takes no value`);
    if (type === "string" && token.value === undefined) throw new UsageError(`${flag} wants a value`);
    if (type === "string" && !token.inlineValue && token.value!.startsWith("-") && token.value !== "-") {
      throw new UsageError(`${flag} wants a value; for one that starts with "-", write ${flag}=VALUE`);
    }
  }
  return parseArgs({ args, options, allowPositionals: true });
}

function parseNumber(
  flag: string,
  text: string | undefined,
  fallback: number,
  min: number,
  max: number,
): number {
  if (text === undefined) return fallback;
  const value = Number(text);
  if (text.trim() === "" || !Number.isFinite(value)) {
    throw new UsageError(`${flag} wants a number, not "${text}"`);
  }
  if (value < min || value > max) throw new UsageError(`${flag} must be from ${min} to ${max}`);
  return value;
}

function parseInteger(flag: string, text: string | undefined, fallback: number, min: number, max: number) {
  const value = parseNumber(flag, text, fallback, min, max);
  if (!Number.isInteger(value)) throw new UsageError(`${flag} wants a whole number, not "${text}"`);
  return value;
}

/** A byte count, with an optional K or M suffix (1024s). */
function parseBytes(flag: string, text: string): number {
  const m = /^(\d+)([kKmM]?)$/.exec(text);
  if (!m) throw new UsageError(`${flag} wants a number of bytes like 64K or 2M, not "${text}"`);
  return Number(m[1]) * (m[2] === "" ? 1 : /k/i.test(m[2]) ? 1024 : 1024 * 1024);
}

/** The parsed command line. */
type Command =
  | { kind: "help" }
  | { kind: "server"; options: UdpServerOptions }
  | { kind: "client"; options: UdpClientOptions; message: string | null }
  | { kind: "bench"; options: UdpBenchOptions; json: boolean };

/** Turns the command line into a command. */
export function parseUdpArgs(args: string[]): Command {
  const parsed = parseFlags(args, {
    host: { type: "string" },
    port: { type: "string" },
    timeout: { type: "string" },
    retries: { type: "string" },
    rate: { type: "string" },
    "total-rate": { type: "string" },
    size: { type: "string" },
    window: { type: "string" },
    duration: { type: "string" },
    json: { type: "boolean" },
    help: { type: "boolean", short: "h" },
  });
  const { values: v, positionals } = parsed;
  if (v.help) return { kind: "help" };
  const [kind, ...rest] = positionals;
  if (kind === undefined) throw new UsageError("say what to run: server, client or bench");
  if (!["server", "client", "bench"].includes(kind)) throw new UsageError(`unknown command "${kind}"`);
  if (kind !== "client" && rest.length > 0) throw new UsageError(`unexpected argument "${rest[0]}"`);
  const allowed: Record<string, string[]> = {
    server: ["host", "port", "rate", "total-rate"],
    client: ["host", "port", "timeout", "retries"],
    bench: ["host", "port", "timeout", "size", "window", "duration", "json"],
  };
  for (const flag of Object.keys(v)) {
    if (!allowed[kind].includes(flag)) throw new UsageError(`--${flag} does not apply to ${kind}`);
  }
  const port = parseInteger("--port", v.port, DEFAULT_PORT, kind === "server" ? 0 : 1, 65535); // 0: a free port
  if (kind === "server") {
    const rate = v.rate === undefined ? undefined : parseBytes("--rate", v.rate);
    const totalRate = v["total-rate"] === undefined ? undefined : parseBytes("--total-rate", v["total-rate"]);
    return { kind, options: { host: v.host, port, rate, totalRate } };
  }
  const host = v.host ?? "localhost";
  if (kind === "client") {
    return {
      kind,
      message: rest.length ? rest.join(" ") : null,
      options: {
        host,
        port,
        timeout: parseNumber("--timeout", v.timeout, DEFAULT_TIMEOUT, 0.001, 3600),
        retries: parseInteger("--retries", v.retries, DEFAULT_RETRIES, 0, 1000),
      },
    };
  }
  return {
    kind: "bench",
    json: v.json ?? false,
    options: {
      host,
      port,
      size: parseInteger("--size", v.size, 64, 8, MAX_DATAGRAM),
      window: parseInteger("--window", v.window, 1, 1, 10_000),
      duration: parseNumber("--duration", v.duration, 5, 0.01, 86_400),
      timeout: parseNumber("--timeout", v.timeout, DEFAULT_TIMEOUT, 0.001, 3600),
    },
  };
}

/** Sends one message and prints its echo and round trip. */
async function runClient(options: UdpClientOptions, message: string): Promise<void> {
  const r = await udpEcho(options, message);
  await Deno.stdout.write(r.echo);
  const retried = r.attempt > 1 ? `, answered on try ${r.attempt}` : "";
  console.log(`(${r.echo.length} bytes from ${formatPeer(r.from)} in ${r.rttMs.toFixed(3)} ms${retried})`);
}

/** The command line. */
async function main(): Promise<void> {
  let command: Command;
  try {
    command = parseUdpArgs(Deno.args);
  } catch (e) {
    if (!(e instanceof UsageError)) throw e;
    console.error(`echo_udp: ${e.message}\n${USAGE}`);
    Deno.exit(2);
  }
  try {
    switch (command.kind) {
      case "help":
        console.log(HELP);
        return;
      case "server": {
        const server = startUdpEchoServer(command.options);
        const stop = () => server.close();
        Deno.addSignalListener("SIGINT", stop); // before saying so: a SIGTERM may follow at once
        Deno.addSignalListener("SIGTERM", stop);
        console.log(`UDP echo server listening on ${formatPeer(server.addr)}`);
        await server.finished;
        Deno.removeSignalListener("SIGINT", stop);
        Deno.removeSignalListener("SIGTERM", stop);
        const refused = server.refused > 0 ? `, ${server.refused} refused` : "";
        console.log(
          `shutdown complete (${server.echoed} datagram${server.echoed === 1 ? "" : "s"} echoed${refused})`,
        );
        return;
      }
      case "client": {
        if (command.message !== null) return await runClient(command.options, command.message + "\n");
        // No message: each line of stdin is one datagram.
        const lines = Deno.stdin.readable.pipeThrough(new TextDecoderStream());
        let rest = "";
        for await (const chunk of lines) {
          const parts = (rest + chunk).split("\n");
          rest = parts.pop()!;
          for (const line of parts) await runClient(command.options, line + "\n");
        }
        if (rest) await runClient(command.options, rest);
        return;
      }
      case "bench": {
        const o = command.options;
        if (!command.json) {
          console.log(
            `bench: UDP ping-pong, ${o.size} B, window ${o.window}, ${o.duration} s against ${o.host}:${o.port}`,
          );
          o.onSecond = (s, rt) => console.log(`${String(s).padStart(4)} s  ${rt} round trips/s`);
        }
        const r = await runUdpBench(o);
        if (command.json) console.log(JSON.stringify(r));
        else {
          console.log(
            `- - - - -\n${r.seconds.toFixed(2)} s  ${r.roundTripsPerSecond} round trips/s  ` +
              `loss ${r.lossPercent}%  latency p50 ${r.p50Us} µs  p99 ${r.p99Us} µs`,
          );
        }
        if (r.roundTrips === 0) {
          console.error(`echo_udp: no echo came back from ${o.host}:${o.port}`);
          Deno.exit(1);
        }
        return;
      }
    }
  } catch (e) {
    if (e instanceof ClientError) console.error(`echo_udp: ${e.message}`);
    else if (e instanceof Deno.errors.AddrInUse) {
      console.error(`echo_udp: port ${"options" in command ? command.options.port : ""} is already in use`);
    } else if (e instanceof Deno.errors.PermissionDenied) {
      console.error(
        `echo_udp: not allowed to listen on port ${"options" in command ? command.options.port : ""}`,
      );
    } else if (e instanceof Deno.errors.AddrNotAvailable) {
      console.error(`echo_udp: cannot listen there: ${e.message}`);
    } else if (e instanceof Error && e.message.startsWith("failed to lookup address")) {
      // Deno reports a name that does not resolve as a plain Error, known only by its message.
      console.error(
        `echo_udp: cannot listen on ${
          "options" in command ? command.options.host : ""
        }: the name does not resolve`,
      );
    } else throw e;
    Deno.exit(1);
  }
}

if (import.meta.main) await main();
