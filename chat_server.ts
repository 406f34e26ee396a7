/**
 * chat_server.ts: the tutorial's telnet chat server, built to be left running on a LAN.
 *
 * Every line a client types goes to every other client, prefixed with the sender's address,
 * and everyone hears when someone joins or leaves. Try it in two or three terminals:
 *
 *     deno run -A chat_server.ts 2626
 *     telnet localhost 2626
 *
 * Design notes, in the spirit of the tutorial's `ChatServer` class:
 * - The accept loop only dispatches; `serveClient()` owns one connection from greeting to
 *   goodbye, with `try/finally`, so a fault on one connection touches no one else.
 * - Input is framed by bytes, not by reads: a line may arrive in many TCP segments, may cut a
 *   UTF-8 character in half, and may end in CRLF, LF, CR or CR NUL. Telnet negotiation (IAC
 *   sequences) and control characters are removed before anything is relayed.
 * - Output never blocks the loop. Each client has a bounded send queue; a broadcast formats the
 *   line once and queues the same bytes for everyone, and each queue is flushed as one coalesced
 *   write. A client that stops reading fills its own queue and is cut off; nobody else waits.
 *   This is wrong for a server whose clients must never lose a line (a log shipper, say): there
 *   you would block the sender instead, and let a slow reader slow the whole room.
 *
 * @module
 */

import { parseArgs } from "node:util";

// ---------------------------------------------------------------------------------------------
// Constants and options

/** The tutorial's port. */
export const DEFAULT_PORT = 2626;
/** Longest line relayed, in bytes; the rest of a longer line is discarded. */
export const DEFAULT_MAX_LINE = 4096;
/** Bytes that may wait for one client before it is cut off as a slow consumer. */
export const DEFAULT_SENDQ = 1024 * 1024;
/** Clients served at once; one more is refused with a line of explanation. */
export const DEFAULT_MAX_CLIENTS = 1000;
/** How long shutdown waits for goodbyes to be written before closing sockets anyway. */
export const SHUTDOWN_GRACE_MS = 1000;
/** How long a client's writes may stand still before it stops pacing the senders. */
const STALL_MS = 250;
/** Bytes read per `read()` call. Small, because every idle client holds one buffer. */
const READ_SIZE = 2048;
/** Most bytes copied together into one write. */
const WRITE_SIZE = 64 * 1024;
/** A batch of output this small gets a scratch buffer of its own size rather than a pooled one. */
const SMALL_BATCH = 4096;
/** Pooled write buffers kept for reuse when no flush needs them. */
const SPARE_BUFFERS = 32;
/** stdout lines that may wait for a slow terminal or pipe before the log starts dropping. */
const LOG_BACKLOG_BYTES = 4 * 1024 * 1024;

const GREETING = "You're connected to the Deno chatserver\r\n";
const SHUTDOWN_NOTICE = "Server shutting down, goodbye\r\n";

/** Something bytes can be written to, such as `Deno.stdout`. */
export interface Writer {
  write(p: Uint8Array): Promise<number>;
}

/** Options for {@linkcode startChatServer}. Every limit has a default. */
export interface ChatServerOptions {
  /** Port to listen on; 0 picks a free one. Default {@linkcode DEFAULT_PORT}. */
  port?: number;
  /** Interface to bind. Default: all interfaces, IPv6 and IPv4, or IPv4 alone without IPv6. */
  host?: string;
  /** Longest line relayed, in bytes. Default {@linkcode DEFAULT_MAX_LINE}. */
  maxLine?: number;
  /** Send queue per client, in bytes. Default {@linkcode DEFAULT_SENDQ}. */
  sendq?: number;
  /** Clients served at once. Default {@linkcode DEFAULT_MAX_CLIENTS}. */
  maxClients?: number;
  /** Where the event log goes (joins, lines, leaves); `null` for none. Default `Deno.stdout`. */
  log?: Writer | null;
}

