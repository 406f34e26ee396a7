// chat_server.ts --admin: health, readiness and Prometheus metrics for operators, checked with
// Prometheus's own tools (promtool, and a real Prometheus scraping the port).
import assert from "node:assert/strict";
import { startChatServer } from "../chat_server.ts";
import { Cli, eventually, freePort, joinChat, needs, TestClient, WAIT_MS, within } from "./_helpers.ts";

/** GET `path` on the admin port: its status and body. */
async function get(port: number, path: string): Promise<{ status: number; body: string }> {
  const response = await fetch(`http://127.0.0.1:${port}${path}`);
  return { status: response.status, body: await response.text() };
}

/** The value of one sample in a Prometheus text exposition, or undefined. */
function sample(text: string, name: string): number | undefined {
  const line = text.split("\n").find((l) => l.startsWith(name + " "));
  return line === undefined ? undefined : Number(line.slice(name.length + 1));
}

Deno.test("startChatServer({ admin }) answers /healthz and /readyz, and /metrics counts what happens", async () => {
  const server = await startChatServer({
    port: 0,
    host: "127.0.0.1",
    log: null,
    admin: { port: 0 },
    http: { port: 0 },
  });
  const admin = server.adminAddr!.port;
  try {
    assert.deepEqual(await get(admin, "/healthz"), { status: 200, body: "ok\n" });
    assert.deepEqual(await get(admin, "/readyz"), { status: 200, body: "ready\n" });
    using a = await joinChat(server.addr.port);
    using b = await joinChat(server.addr.port);
    await a.readLine();
    await b.write("one\r\ntwo\r\n");
    await a.readLine();
    await a.readLine();
    const web = new WebSocket(`ws://127.0.0.1:${server.httpAddr!.port}/ws`);
    await new Promise((r) => web.onopen = r);
    await a.readLine(); // its join
    const { status, body } = await get(admin, "/metrics");
    assert.equal(status, 200);
    assert.equal(sample(body, 'chat_clients{door="telnet"}'), 2);
    assert.equal(sample(body, 'chat_clients{door="web"}'), 1);
    assert.equal(sample(body, "chat_rooms"), 1);
    assert.equal(sample(body, "chat_lines_total"), 2);
    assert.ok(sample(body, "chat_deliveries_total")! >= 4, body); // greetings, a join, the lines
    assert.equal(sample(body, 'chat_dropped_total{reason="sendq"}'), 0);
    assert.ok(sample(body, "process_resident_memory_bytes")! > 1e6);
    const open = await fetch(`http://127.0.0.1:${server.httpAddr!.port}/metrics`);
    await open.body?.cancel();
    assert.equal(open.status, 404); // never on the public port
    const closed = new Promise((r) => web.onclose = r);
    web.close();
    await closed;
  } finally {
    await server.close();
  }
});

Deno.test("startChatServer({ admin }) says 503 on /readyz from the moment shutdown begins", async () => {
  const server = await startChatServer({
    port: 0,
    host: "127.0.0.1",
    log: null,
    admin: { port: 0 },
    rate: 0,
    sendq: 64 << 20,
  });
  const admin = server.adminAddr!.port;
  using _sleeper = await TestClient.connect(server.addr.port); // reads nothing: its goodbye cannot go out
  using sender = await joinChat(server.addr.port);
  const line = `${"z".repeat(1000)}\n`.repeat(64);
  while (server.flusher.congested.size === 0) await sender.write(line); // until its buffers are full
  const closing = server.close(); // which waits a second for that goodbye
  assert.deepEqual(await get(admin, "/readyz"), { status: 503, body: "shutting down\n" });
  assert.equal((await get(admin, "/healthz")).status, 200); // still serving its last clients
  await closing;
});

