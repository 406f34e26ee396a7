// chat_server.ts is a core that runs alone, and parts in chat/ that its flags load: a copy of the
// core by itself serves the tutorial's chat and names the file a flag needs; every part is named
// once, with a literal specifier, so `deno info` (what `deno compile` embeds) lists them all.
import assert from "node:assert/strict";
import { decoder, freePort, joinChat } from "./_helpers.ts";

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
  const port = freePort();
  const child = new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", "chat_server.ts", String(port), "--host", "127.0.0.1"],
    cwd: dir,
    env: { NO_COLOR: "1" },
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  try {
    let ann = null;
    for (let i = 0; i < 100 && !ann; i++) {
      ann = await joinChat(port).catch(() => null);
      if (!ann) await new Promise((r) => setTimeout(r, 50));
    }
    assert.ok(ann, "the copy never listened");
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
    const stdout = decoder.decode(await new Response(child.stdout).arrayBuffer());
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
