/**
 * chat/http.ts: the little HTTP that chat_server.ts's web door and admin port both speak: one
 * request a connection, its head read with a size cap and a deadline, and a whole response. A
 * leaf shared by two parts (chat/web.ts and chat/admin.ts); it imports only the core.
 *
 * @module
 */

import {
  closeQuietly,
  concatBytes,
  decoder,
  encoder,
  isDisconnect,
  settleWithin,
  SHUTDOWN_GRACE_MS,
  StartError,
  writeAll,
} from "../chat_server.ts";

/** Carriage return and line feed, as bytes. */
const CR = 13, NL = 10;

/** The longest request head read; a longer one is answered 431. */
const HTTP_HEAD_BYTES = 8192;

/** The web page's port could not be listened on (the chat port itself was fine). */
export class WebListenError extends StartError {
  constructor(
    readonly port: number,
    readonly host: string | undefined,
    override readonly cause: unknown,
    what = "the web page",
  ) {
    super(
      `cannot serve ${what} on ${host ?? "all interfaces"}, port ${port}: ${
        cause instanceof Deno.errors.AddrInUse ? "the port is already in use" : (cause as Error).message
      }`,
    );
  }
}
/** One HTTP request head, and what came after it on the connection. */
export interface HttpRequest {
  method: string;
  path: string;
  query: URLSearchParams;
  headers: Map<string, string>;
  rest: Uint8Array;
}

/**
 * Reads a request head (up to the blank line) within `ms` and HTTP_HEAD_BYTES; null if it is
 * late, too big, malformed, or the peer leaves (then the connection is closed, or answered).
 */
export async function readHead(conn: Deno.Conn, ms: number): Promise<HttpRequest | null> {
  const buffer = new Uint8Array(HTTP_HEAD_BYTES);
  let filled = 0;
  const timer = setTimeout(() => closeQuietly(conn), ms); // a pending read then fails
  try {
    for (;;) {
      const end = findHeadEnd(buffer, filled);
      if (end >= 0) return parseHead(buffer.subarray(0, end), buffer.slice(end + 4, filled));
      if (filled === buffer.length) {
        await respond(conn, 431, "Request head too large\n");
        return null;
      }
      const n = await conn.read(buffer.subarray(filled));
      if (n === null) return null;
      filled += n;
    }
  } catch (e) {
    if (!isDisconnect(e)) throw e;
    return null;
  } finally {
    clearTimeout(timer);
  }
}

/** Where the blank line that ends a head starts (the CRLFCRLF), or -1. */
function findHeadEnd(bytes: Uint8Array, length: number): number {
  for (let i = 3; i < length; i++) {
    if (bytes[i] === NL && bytes[i - 1] === CR && bytes[i - 2] === NL && bytes[i - 3] === CR) return i - 3;
  }
  return -1;
}

function parseHead(head: Uint8Array, rest: Uint8Array): HttpRequest | null {
  const [requestLine, ...lines] = decoder.decode(head).split("\r\n");
  const m = /^([A-Z]+) (\S+) HTTP\/1\.[01]$/.exec(requestLine);
  if (!m) return null;
  const headers = new Map<string, string>();
  for (const line of lines) {
    const colon = line.indexOf(":");
    if (colon > 0) headers.set(line.slice(0, colon).trim().toLowerCase(), line.slice(colon + 1).trim());
  }
  const [path, query = ""] = m[2].split("?", 2);
  return { method: m[1], path, query: new URLSearchParams(query), headers, rest };
}

const STATUS_TEXT: Record<number, string> = {
  200: "OK",
  405: "Method Not Allowed",
  400: "Bad Request",
  403: "Forbidden",
  404: "Not Found",
  426: "Upgrade Required",
  431: "Request Header Fields Too Large",
  503: "Service Unavailable",
};

/**
 * Writes a whole response (within the grace period) and closes the connection: one request each.
 * A HEAD is answered with the same head and no body.
 */
export async function respond(
  conn: Deno.Conn,
  status: number,
  body: string,
  type = "text/plain; charset=utf-8",
  withBody = true,
) {
  const full = encoder.encode(body);
  const bytes = withBody ? full : full.subarray(0, 0);
  const head = `HTTP/1.1 ${status} ${STATUS_TEXT[status]}\r\ncontent-type: ${type}\r\n` +
    `content-length: ${full.length}\r\ncache-control: no-store\r\nconnection: close\r\n` +
    (status === 426 ? "upgrade: websocket\r\nsec-websocket-version: 13\r\n" : "") + "\r\n";
  try {
    await settleWithin(SHUTDOWN_GRACE_MS, [
      writeAll(conn, concatBytes([encoder.encode(head), bytes], head.length + bytes.length)),
    ]);
  } finally {
    closeQuietly(conn);
  }
}
