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
 * `/msg`, rooms (`/join`, `/rooms`, `/topic`), `/quit` and `/help`; operators (`/oper`) can kick,
 * ban, mute and set topics; and whoever runs it gets limits (clients, clients per address, idle
 * time, flood rate, allow/deny lists), in-memory history and a JSON event log. This file alone is
 * all of that: copy it anywhere and run it.
 *
 * How to read it. Section 1 is the tutorial's whole program: accept, greet, read, frame,
 * broadcast, leave. Each later section adds one thing and can be read alone; its banner says
 * which line of section 1 calls it.
 *
 *   1. The tutorial's chat server: ChatServer (run, acceptNewConnection, handleLine, relay, leave,
 *      close), Room (broadcastExcept), Client, LineFramer
 *   2. Writing without blocking: the send queue's flusher, sender pacing, the event log
 *   3. Rooms, names and commands: the directory, one small handler per command, operators'
 *      commands, and each room's history
 *   4. Limits and operators: allow/deny, bans, client counts, the idle sweep, flood control's token
 *      bucket, and what operators decide (bans, topics)
 *   5. Doors and parts: listening and refusing, what the core asks of each part, and the one table
 *      that loads them
 *   6. Options   7. Small helpers   8. The command line
 *
 * What a flag adds lives in chat/ beside this file, one part a file, loaded only when its flag is
 * given (section 5):
 *
 *   chat/tls.ts          --tls-cert, --tls-key: TLS on the chat port
 *   chat/proxy.ts        --proxy-from: PROXY headers from a trusted load balancer
 *   chat/web.ts          --http: the web page (chat/page.html, .css, .js) and its WebSocket
 *   chat/admin.ts        --admin: /healthz, /readyz and Prometheus /metrics
 *   chat/http.ts         the little HTTP the web door and the admin port share
 *   chat/history_file.ts --history: each room's history in a node:sqlite file, across restarts
 *   chat/redis_bus.ts    --redis: several instances sharing their rooms through Redis Streams
 *
 * Design notes, in the spirit of the tutorial's `ChatServer` class:
 * - The accept loop only dispatches; `acceptNewConnection()` admits one connection and `receive()`
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

import type { BlockList } from "node:net";

// =============================================================================================
// 1. The tutorial's chat server
//
// The tutorial's ChatServer class has four methods: __init__, run, accept_new_connection and
// broadcast_string. Here they are, with the reading and leaving that its run loop does inline.

/** The tutorial's port. */
export const DEFAULT_PORT = 2626;
/** Longest line relayed, in bytes; the rest of a longer line is discarded. */
export const DEFAULT_MAX_LINE = 4096;
/** Bytes that may wait for one client before it is cut off as a slow consumer. */
export const DEFAULT_SENDQ = 1024 * 1024;
/** Clients served at once; one more is refused with a line of explanation. */
export const DEFAULT_MAX_CLIENTS = 1000;
/**
 * Clients per remote address; 0 is no limit. The default leaves loopback alone (the operator's
 * own machine, and benchmarks) but keeps one stranger from taking every place: ngIRCd's
 * MaxConnectionsIP defaults to 5. A --max-per-ip that is given applies to loopback too.
 */
export const DEFAULT_MAX_PER_IP = 10;
/** Lines a client may send per 10 seconds before its extra lines are dropped; 0 is no limit. */
export const DEFAULT_RATE = 50;
/** Members above which a room no longer announces each join and leave. */
export const DEFAULT_ANNOUNCE_LIMIT = 200;
/** Chat lines each room keeps for /history and for web pages that reconnect; 0 keeps none. */
export const DEFAULT_HISTORY_LINES = 500;
/** The room everyone starts in. */
export const LOBBY = "lobby";
/** How long a goodbye (or shutdown) waits for the last lines to be written before closing anyway. */
export const SHUTDOWN_GRACE_MS = 1000;
/** Longest pause between accepts that fail for want of descriptors or memory. */
export const ACCEPT_PAUSE_MS = 100;
/**
 * Bytes read per `read()` call: a client starts with the first size and doubles, up to the second,
 * each time a read fills its buffer. 512 takes a burst of lines in one read, so it costs the room
 * one round of writes; starting at 64 cost three or four at the start of each burst, and the p99
 * at 5,000 lines/s into 100 clients was 1.26 times the batching floor's, where 512 matches it
 * (DESIGN.md, 2026-12-02). An idle client holds the 512 bytes.
 */
const FIRST_READ_SIZE = 512;
export const READ_SIZE = 16 * 1024;

// The seed's own words.
const GREETING = "You're connected to the Deno chatserver\r\n";
const SHUTDOWN_NOTICE = "Server shutting down, goodbye\r\n";

export const encoder = new TextEncoder();
export const decoder = new TextDecoder();
const CRLF = encoder.encode("\r\n");

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
  const server = new ChatServer(options);
  await server.start();
  return server;
}

/**
 * The tutorial's ChatServer: it owns the listening socket, the clients, and what the later
 * sections add (the flusher, the log, the directory, the limits, and the parts the options ask for).
 */
export class ChatServer {
  readonly options: ChatServerOptions;
  listener: Deno.TcpListener | null = null;
  readonly clients = new Set<Client>();
  readonly flusher: Flusher; // section 2
  readonly gathering = new Gathering(); // section 2
  readonly log: EventLog; // section 2
  readonly directory = new Directory(); // section 3
  readonly history: RoomHistory; // section 3
  readonly limits: Limits; // section 4
  readonly moderation: Moderation; // section 4
  // The parts the options ask for (section 5): each is null without its flag.
  tls: TlsDoor | null = null;
  web: WebDoor | null = null;
  admin: AdminDoor | null = null;
  bus: Bus | null = null;
  /** Trusted proxies (--proxy-from), and how a connection of theirs is served as the client it names. */
  readonly proxies: BlockList | null;
  proxied: ((conn: Deno.TcpConn) => Promise<void>) | null = null;
  /** Refusals, handshakes, goodbyes and readers still under way: close() waits for them. */
  readonly tasks = new TaskSet();
  closing = false;
  /** Lines received from clients (blank ones aside), for --admin's metrics. */
  linesIn = 0;
  readonly maxLine: number;
  readonly greeting = encoder.encode(GREETING);
  readonly tooLong: Uint8Array;
  /** Settles when the server has stopped, after `close()` or a fatal listener error. */
  readonly finished: Promise<void>;
  #stopped: () => void;

  constructor(options: ChatServerOptions) {
    this.options = options;
    this.flusher = new Flusher(options.sendq ?? DEFAULT_SENDQ);
    this.log = new EventLog(options.log === undefined ? Deno.stdout : options.log, options.logFormat);
    this.moderation = new Moderation(options.operPassword);
    this.limits = new Limits(options, this.moderation);
    this.proxies = options.proxyFrom?.length ? parseBlocks(options.proxyFrom) : null;
    this.history = new RoomHistory(options.historyLines ?? DEFAULT_HISTORY_LINES);
    // A room with members here keeps its history longer.
    this.history.occupied = (key) => (this.directory.room(key)?.members.size ?? 0) > 0;
    this.maxLine = options.maxLine ?? DEFAULT_MAX_LINE;
    this.tooLong = encoder.encode(
      `Your line was over ${this.maxLine} bytes; the rest of it was discarded\r\n`,
    );
    const { promise, resolve } = Promise.withResolvers<void>();
    this.finished = promise;
    this.#stopped = resolve;
  }

  /** The address actually bound. */
  get addr(): Deno.NetAddr {
    return this.listener!.addr;
  }

  /** Where the web page is served, with `http`; else null. */
  get httpAddr(): Deno.NetAddr | null {
    return this.web?.addr ?? null;
  }

  /** Where /healthz, /readyz and /metrics are served, with `admin`; else null. */
  get adminAddr(): Deno.NetAddr | null {
    return this.admin?.addr ?? null;
  }

  /** With `redis`: settles when Redis first answers (the server serves local clients meanwhile). */
  get redisReady(): Promise<void> | null {
    return this.bus?.ready ?? null;
  }

  /**
   * The tutorial's __init__: listens, then starts what the options add to the tutorial's chat
   * (section 5). If anything fails, stops what had started, and throws.
   */
  async start(): Promise<void> {
    try {
      this.listener = listenForClients(this.options.host, this.options.port ?? DEFAULT_PORT);
      await startParts(this); // section 5
      this.limits.startIdleSweep(this);
    } catch (e) {
      this.closing = true;
      this.listener?.close();
      await stopParts(this); // section 5
      throw e;
    }
    this.run().then(async () => {
      await this.tasks.settled();
      await this.web?.finished;
      await this.log.flushed();
      await this.admin?.shutdown(); // last: until now it said 503 to whoever asked if it is ready
    }).then(this.#stopped);
  }

  /** The tutorial's run(): accepts connections until the listener closes (the web door's too). */
  async run(
    listener: Deno.TcpListener = this.listener!,
    take: (conn: Deno.TcpConn) => void = (conn) => this.acceptNewConnection(conn),
  ): Promise<void> {
    let pause = 0;
    while (!this.closing) {
      let conn: Deno.TcpConn;
      try {
        conn = await listener.accept();
      } catch (e) {
        if (this.closing) return;
        if (isRefusedByPeer(e)) continue; // it reset before we took it: its loss, nobody else's
        // Out of descriptors or memory: say so once, and try again soon (5 ms, doubling up to
        // 100 ms) so that the backlog is served as soon as there is room; who is here goes on.
        if (pause === 0) console.error(`accept failed: ${e instanceof Error ? e.message : e}; retrying`);
        pause = Math.min(ACCEPT_PAUSE_MS, 2 * pause || 5);
        await new Promise((r) => setTimeout(r, pause));
        continue;
      }
      pause = 0;
      // A peer that vanishes without a FIN (a lid closed, a cable pulled) is found by the kernel's
      // keepalive probes, with its timings (see DESIGN.md); --idle and WebSocket pings act sooner.
      conn.setKeepAlive(true);
      take(conn);
    }
  }

  /** The tutorial's accept_new_connection(): refuses a connection, or admits it and reads it. */
  acceptNewConnection(conn: Deno.TcpConn): void {
    conn.setNoDelay(true);
    const ip = plainHost(conn.remoteAddr.hostname);
    if (this.proxied && inBlocks(this.proxies!, ip)) return this.tasks.track(this.proxied(conn)); // section 5
    this.serveConnection(conn, formatPeer(conn.remoteAddr), ip);
  }

  /** Refuses a connection, or admits it (after its TLS handshake, with TLS) and reads it. */
  serveConnection(link: Stream, address: string, ip: string): void {
    const refused = this.limits.refusal(ip, this.clients.size); // section 4
    if (this.tls) return this.tasks.track(this.tls.accept(link, address, ip, refused)); // section 5
    if (refused) {
      console.error(`Refused ${address}: ${refused}`);
      return this.tasks.track(refuse(link, refused));
    }
    this.receive(this.admit(link, address, ip), link);
  }

  /**
   * Makes a connection a client: counts it, greets it, puts it in the lobby, and tells the room.
   * A door may add steps of its own (`welcome`, section 5): a web page's token, and its way back.
   */
  admit(
    link: Link,
    address: string,
    ip: string,
    page: PageState | null = null,
    welcome?: Welcome | null,
  ): Client {
    const client = new Client(link, address, ip, this.directory.lobby, this.flusher, page);
    this.clients.add(client);
    this.limits.count(client);
    this.flusher.sendNow(client, this.greeting);
    welcome?.before(client);
    enterRoom(this, client, this.directory.lobby); // section 3
    const joined = PAGE_READS.joined(address);
    announce(this, this.directory.lobby, client, joined, { event: "join", room: LOBBY, peer: address });
    showTopic(this, client, this.directory.lobby); // section 3
    welcome?.after(client);
    return client;
  }

  /**
   * The tutorial's recv(): reads a client's bytes until it goes or is sent off, framing them into
   * lines, then leaves. A {@linkcode Reader} does it; close() waits for it.
   */
  receive(client: Client, conn: Stream): void {
    this.tasks.hold();
    new Reader(this, client, conn).next();
  }

  /** Waits until no reader in `room` holds it back (section 2), and stdout and Redis neither. */
  async paced(room: Room): Promise<void> {
    await this.flusher.waitForRoom(room);
    await this.log.caughtUp();
    await this.bus?.caughtUp(); // section 5
  }

  /** Takes a line from a client, in order: behind a command still waiting on Redis, if any. */
  onLine(client: Client, line: Uint8Array, truncated: boolean): void {
    if (client.busy === null) {
      const pending = this.handleLine(client, line, truncated);
      if (pending) client.waitBehind(pending);
    } else {
      const copy = line.slice(); // the read buffer is reused
      client.waitBehind(client.busy.then(() => this.handleLine(client, copy, truncated)));
    }
  }

  /**
   * The tutorial's else-branch: a line arrived. Blank lines, and clients on their way out, are
   * ignored; the bucket may drop it (section 4); it is a command (section 3), or chat for the room.
   * A command that asks Redis returns a promise.
   */
  handleLine(client: Client, line: Uint8Array, truncated: boolean): void | Promise<void> {
    if (truncated) client.send(this.tooLong);
    if (client.leaving !== null || client.closed || isBlank(line)) return;
    this.linesIn++;
    if (!this.limits.withinRate(this, client)) return;
    if (line[0] === SLASH) {
      if (line[1] !== SLASH) {
        this.gathering.say(); // what was said before the command comes before what it says
        return runCommand(this, client, decoder.decode(line));
      }
      line = line.subarray(1); // "//text" says "/text"
    }
    if (client.mutedUntil !== 0 && muted(client)) return; // section 3
    this.relay(client, line);
  }

  /**
   * Relays a line to the client's room as `[name] line`: built once, kept in the room's history,
   * and queued for everyone else, with the other lines of the same read (Gathering, section 2).
   */
  relay(client: Client, line: Uint8Array): void {
    const message = client.framed(line);
    const room = client.room;
    if (this.bus || room.pages > 0 || client.page) {
      toRoom(this, room, client, message, true); // section 3: here, and with --redis everywhere
    } else {
      this.history.keep(room.name, message); // section 3
      this.gathering.add(client, message);
    }
    this.log.line(client, line, message);
  }

  /**
   * Sends a client off: tells it why, stops reading it, and closes it once the notice is out (or
   * after the grace period). /quit, a flood and the idle sweep all end a client this way.
   */
  sendOff(client: Client, notice: string, reason: string): void {
    if (client.leaving !== null || client.closed) return;
    client.tell(notice);
    client.leaving = reason;
    const goodbye = settleWithin(SHUTDOWN_GRACE_MS, [this.flusher.drained(client)]);
    this.tasks.track(goodbye.then(() => client.close()));
  }

  /**
   * A client has gone (or been sent off): runs once per client, and tells the room, the
   * directory, the limits and the bus. The tutorial's "Client left" branch of run().
   */
  leave(client: Client): void {
    if (!this.clients.delete(client)) return;
    this.limits.uncount(client);
    const room = client.room;
    exitRoom(this, client); // section 3
    this.directory.forget(client);
    if (client.nick !== null) this.bus?.releaseNick(client.nick);
    this.bus?.absent(client.address);
    if (!this.closing) {
      const why = client.leaving ? ` (${client.leaving})` : "";
      announce(this, room, client, PAGE_READS.left(client.label, why), {
        event: "leave",
        room: room.name,
        peer: client.address,
        nick: client.nick,
        reason: client.leaving || null,
      }, room.members.size + 1);
    }
    if (client.leaving === null) client.close(); // one sent off closes once its goodbye is out
  }

  /** Tells every client goodbye, closes every socket, and resolves when all is closed. */
  async close(): Promise<void> {
    if (!this.closing) {
      this.closing = true;
      this.flusher.closing = true; // no gathering from now on
      this.limits.stopIdleSweep();
      this.listener?.close();
      const stopping = this.web?.shutdown(); // stops taking requests; WebSockets close below
      const notice = encoder.encode(SHUTDOWN_NOTICE);
      for (const client of this.clients) client.send(notice);
      this.flusher.flushRound();
      await settleWithin(SHUTDOWN_GRACE_MS, [...this.clients].map((c) => this.flusher.drained(c)));
      for (const client of this.clients) client.close();
      await stopping;
      await this.bus?.close();
      this.history.file?.close();
    }
    await this.finished;
  }
}

/**
 * Reads one client (the tutorial's recv()). A chain of callbacks rather than a loop in an async
 * function, and one object rather than a closure for each step: an idle client then holds one
 * pending read, this reader and its two callbacks, and at 10,000 clients that is what they cost.
 * While a slow reader is behind, the flusher's gate holds further reads (section 2).
 */
class Reader {
  readonly server: ChatServer;
  readonly client: Client;
  readonly conn: Stream;
  /** Made when the first bytes come: most clients only listen. */
  framer: LineFramer | null = null;
  /**
   * Starts small: most clients send a line now and then, and each holds its buffer while it
   * waits. One that fills it gets a bigger one, up to READ_SIZE.
   */
  buffer = new Uint8Array(FIRST_READ_SIZE);
  /**
   * The read op's callbacks, made once per client: bound methods, which cost less than closures
   * and the scope they would share (DESIGN.md, "Measured figures").
   */
  readonly got: (n: number | null) => void;
  readonly finish: (e: unknown) => void;

  constructor(server: ChatServer, client: Client, conn: Stream) {
    this.server = server;
    this.client = client;
    this.conn = conn;
    this.got = this.take.bind(this);
    this.finish = this.end.bind(this);
  }

  /** Reads on, after the senders' pause if someone is behind; or ends, if the client is leaving. */
  next(): void {
    const { client, server } = this;
    if (client.closed || client.leaving !== null) this.end(null);
    else if (
      (server.flusher.congested.size > 0 && server.flusher.holding(client.room) > 0) || server.log.behind ||
      server.bus?.behind
    ) {
      server.paced(client.room).then(() => this.readMore(), this.finish);
    } else this.readMore();
  }

  private readMore(): void {
    const busy = this.client.busy; // a command waits on Redis: read no further
    if (busy) busy.then(() => this.next(), this.finish);
    else this.conn.read(this.buffer).then(this.got, this.finish);
  }

  private take(n: number | null): void {
    if (n === null) {
      if (!this.conn.dropsPartialLine) this.framer?.end(); // `printf 'bye' | nc -N host 2626` says bye
      if (this.conn.problem) {
        this.server.limits.dropped.protocol++;
        console.error(`Dropped ${this.client.address}: ${this.conn.problem}`);
      }
      return this.end(null);
    }
    const { client, server } = this;
    try {
      client.lastInput = Date.now();
      this.framer ??= new LineFramer(
        server.maxLine,
        (line, truncated) => server.onLine(client, line, truncated),
      );
      this.framer.push(this.buffer.subarray(0, n));
      server.gathering.say();
      if (n === this.buffer.length && n < READ_SIZE) this.buffer = new Uint8Array(2 * n);
    } catch (e) {
      return this.end(e);
    }
    this.next();
  }

