// deno-lint-ignore-file no-control-regex -- the page's marks start with U+001E on purpose
// chat_server.ts --redis: several instances share rooms through a real redis-server.
import assert from "node:assert/strict";
import { type ChatServer, type ChatServerOptions, startChatServer } from "../chat_server.ts";
import { BUS_QUEUE_BYTES } from "../chat/redis_bus.ts";
import {
  ask,
  Capture,
  Cli,
  clocked,
  eventually,
  freePort,
  From,
  joinChat,
  needs,
  readUntil,
  TestClient,
  WAIT_MS,
  within,
  WsClient,
} from "./_helpers.ts";

/** A redis-server of our own on a free port, that a test can kill and start again. */
class Redis {
  readonly port = freePort();
  #child: Deno.ChildProcess | null = null;

  get url(): string {
    return `redis://127.0.0.1:${this.port}`;
  }

  async start(): Promise<void> {
    this.#child = new Deno.Command("redis-server", {
      args: ["--port", String(this.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
      stdout: "null",
      stderr: "null",
    }).spawn();
    const deadline = Date.now() + WAIT_MS;
    for (;;) { // until it answers PING
      try {
        using c = await TestClient.connect(this.port);
        await c.write("PING\r\n");
        if (await c.readLine() === "+PONG\r\n") return;
      } catch (e) {
        if (!(e instanceof Deno.errors.ConnectionRefused) || Date.now() > deadline) throw e;
      }
      await new Promise((r) => setTimeout(r, 50));
    }
  }

  /** Sends one command (as RESP) and returns the first line of the answer. */
  async command(...args: string[]): Promise<string> {
    using c = await TestClient.connect(this.port);
    const enc = new TextEncoder();
    const bulk = args.map((a) => `$${enc.encode(a).length}\r\n${a}\r\n`).join("");
    await c.write(`*${args.length}\r\n${bulk}`);
    const first = (await c.readLine())!.trimEnd();
    return /^\$\d+$/.test(first) ? (await c.readLine())!.trimEnd() : first; // a bulk string: its text
  }

  /** Freezes or thaws the server: up, but answering nothing. */
  signal(signal: "SIGSTOP" | "SIGCONT"): void {
    this.#child?.kill(signal);
  }

  async kill(): Promise<void> {
    this.#child?.kill("SIGKILL");
    await this.#child?.status;
    this.#child = null;
  }
}

/** Starts `n` instances sharing `redis`, each with its own captured log. */
async function instances(
  redis: Redis,
  n: number,
  expiry = 30,
  options: ChatServerOptions = {},
): Promise<{ servers: ChatServer[]; logs: Capture[] }> {
  const logs = Array.from({ length: n }, () => new Capture());
  const servers = await Promise.all(
    logs.map((log) =>
      startChatServer({ port: 0, host: "127.0.0.1", log, redis: { url: redis.url, expiry }, ...options })
    ),
  );
  await within(WAIT_MS, Promise.all(servers.map((s) => s.redisReady)), "the instances to reach Redis");
  return { servers, logs };
}

/** Starts a redis-server and `n` instances sharing it, runs `body`, and stops them all. */
async function withInstances(
  n: number,
  body: (ctx: { redis: Redis; servers: ChatServer[]; logs: Capture[] }) => Promise<void>,
  expiry = 30,
  options: ChatServerOptions = {},
): Promise<void> {
  const redis = new Redis();
  await redis.start();
  const { servers, logs } = await instances(redis, n, expiry, options);
  try {
    await body({ redis, servers, logs });
  } finally {
    await Promise.all(servers.map((s) => s.close()));
    await redis.kill();
  }
}

let syncs = 0;

/**
 * Makes sure that everything `from`'s instance published has reached `to`'s: `from` says a fresh
 * line and `to` reads up to it. One instance's messages cross Redis in order, so what came
 * before has arrived (a join announced late, say) and was skipped.
 */
async function sync(from: TestClient, to: TestClient): Promise<void> {
  const word = `sync-${++syncs}`;
  await from.write(word + "\r\n");
  await readUntil(to, (l) => l.endsWith(`] ${word}\r\n`));
}

/** Reads lines until one passes `test`; returns them all, that one last. */
async function collectUntil(client: TestClient, test: (line: string) => boolean): Promise<string[]> {
  const lines = [];
  for (;;) {
    const line = await client.readLine();
    if (line === null) throw new Error("closed while waiting");
    lines.push(line);
    if (test(line)) return lines;
  }
}

/** Asks /who and returns the members listed, skipping lines that arrive before the answer. */
async function who(client: TestClient): Promise<string[]> {
  await client.write("/who\r\n");
  const header = await readUntil(client, (l) => /^In \S+ \(\d+\):\r\n$/.test(l));
  const members = [];
  for (let n = Number(/\((\d+)\)/.exec(header)![1]); n > 0; n--) {
    members.push((await client.readLine())!.trim());
  }
  return members;
}

