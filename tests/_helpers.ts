// Shared test tools. The file name starts with "_" so that `deno test` does not take it for a test file.
//
// Waiting:      WAIT_MS, within(ms, promise, what), eventually(what, test)
// TCP clients:  TestClient (connect, write, readLine, readToEnd), joinChat(port), GREETING,
//               From (a client from a loopback address of its own: 127.0.0.7, say),
//               ask(client, line, ...expected), clocked(text), readUntil(client, test), readSlowly(...),
//               sendNumberedLines(sender, count, width), resetConnections(port, count)
// Servers:      withServer(options, body), withWebServer(options, body), Capture (a log to wait on),
//               freePort()
// Programs:     Cli (a spawned script, read line by line), runScript(script, args, stdin),
//               hasProgram(name), needs(name, programs) (a test ignored, with its reason), rssKiB(pid)
// The web:      WsClient, withChromium(body), Hiccup (a relay that can cut or freeze connections)
// TLS:          withCertificates(body), makeCertificates(dir): a CA and a localhost leaf, by openssl
import assert from "node:assert/strict";
import { connect, type Socket } from "node:net";
import { type ChatServerOptions, startChatServer } from "../chat_server.ts";

export const encoder = new TextEncoder();
export const decoder = new TextDecoder();

/** How long a test waits for bytes it expects before it fails. */
export const WAIT_MS = 10_000;

