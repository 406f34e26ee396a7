// chat_server.ts --proxy-from: behind a load balancer, each client is seen with its own address:
// the PROXY protocol (v1 and v2, from a real HAProxy too) on the chat port, X-Forwarded-For and
// Forwarded on the web port; and nobody else can claim an address.
import assert from "node:assert/strict";
import { startChatServer } from "../chat_server.ts";
import { freePort, From, GREETING, makeCertificates, needs, WAIT_MS, within } from "./_helpers.ts";

/** A PROXY v2 header for TCP over IPv4 from `source`:`port`. */
function proxyV2(source: string, port: number): Uint8Array {
  const signature = [0x0d, 0x0a, 0x0d, 0x0a, 0x00, 0x0d, 0x0a, 0x51, 0x55, 0x49, 0x54, 0x0a];
  const address = [...source.split(".").map(Number), 10, 0, 0, 1, port >> 8, port & 0xff, 0x0a, 0x2a];
  return new Uint8Array([...signature, 0x21, 0x11, 0, address.length, ...address]);
}

Deno.test("startChatServer({ proxyFrom }) takes each client's address from its PROXY header, v1 and v2", async () => {
  const server = await startChatServer({
    port: 0,
    host: "127.0.0.1",
    log: null,
    proxyFrom: ["127.0.0.1/32"],
  });
  const port = server.addr.port;
  const watcher = await From.connect("127.0.0.5", port); // not a proxy: an ordinary client
  try {
    assert.equal(await watcher.readLine(), GREETING);
    const cases: [string | Uint8Array, string][] = [
      ["PROXY TCP4 203.0.113.7 10.0.0.1 5555 2626\r\n", "203.0.113.7:5555"],
      ["PROXY TCP6 2001:db8::7 2001:db8::1 6666 2626\r\n", "[2001:db8::7]:6666"],
      [proxyV2("198.51.100.9", 7777), "198.51.100.9:7777"],
    ];
    for (const [header, seen] of cases) {
      const client = await From.connect("127.0.0.1", port);
      client.write(header);
      assert.equal(await client.readLine(), GREETING);
      assert.equal(await watcher.readLine(), `Client joined ${seen}\r\n`);
      client.write("hello\r\n");
      assert.equal(await watcher.readLine(), `[${seen}] hello\r\n`);
      await client.close();
      assert.equal(await watcher.readLine(), `Client left ${seen}\r\n`);
    }
    // A header and the first line in one write: the line is not lost behind the header.
    const eager = await From.connect("127.0.0.1", port);
    eager.write("PROXY TCP4 192.0.2.1 10.0.0.1 4444 2626\r\nat once\r\n");
    assert.equal(await watcher.readLine(), "Client joined 192.0.2.1:4444\r\n");
    assert.equal(await watcher.readLine(), "[192.0.2.1:4444] at once\r\n");
    await eager.close();
    await watcher.readLine();
    // UNKNOWN (v1) is the proxy's own connection, as the spec says: seen with the proxy's address.
    const own = await From.connect("127.0.0.1", port);
    own.write("PROXY UNKNOWN\r\n");
    assert.equal(await watcher.readLine(), `Client joined ${own.name}\r\n`);
    await own.close();
    await watcher.readLine();
  } finally {
    await watcher.close();
    await server.close();
  }
});

Deno.test("startChatServer({ proxyFrom }) closes a proxy's connection whose PROXY header is bad, in one line, and serves on", async () => {
  const errors: string[] = [];
  const original = console.error;
  console.error = (text: string) => errors.push(text);
  const server = await startChatServer({
    port: 0,
    host: "127.0.0.1",
    log: null,
    proxyFrom: ["127.0.0.1/32"],
    handshakeTimeout: 0.5,
  });
  const port = server.addr.port;
  try {
    const bad: [string | Uint8Array, RegExp][] = [
      ["hello, no header\r\n", /no PROXY header$/],
      ["PROXY TCP4 999.1.1.1 10.0.0.1 1 2\r\n", /a malformed PROXY v1 line/],
      ["PROXY TCP4 " + "1".repeat(120), /a PROXY v1 line over 107 bytes$/],
      [
        new Uint8Array([...proxyV2("1.2.3.4", 1).subarray(0, 14), 0xff, 0xff]),
        /a PROXY v2 header of 65535 bytes$/,
      ],
      [
        new Uint8Array([
          0x0d,
          0x0a,
          0x0d,
          0x0a,
          0x00,
          0x0d,
          0x0a,
          0x51,
          0x55,
          0x49,
          0x54,
          0x0b,
          0x21,
          0x11,
          0,
          0,
        ]),
        /no PROXY header$/,
      ],
      ["PROXY TCP4 1.2", /closed before its PROXY header was whole$/],
      ["", /no PROXY header within 0.5 s$/],
    ];
    for (const [bytes, why] of bad) {
      const client = await From.connect("127.0.0.1", port);
      if (bytes.length > 0) client.write(bytes);
      if (typeof bytes === "string" && bytes.startsWith("PROXY TCP4 1.2")) client.socket.end();
      assert.equal(await client.readLine(), null, `${why}: the connection is closed, never greeted`);
      assert.match(errors.at(-1) ?? "", why);
      assert.match(errors.at(-1)!, /^Dropped 127\.0\.0\.1:\d+: /);
      await client.close();
    }
    assert.equal(server.clients.size, 0, "none of them became a client");
    const good = await From.connect("127.0.0.1", port);
    good.write("PROXY TCP4 192.0.2.2 10.0.0.1 1234 2626\r\n");
    assert.equal(await good.readLine(), GREETING);
    await good.close();
  } finally {
    console.error = original;
    await server.close();
  }
});

