// chat_server.ts beyond the tutorial: commands, rooms, limits, TLS and the JSON log.
import assert from "node:assert/strict";
import { checkName, type Client, inBlocks, Limits, parseBlocks } from "../chat_server.ts";
import {
  ask,
  Cli,
  GREETING,
  hasProgram,
  joinChat,
  needs,
  TestClient,
  WAIT_MS,
  withCertificates,
  within,
  withServer,
} from "./_helpers.ts";

Deno.test("/nick renames a client, once per name whatever the case, and its lines carry the nick", async () => {
  await withServer({}, async (port) => {
    using a = await joinChat(port);
    using b = await joinChat(port);
    await a.readLine();
    await b.write("before\r\n");
    assert.equal(await a.readLine(), `[${b.name}] before\r\n`);
    await ask(b, "/nick Alice", "You are now known as Alice");
    assert.equal(await a.readLine(), `${b.name} is now known as Alice\r\n`);
    await ask(a, "/nick alice", `The nick alice is taken; you are still ${a.name}`);
    await ask(a, "/nick ALICE", `The nick ALICE is taken; you are still ${a.name}`);
    await ask(a, "/nick two words", `A nick has no spaces, ':' or brackets; you are still ${a.name}`);
    await ask(a, "/nick 1.2.3.4:5", `A nick has no spaces, ':' or brackets; you are still ${a.name}`);
    await ask(a, `/nick ${"x".repeat(33)}`, `A nick has 1 to 32 characters; you are still ${a.name}`);
    await b.write("hi\r\n");
    assert.equal(await a.readLine(), "[Alice] hi\r\n");
    await ask(b, "/nick alice", "You are now known as alice"); // a change of case is yours to make
    assert.equal(await a.readLine(), "Alice is now known as alice\r\n");
    await b.write("again\r\n");
    assert.equal(await a.readLine(), "[alice] again\r\n"); // the new name, though b has spoken before
    b.close();
    assert.equal(await a.readLine(), "Client left alice\r\n");
    await ask(a, "/nick Alice", "You are now known as Alice"); // free again once she left
  });
});

Deno.test("/history shows a room's recent lines and /me, with their times; never joins or private text", async () => {
  await withServer({ historyLines: 3 }, async (port) => {
    using a = await joinChat(port);
    await ask(a, "/history", "Nothing has been said in lobby yet");
    using b = await joinChat(port);
    await a.readLine();
    await ask(b, "/nick bob", "You are now known as bob");
    await a.readLine();
    for (const line of ["one", "two", "/me waves", "three", "/msg " + a.name + " secret"]) {
      await b.write(line + "\r\n");
    }
    for (let i = 0; i < 5; i++) await a.readLine();
    await a.write("/history\r\n");
    assert.equal(await a.readLine(), "History of lobby (the last 3 lines):\r\n");
    const shown = [await a.readLine(), await a.readLine(), await a.readLine()];
    assert.deepEqual(
      shown.map((l) => l!.replace(/^ {2}\(\d\d:\d\d\) /, "")),
      ["two\r\n", "* bob waves\r\n", "three\r\n"].map((t, i) => i === 1 ? t : `[bob] ${t}`),
    );
    await ask(
      a,
      "/history 1",
      "History of lobby (the last 1 line):",
      `  (${shown[2]!.slice(3, 8)}) [bob] three`,
    );
    await ask(a, "/history many", "Usage: /history [N], N a whole number from 1");
    await ask(a, "/join dev", "You are now in dev (1); /who lists who is here");
    await ask(a, "/history", "Nothing has been said in dev yet"); // history is per room
  });
  await withServer({ historyLines: 0 }, async (port) => {
    using a = await joinChat(port);
    await ask(a, "/history", "This server keeps no history (--history-lines 0)");
  });
});

