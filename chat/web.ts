/**
 * chat/web.ts: `--http PORT`, the web door: the page (chat/page.html, .css and .js, served as one
 * file) and its WebSocket, which puts browser users in the same rooms as telnet users. A part of
 * chat_server.ts, loaded only when the flag is given (see its section 5).
 *
 * @module
 */

import type { BlockList } from "node:net";
import {
  changeNick,
  type ChatServer,
  type ChatServerOptions,
  checkName,
  type Client,
  closeQuietly,
  concatBytes,
  countDown,
  DEFAULT_HTTP_PING,
  DEFAULT_HTTP_TIMEOUT,
  Directory,
  encoder,
  formatPeer,
  ignore,
  inBlocks,
  joinRoom,
  listenForClients,
  NO_BYTES,
  nodeNet,
  PAGE_MARKS,
  type PageState,
  plainHost,
  READ_SIZE,
  settleWithin,
  showRoom,
  SHUTDOWN_GRACE_MS,
  type Stream,
  TokenBucket,
  type WebDoor,
  type Welcome,
  writeAll,
} from "../chat_server.ts";
import { type HttpRequest, readHead, respond, WebListenError } from "./http.ts";
import html from "./page.html" with { type: "text" };
import css from "./page.css" with { type: "text" };
import script from "./page.js" with { type: "text" };

/** Carriage return and line feed, as bytes. */
const CR = 13, NL = 10;

/**
 * The page, as one self-contained file: page.html with its stylesheet and script put in place, so
 * that a browser makes one request (and page.html, opened from the disk, still works).
 */
export const PAGE = inline(
  inline(html, '<link rel="stylesheet" href="page.css">', `<style>\n${css}</style>`),
  '<script src="page.js"></script>',
  `<script>\n${script}</script>`,
);

/** `page` with `tag` replaced by `content`; a page without the tag is a mistake made here, said at once. */
function inline(page: string, tag: string, content: string): string {
  if (!page.includes(tag)) throw new Error(`chat/page.html has no ${tag}`);
  return page.replace(tag, () => content);
}

/** Opens the web door for a server; throws WebListenError if its port cannot be had. */
export function openWeb(server: ChatServer, options: NonNullable<ChatServerOptions["http"]>): WebDoor {
  return new WebGate(server, options);
}

/** Request heads that may be on their way at once from one address, and from everyone. */
const HTTP_HEADS_PER_IP = 8;
const HTTP_HEADS = 256;

/**
 * The client a trusted proxy forwards a web request for: the right-most address of X-Forwarded-For
 * (else of Forwarded's `for=`) that is not itself a trusted proxy; null if there is none that parses.
 */
export function forwardedFor(headers: Map<string, string>, proxies: BlockList): string | null {
  const xff = headers.get("x-forwarded-for");
  const chain = xff !== undefined
    ? xff.split(",").map((s) => s.trim())
    : [...(headers.get("forwarded") ?? "").matchAll(/(?:^|[;,\s])for=("?)([^";,]+)\1/gi)].map((m) =>
      m[2].replace(/^\[([^\]]+)\](?::\d+)?$/, "$1").replace(/^(\d+\.\d+\.\d+\.\d+):\d+$/, "$1")
    );
  for (let i = chain.length - 1; i >= 0; i--) {
    const ip = plainHost(chain[i]);
    if (nodeNet().isIP(ip) === 0) return null; // garbage, or "unknown": nothing past it can be trusted
    if (!inBlocks(proxies, ip)) return ip;
  }
  return null;
}

/**
 * The web side, on sockets of our own: GET / is the page (PAGE), GET /ws a WebSocket client
 * of the chat. The request head is read with a size cap and a deadline, and connections still
 * sending theirs are capped per address and in all, so a trickling client costs a descriptor for
 * `--http-timeout` seconds at most. A WebSocket is then a connection like any other, with
 * RFC 6455 framing in place of telnet's: read() reads it, so it is paced by the same gate, and a
 * message of any size costs what a telnet line does.
 */
class WebGate implements WebDoor {
  readonly server: ChatServer;
  readonly origins: string[];
  readonly listener: Deno.TcpListener;
  readonly timeoutMs: number;
  /** Settles when the accept loop has stopped. */
  readonly finished: Promise<void>;
  /** Connections still sending their request head, by address, and all of them. */
  private readonly reading = new Map<string, number>();
  private readonly heads = new Set<Deno.Conn>();
  /** Seconds between pings (0: none), and their timer. */
  readonly pingSeconds: number;
  private readonly pinging: ReturnType<typeof setInterval> | undefined;

