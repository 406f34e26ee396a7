/**
 * multiplex.ts: the tutorial's `select()` examples, grown into a small client for many peers.
 *
 * It connects to every endpoint at once and watches them and stdin together: each line that
 * arrives is printed with its source, each line typed goes to every peer, and when nothing
 * happens for a while it says so, as the tutorial's loop does ("Five seconds elapsed.").
 *
 *     deno run -A chat_server.ts 2626                     # a server to talk to
 *     deno run -A multiplex.ts localhost:2626             # a chat client, in place of telnet
 *     deno run -A multiplex.ts localhost:2626 [::1]:2626  # two connections, one terminal
 *     deno run -A multiplex.ts --udp localhost:23000      # UDP peers (try echo_udp.ts server)
 *     deno run -A multiplex.ts localhost:2626 --load 1000 # a chat load generator: 1,000 clients
 *
 * Deno has no `select()`: every read is a promise, and `Promise.race` over them would lose data
 * from the reads that do not win. So each source gets its own read loop, and all of them feed one
 * event handler, which is what `select()` dispatching becomes in an event loop. The idle notice
 * is a timer that every event restarts.
 *
 * @module
 */

import { lookup } from "node:dns/promises";
import { parseArgs, type ParseArgsOptionsConfig } from "node:util";

// ---------------------------------------------------------------------------------------------
// Constants and options

/** The tutorial's select() timeout, in seconds. */
export const DEFAULT_TIMEOUT = 5;
/** Longest line held back while waiting for its end; a longer one is printed in pieces. */
const MAX_PENDING = 64 * 1024;

/** Something bytes can be written to, such as `Deno.stdout`. */
export interface Writer {
  write(p: Uint8Array): Promise<number>;
}

/** One peer: a host and a port, as `host:port` or `[v6addr]:port` on the command line. */
export interface Endpoint {
  host: string;
  port: number;
}

/** Options for {@linkcode runMultiplex}. */
export interface MultiplexOptions {
  endpoints: Endpoint[];
  /** Lines to send; its end half-closes every TCP connection. */
  input: ReadableStream<Uint8Array>;
  /** Where arriving lines and notices go. */
  output: Writer;
  /** Where connection failures go. */
  errors: Writer;
  /** Seconds of silence before the idle notice. Default {@linkcode DEFAULT_TIMEOUT}. */
  timeout?: number;
  /** UDP datagrams instead of TCP connections. */
  udp?: boolean;
  /** Send stdin lines to this endpoint only (1-based); default: all of them. */
  to?: number;
}

const encoder = new TextEncoder();
const decoder = new TextDecoder();

// ---------------------------------------------------------------------------------------------
// Peers

/** A connected peer: a name to print, a way to send, and the bytes of a line not yet ended. */
interface Peer {
  readonly name: string;
  readonly index: number;
  send(bytes: Uint8Array): Promise<void>;
  /** Half-closes (TCP) when input ends; UDP has nothing to close. */
  finishSending(): Promise<void>;
  /** Reads until the peer closes, calling `onData` for each chunk. */
  receive(onData: (bytes: Uint8Array) => void): Promise<void>;
  close(): void;
  pending: Uint8Array;
}

/** Parses `host:port` or `[v6addr]:port`. */
export function parseEndpoint(text: string): Endpoint {
  const match = /^\[([^\]]+)\]:(\d+)$/.exec(text) ?? /^([^:\s]+):(\d+)$/.exec(text);
  const port = match ? Number(match[2]) : NaN;
  if (!match || port < 1 || port > 65535) {
    throw new UsageError(`"${text}" is not HOST:PORT (write IPv6 as [::1]:PORT)`);
  }
  return { host: match[1], port };
}

/** `host:port`, with IPv4-mapped IPv6 addresses shown as plain IPv4 and IPv6 in brackets. */
function formatPeer(addr: Deno.NetAddr): string {
  const host = addr.hostname.startsWith("::ffff:") && addr.hostname.includes(".")
    ? addr.hostname.slice(7)
    : addr.hostname;
  return host.includes(":") ? `[${host}]:${addr.port}` : `${host}:${addr.port}`;
}