/** A running chat server. */
export interface ChatServer {
  /** The address actually bound. */
  readonly addr: Deno.NetAddr;
  /** Tells every client goodbye, closes every socket, and resolves when all is closed. */
  close(): Promise<void>;
  /** Settles when the server has stopped, after `close()` or a fatal listener error. */
  readonly finished: Promise<void>;
}

// ---------------------------------------------------------------------------------------------
// Data structures

const encoder = new TextEncoder();
const CRLF = encoder.encode("\r\n");
const LF = encoder.encode("\n");

/** One connected client: its socket, its name, and its queue of bytes waiting to be sent. */
interface Client {
  readonly conn: Deno.Conn;
  /** `host:port` as the tutorial prints it (`[v6addr]:port` for IPv6). */
  readonly name: string;
  /** Prefix for this client's lines, `[host:port] `, encoded once. */
  readonly prefix: Uint8Array;
  queue: Uint8Array[];
  /** Bytes queued or being written: the figure the send queue limit applies to. */
  queued: number;
  /** When a write to this client last completed, or its flush began (ms since the epoch). */
  lastWrite: number;
  /** The running flush, if any. */
  flushing: Promise<void> | null;
  /** Waiting in the list of clients to flush at the end of this turn. */
  dirty: boolean;
  closed: boolean;
}

/** The telnet protocol bytes that matter when removing negotiation (RFC 854). */
const IAC = 255, SB = 250, SE = 240, WILL = 251, DONT = 254;
const CR = 13, NL = 10, NUL = 0, TAB = 9, DEL = 127;

const enum Telnet {
  Data,
  Iac,
  Option,
  Sub,
  SubIac,
}

/**
 * Splits a byte stream into lines, whatever the read boundaries.
 *
 * CRLF, LF, bare CR and CR NUL each end a line. Telnet commands and negotiation are removed, as
 * are control characters other than tab. A line longer than `maxLine` bytes is handed over
 * truncated (at a UTF-8 character boundary) with `truncated` set, and the rest of it is skipped,
 * so memory stays bounded whatever the peer sends. Empty lines are handed over too; the caller
 * decides what to do with them.
 *
 * @example
 * ```ts
 * import { LineFramer } from "./chat_server.ts";
 * const lines: string[] = [];
 * const framer = new LineFramer(4096, (line) => lines.push(new TextDecoder().decode(line)));
 * framer.push(new TextEncoder().encode("hel"));
 * framer.push(new TextEncoder().encode("lo\r\nworld\n"));
 * console.assert(lines.join("|") === "hello|world");
 * ```
 */
export class LineFramer {
  #line: Uint8Array;
  #length = 0;
  #state = Telnet.Data;
  #afterCR = false;
  #skipping = false;
  #onLine: (line: Uint8Array, truncated: boolean) => void;

  constructor(maxLine: number, onLine: (line: Uint8Array, truncated: boolean) => void) {
    this.#line = new Uint8Array(maxLine);
    this.#onLine = onLine;
  }

  /** Feeds bytes; calls `onLine` for each line completed. The bytes are not kept. */
  push(bytes: Uint8Array): void {
    for (let i = 0; i < bytes.length; i++) {
      const b = bytes[i];
      switch (this.#state) {
        case Telnet.Iac:
          // IAC IAC is a literal 255, which is not UTF-8 and means IAC to every telnet reader.
          this.#state = b >= WILL && b <= DONT ? Telnet.Option : b === SB ? Telnet.Sub : Telnet.Data;
          continue;
        case Telnet.Option:
          this.#state = Telnet.Data;
          continue;
        case Telnet.Sub:
          if (b === IAC) this.#state = Telnet.SubIac;
          continue;
        case Telnet.SubIac:
          this.#state = b === SE ? Telnet.Data : Telnet.Sub;
          continue;
      }
      if (b === IAC) {
        this.#state = Telnet.Iac;
        continue;
      }
      if (this.#afterCR) {
        this.#afterCR = false;
        if (b === NL || b === NUL) continue;
      }
      if (b === CR || b === NL) {
        this.#afterCR = b === CR;
        this.#endLine();
      } else if ((b >= 32 && b !== DEL) || b === TAB) {
        this.#addByte(b);
      }
    }
  }

