import assert from "node:assert/strict";
import {
  findSocketFd,
  inspectDenoSockets,
  inspectFreshSockets,
  OPTIONS,
  type OptionTable,
  SocketOptions,
} from "../sockopts.ts";
import { hasProgram, runScript } from "./_helpers.ts";

/** Python's socket module, the independent reader: the same fresh sockets, the same settings. */
const ORACLE = `
import json, socket, sys
settings = json.loads(sys.argv[1])
where = {
  "SO_SNDBUF": (socket.SOL_SOCKET, socket.SO_SNDBUF), "SO_RCVBUF": (socket.SOL_SOCKET, socket.SO_RCVBUF),
  "SO_REUSEADDR": (socket.SOL_SOCKET, socket.SO_REUSEADDR), "SO_REUSEPORT": (socket.SOL_SOCKET, socket.SO_REUSEPORT),
  "SO_KEEPALIVE": (socket.SOL_SOCKET, socket.SO_KEEPALIVE), "SO_BROADCAST": (socket.SOL_SOCKET, socket.SO_BROADCAST),
  "TCP_NODELAY": (socket.IPPROTO_TCP, socket.TCP_NODELAY), "TCP_KEEPIDLE": (socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
  "TCP_KEEPINTVL": (socket.IPPROTO_TCP, socket.TCP_KEEPINTVL), "TCP_KEEPCNT": (socket.IPPROTO_TCP, socket.TCP_KEEPCNT),
  "IP_TTL": (socket.IPPROTO_IP, socket.IP_TTL), "IPV6_V6ONLY": (socket.IPPROTO_IPV6, socket.IPV6_V6ONLY),
}
kinds = {"tcp": (socket.AF_INET, socket.SOCK_STREAM), "udp": (socket.AF_INET, socket.SOCK_DGRAM),
         "tcp6": (socket.AF_INET6, socket.SOCK_STREAM)}
names = json.loads(sys.argv[2])
out = {}
for kind, (family, type_) in kinds.items():
  s = socket.socket(family, type_)
  for name, value in settings.items():
    if name in names[kind]: s.setsockopt(*where[name], value)
  out[kind] = {name: s.getsockopt(*where[name]) for name in names[kind]}
  s.close()
print(json.dumps(out))
`;

/** What Python reports for fresh sockets with `settings` applied. */
async function askPython(
  settings: Record<string, number>,
  names: Record<string, string[]>,
): Promise<OptionTable> {
  const out = await new Deno.Command("python3", {
    args: ["-c", ORACLE, JSON.stringify(settings), JSON.stringify(names)],
    stdout: "piped",
    stderr: "piped",
  }).output();
  assert.equal(out.code, 0, new TextDecoder().decode(out.stderr));
  return JSON.parse(new TextDecoder().decode(out.stdout));
}

const linux = Deno.build.os === "linux";
const oracle = hasProgram("python3") && linux;
const oracleName = (name: string) =>
  oracle ? name : `${name} (ignored: needs python3 on Linux as the oracle)`;

Deno.test({
  name: oracleName("inspectFreshSockets() reads what Python's socket module reads for fresh sockets"),
  ignore: !oracle,
  async fn() {
    const ours = inspectFreshSockets();
    const names = Object.fromEntries(Object.entries(ours).map(([k, v]) => [k, Object.keys(v)]));
    assert.deepEqual(names.tcp, Object.keys(OPTIONS).filter((n) => OPTIONS[n].on.includes("tcp")));
    assert.deepEqual(ours, await askPython({}, names));
  },
});

