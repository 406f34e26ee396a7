/**
 * sockopts.ts: socket options as the kernel sees them, and the tutorial's name-lookup helpers.
 *
 *     deno run -A sockopts.ts                        # options of a fresh TCP, UDP and IPv6 socket
 *     deno run -A sockopts.ts --set SO_SNDBUF=4096   # set one first: see what the kernel made of it
 *     deno run -A sockopts.ts --json                 # the same figures for scripts
 *     deno run -A sockopts.ts host example.org       # hostname, FQDN, addresses, reverse lookup
 *
 * The tutorial reads SO_SNDBUF and SO_REUSEADDR with `getsockopt`. Deno has no getsockopt, so
 * this script asks the C library directly through FFI (`Deno.dlopen`): it makes its own sockets
 * with `socket()`, and reads and sets options with `getsockopt()` and `setsockopt()`, exactly as
 * Python's socket module does underneath. It also finds the descriptors behind Deno's own sockets
 * (asking each descriptor its ports, with getsockname) to show what `Deno.listen`, `setNoDelay` and
 * `setKeepAlive` change.
 *
 * @module
 */

import { lookup, lookupService } from "node:dns/promises";
import { parseArgs, type ParseArgsOptionsConfig } from "node:util";

// ---------------------------------------------------------------------------------------------
// The options, with their numbers on Linux and macOS

/** Where an option lives, and what it means. */
interface OptionInfo {
  level: "SOL_SOCKET" | "IPPROTO_TCP" | "IPPROTO_IP" | "IPPROTO_IPV6";
  linux: number;
  darwin: number;
  /** Which fresh sockets it is shown for. */
  on: ("tcp" | "udp" | "tcp6")[];
  note: string;
}

/** The options shown, in the order shown. */
export const OPTIONS: Record<string, OptionInfo> = {
  SO_SNDBUF: {
    level: "SOL_SOCKET",
    linux: 7,
    darwin: 0x1001,
    on: ["tcp", "udp"],
    note: "send buffer, bytes (Linux doubles what you set, for its own bookkeeping)",
  },
  SO_RCVBUF: {
    level: "SOL_SOCKET",
    linux: 8,
    darwin: 0x1002,
    on: ["tcp", "udp"],
    note: "receive buffer, bytes (doubled on Linux too)",
  },
  SO_REUSEADDR: {
    level: "SOL_SOCKET",
    linux: 2,
    darwin: 4,
    on: ["tcp", "udp"],
    note: "bind a port still in TIME_WAIT: lets a server restart at once",
  },
  SO_REUSEPORT: {
    level: "SOL_SOCKET",
    linux: 15,
    darwin: 0x200,
    on: ["tcp", "udp"],
    note: "several sockets share one port; the kernel spreads connections",
  },
  SO_KEEPALIVE: {
    level: "SOL_SOCKET",
    linux: 9,
    darwin: 8,
    on: ["tcp", "udp"],
    note: "probe an idle connection to find a dead peer",
  },
  SO_BROADCAST: {
    level: "SOL_SOCKET",
    linux: 6,
    darwin: 0x20,
    on: ["tcp", "udp"],
    note: "allow sending datagrams to a broadcast address",
  },
  TCP_NODELAY: {
    level: "IPPROTO_TCP",
    linux: 1,
    darwin: 1,
    on: ["tcp"],
    note: "1 turns Nagle off: small writes go out at once",
  },
  TCP_KEEPIDLE: {
    level: "IPPROTO_TCP",
    linux: 4,
    darwin: 0x10,
    on: ["tcp"],
    note: "seconds idle before the first keepalive probe",
  },
  TCP_KEEPINTVL: {
    level: "IPPROTO_TCP",
    linux: 5,
    darwin: 0x101,
    on: ["tcp"],
    note: "seconds between keepalive probes",
  },
  TCP_KEEPCNT: {
    level: "IPPROTO_TCP",
    linux: 6,
    darwin: 0x102,
    on: ["tcp"],
    note: "unanswered probes before the connection is dropped",
  },
  IP_TTL: {
    level: "IPPROTO_IP",
    linux: 2,
    darwin: 4,
    on: ["tcp", "udp"],
    note: "hops a packet may take before a router drops it",
  },
  IPV6_V6ONLY: {
    level: "IPPROTO_IPV6",
    linux: 26,
    darwin: 27,
    on: ["tcp6"],
    note: "0: an IPv6 socket also takes IPv4 (as ::ffff:a.b.c.d)",
  },
};