/** Rejects after `ms` unless `promise` settles first; clears its timer either way. */
export async function within<T>(ms: number, promise: Promise<T>, what: string): Promise<T> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms waiting for ${what}`)), ms);
  });
  try {
    return await Promise.race([promise, timeout]);
  } finally {
    clearTimeout(timer);
  }
}

/** A TCP client for tests: reads whole lines (with their endings) and writes exact bytes. */
export class TestClient {
  readonly conn: Deno.TcpConn;
  #pending = new Uint8Array(0);
  #closed = false;

  constructor(conn: Deno.TcpConn) {
    this.conn = conn;
  }

  static async connect(port: number, hostname = "127.0.0.1"): Promise<TestClient> {
    const conn = await Deno.connect({ hostname, port });
    conn.setNoDelay(true);
    return new TestClient(conn);
  }

  /** `host:port` of this client as a server prints it. */
  get name(): string {
    const a = this.conn.localAddr as Deno.NetAddr;
    return a.hostname.includes(":") ? `[${a.hostname}]:${a.port}` : `${a.hostname}:${a.port}`;
  }

  async write(data: string | Uint8Array): Promise<void> {
    let bytes = typeof data === "string" ? encoder.encode(data) : data;
    while (bytes.length > 0) bytes = bytes.subarray(await this.conn.write(bytes));
  }

  /** Reads one line, including its "\n"; null at EOF. */
  async readLine(ms = WAIT_MS): Promise<string | null> {
    const bytes = await this.readLineBytes(ms);
    return bytes && decoder.decode(bytes);
  }

  async readLineBytes(ms = WAIT_MS): Promise<Uint8Array | null> {
    for (;;) {
      const nl = this.#pending.indexOf(10);
      if (nl >= 0) {
        const line = this.#pending.slice(0, nl + 1);
        this.#pending = this.#pending.slice(nl + 1);
        return line;
      }
      if (!await this.#fill(ms)) return null;
    }
  }

  /** Reads until the peer closes, and returns everything not yet read. */
  async readToEnd(ms = WAIT_MS): Promise<string> {
    while (await this.#fill(ms));
    const rest = decoder.decode(this.#pending);
    this.#pending = new Uint8Array(0);
    return rest;
  }

  async #fill(ms: number): Promise<boolean> {
    const buf = new Uint8Array(65536);
    let n: number | null;
    try {
      n = await within(ms, this.conn.read(buf), "a line from the server");
    } catch (e) {
      if (e instanceof Deno.errors.ConnectionReset) return false;
      throw e;
    }
    if (n === null) return false;
    const joined = new Uint8Array(this.#pending.length + n);
    joined.set(this.#pending);
    joined.set(buf.subarray(0, n), this.#pending.length);
    this.#pending = joined;
    return true;
  }

  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    this.conn.close();
  }

  [Symbol.dispose](): void {
    this.close();
  }
}

/** What chat_server.ts says to each newcomer. */
export const GREETING = "You're connected to the Deno chatserver\r\n";

/** Connects a client to a chat server and reads past its greeting. */
export async function joinChat(port: number, hostname = "127.0.0.1"): Promise<TestClient> {
  const client = await TestClient.connect(port, hostname);
  const greeting = await client.readLine();
  if (greeting !== GREETING) throw new Error(`expected the greeting, got ${JSON.stringify(greeting)}`);
  return client;
}

/** A line client whose connection comes from `local` (a loopback address of its own), through node:net. */
export class From {
  readonly socket: Socket;
  #text = "";
  #wake: (() => void) | null = null;
  #ended = false;

  private constructor(socket: Socket) {
    this.socket = socket;
    socket.setEncoding("latin1");
    socket.on("data", (chunk: string) => (this.#text += chunk, this.#wake?.()));
    socket.on("close", () => (this.#ended = true, this.#wake?.()));
    socket.on("error", () => {});
  }

  /** Connects from `local` to a chat server, and reads past its greeting. */
  static async join(local: string, port: number): Promise<From> {
    const client = await From.connect(local, port);
    const greeting = await client.readLine();
    if (greeting !== GREETING) throw new Error(`expected the greeting, got ${JSON.stringify(greeting)}`);
    return client;
  }

  static connect(local: string, port: number): Promise<From> {
    return new Promise((resolve, reject) => {
      const socket = connect({ host: "127.0.0.1", port, localAddress: local });
      socket.once("connect", () => resolve(new From(socket)));
      socket.once("error", reject);
    });
  }

  /** `local:port`, as the server prints this client. */
  get name(): string {
    return `${this.socket.localAddress}:${this.socket.localPort}`;
  }

  write(text: string | Uint8Array): void {
    this.socket.write(text);
  }

  async readLine(): Promise<string | null> {
    const deadline = Date.now() + WAIT_MS;
    for (;;) {
      const at = this.#text.indexOf("\r\n");
      if (at >= 0) {
        const line = this.#text.slice(0, at + 2);
        this.#text = this.#text.slice(at + 2);
        return line;
      }
      if (this.#ended) return null;
      await within(Math.max(1, deadline - Date.now()), new Promise<void>((r) => this.#wake = r), "a line");
    }
  }

  /** Sends a line and expects these lines back, in order (a pattern matches a line without its CRLF). */
  async ask(line: string, ...expected: (string | RegExp)[]): Promise<void> {
    this.write(line + "\r\n");
    for (const want of expected) expectLine(await this.readLine(), want);
  }

  /** Reads lines until one passes `test`, and returns it. */
  async readUntil(test: (line: string) => boolean): Promise<string> {
    for (;;) {
      const line = await this.readLine();
      if (line === null) throw new Error("closed while waiting");
      if (test(line)) return line;
    }
  }

  [Symbol.dispose](): void {
    this.socket.destroy();
  }

  close(): Promise<void> {
    if (this.#ended) return Promise.resolve();
    return new Promise((resolve) => (this.socket.once("close", () => resolve()), this.socket.destroy()));
  }
}

/** A spawned `deno run` of one of our scripts, with its stdout read line by line. */
export class Cli {
  readonly child: Deno.ChildProcess;
  #lines: AsyncIterator<string>;
  #stdoutSeen: string[] = [];

  constructor(script: string, args: string[], env: Record<string, string> = {}) {
    this.child = new Deno.Command(Deno.execPath(), {
      args: ["run", "-A", script, ...args],
      cwd: new URL("..", import.meta.url).pathname,
      stdin: "null",
      stdout: "piped",
      stderr: "piped",
      env: { NO_COLOR: "1", ...env },
    }).spawn();
    this.#lines = this.child.stdout.pipeThrough(new TextDecoderStream()).pipeThrough(
      new LineSplitter(),
    )[Symbol.asyncIterator]();
  }

  /** The next line of stdout, without its ending; null at EOF. */
  async readLine(ms = WAIT_MS): Promise<string | null> {
    const r = await within(ms, this.#lines.next(), "a line from the program");
    if (r.done) return null;
    this.#stdoutSeen.push(r.value);
    return r.value;
  }

  /**
   * Reads the first line, which must be `ChatServer started on port N` (a script told port 0 says
   * which it bound), and returns N: no port is picked before the server binds it, so no other
   * process can take it in between.
   */
  async started(): Promise<number> {
    const line = await this.readLine();
    const m = /^ChatServer started on port (\d+)( \(TLS\))?$/.exec(line ?? "");
    if (!m) throw new Error(`the server did not start: ${JSON.stringify(line)}`);
    return Number(m[1]);
  }

  /** Reads lines until one matches `pattern` (a URL with its port, say); returns its first group. */
  async lineWith(pattern: RegExp): Promise<string> {
    for (let line = await this.readLine(); line !== null; line = await this.readLine()) {
      const m = pattern.exec(line);
      if (m) return m[1];
    }
    throw new Error(`the program ended before a line matched ${pattern}`);
  }

  /** Waits for exit; returns the code with the rest of stdout and all of stderr. */
  async finish(ms = WAIT_MS): Promise<{ code: number; stdout: string[]; stderr: string }> {
    const rest: string[] = [];
    for (let line = await this.readLine(ms); line !== null; line = await this.readLine(ms)) {
      rest.push(line);
    }
    const stderr = await within(ms, new Response(this.child.stderr).text(), "stderr");
    const status = await within(ms, this.child.status, "the program to exit");
    return { code: status.code, stdout: rest, stderr };
  }

  kill(signal: Deno.Signal = "SIGTERM"): void {
    try {
      this.child.kill(signal);
    } catch (e) {
      if (!(e instanceof TypeError)) throw e; // already exited
    }
  }
}

/** Splits a text stream into lines, dropping "\n" and a "\r" before it. */
class LineSplitter extends TransformStream<string, string> {
  constructor() {
    let rest = "";
    super({
      transform(chunk, controller) {
        const parts = (rest + chunk).split("\n");
        rest = parts.pop()!;
        for (const p of parts) controller.enqueue(p.replace(/\r$/, ""));
      },
      flush(controller) {
        if (rest) controller.enqueue(rest);
      },
    });
  }
}

/** Runs a script to completion with the given arguments and stdin. */
export async function runScript(
  script: string,
  args: string[],
  stdin = "",
): Promise<{ code: number; stdout: string; stderr: string }> {
  const child = new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", script, ...args],
    cwd: new URL("..", import.meta.url).pathname,
    stdin: "piped",
    stdout: "piped",
    stderr: "piped",
    env: { NO_COLOR: "1" },
  }).spawn();
  const writer = child.stdin.getWriter();
  await writer.write(encoder.encode(stdin));
  await writer.close();
  const out = await within(30_000, child.output(), `${script} ${args.join(" ")} to finish`);
  return { code: out.code, stdout: decoder.decode(out.stdout), stderr: decoder.decode(out.stderr) };
}

/** True if `program` is on PATH. */
export function hasProgram(program: string): boolean {
  for (const dir of (Deno.env.get("PATH") ?? "").split(":")) {
    try {
      if (Deno.statSync(`${dir}/${program}`).isFile) return true;
    } catch (e) {
      if (!(e instanceof Deno.errors.NotFound)) throw e;
    }
  }
  return false;
}

/** A test name that carries the reason it is ignored, so the runner's output shows why. */
export function needs(name: string, programs: string[]): { name: string; ignore: boolean } {
  const missing = programs.filter((p) => !hasProgram(p));
  return missing.length === 0
    ? { name, ignore: false }
    : { name: `${name} (ignored: ${missing.join(", ")} not installed)`, ignore: true };
}

/** Resident memory of a process in KiB, from /proc. */
export function rssKiB(pid: number): number {
  const status = Deno.readTextFileSync(`/proc/${pid}/status`);
  return Number(/VmRSS:\s+(\d+)/.exec(status)![1]);
}

/** The port in a server's `ChatServer started on port N` line, wherever it is in `text`. */
export function portIn(text: string): number {
  const m = /ChatServer started on port (\d+)/.exec(text);
  if (!m) throw new Error(`no "ChatServer started" in ${JSON.stringify(text.slice(0, 200))}`);
  return Number(m[1]);
}

/**
 * A port nobody listens on: bound, noted and released. Only for a port that must stay dead (a
 * Redis nobody runs); a server is told port 0 and says which it bound, since another process may
 * take this one before a server could.
 */
export function freePort(): number {
  using l = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  return l.addr.port;
}

/** A writer that keeps what it is given and lets a test wait for text to appear. */
export class Capture {
  text = "";
  #wake: (() => void) | null = null;

  write(p: Uint8Array): Promise<number> {
    this.text += decoder.decode(p);
    this.#wake?.();
    return Promise.resolve(p.length);
  }

  /** Waits until the captured text matches. */
  async waitFor(pattern: string | RegExp, ms = WAIT_MS): Promise<void> {
    const seen = () => typeof pattern === "string" ? this.text.includes(pattern) : pattern.test(this.text);
    const deadline = Date.now() + ms;
    while (!seen()) {
      if (Date.now() > deadline) throw new Error(`never saw ${pattern} in ${JSON.stringify(this.text)}`);
      await within(deadline - Date.now() + 1, new Promise<void>((r) => this.#wake = r), `${pattern}`)
        .catch(() => {});
    }
  }
}

/**
 * Reads `count` numbered lines from `sender` (as sendNumberedLines() writes them) the way a slow
 * but live reader does: at most `chunk` bytes per read, then a pause of `pauseMs`. Returns how
 * many arrived in order before the connection ended; other lines (joins, leaves) are skipped.
 */
export async function readSlowly(
  reader: TestClient,
  senderLabel: string,
  count: number,
  chunk = 16 * 1024,
  pauseMs = 2,
): Promise<number> {
  const buf = new Uint8Array(chunk);
  const prefix = `[${senderLabel}] `;
  let rest = "", got = 0;
  while (got < count) {
    const n = await within(WAIT_MS, reader.conn.read(buf), "the next bytes from the server")
      .catch((e) => e instanceof Deno.errors.ConnectionReset ? null : Promise.reject(e));
    if (n === null) break;
    const lines = (rest + decoder.decode(buf.subarray(0, n), { stream: true })).split("\r\n");
    rest = lines.pop()!;
    for (const line of lines) {
      if (!line.startsWith(prefix)) continue;
      if (line.slice(prefix.length, prefix.length + 7) !== String(got).padStart(7, "0")) {
        throw new Error(`line ${got} out of order: ${JSON.stringify(line.slice(0, 40))}`);
      }
      got++;
    }
    await new Promise((r) => setTimeout(r, pauseMs));
  }
  return got;
}

/** Writes `count` numbered lines of `width` bytes from `sender`, 256 lines a write. */
export async function sendNumberedLines(sender: TestClient, count: number, width: number): Promise<void> {
  const pad = "x".repeat(width - 10);
  let batch: string[] = [];
  for (let i = 0; i < count; i++) {
    batch.push(`${String(i).padStart(7, "0")} ${pad}\n`);
    if (batch.length === 256 || i === count - 1) {
      await sender.write(batch.join(""));
      batch = [];
    }
  }
}

/** A WebSocket client whose messages can be awaited one by one. */
export class WsClient {
  readonly ws: WebSocket;
  #messages: string[] = [];
  #wake: (() => void) | null = null;
  #closed: Promise<void>;

  constructor(url: string) {
    this.ws = new WebSocket(url);
    this.ws.onmessage = (e) => {
      this.#messages.push(String(e.data));
      this.#wake?.();
    };
    this.#closed = new Promise((resolve) => this.ws.addEventListener("close", () => resolve()));
  }

  opened(ms = WAIT_MS): Promise<void> {
    return within(
      ms,
      new Promise((resolve) => this.ws.addEventListener("open", () => resolve())),
      "open",
    );
  }

  async next(): Promise<string> {
    while (this.#messages.length === 0) {
      await within(WAIT_MS, new Promise<void>((resolve) => this.#wake = resolve), "a WebSocket message");
    }
    return this.#messages.shift()!;
  }

  /** Settles when the server has closed the connection. */
  closed(ms = WAIT_MS): Promise<void> {
    return within(ms, this.#closed, "the WebSocket to close");
  }

  async close(): Promise<void> {
    this.ws.close();
    await this.#closed;
  }
}

/** Starts a server with `options` on a free port, runs `body`, and closes everything afterwards. */
export async function withServer(
  options: ChatServerOptions,
  body: (port: number, log: Capture) => Promise<void>,
): Promise<void> {
  const log = new Capture();
  const server = await startChatServer({ port: 0, log, ...options });
  try {
    await body(server.addr.port, log);
  } finally {
    await server.close();
  }
}

/** Starts a server with its web side on free ports, runs `body` with both ports, and closes everything. */
export async function withWebServer(
  options: ChatServerOptions,
  body: (tcpPort: number, httpPort: number) => Promise<void>,
): Promise<void> {
  const server = await startChatServer({
    port: 0,
    host: "127.0.0.1",
    log: null,
    http: { port: 0 },
    ...options,
  });
  try {
    await body(server.addr.port, server.httpAddr!.port);
  } finally {
    await server.close();
  }
}

/** Waits until `test` passes, looking every 100 ms; throws, naming `what`, after WAIT_MS. */
export async function eventually(what: string, test: () => boolean | Promise<boolean>): Promise<void> {
  const deadline = Date.now() + WAIT_MS;
  while (!await test()) {
    if (Date.now() > deadline) throw new Error(`never: ${what}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

