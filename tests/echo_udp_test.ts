import assert from "node:assert/strict";
import { MAX_DATAGRAM, runUdpBench, startUdpEchoServer, udpEcho } from "../echo_udp.ts";
import { Cli, decoder, encoder, hasProgram, needs, runScript, within } from "./_helpers.ts";

/** Starts a UDP echo server on a free loopback port for the length of `body`. */
async function withUdpServer(body: (port: number) => Promise<void>, host = "127.0.0.1"): Promise<void> {
  const server = startUdpEchoServer({ port: 0, host });
  try {
    await body(server.addr.port);
  } finally {
    await server.close();
  }
}

/** A UDP port nobody listens on: bound, noted and released. */
function freeUdpPort(): number {
  const s = Deno.listenDatagram({ transport: "udp", hostname: "127.0.0.1", port: 0 });
  const port = (s.addr as Deno.NetAddr).port;
  s.close();
  return port;
}

Deno.test("startUdpEchoServer() answers the tutorial's datagram client", async () => {
  await withUdpServer(async (port) => {
    // the tutorial's client: sendto, recv, close
    const sock = Deno.listenDatagram({ transport: "udp", hostname: "127.0.0.1", port: 0 });
    try {
      await sock.send(encoder.encode("Hello World \n"), { transport: "udp", hostname: "127.0.0.1", port });
      const [data] = await within(5000, sock.receive(), "the echo");
      assert.equal(decoder.decode(data), "Hello World \n");
    } finally {
      sock.close();
    }
  });
});

Deno.test("startUdpEchoServer() echoes datagrams of 1 and 65,507 bytes intact", async () => {
  await withUdpServer(async (port) => {
    for (const size of [1, MAX_DATAGRAM]) {
      const payload = crypto.getRandomValues(new Uint8Array(Math.min(size, 65536))).slice(0, size);
      const r = await udpEcho({ host: "127.0.0.1", port, timeout: 2, retries: 2 }, payload);
      assert.equal(r.echo.length, size);
      assert.deepEqual(r.echo, payload);
    }
  });
});

Deno.test("startUdpEchoServer() works over IPv6 and keeps serving after a peer vanishes", async () => {
  await withUdpServer(async (port) => {
    // a peer that sends and is gone before the echo: the echo gets an ICMP error
    const ghost = Deno.listenDatagram({ transport: "udp", hostname: "::1", port: 0 });
    await ghost.send(encoder.encode("boo"), { transport: "udp", hostname: "::1", port });
    ghost.close();
    const r = await udpEcho({ host: "::1", port, timeout: 2, retries: 2 }, "six\n");
    assert.equal(decoder.decode(r.echo), "six\n");
    assert.equal(r.from.hostname, "::1");
  }, "::1");
});

Deno.test("udpEcho() ignores a reply from the wrong address and a stale reply", async () => {
  // A fake server that first answers from another socket, then with other bytes, then properly.
  const server = Deno.listenDatagram({ transport: "udp", hostname: "127.0.0.1", port: 0 });
  const impostor = Deno.listenDatagram({ transport: "udp", hostname: "127.0.0.1", port: 0 });
  const serving = (async () => {
    const [data, from] = await server.receive();
    await impostor.send(data, from);
    await server.send(encoder.encode("stale reply"), from);
    await server.send(data, from);
  })();
  try {
    const r = await udpEcho({
      host: "127.0.0.1",
      port: (server.addr as Deno.NetAddr).port,
      timeout: 2,
      retries: 0,
    }, "real\n");
    assert.equal(decoder.decode(r.echo), "real\n");
    assert.equal(r.attempt, 1);
  } finally {
    await serving;
    server.close();
    impostor.close();
  }
});

Deno.test("runUdpBench() reports round trips, no loss and ordered percentiles", async () => {
  await withUdpServer(async (port) => {
    const r = await runUdpBench({ host: "127.0.0.1", port, size: 64, window: 4, duration: 0.5, timeout: 1 });
    assert.ok(r.roundTrips > 100, JSON.stringify(r));
    assert.equal(r.lossPercent, 0);
    assert.ok(r.p50Us > 0 && r.p50Us <= r.p99Us, JSON.stringify(r));
  });
});

Deno.test("runUdpBench() counts every datagram lost when nobody answers", async () => {
  const r = await runUdpBench({
    host: "127.0.0.1",
    port: freeUdpPort(),
    size: 64,
    window: 2,
    duration: 0.3,
    timeout: 0.1,
  });
  assert.equal(r.roundTrips, 0);
  assert.equal(r.lossPercent, 100);
});

