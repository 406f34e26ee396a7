// chat_server.ts operators: /oper with CHAT_OPER_PASSWORD, then /kick, /ban, /mute and /topic,
// tried by telnet-like clients, each bound to a loopback address of its own (127.0.0.7, ...) so
// that a ban by address never touches the test's own 127.0.0.1.
import assert from "node:assert/strict";
import {
  ask,
  Cli,
  clocked,
  From,
  joinChat,
  readUntil,
  withServer,
  withWebServer,
  WsClient,
} from "./_helpers.ts";

const PASSWORD = "correct horse battery staple";

/** A client made operator; in a room of its own if `room` is given, where nobody's joins reach it. */
async function operator(port: number, room = ""): Promise<From> {
  const op = await From.join("127.0.0.1", port);
  await op.ask(`/oper ${PASSWORD}`, "You are now an operator; /help lists what operators can do");
  if (room) await op.ask(`/join ${room}`, `You are now in ${room} (1); /who lists who is here`);
  return op;
}

Deno.test("/oper: not enabled without CHAT_OPER_PASSWORD; a wrong password is told, logged, and the third in a minute closes", async () => {
  await withServer({}, async (port) => {
    using a = await joinChat(port);
    await ask(a, "/oper guess", "Operators are not enabled on this server");
  });
  await withServer({ operPassword: PASSWORD }, async (port, log) => {
    using a = await joinChat(port);
    await ask(a, "/oper", "Usage: /oper PASSWORD");
    await ask(a, "/oper correct horse", "Wrong operator password (1 of 3 tries a minute)");
    await ask(a, `/oper ${PASSWORD}x`, "Wrong operator password (2 of 3 tries a minute)");
    await log.waitFor(`Wrong operator password from ${a.name}`);
    assert.doesNotMatch(log.text, /horse/, "the password tried is never logged");
    await ask(a, "/oper x", "Too many wrong operator passwords");
    assert.equal(await a.readLine(), null);
    using b = await joinChat(port);
    await ask(b, `/oper ${PASSWORD}`, "You are now an operator; /help lists what operators can do");
    await ask(b, `/oper ${PASSWORD}`, "You are an operator already");
    await log.waitFor(`${b.name} is now an operator`);
  });
});

Deno.test("operator commands from someone who is not one get one line and do nothing; /help lists them to operators alone", async () => {
  await withServer({ operPassword: PASSWORD }, async (port) => {
    using a = await joinChat(port);
    using b = await joinChat(port);
    await a.readLine(); // b joined
    for (const command of ["kick", "ban", "unban", "bans", "mute", "unmute"]) {
      await ask(a, `/${command} ${b.name}`, `/${command} is for operators only`);
    }
    await ask(a, "/topic free pizza", "Setting the topic is for operators only");
    await a.write("/help\r\n");
    const plain = await readUntil(a, (l) => l.startsWith("  //text"));
    assert.ok(plain);
    await ask(a, "/who", "In lobby (2):", `  ${a.name} (you)`, `  ${b.name}`); // nothing more came, b is still here
    await ask(a, `/oper ${PASSWORD}`, "You are now an operator; /help lists what operators can do");
    await a.write("/help\r\n");
    await readUntil(a, (l) => l.startsWith("  //text"));
    assert.equal(await a.readLine(), "Operator commands:\r\n");
    assert.match((await a.readLine())!, /^ {2}\/kick NAME \[REASON\] +disconnect NAME, saying why\r\n$/);
  });
});

Deno.test("/kick NAME [REASON]: told why and closed; the room sees who kicked whom and why; bad targets are told", async () => {
  await withServer({ operPassword: PASSWORD }, async (port, log) => {
    const op = await operator(port, "ops");
    using c = await joinChat(port);
    const b = await From.join("127.0.0.7", port);
    await b.ask("/nick troll", "You are now known as troll");
    await readUntil(c, (l) => l === `${b.name} is now known as troll\r\n`);
    await op.ask("/kick nobody", "No such user: nobody");
    await op.ask("/kick", "Usage: /kick NAME [REASON]");
    await op.ask(`/kick ${op.name}`, "You cannot kick yourself");
    await op.ask("/kick TROLL spamming the room", "You kicked TROLL: spamming the room");
    assert.equal(await b.readLine(), "You were kicked by " + op.name + ": spamming the room\r\n");
    assert.equal(await b.readLine(), null);
    assert.equal(await c.readLine(), `Client left troll (kicked by ${op.name}: spamming the room)\r\n`);
    await log.waitFor(`${op.name} kicked TROLL: spamming the room`);
    await op.close();
  });
});