/** Sends a line and expects these lines back, in order (a pattern matches a line without its CRLF). */
export async function ask(client: TestClient, line: string, ...expected: (string | RegExp)[]): Promise<void> {
  await client.write(line + "\r\n");
  for (const want of expected) expectLine(await client.readLine(), want);
}

function expectLine(line: string | null, want: string | RegExp): void {
  if (typeof want === "string") return assert.equal(line, want + "\r\n");
  assert.match(line ?? "(closed)", new RegExp(want.source.replace(/\$$/, "\r\n$")));
}

/**
 * `text` as a pattern of a whole line, each `{M}` standing for when the server says something ends
 * M minutes from now: `HH:MM` today, `YYYY-MM-DD HH:MM` another day, give or take the minute that
 * may turn while the answer is on its way.
 */
export function clocked(text: string): RegExp {
  const at = (minutes: number) => {
    const when = new Date(Date.now() + minutes * 60_000), clock = when.toTimeString().slice(0, 5);
    if (when.toDateString() === new Date().toDateString()) return clock;
    const day = [when.getFullYear(), when.getMonth() + 1, when.getDate()].map((n) =>
      String(n).padStart(2, "0")
    );
    return `${day.join("-")} ${clock}`;
  };
  const escape = (t: string) => t.replace(/[.*+?^${}()|[\]\\/]/g, "\\$&");
  const parts = text.split(/\{(\d+)\}/).map((part, i) =>
    i % 2 === 0 ? escape(part) : `(?:${[-1, 0, 1].map((d) => escape(at(Number(part) + d))).join("|")})`
  );
  return new RegExp(`^${parts.join("")}$`);
}