/** Opens a TCP connection to an endpoint. */
async function connectTcp(endpoint: Endpoint, index: number): Promise<Peer> {
  const conn = await Deno.connect({ hostname: endpoint.host, port: endpoint.port });
  conn.setNoDelay(true);
  let closed = false;
  return {
    name: formatPeer(conn.remoteAddr),
    index,
    pending: new Uint8Array(0),
    async send(bytes) {
      for (let at = 0; at < bytes.length;) at += await conn.write(bytes.subarray(at));
    },
    async finishSending() {
      await conn.closeWrite();
    },
    async receive(onData) {
      const buffer = new Uint8Array(16 * 1024);
      for (let n = await conn.read(buffer); n !== null; n = await conn.read(buffer)) {
        onData(buffer.subarray(0, n));
      }
    },
    close() {
      if (!closed) conn.close();
      closed = true;
    },
  };
}

/** Opens a UDP socket that talks to one endpoint and hears only from it. */
async function connectUdp(endpoint: Endpoint, index: number): Promise<Peer> {
  const address = (await lookup(endpoint.host)).address;
  const target: Deno.NetAddr = { transport: "udp", hostname: address, port: endpoint.port };
  const socket = Deno.listenDatagram({
    transport: "udp",
    hostname: address.includes(":") ? "::" : "0.0.0.0",
    port: 0,
  });
  let closed = false;
  return {
    name: formatPeer(target),
    index,
    pending: new Uint8Array(0),
    async send(bytes) {
      await socket.send(bytes, target);
    },
    async finishSending() {},
    async receive(onData) {
      const buffer = new Uint8Array(65536);
      while (!closed) {
        try {
          const [data, from] = await socket.receive(buffer);
          const f = from as Deno.NetAddr;
          if (f.port === target.port && f.hostname.replace(/^::ffff:/, "") === address) onData(data);
        } catch (e) {
          if (closed) return;
          if (!(e instanceof Deno.errors.ConnectionRefused)) throw e; // ICMP: nobody there yet
        }
      }
    },
    close() {
      if (!closed) socket.close();
      closed = true;
    },
  };
}

// ---------------------------------------------------------------------------------------------
// The loop

/**
 * Connects to every endpoint and relays until all peers have closed (or, for UDP, stdin has
 * ended and the peers fell silent). Returns the exit code: 0, or 1 if no endpoint could be
 * reached. This is the whole program, minus the terminal.
 *
 * @example
 * ```ts
 * import { runMultiplex } from "./multiplex.ts";
 * const code = await runMultiplex({
 *   endpoints: [{ host: "127.0.0.1", port: 9 }],
 *   input: ReadableStream.from([]),
 *   output: { write: async (p) => p.length },
 *   errors: { write: async (p) => p.length },
 * });
 * console.assert(code === 1); // nothing listens on the discard port here
 * ```
 */