  private end(e: unknown): void {
    const { client, server } = this;
    if (e !== null && !isDisconnect(e)) {
      console.error(`Error on ${client.address}: ${e instanceof Error ? e.stack : e}`);
    }
    try {
      server.leave(client);
    } catch (e) {
      console.error(`Error on ${client.address}: ${e}`);
    } finally {
      server.tasks.release();
    }
  }
}

/** A room: a name and the clients in it. */
export class Room {
  readonly name: string;
  /** Who is in it: changed only by join() and part(). */
  readonly members = new Set<Client>();
  /**
   * The members as an array, made again after someone joins or leaves. A broadcast walks it by
   * index: walking the Set made an object per member per message, the largest part of the
   * garbage of a flat-out run (DESIGN.md, 2026-12-02).
   */
  private everyone: Client[] | null = null;

  /** Web pages among the members, which are told each kept line's position (section 5). */
  pages = 0;

  constructor(name: string) {
    this.name = name;
  }

  /** Puts a client in. */
  join(client: Client): void {
    this.members.add(client);
    this.everyone = null;
  }

  /** Takes a client out; false if it was not in. */
  part(client: Client): boolean {
    this.everyone = null;
    return this.members.delete(client);
  }

  /** The tutorial's broadcast_string(str, omit_sock): queues `message` for all but `sender`. */
  broadcastExcept(sender: Client | null, message: Uint8Array): void {
    const everyone = this.everyone ??= [...this.members];
    for (let i = 0; i < everyone.length; i++) if (everyone[i] !== sender) everyone[i].send(message);
  }

  /**
   * The same for a line the room's history keeps at position `seq`: a web page among the members
   * is sent it with its position, built once for all of them; its sender, if a page, just that.
   */
  broadcastKept(sender: Client | null, message: Uint8Array, seq: number): void {
    if (sender?.page) sender.tell(PAGE_MARKS.mine(seq));
    if (this.pages === 0) return this.broadcastExcept(sender, message);
    const mark = encoder.encode(PAGE_MARKS.kept(seq));
    const marked = concatBytes([mark, message], mark.length + message.length);
    const everyone = this.everyone ??= [...this.members];
    for (let i = 0; i < everyone.length; i++) {
      const client = everyone[i];
      if (client !== sender) client.send(client.page ? marked : message);
    }
  }
}

/** The telnet protocol bytes that matter when removing negotiation (RFC 854). */
const IAC = 255, SB = 250, SE = 240, WILL = 251, DONT = 254;
// Not exported: an exported binding is a module cell, and the framer's loop, which compares every
// byte with CR and NL, took 28% more instructions reading them from cells (DESIGN.md, 2026-12-07).
// A part that needs them keeps copies of its own.
const CR = 13, NL = 10, NUL = 0, TAB = 9, DEL = 127, SLASH = 47;

const enum Telnet {
  Data,
  Iac,
  Option,
  Sub,
  SubIac,
}

/** The one empty line buffer every idle framer shares: an empty Uint8Array of its own is not free. */
export const NO_BYTES = new Uint8Array(0);
/**
 * The send queue of a client with nothing queued, shared by all of them and never written to: a
 * queue's first part gets an array of its own size, and a queue taken for writing is dropped, not
 * emptied. Emptying an array frees its store, and the next push makes room for 17 parts: at 5,000
 * lines/s into 100 clients that was the largest part of the garbage (DESIGN.md, 2026-12-02).
 */
const NO_PARTS: Uint8Array[] = [];

/**
 * Splits a byte stream into lines, whatever the read boundaries.
 *
 * CRLF, LF, bare CR and CR NUL each end a line. Telnet commands and negotiation are removed, as
 * are control characters other than tab, C1 controls included (U+0080 to U+009F, which terminals
 * take for escape sequences), and bytes that are not UTF-8 become U+FFFD: every line handed over
 * is valid UTF-8 that is safe to show. A line longer than `maxLine` bytes is handed over
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
  #line = NO_BYTES; // grown on demand up to #maxLine: an idle client holds nothing, not even an empty array
  #maxLine: number;
  #length = 0;
  #state = Telnet.Data;
  #afterCR = false;
  #skipping = false;
  /** The line has a byte over 0x7f: it is checked as UTF-8 before it is handed over. */
  #high = false;
  #onLine: (line: Uint8Array, truncated: boolean) => void;

  constructor(maxLine: number, onLine: (line: Uint8Array, truncated: boolean) => void) {
    this.#maxLine = maxLine;
    this.#onLine = onLine;
  }

  /** The stream has ended: a last line without its line ending is still a line. */
  end(): void {
    if (this.#length > 0 && !this.#skipping) this.#endLine();
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
    if (b > 0x7f) this.#high = true;
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
    this.#emit(this.#line.subarray(0, end), true);
    this.#skipping = true;
  }

  #endLine(): void {
    if (this.#skipping) this.#skipping = false;
    else this.#emit(this.#line.subarray(0, this.#length), false);
  }

  #emit(line: Uint8Array, truncated: boolean): void {
    const high = this.#high;
    this.#length = 0;
    this.#high = false;
    if (!high) return this.#onLine(line, truncated);
    let safe = safeText(line);
    if (safe.length > this.#maxLine) { // U+FFFD is three bytes: cut back to a character's start
      let end = this.#maxLine;
      while (end > 0 && (safe[end] & 0xc0) === 0x80) end--;
      safe = safe.subarray(0, end);
      truncated = true;
    }
    this.#onLine(safe, truncated);
  }
}

/** A line with bytes over 0x7f as valid UTF-8 without C1 controls (invalid bytes become U+FFFD). */
function safeText(line: Uint8Array): Uint8Array {
  return encoder.encode(decoder.decode(line).replace(/[\u0080-\u009f]/g, ""));
}

/** Formats a peer address as the tutorial prints it: IPv4-mapped IPv6 addresses as plain IPv4. */
export function formatPeer(addr: Deno.NetAddr): string {
  const host = plainHost(addr.hostname);
  // Joined rather than a template literal: V8 keeps `${host}:${port}` as a rope of its pieces, a
  // join as one flat string, and every client keeps its address (DESIGN.md, "Measured figures").
  return host.includes(":") ? ["[", host, "]:", addr.port].join("") : [host, addr.port].join(":");
}

/** What the server needs of a client's connection: TCP, TLS and WebSocket clients all have it. */
export interface Link {
  write(p: Uint8Array): Promise<number>;
  close(): void;
  /** The door it came in by, where it is not plain TCP (`tls`, `web`): for --admin's metrics. */
  readonly door?: "tls" | "web";
}

/** A link that is read as a byte stream (TCP and TLS): `read()` resolves to null at the end. */
export interface Stream extends Link {
  read(p: Uint8Array): Promise<number | null>;
  /** Set where a partial line at the end is an unfinished message, to be dropped (WebSocket). */
  readonly dropsPartialLine?: boolean;
  /** Why the link ended, when the peer broke its protocol: logged as the reason it was dropped. */
  readonly problem?: string | null;
}

/**
 * One connected client: its link, its names and room, its send queue, its flood bucket, and
 * whether it is leaving. Every field is set here, in one order, so the hot path stays monomorphic.
 */
export class Client {
  readonly link: Link;
  /** `host:port` as the tutorial prints it (`[v6addr]:port` for IPv6). */
  readonly address: string;
  /** The remote address alone, for the per-address limit. */
  readonly ip: string;
  nick: string | null = null;
  /** What others see: the nick, or else the address. */
  label: string;
  /** Prefix for this client's lines, `[label] `, encoded when it first speaks: most only listen. */
  prefix: Uint8Array | null = null;
  room: Room;
  // The send queue, which the flusher (section 2) writes out.
  readonly flusher: Flusher;
  queue: Uint8Array[] = NO_PARTS;
  /** Bytes queued or being written: the figure the send queue limit applies to. */
  queued = 0;
  /** When a write to this client last completed (ms since the epoch): whether it drains. */
  lastWrite = 0;
  /** How long it may hold back its room (section 2); made the first time it falls behind. */
  hold: Hold | null = null;
  /** A write is under way; `inflight` is what it still has to write (a partial one: the next round). */
  flushing = false;
  inflight: Uint8Array | null = null;
  /** Waiting in the flusher's list of clients to flush at the end of this turn. */
  dirty = false;
  /** Who waits for the queue to empty (a goodbye before closing); usually nobody. */
  drainWaiters: (() => void)[] | null = null;
  /** The write op's callbacks, made once per client, not once per write: the flusher's, bound to it. */
  readonly wrote: (n: number) => void;
  readonly failed: (e: unknown) => void;
  // Input.
  /** When the client last sent anything (ms since the epoch). */
  lastInput: number;
  /** Flood control (section 4), made when the client first speaks. */
  bucket: TokenBucket | null = null;
  /** Made an operator by /oper (section 3). */
  oper = false;
  /** Until when nobody hears this client (ms since the epoch; Infinity: until unmuted); 0: heard. */
  mutedUntil = 0;
  /** A command waiting on Redis; the client's next lines wait their turn behind it. */
  busy: Promise<void> | null = null;
  // Leaving.
  /** Set when the client is sent off: why (`/quit` text, "idle", "flooding"). */
  leaving: string | null = null;
  closed = false;
  /** For a web page that follows positions (`/ws?page=1`, section 5): its token; else null. */
  readonly page: PageState | null;

  constructor(
    link: Link,
    address: string,
    ip: string,
    room: Room,
    flusher: Flusher,
    page: PageState | null = null,
  ) {
    this.link = link;
    this.address = address;
    this.ip = ip;
    this.label = address;
    this.room = room;
    this.flusher = flusher;
    this.wrote = flusher.afterWrite.bind(flusher, this);
    this.failed = flusher.writeFailed.bind(flusher, this);
    this.lastInput = Date.now();
    this.page = page;
  }

  /** Queues bytes for this client; they go out at the end of this turn, coalesced (section 2). */
  send(bytes: Uint8Array): void {
    this.flusher.enqueue(this, bytes);
  }

  /** Sends one line of text. */
  tell(text: string): void {
    this.send(encoder.encode(text + "\r\n"));
  }

  /** `[label] line\r\n`, as the room sees a line of this client's. */
  framed(line: Uint8Array): Uint8Array {
    const prefix = this.prefix ??= encoder.encode(PAGE_READS.said(this.label, ""));
    const message = new Uint8Array(prefix.length + line.length + 2);
    message.set(prefix);
    message.set(line, prefix.length);
    message.set(CRLF, message.length - 2);
    return message;
  }

  /** Makes the client's next lines wait for `pending` (a command that asks Redis). */
  waitBehind(pending: Promise<void>): void {
    const mine = this.busy = pending.catch((e) => console.error(`Error on ${this.address}: ${e}`));
    mine.finally(() => {
      if (this.busy === mine) this.busy = null;
    });
  }

  /** Closes the connection (once; later calls do nothing); its reader then sees it end and leaves. */
  close(reason: string | null = null): void {
    if (this.closed) return;
    this.closed = true;
    this.queue = NO_PARTS;
    this.flusher.forget(this);
    if (reason) console.error(`Dropped ${this.address}: ${reason}`);
    closeQuietly(this.link);
  }
}

// =============================================================================================
// 2. Writing without blocking
//
// Client.send() (section 1) calls Flusher.enqueue(): a line is queued, never written on the
// spot. At the end of the turn the flusher writes each client's queue as one write op, so a
// line broadcast to 1,000 clients costs 1,000 array pushes and, later, 1,000 writes that each
// carry everything that client has waiting. A client that stops reading fills its own queue and
// is cut off; one that reads slowly, but drains, holds back its room's senders for a while
// instead (Reader asks waitForRoom()), and nobody else's.

/**
 * A client behind holds back its room only while it drains: a write to it completed less than
 * DRAIN_MS ago. The rule is fixed, never learned from the client, so no client can teach it a
 * longer wait. Behind big kernel buffers a write completes only when the kernel has room for a
 * good part of them again, so a reader of several MB/s completes one every few hundred ms and is
 * paced, and a far slower one, or one that has stopped, is not (DESIGN.md, "Slow readers").
 */
const DRAIN_MS = 500;
/**
 * How long one client may hold its room back: HOLD_BANK_MS at a stretch (enough, with room to
 * spare, for a flat-out burst of 20 MB to a reader of 8 MB/s), and HOLD_SHARE of the time in the long run. A client
 * spends its bank while it is behind, whether or not anyone waits, and earns it back while it is not.
 */
export const HOLD_BANK_MS = 8000;
const HOLD_SHARE = 0.1;
/**
 * Most bytes copied together into one write. A batch of output that fits is joined into a buffer
 * of its own size; a bigger one (a slow reader catching up) goes through a pooled buffer of this
 * size. Each pooled buffer is WRITE_SIZE of resident memory, so small batches must not take
 * them: a join storm would leave SPARE_BUFFERS of them behind.
 */
const WRITE_SIZE = 64 * 1024;
/**
 * Clients with output waiting, above which a flush first waits GATHER_MS to gather more lines.
 * Past a few hundred clients the write ops, not the bytes, are what cost, so each op should carry
 * more lines (DESIGN.md, "How the chat server's hot path works"); below the threshold nobody waits.
 */
const GATHER_FANOUT = 256;
const GATHER_MS = 10;
/** Pooled write buffers kept for reuse when no flush needs them. */
const SPARE_BUFFERS = 32;
/**
 * A stdout more than LOG_BACKLOG_BYTES behind paces the senders, as a slow reader does, so a file
 * or pipe that keeps up loses nothing, where dropping at the backlog lost thousands of lines of a
 * burst. One that takes nothing for LOG_STALL_MS has stopped (a
 * paused terminal): then its lines are dropped and counted, and the chat goes on.
 */
const LOG_BACKLOG_BYTES = 4 * 1024 * 1024;
const LOG_STALL_MS = 1000;
/**
 * How long the log gathers lines before it writes them. A join storm brings one join per turn,
 * and a write per turn made garbage per join that grows V8's young generation; one write per
 * LOG_GATHER_MS carries dozens of joins.
 */
const LOG_GATHER_MS = 10;
/** The log copies chat lines into buffers of this size (a longer line gets one of its own). */
const LOG_CHUNK_BYTES = 16 * 1024;

/** A client's record of holding its room back: since when it is behind (0: it is not), and its bank. */
class Hold {
  since = 0;
  /** Milliseconds it may still hold its room, as of `at`. */
  bank = HOLD_BANK_MS;
  at = 0;
}

/**
 * Writes every client's queue in rounds, and paces the senders for slow readers. All of the
 * write path's server-wide state lives here: the clients to flush this round, the gather timer,
 * the shared join, the spare buffers, the clients that are behind, and the senders' pause.
 */
export class Flusher {
  readonly sendq: number;
  /** A client this far behind makes the senders wait (see waitForRoom). */
  readonly paceBytes: number;
  /** Set when the server shuts down: then nothing waits to gather. */
  closing = false;
  /** Clients more than paceBytes behind, in any room. */
  readonly congested = new Set<Client>();
  /** Messages queued for clients, and clients cut off at sendq, so far (--admin's metrics). */
  delivered = 0;
  cutOff = 0;
  private dirty: Client[] = [];
  private gathering: ReturnType<typeof setTimeout> | undefined = undefined;
  private readonly joins = new SharedJoin();
  private readonly spareBuffers: Uint8Array[] = [];
  private roomFreed: Promise<void> | null = null;
  private releaseSenders: (() => void) | null = null;
  private wakeTimer: ReturnType<typeof setTimeout> | undefined = undefined;
  private wakeAt = 0;

  constructor(sendq: number) {
    this.sendq = sendq;
    this.paceBytes = Math.max(1, Math.floor(sendq / 4));
  }

  /** Queues bytes for a client, or cuts it off if its queue would pass `sendq`. */
  enqueue(client: Client, bytes: Uint8Array): void {
    if (client.closed) return;
    if (client.queued + bytes.length > this.sendq) {
      this.cutOff++;
      client.close(`send queue over ${this.sendq} bytes (not reading)`);
      return;
    }
    if (bytes.length !== 0) this.delivered++; // not a nudge for a WebSocket's control frame
    if (client.queue.length === 0) client.queue = [bytes]; // never a push onto NO_PARTS
    else client.queue.push(bytes);
    client.queued += bytes.length;
    if (client.queued > this.paceBytes) this.fallBehind(client);
    if (!client.dirty && !client.flushing) this.markDirty(client);
  }

  /**
   * Writes bytes to a client at once if it has nothing queued or under way (a greeting), else
   * queues them. A join storm then costs one write per newcomer and no round to flush. Bytes that
   * would put the client behind (a tiny --sendq) take the queue's way, limits and all.
   */
  sendNow(client: Client, bytes: Uint8Array): void {
    const busy = client.closed || client.flushing || client.dirty || client.queue.length > 0;
    if (busy || client.queued + bytes.length > this.paceBytes) return this.enqueue(client, bytes);
    this.delivered++;
    client.queue = [bytes];
    client.queued += bytes.length;
    this.startWrite(client);
  }

  // Puts a client on the list to flush at the end of this turn (or of the gathering window).
  private markDirty(client: Client): void {
    client.dirty = true;
    if (this.dirty.push(client) === 1 && this.gathering === undefined) queueMicrotask(this.flushRound);
  }

  /**
   * Starts a flush for every client that had bytes queued during this turn. When that is a
   * great many clients, it first waits GATHER_MS for more lines, so that each client gets them
   * in one write: at 1,000 clients a line is 1,000 writes, and the writes are what cost.
   */
  readonly flushRound = (): void => {
    if (this.gathering === undefined && this.dirty.length >= GATHER_FANOUT && !this.closing) {
      this.gathering = setTimeout(this.flushRound, GATHER_MS);
      return;
    }
    clearTimeout(this.gathering);
    this.gathering = undefined;
    const batch = this.dirty;
    this.dirty = [];
    for (const client of batch) {
      client.dirty = false;
      if (!client.closed && !client.flushing) this.startWrite(client);
    }
  };

  // Starts one write: the rest of a partial write, or everything queued for a client; what is
  // queued meanwhile waits for the next round. The common case (one line, or a few) is one write
  // op and two callbacks made once per client: at 150,000 deliveries a second, every promise
  // saved shows. This is the one place a line is handed to a client's link, so the compiler
  // builds the write op's code into one function, not three (DESIGN.md, 2026-12-02).
  private startWrite(client: Client): void {
    client.flushing = true;
    let bytes = client.inflight;
    if (bytes === null) {
      const parts = client.queue;
      client.queue = NO_PARTS;
      if (parts.length > 1 && client.queued > WRITE_SIZE) {
        this.writeBigBatch(client, parts);
        return;
      }
      bytes = client.inflight = parts.length === 1 ? parts[0] : this.joins.join(parts, client.queued);
    }
    client.link.write(bytes).then(client.wrote, client.failed);
  }

  /**
   * The end of one write op (Client.wrote): the rest of a partial write waits for the next
   * round, ahead of what was queued meanwhile.
   */
  afterWrite(client: Client, n: number): void {
    const bytes = client.inflight!;
    this.noteWritten(client, n);
    client.inflight = n < bytes.length && !client.closed ? bytes.subarray(n) : null;
    this.endFlush(client);
  }

