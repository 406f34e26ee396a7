/**
 * bench.ts: the project's own benchmark, for users (`deno task bench`). No C tools needed.
 *
 *     deno task bench            # about a minute: echo, UDP, chat, and chat over Redis if installed
 *     deno task bench --quick    # shorter runs
 *
 * Each server runs as its own process, as you would run it; the load comes from this one, through
 * the scripts' own clients (`echo_tcp.ts bench`, `echo_udp.ts bench`, `multiplex.ts --load`).
 * It prints each run's progress, a table at the end, and writes every figure to
 * bench-results.json. For the comparison with Node.js and C on pinned cores, see
 * ../shared/bench/compare.py (the maintainers' kit).
 *
 * @module
 */

import { parseArgs } from "node:util";
import { runBench } from "./echo_tcp.ts";
import { runUdpBench } from "./echo_udp.ts";
import { runChatLoad } from "./multiplex.ts";

const RESULTS_FILE = "bench-results.json";

/** A server started as its own process, with the port it printed. */
interface Spawned {
  port: number;
  stop(): Promise<void>;
}

/** Runs `deno run -A script args`, and waits for the line that names the port it listens on. */
async function spawnServer(script: string, args: string[], portLine: RegExp): Promise<Spawned> {
  const child = new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", script, ...args],
    stdout: "piped",
    stderr: "inherit",
  }).spawn();
  const lines = child.stdout.pipeThrough(new TextDecoderStream()).getReader();
  let seen = "";
  for (;;) {
    const { value, done } = await lines.read();
    if (done) throw new Error(`${script} exited before it listened`);
    seen += value;
    const match = portLine.exec(seen);
    if (match) {
      // Keep reading, so that a chatty server never blocks on a full pipe.
      const draining = (async () => {
        while (!(await lines.read()).done);
      })();
      return {
        port: Number(match[1]),
        async stop() {
          child.kill("SIGTERM");
          await child.status;
          await draining;
        },
      };
    }
  }
}

