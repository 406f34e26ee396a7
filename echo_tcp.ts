/**
 * echo_tcp.ts: the tutorial's stream echo server and client (RFC 862), its SocketServer
 * "Hello World" server, and a load generator that checks every byte.
 *
 *     deno run -A echo_tcp.ts server                 # echo on port 23000, all interfaces
 *     deno run -A echo_tcp.ts client Hello World!    # in a second terminal: prints "Hello World!"
 *     socat - TCP:localhost:23000 < file             # the whole file comes back
 *     deno run -A echo_tcp.ts hello                  # "Hello World!" on port 2525; try: nc localhost 2525
 *     deno run -A echo_tcp.ts bench --conns 100      # round trips/s and latency against any echo server
 *
 * The tutorial's server reads 100 bytes once and serves one client at a time. This one serves
 * every client at once, echoes until the client closes, and honours half-close: when a client
 * shuts its write side, everything it sent still comes back before the server closes. Each
 * connection holds one buffer and reads again only after its echo is written, so memory per
 * connection is bounded by that buffer, whatever the client sends.
 *
 * @module
 */

import { parseArgs, type ParseArgsOptionsConfig } from "node:util";

// ---------------------------------------------------------------------------------------------
// Constants and options

/** The tutorial's echo port. */
export const DEFAULT_PORT = 23000;
/** The tutorial's Hello World port. */
export const DEFAULT_HELLO_PORT = 2525;
/** Bytes each connection reads at once, and all it ever holds. */
export const BUFFER_SIZE = 64 * 1024;
/** What the Hello World handler sends. */
export const HELLO = "Hello World!\n";

/** Something bytes can be written to, such as `Deno.stdout`. */
interface Writer {
  write(p: Uint8Array): Promise<number>;
}

/** Options for {@linkcode startEchoServer} and {@linkcode startHelloServer}. */
export interface StreamServerOptions {
  /** Port to listen on; 0 picks a free one. */
  port?: number;
  /** Interface to bind. Default: all interfaces, IPv6 and IPv4, or IPv4 alone without IPv6. */
  host?: string;
  /** Where connects and disconnects are logged; `null` for none. Default `Deno.stdout`. */
  log?: Writer | null;
}

/** A running server. */
export interface StreamServer {
  /** The address actually bound. */
  readonly addr: Deno.NetAddr;
  /** Stops accepting, closes every connection, and resolves when all is closed. */
  close(): Promise<void>;
  /** Settles when the server has stopped. */
  readonly finished: Promise<void>;
}

const encoder = new TextEncoder();

// ---------------------------------------------------------------------------------------------
// The server: one loop that accepts, one handler per connection

/** Handles one connection; the server closes it afterwards. */
type Handler = (conn: Deno.TcpConn, peer: string) => Promise<void>;

/**
 * Accepts connections and runs `handle` for each, as Python's `socketserver` does: the loop only
 * dispatches, the handler owns the connection, and a fault in one is logged with its peer and
 * touches no other.
 */
