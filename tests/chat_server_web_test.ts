// chat_server.ts --http: the web page and its WebSocket, beside telnet-style TCP clients.
import assert from "node:assert/strict";
import { type ChatServerOptions, startChatServer } from "../chat_server.ts";
import { hasProgram, runScript, TestClient, WAIT_MS, within } from "./_helpers.ts";

const GREETING = "You're connected to the Deno chatserver";

/** Starts a server with its web side on free ports, runs `body`, and closes everything. */
async function withWebServer(
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

/** A WebSocket client whose messages can be awaited one by one. */
class WsClient {
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

  opened(): Promise<void> {
    return within(
      WAIT_MS,
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

  async close(): Promise<void> {
    this.ws.close();
    await this.#closed;
  }
}

Deno.test("startChatServer({ http }) puts WebSocket and TCP clients in the same room", async () => {
  await withWebServer({}, async (tcpPort, httpPort) => {
    using tcp = await TestClient.connect(tcpPort);
    assert.equal(await tcp.readLine(), GREETING + "\r\n");
    const web = new WsClient(`ws://127.0.0.1:${httpPort}/ws`);
    await web.opened();
    assert.equal(await web.next(), GREETING);
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
    assert.match(await web.next(), /^You are sending more than 1 lines in 10 seconds/);
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
    const missing = await fetch(`http://127.0.0.1:${httpPort}/nope`);
    await missing.body?.cancel();
    assert.equal(missing.status, 404);
  });
});

// --- A real browser ------------------------------------------------------------------------------

const CHROMIUM = "/usr/bin/chromium";
const haveChromium = hasProgram("chromium");

Deno.test({
  name: haveChromium
    ? "the page in headless Chromium chats with a TCP client, shows <script> as text, and takes /nick"
    : "the page in headless Chromium (ignored: chromium not installed)",
  ignore: !haveChromium,
  // Playwright keeps timers and pipes of its own between calls; the browser is closed below.
  sanitizeOps: false,
  sanitizeResources: false,
  async fn() {
    const { chromium } = await import("playwright-core");
    await withWebServer({}, async (tcpPort, httpPort) => {
      const browser = await chromium.launch({
        executablePath: CHROMIUM,
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

        await Deno.mkdir("test-artifacts", { recursive: true });
        await page.screenshot({ path: "test-artifacts/chat_page.png" });
        await page.close();
        assert.equal(await tcp.readLine(), "Client left pagey\r\n");
      } finally {
        await browser.close();
      }
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
