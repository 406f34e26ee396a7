// chat_server.ts is a core that runs alone, and parts in chat/ that its flags load: a copy of the
// core by itself serves the tutorial's chat and names the file a flag needs; every part is named
// once, with a literal specifier, so `deno info` (what `deno compile` embeds) lists them all.
import assert from "node:assert/strict";
import { decoder, freePort, joinChat, portIn } from "./_helpers.ts";
import { PAGE } from "../chat/web.ts";

const ROOT = new URL("..", import.meta.url).pathname;

/** Runs `deno ARGS` in `cwd`, with no deno.json there unless the directory has one. */
async function deno(args: string[], cwd: string): Promise<{ code: number; stdout: string; stderr: string }> {
  const out = await new Deno.Command(Deno.execPath(), { args, cwd, env: { NO_COLOR: "1" }, stdin: "null" })
    .output();
  return { code: out.code, stdout: decoder.decode(out.stdout), stderr: decoder.decode(out.stderr) };
}

/** A directory holding a copy of chat_server.ts and nothing else. */
async function copyAlone(): Promise<string> {
  const dir = await Deno.makeTempDir();
  await Deno.copyFile(`${ROOT}/chat_server.ts`, `${dir}/chat_server.ts`);
  return dir;
}

/** The flags whose part lives in chat/, with the file each one needs. */
const FLAG_PARTS: [args: string[], file: string][] = [
  [["--history", "chat.db"], "history_file.ts"],
  [["--tls-cert", "chat_server.ts", "--tls-key", "chat_server.ts"], "tls.ts"],
  [["--proxy-from", "10.0.0.0/8"], "proxy.ts"],
  [["--http", "0"], "web.ts"],
  [["--admin", "0"], "admin.ts"],
  [["--redis", "redis://127.0.0.1:1"], "redis_bus.ts"],
];

Deno.test("a copy of chat_server.ts alone serves the tutorial's chat, commands and all", async () => {
  const dir = await copyAlone();
  const child = new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", "chat_server.ts", "0", "--host", "127.0.0.1"],
    cwd: dir,
    env: { NO_COLOR: "1" },
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  const lines = child.stdout.pipeThrough(new TextDecoderStream()).getReader();
  let stdout = "";
  try {
    while (!/started on port \d+\n/.test(stdout)) {
      const { value, done } = await lines.read();
      if (done) break;
      stdout += value;
    }
    const port = portIn(stdout);
    const ann = await joinChat(port);
    const bob = await joinChat(port);
    assert.equal(await ann.readLine(), `Client joined ${bob.name}\r\n`);
    await bob.write("hello\r\n");
    assert.equal(await ann.readLine(), `[${bob.name}] hello\r\n`);
    await ann.write("/nick ann\r\n");
    assert.equal(await ann.readLine(), "You are now known as ann\r\n");
    ann.close();
    bob.close();
  } finally {
    child.kill("SIGTERM");
    const status = await child.status;
    await lines.cancel();
    await child.stderr.cancel();
    await Deno.remove(dir, { recursive: true });
    assert.equal(status.code, 0);
    assert.match(stdout, /^ChatServer started on port \d+\n/);
  }
});

