// main.js: a Tiptap editor whose headings are sectionchat sections.
//
// Each heading carries a `sectionId` attribute (sections.js says which); beside it a
// badge shows the section's open chats and your unread messages (`watch_document`
// and its `section_summary` events); the side panel (panel.js) holds the chats of
// the section picked. When the author pauses after renaming a heading, merging two
// sections or deleting one, the page moves the conversations with `move_sessions`
// so that they stay with their text. The chat module is the one the chat server
// serves (/static/sectionchat.js), so it always speaks that server's protocol.
//
//   index.html?ws=ws://127.0.0.1:8765/ws&doc=handbook&name=alice

import { Editor, Extension } from "@tiptap/core";
import { Plugin, PluginKey } from "@tiptap/pm/state";
import { Mapping } from "@tiptap/pm/transform";
import { Decoration, DecorationSet } from "@tiptap/pm/view";
import StarterKit from "@tiptap/starter-kit";
import { DocSync } from "./docsync.js";
import { ChatPanel, el } from "./panel.js";
import { UNPLACED, headingsOf, idsFor, planMoves } from "./sections.js";

const params = new URLSearchParams(location.search);
const WS = params.get("ws") ?? "ws://127.0.0.1:8765/ws";
const DOC = params.get("doc") ?? "handbook";
const NAME = params.get("name") ?? `guest-${Math.random().toString(16).slice(2, 6)}`;
const PAUSE_MS = 700; // a pause in typing commits the outline: then conversations move
const SAMPLE = `<h1>Launch plan</h1><p>How the new editor reaches everyone by spring.</p>
<h2>Background</h2><p>Writers asked for comments that stay with the text.</p>
<h2>Goals</h2><p>Every section can be discussed right beside it.</p>
<h2>Risks</h2><p>Conversations get lost when the outline changes.</p>
<h2>Timeline</h2><p>Beta in March, everyone in April.</p>`;

const $ = (id) => document.getElementById(id);
const badges = new PluginKey("chat-badges");
const OWN = "sectionchat-ids"; // meta of our own transactions (ids set, remote content shown)
const summaries = new Map(); // section_id -> SectionSummary, from the document watch
const recent = new Map(); // section id -> {to, ids}: where its chats went (an undo brings them back)
let editor, chat, panel, sync, describeError;
let committed = null; // the document when conversations last moved
let mapping = new Mapping(); // every step since then
let pause = null;
let moving = Promise.resolve(); // moves go one after the other

/** The heading attribute that names a section; not carried over when a heading is split. */
const SectionChats = Extension.create({
  name: "sectionChats",
  addGlobalAttributes: () => [
    {
      types: ["heading"],
      attributes: {
        sectionId: {
          default: null,
          keepOnSplit: false,
          parseHTML: (element) => element.getAttribute("data-section-id"),
          renderHTML: ({ sectionId }) => (sectionId ? { "data-section-id": sectionId } : {}),
        },
      },
    },
  ],
  addProseMirrorPlugins: () => [new Plugin({ key: badges, props: { decorations: (state) => decorate(state.doc) } })],
});

/** A badge after each heading's text, and the section shown in the panel highlighted. */
function decorate(doc) {
  const decorations = [];
  for (const heading of headingsOf(doc)) {
    if (!heading.id) continue;
    const s = summaries.get(heading.id);
    const key = [heading.id, heading.text, s?.sessions, s?.open_sessions, s?.unread].join("|");
    const end = heading.pos + heading.node.nodeSize - 1;
    decorations.push(Decoration.widget(end, () => badge(heading.id), { side: 1, key, ignoreSelection: true, stopEvent: () => true }));
    if (heading.id === panel?.sectionId) decorations.push(Decoration.node(heading.pos, end + 1, { class: "selected-section" }));
  }
  return DecorationSet.create(doc, decorations);
}

function badge(id) {
  const s = summaries.get(id);
  const [sessions, open, unread] = [s?.sessions ?? 0, s?.open_sessions ?? 0, s?.unread ?? 0];
  const text = sessions === 0 ? "Chat" : open > 0 ? `${open} ${open === 1 ? "chat" : "chats"}` : `${sessions} closed`;
  const label = `Chats about “${labelOf(id) ?? id}”: ${open} open, ${sessions - open} closed, ${unread} unread`;
  const button = el("button", { type: "button", className: "chat-badge", contentEditable: "false", title: label, dataset: { sectionId: id, sessions, open, unread } }, text);
  button.setAttribute("aria-label", label);
  if (unread) button.append(el("span", { className: "unread", textContent: String(unread) }));
  button.addEventListener("mousedown", (event) => event.preventDefault()); // keep the editor's selection
  button.addEventListener("click", () => select(id, { reveal: true }));
  return button;
}

function redraw() {
  if (editor) editor.view.dispatch(editor.state.tr.setMeta(badges, "redraw"));
  renderElsewhere();
}

/** Unplaced (always), and any section that has chats but no heading here (another copy's, or stale). */
function renderElsewhere() {
  const headed = new Set(editor ? headingsOf(editor.state.doc).map((h) => h.id) : []);
  const ids = [UNPLACED, ...[...summaries.keys()].filter((id) => id !== UNPLACED && !headed.has(id))];
  $("elsewhere-list").replaceChildren(...ids.map((id) => el("li", {}, id === UNPLACED ? null : `${id} `, badge(id))));
}

