// sections.js: which sections a document has, and which moves an edit calls for.
//
// Pure functions over ProseMirror documents (no DOM, no chat): every heading starts
// a section that runs to the next heading. Its id is the heading's `sectionId`
// attribute: the slug of its text, given once and kept while the text still fits
// it. The attribute names the section the conversations are filed under; when the
// text no longer fits (a rename) the heading gets the new slug and the page moves
// the old id's sessions to it. A heading that is gone (its section merged into the
// one above, or deleted) is told apart by where its text went.

export const UNPLACED = "unplaced"; // where a deleted section's conversations go

/** "Open questions (draft)" -> "open-questions-draft"; letters and digits of any script are kept. */
export function slug(text) {
  if (!text.trim()) return "";
  const base = text
    .normalize("NFKD")
    .replace(/\p{M}/gu, "")
    .toLowerCase()
    .replace(/[^\p{L}\p{N}]+/gu, "-")
    .slice(0, 64)
    .replace(/^-+|-+$/g, "");
  if (!base) return "section"; // "???"
  return base === UNPLACED ? `${UNPLACED}-section` : base;
}

/** Whether `id` still fits a heading's text: its slug, or its slug with a number (a second "Notes"). */
export function fits(id, text) {
  const base = slug(text);
  return id === base || (id.startsWith(`${base}-`) && /^\d+$/.test(id.slice(base.length + 1)));
}

/** Every heading of `doc`, in order: {pos, node, id, text, end} (`end`: where its section ends). */
export function headingsOf(doc) {
  const found = [];
  doc.descendants((node, pos) => {
    if (node.type.name === "heading") found.push({ pos, node, id: node.attrs.sectionId ?? null, text: node.textContent.trim() });
    return !node.isTextblock;
  });
  found.forEach((heading, i) => (heading.end = found[i + 1]?.pos ?? doc.content.size));
  return found;
}

/**
 * The id each heading should carry, in heading order (null: none yet). A heading keeps
 * an id that still fits its text (of two that share one, the first), and an empty
 * heading keeps what it has; the others get the slug of their text, made unique with
 * -2, -3… against every id held now, so that a move never lands on a section that
 * still has conversations of its own.
 */
export function idsFor(headings) {
  const kept = new Set();
  const ids = headings.map((h) => {
    if (!h.id || kept.has(h.id) || (h.text && !fits(h.id, h.text))) return null;
    kept.add(h.id);
    return h.id;
  });
  const taken = new Set([UNPLACED, ...headings.map((h) => h.id).filter(Boolean)]);
  return ids.map((id, i) => {
    const base = slug(headings[i].text);
    if (id || !base) return id;
    let candidate = base;
    for (let n = 2; taken.has(candidate); n += 1) candidate = `${base}-${n}`;
    taken.add(candidate);
    return candidate;
  });
}

/**
 * The moves an edit calls for, from `before` (the document when the page last moved
 * conversations) to `after` (now, `ids`: idsFor(headingsOf(after))), `mapping` being
 * every step in between: [{from, to, why}] with `why` "renamed", "merged" or "deleted".
 */
export function planMoves(before, after, mapping, ids) {
  const now = headingsOf(after);
  const present = new Set(now.map((h) => h.id).filter(Boolean));
  const moves = [];
  for (const gone of headingsOf(before)) {
    if (!gone.id || present.has(gone.id)) continue;
    // Its heading is gone. Did any of its text stay (joined the section above), or none?
    const landed = survivingText(after, mapping, gone);
    const to = landed === null ? UNPLACED : idAt(now, ids, landed);
    if (to !== gone.id) moves.push({ from: gone.id, to, why: landed === null ? "deleted" : "merged" });
  }
  now.forEach((heading, i) => {
    if (heading.id && ids[i] && ids[i] !== heading.id && !ids.includes(heading.id)) {
      moves.push({ from: heading.id, to: ids[i], why: "renamed" });
    }
  });
  return moves;
}

/** Where in `after` the first text of the old section `gone` still is, or null if none of it is. */
function survivingText(after, mapping, gone) {
  const ranges = [
    [gone.pos + 1, gone.pos + gone.node.nodeSize - 1], // the heading's own text
    [gone.pos + gone.node.nodeSize, gone.end], // the section's body
  ];
  for (const [from, to] of ranges) {
    if (from >= to) continue;
    const start = mapping.map(from, 1);
    const end = mapping.map(to, -1);
    if (start < end && after.textBetween(start, end, " ").trim()) return start;
  }
  return null;
}

/** The id of the section holding `pos` (the nearest heading above with an id), or UNPLACED. */
function idAt(headings, ids, pos) {
  for (let i = headings.length - 1; i >= 0; i -= 1) {
    if (headings[i].pos < pos && ids[i]) return ids[i];
  }
  return UNPLACED;
}
