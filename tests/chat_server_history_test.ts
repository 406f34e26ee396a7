// deno-lint-ignore-file no-control-regex -- the page's marks start with U+001E on purpose
// Nothing lost: positions in each room's history, a web page that resumes where it left off,
// and history kept across restarts with --history FILE.
import assert from "node:assert/strict";
import { RoomHistory } from "../chat_server.ts";
import { HistoryFile } from "../chat/history_file.ts";
import {
  ask,
  Cli,
  eventually,
  freePort,
  GREETING,
  hasProgram,
  Hiccup,
  joinChat,
  readUntil,
  runScript,
  sendNumberedLines,
  WAIT_MS,
  withChromium,
  within,
  withWebServer,
  WsClient,
} from "./_helpers.ts";

const encoder = new TextEncoder(), decoder = new TextDecoder();
const line = (text: string) => encoder.encode(text + "\r\n");
const texts = (kept: { message: Uint8Array }[]) => kept.map((k) => decoder.decode(k.message).trimEnd());

Deno.test("RoomHistory gives each room's lines positions with no gaps, and an epoch of its own", () => {
  const history = new RoomHistory(3);
  const start = history.position("lobby");
  assert.equal(start.seq, 0); // a room's position is known before anything is said
  assert.match(start.epoch, /^[0-9a-f]{8}$/);
  assert.deepEqual([1, 2, 3, 4].map((n) => history.keep("lobby", line(`l${n}`))), [1, 2, 3, 4]);
  assert.equal(history.keep("dev", line("d1")), 1); // per room
  assert.deepEqual(history.position("LOBBY"), { epoch: start.epoch, seq: 4 }); // the same room, whatever the case
  assert.notEqual(history.position("dev").epoch, start.epoch);

  assert.deepEqual(texts(history.after("lobby", 2).lines), ["l3", "l4"]);
  assert.equal(history.after("lobby", 2).missing, 0);
  assert.deepEqual(history.after("lobby", 2).lines.map((k) => k.seq), [3, 4]);
  assert.deepEqual(texts(history.after("lobby", 4).lines), []); // up to date
  const behind = history.after("lobby", 0); // line 1 has left the ring of 3
  assert.deepEqual(texts(behind.lines), ["l2", "l3", "l4"]);
  assert.equal(behind.missing, 1);
  assert.deepEqual(texts(history.last("lobby", 2)), ["l3", "l4"]);
});

Deno.test("RoomHistory with no lines kept still numbers them; a room it forgets starts a new epoch", () => {
  const none = new RoomHistory(0);
  assert.equal(none.keep("lobby", line("a")), 1);
  assert.equal(none.keep("lobby", line("b")), 2);
  assert.deepEqual(none.after("lobby", 0), { lines: [], missing: 2 });
  const history = new RoomHistory(2);
  const first = history.position("room0");
  history.keep("room0", line("x"));
  for (let i = 1; i <= 64; i++) history.keep(`room${i}`, line("y")); // 64 rooms at once, at most
  const again = history.position("room0");
  assert.notEqual(again.epoch, first.epoch); // its history was lost: a reader can tell
  assert.equal(again.seq, 0);
});

Deno.test("RoomHistory keeps at most 512 KiB of lines a room, the newest, in order", () => {
  const history = new RoomHistory(8);
  const big = (n: number) => encoder.encode(`${n}`.padEnd(100 * 1024, ".") + "\r\n");
  for (let n = 1; n <= 20; n++) history.keep("lobby", big(n));
  assert.deepEqual(history.last("lobby", 8).map((k) => k.seq), [16, 17, 18, 19, 20]);
  for (let n = 21; n <= 23; n++) history.keep("lobby", line(`${n}`)); // small again: the ring refills
  assert.deepEqual(history.last("lobby", 8).map((k) => k.seq), [16, 17, 18, 19, 20, 21, 22, 23]);
  history.keep("lobby", line("24"));
  assert.deepEqual(history.last("lobby", 8).map((k) => k.seq), [17, 18, 19, 20, 21, 22, 23, 24]);
  assert.equal(history.after("lobby", 10).missing, 6);
});