Deno.test("/history asked twice at once answers within a quarter of --sendq each, and never cuts off the asker", async () => {
  await withServer({ sendq: 64 * 1024, rate: 0 }, async (port) => {
    using a = await joinChat(port);
    using b = await joinChat(port);
    await a.readLine();
    const pad = "x".repeat(990);
    await b.write(Array.from({ length: 100 }, (_, i) => `${String(i).padStart(3, "0")} ${pad}\r\n`).join(""));
    for (let i = 0; i < 100; i++) await a.readLine();
    await a.write("/history 100\r\n/history 100\r\n"); // pasted twice: 200 KB asked, with 64 KB of room
    for (let answer = 0; answer < 2; answer++) {
      const head = (await a.readLine())!;
      const m = /^History of lobby \(the last (\d+) lines of 100: more would not fit your send queue\):\r\n$/
        .exec(head);
      assert.ok(m, head);
      const shown = Number(m[1]);
      assert.ok(shown > 0 && shown * 1000 <= 16 * 1024, `${shown} lines shown`);
      for (let i = 100 - shown; i < 100; i++) {
        assert.match(
          (await a.readLine())!,
          new RegExp(`^  \\(\\d\\d:\\d\\d\\) \\[${b.name}\\] ${String(i).padStart(3, "0")} `),
        );
      }
    }
    await ask(a, "/who", "In lobby (2):"); // still here
  });
});

Deno.test("/nick refuses names that pass for someone else's: invisible, reversed, look-alike, folded", async () => {
  await withServer({}, async (port) => {
    using bob = await joinChat(port);
    using eve = await joinChat(port);
    await bob.readLine();
    await ask(bob, "/nick bob", "You are now known as bob");
    assert.equal(await eve.readLine(), `${bob.name} is now known as bob\r\n`);
    await ask(bob, "/join STRASSE", "You are now in STRASSE (1); /who lists who is here");
    assert.equal(await eve.readLine(), "bob has left lobby for STRASSE\r\n");
    const still = `; you are still ${eve.name}`;
    for (
      const [nick, why] of [
        ["bob\u200b", "A nick has no invisible or direction-changing characters"], // zero-width space
        ["b\u202eob", "A nick has no invisible or direction-changing characters"], // right-to-left override
        ["b\u043eb", "A nick does not mix Latin, Greek and Cyrillic letters"], // a Cyrillic о
        ["\u0301\u0301", "A nick starts with a letter, digit or sign, not an accent"], // marks alone
        ["ｂｏｂ", "The nick ｂｏｂ is taken"], // full-width letters are the same name
        ["BOB", "The nick BOB is taken"],
      ]
    ) await ask(eve, `/nick ${nick}`, `${why}${still}`);
    await ask(eve, "/nick straße", "You are now known as straße");
    await ask(bob, "/nick STRASSE", "The nick STRASSE is taken; you are still bob"); // ß folds to ss
    await ask(eve, "/join straße", "You are now in STRASSE (2); /who lists who is here"); // rooms too
    await ask(eve, "/nick Боб", "You are now known as Боб"); // one script, whatever it looks like
  });
});

Deno.test("/who, /me, /help, //text and unknown commands answer as documented", async () => {
  await withServer({}, async (port) => {
    using a = await joinChat(port);
    using b = await joinChat(port);
    await a.readLine();
    await ask(b, "/nick bob", "You are now known as bob");
    await a.readLine();
    await ask(a, "/who", "In lobby (2):", `  ${a.name} (you)`, `  bob (${b.name})`);
    await b.write("/me waves\r\n");
    assert.equal(await a.readLine(), "* bob waves\r\n");
    await b.write("//etc/passwd is a file\r\n");
    assert.equal(await a.readLine(), "[bob] /etc/passwd is a file\r\n");
    await ask(b, "/frobnicate now", "Unknown command /frobnicate; try /help");
    await b.write("/help\r\n");
    assert.equal(await b.readLine(), "Commands:\r\n");
    const help = [];
    for (let i = 0; i < 12; i++) help.push(await b.readLine());
    assert.ok(help.some((l) => l!.startsWith("  /msg NAME TEXT")), help.join(""));
    assert.ok(help.some((l) => l!.startsWith("  /history [N]")), help.join(""));
    assert.equal(help.at(-1), "  //text           send a line that starts with /\r\n");
    await b.write("after\r\n");
    assert.equal(await a.readLine(), "[bob] after\r\n"); // nothing of the above reached a
  });
});