/** The section's title as the document shows it now (null: no heading has that id). */
function labelOf(id) {
  if (id === UNPLACED) return "Unplaced";
  return (editor && headingsOf(editor.state.doc).find((h) => h.id === id)?.text) || null;
}

async function select(id, { reveal = false } = {}) {
  const shown = panel.show(id);
  if (reveal && matchMedia("(max-width: 760px)").matches) $("panel").scrollIntoView({ block: "start" }); // below the text
  await shown;
}

function notify(text) {
  const note = el("p", { textContent: text });
  $("notices").append(note);
  setTimeout(() => note.remove(), 6000);
}

// Edits: what moves when the author pauses -------------------------------------------------

function onUpdate({ transaction, appendedTransactions }) {
  if (transaction.getMeta(OWN)) return;
  for (const tr of [transaction, ...appendedTransactions]) mapping.appendMapping(tr.mapping);
  clearTimeout(pause);
  pause = setTimeout(commit, PAUSE_MS);
}

/** Give headings their ids, move the conversations of renamed, merged and deleted sections, save. */
function commit({ save = true } = {}) {
  clearTimeout(pause);
  const { state } = editor;
  const headings = headingsOf(state.doc);
  const ids = idsFor(headings);
  const moves = planMoves(committed, state.doc, mapping, ids);
  const before = new Set(headingsOf(committed).map((h) => h.id));
  for (const id of ids) {
    const back = recent.get(id); // a heading came back (undo): so do its chats
    if (id && !before.has(id) && back && !moves.some((m) => m.to === id)) moves.push({ from: back.to, to: id, why: "restored", sessionIds: back.ids });
  }
  const tr = state.tr;
  headings.forEach((h, i) => ids[i] !== h.id && tr.setNodeAttribute(h.pos, "sectionId", ids[i]));
  if (tr.docChanged) editor.view.dispatch(tr.setMeta(OWN, true).setMeta("addToHistory", false));
  committed = editor.state.doc;
  mapping = new Mapping();
  for (const m of moves) move(m);
  if (save) sync.save(editor.getJSON());
  redraw();
  panel.relabel();
}

const WHY = { renamed: "followed the renamed heading", merged: "joined the section above", deleted: "went to Unplaced", restored: "came back" };

function move({ from, to, why, sessionIds = null }) {
  moving = moving.then(async () => {
    try {
      const { sessions } = await chat.moveSessions({ documentId: DOC, fromSectionId: from, toSectionId: to, sessionIds });
      if (panel.sectionId === from) select(to); // the panel follows the text (with its chat, if one moved: panel.js)
      if (!sessions.length) return;
      recent.set(from, { to, ids: sessions.map((s) => s.session_id) });
      notify(`${sessions.length === 1 ? "1 chat" : `${sessions.length} chats`} ${WHY[why]}.`);
    } catch (error) {
      notify(`The chats of “${from}” did not move: ${describeError(error)}`);
    }
  });
}

/** Someone else's version of the document: show it; their page moved what their edit called for. */
function showRemote(content) {
  clearTimeout(pause);
  editor.chain().setMeta(OWN, true).setMeta("addToHistory", false).setContent(content, { emitUpdate: false }).run();
  committed = editor.state.doc;
  mapping = new Mapping();
  redraw();
  panel.relabel();
}

// Start ---------------------------------------------------------------------------------------

const STATES = { connecting: "Connecting…", connected: "Connected", reconnecting: "Reconnecting…", offline: "Offline · retrying", closed: "Disconnected" };

function showState(state) {
  $("status").dataset.state = state;
  $("status").textContent = STATES[state] ?? state;
}

async function main() {
  $("who").textContent = `${NAME} · document “${DOC}”`;
  let module;
  try {
    module = await import(new URL("/static/sectionchat.js", WS.replace(/^ws(s?):/, "http$1:")).href);
  } catch {
    showState("offline");
    $("status").textContent = `No chat server at ${WS}`;
    return;
  }
  describeError = module.describeError;
  chat = new module.SectionChat(WS, { name: NAME });
  chat.on("state", ({ state }) => showState(state));
  panel = new ChatPanel(chat, DOC, { describeError, labelOf, notify, onSection: redraw });
  sync = new DocSync(DOC, { onRemote: showRemote, onState: (state) => ($("doc-state").textContent = state === "saving" ? "Saving…" : state === "offline" ? "Not saved (retrying)" : "Saved") });
  const content = await sync.load();
  editor = new Editor({ element: $("editor"), extensions: [StarterKit.configure({ link: false }), SectionChats], content: content ?? SAMPLE });
  committed = editor.state.doc;
  commit({ save: content === null }); // the sample's headings get their ids
  editor.on("update", onUpdate);
  chat.watchDocument(DOC, {
    onDocument: ({ sections }) => {
      summaries.clear();
      for (const summary of sections) summaries.set(summary.section_id, summary);
      redraw();
    },
    onSectionSummary: (summary) => {
      if (summary.sessions === 0) summaries.delete(summary.section_id);
      else summaries.set(summary.section_id, summary);
      redraw();
    },
    onError: (error) => notify(describeError(error)),
  });
}

main();
