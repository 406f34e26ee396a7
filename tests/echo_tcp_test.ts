import assert from "node:assert/strict";
import { echoOnce, runBench, startEchoServer, startHelloServer } from "../echo_tcp.ts";
import {
  Cli,
  decoder,
  encoder,
  freePort,
  needs,
  resetConnections,
  runScript,
  TestClient,
  within,
} from "./_helpers.ts";

/** Starts a silent echo server on a free loopback port for the length of `body`. */
async function withEchoServer(body: (port: number) => Promise<void>, host = "127.0.0.1"): Promise<void> {
  const server = startEchoServer({ port: 0, host, log: null });
  try {
    await body(server.addr.port);
  } finally {
    await server.close();
  }
}

/** Sends `data`, half-closes, and returns everything that comes back. */
async function roundTrip(port: number, data: Uint8Array, hostname = "127.0.0.1"): Promise<Uint8Array> {
  const conn = await Deno.connect({ hostname, port });
  const reading = new Response(conn.readable).bytes(); // closes the connection at EOF
  for (let at = 0; at < data.length;) at += await conn.write(data.subarray(at));
  await conn.closeWrite();
  return await within(20_000, reading, "the echo");
}

function randomBytes(n: number): Uint8Array {
  const out = new Uint8Array(n);
  for (let at = 0; at < n; at += 65536) crypto.getRandomValues(out.subarray(at, Math.min(n, at + 65536)));
  return out;
}

Deno.test("startEchoServer() answers the tutorial's client: Hello World!\\n comes back", async () => {
  await withEchoServer(async (port) => {
    // the tutorial's client: connect, send, recv, close
    using c = await TestClient.connect(port);
    await c.write("Hello World!\n");
    assert.equal(await c.readLine(), "Hello World!\n");
  });
});

Deno.test({
  ...needs("startEchoServer() serves the next client at once after 50 resets before accept", ["python3"]),
  async fn() {
    await withEchoServer(async (port) => {
      await resetConnections(port, 50);
      const started = Date.now();
      using c = await TestClient.connect(port);
      await c.write("still here?\n");
      assert.equal(await c.readLine(), "still here?\n");
      const waited = Date.now() - started;
      assert.ok(waited < 1000, `the next client waited ${waited} ms for its echo`); // 5 s before
    });
  },
});

Deno.test("startEchoServer() returns 1 MiB of random bytes whole after a half-close", async () => {
  await withEchoServer(async (port) => {
    const data = randomBytes(1 << 20);
    assert.deepEqual(await roundTrip(port, data), data);
  });
});

Deno.test("startEchoServer() serves 50 clients at once, 200 KiB each, every byte checked", async () => {
  await withEchoServer(async (port) => {
    const sends = Array.from({ length: 50 }, () => randomBytes(200 * 1024));
    const echoes = await Promise.all(sends.map((data) => roundTrip(port, data)));
    echoes.forEach((echo, i) => assert.deepEqual(echo, sends[i], `client ${i}`));
  });
});

Deno.test("startEchoServer() works over IPv6", async () => {
  await withEchoServer(async (port) => {
    assert.equal(decoder.decode(await roundTrip(port, encoder.encode("six\n"), "::1")), "six\n");
  }, "::1");
});

Deno.test("startHelloServer() greets each client with Hello World! and closes", async () => {
  const server = startHelloServer({ port: 0, host: "127.0.0.1", log: null });
  try {
    for (let i = 0; i < 3; i++) {
      using c = await TestClient.connect(server.addr.port);
      assert.equal(await c.readToEnd(), "Hello World!\n");
    }
  } finally {
    await server.close();
  }
});

Deno.test("echoOnce() sends a message and returns its echo", async () => {
  await withEchoServer(async (port) => {
    const echo = await echoOnce({ host: "127.0.0.1", port, timeout: 5 }, "ping\n");
    assert.equal(decoder.decode(echo), "ping\n");
  });
});