Deno.test("/msg reaches only its addressee, by nick or address, and a third client never sees it", async () => {
  await withServer({}, async (port) => {
    using a = await joinChat(port);
    using b = await joinChat(port);
    using c = await joinChat(port);
    await a.readLine(), await a.readLine(), await b.readLine();
    await ask(b, "/nick bob", "You are now known as bob");
    await a.readLine(), await c.readLine();
    await ask(a, "/msg BOB meet me at noon", "(private to bob) meet me at noon");
    assert.equal(await b.readLine(), `(private) [${a.name}] meet me at noon\r\n`);
    await ask(b, `/msg ${a.name} ok`, `(private to ${a.name}) ok`);
    assert.equal(await a.readLine(), "(private) [bob] ok\r\n");
    await ask(a, "/msg nobody hello", "No such user: nobody");
    await ask(a, "/msg bob", "Usage: /msg NAME TEXT");
    await a.write("public\r\n");
    assert.equal(await c.readLine(), `[${a.name}] public\r\n`); // c's first line since the joins
  });
});

Deno.test("/join keeps lines, joins and leaves inside a room, both ways; /rooms counts members", async () => {
  await withServer({}, async (port) => {
    using a = await joinChat(port);
    using b = await joinChat(port);
    await a.readLine();
    await ask(b, "/join Dev", "You are now in Dev (1); /who lists who is here");
    assert.equal(await a.readLine(), `${b.name} has left lobby for Dev\r\n`);
    using c = await joinChat(port); // joins the lobby: b must not hear of it
    assert.equal(await a.readLine(), `Client joined ${c.name}\r\n`);
    await a.write("lobby talk\r\n");
    assert.equal(await c.readLine(), `[${a.name}] lobby talk\r\n`);
    await b.write("dev talk\r\n");
    await ask(c, "/join dev", "You are now in Dev (2); /who lists who is here");
    assert.equal(await b.readLine(), `${c.name} has joined Dev\r\n`); // not "lobby talk", not c's join
    assert.equal(await a.readLine(), `${c.name} has left lobby for Dev\r\n`); // not "dev talk"
    await ask(a, "/rooms", "Rooms (2):", "  Dev 2", "  lobby 1 (you are here)");
    await ask(b, "/who", "In Dev (2):", `  ${b.name} (you)`, `  ${c.name}`);
    await ask(b, "/join lobby", "You are now in lobby (2); /who lists who is here");
    await ask(b, "/join LOBBY", "You are already in lobby");
    await ask(b, "/join", "A room name has 1 to 32 characters; you are still in lobby");
  });
});

Deno.test("/quit closes the connection and the room hears the reason, with the nick", async () => {
  await withServer({}, async (port, log) => {
    using a = await joinChat(port);
    using b = await joinChat(port);
    await a.readLine();
    await ask(b, "/nick bob", "You are now known as bob");
    await a.readLine();
    await b.write("/quit gone fishing\r\nthis line is never sent\r\n");
    assert.equal(await b.readToEnd(), "Goodbye\r\n");
    assert.equal(await a.readLine(), "Client left bob (gone fishing)\r\n");
    await log.waitFor("Client left bob (gone fishing)\n");
    assert.ok(!log.text.includes("never sent"));
  });
});

Deno.test("--rate drops a flood's extra lines with a warning, and repeated floods disconnect", async () => {
  await withServer({ rate: 10 }, async (port) => { // 1 line a second, bursts of 20
    using a = await joinChat(port);
    using b = await joinChat(port);
    await a.readLine();
    const lines = (n: number, from: number) =>
      Array.from({ length: n }, (_, i) => `line ${from + i}\r\n`).join("");
    await b.write(lines(25, 1));
    for (let i = 1; i <= 20; i++) assert.equal(await a.readLine(), `[${b.name}] line ${i}\r\n`);
    assert.match(
      (await b.readLine())!,
      /^You are sending more than 10 lines in 10 seconds; .*\(warning 1 of 2\)\r\n$/,
    );
    for (const strike of [2, 3]) {
      await new Promise((r) => setTimeout(r, 1100)); // one token back
      await b.write(lines(5, 100 * strike));
      assert.equal(await a.readLine(), `[${b.name}] line ${100 * strike}\r\n`);
    }
    assert.match((await b.readLine())!, /\(warning 2 of 2\)\r\n$/);
    assert.equal(await b.readToEnd(), "Disconnected for flooding\r\n");
    assert.equal(await a.readLine(), `Client left ${b.name} (flooding)\r\n`);
  });
});

