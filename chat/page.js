// @ts-check
/// <reference lib="dom" />
// deno-lint-ignore-file no-control-regex -- the page's marks start with U+001E on purpose
// This script is checked as the project's own code is: .ci/run runs deno fmt, lint and check on it.
"use strict";
/** @param {string} id */
const byId = (id) => /** @type {HTMLElement} */ (document.getElementById(id));
const log = byId("log"), input = /** @type {HTMLInputElement} */ (byId("input"));
const roomEl = byId("room"),
  topicEl = byId("topic"),
  statusEl = byId("status"),
  memberList = byId("memberlist"),
  roomList = byId("roomlist"),
  countEl = byId("count"),
  people = byId("people"),
  aside = byId("members");
/** @type {WebSocket | null} */
let ws = null;
let backoff = 500;
// The page asks /who and /rooms for itself, and reads their answers into the side panel instead of
// the log: what it asked (in order), and the answer it is reading, its lines and how many are left.
/** @type {string[]} */
let asked = [];
let reading = "", left = 0;
/** @type {string[]} */
let answer = [];
// The block the log is adding to: the answer to a /help, /who, /rooms or /history typed by the user,
// and whether its lines are a command and what it does (/help's).
/** @type {HTMLElement | null} */
let block = null;
let columns = false;
// The server says how often it makes itself heard (PAGE_MARKS.alive); past twice that in silence
// it is gone (a dead server or a dead network closes nothing), and the page reconnects.
let aliveMs = 0, heardAt = 0;
// Where the page stands, so that it can say so when it reconnects: its token, its nick, and its
// room's epoch and the position of the last line it has seen there (PAGE_MARKS).
let token = "", nick = "", room = "", epoch = "", seq = 0;
// The nick outlives a reload of the tab: kept in sessionStorage, and taken again on connecting.
const kept = {
  get: () => {
    try {
      return sessionStorage.getItem("nick") ?? "";
    } catch {
      return ""; // storage refused (a private window, a file:// page): the nick lasts as long as the page
    }
  },
  /** @param {string} value */
  set: (value) => {
    try {
      sessionStorage.setItem("nick", value);
    } catch {
      // as above
    }
  },
};
nick = kept.get();
// Lines said while the tab is in the background, counted in its title.
const title = document.title;
let unread = 0;

/**
 * Adds text to an element, with http and https links made clickable: always as text nodes and
 * links whose href is a parsed URL, never as HTML.
 * @param {HTMLElement} parent
 * @param {string} text
 */
