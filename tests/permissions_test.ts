// The README's permissions table, run as written: each script with the least it claims to need.
import assert from "node:assert/strict";
import { startEchoServer } from "../echo_tcp.ts";
import { freePort, joinChat, needs, portIn, WAIT_MS, within } from "./_helpers.ts";

const ROOT = new URL("..", import.meta.url).pathname;
const README = Deno.readTextFileSync(`${ROOT}/README.md`);

interface Run {
  /** A command the README shows: `deno run FLAGS SCRIPT ARGS`. */
  line: string;
  /** Words of `line` to replace when it runs (a free port for 2626, say). */
  swaps?: Record<string, string>;
  /** What stdout must show; the program is stopped once it has (a server), or when it exits. */
  until: RegExp;
  stdin?: string;
  /** What to do while it runs, once `until` has shown. */
  meanwhile?: (stdout: string) => Promise<void>;
}

/** Runs a README command line as written, and returns what it printed and its exit code. */
async function runAsDocumented(run: Run): Promise<{ stdout: string; stderr: string; code: number }> {
  assert.ok(README.includes("`" + run.line + "`"), `README.md does not show \`${run.line}\``);
  // "deno" is Deno.execPath(): a deno from npm may not be on PATH.
  const args = run.line.split(" ").slice(1).map((word) => run.swaps?.[word] ?? word);
  const child = new Deno.Command(Deno.execPath(), {
    args,
    cwd: ROOT,
    stdin: "piped",
    stdout: "piped",
    stderr: "piped",
    env: { NO_COLOR: "1" },
  }).spawn();
  const writer = child.stdin.getWriter();
  await writer.write(new TextEncoder().encode(run.stdin ?? ""));
  await writer.close();
  const reader = child.stdout.pipeThrough(new TextDecoderStream()).getReader();
  let stdout = "", ended = false;
  while (!run.until.test(stdout) && !ended) {
    const { value, done } = await within(WAIT_MS, reader.read(), `\`${run.line}\` to print ${run.until}`);
    ended = done;
    stdout += value ?? "";
  }
  const stop = () => {
    try {
      child.kill("SIGTERM");
    } catch (e) {
      if (!(e instanceof TypeError)) throw e; // it has exited
    }
  };
  try {
    if (!ended) await run.meanwhile?.(stdout);
  } finally {
    stop();
    for (let r = await reader.read(); !r.done; r = await reader.read()) stdout += r.value;
  }
  return { stdout, stderr: await new Response(child.stderr).text(), code: (await child.status).code };
}

Deno.test("README permissions: chat_server.ts serves with --allow-net alone", async () => {
  const run = await runAsDocumented({
    line: "deno run --allow-net chat_server.ts 2626",
    swaps: { "2626": "0" },
    until: /started on port \d+\n/,
    meanwhile: async (stdout) => (await joinChat(portIn(stdout))).close(),
  });
  assert.match(run.stdout, /^ChatServer started on port \d+\n/, run.stderr);
  assert.equal(run.code, 0, run.stderr);
});