  /** A write op failed (Client.failed): the client is gone. */
  writeFailed(client: Client, e: unknown): void {
    client.inflight = null;
    client.close(isDisconnect(e) ? null : `write failed: ${e}`);
    this.endFlush(client);
  }

  // A flush is over: queue the client for the next round if more came, or wake who waits.
  private endFlush(client: Client): void {
    client.flushing = false;
    if ((client.queue.length > 0 || client.inflight !== null) && !client.closed) this.markDirty(client);
    else if (client.drainWaiters) {
      for (const resolve of client.drainWaiters.splice(0)) resolve();
    }
  }

  // Writes a big batch (a slow reader catching up) through a pooled 64 KiB buffer, so that a
  // busy client makes no garbage and an idle one holds none.
  private async writeBigBatch(client: Client, parts: Uint8Array[]): Promise<void> {
    const scratch = this.spareBuffers.pop() ?? new Uint8Array(WRITE_SIZE);
    try {
      await writeCoalesced(client.link, parts, scratch, (n) => this.noteWritten(client, n));
    } catch (e) {
      client.close(isDisconnect(e) ? null : `write failed: ${e}`);
    } finally {
      if (this.spareBuffers.length < SPARE_BUFFERS) this.spareBuffers.push(scratch);
      this.endFlush(client);
    }
  }

  /** Resolves when everything queued for a client has been written, or it has gone. */
  drained(client: Client): Promise<void> {
    const empty = client.queue.length === 0 && client.inflight === null;
    if (!client.flushing && (empty || client.closed)) return Promise.resolve();
    return new Promise((resolve) => (client.drainWaiters ??= []).push(resolve));
  }

  // Counts bytes written to a client, and lets paused senders go on if it has caught up.
  private noteWritten(client: Client, n: number): void {
    client.queued -= n;
    client.lastWrite = Date.now();
    if (client.queued <= this.paceBytes && client.hold?.since) this.catchUp(client, client.lastWrite);
  }

  /** A closed client no longer holds back the senders. */
  forget(client: Client): void {
    if (client.hold?.since) this.catchUp(client, Date.now());
  }

  // A client has passed paceBytes: it is behind from now on, with the bank it has earned.
  private fallBehind(client: Client): void {
    const hold = client.hold ??= new Hold();
    if (hold.since !== 0) return;
    const now = Date.now();
    hold.bank = Math.min(HOLD_BANK_MS, hold.bank + (now - hold.at) * HOLD_SHARE);
    hold.since = now;
    this.congested.add(client);
  }

  // A client is no longer behind (or has gone): it has spent the time it was, and waiters look again.
  private catchUp(client: Client, now: number): void {
    const hold = client.hold!;
    hold.bank -= now - hold.since;
    hold.at = now;
    hold.since = 0;
    this.congested.delete(client);
    this.wakeSenders();
  }

  /**
   * How long the senders in `room` must still wait at `now` (ms), or 0: the longest that any of
   * its members behind may still hold it, while it drains (DRAIN_MS) and has bank left.
   */
  holding(room: Room, now = Date.now()): number {
    let wait = 0;
    for (const client of this.congested) {
      if (client.room !== room) continue;
      const left = Math.min(
        client.hold!.bank - (now - client.hold!.since),
        DRAIN_MS - (now - client.lastWrite),
      );
      if (left > wait) wait = left;
    }
    return wait;
  }

  /**
   * The pacing gate, for every reader of client input (Reader, for TCP and WebSocket clients alike):
   * resolves when nobody behind in `room` holds it any more. Other rooms never wait for it; a
   * client that does not drain, or has spent its bank, holds no one, and its queue grows until
   * `sendq` cuts it off.
   */
  async waitForRoom(room: Room): Promise<void> {
    for (let wait = this.holding(room); wait > 0; wait = this.holding(room)) {
      this.roomFreed ??= new Promise<void>((resolve) => this.releaseSenders = resolve);
      // One timer for every room that waits: the soonest that any of them must look again.
      const at = Date.now() + wait;
      if (this.wakeTimer === undefined || at < this.wakeAt) {
        clearTimeout(this.wakeTimer);
        this.wakeTimer = setTimeout(this.wakeSenders, wait);
        this.wakeAt = at;
      }
      await this.roomFreed;
    }
  }

  private readonly wakeSenders = (): void => {
    const release = this.releaseSenders;
    clearTimeout(this.wakeTimer);
    this.wakeTimer = undefined;
    this.roomFreed = null;
    this.releaseSenders = null;
    release?.();
  };
}

/**
 * Joins queued lines into one buffer, and keeps the last join to share it. The members of a room
 * usually have the very same lines queued, so a round of 10,000 writes costs one copy, not
 * 10,000. Sharing is safe because nothing writes into a buffer once it is queued.
 */
export class SharedJoin {
  private parts: Uint8Array[] = [];
  private bytes: Uint8Array = new Uint8Array(0);

  /** `parts` joined (`total` bytes): the same buffer as last time if they are the same parts. */
  join(parts: Uint8Array[], total: number): Uint8Array {
    let same = parts.length === this.parts.length;
    for (let i = 0; same && i < parts.length; i++) same = parts[i] === this.parts[i];
    if (!same) {
      this.parts = parts.slice();
      this.bytes = concatBytes(parts, total);
    }
    return this.bytes;
  }
}

/**
 * The short chat lines one client says in a row (those of one read), queued for its room as one
 * message: each member's queue then takes one part per read, not one per line. ChatServer.relay()
 * adds to it. What was gathered is said before anything else is said to a room (toRoom) and
 * before a command, at the end of each read, and at the latest when this turn's tasks are done:
 * nobody sees lines out of order. A long line goes on its own: its part is worth its cost, and
 * copying it again would only make garbage.
 */
export class Gathering {
  private parts: Uint8Array[] = [];
  private from: Client | null = null;
  private bytes = 0;

  /** Adds a line of `client`'s: another client's lines, or a batch past READ_SIZE, are said first. */
  add(client: Client, message: Uint8Array): void {
    if (this.from !== client || this.bytes > READ_SIZE || message.length > GATHER_LINE) this.say();
    if (message.length > GATHER_LINE) return client.room.broadcastExcept(client, message);
    if (this.parts.push(message) === 1) queueMicrotask(this.say);
    this.from = client;
    this.bytes += message.length;
  }

  /** Queues what was gathered for the sender's room, as one message. */
  readonly say = (): void => {
    const from = this.from, parts = this.parts;
    if (from === null || parts.length === 0) return;
    this.parts = [];
    from.room.broadcastExcept(from, parts.length === 1 ? parts[0] : concatBytes(parts, this.bytes));
    this.from = null;
    this.bytes = 0;
  };
}

/** The longest line Gathering joins to others: 256 bytes (measured in DESIGN.md). */
const GATHER_LINE = 256;