// npm:redis keeps sockets and timers between calls: the instances and Redis are closed in each test.
const redisTest = (name: string, fn: () => Promise<void>) =>
  Deno.test({ ...needs(name, ["redis-server"]), sanitizeOps: false, sanitizeResources: false, fn });

redisTest("two instances relay lines, joins and leaves both ways, once each", async () => {
  await withInstances(2, async ({ servers }) => {
    using a = await joinChat(servers[0].addr.port);
    using b = await joinChat(servers[1].addr.port);
    assert.equal(await a.readLine(), `Client joined ${b.name}\r\n`); // through Redis
    await sync(a, b); // b may or may not have heard of a, who joined a moment before it
    using c = await joinChat(servers[0].addr.port);
    assert.equal(await a.readLine(), `Client joined ${c.name}\r\n`); // locally
    assert.equal(await b.readLine(), `Client joined ${c.name}\r\n`); // through Redis
    await a.write("from one\r\n");
    assert.equal(await b.readLine(), `[${a.name}] from one\r\n`);
    assert.equal(await c.readLine(), `[${a.name}] from one\r\n`);
    await b.write("from two\r\n");
    assert.equal(await a.readLine(), `[${b.name}] from two\r\n`);
    assert.equal(await c.readLine(), `[${b.name}] from two\r\n`); // once: no echo of a's own line before it
    await ask(b, "/me waves");
    assert.equal(await a.readLine(), `* ${b.name} waves\r\n`);
    const bName = b.name;
    b.close();
    assert.equal(await a.readLine(), `Client left ${bName}\r\n`);
    await a.write("still here\r\n");
    assert.equal(await c.readLine(), `* ${bName} waves\r\n`);
    assert.equal(await c.readLine(), `Client left ${bName}\r\n`);
    assert.equal(await c.readLine(), `[${a.name}] still here\r\n`);
  });
});

redisTest("nicks are unique across instances, /msg crosses, /who and /rooms list everyone", async () => {
  await withInstances(2, async ({ servers }) => {
    using a = await joinChat(servers[0].addr.port);
    using b = await joinChat(servers[1].addr.port);
    await a.readLine();
    await sync(a, b);
    await ask(a, "/nick Ann", "You are now known as Ann");
    assert.equal(await b.readLine(), `${a.name} is now known as Ann\r\n`);
    await ask(b, "/nick ann", `The nick ann is taken; you are still ${b.name}`);
    await ask(b, "/nick bob", "You are now known as bob");
    assert.equal(await a.readLine(), `${b.name} is now known as bob\r\n`);
    await ask(b, "/msg ANN psst", "(private to ANN) psst");
    assert.equal(await a.readLine(), "(private) [bob] psst\r\n");
    assert.deepEqual(await who(a), [`Ann (${a.name}) (you)`, `bob (${b.name})`]);
    await ask(b, "/join dev", "You are now in dev (1); /who lists who is here");
    assert.equal(await a.readLine(), `bob has left lobby for dev\r\n`);
    await ask(a, "/rooms", "Rooms (2):", "  dev 1", "  lobby 1 (you are here)");
    b.close();
    await eventually("bob's nick to be free, once the other instance has seen bob leave", async () => {
      await a.write("/nick Bob\r\n");
      return await a.readLine() === "You are now known as Bob\r\n";
    });
  });
});

redisTest("local chat goes on while Redis is down, and the instances rejoin when it is back", async () => {
  await withInstances(2, async ({ servers, logs, redis }) => {
    using a = await joinChat(servers[0].addr.port);
    using b = await joinChat(servers[1].addr.port);
    await a.readLine();
    await sync(a, b);
    using c = await joinChat(servers[0].addr.port);
    await a.readLine(), await b.readLine();
    await redis.kill();
    await logs[0].waitFor("Redis unavailable");
    await a.write("local only\r\n");
    assert.equal(await c.readLine(), `[${a.name}] local only\r\n`);
    await redis.start();
    await logs[0].waitFor("Redis is back: rooms are shared again");
    await logs[1].waitFor("Redis is back: rooms are shared again");
    // Lines sent while Redis was away are not replayed; fresh ones cross again within moments.
    await eventually("lines to cross again", async () => {
      await b.write("probe\r\n");
      return (await within(WAIT_MS, a.readLine(), "a probe"))!.startsWith(`[${b.name}] probe`);
    });
    assert.equal(logs[0].text.split("Redis unavailable").length, 2, "the loss is logged once");
    assert.deepEqual(await who(c), [a.name, `${c.name} (you)`, b.name]);
  });
});

redisTest("a frozen Redis costs a command two seconds at most, never the client", async () => {
  const redis = new Redis();
  await redis.start();
  const { servers } = await instances(redis, 1);
  try {
    using a = await joinChat(servers[0].addr.port);
    redis.signal("SIGSTOP");
    const started = Date.now();
    await ask(a, "/who", "In lobby (1):", `  ${a.name} (you)`, "(other servers cannot be asked right now)");
    await ask(a, "/nick frozen", "You are now known as frozen"); // local uniqueness still holds
    assert.ok(Date.now() - started < 6000, `took ${Date.now() - started} ms`);
    await a.write("/rooms\r\nafter\r\n"); // the next lines wait their turn, in order
    assert.equal(await a.readLine(), "Rooms (1):\r\n");
  } finally {
    redis.signal("SIGCONT");
    await servers[0].close();
    await redis.kill();
  }
});