Deno.test({
  ...needs("README permissions: chat_server.ts serves TLS with --allow-net --allow-read", ["openssl"]),
  async fn() {
    const dir = await Deno.makeTempDir();
    try {
      const make =
        `cd "${dir}" && openssl req -x509 -newkey rsa:2048 -nodes -keyout server.key -out server.crt ` +
        `-days 1 -subj /CN=localhost 2>/dev/null`;
      assert.ok((await new Deno.Command("sh", { args: ["-c", make] }).output()).success);
      const run = await runAsDocumented({
        line:
          "deno run --allow-net --allow-read chat_server.ts 2626 --tls-cert server.crt --tls-key server.key",
        swaps: { "2626": "0", "server.crt": `${dir}/server.crt`, "server.key": `${dir}/server.key` },
        until: /started/,
      });
      assert.match(run.stdout, /^ChatServer started on port \d+ \(TLS\)\n/, run.stderr);
      assert.equal(run.code, 0, run.stderr);
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  },
});

Deno.test({
  ...needs("README permissions: chat_server.ts shares rooms through Redis with --allow-net --allow-env", [
    "redis-server",
  ]),
  async fn() {
    const redisPort = freePort();
    const redis = new Deno.Command("redis-server", {
      args: ["--port", String(redisPort), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
      stdout: "null",
      stderr: "null",
    }).spawn();
    try {
      const run = await runAsDocumented({
        line: "deno run --allow-net --allow-env chat_server.ts 2626 --redis redis://127.0.0.1:6379",
        swaps: { "2626": "0", "redis://127.0.0.1:6379": `redis://127.0.0.1:${redisPort}` },
        until: /Sharing rooms through Redis/,
      });
      assert.match(run.stdout, /Sharing rooms through Redis at redis:\/\/127\.0\.0\.1:\d+\n/, run.stderr);
      assert.equal(run.code, 0, run.stderr);
    } finally {
      redis.kill("SIGKILL");
      await redis.status;
    }
  },
});

Deno.test("README permissions: chat_server.ts keeps history in its --history file with read and write to it", async () => {
  const dir = await Deno.makeTempDir();
  try {
    const file = `${dir}/chat.db`;
    const run = await runAsDocumented({
      line:
        "deno run --allow-net --allow-read=chat.db --allow-write=chat.db chat_server.ts 2626 --history chat.db",
      swaps: {
        "2626": "0",
        "--allow-read=chat.db": `--allow-read=${file}`,
        "--allow-write=chat.db": `--allow-write=${file}`,
        "chat.db": file,
      },
      until: /started on port \d+\n/,
      meanwhile: async (stdout) => {
        using c = await joinChat(portIn(stdout));
        await c.write("kept across restarts\r\n/history 1\r\n");
        assert.equal(await c.readLine(), "History of lobby (the last 1 line):\r\n");
      },
    });
    assert.equal(run.code, 0, run.stderr);
    const { DatabaseSync } = await import("node:sqlite");
    const db = new DatabaseSync(file);
    const row = db.prepare("SELECT message FROM lines").get()!;
    db.close();
    assert.match(new TextDecoder().decode(row.message as Uint8Array), /\] kept across restarts\r\n$/);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("README permissions: without them, TLS, --history and Redis say in one line which flag to add", async () => {
  for (
    const [extra, line] of [
      [
        ["--tls-cert", "a.pem", "--tls-key", "a.key"],
        "--tls-cert and --tls-key need --allow-read (or --allow-read=a.pem,a.key)",
      ],
      [
        ["--history", "chat.db"],
        "--history needs --allow-read and --allow-write (or both =chat.db)",
      ],
      [
        ["--redis", "redis://127.0.0.1:1"],
        "--redis needs --allow-env (the Redis client reads environment variables)",
      ],
    ] as const
  ) {
    const out = await new Deno.Command(Deno.execPath(), {
      args: ["run", "--allow-net", "chat_server.ts", "0", ...extra],
      cwd: ROOT,
      env: { NO_COLOR: "1" },
    }).output();
    assert.equal(out.code, 1);
    assert.equal(new TextDecoder().decode(out.stderr), `chat_server: ${line}\n`);
  }
});

Deno.test("README permissions: echo_tcp.ts, echo_udp.ts and multiplex.ts run with --allow-net", async () => {
  for (
    const line of [
      "deno run --allow-net echo_tcp.ts server --port 23000",
      "deno run --allow-net echo_udp.ts server --port 23000",
    ]
  ) {
    const run = await runAsDocumented({ line, swaps: { "23000": "0" }, until: /listening on/ });
    assert.match(run.stdout, /listening on 127\.0\.0\.1:\d+|listening on \[::\]:\d+/, run.stderr);
    assert.equal(run.code, 0, run.stderr);
  }
  const echo = startEchoServer({ port: 0, host: "127.0.0.1", log: null });
  try {
    const run = await runAsDocumented({
      line: "deno run --allow-net multiplex.ts localhost:23000",
      swaps: { "localhost:23000": `127.0.0.1:${echo.addr.port}` },
      until: /never/, // it ends by itself once the echo server closes
      stdin: "hi\n",
    });
    assert.match(run.stdout, /\] hi\n/, run.stderr);
    assert.equal(run.code, 0, run.stderr);
  } finally {
    await echo.close();
  }
});

Deno.test("README permissions: sockopts.ts runs with --allow-ffi --allow-net, and host adds --allow-sys", async () => {
  const table = await runAsDocumented({
    line: "deno run --allow-ffi --allow-net sockopts.ts",
    until: /never/,
  });
  assert.equal(table.code, 0, table.stderr);
  assert.match(table.stdout, /Deno's own sockets, read on live loopback sockets/);
  const host = await runAsDocumented({
    line: "deno run --allow-ffi --allow-net --allow-sys=hostname,networkInterfaces sockopts.ts host",
    until: /never/,
  });
  assert.equal(host.code, 0, host.stderr);
});