function addText(parent, text) {
  let at = 0;
  for (const m of text.matchAll(/\bhttps?:\/\/[^\s<>"]+/g)) {
    const url = m[0].replace(/[.,;:!?'")\]]+$/, "");
    let href = null;
    try {
      href = new URL(url);
    } catch {
      continue;
    }
    if (href.protocol !== "http:" && href.protocol !== "https:") continue;
    parent.append(document.createTextNode(text.slice(at, m.index)));
    const a = /** @type {HTMLAnchorElement} */ (document.createElement("a"));
    a.href = href.href;
    a.textContent = url;
    a.target = "_blank";
    a.rel = "noopener noreferrer nofollow";
    parent.append(a);
    at = (m.index ?? 0) + url.length;
  }
  parent.append(document.createTextNode(text.slice(at)));
}

/**
 * @param {string} kind
 * @param {string | null} from
 * @param {string} text
 */
function show(kind, from, text, when = Date.now()) {
  const li = document.createElement("li");
  li.className = kind;
  const time = document.createElement("time");
  time.textContent = new Date(when).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
  li.append(time);
  if (from !== null) {
    const who = document.createElement("span");
    who.className = "from";
    who.textContent = from;
    li.append(who);
  }
  addText(li, text);
  append(li);
  if (document.hidden && kind.startsWith("line") && !kind.includes("history")) {
    document.title = "(" + ++unread + ") " + title;
  }
  return li;
}

/** @param {HTMLElement} li */
function append(li) {
  follow(() => log.append(li));
}

/**
 * Grows the log, and keeps it at its end if it was there: the rule for every line of a block too,
 * which grows an item already in the log (a /help taller than the screen left the log behind).
 * @param {() => void} grow
 */
function follow(grow) {
  const atEnd = log.scrollTop + log.clientHeight >= log.scrollHeight - 8;
  grow();
  if (atEnd) log.scrollTop = log.scrollHeight;
}

/**
 * A line of an answer that comes as a title and indented lines (/help, /who, /rooms, /history,
 * /bans): one item of the log for all of it. False if the line is not one.
 * @param {string} line
 */
function inBlock(line) {
  const titled = /^(Commands|Operator commands|In \S+ \(\d+\)|Rooms \(\d+\)|Bans \(\d+\)|History of .*):$/
    .test(line);
  if (titled && !(block && line === "Operator commands:")) {
    const li = show("notice block", null, "");
    const head = document.createElement("span");
    head.className = "title";
    head.textContent = line;
    block = document.createElement("ul");
    columns = line === "Commands:";
    li.append(head, block);
    return true;
  }
  if (!block || !(line.startsWith("  ") || titled)) return (block = null), false;
  const item = document.createElement("li");
  const [, usage, what] = (columns && /^ +(\S.*?) {2,}(\S.*)$/.exec(line)) || [];
  if (what) {
    const cell = document.createElement("span");
    cell.className = "usage";
    cell.textContent = usage;
    item.append(cell);
  }
  addText(item, what ?? line.trim());
  if (titled) item.className = "title";
  const list = block;
  follow(() => list.append(item));
  return true;
}

/** @param {string} what */
function ask(what) {
  if (ws && ws.readyState === WebSocket.OPEN) {
    asked.push(what);
    ws.send("/" + what);
  }
}

/**
 * The answer to a /who or /rooms the page asked: the side panel shows it.
 * @param {string} what
 * @param {string[]} lines
 */
function took(what, lines) {
  if (what === "who") {
    const members = lines.map((l) => l.trim());
    countEl.textContent = "(" + members.length + ")";
    memberList.replaceChildren(...members.map((m) => {
      const li = document.createElement("li");
      li.textContent = m;
      return li;
    }));
    return;
  }
  roomList.replaceChildren(...lines.map((l) => {
    const [, name, count, here] = /^ +(\S+) (\d+)( \(you are here\))?$/.exec(l) ?? ["", l.trim(), "", ""];
    const li = document.createElement("li");
    const join = document.createElement("button");
    join.setAttribute("type", "button");
    join.textContent = name;
    join.title = here ? "You are here" : "Join " + name;
    if (here) li.className = "here";
    join.addEventListener("click", () => {
      if (!here && ws && ws.readyState === WebSocket.OPEN) ws.send("/join " + name);
      aside.classList.remove("open"); // on a phone, back to the room
      people.setAttribute("aria-expanded", "false");
    });
    li.append(join, document.createTextNode(" " + count));
    return li;
  }));
}

/**
 * The lines of an answer the page asked for: false once the line is not one.
 * @param {string} line
 */
function quiet(line) {
  let m;
  if (left > 0) {
    answer.push(line);
    if (--left === 0) took(reading, answer);
    return true;
  }
  const header = asked[0] === "who" ? /^In (\S+) \((\d+)\):$/ : /^Rooms \((\d+)\):$/;
  if (asked.length === 0 || !(m = header.exec(line))) return false;
  reading = /** @type {string} */ (asked.shift());
  if (reading === "who") roomEl.textContent = m[1];
  left = Number(m.at(-1));
  answer = [];
  if (left === 0) took(reading, answer);
  return true;
}

/**
 * A line that starts with U+001E is for the page alone: where it stands, never shown as such.
 * @param {string} line
 */
function mark(line) {
  let m;
  if ((m = /^\x1e! (\S+)$/.exec(line))) token = m[1];
  else if ((m = /^\x1e@ (\S+) (\S+) (\d+)$/.exec(line))) {
    room = m[1];
    epoch = m[2];
    seq = Number(m[3]);
  } else if ((m = /^\x1e= (\d+)$/.exec(line))) seq = Number(m[1]);
  else if ((m = /^\x1e~ (\d+)$/.exec(line))) aliveMs = 1000 * Number(m[1]);
  else if ((m = /^\x1e# (\d+) (.*)$/.exec(line))) {
    seq = Number(m[1]);
    receive(m[2]);
  } else if ((m = /^\x1eh (\d+) (\d+) (.*)$/.exec(line))) {
    seq = Number(m[1]);
    block = null;
    const said = /^\[([^\]]+)\] (.*)$/.exec(m[3]);
    show("line history", said ? said[1] : null, said ? said[2] : m[3], Number(m[2]));
  }
}

/** @param {string} line */
function receive(line) {
  let m;
  if (line.charCodeAt(0) === 0x1e) return mark(line);
  if (quiet(line)) return;
  if ((m = /^You are now known as (\S+)$/.exec(line))) kept.set(nick = m[1]);
  if ((m = /^You are now in (\S+) /.exec(line))) {
    roomEl.textContent = m[1];
    topicEl.textContent = ""; // the server says the new room's topic next, if it has one
    ask("rooms");
  }
  if ((m = /^Topic of \S+: (.*)$/.exec(line) ?? /^\S+ set the topic: (.*)$/.exec(line))) {
    topicEl.textContent = m[1];
    topicEl.title = m[1];
  } else if (/^\S+ cleared the topic$/.test(line)) topicEl.textContent = "";
  if (/^(Client joined|Client left|You are now)|( has joined | has left | is now known as )/.test(line)) {
    ask("who");
  }
  if (/ has (joined|left) /.test(line)) ask("rooms");
  if (inBlock(line)) return;
  if ((m = /^\[([^\]]+)\] (.*)$/.exec(line))) return void show("line", m[1], m[2]);
  if ((m = /^\(private\) \[([^\]]+)\] (.*)$/.exec(line))) {
    return void show("line private", m[1] + " (private)", m[2]);
  }
  show(/^\* /.test(line) ? "line action" : "notice", null, line);
}

function connect() {
  const where = new URLSearchParams({ page: "1" });
  if (room) {
    for (const [k, v] of Object.entries({ token, nick, room, epoch, seq })) {
      where.set(k, String(v));
    }
  }
  const url = (location.protocol === "https:" ? "wss://" : "ws://") + location.host + "/ws?" + where;
  ws = new WebSocket(url);
  ws.onopen = () => {
    statusEl.textContent = "connected";
    statusEl.className = "";
    backoff = 500;
    asked = [];
    left = 0;
    // A page coming back says its nick in the URL; one just loaded takes its kept nick itself.
    if (!room && nick && ws) ws.send("/nick " + nick);
    ask("who");
    ask("rooms");
  };
  ws.onmessage = (event) => {
    heardAt = Date.now();
    receive(String(event.data));
  };
  ws.onclose = reconnect;
}

// Each wait is the backoff give or take half of it, at random: pages that a restart dropped all at
// once would otherwise come back all at once, in waves at 0.5, 1.5, 3.5 and 7.5 s.
function reconnect() {
  const wait = backoff * (0.5 + Math.random());
  statusEl.textContent = "reconnecting in " + Math.max(1, Math.round(wait / 1000)) + " s\u2026";
  statusEl.className = "down";
  setTimeout(connect, wait);
  backoff = Math.min(backoff * 2, 10000);
}

setInterval(() => {
  if (!ws || ws.readyState !== WebSocket.OPEN || aliveMs === 0 || Date.now() - heardAt < 2 * aliveMs + 2000) {
    return;
  }
  ws.onclose = null; // a close handshake with a silent server would wait for nothing
  ws.close();
  reconnect();
}, 1000);

byId("form").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = input.value;
  if (!text.trim() || !ws || ws.readyState !== WebSocket.OPEN) return;
  ws.send(text);
  block = null;
  if (!text.startsWith("/") || text.startsWith("//")) show("line mine", "you", text.replace(/^\//, ""));
  input.value = "";
});
// On a phone the members are one tap away: the button opens and closes the side panel.
people.addEventListener("click", () => {
  const open = aside.classList.toggle("open");
  people.setAttribute("aria-expanded", String(open));
});
document.addEventListener("visibilitychange", () => {
  if (document.hidden) return;
  unread = 0;
  document.title = title;
});
connect();
