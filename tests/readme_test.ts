// README.md as a reference: each script's section names every flag its --help knows, and the chat
// server's usage block is the one --help prints.
import assert from "node:assert/strict";
import { runScript } from "./_helpers.ts";

const README = Deno.readTextFileSync(new URL("../README.md", import.meta.url));

/** The README from `heading` to the next heading of the same level. */
function section(heading: string): string {
  const start = README.indexOf(`\n${heading}`);
  assert.ok(start >= 0, `README.md has no "${heading}"`);
  const end = README.indexOf("\n## ", start + heading.length + 1);
  return README.slice(start, end < 0 ? undefined : end);
}

for (
  const [script, heading] of [
    ["chat_server.ts", "## The chat server"],
    ["echo_tcp.ts", "## Echo servers and clients (RFC 862)"],
    ["echo_udp.ts", "## Echo servers and clients (RFC 862)"],
    ["multiplex.ts", "## multiplex.ts: the tutorial's select() loop"],
    ["sockopts.ts", "## sockopts.ts: socket options as the kernel sees them"],
  ]
) {
  Deno.test(`README.md documents every flag of ${script} --help`, async () => {
    const help = await runScript(script, ["--help"]);
    assert.equal(help.code, 0, help.stderr);
    const text = section(heading);
    const flags = [...new Set(help.stdout.match(/--[a-z][a-z-]*/g))];
    const missing = flags.filter((flag) => !new RegExp("`[^`]*" + flag + "(?![a-z-])").test(text));
    assert.deepEqual(missing, [], `README's "${heading}" never shows these as code`);
  });
}

Deno.test("README.md's chat server usage block is the usage chat_server.ts --help prints", async () => {
  const usage = (await runScript("chat_server.ts", ["--help"])).stdout.split("\n")[0];
  const block = /```\n(usage: chat_server\.ts[^`]*)```/.exec(section("## The chat server"))?.[1];
  assert.ok(block, "no usage block");
  assert.equal(block.replace(/\s+/g, " ").trim(), usage.replace(/\s+/g, " ").trim());
});