Deno.test("a copy of chat_server.ts alone names, in one line, the file each flag of a part needs", async () => {
  const dir = await copyAlone();
  try {
    for (const [args, file] of FLAG_PARTS) {
      const { code, stdout, stderr } = await deno(["run", "-A", "chat_server.ts", "0", ...args], dir);
      assert.equal(code, 1, `${args[0]}: exit code ${code}; ${stderr}`);
      assert.equal(
        stderr,
        `chat_server: ${args[0]} needs chat/${file} beside chat_server.ts, and it is not there\n`,
      );
      assert.equal(stdout, "");
    }
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

/** The local files a module imports, statically or not, from `deno info --json`, relative to the project. */
async function localImports(): Promise<Map<string, { file: string; dynamic: boolean }[]>> {
  const { code, stdout, stderr } = await deno(["info", "--json", "chat_server.ts"], ROOT);
  assert.equal(code, 0, stderr);
  const root = new URL("..", import.meta.url).href;
  const graph = JSON.parse(stdout) as {
    modules: { specifier: string; dependencies?: { code?: { specifier: string }; isDynamic?: boolean }[] }[];
  };
  const local = new Map<string, { file: string; dynamic: boolean }[]>();
  for (const module of graph.modules) {
    if (!module.specifier.startsWith(root)) continue;
    local.set(
      module.specifier.slice(root.length),
      (module.dependencies ?? []).filter((d) => d.code?.specifier.startsWith(root)).map((d) => ({
        file: d.code!.specifier.slice(root.length),
        dynamic: d.isDynamic === true,
      })),
    );
  }
  return local;
}

Deno.test("deno info chat_server.ts (what deno compile embeds) holds every part; the core imports each only by import()", async () => {
  const graph = await localImports();
  const parts = [...Deno.readDirSync(`${ROOT}/chat`)].map((f) => `chat/${f.name}`).sort();
  assert.deepEqual([...graph.keys()].filter((f) => f.startsWith("chat/")).sort(), parts);
  const core = graph.get("chat_server.ts")!;
  assert.deepEqual(core.filter((d) => !d.dynamic), [], "the core imports no local file statically");
  assert.deepEqual(
    core.map((d) => d.file).sort(),
    parts.filter((f) => f.endsWith(".ts") && f !== "chat/http.ts"),
  );
  // A part imports the core, chat/http.ts and its own assets, never another part.
  for (const [file, imports] of graph) {
    if (file === "chat_server.ts") continue;
    const allowed = ["chat_server.ts", ...(file === "chat/http.ts" ? [] : ["chat/http.ts"])];
    const others = imports.map((d) => d.file).filter((f) => !allowed.includes(f) && !/^chat\/page\./.test(f));
    assert.deepEqual(others, [], `${file} imports another part`);
  }
});

Deno.test("the four small scripts stay one file each, and their parseFlags() is one and the same copy", () => {
  const copies = ["echo_tcp.ts", "echo_udp.ts", "multiplex.ts", "sockopts.ts"].map((script) => {
    const source = Deno.readTextFileSync(`${ROOT}/${script}`);
    assert.doesNotMatch(source, /^import .* from "\.{1,2}\//m, `${script} imports a local file`);
    const copy = /\/\*\*(?:(?!\*\/)[\s\S])*\*\/\nfunction parseFlags<[\s\S]*?\n}\n/.exec(source);
    assert.ok(copy, `${script} has no parseFlags()`);
    return [script, copy[0]];
  });
  for (const [script, copy] of copies.slice(1)) assert.equal(copy, copies[0][1], `${script}'s parseFlags()`);
});

Deno.test("chat_server.ts run from a URL fetches its parts, the bus's npm package too: the web page is served, with no deno.json beside it", async () => {
  const types: Record<string, string> = {
    ts: "application/typescript",
    js: "text/javascript",
    html: "text/html",
    css: "text/css",
  };
  const files = Deno.serve({ hostname: "127.0.0.1", port: 0, onListen() {} }, (request) => {
    const path = new URL(request.url).pathname;
    if (!/^\/(chat\/)?[a-z_]+\.(ts|js|html|css)$/.test(path)) return new Response("no", { status: 404 });
    try {
      const body = Deno.readFileSync(`${ROOT}${path}`);
      return new Response(body, { headers: { "content-type": types[path.split(".").pop()!] } });
    } catch {
      return new Response("no", { status: 404 });
    }
  });
  const dir = await Deno.makeTempDir(); // no deno.json, and a cache of its own: everything is fetched
  const url = `http://127.0.0.1:${files.addr.port}/chat_server.ts`;
  // Nobody answers there; the bus's part and its npm package are loaded all the same.
  const redis = ["--redis", `redis://127.0.0.1:${freePort()}`];
  const child = new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", url, "0", "--host", "127.0.0.1", "--http", "0", ...redis],
    cwd: dir,
    env: { NO_COLOR: "1", DENO_DIR: `${dir}/cache` },
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  const lines = child.stdout.pipeThrough(new TextDecoderStream()).getReader();
  const errors = child.stderr.pipeThrough(new TextDecoderStream()).getReader();
  let said = "", stderr = "";
  try {
    while (!said.includes("Web page at")) {
      const { value, done } = await lines.read();
      if (done) break;
      said += value;
    }
    assert.match(said, /^ChatServer started on port \d+\nWeb page at http:\/\/127\.0\.0\.1:\d+\/\n/);
    const port = portIn(said), httpPort = Number(/Web page at http:\/\/[^/]+:(\d+)\//.exec(said)![1]);
    const page = await fetch(`http://127.0.0.1:${httpPort}/`).then((r) => r.text());
    assert.equal(page, PAGE);
    const client = await joinChat(port);
    client.close();
    while (!stderr.includes("is unreachable")) { // said after a second of trying
      const { value, done } = await errors.read();
      if (done) break;
      stderr += value;
    }
    assert.doesNotMatch(stderr, /error|Error/, stderr);
    assert.match(stderr, /Redis at redis:\/\/127\.0\.0\.1:\d+ is unreachable: serving local clients only/);
  } finally {
    child.kill("SIGTERM");
    await child.status;
    await lines.cancel();
    await errors.cancel();
    await files.shutdown();
    await Deno.remove(dir, { recursive: true });
  }
});
