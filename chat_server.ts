/**
 * chat_server.ts: the tutorial's telnet chat server, built to be left running on a LAN.
 *
 * Every line a client types goes to every other client, prefixed with the sender's address,
 * and everyone hears when someone joins or leaves. Try it in two or three terminals:
 *
 *     deno run -A chat_server.ts 2626
 *     telnet localhost 2626
 *
 * Beyond the tutorial, a plain telnet user gets what chat users expect: `/nick`, `/who`, `/me`,
 * `/msg`, rooms (`/join`, `/rooms`), `/quit` and `/help`; and the operator gets limits (clients,
 * clients per address, idle time, flood rate, allow/deny lists), TLS and a JSON event log.
 * `--http PORT` puts browser users in the same rooms (a page and a WebSocket, both in this file),
 * and `--redis URL` lets several instances share their rooms.
 *
 * The file reads top to bottom: options; data structures and line framing; the server (sending,
 * rooms, commands, connections); the bus between instances; the web page; the command line.
 *
 * Design notes, in the spirit of the tutorial's `ChatServer` class:
 * - The accept loop only dispatches; `serveClient()` admits one connection and `readLines()`
 *   reads it from greeting to goodbye, so a fault on one connection touches no one else. It is
 *   written as callbacks rather than an async loop, because an idle client should cost little.
 * - Input is framed by bytes, not by reads: a line may arrive in many TCP segments, may cut a
 *   UTF-8 character in half, and may end in CRLF, LF, CR or CR NUL. Telnet negotiation (IAC
 *   sequences) and control characters are removed before anything is relayed.
 * - Output never blocks the loop. Each client has a bounded send queue; a broadcast formats the
 *   line once and queues the same bytes for everyone, and each queue is flushed as one coalesced
 *   write. A client that stops reading fills its own queue and is cut off; nobody else waits.
 *   A reader that is slow but alive pauses the senders instead, so it loses nothing.
 *   This is wrong for a server whose clients must never be cut off (a log shipper, say): there
 *   you would block the senders for as long as it takes, and let one stalled reader stall all.
 * - Rooms are sets of clients. Above `--announce-limit` members a room stops announcing joins and
 *   leaves, as large chat services do: 10,000 joins would otherwise be 50 million notices.
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
/** Clients per remote address; 0 is no limit. */
export const DEFAULT_MAX_PER_IP = 0;
/** Lines a client may send per 10 seconds before its extra lines are dropped; 0 is no limit. */
export const DEFAULT_RATE = 50;
/** Members above which a room no longer announces each join and leave. */
export const DEFAULT_ANNOUNCE_LIMIT = 200;
/** The room everyone starts in. */
export const LOBBY = "lobby";
/** How long shutdown waits for goodbyes to be written before closing sockets anyway. */
export const SHUTDOWN_GRACE_MS = 1000;
/** Floods (runs of dropped lines) within FLOOD_MEMORY_MS that get a client disconnected. */
const FLOOD_STRIKES = 3;
const FLOOD_MEMORY_MS = 60_000;
/** Longest nick or room name, in characters. */
const MAX_NAME = 32;
/** Pending connections the kernel may queue for us: a join storm should not meet SYN drops. */
const TCP_BACKLOG = 4096;
/** How long a client's writes may stand still before it stops pacing the senders. */
const STALL_MS = 250;
/** Bytes read per `read()` call: a client starts with the first size and grows to the second. */
const FIRST_READ_SIZE = 64;
const READ_SIZE = 16 * 1024;
/** Most bytes copied together into one write. */
const WRITE_SIZE = 64 * 1024;
/** A batch of output this small gets a scratch buffer of its own size rather than a pooled one. */
const SMALL_BATCH = 4096;
/**
 * Clients with output waiting, above which a flush first waits GATHER_MS to gather more lines.
 * Measured at 1,000 clients and 150 lines/s: p99 fell from 60-95 ms to 46-53 ms, as each write
 * op then carries more lines; below the threshold nobody waits.
 */
const GATHER_FANOUT = 256;
const GATHER_MS = 10;
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
  /** Clients per remote address; 0 is no limit. Default {@linkcode DEFAULT_MAX_PER_IP}. */
  maxPerIp?: number;
  /** Seconds of silence after which a client is told and closed; 0 is never. Default 0. */
  idle?: number;
  /** Lines per 10 seconds per client, with bursts of twice that; 0 is no limit. Default {@linkcode DEFAULT_RATE}. */
  rate?: number;
  /** Members above which a room stops announcing joins and leaves. Default {@linkcode DEFAULT_ANNOUNCE_LIMIT}. */
  announceLimit?: number;
  /** CIDR blocks that may connect (empty: everyone). Checked at accept, before `deny`. */
  allow?: string[];
  /** CIDR blocks that may not connect. */
  deny?: string[];
  /** Also serve the web page and its WebSocket: `port` (0 picks one), `host` (default: as `host`),
   * and the `origins` allowed to open the WebSocket from other sites (`*` for any). */
  http?: { port: number; host?: string; origins?: string[] };
  /** Share rooms with other instances through Redis. Default: this instance alone. */
  redis?: RedisOptions;
  /** Serve TLS with this certificate chain and key (PEM text) instead of plain TCP. */
  tls?: { cert: string; key: string };
  /** Where the event log goes (joins, lines, leaves); `null` for none. Default `Deno.stdout`. */
  log?: Writer | null;
  /** `text`: the tutorial's lines; `json`: one JSON object per event. Default `text`. */
  logFormat?: "text" | "json";
}

/** A running chat server. */
export interface ChatServer {
  /** The address actually bound. */
  readonly addr: Deno.NetAddr;
  /** Where the web page is served, with `http`; else null. */
  readonly httpAddr: Deno.NetAddr | null;
  /** With `redis`: settles when Redis first answers (the server serves local clients meanwhile). */
  readonly redisReady: Promise<void> | null;
  /** Tells every client goodbye, closes every socket, and resolves when all is closed. */
  close(): Promise<void>;
  /** Settles when the server has stopped, after `close()` or a fatal listener error. */
  readonly finished: Promise<void>;
}

// ---------------------------------------------------------------------------------------------
// Data structures

const encoder = new TextEncoder();
const decoder = new TextDecoder();
const CRLF = encoder.encode("\r\n");
const LF = encoder.encode("\n");

/** What the server needs of a client's connection: TCP, TLS and WebSocket clients all have it. */
interface Link {
  write(p: Uint8Array): Promise<number>;
  close(): void;
}

/** A room: a name and the clients in it. */
interface Room {
  readonly name: string;
  readonly members: Set<Client>;
}

/** One connected client: its socket, its names, its room, and its queue of bytes to send. */
interface Client {
  readonly conn: Link;
  /** `host:port` as the tutorial prints it (`[v6addr]:port` for IPv6). */
  readonly address: string;
  /** The remote address alone, for the per-address limit. */
  readonly ip: string;
  nick: string | null;
  /** What others see: the nick, or else the address. */
  label: string;
  /** Prefix for this client's lines, `[label] `, encoded once per name when first needed. */
  prefix: Uint8Array | null;
  room: Room;
  queue: Uint8Array[];
  /** Bytes queued or being written: the figure the send queue limit applies to. */
  queued: number;
  /** When a write to this client last completed, or its flush began (ms since the epoch). */
  lastWrite: number;
  /** A write is under way; `inflight` is what it still has to write. */
  flushing: boolean;
  inflight: Uint8Array | null;
  /** The write op's callbacks, made once per client rather than once per write. */
  wrote: (n: number) => void;
  failed: (e: unknown) => void;
  /** Who waits for the queue to empty (a goodbye before closing); usually nobody. */
  drainWaiters: (() => void)[] | null;
  /** Waiting in the list of clients to flush at the end of this turn. */
  dirty: boolean;
  closed: boolean;
  /** When the client last sent anything (ms since the epoch). */
  lastInput: number;
  /** Flood control: a token bucket, and the floods it has caused lately. */
  tokens: number;
  tokensAt: number;
  flooding: boolean;
  floods: number;
  lastFlood: number;
  /** Set when the client is on its way out: why (`/quit` text, "idle", "flooding"). */
  leaving: string | null;
  /** A command waiting on Redis; the client's next lines wait their turn behind it. */
  busy: Promise<void> | null;
}