Deno.test("/ban: cuts the address at once, refuses it at the door in one line, lists and lifts; others come in", async () => {
  await withServer({ operPassword: PASSWORD }, async (port, log) => {
    const op = await operator(port, "ops");
    const b = await From.join("127.0.0.7", port);
    const b2 = await From.join("127.0.0.7", port);
    await op.ask("/ban 127.0.0.7 10m spam", clocked(`You banned 127.0.0.7 until {10}: spam`));
    for (const gone of [b, b2]) {
      assert.equal(
        await gone.readUntil((l) => !l.startsWith("Client joined")),
        "You are banned from this server: spam\r\n",
      );
      assert.equal(await gone.readLine(), null);
    }
    const again = await From.connect("127.0.0.7", port);
    assert.equal(await again.readLine(), "Sorry, you are banned from this server: spam\r\n");
    assert.equal(await again.readLine(), null);
    const other = await From.join("127.0.0.8", port); // its neighbour is not banned
    await op.ask("/bans", "Bans (1):", clocked(`  127.0.0.7 until {10}, by ${op.name}: spam`));
    await op.ask("/unban 127.0.0.7", "You lifted the ban on 127.0.0.7");
    await op.ask("/unban 127.0.0.7", "No ban on 127.0.0.7");
    await op.ask("/bans", "No bans");
    const back = await From.join("127.0.0.7", port);
    await log.waitFor(`${op.name} banned 127.0.0.7 until`);
    await log.waitFor(`${op.name} lifted the ban on 127.0.0.7`);
    await Promise.all([op, other, back].map((c) => c.close()));
  });
});

Deno.test("/ban by nick and by CIDR block, with and without a duration; a short ban ends by itself", async () => {
  await withServer({ operPassword: PASSWORD }, async (port) => {
    const op = await operator(port, "ops");
    const b = await From.join("127.0.0.9", port);
    await b.ask("/nick mallory", "You are now known as mallory");
    await op.ask("/ban Mallory", "You banned 127.0.0.9 until lifted");
    assert.equal(await b.readUntil((l) => l.startsWith("You are")), "You are banned from this server\r\n");
    await op.ask("/ban 127.0.1.0/24 1s", clocked(`You banned 127.0.1.0/24 until {0}`));
    const refused = await From.connect("127.0.1.5", port);
    assert.equal(await refused.readLine(), "Sorry, you are banned from this server\r\n");
    await new Promise((r) => setTimeout(r, 1100));
    const later = await From.join("127.0.1.5", port);
    await op.ask("/bans", "Bans (1):", `  127.0.0.9 until lifted, by ${op.name}`);
    await Promise.all([op, later].map((c) => c.close()));
  });
});

Deno.test("/ban and /mute turn away bad input in one line: absurd durations, false CIDRs, a ban on oneself", async () => {
  await withServer({ operPassword: PASSWORD }, async (port) => {
    const op = await operator(port, "ops");
    const b = await From.join("127.0.0.7", port);
    const notDuration = (t: string) => `"${t}" is not a duration: write 90s, 10m, 2h or 1d, up to 366d`;
    await op.ask("/ban", "Usage: /ban MASK [TIME] [REASON], MASK an address, a CIDR block or a nick");
    await op.ask(
      "/ban 10.0.0.0/33",
      `"10.0.0.0/33" is not an address or a CIDR block like 10.0.0.0/8 or fd00::/8`,
    );
    await op.ask(
      "/ban 10.0.0.0/8/8",
      `"10.0.0.0/8/8" is not an address or a CIDR block like 10.0.0.0/8 or fd00::/8`,
    );
    await op.ask("/ban 10.0.0.1 0m", notDuration("0m"));
    await op.ask("/ban 10.0.0.1 99999d", notDuration("99999d"));
    await op.ask("/ban 10.0.0.1 5 minutes", notDuration("5"));
    await op.ask("/ban nosuchnick", "No such user: nosuchnick");
    await op.ask("/ban 127.0.0.0/8", "A ban on 127.0.0.0/8 would cover you too; not banned");
    await op.ask("/unban 10.0.0.0/33", "Usage: /unban MASK, as /bans lists it");
    await op.ask(`/mute ${b.name} 1y`, notDuration("1y"));
    await op.ask(`/mute ${b.name} -5m`, notDuration("-5m"));
    await op.ask("/mute ghost", "No such user: ghost");
    await op.ask(`/mute ${op.name}`, "You cannot mute yourself");
    await op.ask("/bans", "No bans");
    await b.ask("/who", "In lobby (1):", `  ${b.name} (you)`); // untouched
    await Promise.all([op, b].map((c) => c.close()));
  });
});

