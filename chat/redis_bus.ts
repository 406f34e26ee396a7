/**
 * chat/redis_bus.ts: `--redis URL`, several chat_server.ts instances sharing their rooms through
 * Redis. A part of chat_server.ts, loaded only when the flag is given (see its section 5): the core
 * calls the Bus it starts, and the bus hands the rooms' lines back through the core's BusHandlers.
 *
 * Several chat_server.ts instances behind one TCP load balancer share their rooms through Redis.
 * Each room is a Redis stream, which every instance with members in it reads from its own
 * position, so that nothing is lost when an instance is cut off for a moment, and every instance
 * shows a room in one order (Socket.IO's Redis Streams adapter exists for the same reason). Who is
 * where lives in Redis too: a hash per instance, and a key per nick, all with an expiry that a
 * heartbeat renews, so that the members of a crashed instance vanish by themselves. If Redis goes
 * away, local chat goes on, and what was said meanwhile goes out when it returns.
 *
 * RedisBus is the facade the server calls. Its parts: RedisLink (the connections, and whether
 * Redis answers), Outbox (this instance's lines on their way in), StreamReader (the rooms' lines on
 * their way out), Epochs (whether a room's history is still the one this instance read) and
 * BusPresence (who is where, nicks, private lines).
 *
 * @module
 */

import { createClient } from "npm:redis@6.3.1"; // with the version, so that a copy without deno.json runs

import {
  answerWithin,
  type Bus,
  type BusHandlers,
  busHandlersFor,
  type ChatServer,
  checkRule,
  type Client,
  DEFAULT_MAX_LINE,
  delay,
  Directory,
  encoder,
  ignore,
  type KeptLine,
  lifts,
  lineText,
  MAX_BUS_TEXT,
  parseJson,
  plural,
  type Presence,
  REDIS_ANSWER_MS,
  type RedisOptions,
  type Rule,
  ruleField,
  safeBusText,
} from "../chat_server.ts";

/** Connects the bus for a server; see RedisBus. */
export function startBus(server: ChatServer, redis: RedisOptions): Bus {
  const { sendq, paceBytes } = server.flusher; // a read from Redis fits what a client behind has left
  const options = { historyLines: server.options.historyLines, maxLine: server.maxLine, ...redis };
  return new RedisBus(createClient, { readBytes: sendq - paceBytes, ...options }, busHandlersFor(server));
}

/** A client of npm:redis, as createClient() makes it (a type only: nothing is loaded for it). */
type RedisClient = ReturnType<CreateClient>;
type CreateClient = typeof createClient;

/**
 * Appends one entry to a room's stream, atomically: the room's epoch (made if the room has none:
 * a Redis that restarted empty, or was flushed), its position, and the entry, whose id is the
 * position: `SEQ-0` for a kept line, `SEQ-N` for the Nth announcement after it. A stream whose
 * last entry is not ours (someone typed `XADD ROOM * ...`: an id no position can pass) starts
 * again under a new epoch. Returns the epoch, the position, 1 if the epoch is new, 2 if it is new
 * because of such an entry, and that entry's id.
 */
const APPEND_SCRIPT = `
local epoch = redis.call('HGET', KEYS[1], 'epoch')
local fresh, rogue = 0, ''
local function position()
  if ARGV[2] == '1' then
    redis.call('HSET', KEYS[1], 'sub', 0)
    return redis.call('HINCRBY', KEYS[1], 'seq', 1), 0
  end
  return tonumber(redis.call('HGET', KEYS[1], 'seq')), redis.call('HINCRBY', KEYS[1], 'sub', 1)
end
local function start()
  epoch = ARGV[1]
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[1], 'epoch', epoch, 'seq', 0, 'sub', 0)
end
if not epoch then fresh = 1; start() end
local seq, sub = position()
local top = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', 1)[1]
if top then
  local s, n = string.match(top[1], '^(%d+)-(%d+)$')
  if tonumber(s) > seq or (tonumber(s) == seq and tonumber(n) >= sub) then
    fresh, rogue = 2, top[1]; start(); seq, sub = position()
  end
end
redis.call('XADD', KEYS[2], seq .. '-' .. sub, 'e', epoch, 'i', ARGV[3], 'l', ARGV[4], 'k', ARGV[2], 'd', ARGV[5], 't', ARGV[6], 'w', ARGV[8])
if ARGV[2] == '1' and seq > tonumber(ARGV[7]) then
  redis.call('XTRIM', KEYS[2], 'MINID', '~', seq - tonumber(ARGV[7]))
end
return {epoch, seq, fresh, rogue}`;

/** The epoch of a room Redis has no history for yet: the first line it keeps makes a real one. */
const NO_EPOCH = "00000000";

/** Bytes of lines that wait for Redis while it is away; past that the oldest are dropped, and said. */
export const BUS_QUEUE_BYTES = 16 * 1024 * 1024;
/**
 * Bytes of this instance's lines on their way to Redis, or waiting for it, past which its senders
 * wait while Redis is up but not answering (frozen, swapping): the queue then never has to drop.
 */
const BUS_PACE_BYTES = BUS_QUEUE_BYTES / 2;
/**
 * Lines this instance may have on their way through Redis before its senders wait (their reads
 * pause, as for a slow reader): a Redis that falls behind slows the chat rather than letting
 * lines pile up in memory and hours of latency.
 */
const BUS_IN_FLIGHT = 1000;

/**
 * KeptLine lines each room's stream holds (or --history-lines, if more): how far an instance may fall
 * behind a room before lines are trimmed from under it (it then says how many it lost).
 */
const STREAM_LINES = 10_000;

/**
 * Entries one read of the streams takes at most. A read also brings no more than `readBytes` of
 * the longest lines (RedisOptions), and the reader waits for a room's slow readers (the core, section 2)
 * before it reads again: a client behind is then never sent more than its queue holds at once.
 */
