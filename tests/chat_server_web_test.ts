// chat_server.ts --http: the web page and its WebSocket, beside telnet-style TCP clients.
import assert from "node:assert/strict";
import { DEFAULT_HTTP_PING, PAGE_MARKS, PAGE_READS, startChatServer } from "../chat_server.ts";
import { WebListenError } from "../chat/http.ts";
import { PAGE } from "../chat/web.ts";
import {
  ask,
  Cli,
  freePort,
  GREETING,
  hasProgram,
  Hiccup,
  joinChat,
  needs,
  portIn,
  readSlowly,
  readUntil,
  rssKiB,
  runScript,
  TestClient,
  WAIT_MS,
  withChromium,
  within,
  withWebServer,
  WsClient,
} from "./_helpers.ts";

Deno.test("startChatServer({ http }) puts WebSocket and TCP clients in the same room", async () => {
  await withWebServer({}, async (tcpPort, httpPort) => {
    using tcp = await TestClient.connect(tcpPort);
    assert.equal(await tcp.readLine(), GREETING);
    const web = new WsClient(`ws://127.0.0.1:${httpPort}/ws`);
    await web.opened();
    assert.equal(await web.next(), GREETING.trimEnd());
    const joined = (await tcp.readLine())!;
    const webName = /^Client joined (127\.0\.0\.1:\d+)\r\n$/.exec(joined)![1]; // address:port, as for telnet
    web.ws.send("hello from the web");
    assert.equal(await tcp.readLine(), `[${webName}] hello from the web\r\n`);
    await tcp.write("hello from telnet\r\n");
    assert.equal(await web.next(), `[${tcp.name}] hello from telnet`);
    web.ws.send("/nick webby");
    assert.equal(await web.next(), "You are now known as webby");
    assert.equal(await tcp.readLine(), `${webName} is now known as webby\r\n`);
    web.ws.send("two\nlines");
    assert.equal(await tcp.readLine(), "[webby] two\r\n");
    assert.equal(await tcp.readLine(), "[webby] lines\r\n");
    await web.close();
    assert.equal(await tcp.readLine(), "Client left webby\r\n");
  });
});

Deno.test("startChatServer({ http }) applies the same limits to WebSocket clients", async () => {
  await withWebServer({ maxLine: 8, rate: 1 }, async (tcpPort, httpPort) => {
    using tcp = await TestClient.connect(tcpPort);
    await tcp.readLine();
    const web = new WsClient(`ws://127.0.0.1:${httpPort}/ws`);
    await web.opened();
    await web.next();
    const webName = /^Client joined (\S+)\r\n$/.exec((await tcp.readLine())!)![1];
    web.ws.send("0123456789");
    assert.equal(await web.next(), "Your line was over 8 bytes; the rest of it was discarded");
    assert.equal(await tcp.readLine(), `[${webName}] 01234567\r\n`);
    web.ws.send("a");
    web.ws.send("b"); // a burst of two is the most --rate 1 allows
    web.ws.send("c");
    assert.match(await web.next(), /^You are sending more than 1 line in 10 seconds/);
    assert.equal(await tcp.readLine(), `[${webName}] a\r\n`);
    await tcp.write("/who\r\n");
    assert.equal(await tcp.readLine(), "In lobby (2):\r\n"); // "b" and "c" never came
    await web.close();
  });
});

/** Sends a raw HTTP upgrade request and returns the status line of the answer. */
async function upgradeStatus(port: number, origin: string): Promise<string> {
  using c = await TestClient.connect(port);
  await c.write(
    `GET /ws HTTP/1.1\r\nHost: 127.0.0.1:${port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n` +
      `Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nOrigin: ${origin}\r\n\r\n`,
  );
  return (await c.readLine())!.trimEnd();
}

Deno.test("startChatServer({ http }) refuses cross-origin WebSocket upgrades unless allowed", async () => {
  await withWebServer({}, async (_tcp, httpPort) => {
    assert.equal(await upgradeStatus(httpPort, "http://evil.example"), "HTTP/1.1 403 Forbidden");
    assert.equal(
      await upgradeStatus(httpPort, `http://127.0.0.1:${httpPort}`),
      "HTTP/1.1 101 Switching Protocols",
    );
  });
  await withWebServer({ http: { port: 0, origins: ["https://chat.example"] } }, async (_tcp, httpPort) => {
    assert.equal(await upgradeStatus(httpPort, "https://chat.example"), "HTTP/1.1 101 Switching Protocols");
    assert.equal(await upgradeStatus(httpPort, "https://other.example"), "HTTP/1.1 403 Forbidden");
  });
});

Deno.test("startChatServer({ http }) serves one self-contained page at /", async () => {
  await withWebServer({}, async (_tcp, httpPort) => {
    const response = await fetch(`http://127.0.0.1:${httpPort}/`);
    assert.equal(response.headers.get("content-type"), "text/html; charset=utf-8");
    const html = await response.text();
    assert.match(html, /<script>/);
    assert.doesNotMatch(html, /<script src=|<link /); // nothing to fetch: CSS and JS are inline
    assert.match(html, /prefers-color-scheme: dark/);
    assert.ok(!html.includes("innerHTML"), "the page must insert text, never HTML");
    assert.equal(html, PAGE); // chat/page.html, with chat/page.css and chat/page.js put in place
    const asset = (name: string) => Deno.readTextFileSync(new URL(`../chat/${name}`, import.meta.url));
    assert.ok(html.includes(`<script>\n${asset("page.js")}</script>`), "page.js, whole and as it is");
    assert.ok(html.includes(`<style>\n${asset("page.css")}</style>`), "page.css, whole and as it is");
    const missing = await fetch(`http://127.0.0.1:${httpPort}/nope`);
    await missing.body?.cancel();
    assert.equal(missing.status, 404);
  });
});

// --- A real browser ------------------------------------------------------------------------------

const haveChromium = hasProgram("chromium");

Deno.test({
  name: haveChromium
    ? "the page in headless Chromium chats with a TCP client, shows <script> as text, takes /nick, and shows its own /me"
    : "the page in headless Chromium (ignored: chromium not installed)",
  ignore: !haveChromium,
  // Playwright keeps timers and pipes of its own between calls; the browser is closed below.
  sanitizeOps: false,
  sanitizeResources: false,
  async fn() {
    await withWebServer({}, async (tcpPort, httpPort) => {
      await withChromium(async (browser) => {
        using tcp = await TestClient.connect(tcpPort);
        await tcp.readLine();
        const page = await browser.newPage({ viewport: { width: 900, height: 600 } });
        await page.goto(`http://127.0.0.1:${httpPort}/`);
        await page.locator("#status", { hasText: "connected" }).waitFor({ timeout: WAIT_MS });
        const pageName = /^Client joined (\S+)\r\n$/.exec((await tcp.readLine())!)![1];

        await page.fill("#input", "hello from the page");
        await page.press("#input", "Enter");
        assert.equal(await tcp.readLine(), `[${pageName}] hello from the page\r\n`);

        await tcp.write("<script>document.title='pwned'</script><b>bold?</b>\r\n");
        const line = page.locator("#log li", { hasText: "<script>" });
        await line.waitFor({ timeout: WAIT_MS });
        assert.equal(await line.locator(".from").textContent(), tcp.name);
        assert.equal(await page.locator("#log script, #log b").count(), 0);
        assert.notEqual(await page.title(), "pwned");

        await page.fill("#input", "/nick pagey");
        await page.press("#input", "Enter");
        assert.equal(await tcp.readLine(), `${pageName} is now known as pagey\r\n`);
        await page.locator("#memberlist li", { hasText: "pagey" }).waitFor({ timeout: WAIT_MS });
        assert.equal(await page.locator("#room").textContent(), "lobby");

        await page.fill("#input", "/me waves");
        await page.press("#input", "Enter");
        assert.equal(await tcp.readLine(), "* pagey waves\r\n");
        await page.locator("#log li", { hasText: "* pagey waves" }).waitFor({ timeout: WAIT_MS }); // on its own screen too

        await Deno.mkdir("test-artifacts", { recursive: true });
        await page.screenshot({ path: "test-artifacts/chat_page.png" });
        await page.close();
        assert.equal(await tcp.readLine(), "Client left pagey\r\n");
      });
    });
  },
});

