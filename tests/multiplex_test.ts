import assert from "node:assert/strict";
import { parseEndpoint, runChatLoad, runMultiplex, showText } from "../multiplex.ts";
import { startChatServer } from "../chat_server.ts";
import { startEchoServer } from "../echo_tcp.ts";
import { startUdpEchoServer } from "../echo_udp.ts";
import { Capture, encoder, freePort, runScript, TestClient, WAIT_MS, within } from "./_helpers.ts";

/** A stdin the test types into. */
function typedInput(): {
  stream: ReadableStream<Uint8Array>;
  type(s: string): Promise<void>;
  end(): Promise<void>;
} {
  const pipe = new TransformStream<Uint8Array, Uint8Array>();
  const writer = pipe.writable.getWriter();
  return {
    stream: pipe.readable,
    type: (s) => writer.write(encoder.encode(s)),
    end: () => writer.close(),
  };
}

/** A TCP server the test drives by hand: it hands over each accepted connection. */
async function acceptOne(listener: Deno.TcpListener): Promise<TestClient> {
  return new TestClient(await within(WAIT_MS, listener.accept(), "a connection"));
}

Deno.test("parseEndpoint() reads host:port and [v6]:port, and rejects the rest", () => {
  assert.deepEqual(parseEndpoint("localhost:2626"), { host: "localhost", port: 2626 });
  assert.deepEqual(parseEndpoint("[::1]:80"), { host: "::1", port: 80 });
  for (const bad of ["localhost", "::1:80", "host:0", "host:99999", ":80"]) {
    assert.throws(() => parseEndpoint(bad), /is not HOST:PORT/, bad);
  }
});

Deno.test("showText() drops the CR of CRLF and shows control characters as ^X", () => {
  assert.equal(showText(encoder.encode("plain\r")), "plain");
  assert.equal(showText(encoder.encode("a\x1b[31mb\x07\tc\x7f")), "a^[[31mb^G\tc^?");
  // C1 controls (CSI, NEL) as cat -v shows them; a byte that is not UTF-8 as U+FFFD
  assert.equal(
    showText(new Uint8Array([0x61, 0xc2, 0x9b, 0x32, 0x4a, 0xc2, 0x85, 0x9b, 0x62])),
    "aM-^[2JM-^E\uFFFDb",
  );
});

Deno.test("runMultiplex() prefixes lines by source, fans stdin out, and exits when all peers close", async () => {
  using l1 = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  using l2 = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const out = new Capture(), err = new Capture(), input = typedInput();
  const running = runMultiplex({
    endpoints: [{ host: "127.0.0.1", port: l1.addr.port }, { host: "127.0.0.1", port: l2.addr.port }],
    input: input.stream,
    output: out,
    errors: err,
    timeout: 60,
  });
  const [s1, s2] = [await acceptOne(l1), await acceptOne(l2)];
  const [n1, n2] = [`127.0.0.1:${l1.addr.port}`, `127.0.0.1:${l2.addr.port}`];
  await s1.write("hello from one\r\n");
  await s2.write("hello ");
  await s2.write("from two\n");
  await out.waitFor(`[${n1}] hello from one\n`);
  await out.waitFor(`[${n2}] hello from two\n`);
  await input.type("to everyone\n");
  assert.equal(await s1.readLine(), "to everyone\n");
  assert.equal(await s2.readLine(), "to everyone\n");
  s1.close();
  await out.waitFor(`[${n1}] closed\n`);
  s2.close();
  assert.equal(await within(WAIT_MS, running, "runMultiplex to return"), 0);
  assert.ok(out.text.endsWith(`[${n2}] closed\n`), out.text);
  assert.equal(err.text, "");
});

Deno.test("runMultiplex() says the tutorial's idle notice, showing a partial line first", async () => {
  using l = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const out = new Capture(), input = typedInput();
  const running = runMultiplex({
    endpoints: [{ host: "127.0.0.1", port: l.addr.port }],
    input: input.stream,
    output: out,
    errors: new Capture(),
    timeout: 0.2,
  });
  using s = await acceptOne(l);
  await out.waitFor("0.2 seconds elapsed.\n");
  await s.write("no newline yet");
  await out.waitFor(`[127.0.0.1:${l.addr.port}] no newline yet\n0.2 seconds elapsed.\n`);
  await input.end(); // half-closes; the server then closes and multiplex is done
  assert.equal(await s.readToEnd(), "");
  s.close();
  assert.equal(await within(WAIT_MS, running, "runMultiplex to return"), 0);
});