redisTest("a killed instance's members leave the directory within the expiry", async () => {
  const redis = new Redis();
  await redis.start();
  const { servers } = await instances(redis, 1, 2);
  const doomed = new Cli("chat_server.ts", [
    "0",
    "--host",
    "127.0.0.1",
    "--redis",
    redis.url,
    "--redis-expiry",
    "2",
  ]);
  try {
    const port = await doomed.started();
    assert.equal(await doomed.readLine(), `Sharing rooms through Redis at ${redis.url}`);
    using a = await joinChat(servers[0].addr.port);
    using d = await joinChat(port);
    await readUntil(a, (l) => l === `Client joined ${d.name}\r\n`);
    await sync(a, d);
    await ask(d, "/nick dora", "You are now known as dora");
    // Its instance writes the directory before it publishes the change: once a hears of it, /who knows.
    await readUntil(a, (l) => l === `${d.name} is now known as dora\r\n`);
    assert.deepEqual(await who(a), [`${a.name} (you)`, `dora (${d.name})`]);
    doomed.kill("SIGKILL");
    await doomed.finish();
    await eventually("dora to leave the directory (expiry 2 s)", async () => (await who(a)).length === 1);
    await eventually("her nick to expire with her (its key and her presence expire apart)", async () => {
      await a.write("/nick Dora\r\n");
      return await a.readLine() === "You are now known as Dora\r\n";
    });
  } finally {
    doomed.kill("SIGKILL");
    await servers[0].close();
    await redis.kill();
  }
});

Deno.test("chat_server.ts starts local-only, in one line, when Redis is unreachable", async () => {
  const dead = freePort();
  const cli = new Cli("chat_server.ts", ["0", "--redis", `redis://127.0.0.1:${dead}`]);
  const port = await cli.started();
  using a = await joinChat(port);
  await a.write("/who\r\n");
  assert.equal(await a.readLine(), "In lobby (1):\r\n");
  cli.kill();
  const { code, stderr } = await cli.finish();
  assert.equal(code, 0);
  assert.equal(
    stderr.split("\n")[0],
    `chat_server: Redis at redis://127.0.0.1:${dead} is unreachable: serving local clients only while retrying`,
  );
});

redisTest("/join counts the room's members on every instance, as /who does", async () => {
  await withInstances(2, async ({ servers }) => {
    using a = await joinChat(servers[0].addr.port);
    using b = await joinChat(servers[1].addr.port);
    await a.readLine();
    await sync(a, b);
    await ask(b, "/join dev", "You are now in dev (1); /who lists who is here");
    assert.equal(await a.readLine(), `${b.name} has left lobby for dev\r\n`);
    await ask(a, "/join dev", "You are now in dev (2); /who lists who is here"); // b is on the other one
  });
});

/** Until `test` passes (it polls: what it waits for lives in Redis, not in a line), or WAIT_MS. */
redisTest("a room joined while Redis is away is shared again once it is back", async () => {
  await withInstances(2, async ({ servers, logs, redis }) => {
    using a = await joinChat(servers[0].addr.port);
    using b = await joinChat(servers[1].addr.port);
    await a.readLine();
    await sync(a, b);
    await redis.kill();
    await logs[0].waitFor("Redis unavailable");
    await logs[1].waitFor("Redis unavailable");
    await ask(
      a,
      "/join dev",
      "You are now in dev (1); /who lists who is here",
      "(other servers cannot be asked right now)",
    );
    await ask(
      b,
      "/join dev",
      "You are now in dev (1); /who lists who is here",
      "(other servers cannot be asked right now)",
    );
    await redis.start();
    await logs[0].waitFor("Redis is back");
    await logs[1].waitFor("Redis is back");
    // a says something every 100 ms until b hears one of them: b's instance reads dev from the
    // stream's end once it knows the room, so the first probes may come before it looks.
    let heard = false;
    const saying = (async () => {
      for (let i = 0; !heard && i < 100; i++) {
        await a.write(`probe ${i}\r\n`);
        await new Promise((r) => setTimeout(r, 100));
      }
    })();
    await readUntil(b, (l) => l.startsWith(`[${a.name}] probe`));
    heard = true;
    await saying;
  });
});

redisTest("after FLUSHALL the instances write back who is where and whose nick is whose", async () => {
  await withInstances(2, async ({ servers, redis }) => { // a heartbeat every 0.67 s
    using a = await joinChat(servers[0].addr.port);
    using b = await joinChat(servers[1].addr.port);
    await a.readLine();
    await sync(a, b);
    await ask(a, "/nick ann", "You are now known as ann");
    await readUntil(b, (l) => l === `${a.name} is now known as ann\r\n`);
    assert.equal(await redis.command("FLUSHALL"), "+OK");
    await eventually("b's /who lists ann again", async () => (await who(b)).includes(`ann (${a.name})`));
    await ask(b, "/nick ANN", `The nick ANN is taken; you are still ${b.name}`);
  }, 2);
});

