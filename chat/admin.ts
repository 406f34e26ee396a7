/**
 * chat/admin.ts: `--admin PORT`, health, readiness and Prometheus metrics for an operator's tools.
 * A part of chat_server.ts, loaded only when the flag is given (see its section 5).
 *
 * @module
 */

import {
  ACCEPT_PAUSE_MS,
  type AdminDoor,
  type ChatServer,
  type ChatServerOptions,
  closeQuietly,
  DEFAULT_ADMIN_HOST,
  DEFAULT_HTTP_TIMEOUT,
  delay,
  ignore,
  listenForClients,
  nodeBuiltin,
} from "../chat_server.ts";
import { readHead, respond, WebListenError } from "./http.ts";

/** Opens the admin port for a server; throws WebListenError (named for --admin) if it cannot be had. */
export function openAdmin(server: ChatServer, options: NonNullable<ChatServerOptions["admin"]>): AdminDoor {
  return new AdminGate(server, options);
}

/**
 * --admin PORT: what an operator's tools ask a running instance, on a port of its own (by default on
 * 127.0.0.1 only: metrics are not for the public). GET /healthz is 200 while the process serves;
 * GET /readyz is 200 while it accepts clients and, with --redis, Redis answers, and 503 from the
 * moment shutdown begins, so that a load balancer stops sending people to an instance on its way
 * out; GET /metrics is the Prometheus text format. Requests are read with the web side's bounds.
 */
class AdminGate implements AdminDoor {
  readonly server: ChatServer;
  readonly listener: Deno.TcpListener;
  readonly finished: Promise<void>;
  private readonly started = Date.now();
  private readonly answering = new Set<Promise<void>>();

  /** Listens; throws WebListenError (named for --admin) if the port cannot be had. */
  constructor(server: ChatServer, options: NonNullable<ChatServerOptions["admin"]>) {
    this.server = server;
    const host = options.host ?? DEFAULT_ADMIN_HOST;
    try {
      this.listener = listenForClients(host, options.port);
    } catch (e) {
      throw new WebListenError(options.port, host, e, "the admin port");
    }
    this.finished = this.acceptAll();
  }

  get addr(): Deno.NetAddr {
    return this.listener.addr;
  }

  // Serves until shutdown() closes the listener: it outlives the chat's own loop, saying 503.
  private async acceptAll(): Promise<void> {
    for (;;) {
      let conn: Deno.TcpConn;
      try {
        conn = await this.listener.accept();
      } catch (e) {
        if (e instanceof Deno.errors.BadResource || e instanceof Deno.errors.Interrupted) return;
        await delay(ACCEPT_PAUSE_MS); // out of descriptors: the chat comes first
        continue;
      }
      const answering = this.answer(conn).catch(ignore).finally(() => this.answering.delete(answering));
      this.answering.add(answering);
    }
  }

  private async answer(conn: Deno.TcpConn): Promise<void> {
    const request = await readHead(conn, DEFAULT_HTTP_TIMEOUT * 1000);
    if (!request) return closeQuietly(conn);
    const { method, path } = request;
    if (method !== "GET" && method !== "HEAD") return respond(conn, 405, "GET only\n");
    const head = method === "GET";
    if (path === "/healthz") return respond(conn, 200, "ok\n", undefined, head);
    if (path === "/readyz") {
      const why = this.unready();
      return respond(conn, why ? 503 : 200, (why ?? "ready") + "\n", undefined, head);
    }
    if (path === "/metrics") return respond(conn, 200, this.metrics(), PROMETHEUS_TYPE, head);
    return respond(conn, 404, "Not found: /healthz, /readyz and /metrics are here\n");
  }

  /** Why the instance should not be sent clients now, or null if it should. */
  unready(): string | null {
    const { server } = this;
    if (server.closing) return "shutting down";
    if (server.bus && !server.bus.up) return "Redis does not answer";
    return null;
  }

  /** The metrics, in the Prometheus text format (version 0.0.4). */
  metrics(): string {
    const { server } = this;
    const doors = { telnet: 0, tls: 0, web: 0 };
    let queued = 0;
    for (const client of server.clients) {
      doors[
        client.link.door ?? "telnet"
      ]++;
      queued += client.queued;
    }
    let rooms = 0;
    for (const room of server.directory.allRooms()) if (room.members.size > 0) rooms++;
    const out: string[] = [];
    const metric = (name: string, type: string, help: string, samples: [string, number][]) => {
      out.push(`# HELP ${name} ${help}`, `# TYPE ${name} ${type}`);
      for (const [labels, value] of samples) out.push(`${name}${labels} ${value}`);
    };
    const by = (label: string, counts: Record<string, number>): [string, number][] =>
      Object.entries(counts).map(([key, n]) => [`{${label}="${key}"}`, n]);
    metric("chat_clients", "gauge", "Clients connected, by the door they came in by.", by("door", doors));
    metric("chat_rooms", "gauge", "Rooms with members on this instance.", [["", rooms]]);
    metric("chat_lines_total", "counter", "Lines received from clients.", [["", server.linesIn]]);
    metric("chat_deliveries_total", "counter", "Lines and notices queued for clients.", [[
      "",
      server.flusher.delivered,
    ]]);
    const dropped = { ...server.limits.dropped, sendq: server.flusher.cutOff };
    metric("chat_dropped_total", "counter", "Clients sent off, by reason.", by("reason", dropped));
    metric(
      "chat_refused_total",
      "counter",
      "Connections turned away, by reason.",
      by("reason", server.limits.refused),
    );
    metric("chat_send_queue_bytes", "gauge", "Bytes waiting to be written to clients.", [["", queued]]);
    metric("chat_behind_clients", "gauge", "Clients more than a quarter of --sendq behind.", [[
      "",
      server.flusher.congested.size,
    ]]);
    if (server.bus) {
      metric("chat_redis_up", "gauge", "1 while Redis answers.", [["", server.bus.up ? 1 : 0]]);
      metric("chat_redis_backlog_bytes", "gauge", "Bytes of lines waiting for Redis.", [[
        "",
        server.bus.waitingBytes,
      ]]);
    }
    const cpu = nodeBuiltin<typeof import("node:process")>("node:process").cpuUsage(); // loaded only here
    metric("process_cpu_seconds_total", "counter", "User and system CPU time spent, in seconds.", [[
      "",
      (cpu.user + cpu.system) / 1e6,
    ]]);
    metric("process_resident_memory_bytes", "gauge", "Resident memory size, in bytes.", [[
      "",
      Deno.memoryUsage().rss,
    ]]);
    metric("process_start_time_seconds", "gauge", "Start time of the process since the epoch, in seconds.", [[
      "",
      Math.floor(this.started / 1000),
    ]]);
    const fds = openDescriptors();
    if (fds !== null) metric("process_open_fds", "gauge", "Open file descriptors.", [["", fds]]);
    return out.join("\n") + "\n";
  }

  /** Closes the port, once the answers under way are out: the last thing a shutdown does. */
  async shutdown(): Promise<void> {
    closeQuietly(this.listener);
    await this.finished;
    await Promise.all(this.answering);
  }
}

/** The Prometheus text format's content type. */
const PROMETHEUS_TYPE = "text/plain; version=0.0.4; charset=utf-8";

/** How many descriptors this process has open (Linux's /proc), or null where that cannot be read. */
function openDescriptors(): number | null {
  try {
    let n = 0;
    for (const _ of Deno.readDirSync("/proc/self/fd")) n++;
    return n;
  } catch {
    return null;
  }
}