// --- The command line --------------------------------------------------------------------------

Deno.test("echo_udp.ts client prints the echo and its round trip", async () => {
  await withUdpServer(async (port) => {
    const r = await runScript("echo_udp.ts", [
      "client",
      "--host",
      "127.0.0.1",
      "--port",
      String(port),
      "Hello",
      "World",
    ]);
    assert.equal(r.code, 0, r.stderr);
    const [echo, rtt] = r.stdout.split("\n");
    assert.equal(echo, "Hello World");
    assert.match(rtt, new RegExp(`^\\(12 bytes from 127\\.0\\.0\\.1:${port} in \\d+\\.\\d{3} ms\\)$`));
  });
});

Deno.test("echo_udp.ts client with no server gives up after timeout × tries and exits 1", async () => {
  const port = freeUdpPort();
  const started = performance.now();
  const r = await runScript("echo_udp.ts", [
    "client",
    "--host",
    "127.0.0.1",
    "--port",
    String(port),
    "--timeout",
    "0.2",
    "--retries",
    "2",
    "anyone?",
  ]);
  const elapsed = performance.now() - started;
  assert.equal(r.code, 1);
  assert.equal(r.stdout, "");
  assert.equal(r.stderr, `echo_udp: no echo from 127.0.0.1:${port} after 3 tries of 0.2 s\n`);
  assert.ok(elapsed >= 600, `gave up after ${elapsed} ms`);
});

Deno.test("echo_udp.ts server prints its address and stops on SIGINT", async () => {
  const port = freeUdpPort();
  const cli = new Cli("echo_udp.ts", ["server", "--host", "127.0.0.1", "--port", String(port)]);
  assert.equal(await cli.readLine(), `UDP echo server listening on 127.0.0.1:${port}`);
  const r = await udpEcho({ host: "127.0.0.1", port, timeout: 2, retries: 2 }, "x");
  assert.equal(decoder.decode(r.echo), "x");
  cli.kill("SIGINT");
  const { code, stdout } = await cli.finish();
  assert.equal(code, 0);
  assert.deepEqual(stdout, ["shutdown complete (1 datagram echoed)"]);
});

Deno.test("echo_udp.ts bench --json against our server", async () => {
  await withUdpServer(async (port) => {
    const r = await runScript("echo_udp.ts", [
      "bench",
      "--host",
      "127.0.0.1",
      "--port",
      String(port),
      "--duration",
      "0.3",
      "--json",
    ]);
    assert.equal(r.code, 0, r.stderr);
    const result = JSON.parse(r.stdout);
    assert.ok(result.roundTrips > 50, r.stdout);
    assert.equal(result.lossPercent, 0);
  });
});

Deno.test("echo_udp.ts rejects bad arguments with a usage line and exit code 2", async () => {
  for (
    const [args, problem] of [
      [[], "say what to run"],
      [["client", "--retries=-1"], "--retries must be from 0 to 1000"],
      [["bench", "--size", "70000"], "--size must be from 8 to 65507"],
      [["server", "--window", "2"], "--window does not apply to server"],
    ] as const
  ) {
    const r = await runScript("echo_udp.ts", [...args]);
    assert.equal(r.code, 2, args.join(" "));
    const [first, usage] = r.stderr.split("\n");
    assert.ok(first.startsWith("echo_udp: ") && first.includes(problem), first);
    assert.match(usage, /^usage: echo_udp\.ts server/);
  }
});

// --- Real peers ------------------------------------------------------------------------------------

Deno.test({
  ...needs("echo_udp.ts server answers socat, and its client works against socat's echo", ["socat"]),
  async fn() {
    await withUdpServer(async (port) => {
      const out = await within(
        10_000,
        new Deno.Command("sh", {
          args: ["-c", `printf 'hello from socat\\n' | socat -T 0.5 - UDP:127.0.0.1:${port}`],
          stdout: "piped",
          stderr: "null",
        }).output(),
        "socat",
      );
      assert.equal(decoder.decode(out.stdout), "hello from socat\n");
    });
    const port = freeUdpPort();
    const socat = new Deno.Command("socat", {
      args: [`UDP-RECVFROM:${port},bind=127.0.0.1,fork`, "PIPE"],
      stdout: "null",
      stderr: "null",
    }).spawn();
    try {
      const r = await udpEcho({ host: "127.0.0.1", port, timeout: 0.5, retries: 10 }, "via socat\n");
      assert.equal(decoder.decode(r.echo), "via socat\n");
    } finally {
      socat.kill();
      await socat.status;
    }
  },
});