redisTest(
  "what the bus carries is checked like a client's line: no escapes, no broken entries, no giant",
  async () => {
    await withInstances(1, async ({ servers, redis }) => {
      using a = await joinChat(servers[0].addr.port);
      await ask(a, "/who", "In lobby (1):", `  ${a.name} (you)`); // its join is in the lobby's stream by now
      for (const [id, ...fields] of [["0-50", "e", "x"], ["0-51", "t", "no epoch"], ["0-52", "junk"]]) {
        await redis.command("XADD", "chat:stream:lobby", id, ...fields); // entries that are not ours: ignored
      }
      const epoch = await redis.command("HGET", "chat:room:lobby", "epoch"); // of another epoch, it would be ignored too
      await redis.command(
        "XADD",
        "chat:stream:lobby",
        "0-53",
        "e",
        epoch,
        "i",
        "x",
        "k",
        "0",
        "t",
        "\u001b[2Jhi\u009b\r\nthere",
      );
      assert.equal(await a.readLine(), "[2Jhithere\r\n");
      // One entry of 1.5 MB (more than --sendq) is cut like a long line, and costs nobody their place.
      await redis.command(
        "XADD",
        "chat:stream:lobby",
        "0-54",
        "e",
        epoch,
        "i",
        "x",
        "k",
        "0",
        "t",
        "[big] " + "y".repeat(1_500_000),
      );
      assert.equal(await a.readLine(), "[big] " + "y".repeat(4096 + 160 - 6) + "\r\n");
      for (const raw of ['{"i":"x","nick":5,"text":[]}', "null", "[]"]) {
        await redis.command("PUBLISH", "chat:instance:" + "x", raw); // private lines that are not ours either
      }
      await a.write("/join x\r\n/join lobby\r\n"); // and nothing is said twice after them
      assert.equal(await a.readLine(), "You are now in x (1); /who lists who is here\r\n");
      assert.equal(await a.readLine(), "You are now in lobby (1); /who lists who is here\r\n");
      await redis.command("ZADD", "chat:instances", String(Date.now() + 60_000), "intruder");
      await redis.command("HSET", "chat:presence:intruder", "1.2.3.4:5", "null");
      await redis.command(
        "HSET",
        "chat:presence:intruder",
        "1.2.3.4:6",
        '{"address":"1.2.3.4:6","nick":null,"room":"lobby"}',
      );
      assert.deepEqual(await who(a), [`${a.name} (you)`, "1.2.3.4:6"]);
    });
  },
);

// --- Nothing lost: the rooms' streams -------------------------------------------------------------

/** Reads lines until `count` of `from`'s numbered `word` lines have come; returns their texts, in order. */
async function linesFrom(
  client: TestClient,
  from: string,
  word: string,
  count: number,
  ms = WAIT_MS,
): Promise<string[]> {
  const got: string[] = [];
  const deadline = Date.now() + ms;
  while (got.length < count) {
    const line = await client.readLine(Math.max(1, deadline - Date.now())).catch((e) => {
      const missing = [...Array(count).keys()].map((i) => i + 1).filter((n) =>
        !got.some((g) => g.endsWith(` ${n}`))
      );
      throw new Error(
        `${e.message}: had ${got.length} of ${count} from ${from}; missing ${missing.slice(0, 5)}`,
      );
    });
    if (line === null) throw new Error("closed");
    if (line.startsWith(`[${from}] ${word} `)) got.push(line.slice(from.length + 3).trimEnd());
  }
  return got;
}

const numbered = (who: string, n: number) => Array.from({ length: n }, (_, i) => `${who} ${i + 1}`);

/** Sends `n` numbered lines, one every `gap` ms. */
async function sendSpread(client: TestClient, who: string, n: number, gap: number): Promise<void> {
  for (const text of numbered(who, n)) {
    await client.write(text + "\r\n");
    await new Promise((r) => setTimeout(r, gap));
  }
}

redisTest(
  "Redis killed and restarted empty after 5 s while both sides send 500 lines: all arrive, once, in order",
  async () => {
    await withInstances(
      2,
      async ({ servers, logs, redis }) => {
        using a = await joinChat(servers[0].addr.port);
        using a2 = await joinChat(servers[0].addr.port);
        using b = await joinChat(servers[1].addr.port);
        await sync(a, b);
        await sync(b, a);
        await redis.kill();
        const sending = Promise.all([sendSpread(a, "east", 500, 9), sendSpread(b, "west", 500, 9)]);
        await new Promise((r) => setTimeout(r, 5000));
        await redis.start();
        const back = Date.now();
        const [west, east, local] = await Promise.all([
          linesFrom(a, b.name, "west", 500),
          linesFrom(b, a.name, "east", 500),
          linesFrom(a2, a.name, "east", 500), // said on its own instance at once, and not again
        ]);
        await sending;
        assert.ok(Date.now() - back < 5000, `took ${Date.now() - back} ms after Redis was back`);
        assert.deepEqual(east, numbered("east", 500));
        assert.deepEqual(west, numbered("west", 500));
        assert.deepEqual(local, numbered("east", 500));
        await logs[0].waitFor("Redis is back");
        await sync(a, b); // and nothing more: every line came once
        await sync(b, a2);
      },
      30,
      { rate: 0 },
    );
  },
);