function serveStreams(options: StreamServerOptions, defaultPort: number, handle: Handler): StreamServer {
  const listener = listenTcp(options.host, options.port ?? defaultPort);
  const log = options.log === undefined ? Deno.stdout : options.log;
  const conns = new Set<Deno.TcpConn>();
  const handlers = new Set<Promise<void>>();
  let closing = false;

  const say = (line: string) => {
    if (log) log.write(encoder.encode(line + "\n")).catch(() => {});
  };

  async function runHandler(conn: Deno.TcpConn): Promise<void> {
    const peer = formatPeer(conn.remoteAddr);
    conns.add(conn);
    say(`connect ${peer}`);
    try {
      await handle(conn, peer);
    } catch (e) {
      if (!isDisconnect(e)) say(`error ${peer}: ${e instanceof Error ? e.message : e}`);
    } finally {
      conns.delete(conn);
      closeQuietly(conn);
      say(`disconnect ${peer}`);
    }
  }

  async function acceptLoop(): Promise<void> {
    let pause = 0;
    while (!closing) {
      let conn: Deno.TcpConn;
      try {
        conn = await listener.accept();
      } catch (e) {
        if (closing) return;
        if (isRefusedByPeer(e)) continue; // it reset before we took it: its loss, nobody else's
        // Out of descriptors or memory: say so once, and try again soon (5 ms, doubling up to 100 ms).
        if (pause === 0) console.error(`accept failed: ${e instanceof Error ? e.message : e}; retrying`);
        pause = Math.min(100, 2 * pause || 5);
        await new Promise((r) => setTimeout(r, pause));
        continue;
      }
      pause = 0;
      const handler = runHandler(conn);
      handlers.add(handler);
      handler.finally(() => handlers.delete(handler));
    }
  }

  const finished = acceptLoop().then(() => Promise.all(handlers)).then(() => {});
  return {
    addr: listener.addr,
    finished,
    async close() {
      if (!closing) {
        closing = true;
        listener.close();
        for (const conn of conns) closeQuietly(conn);
      }
      await finished;
    },
  };
}

/**
 * Starts an RFC 862 echo server: whatever a client sends comes back, until it closes.
 *
 * @example
 * ```ts
 * import { startEchoServer } from "./echo_tcp.ts";
 * const server = startEchoServer({ port: 0, log: null });
 * const conn = await Deno.connect({ hostname: "127.0.0.1", port: server.addr.port });
 * await conn.write(new TextEncoder().encode("Hello World!\n"));
 * await conn.closeWrite();
 * const echo = await new Response(conn.readable).text();
 * console.assert(echo === "Hello World!\n");
 * await server.close();
 * ```
 */
export function startEchoServer(options: StreamServerOptions = {}): StreamServer {
  return serveStreams(options, DEFAULT_PORT, echoConnection);
}

/** Echoes one connection: read, write it all back, read again; at EOF, finish and close. */
async function echoConnection(conn: Deno.TcpConn): Promise<void> {
  conn.setNoDelay(true);
  const buffer = new Uint8Array(BUFFER_SIZE);
  for (;;) {
    const n = await conn.read(buffer);
    if (n === null) return; // the client half-closed: all it sent has been echoed
    let at = 0;
    while (at < n) at += await conn.write(buffer.subarray(at, n));
  }
}

/**
 * Starts the tutorial's Hello World server: every client gets {@linkcode HELLO} and is closed.
 *
 * @example
 * ```ts
 * import { startHelloServer } from "./echo_tcp.ts";
 * const server = startHelloServer({ port: 0, log: null });
 * const conn = await Deno.connect({ hostname: "127.0.0.1", port: server.addr.port });
 * console.assert(await new Response(conn.readable).text() === "Hello World!\n");
 * await server.close();
 * ```
 */
export function startHelloServer(options: StreamServerOptions = {}): StreamServer {
  return serveStreams(options, DEFAULT_HELLO_PORT, sayHello);
}

/** The tutorial's `hwRequestHandler.handle()`. */
async function sayHello(conn: Deno.TcpConn): Promise<void> {
  await writeAll(conn, encoder.encode(HELLO));
}

// ---------------------------------------------------------------------------------------------
// The client

/** Options for {@linkcode echoOnce} and {@linkcode echoInteractive}. */
export interface ClientOptions {
  host: string;
  port: number;
  /** Seconds to wait for the connection and for each reply. */
  timeout: number;
}

/** A failure the CLI reports in one line with exit code 1. */
export class ClientError extends Error {}