Deno.test("runMultiplex() sends stdin to endpoint N only with --to N", async () => {
  using l1 = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  using l2 = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const input = typedInput();
  const running = runMultiplex({
    endpoints: [{ host: "127.0.0.1", port: l1.addr.port }, { host: "127.0.0.1", port: l2.addr.port }],
    input: input.stream,
    output: new Capture(),
    errors: new Capture(),
    to: 2,
  });
  using s1 = await acceptOne(l1);
  using s2 = await acceptOne(l2);
  await input.type("only two\n");
  await input.end();
  assert.equal(await s2.readToEnd(), "only two\n");
  assert.equal(await s1.readToEnd(), ""); // half-closed with nothing sent
  s1.close();
  s2.close();
  assert.equal(await within(WAIT_MS, running, "runMultiplex to return"), 0);
});

Deno.test("runMultiplex() reports an unreachable endpoint in one line and goes on with the rest", async () => {
  const echo = startEchoServer({ port: 0, host: "127.0.0.1", log: null });
  const dead = freePort();
  const out = new Capture(), err = new Capture(), input = typedInput();
  const running = runMultiplex({
    endpoints: [{ host: "127.0.0.1", port: dead }, { host: "127.0.0.1", port: echo.addr.port }],
    input: input.stream,
    output: out,
    errors: err,
  });
  await input.type("still works\n");
  await input.end();
  assert.equal(await within(WAIT_MS, running, "runMultiplex to return"), 0);
  await echo.close();
  assert.equal(err.text, `multiplex: cannot reach 127.0.0.1:${dead}: connection refused\n`);
  assert.equal(out.text, `[127.0.0.1:${echo.addr.port}] still works\n[127.0.0.1:${echo.addr.port}] closed\n`);
});

Deno.test("runMultiplex() is a chat client for chat_server.ts", async () => {
  const chat = await startChatServer({ port: 0, host: "127.0.0.1", log: null });
  const server = `127.0.0.1:${chat.addr.port}`;
  const out = new Capture(), input = typedInput();
  using other = await TestClient.connect(chat.addr.port);
  await other.readLine();
  const running = runMultiplex({
    endpoints: [{ host: "127.0.0.1", port: chat.addr.port }],
    input: input.stream,
    output: out,
    errors: new Capture(),
  });
  await out.waitFor(`[${server}] You're connected to the Deno chatserver\n`);
  const me = /^Client joined (\S+)\r\n$/.exec((await other.readLine())!)![1];
  await other.write("Hello, is anyone there?\r\n");
  await out.waitFor(`[${server}] [${other.name}] Hello, is anyone there?\n`);
  await input.type("Yes, I'm here.\n");
  assert.equal(await other.readLine(), `[${me}] Yes, I'm here.\r\n`);
  await input.end();
  assert.equal(await other.readLine(), `Client left ${me}\r\n`);
  assert.equal(await within(WAIT_MS, running, "runMultiplex to return"), 0);
  assert.ok(out.text.endsWith(`[${server}] closed\n`));
  other.close();
  await chat.close();
});

Deno.test("runMultiplex() talks UDP with --udp and ends after stdin and a quiet spell", async () => {
  const echo = startUdpEchoServer({ port: 0, host: "127.0.0.1" });
  const out = new Capture(), input = typedInput();
  const running = runMultiplex({
    endpoints: [{ host: "127.0.0.1", port: echo.addr.port }],
    input: input.stream,
    output: out,
    errors: new Capture(),
    udp: true,
    timeout: 0.3,
  });
  await input.type("ping\n");
  await out.waitFor(`[127.0.0.1:${echo.addr.port}] ping\n`);
  await input.end();
  assert.equal(await within(WAIT_MS, running, "runMultiplex to return"), 0);
  assert.ok(out.text.endsWith("0.3 seconds elapsed.\n"), out.text);
  await echo.close();
});

// --- The command line --------------------------------------------------------------------------