Deno.test("/mute: the muted client's lines, actions and private lines reach nobody; it is told once; /unmute and durations end it", async () => {
  await withServer({ operPassword: PASSWORD, rate: 0 }, async (port, log) => {
    const op = await operator(port, "ops");
    const b = await From.join("127.0.0.7", port);
    using c = await joinChat(port);
    await b.readLine(); // c joined
    await op.ask(`/mute ${b.name}`, `You muted ${b.name} until lifted`);
    assert.equal(
      await b.readUntil((l) => l.startsWith("You have")),
      `You have been muted by ${op.name} until lifted: nobody hears what you say\r\n`,
    );
    b.write(`shouting\r\n/me shouts\r\n/msg ${c.name} psst\r\n`);
    await b.ask("/who", "In lobby (2):", `  ${b.name} (you)`, `  ${c.name}`); // nothing else came
    await op.ask(`/unmute ${b.name}`, `You unmuted ${b.name}`);
    assert.equal(await b.readLine(), `You have been unmuted by ${op.name}: you are heard again\r\n`);
    b.write("heard again\r\n");
    assert.equal(await c.readLine(), `[${b.name}] heard again\r\n`); // and not the muted lines before it
    await op.ask(`/mute ${b.name} 1s`, clocked(`You muted ${b.name} until {0}`));
    await b.readUntil((l) => l.startsWith("You have"));
    b.write("too soon\r\n");
    await new Promise((r) => setTimeout(r, 1100));
    b.write("in time\r\n");
    assert.equal(await c.readLine(), `[${b.name}] in time\r\n`);
    await log.waitFor(`${op.name} muted ${b.name} until lifted`);
    await Promise.all([op, b].map((x) => x.close()));
  });
});

Deno.test("/topic: anyone reads it, operators set and clear it, the room hears, and whoever enters is shown it", async () => {
  await withServer({ operPassword: PASSWORD, maxLine: 512 }, async (port) => {
    const op = await operator(port);
    using a = await joinChat(port);
    await op.readUntil((l) => l === `Client joined ${a.name}\r\n`);
    await ask(a, "/topic", "lobby has no topic");
    await op.ask("/topic Homework is due Friday", `${op.name} set the topic: Homework is due Friday`);
    assert.equal(await a.readLine(), `${op.name} set the topic: Homework is due Friday\r\n`);
    await ask(a, "/topic", "Topic of lobby: Homework is due Friday");
    using late = await joinChat(port); // the greeting, then the topic
    assert.equal(await late.readLine(), "Topic of lobby: Homework is due Friday\r\n");
    await op.readLine(), await a.readLine(); // late joined
    await op.ask("/join dev", "You are now in dev (1); /who lists who is here");
    assert.equal(await a.readLine(), `${op.name} has left lobby for dev\r\n`);
    await op.ask("/topic builds are red", `${op.name} set the topic: builds are red`);
    await ask(
      a,
      "/join dev",
      "You are now in dev (2); /who lists who is here",
      "Topic of dev: builds are red",
    );
    await op.readLine(); // a has joined dev
    await op.ask(`/topic ${"x".repeat(391)}`, "A topic is at most 390 bytes");
    await op.ask(
      `/topic ${"y".repeat(600)}`,
      "Your line was over 512 bytes; the rest of it was discarded",
      "A topic is at most 390 bytes",
    );
    await op.ask("/topic bell\x07 here", `${op.name} set the topic: bell here`); // controls go, as from any line
    assert.equal(await a.readLine(), `${op.name} set the topic: bell here\r\n`);
    await op.ask("/topic -", `${op.name} cleared the topic`);
    assert.equal(await a.readLine(), `${op.name} cleared the topic\r\n`);
    await ask(a, "/topic", "dev has no topic");
    await op.close();
  });
});