Deno.test("runBench() reports sane figures against our server, in both modes", async () => {
  await withEchoServer(async (port) => {
    const base = { host: "127.0.0.1", port, timeout: 5, duration: 0.5 };
    const pp = await runBench({ ...base, conns: 4, size: 64, mode: "pingpong" });
    assert.equal(pp.badBytes, 0);
    assert.ok(pp.roundTrips > 100, `only ${pp.roundTrips} round trips`);
    assert.ok(pp.p50Us > 0 && pp.p50Us <= pp.p99Us && pp.p99Us <= pp.p999Us, JSON.stringify(pp));
    assert.ok(
      Math.abs(pp.megabytesPerSecond - pp.roundTripsPerSecond * 64 / 1e6) <
        0.05 * pp.megabytesPerSecond + 0.01,
    );
    const st = await runBench({ ...base, conns: 2, size: 65536, mode: "stream" });
    assert.equal(st.badBytes, 0);
    assert.ok(st.megabytesPerSecond > 10, `only ${st.megabytesPerSecond} MB/s`);
  });
});

// --- The command line --------------------------------------------------------------------------

Deno.test("echo_tcp.ts server logs its address, connects and disconnects, and stops on SIGINT", async () => {
  const cli = new Cli("echo_tcp.ts", ["server", "--host", "127.0.0.1", "--port", "0"]);
  const port = Number(/^Echo server listening on 127\.0\.0\.1:(\d+)$/.exec((await cli.readLine())!)![1]);
  const c = await TestClient.connect(port);
  const name = c.name;
  assert.equal(await cli.readLine(), `connect ${name}`);
  await c.write("x\n");
  assert.equal(await c.readLine(), "x\n");
  c.close();
  assert.equal(await cli.readLine(), `disconnect ${name}`);
  cli.kill("SIGINT");
  const { code, stdout } = await cli.finish();
  assert.equal(code, 0);
  assert.deepEqual(stdout, ["shutdown complete"]);
});

Deno.test("echo_tcp.ts client prints the echo of its message and exits 0", async () => {
  await withEchoServer(async (port) => {
    const r = await runScript("echo_tcp.ts", [
      "client",
      "--host",
      "127.0.0.1",
      "--port",
      String(port),
      "Hello",
      "World!",
    ]);
    assert.equal(r.stdout, "Hello World!\n");
    assert.equal(r.code, 0);
  });
});

Deno.test("echo_tcp.ts client with no message echoes stdin and half-closes at its end", async () => {
  await withEchoServer(async (port) => {
    const r = await runScript(
      "echo_tcp.ts",
      ["client", "--port", String(port), "--host", "127.0.0.1"],
      "one\ntwo\n",
    );
    assert.equal(r.stdout, "one\ntwo\n");
    assert.equal(r.code, 0);
  });
});

Deno.test("echo_tcp.ts client to a closed port says so in one line and exits 1", async () => {
  const port = freePort();
  const r = await runScript("echo_tcp.ts", ["client", "--host", "127.0.0.1", "--port", String(port), "hi"]);
  assert.equal(r.code, 1);
  assert.equal(r.stderr, `echo_tcp: connection to 127.0.0.1:${port} refused: is the server running?\n`);
});

Deno.test("echo_tcp.ts client times out on a server that never echoes", async () => {
  using silent = Deno.listen({ hostname: "127.0.0.1", port: 0 }); // accepts (backlog) but never reads
  const r = await runScript("echo_tcp.ts", [
    "client",
    "--port",
    String(silent.addr.port),
    "--host",
    "127.0.0.1",
    "--timeout",
    "0.3",
    "hi",
  ]);
  assert.equal(r.code, 1);
  assert.equal(r.stderr, `echo_tcp: no echo from 127.0.0.1:${silent.addr.port} within 0.3 s\n`);
});

Deno.test("echo_tcp.ts bench --json prints figures that add up", async () => {
  await withEchoServer(async (port) => {
    const r = await runScript("echo_tcp.ts", [
      "bench",
      "--host",
      "127.0.0.1",
      "--port",
      String(port),
      "--conns",
      "2",
      "--duration",
      "0.5",
      "--json",
    ]);
    assert.equal(r.code, 0, r.stderr);
    const result = JSON.parse(r.stdout);
    assert.equal(result.badBytes, 0);
    assert.equal(result.conns, 2);
    assert.ok(result.roundTripsPerSecond > 200, r.stdout);
    const rate = result.roundTrips / result.seconds;
    assert.ok(Math.abs(rate - result.roundTripsPerSecond) <= 0.01 * rate, r.stdout);
  });
});