redisTest(
  "Redis frozen for 5 s: every line arrives once, and the sender's own instance says it within seconds",
  async () => {
    await withInstances(
      2,
      async ({ servers, redis }) => {
        using a = await joinChat(servers[0].addr.port);
        using a2 = await joinChat(servers[0].addr.port);
        using b = await joinChat(servers[1].addr.port);
        await sync(a, b);
        await sync(a, a2);
        redis.signal("SIGSTOP");
        const frozen = Date.now();
        try {
          await sendSpread(a, "frozen", 50, 20);
          assert.deepEqual(await linesFrom(a2, a.name, "frozen", 50, 4000), numbered("frozen", 50)); // not held by Redis
          assert.ok(Date.now() - frozen < 5000);
        } finally {
          await new Promise((r) => setTimeout(r, Math.max(0, 5000 - (Date.now() - frozen))));
          redis.signal("SIGCONT");
        }
        assert.deepEqual(await linesFrom(b, a.name, "frozen", 50), numbered("frozen", 50));
        await sync(a, b); // once each: nothing after them but this
        await sync(a, a2);
      },
      30,
      { rate: 0 },
    );
  },
);

redisTest(
  "lines read from Redis in a burst never pass a reader's send queue: a thaw brings 300 KB to a 64 KB queue, and all of it arrives",
  async () => {
    await withInstances(
      2,
      async ({ servers, redis }) => {
        using a = await joinChat(servers[0].addr.port);
        using b = await joinChat(servers[1].addr.port);
        await sync(a, b);
        const pad = "z".repeat(1000);
        redis.signal("SIGSTOP");
        try {
          let batch = "";
          for (let i = 1; i <= 300; i++) batch += `burst ${pad} ${i}\r\n`;
          await a.write(batch);
          await new Promise((r) => setTimeout(r, 500));
        } finally {
          redis.signal("SIGCONT");
        }
        for (let i = 1; i <= 300; i++) {
          assert.equal(await b.readLine(), `[${a.name}] burst ${pad} ${i}\r\n`);
        }
      },
      30,
      { rate: 0, sendq: 64 * 1024 },
    );
  },
);

redisTest(
  "FLUSHALL while both instances chat: the next line in every room crosses within 2 s, with one notice",
  async () => {
    await withInstances(2, async ({ servers, redis }) => {
      using a = await joinChat(servers[0].addr.port);
      using b = await joinChat(servers[1].addr.port);
      using c = await joinChat(servers[0].addr.port);
      using d = await joinChat(servers[1].addr.port);
      await c.write("/join dev\r\n");
      await readUntil(c, (l) => l.startsWith("You are now in dev (1)"));
      await d.write("/join dev\r\n");
      await readUntil(d, (l) => l.startsWith("You are now in dev (2)"));
      await sync(a, b);
      await sync(c, d);
      await sync(d, c);
      assert.equal(await redis.command("FLUSHALL"), "+OK");
      const flushed = Date.now();
      await a.write("after the flush\r\n");
      await d.write("after the flush too\r\n");
      const linesB = await collectUntil(b, (l) => l.includes("after the flush"));
      const linesC = await collectUntil(c, (l) => l.includes("after the flush too"));
      assert.ok(Date.now() - flushed < 2000, `took ${Date.now() - flushed} ms`);
      assert.equal(linesB.at(-1), `[${a.name}] after the flush\r\n`);
      assert.equal(linesC.at(-1), `[${d.name}] after the flush too\r\n`);
      await a.write("sync-flush\r\n");
      await d.write("sync-flush\r\n");
      linesB.push(...await collectUntil(b, (l) => l.endsWith("] sync-flush\r\n")));
      linesC.push(...await collectUntil(c, (l) => l.endsWith("] sync-flush\r\n")));
      // Each room says once that its history was reset, and nothing came twice.
      assert.deepEqual(linesB.filter((l) => l.includes("was reset")), [
        "(the history of lobby was reset)\r\n",
      ]);
      assert.deepEqual(linesC.filter((l) => l.includes("was reset")), ["(the history of dev was reset)\r\n"]);
      assert.equal(linesB.filter((l) => l.includes("after the flush")).length, 1);
      for (const [client, room] of [[a, "lobby"], [b, "lobby"], [c, "dev"], [d, "dev"]] as const) {
        await client.write("/history\r\n");
        const header = await readUntil(client, (l) => l.startsWith("History of") || l.startsWith("Nothing"));
        assert.match(header, new RegExp(`^History of ${room} \\(the last \\d+ lines?\\):`));
      }
    }, 2);
  },
);

