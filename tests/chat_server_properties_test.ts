// Property tests for chat_server.ts's input boundary: the line framer and the name rules.
import assert from "node:assert/strict";
import fc from "fast-check";
import { checkName, Directory, LineFramer } from "../chat_server.ts";

const FRAMER_RUNS = 3000;
const NAME_RUNS = 3000;

/** Frames `bytes` delivered in pieces cut at `cuts`, with lines of at most `maxLine` bytes. */
function frameInPieces(bytes: Uint8Array, cuts: number[], maxLine: number): Uint8Array[][] {
  const lines: Uint8Array[][] = [];
  const framer = new LineFramer(
    maxLine,
    (line, truncated) => lines.push([line.slice(), new Uint8Array([+truncated])]),
  );
  let at = 0;
  for (const cut of [...new Set(cuts.map((c) => c % (bytes.length + 1)))].sort((a, b) => a - b)) {
    framer.push(bytes.subarray(at, cut));
    at = cut;
  }
  framer.push(bytes.subarray(at));
  framer.end();
  return lines;
}

// Bytes that matter to the framer come often: line ends, telnet commands, UTF-8 lead bytes, C1.
const byte = fc.oneof(
  fc.integer({ min: 0, max: 255 }),
  fc.constantFrom(13, 10, 0, 9, 127, 255, 250, 240, 251, 253, 0xc2, 0x9b, 0x85, 0xe2, 0x82, 0xac, 0xf0),
  fc.integer({ min: 97, max: 122 }),
);

Deno.test(`LineFramer, property (${FRAMER_RUNS} runs): any cuts frame the same lines, each safe and short`, () => {
  const decoder = new TextDecoder("utf-8", { fatal: true });
  fc.assert(
    fc.property(
      fc.array(byte, { maxLength: 600 }),
      fc.array(fc.nat(), { maxLength: 40 }),
      fc.integer({ min: 4, max: 64 }),
      (raw, cuts, maxLine) => {
        const bytes = new Uint8Array(raw);
        const whole = frameInPieces(bytes, [], maxLine);
        assert.deepEqual(frameInPieces(bytes, cuts, maxLine), whole);
        for (const [line] of whole) {
          assert.ok(line.length <= maxLine, `a line of ${line.length} bytes, over ${maxLine}`);
          const text = decoder.decode(line); // throws if it is not UTF-8 (so no IAC byte, 0xff, either)
          // deno-lint-ignore no-control-regex
          assert.doesNotMatch(text, /[\x00-\x08\x0a-\x1f\x7f\u0080-\u009f]/, "a control character");
        }
      },
    ),
    { numRuns: FRAMER_RUNS },
  );
});

/** Other ways to fold a name: if any of them calls two accepted names the same, one can pass for the other. */
const FOLDINGS = [
  (s: string) => s.normalize("NFKC").toLowerCase(),
  (s: string) => s.normalize("NFKC").toUpperCase(),
  (s: string) => s.normalize("NFKD").toLowerCase().normalize("NFKC"),
  (s: string) => s.toLowerCase().normalize("NFKC"),
];

Deno.test(`checkName() and Directory, property (${NAME_RUNS} runs): no two accepted nicks fold to the same name`, () => {
  const name = fc.oneof(
    fc.string({ unit: "grapheme", minLength: 1, maxLength: 6 }),
    fc.string({
      unit: fc.constantFrom(..."aAßsSıIiİσςΣkKｋﬀfFé\u0301e\u200b\u202eоo"),
      minLength: 1,
      maxLength: 5,
    }),
  );
  fc.assert(
    fc.property(fc.array(name, { maxLength: 12 }), (names) => {
      // As /nick does: a name is taken if checkName() lets it through and nobody holds it.
      const held: string[] = [];
      const directory = new Directory();
      for (const nick of names) {
        if (checkName(nick, "nick") !== null || directory.holder(nick)) continue;
        directory.rename({ nick: null, address: nick } as never, nick);
        held.push(nick);
      }
      for (let i = 0; i < held.length; i++) {
        for (let j = i + 1; j < held.length; j++) {
          for (const fold of FOLDINGS) {
            assert.notEqual(fold(held[i]), fold(held[j]), `"${held[i]}" and "${held[j]}" were both accepted`);
          }
        }
      }
    }),
    { numRuns: NAME_RUNS },
  );
});
