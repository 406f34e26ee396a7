// Nothing lost: positions in each room's history, a web page that resumes where it left off,
// and history kept across restarts with --history FILE.
import assert from "node:assert/strict";
import { RoomHistory } from "../chat_server.ts";

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