  /** Listens for HTTP; throws WebListenError if the port cannot be had. */
  constructor(server: ChatServer, options: NonNullable<ChatServerOptions["http"]>) {
    this.server = server;
    this.origins = options.origins ?? [];
    this.timeoutMs = (options.timeout ?? DEFAULT_HTTP_TIMEOUT) * 1000;
    const host = options.host ?? server.options.host;
    try {
      this.listener = listenForClients(host, options.port);
    } catch (e) {
      throw new WebListenError(options.port, host, e);
    }
    this.finished = server.run(this.listener, (conn) => this.take(conn));
    this.pingSeconds = options.ping ?? DEFAULT_HTTP_PING;
    if (this.pingSeconds > 0) this.pinging = setInterval(() => this.pingAll(), this.pingSeconds * 1000);
  }

  /**
   * Sends off each WebSocket client that has sent nothing since the last ping, and pings the
   * others; a page is also told, so that it knows the server is there.
   */
  pingAll(): void {
    for (const client of this.server.clients) {
      const link = client.link;
      if (!(link instanceof WebSocketConn)) continue;
      if (!link.heard) {
        if (client.leaving === null) this.server.limits.dropped.ping_timeout++;
        this.server.sendOff(client, "No answer to pings: closing", "no answer to pings");
        continue;
      }
      link.heard = false;
      link.ping();
      if (client.page) client.tell(PAGE_MARKS.alive(this.pingSeconds));
    }
  }

  get addr(): Deno.NetAddr {
    return this.listener.addr;
  }

  /** Stops taking requests and hangs up on heads still arriving; WebSockets close as clients. */
  shutdown(): Promise<void> {
    clearInterval(this.pinging);
    closeQuietly(this.listener);
    for (const conn of this.heads) closeQuietly(conn);
    return this.finished;
  }

  /** Takes one HTTP connection, unless its address (or everyone) has too many heads on the way. */
  take(conn: Deno.TcpConn): void {
    const ip = plainHost(conn.remoteAddr.hostname);
    const mine = this.reading.get(ip) ?? 0;
    // A trusted proxy speaks for many people: only the cap on everyone applies to it.
    const proxy = this.server.proxies !== null && inBlocks(this.server.proxies, ip);
    if ((mine >= HTTP_HEADS_PER_IP && !proxy) || this.heads.size >= HTTP_HEADS) {
      this.server.limits.refused.busy++;
      this.server.tasks.track(respond(conn, 503, "Too many requests under way; try again later\n"));
      return;
    }
    this.reading.set(ip, mine + 1);
    this.heads.add(conn);
    const head = readHead(conn, this.timeoutMs).finally(() => {
      this.heads.delete(conn);
      countDown(this.reading, ip);
    });
    this.server.tasks.track(
      head.then((request) => request ? this.serve(conn, request, ip) : closeQuietly(conn)),
    );
  }