Deno.test("startChatServer({ proxyFrom }): from any other address a PROXY header claims nothing", async () => {
  const server = await startChatServer({
    port: 0,
    host: "127.0.0.1",
    log: null,
    proxyFrom: ["127.0.0.1/32"],
  });
  const port = server.addr.port;
  const watcher = await From.connect("127.0.0.5", port);
  const liar = await From.connect("127.0.0.6", port);
  try {
    await watcher.readLine();
    await liar.readLine();
    assert.equal(await watcher.readLine(), `Client joined ${liar.name}\r\n`);
    liar.write("PROXY TCP4 10.9.9.9 10.0.0.1 1 2626\r\n"); // just a line of chat, from 127.0.0.6
    assert.equal(await watcher.readLine(), `[${liar.name}] PROXY TCP4 10.9.9.9 10.0.0.1 1 2626\r\n`);
  } finally {
    await liar.close();
    await watcher.close();
    await server.close();
  }
});

Deno.test("startChatServer({ proxyFrom, http }) takes a page's address from X-Forwarded-For or Forwarded, only from a proxy", async () => {
  const server = await startChatServer({
    port: 0,
    host: "127.0.0.1",
    log: null,
    proxyFrom: ["127.0.0.1/32", "10.0.0.0/8"],
    http: { port: 0 },
  });
  const watcher = await From.connect("127.0.0.5", server.addr.port);
  await watcher.readLine();
  const upgrade = async (local: string, header: string) => {
    const page = await From.connect(local, server.httpAddr!.port);
    page.write(
      `GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n` +
        `Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n${header}\r\n\r\n`,
    );
    assert.match((await page.readLine())!, /^HTTP\/1\.1 101 /);
    const joined = /^Client joined (\S+)\r\n$/.exec((await watcher.readLine())!)![1];
    await page.close();
    await watcher.readLine(); // it leaves
    return joined;
  };
  try {
    // The right-most address that is not a proxy itself: the one the last proxy saw.
    assert.match(
      await upgrade("127.0.0.1", "X-Forwarded-For: 6.6.6.6, 198.51.100.7, 10.1.2.3"),
      /^198\.51\.100\.7:\d+$/,
    );
    assert.match(
      await upgrade("127.0.0.1", 'Forwarded: for="[2001:db8::9]:4711";proto=http'),
      /^\[2001:db8::9\]:\d+$/,
    );
    assert.match(await upgrade("127.0.0.1", "X-Forwarded-For: not-an-address"), /^127\.0\.0\.1:\d+$/);
    assert.match(await upgrade("127.0.0.2", "X-Forwarded-For: 198.51.100.7"), /^127\.0\.0\.2:\d+$/); // not a proxy
  } finally {
    await watcher.close();
    await server.close();
  }
});

