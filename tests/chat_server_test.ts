import assert from "node:assert/strict";
import {
  Client,
  Directory,
  Flusher,
  HOLD_BANK_MS,
  LineFramer,
  parseChatArgs,
  SharedJoin,
  startChatServer,
  TokenBucket,
} from "../chat_server.ts";
import {
  Cli,
  decoder,
  encoder,
  GREETING,
  joinChat,
  needs,
  readSlowly,
  readUntil,
  resetConnections,
  rssKiB,
  sendNumberedLines,
  TestClient,
  WAIT_MS,
  within,
  withServer,
} from "./_helpers.ts";

// --- The tutorial's transcript --------------------------------------------------------------

Deno.test("startChatServer() plays the tutorial's transcript byte for byte", async () => {
  await withServer({}, async (port) => {
    using a = await TestClient.connect(port);
    assert.equal(await a.readLine(), "You're connected to the Deno chatserver\r\n");
    using b = await TestClient.connect(port);
    assert.equal(await b.readLine(), "You're connected to the Deno chatserver\r\n");
    assert.match(b.name, /^127\.0\.0\.1:\d+$/); // an IPv4 peer on the dual-stack socket
    assert.equal(await a.readLine(), `Client joined ${b.name}\r\n`);
    await b.write("Hello, is anyone there?\r\n");
    assert.equal(await a.readLine(), `[${b.name}] Hello, is anyone there?\r\n`);
    await a.write("Yes, I'm here.\r\n");
    // b's next line is a's, not an echo of its own
    assert.equal(await b.readLine(), `[${a.name}] Yes, I'm here.\r\n`);
    const aName = a.name;
    a.close();
    assert.equal(await b.readLine(), `Client left ${aName}\r\n`);
  });
});

Deno.test("chat_server.ts prints the tutorial's server log on stdout", async () => {
  const cli = new Cli("chat_server.ts", ["0"]);
  const port = await cli.started();
  const a = await joinChat(port);
  const b = await joinChat(port);
  assert.equal(await cli.readLine(), `Client joined ${a.name}`);
  assert.equal(await cli.readLine(), `Client joined ${b.name}`);
  await b.write("Hello, is anyone there?\r\n");
  assert.equal(await cli.readLine(), `[${b.name}] Hello, is anyone there?`);
  await a.write("Yes, I'm here.\r\n");
  assert.equal(await cli.readLine(), `[${a.name}] Yes, I'm here.`);
  const aName = a.name;
  a.close();
  assert.equal(await cli.readLine(), `Client left ${aName}`);
  const bName = b.name;
  b.close();
  assert.equal(await cli.readLine(), `Client left ${bName}`);
  cli.kill("SIGINT");
  const { code, stdout } = await cli.finish();
  assert.equal(code, 0);
  assert.deepEqual(stdout, ["ChatServer shutdown complete"]);
});

Deno.test("chat_server.ts logs chat lines and events in the order they happen, in one batch or not", async () => {
  const cli = new Cli("chat_server.ts", ["0"]);
  const port = await cli.started();
  const a = await joinChat(port);
  assert.equal(await cli.readLine(), `Client joined ${a.name}`);
  await a.write("one\r\n/nick ann\r\ntwo\r\n/join dev\r\nthree\r\n"); // one read, one batch of the log
  for (const expected of [`[${a.name}] one`, `${a.name} is now known as ann`, "[ann] two"]) {
    assert.equal(await cli.readLine(), expected);
  }
  assert.equal(await cli.readLine(), "ann has left lobby for dev");
  assert.equal(await cli.readLine(), "ann has joined dev");
  assert.equal(await cli.readLine(), "[ann] three");
  a.close();
  assert.equal(await cli.readLine(), "Client left ann");
  cli.kill("SIGINT");
  assert.equal((await cli.finish()).code, 0);
});

// --- Framing ---------------------------------------------------------------------------------

/** Frames `chunks` fed one by one; returns each line decoded, with "!" after truncated ones. */
function frame(chunks: (string | number[])[], maxLine = 4096): string[] {
  const lines: string[] = [];
  const framer = new LineFramer(maxLine, (line, truncated) => {
    lines.push(decoder.decode(line) + (truncated ? "!" : ""));
  });
  for (const c of chunks) framer.push(typeof c === "string" ? encoder.encode(c) : new Uint8Array(c));
  return lines;
}

Deno.test("LineFramer reassembles a line cut at every possible byte", () => {
  const bytes = encoder.encode("héllo wörld €\r\nnext\n");
  for (let cut = 0; cut <= bytes.length; cut++) {
    for (let cut2 = cut; cut2 <= bytes.length; cut2++) {
      const parts = [bytes.slice(0, cut), bytes.slice(cut, cut2), bytes.slice(cut2)].map((p) => [...p]);
      assert.deepEqual(frame(parts), ["héllo wörld €", "next"], `cut at ${cut} and ${cut2}`);
    }
  }
});

Deno.test("LineFramer ends lines at CRLF, LF, CR and CR NUL, split or not", () => {
  assert.deepEqual(frame(["a\r\nb\nc\rd\r\0e\r\n"]), ["a", "b", "c", "d", "e"]);
  assert.deepEqual(frame(["a\r", "\nb\r", [0], "c\r", "d\n"]), ["a", "b", "c", "d"]);
  assert.deepEqual(frame(["\r\n\r\n\n"]), ["", "", ""]);
});

