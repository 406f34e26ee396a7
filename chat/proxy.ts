/**
 * chat/proxy.ts: `--proxy-from CIDR`, the PROXY protocol a load balancer writes before its client's
 * bytes. A part of chat_server.ts, loaded only when the flag is given (see its section 5): the
 * core hands it each connection from a trusted proxy, and it serves the connection as the client
 * the header names.
 *
 * @module
 */

import {
  type ChatServer,
  closeQuietly,
  decoder,
  DEFAULT_HANDSHAKE_TIMEOUT,
  formatPeer,
  isDisconnect,
  nodeNet,
  plainHost,
  type Stream,
} from "../chat_server.ts";

/** Carriage return and line feed, as bytes. */
const CR = 13, NL = 10;

/**
 * The PROXY protocol (HAProxy's, versions 1 and 2), as a load balancer's `send-proxy` or
 * `send-proxy-v2` writes it before the client's bytes: who the client is. Read only from a trusted
 * proxy (--proxy-from), with bounds: a v1 line is at most 107 bytes, a v2 header's length is checked
 * before it is read, and the whole must come within the handshake timeout.
 */
const PROXY_V1_MAX = 107;
const PROXY_V2_SIGNATURE = [0x0d, 0x0a, 0x0d, 0x0a, 0x00, 0x0d, 0x0a, 0x51, 0x55, 0x49, 0x54, 0x0a];
/** The most a v2 header may carry after its 16 bytes: addresses (216 at most) and some TLVs. */
const PROXY_V2_MAX = 1024;

/** Whose connection it is: the client's address and port, or null (LOCAL, UNKNOWN: the proxy's own); and the bytes after the header. */
interface ProxyHeader {
  hostname: string | null;
  port: number;
  rest: Uint8Array;
}

/** A PROXY header that is missing, late, too long or malformed: the connection is closed, with this line logged. */
export class ProxyHeaderError extends Error {}

/** Reads a PROXY header (v1 or v2) within `ms`; throws a ProxyHeaderError that says what was wrong. */
export async function readProxyHeader(conn: Deno.Conn, ms: number): Promise<ProxyHeader> {
  const buffer = new Uint8Array(16 + PROXY_V2_MAX);
  let filled = 0, late = false;
  const timer = setTimeout(() => (late = true, closeQuietly(conn)), ms);
  const need = async (count: number) => {
    while (filled < count) {
      const n = await conn.read(buffer.subarray(filled)).catch((e) => {
        if (late) throw new ProxyHeaderError(`no PROXY header within ${ms / 1000} s`);
        if (isDisconnect(e)) return null;
        throw e;
      });
      if (n === null) throw new ProxyHeaderError("the proxy closed before its PROXY header was whole");
      filled += n;
    }
  };
  try {
    await need(12);
    if (PROXY_V2_SIGNATURE.every((b, i) => buffer[i] === b)) {
      await need(16);
      const length = (buffer[14] << 8) | buffer[15];
      if (length > PROXY_V2_MAX) throw new ProxyHeaderError(`a PROXY v2 header of ${length} bytes`);
      await need(16 + length);
      return { ...parseProxyV2(buffer.subarray(0, 16 + length)), rest: buffer.slice(16 + length, filled) };
    }
    if (decoder.decode(buffer.subarray(0, 6)) !== "PROXY ") throw new ProxyHeaderError("no PROXY header");
    let end = -1;
    for (;;) {
      end = buffer.subarray(0, filled).findIndex((b, i) =>
        b === CR && buffer[i + 1] === NL && i + 1 < filled
      );
      if (end >= 0 || filled >= PROXY_V1_MAX) break;
      await need(filled + 1);
    }
    if (end < 0 || end + 2 > PROXY_V1_MAX) {
      throw new ProxyHeaderError(`a PROXY v1 line over ${PROXY_V1_MAX} bytes`);
    }
    return { ...parseProxyV1(decoder.decode(buffer.subarray(0, end))), rest: buffer.slice(end + 2, filled) };
  } finally {
    clearTimeout(timer);
  }
}