Deno.test("--idle closes a silent client with a notice; the room hears why", async () => {
  await withServer({ idle: 0.3 }, async (port) => {
    using a = await joinChat(port);
    const talk = setInterval(() => a.write("/who\r\n").catch(() => {}), 100); // a keeps talking
    try {
      using b = await joinChat(port);
      assert.equal(await b.readToEnd(), "Closing: nothing from you for 0.3 seconds\r\n");
      for (
        let line = await a.readLine();
        line !== `Client left ${b.name} (idle)\r\n`;
        line = await a.readLine()
      ) {
        assert.ok(line !== null, "a was closed too");
      }
    } finally {
      clearInterval(talk);
    }
  });
});

Deno.test("--max-per-ip refuses one connection too many from an address, not from another", async () => {
  await withServer({ maxPerIp: 2 }, async (port) => {
    using a = await joinChat(port);
    using b = await joinChat(port);
    using c = await TestClient.connect(port);
    assert.equal(await c.readToEnd(), "Sorry, too many connections from 127.0.0.1 (at most 2)\r\n");
    using d = await joinChat(port, "::1");
    assert.equal(await a.readLine(), `Client joined ${b.name}\r\n`);
    assert.equal(await a.readLine(), `Client joined ${d.name}\r\n`);
  });
});

Deno.test("--allow and --deny are checked at accept; deny wins", async () => {
  await withServer({ allow: ["127.0.0.0/8"] }, async (port) => {
    using a = await joinChat(port);
    using v6 = await TestClient.connect(port, "::1");
    assert.equal(await v6.readToEnd(), "Sorry, connections from ::1 are not allowed\r\n");
    await a.write("/who\r\n");
    assert.equal(await a.readLine(), "In lobby (1):\r\n");
  });
  await withServer({ allow: ["127.0.0.0/8", "::1"], deny: ["127.0.0.1/32"] }, async (port) => {
    using denied = await TestClient.connect(port);
    assert.equal(await denied.readToEnd(), "Sorry, connections from 127.0.0.1 are not allowed\r\n");
    using v6 = await joinChat(port, "::1");
    await v6.write("/who\r\n");
    assert.equal(await v6.readLine(), "In lobby (1):\r\n");
  });
});

Deno.test("parseBlocks() and inBlocks() handle IPv4, IPv6, mapped and bare addresses", () => {
  const inside = (cidr: string, ip: string) => inBlocks(parseBlocks([cidr]), ip);
  assert.ok(inside("192.168.0.0/16", "192.168.44.3"));
  assert.ok(!inside("192.168.0.0/16", "192.169.0.1"));
  assert.ok(inside("10.0.0.0/9", "10.127.255.255") && !inside("10.0.0.0/9", "10.128.0.0"));
  assert.ok(inside("0.0.0.0/0", "8.8.8.8") && !inside("0.0.0.0/0", "::1"));
  assert.ok(inside("fd00::/8", "fd12:3456::1") && !inside("fd00::/8", "fe80::1"));
  assert.ok(inside("::1", "::1") && inside("2001:db8::/32", "2001:db8:0:0:0:0:0:42"));
  // An IPv4-mapped block covers the IPv4 addresses it maps, as the kernel hands them to us.
  assert.ok(inside("::ffff:10.0.0.0/104", "10.1.2.3") && !inside("::ffff:10.0.0.0/104", "11.0.0.1"));
  assert.ok(inside("10.0.0.0/8", "::ffff:10.9.9.9"));
  for (
    const bad of ["10.0.0.0/33", "300.1.1.1", "fd00::/129", "hello", "1::2::3", "10.0.0.0/x", "10.0.0.0/"]
  ) {
    assert.throws(() => parseBlocks([bad]), RangeError, bad);
  }
  assert.equal(checkName("ok-name_1", "nick"), null);
  assert.equal(checkName("δοκιμή", "nick"), null); // any printable characters
  assert.notEqual(checkName("tab\there", "nick"), null);
});

Deno.test("--announce-limit quiets a big room's joins and leaves, and logs the crossing", async () => {
  await withServer({ announceLimit: 2 }, async (port, log) => {
    using a = await joinChat(port);
    const b = await joinChat(port);
    assert.equal(await a.readLine(), `Client joined ${b.name}\r\n`); // two: announced
    const c = await joinChat(port); // three: over the limit, not announced
    await log.waitFor("Room lobby has over 2 members: joins and leaves are no longer announced\n");
    await a.write("/who\r\n");
    assert.equal(await a.readLine(), "In lobby (3):\r\n"); // /who still lists everyone
    for (let i = 0; i < 3; i++) await a.readLine();
    b.close(); // leaves a room of three: not announced
    await log.waitFor("Room lobby has 2 members again: joins and leaves are announced\n");
    const cName = c.name;
    c.close(); // leaves a room of two: announced
    assert.equal(await a.readLine(), `Client left ${cName}\r\n`);
  });
});

