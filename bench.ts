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

/**
 * Runs `deno run -A script args`, and waits for the line that names the port it listens on (and,
 * if given, for a line matching `readyLine` too).
 */
async function spawnServer(
  script: string,
  args: string[],
  portLine: RegExp,
  readyLine?: RegExp,
): Promise<Spawned> {
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
    if (match && (!readyLine || readyLine.test(seen))) {
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

/** What the runs found: every figure for the JSON file, and one row each for the table. */
class Report {
  readonly results: Record<string, unknown> = {};
  readonly rows: Row[] = [];

  add(name: string, result: unknown, figure: string | number, unit: string): void {
    this.results[name] = result;
    this.rows.push([name, `${figure}`, unit]);
  }

  /** The table, one workload a line. */
  table(): string {
    const width = Math.max(...this.rows.map((r) => r[0].length));
    return this.rows.map(([w, f, u]) => `${w.padEnd(width)}  ${f.padStart(9)}  ${u}`).join("\n");
  }
}

/** A progress callback that prints one figure a second. */
const progress = (label: string) => (s: number, n: number) => console.log(`  ${label} ${s} s: ${n}/s`);

/** TCP echo: ping-pong on one and on 100 connections, and streaming on four. */
async function benchEcho(seconds: number, report: Report): Promise<void> {
  console.log("== TCP echo (echo_tcp.ts server)");
  const echo = await spawnServer(
    "echo_tcp.ts",
    ["server", "--host", "127.0.0.1", "--port", "0", "--quiet"],
    /listening on \S+:(\d+)/,
  );
  const loads = [
    ["pingpong, 1 conn", 1, 64, "pingpong"],
    ["pingpong, 100 conns", 100, 64, "pingpong"],
    ["stream, 4 conns", 4, 65536, "stream"],
  ] as const;
  try {
    for (const [name, conns, size, mode] of loads) {
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
      if (mode === "stream") report.add(`echo ${name}`, r, r.megabytesPerSecond, "MB/s");
      else report.add(`echo ${name}`, r, r.roundTripsPerSecond, `round trips/s (p99 ${r.p99Us} µs)`);
    }
  } finally {
    await echo.stop();
  }
}

/** UDP echo: ping-pong, one datagram in flight. */
async function benchUdp(seconds: number, report: Report): Promise<void> {
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
    const unit = `round trips/s (p99 ${r.p99Us} µs, loss ${r.lossPercent}%)`;
    report.add("udp ping-pong", r, r.roundTripsPerSecond, unit);
  } finally {
    await udp.stop();
  }
}

const CHAT_ARGS = ["0", "--host", "127.0.0.1", "--rate", "0", "--max-clients", "20000"];
const CHAT_STARTED = /ChatServer started on port (\d+)/;

/** The chat loads, against one instance and, with redis-server installed, two sharing rooms. */
async function benchChat(seconds: number, report: Report): Promise<void> {
  console.log("== chat (chat_server.ts, one instance)");
  const chat = await spawnServer("chat_server.ts", CHAT_ARGS, CHAT_STARTED);
  try {
    await runChatLoads(seconds, report, "chat", [chat.port]);
  } finally {
    await chat.stop();
  }
  const redis = await startRedis();
  if (!redis) return console.log("== chat over Redis: skipped (redis-server not installed)");
  console.log("== chat over Redis (two chat_server.ts instances, clients split between them)");
  const url = `redis://127.0.0.1:${redis.port}`;
  const reached = /Sharing rooms through Redis/; // printed once the instance has reached Redis
  const pair = await Promise.all(
    [0, 1].map(() => spawnServer("chat_server.ts", [...CHAT_ARGS, "--redis", url], CHAT_STARTED, reached)),
  );
  try {
    await runChatLoads(seconds, report, "chat x2 over Redis", pair.map((s) => s.port));
  } finally {
    await Promise.all(pair.map((s) => s.stop()));
    await redis.stop();
  }
}

async function runChatLoads(seconds: number, report: Report, label: string, ports: number[]): Promise<void> {
  const loads = [
    ["100 clients, all sending flat out", { clients: 100, senders: 100, messages: 100, rate: 0 }],
    ["100 clients, 5,000 lines/s", { clients: 100, senders: 100, messages: 50, rate: 5000 }],
    ["1,000 clients, 10 senders, 150 lines/s", {
      clients: 1000,
      senders: 10,
      messages: 15 * seconds,
      rate: 150,
    }],
  ] as const;
  for (const [name, load] of loads) {
    const r = await runChatLoad({
      ...load,
      size: 64,
      endpoints: ports.map((port) => ({ host: "127.0.0.1", port })),
      onSecond: progress(name),
    });
    const unit = `deliveries/s (p50 ${r.p50Ms} ms, p99 ${r.p99Ms} ms, ${r.delivered}/${r.expected})`;
    report.add(`${label}: ${name}`, r, r.deliveriesPerSecond, unit);
  }
}

/**
 * Who a slow or stopped reader holds back (DESIGN.md, "Slow readers"): a room carrying 1 KB lines
 * at 2,000 lines/s to three live readers and a trickle reader (3 KB/s), ten members joining it one
 * after another who never read, and a pair in another room saying a line every 50 ms. Reports each
 * side's latency, from a timestamp in each line.
 */
async function benchSlowReaders(seconds: number, report: Report): Promise<void> {
  console.log("== chat with slow and stopped readers (chat_server.ts)");
  const chat = await spawnServer("chat_server.ts", CHAT_ARGS, CHAT_STARTED);
  const conns: Deno.Conn[] = [];
  const latency: Record<"busy" | "quiet", number[]> = { busy: [], quiet: [] };
  let running = true;
  const join = async (room: string, heard?: "busy" | "quiet", chunk = 65536, pauseMs = 0) => {
    const conn = await Deno.connect({ hostname: "127.0.0.1", port: chat.port });
    conns.push(conn);
    await writeText(conn, `/join ${room}\r\n`);
    if (chunk > 0) {
      readLines(conn, chunk, pauseMs, (line) => {
        const sent = heard && /^\[[^\]]+\] T=(\d+\.\d+) /.exec(line);
        if (sent) latency[heard!].push(performance.timeOrigin + performance.now() - Number(sent[1]));
      }, () => running);
    }
    return conn;
  };
  const stamp = () => `T=${(performance.timeOrigin + performance.now()).toFixed(3)} `;
  try {
    const sender = await join("busy");
    for (let i = 0; i < 3; i++) await join("busy", i === 0 ? "busy" : undefined);
    await join("busy", undefined, 300, 100); // a trickle: 3 KB/s
    const [talker] = [await join("quiet"), await join("quiet", "quiet")];
    const pad = "x".repeat(960);
    const loops = [
      (async () => { // 20 lines every 10 ms
        while (running) {
          await writeText(sender, Array.from({ length: 20 }, () => `${stamp()}${pad}\r\n`).join(""));
          await new Promise((r) => setTimeout(r, 10));
        }
      })(),
      (async () => {
        while (running) {
          await writeText(talker, `${stamp()}hi\r\n`);
          await new Promise((r) => setTimeout(r, 50));
        }
      })(),
      (async () => {
        for (let i = 0; i < 10 && running; i++) {
          await new Promise((r) => setTimeout(r, seconds * 70));
          await join("busy", undefined, 0); // never reads
        }
      })(),
    ];
    await new Promise((r) => setTimeout(r, seconds * 1000));
    running = false;
    await Promise.all(loops);
  } finally {
    for (const conn of conns) conn.close();
    await chat.stop();
  }
  for (const side of ["quiet", "busy"] as const) {
    const sorted = latency[side].sort((a, b) => a - b);
    const at = (p: number) => sorted[Math.min(sorted.length - 1, Math.floor(p * sorted.length))]?.toFixed(1);
    const name = side === "quiet" ? "a pair in another room" : "a live reader in the busy room";
    report.add(
      `chat, ten non-readers joining: ${name}`,
      { latencyMs: sorted.length },
      at(0.99),
      `ms p99 (max ${at(1)} ms)`,
    );
  }
}