/** Reads lines until one passes `test`, and returns it. */
export async function readUntil(client: TestClient, test: (line: string) => boolean): Promise<string> {
  for (;;) {
    const line = await client.readLine();
    if (line === null) throw new Error("closed while waiting");
    if (test(line)) return line;
  }
}

/**
 * Opens `count` connections to `port` and resets each at once (SO_LINGER 0, from Python, as Deno
 * cannot set it), before the server has accepted them.
 */
export async function resetConnections(port: number, count: number): Promise<void> {
  const script = `
import socket, struct, sys
for _ in range(int(sys.argv[2])):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.connect(("127.0.0.1", int(sys.argv[1])))
    s.close()
`;
  const out = await new Deno.Command("python3", { args: ["-c", script, String(port), String(count)] })
    .output();
  if (!out.success) throw new Error(`python3 failed: ${decoder.decode(out.stderr)}`);
}

/** Runs `body` with a headless Chromium (as Debian installs it), closed afterwards. */
export async function withChromium(
  body: (browser: import("playwright-core").Browser) => Promise<void>,
): Promise<void> {
  const { chromium } = await import("playwright-core");
  const browser = await chromium.launch({
    executablePath: "/usr/bin/chromium",
    args: [
      "--no-sandbox",
      "--disable-gpu",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
      "--no-first-run",
    ],
  });
  try {
    await body(browser);
  } finally {
    await browser.close();
  }
}