Deno.test("RoomHistory keeps the very bytes of the newest lines, whatever their sizes and however they wrap", () => {
  // Against a plain list with the same rules: at most `limit` lines and 512 KiB, the newest line always.
  const limit = 50, cap = 512 * 1024;
  const history = new RoomHistory(limit), model: Uint8Array[] = [];
  let seed = 7;
  const random = (n: number) => (seed = (seed * 1103515245 + 12345) % 2 ** 31) % n;
  for (let n = 1; n <= 3000; n++) {
    // Mostly short lines, some long ones, and once a line over 512 KiB, which is kept alone.
    const size = n === 1500 ? 600_000 : [10, 83, 83, 4000, 100_000][random(5)];
    const message = new Uint8Array(size).map((_, i) => (n * 31 + i) % 251);
    history.keep("lobby", message, n);
    model.push(message);
    let bytes = model.reduce((sum, m) => sum + m.length, 0);
    while (model.length > 1 && (model.length > limit || bytes > cap)) bytes -= model.shift()!.length;
    if (n % 97 === 0 || n === 1500 || n === 1501) {
      const kept = history.last("lobby", limit);
      assert.equal(kept.length, model.length, `after line ${n}`);
      kept.forEach((k, i) => {
        assert.equal(k.seq, n - model.length + 1 + i);
        assert.equal(k.time, k.seq);
        assert.deepEqual(k.message, model[i], `line ${k.seq} after line ${n}`);
      });
    }
  }
});

// The page's own protocol (/ws?page=1). Lines for the page alone start with U+001E, which no
// client and no bus line can send: "! TOKEN", "@ ROOM EPOCH SEQ" (where its room stands),
// "h SEQ TIME LINE" (history), "# SEQ LINE" (a line as it is said), "= SEQ" (its own line's).
const RS = "\x1e";

/** A page's connection: where it was (its room, epoch and position), as the page keeps them. */
class Page {
  ws!: WsClient;
  token = "";
  room = "";
  epoch = "";
  seq = 0;
  nick = "";

  /** Connects, as the page does, saying where it was if it was anywhere; reads past the greeting. */
  async connect(http: number, resume = this.room !== ""): Promise<void> {
    const q = new URLSearchParams({ page: "1" });
    if (resume) {
      q.set("token", this.token);
      if (this.nick) q.set("nick", this.nick);
      q.set("room", this.room);
      q.set("epoch", this.epoch);
      q.set("seq", String(this.seq));
    }
    this.ws = new WsClient(`ws://127.0.0.1:${http}/ws?${q}`);
    await this.ws.opened();
    assert.equal(await this.ws.next(), GREETING.trimEnd());
  }