Deno.test("with --history FILE, bans and topics survive a restart; mutes and operators do not", async () => {
  const dir = await Deno.makeTempDir();
  const options = { operPassword: PASSWORD, historyFile: `${dir}/history.db` };
  try {
    await withServer(options, async (port) => {
      const op = await operator(port);
      await op.ask("/topic read the syllabus", `${op.name} set the topic: read the syllabus`);
      await op.ask("/ban 127.0.0.7 1d cheating", clocked(`You banned 127.0.0.7 until {1440}: cheating`));
      await op.ask("/ban 127.0.0.8", "You banned 127.0.0.8 until lifted");
      await op.ask("/unban 127.0.0.8", "You lifted the ban on 127.0.0.8");
      await op.close();
    });
    const { DatabaseSync } = await import("node:sqlite"); // a row nobody wrote is skipped, not fatal
    const db = new DatabaseSync(options.historyFile);
    db.exec(
      `INSERT INTO rules (field, rule) VALUES ('ban 10.0.0.1', 'not json'), ('ban 10.0.0.2', '{"kind":"ban"}')`,
    );
    db.close();
    await withServer(options, async (port) => {
      using a = await joinChat(port);
      assert.equal(await a.readLine(), "Topic of lobby: read the syllabus\r\n");
      await ask(a, "/bans", "/bans is for operators only"); // operators are not kept
      const refused = await From.connect("127.0.0.7", port);
      assert.equal(await refused.readLine(), "Sorry, you are banned from this server: cheating\r\n");
      const lifted = await From.join("127.0.0.8", port);
      await lifted.close();
    });
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("chat_server.ts reads CHAT_OPER_PASSWORD from the environment, never from its arguments", async () => {
  const cli = new Cli("chat_server.ts", ["0", "--host", "127.0.0.1"], {
    CHAT_OPER_PASSWORD: PASSWORD,
  });
  try {
    const port = await cli.started();
    const op = await operator(port);
    await op.close();
  } finally {
    cli.kill();
    await cli.finish();
  }
});

Deno.test("operators reach web clients too: a mute, a kick and a ban by address, and the banned page is refused at the door", async () => {
  await withWebServer({ operPassword: PASSWORD, host: "127.0.0.1" }, async (tcp, http) => {
    const op = await From.join("127.0.0.2", tcp); // the pages come from 127.0.0.1: the ban is theirs alone
    await op.ask(`/oper ${PASSWORD}`, "You are now an operator; /help lists what operators can do");
    await op.ask("/join ops", "You are now in ops (1); /who lists who is here");
    const watcher = await From.join("127.0.0.3", tcp);
    const web = new WsClient(`ws://127.0.0.1:${http}/ws`);
    await web.opened();
    await web.next(); // the greeting
    const name = /^Client joined (\S+)\r\n$/.exec((await watcher.readLine())!)![1];
    await op.ask(`/mute ${name}`, `You muted ${name} until lifted`);
    assert.equal(
      await web.next(),
      `You have been muted by ${op.name} until lifted: nobody hears what you say`,
    );
    web.ws.send("can anyone hear me");
    web.ws.send("/topic"); // its answer comes after the line above was taken (and dropped)
    assert.equal(await web.next(), "lobby has no topic");
    await op.ask(`/unmute ${name}`, `You unmuted ${name}`);
    await web.next();
    web.ws.send("now?");
    assert.equal(await watcher.readLine(), `[${name}] now?\r\n`); // and not the muted line
    await op.ask(`/kick ${name} enough`, `You kicked ${name}: enough`);
    assert.equal(await web.next(), `You were kicked by ${op.name}: enough`);
    await web.closed();
    const again = new WsClient(`ws://127.0.0.1:${http}/ws`);
    await again.opened();
    await again.next();
    await op.ask("/ban 127.0.0.1 2h", clocked(`You banned 127.0.0.1 until {120}`));
    assert.equal(await again.next(), "You are banned from this server");
    await again.closed();
    const refused = await fetch(`http://127.0.0.1:${http}/ws`, {
      headers: {
        Upgrade: "websocket",
        Connection: "Upgrade",
        "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Version": "13",
      },
    });
    assert.equal(refused.status, 403);
    assert.equal(await refused.text(), "Sorry, you are banned from this server\n");
    await Promise.all([op, watcher].map((c) => c.close()));
  });
});

Deno.test("with --log json, each operator's decision is one JSON event saying who made it, and when a ban ends", async () => {
  await withServer({ operPassword: PASSWORD, logFormat: "json" }, async (port, log) => {
    const op = await operator(port);
    await op.ask("/ban 10.0.0.0/8 1h spammers", clocked(`You banned 10.0.0.0/8 until {60}: spammers`));
    await log.waitFor('"event":"ban"');
    const ban = log.text.split("\n").map((l) => l && JSON.parse(l)).find((e) => e?.event === "ban");
    assert.equal(ban.by, op.name);
    assert.equal(ban.key, "10.0.0.0/8");
    assert.equal(ban.text, "spammers");
    assert.ok(Math.abs(Date.parse(ban.until) - Date.now() - 3_600_000) < 5000, ban.until);
    await op.close();
  });
});