const READ_COUNT = 1000;

/** A room whose stream this instance reads: its epoch, and the id read up to (null: not yet). */
interface RoomStream {
  name: string;
  epoch: string | null;
  id: string | null;
  seq: number;
  /** How far the reader has got in each epoch it has seen: after a rewind it skips what it said. */
  seen: Map<string, string>;
}

/** A line this instance appended: who said it, when, and whether it has been said here already. */
interface Mine {
  sender: Client | null;
  message: Uint8Array;
  stream: RoomStream;
  kept: boolean;
  at: number;
  /** Said here already (Redis was late), so that reading it back only puts it in the history. */
  saidHere: boolean;
}

/** A line waiting for Redis, already said here. */
interface Queued {
  room: string;
  text: string;
  kept: boolean;
  /** Its number among this instance's lines, by which the others tell a line sent twice. */
  local: number;
}

/** How long this instance remembers its lines after reading them back, to send again if Redis lost them. */
const RECENT_MS = 3000;

/**
 * The bus over Redis. It is usable at once: `ready` settles when Redis first answers, and until
 * then (and whenever Redis is away) the server runs on its own.
 *
 * Room traffic goes through one Redis stream per room (APPEND_SCRIPT), which every instance with
 * members in the room reads from its own position, on a connection of its own, so that nothing
 * said while an instance was briefly cut off is lost, and everyone sees a room in one order.
 * Private lines and who-is-where use pub/sub and keys, as before.
 */
class RedisBus implements Bus {
  /** Settles when Redis first answers and the instance's channel is subscribed. */
  readonly ready: Promise<void>;
  readonly link: RedisLink;
  readonly handlers: BusHandlers;
  /** True while Redis answers. */
  get up(): boolean {
    return this.link.up;
  }
  /** KeptLine lines each room's stream holds. */
  readonly keep: number;
  /** The longest text said from the bus, in bytes: --max-line and room for a prefix. */
  readonly maxText: number;
  /** Entries one read of the streams takes: READ_COUNT, or fewer of the longest lines. */
  readonly readCount: number;
  readonly outbox: Outbox;
  readonly streams: StreamReader;
  readonly epochs: Epochs;
  readonly presence: BusPresence;
  readonly rules: BusRules;
  private readonly heartbeat: ReturnType<typeof setInterval>;

  constructor(
    createClient: CreateClient,
    options: RedisOptions,
    handlers: BusHandlers,
  ) {
    this.handlers = handlers;
    this.keep = Math.max(STREAM_LINES, options.historyLines ?? 0);
    this.maxText = (options.maxLine ?? DEFAULT_MAX_LINE) + BUS_PREFIX_BYTES;
    this.readCount = Math.max(
      1,
      Math.min(READ_COUNT, Math.floor((options.readBytes ?? Infinity) / this.maxText)),
    );
    const link = this.link = new RedisLink(createClient, options);
    this.presence = new BusPresence(link, handlers, this.maxText);
    this.rules = new BusRules(link, handlers, this.maxText);
    this.outbox = new Outbox(this);
    this.streams = new StreamReader(this);
    this.epochs = new Epochs(this);
    // Errors come once per failed attempt; the operator hears of a loss once, and of the recovery.
    // (Before Redis has ever answered, the caller reports that, once.)
    link.pub.on("error", (e: Error) => {
      if (link.up) handlers.say(`Redis unavailable (${e.message}): local chat goes on; reconnecting`);
      link.up = false;
      this.outbox.lost();
    });
    link.reader.on("ready", () => this.streams.identify());
    link.pub.on("ready", () => {
      link.up = true;
      this.outbox.loadScript();
      if (link.everUp) handlers.say("Redis is back: rooms are shared again");
      link.everUp = true;
      this.presence.restore().then(() => this.outbox.catchUp()).catch(ignore);
      this.rules.restore().catch(ignore);
    });
    this.heartbeat = setInterval(() => this.beat(), Math.max(200, Math.min(1000, link.expiry * 1000 / 3)));
    const connecting = link.connect();
    connecting.catch(ignore);
    this.ready = connecting.then(async () => {
      await link.sub.subscribe(link.key("instance", link.instance), this.presence.onMessage);
      await link.sub.subscribe(link.key("reset"), this.epochs.onReset);
      await link.sub.subscribe(link.key("rules"), this.rules.onMessage);
      await this.epochs.check(); // the lobby's stream is read from here on
    });
    this.ready.catch(ignore);
    this.streams.start();
  }

  get instance(): string {
    return this.link.instance;
  }

  // Each part's tick: lines Redis is late with, the expiry of who is where, and a catch-up or a
  // check of the rooms' epochs (so that a flush nobody has written to since is noticed).
  private beat(): void {
    this.outbox.sayLate(Date.now());
    if (!this.link.up) return;
    this.presence.renew();
    this.outbox.tick();
  }

  send(room: string, message: Uint8Array, kept: boolean, sender: Client | null): boolean {
    return this.outbox.send(room, message, kept, sender);
  }

  watch(room: string): void {
    this.streams.watch(room);
  }

  unwatch(room: string): void {
    this.streams.unwatch(room);
  }

  knows(room: string): boolean {
    return this.streams.knows(room);
  }

  get behind(): boolean {
    return this.outbox.behind;
  }

  caughtUp(): Promise<void> {
    return this.outbox.caughtUp();
  }

  /** Bytes of lines waiting for Redis, at most BUS_QUEUE_BYTES. */
  get waitingBytes(): number {
    return this.outbox.waitingBytes;
  }

  whisper(nick: string, text: string): Promise<boolean> {
    return this.presence.whisper(nick, text);
  }

  claimNick(nick: string): Promise<boolean> {
    return this.presence.claimNick(nick);
  }