/** Writes all of `bytes`, however many calls it takes: `write()` may take only part. */
export async function writeAll(w: Writer, bytes: Uint8Array): Promise<void> {
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

/**
 * The event log: the tutorial's lines (or one JSON object per event) for stdout, written in
 * batches so that logging costs one write per LOG_GATHER_MS. A stdout that stops draining (a
 * paused terminal, a full pipe) costs lines, never the chat: lines are dropped and counted once it
 * has stood still for LOG_STALL_MS with {@linkcode LOG_BACKLOG_BYTES} waiting.
 */
class EventLog {
  #out: Writer | null;
  #json: boolean;
  /** Events as text (one string for a run of them, encoded when written), chat lines as bytes. */
  #parts: (Uint8Array | string)[] = [];
  /**
   * The last part while chat lines are copied into it, and how full it is. Copied, not referred to:
   * a reference would keep each line's buffer alive until its batch is written, long enough for
   * the garbage collector to copy it out of the young generation (see Ring, section 3).
   */
  #chunk: Uint8Array | null = null;
  #chunkFill = 0;
  #bytes = 0;
  #dropped = 0;
  #writing: Promise<void> | null = null;
  #scratch = new Uint8Array(WRITE_SIZE);
  /** When stdout last took a write (or the current batch began), and who waits for it to catch up. */
  #lastProgress = 0;
  #waiters: (() => void)[] = [];

  constructor(out: Writer | null, format: "text" | "json" = "text") {
    this.#out = out;
    this.#json = format === "json";
  }

  /** Logs an event: `text` as the tutorial prints it, or the event's fields as JSON. */
  event(text: string, fields: Record<string, unknown>): void {
    if (!this.#out) return;
    this.#append(this.#json ? jsonEvent(fields) : text);
  }

  /** Logs a chat line; `message` is what the room got, so text logging needs no decoding. */
  line(client: Client, line: Uint8Array, message: Uint8Array): void {
    if (!this.#out) return;
    if (!this.#json) return this.#appendLine(message, message.length - 2);
    this.event("", { event: "line", room: client.room.name, from: client.label, text: decoder.decode(line) });
  }

  // Copies a chat line (the first `length` bytes of `message`) and its newline into the last chunk.
  #appendLine(message: Uint8Array, length: number): void {
    if (this.#bytes > LOG_BACKLOG_BYTES && this.#stalled()) {
      this.#dropped++;
      return;
    }
    if (this.#chunk === null || this.#chunkFill + length + 1 > this.#chunk.length) {
      this.#closeChunk();
      this.#chunk = new Uint8Array(Math.max(LOG_CHUNK_BYTES, length + 1));
      this.#parts.push(this.#chunk);
    }
    this.#chunk.set(length === message.length ? message : message.subarray(0, length), this.#chunkFill);
    this.#chunkFill += length;
    this.#chunk[this.#chunkFill++] = NL;
    this.#bytes += length + 1;
    this.#writing ??= this.#drain();
  }

  // The last chunk takes no more lines: the part becomes what it holds.
  #closeChunk(): void {
    if (this.#chunk === null) return;
    this.#parts[this.#parts.length - 1] = this.#chunk.subarray(0, this.#chunkFill);
    this.#chunk = null;
    this.#chunkFill = 0;
  }

  /** Resolves when everything logged so far has been written. */
  async flushed(): Promise<void> {
    while (this.#writing) await this.#writing;
  }

  /** True while stdout is far behind but still taking writes: the senders should wait (Reader). */
  get behind(): boolean {
    return this.#bytes > LOG_BACKLOG_BYTES && !this.#stalled();
  }

  /** Resolves once stdout is no longer behind: caught up, or stopped (then lines are dropped). */
  async caughtUp(): Promise<void> {
    while (this.behind) {
      await settleWithin(LOG_STALL_MS, [new Promise<void>((resolve) => this.#waiters.push(resolve))]);
    }
  }

  #append(line: string): void {
    if (this.#bytes > LOG_BACKLOG_BYTES && this.#stalled()) {
      this.#dropped++;
      return;
    }
    this.#closeChunk();
    const parts = this.#parts;
    if (typeof parts[parts.length - 1] === "string") parts[parts.length - 1] += line + "\n";
    else parts.push(line + "\n");
    this.#bytes += line.length + 1; // for text, its UTF-16 length until it is encoded
    this.#writing ??= this.#drain();
  }

  /** Encodes a run of events, and counts it in bytes from now on. */
  #encode(text: string): Uint8Array {
    const bytes = encoder.encode(text);
    this.#bytes += bytes.length - text.length;
    return bytes;
  }

  #stalled(): boolean {
    return Date.now() - this.#lastProgress > LOG_STALL_MS;
  }

  async #drain(): Promise<void> {
    this.#lastProgress = Date.now();
    try {
      for (;;) {
        // Let more lines join the batch; the timer holds the process open until they are written.
        await new Promise((go) => setTimeout(go, LOG_GATHER_MS));
        if (this.#parts.length === 0) break;
        this.#closeChunk();
        if (this.#dropped > 0) {
          const note = encoder.encode(`(${this.#dropped} log lines dropped: stdout was slow)\n`);
          this.#parts.push(note);
          this.#bytes += note.length;
          this.#dropped = 0;
        }
        const parts = this.#parts.map((part) => typeof part === "string" ? this.#encode(part) : part);
        this.#parts = [];
        await writeCoalesced(this.#out!, parts, this.#scratch, (n) => {
          this.#bytes -= n;
          this.#lastProgress = Date.now();
          if (this.#waiters.length > 0 && this.#bytes <= LOG_BACKLOG_BYTES) {
            for (const wake of this.#waiters.splice(0)) wake();
          }
        });
      }
    } catch (e) {
      if (!isDisconnect(e)) throw e;
      this.#out = null; // stdout is gone: go on serving without a log
    } finally {
      this.#writing = null;
      for (const wake of this.#waiters.splice(0)) wake();
    }
  }
}

// =============================================================================================
// 3. Rooms, names and commands
//
// admit() and leave() (section 1) put a client in a room and take it out through enterRoom()
// and exitRoom(); handleLine() hands a line that starts with "/" to runCommand(). The directory
// knows every room and nick, and is the one place where case is folded: "Dev" and "dev" are the
// same room, "Ann" and "ann" the same nick.

/**
 * The lines the page's script reads to follow the room, its members and the names: the server
 * writes every one of them with these (nowhere with a literal of its own), and the page matches
 * them (`receive()` in chat/page.js). Change one, and change the page with it:
 * tests/chat_server_web_test.ts feeds each to the page's script.
 */
export const PAGE_READS = {
  /** The seed's join line: the page asks /who again. */
  joined: (address: string) => `Client joined ${address}`,
  /** The seed's leave line, with ` (reason)` when there is one. */
  left: (label: string, why = "") => `Client left ${label}${why}`,
  renamed: (old: string, nick: string) => `${old} is now known as ${nick}`,
  nowKnownAs: (nick: string) => `You are now known as ${nick}`,
  /** The first line of /who's answer: the page takes the room's name and the count from it. */
  whoHeader: (room: string, count: number) => `In ${room} (${count}):`,
  nowIn: (room: string, count: number) => `You are now in ${room} (${count}); /who lists who is here`,
  hasJoined: (label: string, room: string) => `${label} has joined ${room}`,
  leftFor: (label: string, from: string, to: string) => `${label} has left ${from} for ${to}`,
  /** A chat line, as Client.framed() builds it in bytes. */
  said: (label: string, text: string) => `[${label}] ${text}`,
  privately: (label: string, text: string) => `(private) [${label}] ${text}`,
  /** A room's topic: on entering it, and for /topic. The page shows it in its header. */
  topic: (room: string, text: string) => `Topic of ${room}: ${text}`,
};

/** Longest nick or room name, in characters. */
const MAX_NAME = 32;

let lastName = "", lastKey = "";

/** The rooms by name and the clients by nick, whatever the case. Does no I/O. */
export class Directory {
  readonly lobby: Room = new Room(LOBBY);
  private readonly rooms = new Map<string, Room>([[Directory.key(LOBBY), this.lobby]]);
  private readonly nicks = new Map<string, Client>();
  /** Web pages by their token (section 5). */
  readonly pages = new Map<string, Client>();

  /**
   * The rule for comparing names, here and across instances: Unicode compatibility
   * normalisation, then case folding (upper then lower case folds `ß` to `ss`), so that `Ann`,
   * `ANN` and a full-width `ann` (U+FF41 U+FF4E U+FF4E) are one name, and so are `straße` and
   * `STRASSE`.
   */
  static key(name: string): string {
    // The last answer is kept: a room's name is asked for on every line said in it.
    if (name !== lastName) {
      [lastName, lastKey] = [name, name.normalize("NFKC").toUpperCase().toLowerCase().normalize("NFKC")];
    }
    return lastKey;
  }

  /** True if two names are the same name. */
  static same(a: string, b: string): boolean {
    return Directory.key(a) === Directory.key(b);
  }

  /** The room of that name, if it has members (or is the lobby). */
  room(name: string): Room | undefined {
    return this.rooms.get(Directory.key(name));
  }

  /** The room of that name, made if need be; it keeps the case it was first written in. */
  openRoom(name: string): Room {
    const key = Directory.key(name);
    let room = this.rooms.get(key);
    if (!room) this.rooms.set(key, room = new Room(name));
    return room;
  }

  /** Every room with members, and the lobby. */
  allRooms(): IterableIterator<Room> {
    return this.rooms.values();
  }

  /** Moves a client into a room (out of its old one first, with removeMember()). */
  addMember(client: Client, room: Room): void {
    client.room = room;
    room.join(client);
    if (client.page) room.pages++;
  }

  /** Takes a client out of its room, and forgets the room when it empties (the lobby stays). */
  removeMember(client: Client): void {
    const room = client.room;
    if (room.part(client) && client.page) room.pages--;
    if (room.members.size === 0 && room !== this.lobby) this.rooms.delete(Directory.key(room.name));
  }

  /** Who has that nick, if anyone. */
  holder(nick: string): Client | undefined {
    return this.nicks.get(Directory.key(nick));
  }

  /** Gives a client a nick (or none), and what others see it as. */
  rename(client: Client, nick: string | null): void {
    if (client.nick !== null) this.nicks.delete(Directory.key(client.nick));
    client.nick = nick;
    if (nick !== null) this.nicks.set(Directory.key(nick), client);
    client.label = nick ?? client.address;
    client.prefix = null;
  }

  /** Frees a leaving client's nick; it keeps its label for the goodbye. */
  forget(client: Client): void {
    if (client.nick !== null && this.holder(client.nick) === client) {
      this.nicks.delete(Directory.key(client.nick));
    }
    if (client.page && this.pages.get(client.page.token) === client) this.pages.delete(client.page.token);
  }
}

/** Puts a client in a room; tells the bus, and logs when the room grows past the announcement limit. */
function enterRoom(server: ChatServer, client: Client, room: Room): void {
  server.directory.addMember(client, room);
  if (server.bus) {
    if (room.members.size === 1) server.bus.watch(room.name);
    server.bus.present(presenceOf(client));
  }
  if (client.page) showRoom(server, client, room); // section 5; with a bus, once it has read the room
  const limit = server.limits.announceLimit;
  if (room.members.size === limit + 1) {
    server.log.event(
      `Room ${room.name} has over ${limit} members: joins and leaves are no longer announced`,
      { event: "quiet", room: room.name, members: room.members.size },
    );
  }
}

/** Takes a client out of its room; tells the bus, and logs when the room is small again. */
function exitRoom(server: ChatServer, client: Client): void {
  const room = client.room;
  server.directory.removeMember(client);
  if (server.bus && room.members.size === 0 && room !== server.directory.lobby) server.bus.unwatch(room.name);
  const limit = server.limits.announceLimit;
  if (room.members.size === limit) {
    server.log.event(`Room ${room.name} has ${limit} members again: joins and leaves are announced`, {
      event: "loud",
      room: room.name,
      members: room.members.size,
    });
  }
}

/**
 * Announces a join or leave to a room, unless the room, counting the one coming or going, is
 * over the announcement limit; the bus hears of it, and it is logged either way.
 */
function announce(
  server: ChatServer,
  room: Room,
  sender: Client | null,
  text: string,
  event: Record<string, unknown>,
  size = room.members.size,
): void {
  if (size <= server.limits.announceLimit) toRoom(server, room, sender, encoder.encode(text + "\r\n"), false);
  server.log.event(text, event);
}

/**
 * Says `message` (with its CRLF) to a room, from `sender` (who is not sent it). Chat (`kept`) goes
 * into the room's history at its position. With --redis the bus carries it to every instance's
 * members, these included, in the one order of the room's stream (section 5); while Redis is away
 * it is said here at once, and the bus sends it on when Redis returns.
 */
function toRoom(
  server: ChatServer,
  room: Room,
  sender: Client | null,
  message: Uint8Array,
  kept: boolean,
): void {
  server.gathering.say(); // what was said before this comes first (relay)
  if (server.bus?.send(room.name, message, kept, sender)) return;
  // With a bus, a line said here while Redis is away gets its position (and its place in the
  // history) when Redis has it.
  if (!kept || server.bus) return room.broadcastExcept(sender, message);
  room.broadcastKept(sender, message, server.history.keep(room.name, message));
}

/**
 * Says a line to the client's room (`/me`, a nick change): to the room, the bus and the log, and,
 * if it is chat (`kept`), to the room's history.
 */
function sayToRoom(
  server: ChatServer,
  client: Client,
  text: string,
  event: Record<string, unknown>,
  kept = false,
): void {
  toRoom(server, client.room, client, encoder.encode(text + "\r\n"), kept);
  server.log.event(text, event);
}

function presenceOf(client: Client): Presence {
  return { address: client.address, nick: client.nick, room: client.room.name };
}

/** A /command: how it is written, what /help says of it, and what it does. */
interface Command {
  usage: string;
  help: string;
  /** For operators only (/oper). */
  oper?: boolean;
  /** `rest` is what follows the command word, trimmed. A command that asks Redis returns a promise. */
  run(server: ChatServer, client: Client, rest: string): void | Promise<void>;
}

/** Every command, in /help's order. */
const COMMANDS: Map<string, Command> = new Map([
  ["nick", {
    usage: "/nick NAME",
    help: "take a name (1-32 characters, no spaces); others see it instead of your address",
    run: changeNick,
  }],
  ["who", { usage: "/who", help: "who is in this room", run: listWho }],
  ["me", { usage: "/me ACTION", help: "say what you are doing: * NAME ACTION", run: sayAction }],
  ["msg", { usage: "/msg NAME TEXT", help: "a private message to one person", run: sendPrivate }],
  ["join", { usage: "/join ROOM", help: "leave this room for ROOM, making it if need be", run: joinRoom }],
  ["rooms", { usage: "/rooms", help: "the rooms and how many are in each", run: listRooms }],
  ["history", {
    usage: "/history [N]",
    help: "the last N lines said in this room (default 20)",
    run: showHistory,
  }],
  ["quit", {
    usage: "/quit [REASON]",
    help: "leave",
    run: (server, c, rest) => server.sendOff(c, "Goodbye", rest),
  }],
  ["topic", {
    usage: "/topic [TEXT]",
    help: "the room's topic; operators set it (- clears it)",
    run: roomTopic,
  }],
  ["oper", { usage: "/oper PASSWORD", help: "become an operator", run: becomeOper }],
  ["help", {
    usage: "/help",
    help: "this list",
    run: (_, client) => (client.oper ? OPER_HELP_LINES : HELP_LINES).forEach((line) => client.tell(line)),
  }],
  // For operators only: /help lists them to operators alone.
  ["kick", { usage: "/kick NAME [REASON]", help: "disconnect NAME, saying why", oper: true, run: kickUser }],
  ["ban", {
    usage: "/ban MASK [TIME] [REASON]",
    help: "refuse an address, a CIDR block or a nick's address; TIME like 10m, 2h, 1d",
    oper: true,
    run: banMask,
  }],
  ["unban", { usage: "/unban MASK", help: "lift a ban", oper: true, run: unbanMask }],
  ["bans", { usage: "/bans", help: "the bans in force", oper: true, run: listBans }],
  ["mute", {
    usage: "/mute NAME [TIME]",
    help: "nobody hears NAME, for TIME or until unmuted",
    oper: true,
    run: (server, op, rest) => muteUser(server, op, rest, "mute"),
  }],
  ["unmute", {
    usage: "/unmute NAME",
    help: "NAME is heard again",
    oper: true,
    run: (server, op, rest) => muteUser(server, op, rest, "unmute"),
  }],
]);

const HELP_LINES: string[] = [
  "Commands:",
  ...[...COMMANDS.values()].filter((c) => !c.oper).map((c) => `  ${c.usage.padEnd(17)}${c.help}`),
  `  ${"//text".padEnd(17)}send a line that starts with /`,
];
const OPER_HELP_LINES: string[] = [
  ...HELP_LINES,
  "Operator commands:",
  ...[...COMMANDS.values()].filter((c) => c.oper).map((c) => `  ${c.usage.padEnd(27)}${c.help}`),
];

/** Runs a /command line for a client (handleLine, section 1). */
function runCommand(server: ChatServer, client: Client, line: string): void | Promise<void> {
  const match = /^\/(\S*)\s*(.*)$/.exec(line)!;
  const command = COMMANDS.get(match[1].toLowerCase());
  if (!command) return client.tell(`Unknown command /${match[1]}; try /help`);
  if (command.oper && !client.oper) return client.tell(`/${match[1].toLowerCase()} is for operators only`);
  return command.run(server, client, match[2].trim());
}

/** /me ACTION: the room sees `* NAME ACTION`. */
function sayAction(server: ChatServer, client: Client, action: string): void {
  if (!action) return client.tell("Usage: /me ACTION");
  if (muted(client)) return;
  const text = `* ${client.label} ${action}`;
  sayToRoom(
    server,
    client,
    text,
    { event: "me", room: client.room.name, from: client.label, text: action },
    true,
  );
  if (client.page) client.tell(text); // a page shows what its user said; a terminal already has
}

/** /msg NAME TEXT: only NAME (a nick, or a host:port) hears it; the log says who wrote to whom, never what. */
function sendPrivate(server: ChatServer, client: Client, rest: string): void | Promise<void> {
  const m = /^(\S+)\s+(.+)$/.exec(rest);
  if (!m) return client.tell("Usage: /msg NAME TEXT");
  if (muted(client)) return;
  const [name, text] = [m[1], m[2]];
  let to = server.directory.holder(name) ?? [...server.clients].find((c) => c.address === name);
  if (to && to.leaving !== null) to = undefined; // on its way out
  if (!to && server.bus) return whisperAcross(server, client, name, text);
  if (!to) return client.tell(`No such user: ${name}`);
  to.tell(PAGE_READS.privately(client.label, text));
  client.tell(`(private to ${to.label}) ${text}`);
  server.log.event(`${client.label} sent a private message to ${to.label}`, {
    event: "msg",
    from: client.label,
    to: to.label,
  });
}

/** /msg to someone on another instance. */
async function whisperAcross(server: ChatServer, client: Client, name: string, text: string): Promise<void> {
  if (!await answerWithin(server.bus!.whisper(name, PAGE_READS.privately(client.label, text)), false)) {
    return client.tell(`No such user: ${name}`);
  }
  client.tell(`(private to ${name}) ${text}`);
  server.log.event(`${client.label} sent a private message to ${name}`, {
    event: "msg",
    from: client.label,
    to: name,
  });
}

/** /who: the members of the client's room, here and on other instances. */
function listWho(server: ChatServer, client: Client): void | Promise<void> {
  return withOthers(server, client, (others) => {
    const room = client.room;
    const remote = others.filter((p) => Directory.same(p.room, room.name));
    client.tell(PAGE_READS.whoHeader(room.name, room.members.size + remote.length));
    const show = (p: { nick: string | null; address: string }) =>
      p.nick ? `${p.nick} (${p.address})` : p.address;
    for (const m of room.members) client.tell(`  ${show(m)}${m === client ? " (you)" : ""}`);
    for (const p of remote) client.tell(`  ${show(p)}`);
  });
}

/** /rooms: every room with members, here and on other instances. */
function listRooms(server: ChatServer, client: Client): void | Promise<void> {
  return withOthers(server, client, (others) => {
    const counts = new Map<string, [string, number]>([[Directory.key(LOBBY), [LOBBY, 0]]]);
    const count = (name: string, n: number) => {
      const entry = counts.get(Directory.key(name)) ?? [name, 0];
      counts.set(Directory.key(name), [entry[0], entry[1] + n]);
    };
    for (const r of server.directory.allRooms()) count(r.name, r.members.size);
    for (const p of others) count(p.room, 1);
    const list = [...counts.values()].filter(([name, n]) => n > 0 || name === LOBBY);
    client.tell(`Rooms (${list.length}):`);
    for (const [name, n] of list.sort((a, b) => a[0].localeCompare(b[0]))) {
      client.tell(`  ${name} ${n}${Directory.same(name, client.room.name) ? " (you are here)" : ""}`);
    }
  });
}

/**
 * Answers with the members on other instances: at once and none without --redis; with it, once
 * Redis answers, or with a note that it did not within REDIS_ANSWER_MS.
 */
function withOthers(
  server: ChatServer,
  client: Client,
  answer: (others: Presence[]) => void,
): void | Promise<void> {
  if (!server.bus) return answer([]);
  return answerWithin(server.bus.others(), null).then((others) => {
    answer(others ?? []);
    if (others === null) client.tell("(other servers cannot be asked right now)");
  });
}

/** /nick NAME: unique whatever the case, and across instances with --redis. */
export function changeNick(server: ChatServer, client: Client, nick: string): void | Promise<void> {
  const problem = checkName(nick, "nick");
  if (problem) return client.tell(`${problem}; you are still ${client.label}`);
  const holder = server.directory.holder(nick);
  if (holder && holder !== client) {
    return client.tell(`The nick ${nick} is taken; you are still ${client.label}`);
  }
  const bus = server.bus;
  if (bus && !holder) {
    return answerWithin(bus.claimNick(nick), true).then((mine) => {
      if (client.closed || client.leaving !== null) return bus.releaseNick(nick);
      // Another of ours may have taken it while Redis answered.
      if (!mine || (server.directory.holder(nick) ?? client) !== client) {
        return client.tell(`The nick ${nick} is taken; you are still ${client.label}`);
      }
      takeNick(server, client, nick);
    });
  }
  takeNick(server, client, nick);
}

function takeNick(server: ChatServer, client: Client, nick: string): void {
  const old = client.label;
  if (client.nick !== null && !Directory.same(client.nick, nick)) server.bus?.releaseNick(client.nick);
  server.directory.rename(client, nick);
  server.bus?.present(presenceOf(client));
  client.tell(PAGE_READS.nowKnownAs(nick));
  const text = PAGE_READS.renamed(old, nick);
  sayToRoom(server, client, text, { event: "nick", peer: client.address, from: old, to: nick });
}

/** /join ROOM: leaves this room for ROOM, making it if need be. */
export function joinRoom(server: ChatServer, client: Client, name: string): void | Promise<void> {
  const problem = checkName(name, "room name");
  if (problem) return client.tell(`${problem}; you are still in ${client.room.name}`);
  const room = server.directory.openRoom(name);
  if (room === client.room) return client.tell(`You are already in ${room.name}`);
  const old = client.room;
  exitRoom(server, client);
  // Into the new room (and the directory) first: whoever hears of the move can then /who it.
  enterRoom(server, client, room);
  announce(server, old, client, PAGE_READS.leftFor(client.label, old.name, room.name), {
    event: "part",
    room: old.name,
    peer: client.address,
    nick: client.nick,
  }, old.members.size + 1);
  announce(server, room, client, PAGE_READS.hasJoined(client.label, room.name), {
    event: "enter",
    room: room.name,
    peer: client.address,
    nick: client.nick,
  });
  // The count is of everyone in the room, on every instance, as /who's is.
  return withOthers(server, client, (others) => {
    const remote = others.filter((p) => Directory.same(p.room, room.name)).length;
    client.tell(PAGE_READS.nowIn(room.name, room.members.size + remote));
    showTopic(server, client, room);
  });
}

/** /history [N]: the room's last N chat lines, each with the time it was said. */
function showHistory(server: ChatServer, client: Client, rest: string): void {
  const history = server.history;
  if (history.limit === 0) return client.tell("This server keeps no history (--history-lines 0)");
  const n = rest === "" ? HISTORY_SHOWN : Number(rest);
  if (!Number.isInteger(n) || n < 1) return client.tell("Usage: /history [N], N a whole number from 1");
  let lines = history.last(client.room.name, Math.min(n, history.limit));
  if (lines.length === 0) return client.tell(`Nothing has been said in ${client.room.name} yet`);
  // An answer is at most what puts a client behind (a quarter of --sendq): asking twice at once
  // must not cut off a client that reads.
  let bytes = 0, from = lines.length;
  while (from > 0 && (bytes += lines[from - 1].message.length + 12) <= server.flusher.paceBytes) from--;
  const asked = lines.length;
  lines = lines.slice(from);
  client.tell(
    `History of ${client.room.name} (the last ${plural(lines.length, "line")}` +
      (lines.length < asked ? ` of ${asked}: more would not fit your send queue):` : "):"),
  );
  for (const { time, message } of lines) {
    const clock = new Date(time).toTimeString().slice(0, 5);
    client.tell(`  (${clock}) ${lineText(message)}`);
  }
}

// ---- Operators: /oper, then /kick, /ban, /mute and /topic (the decisions are kept in section 4) ----

/** /oper PASSWORD: the client becomes an operator of the whole server; wrong tries are counted. */
function becomeOper(server: ChatServer, client: Client, given: string): void {
  const moderation = server.moderation;
  if (!moderation.enabled) return client.tell("Operators are not enabled on this server");
  if (!given) return client.tell("Usage: /oper PASSWORD");
  if (client.oper) return client.tell("You are an operator already");
  const peer = { peer: client.address, nick: client.nick };
  if (!moderation.check(given)) {
    const tries = moderation.wrongTry(client);
    server.log.event(`Wrong operator password from ${client.address}`, { event: "oper_failed", ...peer });
    if (tries >= OPER_TRIES) {
      return server.sendOff(client, "Too many wrong operator passwords", "wrong passwords");
    }
    return client.tell(`Wrong operator password (${tries} of ${OPER_TRIES} tries a minute)`);
  }
  client.oper = true;
  client.tell("You are now an operator; /help lists what operators can do");
  server.log.event(`${client.label} is now an operator`, { event: "oper", ...peer });
}

/** /kick NAME [REASON]: NAME is told why and disconnected, wherever it is; its room hears why. */
function kickUser(server: ChatServer, op: Client, rest: string): void | Promise<void> {
  const [, name, reason] = /^(\S*)\s*(.*)$/.exec(rest)!;
  if (!name) return op.tell("Usage: /kick NAME [REASON]");
  return decide(server, op, {
    kind: "kick",
    key: name,
    text: reason,
    until: null,
    by: op.label,
    at: Date.now(),
  });
}

/** /mute NAME [TIME] and /unmute NAME: what NAME says reaches nobody (for TIME, or until unmuted). */
function muteUser(
  server: ChatServer,
  op: Client,
  rest: string,
  kind: "mute" | "unmute",
): void | Promise<void> {
  const [, name, time] = /^(\S*)\s*(.*)$/.exec(rest)!;
  if (!name || (kind === "unmute" && time)) return op.tell(`Usage: ${COMMANDS.get(kind)!.usage}`);
  const ms = time ? parseDuration(time) : 0;
  if (ms === null) return op.tell(`"${time}" is not a duration: write 90s, 10m, 2h or 1d, up to 366d`);
  const until = ms ? Date.now() + ms : null;
  return decide(server, op, { kind, key: name, text: "", until, by: op.label, at: Date.now() });
}

/**
 * /ban MASK [TIME] [REASON]: MASK is an address, a CIDR block, or a nick (that client's address).
 * Whoever it covers is cut off at once, and refused at the door until it ends.
 */
function banMask(server: ChatServer, op: Client, rest: string): void | Promise<void> {
  const [, target, time, reason] = /^(\S*)\s*(\d\S*)?\s*(.*)$/.exec(rest)!;
  if (!target) return op.tell("Usage: /ban MASK [TIME] [REASON], MASK an address, a CIDR block or a nick");
  const ms = time === undefined ? 0 : parseDuration(time);
  if (ms === null) return op.tell(`"${time}" is not a duration: write 90s, 10m, 2h or 1d, up to 366d`);
  const ban = (mask: string): void => {
    if (inBlocks(parseBlocks([mask]), op.ip)) {
      return op.tell(`A ban on ${mask} would cover you too; not banned`);
    }
    const until = ms ? Date.now() + ms : null;
    decide(server, op, { kind: "ban", key: mask, text: reason, until, by: op.label, at: Date.now() });
  };
  const mask = parseMask(target);
  if (mask) return ban(mask);
  if (target.includes("/") || nodeNet().isIP(target.split("/")[0])) {
    return op.tell(`"${target}" is not an address or a CIDR block like 10.0.0.0/8 or fd00::/8`);
  }
  return whereIs(server, target).then((where) => {
    const mask = where && parseMask(hostOf(where.address));
    return mask ? ban(mask) : op.tell(`No such user: ${target}`);
  });
}

/** /unban MASK: lifts a ban, on every instance. */
function unbanMask(server: ChatServer, op: Client, rest: string): void {
  const mask = parseMask(rest);
  if (!mask) return op.tell("Usage: /unban MASK, as /bans lists it");
  if (!server.moderation.allBans().some((b) => b.key === mask)) return op.tell(`No ban on ${mask}`);
  decide(server, op, { kind: "unban", key: mask, text: "", until: null, by: op.label, at: Date.now() });
}

/** /bans: the bans in force, with when they end, who made them and why. */
function listBans(server: ChatServer, op: Client): void {
  const bans = server.moderation.allBans();
  op.tell(bans.length === 0 ? "No bans" : `Bans (${bans.length}):`);
  for (const b of bans) op.tell(`  ${b.key} ${endOf(b.until)}, by ${b.by}${because(b.text)}`);
}

/** /topic [TEXT]: anyone sees the room's topic; an operator sets it (`-` clears it). */
function roomTopic(server: ChatServer, client: Client, text: string): void {
  const room = client.room.name;
  if (!text) {
    const topic = server.moderation.topic(room);
    return client.tell(topic ? PAGE_READS.topic(room, topic.text) : `${room} has no topic`);
  }
  if (!client.oper) return client.tell("Setting the topic is for operators only");
  if (safeBusText(text) !== text) return client.tell("A topic cannot hold control characters");
  if (encoder.encode(text).length > MAX_TOPIC) return client.tell(`A topic is at most ${MAX_TOPIC} bytes`);
  const rule: Rule = {
    kind: "topic",
    key: room,
    text: text === "-" ? "" : text,
    until: null,
    by: client.label,
    at: 0,
  };
  decide(server, client, { ...rule, at: Date.now() });
}

/**
 * Carries out an operator's decision: here, on the bus for every instance, and in the log. A kick
 * or mute must find its user, here or (with --redis) on another instance.
 */
function decide(server: ChatServer, op: Client, rule: Rule): void | Promise<void> {
  if (rule.kind === "kick" || rule.kind === "mute" || rule.kind === "unmute") {
    const here = findClient(server, rule.key);
    if (here === op && rule.kind !== "unmute") return op.tell(`You cannot ${rule.kind} yourself`);
    if (!here) {
      return whereIs(server, rule.key).then((there) => {
        if (!there) return op.tell(`No such user: ${rule.key}`);
        server.bus!.share(rule);
        confirm(server, op, rule);
      });
    }
    obey(server, { ...rule, key: here.address }); // here: the bus need not hear of it
    return confirm(server, op, rule);
  }
  obey(server, rule);
  server.bus?.share(rule);
  confirm(server, op, rule);
}

function confirm(server: ChatServer, op: Client, rule: Rule): void {
  const what = {
    ban: `banned ${rule.key} ${endOf(rule.until)}${because(rule.text)}`,
    unban: `lifted the ban on ${rule.key}`,
    topic: rule.text ? `set the topic of ${rule.key}` : `cleared the topic of ${rule.key}`,
    kick: `kicked ${rule.key}${because(rule.text)}`,
    mute: `muted ${rule.key} ${endOf(rule.until)}`,
    unmute: `unmuted ${rule.key}`,
  }[rule.kind];
  if (rule.kind !== "topic") op.tell(`You ${what}`);
  const { kind, key, text } = rule, until = rule.until === null ? null : new Date(rule.until).toISOString();
  server.log.event(`${op.label} ${what}`, { event: kind, by: op.label, peer: op.address, key, text, until });
}

/**
 * Makes a decision hold on this instance, whoever made it (an operator here, or on another
 * instance through the bus): bans cut off whom they cover, a kick or mute finds its user here if it
 * is here, a topic is kept and its room hears of it.
 */
function obey(server: ChatServer, rule: Rule, quiet = false): void {
  const moderation = server.moderation;
  if (rule.kind === "kick" || rule.kind === "mute" || rule.kind === "unmute") {
    const client = findClient(server, rule.key);
    if (!client || client.leaving !== null) return;
    if (rule.kind === "kick") {
      server.limits.dropped.kicked++;
      const why = `kicked by ${rule.by}${because(rule.text)}`;
      return server.sendOff(client, `You were ${why}`, why);
    }
    client.mutedUntil = rule.kind === "mute" ? rule.until ?? Infinity : 0;
    return client.tell(
      rule.kind === "mute"
        ? `You have been muted by ${rule.by} ${endOf(rule.until)}: nobody hears what you say`
        : `You have been unmuted by ${rule.by}: you are heard again`,
    );
  }
  if (!moderation.hold(rule)) return;
  server.history.file?.keepRule(rule);
  if (rule.kind === "ban") {
    for (const client of server.clients) {
      if (moderation.banOf(client.ip) !== rule || client.leaving !== null) continue;
      server.limits.dropped.banned++;
      server.sendOff(client, `You are banned from this server${because(rule.text)}`, `banned by ${rule.by}`);
    }
  }
  if (rule.kind !== "topic" || quiet) return;
  const room = server.directory.room(rule.key);
  const said = rule.text ? `${rule.by} set the topic: ${rule.text}` : `${rule.by} cleared the topic`;
  for (const client of room?.members ?? []) client.tell(said);
}

/** True while nobody is to hear the client (/mute): it was told so once, when it was muted. */
function muted(client: Client): boolean {
  if (client.mutedUntil > Date.now()) return true;
  client.mutedUntil = 0;
  return false;
}

/** Shows the room's topic to a client that has just entered it, if the room has one. */
function showTopic(server: ChatServer, client: Client, room: Room): void {
  const topic = server.moderation.topic(room.name);
  if (topic) client.tell(PAGE_READS.topic(room.name, topic.text));
}

/** A local client by nick or by `host:port`, unless it is on its way out. */
function findClient(server: ChatServer, name: string): Client | undefined {
  const found = server.directory.holder(name) ?? [...server.clients].find((c) => c.address === name);
  return found?.leaving === null ? found : undefined;
}

/** Where a nick or `host:port` is: here, or (with --redis) on another instance; null if nowhere. */
async function whereIs(server: ChatServer, name: string): Promise<Presence | null> {
  const here = findClient(server, name);
  if (here) return presenceOf(here);
  const others = server.bus ? await answerWithin(server.bus.others(), null) : null;
  return others?.find((p) => p.address === name || (p.nick !== null && Directory.same(p.nick, name))) ?? null;
}

/** `until 14:05` (today), `until 2026-12-24 14:05`, or `until lifted`. */
function endOf(until: number | null): string {
  if (until === null) return "until lifted";
  const at = new Date(until), clock = at.toTimeString().slice(0, 5);
  if (at.toDateString() === new Date().toDateString()) return `until ${clock}`;
  const day = [at.getFullYear(), at.getMonth() + 1, at.getDate()].map((n) => String(n).padStart(2, "0"));
  return `until ${day.join("-")} ${clock}`;
}

/** How many lines /history shows when it is not told. */
const HISTORY_SHOWN = 20;
/**
 * Rooms whose history is kept at once, in memory and in a --history file. Past that, one room loses
 * its own: first a room where nothing was kept (a page only looked in), then one with nobody in
 * it here, and among those the one where a line was last kept longest ago: rooms nobody speaks in
 * never push out those people use.
 */
const HISTORY_ROOMS = 64;
/** Bytes of lines a room keeps at most, whatever --history-lines says: HISTORY_ROOMS times this in all. */
const HISTORY_ROOM_BYTES = 512 * 1024;

/** Where a room's history stands: its epoch, and the position of its last line (0 before any). */
export interface Position {
  epoch: string;
  seq: number;
}

/** A line in a room's history: its position, when it was said, and the bytes the room was sent. */
export interface KeptLine {
  seq: number;
  time: number;
  message: Uint8Array;
}

/**
 * One room's history: its last lines, the position of the newest, and its epoch. The lines' bytes
 * are copied into one buffer that wraps around, and each line's start, length, position and time
 * into one array of numbers, so a ring holds no object per line. Kept lines live for a while, and as
 * objects the garbage collector would copy each of them and then promote it: that made the young
 * generation grow to 8 MiB and doubled the page faults under load (DESIGN.md, 2026-12-02).
 */
class Ring {
  epoch: string;
  /** The position of the newest line (0 before any). */
  seq: number;
  /** When a line was last kept (0: never), for choosing which room loses its history. */
  used = 0;
  /** Lines kept, and their bytes. */
  count = 0;
  bytes = 0;
  private data = NO_BYTES;
  /** Where the oldest line's bytes start in `data`, and its slot in `meta`. */
  private head = 0;
  private first = 0;
  /** Four numbers a line: where its bytes start, how many, its position, and when it was said. */
  private meta = new Float64Array(0);

  constructor(epoch: string, seq = 0) {
    this.epoch = epoch;
    this.seq = seq;
  }

  /** Starts again under `epoch`, at `seq`, with no lines. */
  clear(epoch: string, seq: number): void {
    this.epoch = epoch;
    this.seq = seq;
    this.count =
      this.bytes =
      this.head =
      this.first =
        0;
  }

  /** The oldest line's position, or the next one's if none is kept (what a file may forget before). */
  get oldest(): number {
    return this.count === 0 ? this.seq + 1 : this.meta[4 * this.first + 2];
  }

  /** Keeps a copy of `message`, dropping the oldest lines past `limit` lines or HISTORY_ROOM_BYTES. */
  push(seq: number, time: number, message: Uint8Array, limit: number): void {
    const size = message.length;
    while (this.count > 0 && (this.count >= limit || this.bytes + size > HISTORY_ROOM_BYTES)) {
      this.dropOldest();
    }
    if (this.bytes + size > this.data.length) this.grow(size);
    if (4 * (this.count + 1) > this.meta.length) this.growMeta(limit);
    const room = this.data.length, at = (this.head + this.bytes) % room;
    const split = Math.min(size, room - at); // a line that reaches the end goes on at the start
    this.data.set(split === size ? message : message.subarray(0, split), at);
    if (split < size) this.data.set(message.subarray(split), 0);
    const slot = 4 * ((this.first + this.count) % (this.meta.length / 4));
    this.meta[slot] = at, this.meta[slot + 1] = size, this.meta[slot + 2] = seq, this.meta[slot + 3] = time;
    this.count++;
    this.bytes += size;
  }

  /** The `i`th line kept, oldest first, with a copy of its bytes. */
  line(i: number): KeptLine {
    const slot = 4 * ((this.first + i) % (this.meta.length / 4));
    const at = this.meta[slot], size = this.meta[slot + 1], room = this.data.length;
    const message = new Uint8Array(size);
    const split = Math.min(size, room - at);
    message.set(this.data.subarray(at, at + split));
    if (split < size) message.set(this.data.subarray(0, size - split), split);
    return { seq: this.meta[slot + 2], time: this.meta[slot + 3], message };
  }

  private dropOldest(): void {
    const size = this.meta[4 * this.first + 1];
    this.head = (this.head + size) % this.data.length;
    this.first = (this.first + 1) % (this.meta.length / 4);
    this.count--;
    this.bytes -= size;
  }

  // Doubles the buffer (from 4 KiB, up to HISTORY_ROOM_BYTES, or one line's size), oldest line first.
  private grow(size: number): void {
    const want = Math.max(HISTORY_ROOM_BYTES, size);
    const data = new Uint8Array(Math.min(want, Math.max(4096, 2 * this.data.length, this.bytes + size)));
    const split = Math.min(this.bytes, this.data.length - this.head);
    data.set(this.data.subarray(this.head, this.head + split));
    data.set(this.data.subarray(0, this.bytes - split), split);
    const moved = this.head;
    for (let i = 0; i < this.count; i++) {
      const slot = 4 * ((this.first + i) % (this.meta.length / 4));
      this.meta[slot] = (this.meta[slot] - moved + this.data.length) % this.data.length;
    }
    this.data = data;
    this.head = 0;
  }

  // Doubles the numbers (from 16 lines, up to `limit`), oldest line first.
  private growMeta(limit: number): void {
    const slots = this.meta.length / 4;
    const meta = new Float64Array(4 * Math.min(Math.max(limit, 1), Math.max(16, 2 * slots)));
    for (let i = 0; i < this.count; i++) {
      const from = 4 * ((this.first + i) % slots);
      meta.set(this.meta.subarray(from, from + 4), 4 * i);
    }
    this.meta = meta;
    this.first = 0;
  }
}

/**
 * The recent chat lines of each room (lines and `/me`; never joins, leaves or private messages,
 * which carry addresses and private text), kept in memory as the bytes the room was sent.
 *
 * Every kept line has a position: the room's sequence, 1, 2, 3... with no gaps, and the room's
 * epoch, a random value made when its history starts. A history that is lost (the process
 * restarts, or the room is forgotten to make room for another) starts again under a new epoch,
 * so that a reader that knew the old one can tell that what it missed is gone.
 */
export class RoomHistory {
  readonly limit: number;
  /** With --history FILE, where the rings are written, and read back from: set at start, before any room keeps a line (section 5). */
  file: HistoryStore | null;
  private readonly rooms = new Map<string, Ring>();

  /** Whether anyone is in a room (by its key), here: such a room keeps its history longer. */
  occupied: (key: string) => boolean = () => false;

  constructor(limit: number, file: HistoryStore | null = null) {
    this.limit = limit;
    this.file = file;
  }

  private ring(room: string): Ring {
    const key = Directory.key(room);
    let ring = this.rooms.get(key);
    if (!ring) {
      if (this.rooms.size >= HISTORY_ROOMS) this.forgetOne();
      ring = new Ring(crypto.randomUUID().slice(0, 8));
      const saved = this.file?.load(key, this.limit);
      if (saved) ring.clear(saved.epoch, saved.seq);
      for (const line of saved?.lines ?? []) ring.push(line.seq, line.time, line.message, this.limit);
      if (saved?.lines.length) ring.used = saved.lines.at(-1)!.time;
      this.rooms.set(key, ring);
    }
    return ring;
  }

  // Over HISTORY_ROOMS: a room where nothing was kept goes first, then an empty one, then the least used.
  private forgetOne(): void {
    let victim: string | null = null, worst = Infinity;
    for (const [key, ring] of this.rooms) {
      const rank = ring.used === 0 ? 0 : (this.occupied(key) ? 2 : 1) * 1e15 + ring.used;
      if (rank < worst) [victim, worst] = [key, rank];
    }
    this.rooms.delete(victim!);
    this.file?.forget(victim!);
  }

  /** Where a room stands now; a room that has kept nothing yet starts at 0 under a new epoch. */
  position(room: string): Position {
    const { epoch, seq } = this.ring(room);
    return { epoch, seq };
  }

  /** Keeps a line (`message`, with its CRLF) said in a room at `now`, and returns its position. */
  keep(room: string, message: Uint8Array, now = Date.now()): number {
    const ring = this.ring(room);
    const seq = ++ring.seq;
    ring.used = now;
    if (this.limit > 0) ring.push(seq, now, message, this.limit);
    this.file?.add(Directory.key(room), ring, { seq, time: now, message });
    return seq;
  }

  /**
   * Keeps a line whose position the bus gave it (section 5). A line from another epoch starts the
   * ring again: true then, for the room to be told that its history was reset.
   */
  put(room: string, at: Position, message: Uint8Array, now = Date.now()): boolean {
    const ring = this.ring(room);
    const reset = ring.epoch !== at.epoch && ring.seq > 0; // a room with nothing yet loses nothing
    if (ring.epoch !== at.epoch) ring.clear(at.epoch, 0);
    if (at.seq <= ring.seq) return false; // had it
    ring.seq = at.seq;
    ring.used = now;
    if (this.limit > 0) ring.push(at.seq, now, message, this.limit);
    return reset;
  }

  /** Replaces a room's history with what the bus has of it, when the instance starts reading it. */
  load(room: string, at: Position, lines: KeptLine[]): void {
    const ring = this.ring(room);
    ring.clear(at.epoch, at.seq);
    ring.used = Date.now();
    for (const line of lines.slice(-this.limit)) {
      if (this.limit > 0) ring.push(line.seq, line.time, line.message, this.limit);
    }
  }

  /** The last `n` lines kept for a room, oldest first. */
  last(room: string, n: number): KeptLine[] {
    // A room not yet in memory may still be in the file (after a restart, before anyone spoke).
    const ring = this.rooms.get(Directory.key(room)) ?? (this.file ? this.ring(room) : undefined);
    if (!ring) return [];
    const out = [];
    for (let i = Math.max(0, ring.count - n); i < ring.count; i++) out.push(ring.line(i));
    return out;
  }

  /** The lines kept after position `seq`, oldest first, and how many after it are no longer kept. */
  after(room: string, seq: number): { lines: KeptLine[]; missing: number } {
    const ring = this.ring(room);
    const lines = this.last(room, Math.max(0, ring.seq - seq));
    return { lines, missing: ring.seq - seq - lines.length };
  }
}

/**
 * Why `name` cannot be a nick or room name, or null if it can. The rules keep one name from
 * passing for another: no invisible or direction-changing characters (format characters such as
 * U+200B and U+202E), no name that starts with a combining mark, and no mixing of the Latin,
 * Greek and Cyrillic scripts, whose look-alikes (`bob` spelled with a Cyrillic o, U+043E) would
 * let a name pass for someone else's. A name wholly in one script is allowed, whatever it looks
 * like.
 */
export function checkName(name: string, what: string): string | null {
  const length = [...name].length;
  if (length < 1 || length > MAX_NAME) return `A ${what} has 1 to ${MAX_NAME} characters`;
  // Spaces would split commands; ':' and brackets would let a name pass for an address.
  if (/[\s:[\]\p{Cc}]/u.test(name)) return `A ${what} has no spaces, ':' or brackets`;
  if (/\p{Cf}/u.test(name)) return `A ${what} has no invisible or direction-changing characters`;
  if (/^\p{M}/u.test(name)) return `A ${what} starts with a letter, digit or sign, not an accent`;
  const scripts = [/\p{Script=Latin}/u, /\p{Script=Greek}/u, /\p{Script=Cyrillic}/u].filter((s) =>
    s.test(name)
  );
  if (scripts.length > 1) return `A ${what} does not mix Latin, Greek and Cyrillic letters`;
  return null;
}

// =============================================================================================
// 4. Limits and operators
//
// acceptNewConnection() (section 1) asks refusal() before it admits anyone (bans included);
// admit() and leave() count clients in and out; handleLine() asks withinRate() for every line;
// start() starts the idle sweep. Moderation keeps what operators decide (section 3's commands).
// Nothing here writes to a socket but through Client and ChatServer.sendOff().

/** Why a connection was turned away, and why a client was sent off: the labels of --admin's metrics. */
type RefusalReason = "denied" | "banned" | "full" | "per_ip" | "busy" | "origin";
type DropReason = "sendq" | "flood" | "idle" | "ping_timeout" | "protocol" | "kicked" | "banned";

/** Floods (runs of dropped lines) within FLOOD_MEMORY_MS that get a client disconnected. */
const FLOOD_STRIKES = 3;
const FLOOD_MEMORY_MS = 60_000;

/** Who may connect, how many at once, how fast they may talk, and how long they may be silent. */
export class Limits {
  readonly allow: BlockList | null;
  readonly deny: BlockList | null;
  readonly maxClients: number;
  readonly maxPerIp: number;
  /** False while maxPerIp is the default, which does not apply to loopback addresses. */
  readonly limitsLoopback: boolean;
  readonly rate: number;
  readonly announceLimit: number;
  readonly idleSeconds: number;
  private readonly perIp = new Map<string, number>();
  private idleSweep: ReturnType<typeof setInterval> | undefined = undefined;
  /** Connections turned away, by reason, and clients sent off, by reason (--admin's metrics). */
  readonly refused: Record<RefusalReason, number> = {
    denied: 0,
    banned: 0,
    full: 0,
    per_ip: 0,
    busy: 0,
    origin: 0,
  };
  readonly dropped: Record<DropReason, number> = {
    sendq: 0,
    flood: 0,
    idle: 0,
    ping_timeout: 0,
    protocol: 0,
    kicked: 0,
    banned: 0,
  };

  /** Bans, which refusal() checks. */
  readonly moderation: Moderation;

  constructor(options: ChatServerOptions, moderation = new Moderation(undefined)) {
    this.moderation = moderation;
    this.allow = options.allow?.length ? parseBlocks(options.allow) : null;
    this.deny = options.deny?.length ? parseBlocks(options.deny) : null;
    this.maxClients = options.maxClients ?? DEFAULT_MAX_CLIENTS;
    this.maxPerIp = options.maxPerIp ?? DEFAULT_MAX_PER_IP;
    this.limitsLoopback = options.maxPerIp !== undefined;
    this.rate = options.rate ?? DEFAULT_RATE;
    this.announceLimit = options.announceLimit ?? DEFAULT_ANNOUNCE_LIMIT;
    this.idleSeconds = options.idle ?? 0;
  }

  /** Connections still in their TLS handshake: they count as clients until it ends. */
  private pending = 0;

  /** Why a new connection from `ip` may not be served, with `clients` already here; or null. */
  refusal(ip: string, clients: number): string | null {
    clients += this.pending;
    if ((this.allow && !inBlocks(this.allow, ip)) || (this.deny && inBlocks(this.deny, ip))) {
      return this.refuse("denied", `Sorry, connections from ${ip} are not allowed`);
    }
    const ban = this.moderation.banOf(ip);
    if (ban) return this.refuse("banned", `Sorry, you are banned from this server${because(ban.text)}`);
    if (clients >= this.maxClients) {
      return this.refuse("full", `Sorry, the server is full (${this.maxClients} clients); try again later`);
    }
    const limited = this.maxPerIp > 0 && (this.limitsLoopback || !isLoopback(ip));
    if (limited && (this.perIp.get(ip) ?? 0) >= this.maxPerIp) {
      return this.refuse("per_ip", `Sorry, too many connections from ${ip} (at most ${this.maxPerIp})`);
    }
    return null;
  }

  /** Counts a refusal by its reason (for --admin's metrics), and returns what the client is told. */
  refuse(reason: RefusalReason, text: string): string {
    this.refused[reason]++;
    return text;
  }

  /** Counts a client in, for the per-address limit. */
  count(client: Client): void {
    this.perIp.set(client.ip, (this.perIp.get(client.ip) ?? 0) + 1);
  }

  /** Counts a client out. */
  uncount(client: Client): void {
    countDown(this.perIp, client.ip);
  }

  /** Counts a connection that is still handshaking, as a client from `ip`. */
  holdPending(ip: string): void {
    this.pending++;
    this.perIp.set(ip, (this.perIp.get(ip) ?? 0) + 1);
  }

  releasePending(ip: string): void {
    this.pending--;
    countDown(this.perIp, ip);
  }

  /**
   * Takes one token from the client's bucket for a line it sent; if there was none, the line is
   * dropped and the client warned, and the last of FLOOD_STRIKES floods sends it off.
   */
  withinRate(server: ChatServer, client: Client): boolean {
    if (this.rate === 0) return true;
    const now = client.lastInput;
    const bucket = client.bucket ??= new TokenBucket(this.rate / 10_000, 2 * this.rate, now);
    if (bucket.take(now)) return true;
    const flood = bucket.strike(now);
    if (flood >= FLOOD_STRIKES) {
      this.dropped.flood++;
      server.sendOff(client, "Disconnected for flooding", "flooding");
    } else if (flood > 0) {
      client.tell(
        `You are sending more than ${
          plural(this.rate, "line")
        } in 10 seconds; lines are dropped until you slow down ` +
          `(warning ${flood} of ${FLOOD_STRIKES - 1})`,
      );
    }
    return false;
  }

  /** With `idle`, sends off clients that have said nothing for that many seconds. */
  startIdleSweep(server: ChatServer): void {
    const idleMs = this.idleSeconds * 1000;
    if (idleMs <= 0) return;
    this.idleSweep = setInterval(() => {
      const now = Date.now();
      for (const client of server.clients) {
        if (now - client.lastInput >= idleMs && client.leaving === null) {
          this.dropped.idle++;
          server.sendOff(
            client,
            `Closing: nothing from you for ${plural(this.idleSeconds, "second")}`,
            "idle",
          );
        }
      }
    }, Math.max(50, Math.min(1000, idleMs / 4)));
  }

  stopIdleSweep(): void {
    clearInterval(this.idleSweep);
  }
}

/**
 * A token bucket for flood control, and the floods it has seen. It does no I/O and reads no
 * clock: the caller says what time it is, so a test can run it on a fake one.
 *
 * @example
 * ```ts
 * import { TokenBucket } from "./chat_server.ts";
 * const bucket = new TokenBucket(1 / 1000, 2, 0); // a token a second, bursts of two
 * console.assert(bucket.take(0) && bucket.take(0) && !bucket.take(0));
 * console.assert(bucket.take(1000));
 * ```
 */
export class TokenBucket {
  /** Tokens per millisecond. */
  readonly rate: number;
  readonly burst: number;
  tokens: number;
  at: number;
  /** Inside a flood (lines are being dropped), how many floods lately, and when the last began. */
  flooding = false;
  floods = 0;
  lastFlood = 0;

  /** A full bucket at `now` (ms). */
  constructor(rate: number, burst: number, now: number) {
    this.rate = rate;
    this.burst = burst;
    this.tokens = burst;
    this.at = now;
  }

  /** Takes a token at `now` (ms): true if there was one. */
  take(now: number): boolean {
    this.tokens = Math.min(this.burst, this.tokens + (now - this.at) * this.rate);
    this.at = now;
    if (this.tokens < 1) return false;
    this.tokens -= 1;
    this.flooding = false;
    return true;
  }

  /** Counts a line dropped at `now`: the number of the flood it starts (1, 2, ...), or 0 within one. */
  strike(now: number): number {
    if (this.flooding) return 0;
    this.flooding = true;
    if (now - this.lastFlood > FLOOD_MEMORY_MS) this.floods = 0;
    this.lastFlood = now;
    return ++this.floods;
  }
}

/** Wrong /oper passwords within FLOOD_MEMORY_MS that close the connection. */
const OPER_TRIES = 3;
/** The longest ban or mute that can be given a duration: a year (none is until lifted). */
const MAX_DURATION_S = 366 * 86_400;
/** Longest topic, in bytes: IRC servers allow 307 to 390. */
export const MAX_TOPIC = 390;

/**
 * What an operator decided, as one flat record: what the commands make, the bus carries between
 * instances, and the history file keeps (bans and topics). `key` is a ban's mask, a topic's room,
 * or the nick or address of whom a kick or mute is for; `text` a reason or a topic; `until` when a
 * ban or mute ends (ms; null: until lifted); `by` the operator's name.
 */
export interface Rule {
  kind: "ban" | "unban" | "topic" | "kick" | "mute" | "unmute";
  key: string;
  text: string;
  until: number | null;
  by: string;
  at: number;
}

/** A ban in force: its rule, and the block it covers. */
interface Ban {
  rule: Rule;
  block: BlockList;
}

/**
 * The operators' decisions that last: bans, checked at the door (Limits.refusal), and topics; and the
 * operator password and its wrong tries. Does no I/O: the commands (section 3) tell people and the
 * log, the bus (section 5) shares the decisions, and a --history file keeps them.
 */
export class Moderation {
  /** CHAT_OPER_PASSWORD, as bytes; null: there are no operators. */
  private readonly password: Uint8Array | null;
  private readonly bans = new Map<string, Ban>(); // by mask
  private readonly topics = new Map<string, Rule>(); // by room key
  private readonly tries = new WeakMap<Client, number[]>();

  constructor(password: string | undefined) {
    this.password = password ? encoder.encode(password) : null;
  }

  get enabled(): boolean {
    return this.password !== null;
  }

  /**
   * True if `given` is the password. The time taken depends on the password's length only, never
   * on how much of it `given` got right: a byte-by-byte comparison that stops early would tell.
   */
  check(given: string): boolean {
    const secret = this.password!, bytes = encoder.encode(given);
    let differ = secret.length ^ bytes.length;
    for (let i = 0; i < secret.length; i++) differ |= secret[i] ^ (bytes[i] ?? 0);
    return differ === 0;
  }

  /** Counts a wrong password from a client; returns its wrong tries within FLOOD_MEMORY_MS. */
  wrongTry(client: Client, now = Date.now()): number {
    const recent = (this.tries.get(client) ?? []).filter((t) => now - t < FLOOD_MEMORY_MS);
    recent.push(now);
    this.tries.set(client, recent);
    return recent.length;
  }

  /** The ban covering `ip`, if one is in force; bans that have ended are forgotten here. */
  banOf(ip: string, now = Date.now()): Rule | null {
    for (const [mask, ban] of this.bans) {
      if (ban.rule.until !== null && ban.rule.until <= now) this.bans.delete(mask);
      else if (inBlocks(ban.block, ip)) return ban.rule;
    }
    return null;
  }

  /** Every ban in force, oldest first. */
  allBans(now = Date.now()): Rule[] {
    this.banOf("", now); // forgets those that ended
    return [...this.bans.values()].map((b) => b.rule);
  }

  /** The room's topic, if it has one. */
  topic(room: string): Rule | null {
    return this.topics.get(Directory.key(room)) ?? null;
  }

  /** Makes a lasting rule (a ban, an unban, a topic) hold here; false if it changes nothing. */
  hold(rule: Rule): boolean {
    if (rule.kind === "ban") {
      this.bans.set(rule.key, { rule, block: parseBlocks([rule.key]) });
      return true;
    }
    if (rule.kind === "unban") return this.bans.delete(rule.key);
    if (rule.kind !== "topic") return false;
    const key = Directory.key(rule.key);
    if (rule.text === "") return this.topics.delete(key);
    this.topics.set(key, rule);
    return true;
  }

  /** Holds the bans and topics a history file kept: those that checkRule() passes. */
  load(kept: unknown[], maxText: number): void {
    for (const value of kept) {
      const rule = checkRule(value, maxText);
      if (rule) this.hold(rule);
    }
  }

  /** Every lasting rule, to write back to Redis after it returns. */
  lasting(): Rule[] {
    return [...this.allBans(), ...this.topics.values()];
  }
}

/** Where a lasting rule is kept (Redis's hash, the history file): `ban MASK`, `topic ROOM`; else null. */
export function ruleField(rule: Rule): string | null {
  if (rule.kind === "ban" || rule.kind === "unban") return `ban ${rule.key}`;
  return rule.kind === "topic" ? `topic ${Directory.key(rule.key)}` : null;
}

/** True if a lasting rule takes its field's entry away (an unban, a topic cleared). */
export function lifts(rule: Rule): boolean {
  return rule.kind === "unban" || (rule.kind === "topic" && rule.text === "");
}

const RULE_KINDS = new Set(["ban", "unban", "topic", "kick", "mute", "unmute"]);

/**
 * A rule read from outside this process (the bus, the history file), checked as an operator's
 * command is: a real mask, a room's name, a topic without controls and within MAX_TOPIC; null if
 * it is not one. Texts get the bus's character rules.
 */
export function checkRule(value: unknown, maxText: number): Rule | null {
  if (typeof value !== "object" || value === null) return null;
  const { kind, key, text, until, by, at } = value as Record<string, unknown>;
  if (typeof kind !== "string" || !RULE_KINDS.has(kind) || typeof key !== "string" || key.length > 200) {
    return null;
  }
  if (typeof text !== "string" || typeof by !== "string" || typeof at !== "number") return null;
  if (until !== null && (typeof until !== "number" || !Number.isFinite(until))) return null;
  const rule = { kind, key, text: safeBusText(text, maxText), until, by: safeBusText(by, 200), at } as Rule;
  if ((kind === "ban" || kind === "unban") && parseMask(key) !== key) return null;
  if (kind === "topic") {
    if (checkName(key, "room name") || encoder.encode(rule.text).length > MAX_TOPIC) return null;
  }
  return rule;
}

/**
 * A ban's mask, written one way: an address (`10.0.0.7`, `fd00::7`) or a CIDR block
 * (`10.0.0.0/8`); null if `text` is neither.
 */
export function parseMask(text: string): string | null {
  const [address, bits] = text.split("/");
  const family = nodeNet().isIP(address);
  if (family === 0) return null;
  try {
    parseBlocks([text]);
  } catch {
    return null;
  }
  const plain = family === 6 ? address.toLowerCase() : address;
  return bits === undefined ? plain : `${plain}/${Number(bits)}`;
}

/**
 * A duration as operators write it, `90s`, `10m`, `2h`, `1d`, in milliseconds; null if it is not
 * one, or is zero, or is over MAX_DURATION_S.
 */
export function parseDuration(text: string): number | null {
  const m = /^(\d{1,9})([smhd])$/.exec(text);
  if (!m) return null;
  const seconds = Number(m[1]) * { s: 1, m: 60, h: 3600, d: 86_400 }[m[2] as "s" | "m" | "h" | "d"];
  return seconds > 0 && seconds <= MAX_DURATION_S ? seconds * 1000 : null;
}

/**
 * Parses `--allow`/`--deny` blocks (`a.b.c.d/n`, `v6addr/n`, or a bare address) into a
 * BlockList; throws a RangeError naming the first that is neither. IPv4-mapped IPv6 blocks
 * (`::ffff:10.0.0.0/104`) match the IPv4 addresses they map.
 */
export function parseBlocks(texts: string[]): BlockList {
  const { BlockList, isIP } = nodeNet();
  const list = new BlockList();
  for (const text of texts) {
    const [address, bits, extra] = text.split("/");
    const family = isIP(address);
    const max = family === 6 ? 128 : 32;
    const prefix = bits === undefined ? max : Number(bits);
    if (
      family === 0 || extra !== undefined || !/^\d+$/.test(bits ?? "0") || !(prefix >= 0 && prefix <= max)
    ) {
      throw new RangeError(`"${text}" is not an address or a CIDR block like 192.168.0.0/16 or fd00::/8`);
    }
    list.addSubnet(address, prefix, family === 6 ? "ipv6" : "ipv4");
  }
  return list;
}

/** node:net, loaded the first time an allow or deny list needs it: a server without one does not pay for it. */
export function nodeNet(): typeof import("node:net") {
  return nodeBuiltin<typeof import("node:net")>("node:net");
}

/**
 * A Node.js built-in module, loaded synchronously the first time a feature needs it (node:net for
 * --allow and --deny, node:sqlite for --history). Node's `process` itself is reached the same way,
 * through the global, and not imported: importing it costs every server memory at start.
 */
export function nodeBuiltin<T>(name: string): T {
  const { process } = globalThis as unknown as { process: { getBuiltinModule(name: string): unknown } };
  return process.getBuiltinModule(name) as T;
}

/** True for this machine's own addresses: 127.0.0.0/8 and ::1. */
function isLoopback(ip: string): boolean {
  return ip === "::1" || ip.startsWith("127.");
}

/** True if `ip` (a plain address, as `plainHost()` gives it) is in one of the blocks. */
export function inBlocks(list: BlockList, ip: string): boolean {
  const family = nodeNet().isIP(ip);
  return family !== 0 && list.check(ip, family === 6 ? "ipv6" : "ipv4");
}

// =============================================================================================
// 5. Doors and parts
//
// Everything above is the tutorial's chat, and what every run uses. What runs only when a flag
// asks for it is a part, a file in chat/ beside this one that loadPart() loads from the one table
// at the end of this section, when its flag is given: a copy of this file alone serves the chat,
// and says in one line which file a flag needs if it is not there. The core describes what it asks
// of each part with interfaces of its own, below, and never names a part's types; a part imports
// only this file, chat/http.ts and its own assets (DESIGN.md, "The core and its parts").
//
// start() (section 1) listens with listenForClients() and loads the parts its options ask for;
// acceptNewConnection() hands a trusted proxy's connection to the proxy part, a TLS connection to
// the TLS door, and turns a connection away with refuse(). The web door admits each WebSocket as a
// client like any other: the same refusals, the same framer, the same pacing gate, the same leave.

/** Something a flag asked for cannot start (a file, a port, a certificate): one line says why. */
export class StartError extends Error {}

/** Pending connections the kernel may queue for us: a join storm should not meet SYN drops. */
const TCP_BACKLOG = 4096;

/** Listens for chat clients on `host`, or by default on all interfaces: IPv6 and IPv4, or IPv4 alone. */
export function listenForClients(host: string | undefined, port: number): Deno.TcpListener {
  const listen = (hostname: string) => Deno.listen({ hostname, port, tcpBacklog: TCP_BACKLOG });
  if (host !== undefined) return listen(host);
  try {
    return listen("::");
  } catch (e) {
    if (e instanceof Deno.errors.AddrInUse || e instanceof Deno.errors.PermissionDenied) throw e;
    return listen("0.0.0.0"); // a host without IPv6
  }
}

/** Writes a one-line refusal to a connection we will not serve, then closes it. */
export async function refuse(conn: Link, refusal: string): Promise<void> {
  try {
    await settleWithin(SHUTDOWN_GRACE_MS, [writeAll(conn, encoder.encode(refusal + "\r\n"))]);
  } catch (e) {
    if (!isDisconnect(e)) throw e;
  } finally {
    conn.close();
  }
}

// ---- What a door or part is asked for ----

/** Where a room's kept lines stand: its epoch and position, how many lines it keeps, and the oldest. */
export interface Kept {
  readonly epoch: string;
  readonly seq: number;
  readonly count: number;
  readonly oldest: number;
}

/** Where RoomHistory (section 3) also writes what it keeps, and reads it back after a restart. */
export interface HistoryStore {
  /** A room's epoch, position and last `limit` lines as the store has them; null if it has none. */
  load(room: string, limit: number): { epoch: string; seq: number; lines: KeptLine[] } | null;
  /** A line kept at its position; `kept` says which lines the room still keeps. */
  add(key: string, kept: Kept, line: KeptLine): void;
  /** A room that lost its history to another (HISTORY_ROOMS). */
  forget(key: string): void;
  /** The bans and topics it keeps, as it has them: the caller checks them (section 4). */
  rules(): unknown[];
  /** Keeps an operator's ban or topic, or forgets one that is lifted. */
  keepRule(rule: Rule): void;
  close(): void;
}

/**
 * TLS on the chat port (chat/tls.ts): completes a connection's handshake, then admits it and reads
 * it (ChatServer.receive), or tells it why it is refused.
 */
export interface TlsDoor {
  accept(conn: Stream, address: string, ip: string, refused: string | null): Promise<void>;
}

/** The web door (chat/web.ts): the page and its WebSocket, on a port of its own. */
export interface WebDoor {
  readonly addr: Deno.NetAddr;
  /** Settles when its accept loop has stopped. */
  readonly finished: Promise<void>;
  /** Stops taking requests; its WebSockets close as clients do. */
  shutdown(): Promise<void>;
}

/** A door's own steps when ChatServer.admit() takes a client: before it enters the lobby, and once it is in. */
export interface Welcome {
  before(client: Client): void;
  after(client: Client): void;
}

/** The admin port (chat/admin.ts): health, readiness and metrics. */
export interface AdminDoor {
  readonly addr: Deno.NetAddr;
  /** Closes the port once the answers under way are out: the last thing a shutdown does. */
  shutdown(): Promise<void>;
}

/**
 * The lines for a web page alone (`/ws?page=1`), which tell it where it stands in its room.
 * Each starts with U+001E (record separator), a control character, so no one can forge one: the
 * framer takes controls out of every client's line, and the bus out of every line it carries.
 */
export const PAGE_MARKS = {
  /** The page's token: it gives it back when it reconnects, to take its old connection's place. */
  token: (token: string) => `\x1e! ${token}`,
  /** Where the page's room stands: the room, its epoch, and the position the page has seen up to. */
  at: (room: string, p: Position) => `\x1e@ ${room} ${p.epoch} ${p.seq}`,
  /** The prefix of a line at position `seq`, as it is said. */
  kept: (seq: number) => `\x1e# ${seq} `,
  /** The position of the page's own line, which it is not sent. */
  mine: (seq: number) => `\x1e= ${seq}`,
  /** The server is there, and says so every `seconds`: a page that hears nothing for long reconnects. */
  alive: (seconds: number) => `\x1e~ ${seconds}`,
  /** A line from the room's history: its position, when it was said (ms since 1970), the line. */
  history: (k: KeptLine) => `\x1eh ${k.seq} ${k.time} ${lineText(k.message)}`,
};

/** A web page that follows positions: its token, and where it was if it is reconnecting. */
export interface PageState {
  readonly token: string;
  /** Its room, epoch and position before it dropped, and its old token and nick; null once shown. */
  resume: { room: string; epoch: string; seq: number; token: string; nick: string } | null;
}

/**
 * Tells a page where its room stands, and what it has not seen: everything after the position
 * it had, if the room's history still reaches back that far, or else the recent lines with one
 * line saying what was lost. No gap is silent.
 */
export function showRoom(server: ChatServer, client: Client, room: Room): void {
  const page = client.page!;
  const was = page.resume;
  if (was && !Directory.same(was.room, room.name)) return; // on its way back to its own room
  if (server.bus && !server.bus.knows(room.name)) return; // the bus shows it once it reads the room
  page.resume = null;
  const history = server.history, now = history.position(room.name);
  let lines: KeptLine[];
  // A page that had seen nothing has lost nothing, whatever the epoch now.
  if (was && (was.epoch === now.epoch || was.seq === 0) && was.seq <= now.seq) {
    const after = history.after(room.name, was.seq);
    if (after.missing > 0) {
      const verb = after.missing === 1 ? "is" : "are";
      client.tell(
        `${plural(after.missing, "line")} said in ${room.name} while you were away ${verb} no longer kept`,
      );
    }
    lines = after.lines;
  } else {
    if (was) {
      client.tell(
        `The history of ${room.name} was reset while you were away: what was said meanwhile is lost`,
      );
    }
    lines = history.last(room.name, HISTORY_SHOWN);
  }
  const seen = lines.length > 0 ? lines[0].seq - 1 : now.seq;
  client.tell(PAGE_MARKS.at(room.name, { epoch: now.epoch, seq: seen }));
  for (const line of lines) client.tell(PAGE_MARKS.history(line));
}

// ---- Sharing rooms (--redis): the bus, as the core speaks to it ----

/** How long a command waits for Redis before it goes on without it. */
export const REDIS_ANSWER_MS = 2000;

/**
 * Redis's answer, or `fallback` if it has not come within REDIS_ANSWER_MS: a Redis that is up
 * but stuck must not leave a client waiting on its command for ever.
 */
export function answerWithin<T>(answer: Promise<T>, fallback: T): Promise<T> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  const late = new Promise<T>((resolve) => timer = setTimeout(() => resolve(fallback), REDIS_ANSWER_MS));
  return Promise.race([answer, late]).finally(() => clearTimeout(timer));
}

/** One member, as the directory knows it. */
export interface Presence {
  address: string;
  nick: string | null;
  room: string;
}

/** The bus, as the server uses it. */
export interface Bus {
  readonly instance: string;
  /** Settles when Redis first answers (the server serves local clients meanwhile). */
  readonly ready: Promise<void>;
  /** True while Redis answers; and the bytes of lines waiting for it (--admin's metrics). */
  readonly up: boolean;
  readonly waitingBytes: number;
  /**
   * Sends a line (`message`, with its CRLF) to a room on every instance, this one included, in the
   * order of the room's stream; `kept` for chat. False if the caller must say it here itself
   * (Redis is away, or the room is not read yet): the bus then sends it on to the others later.
   */
  send(room: string, message: Uint8Array, kept: boolean, sender: Client | null): boolean;
  /** Delivers a private line to a nick on another instance; false if nobody has that nick. */
  whisper(nick: string, text: string): Promise<boolean>;
  /** Takes a nick across all instances; false if another instance's client has it. */
  claimNick(nick: string): Promise<boolean>;
  releaseNick(nick: string): void;
  /** Records where a local client is, or that it is gone. */
  present(who: Presence): void;
  absent(address: string): void;
  /** Reads a room's stream while it has local members. */
  watch(room: string): void;
  unwatch(room: string): void;
  /** False while a watched room's stream has not been read yet: its position is not known. */
  knows(room: string): boolean;
  /** True while too many lines are on their way through Redis: the senders then wait for caughtUp(). */
  readonly behind: boolean;
  caughtUp(): Promise<void>;
  /** Every member on the other instances; null while Redis is away. */
  others(): Promise<Presence[] | null>;
  /** Carries an operator's decision to every other instance; keeps bans and topics in Redis. */
  share(rule: Rule): void;
  close(): Promise<void>;
}

/** What the bus needs from the server. */
export interface BusHandlers {
  /**
   * A line for a room, read from its stream: from another instance, or from this one (`sender`
   * and its `message` then). `at` is its position if it is kept; `said` if it was already said
   * here while Redis was away, and only the history is to have it.
   */
  onRoomLine(
    room: string,
    text: string,
    at: Position | null,
    sender: Client | null,
    message?: Uint8Array,
    alreadySaid?: boolean,
  ): void;
  /** A room's stream is read from now on: its position, and its last kept lines. */
  onRoomRead(room: string, at: Position, lines: KeptLine[]): void;
  /** A private line for a local nick, from another instance. */
  onWhisper(nick: string, text: string): void;
  /** Everyone local, to write back to Redis after it returns. */
  locals(): Presence[];
  /** A line for the operator's log. */
  say(text: string): void;
  /** Settles when no slow reader here holds the room back (section 2): the bus reads on. */
  paced(room: string): Promise<void>;
  /** An operator's decision from another instance, or (`quiet`) one Redis kept, read on connecting. */
  onRule(rule: Rule, quiet: boolean): void;
  /** The bans and topics in force here, to write back to Redis after it returns. */
  lasting(): Rule[];
}

/** How the bus reaches this server: lines for its rooms and nicks, and who is here. */
export function busHandlersFor(server: ChatServer): BusHandlers {
  return {
    onRoomLine(room, text, at, sender, message = encoder.encode(text + "\r\n"), alreadySaid = false) {
      const here = server.directory.room(room);
      if (at === null) return alreadySaid ? undefined : here?.broadcastExcept(sender, message);
      if (server.history.put(room, at, message) && here) {
        here.broadcastExcept(null, encoder.encode(`(the history of ${here.name} was reset)\r\n`));
      }
      if (!alreadySaid) here?.broadcastKept(sender, message, at.seq);
    },
    onRoomRead(room, at, lines) {
      server.history.load(room, at, lines);
      const here = server.directory.room(room);
      for (const client of here?.members ?? []) if (client.page) showRoom(server, client, here!);
    },
    onWhisper(nick, text) {
      server.directory.holder(nick)?.tell(text);
    },
    locals: () => [...server.clients].map(presenceOf),
    say: (text) => server.log.event(text, { event: "redis", text }),
    paced(room) {
      const here = server.directory.room(room);
      return here ? server.flusher.waitForRoom(here) : Promise.resolve();
    },
    onRule: (rule, quiet) => obey(server, rule, quiet),
    lasting: () => server.moderation.lasting(),
  };
}

/** The longest text a bus message may carry: a line of the longest --max-line, and its prefix. */
export const MAX_BUS_TEXT = 1 << 21;

/** A bus line under the client line's rules: controls, C1 and line ends removed. */
export function safeBusText(text: string, maxBytes = MAX_BUS_TEXT): string {
  // deno-lint-ignore no-control-regex
  text = text.replace(/[\x00-\x08\x0a-\x1f\x7f-\x9f]/g, "");
  if (text.length * 3 <= maxBytes) return text; // a UTF-16 unit is at most three bytes of UTF-8
  const bytes = encoder.encode(text);
  if (bytes.length <= maxBytes) return text;
  let end = maxBytes; // cut, like a long line, at the start of a character
  while (end > 0 && (bytes[end] & 0xc0) === 0x80) end--;
  return decoder.decode(bytes.subarray(0, end));
}

// ---- The parts, by the flag that loads each ----

/**
 * Starts the parts the options ask for (ChatServer.start), in order: the history file first, whose
 * bans hold from the first connection; PROXY headers and TLS, which the chat port's connections go
 * through; the bus, which reads the lobby's stream before anyone arrives; the web door; and last the
 * admin port, which says ready only once all the rest is.
 */
async function startParts(server: ChatServer): Promise<void> {
  const o = server.options;
  if (o.historyFile) {
    const say = (text: string) => server.log.event(text, { event: "history", text });
    const file = await (await loadPart("historyFile")).openHistoryFile(o.historyFile, say);
    server.history.file = file;
    server.moderation.load(file.rules(), server.maxLine); // section 4
  }
  if (server.proxies) {
    const { acceptProxied } = await loadPart("proxy");
    server.proxied = (conn) => acceptProxied(server, conn);
  }
  if (o.tls) {
    const { openTls } = await loadPart("tls");
    server.tls = await openTls(server, o.tls, o.handshakeTimeout ?? DEFAULT_HANDSHAKE_TIMEOUT);
  }
  if (o.redis) server.bus = (await loadPart("redis")).startBus(server, o.redis);
  server.bus?.watch(LOBBY);
  if (o.http) server.web = (await loadPart("web")).openWeb(server, o.http);
  if (o.admin) server.admin = (await loadPart("admin")).openAdmin(server, o.admin);
}

/** Stops whatever startParts() got to, when start() fails after it began. */
async function stopParts(server: ChatServer): Promise<void> {
  server.limits.stopIdleSweep();
  await server.web?.shutdown();
  await server.admin?.shutdown();
  await server.bus?.close();
  server.history.file?.close();
}

/** What the core asks of each part: the one function it calls to start it. */
interface Parts {
  historyFile: { openHistoryFile(path: string, say: (text: string) => void): Promise<HistoryStore> };
  tls: {
    openTls(server: ChatServer, pem: { cert: string; key: string }, timeoutSeconds: number): Promise<TlsDoor>;
  };
  proxy: { acceptProxied(server: ChatServer, conn: Deno.TcpConn): Promise<void> };
  redis: { startBus(server: ChatServer, redis: RedisOptions): Bus };
  web: { openWeb(server: ChatServer, options: NonNullable<ChatServerOptions["http"]>): WebDoor };
  admin: { openAdmin(server: ChatServer, options: NonNullable<ChatServerOptions["admin"]>): AdminDoor };
}

/**
 * The parts, each behind the flag that loads it. The specifiers are literal, so that `deno compile`
 * embeds every part (`deno info chat_server.ts` lists them) and a run from a URL fetches them.
 */
const PARTS: { [K in keyof Parts]: { flag: string; file: string; load: () => Promise<Parts[K]> } } = {
  historyFile: { flag: "--history", file: "history_file.ts", load: () => import("./chat/history_file.ts") },
  tls: { flag: "--tls-cert", file: "tls.ts", load: () => import("./chat/tls.ts") },
  proxy: { flag: "--proxy-from", file: "proxy.ts", load: () => import("./chat/proxy.ts") },
  redis: { flag: "--redis", file: "redis_bus.ts", load: () => import("./chat/redis_bus.ts") },
  web: { flag: "--http", file: "web.ts", load: () => import("./chat/web.ts") },
  admin: { flag: "--admin", file: "admin.ts", load: () => import("./chat/admin.ts") },
};

/** A flag's part is not beside this file (a copy of chat_server.ts alone). */
export class MissingPart extends StartError {}

/** Loads a part; a part that is not there is one MissingPart line that names it and its flag. */
async function loadPart<K extends keyof Parts>(name: K): Promise<Parts[K]> {
  const { flag, file, load } = PARTS[name];
  try {
    return await load();
  } catch (e) {
    const url = new URL(`./chat/${file}`, import.meta.url).href;
    const missing = (e as { code?: string }).code === "ERR_MODULE_NOT_FOUND" ||
      /not found|404/i.test(String((e as Error).message));
    if (!missing || !String((e as Error).message).includes(url)) throw e;
    throw new MissingPart(`${flag} needs chat/${file} beside chat_server.ts, and it is not there`);
  }
}

// =============================================================================================
// 6. Options

/** Seconds a TLS client may take to complete its handshake before its connection is closed. */
export const DEFAULT_HANDSHAKE_TIMEOUT = 10;
/** Seconds a browser may take to send its request head. */
export const DEFAULT_HTTP_TIMEOUT = 5;
/**
 * Seconds between the pings a WebSocket client is sent; one that has sent nothing by the next ping
 * has gone (a closed lid, a lost network) and is sent off, so it leaves its room within two of
 * them. Centrifugo pings every 25 s; a page hears of each ping and reconnects when they stop.
 */
export const DEFAULT_HTTP_PING = 25;
/** The interface --admin listens on unless told: the operator's own machine. */
export const DEFAULT_ADMIN_HOST = "127.0.0.1";

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
  /** Clients per remote address; 0 is no limit. Default {@linkcode DEFAULT_MAX_PER_IP}, which spares loopback. */
  maxPerIp?: number;
  /** Seconds of silence after which a client is told and closed; 0 is never. Default 0. */
  idle?: number;
  /** Lines per 10 seconds per client, with bursts of twice that; 0 is no limit. Default {@linkcode DEFAULT_RATE}. */
  rate?: number;
  /** Chat lines each room keeps for /history; 0 keeps none. Default {@linkcode DEFAULT_HISTORY_LINES}. */
  historyLines?: number;
  /** Members above which a room stops announcing joins and leaves. Default {@linkcode DEFAULT_ANNOUNCE_LIMIT}. */
  announceLimit?: number;
  /** CIDR blocks that may connect (empty: everyone). Checked at accept, before `deny`. */
  allow?: string[];
  /** CIDR blocks that may not connect. */
  deny?: string[];
  /** Also serve the web page and its WebSocket: `port` (0 picks one), `host` (default: as `host`),
   * the `origins` allowed to open the WebSocket from other sites (`*` for any), and the seconds a
   * browser may take to send its request (`timeout`, default {@linkcode DEFAULT_HTTP_TIMEOUT}), and
   * the seconds between pings to WebSocket clients (`ping`, default {@linkcode DEFAULT_HTTP_PING}; 0: none). */
  http?: { port: number; host?: string; origins?: string[]; timeout?: number; ping?: number };
  /**
   * CIDR blocks of trusted proxies (a load balancer): a connection from one of them to the chat port
   * begins with a PROXY protocol header (v1 or v2), and a web request carries X-Forwarded-For or
   * Forwarded; the client's address is then the one they give, everywhere. Nobody else can claim one.
   */
  proxyFrom?: string[];
  /** Serve /healthz, /readyz and /metrics for operators on `port`, on `host` (default {@linkcode DEFAULT_ADMIN_HOST}). */
  admin?: { port: number; host?: string };
  /** Share rooms with other instances through Redis. Default: this instance alone. */
  redis?: RedisOptions;
  /** Serve TLS with this certificate chain and key (PEM text) instead of plain TCP. */
  tls?: { cert: string; key: string };
  /** Keep each room's history in this node:sqlite file, across restarts. Default: in memory. */
  historyFile?: string;
  /** The password /oper asks for (the command line reads CHAT_OPER_PASSWORD). Default: no operators. */
  operPassword?: string;
  /** Seconds a TLS client may take to handshake. Default {@linkcode DEFAULT_HANDSHAKE_TIMEOUT}. */
  handshakeTimeout?: number;
  /** Where the event log goes (joins, lines, leaves); `null` for none. Default `Deno.stdout`. */
  log?: Writer | null;
  /** `text`: the tutorial's lines; `json`: one JSON object per event. Default `text`. */
  logFormat?: "text" | "json";
}

/** Options for the bus. */
export interface RedisOptions {
  /** `redis://HOST:PORT[/DB]`. */
  url: string;
  /** Prefix of every key and channel. Default `chat`. */
  prefix?: string;
  /** Seconds after which a crashed instance's members leave the directory. Default 30. */
  expiry?: number;
  /** KeptLine lines each room's stream holds (at least STREAM_LINES, 10,000): its shared history. */
  historyLines?: number;
  /** The server's --max-line: what the bus brings is cut to it, with room for a prefix. */
  maxLine?: number;
  /** Bytes one read of the streams may bring: the room left in a client's queue once it is behind. */
  readBytes?: number;
}

// =============================================================================================
// 7. Small helpers

/** Joins byte arrays into one new array of `total` bytes. */
export function concatBytes(parts: Uint8Array[], total: number): Uint8Array {
  const out = new Uint8Array(total);
  let at = 0;
  for (const part of parts) {
    out.set(part, at);
    at += part.length;
  }
  return out;
}

/** True for the errors a peer causes by going away: expected, and not worth a stack trace. */
export function isDisconnect(e: unknown): boolean {
  return e instanceof Deno.errors.ConnectionReset || e instanceof Deno.errors.BrokenPipe ||
    e instanceof Deno.errors.ConnectionAborted || e instanceof Deno.errors.BadResource ||
    e instanceof Deno.errors.Interrupted || e instanceof Deno.errors.NotConnected ||
    e instanceof Deno.errors.UnexpectedEof; // a TLS peer that left without close_notify
}

/** True for an accept() that failed because the peer reset first: nothing is wrong with us. */
function isRefusedByPeer(e: unknown): boolean {
  return e instanceof Deno.errors.NotConnected || e instanceof Deno.errors.ConnectionReset ||
    e instanceof Deno.errors.ConnectionAborted;
}

/**
 * What close() waits for: tasks that outlive their turn (a refusal, a handshake, a goodbye, a
 * WebSocket), and readers, which are counted rather than kept as promises because an idle
 * client should cost little. A task that fails is logged, and touches no other.
 */
class TaskSet {
  private readonly running = new Set<Promise<void>>();
  private held = 0;
  private lastReleased: (() => void) | null = null;

  track(task: Promise<unknown>): void {
    const settled = task.then(
      () => {},
      (e) => console.error(`Error: ${e instanceof Error ? e.stack : e}`),
    );
    this.running.add(settled);
    settled.finally(() => this.running.delete(settled));
  }

  /** Counts a reader in. */
  hold(): void {
    this.held++;
  }

  /** Counts a reader out. */
  release(): void {
    if (--this.held === 0) this.lastReleased?.();
  }

  /** Resolves when every task has settled and every reader is done. */
  async settled(): Promise<void> {
    for (;;) {
      while (this.running.size > 0) await Promise.all(this.running);
      if (this.held === 0) return;
      await new Promise<void>((resolve) => this.lastReleased = resolve);
    }
  }
}

/** Closes a connection that may be closed already. */
export function closeQuietly(conn: { close(): void }): void {
  try {
    conn.close();
  } catch (e) {
    if (!(e instanceof Deno.errors.BadResource)) throw e;
  }
}

/** Resolves after `ms` milliseconds, without holding the process open. */
export function delay(ms: number): Promise<void> {
  return new Promise((resolve) => Deno.unrefTimer(setTimeout(resolve, ms)));
}

/** Waits for the promises, or for `ms` milliseconds, whichever is first. */
export async function settleWithin(ms: number, promises: Promise<unknown>[]): Promise<void> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  const timeout = new Promise<void>((resolve) => timer = setTimeout(resolve, ms));
  try {
    await Promise.race([Promise.allSettled(promises), timeout]);
  } finally {
    clearTimeout(timer);
  }
}

/** `1 second`, `2 seconds`, `0.3 seconds`. */
/** `: REASON`, or nothing if there is no reason. */
function because(reason: string): string {
  return reason ? `: ${reason}` : "";
}

export function plural(n: number, unit: string): string {
  return `${n} ${unit}${n === 1 ? "" : "s"}`;
}

/** True if a line holds nothing but spaces and tabs. */
function isBlank(line: Uint8Array): boolean {
  for (let i = 0; i < line.length; i++) if (line[i] !== 32 && line[i] !== TAB) return false; // no iterator: it is per line
  return true;
}

/** An IPv4-mapped IPv6 address as plain IPv4; anything else as it is. */
export function plainHost(hostname: string): string {
  return hostname.startsWith("::ffff:") && hostname.includes(".") ? hostname.slice(7) : hostname;
}

/** The host of a `host:port` or `[v6addr]:port` address, as `plainHost()` gives it. */
function hostOf(address: string): string {
  return plainHost(address.slice(0, address.lastIndexOf(":")).replace(/^\[(.*)\]$/, "$1"));
}

/** A message as the room was sent it (a line and its CRLF), as text without the CRLF. */
export function lineText(message: Uint8Array): string {
  return decoder.decode(message.subarray(0, message.length - 2));
}

/** One event as a line of JSON for the log: when, then its fields. */
function jsonEvent(fields: Record<string, unknown>): string {
  return JSON.stringify({ time: new Date().toISOString(), ...fields });
}

/** Counts one down for `key`, deleting the key at zero, so that a map of counts holds no zeros. */
export function countDown(counts: Map<string, number>, key: string): void {
  const left = (counts.get(key) ?? 1) - 1;
  if (left > 0) counts.set(key, left);
  else counts.delete(key);
}

/** What a JSON text says; undefined if it is not JSON (what Redis brings may be anything). */
export function parseJson(text: string): unknown {
  try {
    return JSON.parse(text);
  } catch {
    return undefined;
  }
}

/** For promises whose failure is already handled elsewhere (Redis being away). */
export function ignore(): void {}

// =============================================================================================
// 8. The command line

const USAGE = "usage: chat_server.ts [PORT | --port PORT] [--host HOST] [--max-line BYTES] [--sendq BYTES] " +
  "[--max-clients N] [--max-per-ip N] [--idle S] [--rate N] [--announce-limit N] [--history-lines N] " +
  "[--history FILE] [--allow CIDR]... [--deny CIDR]... [--proxy-from CIDR]... " +
  "[--tls-cert FILE --tls-key FILE] [--handshake-timeout S] " +
  "[--log text|json] " +
  "[--http PORT [--http-host HOST] [--http-origin ORIGIN]... [--http-timeout S] [--http-ping S]] " +
  "[--admin PORT [--admin-host HOST]] " +
  "[--redis URL [--redis-prefix P] [--redis-expiry S]] [--help]";

const HELP = `${USAGE}

The tutorial's chat server: every line a client sends goes to everyone else in its room.

  PORT, --port PORT    port to listen on (default ${DEFAULT_PORT}; 0 picks a free one)
  --host HOST          interface to bind (default: all, IPv6 and IPv4)
  --max-line BYTES     longest line relayed (default ${DEFAULT_MAX_LINE})
  --sendq BYTES        send queue per client before it is cut off (default ${DEFAULT_SENDQ}; K and M work)
  --max-clients N      clients at once (default ${DEFAULT_MAX_CLIENTS})
  --max-per-ip N       clients at once from one address (default ${DEFAULT_MAX_PER_IP}, not counting loopback; 0: no limit)
  --idle SECONDS       close clients silent this long (default 0: never)
  --rate N             lines per 10 s per client, bursts of twice that; 0 is off (default ${DEFAULT_RATE})
  --announce-limit N   rooms bigger than this stop announcing joins and leaves (default ${DEFAULT_ANNOUNCE_LIMIT})
  --history-lines N    chat lines each room keeps for /history and reconnecting pages (default ${DEFAULT_HISTORY_LINES})
  --history FILE       keep each room's history in this SQLite file, across restarts (default: memory)
  --allow CIDR         only these addresses may connect (repeatable; e.g. 192.168.0.0/16, fd00::/8)
  --deny CIDR          these addresses may not connect (repeatable; wins over --allow)
  --proxy-from CIDR    a trusted proxy: its connections begin with a PROXY header (v1 or v2), its web
                       requests carry X-Forwarded-For; the client's address is then the one it gives
  --tls-cert FILE      serve TLS with this PEM certificate chain...
  --tls-key FILE       ...and this PEM private key
  --handshake-timeout S  seconds for a TLS handshake or a PROXY header (default ${DEFAULT_HANDSHAKE_TIMEOUT})
  --log FORMAT         text (the tutorial's lines, default) or json (one object per event)
  --http PORT          also serve the chat as a web page, and its WebSocket at /ws
  --http-host HOST     interface for the web page (default: as --host)
  --http-origin URL    another site whose pages may use the WebSocket (repeatable; * for any)
  --http-timeout S     seconds a browser may take to send its request (default ${DEFAULT_HTTP_TIMEOUT})
  --http-ping S        seconds between pings to web clients; one silent past the next ping is closed (default ${DEFAULT_HTTP_PING}; 0: none)
  --admin PORT         serve /healthz, /readyz and /metrics (Prometheus) for operators on this port
  --admin-host HOST    interface for --admin (default ${DEFAULT_ADMIN_HOST}: metrics are not for the public)
  --redis URL          share rooms with other instances through Redis (redis://HOST:PORT[/DB])
  --redis-prefix P     prefix of Redis keys and channels (default chat)
  --redis-expiry S     seconds before a crashed instance's members leave the directory (default 30)
  -h, --help           show this help

Clients type /help for the commands: /nick, /who, /me, /msg, /join, /rooms, /topic, /history, /quit;
and operators /oper, then /kick, /ban, /unban, /bans, /mute, /unmute.
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

/** The flags parseChatArgs() knows: each takes one value, some may be given many times, --help none. */
const CHAT_FLAGS = {
  port: "one",
  host: "one",
  "max-line": "one",
  sendq: "one",
  "max-clients": "one",
  "max-per-ip": "one",
  idle: "one",
  rate: "one",
  "announce-limit": "one",
  "history-lines": "one",
  history: "one",
  allow: "many",
  deny: "many",
  "proxy-from": "many",
  "tls-cert": "one",
  "tls-key": "one",
  "handshake-timeout": "one",
  log: "one",
  http: "one",
  "http-host": "one",
  "http-origin": "many",
  "http-timeout": "one",
  "http-ping": "one",
  admin: "one",
  "admin-host": "one",
  redis: "one",
  "redis-prefix": "one",
  "redis-expiry": "one",
  help: "none",
} as const;

type ChatFlags = typeof CHAT_FLAGS;
/** The flags given: a value for each, a list for those given many times, true for --help. */
type ChatFlagValues = {
  -readonly [F in keyof ChatFlags]?: ChatFlags[F] extends "many" ? string[]
    : ChatFlags[F] extends "none" ? true
    : string;
};

/**
 * Splits the command line into flags and positionals: `--flag VALUE`, `--flag=VALUE` (for a
 * value that starts with "-"), `-h`, and `--` before positionals that start with "-". This is
 * node:util's parseArgs in a few lines: the first `node:` import costs a server megabytes of
 * RSS before its first client, and the server needs nothing else from Node unless asked to.
 */
function splitArgs(args: string[]): { values: ChatFlagValues; positionals: string[] } {
  const values: Record<string, string | string[] | true> = {};
  const positionals: string[] = [];
  for (let i = 0; i < args.length; i++) {
    const arg = args[i] === "-h" ? "--help" : args[i];
    if (arg === "--") {
      positionals.push(...args.slice(i + 1));
      break;
    }
    if (!arg.startsWith("-") || arg === "-") {
      positionals.push(arg);
      continue;
    }
    const eq = arg.indexOf("=");
    const flag = eq < 0 ? arg : arg.slice(0, eq);
    const name = flag.slice(2);
    const kind = flag.startsWith("--") && Object.hasOwn(CHAT_FLAGS, name)
      ? CHAT_FLAGS[name as keyof ChatFlags]
      : undefined;
    if (kind === undefined) throw new UsageError(`unknown option ${flag}; try --help`);
    if (kind === "none") {
      if (eq >= 0) throw new UsageError(`${flag} takes no value`);
      values[name] = true;
      continue;
    }
    const value = eq >= 0 ? arg.slice(eq + 1) : args[++i];
    if (value === undefined) throw new UsageError(`${flag} wants a value`);
    if (eq < 0 && value.startsWith("-") && value !== "-") {
      throw new UsageError(`${flag} wants a value; for one that starts with "-", write ${flag}=VALUE`);
    }
    if (kind === "many") ((values[name] ??= []) as string[]).push(value);
    else values[name] = value;
  }
  return { values: values as ChatFlagValues, positionals };
}

/** Turns the command line into server options. */
export function parseChatArgs(args: string[]): ChatArgs | "help" {
  const { values: v, positionals } = splitArgs(args);
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
  const seconds = (flag: string, text: string | undefined, min: number) => {
    if (text === undefined) return undefined;
    const value = Number(text);
    if (text.trim() === "" || !(value >= min && value <= 1e6)) {
      throw new UsageError(`${flag} wants seconds, not "${text}"`);
    }
    return value;
  };
  const idle = seconds("--idle", v.idle, 0);
  const handshakeTimeout = seconds("--handshake-timeout", v["handshake-timeout"], 0.001);
  if (handshakeTimeout !== undefined && v["tls-cert"] === undefined && v["proxy-from"] === undefined) {
    throw new UsageError("--handshake-timeout goes with --tls-cert and --tls-key, or --proxy-from");
  }
  for (const flag of ["host", "http-host", "admin-host", "redis-prefix"] as const) {
    if (v[flag] !== undefined && v[flag].trim() === "") {
      throw new UsageError(`--${flag} wants a value, not ""`);
    }
  }
  for (const origin of v["http-origin"] ?? []) {
    if (origin !== "*" && !/^https?:\/\/[^/\s]+$/.test(origin)) {
      throw new UsageError(`--http-origin wants an origin like https://chat.example (or *), not "${origin}"`);
    }
  }
  const webOnly = [v["http-host"], v["http-origin"], v["http-timeout"], v["http-ping"]];
  if (v.http === undefined && webOnly.some((value) => value !== undefined)) {
    throw new UsageError("--http-host, --http-origin, --http-timeout and --http-ping go with --http PORT");
  }
  if (v.admin === undefined && v["admin-host"] !== undefined) {
    throw new UsageError("--admin-host goes with --admin PORT");
  }
  if (v.redis === undefined && (v["redis-prefix"] !== undefined || v["redis-expiry"] !== undefined)) {
    throw new UsageError("--redis-prefix and --redis-expiry go with --redis URL");
  }
  if (v.redis !== undefined && !isRedisUrl(v.redis)) {
    throw new UsageError(`--redis wants redis://HOST:PORT[/DB], not "${v.redis}"`);
  }
  if (v.redis !== undefined && v.history !== undefined) {
    throw new UsageError("--history and --redis do not go together: with --redis the history lives in Redis");
  }
  try {
    const blocks = [...(v.allow ?? []), ...(v.deny ?? []), ...(v["proxy-from"] ?? [])];
    if (blocks.length > 0) parseBlocks(blocks); // loads node:net
  } catch (e) {
    if (e instanceof RangeError) throw new UsageError(e.message);
    throw e;
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
      handshakeTimeout,
      rate: count("--rate", v.rate, 0, 1_000_000),
      announceLimit: count("--announce-limit", v["announce-limit"], 0, 1_000_000),
      historyLines: count("--history-lines", v["history-lines"], 0, 100_000),
      historyFile: v.history,
      allow: v.allow,
      deny: v.deny,
      proxyFrom: v["proxy-from"],
      logFormat: v.log as "text" | "json" | undefined,
      redis: v.redis === undefined ? undefined : {
        url: v.redis,
        prefix: v["redis-prefix"],
        expiry: count("--redis-expiry", v["redis-expiry"], 1, 86_400),
      },
      http: v.http === undefined ? undefined : {
        port: parseCount("--http", v.http, 0, 65535),
        host: v["http-host"],
        origins: v["http-origin"],
        timeout: seconds("--http-timeout", v["http-timeout"], 0.001),
        ping: seconds("--http-ping", v["http-ping"], 0),
      },
      admin: v.admin === undefined ? undefined : {
        port: parseCount("--admin", v.admin, 0, 65535),
        host: v["admin-host"],
      },
    },
    tlsFiles: v["tls-cert"] === undefined ? undefined : { cert: v["tls-cert"], key: v["tls-key"]! },
  };
}