/**
 * A TCP relay to `port` that can drop every connection through it at once and refuse new ones
 * for a while: the Wi-Fi hiccup between a browser and the server. freeze() stops the connections
 * through it from passing anything, both ways, and keeps their sockets open: a laptop's lid closed.
 */
export class Hiccup {
  readonly listener: Deno.TcpListener;
  readonly #conns = new Set<Deno.Conn>();
  readonly #frozen = new Set<Deno.Conn>();
  readonly #thawed = Promise.withResolvers<void>();
  #refusing = false;

  constructor(port: number) {
    this.listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
    this.#accept(port);
  }

  get port(): number {
    return this.listener.addr.port;
  }

  async #accept(port: number): Promise<void> {
    for await (const near of this.listener) {
      if (this.#refusing) {
        near.close();
        continue;
      }
      const far = await Deno.connect({ hostname: "127.0.0.1", port });
      this.#conns.add(near).add(far);
      this.#pump(near, far);
      this.#pump(far, near);
    }
  }

  async #pump(from: Deno.Conn, to: Deno.Conn): Promise<void> {
    const buffer = new Uint8Array(64 * 1024);
    try {
      for (let n; (n = await from.read(buffer)) !== null;) {
        if (this.#frozen.has(from)) await this.#thawed.promise; // what it read is never passed on
        for (let at = 0; at < n;) at += await to.write(buffer.subarray(at, n));
      }
    } catch {
      // cut
    }
    for (const conn of [from, to]) {
      if (this.#conns.delete(conn)) conn.close();
    }
  }

  /** Drops every connection, and refuses new ones until `restore()`. */
  cut(): void {
    this.#refusing = true;
    for (const conn of this.#conns) conn.close();
    this.#conns.clear();
  }

  restore(): void {
    this.#refusing = false;
  }

  /** Stops every connection now open from passing bytes, either way; new ones pass as before. */
  freeze(): void {
    for (const conn of this.#conns) this.#frozen.add(conn);
  }

  close(): void {
    this.cut();
    this.listener.close();
    this.#thawed.resolve();
  }
}

/** Runs `body` with a localhost certificate and key (PEM) and the CA that signed them, then cleans up. */
export async function withCertificates(
  body: (tls: { cert: string; key: string }, caCerts: string[], dir: string) => Promise<void>,
): Promise<void> {
  const dir = await Deno.makeTempDir();
  try {
    await makeCertificates(dir);
    const read = (name: string) => Deno.readTextFileSync(`${dir}/${name}`);
    await body({ cert: read("server.crt"), key: read("server.key") }, [read("ca.crt")], dir);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

/** Makes a CA and a leaf certificate for localhost with openssl, in `dir`. */
export async function makeCertificates(dir: string): Promise<void> {
  const script = `
    set -e
    cd "${dir}"
    openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.crt -days 2 -subj "/CN=Test CA" 2>/dev/null
    openssl req -newkey rsa:2048 -nodes -keyout server.key -out server.csr -subj "/CN=localhost" 2>/dev/null
    printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\\nbasicConstraints=CA:FALSE\\n' > ext.cnf
    openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out server.crt -days 2 -extfile ext.cnf 2>/dev/null
  `;
  const out = await new Deno.Command("sh", { args: ["-c", script], stderr: "piped" }).output();
  assert.equal(out.code, 0, new TextDecoder().decode(out.stderr));
}