  releaseNick(nick: string): void {
    this.presence.releaseNick(nick);
  }

  present(who: Presence): void {
    this.presence.present(who);
  }

  absent(address: string): void {
    this.presence.absent(address);
  }

  others(): Promise<Presence[] | null> {
    return this.presence.others();
  }

  share(rule: Rule): void {
    this.rules.share(rule);
  }

  async close(): Promise<void> {
    this.link.closed = true;
    clearInterval(this.heartbeat);
    this.streams.stop();
    this.outbox.releaseSenders();
    await this.presence.withdraw();
    this.link.destroy();
    await this.streams.finished;
  }
}

/**
 * The connections to Redis, and whether it answers: what every part of the bus shares. `pub`
 * carries commands and appends, `sub` this instance's channels, `reader` the blocking reads of
 * the rooms' streams.
 */
class RedisLink {
  readonly instance = crypto.randomUUID().slice(0, 12);
  readonly prefix: string;
  /** Seconds after which a crashed instance's members leave the directory. */
  readonly expiry: number;
  readonly pub: RedisClient;
  readonly sub: RedisClient;
  readonly reader: RedisClient;
  /** Redis answers (`pub` is ready and has not failed since). */
  up = false;
  everUp = false;
  closed = false;

  constructor(createClient: CreateClient, options: RedisOptions) {
    this.prefix = options.prefix ?? "chat";
    this.expiry = options.expiry ?? 30;
    const socket = {
      reconnectStrategy: (tries: number) => Math.min(100 * 2 ** tries, 3000),
      connectTimeout: 2000,
    };
    // No command timeout: a command that times out before it is written is never sent, and sending
    // it again later would put it after lines said after it. A Redis that is slow is paced instead.
    this.pub = createClient({
      url: options.url,
      disableOfflineQueue: true,
      socket,
      commandOptions: { timeout: 0 },
    });
    this.sub = this.pub.duplicate();
    this.reader = this.pub.duplicate();
    this.sub.on("error", ignore); // reported through pub, which shares its fate
    this.reader.on("error", ignore);
  }

  /**
   * Every key and channel: `<prefix>:stream:<room>`, `:room:<room>` (its epoch and position),
   * `:instance:<id>`, ..., and `:rules`, the operators' bans and topics (a hash, and a channel).
   */
  key(
    kind: "stream" | "room" | "instance" | "presence" | "nick" | "instances" | "reset" | "rules",
    name = "",
  ): string {
    return kind === "instances" || kind === "reset" || kind === "rules"
      ? `${this.prefix}:${kind}`
      : `${this.prefix}:${kind}:${Directory.key(name)}`;
  }

  connect(): Promise<unknown> {
    return Promise.all([this.pub.connect(), this.sub.connect(), this.reader.connect()]);
  }

  destroy(): void {
    for (const client of [this.reader, this.sub, this.pub]) client.destroy();
  }
}

/**
 * This instance's lines on their way into the rooms' streams: each is appended (APPEND_SCRIPT)
 * and said here when it is read back, in the stream's order; said here at once if Redis is away,
 * late or failing, and queued (in order, BUS_QUEUE_BYTES at most) for when it answers. The
 * senders wait while too much is on its way.
 */
class Outbox {
  private readonly bus: RedisBus;
  private readonly link: RedisLink;
  /** Lines this instance appended and has not read back: who said them, the bytes, and when. */
  private readonly mine = new Map<number, Mine>();
  private nextLocal = 0;
  /** Lines appended and neither read back nor said yet: past BUS_IN_FLIGHT, the senders wait. */
  private unsaid = 0;
  /** Bytes of the lines in `mine`: with the queue's, past BUS_PACE_BYTES the senders wait. */
  private inFlightBytes = 0;
  /** Redis is up but has not read back a line for REDIS_ANSWER_MS: said once, and when it ends. */
  private stuck = false;
  private senders: (() => void)[] = [];
  private sha: string | null = null;
  private backlog: Queued[] = [];
  private backlogBytes = 0;
  private dropped = 0;
  /** This instance's lines read back in the last RECENT_MS: sent again if Redis loses them. */
  private recent: (Queued & { at: number })[] = [];
  /** A catch-up is under way. */
  catchingUp = false;

  constructor(bus: RedisBus) {
    this.bus = bus;
    this.link = bus.link;
  }

  /** Appends a line, or queues it (and returns false: the caller says it here) while that cannot be. */
  send(room: string, message: Uint8Array, kept: boolean, sender: Client | null): boolean {
    const stream = this.bus.streams.of(room);
    if (!stream) return false; // a room nobody here is in (the lobby is always watched)
    const text = lineText(message);
    const local = ++this.nextLocal;
    if (!this.link.up || this.backlog.length > 0 || stream.id === null) {
      this.addToBacklog({ room: stream.name, text, kept, local });
      return false;
    }
    this.mine.set(local, { sender, message, stream, kept, at: Date.now(), saidHere: false });
    this.unsaid++;
    this.inFlightBytes += message.length;
    this.append(stream.name, text, kept, local, false).catch(() => {
      // Lost on the way: say it here now, and send it on when Redis returns.
      const line = this.mine.get(local);
      if (!line || !this.mine.delete(local)) return;
      this.inFlightBytes -= message.length;
      if (!line.saidHere) this.countSaid();
      if (!line.saidHere) this.bus.handlers.onRoomLine(stream.name, text, null, sender, message, false);
      this.addToBacklog({ room: stream.name, text, kept, local });
    });
    return true;
  }

  /** Loads APPEND_SCRIPT, so that each append sends its hash rather than its text. */
  loadScript(): void {
    this.link.pub.sendCommand(["SCRIPT", "LOAD", APPEND_SCRIPT]).then(
      (sha) => this.sha = String(sha),
      ignore,
    );
  }