  /**
   * The next line, following the position as the page does; marks are returned as they came, but
   * for the server's "I am here" (PAGE_MARKS.alive), which says nothing of the room.
   */
  async next(): Promise<string> {
    let line = await this.ws.next();
    while (line.startsWith("\x1e~ ")) line = await this.ws.next();
    let m;
    if ((m = /^\x1e! (\S+)$/.exec(line))) this.token = m[1];
    else if ((m = /^\x1e@ (\S+) ([0-9a-f]{8}) (\d+)$/.exec(line))) {
      [this.room, this.epoch, this.seq] = [m[1], m[2], +m[3]];
    } else if ((m = /^\x1e[h#=] (\d+)/.exec(line))) {
      assert.equal(+m[1], this.seq + 1, `positions follow one another: ${JSON.stringify(line)}`);
      this.seq = +m[1];
    } else if ((m = /^You are now known as (\S+)$/.exec(line))) this.nick = m[1];
    return line;
  }

  /** Reads lines until one passes `test`; returns the lines before it, and it. */
  async until(test: (line: string) => boolean): Promise<string[]> {
    const seen = [];
    for (;;) {
      const line = await this.next();
      seen.push(line);
      if (test(line)) return seen;
    }
  }

  send(text: string): void {
    this.ws.ws.send(text);
  }

  close(): Promise<void> {
    return this.ws.close();
  }
}

const history = (line: string) => line.replace(/^\x1eh \d+ \d+ /, "");

Deno.test("a page knows its room's position from its first moment, and sees the room's recent lines", async () => {
  await withWebServer({}, async (tcp, http) => {
    using t = await joinChat(tcp);
    await t.write("one\r\ntwo\r\n/me waves\r\n/msg nobody x\r\n");
    assert.equal(await t.readLine(), "No such user: nobody\r\n");
    const page = new Page();
    const before = Date.now();
    await page.connect(http);
    const first = await page.until((l) => l.includes("waves"));
    assert.match(first[0], /^\x1e! [0-9a-f-]{36}$/);
    assert.match(first[1], /^\x1e@ lobby [0-9a-f]{8} 0$/);
    assert.deepEqual(first.slice(2).map(history), [
      `[${t.name}] one`,
      `[${t.name}] two`,
      `* ${t.name} waves`,
    ]);
    const time = Number(/^\x1eh 1 (\d+) /.exec(first[2])![1]);
    assert.ok(time <= before && time > before - WAIT_MS, "each history line carries when it was said");
    const webName = /^Client joined (\S+)\r\n$/.exec((await t.readLine())!)![1];
    await t.write("three\r\n");
    assert.equal(await page.next(), `${RS}# 4 [${t.name}] three`);
    page.send("hello");
    assert.equal(await page.next(), `${RS}= 5`); // its own line's position, since it is not sent back
    assert.equal(await t.readLine(), `[${webName}] hello\r\n`);
    page.send("/me smiles");
    assert.equal(await page.next(), `${RS}= 6`);
    assert.equal(await page.next(), `* ${webName} smiles`); // a page is shown its own /me
    assert.equal(await t.readLine(), `* ${webName} smiles\r\n`);
    const plain = new WsClient(`ws://127.0.0.1:${http}/ws`); // without ?page=1: the telnet lines, no marks
    await plain.opened();
    assert.equal(await plain.next(), GREETING.trimEnd());
    await page.next();
    await t.readLine();
    await t.write("four\r\n");
    assert.equal(await plain.next(), `[${t.name}] four`);
    assert.equal(await page.next(), `${RS}# 7 [${t.name}] four`);
    page.send("/join dev");
    const dev = await page.until((l) => l.startsWith("You are now in dev"));
    assert.match(dev.find((l) => l.startsWith(`${RS}@`))!, /^\x1e@ dev [0-9a-f]{8} 0$/);
    assert.equal(page.room, "dev");
    await plain.close();
    await page.close();
  });
});

Deno.test("a page that drops for 3 s while 300 lines are said gets them all, once, in order, before any new line", async () => {
  await withWebServer({ rate: 0 }, async (tcp, http) => {
    const page = new Page();
    await page.connect(http);
    page.send("/nick ann");
    page.send("/join dev");
    await page.until((l) => l.startsWith("You are now in dev"));
    using t = await joinChat(tcp);
    await ask(t, "/join dev", "You are now in dev (2); /who lists who is here");
    await page.until((l) => l.endsWith("has joined dev"));
    await page.close(); // the drop
    assert.equal(await t.readLine(), "Client left ann\r\n");
    const started = Date.now();
    for (let i = 1; i <= 300; i++) await t.write(`line ${i}\r\n`);
    await new Promise((r) => setTimeout(r, 3000 - (Date.now() - started)));
    const back = Date.now();
    await page.connect(http); // with its token, nick, room, epoch and position
    const seen = await page.until((l) => l.endsWith("line 300"));
    assert.ok(Date.now() - back < 1000, `all 300 within 1 s: ${Date.now() - back} ms`);
    assert.ok(seen.includes("You are now known as ann"), seen.slice(0, 5).join("\n"));
    const lines = seen.filter((l) => l.startsWith(`${RS}h `)).map(history);
    assert.deepEqual(lines, Array.from({ length: 300 }, (_, i) => `[${t.name}] line ${i + 1}`));
    assert.ok(!seen.some((l) => /away|reset|lost/.test(l)), "no gap, so no notice");
    assert.equal(page.room, "dev");
    await t.write("new\r\n");
    assert.equal(
      await page.until((l) => l.includes("new")).then((l) => l.at(-1)),
      `${RS}# 301 [${t.name}] new`,
    );
    await page.close();
  });
});

Deno.test("a page that never got a line, or whose room stayed quiet, resumes with nothing missed and no notice", async () => {
  await withWebServer({}, async (tcp, http) => {
    const page = new Page();
    await page.connect(http);
    await page.until((l) => l.startsWith(`${RS}@`));
    assert.equal(page.seq, 0);
    await page.close();
    using t = await joinChat(tcp);
    for (let i = 1; i <= 5; i++) await t.write(`quiet ${i}\r\n`);
    // The answer to a command comes after the five lines before it: all five are kept by then.
    await ask(t, "/history 1", "History of lobby (the last 1 line):");
    await t.readLine();
    await page.connect(http);
    const seen = await page.until((l) => l.endsWith("quiet 5"));
    assert.deepEqual(seen.filter((l) => l.startsWith(`${RS}h `)).map(history).length, 5);
    assert.ok(!seen.some((l) => /away|reset|lost/.test(l)), seen.join("\n"));
    await page.close();
    await page.connect(http); // nothing said since
    const again = await page.until((l) => l.startsWith(`${RS}@`));
    assert.ok(!again.some((l) => /away|reset|lost/.test(l)), again.join("\n"));
    assert.equal(page.seq, 5);
    await t.write("six\r\n");
    assert.equal(
      await page.until((l) => l.includes("six")).then((l) => l.at(-1)),
      `${RS}# 6 [${t.name}] six`,
    );
    await page.close();
  });
});

Deno.test("a page is told, in one line, when what it missed is no longer kept or its room's history was reset", async () => {
  await withWebServer({ historyLines: 3 }, async (tcp, http) => {
    const page = new Page();
    await page.connect(http);
    await page.until((l) => l.startsWith(`${RS}@`));
    await page.close();
    using t = await joinChat(tcp);
    for (let i = 1; i <= 5; i++) await t.write(`gone ${i}\r\n`);
    await ask(t, "/history 1", "History of lobby (the last 1 line):");
    await t.readLine();
    await page.connect(http);
    const seen = await page.until((l) => l.endsWith("gone 5"));
    const notices = seen.filter((l) => !l.startsWith(RS) && !l.startsWith("Client"));
    assert.deepEqual(notices, ["2 lines said in lobby while you were away are no longer kept"]);
    assert.deepEqual(
      seen.filter((l) => l.startsWith(`${RS}h `)).map(history),
      [3, 4, 5].map((i) => `[${t.name}] gone ${i}`),
    );
    await page.close();
    page.epoch = "00000000"; // as if the server had restarted
    await page.connect(http);
    const reset = await page.until((l) => l.endsWith("gone 5"));
    assert.deepEqual(reset.filter((l) => !l.startsWith(RS) && !l.startsWith("Client")), [
      "The history of lobby was reset while you were away: what was said meanwhile is lost",
    ]);
    await page.close();
  });
});

Deno.test("a page that comes back while its old connection lingers takes its place, and its nick", async () => {
  await withWebServer({}, async (tcp, http) => {
    using t = await joinChat(tcp);
    const page = new Page();
    await page.connect(http);
    page.send("/nick ann");
    await page.until((l) => l === "You are now known as ann");
    await t.readLine();
    await t.readLine();
    const old = page.ws;
    await page.connect(http); // the old one has not noticed it is gone
    const seen = await page.until((l) => l.startsWith("You are now known as") || l.startsWith("The nick"));
    assert.equal(seen.at(-1), "You are now known as ann");
    assert.equal(await old.next(), "You connected again: this connection is closed");
    assert.equal(await t.readLine(), "Client left ann (reconnected)\r\n");
    const stranger = new Page(); // a token is a secret: a guess takes nothing
    stranger.room = "lobby";
    stranger.epoch = page.epoch;
    stranger.token = "not-a-token";
    stranger.nick = "ann";
    await stranger.connect(http);
    const refused = await stranger.until((l) =>
      l.startsWith("The nick") || l.startsWith("You are now known")
    );
    assert.match(refused.at(-1)!, /^The nick ann is taken/);
    await stranger.close();
    await page.close();
    await within(WAIT_MS, old.close(), "the old connection closed");
  });
});

const haveChromium = hasProgram("chromium");

Deno.test({
  name: haveChromium
    ? "the page in Chromium, cut off for a while, comes back with its nick, its room and every line, once"
    : "the page in Chromium comes back after a drop (ignored: chromium not installed)",
  ignore: !haveChromium,
  sanitizeOps: false, // Playwright keeps timers and pipes of its own; the browser is closed below
  sanitizeResources: false,
  async fn() {
    await withWebServer({ rate: 0 }, async (tcp, http) => {
      const hiccup = new Hiccup(http);
      try {
        await withChromium(async (browser) => {
          using t = await joinChat(tcp);
          await ask(t, "/join dev", "You are now in dev (1); /who lists who is here");
          await t.write("before\r\n");
          const page = await browser.newPage();
          await page.goto(`http://127.0.0.1:${hiccup.port}/`);
          const log = page.locator("#log li");
          await page.locator("#status", { hasText: "connected" }).waitFor({ timeout: WAIT_MS });
          await page.fill("#input", "/nick ann");
          await page.press("#input", "Enter");
          await page.fill("#input", "/join dev");
          await page.press("#input", "Enter");
          assert.equal(await t.readLine(), "ann has joined dev\r\n");
          await log.filter({ hasText: "before" }).waitFor({ timeout: WAIT_MS }); // dev's recent lines, on joining
          hiccup.cut();
          assert.equal(await t.readLine(), "Client left ann\r\n");
          for (let i = 1; i <= 50; i++) await t.write(`away ${i}\r\n`);
          hiccup.restore();
          assert.equal(await t.readLine(), "ann has joined dev\r\n");
          await t.write("after\r\n");
          await log.filter({ hasText: "after" }).waitFor({ timeout: WAIT_MS });
          const texts = await log.evaluateAll((items) => items.map((li) => li.lastChild!.textContent));
          const chat = texts.filter((x) => x === "before" || x === "after" || /^away \d+$/.test(x!));
          assert.deepEqual(chat, [
            "before",
            ...Array.from({ length: 50 }, (_, i) => `away ${i + 1}`),
            "after",
          ]);
          assert.equal(await page.locator("#room").textContent(), "dev");
          await page.locator("#memberlist li", { hasText: "ann" }).waitFor({ timeout: WAIT_MS });
          assert.ok(!texts.some((x) => /no longer kept|was reset/.test(x!)), "nothing was lost: no notice");
          await page.close();
        });
      } finally {
        hiccup.close();
      }
    });
  },
});

// --history FILE: the same history, in node:sqlite, across restarts.

Deno.test("a restart with --history FILE after 1,000 lines keeps the same lines, at the same positions", async () => {
  const dir = await Deno.makeTempDir();
  const file = `${dir}/history.db`;
  try {
    let epoch = "", names: string[] = [];
    await withWebServer({ rate: 0, historyFile: file }, async (tcp, http) => {
      using t = await joinChat(tcp);
      for (let i = 1; i <= 1000; i++) await t.write(`kept ${i}\r\n`);
      await ask(t, "/join dev", "You are now in dev (1); /who lists who is here");
      await t.write("/me is in dev\r\n");
      await ask(t, "/history 1", "History of dev (the last 1 line):");
      await t.readLine();
      const page = new Page();
      await page.connect(http);
      await page.until((l) => l.endsWith("kept 1000"));
      epoch = page.epoch;
      names = [t.name];
      await page.close();
    });
    await withWebServer({ historyFile: file }, async (_tcp, http) => {
      const page = new Page();
      page.room = "lobby";
      page.epoch = epoch;
      page.seq = 990;
      await page.connect(http); // as if it had been away while the server restarted
      const seen = await page.until((l) => l.endsWith("kept 1000"));
      assert.ok(!seen.some((l) => /away|reset|lost/.test(l)), seen.join("\n"));
      assert.deepEqual(
        seen.filter((l) => l.startsWith(`${RS}h `)).map(history),
        Array.from({ length: 10 }, (_, i) => `[${names[0]}] kept ${991 + i}`),
      );
      assert.equal(page.epoch, epoch);
      page.send("one more");
      assert.equal(await page.next(), `${RS}= 1001`);
      page.send("/join dev");
      const dev = await page.until((l) => l.startsWith("You are now in dev"));
      assert.deepEqual(dev.filter((l) => l.startsWith(`${RS}h `)).map(history), [`* ${names[0]} is in dev`]);
      await page.close();
    });
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("a history file keeps what --history-lines says, and a failing file costs the history, never the chat", async () => {
  const dir = await Deno.makeTempDir();
  try {
    const said: string[] = [];
    const first = await HistoryFile.open(`${dir}/h.db`, (text) => said.push(text));
    const written = new RoomHistory(3, first);
    for (let i = 1; i <= 5; i++) written.keep("Lobby", line(`l${i}`), 1000 * i);
    first.close();
    const file = await HistoryFile.open(`${dir}/h.db`, (text) => said.push(text));
    const history = new RoomHistory(3, file);
    assert.deepEqual(history.position("lobby"), written.position("lobby"));
    assert.deepEqual(history.last("lobby", 9).map((k) => [k.seq, k.time]), [[3, 3000], [4, 4000], [5, 5000]]);
    assert.deepEqual(texts(history.after("lobby", 1).lines), ["l3", "l4", "l5"]);
    const { DatabaseSync } = await import("node:sqlite");
    const other = new DatabaseSync(`${dir}/h.db`); // another process takes the file: writes fail
    other.exec("BEGIN EXCLUSIVE");
    assert.equal(history.keep("lobby", line("l6")), 6); // the chat goes on
    file.flush();
    assert.equal(history.keep("lobby", line("l7")), 7);
    file.flush();
    assert.deepEqual(texts(history.last("lobby", 2)), ["l6", "l7"]);
    assert.equal(said.length, 1, said.join("\n"));
    assert.equal(
      said[0],
      `History file ${dir}/h.db failed (database is locked): history is kept in memory only from now on`,
    );
    other.close();
    file.close();
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("chat_server.ts says in one line, and exits 1, when its --history file cannot be opened", async () => {
  const dir = await Deno.makeTempDir();
  try {
    await Deno.writeTextFile(
      `${dir}/notes.txt`,
      "not a database, but plenty of text to prove it\n".repeat(100),
    );
    for (
      const [path, why] of [
        [`${dir}/missing/h.db`, "unable to open database file"],
        [`${dir}/notes.txt`, "file is not a database"],
      ]
    ) {
      const r = await runScript("chat_server.ts", ["0", "--host", "127.0.0.1", "--history", path]);
      assert.equal(r.code, 1);
      assert.equal(r.stderr, `chat_server: cannot keep history in ${path}: ${why}\n`);
    }
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("after a restart with --history FILE, telnet's /history shows the file's lines at once, in the lobby and in a room", async () => {
  const dir = await Deno.makeTempDir();
  const file = `${dir}/history.db`;
  try {
    let name = "";
    await withWebServer({ historyFile: file }, async (tcp) => {
      using t = await joinChat(tcp);
      name = t.name;
      await t.write("said in the lobby\r\n");
      await ask(t, "/join dev", "You are now in dev (1); /who lists who is here");
      await t.write("said in dev\r\n");
      await ask(t, "/history", "History of dev (the last 1 line):");
      await t.readLine();
    });
    await withWebServer({ historyFile: file }, async (tcp) => {
      using t = await joinChat(tcp); // nobody has spoken, and no page has come, since the restart
      await ask(t, "/history", "History of lobby (the last 1 line):");
      assert.match(
        (await t.readLine())!,
        new RegExp(`^  \\(\\d\\d:\\d\\d\\) \\[${name}\\] said in the lobby\\r\\n$`),
      );
      await ask(t, "/join dev", "You are now in dev (1); /who lists who is here");
      await ask(t, "/history", "History of dev (the last 1 line):");
      assert.match(
        (await t.readLine())!,
        new RegExp(`^  \\(\\d\\d:\\d\\d\\) \\[${name}\\] said in dev\\r\\n$`),
      );
    });
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

/** chat_server.ts with --history FILE and --http on fresh ports; its log is read into `log`. */
function historyServer(file: string, port = freePort(), http = freePort()) {
  const cli = new Cli("chat_server.ts", [
    String(port),
    "--host",
    "127.0.0.1",
    "--rate",
    "0",
    "--http",
    String(http),
    "--history",
    file,
  ]);
  const log: string[] = [];
  const reading = (async () => {
    for (let line; (line = await cli.readLine(60_000)) !== null;) log.push(line);
  })();
  return { cli, port, http, log, reading };
}

Deno.test("after kill -9 mid-burst, a page resuming with its position is told its room's history was reset", async () => {
  const dir = await Deno.makeTempDir();
  const file = `${dir}/history.db`;
  try {
    const first = historyServer(file);
    await eventually("the server to listen", () => first.log.some((l) => l.startsWith("Web page at")));
    const page = new Page();
    await page.connect(first.http);
    await page.until((l) => l.startsWith(`${RS}@`));
    const before = page.epoch;
    const sender = await joinChat(first.port);
    const sending = sendNumberedLines(sender, 50_000, 100).catch(() => {});
    await page.until((l) => l.startsWith(`${RS}# `) && page.seq >= 5000); // shown, and maybe not yet written
    first.cli.kill("SIGKILL");
    await sending;
    sender.close();
    await first.reading;
    await first.cli.finish();
    await page.close();

    const second = historyServer(file, first.port, first.http);
    await eventually("the restart to listen", () => second.log.some((l) => l.startsWith("Web page at")));
    await eventually( // the event log writes every 10 ms: the start line may come first
      "the log to say why the epochs are new",
      () =>
        second.log.some((l) =>
          l.endsWith("was not closed cleanly: every room starts a new epoch, and pages are told")
        ),
    );
    await page.connect(second.http); // as it reconnects, with where it was
    const seen = await page.until((l) => l.startsWith(`${RS}@`));
    assert.ok(
      seen.includes("The history of lobby was reset while you were away: what was said meanwhile is lost"),
      seen.join("\n"),
    );
    assert.notEqual(page.epoch, before);
    await page.close();
    second.cli.kill();
    await second.reading;
    assert.equal((await second.cli.finish()).code, 0);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("a second server on the same --history file refuses to start, in one line that names the file", async () => {
  const dir = await Deno.makeTempDir();
  const file = `${dir}/history.db`;
  try {
    const first = historyServer(file);
    await eventually("the server to listen", () => first.log.some((l) => l.startsWith("Web page at")));
    const second = await runScript("chat_server.ts", ["0", "--host", "127.0.0.1", "--history", file]);
    assert.equal(second.code, 1);
    assert.equal(
      second.stderr,
      `chat_server: cannot keep history in ${file}: another chat server is using it\n`,
    );
    first.cli.kill();
    await first.reading;
    assert.equal((await first.cli.finish()).code, 0);
    // Stopped cleanly: the next server starts at once, with the same epochs.
    const third = historyServer(file);
    await eventually("the restart to listen", () => third.log.some((l) => l.startsWith("Web page at")));
    assert.ok(!third.log.some((l) => l.includes("not closed cleanly")));
    third.cli.kill();
    await third.reading;
    assert.equal((await third.cli.finish()).code, 0);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("a page looking into 70 rooms, or a speaker in 70 empty rooms, never costs the lobby its history", async () => {
  await withWebServer({ rate: 0 }, async (tcp, http) => {
    using t = await joinChat(tcp);
    await t.write("said in the lobby\r\n");
    const page = new Page();
    await page.connect(http);
    for (let i = 1; i <= 70; i++) page.send(`/join r${i}`); // each room it enters starts keeping
    await page.until((l) => l.startsWith("You are now in r70"));
    using s = await joinChat(tcp);
    for (let i = 1; i <= 70; i++) await s.write(`/join s${i}\r\nin s${i}\r\n`); // each room it leaves is empty
    await readUntil(s, (l) => l.startsWith("You are now in s70"));
    await t.write("/history\r\n");
    await readUntil(t, (l) => l.startsWith("History of lobby"));
    assert.match((await t.readLine())!, /\] said in the lobby\r\n$/);
    await ask(s, "/join s1", "You are now in s1 (1); /who lists who is here");
    await ask(s, "/history", "Nothing has been said in s1 yet"); // the first of them went, oldest first
    await page.close();
  });
});

Deno.test("a --history file keeps what memory keeps: 64 rooms, and 512 KiB a room, dropped oldest first", async () => {
  const dir = await Deno.makeTempDir();
  const file = `${dir}/history.db`;
  try {
    await withWebServer({ rate: 0, historyFile: file }, async (tcp) => {
      using t = await joinChat(tcp);
      using _stays = await joinChat(tcp); // someone is in the lobby: it keeps its history
      const big = "x".repeat(4000);
      for (let i = 0; i < 200; i++) await t.write(`${String(i).padStart(3, "0")} ${big}\r\n`); // 800 KB in the lobby
      for (let i = 1; i <= 100; i++) await t.write(`/join r${i}\r\nin r${i}\r\n`);
      await readUntil(t, (l) => l.startsWith("You are now in r100"));
      await ask(t, "/history 1", "History of r100 (the last 1 line):");
      await t.readLine();
    });
    const { DatabaseSync } = await import("node:sqlite");
    const db = new DatabaseSync(file);
    try {
      const rooms = Number(db.prepare("SELECT count(*) AS n FROM rooms").get()!.n);
      assert.ok(rooms <= 64, `${rooms} rooms in the file`);
      const lobby = db.prepare(
        "SELECT sum(length(message)) AS bytes, min(seq) AS first FROM lines WHERE room = 'lobby'",
      )
        .get()!;
      assert.ok(Number(lobby.bytes) <= 512 * 1024, `the lobby holds ${lobby.bytes} bytes`);
      assert.ok(Number(lobby.first) > 60, `the oldest line left is ${lobby.first}`);
      const last = db.prepare("SELECT count(*) AS n FROM lines WHERE room = 'r100'").get()!;
      assert.equal(Number(last.n), 1);
    } finally {
      db.close();
    }
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