Deno.test("echo_tcp.ts rejects bad arguments with a usage line and exit code 2", async () => {
  for (
    const [args, problem] of [
      [[], "say what to run"],
      [["serve"], 'unknown command "serve"'],
      [["server", "--port", "x"], '--port wants a number, not "x"'],
      [["bench", "--mode", "fast"], '--mode is pingpong or stream, not "fast"'],
      [["server", "--conns", "3"], "--conns does not apply to server"],
      [["client", "--nope"], "unknown option --nope; try --help"],
    ] as const
  ) {
    const r = await runScript("echo_tcp.ts", [...args]);
    assert.equal(r.code, 2, args.join(" "));
    const [first, usage] = r.stderr.split("\n");
    assert.equal(first.startsWith("echo_tcp: ") && first.includes(problem), true, first);
    assert.match(usage, /^usage: echo_tcp\.ts server/);
  }
  const help = await runScript("echo_tcp.ts", ["--help"]);
  assert.equal(help.code, 0);
  assert.match(help.stdout, /^usage: echo_tcp\.ts server/);
});

// --- Real peers ------------------------------------------------------------------------------------

Deno.test({
  ...needs("echo_tcp.ts server returns a whole file to socat, which half-closes", ["socat"]),
  async fn() {
    await withEchoServer(async (port) => {
      const data = randomBytes(300_000);
      const socat = new Deno.Command("socat", {
        args: ["-", `TCP:127.0.0.1:${port}`],
        stdin: "piped",
        stdout: "piped",
        stderr: "null",
      }).spawn();
      const output = socat.output();
      const w = socat.stdin.getWriter();
      await w.write(data);
      await w.close();
      const out = await within(20_000, output, "socat");
      assert.equal(out.code, 0);
      assert.deepEqual(out.stdout, data);
    });
  },
});

Deno.test({
  ...needs("echo_tcp.ts client and bench work against ncat's echo server", ["ncat"]),
  async fn() {
    const port = freePort();
    const ncat = new Deno.Command("ncat", {
      args: ["-l", "127.0.0.1", String(port), "-k", "--exec", "/bin/cat"],
      stdout: "null",
      stderr: "null",
    }).spawn();
    try {
      let r;
      for (let i = 0; i < 50; i++) { // until ncat listens
        r = await runScript("echo_tcp.ts", [
          "client",
          "--host",
          "127.0.0.1",
          "--port",
          String(port),
          "via",
          "ncat",
        ]);
        if (r.code === 0) break;
        await new Promise((res) => setTimeout(res, 100));
      }
      assert.equal(r!.stdout, "via ncat\n");
      const bench = await runBench({
        host: "127.0.0.1",
        port,
        timeout: 5,
        conns: 2,
        size: 64,
        duration: 0.3,
        mode: "pingpong",
      });
      assert.equal(bench.badBytes, 0);
      assert.ok(bench.roundTrips > 10, JSON.stringify(bench));
    } finally {
      ncat.kill();
      await ncat.status;
    }
  },
});

Deno.test({
  ...needs("echo_tcp.ts server answers ncat as a client", ["ncat"]),
  async fn() {
    await withEchoServer(async (port) => {
      const out = await within(
        20_000,
        new Deno.Command("sh", {
          args: ["-c", `printf 'line one\\nline two\\n' | ncat 127.0.0.1 ${port}`],
          stdout: "piped",
          stderr: "null",
        }).output(),
        "ncat",
      );
      assert.equal(decoder.decode(out.stdout), "line one\nline two\n");
    });
  },
});

Deno.test("echo_tcp.ts says in one line when a host does not resolve or an address cannot be bound", async () => {
  const client = await runScript("echo_tcp.ts", ["client", "--host", "no-such-host.invalid", "hi"]);
  assert.equal(client.code, 1);
  assert.equal(client.stderr, "echo_tcp: cannot resolve no-such-host.invalid\n");
  const server = await runScript("echo_tcp.ts", ["server", "--host", "203.0.113.1", "--port", "0"]); // TEST-NET-3: never ours
  assert.equal(server.code, 1);
  assert.match(server.stderr, /^echo_tcp: cannot listen there: .+\n$/);
});
