// Unit tests of sections.js on real ProseMirror documents (Tiptap's schema, no DOM):
// `npm test`. Each edit is made with the commands a key press runs.

import assert from "node:assert/strict";
import { test } from "node:test";
import { Extension, getSchema } from "@tiptap/core";
import { deleteSelection, joinBackward } from "@tiptap/pm/commands";
import { EditorState, TextSelection } from "@tiptap/pm/state";
import { Mapping } from "@tiptap/pm/transform";
import StarterKit from "@tiptap/starter-kit";
import { fits, headingsOf, idsFor, planMoves, slug } from "../src/sections.js";

const ids = Extension.create({
  name: "ids",
  addGlobalAttributes: () => [{ types: ["heading"], attributes: { sectionId: { default: null, keepOnSplit: false } } }],
});
const schema = getSchema([StarterKit, ids]);
const h = (text, id = null) => schema.nodes.heading.create({ level: 2, sectionId: id }, text ? schema.text(text) : null);
const p = (text) => schema.nodes.paragraph.create(null, schema.text(text));
const doc = schema.nodes.doc.create(null, [
  h("Background", "background"), p("Why."),
  h("Goals", "goals"), p("What."),
  h("Risks", "risks"), p("Oops."),
  h("Timeline", "timeline"), p("When."),
]);
const start = EditorState.create({ doc, schema });

/** Where the textblock with exactly `text` starts. */
function at(state, text) {
  let found = null;
  state.doc.descendants((node, pos) => {
    if (found === null && node.isTextblock && node.textContent === text) found = pos;
  });
  return found;
}

/** Apply edits (each `(state, dispatch) => …`) and plan the moves, as the page does after a pause. */
function edit(...edits) {
  let state = start;
  const mapping = new Mapping();
  for (const step of edits) {
    step(state, (tr) => {
      mapping.appendMapping(tr.mapping);
      state = state.apply(tr);
    });
  }
  const planned = idsFor(headingsOf(state.doc));
  return { state, ids: planned, moves: planMoves(doc, state.doc, mapping, planned) };
}

const cursor = (text, offset = 1) => (state, dispatch) => dispatch(state.tr.setSelection(TextSelection.create(state.doc, at(state, text) + offset)));
const retitle = (from, to) => (state, dispatch) => dispatch(state.tr.insertText(to, at(state, from) + 1, at(state, from) + 1 + from.length));
const backspace = (state, dispatch) => assert.ok(deleteSelection(state, dispatch) || joinBackward(state, dispatch));

test("slugs keep letters and digits of any script", () => {
  assert.equal(slug("Open questions (draft)"), "open-questions-draft");
  assert.equal(slug("Über café"), "uber-cafe");
  assert.equal(slug("見出し 2"), "見出し-2");
  assert.equal(slug("???"), "section");
  assert.equal(slug("  "), "");
  assert.equal(slug("Unplaced"), "unplaced-section"); // never the Unplaced section itself
  assert.ok(fits("notes-2", "Notes") && !fits("notes", "Notes 2"));
});

test("new headings get unique ids; an id still held is never reused", () => {
  assert.deepEqual(idsFor([{ id: null, text: "Notes" }, { id: null, text: "Notes" }, { id: "x", text: "" }, { id: null, text: "" }]), ["notes", "notes-2", "x", null]);
  assert.deepEqual(idsFor([{ id: "goals", text: "Risks" }, { id: "risks", text: "Goals" }]), ["risks-2", "goals-2"]); // swapped titles
  assert.deepEqual(idsFor([{ id: "goals", text: "Goals" }, { id: "goals", text: "Goals" }]), ["goals", "goals-2"]); // a pasted copy
});

test("a rename moves the section's chats to the new slug", () => {
  assert.deepEqual(edit(retitle("Background", "Context")).moves, [{ from: "background", to: "context", why: "renamed" }]);
});

test("Backspace at the start of a heading merges its section into the one above", () => {
  assert.deepEqual(edit(cursor("Goals"), backspace).moves, [{ from: "goals", to: "background", why: "merged" }]);
});

test("emptying a heading, then deleting it, merges too", () => {
  const { moves, state } = edit((s, d) => d(s.tr.delete(at(s, "Goals") + 1, at(s, "Goals") + 6)), cursor(""), backspace);
  assert.deepEqual(moves, [{ from: "goals", to: "background", why: "merged" }]);
  assert.deepEqual(headingsOf(state.doc).map((x) => x.id), ["background", "risks", "timeline"]);
});

test("deleting a heading with its text sends its chats to Unplaced", () => {
  const select = (s, d) => d(s.tr.setSelection(TextSelection.create(s.doc, at(s, "Risks") + 1, at(s, "Oops.") + 6)));
  assert.deepEqual(edit(select, backspace, backspace).moves, [{ from: "risks", to: "unplaced", why: "deleted" }]);
});

test("a merge into a renamed section goes straight to its new id", () => {
  assert.deepEqual(edit(retitle("Background", "Context"), cursor("Goals"), backspace).moves, [
    { from: "goals", to: "context", why: "merged" },
    { from: "background", to: "context", why: "renamed" },
  ]);
});

test("a split makes a new section and moves nothing", () => {
  const { moves, ids: planned } = edit((s, d) => d(s.tr.insert(at(s, "Why.") + 6, h("Details"))));
  assert.deepEqual(moves, []);
  assert.deepEqual(planned, ["background", "details", "goals", "risks", "timeline"]);
});