// npm:redis keeps timers of its own between calls: the server is closed in the test.
Deno.test({
  name: "startChatServer({ admin, redis }) is not ready while Redis does not answer",
  sanitizeOps: false,
  sanitizeResources: false,
}, async () => {
  const server = await startChatServer({
    port: 0,
    host: "127.0.0.1",
    log: null,
    admin: { port: 0 },
    redis: { url: `redis://127.0.0.1:${freePort()}` },
  });
  try {
    assert.deepEqual(await get(server.adminAddr!.port, "/readyz"), {
      status: 503,
      body: "Redis does not answer\n",
    });
    assert.equal(sample((await get(server.adminAddr!.port, "/metrics")).body, "chat_redis_up"), 0);
  } finally {
    await server.close();
  }
});

Deno.test({
  ...needs("chat_server.ts --admin's /metrics passes promtool check metrics, with no warning", ["promtool"]),
  async fn() {
    const server = await startChatServer({ port: 0, host: "127.0.0.1", log: null, admin: { port: 0 } });
    try {
      using a = await joinChat(server.addr.port);
      await a.write("hello\r\n");
      const { body } = await get(server.adminAddr!.port, "/metrics");
      const check = new Deno.Command("promtool", {
        args: ["check", "metrics"],
        stdin: "piped",
        stdout: "piped",
        stderr: "piped",
      })
        .spawn();
      const writer = check.stdin.getWriter();
      await writer.write(new TextEncoder().encode(body));
      await writer.close();
      const out = await check.output();
      const said = new TextDecoder().decode(out.stdout) + new TextDecoder().decode(out.stderr);
      assert.equal(out.code, 0, said);
      assert.equal(said.trim(), "", said);
    } finally {
      await server.close();
    }
  },
});

Deno.test({
  ...needs("a real Prometheus scrapes chat_server.ts --admin and counts its clients", ["prometheus"]),
  async fn() {
    const web = freePort(); // Prometheus's own: it says no port it bound
    const cli = new Cli("chat_server.ts", ["0", "--host", "127.0.0.1", "--admin", "0"]);
    const port = await cli.started();
    const admin = Number(await cli.lineWith(/^Admin at http:\/\/[^/]+:(\d+)\/ /));
    const dir = await Deno.makeTempDir();
    Deno.writeTextFileSync(
      `${dir}/prometheus.yml`,
      `global: { scrape_interval: 1s }\nscrape_configs:\n  - job_name: chat\n    static_configs: [{ targets: ["127.0.0.1:${admin}"] }]\n`,
    );
    const prometheus = new Deno.Command("prometheus", {
      args: [
        `--config.file=${dir}/prometheus.yml`,
        `--storage.tsdb.path=${dir}/data`,
        `--web.listen-address=127.0.0.1:${web}`,
      ],
      stdout: "null",
      stderr: "null",
    }).spawn();
    const clients = await Promise.all([0, 1, 2].map(() => joinChat(port)));
    try {
      let seen = NaN;
      await within(
        30_000,
        eventually("Prometheus to see 3 clients", async () => {
          const query = encodeURIComponent("sum(chat_clients)");
          const answer = await fetch(`http://127.0.0.1:${web}/api/v1/query?query=${query}`).then((r) =>
            r.json()
          )
            .catch(() => null);
          seen = Number(answer?.data?.result?.[0]?.value?.[1]);
          return seen === 3;
        }).catch(() => {}),
        "Prometheus",
      );
      assert.equal(seen, 3);
    } finally {
      for (const c of clients) c.close();
      prometheus.kill("SIGTERM");
      await prometheus.status;
      cli.kill();
      await cli.finish(WAIT_MS);
      await Deno.remove(dir, { recursive: true });
    }
  },
});

Deno.test("chat_server.ts --admin-host without --admin is one line and exit code 2", async () => {
  const { code, stderr } = await new Cli("chat_server.ts", ["0", "--admin-host", "127.0.0.1"]).finish();
  assert.equal(code, 2);
  assert.match(stderr, /^chat_server: --admin-host goes with --admin PORT\n/);
});