  /** Answers one request: the page, a WebSocket upgrade, or a one-line error. */
  serve(conn: Deno.TcpConn, request: HttpRequest, ip: string): Promise<void> | void {
    const { method, path, headers } = request;
    let address = formatPeer(conn.remoteAddr);
    const proxies = this.server.proxies;
    const client = proxies && inBlocks(proxies, ip) ? forwardedFor(headers, proxies) : null;
    if (client !== null) [ip, address] = [client, formatPeer({ ...conn.remoteAddr, hostname: client })];
    if (path === "/" && (method === "GET" || method === "HEAD")) {
      return respond(conn, 200, PAGE, "text/html; charset=utf-8", method !== "HEAD");
    }
    if (path !== "/ws") return respond(conn, 404, "Not found\n");
    if (headers.get("upgrade")?.toLowerCase() !== "websocket") {
      return respond(conn, 426, "This is the chat's WebSocket: open / in a browser\n");
    }
    const key = headers.get("sec-websocket-key");
    if (method !== "GET" || !key || !/^[A-Za-z0-9+/]{22}==$/.test(key.trim())) {
      return respond(conn, 400, "A WebSocket upgrade is a GET with a Sec-WebSocket-Key\n");
    }
    if (headers.get("sec-websocket-version") !== "13") {
      return respond(conn, 426, "This server speaks WebSocket version 13 (RFC 6455)\n");
    }
    const origin = headers.get("origin");
    if (origin !== undefined && !this.originAllowed(origin, headers.get("host"))) {
      console.error(`Refused ${address}: WebSocket from another site (${origin})`);
      this.server.limits.refused.origin++;
      return respond(conn, 403, "Cross-origin WebSocket refused\n");
    }
    const refused = this.server.limits.refusal(ip, this.server.clients.size);
    if (refused) {
      console.error(`Refused ${address}: ${refused}`);
      return respond(conn, 403, refused + "\n");
    }
    const digest = crypto.subtle.digest("SHA-1", encoder.encode(key.trim() + WEBSOCKET_GUID));
    return digest.then((sha1) => {
      const accept = btoa(String.fromCharCode(...new Uint8Array(sha1)));
      const switching = "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n" +
        `Sec-WebSocket-Accept: ${accept}\r\n\r\n`;
      return writeAll(conn, encoder.encode(switching));
    }).then(() => {
      const link = new WebSocketConn(conn, request.rest, this.server.maxLine);
      if (this.server.closing) return link.close();
      const page = request.query.has("page") ? pageRequest(request.query) : null;
      const client = this.server.admit(link, address, ip, page, page && this.welcome(page));
      link.wantWrite = () => client.send(NO_BYTES); // a pong or a ping waits for a write
      this.server.receive(client, link);
    }, () => closeQuietly(conn));
  }

  /**
   * A page's own steps as it is admitted: its token before it enters the lobby, and, if it is coming
   * back, its nick and room once it is in (its old place is taken from `resume` as it enters).
   */
  welcome(page: PageState): Welcome {
    const back = page.resume;
    return {
      before: (client) => greetPage(this, client),
      after: (client) => back && resumePage(this.server, client, back),
    };
  }

  /** Same-origin pages may always connect; others only if --http-origin names them. */
  originAllowed(origin: string, host: string | undefined): boolean {
    if (this.origins.includes("*") || this.origins.includes(origin)) return true;
    try {
      return new URL(origin).host === host;
    } catch {
      return false; // "null" or garbage
    }
  }
}

const WEBSOCKET_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
const OP_CONTINUATION = 0, OP_TEXT = 1, OP_BINARY = 2, OP_CLOSE = 8, OP_PING = 9, OP_PONG = 10;
/**
 * Control frames (pings, pongs) a peer may send in a burst, and per second after it. A browser
 * sends none; a library pings every few seconds. Each one read costs a write, so a flood of them is
 * a flood of output: past this, the connection is closed (1008).
 */
const CONTROL_BURST = 20;
const CONTROL_PER_SECOND = 2;

/**
 * A WebSocket (RFC 6455) over a TCP connection, read and written as the server reads and writes
 * a telnet client. read() gives the payload of text messages as it arrives, with a newline at the
 * end of each message, so the line framer sees what a telnet user types (a message of any size
 * costs no more than a line of any size). write() sends each line as one text frame.
 *
 * What the peer sends is checked as it comes, and the first fault closes the connection with its
 * code (§7.4.1): a malformed frame (1002), a text message that cannot become UTF-8 (1007, at the
 * first byte that shows it, across fragments), a binary message (1003: this chat is text), a flood
 * of control frames (1008). A message cut short by the end of the connection is dropped.
 *
 * Control frames are output like any other: a pong (to the latest ping only, §5.5.3) or our own
 * ping waits in one slot here and goes out with the client's next write, which the flusher paces
 * and serializes, so a peer that pings and never reads costs one frame, not a queue of them.
 */
class WebSocketConn implements Stream {
  readonly door = "web";
  /** A message is a line: a partial line when the connection ends is an unfinished message. */
  readonly dropsPartialLine = true;
  /** Why the connection was failed, when the peer broke the protocol. */
  problem: string | null = null;
  /** Something came from the peer since the last ping (WebGate's keepalive reads and clears it). */
  heard = true;
  /** Asks the flusher for a write, so that a waiting control frame goes out (set by the gate). */
  wantWrite: () => void = ignore;
  private readonly conn: Deno.Conn;
  private raw: Uint8Array;
  private start = 0;
  private end = 0;
  /** Payload bytes still to come in the current data frame, its mask, and where in the mask we are. */
  private remaining = 0;
  private readonly mask = new Uint8Array(4);
  private maskAt = 0;
  private finalFrame = false;
  private inMessage = false;
  private newlineDue = false;
  private closed = false;
  private readonly text = new Utf8Check();
  private readonly controls = new TokenBucket(CONTROL_PER_SECOND / 1000, CONTROL_BURST, Date.now());
  private pong: Uint8Array | null = null;
  private pingDue = false;
  private writing: Promise<unknown> = Promise.resolve();