  private append(
    room: string,
    text: string,
    kept: boolean,
    local: number,
    alreadySaid: boolean,
  ): Promise<void> {
    const { link, bus } = this;
    const args = [
      "EVAL",
      APPEND_SCRIPT,
      "2",
      link.key("room", room),
      link.key("stream", room),
      crypto.randomUUID().slice(0, 8),
      kept ? "1" : "0",
      link.instance,
      String(local),
      alreadySaid ? "1" : "0",
      text,
      String(bus.keep),
      String(Date.now()),
    ];
    const call = this.sha ? ["EVALSHA", this.sha, ...args.slice(2)] : args; // the script's text once, not each line
    const sent = link.pub.sendCommand(call).catch((e: Error) => {
      if (!this.sha || !String(e.message).startsWith("NOSCRIPT")) throw e;
      this.sha = null; // a Redis that restarted has forgotten it
      return link.pub.sendCommand(args);
    });
    return sent.then((reply) => {
      const [epoch, , fresh, rogue] = reply as unknown as [string, number, number, string];
      if (Number(fresh) === 2) {
        bus.handlers.say(
          `The stream of ${room} in Redis ended with an entry that was not this chat's (${rogue}): ` +
            "the room's history starts again under a new epoch",
        );
      }
      if (Number(fresh) >= 1) {
        // The room had lost its history (a flush, an empty restart): everyone reads it from the start.
        bus.epochs.rewind(Directory.key(room), epoch);
        link.pub.publish(link.key("reset"), Directory.key(room)).catch(ignore);
      }
    });
  }

  // Keeps the queue in the order the lines were said (a line whose append failed comes back late).
  private addToBacklog(line: Queued): void {
    let at = this.backlog.length;
    while (at > 0 && this.backlog[at - 1].local > line.local) at--;
    this.backlog.splice(at, 0, line);
    this.backlogBytes += line.text.length;
    while (this.backlogBytes > BUS_QUEUE_BYTES) {
      this.backlogBytes -= this.backlog.shift()!.text.length;
      this.dropped++;
    }
    if (this.link.up && !this.catchingUp) this.catchUp().catch(ignore); // up, but the room was not read yet
  }

  /** The heartbeat: a catch-up that Redis cut short goes on; else the rooms' epochs are checked. */
  tick(): void {
    if (this.catchingUp) return;
    if (this.backlog.length > 0) this.catchUp().catch(ignore);
    else this.bus.epochs.check().catch(ignore);
  }

  /** Redis is back: what waited goes out first, in order; then the rooms are read on. */
  async catchUp(): Promise<void> {
    if (this.catchingUp) return;
    this.catchingUp = true;
    try {
      await this.resendRecent();
      do {
        while (this.link.up && this.backlog.length > 0) {
          const batch = this.backlog.slice(0, 500);
          const results = await Promise.allSettled(
            batch.map((q) => this.append(q.room, q.text, q.kept, q.local, true)),
          );
          // What was appended leaves the queue, whatever failed around it: it is never sent twice.
          const failed = batch.filter((_, i) => results[i].status === "rejected");
          this.backlog.splice(0, batch.length, ...failed);
          for (const [i, q] of batch.entries()) {
            if (results[i].status === "fulfilled") this.backlogBytes -= q.text.length;
          }
          this.wakeSenders();
          if (failed.length > 0) return; // the next heartbeat tries again (tick)
        }
        if (this.dropped > 0) {
          this.bus.handlers.say(
            `${
              plural(this.dropped, "line")
            } said while Redis was away did not fit the queue and were not shared`,
          );
          this.dropped = 0;
        }
        await this.bus.epochs.check();
      } while (this.link.up && this.backlog.length > 0); // lines said while the rooms were checked
    } finally {
      this.catchingUp = false;
      this.bus.streams.nudge();
    }
  }

  // Redis came back without a room's history (restarted empty): this instance's lines of the last
  // few seconds go out again, since another instance may not have read them before Redis went.
  // The others know them by their number, and skip those they had.
  private async resendRecent(): Promise<void> {
    const now = Date.now();
    while (this.recent.length > 0 && now - this.recent[0].at > RECENT_MS) this.recent.shift();
    if (this.recent.length === 0) return;
    const gone = new Set<string>();
    for (const [key, stream] of this.bus.streams.all) {
      if (stream.epoch === null) continue;
      const epoch = await this.link.pub.hGet(this.link.key("room", key), "epoch");
      if (epoch !== stream.epoch) gone.add(key);
    }
    const again = this.recent.filter((q) => gone.has(Directory.key(q.room)));
    this.recent = [];
    for (const q of again) this.addToBacklog(q);
  }

  /** Redis went away: lines appended but not read back may be lost with it; say them here now. */
  lost(): void {
    for (const [local, line] of this.mine) {
      this.mine.delete(local);
      this.inFlightBytes -= line.message.length;
      const text = lineText(line.message);
      if (!line.saidHere) {
        this.countSaid();
        this.bus.handlers.onRoomLine(line.stream.name, text, null, line.sender, line.message, false);
      }
      this.addToBacklog({ room: line.stream.name, text, kept: line.kept, local });
    }
  }

  /**
   * A Redis that is up but stuck (frozen, swapping) must not hold this instance's own rooms: a
   * line not read back within REDIS_ANSWER_MS is said here, and only the history waits for Redis.
   */
  sayLate(now: number): void {
    for (const line of this.mine.values()) {
      if (now - line.at < REDIS_ANSWER_MS) break; // in the order they were sent
      if (line.saidHere) continue;
      if (!this.stuck) {
        this.stuck = true;
        this.bus.handlers.say(
          "Redis is not answering: lines are said here at once, and shared when it answers; " +
            `past ${BUS_PACE_BYTES / 1024 / 1024} MiB waiting, senders wait for it`,
        );
      }
      line.saidHere = true;
      this.countSaid();
      const text = lineText(line.message);
      this.bus.handlers.onRoomLine(line.stream.name, text, null, line.sender, line.message, false);
    }
  }