export async function runMultiplex(options: MultiplexOptions): Promise<number> {
  const timeout = options.timeout ?? DEFAULT_TIMEOUT;
  const open = options.udp ? connectUdp : connectTcp;
  let printing = Promise.resolve();
  const print = (line: string) => {
    const bytes = encoder.encode(line + "\n");
    printing = printing.then(() => writeAll(options.output, bytes));
  };

  const attempts = await Promise.allSettled(options.endpoints.map((e, i) => open(e, i + 1)));
  const peers: Peer[] = [];
  for (const [i, attempt] of attempts.entries()) {
    if (attempt.status === "fulfilled") {
      peers.push(attempt.value);
      continue;
    }
    const e = options.endpoints[i];
    const where = e.host.includes(":") ? `[${e.host}]:${e.port}` : `${e.host}:${e.port}`;
    await writeAll(
      options.errors,
      encoder.encode(`multiplex: cannot reach ${where}: ${describe(attempt.reason)}\n`),
    );
  }
  if (peers.length === 0) return 1;

  // The idle notice: any event restarts the clock; partial lines are shown when it runs out.
  let idleTimer: ReturnType<typeof setTimeout> | undefined;
  let inputDone = false;
  let settleIdle: (() => void) | null = null;
  const onIdle = () => {
    for (const peer of peers) flushPartial(peer);
    print(`${timeout} seconds elapsed.`);
    if (inputDone && options.udp) settleIdle?.(); // UDP peers never close: quiet after EOF is the end
    restartIdle();
  };
  const restartIdle = () => {
    clearTimeout(idleTimer);
    idleTimer = setTimeout(onIdle, timeout * 1000);
  };

  const flushPartial = (peer: Peer) => {
    if (peer.pending.length === 0) return;
    print(`[${peer.name}] ${showText(peer.pending)}`);
    peer.pending = new Uint8Array(0);
  };

  // The select() dispatch: bytes from a peer become printed lines.
  const onData = (peer: Peer, bytes: Uint8Array) => {
    restartIdle();
    let data = peer.pending.length ? concat(peer.pending, bytes) : bytes;
    for (let nl = data.indexOf(10); nl >= 0; nl = data.indexOf(10)) {
      print(`[${peer.name}] ${showText(data.subarray(0, nl))}`);
      data = data.subarray(nl + 1);
    }
    peer.pending = data.slice();
    if (peer.pending.length > MAX_PENDING) flushPartial(peer);
  };

  restartIdle();
  const receiving = peers.map(async (peer) => {
    try {
      await peer.receive((bytes) => onData(peer, bytes));
    } catch (e) {
      if (!isDisconnect(e)) throw e;
    }
    flushPartial(peer);
    if (!options.udp) print(`[${peer.name}] closed`);
  });

  const targets = options.to === undefined ? peers : peers.filter((p) => p.index === options.to);
  const reader = options.input.getReader();
  const sending = (async () => {
    for (let r = await reader.read(); !r.done; r = await reader.read()) {
      restartIdle();
      await Promise.all(targets.map((p) => p.send(r.value).catch(() => {})));
    }
    inputDone = true;
    await Promise.all(peers.map((p) => p.finishSending().catch(() => {})));
  })();

  const udpQuiet = new Promise<void>((resolve) => settleIdle = resolve);
  try {
    if (options.udp) {
      await sending;
      await udpQuiet;
    } else {
      await Promise.all(receiving);
      // All peers are gone: input has no one left to go to.
    }
  } finally {
    clearTimeout(idleTimer);
    for (const peer of peers) peer.close();
    await reader.cancel().catch(() => {}); // input may still be open: nobody is left to send to
    await Promise.allSettled([...receiving, sending]);
    await printing;
  }
  return 0;
}

// ---------------------------------------------------------------------------------------------
// Small helpers

/**
 * Decodes a line for the terminal: a trailing CR goes, other control characters show as ^X, and
 * C1 controls (U+0080 to U+009F, escape sequences to a terminal) as M-^X, as `cat -v` shows them.
 * Bytes that are not UTF-8 show as U+FFFD.
 */
export function showText(bytes: Uint8Array): string {
  const text = decoder.decode(bytes).replace(/\r$/, "");
  return text.replace(
    // deno-lint-ignore no-control-regex
    /[\x00-\x08\x0a-\x1f\x7f\u0080-\u009f]/g,
    (c) => {
      const code = c.charCodeAt(0);
      if (code === 0x7f) return "^?";
      return (code >= 0x80 ? "M-^" : "^") + String.fromCharCode((code & 0x7f) + 64);
    },
  );
}

function concat(a: Uint8Array, b: Uint8Array): Uint8Array {
  const out = new Uint8Array(a.length + b.length);
  out.set(a);
  out.set(b, a.length);
  return out;
}