  constructor(conn: Deno.Conn, already: Uint8Array, maxLine: number) {
    this.conn = conn;
    this.raw = new Uint8Array(Math.max(256, Math.min(READ_SIZE, maxLine + 14)));
    this.raw.set(already.subarray(0, this.raw.length));
    this.end = Math.min(already.length, this.raw.length);
  }

  async read(p: Uint8Array): Promise<number | null> {
    for (;;) {
      if (this.newlineDue) {
        this.newlineDue = false;
        p[0] = NL; // a message is a line, whether or not it ends in one
        return 1;
      }
      if (this.remaining > 0) {
        if (this.start === this.end && !await this.fill()) return null;
        const n = Math.min(this.remaining, this.end - this.start, p.length);
        for (let i = 0; i < n; i++) p[i] = this.raw[this.start + i] ^ this.mask[(this.maskAt + i) & 3];
        this.start += n;
        this.maskAt = (this.maskAt + n) & 3;
        this.remaining -= n;
        if (!this.text.push(p.subarray(0, n))) return this.fail(1007, "a text message that is not UTF-8");
        if (this.remaining === 0 && this.finalFrame && !this.endMessage()) return null;
        return n;
      }
      if (await this.nextFrame() === null) return null;
    }
  }

  // The last frame of a message is in: it must end on a whole character.
  private endMessage(): boolean {
    if (!this.text.complete) {
      this.fail(1007, "a text message that is not UTF-8");
      return false;
    }
    this.inMessage = false;
    this.newlineDue = true;
    return true;
  }

  // Reads and handles one frame header (and a control frame's payload); null at the end.
  private async nextFrame(): Promise<true | null> {
    if (!await this.need(2)) return null;
    const b0 = this.raw[this.start], b1 = this.raw[this.start + 1];
    const opcode = b0 & 0x0f, fin = (b0 & 0x80) !== 0, control = opcode >= OP_CLOSE;
    // Judged on the first two bytes, before waiting for a length or a mask that may never come.
    if ((b1 & 0x80) === 0) return this.fail(1002, "an unmasked frame");
    if ((b0 & 0x70) !== 0) return this.fail(1002, "a frame with reserved bits set");
    if (opcode > OP_PONG || (opcode > OP_BINARY && !control)) {
      return this.fail(1002, `reserved opcode ${opcode}`);
    }
    if (control && (!fin || (b1 & 0x7f) > 125)) return this.fail(1002, "a fragmented or long control frame");
    if (opcode === OP_CONTINUATION ? !this.inMessage : !control && this.inMessage) {
      return this.fail(1002, "a fragment out of place");
    }
    if (opcode === OP_BINARY) return this.fail(1003, "a binary message (this chat takes text)");
    const lengthBytes = (b1 & 0x7f) === 126 ? 2 : (b1 & 0x7f) === 127 ? 8 : 0;
    if (!await this.need(2 + lengthBytes + 4)) return null;
    let length = lengthBytes === 0 ? b1 & 0x7f : 0, at = this.start + 2;
    for (let i = 0; i < lengthBytes; i++) length = length * 256 + this.raw[at++];
    if (length > Number.MAX_SAFE_INTEGER) return this.fail(1002, "a frame longer than can be");
    this.mask.set(this.raw.subarray(at, at + 4));
    this.start = at + 4;
    if (control) return this.control(opcode, length);
    if (opcode === OP_TEXT) this.text.reset();
    this.remaining = length;
    this.maskAt = 0;
    this.finalFrame = fin;
    this.inMessage = true;
    if (length === 0 && fin && !this.endMessage()) return null;
    return true;
  }