/** Sends `count` datagrams of `size` bytes from one socket, and counts the echoes that come within `ms`. */
async function echoesWithin(port: number, count: number, size: number, ms: number): Promise<number> {
  const sock = Deno.listenDatagram({ transport: "udp", hostname: "127.0.0.1", port: 0 });
  try {
    for (let i = 0; i < count; i++) {
      await sock.send(new Uint8Array(size), { transport: "udp", hostname: "127.0.0.1", port });
    }
    let got = 0;
    const deadline = Date.now() + ms;
    let receiving = sock.receive();
    // One timer for the whole wait, cleared at the end: a timer per echo, left running, failed the
    // test's sanitizer on a loaded machine ("2 timers were started in this test, but never completed").
    let timer: ReturnType<typeof setTimeout> | undefined;
    const late = new Promise<null>((res) =>
      timer = setTimeout(() => res(null), Math.max(0, deadline - Date.now()))
    );
    try {
      for (;;) {
        const r = await Promise.race([receiving, late]);
        if (r === null) break;
        got++;
        receiving = sock.receive();
      }
    } finally {
      clearTimeout(timer);
    }
    sock.close();
    await receiving.catch(() => {});
    return got;
  } catch (e) {
    sock.close();
    throw e;
  }
}

Deno.test("startUdpEchoServer() echoes at most --rate bytes a second to one address, and --total-rate in all", async () => {
  const server = startUdpEchoServer({ port: 0, host: "127.0.0.1", rate: 2000 }); // bursts of 4,000
  try {
    const got = await echoesWithin(server.addr.port, 50, 972, 1000); // 1,000 bytes each, with headers
    assert.ok(got >= 4 && got <= 9, `${got} of 50 echoed`);
    assert.ok(server.refused >= 41, `${server.refused} refused`);
  } finally {
    await server.close();
  }
  const shared = startUdpEchoServer({ port: 0, host: "127.0.0.1", rate: 0, totalRate: 2000 });
  try {
    const [a, b] = await Promise.all([0, 1].map(() => echoesWithin(shared.addr.port, 25, 972, 1000)));
    assert.ok(a + b >= 4 && a + b <= 9, `${a} + ${b} of 50 echoed`);
  } finally {
    await shared.close();
  }
});

const root = Deno.uid() === 0;
Deno.test({
  ...needs(
    root
      ? "echo_udp.ts never answers a datagram forged from its own port or a privileged one (a spoofed source, in a network namespace)"
      : "echo_udp.ts and forged sources (ignored: needs root for a network namespace)",
    ["unshare", "ip", "python3"],
  ),
  ignore: !root || !hasProgram("unshare") || !hasProgram("ip") || !hasProgram("python3"),
  async fn() {
    // Inside a namespace of its own, on its loopback only: the server, then one datagram forged from
    // its own address and port (which used to bounce for ever, ~63,000 times a second), and one from
    // port 7 (echo: two echo servers would bounce it between them).
    const spoof = `
import socket, struct
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_UDP)
for sport in (23000, 7, 19):
    s.sendto(struct.pack("!HHHH", sport, 23000, 12, 0) + b"loop", ("127.0.0.1", 0))
`;
    const script = `ip link set lo up
"${Deno.execPath()}" run -A echo_udp.ts server --host 127.0.0.1 --port 23000 > "$OUT" & pid=$!
until grep -q listening "$OUT"; do sleep 0.05; done
python3 -c '${spoof}'
sleep 1
kill -TERM $pid; wait $pid`;
    const out = await Deno.makeTempFile();
    try {
      const r = await new Deno.Command("unshare", {
        args: ["-n", "sh", "-c", script],
        cwd: new URL("..", import.meta.url).pathname,
        env: { OUT: out, NO_COLOR: "1" },
      }).output();
      assert.equal(r.code, 0, decoder.decode(r.stderr));
      const lines = Deno.readTextFileSync(out).trim().split("\n");
      assert.equal(lines.at(-1), "shutdown complete (0 datagrams echoed, 3 refused)");
    } finally {
      await Deno.remove(out);
    }
  },
});