/** `PROXY TCP4|TCP6 SRC DST SPORT DPORT`, or `PROXY UNKNOWN ...` (the proxy's own connection). */
function parseProxyV1(line: string): { hostname: string | null; port: number } {
  const [, family, source, , sourcePort, , extra] = line.split(" ");
  if (family === "UNKNOWN") return { hostname: null, port: 0 };
  const version = family === "TCP4" ? 4 : family === "TCP6" ? 6 : 0;
  const port = Number(sourcePort);
  if (
    version === 0 || extra !== undefined || nodeNet().isIP(source ?? "") !== version ||
    !/^\d{1,5}$/.test(sourcePort ?? "") || port > 65535
  ) {
    throw new ProxyHeaderError(`a malformed PROXY v1 line: ${JSON.stringify(line.slice(0, PROXY_V1_MAX))}`);
  }
  return { hostname: source, port };
}

/** The v2 binary header: LOCAL (a health check: the proxy's own), or PROXY with TCP over IPv4 or IPv6. */
function parseProxyV2(header: Uint8Array): { hostname: string | null; port: number } {
  const version = header[12] >> 4, command = header[12] & 0x0f, family = header[13];
  if (version !== 2 || command > 1) {
    throw new ProxyHeaderError(`a PROXY v2 header of version ${version}, command ${command}`);
  }
  if (command === 0) return { hostname: null, port: 0 }; // LOCAL
  const body = header.subarray(16);
  if (family === 0x11 && body.length >= 12) {
    return { hostname: [...body.subarray(0, 4)].join("."), port: (body[8] << 8) | body[9] };
  }
  if (family === 0x21 && body.length >= 36) {
    const groups = Array.from({ length: 8 }, (_, i) => ((body[2 * i] << 8) | body[2 * i + 1]).toString(16));
    return {
      hostname: new URL(`http://[${groups.join(":")}]/`).hostname.slice(1, -1),
      port: (body[32] << 8) | body[33],
    };
  }
  if ((family & 0xf0) === 0x10 || (family & 0xf0) === 0x20) {
    throw new ProxyHeaderError("a PROXY v2 header too short for its addresses");
  }
  return { hostname: null, port: 0 }; // UNSPEC, UNIX: the spec says to use the connection's own endpoints
}

/** A connection from a trusted proxy: its PROXY header says whose it is, and it is served as that client. */
export async function acceptProxied(server: ChatServer, conn: Deno.TcpConn): Promise<void> {
  const proxy = formatPeer(conn.remoteAddr);
  let header: ProxyHeader;
  try {
    header = await readProxyHeader(
      conn,
      (server.options.handshakeTimeout ?? DEFAULT_HANDSHAKE_TIMEOUT) * 1000,
    );
  } catch (e) {
    if (!(e instanceof ProxyHeaderError)) throw e;
    console.error(`Dropped ${proxy}: ${e.message}`);
    return closeQuietly(conn);
  }
  if (server.closing) return closeQuietly(conn);
  const { hostname, port } = header;
  const from = hostname === null ? conn.remoteAddr : { ...conn.remoteAddr, hostname, port };
  const link = header.rest.length > 0 ? new Replayed(conn, header.rest) : conn;
  server.serveConnection(link, formatPeer(from), plainHost(from.hostname));
}

/** A connection whose first bytes were already read (past a PROXY header): they are read again first. */
class Replayed implements Stream {
  private readonly conn: Deno.Conn;
  private rest: Uint8Array;

  constructor(conn: Deno.Conn, rest: Uint8Array) {
    this.conn = conn;
    this.rest = rest;
  }

  read(p: Uint8Array): Promise<number | null> {
    if (this.rest.length === 0) return this.conn.read(p);
    const n = Math.min(p.length, this.rest.length);
    p.set(this.rest.subarray(0, n));
    this.rest = this.rest.subarray(n);
    return Promise.resolve(n);
  }

  write(p: Uint8Array): Promise<number> {
    return this.conn.write(p);
  }

  close(): void {
    this.conn.close();
  }
}