/** True for `redis://HOST[:PORT][/DB]` (or `rediss://`) with a host and a port that can be. */
function isRedisUrl(text: string): boolean {
  if (!/^rediss?:\/\/[^/\s]+(\/\d+)?$/.test(text)) return false;
  try {
    return new URL(text).hostname !== ""; // a port over 65535, or a bad host, does not parse
  } catch {
    return false;
  }
}

/** Reads a PEM file named by `flag`; a file that cannot be read is one line and exit code 1. */
function readPem(flag: string, path: string): string {
  try {
    return Deno.readTextFileSync(path);
  } catch (e) {
    const why = e instanceof Deno.errors.NotFound
      ? "no such file"
      : e instanceof Deno.errors.IsADirectory
      ? "it is a directory"
      : e instanceof Deno.errors.PermissionDenied || e instanceof Deno.errors.NotCapable
      ? "not allowed to read it"
      : (e as Error).message;
    throw new StartError(`cannot serve TLS: cannot read ${flag} ${path}: ${why}`);
  }
}

/**
 * What a feature asked for on the command line needs beyond --allow-net, if it was not granted:
 * TLS reads its two files, and the Redis client reads environment variables (without them it
 * would only look unreachable).
 */
function missingPermission(args: ChatArgs): string | null {
  const granted = (descriptor: Deno.PermissionDescriptor) =>
    Deno.permissions.querySync(descriptor).state === "granted";
  const net = granted({ name: "net" }) ? null : "chat_server.ts needs --allow-net";
  if (net) return net;
  const files = args.tlsFiles ? [args.tlsFiles.cert, args.tlsFiles.key] : [];
  if (files.some((path) => !granted({ name: "read", path }))) {
    return `--tls-cert and --tls-key need --allow-read (or --allow-read=${files.join(",")})`;
  }
  const history = args.options.historyFile;
  if (history && !(granted({ name: "read", path: history }) && granted({ name: "write", path: history }))) {
    return `--history needs --allow-read and --allow-write (or both =${history})`;
  }
  if (args.options.redis && !granted({ name: "env" })) {
    return "--redis needs --allow-env (the Redis client reads environment variables)";
  }
  return null;
}