redisTest(
  "a room's history and positions are shared: a newcomer's page on either instance sees the same",
  async () => {
    await withInstances(
      2,
      async ({ servers }) => {
        using a = await joinChat(servers[0].addr.port);
        using b = await joinChat(servers[1].addr.port);
        await sync(b, a);
        for (const text of ["one", "two", "three"]) await a.write(text + "\r\n");
        await sync(a, b);
        const marks = [];
        for (const server of servers) {
          const page = new WsClient(`ws://127.0.0.1:${server.httpAddr!.port}/ws?page=1`);
          await page.opened();
          const lines = [];
          for (let line = ""; !line.endsWith(" sync-" + syncs); line = await page.next()) lines.push(line);
          marks.push(
            lines.filter((l) => l.startsWith("\x1e@") || l.startsWith("\x1eh")).map((l) =>
              l.replace(/^(.h \d+) \d+/, "$1")
            ),
          );
          await page.close();
        }
        assert.deepEqual(marks[0], marks[1]);
        assert.deepEqual(
          marks[0].filter((l) => / (one|two|three)$/.test(l)).map((l) => l.slice(l.indexOf("] ") + 2)),
          [
            "one",
            "two",
            "three",
          ],
        );
      },
      30,
      { http: { port: 0 } },
    );
  },
);

redisTest(
  "a 30 s outage with 2,000 lines: all of them arrive once Redis is back, and the queue stays in its bound",
  async () => {
    await withInstances(
      2,
      async ({ servers, redis }) => {
        using a = await joinChat(servers[0].addr.port);
        using b = await joinChat(servers[1].addr.port);
        await sync(a, b);
        await redis.kill();
        let most = 0;
        const watching = setInterval(() => most = Math.max(most, servers[0].bus!.waitingBytes), 100);
        try {
          await sendSpread(a, "outage", 2000, 14); // about 30 s
          await redis.start();
          assert.deepEqual(await linesFrom(b, a.name, "outage", 2000), numbered("outage", 2000));
        } finally {
          clearInterval(watching);
        }
        assert.ok(most > 0 && most <= BUS_QUEUE_BYTES, `the queue held ${most} bytes`);
        await sync(a, b);
      },
      30,
      { rate: 0 },
    );
  },
);

redisTest(
  "a page that joins a room its instance has not read yet sees that room's lines from the other instance",
  async () => {
    await withInstances(
      2,
      async ({ servers }) => {
        using a = await joinChat(servers[0].addr.port);
        using a2 = await joinChat(servers[0].addr.port);
        await a.write("/join dev\r\n");
        await a2.write("/join dev\r\n");
        await readUntil(a2, (l) => l.startsWith("You are now in dev"));
        for (const text of ["in dev one", "in dev two"]) await a.write(text + "\r\n");
        await readUntil(a2, (l) => l.endsWith("in dev two\r\n")); // through the stream: it is in Redis
        const page = new WsClient(`ws://127.0.0.1:${servers[1].httpAddr!.port}/ws?page=1`);
        await page.opened();
        page.ws.send("/join dev"); // nobody on this instance is in dev: its stream is read from now on
        const seen: string[] = [];
        for (let line = ""; !line.endsWith("in dev two"); line = await page.next()) seen.push(line);
        const at = seen.filter((l) => l.startsWith("\x1e@ dev "));
        assert.equal(at.length, 1, seen.join("\n")); // told once, when the room's position was known
        assert.match(at[0], /^\x1e@ dev [0-9a-f]{8} 0$/);
        assert.ok(seen.some((l) => l.endsWith("in dev one")));
        await a.write("and live\r\n");
        for (let line = ""; !line.endsWith("and live"); line = await page.next()) {
          assert.ok(!line.endsWith("in dev two"));
        }
        await page.close();
      },
      30,
      { http: { port: 0 } },
    );
  },
);

redisTest(
  "a line said while its instance catches up with Redis is shared at once, not left in the queue",
  async () => {
    await withInstances(2, async ({ servers }) => {
      using a = await joinChat(servers[0].addr.port);
      using b = await joinChat(servers[1].addr.port);
      await sync(a, b);
      // Entering a room its instance does not read yet queues the join until the room is read, and
      // the instance catches up. Lines said a moment later, at every moment of that catch-up, must
      // cross too, before anything else is said on a's instance.
      for (let i = 0; i < 24; i++) {
        await b.write(`/join r${i}\r\n`);
        await readUntil(b, (l) => l.startsWith(`You are now in r${i}`));
        await a.write(`/join r${i}\r\n`);
        await new Promise((r) => setTimeout(r, i % 8));
        await a.write(`line ${i}\r\n`);
        await readUntil(b, (l) => l === `[${a.name}] line ${i}\r\n`);
      }
    });
  },
);