/** A redis-server on a free port, or null if it is not installed. */
async function startRedis(): Promise<{ port: number; stop(): Promise<void> } | null> {
  const port = (() => {
    using l = Deno.listen({ hostname: "127.0.0.1", port: 0 });
    return l.addr.port;
  })();
  let child: Deno.ChildProcess;
  try {
    child = new Deno.Command("redis-server", {
      args: ["--port", String(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
      stdout: "null",
      stderr: "null",
    }).spawn();
  } catch (e) {
    if (e instanceof Deno.errors.NotFound) return null;
    throw e;
  }
  for (let i = 0; i < 100; i++) {
    try {
      (await Deno.connect({ hostname: "127.0.0.1", port })).close();
      break;
    } catch {
      await new Promise((r) => setTimeout(r, 50));
    }
  }
  return {
    port,
    async stop() {
      child.kill("SIGKILL");
      await child.status;
    },
  };
}

type Row = [workload: string, figure: string, unit: string];

async function main(): Promise<void> {
  const { values } = parseArgs({ args: Deno.args, options: { quick: { type: "boolean" } } });
  const seconds = values.quick ? 1 : 3;
  const results: Record<string, unknown> = {};
  const rows: Row[] = [];
  const progress = (label: string) => (s: number, n: number) => console.log(`  ${label} ${s} s: ${n}/s`);

  console.log("== TCP echo (echo_tcp.ts server)");
  const echo = await spawnServer(
    "echo_tcp.ts",
    ["server", "--host", "127.0.0.1", "--port", "0", "--quiet"],
    /listening on \S+:(\d+)/,
  );
  try {
    for (
      const [name, conns, size, mode] of [["pingpong, 1 conn", 1, 64, "pingpong"], [
        "pingpong, 100 conns",
        100,
        64,
        "pingpong",
      ], ["stream, 4 conns", 4, 65536, "stream"]] as const
    ) {
      const r = await runBench({
        host: "127.0.0.1",
        port: echo.port,
        timeout: 5,
        conns,
        size,
        mode,
        duration: seconds,
        onSecond: (s, rt, b) =>
          console.log(
            `  ${name} ${s} s: ${mode === "stream" ? "" : `${rt} round trips/s, `}${
              (b / 1e6).toFixed(1)
            } MB/s`,
          ),
      });
      results[`echo ${name}`] = r;
      rows.push(
        mode === "stream"
          ? [`echo ${name}`, `${r.megabytesPerSecond}`, "MB/s"]
          : [`echo ${name}`, `${r.roundTripsPerSecond}`, `round trips/s (p99 ${r.p99Us} µs)`],
      );
    }
  } finally {
    await echo.stop();
  }

  console.log("== UDP echo (echo_udp.ts server)");
  const udp = await spawnServer(
    "echo_udp.ts",
    ["server", "--host", "127.0.0.1", "--port", "0"],
    /listening on \S+:(\d+)/,
  );
  try {
    const r = await runUdpBench({
      host: "127.0.0.1",
      port: udp.port,
      size: 64,
      window: 1,
      duration: seconds,
      timeout: 1,
      onSecond: progress("UDP ping-pong"),
    });
    results["udp pingpong"] = r;
    rows.push([
      "udp ping-pong",
      `${r.roundTripsPerSecond}`,
      `round trips/s (p99 ${r.p99Us} µs, loss ${r.lossPercent}%)`,
    ]);
  } finally {
    await udp.stop();
  }

  const chatLoads = [
    ["100 clients, all sending flat out", { clients: 100, senders: 100, messages: 100, rate: 0 }],
    ["100 clients, 5,000 lines/s", { clients: 100, senders: 100, messages: 50, rate: 5000 }],
    ["1,000 clients, 10 senders, 150 lines/s", {
      clients: 1000,
      senders: 10,
      messages: 15 * seconds,
      rate: 150,
    }],
  ] as const;
  const runChat = async (label: string, ports: number[]) => {
    for (const [name, load] of chatLoads) {
      const r = await runChatLoad({
        ...load,
        size: 64,
        endpoints: ports.map((port) => ({ host: "127.0.0.1", port })),
        onSecond: progress(name),
      });
      results[`${label}: ${name}`] = r;
      rows.push([
        `${label}: ${name}`,
        `${r.deliveriesPerSecond}`,
        `deliveries/s (p50 ${r.p50Ms} ms, p99 ${r.p99Ms} ms, ${r.delivered}/${r.expected})`,
      ]);
    }
  };
  const chatArgs = ["0", "--host", "127.0.0.1", "--rate", "0", "--max-clients", "20000"];
  const chatLine = /ChatServer started on port (\d+)/;

  console.log("== chat (chat_server.ts, one instance)");
  const chat = await spawnServer("chat_server.ts", chatArgs, chatLine);
  try {
    await runChat("chat", [chat.port]);
  } finally {
    await chat.stop();
  }

  const redis = await startRedis();
  if (redis) {
    console.log("== chat over Redis (two chat_server.ts instances, clients split between them)");
    const url = `redis://127.0.0.1:${redis.port}`;
    const pair = await Promise.all(
      [0, 1].map(() => spawnServer("chat_server.ts", [...chatArgs, "--redis", url], chatLine)),
    );
    try {
      await new Promise((r) => setTimeout(r, 1500)); // until both have reached Redis
      await runChat("chat x2 over Redis", pair.map((s) => s.port));
    } finally {
      await Promise.all(pair.map((s) => s.stop()));
      await redis.stop();
    }
  } else {
    console.log("== chat over Redis: skipped (redis-server not installed)");
  }

  const width = Math.max(...rows.map((r) => r[0].length));
  console.log("\n" + rows.map(([w, f, u]) => `${w.padEnd(width)}  ${f.padStart(9)}  ${u}`).join("\n"));
  await Deno.writeTextFile(RESULTS_FILE, JSON.stringify(results, null, 2) + "\n");
  console.log(`\nAll figures: ${RESULTS_FILE}`);
}

if (import.meta.main) await main();