Deno.test("chat_server.ts names the web page's port in one line when it is taken", async () => {
  using taken = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const r = await runScript("chat_server.ts", [
    "0",
    "--host",
    "127.0.0.1",
    "--http",
    String(taken.addr.port),
  ]);
  assert.equal(r.code, 1);
  assert.equal(
    r.stderr,
    `chat_server: cannot serve the web page on 127.0.0.1, port ${taken.addr.port}: the port is already in use\n`,
  );
});

Deno.test("startChatServer({ http }) paces a WebSocket sender for a slow TCP reader, which loses nothing", async () => {
  await withWebServer({ rate: 0 }, async (tcpPort, httpPort) => {
    using reader = await joinChat(tcpPort);
    using other = await joinChat(tcpPort);
    using sleeper = await TestClient.connect(tcpPort); // never reads: it must still be cut off
    await reader.readLine();
    await reader.readLine();
    const web = new WsClient(`ws://127.0.0.1:${httpPort}/ws`);
    await web.opened();
    const webName = /^Client joined (\S+)\r\n$/.exec((await reader.readLine())!)![1];
    await other.readLine();
    await other.readLine();
    const count = 20_000, pad = "x".repeat(990);
    for (let i = 0; i < count; i++) web.ws.send(`${String(i).padStart(7, "0")} ${pad}`);
    const [slow, fast] = await Promise.all([
      readSlowly(reader, webName, count), // about 8 MB/s
      readSlowly(other, webName, count, 64 * 1024, 0),
    ]);
    assert.equal(slow, count, `the slow reader got ${slow} of ${count} lines`);
    assert.equal(fast, count, `the fast reader got ${fast} of ${count} lines`);
    assert.match(await sleeper.readToEnd(), /^You're connected/); // and then the server hung up
    await web.close();
  });
});

Deno.test("startChatServer() with redis and a taken web port fails and leaves nothing running", async () => {
  using taken = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const dead = freePort(); // nobody answers there: the bus keeps retrying until it is stopped
  await assert.rejects(
    () =>
      startChatServer({
        port: 0,
        host: "127.0.0.1",
        log: null,
        redis: { url: `redis://127.0.0.1:${dead}` },
        http: { port: taken.addr.port },
      }),
    WebListenError,
  );
  // The test's sanitizers fail it if a timer, socket or connection of the bus is still open.
});

Deno.test("the page understands every line it reads, as the server writes them (PAGE_READS)", () => {
  const page = runPageScript();
  page.socket.onopen();
  assert.deepEqual(page.socket.sent, ["/who", "/rooms"]); // asked quietly at once
  page.receive(PAGE_READS.whoHeader("dev", 2));
  page.receive("  ann (127.0.0.1:4000) (you)");
  page.receive("  127.0.0.1:4001");
  page.receive("Rooms (2):");
  page.receive("  dev 2 (you are here)");
  page.receive("  lobby 5");
  assert.equal(page.byId("room").textContent, "dev");
  assert.deepEqual(page.members(), ["ann (127.0.0.1:4000) (you)", "127.0.0.1:4001"]);
  assert.equal(page.byId("count").textContent, "(2)");
  const rooms = page.byId("roomlist").children as Record<string, unknown>[];
  assert.deepEqual(
    rooms.map((li) => (li.children as { textContent: string }[]).map((k) => k.textContent).join("")),
    [
      "dev 2",
      "lobby 5",
    ],
  );
  assert.equal(page.lines.length, 0, "the quiet /who and /rooms are not shown");
  page.receive(PAGE_READS.nowIn("ops", 1));
  assert.equal(page.byId("room").textContent, "ops");
  page.receive(PAGE_READS.topic("ops", "deploys on Fridays"));
  assert.equal(page.byId("topic").textContent, "deploys on Fridays");
  const asks = [
    PAGE_READS.joined("127.0.0.1:4002"),
    PAGE_READS.left("bob", " (lunch)"),
    PAGE_READS.renamed("127.0.0.1:4001", "bob"),
    PAGE_READS.nowKnownAs("ann"),
    PAGE_READS.hasJoined("bob", "ops"),
    PAGE_READS.leftFor("bob", "ops", "dev"),
  ];
  for (const line of asks) {
    const before = page.socket.sent.length;
    page.receive(line);
    assert.equal(page.socket.sent[before], "/who", `the page did not ask /who after "${line}"`);
  }
  assert.deepEqual(
    page.socket.sent.slice(-3),
    ["/rooms", "/who", "/rooms"],
    "and /rooms when a room changes",
  );
  page.receive(PAGE_READS.said("bob", "hi <b>there</b>"));
  page.receive(PAGE_READS.privately("bob", "psst"));
  const [said, privately] = page.lines.slice(-2);
  assert.deepEqual([said.from, said.text, said.kind], ["bob", "hi <b>there</b>", "line"]);
  assert.deepEqual([privately.from, privately.text, privately.kind], [
    "bob (private)",
    "psst",
    "line private",
  ]);
});

Deno.test("the server writes the lines the page reads only through PAGE_READS, never with literals of its own", () => {
  // The core and every part but the page's own script, which reads them.
  const server = [
    "../chat_server.ts",
    ...[...Deno.readDirSync(new URL("../chat", import.meta.url))]
      .filter((f) => f.name.endsWith(".ts")).map((f) => `../chat/${f.name}`),
  ]
    .map((file) => Deno.readTextFileSync(new URL(file, import.meta.url))).join("\n");
  for (
    const phrase of [
      "Client joined ",
      "Client left ",
      " is now known as ",
      "You are now known as ",
      "You are now in ",
      " has joined ",
      " has left ",
      "(private) [",
    ]
  ) {
    const uses = server.split(phrase).length - 1;
    assert.equal(uses, 1, `"${phrase}" is written ${uses} times: once, in PAGE_READS, is the rule`);
  }
});

Deno.test("the page follows where it stands (PAGE_MARKS), never shows them, and says so when it reconnects", () => {
  const page = runPageScript();
  assert.equal(page.socket.urls[0], "ws://localhost/ws?page=1"); // a newcomer says nothing more
  page.socket.onopen();
  const encoded = (text: string) => new TextEncoder().encode(text + "\r\n");
  const said = new Date(2026, 0, 2, 3, 4).getTime();
  for (
    const line of [
      PAGE_MARKS.token("4f1c"),
      PAGE_MARKS.at("dev", { epoch: "0a1b2c3d", seq: 3 }),
      PAGE_MARKS.history({ seq: 4, time: said, message: encoded("[bob] earlier") }),
      PAGE_MARKS.history({ seq: 5, time: said, message: encoded("* bob waves") }),
      PAGE_MARKS.kept(6) + PAGE_READS.said("bob", "now"),
      PAGE_MARKS.mine(7),
      PAGE_MARKS.alive(25),
      PAGE_READS.nowKnownAs("ann"),
    ]
  ) page.receive(line);
  const shown = page.lines.map((l) => [l.kind, l.from, l.text]);
  assert.deepEqual(shown.slice(0, 3), [
    ["line history", "bob", "earlier"],
    ["line history", undefined, "* bob waves"],
    ["line", "bob", "now"],
  ]);
  assert.equal(
    page.lines[0].time,
    new Date(said).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" }),
  );
  assert.ok(!page.lines.some((l) => l.text?.includes("\x1e")), "no mark is shown");
  page.socket.onclose();
  page.timers.shift()!(); // the reconnect
  page.socket.onopen();
  page.receive(PAGE_MARKS.alive(25));
  page.clock.now = 40_000; // a ping is late, which may happen
  page.intervals.forEach((check) => check());
  assert.equal(page.clock.closes, 0);
  page.clock.now = 52_000; // two pings' worth of silence, and then some: the page gives the server up
  page.intervals.forEach((check) => check());
  assert.equal(page.clock.closes, 1);
  assert.equal(page.byId("status").textContent, "reconnecting in 1 s\u2026");
  page.timers.shift()!(); // the reconnect
  assert.equal(
    page.socket.urls[2],
    "ws://localhost/ws?page=1&token=4f1c&nick=ann&room=dev&epoch=0a1b2c3d&seq=7",
  );
});

/**
 * Runs the page's script against a stand-in DOM and WebSocket, and lets a test feed it lines;
 * `random` stands in for Math.random.
 */
function runPageScript(random = Math.random, storage = new Map<string, string>()) {
  type Node = { kind?: string; from?: string; text?: string; time?: string };
  const elements = new Map<string, Record<string, unknown>>();
  const lines: Node[] = [];
  const element = (): Record<string, unknown> => {
    const el: Record<string, unknown> = { textContent: "", children: [] as unknown[] };
    el.append = (...kids: Record<string, unknown>[]) => (el.children as unknown[]).push(...kids);
    el.replaceChildren = (...kids: unknown[]) => el.children = kids;
    el.addEventListener = () => {};
    el.setAttribute = (name: string, value: string) => el[name] = value;
    el.classList = { toggle: () => true };
    return el;
  };
  const document = {
    title: "Deno chat",
    hidden: false,
    addEventListener: () => {},
    getElementById(id: string) {
      if (!elements.has(id)) elements.set(id, element());
      return elements.get(id);
    },
    createElement: (tagName: string) => Object.assign(element(), { tagName }),
    createTextNode: (text: string) => ({ textContent: text }),
  };
  const socket = { sent: [] as string[], readyState: 1, urls: [] as string[] } as
    & Record<string, unknown>
    & { sent: string[]; urls: string[] };
  const timers: (() => void)[] = [], intervals: (() => void)[] = [];
  const clock = { now: 0, closes: 0 };
  class FakeWebSocket {
    static OPEN = 1;
    constructor(url: string) {
      socket.urls.push(url);
      socket.send = (text: string) => socket.sent.push(text);
      socket.close = () => clock.closes++;
      return socket as unknown as FakeWebSocket;
    }
  }
  class FakeDate extends Date {
    static override now = () => clock.now;
  }
  const script = Deno.readTextFileSync(new URL("../chat/page.js", import.meta.url));
  const delays: number[] = [];
  const math = Object.assign(Object.create(Math), { random });
  const sessionStorage = {
    getItem: (key: string) => storage.get(key) ?? null,
    setItem: (key: string, value: string) => storage.set(key, value),
  };
  const names = [
    "document",
    "WebSocket",
    "location",
    "setTimeout",
    "setInterval",
    "Date",
    "Math",
    "sessionStorage",
  ];
  new Function(...names, script)(
    document,
    FakeWebSocket,
    { protocol: "http:", host: "localhost" },
    (f: () => void, ms = 0) => (timers.push(f), delays.push(ms)),
    (f: () => void) => intervals.push(f),
    FakeDate,
    math,
    sessionStorage,
  );
  const log = document.getElementById("log")!;
  // Each item of the log as its kind, sender, text and time; the text is read when asked, since a
  // block's lines are added after the item is.
  const textOf = (node: Record<string, unknown>): string =>
    node.children
      ? (node.children as Record<string, unknown>[]).map(textOf).join(node.tagName === "ul" ? "\n" : "")
      : String(node.textContent);
  (log.append as unknown) = (li: Record<string, unknown>) => {
    const kids = li.children as Record<string, unknown>[];
    const from = kids.find((k) => k.className === "from")?.textContent as string | undefined;
    const time = kids[0].textContent as string;
    lines.push({
      kind: li.className as string,
      from,
      get text() {
        return kids.slice(1).filter((k) => k.className !== "from").map(textOf).join("");
      },
      time,
    });
  };
  return {
    socket: socket as typeof socket & {
      onopen(): void;
      onclose(): void;
      onmessage(e: { data: string }): void;
    },
    timers,
    delays,
    intervals,
    clock,
    lines,
    byId: (id: string) => document.getElementById(id)!,
    receive: (line: string) => (socket.onmessage as (e: { data: string }) => void)({ data: line }),
    members: () =>
      (document.getElementById("memberlist")!.children as Record<string, unknown>[]).map((li) =>
        li.textContent
      ),
  };
}

// --- The web side under abuse ------------------------------------------------------------------

Deno.test("startChatServer({ http }) answers an upgrade without Sec-WebSocket-Key with 400, quietly", async () => {
  await withWebServer({}, async (_tcp, httpPort) => {
    using c = await TestClient.connect(httpPort);
    await c.write(`GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n`);
    assert.equal(await c.readLine(), "HTTP/1.1 400 Bad Request\r\n");
  });
});

Deno.test("startChatServer({ http }) closes request heads that trickle, and caps them per address", async () => {
  await withWebServer({ http: { port: 0, timeout: 0.5 } }, async (_tcp, httpPort) => {
    const trickle = await Promise.all(
      Array.from({ length: 10 }, () => TestClient.connect(httpPort)),
    );
    try {
      for (const c of trickle) await c.write("G"); // one byte of a head, and no more
      // Eight may wait; the ninth and tenth from the same address are turned away at once.
      const answers = await Promise.all(trickle.map((c) => c.readToEnd(3000)));
      assert.equal(answers.filter((a) => a.startsWith("HTTP/1.1 503")).length, 2, answers.join("|"));
      assert.equal(answers.filter((a) => a === "").length, 8, "the eight are hung up on at the timeout");
      const page = await fetch(`http://127.0.0.1:${httpPort}/`); // and the address may ask again
      assert.equal(page.status, 200);
      await page.body?.cancel();
    } finally {
      for (const c of trickle) c.close();
    }
  });
});

Deno.test("startChatServer({ http, proxyFrom }) caps a trusted proxy's request heads only with everyone's", async () => {
  await withWebServer(
    { http: { port: 0, timeout: 0.5 }, proxyFrom: ["127.0.0.1/32"] },
    async (_tcp, httpPort) => {
      const trickle = await Promise.all(Array.from({ length: 10 }, () => TestClient.connect(httpPort)));
      try {
        for (const c of trickle) await c.write("G");
        const answers = await Promise.all(trickle.map((c) => c.readToEnd(3000)));
        assert.equal(answers.filter((a) => a === "").length, 10, "all ten waited: they are many people");
      } finally {
        for (const c of trickle) c.close();
      }
    },
  );
});

Deno.test("chat_server.ts --http: a 20 MB WebSocket message costs what a long line costs", async () => {
  const cli = new Cli("chat_server.ts", ["0", "--host", "127.0.0.1", "--http", "0"]);
  const port = await cli.started();
  const httpPort = Number(await cli.lineWith(/^Web page at http:\/\/[^/]+:(\d+)\/$/));
  using tcp = await joinChat(port);
  const web = new WsClient(`ws://127.0.0.1:${httpPort}/ws`);
  await web.opened();
  assert.equal(await web.next(), GREETING.trimEnd());
  const webName = /^Client joined (\S+)\r\n$/.exec((await tcp.readLine())!)![1];
  const before = rssKiB(cli.child.pid);
  web.ws.send("y".repeat(20 * 1024 * 1024));
  web.ws.send("after");
  assert.equal(await tcp.readLine(), `[${webName}] ${"y".repeat(4096)}\r\n`);
  assert.equal(await tcp.readLine(), `[${webName}] after\r\n`);
  assert.equal(await web.next(), "Your line was over 4096 bytes; the rest of it was discarded");
  const grewMiB = (rssKiB(cli.child.pid) - before) / 1024;
  assert.ok(grewMiB < 16, `the server grew by ${grewMiB.toFixed(1)} MiB for one message`);
  await web.close();
  cli.kill();
  assert.equal((await cli.finish()).code, 0);
});

Deno.test({
  ...needs("chat_server.ts --http keeps serving when it runs out of descriptors", ["sh"]),
  async fn() {
    const script =
      `ulimit -n 80 && exec "${Deno.execPath()}" run -A chat_server.ts 0 --host 127.0.0.1 --http 0`;
    const child = new Deno.Command("sh", {
      args: ["-c", script],
      cwd: new URL("..", import.meta.url).pathname,
      stdout: "piped",
      stderr: "piped",
      env: { NO_COLOR: "1" },
    }).spawn();
    const stdout = child.stdout.pipeThrough(new TextDecoderStream()).getReader();
    let seen = "";
    while (!seen.includes("Web page at")) {
      seen += (await within(WAIT_MS, stdout.read(), "the start")).value ?? "";
    }
    const httpPort = Number(/Web page at http:\/\/[^/]+:(\d+)\//.exec(seen)![1]);
    const port = portIn(seen);
    const drained = (async () => {
      while (!(await stdout.read()).done);
    })();
    const sockets: WsClient[] = [];
    try {
      for (let opened = true; opened && sockets.length < 200;) { // until one waits: the server is out of descriptors
        const ws = new WsClient(`ws://127.0.0.1:${httpPort}/ws`);
        sockets.push(ws);
        opened = await ws.opened(500).then(() => true, () => false);
      }
      assert.ok(sockets.length < 200, "the server never ran out of descriptors");
      for (const ws of sockets.splice(0, 60)) ws.ws.close(); // room again
      const page = await within(
        WAIT_MS,
        fetch(`http://127.0.0.1:${httpPort}/`),
        "the page after the squeeze",
      );
      assert.equal(page.status, 200);
      await page.body?.cancel();
      using tcp = await joinChat(port);
      await tcp.write("/who\r\n"); // pages that waited for a descriptor may join meanwhile
      assert.match(await readUntil(tcp, (l) => !l.startsWith("Client joined ")), /^In lobby \(\d+\):/);
    } finally {
      for (const ws of sockets) ws.ws.close();
      child.kill("SIGTERM");
    }
    const status = await child.status;
    await drained;
    const stderr = await new Response(child.stderr).text();
    assert.equal(status.code, 0, stderr);
    assert.match(stderr, /accept failed: .*Too many open files.*; retrying/);
    assert.doesNotMatch(stderr, /Uncaught/);
  },
});

Deno.test("startChatServer({ http }).close() says goodbye to WebSocket clients as to telnet users", async () => {
  const server = await startChatServer({ port: 0, host: "127.0.0.1", log: null, http: { port: 0 } });
  const web = new WsClient(`ws://127.0.0.1:${server.httpAddr!.port}/ws`);
  await web.opened();
  assert.equal(await web.next(), GREETING.trimEnd());
  await server.close();
  assert.equal(await web.next(), "Server shutting down, goodbye");
  await web.close();
});

// --- RFC 6455 framing, byte by byte --------------------------------------------------------------

/** A client frame: masked, as RFC 6455 requires of clients (unless `masked` is false). */
function clientFrame(opcode: number, payload: Uint8Array | string, fin = true, masked = true): Uint8Array {
  const data = typeof payload === "string" ? new TextEncoder().encode(payload) : payload;
  const n = data.length;
  const header = n < 126
    ? [n]
    : n < 65536
    ? [126, n >> 8, n & 0xff]
    : [127, 0, 0, 0, 0, n >>> 24, (n >> 16) & 0xff, (n >> 8) & 0xff, n & 0xff];
  const mask = masked ? [0x12, 0x34, 0x56, 0x78] : [];
  const out = new Uint8Array(1 + header.length + mask.length + n);
  out[0] = (fin ? 0x80 : 0) | opcode;
  out.set(header, 1);
  out[1] |= masked ? 0x80 : 0;
  out.set(mask, 1 + header.length);
  for (let i = 0; i < n; i++) {
    out[1 + header.length + mask.length + i] = masked ? data[i] ^ mask[i & 3] : data[i];
  }
  return out;
}

/** A WebSocket opened by hand on a raw TCP connection: frames written and read as bytes. */
class RawWebSocket {
  readonly conn: Deno.TcpConn;
  #have = new Uint8Array(0);

  private constructor(conn: Deno.TcpConn) {
    this.conn = conn;
  }

  static async open(httpPort: number): Promise<RawWebSocket> {
    const ws = new RawWebSocket(await Deno.connect({ hostname: "127.0.0.1", port: httpPort }));
    await ws.write(new TextEncoder().encode(
      `GET /ws HTTP/1.1\r\nHost: 127.0.0.1:${httpPort}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n` +
        `Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n`,
    ));
    let end;
    while ((end = new TextDecoder().decode(ws.#have).indexOf("\r\n\r\n")) < 0) await ws.#fill();
    assert.match(new TextDecoder().decode(ws.#have), /^HTTP\/1\.1 101 Switching Protocols\r\n/);
    ws.#have = ws.#have.slice(end + 4);
    return ws;
  }

  async write(bytes: Uint8Array): Promise<void> {
    while (bytes.length > 0) bytes = bytes.subarray(await this.conn.write(bytes));
  }

  async #fill(): Promise<void> {
    const buf = new Uint8Array(65536);
    const n = await within(WAIT_MS, this.conn.read(buf), "bytes from the server");
    if (n === null) throw new Error("closed");
    const next = new Uint8Array(this.#have.length + n);
    next.set(this.#have);
    next.set(buf.subarray(0, n), this.#have.length);
    this.#have = next;
  }

  /** Reads one server frame (short, as the server's are here): its opcode and payload. */
  async frame(): Promise<[number, Uint8Array]> {
    while (this.#have.length < 2) await this.#fill();
    const length = this.#have[1] & 0x7f;
    while (this.#have.length < 2 + length) await this.#fill();
    const frame: [number, Uint8Array] = [this.#have[0] & 0x0f, this.#have.slice(2, 2 + length)];
    this.#have = this.#have.slice(2 + length);
    return frame;
  }

  /** True once the server has closed the connection. */
  async closed(): Promise<boolean> {
    try {
      await this.#fill();
      return false;
    } catch {
      return true;
    }
  }

  [Symbol.dispose](): void {
    try {
      this.conn.close();
    } catch { /* closed already */ }
  }
}

Deno.test("the WebSocket joins fragments, answers pings, and closes on an unmasked frame", async () => {
  await withWebServer({}, async (tcpPort, httpPort) => {
    using tcp = await joinChat(tcpPort);
    using ws = await RawWebSocket.open(httpPort);
    const name = /^Client joined (\S+)\r\n$/.exec((await tcp.readLine())!)![1];
    assert.deepEqual(await ws.frame(), [1, new TextEncoder().encode(GREETING.trimEnd())]);
    await ws.write(clientFrame(1, "hel", false)); // a message in two fragments...
    await ws.write(clientFrame(9, "are you there")); // ...with a ping between them
    await ws.write(clientFrame(0, "lo"));
    const [op, payload] = await ws.frame();
    assert.deepEqual([op, new TextDecoder().decode(payload)], [10, "are you there"]); // the pong
    assert.equal(await tcp.readLine(), `[${name}] hello\r\n`);
    await ws.write(clientFrame(1, "x".repeat(70_000))); // a 64-bit length: cut like a long line
    assert.equal(await tcp.readLine(), `[${name}] ${"x".repeat(4096)}\r\n`);
    const [notice] = await ws.frame();
    assert.equal(notice, 1); // "Your line was over 4096 bytes..."
    await ws.write(clientFrame(1, "naked", true, false));
    const [closing, code] = await ws.frame();
    assert.deepEqual([closing, [...code]], [8, [0x03, 0xea]]); // 1002: protocol error
    assert.equal(await tcp.readLine(), `Client left ${name}\r\n`);
  });
});

Deno.test("the WebSocket answers a close with a close, and the room hears the leave", async () => {
  await withWebServer({}, async (tcpPort, httpPort) => {
    using tcp = await joinChat(tcpPort);
    using ws = await RawWebSocket.open(httpPort);
    const name = /^Client joined (\S+)\r\n$/.exec((await tcp.readLine())!)![1];
    await ws.frame(); // the greeting
    await ws.write(clientFrame(8, new Uint8Array([0x03, 0xe8])));
    const [op, code] = await ws.frame();
    assert.deepEqual([op, [...code]], [8, [0x03, 0xe8]]);
    assert.equal(await tcp.readLine(), `Client left ${name}\r\n`);
    assert.ok(await ws.closed());
  });
});

/** A frame with RSV bits set (`rsv`, 1-7), otherwise as clientFrame() makes it. */
function withRsv(rsv: number, bytes: Uint8Array): Uint8Array {
  bytes[0] |= rsv << 4;
  return bytes;
}

const hex = (text: string) => new Uint8Array(text.match(/../g)!.map((b) => parseInt(b, 16)));
const closeBody = (code: number, reason: Uint8Array | string = "") => {
  const r = typeof reason === "string" ? new TextEncoder().encode(reason) : reason;
  return new Uint8Array([code >> 8, code & 0xff, ...r]);
};
/** Autobahn's 6.3.1 payload: "κόσμε", then ED A0 80 (a surrogate, never valid UTF-8), then "edited". */
const KOSME_BAD = hex("cebae1bdb9cf83cebcceb5eda080656469746564");

/**
 * Autobahn|Testsuite's cases (by their ids, sent as raw frames; the suite itself needs Python 2),
 * and a few more from RFC 6455. `relayed` is what the room must hear from the client, and `close`
 * the code the server must close with (null: a close frame with no code); `pong` a pong it must send first.
 */
const RFC6455_CASES: {
  id: string;
  send: Uint8Array[];
  relayed?: string[];
  pong?: string;
  close: number | null;
}[] = [
  { id: "1.2.1 a binary message (this chat takes text: 1003)", send: [clientFrame(2, "hi")], close: 1003 },
  {
    id: "2.3 a ping with a binary payload",
    send: [clientFrame(9, hex("00fffefdfc"))],
    pong: "00fffefdfc",
    close: 1000,
  },
  { id: "2.5 a ping of 126 bytes", send: [clientFrame(9, "x".repeat(126))], close: 1002 },
  {
    id: "2.10 ten pings: at least the last is answered",
    send: Array.from({ length: 10 }, (_, i) => clientFrame(9, String(i))),
    pong: "39",
    close: 1000,
  },
  { id: "3.1 a text frame with RSV1", send: [withRsv(1, clientFrame(1, "rsv"))], close: 1002 },
  {
    id: "3.2 a good text, then one with RSV2",
    send: [clientFrame(1, "fine"), withRsv(2, clientFrame(1, "rsv"))],
    relayed: ["fine"],
    close: 1002,
  },
  { id: "3.6 a ping with RSV 6", send: [withRsv(6, clientFrame(9, "p"))], close: 1002 },
  { id: "3.7 a close with RSV 7", send: [withRsv(7, clientFrame(8, closeBody(1000)))], close: 1002 },
  { id: "4.1.1 reserved data opcode 3", send: [clientFrame(3, "")], close: 1002 },
  { id: "4.2.1 reserved control opcode 11", send: [clientFrame(11, "")], close: 1002 },
  { id: "5.1 a fragmented ping", send: [clientFrame(9, "p", false)], close: 1002 },
  { id: "5.9 a continuation with nothing to continue", send: [clientFrame(0, "x")], close: 1002 },
  {
    id: "5.18 a new text message inside a fragmented one",
    send: [clientFrame(1, "a", false), clientFrame(1, "b")],
    close: 1002,
  },
  { id: "6.3.1 invalid UTF-8 in one frame", send: [clientFrame(1, KOSME_BAD)], close: 1007 },
  {
    id: "6.3.2 invalid UTF-8 one byte a frame: failed at its 13th byte",
    send: [...KOSME_BAD.subarray(0, 13)].map((b, i) =>
      clientFrame(i === 0 ? 1 : 0, new Uint8Array([b]), false)
    ),
    close: 1007,
  },
  {
    id: "6.4.1 fail fast: a code point past U+10FFFF in the 2nd of 3 fragments, the 3rd never sent",
    send: [clientFrame(1, hex("cebae1bdb9cf83cebcceb5"), false), clientFrame(0, hex("f4908080"), false)],
    close: 1007,
  },
  {
    id: "6.4.2 fail fast: the byte that makes it invalid alone in a fragment",
    send: [
      clientFrame(1, KOSME_BAD.subarray(0, 12), false),
      clientFrame(0, KOSME_BAD.subarray(12, 13), false),
    ],
    close: 1007,
  },
  { id: "6.x a message that ends inside a character", send: [clientFrame(1, hex("6869ce"))], close: 1007 },
  { id: "6.x an overlong slash (C0 AF)", send: [clientFrame(1, hex("c0af"))], close: 1007 },
  {
    id: "6.x valid UTF-8 is relayed",
    send: [clientFrame(1, hex("cebae1bdb9cf83cebcceb5"))],
    relayed: ["\u03ba\u1f79\u03c3\u03bc\u03b5"],
    close: 1000,
  },
  { id: "7.3.1 a close with no body is answered with none", send: [clientFrame(8, "")], close: null },
  { id: "7.3.2 a close with a 1-byte body", send: [clientFrame(8, "x")], close: 1002 },
  { id: "7.3.3 a close with 1000", send: [clientFrame(8, closeBody(1000))], close: 1000 },
  {
    id: "7.3.4 a close with 1000 and a reason",
    send: [clientFrame(8, closeBody(1000, "Hello World!"))],
    close: 1000,
  },
  {
    id: "7.5.1 a close reason that is not UTF-8",
    send: [clientFrame(8, closeBody(1000, KOSME_BAD))],
    close: 1007,
  },
  ...[1001, 1003, 1011, 3000, 4999].map((code) => ({
    id: `7.7.x the valid close code ${code} is echoed`,
    send: [clientFrame(8, closeBody(code))],
    close: code,
  })),
  ...[0, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535].map((code) => ({
    id: `7.9.x / 7.13.x close code ${code}, which no peer may send`,
    send: [clientFrame(8, closeBody(code))],
    close: 1002,
  })),
  {
    id: "RFC 6455 5.4: a message unfinished when the peer closes is dropped",
    send: [clientFrame(1, "half a mess", false), clientFrame(8, closeBody(1000))],
    close: 1000,
  },
  {
    id: "RFC 6455 5.1: an unmasked empty frame fails at once",
    send: [new Uint8Array([0x81, 0x00])],
    close: 1002,
  },
];

Deno.test("the WebSocket keeps RFC 6455 in Autobahn's cases, one by one", async () => {
  await withWebServer({}, async (tcpPort, httpPort) => {
    using tcp = await joinChat(tcpPort);
    for (const c of RFC6455_CASES) {
      using ws = await RawWebSocket.open(httpPort);
      const name = /^Client joined (\S+)\r\n$/.exec((await tcp.readLine())!)![1];
      await ws.frame(); // the greeting
      for (const bytes of c.send) await ws.write(bytes);
      if (c.close === 1000) await ws.write(clientFrame(8, closeBody(1000))); // the case ends well: close it
      let [op, body] = await ws.frame();
      if (c.pong !== undefined) {
        while (op === 10 && [...body].map((b) => b.toString(16).padStart(2, "0")).join("") !== c.pong) {
          [op, body] = await ws.frame(); // an earlier ping's pong, if the server answered it
        }
        assert.equal(op, 10, `${c.id}: a pong`);
        [op, body] = await ws.frame();
      }
      assert.equal(op, 8, `${c.id}: a close frame`);
      assert.deepEqual(
        [...body.subarray(0, 2)],
        c.close === null ? [] : [c.close >> 8, c.close & 0xff],
        c.id,
      );
      for (const text of c.relayed ?? []) {
        assert.equal(new TextDecoder().decode((await tcp.readLineBytes())!), `[${name}] ${text}\r\n`, c.id);
      }
      assert.equal(await tcp.readLine(), `Client left ${name}\r\n`, `${c.id}: nothing else was relayed`);
      assert.ok(await ws.closed(), `${c.id}: the connection is closed`);
    }
  });
});

Deno.test("startChatServer({ http }) answers a WebSocket version other than 13 with 426 and the version it speaks", async () => {
  await withWebServer({}, async (_tcp, httpPort) => {
    using c = await TestClient.connect(httpPort);
    await c.write(
      `GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n` +
        `Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 8\r\n\r\n`,
    );
    const head = await c.readToEnd();
    assert.match(head, /^HTTP\/1\.1 426 Upgrade Required\r\n/);
    assert.match(head, /\r\nsec-websocket-version: 13\r\n/i);
  });
});

Deno.test("chat_server.ts --http closes a WebSocket that floods pings and never reads, and serves on", async () => {
  const cli = new Cli("chat_server.ts", ["0", "--host", "127.0.0.1", "--http", "0"]);
  const port = await cli.started();
  const httpPort = Number(await cli.lineWith(/^Web page at http:\/\/[^/]+:(\d+)\/$/));
  using tcp = await joinChat(port);
  const before = rssKiB(cli.child.pid);
  using ws = await RawWebSocket.open(httpPort);
  const name = /^Client joined (\S+)\r\n$/.exec((await tcp.readLine())!)![1];
  const pings = new Uint8Array(
    Array.from({ length: 512 }, () => [...clientFrame(9, "p".repeat(125))]).flat(),
  );
  const until = Date.now() + 1000;
  try {
    while (Date.now() < until) await ws.write(pings); // never reading a pong
  } catch (e) {
    if (!(e instanceof Deno.errors.ConnectionReset || e instanceof Deno.errors.BrokenPipe)) throw e;
  }
  assert.equal(await tcp.readLine(), `Client left ${name}\r\n`);
  await tcp.write("/who\r\n");
  assert.equal(await within(1000, tcp.readLine(), "the answer to /who"), "In lobby (1):\r\n");
  const grewMiB = (rssKiB(cli.child.pid) - before) / 1024;
  assert.ok(grewMiB < 16, `the server grew by ${grewMiB.toFixed(1)} MiB`);
  cli.kill();
  const { code, stderr } = await cli.finish();
  assert.equal(code, 0);
  assert.match(stderr, new RegExp(`Dropped ${name}: WebSocket closed with 1008: over 20 control frames`));
});

// --- Vanished peers ------------------------------------------------------------------------------

Deno.test("startChatServer({ http }) pings WebSocket clients: a frozen one leaves, with its nick; a live one stays", async () => {
  await withWebServer({ http: { port: 0, ping: 0.5 } }, async (tcpPort, httpPort) => {
    using tcp = await joinChat(tcpPort);
    const hiccup = new Hiccup(httpPort);
    const live = new WsClient(`ws://127.0.0.1:${httpPort}/ws`);
    const lid = new WsClient(`ws://127.0.0.1:${hiccup.port}/ws`);
    try {
      await Promise.all([live.opened(), lid.opened()]);
      await readUntil(tcp, (l) => l.startsWith("Client joined"));
      await readUntil(tcp, (l) => l.startsWith("Client joined"));
      lid.ws.send("/nick lid");
      assert.match((await tcp.readLine())!, / is now known as lid\r\n$/);
      hiccup.freeze(); // the lid closes: nothing passes, nothing is closed
      const left = await within(
        3000,
        readUntil(tcp, (l) => l.startsWith("Client left")),
        "the frozen page to go",
      );
      assert.equal(left, "Client left lid (no answer to pings)\r\n");
      await new Promise((r) => setTimeout(r, 1500)); // three more pings: the live client answers them all
      await tcp.write("/who\r\n");
      assert.equal(await tcp.readLine(), "In lobby (2):\r\n");
      await tcp.readLine();
      await tcp.readLine();
      await tcp.write("/nick lid\r\n");
      assert.equal(await tcp.readLine(), "You are now known as lid\r\n");
    } finally {
      hiccup.close();
      await Promise.all([live.close(), lid.close()]);
    }
  });
});

Deno.test("a frozen page leaves within 60 s with the default options: two pings", () => {
  assert.ok(2 * DEFAULT_HTTP_PING <= 60, `pings every ${DEFAULT_HTTP_PING} s`);
});

Deno.test({
  ...needs("startChatServer() turns TCP keepalive on for every socket it accepts, telnet and web (ss -o)", [
    "ss",
  ]),
  async fn() {
    await withWebServer({}, async (tcpPort, httpPort) => {
      using tcp = await joinChat(tcpPort);
      const web = new WsClient(`ws://127.0.0.1:${httpPort}/ws`);
      await web.opened();
      for (const port of [tcpPort, httpPort]) {
        const out = await new Deno.Command("ss", {
          args: ["-tnoH", "state", "established", `( sport = :${port} )`],
        }).output();
        const text = new TextDecoder().decode(out.stdout);
        assert.match(text, /timer:\(keepalive,/, `port ${port}: ${text}`);
      }
      await web.close();
      tcp.close();
    });
  },
});

Deno.test({
  name: haveChromium
    ? "the page in Chromium notices a server gone silent (no pings, no lines) and reconnects"
    : "the page notices a silent server (ignored: chromium not installed)",
  ignore: !haveChromium,
  sanitizeOps: false, // Playwright keeps timers and pipes of its own; the browser is closed below
  sanitizeResources: false,
  async fn() {
    await withWebServer({ http: { port: 0, ping: 1 } }, async (tcpPort, httpPort) => {
      const hiccup = new Hiccup(httpPort);
      try {
        await withChromium(async (browser) => {
          using tcp = await joinChat(tcpPort);
          const page = await browser.newPage();
          await page.goto(`http://127.0.0.1:${hiccup.port}/`);
          await page.locator("#status", { hasText: "connected" }).waitFor({ timeout: WAIT_MS });
          await page.fill("#input", "/nick ann");
          await page.press("#input", "Enter");
          await readUntil(tcp, (l) => l.endsWith("is now known as ann\r\n"));
          // The page too must have heard it before the freeze, or it comes back without its nick.
          await page.locator("#log li", { hasText: "You are now known as ann" }).waitFor({
            timeout: WAIT_MS,
          });
          hiccup.freeze(); // the server seems to vanish: nothing arrives, nothing is closed
          await page.locator("#status", { hasText: "reconnecting" }).waitFor({ timeout: WAIT_MS });
          await page.locator("#status", { hasText: /^connected$/ }).waitFor({ timeout: WAIT_MS });
          await readUntil(tcp, (l) => l === "ann has joined lobby\r\n" || l.startsWith("Client joined"));
          await page.fill("#input", "back again");
          await page.press("#input", "Enter");
          assert.equal(await readUntil(tcp, (l) => l.includes("back again")), "[ann] back again\r\n");
          await page.close();
        });
      } finally {
        hiccup.close();
      }
    });
  },
});

Deno.test({
  name: haveChromium
    ? "the page on a phone (375 px) and a desktop: topic in the header, members a tap away, answers as blocks, rooms to click, safe links, unread count, reconnecting"
    : "the page on a phone and a desktop (ignored: chromium not installed)",
  ignore: !haveChromium,
  sanitizeOps: false,
  sanitizeResources: false,
  async fn() {
    await withWebServer({ operPassword: "pw" }, async (tcpPort, httpPort) => {
      const hiccup = new Hiccup(httpPort);
      try {
        await withChromium(async (browser) => {
          using op = await joinChat(tcpPort);
          await ask(op, "/oper pw", "You are now an operator; /help lists what operators can do");
          await ask(op, "/topic Homework: chapter 3", `${op.name} set the topic: Homework: chapter 3`);
          for (const [size, width, height] of [["phone", 375, 667], ["desktop", 1100, 700]] as const) {
            const page = await browser.newPage({ viewport: { width, height } });
            await page.goto(`http://127.0.0.1:${hiccup.port}/`);
            await page.getByRole("status").filter({ hasText: "connected" }).waitFor({ timeout: WAIT_MS });
            await readUntil(op, (l) => l.startsWith("Client joined"));
            // The room's topic is in the header.
            await page.locator("#topic", { hasText: "Homework: chapter 3" }).waitFor({ timeout: WAIT_MS });
            // The members: on a phone behind a button named for them, beside the log on a desktop.
            const button = page.getByRole("button", { name: /Members/ });
            const list = page.locator("#memberlist");
            if (size === "phone") {
              assert.ok(await list.isHidden());
              await button.click();
              assert.equal(await button.getAttribute("aria-expanded"), "true");
            } else assert.ok(await button.isHidden());
            await list.locator("li", { hasText: op.name }).waitFor({ timeout: WAIT_MS });
            await Deno.mkdir("test-artifacts", { recursive: true });
            if (size === "phone") {
              await page.screenshot({ path: "test-artifacts/chat_page_phone_members.png" });
              await button.click(); // and closed again
              assert.equal(await button.getAttribute("aria-expanded"), "false");
              assert.ok(await list.isHidden());
            }
            // /help and /who: one item of the log each, with one time.
            const message = page.getByRole("textbox", { name: "Message" });
            await message.fill("/help");
            await message.press("Enter");
            const help = page.locator("#log li.block", { hasText: "Commands:" });
            await help.waitFor({ timeout: WAIT_MS });
            assert.equal(await help.locator("time").count(), 1);
            assert.ok((await help.locator("ul li").count()) >= 12);
            await message.fill("/who");
            await message.press("Enter");
            await page.locator("#log li.block", { hasText: "In lobby (2):" }).waitFor({ timeout: WAIT_MS });
            // Links: http and https are links that open safely; anything else stays text.
            await op.write(
              `see https://example.com/${size}?b=1. or javascript:alert(1) or <a href=x>x</a>\r\n`,
            );
            const link = page.locator("#log li", { hasText: `/${size}?b=1` }).locator("a");
            await link.waitFor({ timeout: WAIT_MS });
            assert.equal(await link.count(), 1);
            assert.equal(await link.getAttribute("href"), `https://example.com/${size}?b=1`);
            assert.equal(await link.getAttribute("rel"), "noopener noreferrer nofollow");
            assert.equal(await link.getAttribute("target"), "_blank");
            // In the background, the tab's title counts what was said.
            const hide = (hidden: boolean) =>
              page.evaluate(
                `Object.defineProperty(document, "hidden", { value: ${hidden}, configurable: true });
                document.dispatchEvent(new Event("visibilitychange"))`,
              );
            await hide(true);
            await op.write("one\r\ntwo\r\n");
            await page.waitForFunction(`document.title === "(2) Deno chat"`, null, { timeout: WAIT_MS });
            await hide(false);
            assert.equal(await page.title(), "Deno chat");
            await page.screenshot({ path: `test-artifacts/chat_page_${size}.png` });
            // The rooms: a click joins one.
            await op.write("/join dev\r\n");
            await readUntil(op, (l) => l.startsWith("You are now in dev"));
            if (size === "phone" && await list.isHidden()) await button.click();
            await page.locator("#roomlist button", { hasText: "dev" }).click();
            await readUntil(op, (l) => l.endsWith(" has joined dev\r\n"));
            await page.locator("#room", { hasText: "dev" }).waitFor({ timeout: WAIT_MS });
            // A dropped connection is shown as such until the page is back.
            hiccup.cut();
            await page.locator("#status.down", { hasText: "reconnecting" }).waitFor({ timeout: WAIT_MS });
            await page.screenshot({ path: `test-artifacts/chat_page_${size}_reconnecting.png` });
            hiccup.restore();
            await page.getByRole("status").filter({ hasText: "connected" }).waitFor({ timeout: WAIT_MS });
            await page.close();
            await op.write("/join lobby\r\n");
            await readUntil(op, (l) => l.startsWith("You are now in lobby"));
            assert.equal(await op.readLine(), "Topic of lobby: Homework: chapter 3\r\n");
          }
        });
      } finally {
        hiccup.close();
      }
    });
  },
});

chromiumTest(
  "the page's log keeps following after a block answer: lines said after /help, /who and /rooms show at the bottom, on a phone and a desktop",
  async ({ browser, tcp, httpPort }) => {
    for (const viewport of [{ width: 375, height: 600 }, { width: 1280, height: 500 }]) {
      const page = await browser.newPage({ viewport });
      await page.goto(`http://127.0.0.1:${httpPort}/`);
      await page.locator("#status", { hasText: "connected" }).waitFor({ timeout: WAIT_MS });
      const atBottom = () =>
        page.evaluate(
          `(() => { const log = document.getElementById("log");
            return log.scrollHeight - log.clientHeight - log.scrollTop <= 8; })()`,
        );
      for (let i = 0; i < 3; i++) { // each answer is taller than the log: a screenful and more
        for (const command of ["/help", "/who", "/rooms"]) {
          await page.fill("#input", command);
          await page.press("#input", "Enter");
        }
      }
      await page.locator("#log li.block").nth(5).waitFor({ timeout: WAIT_MS });
      await page.fill("#input", "my own line");
      await page.press("#input", "Enter");
      await tcp.write(`someone else's line ${viewport.width}\r\n`);
      await page.locator("#log li", { hasText: `someone else's line ${viewport.width}` })
        .waitFor({ timeout: WAIT_MS });
      assert.ok(
        await atBottom(),
        `at ${viewport.width} px the log stopped following: the last line is below`,
      );
      await page.close();
    }
  },
);

Deno.test("pages dropped together come back spread out: each wait is the backoff give or take half", () => {
  const waits = [0, 0.5, 0.999].map((r) => {
    const page = runPageScript(() => r);
    page.socket.onopen();
    const mine: number[] = [];
    for (let i = 0; i < 6; i++) {
      page.socket.onclose();
      mine.push(page.delays.at(-1)!);
      page.timers.shift()!(); // it reconnects, and is dropped again
    }
    return mine;
  });
  assert.deepEqual(waits[1], [500, 1000, 2000, 4000, 8000, 10000], "the backoff doubles, up to 10 s");
  for (let i = 0; i < 6; i++) {
    assert.ok(
      waits[0][i] === waits[1][i] / 2 && waits[2][i] > 1.49 * waits[1][i],
      `wait ${i}: ${waits.map((w) => w[i])}`,
    );
  }
});

Deno.test("a reloaded page takes its nick again: kept in the tab's sessionStorage, said once it connects", () => {
  const storage = new Map<string, string>();
  const first = runPageScript(Math.random, storage);
  first.socket.onopen();
  assert.deepEqual(first.socket.sent, ["/who", "/rooms"]); // nothing kept yet: nothing to say
  first.receive(PAGE_READS.nowKnownAs("ann"));
  assert.equal(storage.get("nick"), "ann");
  const reloaded = runPageScript(Math.random, storage);
  reloaded.socket.onopen();
  assert.deepEqual(reloaded.socket.sent, ["/nick ann", "/who", "/rooms"]);
  // Coming back after a drop, it says its nick in the URL and the server gives it back: no /nick.
  reloaded.receive(PAGE_MARKS.at("lobby", { epoch: "0a1b2c3d", seq: 0 }));
  reloaded.socket.onclose();
  reloaded.timers.shift()!();
  reloaded.socket.onopen();
  assert.deepEqual(reloaded.socket.sent.slice(3), ["/who", "/rooms"]);
  assert.match(reloaded.socket.urls.at(-1)!, /[?&]nick=ann(&|$)/);
});

chromiumTest("the page in Chromium keeps its nick across a reload", async ({ browser, tcp, httpPort }) => {
  const page = await browser.newPage();
  await page.goto(`http://127.0.0.1:${httpPort}/`);
  await page.locator("#status", { hasText: "connected" }).waitFor({ timeout: WAIT_MS });
  await page.fill("#input", "/nick zed");
  await page.press("#input", "Enter");
  await page.locator("#log li", { hasText: "You are now known as zed" }).waitFor({ timeout: WAIT_MS });
  await readUntil(tcp, (l) => l.endsWith(" is now known as zed\r\n"));
  await page.reload();
  await readUntil(tcp, (l) => l.endsWith(" is now known as zed\r\n")); // the new page, as zed again
  await page.locator("#log li", { hasText: "You are now known as zed" }).waitFor({ timeout: WAIT_MS });
  await page.fill("#input", "still me");
  await page.press("#input", "Enter");
  assert.equal(await readUntil(tcp, (l) => l.includes("still me")), "[zed] still me\r\n");
  await page.close();
});

/**
 * A test that drives the page in Chromium, against a web server and beside a TCP client in its
 * lobby; without Chromium it is ignored, and its name says why.
 */
function chromiumTest(
  name: string,
  body: (ctx: { browser: Browser; tcp: TestClient; httpPort: number }) => Promise<void>,
): void {
  Deno.test({
    name: haveChromium ? name : `${name} (ignored: chromium not installed)`,
    ignore: !haveChromium,
    sanitizeOps: false, // Playwright keeps timers and pipes of its own; the browser is closed by withChromium
    sanitizeResources: false,
    async fn() {
      await withWebServer({}, async (tcpPort, httpPort) => {
        await withChromium(async (browser) => {
          using tcp = await joinChat(tcpPort);
          await body({ browser, tcp, httpPort });
        });
      });
    },
  });
}

type Browser = Parameters<Parameters<typeof withChromium>[0]>[0];