/** Connects, or fails with a {@linkcode ClientError} that says why in words. */
export async function connectTo(options: ClientOptions): Promise<Deno.TcpConn> {
  const where = `${options.host}:${options.port}`;
  try {
    const conn = await withTimeout(
      Deno.connect({ hostname: options.host, port: options.port }),
      options.timeout,
      `no connection to ${where} within ${options.timeout} s`,
      (late) => closeQuietly(late),
    );
    conn.setNoDelay(true);
    return conn;
  } catch (e) {
    if (e instanceof Deno.errors.ConnectionRefused) {
      throw new ClientError(`connection to ${where} refused: is the server running?`);
    }
    if (e instanceof Deno.errors.NotFound || e instanceof Deno.errors.AddrNotAvailable) {
      throw new ClientError(`cannot reach ${where}: ${(e as Error).message}`);
    }
    // Deno reports a name that does not resolve as a plain Error, known only by its message.
    if (e instanceof Error && e.message.startsWith("failed to lookup address")) {
      throw new ClientError(`cannot resolve ${options.host}`);
    }
    throw e;
  }
}

/**
 * The tutorial's echo client: sends `message` and returns its echo, once as many bytes as were
 * sent have come back. A server that closes early gives a {@linkcode ClientError}.
 *
 * @example
 * ```ts
 * import { echoOnce, startEchoServer } from "./echo_tcp.ts";
 * const server = startEchoServer({ port: 0, log: null });
 * const echo = await echoOnce({ host: "127.0.0.1", port: server.addr.port, timeout: 5 }, "hi\n");
 * console.assert(new TextDecoder().decode(echo) === "hi\n");
 * await server.close();
 * ```
 */
export async function echoOnce(options: ClientOptions, message: string | Uint8Array): Promise<Uint8Array> {
  const conn = await connectTo(options);
  const where = `${options.host}:${options.port}`;
  try {
    const bytes = typeof message === "string" ? encoder.encode(message) : message;
    const echo = new Uint8Array(bytes.length);
    const reading = (async () => {
      let got = 0;
      while (got < echo.length) {
        const n = await withTimeout(
          conn.read(echo.subarray(got)),
          options.timeout,
          `no echo from ${where} within ${options.timeout} s`,
        );
        if (n === null) throw new ClientError(`${where} closed after echoing ${got} of ${echo.length} bytes`);
        got += n;
      }
    })();
    await writeAll(conn, bytes);
    await reading;
    return echo;
  } finally {
    closeQuietly(conn);
  }
}

/**
 * The interactive client: copies `input` to the server and the server's replies to `output`,
 * until the server closes. End of input half-closes the connection, so the last echoes still
 * arrive. This is `socat - TCP:host:port`, in a few lines.
 */
export async function echoInteractive(
  options: ClientOptions,
  input: ReadableStream<Uint8Array>,
  output: Writer,
): Promise<void> {
  const conn = await connectTo(options);
  try {
    const sending = (async () => {
      for await (const chunk of input) await writeAll(conn, chunk);
      await conn.closeWrite();
    })();
    const buffer = new Uint8Array(BUFFER_SIZE);
    for (let n = await conn.read(buffer); n !== null; n = await conn.read(buffer)) {
      await writeAll(output, buffer.subarray(0, n));
    }
    await sending;
  } finally {
    closeQuietly(conn);
  }
}

// ---------------------------------------------------------------------------------------------
// The load generator

/** Options for {@linkcode runBench}. */
export interface BenchOptions extends ClientOptions {
  /** Connections driven at once. */
  conns: number;
  /** Bytes per message. */
  size: number;
  /** Seconds to run. */
  duration: number;
  /** `pingpong`: one message in flight per connection; `stream`: write and read flat out. */
  mode: "pingpong" | "stream";
  /** Called once a second with the figures of that second. */
  onSecond?: (second: number, roundTrips: number, bytes: number) => void;
}

/** What {@linkcode runBench} measured. */
export interface BenchResult {
  mode: "pingpong" | "stream";
  conns: number;
  size: number;
  seconds: number;
  roundTrips: number;
  roundTripsPerSecond: number;
  megabytesPerSecond: number;
  /** Round-trip latency percentiles in microseconds (ping-pong only, else 0). */
  p50Us: number;
  p99Us: number;
  p999Us: number;
  /** Echoed bytes that did not match what was sent: anything but 0 is a broken server. */
  badBytes: number;
}