// --- TLS ---------------------------------------------------------------------------------------

Deno.test({
  ...needs("--tls-cert/--tls-key serve TLS: Deno and ncat --ssl clients chat through it", ["openssl"]),
  async fn() {
    await withCertificates(async (tls, caCerts, dir) => {
      await withServer({ tls, host: "127.0.0.1" }, async (port) => {
        const conn = await Deno.connectTls({ hostname: "localhost", port, caCerts });
        const a = new TestClient(conn as unknown as Deno.TcpConn);
        try {
          assert.equal(await a.readLine(), GREETING);
          if (hasProgram("ncat")) {
            const ncat = new Deno.Command("ncat", {
              args: ["--ssl", "--ssl-trustfile", `${dir}/ca.crt`, "--ssl-verify", "localhost", String(port)],
              stdin: "piped",
              stdout: "piped",
              stderr: "piped",
            }).spawn();
            const joined = (await a.readLine())!;
            const ncatName = /^Client joined (\S+)\r\n$/.exec(joined)![1];
            const w = ncat.stdin.getWriter();
            await w.write(new TextEncoder().encode("over TLS\n"));
            assert.equal(await a.readLine(), `[${ncatName}] over TLS\r\n`);
            await w.close();
            const out = await within(WAIT_MS, ncat.output(), "ncat");
            assert.match(
              new TextDecoder().decode(out.stdout),
              /^You're connected to the Deno chatserver\r\n/,
            );
            assert.equal(await a.readLine(), `Client left ${ncatName}\r\n`);
          }
          // A plain-TCP client gets no greeting: the handshake fails and only that connection ends.
          using plain = await TestClient.connect(port);
          await plain.write("hello?\r\n");
          assert.ok(!(await plain.readToEnd()).includes("connected"));
          await a.write("/who\r\n");
          assert.equal(await a.readLine(), "In lobby (1):\r\n");
        } finally {
          a.close();
        }
      });
    });
  },
});

Deno.test({
  ...needs("--tls-cert: a peer that never handshakes is closed at the timeout, and counts meanwhile", [
    "openssl",
  ]),
  async fn() {
    await withCertificates(async (tls, caCerts) => {
      await withServer({ tls, host: "127.0.0.1", handshakeTimeout: 0.5, maxPerIp: 5 }, async (port, log) => {
        const fds = () => [...Deno.readDirSync("/proc/self/fd")].length;
        const before = fds();
        const silent = await Promise.all(
          [1, 2, 3, 4, 5].map(() => Deno.connect({ hostname: "127.0.0.1", port })),
        );
        try {
          // While they wait, they hold the address's five places.
          const sixth = await Deno.connectTls({ hostname: "localhost", port, caCerts });
          const refusal = new TestClient(sixth as unknown as Deno.TcpConn);
          assert.equal(
            await refusal.readToEnd(),
            "Sorry, too many connections from 127.0.0.1 (at most 5)\r\n",
          );
          refusal.close();
          // At the timeout the server hangs up on each of them, and its descriptors are gone.
          for (const peer of silent) {
            const n = await within(
              WAIT_MS,
              peer.read(new Uint8Array(16)).catch(() => null),
              "the server to hang up",
            );
            assert.equal(n, null);
          }
          assert.equal(fds(), before + 5, "the server still holds descriptors of the silent peers"); // ours are 5
          assert.equal(log.text.includes("Client joined"), false);
          // And the address's places are free again.
          const conn = await Deno.connectTls({ hostname: "localhost", port, caCerts });
          const a = new TestClient(conn as unknown as Deno.TcpConn);
          assert.equal(await a.readLine(), GREETING);
          a.close();
        } finally {
          for (const peer of silent) peer.close();
        }
      });
    });
  },
});

// --- The JSON log ----------------------------------------------------------------------------------