const LEVELS = { SOL_SOCKET: { linux: 1, darwin: 0xffff }, IPPROTO_TCP: 6, IPPROTO_IP: 0, IPPROTO_IPV6: 41 };
const AF_INET = 2;
const AF_INET6 = { linux: 10, darwin: 30 };
const SOCK_STREAM = 1, SOCK_DGRAM = 2;

/** The kinds of fresh socket inspected. */
export type SocketKind = "tcp" | "udp" | "tcp6";

/** Option values by socket kind: `{ tcp: { SO_SNDBUF: 16384, ... }, ... }`. */
export type OptionTable = Record<SocketKind, Record<string, number>>;

// ---------------------------------------------------------------------------------------------
// The C library

const SYMBOLS = {
  socket: { parameters: ["i32", "i32", "i32"], result: "i32" },
  getsockopt: { parameters: ["i32", "i32", "i32", "buffer", "buffer"], result: "i32" },
  setsockopt: { parameters: ["i32", "i32", "i32", "buffer", "u32"], result: "i32" },
  close: { parameters: ["i32"], result: "i32" },
  getsockname: { parameters: ["i32", "buffer", "buffer"], result: "i32" },
  getpeername: { parameters: ["i32", "buffer", "buffer"], result: "i32" },
} as const;

/** SO_TYPE, to tell a stream socket from a datagram one. */
const SO_TYPE = { linux: 3, darwin: 0x1008 };
/** Descriptors findSocketFd() looks through. */
const MAX_FD_SEARCHED = 4096;

/** Raised when the C library cannot be loaded or a call fails. */
export class LibcError extends Error {}

/** The kernel refused a value given with --set: a bad argument, so main() exits 2. */
export class RefusedSettingError extends LibcError {}

/**
 * node:util's parseArgs, with a bad flag said in one line of our own words, decided from the
 * parser's own tokens: never from the wording of its messages, which any release may change.
 */
function parseFlags<T extends ParseArgsOptionsConfig>(args: string[], options: T) {
  const { tokens } = parseArgs({ args, options, allowPositionals: true, strict: false, tokens: true });
  for (const token of tokens) {
    if (token.kind !== "option") continue;
    const flag = token.rawName, type = Object.hasOwn(options, token.name) ? options[token.name].type : null;
    if (type === null) throw new UsageError(`unknown option ${flag}; try --help`);
    if (type === "boolean" && token.value !== undefined) throw new UsageError(`${flag} takes no value`);
    if (type === "string" && token.value === undefined) throw new UsageError(`${flag} wants a value`);
    if (type === "string" && !token.inlineValue && token.value!.startsWith("-") && token.value !== "-") {
      throw new UsageError(`${flag} wants a value; for one that starts with "-", write ${flag}=VALUE`);
    }
  }
  return parseArgs({ args, options, allowPositionals: true });
}

/** Raised when a name does not resolve. */
export class LookupError extends Error {}

/** getsockopt and friends, through the C library. Close it when done. */
export class SocketOptions {
  readonly #lib: Deno.DynamicLibrary<typeof SYMBOLS>;
  readonly #os: "linux" | "darwin";