  #addByte(b: number): void {
    if (this.#skipping) return;
    if (this.#length < this.#line.length) {
      this.#line[this.#length++] = b;
      return;
    }
    // Full: hand over what fits, cut back to the start of a UTF-8 character, and skip the rest.
    let end = this.#length;
    if ((b & 0xc0) === 0x80) {
      while (end > 0 && (this.#line[end - 1] & 0xc0) === 0x80) end--;
      if (end > 0 && this.#line[end - 1] >= 0xc0) end--;
    }
    this.#onLine(this.#line.subarray(0, end), true);
    this.#length = 0;
    this.#skipping = true;
  }

  #endLine(): void {
    if (this.#skipping) this.#skipping = false;
    else this.#onLine(this.#line.subarray(0, this.#length), false);
    this.#length = 0;
  }
}

/** Formats a peer address as the tutorial prints it: IPv4-mapped IPv6 addresses as plain IPv4. */
export function formatPeer(addr: Deno.NetAddr): string {
  const host = addr.hostname.startsWith("::ffff:") && addr.hostname.includes(".")
    ? addr.hostname.slice(7)
    : addr.hostname;
  return host.includes(":") ? `[${host}]:${addr.port}` : `${host}:${addr.port}`;
}

/** Writes all of `bytes`, however many calls it takes: `write()` may take only part. */
async function writeAll(w: Writer, bytes: Uint8Array): Promise<void> {
  let at = 0;
  while (at < bytes.length) at += await w.write(bytes.subarray(at));
}

/**
 * Writes `parts` in order, copying runs of small parts into `scratch` so that they go out as one
 * write; a part as big as `scratch` goes out on its own. Calls `written(n)` after each write.
 */
async function writeCoalesced(
  w: Writer,
  parts: Uint8Array[],
  scratch: Uint8Array,
  written: (n: number) => void,
): Promise<void> {
  let filled = 0;
  for (const part of parts) {
    if (filled > 0 && filled + part.length > scratch.length) {
      await writeAll(w, scratch.subarray(0, filled));
      written(filled);
      filled = 0;
    }
    if (part.length >= scratch.length) {
      await writeAll(w, part);
      written(part.length);
    } else {
      scratch.set(part, filled);
      filled += part.length;
    }
  }
  if (filled > 0) {
    await writeAll(w, scratch.subarray(0, filled));
    written(filled);
  }
}

/** True for the errors a peer causes by going away: expected, and not worth a stack trace. */
function isDisconnect(e: unknown): boolean {
  return e instanceof Deno.errors.ConnectionReset || e instanceof Deno.errors.BrokenPipe ||
    e instanceof Deno.errors.ConnectionAborted || e instanceof Deno.errors.BadResource ||
    e instanceof Deno.errors.Interrupted || e instanceof Deno.errors.NotConnected;
}

/**
 * The event log: lines for stdout, written in batches so that logging costs one write per turn
 * of the loop. A stdout that stops draining (a paused terminal, a full pipe) costs lines, never
 * the chat: past {@linkcode LOG_BACKLOG_BYTES} lines are dropped and counted.
 */
class EventLog {
  #out: Writer | null;
  #parts: Uint8Array[] = [];
  #bytes = 0;
  #dropped = 0;
  #writing: Promise<void> | null = null;
  #scratch = new Uint8Array(WRITE_SIZE);

  constructor(out: Writer | null) {
    this.#out = out;
  }

  /** Logs a line given as bytes, without its line ending. */
  bytes(line: Uint8Array): void {
    if (!this.#out) return;
    if (this.#bytes > LOG_BACKLOG_BYTES) {
      this.#dropped++;
      return;
    }
    this.#parts.push(line, LF);
    this.#bytes += line.length + 1;
    this.#writing ??= this.#drain();
  }

  /** Resolves when everything logged so far has been written. */
  async flushed(): Promise<void> {
    while (this.#writing) await this.#writing;
  }

  async #drain(): Promise<void> {
    await Promise.resolve(); // let the rest of this turn's lines join the batch
    try {
      while (this.#parts.length > 0) {
        if (this.#dropped > 0) {
          const note = encoder.encode(`(${this.#dropped} log lines dropped: stdout was slow)\n`);
          this.#parts.push(note);
          this.#bytes += note.length;
          this.#dropped = 0;
        }
        const parts = this.#parts;
        this.#parts = [];
        await writeCoalesced(this.#out!, parts, this.#scratch, (n) => this.#bytes -= n);
      }
    } catch (e) {
      if (!isDisconnect(e)) throw e;
      this.#out = null; // stdout is gone: go on serving without a log
    } finally {
      this.#writing = null;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// The server

/**
 * Starts a chat server and returns once it is listening.
 *
 * @example
 * ```ts
 * import { startChatServer } from "./chat_server.ts";
 * const server = await startChatServer({ port: 0, log: null });
 * console.log(`try: telnet localhost ${server.addr.port}`);
 * await server.close();
 * ```
 */
// deno-lint-ignore require-await -- async so that a listen error rejects rather than throws
export async function startChatServer(options: ChatServerOptions = {}): Promise<ChatServer> {
  const maxLine = options.maxLine ?? DEFAULT_MAX_LINE;
  const sendq = options.sendq ?? DEFAULT_SENDQ;
  const maxClients = options.maxClients ?? DEFAULT_MAX_CLIENTS;
  const log = new EventLog(options.log === undefined ? Deno.stdout : options.log);
  const listener = listenDualStack(options.host, options.port ?? DEFAULT_PORT);
  const clients = new Set<Client>();
  const handlers = new Set<Promise<void>>();
  let dirty: Client[] = [];
  let closing = false;
  // Sender pacing: clients more than paceBytes behind, and the wait of senders paused for them.
  const paceBytes = Math.max(1, Math.floor(sendq / 4));
  const congested = new Set<Client>();
  const spareBuffers: Uint8Array[] = [];
  let roomFreed: Promise<void> | null = null;
  let releaseSenders: (() => void) | null = null;

  const greeting = encoder.encode(GREETING);
  const tooLong = encoder.encode(
    `Your line was over ${maxLine} bytes; the rest of it was discarded\r\n`,
  );
  const full = encoder.encode(
    `Sorry, the server is full (${maxClients} clients); try again later\r\n`,
  );

  // Queues bytes for one client; the write happens at the end of this turn, coalesced.
  function send(client: Client, bytes: Uint8Array): void {
    if (client.closed) return;
    if (client.queued + bytes.length > sendq) {
      dropClient(client, `send queue over ${sendq} bytes (not reading)`);
      return;
    }
    client.queue.push(bytes);
    client.queued += bytes.length;
    if (client.queued > paceBytes) congested.add(client);
    if (!client.dirty && !client.flushing) {
      client.dirty = true;
      if (dirty.push(client) === 1) queueMicrotask(flushDirtyClients);
    }
  }

  // Sends bytes to every client but `sender`, and logs them (without the CRLF).
  function broadcastExcept(sender: Client | null, message: Uint8Array): void {
    for (const client of clients) if (client !== sender) send(client, message);
    log.bytes(message.subarray(0, message.length - 2));
  }

  // Starts a flush for every client that had bytes queued during this turn.
  function flushDirtyClients(): void {
    const batch = dirty;
    dirty = [];
    for (const client of batch) {
      client.dirty = false;
      if (!client.closed && !client.flushing) {
        client.lastWrite = Date.now();
        client.flushing = flushQueue(client);
      }
    }
  }

  // Writes a client's queue until it is empty. A batch of several parts is copied into a
  // scratch buffer per write: a small batch into one made to measure, a big one through a
  // buffer from a shared pool, so that a busy client makes no garbage and an idle one holds none.
  async function flushQueue(client: Client): Promise<void> {
    const written = (n: number) => noteWritten(client, n);
    try {
      while (client.queue.length > 0 && !client.closed) {
        const parts = client.queue;
        client.queue = [];
        if (parts.length === 1) {
          await writeAll(client.conn, parts[0]);
          written(parts[0].length);
        } else if (client.queued <= SMALL_BATCH) {
          await writeCoalesced(client.conn, parts, new Uint8Array(client.queued), written);
        } else {
          const scratch = spareBuffers.pop() ?? new Uint8Array(WRITE_SIZE);
          try {
            await writeCoalesced(client.conn, parts, scratch, written);
          } finally {
            if (spareBuffers.length < SPARE_BUFFERS) spareBuffers.push(scratch);
          }
        }
      }
    } catch (e) {
      dropClient(client, isDisconnect(e) ? null : `write failed: ${e}`);
    } finally {
      client.flushing = null;
    }
  }

  // Counts bytes written to a client, and lets paused senders go on if it has caught up.
  function noteWritten(client: Client, n: number): void {
    client.queued -= n;
    client.lastWrite = Date.now();
    if (client.queued <= paceBytes && congested.delete(client)) wakeSenders();
  }

  // Resolves when senders may read again: when no client that is still reading is more than
  // `paceBytes` behind. A client whose writes have not moved for STALL_MS does not hold the room
  // back; its queue grows until `sendq` cuts it off.
  async function waitForRoom(): Promise<void> {
    while (congested.size > 0) {
      const now = Date.now();
      let wait = Infinity;
      for (const client of congested) {
        const stalledFor = now - client.lastWrite;
        if (stalledFor < STALL_MS) wait = Math.min(wait, STALL_MS - stalledFor);
      }
      if (wait === Infinity) return;
      roomFreed ??= new Promise<void>((resolve) => {
        const timer = setTimeout(wakeSenders, wait);
        releaseSenders = () => {
          clearTimeout(timer);
          resolve();
        };
      });
      await roomFreed;
    }
  }

  function wakeSenders(): void {
    const release = releaseSenders;
    roomFreed = null;
    releaseSenders = null;
    release?.();
  }

  // Closes a client's socket; its handler then sees the read fail and announces the leave.
  function dropClient(client: Client, reason: string | null): void {
    if (client.closed) return;
    client.closed = true;
    client.queue = [];
    if (congested.delete(client)) wakeSenders();
    if (reason) console.error(`Dropped ${client.name}: ${reason}`);
    try {
      client.conn.close();
    } catch (e) {
      if (!(e instanceof Deno.errors.BadResource)) throw e;
    }
  }

  // Owns one connection: greets it, relays its lines, and announces its leave.
  async function serveClient(conn: Deno.TcpConn): Promise<void> {
    const name = formatPeer(conn.remoteAddr as Deno.NetAddr);
    if (clients.size >= maxClients) {
      console.error(`Refused ${name}: ${maxClients} clients already`);
      await refuse(conn, full);
      return;
    }
    conn.setNoDelay(true);
    const client: Client = {
      conn,
      name,
      prefix: encoder.encode(`[${name}] `),
      queue: [],
      queued: 0,
      lastWrite: 0,
      flushing: null,
      dirty: false,
      closed: false,
    };
    clients.add(client);
    send(client, greeting);
    broadcastExcept(client, encoder.encode(`Client joined ${name}\r\n`));
    try {
      await relayLines(client);
    } catch (e) {
      if (!isDisconnect(e)) console.error(`Error on ${name}: ${e instanceof Error ? e.stack : e}`);
    } finally {
      clients.delete(client);
      dropClient(client, null);
      if (!closing) broadcastExcept(client, encoder.encode(`Client left ${name}\r\n`));
    }
  }

  // Reads a client's bytes until it goes, broadcasting each non-empty line.
  async function relayLines(client: Client): Promise<void> {
    const framer = new LineFramer(maxLine, (line, truncated) => {
      if (truncated) send(client, tooLong);
      if (isBlank(line)) return;
      const message = new Uint8Array(client.prefix.length + line.length + 2);
      message.set(client.prefix);
      message.set(line, client.prefix.length);
      message.set(CRLF, message.length - 2);
      broadcastExcept(client, message);
    });
    const buffer = new Uint8Array(READ_SIZE);
    while (!client.closed) {
      if (congested.size > 0) await waitForRoom();
      const n = await client.conn.read(buffer);
      if (n === null) return;
      framer.push(buffer.subarray(0, n));
    }
  }

  // Accepts connections until the listener closes; each gets its own handler.
  async function acceptLoop(): Promise<void> {
    while (!closing) {
      let conn: Deno.TcpConn;
      try {
        conn = await listener.accept();
      } catch (e) {
        if (closing) return;
        // Out of file descriptors and the like: say so, breathe, and keep serving who is here.
        console.error(`accept failed: ${e instanceof Error ? e.message : e}`);
        await new Promise((r) => setTimeout(r, 100));
        continue;
      }
      const handler = serveClient(conn);
      handlers.add(handler);
      handler.finally(() => handlers.delete(handler));
    }
  }

  const finished = acceptLoop().then(async () => {
    await Promise.all(handlers);
    await log.flushed();
  });

  async function close(): Promise<void> {
    if (!closing) {
      closing = true;
      listener.close();
      const notice = encoder.encode(SHUTDOWN_NOTICE);
      for (const client of clients) send(client, notice);
      flushDirtyClients();
      await settleWithin(
        SHUTDOWN_GRACE_MS,
        [...clients].map((c) => c.flushing).filter((p) => p !== null),
      );
      for (const client of clients) dropClient(client, null);
    }
    await finished;
  }

  return { addr: listener.addr as Deno.NetAddr, close, finished };
}

/** Listens on `host`, or by default on all interfaces: IPv6 and IPv4, or IPv4 alone. */
function listenDualStack(host: string | undefined, port: number): Deno.TcpListener {
  if (host !== undefined) return Deno.listen({ hostname: host, port });
  try {
    return Deno.listen({ hostname: "::", port });
  } catch (e) {
    if (e instanceof Deno.errors.AddrInUse || e instanceof Deno.errors.PermissionDenied) throw e;
    return Deno.listen({ hostname: "0.0.0.0", port }); // a host without IPv6
  }
}

/** Writes a refusal to a connection we will not serve, then closes it. */
async function refuse(conn: Deno.Conn, message: Uint8Array): Promise<void> {
  try {
    await settleWithin(SHUTDOWN_GRACE_MS, [writeAll(conn, message)]);
  } catch (e) {
    if (!isDisconnect(e)) throw e;
  } finally {
    conn.close();
  }
}

/** Waits for the promises, or for `ms` milliseconds, whichever is first. */
async function settleWithin(ms: number, promises: Promise<unknown>[]): Promise<void> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  const timeout = new Promise<void>((resolve) => timer = setTimeout(resolve, ms));
  try {
    await Promise.race([Promise.allSettled(promises), timeout]);
  } finally {
    clearTimeout(timer);
  }
}

/** True if a line holds nothing but spaces and tabs. */
function isBlank(line: Uint8Array): boolean {
  for (const b of line) if (b !== 32 && b !== TAB) return false;
  return true;
}

// ---------------------------------------------------------------------------------------------
// Command line

const USAGE =
  "usage: chat_server.ts [PORT] [--port PORT] [--host HOST] [--max-line BYTES] [--sendq BYTES] [--max-clients N]";

const HELP = `${USAGE}

The tutorial's chat server: every line a client sends goes to every other client.

  PORT, --port PORT   port to listen on (default ${DEFAULT_PORT}; 0 picks a free one)
  --host HOST         interface to bind (default: all, IPv6 and IPv4)
  --max-line BYTES    longest line relayed (default ${DEFAULT_MAX_LINE})
  --sendq BYTES       send queue per client before it is cut off (default ${DEFAULT_SENDQ}; K and M suffixes work)
  --max-clients N     clients served at once (default ${DEFAULT_MAX_CLIENTS})
  -h, --help          show this help

Try it: deno run -A chat_server.ts 2626, then telnet localhost 2626 in two other terminals.`;

/** A bad command line: main() prints the message and the usage line and exits 2. */
class UsageError extends Error {}

/** Parses a whole number in [min, max], with an optional K or M suffix when `sizes` is set. */
function parseCount(flag: string, text: string, min: number, max: number, sizes = false): number {
  const match = /^(\d+)([kKmM]?)$/.exec(text);
  if (!match || (match[2] && !sizes)) throw new UsageError(`${flag} wants a whole number, not "${text}"`);
  const scale = { "": 1, k: 1024, m: 1024 * 1024 }[match[2].toLowerCase() as "" | "k" | "m"];
  const value = Number(match[1]) * scale;
  if (value < min || value > max) throw new UsageError(`${flag} must be from ${min} to ${max}`);
  return value;
}

/** Turns the command line into server options. */
export function parseChatArgs(args: string[]): ChatServerOptions | "help" {
  let parsed;
  try {
    parsed = parseArgs({
      args,
      allowPositionals: true,
      options: {
        port: { type: "string" },
        host: { type: "string" },
        "max-line": { type: "string" },
        sendq: { type: "string" },
        "max-clients": { type: "string" },
        help: { type: "boolean", short: "h" },
      },
    });
  } catch (e) {
    if (e instanceof TypeError && "code" in e) throw new UsageError(e.message);
    throw e;
  }
  const { values, positionals } = parsed;
  if (values.help) return "help";
  if (positionals.length > 1) throw new UsageError(`unexpected argument "${positionals[1]}"`);
  if (positionals.length === 1 && values.port !== undefined) {
    throw new UsageError("give the port once, as PORT or as --port");
  }
  const port = positionals[0] ?? values.port;
  return {
    port: port === undefined ? DEFAULT_PORT : parseCount("port", port, 0, 65535),
    host: values.host,
    maxLine: values["max-line"] === undefined
      ? undefined
      : parseCount("--max-line", values["max-line"], 1, 1 << 20),
    sendq: values.sendq === undefined ? undefined : parseCount("--sendq", values.sendq, 1, 2 ** 31, true),
    maxClients: values["max-clients"] === undefined
      ? undefined
      : parseCount("--max-clients", values["max-clients"], 1, 1_000_000),
  };
}

/** The command line: parse, listen, serve until SIGINT or SIGTERM. */
async function main(): Promise<void> {
  let options;
  try {
    options = parseChatArgs(Deno.args);
  } catch (e) {
    if (!(e instanceof UsageError)) throw e;
    console.error(`chat_server: ${e.message}\n${USAGE}`);
    Deno.exit(2);
  }
  if (options === "help") {
    console.log(HELP);
    return;
  }
  let server: ChatServer;
  try {
    server = await startChatServer(options);
  } catch (e) {
    const port = options.port;
    if (e instanceof Deno.errors.AddrInUse) console.error(`chat_server: port ${port} is already in use`);
    else if (e instanceof Deno.errors.PermissionDenied) {
      console.error(`chat_server: not allowed to listen on port ${port} (ports below 1024 need privileges)`);
    } else if (e instanceof Deno.errors.AddrNotAvailable || e instanceof Deno.errors.NotFound) {
      console.error(`chat_server: cannot listen on ${options.host}: ${(e as Error).message}`);
    } else throw e;
    Deno.exit(1);
  }
  console.log(`ChatServer started on port ${server.addr.port}`);

  const stop = () => server.close();
  for (const signal of ["SIGINT", "SIGTERM"] as const) Deno.addSignalListener(signal, stop);
  await server.finished;
  for (const signal of ["SIGINT", "SIGTERM"] as const) Deno.removeSignalListener(signal, stop);
  console.log("ChatServer shutdown complete");
}

if (import.meta.main) await main();