Deno.test("multiplex.ts echoes piped stdin through two echo servers and exits 0", async () => {
  const a = startEchoServer({ port: 0, host: "127.0.0.1", log: null });
  const b = startEchoServer({ port: 0, host: "127.0.0.1", log: null });
  try {
    const r = await runScript(
      "multiplex.ts",
      [`127.0.0.1:${a.addr.port}`, `localhost:${b.addr.port}`],
      "hi\n",
    );
    assert.equal(r.code, 0, r.stderr);
    const lines = r.stdout.trimEnd().split("\n").sort();
    assert.deepEqual(
      lines,
      [
        `[127.0.0.1:${a.addr.port}] closed`,
        `[127.0.0.1:${a.addr.port}] hi`,
        `[127.0.0.1:${b.addr.port}] closed`,
        `[127.0.0.1:${b.addr.port}] hi`,
      ].sort(),
    );
  } finally {
    await a.close();
    await b.close();
  }
});

Deno.test("multiplex.ts exits 1 when no endpoint can be reached, 2 on bad arguments", async () => {
  const port = freePort();
  const r = await runScript("multiplex.ts", [`127.0.0.1:${port}`]);
  assert.equal(r.code, 1);
  assert.equal(r.stderr, `multiplex: cannot reach 127.0.0.1:${port}: connection refused\n`);
  const unknown = await runScript("multiplex.ts", ["no-such-host.invalid:80"]);
  assert.equal(unknown.code, 1);
  assert.equal(unknown.stderr, "multiplex: cannot reach no-such-host.invalid:80: no such host\n");
  for (
    const [args, problem] of [
      [[], "give at least one HOST:PORT"],
      [["nohost"], '"nohost" is not HOST:PORT (write IPv6 as [::1]:PORT)'],
      [["a:1", "--to", "3"], '--to is "all" or an endpoint number from 1 to 1, not "3"'],
      [["a:1", "--timeout", "soon"], '--timeout wants seconds, not "soon"'],
    ] as const
  ) {
    const bad = await runScript("multiplex.ts", [...args]);
    assert.equal(bad.code, 2, args.join(" "));
    assert.equal(bad.stderr.split("\n")[0], `multiplex: ${problem}`);
    assert.match(bad.stderr.split("\n")[1], /^usage: multiplex\.ts HOST:PORT/);
  }
});

// --- Load mode ---------------------------------------------------------------------------------------

Deno.test("runChatLoad() times every delivery to every other client of a chat server", async () => {
  const chat = await startChatServer({ port: 0, host: "127.0.0.1", log: null, rate: 0 });
  try {
    const r = await runChatLoad({
      endpoints: [{ host: "127.0.0.1", port: chat.addr.port }],
      clients: 20,
      senders: 5,
      messages: 10,
      size: 64,
      rate: 500,
    });
    assert.equal(r.expected, 5 * 10 * 19);
    assert.equal(r.delivered, r.expected);
    assert.ok(r.p50Ms > 0 && r.p50Ms <= r.p99Ms, JSON.stringify(r));
    assert.ok(r.seconds >= 0.09, `50 lines at 500/s took ${r.seconds} s`); // the rate was kept
  } finally {
    await chat.close();
  }
});

Deno.test("multiplex.ts --load --json reports every line delivered, and exits 1 when lines go missing", async () => {
  const chat = await startChatServer({ port: 0, host: "127.0.0.1", log: null, rate: 0 });
  try {
    const args = [`127.0.0.1:${chat.addr.port}`, "--load", "10", "--messages", "5", "--json"];
    const r = await runScript("multiplex.ts", args);
    assert.equal(r.code, 0, r.stderr);
    const result = JSON.parse(r.stdout);
    assert.equal(result.delivered, 10 * 5 * 9);
    assert.equal(result.delivered, result.expected);
  } finally {
    await chat.close();
  }
  // A server that drops lines: --rate 50 lets a burst of 100 through per client, not 150.
  const strict = await startChatServer({ port: 0, host: "127.0.0.1", log: null, rate: 50 });
  try {
    const args = [`127.0.0.1:${strict.addr.port}`, "--load", "2", "--messages", "150", "--json"];
    const r = await runScript("multiplex.ts", args);
    assert.equal(r.code, 1);
    assert.ok(JSON.parse(r.stdout).delivered < 300);
  } finally {
    await strict.close();
  }
});