/** The byte at `offset` of the test pattern every connection sends. */
function patternByte(offset: number): number {
  return (offset * 2654435761) >>> 24;
}

/**
 * Drives an echo server for `duration` seconds and checks every byte it returns.
 *
 * @example
 * ```ts
 * import { runBench, startEchoServer } from "./echo_tcp.ts";
 * const server = startEchoServer({ port: 0, log: null });
 * const r = await runBench({
 *   host: "127.0.0.1", port: server.addr.port, timeout: 5,
 *   conns: 2, size: 64, duration: 0.2, mode: "pingpong",
 * });
 * console.assert(r.roundTrips > 0 && r.badBytes === 0);
 * await server.close();
 * ```
 */
export async function runBench(options: BenchOptions): Promise<BenchResult> {
  const conns = await Promise.all(Array.from({ length: options.conns }, () => connectTo(options)));
  const latencies: number[] = [];
  let roundTrips = 0, bytes = 0, badBytes = 0, lastRoundTrips = 0, lastBytes = 0, second = 0;
  const start = performance.now();
  const end = start + options.duration * 1000;
  const ticker = setInterval(() => {
    options.onSecond?.(++second, roundTrips - lastRoundTrips, bytes - lastBytes);
    lastRoundTrips = roundTrips;
    lastBytes = bytes;
  }, 1000);

  // Checks received bytes against the pattern from `offset`; returns how many differ.
  const check = (chunk: Uint8Array, offset: number) => {
    let bad = 0;
    for (let i = 0; i < chunk.length; i++) if (chunk[i] !== patternByte(offset + i)) bad++;
    return bad;
  };

  async function pingPong(conn: Deno.TcpConn): Promise<void> {
    const out = new Uint8Array(options.size);
    const buffer = new Uint8Array(Math.max(options.size, BUFFER_SIZE));
    let offset = 0;
    while (performance.now() < end) {
      for (let i = 0; i < out.length; i++) out[i] = patternByte(offset + i);
      const sent = performance.now();
      await writeAll(conn, out);
      let got = 0;
      while (got < out.length) {
        const n = await conn.read(buffer.subarray(0, out.length - got));
        if (n === null) throw new ClientError("the server closed the connection mid-echo");
        badBytes += check(buffer.subarray(0, n), offset + got);
        got += n;
      }
      latencies.push((performance.now() - sent) * 1000);
      offset += out.length;
      roundTrips++;
      bytes += out.length;
    }
  }

  async function stream(conn: Deno.TcpConn): Promise<void> {
    const out = new Uint8Array(options.size);
    let sent = 0;
    const writing = (async () => {
      while (performance.now() < end) {
        for (let i = 0; i < out.length; i++) out[i] = patternByte(sent + i);
        await writeAll(conn, out);
        sent += out.length;
      }
      await conn.closeWrite();
    })();
    const buffer = new Uint8Array(BUFFER_SIZE);
    let received = 0;
    for (let n = await conn.read(buffer); n !== null; n = await conn.read(buffer)) {
      badBytes += check(buffer.subarray(0, n), received);
      received += n;
      bytes += n;
    }
    await writing;
    if (received !== sent) throw new ClientError(`sent ${sent} bytes but ${received} came back`);
  }

  try {
    await Promise.all(conns.map(options.mode === "stream" ? stream : pingPong));
  } finally {
    clearInterval(ticker);
    for (const conn of conns) closeQuietly(conn);
  }
  const seconds = (performance.now() - start) / 1000;
  latencies.sort((a, b) => a - b);
  const pct = (p: number) =>
    latencies.length ? Math.round(latencies[Math.floor(p * (latencies.length - 1))]) : 0;
  return {
    mode: options.mode,
    conns: options.conns,
    size: options.size,
    seconds: Number(seconds.toFixed(3)),
    roundTrips,
    roundTripsPerSecond: Math.round(roundTrips / seconds),
    megabytesPerSecond: Number((bytes / seconds / 1e6).toFixed(2)),
    p50Us: pct(0.5),
    p99Us: pct(0.99),
    p999Us: pct(0.999),
    badBytes,
  };
}