  // Ping: a pong, in the slot. Pong: nothing. Close: checked, answered with its code, and the end.
  private async control(opcode: number, length: number): Promise<true | null> {
    if (!await this.need(length)) return null;
    const payload = this.raw.slice(this.start, this.start + length);
    for (let i = 0; i < length; i++) payload[i] ^= this.mask[i & 3];
    this.start += length;
    if (opcode === OP_CLOSE) return this.closeFrom(payload);
    if (!this.controls.take(Date.now())) {
      return this.fail(
        1008,
        `over ${CONTROL_BURST} control frames at once, or ${CONTROL_PER_SECOND} a second`,
      );
    }
    if (opcode === OP_PING) {
      this.pong = frame(OP_PONG, payload);
      this.wantWrite();
    }
    return true;
  }

  // The peer closes: a valid close is answered with its own code (or none, if it gave none).
  private closeFrom(payload: Uint8Array): null {
    if (payload.length === 1) return this.fail(1002, "a close frame with a 1-byte body");
    if (payload.length >= 2) {
      const code = (payload[0] << 8) | payload[1];
      if (!isValidCloseCode(code)) return this.fail(1002, `close code ${code}, which no peer may send`);
      const reason = new Utf8Check();
      if (!reason.push(payload.subarray(2)) || !reason.complete) {
        return this.fail(1007, "a close reason that is not UTF-8");
      }
    }
    this.close(payload.subarray(0, 2));
    return null;
  }

  /** Fails the connection (§7.1.7): says why in `problem`, closes with `code`, and ends reading. */
  private fail(code: number, why: string): null {
    this.problem ??= `WebSocket closed with ${code}: ${why}`;
    this.close(new Uint8Array([code >> 8, code & 0xff]));
    return null;
  }

  // Makes `count` bytes available at `start` (count is at most a header or a control payload).
  private async need(count: number): Promise<boolean> {
    while (this.end - this.start < count) if (!await this.fill()) return false;
    return true;
  }

  // Reads more bytes, after moving what is left to the front; false at the end.
  private async fill(): Promise<boolean> {
    if (this.closed) return false;
    if (this.start > 0) {
      this.raw.copyWithin(0, this.start, this.end);
      this.end -= this.start;
      this.start = 0;
    }
    const n = await this.conn.read(this.raw.subarray(this.end));
    if (n === null) return false;
    this.heard = true;
    this.end += n;
    return true;
  }

  /** Queues a ping, which goes out with the next write; the peer's answer sets `heard`. */
  ping(): void {
    this.pingDue = true;
    this.wantWrite();
  }

  /** Sends each CRLF-ended line of `p` as one text frame, after the waiting control frames. */
  write(p: Uint8Array): Promise<number> {
    const frames: Uint8Array[] = [];
    let total = 0, from = 0;
    if (this.pong) total += frames[frames.push(this.pong) - 1].length;
    if (this.pingDue) total += frames[frames.push(frame(OP_PING, NO_BYTES)) - 1].length;
    this.pong = null;
    this.pingDue = false;
    for (let i = 1; i < p.length; i++) {
      if (p[i] !== NL || p[i - 1] !== CR) continue;
      if (i - 1 > from) total += frames[frames.push(frame(OP_TEXT, p.subarray(from, i - 1))) - 1].length;
      from = i + 1;
    }
    return this.send(concatBytes(frames, total)).then(() => p.length);
  }

  private send(bytes: Uint8Array): Promise<void> {
    const sent = this.writing.then(() => writeAll(this.conn, bytes));
    this.writing = sent.catch(() => {});
    return sent;
  }

  /** Sends a close frame (with `code`, if given), once; the connection closes once it is out. */
  close(code: Uint8Array = new Uint8Array([0x03, 0xe8])): void {
    if (this.closed) return;
    this.closed = true;
    const goodbye = this.send(frame(OP_CLOSE, code));
    settleWithin(SHUTDOWN_GRACE_MS, [goodbye]).finally(() => closeQuietly(this.conn));
  }
}

/** Close codes a peer may send (§7.4): those RFC 6455 and IANA define, and 3000-4999 for others. */
function isValidCloseCode(code: number): boolean {
  return (code >= 1000 && code <= 1003) || (code >= 1007 && code <= 1014) || (code >= 3000 && code <= 4999);
}

/**
 * Checks UTF-8 as it arrives in pieces, and says so at the first byte that no continuation could
 * make valid (§8.1 asks to fail fast): overlong forms, surrogates and code points past U+10FFFF
 * are caught at their second byte.
 */
export class Utf8Check {
  /** Continuation bytes still due, and the range the next one must be in. */
  private due = 0;
  private low = 0x80;
  private high = 0xbf;

