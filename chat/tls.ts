/**
 * chat/tls.ts: `--tls-cert` and `--tls-key`, TLS on the chat port. A part of chat_server.ts,
 * loaded only when the flags are given (see its section 5): the core hands each new connection to
 * the TlsDoor this part opens, which admits it once its handshake is complete.
 *
 * @module
 */

import type { Duplex } from "node:stream";
import type { SecureContext, TLSSocket } from "node:tls";
import {
  type ChatServer,
  closeQuietly,
  READ_SIZE,
  refuse,
  SHUTDOWN_GRACE_MS,
  StartError,
  type Stream,
  type TlsDoor,
  writeAll,
} from "../chat_server.ts";

/** TLS refusals under way at once; past this, a refused connection is closed without a word. */
const MAX_TLS_REFUSALS = 64;
/** How long a refused TLS client gets to complete its handshake and read why. */
const TLS_REFUSAL_MS = 1000;

/** The TLS certificate or key cannot be used. */
export class TlsSetupError extends StartError {
  constructor(why: string) {
    super(`cannot serve TLS: ${why}`);
  }
}

/** Opens TLS for a server; see TlsGate. */
export function openTls(
  server: ChatServer,
  pem: { cert: string; key: string },
  timeoutSeconds: number,
): Promise<TlsDoor> {
  return TlsGate.open(server, pem, timeoutSeconds);
}

/**
 * TLS for the chat port. Connections are accepted as plain TCP, and node:tls runs over each one,
 * so the descriptor is ours to free: a peer that never completes its handshake is closed at the
 * timeout. (Deno.listenTls keeps the descriptor of a connection closed before its handshake until
 * the peer leaves: 500 silent peers held 500 descriptors.) Connections still handshaking count
 * against --max-clients and --max-per-ip, and a failed handshake is one line in the log, never a
 * join in the room.
 */
/** What TLS needs of node's modules, loaded by TlsGate.open() when the server serves TLS. */
let nodeTls: {
  TLSSocket: typeof TLSSocket;
  Duplex: typeof Duplex;
  Buffer: typeof import("node:buffer").Buffer;
};

class TlsGate implements TlsDoor {
  readonly server: ChatServer;
  readonly context: SecureContext;
  readonly timeoutMs: number;
  private refusing = 0;

  private constructor(server: ChatServer, context: SecureContext, timeoutSeconds: number) {
    this.server = server;
    this.context = context;
    this.timeoutMs = timeoutSeconds * 1000;
  }

  /**
   * Loads node:tls (only a TLS server pays for it) and checks that the certificate and key are a
   * usable pair; throws a TlsSetupError if not.
   */
  static async open(
    server: ChatServer,
    pem: { cert: string; key: string },
    timeoutSeconds: number,
  ): Promise<TlsGate> {
    const [{ createPrivateKey, X509Certificate }, tls, stream, buffer] = await Promise.all([
      import("node:crypto"),
      import("node:tls"),
      import("node:stream"),
      import("node:buffer"),
    ]);
    nodeTls = { TLSSocket: tls.TLSSocket, Duplex: stream.Duplex, Buffer: buffer.Buffer };
    let certificate;
    try {
      certificate = new X509Certificate(pem.cert);
    } catch (e) {
      throw new TlsSetupError(`the certificate is not a PEM certificate (${(e as Error).message})`);
    }
    let key;
    try {
      key = createPrivateKey(pem.key);
    } catch (e) {
      throw new TlsSetupError(`the key is not a PEM private key (${(e as Error).message})`);
    }
    if (!certificate.checkPrivateKey(key)) {
      throw new TlsSetupError("the key does not belong to the certificate");
    }
    return new TlsGate(server, tls.createSecureContext({ cert: pem.cert, key: pem.key }), timeoutSeconds);
  }

  /** Completes the handshake, then admits the client and reads it, or tells it why not. */
  async accept(conn: Stream, address: string, ip: string, refused: string | null): Promise<void> {
    if (refused) {
      console.error(`Refused ${address}: ${refused}`);
      if (this.refusing >= MAX_TLS_REFUSALS) return closeQuietly(conn);
      this.refusing++;
      try {
        const link = await startTls(conn, this.context, Math.min(this.timeoutMs, TLS_REFUSAL_MS), address);
        if (link) await refuse(link, refused);
      } finally {
        this.refusing--;
      }
      return;
    }
    const limits = this.server.limits;
    limits.holdPending(ip);
    let link: TlsConn | null;
    try {
      link = await startTls(conn, this.context, this.timeoutMs, address);
    } finally {
      limits.releasePending(ip);
    }
    if (link && !this.server.closing) this.server.receive(this.server.admit(link, address, ip), link);
    else link?.close();
  }
}