Deno.test({
  name: oracleName("inspectFreshSockets() after --set agrees with Python, doubled SO_SNDBUF and all"),
  ignore: !oracle,
  async fn() {
    const settings = {
      SO_SNDBUF: 8192,
      SO_REUSEADDR: 1,
      TCP_NODELAY: 1,
      TCP_KEEPIDLE: 60,
      IP_TTL: 7,
      IPV6_V6ONLY: 1,
    };
    const ours = inspectFreshSockets(settings);
    const names = Object.fromEntries(Object.entries(ours).map(([k, v]) => [k, Object.keys(v)]));
    assert.deepEqual(ours, await askPython(settings, names));
    assert.equal(ours.tcp.SO_SNDBUF, 16384); // the kernel doubles it
    assert.equal(ours.tcp.TCP_KEEPIDLE, 60);
    assert.equal(ours.udp.IP_TTL, 7);
    assert.equal(ours.tcp6.IPV6_V6ONLY, 1);
  },
});

Deno.test({
  name: linux
    ? "inspectDenoSockets() shows SO_REUSEADDR on Deno.listen and setNoDelay/setKeepAlive taking effect"
    : "inspectDenoSockets() (ignored: finds descriptors through Linux's /proc)",
  ignore: !linux,
  async fn() {
    const knobs = await inspectDenoSockets();
    assert.deepEqual(knobs, {
      listenReuseAddr: 1,
      connNoDelay: [0, 1],
      connKeepAlive: [0, 1],
      datagramBroadcast: 1,
    });
    using lib = new SocketOptions();
    assert.equal(findSocketFd(lib, 1), null); // nobody here listens on port 1
  },
});

Deno.test({
  name: oracleName("sockopts.ts --json prints the table Python agrees with"),
  ignore: !oracle,
  async fn() {
    const r = await runScript("sockopts.ts", ["--json", "--set", "SO_RCVBUF=65536"]);
    assert.equal(r.code, 0, r.stderr);
    const ours: OptionTable = JSON.parse(r.stdout);
    const names = Object.fromEntries(Object.entries(ours).map(([k, v]) => [k, Object.keys(v)]));
    assert.deepEqual(ours, await askPython({ SO_RCVBUF: 65536 }, names));
  },
});

Deno.test("sockopts.ts shows asked-for and effective values, with a note on each line", async () => {
  const r = await runScript("sockopts.ts", ["--set", "SO_SNDBUF=4096"]);
  assert.equal(r.code, 0, r.stderr);
  assert.match(r.stdout, /^TCP socket \(AF_INET, SOCK_STREAM\)$/m);
  assert.match(r.stdout, /^ {2}SO_SNDBUF +set 4096 -> 8192 {3}send buffer, bytes/m);
  assert.match(r.stdout, /^ {2}Deno\.listen\(\): SO_REUSEADDR = 1/m);
});

Deno.test("sockopts.ts host shows the name lookups, as the tutorial's helpers do", async () => {
  const r = await runScript("sockopts.ts", ["host", "localhost", "--json"]);
  assert.equal(r.code, 0, r.stderr);
  const report = JSON.parse(r.stdout);
  assert.equal(report.hostname, Deno.hostname());
  assert.ok(report.addresses.includes("127.0.0.1") || report.addresses.includes("::1"), r.stdout);
  assert.ok(report.interfaces.some((i: { address: string }) => i.address === "127.0.0.1"), r.stdout);
  const bad = await runScript("sockopts.ts", ["host", "no-such-host.invalid"]);
  assert.equal(bad.code, 1);
  assert.equal(bad.stderr, "sockopts: cannot resolve no-such-host.invalid\n");
});

Deno.test("sockopts.ts rejects an unknown option or a bad value in one line, exit code 2", async () => {
  for (
    const [args, first] of [
      [["--set", "SO_NOPE=1"], "sockopts: unknown option SO_NOPE; known: SO_SNDBUF,"],
      [["--set", "SO_SNDBUF=big"], 'sockopts: --set wants NAME=INTEGER, not "SO_SNDBUF=big"'],
      [["--set", "TCP_KEEPIDLE=0"], "sockopts: setsockopt(TCP_KEEPIDLE, 0) was refused"],
      [["--bogus"], "sockopts: unknown option --bogus; try --help"],
    ] as const
  ) {
    const r = await runScript("sockopts.ts", [...args]);
    assert.equal(r.code, 2, args.join(" "));
    assert.ok(r.stderr.startsWith(first), r.stderr);
  }
});