redisTest("every client on every instance sees a room's lines in one order, whoever sends them", async () => {
  await withInstances(
    2,
    async ({ servers }) => {
      using a = await joinChat(servers[0].addr.port);
      using b = await joinChat(servers[1].addr.port);
      using c = await joinChat(servers[0].addr.port);
      using d = await joinChat(servers[1].addr.port);
      await sync(a, d);
      await sync(b, c);
      await sync(a, c);
      await sync(b, d);
      await Promise.all([sendSpread(a, "east", 200, 0), sendSpread(b, "west", 200, 0)]);
      const heard = async (client: TestClient) => {
        const lines = [];
        while (lines.length < 400) {
          const line = (await client.readLine())!;
          if (/ (east|west) \d+\r\n$/.test(line)) lines.push(line);
        }
        return lines;
      };
      const [onA, onB] = await Promise.all([heard(c), heard(d)]);
      assert.deepEqual(onA, onB); // the same interleaving on both instances
      assert.ok(
        onA.some((l, i) => i > 0 && l.includes("east") !== onA[i - 1].includes("east")),
        "they interleave",
      );
    },
    30,
    { rate: 0 },
  );
});

redisTest(
  "a Redis restored from an older snapshot is noticed: its room's history forks under a new epoch",
  async () => {
    await withInstances(2, async ({ servers, redis }) => {
      using a = await joinChat(servers[0].addr.port);
      using b = await joinChat(servers[1].addr.port);
      await sync(b, a);
      for (let i = 1; i <= 5; i++) await a.write(`kept ${i}\r\n`);
      await sync(a, b);
      const before = await redis.command("HGET", "chat:room:lobby", "epoch");
      // An older snapshot, as a reader sees it: the room's stream and position end before what it has read.
      const rollBack = "for _, e in ipairs(redis.call('XRANGE', KEYS[1], '3-0', '+')) do " +
        "redis.call('XDEL', KEYS[1], e[1]) end; redis.call('XSETID', KEYS[1], '2-0'); " +
        "redis.call('HSET', KEYS[2], 'seq', 2, 'sub', 0); return 1";
      assert.equal(await redis.command("EVAL", rollBack, "2", "chat:stream:lobby", "chat:room:lobby"), ":1");
      await eventually( // a heartbeat (0.67 s here) notices
        "a new epoch for the forked room",
        async () => await redis.command("HGET", "chat:room:lobby", "epoch") !== before,
      );
      await a.write("after the fork\r\n");
      const lines = await collectUntil(b, (l) => l.includes("after the fork"));
      assert.deepEqual(lines.filter((l) => l.includes("was reset")), [
        "(the history of lobby was reset)\r\n",
      ]);
    }, 2);
  },
);