/** The telnet protocol bytes that matter when removing negotiation (RFC 854). */
const IAC = 255, SB = 250, SE = 240, WILL = 251, DONT = 254;
const CR = 13, NL = 10, NUL = 0, TAB = 9, DEL = 127, SLASH = 47;

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
  #line = new Uint8Array(0); // grown on demand up to #maxLine: an idle client holds nothing
  #maxLine: number;
  #length = 0;
  #state = Telnet.Data;
  #afterCR = false;
  #skipping = false;
  #onLine: (line: Uint8Array, truncated: boolean) => void;

  constructor(maxLine: number, onLine: (line: Uint8Array, truncated: boolean) => void) {
    this.#maxLine = maxLine;
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
    if (this.#length < this.#maxLine) {
      const grown = new Uint8Array(Math.min(this.#maxLine, Math.max(64, 2 * this.#length)));
      grown.set(this.#line);
      this.#line = grown;
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

/** Joins byte arrays into one new array of `total` bytes. */
function concatBytes(parts: Uint8Array[], total: number): Uint8Array {
  const out = new Uint8Array(total);
  let at = 0;
  for (const part of parts) {
    out.set(part, at);
    at += part.length;
  }
  return out;
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
    e instanceof Deno.errors.Interrupted || e instanceof Deno.errors.NotConnected ||
    e instanceof Deno.errors.UnexpectedEof; // a TLS peer that left without close_notify
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

  /** Logs a line of text. */
  text(line: string): void {
    if (this.#out) this.bytes(encoder.encode(line));
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
export async function startChatServer(options: ChatServerOptions = {}): Promise<ChatServer> {
  const maxLine = options.maxLine ?? DEFAULT_MAX_LINE;
  const sendq = options.sendq ?? DEFAULT_SENDQ;
  const maxClients = options.maxClients ?? DEFAULT_MAX_CLIENTS;
  const maxPerIp = options.maxPerIp ?? DEFAULT_MAX_PER_IP;
  const rate = options.rate ?? DEFAULT_RATE;
  const burst = 2 * rate; // a pasted block goes through once; a steady flood does not
  const announceLimit = options.announceLimit ?? DEFAULT_ANNOUNCE_LIMIT;
  const allow = (options.allow ?? []).map(parseCidr);
  const deny = (options.deny ?? []).map(parseCidr);
  const json = options.logFormat === "json";
  const log = new EventLog(options.log === undefined ? Deno.stdout : options.log);
  const listener = listenDualStack(options.host, options.port ?? DEFAULT_PORT, options.tls);
  const clients = new Set<Client>();
  const rooms = new Map<string, Room>(); // by lower-case name
  const nicks = new Map<string, Client>(); // by lower-case nick
  const perIp = new Map<string, number>();
  const handlers = new Set<Promise<void>>();
  // TCP clients still being read or released, and who waits for the last of them to go.
  let reading = 0;
  let allRead: (() => void) | null = null;
  let dirty: Client[] = [];
  let gathering: ReturnType<typeof setTimeout> | undefined;
  let closing = false;
  // Sender pacing: clients more than paceBytes behind, and the wait of senders paused for them.
  const paceBytes = Math.max(1, Math.floor(sendq / 4));
  const congested = new Set<Client>();
  const spareBuffers: Uint8Array[] = [];
  let lastJoin: { parts: Uint8Array[]; bytes: Uint8Array } = { parts: [], bytes: new Uint8Array(0) };
  let roomFreed: Promise<void> | null = null;
  let releaseSenders: (() => void) | null = null;
  const bus = options.redis
    ? await startBus(options.redis, {
      onRoomLine(room, text) {
        const local = rooms.get(room.toLowerCase());
        if (local) broadcastExcept(local, null, encoder.encode(text + "\r\n"));
      },
      onWhisper(nick, text) {
        const to = nicks.get(nick.toLowerCase());
        if (to) tell(to, text);
      },
      locals: () => [...clients].map(presenceOf),
      say: (text) => record(text, { event: "redis", text }),
    })
    : null;
  const lobby = openRoom(LOBBY);
  bus?.watch(LOBBY); // always: then a lobby line from another instance never beats the subscription

  const greeting = encoder.encode(GREETING);
  const tooLong = encoder.encode(`Your line was over ${maxLine} bytes; the rest of it was discarded\r\n`);

  // --- Sending ---------------------------------------------------------------------------------

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
    if (!client.dirty && !client.flushing) markDirty(client);
  }

  // Puts a client on the list to flush at the end of this turn (or of the gathering window).
  function markDirty(client: Client): void {
    client.dirty = true;
    if (dirty.push(client) === 1 && gathering === undefined) queueMicrotask(flushDirtyClients);
  }

  // Sends one line of text to one client.
  function tell(client: Client, text: string): void {
    send(client, encoder.encode(text + "\r\n"));
  }

  // Sends bytes to every member of a room but `sender`.
  function broadcastExcept(room: Room, sender: Client | null, message: Uint8Array): void {
    for (const client of room.members) if (client !== sender) send(client, message);
  }

  // Announces a join or leave to a room, unless the room, counting the one coming or going, is
  // over the announcement limit; logs it either way.
  function announce(
    room: Room,
    sender: Client | null,
    text: string,
    event: Record<string, unknown>,
    size = room.members.size,
  ): void {
    if (size <= announceLimit) broadcastExcept(room, sender, encoder.encode(text + "\r\n"));
    bus?.publish(room.name, text);
    record(text, event);
  }

  // Writes an event to the log: the text as the tutorial prints it, or one JSON object.
  function record(text: string, event: Record<string, unknown>): void {
    if (json) log.text(JSON.stringify({ time: new Date().toISOString(), ...event }));
    else log.text(text);
  }

  // Starts a flush for every client that had bytes queued during this turn. When that is a
  // great many clients, it first waits GATHER_MS for more lines, so that each client gets them
  // in one write: at 1,000 clients a line is 1,000 writes, and the writes are what cost.
  function flushDirtyClients(): void {
    if (gathering === undefined && dirty.length >= GATHER_FANOUT && !closing) {
      gathering = setTimeout(flushDirtyClients, GATHER_MS);
      return;
    }
    clearTimeout(gathering);
    gathering = undefined;
    const batch = dirty;
    dirty = [];
    const now = Date.now();
    for (const client of batch) {
      client.dirty = false;
      if (!client.closed && !client.flushing) {
        client.lastWrite = now;
        startWrite(client);
      }
    }
  }

  // Starts one write of everything queued for a client; what is queued meanwhile waits for the
  // next round. The common case (one line, or a few) is one write op and two callbacks made
  // once per client: at 150,000 deliveries a second, every promise saved shows.
  function startWrite(client: Client): void {
    const parts = client.queue;
    client.flushing = true;
    if (parts.length > 1 && client.queued > SMALL_BATCH) {
      client.queue = [];
      writeBigBatch(client, parts);
      return;
    }
    const bytes = parts.length === 1 ? parts[0] : joined(parts, client.queued);
    parts.length = 0;
    client.inflight = bytes;
    client.conn.write(bytes).then(client.wrote, client.failed);
  }

  // Joins a client's queued lines into one buffer. The members of a room usually have the very
  // same lines queued, so the last join is kept and shared: a round of 10,000 writes then costs
  // one copy, not 10,000 (nothing writes into a buffer once it is queued).
  function joined(parts: Uint8Array[], total: number): Uint8Array {
    let same = parts.length === lastJoin.parts.length;
    for (let i = 0; same && i < parts.length; i++) same = parts[i] === lastJoin.parts[i];
    if (!same) lastJoin = { parts: parts.slice(), bytes: concatBytes(parts, total) };
    return lastJoin.bytes;
  }

  // The end of one write op: finish a partial write, or end this flush.
  function afterWrite(client: Client, n: number): void {
    const bytes = client.inflight!;
    noteWritten(client, n);
    if (n < bytes.length && !client.closed) {
      client.inflight = bytes.subarray(n);
      client.conn.write(client.inflight).then(client.wrote, client.failed);
      return;
    }
    client.inflight = null;
    endFlush(client);
  }

  function writeFailed(client: Client, e: unknown): void {
    client.inflight = null;
    dropClient(client, isDisconnect(e) ? null : `write failed: ${e}`);
    endFlush(client);
  }

  // A flush is over: queue the client for the next round if more came, or wake who waits.
  function endFlush(client: Client): void {
    client.flushing = false;
    if (client.queue.length > 0 && !client.closed) markDirty(client);
    else if (client.drainWaiters) {
      for (const resolve of client.drainWaiters.splice(0)) resolve();
    }
  }

  // Writes a big batch (a slow reader catching up) through a pooled 64 KiB buffer, so that a
  // busy client makes no garbage and an idle one holds none.
  async function writeBigBatch(client: Client, parts: Uint8Array[]): Promise<void> {
    const scratch = spareBuffers.pop() ?? new Uint8Array(WRITE_SIZE);
    try {
      await writeCoalesced(client.conn, parts, scratch, (n) => noteWritten(client, n));
    } catch (e) {
      dropClient(client, isDisconnect(e) ? null : `write failed: ${e}`);
    } finally {
      if (spareBuffers.length < SPARE_BUFFERS) spareBuffers.push(scratch);
      endFlush(client);
    }
  }

  // Resolves when everything queued for a client has been written, or it has gone.
  function drained(client: Client): Promise<void> {
    if (!client.flushing && (client.queue.length === 0 || client.closed)) return Promise.resolve();
    return new Promise((resolve) => (client.drainWaiters ??= []).push(resolve));
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
    if (reason) console.error(`Dropped ${client.address}: ${reason}`);
    try {
      client.conn.close();
    } catch (e) {
      if (!(e instanceof Deno.errors.BadResource)) throw e;
    }
  }

  // Tells a client why, lets the notice go out, and ends its connection.
  function sendOff(client: Client, notice: string, reason: string): void {
    if (client.leaving !== null) return;
    tell(client, notice);
    client.leaving = reason;
    // The handler stops reading after this chunk of input. An idle client sends nothing to wake
    // it, so close that one here, once the notice is out (the flush starts this same turn).
    if (reason === "idle") {
      queueMicrotask(async () => {
        await settleWithin(SHUTDOWN_GRACE_MS, [drained(client)]);
        dropClient(client, null);
      });
    }
  }

  // --- Rooms and names -------------------------------------------------------------------------

  function openRoom(name: string): Room {
    const key = name.toLowerCase();
    let room = rooms.get(key);
    if (!room) rooms.set(key, room = { name, members: new Set() });
    return room;
  }

  // Puts a client in a room, and logs when the room grows past the announcement limit.
  function enterRoom(client: Client, room: Room): void {
    client.room = room;
    room.members.add(client);
    if (bus) {
      if (room.members.size === 1) bus.watch(room.name);
      bus.present(presenceOf(client));
    }
    if (room.members.size === announceLimit + 1) {
      record(
        `Room ${room.name} has over ${announceLimit} members: joins and leaves are no longer announced`,
        {
          event: "quiet",
          room: room.name,
          members: room.members.size,
        },
      );
    }
  }

  // Takes a client out of its room, and forgets the room when it empties (the lobby stays).
  function leaveRoom(client: Client): void {
    const room = client.room;
    room.members.delete(client);
    if (bus && room.members.size === 0 && room !== lobby) bus.unwatch(room.name);
    if (room.members.size === announceLimit) {
      record(`Room ${room.name} has ${announceLimit} members again: joins and leaves are announced`, {
        event: "loud",
        room: room.name,
        members: room.members.size,
      });
    }
    if (room.members.size === 0 && room !== lobby) rooms.delete(room.name.toLowerCase());
  }

  function rename(client: Client, nick: string | null): void {
    if (client.nick !== null) {
      nicks.delete(client.nick.toLowerCase());
      if (nick === null || nick.toLowerCase() !== client.nick.toLowerCase()) bus?.releaseNick(client.nick);
    }
    client.nick = nick;
    if (nick !== null) nicks.set(nick.toLowerCase(), client);
    client.label = nick ?? client.address;
    client.prefix = null;
    bus?.present(presenceOf(client));
  }

  function presenceOf(client: Client): Presence {
    return { address: client.address, nick: client.nick, room: client.room.name };
  }

  // --- Lines and commands ------------------------------------------------------------------------

  // Relays one line to the client's room, prefixed with its name.
  function relay(client: Client, line: Uint8Array): void {
    const prefix = client.prefix ??= encoder.encode(`[${client.label}] `);
    const message = new Uint8Array(prefix.length + line.length + 2);
    message.set(prefix);
    message.set(line, prefix.length);
    message.set(CRLF, message.length - 2);
    broadcastExcept(client.room, client, message);
    bus?.publish(client.room.name, decoder.decode(message.subarray(0, message.length - 2)));
    if (json) {
      record("", { event: "line", room: client.room.name, from: client.label, text: decoder.decode(line) });
    } else log.bytes(message.subarray(0, message.length - 2));
  }

  // Takes one token from the client's bucket, or says it is flooding (and cuts it off at last).
  function withinRate(client: Client): boolean {
    const now = client.lastInput;
    client.tokens = Math.min(burst, client.tokens + (now - client.tokensAt) * rate / 10_000);
    client.tokensAt = now;
    if (client.tokens >= 1) {
      client.tokens -= 1;
      client.flooding = false;
      return true;
    }
    if (!client.flooding) {
      client.flooding = true;
      if (now - client.lastFlood > FLOOD_MEMORY_MS) client.floods = 0;
      client.lastFlood = now;
      if (++client.floods >= FLOOD_STRIKES) {
        sendOff(client, "Disconnected for flooding", "flooding");
      } else {
        tell(
          client,
          `You are sending more than ${rate} lines in 10 seconds; lines are dropped until you slow down ` +
            `(warning ${client.floods} of ${FLOOD_STRIKES - 1})`,
        );
      }
    }
    return false;
  }

  // Takes a line from a client, in order: behind a command still waiting on Redis, if any.
  function onLine(client: Client, line: Uint8Array, truncated: boolean): void {
    if (client.busy === null) {
      const pending = handleLine(client, line, truncated);
      if (pending) waitBehind(client, pending);
    } else {
      const copy = line.slice(); // the read buffer is reused
      waitBehind(client, client.busy.then(() => handleLine(client, copy, truncated)));
    }
  }

  function waitBehind(client: Client, pending: Promise<void>): void {
    const mine = client.busy = pending.catch((e) => console.error(`Error on ${client.address}: ${e}`));
    mine.finally(() => {
      if (client.busy === mine) client.busy = null;
    });
  }

  // Handles a line: a command, or chat for the room. A command that asks Redis returns a promise.
  function handleLine(client: Client, line: Uint8Array, truncated: boolean): void | Promise<void> {
    if (truncated) send(client, tooLong);
    if (client.leaving !== null || client.closed || isBlank(line)) return;
    if (rate > 0 && !withinRate(client)) return;
    if (line[0] === SLASH) {
      if (line[1] !== SLASH) return runCommand(client, decoder.decode(line));
      line = line.subarray(1); // "//text" says "/text"
    }
    relay(client, line);
  }

  const HELP_TEXT = [
    "Commands:",
    "  /nick NAME       take a name (1-32 characters, no spaces); others see it instead of your address",
    "  /who             who is in this room",
    "  /me ACTION       say what you are doing: * NAME ACTION",
    "  /msg NAME TEXT   a private message to one person",
    "  /join ROOM       leave this room for ROOM, making it if need be",
    "  /rooms           the rooms and how many are in each",
    "  /quit [REASON]   leave",
    "  /help            this list",
    "  //text           send a line that starts with /",
  ];

  // Runs a /command for a client.
  function runCommand(client: Client, line: string): void | Promise<void> {
    const match = /^\/(\S*)\s*(.*)$/.exec(line)!;
    const [command, rest] = [match[1].toLowerCase(), match[2].trim()];
    switch (command) {
      case "nick":
        return changeNick(client, rest);
      case "who":
        return bus ? listWhoEverywhere(client) : listWho(client, []);
      case "me":
        if (!rest) return tell(client, "Usage: /me ACTION");
        broadcastExcept(client.room, client, encoder.encode(`* ${client.label} ${rest}\r\n`));
        bus?.publish(client.room.name, `* ${client.label} ${rest}`);
        return record(`* ${client.label} ${rest}`, {
          event: "me",
          room: client.room.name,
          from: client.label,
          text: rest,
        });
      case "msg": {
        const m = /^(\S+)\s+(.+)$/.exec(rest);
        if (!m) return tell(client, "Usage: /msg NAME TEXT");
        const to = nicks.get(m[1].toLowerCase()) ?? [...clients].find((c) => c.address === m[1]);
        if ((!to || to.leaving !== null) && bus) return whisperAcross(client, m[1], m[2]);
        if (!to || to.leaving !== null) return tell(client, `No such user: ${m[1]}`);
        tell(to, `(private) [${client.label}] ${m[2]}`);
        tell(client, `(private to ${to.label}) ${m[2]}`);
        // The log says who wrote to whom, never what: private means private.
        return record(`${client.label} sent a private message to ${to.label}`, {
          event: "msg",
          from: client.label,
          to: to.label,
        });
      }
      case "join":
        return joinRoom(client, rest);
      case "rooms":
        return bus ? listRoomsEverywhere(client) : listRooms(client, []);
      case "quit":
        return sendOff(client, "Goodbye", rest);
      case "help":
        for (const text of HELP_TEXT) tell(client, text);
        return;
      default:
        return tell(client, `Unknown command /${match[1]}; try /help`);
    }
  }

  // /who: the members of the client's room, here and (`others`) on other instances.
  function listWho(client: Client, others: Presence[]): void {
    const room = client.room;
    const remote = others.filter((p) => p.room.toLowerCase() === room.name.toLowerCase());
    tell(client, `In ${room.name} (${room.members.size + remote.length}):`);
    const show = (p: { nick: string | null; address: string }) =>
      p.nick ? `${p.nick} (${p.address})` : p.address;
    for (const m of room.members) tell(client, `  ${show(m)}${m === client ? " (you)" : ""}`);
    for (const p of remote) tell(client, `  ${show(p)}`);
  }

  // /rooms: every room with members, here and (`others`) on other instances.
  function listRooms(client: Client, others: Presence[]): void {
    const counts = new Map<string, [string, number]>([[LOBBY, [LOBBY, 0]]]);
    const count = (name: string, n: number) => {
      const entry = counts.get(name.toLowerCase()) ?? [name, 0];
      counts.set(name.toLowerCase(), [entry[0], entry[1] + n]);
    };
    for (const r of rooms.values()) count(r.name, r.members.size);
    for (const p of others) count(p.room, 1);
    const list = [...counts.values()].filter(([name, n]) => n > 0 || name === LOBBY);
    tell(client, `Rooms (${list.length}):`);
    for (const [name, n] of list.sort((a, b) => a[0].localeCompare(b[0]))) {
      const here = name.toLowerCase() === client.room.name.toLowerCase() ? " (you are here)" : "";
      tell(client, `  ${name} ${n}${here}`);
    }
  }

  async function listWhoEverywhere(client: Client): Promise<void> {
    const others = await answerWithin(bus!.others(), null);
    listWho(client, others ?? []);
    if (others === null) tell(client, "(other servers cannot be asked right now)");
  }

  async function listRoomsEverywhere(client: Client): Promise<void> {
    const others = await answerWithin(bus!.others(), null);
    listRooms(client, others ?? []);
    if (others === null) tell(client, "(other servers cannot be asked right now)");
  }

  // /msg to someone on another instance.
  async function whisperAcross(client: Client, name: string, text: string): Promise<void> {
    if (!await answerWithin(bus!.whisper(name, `(private) [${client.label}] ${text}`), false)) {
      return tell(client, `No such user: ${name}`);
    }
    tell(client, `(private to ${name}) ${text}`);
    record(`${client.label} sent a private message to ${name}`, {
      event: "msg",
      from: client.label,
      to: name,
    });
  }

  function changeNick(client: Client, nick: string): void | Promise<void> {
    const problem = checkName(nick, "nick");
    if (problem) return tell(client, `${problem}; you are still ${client.label}`);
    const holder = nicks.get(nick.toLowerCase());
    if (holder && holder !== client) {
      return tell(client, `The nick ${nick} is taken; you are still ${client.label}`);
    }
    if (bus && !holder) {
      return answerWithin(bus.claimNick(nick), true).then((mine) => {
        if (client.closed || client.leaving !== null) return bus.releaseNick(nick);
        // Another of ours may have taken it while Redis answered.
        if (!mine || (nicks.get(nick.toLowerCase()) ?? client) !== client) {
          return tell(client, `The nick ${nick} is taken; you are still ${client.label}`);
        }
        takeNick(client, nick);
      });
    }
    takeNick(client, nick);
  }

  function takeNick(client: Client, nick: string): void {
    const old = client.label;
    rename(client, nick);
    tell(client, `You are now known as ${nick}`);
    broadcastExcept(client.room, client, encoder.encode(`${old} is now known as ${nick}\r\n`));
    bus?.publish(client.room.name, `${old} is now known as ${nick}`);
    record(`${old} is now known as ${nick}`, { event: "nick", peer: client.address, from: old, to: nick });
  }

  function joinRoom(client: Client, name: string): void {
    const problem = checkName(name, "room name");
    if (problem) return tell(client, `${problem}; you are still in ${client.room.name}`);
    const room = openRoom(name);
    if (room === client.room) return tell(client, `You are already in ${room.name}`);
    const old = client.room;
    leaveRoom(client);
    // Into the new room (and the directory) first: whoever hears of the move can then /who it.
    enterRoom(client, room);
    announce(old, client, `${client.label} has left ${old.name} for ${room.name}`, {
      event: "part",
      room: old.name,
      peer: client.address,
      nick: client.nick,
    }, old.members.size + 1);
    tell(client, `You are now in ${room.name} (${room.members.size}); /who lists who is here`);
    announce(room, client, `${client.label} has joined ${room.name}`, {
      event: "enter",
      room: room.name,
      peer: client.address,
      nick: client.nick,
    });
  }

  // --- Connections ---------------------------------------------------------------------------------

  // Why a new connection may not be served, or null if it may.
  function refusal(ip: string): string | null {
    const allowed = allow.length === 0 || allow.some((c) => cidrContains(c, ip));
    if (!allowed || deny.some((c) => cidrContains(c, ip))) {
      return `Sorry, connections from ${ip} are not allowed`;
    }
    if (clients.size >= maxClients) {
      return `Sorry, the server is full (${maxClients} clients); try again later`;
    }
    if (maxPerIp > 0 && (perIp.get(ip) ?? 0) >= maxPerIp) {
      return `Sorry, too many connections from ${ip} (at most ${maxPerIp})`;
    }
    return null;
  }

  // Takes one TCP or TLS connection: refuses it, or admits it and reads it (see readLines).
  function serveClient(conn: Deno.Conn<Deno.NetAddr>): void {
    const address = formatPeer(conn.remoteAddr);
    const ip = plainHost(conn.remoteAddr.hostname);
    const refused = refusal(ip);
    if (refused) {
      console.error(`Refused ${address}: ${refused}`);
      track(refuse(conn, encoder.encode(refused + "\r\n")));
      return;
    }
    if ("setNoDelay" in conn) (conn as Deno.TcpConn).setNoDelay(true);
    if ("handshake" in conn) {
      track(
        handshake(conn as Deno.TlsConn, address).then((ok) => {
          if (ok) readLines(admit(conn, address, ip), conn);
        }),
      );
    } else {
      readLines(admit(conn, address, ip), conn);
    }
  }

  // Makes a connection a client: counts it, greets it, and puts it in the lobby.
  function admit(conn: Link, address: string, ip: string): Client {
    const now = Date.now();
    const client: Client = {
      conn,
      address,
      ip,
      nick: null,
      label: address,
      prefix: null, // most clients only listen
      room: lobby,
      queue: [],
      queued: 0,
      lastWrite: 0,
      flushing: false,
      inflight: null,
      wrote: (n) => afterWrite(client, n),
      failed: (e) => writeFailed(client, e),
      drainWaiters: null,
      dirty: false,
      closed: false,
      lastInput: now,
      tokens: burst,
      tokensAt: now,
      flooding: false,
      floods: 0,
      lastFlood: 0,
      leaving: null,
      busy: null,
    };
    clients.add(client);
    perIp.set(ip, (perIp.get(ip) ?? 0) + 1);
    enterRoom(client, lobby);
    send(client, greeting);
    announce(lobby, client, `Client joined ${address}`, { event: "join", room: lobby.name, peer: address });
    return client;
  }

  // Undoes admit(): the room hears the leave, a goodbye is written out, the connection closes.
  async function release(client: Client): Promise<void> {
    clients.delete(client);
    const left = (perIp.get(client.ip) ?? 1) - 1;
    if (left > 0) perIp.set(client.ip, left);
    else perIp.delete(client.ip);
    const room = client.room;
    leaveRoom(client);
    if (client.nick !== null) {
      nicks.delete(client.nick.toLowerCase());
      bus?.releaseNick(client.nick);
    }
    bus?.absent(client.address);
    if (!closing) {
      const why = client.leaving ? ` (${client.leaving})` : "";
      announce(room, client, `Client left ${client.label}${why}`, {
        event: "leave",
        room: room.name,
        peer: client.address,
        nick: client.nick,
        reason: client.leaving || null,
      }, room.members.size + 1);
    }
    if (client.leaving !== null) await settleWithin(SHUTDOWN_GRACE_MS, [drained(client)]);
    dropClient(client, null);
  }

  // Reads a client's bytes until it goes or is sent off, handling each line, then releases it.
  // It is a chain of callbacks rather than a loop in an async function: an idle client then
  // holds one pending read and little else, and at 10,000 clients that is what they cost.
  function readLines(client: Client, conn: Deno.Conn): void {
    reading++;
    const framer = new LineFramer(maxLine, (line, truncated) => onLine(client, line, truncated));
    // Start small: most clients send a line now and then, and each holds its buffer while it
    // waits. One that fills it gets a bigger one, up to READ_SIZE.
    let buffer = new Uint8Array(FIRST_READ_SIZE);
    const next = (): void => {
      if (client.closed || client.leaving !== null) finish(null);
      else if (congested.size > 0) waitForRoom().then(read, finish);
      else read();
    };
    const read = (): void => {
      if (client.busy) client.busy.then(next, finish); // a command waits on Redis: read no further
      else conn.read(buffer).then(got, finish);
    };
    const got = (n: number | null): void => {
      if (n === null) return finish(null);
      try {
        client.lastInput = Date.now();
        framer.push(buffer.subarray(0, n));
        if (n === buffer.length && n < READ_SIZE) buffer = new Uint8Array(2 * n);
      } catch (e) {
        return finish(e);
      }
      next();
    };
    const finish = (e: unknown): void => {
      if (e !== null && !isDisconnect(e)) {
        console.error(`Error on ${client.address}: ${e instanceof Error ? e.stack : e}`);
      }
      release(client).catch((e) => console.error(`Error on ${client.address}: ${e}`)).finally(() => {
        if (--reading === 0) allRead?.();
      });
    };
    next();
  }

  // Runs a task that outlives this turn (a refusal, a handshake, a WebSocket); close() waits for
  // it. A fault in one is logged, and touches no other.
  function track(task: Promise<void>): void {
    const settled = task.catch((e) => console.error(`Error: ${e instanceof Error ? e.stack : e}`));
    handlers.add(settled);
    settled.finally(() => handlers.delete(settled));
  }

  // Accepts connections until the listener closes.
  async function acceptLoop(): Promise<void> {
    while (!closing) {
      let conn: Deno.Conn<Deno.NetAddr>;
      try {
        conn = await listener.accept();
      } catch (e) {
        if (closing) return;
        // Out of file descriptors and the like: say so, breathe, and keep serving who is here.
        console.error(`accept failed: ${e instanceof Error ? e.message : e}`);
        await new Promise((r) => setTimeout(r, 100));
        continue;
      }
      serveClient(conn);
    }
  }

  // --- The web page and its WebSocket --------------------------------------------------------------

  // Serves GET / (the page) and GET /ws (a WebSocket client, admitted like any other).
  function handleHttp(request: Request, info: Deno.ServeHandlerInfo<Deno.NetAddr>): Response {
    const url = new URL(request.url);
    if (url.pathname === "/" && (request.method === "GET" || request.method === "HEAD")) {
      return new Response(PAGE, {
        headers: { "content-type": "text/html; charset=utf-8", "cache-control": "no-store" },
      });
    }
    if (url.pathname !== "/ws") return new Response("Not found\n", { status: 404 });
    if (request.headers.get("upgrade")?.toLowerCase() !== "websocket") {
      return new Response("This is the chat's WebSocket: open / in a browser\n", { status: 426 });
    }
    const address = formatPeer(info.remoteAddr); // before the upgrade: afterwards it throws
    const origin = request.headers.get("origin");
    if (origin !== null && !originAllowed(origin, request.headers.get("host"))) {
      console.error(`Refused ${address}: WebSocket from another site (${origin})`);
      return new Response("Cross-origin WebSocket refused\n", { status: 403 });
    }
    const ip = plainHost(info.remoteAddr.hostname);
    const refused = refusal(ip);
    if (refused) {
      console.error(`Refused ${address}: ${refused}`);
      return new Response(refused + "\n", { status: 403 });
    }
    const { socket, response } = Deno.upgradeWebSocket(request);
    track(serveWebSocket(socket, address, ip));
    return response;
  }

  // Same-origin pages may always connect; others only if --http-origin names them.
  function originAllowed(origin: string, host: string | null): boolean {
    const allowed = options.http?.origins ?? [];
    if (allowed.includes("*") || allowed.includes(origin)) return true;
    try {
      return new URL(origin).host === host;
    } catch {
      return false; // "null" or garbage
    }
  }

  // Owns one WebSocket client: each text message is one or more lines, as if typed in telnet.
  function serveWebSocket(ws: WebSocket, address: string, ip: string): Promise<void> {
    return new Promise((resolve) => {
      let client: Client | null = null, released = false;
      let framer: LineFramer | null = null;
      const finish = () => {
        if (released) return;
        released = true;
        if (client) release(client).finally(resolve);
        else resolve();
      };
      ws.onopen = () => {
        const c = client = admit(webSocketLink(ws, sendq), address, ip);
        framer = new LineFramer(maxLine, (line, truncated) => onLine(c, line, truncated));
      };
      ws.onmessage = (event) => {
        if (!client || !framer || client.leaving !== null) return;
        client.lastInput = Date.now();
        const data = typeof event.data === "string" ? encoder.encode(event.data) : new Uint8Array(event.data);
        framer.push(data);
        framer.push(LF); // a message is a line, whether or not it ends in one
        if (client.leaving !== null) finish(); // /quit or a flood: say goodbye and close
      };
      ws.onclose = finish;
      ws.onerror = () => {}; // onclose follows
    });
  }

  let httpServer: Deno.HttpServer<Deno.NetAddr> | null = null;
  if (options.http) {
    const serve = (hostname: string) =>
      Deno.serve({ hostname, port: options.http!.port, onListen() {} }, handleHttp);
    const httpHost = options.http.host ?? options.host;
    try {
      httpServer = serve(httpHost ?? "::");
    } catch (e) {
      if (httpHost !== undefined || e instanceof Deno.errors.AddrInUse) {
        listener.close();
        throw new WebListenError(options.http.port, httpHost, e);
      }
      httpServer = serve("0.0.0.0"); // a host without IPv6
    }
  }

  // Sends off clients that have said nothing for `idle` seconds.
  const idleMs = (options.idle ?? 0) * 1000;
  const idleSweep = idleMs > 0
    ? setInterval(() => {
      const now = Date.now();
      for (const client of clients) {
        if (now - client.lastInput >= idleMs) {
          sendOff(client, `Closing: nothing from you for ${options.idle} seconds`, "idle");
        }
      }
    }, Math.max(50, Math.min(1000, idleMs / 4)))
    : undefined;

  const finished = acceptLoop().then(async () => {
    await Promise.all(handlers);
    if (reading > 0) await new Promise<void>((resolve) => allRead = resolve);
    await httpServer?.finished;
    await log.flushed();
  });

  async function close(): Promise<void> {
    if (!closing) {
      closing = true;
      clearInterval(idleSweep);
      listener.close();
      const stopping = httpServer?.shutdown(); // stops taking requests; WebSockets close below
      const notice = encoder.encode(SHUTDOWN_NOTICE);
      for (const client of clients) send(client, notice);
      flushDirtyClients(); // no gathering once closing
      await settleWithin(
        SHUTDOWN_GRACE_MS,
        [...clients].map(drained),
      );
      for (const client of clients) dropClient(client, null);
      await stopping;
      await bus?.close();
    }
    await finished;
  }

  return {
    addr: listener.addr,
    httpAddr: httpServer?.addr ?? null,
    redisReady: bus?.ready ?? null,
    close,
    finished,
  };
}

/** The web page's port could not be listened on (the chat port itself was fine). */
export class WebListenError extends Error {
  constructor(readonly port: number, readonly host: string | undefined, override readonly cause: unknown) {
    super(
      `cannot serve the web page on ${host ?? "all interfaces"}, port ${port}: ${
        cause instanceof Deno.errors.AddrInUse ? "the port is already in use" : (cause as Error).message
      }`,
    );
  }
}

/**
 * A WebSocket as a client connection: each line written becomes one text message, without its
 * CRLF. The browser's own buffer stands in for the send queue: past `sendq` bytes, the client is
 * as stuck as a telnet user who stopped reading, and is cut off the same way.
 */
function webSocketLink(ws: WebSocket, sendq: number): Link {
  return {
    write(bytes) {
      if (ws.readyState !== WebSocket.OPEN) {
        return Promise.reject(new Deno.errors.BrokenPipe("WebSocket closed"));
      }
      if (ws.bufferedAmount > sendq) return Promise.reject(new Error(`WebSocket buffer over ${sendq} bytes`));
      for (const line of decoder.decode(bytes).split("\r\n")) if (line) ws.send(line);
      return Promise.resolve(bytes.length);
    },
    close() {
      if (ws.readyState === WebSocket.OPEN || ws.readyState === WebSocket.CONNECTING) ws.close();
    },
  };
}

/** Listens on `host`, or by default on all interfaces: IPv6 and IPv4, or IPv4 alone. */
function listenDualStack(
  host: string | undefined,
  port: number,
  tls?: { cert: string; key: string },
): Deno.Listener<Deno.Conn<Deno.NetAddr>, Deno.NetAddr> {
  const listen = (hostname: string) =>
    tls
      ? Deno.listenTls({ hostname, port, tcpBacklog: TCP_BACKLOG, ...tls })
      : Deno.listen({ hostname, port, tcpBacklog: TCP_BACKLOG });
  if (host !== undefined) return listen(host);
  try {
    return listen("::");
  } catch (e) {
    if (e instanceof Deno.errors.AddrInUse || e instanceof Deno.errors.PermissionDenied) throw e;
    return listen("0.0.0.0"); // a host without IPv6
  }
}

/**
 * Completes a TLS handshake before the client joins, so that a failed one (a plain-text client
 * on the TLS port, a bad certificate) is one line in the log and never a join in the room.
 */
async function handshake(conn: Deno.TlsConn, address: string): Promise<boolean> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  try {
    const timeout = new Promise<never>((_, reject) => {
      timer = setTimeout(() => reject(new Error("no handshake within 10 s")), 10_000);
    });
    await Promise.race([conn.handshake(), timeout]);
    return true;
  } catch (e) {
    console.error(`TLS handshake with ${address} failed: ${e instanceof Error ? e.message : e}`);
    conn.close();
    return false;
  } finally {
    clearTimeout(timer);
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

/** Resolves after `ms` milliseconds, without holding the process open. */
function delay(ms: number): Promise<void> {
  return new Promise((resolve) => Deno.unrefTimer(setTimeout(resolve, ms)));
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

/** Why `name` cannot be a nick or room name, or null if it can. */
export function checkName(name: string, what: string): string | null {
  const length = [...name].length;
  if (length < 1 || length > MAX_NAME) return `A ${what} has 1 to ${MAX_NAME} characters`;
  // Spaces would split commands; ':' and brackets would let a name pass for an address.
  if (/[\s:[\]\p{Cc}]/u.test(name)) return `A ${what} has no spaces, ':' or brackets`;
  return null;
}

/** An IPv4-mapped IPv6 address as plain IPv4; anything else as it is. */
function plainHost(hostname: string): string {
  return hostname.startsWith("::ffff:") && hostname.includes(".") ? hostname.slice(7) : hostname;
}

// --- CIDR blocks, for --allow and --deny

/** A network: its address bytes (4 for IPv4, 16 for IPv6) and how many leading bits count. */
interface Cidr {
  bytes: Uint8Array;
  bits: number;
}

/** Parses `a.b.c.d/n`, `v6addr/n`, or a bare address (a block of one). */
export function parseCidr(text: string): Cidr {
  const [address, bitsText] = text.split("/");
  const bytes = parseIp(address);
  const max = bytes ? bytes.length * 8 : 0;
  const bits = bitsText === undefined ? max : Number(bitsText);
  if (!bytes || !/^\d*$/.test(bitsText ?? "") || !(bits >= 0 && bits <= max)) {
    throw new RangeError(`"${text}" is not an address or a CIDR block like 192.168.0.0/16 or fd00::/8`);
  }
  return { bytes, bits };
}

/** True if `ip` is inside the block. IPv4 and IPv6 never match each other. */
export function cidrContains(cidr: Cidr, ip: string): boolean {
  const bytes = parseIp(ip);
  if (!bytes || bytes.length !== cidr.bytes.length) return false;
  for (let bit = 0; bit < cidr.bits; bit += 8) {
    const mask = cidr.bits - bit >= 8 ? 0xff : (0xff << (8 - (cidr.bits - bit))) & 0xff;
    if ((bytes[bit / 8] & mask) !== (cidr.bytes[bit / 8] & mask)) return false;
  }
  return true;
}

/** The bytes of an IPv4 or IPv6 address, or null if it is neither. */
function parseIp(text: string): Uint8Array | null {
  const v4 = /^(\d{1,3})\.(\d{1,3})\.(\d{1,3})\.(\d{1,3})$/.exec(text);
  if (v4) {
    const parts = v4.slice(1).map(Number);
    return parts.every((p) => p <= 255) ? new Uint8Array(parts) : null;
  }
  if (!text.includes(":") || !/^[0-9a-fA-F:]+$/.test(text)) return null;
  const halves = text.split("::");
  if (halves.length > 2) return null;
  const words = (half: string) => half ? half.split(":") : [];
  const head = words(halves[0]), tail = halves.length === 2 ? words(halves[1]) : [];
  const fill = 8 - head.length - tail.length;
  if ((halves.length === 2 ? fill < 1 : fill !== 0)) return null;
  const all = [...head, ...Array(halves.length === 2 ? fill : 0).fill("0"), ...tail];
  if (all.some((w) => !/^[0-9a-fA-F]{1,4}$/.test(w))) return null;
  const out = new Uint8Array(16);
  all.forEach((w, i) => {
    const n = parseInt(w, 16);
    out[2 * i] = n >> 8;
    out[2 * i + 1] = n & 0xff;
  });
  return out;
}

// ---------------------------------------------------------------------------------------------
// The bus between instances (--redis)
//
// Several chat_server.ts instances behind one TCP load balancer share their rooms through Redis,
// as Socket.IO's Redis adapter and Phoenix.PubSub do. Each room is a channel; each instance
// subscribes only to the rooms it has members in, and ignores its own messages (they carry its
// id). Who is where lives in Redis too: a hash per instance, and a key per nick, all with an
// expiry that a heartbeat renews, so that the members of a crashed instance vanish by themselves.
// If Redis goes away, local chat goes on; the client reconnects with backoff, and the instance
// writes its presence and nicks back when Redis returns.

/** How long a command waits for Redis before it goes on without it. */
const REDIS_ANSWER_MS = 2000;

/**
 * Redis's answer, or `fallback` if it has not come within REDIS_ANSWER_MS: a Redis that is up
 * but stuck must not leave a client waiting on its command for ever.
 */
function answerWithin<T>(answer: Promise<T>, fallback: T): Promise<T> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  const late = new Promise<T>((resolve) => timer = setTimeout(() => resolve(fallback), REDIS_ANSWER_MS));
  return Promise.race([answer, late]).finally(() => clearTimeout(timer));
}

/** One member, as the directory knows it. */
interface Presence {
  address: string;
  nick: string | null;
  room: string;
}

/** The bus, as the server uses it. Calls made while Redis is away are dropped, not queued. */
interface Bus {
  readonly instance: string;
  /** Sends a line (without CRLF) to the other instances' members of a room. */
  publish(room: string, text: string): void;
  /** Delivers a private line to a nick on another instance; false if nobody has that nick. */
  whisper(nick: string, text: string): Promise<boolean>;
  /** Takes a nick across all instances; false if another instance's client has it. */
  claimNick(nick: string): Promise<boolean>;
  releaseNick(nick: string): void;
  /** Records where a local client is, or that it is gone. */
  present(who: Presence): void;
  absent(address: string): void;
  /** Subscribes to a room's channel while it has local members. */
  watch(room: string): void;
  unwatch(room: string): void;
  /** Every member on the other instances; null while Redis is away. */
  others(): Promise<Presence[] | null>;
  close(): Promise<void>;
}

/** What the bus needs from the server. */
interface BusHandlers {
  /** A line for a room, from another instance. */
  onRoomLine(room: string, text: string): void;
  /** A private line for a local nick, from another instance. */
  onWhisper(nick: string, text: string): void;
  /** Everyone local, to write back to Redis after it returns. */
  locals(): Presence[];
  /** A line for the operator's log. */
  say(text: string): void;
}

/** Options for the bus. */
export interface RedisOptions {
  /** `redis://HOST:PORT[/DB]`. */
  url: string;
  /** Prefix of every key and channel. Default `chat`. */
  prefix?: string;
  /** Seconds after which a crashed instance's members leave the directory. Default 30. */
  expiry?: number;
}

/**
 * Connects the bus. Resolves at once: `ready` settles when Redis first answers, and until then
 * (and whenever Redis is away) the server runs on its own.
 */
async function startBus(
  options: RedisOptions,
  handlers: BusHandlers,
): Promise<Bus & { ready: Promise<void> }> {
  const { createClient } = await import("redis"); // loaded only with --redis: no network needed without
  const prefix = options.prefix ?? "chat";
  const expiry = options.expiry ?? 30;
  const instance = crypto.randomUUID().slice(0, 12);
  const roomChannel = (room: string) => `${prefix}:room:${room.toLowerCase()}`;
  const instanceChannel = `${prefix}:instance:${instance}`;
  const presenceKey = (id: string) => `${prefix}:presence:${id}`;
  const nickKey = (nick: string) => `${prefix}:nick:${nick.toLowerCase()}`;
  const instancesKey = `${prefix}:instances`;
  const socket = {
    reconnectStrategy: (tries: number) => Math.min(100 * 2 ** tries, 3000),
    connectTimeout: 2000,
  };
  const pub = createClient({ url: options.url, disableOfflineQueue: true, socket });
  const sub = pub.duplicate();
  const watched = new Set<string>();
  const myNicks = new Set<string>(); // lower-case
  let up = false, everUp = false, closed = false;

  // Errors come once per failed attempt; the operator hears of a loss once, and of the recovery.
  // (Before Redis has ever answered, the caller reports that, once.)
  pub.on("error", (e: Error) => {
    if (up) handlers.say(`Redis unavailable (${e.message}): local chat goes on; reconnecting`);
    up = false;
  });
  sub.on("error", () => {}); // reported through pub, which shares its fate
  pub.on("ready", () => {
    up = true;
    if (everUp) handlers.say("Redis is back: rooms are shared again");
    everUp = true;
    restore().catch(() => {});
  });

  // Each message is JSON: the sending instance, and a line for a room or a nick.
  const onMessage = (raw: string) => {
    let m: { i: string; room?: string; nick?: string; text: string };
    try {
      m = JSON.parse(raw);
    } catch {
      return; // not ours
    }
    if (m.i === instance || typeof m.text !== "string") return;
    if (m.room !== undefined) handlers.onRoomLine(m.room, m.text);
    else if (m.nick !== undefined) handlers.onWhisper(m.nick, m.text);
  };

  // Writes this instance's presence and nicks back, and renews their expiry (the heartbeat).
  async function restore(): Promise<void> {
    if (!up || closed) return;
    const multi = pub.multi();
    multi.del(presenceKey(instance));
    for (const p of handlers.locals()) multi.hSet(presenceKey(instance), p.address, JSON.stringify(p));
    multi.expire(presenceKey(instance), expiry);
    multi.zAdd(instancesKey, { score: Date.now(), value: instance });
    for (const nick of myNicks) multi.set(nickKey(nick), instance, { EX: expiry });
    await multi.exec();
  }

  const ignore = () => {};
  const heartbeat = setInterval(() => {
    if (!up) return;
    const multi = pub.multi();
    multi.expire(presenceKey(instance), expiry);
    multi.zAdd(instancesKey, { score: Date.now(), value: instance });
    for (const nick of myNicks) multi.expire(nickKey(nick), expiry);
    multi.exec().catch(ignore);
  }, Math.max(200, expiry * 1000 / 3));

  const connecting = Promise.all([pub.connect(), sub.connect()]);
  connecting.catch(ignore);
  const ready = connecting.then(async () => {
    await sub.subscribe(instanceChannel, onMessage);
    for (const room of watched) await sub.subscribe(roomChannel(room), onMessage);
  });
  ready.catch(ignore);

  return {
    instance,
    ready,
    publish(room, text) {
      if (up) pub.publish(roomChannel(room), JSON.stringify({ i: instance, room, text })).catch(ignore);
    },
    async whisper(nick, text) {
      if (!up) return false;
      const owner = await pub.get(nickKey(nick)).catch(() => null);
      if (!owner || owner === instance) return false;
      const heard = await pub.publish(
        `${prefix}:instance:${owner}`,
        JSON.stringify({ i: instance, nick, text }),
      )
        .catch(() => 0);
      return heard > 0;
    },
    async claimNick(nick) {
      const lower = nick.toLowerCase();
      if (!up) {
        myNicks.add(lower); // written to Redis when it returns; a clash then is resolved by its owner
        return true;
      }
      try {
        const got = await pub.set(nickKey(nick), instance, { NX: true, EX: expiry });
        if (got === null && await pub.get(nickKey(nick)) !== instance) return false;
      } catch {
        // Redis went away mid-claim: local uniqueness still holds
      }
      myNicks.add(lower);
      return true;
    },
    releaseNick(nick) {
      const lower = nick.toLowerCase();
      if (!myNicks.delete(lower) || !up) return;
      // Delete only our own claim: a key that expired and was taken by another instance stays.
      pub.get(nickKey(nick)).then((owner) => owner === instance ? pub.del(nickKey(nick)) : 0).catch(ignore);
    },
    present(who) {
      if (up) pub.hSet(presenceKey(instance), who.address, JSON.stringify(who)).catch(ignore);
    },
    absent(address) {
      if (up) pub.hDel(presenceKey(instance), address).catch(ignore);
    },
    watch(room) {
      const key = room.toLowerCase();
      if (watched.has(key)) return;
      watched.add(key);
      if (sub.isReady) sub.subscribe(roomChannel(key), onMessage).catch(ignore);
    },
    unwatch(room) {
      const key = room.toLowerCase();
      if (!watched.delete(key)) return;
      if (sub.isReady) sub.unsubscribe(roomChannel(key)).catch(ignore);
    },
    async others() {
      if (!up) return null;
      try {
        const alive = await pub.zRangeByScore(instancesKey, Date.now() - expiry * 1000, "+inf");
        const found: Presence[] = [];
        for (const id of alive) {
          if (id === instance) continue;
          for (const value of Object.values(await pub.hGetAll(presenceKey(id)))) {
            found.push(JSON.parse(value));
          }
        }
        return found;
      } catch {
        return null;
      }
    },
    async close() {
      closed = true;
      clearInterval(heartbeat);
      if (up) {
        const multi = pub.multi();
        multi.del(presenceKey(instance));
        multi.zRem(instancesKey, instance);
        for (const nick of myNicks) multi.del(nickKey(nick));
        await answerWithin(multi.exec().then(ignore, ignore), undefined); // a stuck Redis must not stall shutdown
      }
      for (const client of [sub, pub]) client.destroy();
    },
  };
}

// ---------------------------------------------------------------------------------------------
// The web page (--http): one self-contained HTML file, its CSS and JS inline. It speaks the same
// lines as telnet over a WebSocket; it asks /who quietly to keep its member list, and it puts
// everything that came from other people into the page as text, never as HTML.

const PAGE = `<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Deno chat</title>
<style>
  :root { color-scheme: light dark; --bg: #fdfdfc; --fg: #1b1b1b; --muted: #6b6b6b; --line: #8883; --me: #0b6e4f; }
  @media (prefers-color-scheme: dark) { :root { --bg: #151515; --fg: #e8e8e8; --muted: #9a9a9a; --me: #5fd3a5; } }
  * { box-sizing: border-box; }
  body { margin: 0; height: 100dvh; display: flex; flex-direction: column; background: var(--bg); color: var(--fg);
         font: 16px/1.4 system-ui, sans-serif; }
  header { display: flex; gap: 1rem; align-items: baseline; padding: .5rem 1rem; border-bottom: 1px solid var(--line); }
  header h1 { font-size: 1rem; margin: 0; }
  #status { margin-left: auto; color: var(--muted); font-size: .85rem; }
  main { flex: 1; display: flex; min-height: 0; }
  #log { flex: 1; overflow-y: auto; margin: 0; padding: .5rem 1rem; list-style: none; word-wrap: break-word; }
  #log li { margin: .1rem 0; }
  #members { width: 13rem; overflow-y: auto; border-left: 1px solid var(--line); padding: .5rem 1rem; }
  #members ul { list-style: none; padding: 0; margin: .25rem 0; }
  @media (max-width: 640px) { #members { display: none; } }
  time { color: var(--muted); font-size: .8rem; margin-right: .5rem; font-variant-numeric: tabular-nums; }
  .from { font-weight: 600; margin-right: .4rem; }
  .mine .from { color: var(--me); }
  .notice { color: var(--muted); font-style: italic; }
  .private { background: #fc03; }
  form { display: flex; border-top: 1px solid var(--line); }
  input { flex: 1; font: inherit; padding: .8rem 1rem; border: 0; background: transparent; color: inherit; }
  input:focus { outline: 2px solid var(--me); outline-offset: -2px; }
</style>
</head>
<body>
<header><h1>Deno chat</h1><span>room <strong id="room">lobby</strong> <span id="count"></span></span><span id="status">connecting…</span></header>
<main>
  <ul id="log" aria-live="polite"></ul>
  <aside id="members"><strong>In this room</strong><ul id="memberlist"></ul></aside>
</main>
<form id="form"><input id="input" autocomplete="off" enterkeyhint="send" placeholder="Say something, or /help" autofocus></form>
<script>
"use strict";
const log = document.getElementById("log"), input = document.getElementById("input");
const roomEl = document.getElementById("room"), statusEl = document.getElementById("status");
const memberList = document.getElementById("memberlist"), countEl = document.getElementById("count");
let ws = null, backoff = 500, quietWho = 0, whoLeft = 0, members = [];

function show(kind, from, text) {
  const li = document.createElement("li");
  li.className = kind;
  const time = document.createElement("time");
  time.textContent = new Date().toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
  li.append(time);
  if (from !== null) {
    const who = document.createElement("span");
    who.className = "from";
    who.textContent = from;
    li.append(who);
  }
  li.append(document.createTextNode(text));
  const atEnd = log.scrollTop + log.clientHeight >= log.scrollHeight - 8;
  log.append(li);
  if (atEnd) log.scrollTop = log.scrollHeight;
}

function askWho() {
  if (ws && ws.readyState === WebSocket.OPEN) { quietWho++; ws.send("/who"); }
}

function showMembers() {
  countEl.textContent = "(" + members.length + " here)"; // the list itself is hidden on a phone
  countEl.title = members.join(", ");
  memberList.replaceChildren(...members.map((m) => {
    const li = document.createElement("li");
    li.textContent = m;
    return li;
  }));
}

function receive(line) {
  let m;
  if (quietWho > 0 && (m = /^In (\\S+) \\((\\d+)\\):$/.exec(line))) {
    quietWho--; whoLeft = Number(m[2]); members = []; roomEl.textContent = m[1];
    if (whoLeft === 0) showMembers();
    return;
  }
  if (whoLeft > 0) {
    members.push(line.trim().replace(/ \\(you\\)$/, " (you)"));
    if (--whoLeft === 0) showMembers();
    return;
  }
  if ((m = /^You are now in (\\S+) /.exec(line))) roomEl.textContent = m[1];
  if (/^(Client joined|Client left|You are now)|( has joined | has left | is now known as )/.test(line)) askWho();
  if ((m = /^\\[([^\\]]+)\\] (.*)$/.exec(line))) return show("line", m[1], m[2]);
  if ((m = /^\\(private\\) \\[([^\\]]+)\\] (.*)$/.exec(line))) return show("line private", m[1] + " (private)", m[2]);
  show("notice", null, line);
}

function connect() {
  const url = (location.protocol === "https:" ? "wss://" : "ws://") + location.host + "/ws";
  ws = new WebSocket(url);
  ws.onopen = () => { statusEl.textContent = "connected"; backoff = 500; quietWho = 0; whoLeft = 0; askWho(); };
  ws.onmessage = (event) => receive(String(event.data));
  ws.onclose = () => {
    statusEl.textContent = "reconnecting in " + Math.round(backoff / 1000) + " s…";
    setTimeout(connect, backoff);
    backoff = Math.min(backoff * 2, 10000);
  };
}

document.getElementById("form").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = input.value;
  if (!text.trim() || !ws || ws.readyState !== WebSocket.OPEN) return;
  ws.send(text);
  if (!text.startsWith("/") || text.startsWith("//")) show("line mine", "you", text.replace(/^\\//, ""));
  input.value = "";
});
connect();
</script>
</body>
</html>
`;

// ---------------------------------------------------------------------------------------------
// Command line

const USAGE = "usage: chat_server.ts [PORT] [--host HOST] [--max-clients N] [--max-per-ip N] [--idle S] " +
  "[--rate N] [--allow CIDR]... [--deny CIDR]... [--tls-cert FILE --tls-key FILE] [--log text|json] " +
  "[--http PORT [--http-host HOST] [--http-origin ORIGIN]...] [--redis URL [--redis-prefix P] [--redis-expiry S]] " +
  "[--help]";

const HELP = `${USAGE}

The tutorial's chat server: every line a client sends goes to everyone else in its room.

  PORT, --port PORT    port to listen on (default ${DEFAULT_PORT}; 0 picks a free one)
  --host HOST          interface to bind (default: all, IPv6 and IPv4)
  --max-line BYTES     longest line relayed (default ${DEFAULT_MAX_LINE})
  --sendq BYTES        send queue per client before it is cut off (default ${DEFAULT_SENDQ}; K and M work)
  --max-clients N      clients at once (default ${DEFAULT_MAX_CLIENTS})
  --max-per-ip N       clients at once from one address (default ${DEFAULT_MAX_PER_IP}: no limit)
  --idle SECONDS       close clients silent this long (default 0: never)
  --rate N             lines per 10 s per client, bursts of twice that; 0 is off (default ${DEFAULT_RATE})
  --announce-limit N   rooms bigger than this stop announcing joins and leaves (default ${DEFAULT_ANNOUNCE_LIMIT})
  --allow CIDR         only these addresses may connect (repeatable; e.g. 192.168.0.0/16, fd00::/8)
  --deny CIDR          these addresses may not connect (repeatable; wins over --allow)
  --tls-cert FILE      serve TLS with this PEM certificate chain...
  --tls-key FILE       ...and this PEM private key
  --log FORMAT         text (the tutorial's lines, default) or json (one object per event)
  --http PORT          also serve the chat as a web page, and its WebSocket at /ws
  --http-host HOST     interface for the web page (default: as --host)
  --http-origin URL    another site whose pages may use the WebSocket (repeatable; * for any)
  --redis URL          share rooms with other instances through Redis (redis://HOST:PORT[/DB])
  --redis-prefix P     prefix of Redis keys and channels (default chat)
  --redis-expiry S     seconds before a crashed instance's members leave the directory (default 30)
  -h, --help           show this help

Clients type /help for the commands: /nick, /who, /me, /msg, /join, /rooms, /quit.
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

/** The command line, parsed: server options, and the TLS files still to be read. */
export interface ChatArgs {
  options: ChatServerOptions;
  tlsFiles?: { cert: string; key: string };
}

/** Turns the command line into server options. */
export function parseChatArgs(args: string[]): ChatArgs | "help" {
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
        "max-per-ip": { type: "string" },
        idle: { type: "string" },
        rate: { type: "string" },
        "announce-limit": { type: "string" },
        allow: { type: "string", multiple: true },
        deny: { type: "string", multiple: true },
        "tls-cert": { type: "string" },
        "tls-key": { type: "string" },
        log: { type: "string" },
        http: { type: "string" },
        "http-host": { type: "string" },
        "http-origin": { type: "string", multiple: true },
        redis: { type: "string" },
        "redis-prefix": { type: "string" },
        "redis-expiry": { type: "string" },
        help: { type: "boolean", short: "h" },
      },
    });
  } catch (e) {
    if (e instanceof TypeError && "code" in e) throw new UsageError(e.message);
    throw e;
  }
  const { values: v, positionals } = parsed;
  if (v.help) return "help";
  if (positionals.length > 1) throw new UsageError(`unexpected argument "${positionals[1]}"`);
  if (positionals.length === 1 && v.port !== undefined) {
    throw new UsageError("give the port once, as PORT or as --port");
  }
  const count = (flag: string, text: string | undefined, min: number, max: number, sizes = false) =>
    text === undefined ? undefined : parseCount(flag, text, min, max, sizes);
  const port = positionals[0] ?? v.port;
  if (v.log !== undefined && v.log !== "text" && v.log !== "json") {
    throw new UsageError(`--log is text or json, not "${v.log}"`);
  }
  if ((v["tls-cert"] === undefined) !== (v["tls-key"] === undefined)) {
    throw new UsageError("--tls-cert and --tls-key go together");
  }
  let idle: number | undefined;
  if (v.idle !== undefined) {
    idle = Number(v.idle);
    if (v.idle.trim() === "" || !(idle >= 0 && idle <= 1e6)) {
      throw new UsageError(`--idle wants seconds, not "${v.idle}"`);
    }
  }
  if (v.http === undefined && (v["http-host"] !== undefined || v["http-origin"] !== undefined)) {
    throw new UsageError("--http-host and --http-origin go with --http PORT");
  }
  if (v.redis === undefined && (v["redis-prefix"] !== undefined || v["redis-expiry"] !== undefined)) {
    throw new UsageError("--redis-prefix and --redis-expiry go with --redis URL");
  }
  if (v.redis !== undefined && !/^rediss?:\/\/[^/\s]+(\/\d+)?$/.test(v.redis)) {
    throw new UsageError(`--redis wants redis://HOST:PORT[/DB], not "${v.redis}"`);
  }
  for (const cidr of [...(v.allow ?? []), ...(v.deny ?? [])]) {
    try {
      parseCidr(cidr);
    } catch (e) {
      if (e instanceof RangeError) throw new UsageError(e.message);
      throw e;
    }
  }
  return {
    options: {
      port: port === undefined ? DEFAULT_PORT : parseCount("port", port, 0, 65535),
      host: v.host,
      maxLine: count("--max-line", v["max-line"], 1, 1 << 20),
      sendq: count("--sendq", v.sendq, 1, 2 ** 31, true),
      maxClients: count("--max-clients", v["max-clients"], 1, 1_000_000),
      maxPerIp: count("--max-per-ip", v["max-per-ip"], 0, 1_000_000),
      idle,
      rate: count("--rate", v.rate, 0, 1_000_000),
      announceLimit: count("--announce-limit", v["announce-limit"], 0, 1_000_000),
      allow: v.allow,
      deny: v.deny,
      logFormat: v.log as "text" | "json" | undefined,
      redis: v.redis === undefined ? undefined : {
        url: v.redis,
        prefix: v["redis-prefix"],
        expiry: count("--redis-expiry", v["redis-expiry"], 1, 86_400),
      },
      http: v.http === undefined
        ? undefined
        : { port: parseCount("--http", v.http, 0, 65535), host: v["http-host"], origins: v["http-origin"] },
    },
    tlsFiles: v["tls-cert"] === undefined ? undefined : { cert: v["tls-cert"], key: v["tls-key"]! },
  };
}

/** The command line: parse, listen, serve until SIGINT or SIGTERM. */
async function main(): Promise<void> {
  let args;
  try {
    args = parseChatArgs(Deno.args);
  } catch (e) {
    if (!(e instanceof UsageError)) throw e;
    console.error(`chat_server: ${e.message}\n${USAGE}`);
    Deno.exit(2);
  }
  if (args === "help") {
    console.log(HELP);
    return;
  }
  const options = args.options;
  let server: ChatServer;
  try {
    if (args.tlsFiles) {
      options.tls = {
        cert: Deno.readTextFileSync(args.tlsFiles.cert),
        key: Deno.readTextFileSync(args.tlsFiles.key),
      };
    }
    server = await startChatServer(options);
  } catch (e) {
    const port = options.port;
    if (e instanceof WebListenError) console.error(`chat_server: ${e.message}`);
    else if (e instanceof Deno.errors.AddrInUse) console.error(`chat_server: port ${port} is already in use`);
    else if (e instanceof Deno.errors.PermissionDenied) {
      console.error(`chat_server: not allowed to listen on port ${port} (ports below 1024 need privileges)`);
    } else if (e instanceof Deno.errors.NotFound && !options.tls) {
      console.error(`chat_server: cannot read ${(e as Error).message.replace(/^.*?: /, "")}`);
    } else if (e instanceof Deno.errors.AddrNotAvailable || e instanceof Deno.errors.NotFound) {
      console.error(`chat_server: cannot listen on ${options.host}: ${(e as Error).message}`);
    } else if (options.tls && e instanceof Error && !(e instanceof Deno.errors.AddrInUse)) {
      console.error(`chat_server: cannot serve TLS with that certificate and key: ${e.message}`);
    } else throw e;
    Deno.exit(1);
  }
  console.log(`ChatServer started on port ${server.addr.port}`);
  const stop = () => server.close();
  for (const signal of ["SIGINT", "SIGTERM"] as const) Deno.addSignalListener(signal, stop);
  if (server.httpAddr) {
    const { hostname, port } = server.httpAddr;
    const shown = hostname === "::" || hostname === "0.0.0.0"
      ? "localhost"
      : formatPeer(server.httpAddr).replace(/:\d+$/, "");
    console.log(`Web page at http://${shown}:${port}/`);
  }
  if (server.redisReady && options.redis) {
    const url = options.redis.url;
    const ready = server.redisReady.then(() => true, () => false);
    const early = await Promise.race([ready, delay(1000).then(() => false)]);
    if (early) console.log(`Sharing rooms through Redis at ${url}`);
    else {
      ready.then((reached) => reached && console.log(`Sharing rooms through Redis at ${url}`));
      console.error(
        `chat_server: Redis at ${url} is unreachable: serving local clients only while retrying`,
      );
    }
  }

  await server.finished;
  for (const signal of ["SIGINT", "SIGTERM"] as const) Deno.removeSignalListener(signal, stop);
  console.log("ChatServer shutdown complete");
}

if (import.meta.main) await main();