/** The one line that says why the server could not start; rethrows what is not an expected failure. */
function whyNotStarted(e: unknown, options: ChatServerOptions): string {
  const port = options.port;
  if (e instanceof StartError) return e.message;
  if (e instanceof Deno.errors.AddrInUse) return `port ${port} is already in use`;
  if (e instanceof Deno.errors.PermissionDenied) {
    return `not allowed to listen on port ${port} (ports below 1024 need privileges)`;
  }
  if (e instanceof Deno.errors.AddrNotAvailable || e instanceof Deno.errors.NotFound) {
    return `cannot listen on ${options.host}: ${(e as Error).message}`;
  }
  // Deno reports a name that does not resolve as a plain Error, known only by its message.
  if (e instanceof Error && e.message.startsWith("failed to lookup address")) {
    return `cannot listen on ${options.host}: the name does not resolve`;
  }
  throw e;
}

/** The command line: parse, listen, serve until SIGINT or SIGTERM. */
/**
 * CHAT_OPER_PASSWORD, if it is set and may be read: from the environment, never a flag, which `ps`
 * would show to everyone on the machine.
 */
function operPassword(): string | undefined {
  const variable = "CHAT_OPER_PASSWORD";
  if (Deno.permissions.querySync({ name: "env", variable }).state !== "granted") return undefined;
  return Deno.env.get(variable) || undefined;
}

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
  const options = { ...args.options, operPassword: operPassword() };
  const missing = missingPermission(args);
  if (missing) {
    console.error(`chat_server: ${missing}`);
    Deno.exit(1);
  }
  let server: ChatServer;
  try {
    if (args.tlsFiles) {
      options.tls = {
        cert: readPem("--tls-cert", args.tlsFiles.cert),
        key: readPem("--tls-key", args.tlsFiles.key),
      };
    }
    server = await startChatServer(options);
  } catch (e) {
    console.error(`chat_server: ${whyNotStarted(e, options)}`);
    Deno.exit(1);
  }
  const stop = () => server.close();
  // Listen for signals before saying "started": a supervisor may send SIGTERM as soon as it reads it.
  for (const signal of ["SIGINT", "SIGTERM"] as const) Deno.addSignalListener(signal, stop);
  // With --log json, every line of stdout is JSON, these included.
  const say = (text: string, fields: Record<string, unknown>) =>
    console.log(
      options.logFormat === "json" ? jsonEvent(fields) : text,
    );
  const tls = options.tls ? " (TLS)" : ""; // the seed's line, and whether a plain client will be understood
  say(`ChatServer started on port ${server.addr.port}${tls}`, {
    event: "started",
    port: server.addr.port,
    ...(options.tls ? { tls: true } : {}),
  });
  if (server.httpAddr) {
    const { hostname, port } = server.httpAddr;
    const shown = hostname === "::" || hostname === "0.0.0.0"
      ? "localhost"
      : formatPeer(server.httpAddr).replace(/:\d+$/, "");
    say(`Web page at http://${shown}:${port}/`, { event: "web", url: `http://${shown}:${port}/` });
  }
  if (server.adminAddr) {
    const url = `http://${formatPeer(server.adminAddr)}/`;
    say(`Admin at ${url} (healthz, readyz, metrics)`, { event: "admin", url });
  }
  if (server.redisReady && options.redis) {
    const url = options.redis.url;
    const ready = server.redisReady.then(() => true, () => false);
    const early = await Promise.race([ready, delay(1000).then(() => false)]);
    const sharing = () => say(`Sharing rooms through Redis at ${url}`, { event: "shared", redis: url });
    if (early) sharing();
    else {
      ready.then((reached) => reached && sharing());
      console.error(
        `chat_server: Redis at ${url} is unreachable: serving local clients only while retrying`,
      );
    }
  }

  await server.finished;
  for (const signal of ["SIGINT", "SIGTERM"] as const) Deno.removeSignalListener(signal, stop);
  say("ChatServer shutdown complete", { event: "stopped" });
}

if (import.meta.main) main();