Deno.test("LineFramer removes telnet negotiation and control characters", () => {
  const iac = [255, 253, 1, ...encoder.encode("hi"), 255, 250, 24, 1, 255, 255, 2, 255, 240];
  assert.deepEqual(frame([iac, " there", [255, 241], "\r\n"]), ["hi there"]);
  assert.deepEqual(frame([[255], [251], [3], "x\n"]), ["x"]); // split inside a command
  assert.deepEqual(frame(["a\x1b[31mb\x07c\td\x7f\x08e\n"]), ["a[31mbc\tde"]);
  assert.deepEqual(frame([[255, 255], "y\n"]), ["y"]); // an escaped 255 is not UTF-8: dropped
});

Deno.test("LineFramer removes C1 controls, and hands over only valid UTF-8", () => {
  // CSI as U+009B (C2 9B), then NEL (C2 85), then a raw 0x9B that is not UTF-8 at all
  const line = [
    0x41,
    0xc2,
    0x9b,
    ...encoder.encode("31m"),
    0xc2,
    0x85,
    0x9b,
    0x42,
    ...encoder.encode("é€\n"),
  ];
  assert.deepEqual(frame([line]), ["A31m\uFFFDBé€"]);
  assert.deepEqual(frame([[0xc2], [0x9b], "x\n"]), ["x"]); // split inside the character
  assert.deepEqual(frame(["plain ascii\n"]), ["plain ascii"]);
});

Deno.test("LineFramer truncates an over-long line at a character boundary and skips the rest", () => {
  assert.deepEqual(frame(["abcdefghij\r\nok\r\n"], 4), ["abcd!", "ok"]);
  assert.deepEqual(frame(["ab€€\n"], 4), ["ab!"]); // "€" is 3 bytes: never cut in half
  assert.deepEqual(frame(["abcd\n"], 4), ["abcd"]); // exactly the limit is fine
});

Deno.test("startChatServer() relays a line split over three writes", async () => {
  await withServer({}, async (port) => {
    using a = await joinChat(port);
    using b = await joinChat(port);
    await a.readLine();
    const bytes = encoder.encode("Grüße, €uro!\r\n");
    // cut inside "ü" and inside "€"; a pause between writes makes them separate TCP reads
    for (const part of [bytes.slice(0, 3), bytes.slice(3, 12), bytes.slice(12)]) {
      await b.write(part);
      await new Promise((r) => setTimeout(r, 30));
    }
    assert.equal(await a.readLine(), `[${b.name}] Grüße, €uro!\r\n`);
  });
});

Deno.test("startChatServer() ends lines at CRLF, LF, CR and CR NUL and skips empty ones", async () => {
  await withServer({}, async (port) => {
    using a = await joinChat(port);
    using b = await joinChat(port);
    await a.readLine();
    await b.write("one\r\ntwo\nthree\rfour\r\0\r\n\n  \t\r\nfive\r\n");
    for (const word of ["one", "two", "three", "four", "five"]) {
      assert.equal(await a.readLine(), `[${b.name}] ${word}\r\n`);
    }
  });
});

Deno.test("startChatServer() strips telnet negotiation before relaying", async () => {
  await withServer({}, async (port) => {
    using a = await joinChat(port);
    using b = await joinChat(port);
    await a.readLine();
    await b.write(new Uint8Array([255, 253, 1, 255, 251, 31, 255, 250, 31, 0, 80, 0, 24, 255, 240]));
    await b.write("bell\x07 and \x1b[2Jclear\r\n");
    assert.equal(await a.readLine(), `[${b.name}] bell and [2Jclear\r\n`);
  });
});

Deno.test("startChatServer() relays no C1 control and no byte that is not UTF-8", async () => {
  await withServer({}, async (port) => {
    using a = await joinChat(port);
    using b = await joinChat(port);
    await a.readLine();
    await b.write(new Uint8Array([0xc2, 0x9b, ...encoder.encode("2J wiped?"), 0x9b, 0x85, 0x0d, 0x0a]));
    const bytes = (await a.readLineBytes())!;
    assert.equal(decoder.decode(bytes), `[${b.name}] 2J wiped?\uFFFD\uFFFD\r\n`);
    assert.ok(
      ![...bytes].some((x, i) => x >= 0x80 && x <= 0x9f && bytes[i - 1] === 0xc2),
      "a C1 control got through",
    );
  });
});

Deno.test("startChatServer() truncates an over-long line and tells the sender", async () => {
  await withServer({ maxLine: 16 }, async (port) => {
    using a = await joinChat(port);
    using b = await joinChat(port);
    await a.readLine();
    await b.write("0123456789abcdefTHE REST IS LOST\r\nshort\r\n");
    assert.equal(await a.readLine(), `[${b.name}] 0123456789abcdef\r\n`);
    assert.equal(await a.readLine(), `[${b.name}] short\r\n`);
    assert.equal(await b.readLine(), "Your line was over 16 bytes; the rest of it was discarded\r\n");
  });
});

// --- Limits and slow consumers -----------------------------------------------------------------

/** Runs chat_server.ts with no flood limit, reading its log as a terminal would; stop() ends it. */
async function startFloodableServer() {
  const cli = new Cli("chat_server.ts", ["0", "--host", "127.0.0.1", "--rate", "0"]);
  const port = await cli.started();
  // Keeps the log flowing, however long the test takes: a quiet log is no failure of the server's.
  const logRead = (async () => {
    while (await cli.readLine(3_600_000) !== null);
  })();
  let stopped: ReturnType<Cli["finish"]> | null = null;
  // Idempotent, and called in a finally too: a test that fails must not leave its server running
  // into the next test (or its log reader, which would throw from no test at all).
  const stop = () =>
    stopped ??= (async () => {
      cli.kill();
      await logRead.catch(() => {});
      return await cli.finish();
    })();
  return { port, cli, stop };
}