  constructor() {
    const os = Deno.build.os;
    if (os !== "linux" && os !== "darwin") throw new LibcError(`no option numbers for ${os} here`);
    this.#os = os;
    const names = os === "linux" ? ["libc.so.6", "libc.so"] : ["libSystem.B.dylib"];
    let lastError: unknown;
    for (const name of names) {
      try {
        this.#lib = Deno.dlopen(name, SYMBOLS);
        return;
      } catch (e) {
        lastError = e;
      }
    }
    throw new LibcError(
      `cannot load the C library: ${lastError instanceof Error ? lastError.message : lastError}`,
    );
  }

  /** Makes a fresh socket of `kind`; returns its descriptor. */
  open(kind: SocketKind): number {
    const family = kind === "tcp6" ? AF_INET6[this.#os] : AF_INET;
    const fd = this.#lib.symbols.socket(family, kind === "udp" ? SOCK_DGRAM : SOCK_STREAM, 0);
    if (fd < 0) throw new LibcError(`socket() failed for ${kind}`);
    return fd;
  }

  closeFd(fd: number): void {
    this.#lib.symbols.close(fd);
  }

  #where(name: string): [number, number] {
    const info = OPTIONS[name];
    const level = LEVELS[info.level];
    return [typeof level === "number" ? level : level[this.#os], info[this.#os]];
  }

  /** Reads an integer option, as `getsockopt(fd, level, name, &int, &len)`. */
  get(fd: number, name: string): number {
    const value = new Int32Array(1), length = new Uint32Array([4]);
    const [level, option] = this.#where(name);
    if (this.#lib.symbols.getsockopt(fd, level, option, value, length) !== 0) {
      throw new LibcError(`getsockopt(${name}) failed on descriptor ${fd}`);
    }
    return value[0];
  }

  /** Sets an integer option, as `setsockopt(fd, level, name, &int, sizeof int)`. */
  set(fd: number, name: string, value: number): void {
    const [level, option] = this.#where(name);
    if (this.#lib.symbols.setsockopt(fd, level, option, new Int32Array([value]), 4) !== 0) {
      throw new RefusedSettingError(`setsockopt(${name}, ${value}) was refused`);
    }
  }

  /** Reads every option that applies to `kind` on `fd`. */
  getAll(fd: number, kind: SocketKind): Record<string, number> {
    const out: Record<string, number> = {};
    for (const [name, info] of Object.entries(OPTIONS)) {
      if (info.on.includes(kind)) out[name] = this.get(fd, name);
    }
    return out;
  }

  /**
   * The local (or, with `peer`, the remote) port of the socket on `fd`, or null if `fd` is no
   * socket, or has no peer. The port sits at the same place in sockaddr_in and sockaddr_in6.
   */
  port(fd: number, peer = false): number | null {
    const address = new Uint8Array(128), length = new Uint32Array([128]);
    const call = peer ? this.#lib.symbols.getpeername : this.#lib.symbols.getsockname;
    if (call(fd, address, length) !== 0) return null;
    return (address[2] << 8) | address[3];
  }

  /** SOCK_STREAM or SOCK_DGRAM for a socket, or null for a descriptor that is not one. */
  socketType(fd: number): number | null {
    const value = new Int32Array(1), length = new Uint32Array([4]);
    const level = LEVELS.SOL_SOCKET[this.#os];
    return this.#lib.symbols.getsockopt(fd, level, SO_TYPE[this.#os], value, length) === 0 ? value[0] : null;
  }

  close(): void {
    this.#lib.close();
  }

  [Symbol.dispose](): void {
    this.close();
  }
}

/**
 * Makes a fresh TCP, UDP and IPv6 TCP socket, applies `settings` where they apply, and reads every
 * option back.
 *
 * @example
 * ```ts
 * import { inspectFreshSockets } from "./sockopts.ts";
 * const table = inspectFreshSockets({ SO_SNDBUF: 8192 });
 * console.log(table.tcp.SO_SNDBUF); // 16384 on Linux: the kernel doubles it
 * ```
 */
export function inspectFreshSockets(settings: Record<string, number> = {}): OptionTable {
  using lib = new SocketOptions();
  const table = {} as OptionTable;
  for (const kind of ["tcp", "udp", "tcp6"] as const) {
    const fd = lib.open(kind);
    try {
      for (const [name, value] of Object.entries(settings)) {
        if (OPTIONS[name].on.includes(kind)) lib.set(fd, name, value);
      }
      table[kind] = lib.getAll(fd, kind);
    } finally {
      lib.closeFd(fd);
    }
  }
  return table;
}

// ---------------------------------------------------------------------------------------------
// Deno's own sockets

/**
 * Finds the descriptor behind one of this process's sockets by its ports: the one whose
 * getsockname() gives `localPort` and whose getpeername() gives `remotePort` (0: no peer, as for a
 * listener). It asks the sockets themselves, through the C library, so it needs no access to /proc.
 * Null when no such socket is open.
 */
export function findSocketFd(
  lib: SocketOptions,
  localPort: number,
  remotePort = 0,
  transport: "tcp" | "udp" = "tcp",
): number | null {
  const type = transport === "tcp" ? SOCK_STREAM : SOCK_DGRAM;
  for (let fd = 0; fd < MAX_FD_SEARCHED; fd++) {
    if (lib.port(fd) !== localPort || lib.socketType(fd) !== type) continue;
    if ((lib.port(fd, true) ?? 0) === remotePort) return fd;
  }
  return null;
}

/** What Deno sets on its own sockets, read off live loopback sockets. */
export interface DenoKnobs {
  listenReuseAddr: number;
  connNoDelay: [before: number, after: number];
  connKeepAlive: [before: number, after: number];
  datagramBroadcast: number | null;
}

/**
 * Opens a loopback listener and a connection with Deno's API, and reads their options through
 * their descriptors: `Deno.listen` sets SO_REUSEADDR, and `setNoDelay`/`setKeepAlive` flip
 * TCP_NODELAY/SO_KEEPALIVE on the live connection. Null if their descriptors cannot be found.
 */
export async function inspectDenoSockets(): Promise<DenoKnobs | null> {
  using lib = new SocketOptions();
  using listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  using conn = await Deno.connect({ hostname: "127.0.0.1", port: listener.addr.port });
  using _accepted = await listener.accept();
  const listenFd = findSocketFd(lib, listener.addr.port);
  const connFd = findSocketFd(lib, conn.localAddr.port, listener.addr.port);
  if (listenFd === null || connFd === null) return null;
  const noDelayBefore = lib.get(connFd, "TCP_NODELAY");
  conn.setNoDelay(true);
  const keepAliveBefore = lib.get(connFd, "SO_KEEPALIVE");
  conn.setKeepAlive(true);
  // Deno.listenDatagram needs --unstable-net.
  const udp = Deno.listenDatagram({ transport: "udp", hostname: "127.0.0.1", port: 0 });
  let datagramBroadcast: number | null;
  try {
    const udpFd = findSocketFd(lib, (udp.addr as Deno.NetAddr).port, 0, "udp");
    datagramBroadcast = udpFd === null ? null : lib.get(udpFd, "SO_BROADCAST");
  } finally {
    udp.close();
  }
  return {
    listenReuseAddr: lib.get(listenFd, "SO_REUSEADDR"),
    connNoDelay: [noDelayBefore, lib.get(connFd, "TCP_NODELAY")],
    connKeepAlive: [keepAliveBefore, lib.get(connFd, "SO_KEEPALIVE")],
    datagramBroadcast,
  };
}

// ---------------------------------------------------------------------------------------------
// Names: the tutorial's gethostbyname and getfqdn

/** What {@linkcode lookUpNames} found. */
export interface NameReport {
  hostname: string;
  fqdn: string;
  name: string;
  addresses: string[];
  reverse: Record<string, string | null>;
  interfaces: { name: string; address: string; family: string }[];
}

/** The tutorial's `gethostbyname` and `getfqdn`, plus the reverse lookup and the local interfaces. */
export async function lookUpNames(name?: string): Promise<NameReport> {
  const hostname = Deno.hostname();
  const target = name ?? hostname;
  let addresses: string[];
  try {
    addresses = (await lookup(target, { all: true })).map((a) => a.address);
  } catch (e) {
    const code = (e as { code?: string }).code;
    if (code === "ENOTFOUND" || code === "EAI_AGAIN" || code === "EAI_NONAME") {
      throw new LookupError(`cannot resolve ${target}`);
    }
    throw e;
  }
  const reverse: Record<string, string | null> = {};
  for (const address of addresses) {
    try {
      reverse[address] = (await lookupService(address, 0)).hostname;
    } catch {
      reverse[address] = null; // no reverse record: common, and not an error
    }
  }
  // Python's getfqdn: the first name for our own address that has a dot in it, else the hostname.
  let fqdn = hostname;
  try {
    const own = (await lookup(hostname)).address;
    const back = (await lookupService(own, 0)).hostname;
    if (back.includes(".")) fqdn = back;
  } catch {
    // no address or no reverse record for our own name: the hostname is the best answer
  }
  const interfaces = Deno.networkInterfaces().map((i) => ({
    name: i.name,
    address: i.address,
    family: i.family,
  }));
  return { hostname, fqdn, name: target, addresses, reverse, interfaces };
}

// ---------------------------------------------------------------------------------------------
// Command line

const USAGE = `usage: sockopts.ts [--set NAME=VALUE]... [--json]
       sockopts.ts host [NAME] [--json]`;

const HELP = `${USAGE}

Shows the options the kernel reports for a fresh TCP, UDP and IPv6 TCP socket, read with
getsockopt() through FFI, and what Deno sets on its own sockets. With --set, sets options first
and shows what was asked beside what the kernel made of it.

  --set NAME=VALUE   set an option before reading (repeatable); NAME is one of:
                     ${Object.keys(OPTIONS).join(", ")}
  --json             print {"tcp": {...}, "udp": {...}, "tcp6": {...}} instead of a table
  host [NAME]        hostname, FQDN, the addresses NAME resolves to, reverse lookups, interfaces`;

/** A bad command line: main() prints it with the usage and exits 2. */
class UsageError extends Error {}

/** Parses `NAME=VALUE` settings. */
export function parseSettings(items: string[]): Record<string, number> {
  const settings: Record<string, number> = {};
  for (const item of items) {
    const match = /^([A-Z0-9_]+)=(-?\d+)$/.exec(item);
    if (!match) throw new UsageError(`--set wants NAME=INTEGER, not "${item}"`);
    if (!(match[1] in OPTIONS)) {
      throw new UsageError(`unknown option ${match[1]}; known: ${Object.keys(OPTIONS).join(", ")}`);
    }
    const value = Number(match[2]);
    if (value < -(2 ** 31) || value >= 2 ** 31) {
      throw new UsageError(`${match[1]}=${match[2]} does not fit in an int`);
    }
    settings[match[1]] = value;
  }
  return settings;
}

const TITLES: Record<SocketKind, string> = {
  tcp: "TCP socket (AF_INET, SOCK_STREAM)",
  udp: "UDP socket (AF_INET, SOCK_DGRAM)",
  tcp6: "IPv6 TCP socket (AF_INET6, SOCK_STREAM)",
};

/** Formats the table of options, with asked-for values beside the effective ones. */
export function formatTable(table: OptionTable, settings: Record<string, number>): string {
  const lines: string[] = [];
  for (const kind of ["tcp", "udp", "tcp6"] as const) {
    lines.push(TITLES[kind]);
    for (const [name, value] of Object.entries(table[kind])) {
      const asked = name in settings ? `set ${settings[name]} -> ` : "";
      lines.push(`  ${name.padEnd(14)} ${(asked + value).padStart(16)}   ${OPTIONS[name].note}`);
    }
    lines.push("");
  }
  return lines.join("\n");
}

function formatKnobs(k: DenoKnobs | null): string {
  if (!k) {
    return "Deno's own sockets: not shown (their descriptors could not be found)";
  }
  const lines = [
    "Deno's own sockets, read on live loopback sockets",
    `  Deno.listen(): SO_REUSEADDR = ${k.listenReuseAddr}   (set for you: a restarted server rebinds at once)`,
    `  conn.setNoDelay(true): TCP_NODELAY ${k.connNoDelay[0]} -> ${k.connNoDelay[1]}`,
    `  conn.setKeepAlive(true): SO_KEEPALIVE ${k.connKeepAlive[0]} -> ${k.connKeepAlive[1]}`,
  ];
  if (k.datagramBroadcast !== null) {
    lines.push(`  Deno.listenDatagram(): SO_BROADCAST = ${k.datagramBroadcast}`);
  }
  return lines.join("\n");
}

function formatNames(r: NameReport): string {
  const lines = [
    `hostname  ${r.hostname}   (socket.gethostname)`,
    `fqdn      ${r.fqdn}   (socket.getfqdn)`,
    `${r.name} resolves to (socket.gethostbyname):`,
    ...r.addresses.map((a) => `  ${a.padEnd(40)} reverse: ${r.reverse[a] ?? "(none)"}`),
    "interfaces:",
    ...r.interfaces.map((i) => `  ${i.name.padEnd(10)} ${i.family.padEnd(5)} ${i.address}`),
  ];
  return lines.join("\n");
}

/** The command line. */
async function main(): Promise<void> {
  let parsed;
  try {
    parsed = parseFlags(Deno.args, {
      set: { type: "string", multiple: true },
      json: { type: "boolean" },
      help: { type: "boolean", short: "h" },
    });
  } catch (e) {
    if (!(e instanceof UsageError)) throw e;
    console.error(`sockopts: ${e.message}\n${USAGE}`);
    Deno.exit(2);
  }
  const { values: v, positionals } = parsed;
  if (v.help) return console.log(HELP);
  try {
    if (positionals[0] === "host") {
      if (positionals.length > 2) throw new UsageError(`unexpected argument "${positionals[2]}"`);
      if (v.set) throw new UsageError("--set does not apply to host");
      const report = await lookUpNames(positionals[1]);
      console.log(v.json ? JSON.stringify(report) : formatNames(report));
      return;
    }
    if (positionals.length > 0) throw new UsageError(`unexpected argument "${positionals[0]}"`);
    const settings = parseSettings(v.set ?? []);
    const table = inspectFreshSockets(settings);
    if (v.json) return console.log(JSON.stringify(table));
    console.log(formatTable(table, settings));
    console.log(formatKnobs(await inspectDenoSockets()));
  } catch (e) {
    if (e instanceof UsageError) {
      console.error(`sockopts: ${e.message}\n${USAGE}`);
      Deno.exit(2);
    }
    if (e instanceof LookupError) {
      console.error(`sockopts: ${e.message}`);
      Deno.exit(1);
    }
    if (e instanceof LibcError) {
      console.error(`sockopts: ${e.message}`);
      if (e instanceof RefusedSettingError) Deno.exit(2);
      console.error(
        "sockopts: without FFI, Deno itself exposes only setNoDelay() and setKeepAlive() on a live connection",
      );
      Deno.exit(1);
    }
    if (e instanceof Deno.errors.NotCapable || e instanceof Deno.errors.PermissionDenied) {
      console.error(
        `sockopts: ${e.message.split("\n")[0]} (it needs --allow-ffi --allow-net, and --allow-sys for host)`,
      );
      Deno.exit(1);
    }
    throw e;
  }
}

if (import.meta.main) await main();