// ---------------------------------------------------------------------------------------------
// Small helpers

/** Writes all of `bytes`, however many calls it takes: `write()` may take only part. */
async function writeAll(w: Writer, bytes: Uint8Array): Promise<void> {
  let at = 0;
  while (at < bytes.length) at += await w.write(bytes.subarray(at));
}

/** Rejects with a {@linkcode ClientError} after `seconds`; `late` gets a result that came too late. */
async function withTimeout<T>(
  promise: Promise<T>,
  seconds: number,
  message: string,
  late?: (value: T) => void,
): Promise<T> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  let timedOut = false;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => {
      timedOut = true;
      reject(new ClientError(message));
    }, seconds * 1000);
  });
  if (late) promise.then((v) => timedOut && late(v), () => {});
  try {
    return await Promise.race([promise, timeout]);
  } finally {
    clearTimeout(timer);
  }
}

/** Listens on `host`, or by default on all interfaces: IPv6 and IPv4, or IPv4 alone. */
function listenTcp(host: string | undefined, port: number): Deno.TcpListener {
  if (host !== undefined) return Deno.listen({ hostname: host, port });
  try {
    return Deno.listen({ hostname: "::", port });
  } catch (e) {
    if (e instanceof Deno.errors.AddrInUse || e instanceof Deno.errors.PermissionDenied) throw e;
    return Deno.listen({ hostname: "0.0.0.0", port }); // a host without IPv6
  }
}

/** `host:port`, with IPv4-mapped IPv6 addresses shown as plain IPv4 and IPv6 in brackets. */
function formatPeer(addr: Deno.NetAddr): string {
  const host = addr.hostname.startsWith("::ffff:") && addr.hostname.includes(".")
    ? addr.hostname.slice(7)
    : addr.hostname;
  return host.includes(":") ? `[${host}]:${addr.port}` : `${host}:${addr.port}`;
}

/** True for the errors a peer causes by going away. */
/** True for an accept() that failed because the peer reset first: nothing is wrong with us. */
function isRefusedByPeer(e: unknown): boolean {
  return e instanceof Deno.errors.NotConnected || e instanceof Deno.errors.ConnectionReset ||
    e instanceof Deno.errors.ConnectionAborted;
}

/** True for the errors a peer causes by going away: expected, and not worth a stack trace. */
function isDisconnect(e: unknown): boolean {
  return e instanceof Deno.errors.ConnectionReset || e instanceof Deno.errors.BrokenPipe ||
    e instanceof Deno.errors.ConnectionAborted || e instanceof Deno.errors.BadResource ||
    e instanceof Deno.errors.Interrupted || e instanceof Deno.errors.NotConnected ||
    e instanceof Deno.errors.UnexpectedEof; // a TLS peer that left without close_notify
}

function closeQuietly(conn: Deno.Conn): void {
  try {
    conn.close();
  } catch (e) {
    if (!(e instanceof Deno.errors.BadResource)) throw e;
  }
}

// ---------------------------------------------------------------------------------------------
// Command line

const USAGE = `usage: echo_tcp.ts server [--host H] [--port P] [--quiet]
       echo_tcp.ts client [--host H] [--port P] [--timeout S] [MESSAGE...]
       echo_tcp.ts hello  [--host H] [--port P] [--quiet]
       echo_tcp.ts bench  [--host H] [--port P] [--conns N] [--size B] [--duration S] [--mode pingpong|stream] [--json]`;

