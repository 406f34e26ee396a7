// Every bad input a user can give is one line on stderr and an exit code: 2 for a bad argument,
// 1 for a runtime failure. Never a stack trace.
import assert from "node:assert/strict";
import { needs, runScript } from "./_helpers.ts";

const NO_SUCH_HOST = "no.such.host.invalid"; // .invalid never resolves (RFC 2606)

const CASES: [script: string, args: string[], code: number, line: string][] = [
  [
    "chat_server.ts",
    ["0", "--host", NO_SUCH_HOST],
    1,
    `cannot listen on ${NO_SUCH_HOST}: the name does not resolve`,
  ],
  [
    "chat_server.ts",
    ["0", "--tls-cert", "/tmp", "--tls-key", "/tmp"],
    1,
    "cannot serve TLS: cannot read --tls-cert /tmp: it is a directory",
  ],
  [
    "chat_server.ts",
    ["0", "--tls-cert", "/nonexistent.pem", "--tls-key", "/nonexistent.key"],
    1,
    "cannot serve TLS: cannot read --tls-cert /nonexistent.pem: no such file",
  ],
  [
    "chat_server.ts",
    ["0", "--redis", "redis://127.0.0.1:99999"],
    2,
    '--redis wants redis://HOST:PORT[/DB], not "redis://127.0.0.1:99999"',
  ],
  [
    "chat_server.ts",
    ["0", "--redis", "redis://127.0.0.1:6379", "--history", "chat.db"],
    2,
    "--history and --redis do not go together: with --redis the history lives in Redis",
  ],
  [
    "chat_server.ts",
    ["0", "--redis", "redis://:6379"],
    2,
    '--redis wants redis://HOST:PORT[/DB], not "redis://:6379"',
  ],
  [
    "chat_server.ts",
    ["0", "--handshake-timeout", "1"],
    2,
    "--handshake-timeout goes with --tls-cert and --tls-key, or --proxy-from",
  ],
  [
    "chat_server.ts",
    ["0", "--http", "0", "--http-timeout", "soon"],
    2,
    '--http-timeout wants seconds, not "soon"',
  ],
  [
    "chat_server.ts",
    ["0", "--http", "0", "--http-ping", "-1"],
    2,
    '--http-ping wants a value; for one that starts with "-", write --http-ping=VALUE',
  ],
  ["chat_server.ts", ["0", "--http-ping=-1", "--http", "0"], 2, '--http-ping wants seconds, not "-1"'],
  [
    "chat_server.ts",
    ["0", "--http-ping", "5"],
    2,
    "--http-host, --http-origin, --http-timeout and --http-ping go with --http PORT",
  ],
  [
    "echo_tcp.ts",
    ["server", "--host", NO_SUCH_HOST],
    1,
    `cannot listen on ${NO_SUCH_HOST}: the name does not resolve`,
  ],
  [
    "echo_tcp.ts",
    ["hello", "--host", NO_SUCH_HOST],
    1,
    `cannot listen on ${NO_SUCH_HOST}: the name does not resolve`,
  ],
  ["chat_server.ts", ["0", "--host", ""], 2, '--host wants a value, not ""'],
  [
    "chat_server.ts",
    ["--port", "-1"],
    2,
    '--port wants a value; for one that starts with "-", write --port=VALUE',
  ],
  ["chat_server.ts", ["--bogus"], 2, "unknown option --bogus; try --help"],
  [
    "chat_server.ts",
    ["0", "--http", "0", "--http-origin", "evil"],
    2,
    '--http-origin wants an origin like https://chat.example (or *), not "evil"',
  ],
  ["echo_tcp.ts", ["server", "--port"], 2, "--port wants a value"],
  ["sockopts.ts", ["--json=1"], 2, "--json takes no value"],
  ["multiplex.ts", ["--frob", "localhost:1"], 2, "unknown option --frob; try --help"],
  ["echo_tcp.ts", ["client", "--port", "0", "hi"], 2, "--port must be from 1 to 65535"],
  ["echo_tcp.ts", ["bench", "--port", "0"], 2, "--port must be from 1 to 65535"],
  [
    "echo_udp.ts",
    ["server", "--host", NO_SUCH_HOST],
    1,
    `cannot listen on ${NO_SUCH_HOST}: the name does not resolve`,
  ],
  ["echo_udp.ts", ["client", "--port", "0", "hi"], 2, "--port must be from 1 to 65535"],
  ["echo_udp.ts", ["bench", "--port", "0"], 2, "--port must be from 1 to 65535"],
];

for (const [script, args, code, line] of CASES) {
  Deno.test(`${script} ${args.join(" ")}: one line, exit code ${code}`, async () => {
    const out = await runScript(script, args);
    const name = script.replace(/\.ts$/, "");
    assert.equal(out.code, code, out.stderr);
    assert.equal(out.stderr.split("\n")[0], `${name}: ${line}`);
    assert.equal(
      out.stderr.trimEnd().split("\n").length,
      code === 2 ? 1 + usageLines(out.stderr) : 1,
      out.stderr,
    );
    assert.doesNotMatch(out.stderr, /Uncaught|\n\s+at /);
  });
}

/** How many lines of usage follow the error (exit code 2 prints the usage). */
function usageLines(stderr: string): number {
  return stderr.trimEnd().split("\n").slice(1).filter((l) => /^\s*(usage: )?\S+\.ts /.test(l)).length;
}

Deno.test({
  ...needs("chat_server.ts with a key that is not the certificate's: one line, exit code 1", ["openssl"]),
  async fn() {
    const dir = await Deno.makeTempDir();
    try {
      const make =
        `cd "${dir}" && openssl req -x509 -newkey rsa:2048 -nodes -keyout a.key -out a.crt -days 1 -subj /CN=a ` +
        `2>/dev/null && openssl genrsa -out b.key 2048 2>/dev/null`;
      assert.ok((await new Deno.Command("sh", { args: ["-c", make] }).output()).success);
      const swapped = await runScript("chat_server.ts", [
        "0",
        "--tls-cert",
        `${dir}/a.key`,
        "--tls-key",
        `${dir}/a.crt`,
      ]);
      assert.equal(swapped.code, 1);
      assert.match(
        swapped.stderr,
        /^chat_server: cannot serve TLS: the certificate is not a PEM certificate/,
      );
      const mismatched = await runScript("chat_server.ts", [
        "0",
        "--tls-cert",
        `${dir}/a.crt`,
        "--tls-key",
        `${dir}/b.key`,
      ]);
      assert.equal(mismatched.code, 1);
      assert.equal(
        mismatched.stderr,
        "chat_server: cannot serve TLS: the key does not belong to the certificate\n",
      );
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  },
});