async function writeAll(w: Writer, bytes: Uint8Array): Promise<void> {
  let at = 0;
  while (at < bytes.length) at += await w.write(bytes.subarray(at));
}

/** True for the errors a peer causes by going away: expected, and not worth a stack trace. */
function isDisconnect(e: unknown): boolean {
  return e instanceof Deno.errors.ConnectionReset || e instanceof Deno.errors.BrokenPipe ||
    e instanceof Deno.errors.ConnectionAborted || e instanceof Deno.errors.BadResource ||
    e instanceof Deno.errors.Interrupted || e instanceof Deno.errors.NotConnected ||
    e instanceof Deno.errors.UnexpectedEof; // a TLS peer that left without close_notify
}

/** A connection failure in a few words. */
function describe(e: unknown): string {
  if (e instanceof Deno.errors.ConnectionRefused) return "connection refused";
  if (e instanceof Deno.errors.TimedOut) return "timed out";
  const code = (e as { code?: string }).code;
  if (code === "ENOTFOUND" || e instanceof Deno.errors.NotFound) return "no such host";
  // Deno reports a name that does not resolve as a plain Error, known only by its message.
  if (e instanceof Error && e.message.startsWith("failed to lookup address")) return "no such host";
  return e instanceof Error ? e.message : String(e);
}

// ---------------------------------------------------------------------------------------------
// Load mode (--load): many chat clients at once, for measuring a chat server

/** Options for {@linkcode runChatLoad}. */
export interface ChatLoadOptions {
  /** Servers to spread the clients over, round-robin (two instances sharing Redis, say). */
  endpoints: Endpoint[];
  /** Clients in all. */
  clients: number;
  /** How many of them send. */
  senders: number;
  /** Lines each sender sends. */
  messages: number;
  /** Bytes per line, newline included (at least 32). */
  size: number;
  /** Lines per second from all senders together; 0 is as fast as the server takes them. */
  rate: number;
  /** Called once a second with the deliveries of that second. */
  onSecond?: (second: number, deliveries: number) => void;
}

/** What {@linkcode runChatLoad} measured. */
export interface ChatLoadResult {
  clients: number;
  senders: number;
  messages: number;
  rate: number;
  seconds: number;
  delivered: number;
  expected: number;
  deliveriesPerSecond: number;
  p50Ms: number;
  p99Ms: number;
}

/**
 * Connects `clients` clients, lets the join notices settle, then has `senders` of them send
 * `messages` lines each, and times every delivery to every other client from a timestamp inside
 * the line (`~L<sender>.<n>:<ms>`): whatever prefix the server adds is fine.
 */