/**
 * Runs a server-side TLS handshake over `conn`; resolves to the secure connection, or to null
 * (logged, and `conn` closed) if it fails or takes longer than `ms`.
 */
function startTls(
  conn: Stream,
  context: SecureContext,
  ms: number,
  address: string,
): Promise<TlsConn | null> {
  const socket = new nodeTls.TLSSocket(duplexOver(conn), { isServer: true, secureContext: context });
  return new Promise((resolve) => {
    const fail = (why: string) => {
      clearTimeout(timer);
      console.error(`TLS handshake with ${address} failed: ${why}`);
      socket.destroy();
      closeQuietly(conn);
      resolve(null);
    };
    const timer = setTimeout(() => fail(`no handshake within ${ms / 1000} s`), ms);
    const onError = (e: Error) => fail(e.message);
    socket.once("error", onError);
    socket.once("secure", () => {
      clearTimeout(timer);
      socket.removeListener("error", onError);
      resolve(new TlsConn(socket, conn));
    });
  });
}

/** A Deno.Conn as a node stream, for node:tls to run over. */
function duplexOver(conn: Stream): Duplex {
  const buffer = new Uint8Array(READ_SIZE);
  return new nodeTls.Duplex({
    read() {
      conn.read(buffer).then(
        (n) => this.push(n === null ? null : nodeTls.Buffer.from(buffer.subarray(0, n))),
        (e) => this.destroy(e),
      );
    },
    write(chunk: Uint8Array, _encoding, done) {
      writeAll(conn, chunk).then(() => done(), done);
    },
    destroy(e, done) {
      closeQuietly(conn);
      done(e);
    },
  });
}

/**
 * A secure connection, read and written as the server reads and writes a Deno.Conn. What the peer
 * sends waits here until read() asks for it; meanwhile the socket is paused, so TCP holds the
 * peer back, as it does for a plain connection that is not read.
 */
class TlsConn implements Stream {
  readonly door = "tls";
  private readonly socket: TLSSocket;
  private readonly conn: Stream;
  private readonly chunks: Uint8Array[] = [];
  private ended = false;
  private failure: Error | null = null;
  private wake: (() => void) | null = null;

  constructor(socket: TLSSocket, conn: Stream) {
    this.socket = socket;
    this.conn = conn;
    const woken = () => {
      const wake = this.wake;
      this.wake = null;
      wake?.();
    };
    socket.on("data", (chunk: Uint8Array) => {
      this.chunks.push(chunk);
      socket.pause();
      woken();
    });
    socket.on("end", () => (this.ended = true, woken()));
    socket.on("close", () => (this.ended = true, woken()));
    socket.on("error", (e: Error) => (this.failure = new Deno.errors.ConnectionReset(e.message), woken()));
  }

  async read(p: Uint8Array): Promise<number | null> {
    while (this.chunks.length === 0) {
      if (this.failure) throw this.failure;
      if (this.ended) return null;
      this.socket.resume();
      await new Promise<void>((resolve) => this.wake = resolve);
    }
    const chunk = this.chunks[0];
    const n = Math.min(p.length, chunk.length);
    p.set(chunk.subarray(0, n));
    if (n === chunk.length) this.chunks.shift();
    else this.chunks[0] = chunk.subarray(n);
    return n;
  }

  write(p: Uint8Array): Promise<number> {
    return new Promise((resolve, reject) => {
      if (this.failure || this.socket.destroyed) {
        return reject(new Deno.errors.BrokenPipe("TLS connection closed"));
      }
      this.socket.write(p, (e) => e ? reject(new Deno.errors.BrokenPipe(e.message)) : resolve(p.length));
    });
  }

  /** Ends the session with close_notify once what is written is out; gives up after the grace period. */
  close(): void {
    if (this.socket.destroyed) return;
    const destroy = () => {
      clearTimeout(timer);
      this.socket.destroy();
      closeQuietly(this.conn);
    };
    const timer = setTimeout(destroy, SHUTDOWN_GRACE_MS);
    this.socket.end(destroy);
  }
}