  /** One of this instance's lines, `local`, is back from Redis: what it was, if this instance has it. */
  readBack(local: number): Mine | undefined {
    const line = this.mine.get(local);
    if (!line) return undefined;
    this.mine.delete(local);
    this.inFlightBytes -= line.message.length;
    if (this.stuck) {
      this.stuck = false;
      this.bus.handlers.say("Redis answers again: what waited is shared");
    }
    if (!line.saidHere) this.countSaid();
    else this.wakeSenders();
    return line;
  }

  /** Keeps a line of this instance's, read back, for RECENT_MS: resendRecent() may need it. */
  remember(line: Queued): void {
    this.recent.push({ ...line, at: Date.now() });
    if (this.recent.length > 10_000) this.recent.shift();
  }

  private countSaid(): void {
    this.unsaid--;
    this.wakeSenders();
  }

  /**
   * True while too many of this instance's lines are on their way through Redis: more than
   * BUS_IN_FLIGHT not said yet, or, while Redis is up but slow, more than BUS_PACE_BYTES unshared.
   */
  get behind(): boolean {
    return this.unsaid >= BUS_IN_FLIGHT ||
      (this.link.up && this.inFlightBytes + this.backlogBytes >= BUS_PACE_BYTES);
  }

  /** Settles when few enough lines are on their way (at once, if they are). */
  caughtUp(): Promise<void> {
    if (!this.behind) return Promise.resolve();
    return new Promise((resolve) => this.senders.push(resolve));
  }

  // Lets the senders go on once few enough lines are on their way (half the bounds, so they do not flap).
  private wakeSenders(): void {
    if (this.senders.length === 0 || this.unsaid > BUS_IN_FLIGHT / 2) return;
    if (this.link.up && this.inFlightBytes + this.backlogBytes > BUS_PACE_BYTES / 2) return;
    this.releaseSenders();
  }

  /** Lets every waiting sender go on (and at close). */
  releaseSenders(): void {
    for (const wake of this.senders.splice(0)) wake();
  }

  /** Bytes of lines waiting for Redis, at most BUS_QUEUE_BYTES. */
  get waitingBytes(): number {
    return this.backlogBytes;
  }
}

/**
 * Reads the rooms' streams, each from this instance's own position, with XREAD BLOCK on a
 * connection of its own, and hands each entry to the room here once: not again after a rewind
 * (each room remembers how far it read in each epoch), not this instance's own line twice (the
 * outbox has it), and not another instance's line sent again after Redis lost it (by its number).
 */
class StreamReader {
  private readonly bus: RedisBus;
  private readonly link: RedisLink;
  private readonly streams = new Map<string, RoomStream>(); // by room key
  /** The last line number read from each instance in each room (`instance room`): a repeat is skipped. */
  private readonly lastFrom = new Map<string, number>();
  private readerId: number | null = null;
  private wake: (() => void) | null = null;
  /** Settles when the read loop has stopped (at close). */
  finished: Promise<void> = Promise.resolve();

  constructor(bus: RedisBus) {
    this.bus = bus;
    this.link = bus.link;
  }

  /** Every watched room, by key. */
  get all(): Map<string, RoomStream> {
    return this.streams;
  }

  /** The stream of a room this instance reads, if it does. */
  of(room: string): RoomStream | undefined {
    return this.streams.get(Directory.key(room));
  }

  start(): void {
    this.finished = this.readStreams();
  }

  /** The reader connection is (again) ready: learns its id, so that nudge() can interrupt its read. */
  identify(): void {
    this.link.reader.sendCommand(["CLIENT", "ID"]).then((id) => {
      this.readerId = Number(id);
      this.nudge();
    }, ignore);
  }

  watch(room: string): void {
    const key = Directory.key(room);
    if (this.streams.has(key)) return;
    this.streams.set(key, { name: room, epoch: null, id: null, seq: 0, seen: new Map() });
    if (this.link.up && !this.bus.outbox.catchingUp) this.bus.epochs.check().catch(ignore);
  }

  unwatch(room: string): void {
    if (this.streams.delete(Directory.key(room))) this.nudge();
  }

  /** False while a watched room's stream has not been read yet: its position is not known. */
  knows(room: string): boolean {
    const stream = this.of(room);
    return stream === undefined || stream.id !== null;
  }

  /** Wakes the read loop so that it sees the bus is closed. */
  stop(): void {
    this.wake?.();
  }

  /** Wakes the reader: a room was added or rewound, so its XREAD must start again. */
  nudge(): void {
    this.wake?.();
    if (this.readerId !== null && this.link.reader.isReady) {
      this.link.pub.sendCommand(["CLIENT", "UNBLOCK", String(this.readerId)]).catch(ignore);
    }
  }