Deno.test("chat_server.ts paces a fast sender for a slow but live reader, which loses nothing", async () => {
  const { port, stop } = await startFloodableServer();
  await using _stopping = { [Symbol.asyncDispose]: async () => void await stop() };
  using reader = await joinChat(port);
  using sleeper = await TestClient.connect(port); // never reads a byte: it must still be cut off
  using other = await joinChat(port);
  using sender = await joinChat(port);
  assert.equal(await reader.readLine(), `Client joined ${sleeper.name}\r\n`);
  assert.equal(await reader.readLine(), `Client joined ${other.name}\r\n`);
  assert.equal(await reader.readLine(), `Client joined ${sender.name}\r\n`);
  const count = 20_000;
  const sending = sendNumberedLines(sender, count, 1000);
  const [slow, fast] = await Promise.all([
    readSlowly(reader, sender.name, count), // about 8 MB/s
    readSlowly(other, sender.name, count, 64 * 1024, 0),
  ]);
  await sending;
  assert.equal(slow, count, `the slow reader got ${slow} of ${count} lines`);
  assert.equal(fast, count, `the fast reader got ${fast} of ${count} lines`);
  assert.match(await sleeper.readToEnd(), /^You're connected/); // and then the server hung up
  const { code, stderr } = await stop();
  assert.equal(code, 0);
  assert.match(stderr, new RegExp(`Dropped ${sleeper.name.replaceAll(".", "\\.")}: send queue over`));
  assert.doesNotMatch(stderr, new RegExp(`Dropped ${reader.name.replaceAll(".", "\\.")}`));
});

Deno.test("startChatServer(): a client that stops reading in one room holds back nobody in another", async () => {
  // A send queue of 8 MiB: the sleeper is behind from 2 MiB queued, and cut off only 6 MiB later.
  const server = await startChatServer({ port: 0, host: "127.0.0.1", log: null, rate: 0, sendq: 8 << 20 });
  const port = server.addr.port;
  try {
    using sender = await joinChat(port);
    using sleeper = await TestClient.connect(port); // never reads a byte
    using a = await joinChat(port);
    using b = await joinChat(port);
    for (const c of [sender, sleeper]) await c.write("/join busy\r\n");
    for (const c of [a, b]) await c.write("/join quiet\r\n");
    await readUntil(b, (l) => l.startsWith("You are now in quiet"));
    await readUntil(a, (l) => l.startsWith("You are now in quiet"));
    const line = `${"x".repeat(1000)}\n`.repeat(64);
    for (let sent = 0; server.flusher.congested.size === 0; sent += line.length) { // until the sleeper is behind
      assert.ok(sent < 256 << 20, "the sleeper never fell behind");
      await sender.write(line);
    }
    // The gate is asked before each read: the second line is the one a held reader would wait for.
    for (const word of ["one", "two"]) {
      const start = performance.now();
      await a.write(`${word}\r\n`);
      assert.equal(await b.readLine(), `[${a.name}] ${word}\r\n`);
      const ms = performance.now() - start;
      assert.ok(ms < 400, `a line in the quiet room took ${ms.toFixed(0)} ms while the busy room was held`);
    }
  } finally {
    await server.close();
  }
});

Deno.test("chat_server.ts cuts off a client that never reads, and no one else misses a line", async () => {
  const { port, cli, stop } = await startFloodableServer();
  await using _stopping = { [Symbol.asyncDispose]: async () => void await stop() };
  using reader = await joinChat(port);
  using sleeper = await TestClient.connect(port); // never reads a byte
  using sender = await joinChat(port);
  assert.equal(await reader.readLine(), `Client joined ${sleeper.name}\r\n`);
  assert.equal(await reader.readLine(), `Client joined ${sender.name}\r\n`);
  const rssBefore = rssKiB(cli.child.pid);

  const count = 160_000, width = 1000; // 160 MB of chat: the sleeper goes early on
  const sending = sendNumberedLines(sender, count, width).catch((e) => e);
  let sawLeave = false, rssPeak = 0;
  for (let i = 0; i < count; i++) {
    let line = await reader.readLine();
    if (line === `Client left ${sleeper.name}\r\n`) {
      sawLeave = true;
      line = await reader.readLine();
    }
    assert.equal(line?.slice(0, sender.name.length + 10), `[${sender.name}] ${String(i).padStart(7, "0")}`);
    if (i % 5000 === 0) rssPeak = Math.max(rssPeak, rssKiB(cli.child.pid));
  }
  assert.equal(await sending, undefined);
  assert.ok(sawLeave, "the sleeper was never cut off");
  const growthMiB = (rssPeak - rssBefore) / 1024;
  // Garbage is collected lazily (V8 lets ~64 MiB of buffers pile up), so the bound is loose, but
  // a server that kept what it could not deliver would grow by all 160 MB.
  const stopped = await stop(); // first: a server left running would fail the next test too
  assert.ok(growthMiB < 100, `server RSS grew by ${growthMiB.toFixed(1)} MiB while 160 MB went by`);
  assert.equal(stopped.code, 0);
});

Deno.test("chat_server.ts keeps its memory when a client streams megabytes with no newline", async () => {
  const cli = new Cli("chat_server.ts", ["0", "--host", "127.0.0.1"]);
  const port = await cli.started();
  using a = await joinChat(port);
  using b = await joinChat(port);
  await a.readLine();
  await cli.readLine();
  await cli.readLine();
  const rssBefore = rssKiB(cli.child.pid);
  const chunk = encoder.encode("y".repeat(1 << 20));
  for (let i = 0; i < 16; i++) await b.write(chunk); // one endless line: 16 MiB to warm up V8...
  const rssWarm = rssKiB(cli.child.pid);
  for (let i = 0; i < 64; i++) await b.write(chunk); // ...and 64 MiB more, which must cost nothing
  await b.write("\r\nafter\r\n");
  assert.equal(await a.readLine(), `[${b.name}] ${"y".repeat(4096)}\r\n`);
  assert.equal(await a.readLine(), `[${b.name}] after\r\n`);
  assert.match((await b.readLine())!, /^Your line was over 4096 bytes/);
  const rssEnd = rssKiB(cli.child.pid);
  const mib = (kib: number) => (kib / 1024).toFixed(1);
  assert.ok(rssEnd - rssWarm < 4 * 1024, `RSS grew by ${mib(rssEnd - rssWarm)} MiB over the last 64 MiB`);
  assert.ok(rssEnd - rssBefore < 16 * 1024, `RSS grew by ${mib(rssEnd - rssBefore)} MiB in all`);
  cli.kill();
  assert.equal((await cli.finish()).code, 0);
});

Deno.test("startChatServer() refuses a client over --max-clients with one line", async () => {
  await withServer({ maxClients: 2 }, async (port) => {
    using a = await joinChat(port);
    using b = await joinChat(port);
    await a.readLine();
    using c = await TestClient.connect(port);
    assert.equal(await c.readToEnd(), "Sorry, the server is full (2 clients); try again later\r\n");
    b.close();
    assert.equal(await a.readLine(), `Client left ${b.name}\r\n`);
    using d = await joinChat(port); // room again once someone leaves
    assert.equal(await a.readLine(), `Client joined ${d.name}\r\n`);
  });
});

// --- Containment ---------------------------------------------------------------------------------

Deno.test("startChatServer() survives resets and half-closes, and the others carry on", async () => {
  await withServer({}, async (port) => {
    using a = await joinChat(port);
    using o = await joinChat(port); // gets each line in the same round as r
    assert.equal(await a.readLine(), `Client joined ${o.name}\r\n`);
    // a reset: closing with unread bytes in the receive buffer makes the kernel send RST
    const r = await joinChat(port);
    assert.equal(await a.readLine(), `Client joined ${r.name}\r\n`);
    assert.equal(await o.readLine(), `Client joined ${r.name}\r\n`);
    await a.write("unread by r\r\n");
    assert.equal(await o.readLine(), `[${a.name}] unread by r\r\n`); // so r has it unread too
    const rName = r.name;
    r.close();
    assert.equal(await a.readLine(), `Client left ${rName}\r\n`);
    // a half-close: the line before it still goes out
    using h = await joinChat(port);
    assert.equal(await a.readLine(), `Client joined ${h.name}\r\n`);
    await h.write("last words\r\n");
    await h.conn.closeWrite();
    assert.equal(await a.readLine(), `[${h.name}] last words\r\n`);
    assert.equal(await a.readLine(), `Client left ${h.name}\r\n`);
    using b = await joinChat(port);
    assert.equal(await a.readLine(), `Client joined ${b.name}\r\n`);
    await b.write("still here?\r\n");
    assert.equal(await a.readLine(), `[${b.name}] still here?\r\n`);
  });
});

Deno.test({
  ...needs("startChatServer() takes the next client at once after 50 resets before accept", ["python3"]),
  async fn() {
    await withServer({ host: "127.0.0.1" }, async (port, log) => {
      await resetConnections(port, 50);
      const started = Date.now();
      using c = await joinChat(port);
      const waited = Date.now() - started;
      assert.ok(waited < 1000, `the next client waited ${waited} ms for its greeting`); // 5 s before
      await c.write("/who\r\n");
      assert.equal(await c.readLine(), "In lobby (1):\r\n");
      assert.doesNotMatch(log.text, /Client joined .*\n.*Client joined/); // the resets never joined
    });
  },
});

Deno.test("startChatServer() relays a last line that has no newline before the sender half-closes", async () => {
  await withServer({}, async (port) => {
    using a = await joinChat(port);
    using b = await joinChat(port);
    await a.readLine();
    await b.write("bye"); // as printf 'bye' | nc -N host 2626 sends it
    await b.conn.closeWrite();
    assert.equal(await a.readLine(), `[${b.name}] bye\r\n`);
    assert.equal(await a.readLine(), `Client left ${b.name}\r\n`);
  });
});

Deno.test("startChatServer() names IPv6 peers as [addr]:port", async () => {
  await withServer({}, async (port) => {
    using a = await joinChat(port);
    using b = await joinChat(port, "::1");
    assert.equal(await a.readLine(), `Client joined [::1]:${b.conn.localAddr.port}\r\n`);
    await b.write("from v6\r\n");
    assert.equal(await a.readLine(), `[[::1]:${b.conn.localAddr.port}] from v6\r\n`);
  });
});

Deno.test("startChatServer() listens again at once on the port it just left", async () => {
  const first = await startChatServer({ port: 0, log: null });
  const port = first.addr.port;
  const a = await joinChat(port);
  const closing = first.close(); // the server closes first, so its side holds TIME_WAIT
  assert.equal(await a.readToEnd(), "Server shutting down, goodbye\r\n");
  a.close();
  await closing;
  const second = await startChatServer({ port, log: null });
  using b = await joinChat(port);
  b.close();
  await second.close();
});

// --- The command line ---------------------------------------------------------------------------

Deno.test("chat_server.ts says goodbye to every client on SIGTERM and exits 0", async () => {
  const cli = new Cli("chat_server.ts", ["--port", "0"]);
  const port = await cli.started();
  using a = await joinChat(port);
  using b = await joinChat(port);
  await a.readLine();
  const started = Date.now();
  cli.kill("SIGTERM");
  assert.equal(await a.readToEnd(), "Server shutting down, goodbye\r\n");
  assert.equal(await b.readToEnd(), "Server shutting down, goodbye\r\n");
  const { code, stdout } = await cli.finish();
  assert.equal(code, 0);
  assert.equal(stdout.at(-1), "ChatServer shutdown complete");
  assert.ok(Date.now() - started < 2000, "shutdown took over two seconds");
});

Deno.test("chat_server.ts shuts down on SIGINT even when a client never reads", async () => {
  const cli = new Cli("chat_server.ts", ["0", "--rate", "0"]);
  const port = await cli.started();
  using sleeper = await TestClient.connect(port);
  using sender = await joinChat(port);
  await sendNumberedLines(sender, 5000, 1000); // fills the sleeper's socket buffers
  cli.kill("SIGINT");
  const { code, stdout } = await cli.finish();
  assert.equal(code, 0);
  assert.equal(stdout.at(-1), "ChatServer shutdown complete");
  sleeper.close();
});

Deno.test("chat_server.ts names the port in one line when it is taken", async () => {
  using taken = Deno.listen({ hostname: "0.0.0.0", port: 0 });
  const cli = new Cli("chat_server.ts", [String(taken.addr.port)]);
  const { code, stdout, stderr } = await cli.finish();
  assert.equal(code, 1);
  assert.deepEqual(stdout, []);
  assert.equal(stderr, `chat_server: port ${taken.addr.port} is already in use\n`);
});

Deno.test("chat_server.ts rejects bad arguments with a usage line and exit code 2", async () => {
  for (
    const [args, problem] of [
      [["--port", "http"], 'port wants a whole number, not "http"'],
      [["70000"], "port must be from 0 to 65535"],
      [["--bogus"], "unknown option --bogus; try --help"],
      [["--max-line", "0"], "--max-line must be from 1 to 1048576"],
      [["2626", "2627"], 'unexpected argument "2627"'],
    ] as const
  ) {
    const { code, stdout, stderr } = await new Cli("chat_server.ts", [...args]).finish();
    assert.equal(code, 2, args.join(" "));
    assert.deepEqual(stdout, []);
    const [first, usage, ...rest] = stderr.split("\n");
    assert.match(first, new RegExp(`^chat_server: .*${problem.replace(/[.*+?^${}()|[\]\\]/g, "\\$&")}`));
    assert.match(usage, /^usage: chat_server\.ts \[PORT \| --port PORT\]/);
    assert.deepEqual(rest, [""]);
  }
});

Deno.test("parseChatArgs() takes --flag VALUE, --flag=VALUE, repeated flags, -h and --, and names a bad flag", () => {
  const parsed = (args: string[]) => {
    const result = parseChatArgs(args);
    if (result === "help") throw new Error("help");
    return result.options;
  };
  assert.equal(parsed(["--port=2700"]).port, 2700);
  assert.equal(parsed(["--", "2701"]).port, 2701);
  assert.equal(parsed(["--host=-odd-", "0"]).host, "-odd-"); // a value that starts with "-" takes "="
  assert.deepEqual(
    parsed(["--http", "0", "--http-origin", "https://a.example", "--http-origin=https://b.example"]).http
      ?.origins,
    ["https://a.example", "https://b.example"],
  );
  assert.equal(parseChatArgs(["-h"]), "help");
  assert.equal(parseChatArgs(["2626", "--help"]), "help");
  for (
    const [args, problem] of [
      [["--help=yes"], "--help takes no value"],
      [["--max-line"], "--max-line wants a value"],
      [
        ["--max-line", "-5"],
        '--max-line wants a value; for one that starts with "-", write --max-line=VALUE',
      ],
      [["-x"], "unknown option -x; try --help"],
      [["--toString"], "unknown option --toString; try --help"],
      [["--constructor=1"], "unknown option --constructor; try --help"],
    ] as const
  ) assert.throws(() => parseChatArgs([...args]), { message: problem }, args.join(" "));
});

Deno.test("chat_server.ts --help prints the usage and exits 0", async () => {
  const { code, stdout } = await new Cli("chat_server.ts", ["--help"]).finish();
  assert.equal(code, 0);
  assert.match(stdout[0], /^usage: chat_server\.ts \[PORT \| --port PORT\]/);
  assert.ok(stdout.some((l) => l.includes("--sendq")));
});

// --- Real clients ------------------------------------------------------------------------------

/** Runs a program on a pseudo-terminal through util-linux `script`, as a person would. */
function onPty(command: string): Deno.ChildProcess {
  return new Deno.Command("script", {
    args: ["-qfec", command, "/dev/null"],
    stdin: "piped",
    stdout: "piped",
    stderr: "null",
    env: { TERM: "dumb" },
  }).spawn();
}

/** Reads a child's stdout until `pattern` has been seen; returns all of it. */
async function readOutputUntil(
  reader: ReadableStreamDefaultReader<Uint8Array>,
  seen: { text: string },
  pattern: RegExp,
) {
  while (!pattern.test(seen.text)) {
    const { value, done } = await within(WAIT_MS, reader.read(), `output matching ${pattern}`);
    if (done) throw new Error(`EOF before ${pattern}; got ${JSON.stringify(seen.text)}`);
    seen.text += decoder.decode(value);
  }
  return seen.text;
}

Deno.test({
  ...needs("chat_server.ts talks to a real telnet on a terminal, as in the tutorial", ["telnet", "script"]),
  async fn() {
    await withServer({}, async (port) => {
      using peer = await joinChat(port);
      const telnet = onPty(`telnet localhost ${port}`);
      const stdin = telnet.stdin.getWriter();
      const out = telnet.stdout.getReader();
      const seen = { text: "" };
      await readOutputUntil(
        out,
        seen,
        /Escape character is '\^]'\.\r\nYou're connected to the Deno chatserver\r\n/,
      );
      const joined = (await peer.readLine())!;
      const name = /^Client joined (127\.0\.0\.1:\d+)\r\n$/.exec(joined)![1];
      await stdin.write(encoder.encode("Hello, is anyone there?\r"));
      assert.equal(await peer.readLine(), `[${name}] Hello, is anyone there?\r\n`);
      await peer.write("Yes, I'm here.\r\n");
      await readOutputUntil(out, seen, new RegExp(`\\[${peer.name}\\] Yes, I'm here\\.\r\n`));
      await stdin.write(encoder.encode("\x1d")); // ^] then close, as in Listing 23
      await readOutputUntil(out, seen, /telnet> $/);
      await stdin.write(encoder.encode("close\r"));
      await readOutputUntil(out, seen, /Connection closed\./);
      assert.equal(await peer.readLine(), `Client left ${name}\r\n`);
      await stdin.close();
      await out.cancel();
      await within(WAIT_MS, telnet.status, "telnet to exit");
    });
  },
});

Deno.test({
  ...needs("chat_server.ts relays between ncat and socat clients", ["ncat", "socat"]),
  async fn() {
    await withServer({}, async (port) => {
      using watcher = await joinChat(port);
      const ncat = new Deno.Command("ncat", {
        args: ["127.0.0.1", String(port)],
        stdin: "piped",
        stdout: "piped",
        stderr: "null",
      }).spawn();
      const ncatName = /Client joined (\S+)\r\n/.exec((await watcher.readLine())!)![1];
      const socat = new Deno.Command("socat", {
        args: ["-", `TCP:127.0.0.1:${port}`],
        stdin: "piped",
        stdout: "piped",
        stderr: "null",
      }).spawn();
      const socatName = /Client joined (\S+)\r\n/.exec((await watcher.readLine())!)![1];
      const ncatIn = ncat.stdin.getWriter();
      await ncatIn.write(encoder.encode("from ncat\n"));
      assert.equal(await watcher.readLine(), `[${ncatName}] from ncat\r\n`);
      const socatIn = socat.stdin.getWriter();
      await socatIn.write(encoder.encode("from socat\n"));
      assert.equal(await watcher.readLine(), `[${socatName}] from socat\r\n`);
      await ncatIn.close();
      await socatIn.close();
      const [ncatOut, socatOut] = await within(WAIT_MS, Promise.all([ncat.output(), socat.output()]), "exit");
      assert.ok(decoder.decode(ncatOut.stdout).includes(`[${socatName}] from socat\r\n`));
      assert.ok(decoder.decode(socatOut.stdout).includes(`[${ncatName}] from ncat\r\n`));
    });
  },
});

Deno.test({
  name: Deno.env.get("DENORT_BIN")
    ? "chat_server.ts compiles to a standalone binary that serves"
    : "chat_server.ts compiles to a standalone binary (ignored: set DENORT_BIN to a denort binary)",
  ignore: !Deno.env.get("DENORT_BIN"),
  async fn() {
    const dir = await Deno.makeTempDir();
    try {
      const out = `${dir}/chat_server`;
      const compile = await new Deno.Command(Deno.execPath(), {
        args: ["compile", "--allow-net", "-o", out, "chat_server.ts"],
        cwd: new URL("..", import.meta.url).pathname,
        stdout: "null",
        stderr: "piped",
      }).output();
      assert.equal(compile.code, 0, decoder.decode(compile.stderr));
      const bin = new Deno.Command(out, { args: ["0"], stdout: "piped", stderr: "piped" }).spawn();
      const reader = bin.stdout.getReader();
      const seen = { text: "" };
      await readOutputUntil(reader, seen, /ChatServer started on port \d+\n/);
      const port = Number(/port (\d+)/.exec(seen.text)![1]);
      using c = await TestClient.connect(port);
      assert.equal(await c.readLine(), GREETING);
      bin.kill("SIGTERM");
      await readOutputUntil(reader, seen, /shutdown complete/);
      reader.releaseLock();
      await bin.stdout.cancel();
      await bin.stderr.cancel();
      assert.equal((await bin.status).code, 0);
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  },
});

// --- The parts that need no socket ------------------------------------------------------------

Deno.test("TokenBucket.take() refills at its rate on a fake clock, up to the burst", () => {
  const bucket = new TokenBucket(1 / 1000, 3, 0); // a token a second, bursts of three
  assert.deepEqual([bucket.take(0), bucket.take(0), bucket.take(0), bucket.take(0)], [
    true,
    true,
    true,
    false,
  ]);
  assert.equal(bucket.take(999), false);
  assert.equal(bucket.take(1000), true); // one token back after a second
  assert.equal(bucket.take(1000), false);
  assert.deepEqual([bucket.take(60_000), bucket.take(60_000), bucket.take(60_000)], [true, true, true]);
  assert.equal(bucket.take(60_000), false, "a long rest refills no more than the burst");
});

Deno.test("TokenBucket.strike() numbers each flood once, and forgets floods after a minute", () => {
  const bucket = new TokenBucket(1 / 1000, 1, 0);
  bucket.take(0);
  assert.deepEqual([bucket.strike(0), bucket.strike(10)], [1, 0]); // one flood, however many lines
  bucket.take(5000); // a line gets through: the flood is over
  assert.equal(bucket.strike(5000), 2);
  bucket.take(10_000);
  assert.equal(bucket.strike(200_000), 1, "a flood long after the last starts the count again");
});

Deno.test("Directory folds case in one place: rooms and nicks are found whatever the case", () => {
  const directory = new Directory();
  const link = { write: (p: Uint8Array) => Promise.resolve(p.length), close() {} };
  const client = (port: number) =>
    new Client(link, `127.0.0.1:${port}`, "127.0.0.1", directory.lobby, new Flusher(1024));
  const ann = client(1), bob = client(2);
  assert.equal(directory.openRoom("Dev"), directory.openRoom("dEV"));
  assert.equal(directory.openRoom("dev").name, "Dev", "a room keeps the case it was first written in");
  directory.addMember(ann, directory.openRoom("DEV"));
  assert.equal(directory.room("dev")?.members.has(ann), true);
  directory.removeMember(ann);
  assert.equal(directory.room("dev"), undefined, "an empty room is forgotten");
  assert.equal(directory.room("LOBBY"), directory.lobby);
  directory.rename(ann, "Ann");
  assert.equal(directory.holder("aNN"), ann);
  assert.equal(ann.label, "Ann");
  directory.rename(ann, "ANN"); // the same nick in another case
  assert.equal(directory.holder("ann"), ann);
  assert.equal(directory.holder("Ann")?.nick, "ANN");
  directory.rename(bob, "bob");
  directory.forget(ann);
  assert.equal(directory.holder("ann"), undefined);
  assert.equal(ann.label, "ANN", "a leaving client keeps its name for the goodbye");
  assert.ok(Directory.same("Lobby", "lobby") && !Directory.same("lobby", "lobby2"));
});

Deno.test("Flusher.sendNow() writes a greeting at once, but queues behind a write and under a tiny sendq", async () => {
  const wrote = new Map<string, string[]>();
  const client = (address: string, flusher: Flusher) => {
    const writes: string[] = [];
    wrote.set(address, writes);
    const link = {
      write: (p: Uint8Array) => (writes.push(decoder.decode(p)), Promise.resolve(p.length)),
      close() {},
    };
    return new Client(link, address, "127.0.0.1", new Directory().lobby, flusher);
  };
  const roomy = new Flusher(1024), tiny = new Flusher(8); // a client 2 bytes behind holds back tiny's senders
  const ann = client("ann", roomy), bob = client("bob", tiny);
  roomy.sendNow(ann, encoder.encode("hi\r\n"));
  roomy.sendNow(ann, encoder.encode("again\r\n")); // the first write is under way: this one waits its turn
  assert.deepEqual(wrote.get("ann"), ["hi\r\n"]);
  tiny.sendNow(bob, encoder.encode("hello\r\n"));
  assert.ok(tiny.congested.has(bob), "over the pace: counted behind, as a queued line is");
  assert.deepEqual(wrote.get("bob"), [], "and written with the round, not at once");
  await new Promise((r) => setTimeout(r, 10));
  assert.deepEqual(wrote.get("ann"), ["hi\r\n", "again\r\n"]);
  assert.deepEqual(wrote.get("bob"), ["hello\r\n"]);
  assert.equal(ann.queued + bob.queued, 0);
});

Deno.test("Flusher.holding(): a client behind holds its room only while it drains, and only for its bank", async () => {
  const directory = new Directory(), room = directory.openRoom("busy"), other = directory.openRoom("quiet");
  const flusher = new Flusher(4096); // behind past 1,024 bytes
  const completions: (() => void)[] = [];
  const link = {
    write: (p: Uint8Array) => new Promise<number>((resolve) => completions.push(() => resolve(p.length))),
    close() {},
  };
  const client = new Client(link, "127.0.0.1:1", "127.0.0.1", directory.lobby, flusher);
  directory.addMember(client, room);
  client.send(new Uint8Array(2000)); // written, and never read: no write has completed
  await new Promise((r) => setTimeout(r, 0));
  assert.ok(flusher.congested.has(client));
  const now = Date.now();
  assert.equal(flusher.holding(room, now), 0, "a client that has never drained holds no one");

  client.lastWrite = now; // a write completed just now: it drains
  assert.equal(flusher.holding(room, now), 500);
  assert.equal(flusher.holding(other, now), 0, "another room never waits for it");
  assert.equal(flusher.holding(room, now + 400), 100);
  assert.equal(flusher.holding(room, now + 600), 0, "no write for 0.6 s: it no longer drains");
  // Its last write took 3 s to complete: the wait after it is the same 0.5 s, no rhythm is learned.
  client.lastWrite = now + 3000;
  assert.equal(flusher.holding(room, now + 3000), 500);

  // Behind without a break, it spends its bank: 8 s at most at a stretch.
  const since = client.hold!.since;
  client.lastWrite = since + HOLD_BANK_MS - 200;
  assert.equal(flusher.holding(room, since + HOLD_BANK_MS - 200), 200);
  client.lastWrite = since + HOLD_BANK_MS;
  assert.equal(flusher.holding(room, since + HOLD_BANK_MS), 0, "its bank is spent");
  completions.shift()!(); // it catches up, having been behind for as long as it took
  await new Promise((r) => setTimeout(r, 0));
  assert.ok(!flusher.congested.has(client));
  assert.ok(client.hold!.bank <= HOLD_BANK_MS - (client.hold!.at - since));
});

Deno.test("Flusher: a batch that fits one write gets a buffer of its size; only a bigger one a pooled 64 KiB", async () => {
  const writes: { bytes: number; buffer: number }[] = [];
  const link = {
    write: (
      p: Uint8Array,
    ) => (writes.push({ bytes: p.length, buffer: p.buffer.byteLength }), Promise.resolve(p.length)),
    close() {},
  };
  const flusher = new Flusher(1 << 20);
  const client = new Client(link, "127.0.0.1:1", "127.0.0.1", new Directory().lobby, flusher);
  const flush = async (parts: number, size: number) => {
    for (let i = 0; i < parts; i++) client.send(new Uint8Array(size).fill(65));
    await flusher.drained(client);
    return writes.splice(0);
  };
  // A join storm's batch of notices, a few KiB: it holds no 64 KiB buffer afterwards.
  assert.deepEqual(await flush(200, 40), [{ bytes: 8000, buffer: 8000 }]);
  // A slow reader's 100 KiB catching up: 64 KiB at a time, through the pool.
  assert.deepEqual(await flush(100, 1024), [{ bytes: 65536, buffer: 65536 }, {
    bytes: 36864,
    buffer: 65536,
  }]);
});

Deno.test("SharedJoin.join() gives clients with the same lines queued one buffer", () => {
  const join = new SharedJoin();
  const a = encoder.encode("[x] one\r\n"), b = encoder.encode("[x] two\r\n");
  const first = join.join([a, b], a.length + b.length);
  assert.equal(decoder.decode(first), "[x] one\r\n[x] two\r\n");
  assert.equal(join.join([a, b], a.length + b.length), first, "the same parts share the buffer");
  const queue = [a, b];
  assert.equal(join.join(queue, a.length + b.length), first);
  queue.length = 0; // a client's queue is emptied after its join...
  assert.equal(join.join([a, b], a.length + b.length), first, "...and the kept parts are a copy");
  const other = join.join([b, a], a.length + b.length);
  assert.notEqual(other, first);
  assert.equal(decoder.decode(other), "[x] two\r\n[x] one\r\n");
  assert.equal(decoder.decode(first), "[x] one\r\n[x] two\r\n", "a shared buffer is never written again");
});

// V8 keeps a module's source (and the page, a string) as one byte per character only while every
// character is Latin-1; one character above U+00FF doubles what the running script's text takes.
Deno.test("chat_server.ts and chat/ have no character above U+00FF, so their text costs one byte a character", () => {
  const files = [
    "chat_server.ts",
    ...[...Deno.readDirSync(new URL("../chat", import.meta.url))].map((f) => `chat/${f.name}`),
  ];
  const wide = files.flatMap((file) =>
    Deno.readTextFileSync(new URL(`../${file}`, import.meta.url)).split("\n").flatMap((line, i) =>
      [...line].some((c) => c.codePointAt(0)! > 0xff) ? [`${file}:${i + 1}: ${line.trim()}`] : []
    )
  );
  assert.deepEqual(wide, [], "write such characters as \\u escapes, HTML entities or their code points");
});

Deno.test("chat_server.ts logs every line of a 30,000-line burst to a file that keeps up", async () => {
  const file = await Deno.makeTempFile();
  try {
    const script = `exec "${Deno.execPath()}" run -A chat_server.ts 0 --host 127.0.0.1 --rate 0 > "${file}"`;
    const child = new Deno.Command("sh", {
      args: ["-c", script],
      cwd: new URL("..", import.meta.url).pathname,
      stderr: "piped",
      env: { NO_COLOR: "1" },
    }).spawn();
    let port = 0;
    for (let i = 0; i < 200 && !port; i++) { // until it says where it listens: its stdout is the file
      port = Number(/^ChatServer started on port (\d+)/.exec(Deno.readTextFileSync(file))?.[1] ?? 0);
      if (!port) await new Promise((r) => setTimeout(r, 50));
    }
    assert.ok(port, "the server never listened");
    const sender = await joinChat(port);
    try {
      await sendNumberedLines(sender, 30_000, 1000);
      await sender.write("/who\r\n"); // answered once every line before it has been handled (and logged)
      assert.equal(await sender.readLine(), "In lobby (1):\r\n");
    } finally {
      sender.close();
    }
    child.kill("SIGTERM");
    assert.equal((await child.status).code, 0);
    await child.stderr.cancel();
    const log = Deno.readTextFileSync(file);
    assert.doesNotMatch(log, /log lines dropped/);
    assert.equal(log.split("\n").filter((l) => l.startsWith(`[${sender.name}] `)).length, 30_000);
  } finally {
    await Deno.remove(file);
  }
});