const HELP = `${USAGE}

  server   RFC 862 echo: everything a client sends comes back (default port ${DEFAULT_PORT}, all interfaces)
  client   send MESSAGE (plus a newline) and print the echo; with no MESSAGE, echo stdin line by line
  hello    the tutorial's Hello World server: each client gets "Hello World!" (default port ${DEFAULT_HELLO_PORT})
  bench    drive an echo server, check every byte, report round trips/s, MB/s and latency

  --host H        server: interface to bind (default all); others: server to reach (default localhost)
  --port P        port (default ${DEFAULT_PORT}, or ${DEFAULT_HELLO_PORT} for hello)
  --quiet         server, hello: do not log connects and disconnects
  --timeout S     client, bench: seconds to wait to connect and for each echo (default 5)
  --conns N       bench: connections at once (default 1)
  --size B        bench: bytes per message (default 64; 65536 in stream mode)
  --duration S    bench: seconds to run (default 5)
  --mode M        bench: pingpong (one message in flight per connection) or stream (default pingpong)
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

/** The parsed command line. */
type Command =
  | { kind: "help" }
  | { kind: "server" | "hello"; options: StreamServerOptions; quiet: boolean }
  | { kind: "client"; options: ClientOptions; message: string | null }
  | { kind: "bench"; options: BenchOptions; json: boolean };

/** Turns the command line into a command. */
export function parseEchoArgs(args: string[]): Command {
  const parsed = parseFlags(args, {
    host: { type: "string" },
    port: { type: "string" },
    quiet: { type: "boolean" },
    timeout: { type: "string" },
    conns: { type: "string" },
    size: { type: "string" },
    duration: { type: "string" },
    mode: { type: "string" },
    json: { type: "boolean" },
    help: { type: "boolean", short: "h" },
  });
  const { values: v, positionals } = parsed;
  if (v.help) return { kind: "help" };
  const [kind, ...rest] = positionals;
  if (kind === undefined) throw new UsageError("say what to run: server, client, hello or bench");
  if (!["server", "client", "hello", "bench"].includes(kind)) {
    throw new UsageError(`unknown command "${kind}"`);
  }
  if (kind !== "client" && rest.length > 0) throw new UsageError(`unexpected argument "${rest[0]}"`);
  const allowed: Record<string, string[]> = {
    server: ["host", "port", "quiet"],
    hello: ["host", "port", "quiet"],
    client: ["host", "port", "timeout"],
    bench: ["host", "port", "timeout", "conns", "size", "duration", "mode", "json"],
  };
  for (const flag of Object.keys(v)) {
    if (!allowed[kind].includes(flag)) throw new UsageError(`--${flag} does not apply to ${kind}`);
  }
  const listens = kind === "server" || kind === "hello"; // 0 picks a free port; a client needs a real one
  const port = parseInteger(
    "--port",
    v.port,
    kind === "hello" ? DEFAULT_HELLO_PORT : DEFAULT_PORT,
    listens ? 0 : 1,
    65535,
  );
  if (kind === "server" || kind === "hello") {
    return { kind, options: { host: v.host, port }, quiet: v.quiet ?? false };
  }
  const timeout = parseNumber("--timeout", v.timeout, 5, 0.001, 3600);
  const client = { host: v.host ?? "localhost", port, timeout };
  if (kind === "client") return { kind, options: client, message: rest.length ? rest.join(" ") : null };
  const mode = v.mode ?? "pingpong";
  if (mode !== "pingpong" && mode !== "stream") {
    throw new UsageError(`--mode is pingpong or stream, not "${mode}"`);
  }
  return {
    kind: "bench",
    json: v.json ?? false,
    options: {
      ...client,
      mode,
      conns: parseInteger("--conns", v.conns, 1, 1, 10_000),
      size: parseInteger("--size", v.size, mode === "stream" ? 65536 : 64, 1, 16 << 20),
      duration: parseNumber("--duration", v.duration, 5, 0.01, 86_400),
    },
  };
}

/** Prints a finished bench like iperf3's summary. */
function printBenchSummary(r: BenchResult): void {
  const lat = r.mode === "pingpong"
    ? `   latency p50 ${r.p50Us} µs  p99 ${r.p99Us} µs  p99.9 ${r.p999Us} µs`
    : "";
  console.log(
    `- - - - -\n${r.seconds.toFixed(2)} s  ${r.conns} conns  ${r.size} B  ` +
      `${r.roundTripsPerSecond} round trips/s  ${r.megabytesPerSecond} MB/s${lat}  bad bytes ${r.badBytes}`,
  );
}

/** The command line. */
async function main(): Promise<void> {
  let command: Command;
  try {
    command = parseEchoArgs(Deno.args);
  } catch (e) {
    if (!(e instanceof UsageError)) throw e;
    console.error(`echo_tcp: ${e.message}\n${USAGE}`);
    Deno.exit(2);
  }
  try {
    switch (command.kind) {
      case "help":
        console.log(HELP);
        return;
      case "server":
      case "hello": {
        const start = command.kind === "server" ? startEchoServer : startHelloServer;
        const server = start({ ...command.options, log: command.quiet ? null : Deno.stdout });
        const what = command.kind === "server" ? "Echo server" : "Hello World server";
        const stop = () => server.close();
        Deno.addSignalListener("SIGINT", stop); // before saying so: a SIGTERM may follow at once
        Deno.addSignalListener("SIGTERM", stop);
        console.log(`${what} listening on ${formatPeer(server.addr)}`);
        await server.finished;
        Deno.removeSignalListener("SIGINT", stop);
        Deno.removeSignalListener("SIGTERM", stop);
        console.log("shutdown complete");
        return;
      }
      case "client":
        if (command.message !== null) {
          await Deno.stdout.write(await echoOnce(command.options, command.message + "\n"));
        } else {
          await echoInteractive(command.options, Deno.stdin.readable, Deno.stdout);
        }
        return;
      case "bench": {
        const o = command.options;
        if (!command.json) {
          console.log(
            `bench: ${o.mode}, ${o.conns} conns, ${o.size} B, ${o.duration} s against ${o.host}:${o.port}`,
          );
          o.onSecond = (s, rt, bytes) =>
            console.log(`${String(s).padStart(4)} s  ${rt} round trips/s  ${(bytes / 1e6).toFixed(2)} MB/s`);
        }
        const result = await runBench(o);
        if (command.json) console.log(JSON.stringify(result));
        else printBenchSummary(result);
        if (result.badBytes > 0) {
          console.error(`echo_tcp: ${result.badBytes} echoed bytes did not match what was sent`);
          Deno.exit(1);
        }
        return;
      }
    }
  } catch (e) {
    if (e instanceof ClientError) console.error(`echo_tcp: ${e.message}`);
    else if (e instanceof Deno.errors.AddrInUse) {
      console.error(`echo_tcp: port ${portOf(command)} is already in use`);
    } else if (e instanceof Deno.errors.PermissionDenied) {
      console.error(`echo_tcp: not allowed to listen on port ${portOf(command)}`);
    } else if (e instanceof Deno.errors.AddrNotAvailable) {
      console.error(`echo_tcp: cannot listen there: ${e.message}`);
    } else if (e instanceof Error && e.message.startsWith("failed to lookup address")) {
      // Deno reports a name that does not resolve as a plain Error, known only by its message.
      console.error(
        `echo_tcp: cannot listen on ${
          "options" in command ? command.options.host : ""
        }: the name does not resolve`,
      );
    } else if (isDisconnect(e)) console.error(`echo_tcp: the connection was lost (${(e as Error).message})`);
    else throw e;
    Deno.exit(1);
  }
}

function portOf(command: Command): number | undefined {
  return "options" in command ? command.options.port : undefined;
}

if (import.meta.main) await main();