redisTest(
  "an entry added by hand with Redis's own id (XADD *) starts the room again, once, and nothing is said twice",
  async () => {
    await withInstances(2, async ({ servers, logs, redis }) => {
      using a = await joinChat(servers[0].addr.port);
      using b = await joinChat(servers[1].addr.port);
      await sync(a, b);
      await sync(b, a);
      await redis.command("XADD", "chat:stream:lobby", "*", "t", "typed by hand"); // an id far above ours
      await a.write("after the rogue\r\n");
      assert.equal(
        await readUntil(b, (l) => l.includes("after the rogue")),
        `[${a.name}] after the rogue\r\n`,
      );
      await b.write("and back\r\n");
      assert.equal(await readUntil(a, (l) => l.includes("and back")), `[${b.name}] and back\r\n`);
      await a.write("/join dev\r\n"); // a room joined afterwards crosses too
      await b.write("/join dev\r\n");
      await readUntil(a, (l) => l.startsWith("You are now in dev"));
      await readUntil(b, (l) => l.startsWith("You are now in dev"));
      await sync(b, a);
      await sync(a, b);
      await new Promise((r) => setTimeout(r, 2000)); // two heartbeats: nothing is sent again
      const length = Number((await redis.command("XLEN", "chat:stream:lobby")).slice(1)); // ":N"
      assert.ok(length < 10, `the lobby's stream has ${length} entries`);
      await ask(b, "/join lobby", "You are now in lobby (1); /who lists who is here");
      await b.write("/history\r\n");
      const shown = await collectUntil(b, (l) => l.includes("and back"));
      assert.equal(shown.filter((l) => l.includes("after the rogue")).length, 1, shown.join(""));
      const said = logs[0].text + logs[1].text;
      assert.equal(said.match(/was not this chat's/g)?.length, 1, said);
    });
  },
);

redisTest(
  "Redis frozen for 20 s under 2,000 lines/s of 1 KB: the log says so, the sender is paced, and all 20,000 lines cross on thaw",
  async () => {
    await withInstances(
      2,
      async ({ servers, logs, redis }) => {
        using a = await joinChat(servers[0].addr.port);
        using b = await joinChat(servers[1].addr.port);
        await sync(a, b);
        const count = 20_000, pad = "y".repeat(1000);
        redis.signal("SIGSTOP");
        const thaw = setTimeout(() => redis.signal("SIGCONT"), 20_000);
        try {
          const sending = (async () => {
            for (let i = 1; i <= count; i += 20) {
              let batch = "";
              for (let j = i; j < i + 20; j++) batch += `frozen ${pad} ${j}\r\n`;
              await a.write(batch);
              await new Promise((r) => setTimeout(r, 10));
            }
          })();
          let got = 0;
          const reading = (async () => {
            while (got < count) {
              const line = await b.readLine(40_000);
              if (line?.startsWith(`[${a.name}] frozen `)) {
                assert.ok(
                  line.endsWith(` ${got + 1}\r\n`),
                  `line ${got + 1} out of order: ${line.slice(-20)}`,
                );
                got++;
              }
            }
          })();
          await Promise.all([
            sending,
            within(90_000, reading, "every line on the other instance").catch((e) => {
              throw new Error(`${e.message}: ${got} of ${count} arrived`);
            }),
          ]);
        } finally {
          clearTimeout(thaw);
          redis.signal("SIGCONT");
        }
        assert.match(logs[0].text, /Redis is not answering/);
        assert.doesNotMatch(logs[0].text, /did not fit the queue/);
      },
      30,
      { rate: 0 },
    );
  },
);

redisTest(
  "operators across instances: a ban made on one refuses and cuts on the other, a kick reaches the user there, a topic shows there",
  async () => {
    const password = "s3cret";
    await withInstances(
      2,
      async ({ servers, logs, redis }) => {
        const [one, two] = servers.map((s) => s.addr.port);
        const op = await From.join("127.0.0.1", one);
        await op.ask(`/oper ${password}`, "You are now an operator; /help lists what operators can do");
        await op.ask("/join ops", "You are now in ops (1); /who lists who is here");
        const far = await From.join("127.0.0.7", two);
        far.write("/nick faraway\r\n"); // the op's move to ops may cross Redis before the answer
        await far.readUntil((l) => l === "You are now known as faraway\r\n");
        using watcher = await joinChat(two);
        await far.readUntil((l) => l === `Client joined ${watcher.name}\r\n`);
        await op.ask("/kick FarAway off topic", "You kicked FarAway: off topic");
        assert.equal(
          await far.readUntil((l) => l.startsWith("You")),
          `You were kicked by ${op.name}: off topic\r\n`,
        );
        assert.equal(await far.readLine(), null);
        assert.equal(
          await readUntil(watcher, (l) => l.startsWith("Client left")), // after far's nick, if it crossed late
          `Client left faraway (kicked by ${op.name}: off topic)\r\n`,
        );

        const banned = await From.join("127.0.0.8", two);
        await readUntil(watcher, (l) => l === `Client joined ${banned.name}\r\n`);
        await op.ask("/ban 127.0.0.8 1h spam", clocked(`You banned 127.0.0.8 until {60}: spam`));
        assert.equal(
          await banned.readUntil((l) => l.startsWith("You")),
          "You are banned from this server: spam\r\n",
        );
        assert.equal(await banned.readLine(), null);
        const again = await From.connect("127.0.0.8", two);
        assert.equal(await again.readLine(), "Sorry, you are banned from this server: spam\r\n");

        await watcher.write("/join ops\r\n");
        await readUntil(watcher, (l) => l.startsWith("You are now in ops (2)"));
        await op.readUntil((l) => l.endsWith(" has joined ops\r\n"));
        await op.ask("/topic the rota is pinned", `${op.name} set the topic: the rota is pinned`);
        assert.equal(await watcher.readLine(), `${op.name} set the topic: the rota is pinned\r\n`);

        // A third instance, started later, holds the ban and the topic from Redis.
        const { servers: [three] } = await instances(redis, 1, 30, { operPassword: password });
        try {
          const refused = await From.connect("127.0.0.8", three.addr.port);
          assert.equal(await refused.readLine(), "Sorry, you are banned from this server: spam\r\n");
          using late = await joinChat(three.addr.port);
          await ask(
            late,
            "/join ops",
            "You are now in ops (3); /who lists who is here",
            "Topic of ops: the rota is pinned",
          );
        } finally {
          await three.close();
        }
        await logs[0].waitFor(`${op.name} kicked FarAway: off topic`);
        await op.close();
      },
      30,
      { operPassword: password },
    );
  },
);

redisTest(
  "a decision published on the bus by anyone else is checked like a command: a false mask or a giant topic is ignored",
  async () => {
    await withInstances(1, async ({ servers, redis }) => {
      const port = servers[0].addr.port;
      using a = await joinChat(port);
      const rule = (fields: Record<string, unknown>) =>
        JSON.stringify({
          kind: "ban",
          key: "",
          text: "",
          until: null,
          by: "x",
          at: 0,
          i: "other",
          ...fields,
        });
      await redis.command("PUBLISH", "chat:rules", rule({ key: "0.0.0.0/0" }).replace("/0", "/99"));
      await redis.command(
        "PUBLISH",
        "chat:rules",
        rule({ kind: "topic", key: "lobby", text: "t".repeat(5000) }),
      );
      await redis.command("PUBLISH", "chat:rules", "not json");
      await redis.command(
        "PUBLISH",
        "chat:rules",
        rule({ kind: "topic", key: "lobby", text: "fine\u0007 topic" }),
      );
      assert.equal(await a.readLine(), "x set the topic: fine topic\r\n"); // only the last, its control taken out
      const other = await From.join("127.0.0.9", port); // nobody is banned
      await other.close();
    });
  },
);