Deno.test("chat_server.ts --log json prints one JSON object per event, and nothing else on stdout", async () => {
  const cli = new Cli("chat_server.ts", ["0", "--log", "json"]);
  const { time: _started, ...started } = JSON.parse((await cli.readLine())!);
  const port = started.port;
  assert.deepEqual(started, { event: "started", port });
  assert.ok(port > 0);
  using a = await joinChat(port);
  await cli.readLine();
  await ask(a, "/nick ann", "You are now known as ann");
  await a.write("hello\r\n/join dev\r\n");
  await a.readLine();
  a.close();
  const events = [];
  for (let i = 0; i < 5; i++) {
    const { time, ...event } = JSON.parse((await cli.readLine())!);
    assert.ok(!Number.isNaN(Date.parse(time)));
    events.push(event);
  }
  assert.deepEqual(events, [
    { event: "nick", peer: a.name, from: a.name, to: "ann" },
    { event: "line", room: "lobby", from: "ann", text: "hello" },
    { event: "part", room: "lobby", peer: a.name, nick: "ann" },
    { event: "enter", room: "dev", peer: a.name, nick: "ann" },
    { event: "leave", room: "dev", peer: a.name, nick: "ann", reason: null },
  ]);
  cli.kill();
  const { code, stdout } = await cli.finish();
  assert.equal(code, 0);
  assert.deepEqual(stdout.map((line) => JSON.parse(line).event), ["stopped"]);
});

Deno.test("chat_server.ts rejects bad feature options with one line and exit code 2", async () => {
  for (
    const [args, problem] of [
      [["--log", "xml"], '--log is text or json, not "xml"'],
      [["--tls-cert", "x.pem"], "--tls-cert and --tls-key go together"],
      [["--allow", "10.0.0.0/40"], '"10.0.0.0/40" is not an address or a CIDR block'],
      [["--deny", "::ffff:10.0.0.0/129"], '"::ffff:10.0.0.0/129" is not an address or a CIDR block'],
      [["--idle", "soon"], '--idle wants seconds, not "soon"'],
      [["--rate=-5"], "--rate wants a whole number"],
    ] as const
  ) {
    const { code, stderr } = await new Cli("chat_server.ts", [...args]).finish();
    assert.equal(code, 2, args.join(" "));
    assert.ok(stderr.startsWith(`chat_server: ${problem}`), stderr);
  }
  const missing = await new Cli("chat_server.ts", [
    "--tls-cert",
    "/nonexistent.pem",
    "--tls-key",
    "/nonexistent.key",
  ])
    .finish();
  assert.equal(missing.code, 1);
  assert.equal(missing.stderr.split("\n").length, 2, missing.stderr); // one line
});

Deno.test("Limits: by default ten clients per address, loopback spared; a --max-per-ip given applies to all", () => {
  const fill = (limits: Limits, ip: string, n: number) => {
    for (let i = 0; i < n; i++) limits.count({ ip } as Client);
  };
  const byDefault = new Limits({});
  fill(byDefault, "192.168.1.5", 10);
  assert.equal(
    byDefault.refusal("192.168.1.5", 10),
    "Sorry, too many connections from 192.168.1.5 (at most 10)",
  );
  assert.equal(byDefault.refusal("192.168.1.6", 10), null);
  fill(byDefault, "127.0.0.1", 50);
  fill(byDefault, "::1", 50);
  assert.equal(byDefault.refusal("127.0.0.1", 60), null, "loopback is the operator's own machine");
  assert.equal(byDefault.refusal("::1", 60), null);
  const given = new Limits({ maxPerIp: 2 });
  fill(given, "127.0.0.1", 2);
  assert.equal(given.refusal("127.0.0.1", 2), "Sorry, too many connections from 127.0.0.1 (at most 2)");
  const none = new Limits({ maxPerIp: 0 });
  fill(none, "10.0.0.1", 500);
  assert.equal(none.refusal("10.0.0.1", 500), null);
});

Deno.test("lines and commands sent in one write come out in the order they were sent, whoever they reach", async () => {
  await withServer({}, async (port) => {
    using a = await joinChat(port);
    using c = await joinChat(port);
    await a.readLine(); // c joined
    await a.write(`one\r\ntwo\r\n/msg ${c.name} psst\r\nthree\r\n/me waves\r\nfour\r\n/quit\r\n`);
    for (
      const want of [
        `[${a.name}] one`,
        `[${a.name}] two`,
        `(private) [${a.name}] psst`,
        `[${a.name}] three`,
        `* ${a.name} waves`,
        `[${a.name}] four`,
        `Client left ${a.name}`,
      ]
    ) assert.equal(await c.readLine(), want + "\r\n");
  });
});