  // The reader: XREAD on every read room, blocking until something comes, on its own connection.
  private async readStreams(): Promise<void> {
    const link = this.link;
    while (!link.closed) {
      const streams = [...this.streams.entries()].filter(([, s]) => s.id !== null);
      const asked = new Map(streams.map(([key, s]) => [key, s.id])); // a rewind meanwhile voids the answer
      if (!link.up || !link.reader.isReady || streams.length === 0) {
        await new Promise<void>((resolve) => {
          const woken = () => {
            clearTimeout(timer);
            this.wake = null;
            resolve();
          };
          const timer = setTimeout(woken, 500);
          this.wake = woken;
        });
        continue;
      }
      let reply: unknown;
      try {
        reply = await link.reader.sendCommand([
          "XREAD",
          "COUNT",
          String(this.bus.readCount),
          "BLOCK",
          "5000",
          "STREAMS",
          ...streams.map(([key]) => link.key("stream", key)),
          ...streams.map(([, s]) => s.id!),
        ]);
      } catch {
        await delay(100);
        continue;
      }
      // A map of stream to entries (RESP3), or a list of pairs (RESP2); null when nothing came.
      const streamsRead = reply === null
        ? []
        : Array.isArray(reply)
        ? reply
        : Object.entries(reply as object);
      const delivered: string[] = [];
      for (const [name, entries] of streamsRead as [string, [string, string[]][]][]) {
        const key = name.slice(link.key("stream").length);
        const stream = this.streams.get(key);
        if (!stream || stream.id === null || stream.id !== asked.get(key)) continue;
        delivered.push(stream.name);
        for (const [id, fields] of entries) {
          if (stream.id === "0-0" && asked.get(key) !== "0-0") break; // rewound by an entry of a new epoch
          this.onEntry(stream, id, fields);
        }
      }
      for (const room of delivered) await this.bus.handlers.paced(room);
    }
  }

  // One entry of a room's stream: checked like a client's line, then said to the room here, once.
  private onEntry(stream: RoomStream, id: string, fields: string[]): void {
    if (stream.id === "0-0" && id === "0-0") return;
    stream.id = id;
    const f = entryFields(fields);
    if (typeof f.e !== "string" || typeof f.t !== "string" || f.t.length > MAX_BUS_TEXT) return;
    // An entry of another epoch, read from a position in the old one: Redis lost the room's
    // history. Redis says which epoch is real (Epochs.check), and the room is read again from its start.
    if (stream.epoch !== null && f.e !== stream.epoch) return void this.bus.epochs.check().catch(ignore);
    stream.epoch = f.e; // the epoch of this position, if it was not known
    const seq = Number(id.split("-")[0]);
    if (f.k === "1" && stream.seq > 0 && seq > stream.seq + 1) this.sayLost(stream, seq - stream.seq - 1);
    stream.seq = seq;
    if (this.readBefore(stream, f.e, id)) return;
    const own = f.i === this.link.instance, number = Number(f.l) || 0;
    const local = own ? this.bus.outbox.readBack(number) : undefined;
    if (!own && this.repeated(stream, f.i, number)) return;
    const kept = f.k === "1";
    if (own && number > 0) this.bus.outbox.remember({ room: stream.name, text: f.t, kept, local: number });
    const alreadySaid = own && (f.d === "1" || local?.saidHere === true);
    const text = local ? "" : safeBusText(f.t, this.bus.maxText);
    if (!local && text === "") return;
    const at = kept ? { epoch: f.e, seq } : null;
    this.bus.handlers.onRoomLine(stream.name, text, at, local?.sender ?? null, local?.message, alreadySaid);
  }

  // Lines trimmed from the stream before this instance read them: said, never silently.
  private sayLost(stream: RoomStream, skipped: number): void {
    this.bus.handlers.say(
      `Fell behind in ${stream.name}: ${plural(skipped, "line")} left Redis before they were read`,
    );
    const text = `(${plural(skipped, "line")} said in ${stream.name} could not be read in time)`;
    this.bus.handlers.onRoomLine(stream.name, text, null, null);
  }

  // True if the room had read this far in this epoch before a rewind: the entry was said then.
  private readBefore(stream: RoomStream, epoch: string, id: string): boolean {
    const seen = stream.seen.get(epoch);
    if (seen !== undefined && idOrder(id, seen) <= 0) return true;
    stream.seen.delete(epoch);
    stream.seen.set(epoch, id);
    if (stream.seen.size > 4) stream.seen.delete(stream.seen.keys().next().value!); // the oldest epoch
    return false;
  }

  // True for another instance's line sent again after Redis lost it, which this instance had read.
  private repeated(stream: RoomStream, instance: string, number: number): boolean {
    const from = `${instance} ${Directory.key(stream.name)}`, last = this.lastFrom.get(from) ?? 0;
    if (number > last) this.lastFrom.delete(from), this.lastFrom.set(from, number);
    if (this.lastFrom.size > 10_000) this.lastFrom.delete(this.lastFrom.keys().next().value!);
    return number > 0 && number <= last;
  }
}

/**
 * Each read room's epoch and position against what Redis says: a room not read yet starts at the
 * stream's end, with its last lines as history; one whose epoch changed (a flush, an empty
 * restart), or whose position went back (a Redis restored from an older snapshot), is rewound and
 * read again from the start of what Redis has.
 */
class Epochs {
  private readonly bus: RedisBus;
  private readonly link: RedisLink;
  private checking: Promise<void> | null = null;
  private checkAgain = false;

  constructor(bus: RedisBus) {
    this.bus = bus;
    this.link = bus.link;
  }

  /** Checks every read room against Redis (once more if a room was added while it looked). */
  check(): Promise<void> {
    if (this.checking) {
      this.checkAgain = true; // a room was added since the check under way looked
      return this.checking;
    }
    this.checking = (async () => {
      try {
        do {
          this.checkAgain = false;
          await this.checkEach();
        } while (this.checkAgain && this.link.up);
      } finally {
        this.checking = null;
        this.bus.streams.nudge();
      }
    })();
    return this.checking;
  }

