/**
 * chat/history_file.ts: `--history FILE`, each room's history kept in a node:sqlite file across
 * restarts. A part of chat_server.ts, loaded only when the flag is given (see its section 5): the
 * core keeps every room's history in memory, and hands this file what it keeps (HistoryStore).
 *
 * @module
 */

import {
  type HistoryStore,
  type Kept,
  type KeptLine,
  lifts,
  nodeBuiltin,
  parseJson,
  type Rule,
  ruleField,
  StartError,
} from "../chat_server.ts";

/** Opens the file for a server; see HistoryFile. */
export function openHistoryFile(path: string, say: (text: string) => void): Promise<HistoryStore> {
  return HistoryFile.open(path, say);
}

/** How often a server that has a history file says so in it; one silent for 2.5 times that has gone. */
const OWNER_BEAT_MS = 1000;

/**
 * --history FILE: each room's epoch, its position and its last lines, in node:sqlite, so that a
 * restart keeps them. Rows are written at the end of a turn, all of that turn's in one
 * transaction, after the lines have gone out. A file that fails later (a full or vanished disk)
 * is said once, and the history is kept in memory from then on.
 *
 * The server that has the file says so in it (`meta.owner`, renewed every OWNER_BEAT_MS) and
 * clears it when it stops cleanly. So a second server on the same file is refused, and a server
 * that finds the mark of one that stopped without a word (`kill -9`, the OOM killer, a power cut)
 * knows that lines shown at the end may never have reached the file: it gives every room a new
 * epoch, and a page that saw those positions is told its room's history was reset, never shown
 * other lines at the same positions.
 */
export class HistoryFile implements HistoryStore {
  readonly path: string;
  private db: import("node:sqlite").DatabaseSync | null;
  private readonly say: (text: string) => void;
  private readonly rooms = new Map<string, Kept>(); // rooms whose position changed this turn
  private lines: [string, KeptLine][] = []; // room key, and a line kept there
  private readonly gone = new Set<string>(); // rooms that lost their history this turn
  private timer: ReturnType<typeof setTimeout> | null = null;
  private readonly owner = crypto.randomUUID();
  private beat: ReturnType<typeof setInterval> | undefined = undefined;

  private constructor(path: string, db: import("node:sqlite").DatabaseSync, say: (text: string) => void) {
    this.path = path;
    this.db = db;
    this.say = say;
  }

  /**
   * Opens (or makes) the file, and takes it; throws HistoryFileError, in node:sqlite's words or
   * ours, if it cannot, or if another server has it. Waits up to 2.5 s when the file bears a fresh
   * mark, to tell a live server from one that has just died.
   */
  static async open(path: string, say: (text: string) => void): Promise<HistoryFile> {
    const { DatabaseSync } = nodeBuiltin<typeof import("node:sqlite")>("node:sqlite");
    let db: import("node:sqlite").DatabaseSync | undefined;
    let file: HistoryFile;
    try {
      db = new DatabaseSync(path);
      db.exec(`PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL;
        CREATE TABLE IF NOT EXISTS rooms (room TEXT PRIMARY KEY, epoch TEXT NOT NULL, seq INTEGER NOT NULL);
        CREATE TABLE IF NOT EXISTS lines (room TEXT NOT NULL, seq INTEGER NOT NULL, time INTEGER NOT NULL,
          message BLOB NOT NULL, PRIMARY KEY (room, seq));
        CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
        CREATE TABLE IF NOT EXISTS rules (field TEXT PRIMARY KEY, rule TEXT NOT NULL);`);
      file = new HistoryFile(path, db, say);
      await file.take();
    } catch (e) {
      db?.close();
      if (e instanceof HistoryFileError) throw e;
      const why = e instanceof Error ? e.message : String(e);
      throw new HistoryFileError(path, why.endsWith(`: ${path}`) ? why.slice(0, -path.length - 2) : why);
    }
    file.beat = setInterval(() => file.renew(), OWNER_BEAT_MS);
    return file;
  }

  // Takes the file: refused if another server renews its mark; new epochs if the last one died.
  private async take(): Promise<void> {
    const db = this.db!;
    const mark = () =>
      db.prepare("SELECT value FROM meta WHERE key = 'owner'").get()?.value as string | undefined;
    const seen = mark();
    if (seen !== undefined) {
      const last = Number(seen.split(" ")[1]);
      const fresh = Date.now() - last < 2.5 * OWNER_BEAT_MS;
      // A timer that holds the process: while the server starts, nothing else does (main() is not
      // awaited at the top level, since a part imports the core), and an unref'd one would let it exit.
      if (fresh) await new Promise((resolve) => setTimeout(resolve, last + 2.5 * OWNER_BEAT_MS - Date.now()));
      if (fresh && mark() !== seen) throw new HistoryFileError(this.path, "another chat server is using it");
      // Its last lines may have been shown and never written: their positions must not be reused.
      db.exec("UPDATE rooms SET epoch = lower(hex(randomblob(4)))");
      this.say(
        `History file ${this.path} was not closed cleanly: every room starts a new epoch, and pages are told`,
      );
    }
    db.prepare("INSERT OR REPLACE INTO meta (key, value) VALUES ('owner', ?)").run(
      `${this.owner} ${Date.now()}`,
    );
  }