  /** Starts a new text. */
  reset(): void {
    this.due = 0;
  }

  /** True at a character boundary: a text that ends here is whole. */
  get complete(): boolean {
    return this.due === 0;
  }

  /** Takes the next bytes; false if they cannot be part of valid UTF-8. */
  push(bytes: Uint8Array): boolean {
    let { due, low, high } = this;
    for (let i = 0; i < bytes.length; i++) {
      const b = bytes[i];
      if (due > 0) {
        if (b < low || b > high) return false;
        due--;
        low = 0x80;
        high = 0xbf;
      } else if (b < 0x80) continue;
      else if (b >= 0xc2 && b <= 0xdf) due = 1;
      else if (b >= 0xe0 && b <= 0xef) {
        due = 2;
        low = b === 0xe0 ? 0xa0 : 0x80; // 0xe0 0x80-0x9f would be overlong
        high = b === 0xed ? 0x9f : 0xbf; // 0xed 0xa0-0xbf would be a surrogate
      } else if (b >= 0xf0 && b <= 0xf4) {
        due = 3;
        low = b === 0xf0 ? 0x90 : 0x80; // overlong
        high = b === 0xf4 ? 0x8f : 0xbf; // past U+10FFFF
      } else return false; // a stray continuation, 0xc0, 0xc1, 0xf5-0xff
    }
    [this.due, this.low, this.high] = [due, low, high];
    return true;
  }
}

/** One unmasked frame, as a server sends it. */
function frame(opcode: number, payload: Uint8Array): Uint8Array {
  const n = payload.length;
  const header = n < 126 ? 2 : n < 65536 ? 4 : 10;
  const out = new Uint8Array(header + n);
  out[0] = 0x80 | opcode;
  if (n < 126) out[1] = n;
  else if (n < 65536) {
    out[1] = 126;
    out[2] = n >> 8;
    out[3] = n & 0xff;
  } else {
    out[1] = 127;
    for (let i = 0, rest = n; i < 8; i++, rest = Math.floor(rest / 256)) out[9 - i] = rest & 0xff;
  }
  out.set(payload, header);
  return out;
}

/** What `/ws?page=1&room=R&epoch=E&seq=N&token=T&nick=N` asks for; anything malformed is ignored. */
function pageRequest(query: URLSearchParams): PageState {
  const page: PageState = { token: crypto.randomUUID(), resume: null };
  const [room, epoch, seq] = [query.get("room") ?? "", query.get("epoch") ?? "", query.get("seq") ?? ""];
  if (checkName(room, "room name") === null && /^[0-9a-f]{8}$/.test(epoch) && /^\d{1,15}$/.test(seq)) {
    page.resume = {
      room,
      epoch,
      seq: Number(seq),
      token: query.get("token") ?? "",
      nick: query.get("nick") ?? "",
    };
  }
  return page;
}

/**
 * A page has connected (ChatServer.admit): it is given its token, and if its old connection is
 * still here (the server has not yet noticed the drop), the new one takes its place.
 */
function greetPage(gate: WebGate, client: Client): void {
  const { server, pingSeconds } = gate;
  const page = client.page!;
  client.tell(PAGE_MARKS.token(page.token));
  if (pingSeconds > 0) client.tell(PAGE_MARKS.alive(pingSeconds));
  const old = page.resume && server.directory.pages.get(page.resume.token);
  if (old) {
    server.sendOff(old, "You connected again: this connection is closed", "reconnected");
    server.leave(old); // at once: its nick is free for the new connection
  }
  server.directory.pages.set(page.token, client);
}

/** A page coming back gets its nick and room again; its room then shows it what it missed. */
function resumePage(server: ChatServer, client: Client, back: { nick: string; room: string }): void {
  const { nick, room } = back;
  const named = nick !== "" && nick !== client.label ? changeNick(server, client, nick) : undefined;
  const move = () => {
    const moved = Directory.same(room, client.room.name) ? undefined : joinRoom(server, client, room);
    return moved ? moved.then(fallBack) : fallBack();
  };
  // If it could not go back to its room, it is shown the room it is in.
  const fallBack = () => {
    if (client.page!.resume) showRoom(server, client, client.room);
  };
  if (named) client.waitBehind(named.then(move));
  else {
    const moving = move();
    if (moving) client.waitBehind(moving);
  }
}