  private async checkEach(): Promise<void> {
    const { link, bus } = this;
    for (const [key, stream] of bus.streams.all) {
      const read = stream.seq; // before asking: what is read meanwhile may be past Redis's answer
      const [epoch, seq] = await link.pub.hmGet(link.key("room", key), ["epoch", "seq"]);
      if (bus.streams.all.get(key) !== stream) continue; // unwatched meanwhile
      if (stream.id === null) {
        const entries = (await link.pub.sendCommand(
          ["XREVRANGE", link.key("stream", key), "+", "-", "COUNT", String(bus.keep)],
        )) as unknown as [string, string[]][];
        const lines: KeptLine[] = [];
        for (const [id, fields] of entries.reverse()) {
          const f = entryFields(fields);
          if (f.k === "1" && f.e === epoch) {
            lines.push({
              seq: Number(id.split("-")[0]),
              time: Number(f.w) || Date.now(),
              message: encoder.encode(safeBusText(f.t, bus.maxText) + "\r\n"),
            });
          }
        }
        stream.epoch = epoch ?? null;
        stream.seq = Number(seq ?? 0);
        stream.id = entries.length > 0 ? entries.at(-1)![0] : "0-0";
        bus.handlers.onRoomRead(stream.name, { epoch: epoch ?? NO_EPOCH, seq: stream.seq }, lines);
      } else if (stream.epoch === null) {
        if (epoch) this.rewind(key, epoch); // the epoch is known now: read it from its start
      } else if (epoch !== stream.epoch) {
        this.rewind(key, epoch ?? null);
      } else if (Number(seq ?? 0) < read) { // an older snapshot: the room's history forks here
        const forked = crypto.randomUUID().slice(0, 8);
        await link.pub.hSet(link.key("room", key), "epoch", forked);
        this.rewind(key, forked);
      }
    }
  }

  /** Reads the room from the start of what its stream holds: its epoch is now `epoch` (null: not known yet). */
  rewind(key: string, epoch: string | null): void {
    const stream = this.bus.streams.all.get(key);
    if (!stream || stream.id === null) return;
    if (epoch !== null && stream.epoch === epoch) return; // the same history: nothing to read again
    stream.id = "0-0";
    stream.epoch = epoch;
    stream.seq = 0;
    this.bus.streams.nudge();
  }

  /** Another instance found a room's history lost: this one reads it again too. */
  readonly onReset = (key: string): void => this.rewind(key, null);
}

/**
 * Who is where and whose nick is whose, across instances, and private lines between them: a hash
 * per instance and a key per nick, with an expiry the heartbeat renews (so that a crashed
 * instance's members vanish by themselves), and a pub/sub channel per instance.
 */
class BusPresence {
  private readonly link: RedisLink;
  private readonly handlers: BusHandlers;
  private readonly maxText: number;
  /** This instance's clients' nicks, by key. */
  private readonly nicks = new Set<string>();

  constructor(link: RedisLink, handlers: BusHandlers, maxText: number) {
    this.link = link;
    this.handlers = handlers;
    this.maxText = maxText;
  }

  /**
   * A message on this instance's channel: JSON, the sending instance and a line for a nick.
   * Anything with access to Redis can publish, so a message is input like a client's line: its
   * shape is checked, and its text gets the same character rules (no controls, no escapes).
   */
  readonly onMessage = (raw: string): void => {
    const m = parseJson(raw);
    if (!isBusMessage(m) || m.i === this.link.instance) return;
    const text = safeBusText(m.text, this.maxText);
    if (text !== "" && typeof m.nick === "string") this.handlers.onWhisper(m.nick, text);
  };

  /** Writes this instance's presence and nicks back, when Redis has (re)connected. */
  async restore(): Promise<void> {
    const link = this.link;
    if (!link.up || link.closed) return;
    const presence = link.key("presence", link.instance);
    const multi = link.pub.multi();
    multi.del(presence);
    for (const p of this.handlers.locals()) multi.hSet(presence, p.address, JSON.stringify(p));
    multi.expire(presence, link.expiry);
    multi.zAdd(link.key("instances"), { score: Date.now(), value: link.instance });
    for (const nick of this.nicks) multi.set(link.key("nick", nick), link.instance, { EX: link.expiry });
    await multi.exec();
  }

  /**
   * Renews the expiry of this instance's presence and nicks; if one of them is gone (a FLUSHALL,
   * or a Redis restarted empty), writes them all back at once rather than waiting for a reconnect.
   */
  renew(): void {
    const link = this.link;
    const multi = link.pub.multi();
    multi.expire(link.key("presence", link.instance), link.expiry);
    multi.zAdd(link.key("instances"), { score: Date.now(), value: link.instance });
    for (const nick of this.nicks) multi.expire(link.key("nick", nick), link.expiry);
    multi.exec().then((replies) => {
      const renewed = [replies[0], ...replies.slice(2)];
      const someLocal = this.handlers.locals().length > 0;
      if (renewed.some((r, i) => Number(r) === 0 && (i > 0 || someLocal))) return this.restore();
    }).catch(ignore);
  }

  async whisper(nick: string, text: string): Promise<boolean> {
    const link = this.link;
    if (!link.up) return false;
    const owner = await link.pub.get(link.key("nick", nick)).catch(() => null);
    if (!owner || owner === link.instance) return false;
    const message = JSON.stringify({ i: link.instance, nick, text });
    const heard = await link.pub.publish(link.key("instance", owner), message).catch(() => 0);
    return heard > 0;
  }

  async claimNick(nick: string): Promise<boolean> {
    const link = this.link, key = Directory.key(nick);
    if (!link.up) {
      this.nicks.add(key); // written to Redis when it returns; a clash then is resolved by its owner
      return true;
    }
    try {
      const stored = link.key("nick", nick);
      const got = await link.pub.set(stored, link.instance, { NX: true, EX: link.expiry });
      if (got === null && await link.pub.get(stored) !== link.instance) return false;
    } catch {
      // Redis went away mid-claim: local uniqueness still holds
    }
    this.nicks.add(key);
    return true;
  }

  releaseNick(nick: string): void {
    const link = this.link;
    if (!this.nicks.delete(Directory.key(nick)) || !link.up) return;
    // Delete only our own claim: a key that expired and was taken by another instance stays.
    const key = link.key("nick", nick);
    link.pub.get(key).then((owner) => owner === link.instance ? link.pub.del(key) : 0).catch(ignore);
  }