  // Says, again, that this server has the file.
  private renew(): void {
    if (this.db === null) return;
    try {
      this.db.prepare("UPDATE meta SET value = ? WHERE key = 'owner'").run(`${this.owner} ${Date.now()}`);
    } catch (e) {
      this.fail(e);
    }
  }

  /** A room's epoch, position and last `limit` lines as the file has them; null if it has none. */
  load(room: string, limit: number): { epoch: string; seq: number; lines: KeptLine[] } | null {
    if (this.db === null) return null;
    this.flush(); // what this turn wrote comes back too
    try {
      const saved = this.db.prepare("SELECT epoch, seq FROM rooms WHERE room = ?").get(room);
      if (!saved) return null;
      const seq = Number(saved.seq);
      const rows = this.db.prepare(
        "SELECT seq, time, message FROM lines WHERE room = ? AND seq > ? ORDER BY seq",
      )
        .all(room, seq - limit);
      const lines = rows.map((r) => ({
        seq: Number(r.seq),
        time: Number(r.time),
        message: r.message as Uint8Array,
      }));
      return { epoch: String(saved.epoch), seq, lines };
    } catch (e) {
      this.fail(e);
      return null;
    }
  }

  /** The bans and topics the file keeps (chat_server.ts, section 4), as it has them: the caller checks. */
  rules(): unknown[] {
    try {
      return this.db?.prepare("SELECT rule FROM rules").all().map((r) => parseJson(String(r.rule))) ?? [];
    } catch (e) {
      this.fail(e);
      return [];
    }
  }

  /** Keeps a ban or a topic, or forgets one (an unban, a topic cleared), at once: they are rare. */
  keepRule(rule: Rule): void {
    const field = ruleField(rule);
    if (this.db === null || field === null) return;
    try {
      if (lifts(rule)) this.db.prepare("DELETE FROM rules WHERE field = ?").run(field);
      else {this.db.prepare("INSERT OR REPLACE INTO rules (field, rule) VALUES (?, ?)").run(
          field,
          JSON.stringify(rule),
        );}
    } catch (e) {
      this.fail(e);
    }
  }

  /** A line kept at its position; the room's ring says which lines it still keeps. */
  add(key: string, ring: Kept, line: KeptLine): void {
    if (this.db === null) return;
    this.rooms.set(key, ring);
    this.gone.delete(key);
    if (ring.count > 0) this.lines.push([key, line]);
    this.soon();
  }

  /** A room that lost its history to another (the core keeps HISTORY_ROOMS): the file forgets it too. */
  forget(key: string): void {
    if (this.db === null) return;
    this.rooms.delete(key);
    this.gone.add(key);
    this.soon();
  }

  private soon(): void {
    if (this.db !== null) this.timer ??= setTimeout(() => this.flush(), 0);
  }

  /** Writes what this turn kept, in one transaction, and forgets lines the rooms no longer keep. */
  flush(): void {
    if (this.timer !== null) clearTimeout(this.timer);
    this.timer = null;
    const [rooms, lines, gone] = [[...this.rooms], this.lines, [...this.gone]];
    this.rooms.clear();
    this.lines = [];
    this.gone.clear();
    if (this.db === null || (rooms.length === 0 && lines.length === 0 && gone.length === 0)) return;
    try {
      const db = this.db;
      db.exec("BEGIN");
      const insert = db.prepare(
        "INSERT OR REPLACE INTO lines (room, seq, time, message) VALUES (?, ?, ?, ?)",
      );
      for (const [room, { seq, time, message }] of lines) insert.run(room, seq, time, message);
      const position = db.prepare("INSERT OR REPLACE INTO rooms (room, epoch, seq) VALUES (?, ?, ?)");
      // The file keeps what the ring keeps (lines and bytes), and drops the same lines, oldest first.
      const trim = db.prepare("DELETE FROM lines WHERE room = ? AND seq < ?");
      for (const [room, ring] of rooms) {
        position.run(room, ring.epoch, ring.seq);
        trim.run(room, ring.oldest);
      }
      const forgetRoom = db.prepare("DELETE FROM rooms WHERE room = ?");
      const forgetLines = db.prepare("DELETE FROM lines WHERE room = ?");
      for (const room of gone) forgetRoom.run(room), forgetLines.run(room);
      db.exec("COMMIT");
    } catch (e) {
      this.fail(e);
    }
  }

  private fail(e: unknown): void {
    if (this.db === null) return;
    clearInterval(this.beat);
    try {
      this.db.close();
    } catch {
      // already closed, or the disk is gone
    }
    this.db = null;
    const why = e instanceof Error ? e.message : String(e);
    this.say(`History file ${this.path} failed (${why}): history is kept in memory only from now on`);
  }

  /** Writes what is left, clears the mark (a clean stop), and closes the file. */
  close(): void {
    clearInterval(this.beat);
    this.flush();
    try {
      this.db?.exec("DELETE FROM meta WHERE key = 'owner'");
      this.db?.close();
    } catch {
      // closed already
    }
    this.db = null;
  }
}

/** A --history file that cannot be opened: its path, and why, in node:sqlite's words. */
export class HistoryFileError extends StartError {
  constructor(readonly path: string, why: string) {
    super(`cannot keep history in ${path}: ${why}`);
  }
}