async function writeText(conn: Deno.Conn, text: string): Promise<void> {
  let bytes = new TextEncoder().encode(text);
  while (bytes.length > 0) bytes = bytes.subarray(await conn.write(bytes));
}

/** Reads a connection `chunk` bytes at a time, pausing `pauseMs` after each read, line by line. */
async function readLines(
  conn: Deno.Conn,
  chunk: number,
  pauseMs: number,
  onLine: (line: string) => void,
  going: () => boolean,
): Promise<void> {
  const buffer = new Uint8Array(chunk), decoder = new TextDecoder();
  let rest = "";
  while (going()) {
    const n = await conn.read(buffer).catch(() => null);
    if (n === null) return;
    const lines = (rest + decoder.decode(buffer.subarray(0, n), { stream: true })).split("\r\n");
    rest = lines.pop()!;
    lines.forEach(onLine);
    if (pauseMs > 0) await new Promise((r) => setTimeout(r, pauseMs));
  }
}

async function main(): Promise<void> {
  const { values } = parseArgs({ args: Deno.args, options: { quick: { type: "boolean" } } });
  const seconds = values.quick ? 1 : 3;
  const report = new Report();
  await benchEcho(seconds, report);
  await benchUdp(seconds, report);
  await benchChat(seconds, report);
  await benchSlowReaders(values.quick ? 8 : 20, report);
  console.log("\n" + report.table());
  await Deno.writeTextFile(RESULTS_FILE, JSON.stringify(report.results, null, 2) + "\n");
  console.log(`\nAll figures: ${RESULTS_FILE}`);
}

if (import.meta.main) await main();