  present(who: Presence): void {
    const link = this.link;
    if (link.up) {
      link.pub.hSet(link.key("presence", link.instance), who.address, JSON.stringify(who)).catch(ignore);
    }
  }

  absent(address: string): void {
    const link = this.link;
    if (link.up) link.pub.hDel(link.key("presence", link.instance), address).catch(ignore);
  }

  /** Every member on the other instances; null while Redis is away. */
  async others(): Promise<Presence[] | null> {
    const link = this.link;
    if (!link.up) return null;
    try {
      const alive = await link.pub.zRangeByScore(
        link.key("instances"),
        Date.now() - link.expiry * 1000,
        "+inf",
      );
      const found: Presence[] = [];
      for (const id of alive) {
        if (id === link.instance) continue;
        for (const value of Object.values(await link.pub.hGetAll(link.key("presence", id)))) {
          const entry = parsePresence(value); // written by anything with access to Redis: checked
          if (entry) found.push(entry);
        }
      }
      return found;
    } catch {
      return null;
    }
  }

  /** At shutdown: this instance's presence and nicks leave Redis (a stuck Redis must not stall it). */
  async withdraw(): Promise<void> {
    const link = this.link;
    if (!link.up) return;
    const multi = link.pub.multi();
    multi.del(link.key("presence", link.instance));
    multi.zRem(link.key("instances"), link.instance);
    for (const nick of this.nicks) multi.del(link.key("nick", nick));
    await answerWithin(multi.exec().then(ignore, ignore), undefined);
  }
}

/**
 * Operators' decisions across instances. Each is published on one channel that every instance
 * reads; bans and topics are also kept in a hash, read whenever Redis (re)connects, so that an
 * instance started later, or cut off meanwhile, holds them too. Anything with access to Redis can
 * write there, so what comes is checked as an operator's command is (checkRule, in the core).
 */
class BusRules {
  private readonly link: RedisLink;
  private readonly handlers: BusHandlers;
  private readonly maxText: number;

  constructor(link: RedisLink, handlers: BusHandlers, maxText: number) {
    this.link = link;
    this.handlers = handlers;
    this.maxText = maxText;
  }

  /** A decision made on another instance. */
  readonly onMessage = (raw: string): void => {
    const m = parseJson(raw);
    const rule = checkRule(m, this.maxText);
    if (rule && (m as { i?: unknown }).i !== this.link.instance) this.handlers.onRule(rule, false);
  };

  share(rule: Rule): void {
    const link = this.link, field = ruleField(rule);
    if (!link.up) return; // a ban or topic is written back when Redis returns (restore)
    const multi = link.pub.multi();
    if (field !== null && lifts(rule)) multi.hDel(link.key("rules"), field);
    else if (field !== null) multi.hSet(link.key("rules"), field, JSON.stringify(rule));
    multi.publish(link.key("rules"), JSON.stringify({ ...rule, i: link.instance }));
    multi.exec().catch(ignore);
  }

  /** On (re)connecting: holds the bans and topics Redis keeps, then writes back those it lacks. */
  async restore(): Promise<void> {
    const link = this.link;
    if (!link.up || link.closed) return;
    const kept = new Set<string>();
    for (const [field, value] of Object.entries(await link.pub.hGetAll(link.key("rules")))) {
      const rule = checkRule(parseJson(value), this.maxText);
      if (rule === null || ruleField(rule) !== field) continue;
      kept.add(field);
      this.handlers.onRule(rule, true);
    }
    const missing = this.handlers.lasting().filter((rule) => !kept.has(ruleField(rule)!));
    if (missing.length === 0) return;
    const multi = link.pub.multi();
    for (const rule of missing) multi.hSet(link.key("rules"), ruleField(rule)!, JSON.stringify(rule));
    await multi.exec();
  }
}

/** A message on an instance's channel: a private line for a nick. */
interface BusMessage {
  i: string;
  nick: string;
  text: string;
}

/** Orders two stream ids, `MS-N`: negative if `a` comes first. */
function idOrder(a: string, b: string): number {
  const [am, an] = a.split("-").map(Number), [bm, bn] = b.split("-").map(Number);
  return am - bm || an - bn;
}

/** A stream entry's fields, from Redis's flat list: `e` epoch, `i` instance, `l` its local number, `k` 1 if kept, `d` 1 if already said by its instance, `t` the text. */
function entryFields(fields: string[]): Record<string, string> {
  const f: Record<string, string> = {};
  for (let i = 0; i + 1 < fields.length; i += 2) f[fields[i]] = fields[i + 1];
  return f;
}

/** Room beyond --max-line for a line's prefix on the bus: a private line's (PAGE_READS.privately) with a nick of 32 characters. */
const BUS_PREFIX_BYTES = 160;

function isBusMessage(m: unknown): m is BusMessage {
  if (typeof m !== "object" || m === null) return false;
  const { i, nick, text } = m as Record<string, unknown>;
  return typeof i === "string" && typeof text === "string" && text.length <= MAX_BUS_TEXT &&
    typeof nick === "string";
}

/** A presence entry from Redis, or null if it is not one. */
function parsePresence(value: string): Presence | null {
  let p: unknown;
  try {
    p = JSON.parse(value);
  } catch {
    return null;
  }
  if (typeof p !== "object" || p === null) return null;
  const { address, nick, room } = p as Record<string, unknown>;
  if (
    typeof address !== "string" || typeof room !== "string" || !(nick === null || typeof nick === "string")
  ) {
    return null;
  }
  return {
    address: safeBusText(address),
    nick: nick === null ? null : safeBusText(nick),
    room: safeBusText(room),
  };
}