Deno.test({
  ...needs(
    "HAProxy with send-proxy and send-proxy-v2 in front: each client has its own address, and --max-per-ip counts it",
    [
      "haproxy",
    ],
  ),
  sanitizeOps: false, // node:net keeps a timer after a destroyed socket
  async fn() {
    const server = await startChatServer({
      port: 0,
      host: "127.0.0.1",
      log: null,
      proxyFrom: ["127.0.0.1/32"],
      maxPerIp: 2,
    });
    const [v1, v2] = [freePort(), freePort()];
    const dir = await Deno.makeTempDir();
    const backend = (name: string, mode: string) =>
      `backend ${name}\n  server chat 127.0.0.1:${server.addr.port} ${mode}\n`;
    Deno.writeTextFileSync(
      `${dir}/haproxy.cfg`,
      "defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n" +
        `frontend v1\n  bind 127.0.0.1:${v1}\n  default_backend chat_v1\n` +
        backend("chat_v1", "send-proxy") +
        `frontend v2\n  bind 127.0.0.1:${v2}\n  default_backend chat_v2\n` +
        backend("chat_v2", "send-proxy-v2"),
    );
    const haproxy = new Deno.Command("haproxy", {
      args: ["-db", "-f", `${dir}/haproxy.cfg`],
      stdout: "null",
      stderr: "null",
    })
      .spawn();
    const clients: From[] = [];
    const watcher = await From.connect("127.0.0.5", server.addr.port);
    try {
      await watcher.readLine();
      const through = async (local: string, port: number) => {
        for (let i = 0; i < 50; i++) { // until HAProxy listens
          const client = await From.connect(local, port).catch(() => null);
          if (client) return clients[clients.push(client) - 1];
          await new Promise((r) => setTimeout(r, 100));
        }
        throw new Error("HAProxy never listened");
      };
      for (
        const [local, port] of [["127.0.0.2", v1], ["127.0.0.3", v2], ["127.0.0.4", v1], [
          "127.0.0.2",
          v2,
        ]] as const
      ) {
        const client = await through(local, port);
        assert.equal(await client.readLine(), GREETING);
        assert.equal(
          await watcher.readLine(),
          `Client joined ${client.name}\r\n`,
          `through ${port === v1 ? "v1" : "v2"}`,
        );
      }
      const third = await through("127.0.0.2", v1); // a third from 127.0.0.2: over --max-per-ip 2
      assert.equal(await third.readLine(), "Sorry, too many connections from 127.0.0.2 (at most 2)\r\n");
      const other = await through("127.0.0.3", v1); // and 127.0.0.3 has a place still
      assert.equal(await other.readLine(), GREETING);
    } finally {
      await Promise.all([...clients, watcher].map((c) => c.close()));
      haproxy.kill("SIGTERM");
      await haproxy.status;
      await server.close();
      await Deno.remove(dir, { recursive: true });
    }
  },
});

Deno.test({
  ...needs(
    "with TLS, HAProxy's PROXY header comes before the handshake, and the client is seen with its own address",
    [
      "haproxy",
      "openssl",
      "socat",
    ],
  ),
  sanitizeOps: false,
  sanitizeResources: false,
  async fn() {
    const dir = await Deno.makeTempDir();
    await makeCertificates(dir);
    const tls = {
      cert: Deno.readTextFileSync(`${dir}/server.crt`),
      key: Deno.readTextFileSync(`${dir}/server.key`),
    };
    const server = await startChatServer({
      port: 0,
      host: "127.0.0.1",
      log: null,
      proxyFrom: ["127.0.0.1/32"],
      tls,
      handshakeTimeout: 1, // the probe below never handshakes
    });
    const front = freePort();
    Deno.writeTextFileSync(
      `${dir}/haproxy.cfg`,
      "defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n" +
        `frontend tls\n  bind 127.0.0.1:${front}\n  default_backend chat\n` +
        `backend chat\n  server chat 127.0.0.1:${server.addr.port} send-proxy-v2\n`,
    );
    const haproxy = new Deno.Command("haproxy", {
      args: ["-db", "-f", `${dir}/haproxy.cfg`],
      stdout: "null",
      stderr: "null",
    })
      .spawn();
    const tlsClient = (bind: string, port: number) =>
      new Deno.Command("socat", {
        args: ["-", `OPENSSL:127.0.0.1:${port},bind=${bind},cafile=${dir}/ca.crt,commonname=localhost`],
        stdin: "piped",
        stdout: "piped",
        stderr: "null",
      }).spawn();
    const watcher = tlsClient("127.0.0.5", server.addr.port); // direct, and not a proxy
    const lines = watcher.stdout.pipeThrough(new TextDecoderStream()).getReader();
    let text = "";
    const until = async (pattern: RegExp) => {
      while (!pattern.test(text)) {
        text += (await within(WAIT_MS, lines.read(), "the watcher's lines")).value ?? "";
      }
    };
    let client: Deno.ChildProcess | null = null;
    try {
      await until(/connected to the Deno chatserver/);
      for (let i = 0; i < 50; i++) { // until HAProxy listens
        const probe = await Deno.connect({ hostname: "127.0.0.1", port: front }).catch(() => null);
        if (probe) {
          probe.close();
          break;
        }
        await new Promise((r) => setTimeout(r, 100));
      }
      client = tlsClient("127.0.0.2", front);
      await until(/Client joined 127\.0\.0\.2:/);
      assert.match(text, /Client joined 127\.0\.0\.2:\d+\r\n/);
    } finally {
      client?.kill();
      await client?.status;
      watcher.kill();
      await watcher.status;
      haproxy.kill("SIGTERM");
      await haproxy.status;
      await server.close();
      await Deno.remove(dir, { recursive: true });
    }
  },
});
