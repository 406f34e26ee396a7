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
 *
 * Deno has no `select()`: every read is a promise, and `Promise.race` over them would lose data
 * from the reads that do not win. So each source gets its own read loop, and all of them feed one
 * event handler, which is what `select()` dispatching becomes in an event loop. The idle notice
 * is a timer that every event restarts.
 *
 * @module
 */

import { lookup } from "node:dns/promises";
import { parseArgs } from "node:util";

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

/** Decodes a line for the terminal: a trailing CR goes, other control characters show as ^X. */
export function showText(bytes: Uint8Array): string {
  const text = decoder.decode(bytes).replace(/\r$/, "");
  return text.replace(
    // deno-lint-ignore no-control-regex
    /[\x00-\x08\x0a-\x1f\x7f]/g,
    (c) => c === "\x7f" ? "^?" : "^" + String.fromCharCode(c.charCodeAt(0) + 64),
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

function isDisconnect(e: unknown): boolean {
  return e instanceof Deno.errors.ConnectionReset || e instanceof Deno.errors.BrokenPipe ||
    e instanceof Deno.errors.ConnectionAborted || e instanceof Deno.errors.BadResource ||
    e instanceof Deno.errors.Interrupted || e instanceof Deno.errors.NotConnected;
}

/** A connection failure in a few words. */
function describe(e: unknown): string {
  if (e instanceof Deno.errors.ConnectionRefused) return "connection refused";
  if (e instanceof Deno.errors.TimedOut) return "timed out";
  const code = (e as { code?: string }).code;
  if (code === "ENOTFOUND" || e instanceof Deno.errors.NotFound) return "no such host";
  return e instanceof Error ? e.message : String(e);
}

// ---------------------------------------------------------------------------------------------
// Command line

const USAGE = "usage: multiplex.ts HOST:PORT [HOST:PORT...] [--timeout S] [--udp] [--to all|N]";

const HELP = `${USAGE}

Connects to every HOST:PORT at once, prints each line that arrives as [host:port] text, sends each
line of stdin to every peer, and says "${DEFAULT_TIMEOUT} seconds elapsed." when nothing happens for a while.

  --timeout S   seconds of silence before the idle notice (default ${DEFAULT_TIMEOUT})
  --udp         talk UDP datagrams instead of TCP
  --to all|N    send stdin to every peer (default) or to the Nth endpoint only

Try it: deno run -A multiplex.ts localhost:2626, with chat_server.ts running.`;

/** A bad command line: main() prints it with the usage and exits 2. */
class UsageError extends Error {}

/** Turns the command line into options, less the streams. */
export function parseMultiplexArgs(
  args: string[],
): Omit<MultiplexOptions, "input" | "output" | "errors"> | "help" {
  let parsed;
  try {
    parsed = parseArgs({
      args,
      allowPositionals: true,
      options: {
        timeout: { type: "string" },
        udp: { type: "boolean" },
        to: { type: "string" },
        help: { type: "boolean", short: "h" },
      },
    });
  } catch (e) {
    if (e instanceof TypeError && "code" in e) throw new UsageError(e.message);
    throw e;
  }
  const { values: v, positionals } = parsed;
  if (v.help) return "help";
  if (positionals.length === 0) throw new UsageError("give at least one HOST:PORT");
  const endpoints = positionals.map(parseEndpoint);
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
  return { endpoints, timeout, udp: v.udp ?? false, to };
}

/** The command line. */
async function main(): Promise<void> {
  let options;
  try {
    options = parseMultiplexArgs(Deno.args);
  } catch (e) {
    if (!(e instanceof UsageError)) throw e;
    console.error(`multiplex: ${e.message}\n${USAGE}`);
    Deno.exit(2);
  }
  if (options === "help") {
    console.log(HELP);
    return;
  }
  const code = await runMultiplex({
    ...options,
    input: Deno.stdin.readable,
    output: Deno.stdout,
    errors: Deno.stderr,
  });
  Deno.exit(code); // stdin may still hold a pending read: exit rather than wait for it
}

if (import.meta.main) await main();