export async function runChatLoad(options: ChatLoadOptions): Promise<ChatLoadResult> {
  const conns: Deno.TcpConn[] = [];
  for (let i = 0; i < options.clients; i++) {
    const e = options.endpoints[i % options.endpoints.length];
    const conn = await Deno.connect({ hostname: e.host, port: e.port });
    conn.setNoDelay(true);
    conns.push(conn);
  }
  const latencies: number[] = [];
  let delivered = 0, lastData = performance.now(), second = 0, lastDelivered = 0;
  const expected = options.senders * options.messages * (options.clients - 1);
  let allIn: () => void = () => {};
  const done = new Promise<void>((resolve) => allIn = resolve);

  // Each client reads lines and times the marked ones.
  const readers = conns.map(async (conn) => {
    const buffer = new Uint8Array(64 * 1024);
    let partial = "";
    try {
      for (let n = await conn.read(buffer); n !== null; n = await conn.read(buffer)) {
        const now = performance.now();
        lastData = now;
        const lines = (partial + decoder.decode(buffer.subarray(0, n), { stream: true })).split("\n");
        partial = lines.pop()!;
        for (const line of lines) {
          const at = line.indexOf("~L");
          if (at < 0) continue;
          const sent = Number(line.slice(line.indexOf(":", at) + 1, line.indexOf(" ", at)));
          latencies.push(now - sent);
          if (++delivered === expected) allIn();
        }
      }
    } catch (e) {
      if (!isDisconnect(e)) throw e;
    }
  });

  while (performance.now() - lastData < 500) await sleep(100); // greetings and join notices first

  const start = performance.now();
  const ticker = setInterval(() => {
    options.onSecond?.(++second, delivered - lastDelivered);
    lastDelivered = delivered;
  }, 1000);
  const pad = "x".repeat(Math.max(0, options.size - 40));
  const sending = (async () => {
    let sent = 0;
    const total = options.senders * options.messages;
    for (let round = 0; round < options.messages; round++) {
      await Promise.all(
        conns.slice(0, options.senders).map((conn, s) => {
          const line = `~L${s}.${round}:${performance.now().toFixed(3)} ${pad}\n`;
          return writeAll(conn, encoder.encode(line));
        }),
      );
      sent += options.senders;
      if (options.rate > 0) { // keep to the rate: wait until this many lines are due
        const due = start + (sent / options.rate) * 1000;
        if (due > performance.now()) await sleep(due - performance.now());
      }
    }
    return total;
  })();
  await sending;
  // Wait for the last deliveries; lines that have not come after 2 s of silence never will.
  let settled = false;
  done.then(() => settled = true);
  while (!settled && performance.now() - lastData < 2000) await sleep(50);
  const seconds = (performance.now() - start) / 1000;
  clearInterval(ticker);
  for (const conn of conns) conn.close();
  await Promise.allSettled(readers);
  latencies.sort((a, b) => a - b);
  const pct = (p: number) =>
    latencies.length ? Number(latencies[Math.floor(p * (latencies.length - 1))].toFixed(2)) : 0;
  return {
    clients: options.clients,
    senders: options.senders,
    messages: options.messages,
    rate: options.rate,
    seconds: Number(seconds.toFixed(3)),
    delivered,
    expected,
    deliveriesPerSecond: Math.round(delivered / seconds),
    p50Ms: pct(0.5),
    p99Ms: pct(0.99),
  };
}

function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

// ---------------------------------------------------------------------------------------------
// Command line

const USAGE = "usage: multiplex.ts HOST:PORT [HOST:PORT...] [--timeout S] [--udp] [--to all|N]\n" +
  "       multiplex.ts HOST:PORT [HOST:PORT...] --load CLIENTS [--senders S] [--messages M] [--size B] [--rate R] [--json]";

const HELP = `${USAGE}

Connects to every HOST:PORT at once, prints each line that arrives as [host:port] text, sends each
line of stdin to every peer, and says "${DEFAULT_TIMEOUT} seconds elapsed." when nothing happens for a while.

  --timeout S   seconds of silence before the idle notice (default ${DEFAULT_TIMEOUT})
  --udp         talk UDP datagrams instead of TCP
  --to all|N    send stdin to every peer (default) or to the Nth endpoint only

With --load, it is a load generator for a chat server: CLIENTS clients (spread over the endpoints), of which
--senders (default all) send --messages lines each (default 100) of --size bytes (default 64), --rate lines/s
in all (default 0: flat out). It reports deliveries/s and delivery latency (p50, p99); --json for scripts.

Try it: deno run -A multiplex.ts localhost:2626, with chat_server.ts running.`;

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

/** The parsed command line: a multiplexer (less its streams), a load run, or help. */
type Command =
  | { kind: "multiplex"; options: Omit<MultiplexOptions, "input" | "output" | "errors"> }
  | { kind: "load"; options: ChatLoadOptions; json: boolean }
  | { kind: "help" };

/** A whole number from the command line, or `fallback` when absent. */
function wholeNumber(
  flag: string,
  text: string | undefined,
  fallback: number,
  min: number,
  max: number,
): number {
  if (text === undefined) return fallback;
  const value = Number(text);
  if (!/^\d+$/.test(text) || value < min || value > max) {
    throw new UsageError(`${flag} wants a whole number from ${min} to ${max}, not "${text}"`);
  }
  return value;
}

/** Turns the command line into a command. */
export function parseMultiplexArgs(args: string[]): Command {
  const parsed = parseFlags(args, {
    timeout: { type: "string" },
    udp: { type: "boolean" },
    to: { type: "string" },
    load: { type: "string" },
    senders: { type: "string" },
    messages: { type: "string" },
    size: { type: "string" },
    rate: { type: "string" },
    json: { type: "boolean" },
    help: { type: "boolean", short: "h" },
  });
  const { values: v, positionals } = parsed;
  if (v.help) return { kind: "help" };
  if (positionals.length === 0) throw new UsageError("give at least one HOST:PORT");
  const endpoints = positionals.map(parseEndpoint);
  if (v.load !== undefined) {
    if (v.udp || v.to !== undefined || v.timeout !== undefined) {
      throw new UsageError("--load does not go with --udp, --to or --timeout");
    }
    const clients = wholeNumber("--load", v.load, 0, 2, 100_000);
    return {
      kind: "load",
      json: v.json ?? false,
      options: {
        endpoints,
        clients,
        senders: wholeNumber("--senders", v.senders, clients, 1, clients),
        messages: wholeNumber("--messages", v.messages, 100, 1, 1_000_000),
        size: wholeNumber("--size", v.size, 64, 32, 65536),
        rate: wholeNumber("--rate", v.rate, 0, 0, 10_000_000),
      },
    };
  }
  for (const flag of ["senders", "messages", "size", "rate", "json"] as const) {
    if (v[flag] !== undefined) throw new UsageError(`--${flag} goes with --load`);
  }
  const timeout = v.timeout === undefined ? DEFAULT_TIMEOUT : Number(v.timeout);
  if (!(timeout > 0 && timeout <= 86_400)) {
    throw new UsageError(`--timeout wants seconds, not "${v.timeout}"`);
  }
  let to: number | undefined;
  if (v.to !== undefined && v.to !== "all") {
    to = Number(v.to);
    if (!Number.isInteger(to) || to < 1 || to > endpoints.length) {
      throw new UsageError(
        `--to is "all" or an endpoint number from 1 to ${endpoints.length}, not "${v.to}"`,
      );
    }
  }
  return { kind: "multiplex", options: { endpoints, timeout, udp: v.udp ?? false, to } };
}

/** The command line. */
async function main(): Promise<void> {
  let command;
  try {
    command = parseMultiplexArgs(Deno.args);
  } catch (e) {
    if (!(e instanceof UsageError)) throw e;
    console.error(`multiplex: ${e.message}\n${USAGE}`);
    Deno.exit(2);
  }
  if (command.kind === "help") return console.log(HELP);
  if (command.kind === "load") {
    const o = command.options;
    if (!command.json) {
      console.log(
        `load: ${o.clients} clients, ${o.senders} senders x ${o.messages} lines of ${o.size} B, ` +
          `rate ${o.rate || "flat out"}`,
      );
      o.onSecond = (s, n) => console.log(`${String(s).padStart(4)} s  ${n} deliveries/s`);
    }
    let r: ChatLoadResult;
    try {
      r = await runChatLoad(o);
    } catch (e) {
      console.error(`multiplex: ${describe(e)}`);
      Deno.exit(1);
    }
    if (command.json) console.log(JSON.stringify(r));
    else {
      console.log(
        `- - - - -\n${r.seconds.toFixed(2)} s  ${r.deliveriesPerSecond} deliveries/s  ` +
          `latency p50 ${r.p50Ms} ms  p99 ${r.p99Ms} ms  delivered ${r.delivered} of ${r.expected}`,
      );
    }
    Deno.exit(r.delivered === r.expected ? 0 : 1);
  }
  const code = await runMultiplex({
    ...command.options,
    input: Deno.stdin.readable,
    output: Deno.stdout,
    errors: Deno.stderr,
  });
  Deno.exit(code); // stdin may still hold a pending read: exit rather than wait for it
}

if (import.meta.main) await main();
