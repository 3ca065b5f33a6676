// app.js: the sectionchat page, built on sectionchat.js.
//
// Rule kept here: user data (messages, titles, names, ids, reactions) only ever
// reaches the DOM as text (textContent, attributes via setAttribute); never as HTML.
// The page's state lives in `ui`; the connection's in the SectionChat client.

import { COMMON_REACTIONS, SectionChat, applyReaction, describeError, randomId } from "./sectionchat.js";

const $ = (id) => document.getElementById(id);

/** Make an element: el("li", {class: "x", "data-seq": 3}, "text", child). Strings become text nodes. */
function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (name === "class") node.className = value;
    else if (name === "hidden") node.hidden = true;
    else node.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

const params = new URLSearchParams(location.search);
const TYPING_SEND_EVERY_MS = 3000;
const TYPING_SHOW_MS = 5000;
const GROUP_WITHIN_MS = 5 * 60 * 1000;
const PAGE = 50;
const MAX_MENTIONS = 20;

const ui = {
  chat: null,
  sub: null,
  user: null,
  moderator: false,
  doc: null,
  section: null,
  sectionGen: 0, // bumps when the section changes: late replies for the old one are dropped
  sessions: new Map(), // session_id -> {session (the client's live object), last, li}
  presence: [],
  view: null, // the open session's view, see openSession()
  typing: new Map(), // session_id -> Map(user -> timer)
  lastTypingSent: 0,
  lastFetchers: null,
  watch: null, // the DocumentWatch of ui.doc
  watchGen: 0,
  watchedDoc: null,
  docSections: new Map(), // section_id -> SectionSummary (the document view)
  readTimer: null,
  mention: null, // the open @-completion: {start, query, options, active}
};

// Formatting -------------------------------------------------------------------

const timeFormat = new Intl.DateTimeFormat(undefined, { hour: "2-digit", minute: "2-digit" });
const dayFormat = new Intl.DateTimeFormat(undefined, { month: "short", day: "numeric" });
const fullFormat = new Intl.DateTimeFormat(undefined, { dateStyle: "medium", timeStyle: "short" });

function sameDay(a, b) {
  return a.getFullYear() === b.getFullYear() && a.getMonth() === b.getMonth() && a.getDate() === b.getDate();
}

/** Date and time in full (for title attributes); "" for a date we cannot read. */
function fullTime(iso) {
  const date = new Date(iso);
  return Number.isNaN(date.getTime()) ? "" : fullFormat.format(date);
}

function clockTime(iso) {
  const date = new Date(iso);
  return Number.isNaN(date.getTime()) ? "" : timeFormat.format(date);
}

function shortTime(iso) {
  const date = new Date(iso);
  if (Number.isNaN(date.getTime())) return "";
  return sameDay(date, new Date()) ? timeFormat.format(date) : dayFormat.format(date);
}

function hue(name) {
  let h = 0;
  for (const ch of name) h = (h * 31 + ch.codePointAt(0)) % 360;
  return h;
}

function avatar(name, extra = "") {
  const node = el("span", { class: `avatar ${extra}`.trim(), "aria-hidden": "true" }, Array.from(name.trim() || "?")[0].toUpperCase());
  node.style.setProperty("--hue", hue(name));
  return node;
}

function sessionTitle(session) {
  return session.title && session.title.trim() ? session.title : "Untitled session";
}

function validName(name) {
  return name.length >= 1 && name.length <= 64 && !/[\u0000-\u001f\u007f-\u009f]/.test(name);
}

function validId(id) {
  return id.length >= 1 && id.length <= 128 && !/[\u0000-\u001f\u007f-\u009f]/.test(id);
}

function listOfNames(users) {
  if (users.length <= 2) return users.join(" and ");
  return `${users.slice(0, -1).join(", ")} and ${users.at(-1)}`;
}

function pageVisible() {
  return document.visibilityState === "visible";
}

// Notices ------------------------------------------------------------------------

/** A dismissable notice; `body` is text or nodes; `actions`: [{label, onClick}] buttons. */
function notify(body, { kind = "error", timeout = 8000, actions = [], attrs = {} } = {}) {
  const close = el("button", { type: "button", class: "icon-button", "aria-label": "Dismiss" }, "×");
  const content = typeof body === "string" ? el("p", {}, body) : el("div", { class: "notice-body" }, body);
  const buttons = actions.map(({ label, onClick }) => {
    const button = el("button", { type: "button", class: "link-button" }, label);
    button.addEventListener("click", () => {
      remove();
      onClick();
    });
    return button;
  });
  if (buttons.length) content.append(el("p", { class: "notice-actions" }, buttons));
  const notice = el("div", { class: `notice ${kind}`, role: kind === "error" ? "alert" : "status", ...attrs }, content, close);
  const remove = () => notice.remove();
  close.addEventListener("click", remove);
  $("notices").append(notice);
  if (timeout) setTimeout(remove, timeout);
  return notice;
}

// Connection state -----------------------------------------------------------------

const STATE_TEXT = {
  idle: "Not connected",
  connecting: "Connecting…",
  connected: "Connected",
  reconnecting: "Reconnecting…",
  offline: "Offline",
  closed: "Disconnected",
};

function showState(detail) {
  const state = detail.state;
  if (state === "connected" && detail.user && detail.user !== ui.user) showUser(detail.user); // token mode: the token names us
  if (state === "connected") showRoles();
  const status = $("status");
  status.dataset.state = state;
  document.body.dataset.connection = state;
  let text = STATE_TEXT[state] ?? state;
  if (state === "offline") text = "Offline · retrying";
  $("status-text").textContent = text;
  status.title = detail.delay ? `Next attempt in ${Math.ceil(detail.delay / 1000)} s` : "";
  $("retry-now").hidden = !(state === "offline" || state === "reconnecting");
  $("offline-note").hidden = state === "connected" || state === "connecting" || !ui.view;
  for (const pending of ui.view?.pending.values() ?? []) {
    if (pending.status === "queued" || pending.status === "sending") setPendingStatus(pending, state === "connected" ? "sending" : "queued");
  }
  // Edits, deletes and reactions waiting in the outbox say whether they are on their way.
  if (ui.view) for (const seq of pendingSeqs(ui.view)) refreshMessage(seq);
  updateComposer();
}

/** The welcome's roles: moderators may edit and delete anyone's messages. */
function showRoles() {
  const moderator = Boolean(ui.chat?.isModerator);
  $("me-role").hidden = !moderator;
  if (moderator === ui.moderator) return;
  ui.moderator = moderator;
  document.body.dataset.moderator = moderator ? "true" : "false";
  if (ui.view) for (const seq of ui.view.bySeq.keys()) refreshMessage(seq);
}

// Starting ---------------------------------------------------------------------------

function readPlace() {
  const name = (params.get("name") ?? localStorage.getItem("sectionchat.name") ?? "").trim();
  return { name, doc: (params.get("doc") ?? "").trim(), section: (params.get("section") ?? "").trim() };
}

function writeUrl() {
  const url = new URL(location.href);
  url.searchParams.set("doc", ui.doc);
  url.searchParams.set("section", ui.section);
  if (ui.user && !tokenMode) url.searchParams.set("name", ui.user);
  if (ui.view) url.searchParams.set("session", ui.view.sessionId);
  else url.searchParams.delete("session");
  history.replaceState(null, "", url);
}

function main() {
  wireEvents();
  if (tokenMode) $("join-name").required = $("place-name").required = false;
  const place = readPlace();
  if (!checkPlace(place.name, place.doc, place.section)) {
    start(place.name, place.doc, place.section, params.get("session"));
  } else {
    showJoin(place);
  }
}

function showJoin(place) {
  document.body.dataset.screen = "join";
  $("join").hidden = false;
  $("app").hidden = true;
  $("status").hidden = true;
  $("join-name").value = place.name;
  $("join-doc").value = place.doc;
  $("join-section").value = place.section;
  const first = ["join-name", "join-doc", "join-section"].find((id) => !$(id).value);
  $(first ?? "join-name").focus();
}

// With a token (`?token=`) the server takes the name from it; otherwise we need one.
const tokenMode = Boolean(params.get("token"));

function checkPlace(name, doc, section) {
  if (!(tokenMode && !name) && !validName(name)) return "A name is 1 to 64 characters, without control characters.";
  if (!validId(doc)) return "A document id is 1 to 128 characters, without control characters.";
  if (!validId(section)) return "A section id is 1 to 128 characters, without control characters.";
  return null;
}

function showUser(name) {
  ui.user = name;
  $("me").hidden = !name;
  $("me-name").textContent = name;
  $("me-avatar").replaceWith(Object.assign(avatar(name || "?", "small"), { id: "me-avatar" }));
  if (ui.doc) writeUrl();
}

function start(name, doc, section, sessionId = null) {
  document.body.dataset.screen = "chat";
  $("join").hidden = true;
  $("app").hidden = false;
  $("status").hidden = false;
  if (name) localStorage.setItem("sectionchat.name", name);
  if (ui.chat && ui.user !== name) {
    ui.chat.close();
    ui.chat = null;
    ui.watch = null;
    ui.watchedDoc = null;
  }
  showUser(name);
  if (!ui.chat) {
    const options = name ? { name } : {};
    if (params.get("token")) options.token = params.get("token");
    const chat = new SectionChat(undefined, options);
    chat.on("state", showState);
    chat.on("error", (error) => notify(describeError(error)));
    chat.on("mentioned", onMentioned);
    ui.chat = chat;
    showState({ state: "connecting" });
    chat.connect().catch(() => {});
  }
  openSection(doc, section, sessionId);
}

// The section --------------------------------------------------------------------------

/** Run `fn` only while the section it was made for is still the one shown. */
function forSection(gen, fn) {
  return (...args) => {
    if (gen === ui.sectionGen) fn(...args);
  };
}

async function openSection(doc, section, sessionId, { flashSeq = null } = {}) {
  if (ui.sub) ui.sub.unsubscribe();
  ui.sub = null;
  ui.doc = doc;
  ui.section = section;
  const gen = ++ui.sectionGen;
  ui.sessions = new Map();
  ui.typing.clear();
  ui.presence = [];
  $("sessions").replaceChildren();
  $("presence").replaceChildren();
  closeSessionView();
  $("where").textContent = "";
  $("where").append(
    el("span", { class: "visually-hidden" }, "Document "),
    el("span", { class: "doc" }, doc),
    el("span", { class: "sep", "aria-hidden": "true" }, " › "),
    el("span", { class: "visually-hidden" }, ", section "),
    el("span", { class: "section" }, section),
  );
  $("place-summary").textContent = `${doc} › ${section}`;
  $("place-doc").value = doc;
  $("place-section").value = section;
  $("place-name").value = ui.user;
  document.title = `${section} · ${doc} · sectionchat`;
  writeUrl();
  renderSessionsEmpty();
  watchDocument(doc);
  renderSections();
  try {
    const sub = await ui.chat.subscribe(doc, section, {
      onSnapshot: forSection(gen, onSnapshot),
      onSessionCreated: forSection(gen, onSessionCreated),
      onMessage: forSection(gen, onMessage),
      onSessionClosed: forSection(gen, onSessionChanged),
      onSessionReopened: forSection(gen, onSessionChanged),
      onSessionUpdated: forSection(gen, onSessionChanged),
      onSessionMoved: forSection(gen, onSessionMoved),
      onMessageEdited: forSection(gen, onMessageChanged),
      onMessageDeleted: forSection(gen, onMessageChanged),
      onReaction: forSection(gen, onReaction),
      onUnread: forSection(gen, () => renderSessions()),
      onRecovered: forSection(gen, () => {
        renderSessions();
        if (ui.view) renderSessionHead();
      }),
      onPresence: forSection(gen, ({ present }) => renderPresence(present)),
      onTyping: forSection(gen, onTyping),
      onError: (error) => notify(describeError(error)),
    });
    if (gen !== ui.sectionGen) return;
    ui.sub = sub;
    if (sessionId && ui.sessions.has(sessionId)) openSession(sessionId, { focus: false, flashSeq });
    else if (sessionId) notify("The session in the link is not in this section.", { kind: "info" });
  } catch (error) {
    if (gen === ui.sectionGen && error.message !== "unsubscribed") notify(describeError(error), { timeout: 0 });
  }
}

function onSnapshot({ sessions, presence, reconnect }) {
  // First load, or a reconnect whose missed events could not be replayed:
  // rebuild everything from the server's state.
  const before = ui.sessions;
  ui.sessions = new Map();
  $("sessions").replaceChildren();
  for (const session of sessions) {
    const old = before.get(session.session_id);
    const item = sessionItem(session);
    if (old && old.session.last_seq === session.last_seq) item.last = old.last;
    ui.sessions.set(session.session_id, item);
  }
  renderSessions();
  renderPresence(presence);
  fetchLastMessages();
  if (reconnect && ui.view && !ui.view.moved) {
    if (ui.sessions.has(ui.view.sessionId)) reloadView();
    else whereIsOpenSession(ui.view);
  }
}

/** The open session is no longer in the section after a reload: moved elsewhere, or gone. */
async function whereIsOpenSession(view) {
  const session = await ui.chat.getSession(view.sessionId).catch(() => null);
  if (view !== ui.view) return;
  if (session && session.section_id !== ui.section) {
    showMoved(session);
  } else {
    notify("The open session no longer exists on the server.", { kind: "info" });
    closeSessionView();
  }
}

/** Sessions list: learn each session's latest message (preview), gently paced. */
async function fetchLastMessages() {
  const gen = ui.sectionGen;
  const token = (ui.lastFetchers = {});
  const wanted = [...ui.sessions.values()].filter((item) => item.session.last_seq > 0 && !item.last);
  wanted.sort((a, b) => activity(b) - activity(a));
  const perSecond = Math.max(1, Math.floor((ui.chat.limits?.messages_per_s || 20) / 4));
  for (const item of wanted) {
    if (gen !== ui.sectionGen || token !== ui.lastFetchers) return;
    if (item.last) continue;
    try {
      const page = await ui.chat.history(item.session.session_id, { limit: 1 });
      const message = page.messages.at(-1);
      if (message && (!item.last || item.last.seq < message.seq)) item.last = message;
      renderSessions();
    } catch {
      /* a preview is a nicety; the list still works without it */
    }
    await new Promise((resolve) => setTimeout(resolve, 1000 / perSecond));
  }
}

function sessionItem(session) {
  return { session, last: null, li: null };
}

/** When a session was last active (ms): the server's last_activity_at (1.1), else its latest message. */
function activity(item) {
  const session = item.session;
  const at = Date.parse(session.last_activity_at ?? session.created_at) || 0;
  return Math.max(at, item.last ? Date.parse(item.last.sent_at) || 0 : 0);
}

function onSessionCreated(session) {
  if (ui.sessions.has(session.session_id)) return;
  ui.sessions.set(session.session_id, sessionItem(session));
  renderSessions();
}

/** A session moved out of this section (an editor renamed, merged or deleted it) or into it. */
function onSessionMoved({ session }, { direction }) {
  if (direction === "in") {
    onSessionCreated(session);
    fetchLastMessages(); // its preview
    return;
  }
  ui.sessions.delete(session.session_id);
  renderSessions();
  if (ui.view?.sessionId === session.session_id) showMoved(session);
}

/** The open session now lives in another section: say where, with a way to follow it. */
function showMoved(session) {
  ui.view.moved = session;
  renderSessionHead();
}

/** Closed, reopened or updated (title, metadata): the client has updated the session object. */
function onSessionChanged(session) {
  const item = ui.sessions.get(session.session_id);
  if (item && item.session !== session) item.session = session;
  renderSessions();
  if (ui.view?.sessionId === session.session_id) {
    renderSessionHead();
    for (const seq of ui.view.bySeq.keys()) refreshMessage(seq); // reactions and edits follow closed/open
  }
}

function onMessage(message, { own, session }) {
  const item = ui.sessions.get(message.session_id);
  if (item) {
    if (session && item.session !== session) item.session = session;
    if (!item.last || item.last.seq < message.seq) item.last = message;
    renderSessions();
  }
  stopTyping(message.session_id, message.author);
  if (ui.view?.sessionId === message.session_id) {
    addMessages([message], { live: true, own });
    markReadSoon();
  }
}

/** An edit or a delete (the tombstone), ours or someone's. */
function onMessageChanged(message) {
  const item = ui.sessions.get(message.session_id);
  if (item?.last?.seq === message.seq) item.last = message;
  renderSessions();
  const view = ui.view;
  if (view?.sessionId !== message.session_id || !view.messages.has(message.seq)) return;
  const known = view.messages.get(message.seq);
  if (known.deleted_at && !message.deleted_at) return; // an older version replayed after the delete
  // Reactions of ours still on their way stay as shown until their replies come.
  const reactions = { ...(message.reactions ?? {}) };
  for (const key of view.pendingReactions.keys()) {
    const [seq, ...rest] = key.split(" ");
    if (Number(seq) !== message.seq) continue;
    const reaction = rest.join(" ");
    if (known.reactions?.[reaction]) reactions[reaction] = known.reactions[reaction];
    else delete reactions[reaction];
  }
  view.messages.set(message.seq, message.deleted_at ? message : { ...message, reactions });
  if (message.deleted_at && view.editing?.seq === message.seq) view.editing = null;
  refreshMessage(message.seq);
  placeDivider(view);
}

function onReaction(event) {
  renderSessions(); // activity order
  const view = ui.view;
  if (view?.sessionId !== event.session_id) return;
  const message = view.messages.get(event.seq);
  if (!message) return;
  // Our own toggle still on its way: what we show is already where it will end.
  if (event.user === ui.user && view.pendingReactions.has(reactionKey(event.seq, event.reaction))) return;
  if (applyReaction(message, event)) refreshMessage(event.seq);
}

// Sessions list ----------------------------------------------------------------------------

function renderSessionsEmpty() {
  $("sessions-empty").hidden = ui.sessions.size > 0;
  $("session-count").textContent = ui.sessions.size ? String(ui.sessions.size) : "";
}

function renderSessions() {
  const list = $("sessions");
  const focused = document.activeElement;
  const items = [...ui.sessions.values()].sort(
    (a, b) => activity(b) - activity(a) || b.session.created_at.localeCompare(a.session.created_at),
  );
  items.forEach((item, index) => {
    if (!item.li) item.li = el("li", {});
    fillSessionItem(item);
    if (list.children[index] !== item.li) list.insertBefore(item.li, list.children[index] ?? null);
  });
  while (list.children.length > items.length) list.lastElementChild.remove();
  if (focused && focused !== document.activeElement && focused.isConnected) focused.focus();
  renderSessionsEmpty();
}

function unreadOf(sessionId) {
  const sub = ui.chat?.subscriptionOf(sessionId);
  return sub ? sub.unreadOf(sessionId) : 0;
}

function previewOf(message) {
  const who = message.author === ui.user ? "You" : message.author;
  return message.deleted_at ? `${who}: message deleted` : `${who}: ${message.text}`;
}

function fillSessionItem(item) {
  const { session, last } = item;
  const open = ui.view?.sessionId === session.session_id;
  // The open session, while the page is in view, is being read: no badge for it.
  const unread = open && pageVisible() ? 0 : unreadOf(session.session_id);
  const when = session.last_activity_at ?? (last ? last.sent_at : session.created_at);
  const preview = last ? previewOf(last) : `Started by ${session.created_by}`;
  const button = el(
    "button",
    {
      type: "button",
      class: "session",
      "data-session-id": session.session_id,
      "data-closed": session.closed ? "true" : null,
      "data-unread": unread || null,
      "aria-current": open ? "true" : null,
    },
    el("span", { class: "session-line" },
      el("span", { class: "session-title" }, sessionTitle(session)),
      session.closed ? el("span", { class: "badge" }, "Closed") : null,
      el("time", { class: "session-time", datetime: when, title: fullTime(when) }, shortTime(when)),
    ),
    el("span", { class: "session-line" },
      el("span", { class: "session-preview" }, preview.replace(/\s+/g, " ").slice(0, 160)),
      unread ? el("span", { class: "unread" }, el("span", { class: "visually-hidden" }, "unread messages: "), String(unread)) : null,
    ),
  );
  button.addEventListener("click", () => openSession(session.session_id));
  const hadFocus = item.li.contains(document.activeElement);
  item.li.replaceChildren(button);
  if (hadFocus) button.focus();
}

// The document view: every section of the document (watch_document) -----------------------

async function watchDocument(doc) {
  if (ui.watchedDoc === doc) return;
  const previous = ui.watchedDoc;
  ui.watchedDoc = doc;
  ui.watch = null;
  ui.docSections = new Map();
  const gen = ++ui.watchGen;
  if (previous !== null) ui.chat.unwatchDocument(previous);
  const mine = (fn) => (...args) => gen === ui.watchGen && fn(...args);
  try {
    const watch = await ui.chat.watchDocument(doc, {
      onDocument: mine(({ sections }) => {
        ui.docSections = new Map(sections.map((summary) => [summary.section_id, summary]));
        renderSections();
      }),
      onSectionSummary: mine((summary) => {
        if (summary.sessions === 0) ui.docSections.delete(summary.section_id);
        else ui.docSections.set(summary.section_id, summary);
        renderSections();
      }),
      onDocumentDeleted: mine(() => notify("This document was deleted.", { kind: "info", timeout: 0 })),
    });
    if (gen === ui.watchGen) ui.watch = watch;
  } catch (error) {
    if (gen === ui.watchGen && error.message !== "unwatched") {
      ui.watchedDoc = null;
      $("sections-empty").textContent = "The document's sections could not be loaded. " + describeError(error);
      $("sections-empty").hidden = false;
    }
  }
}

function renderSections() {
  const summaries = [...ui.docSections.values()];
  if (ui.section && !ui.docSections.has(ui.section)) {
    // The section we are in has no session yet: it is still a place to be.
    summaries.push({ section_id: ui.section, sessions: 0, open_sessions: 0, messages: 0, last_activity_at: null, unread: 0, mentions: 0 });
  }
  const list = $("sections");
  const focusedId = list.contains(document.activeElement) ? document.activeElement.dataset.sectionId : null;
  list.replaceChildren(
    ...summaries.map((summary) => {
      const current = summary.section_id === ui.section;
      const counts = [
        `${summary.open_sessions} open`,
        summary.sessions > summary.open_sessions ? `${summary.sessions - summary.open_sessions} closed` : null,
        `${summary.messages} message${summary.messages === 1 ? "" : "s"}`,
      ].filter(Boolean);
      const button = el(
        "button",
        {
          type: "button",
          class: "section-link",
          "data-section-id": summary.section_id,
          "data-unread": summary.unread || null,
          "data-mentions": summary.mentions || null,
          "aria-current": current ? "true" : null,
        },
        el("span", { class: "section-line" },
          el("span", { class: "section-name" }, summary.section_id),
          summary.mentions
            ? el("span", { class: "mention-count", title: `${summary.mentions} unread mention${summary.mentions === 1 ? "" : "s"} of you` },
                el("span", { class: "visually-hidden" }, "unread mentions: "), `@${summary.mentions}`)
            : null,
          summary.unread ? el("span", { class: "unread" }, el("span", { class: "visually-hidden" }, "unread messages: "), String(summary.unread)) : null,
        ),
        el("span", { class: "section-counts" }, counts.join(" · ")),
      );
      button.addEventListener("click", () => {
        if (summary.section_id !== ui.section) openSection(ui.doc, summary.section_id, null);
        else document.body.dataset.view = "list";
      });
      return el("li", {}, button);
    }),
  );
  if (focusedId) list.querySelector(`[data-section-id="${CSS.escape(focusedId)}"]`)?.focus();
  $("section-count").textContent = ui.docSections.size ? String(ui.docSections.size) : "";
  $("sections-empty").hidden = true;
}

// Presence ---------------------------------------------------------------------------------

function renderPresence(users) {
  const sorted = [...new Set(users)].sort((a, b) => (a === ui.user ? -1 : b === ui.user ? 1 : a.localeCompare(b)));
  ui.presence = sorted;
  $("presence").replaceChildren(
    ...sorted.map((user) =>
      el("li", { "data-user": user }, avatar(user, "small"), el("span", { class: "presence-name" }, user), user === ui.user ? el("span", { class: "muted you" }, " (you)") : null),
    ),
  );
  $("presence-count").textContent = sorted.length ? String(sorted.length) : "";
}

// Typing -------------------------------------------------------------------------------------

function onTyping({ session_id: sessionId, user }) {
  if (user === ui.user) return; // our own other tab
  let users = ui.typing.get(sessionId);
  if (!users) ui.typing.set(sessionId, (users = new Map()));
  clearTimeout(users.get(user));
  users.set(user, setTimeout(() => stopTyping(sessionId, user), TYPING_SHOW_MS));
  renderTyping();
}

function stopTyping(sessionId, user) {
  const users = ui.typing.get(sessionId);
  if (!users?.has(user)) return;
  clearTimeout(users.get(user));
  users.delete(user);
  renderTyping();
}

function renderTyping() {
  const users = ui.view ? [...(ui.typing.get(ui.view.sessionId)?.keys() ?? [])] : [];
  let text = "";
  if (users.length === 1) text = `${users[0]} is typing…`;
  else if (users.length === 2) text = `${users[0]} and ${users[1]} are typing…`;
  else if (users.length > 2) text = `${users.length} people are typing…`;
  $("typing").textContent = text;
  $("typing").dataset.users = users.join(",");
}

// Mentions of us elsewhere (the `mentioned` event) ---------------------------------------------

function onMentioned({ document_id: doc, section_id: section, message }) {
  if (message.author === ui.user) return;
  const here = doc === ui.doc && ui.view?.sessionId === message.session_id;
  if (here && pageVisible()) return; // we are looking at it
  const where = el("span", { class: "mention-where" }, doc === ui.doc ? `in section ${section}` : `in ${doc} › ${section}`);
  const quote = el("q", { class: "mention-text" }, message.text.replace(/\s+/g, " ").slice(0, 200));
  notify(
    [el("p", { class: "mention-head" }, el("strong", {}, message.author), " mentioned you ", where), el("p", {}, quote)],
    {
      kind: "mentioned",
      timeout: 15000,
      attrs: { "data-session-id": message.session_id, "data-section-id": section, "data-seq": message.seq },
      actions: [{ label: "Open", onClick: () => goTo(doc, section, message.session_id, message.seq) }],
    },
  );
  // The session's title, when we can learn it (a nicety: the notice reads well without it).
  ui.chat
    .getSession(message.session_id)
    .then((session) => {
      where.textContent = `in “${sessionTitle(session)}” (${doc === ui.doc ? `section ${section}` : `${doc} › ${section}`})`;
    })
    .catch(() => {});
}

function goTo(doc, section, sessionId, seq = null) {
  if (doc === ui.doc && section === ui.section && ui.sessions.has(sessionId)) openSession(sessionId, { flashSeq: seq });
  else openSection(doc, section, sessionId, { flashSeq: seq });
}

// The open session ---------------------------------------------------------------------------

function openSession(sessionId, { focus = true, flashSeq = null } = {}) {
  const item = ui.sessions.get(sessionId);
  if (!item) return;
  if (ui.view?.sessionId !== sessionId) {
    const sub = ui.chat.subscriptionOf(sessionId);
    ui.view = {
      sessionId,
      gen: (ui.view?.gen ?? 0) + 1,
      bySeq: new Map(), // seq -> li
      messages: new Map(), // seq -> Message, as shown (edits, deletes, reactions applied)
      pending: new Map(), // client_msg_id -> {li, text, status}
      pendingEdits: new Map(), // seq -> {text, token}: an edit on its way (or waiting for the connection)
      pendingDeletes: new Set(), // seqs
      pendingReactions: new Map(), // "seq reaction" -> token: our toggle on its way
      editing: null, // {seq, draft}: the message being edited inline
      picker: null, // seq whose reaction picker is open
      armedDelete: null, // {seq, timer}: the delete asks once more
      readAtOpen: sub?.readState ? sub.readOf(sessionId) : null, // where "new since you last read" starts
      lastSeqAtOpen: item.session.last_seq,
      flashSeq,
      oldest: null,
      hasMore: false,
      loaded: false,
      loadingOlder: false,
    };
    $("messages").replaceChildren();
    $("history-status").textContent = "Loading messages…";
    $("jump").hidden = true;
    $("message-input").value = "";
    closeMentions();
    updateCharCount();
    loadLatest(ui.view);
  } else if (flashSeq !== null) {
    flash(ui.view, flashSeq);
  }
  $("no-session").hidden = true;
  $("session-view").hidden = false;
  document.body.dataset.view = "chat";
  renderSessionHead();
  renderSessions();
  renderTyping();
  showState({ state: ui.chat.state });
  writeUrl();
  if (focus) $("message-input").focus();
}

function closeSessionView() {
  ui.view = null;
  closeMentions();
  $("session-view").hidden = true;
  $("no-session").hidden = false;
  document.body.dataset.view = "list";
  if (ui.doc) writeUrl();
}

function renderSessionHead() {
  const session = currentSession();
  if (!session) return;
  const moved = ui.view.moved;
  $("session-title").textContent = sessionTitle(session);
  $("session-meta").textContent = `Started by ${session.created_by} · ${fullTime(session.created_at)}`;
  $("session-view").dataset.closed = session.closed ? "true" : "false";
  if (moved) $("session-view").dataset.movedTo = moved.section_id;
  else delete $("session-view").dataset.movedTo;
  $("closed-note").hidden = !session.closed || Boolean(moved);
  $("moved-note").hidden = !moved;
  if (moved) $("moved-text").textContent = `This session moved to section “${moved.section_id}”.`;
  $("close-session").hidden = session.closed || Boolean(moved);
  $("reopen-session").hidden = !session.closed || Boolean(moved);
  resetCloseButton();
  updateComposer();
}

function currentSession() {
  return ui.view ? ui.sessions.get(ui.view.sessionId)?.session ?? ui.view.moved ?? null : null;
}

function updateComposer() {
  const session = currentSession();
  const closed = !session || session.closed || Boolean(ui.view?.moved);
  $("message-input").disabled = closed;
  $("send").disabled = closed;
  const why = ui.view?.moved ? "This session moved to another section" : "This session is closed";
  $("message-input").placeholder = session ? (closed ? why : `Message “${sessionTitle(session)}”`) : "";
  if (closed) closeMentions();
}

// Read state: mark the open session read while it is in view ---------------------------------

function markReadSoon() {
  clearTimeout(ui.readTimer);
  ui.readTimer = setTimeout(markOpenSessionRead, 200);
}

function markOpenSessionRead() {
  const view = ui.view;
  if (!view || !view.loaded || !pageVisible()) return;
  const sub = ui.chat.subscriptionOf(view.sessionId);
  const session = currentSession();
  if (!sub?.readState || !session) return;
  if (session.last_seq > sub.readOf(view.sessionId)) ui.chat.markRead(view.sessionId, session.last_seq).catch(() => {});
}

/** "New since you last read": before the first message of someone else after our marker at opening. */
function placeDivider(view) {
  if (view !== ui.view || view.readAtOpen === null) return;
  const list = $("messages");
  let target = null;
  for (const seq of [...view.bySeq.keys()].sort((a, b) => a - b)) {
    const message = view.messages.get(seq);
    if (seq > view.readAtOpen && seq <= view.lastSeqAtOpen && message.author !== ui.user && !message.deleted_at) {
      target = view.bySeq.get(seq);
      break;
    }
  }
  let divider = list.querySelector(".unread-divider");
  if (!target) {
    divider?.remove();
  } else {
    divider ??= el("li", { class: "unread-divider", role: "separator", "aria-label": "New since you last read" }, el("span", {}, "New since you last read"));
    if (target.previousElementSibling !== divider) list.insertBefore(divider, target);
  }
  for (const li of list.querySelectorAll("li.message")) regroup(li);
}

async function loadLatest(view) {
  try {
    const page = await ui.chat.history(view.sessionId, { limit: PAGE });
    if (view !== ui.view) return;
    view.loaded = true;
    view.hasMore = page.has_more;
    view.oldest = page.messages.length ? page.messages[0].seq : null;
    addMessages(page.messages, { live: false });
    renderHistoryStatus();
    const divider = $("messages").querySelector(".unread-divider");
    if (view.flashSeq !== null) flash(view, view.flashSeq);
    else if (divider && divider.offsetTop > $("scroller").clientHeight * 0.6) divider.scrollIntoView({ block: "center" });
    else scrollToBottom();
    fillViewport(view);
    markReadSoon();
  } catch (error) {
    if (view !== ui.view) return;
    $("history-status").textContent = "Messages could not be loaded. " + describeError(error);
  }
}

/** Bring a message into view and make it stand out for a moment (a mention we were sent to). */
function flash(view, seq) {
  view.flashSeq = null;
  const li = view.bySeq.get(seq);
  if (!li) return;
  li.scrollIntoView({ block: "center" });
  li.classList.remove("flash");
  void li.offsetWidth; // restart the animation
  li.classList.add("flash");
}

/** After a reconnect that could not replay what was missed: load the newest page again. */
async function reloadView() {
  const view = ui.view;
  try {
    const page = await ui.chat.history(view.sessionId, { limit: PAGE });
    if (view !== ui.view) return;
    const wasAtBottom = nearBottom();
    for (const [seq, li] of view.bySeq) {
      li.remove();
      view.bySeq.delete(seq);
      view.messages.delete(seq);
    }
    view.hasMore = page.has_more;
    view.oldest = page.messages.length ? page.messages[0].seq : null;
    addMessages(page.messages, { live: false });
    renderHistoryStatus();
    if (wasAtBottom) scrollToBottom();
    markReadSoon();
  } catch (error) {
    if (view === ui.view) notify("Could not reload the messages: " + describeError(error));
  }
}

async function loadOlder() {
  const view = ui.view;
  if (!view || !view.loaded || !view.hasMore || view.loadingOlder || view.oldest === null) return;
  view.loadingOlder = true;
  renderHistoryStatus();
  const scroller = $("scroller");
  try {
    const page = await ui.chat.history(view.sessionId, { beforeSeq: view.oldest, limit: PAGE });
    if (view !== ui.view) return;
    const height = scroller.scrollHeight;
    const top = scroller.scrollTop;
    addMessages(page.messages, { live: false });
    scroller.scrollTop = top + (scroller.scrollHeight - height); // keep what the reader was looking at
    view.hasMore = page.has_more;
    if (page.messages.length) view.oldest = page.messages[0].seq;
  } catch (error) {
    if (view === ui.view) notify("Could not load earlier messages: " + describeError(error));
  } finally {
    view.loadingOlder = false;
    if (view === ui.view) {
      renderHistoryStatus();
      fillViewport(view);
    }
  }
}

/** Load older pages until the history overflows the scroller (so scrolling can load more). */
function fillViewport(view) {
  const scroller = $("scroller");
  if (view === ui.view && view.hasMore && scroller.scrollHeight <= scroller.clientHeight + 40) loadOlder();
}

function renderHistoryStatus() {
  const view = ui.view;
  let text = "";
  if (view.loadingOlder) text = "Loading earlier messages…";
  else if (view.loaded && !view.hasMore) text = view.bySeq.size || view.pending.size ? "This is the start of the session." : "No messages yet. Say hello!";
  $("history-status").textContent = text;
  $("history-status").dataset.hasMore = view.hasMore ? "true" : "false";
}

function nearBottom() {
  const scroller = $("scroller");
  return scroller.scrollHeight - scroller.scrollTop - scroller.clientHeight < 80;
}

function scrollToBottom() {
  const scroller = $("scroller");
  scroller.scrollTop = scroller.scrollHeight;
  $("jump").hidden = true;
}

// Messages -------------------------------------------------------------------------------------

const reactionKey = (seq, reaction) => `${seq} ${reaction}`;

function pendingSeqs(view) {
  const seqs = new Set([...view.pendingEdits.keys(), ...view.pendingDeletes]);
  for (const key of view.pendingReactions.keys()) seqs.add(Number(key.split(" ")[0]));
  return seqs;
}

/** May we edit or delete this message? Our own, or anyone's as a moderator. */
function mayChange(message) {
  return !message.deleted_at && (message.author === ui.user || ui.moderator);
}

/** The text with the mentioned names (`@name`) marked; all of it as text nodes. */
function textWithMentions(text, mentions) {
  const names = [...new Set(mentions ?? [])].filter(Boolean).sort((a, b) => b.length - a.length);
  if (!names.length) return [text];
  const parts = [];
  let rest = 0;
  for (let i = text.indexOf("@"); i !== -1; i = text.indexOf("@", i + 1)) {
    const name = names.find((n) => text.startsWith(n, i + 1));
    if (!name) continue;
    if (i > rest) parts.push(text.slice(rest, i));
    parts.push(el("span", { class: name === ui.user ? "mention mention-me" : "mention", "data-user": name }, "@" + name));
    rest = i + 1 + name.length;
    i = rest - 1;
  }
  if (rest < text.length) parts.push(text.slice(rest));
  return parts;
}

function messageItem(message) {
  const li = el("li", { class: "message" });
  fillMessage(li, message);
  return li;
}

/** (Re)draw one message from the view's state: text or tombstone, edit mark, reactions, actions. */
function fillMessage(li, message) {
  const view = ui.view;
  const sentAt = new Date(message.sent_at);
  const deleted = Boolean(message.deleted_at);
  const own = message.author === ui.user;
  const session = currentSession();
  const closed = Boolean(session?.closed);
  const pendingEdit = view?.pendingEdits.get(message.seq) ?? null;
  const deleting = Boolean(view?.pendingDeletes.has(message.seq));
  const editing = !deleted && view?.editing?.seq === message.seq;
  const connected = ui.chat?.connected;
  const attrs = {
    "data-seq": message.seq,
    "data-author": message.author,
    "data-status": "sent",
    "data-own": own ? "true" : null,
    "data-time": sentAt.getTime() || 0,
    "data-deleted": deleted ? "true" : null,
    "data-edited": !deleted && message.edited_at ? "true" : null,
    "data-mentions-me": !deleted && (message.mentions ?? []).includes(ui.user) ? "true" : null,
    "data-pending-edit": pendingEdit ? (connected ? "sending" : "queued") : null,
    "data-pending-delete": deleting ? (connected ? "sending" : "queued") : null,
  };
  for (const name of ["data-own", "data-deleted", "data-edited", "data-mentions-me", "data-pending-edit", "data-pending-delete"]) li.removeAttribute(name);
  for (const [name, value] of Object.entries(attrs)) if (value !== null) li.setAttribute(name, String(value));

  const meta = el("p", { class: "message-meta" },
    el("span", { class: "author" }, message.author),
    " ",
    el("time", { datetime: message.sent_at, title: fullTime(message.sent_at) }, clockTime(message.sent_at)),
    !deleted && (message.edited_at || pendingEdit)
      ? el("span", { class: "edited", title: message.edited_at ? `Edited ${fullTime(message.edited_at)}` : "Edit not saved yet" }, "(edited)")
      : null,
  );
  let text;
  if (deleted) text = el("p", { class: "message-text tombstone" }, "Message deleted");
  else if (editing) text = editorFor(message);
  else text = el("p", { class: "message-text" }, textWithMentions(pendingEdit ? pendingEdit.text : message.text, message.mentions));

  let state = null;
  if (pendingEdit || deleting) {
    const what = deleting ? "Deleting" : "Saving the edit";
    state = el("p", { class: "message-state" }, connected ? `${what}…` : `${what} when the connection is back…`);
  }
  const body = el("div", { class: "message-body" }, meta, text, deleted ? null : reactionsRow(message, closed), state);
  const children = [avatar(message.author), body];
  if (!deleted && !editing && !deleting) {
    const actions = actionsFor(message, closed);
    if (actions) children.push(actions);
  }
  const hadFocus = li.contains(document.activeElement) ? document.activeElement : null;
  const focusKey = hadFocus?.dataset.focusKey;
  const selection = hadFocus?.tagName === "TEXTAREA" ? [hadFocus.selectionStart, hadFocus.selectionEnd] : null;
  li.replaceChildren(...children);
  if (focusKey) li.querySelector(`[data-focus-key="${CSS.escape(focusKey)}"]`)?.focus();
  if (editing) {
    const area = li.querySelector("textarea");
    if (area && (selection || view.editing.focus)) {
      view.editing.focus = false;
      area.focus();
      const [from, to] = selection ?? [area.value.length, area.value.length];
      area.setSelectionRange(from, to);
    }
  }
}

function refreshMessage(seq) {
  const view = ui.view;
  const li = view?.bySeq.get(seq);
  const message = view?.messages.get(seq);
  if (li && message) fillMessage(li, message);
}

function reactionsRow(message, closed) {
  const view = ui.view;
  const entries = Object.entries(message.reactions ?? {}).filter(([, users]) => users.length);
  if (!entries.length) return null;
  return el(
    "div",
    { class: "reactions", role: "group", "aria-label": "Reactions" },
    entries.map(([reaction, users]) => {
      const mine = users.includes(ui.user);
      const pending = view?.pendingReactions.has(reactionKey(message.seq, reaction));
      const who = listOfNames(users.map((u) => (u === ui.user ? "you" : u)));
      const chip = el(
        "button",
        {
          type: "button",
          class: "reaction-chip",
          "data-reaction": reaction,
          "data-count": users.length,
          "data-pending": pending ? "true" : null,
          "data-focus-key": `chip ${reaction}`,
          "aria-pressed": mine ? "true" : "false",
          title: `${who} reacted with ${reaction}` + (pending ? (ui.chat.connected ? " (sending…)" : " (waiting for the connection)") : ""),
          disabled: closed ? true : null,
        },
        el("span", { class: "reaction-emoji" }, reaction),
        el("span", { class: "reaction-count" }, String(users.length)),
      );
      chip.addEventListener("click", () => toggleReaction(message.seq, reaction));
      return chip;
    }),
  );
}

function actionsFor(message, closed) {
  const view = ui.view;
  const buttons = [];
  if (!closed) {
    const react = el("button", { type: "button", class: "action", "aria-label": "Add reaction", title: "Add reaction", "aria-expanded": view.picker === message.seq ? "true" : "false", "data-focus-key": "react" }, "React");
    react.addEventListener("click", (event) => {
      event.stopPropagation();
      view.picker = view.picker === message.seq ? null : message.seq;
      refreshMessage(message.seq);
      if (view.picker !== null) view.bySeq.get(message.seq)?.querySelector(".reaction-picker button")?.focus();
    });
    buttons.push(react);
  }
  if (mayChange(message)) {
    const others = message.author !== ui.user;
    if (!closed) {
      const edit = el("button", { type: "button", class: "action", "aria-label": others ? `Edit ${message.author}'s message` : "Edit message", title: others ? "Edit (moderator)" : "Edit", "data-focus-key": "edit" }, "Edit");
      edit.addEventListener("click", () => startEdit(message.seq));
      buttons.push(edit);
    }
    const armed = view.armedDelete?.seq === message.seq;
    const del = el(
      "button",
      { type: "button", class: armed ? "action danger" : "action", "aria-label": armed ? "Confirm delete" : others ? `Delete ${message.author}'s message` : "Delete message", title: others ? "Delete (moderator)" : "Delete", "data-focus-key": "delete" },
      armed ? "Confirm delete" : "Delete",
    );
    del.addEventListener("click", () => onDeleteClick(message.seq));
    buttons.push(del);
  }
  if (!buttons.length) return null;
  const bar = el("div", { class: "message-actions", role: "group", "aria-label": "Message actions" }, buttons);
  if (view.picker === message.seq) bar.append(pickerFor(message));
  return bar;
}

function pickerFor(message) {
  const picker = el(
    "div",
    { class: "reaction-picker", role: "group", "aria-label": "Pick a reaction" },
    COMMON_REACTIONS.map((reaction) => {
      const mine = (message.reactions?.[reaction] ?? []).includes(ui.user);
      const button = el("button", { type: "button", class: "pick", "aria-label": `React with ${reaction}`, "aria-pressed": mine ? "true" : "false", "data-reaction": reaction }, reaction);
      button.addEventListener("click", () => {
        ui.view.picker = null;
        toggleReaction(message.seq, reaction);
      });
      return button;
    }),
  );
  picker.addEventListener("keydown", (event) => {
    if (event.key === "Escape") {
      event.stopPropagation();
      ui.view.picker = null;
      refreshMessage(message.seq);
      ui.view.bySeq.get(message.seq)?.querySelector('[data-focus-key="react"]')?.focus();
    }
  });
  return picker;
}

function closePicker() {
  const view = ui.view;
  if (view?.picker == null) return;
  const seq = view.picker;
  view.picker = null;
  refreshMessage(seq);
}

/** Give or take back a reaction: shown at once, sent with an explicit `on` (a resend sets, never toggles). */
async function toggleReaction(seq, reaction) {
  const view = ui.view;
  const message = view?.messages.get(seq);
  if (!message || message.deleted_at) return;
  const on = !(message.reactions?.[reaction] ?? []).includes(ui.user);
  const key = reactionKey(seq, reaction);
  const token = {};
  view.pendingReactions.set(key, token);
  applyReaction(message, { reaction, user: ui.user, on });
  refreshMessage(seq);
  try {
    const reply = await ui.chat.react(view.sessionId, seq, reaction, on);
    if (view.pendingReactions.get(key) !== token) return; // a later toggle decides
    view.pendingReactions.delete(key);
    applyReaction(message, reply);
    refreshMessage(seq);
  } catch (error) {
    if (view.pendingReactions.get(key) !== token) return;
    view.pendingReactions.delete(key);
    applyReaction(message, { reaction, user: ui.user, on: !on });
    refreshMessage(seq);
    notify("The reaction was not saved. " + describeError(error));
  }
}

// Editing ----------------------------------------------------------------------------------------

function startEdit(seq) {
  const view = ui.view;
  const message = view.messages.get(seq);
  if (!message || !mayChange(message)) return;
  const previous = view.editing?.seq;
  view.editing = { seq, draft: view.pendingEdits.get(seq)?.text ?? message.text, focus: true };
  view.picker = null;
  if (previous !== undefined && previous !== seq) refreshMessage(previous);
  refreshMessage(seq);
}

function editorFor(message) {
  const view = ui.view;
  const area = el("textarea", { class: "edit-input", rows: "2", "aria-label": "Edit message text", maxlength: String(ui.chat.limits?.max_text_chars ?? 8000) });
  area.value = view.editing.draft;
  const save = el("button", { type: "submit", class: "primary small" }, "Save");
  const cancel = el("button", { type: "button", class: "small" }, "Cancel");
  const form = el("form", { class: "edit-form", "aria-label": "Edit message" }, area, el("p", { class: "edit-buttons" }, save, cancel, el("span", { class: "muted edit-hint" }, "Enter saves · Escape cancels")));
  const sizeIt = () => {
    area.style.height = "auto";
    area.style.height = Math.min(area.scrollHeight + 2, 240) + "px";
  };
  requestAnimationFrame(sizeIt);
  area.addEventListener("input", () => {
    view.editing.draft = area.value;
    save.disabled = !area.value.trim();
    sizeIt();
  });
  area.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      form.requestSubmit();
    } else if (event.key === "Escape") {
      event.preventDefault();
      event.stopPropagation();
      cancelEdit();
    }
  });
  cancel.addEventListener("click", cancelEdit);
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    saveEdit(message.seq, area.value);
  });
  return form;
}

function cancelEdit() {
  const view = ui.view;
  const seq = view?.editing?.seq;
  if (seq === undefined) return;
  view.editing = null;
  refreshMessage(seq);
  focusComposer();
}

/** Back to the message box once an inline edit is done (unless the session is closed). */
function focusComposer() {
  const input = $("message-input");
  if (!input.disabled) input.focus();
}

async function saveEdit(seq, text) {
  const view = ui.view;
  const message = view.messages.get(seq);
  view.editing = null;
  const shown = view.pendingEdits.get(seq)?.text ?? message.text;
  if (!text.trim() || text === shown) {
    refreshMessage(seq);
    focusComposer();
    return;
  }
  const token = {};
  view.pendingEdits.set(seq, { text, token });
  refreshMessage(seq);
  focusComposer();
  try {
    const edited = await ui.chat.editMessage(view.sessionId, seq, text, { mentions: mentionsIn(text) });
    if (view.pendingEdits.get(seq)?.token !== token) return;
    view.pendingEdits.delete(seq);
    if (!view.messages.get(seq)?.deleted_at) view.messages.set(seq, { ...edited, reactions: view.messages.get(seq)?.reactions ?? edited.reactions });
    refreshMessage(seq);
  } catch (error) {
    if (view.pendingEdits.get(seq)?.token !== token) return;
    view.pendingEdits.delete(seq);
    refreshMessage(seq);
    notify("The edit was not saved. " + describeError(error));
  }
}

// Deleting ---------------------------------------------------------------------------------------

function onDeleteClick(seq) {
  const view = ui.view;
  if (view.armedDelete?.seq !== seq) {
    const before = view.armedDelete?.seq;
    clearTimeout(view.armedDelete?.timer);
    view.armedDelete = {
      seq,
      timer: setTimeout(() => {
        if (view.armedDelete?.seq === seq) {
          view.armedDelete = null;
          refreshMessage(seq);
        }
      }, 4000),
    };
    if (before !== undefined) refreshMessage(before);
    refreshMessage(seq);
    view.bySeq.get(seq)?.querySelector('[data-focus-key="delete"]')?.focus();
    return;
  }
  clearTimeout(view.armedDelete.timer);
  view.armedDelete = null;
  deleteMessage(seq);
}

async function deleteMessage(seq) {
  const view = ui.view;
  view.pendingDeletes.add(seq);
  refreshMessage(seq);
  try {
    const tombstone = await ui.chat.deleteMessage(view.sessionId, seq);
    view.pendingDeletes.delete(seq);
    view.pendingEdits.delete(seq);
    if (view === ui.view) onMessageChanged(tombstone);
  } catch (error) {
    view.pendingDeletes.delete(seq);
    refreshMessage(seq);
    notify("The message was not deleted. " + describeError(error));
  }
}

function addMessages(messages, { live, own = false }) {
  const view = ui.view;
  const stick = live && (own || nearBottom());
  const list = $("messages");
  for (const message of messages) {
    if (view.bySeq.has(message.seq)) continue;
    view.messages.set(message.seq, message);
    let li;
    const pending = message.client_msg_id ? view.pending.get(message.client_msg_id) : null;
    if (pending && message.author === ui.user) {
      view.pending.delete(message.client_msg_id);
      li = messageItem(message);
      pending.li.replaceWith(li);
    } else {
      li = messageItem(message);
    }
    view.bySeq.set(message.seq, li);
    // In seq order, before any message still pending (those have no seq yet).
    let ref = null;
    for (let node = list.lastElementChild; node; node = node.previousElementSibling) {
      if (node === li) continue;
      if (node.dataset.seq && Number(node.dataset.seq) < message.seq) break;
      ref = node;
    }
    if (li.nextElementSibling !== ref || !li.isConnected) list.insertBefore(li, ref);
    regroup(li);
    if (li.nextElementSibling) regroup(li.nextElementSibling);
  }
  if (view.oldest === null && view.bySeq.size) view.oldest = Math.min(...view.bySeq.keys());
  if (!live) placeDivider(view);
  if (!view.hasMore) renderHistoryStatus();
  if (stick) scrollToBottom();
  else if (live && messages.length) $("jump").hidden = false;
}

/** Consecutive messages of one author within a few minutes share one header. */
function regroup(li) {
  if (!li.classList.contains("message")) return;
  const prev = li.previousElementSibling;
  const continued =
    prev && prev.dataset.author === li.dataset.author && Math.abs(Number(li.dataset.time) - Number(prev.dataset.time)) < GROUP_WITHIN_MS;
  li.classList.toggle("continued", Boolean(continued));
}

// Sending ------------------------------------------------------------------------------------

const PENDING_TEXT = {
  sending: "Sending…",
  queued: "Waiting for the connection…",
};

function setPendingStatus(pending, status, error = null) {
  pending.status = status;
  pending.li.dataset.status = status;
  const line = pending.li.querySelector(".message-state");
  line.replaceChildren();
  if (status === "failed") {
    const retryable = error && (error.temporary || ["timeout", "connection_lost", "rate_limited", "unavailable"].includes(error.code));
    const retry = el("button", { type: "button", class: "link-button" }, "Retry");
    const edit = el("button", { type: "button", class: "link-button" }, "Edit");
    const discard = el("button", { type: "button", class: "link-button" }, "Discard");
    retry.addEventListener("click", () => sendPending(pending));
    edit.addEventListener("click", () => {
      const input = $("message-input");
      input.value = pending.text + (input.value ? "\n" + input.value : "");
      discardPending(pending);
      autosize();
      updateCharCount();
      input.focus();
    });
    discard.addEventListener("click", () => discardPending(pending));
    line.append(el("span", { class: "error-text", role: "alert" }, "Not sent. " + describeError(error)));
    for (const button of retryable ? [retry, edit, discard] : [edit, discard]) line.append(" ", button);
  } else {
    line.textContent = PENDING_TEXT[status] ?? "";
  }
}

function discardPending(pending) {
  pending.li.remove();
  ui.view?.pending.delete(pending.clientMsgId);
}

function sendText(text) {
  const view = ui.view;
  const clientMsgId = randomId();
  const mentions = mentionsIn(text);
  const li = el(
    "li",
    { class: "message pending", "data-status": "sending", "data-own": "true", "data-author": ui.user, "data-client-msg-id": clientMsgId, "data-time": Date.now() },
    avatar(ui.user),
    el("div", { class: "message-body" },
      el("p", { class: "message-meta" }, el("span", { class: "author" }, ui.user)),
      el("p", { class: "message-text" }, textWithMentions(text, mentions)),
      el("p", { class: "message-state", "aria-live": "polite" }),
    ),
  );
  const pending = { li, text, mentions, clientMsgId, sessionId: view.sessionId, status: "sending" };
  view.pending.set(clientMsgId, pending);
  $("messages").append(li);
  regroup(li);
  setPendingStatus(pending, ui.chat.connected ? "sending" : "queued");
  renderHistoryStatus();
  scrollToBottom();
  sendPending(pending);
}

async function sendPending(pending) {
  setPendingStatus(pending, ui.chat.connected ? "sending" : "queued");
  try {
    const options = { clientMsgId: pending.clientMsgId };
    if (pending.mentions.length) options.mentions = pending.mentions;
    const message = await ui.chat.send(pending.sessionId, pending.text, options);
    // Normally the subscription has shown it already (as our own message).
    if (ui.view?.sessionId === pending.sessionId && ui.view.pending.has(pending.clientMsgId)) addMessages([message], { live: true, own: true });
  } catch (error) {
    if (ui.view?.sessionId === pending.sessionId && ui.view.pending.get(pending.clientMsgId) === pending) setPendingStatus(pending, "failed", error);
    else notify(`A message was not sent: ${describeError(error)}`);
  }
}

// Mentions: @-completion from the people around, and the names a text mentions ---------------

/** People we could mention: who is here, who wrote in the open session, who started a session. */
function mentionCandidates() {
  const names = new Set(ui.presence);
  for (const message of ui.view?.messages.values() ?? []) names.add(message.author);
  for (const item of ui.sessions.values()) names.add(item.session.created_by);
  names.delete(ui.user);
  return [...names].filter(Boolean);
}

/**
 * The user names `text` mentions: `@name` at the start or after a space, for the
 * people we know (longest first, so names with spaces work), else the word after
 * the `@` (trailing punctuation dropped). Ourselves left out; at most 20.
 */
function mentionsIn(text) {
  const known = mentionCandidates().sort((a, b) => b.length - a.length);
  const found = [];
  for (const match of text.matchAll(/(^|[\s(\[{"'“‘])@/gu)) {
    const start = match.index + match[0].length;
    let name = known.find((n) => text.startsWith(n, start) && !/[\p{L}\p{N}_-]/u.test(text[start + n.length] ?? ""));
    if (!name) {
      const word = /^[^\s@]+/u.exec(text.slice(start))?.[0]?.replace(/[.,;:!?)\]}'"”’…]+$/u, "");
      if (word && validName(word)) name = word;
    }
    if (name && name !== ui.user && !found.includes(name)) found.push(name);
    if (found.length >= MAX_MENTIONS) break;
  }
  return found;
}

function updateMentions() {
  const input = $("message-input");
  const caret = input.selectionStart;
  if (caret !== input.selectionEnd || input.disabled) return closeMentions();
  const before = input.value.slice(0, caret);
  const match = /(^|[\s(\[{"'“‘])@([^\s@]{0,64})$/u.exec(before);
  if (!match) return closeMentions();
  const query = match[2];
  const lower = query.toLocaleLowerCase();
  const options = mentionCandidates()
    .filter((name) => name.toLocaleLowerCase().startsWith(lower))
    .sort((a, b) => (ui.presence.includes(b) - ui.presence.includes(a)) || a.localeCompare(b))
    .slice(0, 8);
  if (!options.length) return closeMentions();
  const active = ui.mention && options.includes(ui.mention.options[ui.mention.active]) ? options.indexOf(ui.mention.options[ui.mention.active]) : 0;
  ui.mention = { start: caret - query.length - 1, query, options, active };
  renderMentions();
}

function renderMentions() {
  const list = $("mention-list");
  const input = $("message-input");
  const state = ui.mention;
  if (!state) {
    list.hidden = true;
    list.replaceChildren();
    input.removeAttribute("aria-activedescendant");
    return;
  }
  list.replaceChildren(
    ...state.options.map((name, index) => {
      const option = el(
        "li",
        { role: "option", id: `mention-option-${index}`, class: "mention-option", "data-user": name, "aria-selected": index === state.active ? "true" : "false" },
        avatar(name, "small"),
        el("span", { class: "mention-name" }, name),
        ui.presence.includes(name) ? el("span", { class: "muted here" }, "here now") : null,
      );
      option.addEventListener("mousedown", (event) => {
        event.preventDefault(); // keep the focus in the message box
        pickMention(index);
      });
      return option;
    }),
  );
  list.hidden = false;
  input.setAttribute("aria-activedescendant", `mention-option-${state.active}`);
}

function closeMentions() {
  if (!ui.mention && $("mention-list").hidden) return;
  ui.mention = null;
  renderMentions();
}

function pickMention(index = ui.mention?.active ?? 0) {
  const state = ui.mention;
  if (!state) return;
  const name = state.options[index];
  const input = $("message-input");
  const end = state.start + 1 + state.query.length;
  const after = input.value.slice(end);
  const insert = `@${name}` + (after.startsWith(" ") ? "" : " ");
  input.value = input.value.slice(0, state.start) + insert + after;
  const caret = state.start + insert.length;
  input.setSelectionRange(caret, caret);
  ui.mention = null;
  renderMentions();
  autosize();
  updateCharCount();
  input.focus();
}

/** Keys for the completion list; true if the key was taken. */
function mentionKey(event) {
  const state = ui.mention;
  if (!state) return false;
  if (event.key === "ArrowDown" || event.key === "ArrowUp") {
    const step = event.key === "ArrowDown" ? 1 : -1;
    state.active = (state.active + step + state.options.length) % state.options.length;
    renderMentions();
    return true;
  }
  if ((event.key === "Enter" && !event.shiftKey) || event.key === "Tab") {
    pickMention();
    return true;
  }
  if (event.key === "Escape") {
    closeMentions();
    return true;
  }
  return false;
}

// Composer -------------------------------------------------------------------------------------

function autosize() {
  const input = $("message-input");
  input.style.height = "auto";
  input.style.height = Math.min(input.scrollHeight, 200) + "px";
}

function updateCharCount() {
  const length = $("message-input").value.length;
  const limit = ui.chat?.limits?.max_text_chars ?? 8000;
  const counter = $("char-count");
  counter.textContent = length > limit * 0.9 ? `${length.toLocaleString("en")} / ${limit.toLocaleString("en")}` : "";
  counter.dataset.over = length > limit ? "true" : "false";
}

function submitComposer() {
  const input = $("message-input");
  const text = input.value;
  if (!ui.view || !text.trim() || input.disabled) return;
  input.value = "";
  closeMentions();
  autosize();
  updateCharCount();
  sendText(text);
}

function onComposerInput() {
  autosize();
  updateCharCount();
  updateMentions();
  const now = Date.now();
  if (ui.view && $("message-input").value.trim() && now - ui.lastTypingSent > TYPING_SEND_EVERY_MS) {
    const session = currentSession();
    if (session && !session.closed && ui.chat.typing(ui.view.sessionId)) ui.lastTypingSent = now;
  }
}

// Close a session: the button asks once more before it acts.
let closeArmed = null;

function resetCloseButton() {
  clearTimeout(closeArmed);
  closeArmed = null;
  const button = $("close-session");
  button.textContent = "Close session";
  button.classList.remove("danger");
}

async function onCloseSession() {
  const button = $("close-session");
  if (!closeArmed) {
    button.textContent = "Confirm close";
    button.classList.add("danger");
    closeArmed = setTimeout(resetCloseButton, 4000);
    return;
  }
  resetCloseButton();
  const sessionId = ui.view.sessionId;
  try {
    await ui.chat.closeSession(sessionId);
  } catch (error) {
    if (error.code !== "conflict") notify(describeError(error));
  }
}

async function onReopenSession() {
  const button = $("reopen-session");
  const sessionId = ui.view.sessionId;
  button.disabled = true;
  try {
    await ui.chat.reopenSession(sessionId);
    if (ui.view?.sessionId === sessionId) $("message-input").focus();
  } catch (error) {
    if (error.code !== "conflict") notify("The session was not reopened. " + describeError(error));
  } finally {
    button.disabled = false;
  }
}

// Wiring ------------------------------------------------------------------------------------

function wireEvents() {
  $("join-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const name = $("join-name").value.trim();
    const doc = $("join-doc").value.trim();
    const section = $("join-section").value.trim();
    const problem = checkPlace(name, doc, section);
    $("join-error").hidden = !problem;
    $("join-error").textContent = problem ?? "";
    if (!problem) start(name, doc, section);
  });

  $("place-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const name = $("place-name").value.trim();
    const doc = $("place-doc").value.trim();
    const section = $("place-section").value.trim();
    const problem = checkPlace(name, doc, section);
    $("place-error").hidden = !problem;
    $("place-error").textContent = problem ?? "";
    if (problem) return;
    $("place").open = false;
    if (name !== ui.user) start(name, doc, section);
    else if (doc !== ui.doc || section !== ui.section) openSection(doc, section, null);
  });

  $("new-session").addEventListener("submit", async (event) => {
    event.preventDefault();
    const input = $("new-session-title");
    const title = input.value.trim();
    const button = event.submitter ?? $("new-session").querySelector("button");
    button.disabled = true;
    const gen = ui.sectionGen;
    try {
      const session = await ui.chat.createSession(ui.doc, ui.section, { title: title || null });
      input.value = "";
      if (gen === ui.sectionGen) {
        if (!ui.sessions.has(session.session_id)) onSessionCreated(ui.sub?.sessions.get(session.session_id) ?? session);
        openSession(session.session_id);
      }
    } catch (error) {
      notify("The session was not created. " + describeError(error));
    } finally {
      button.disabled = false;
    }
  });

  const input = $("message-input");
  input.addEventListener("keydown", (event) => {
    if (!event.isComposing && mentionKey(event)) {
      event.preventDefault();
      return;
    }
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing && !event.altKey && !event.ctrlKey && !event.metaKey) {
      event.preventDefault();
      submitComposer();
    } else if (event.key === "Escape" && document.body.dataset.view === "chat" && !input.value) {
      $("back").click();
    }
  });
  input.addEventListener("input", onComposerInput);
  input.addEventListener("click", updateMentions);
  input.addEventListener("blur", () => setTimeout(() => document.activeElement !== input && closeMentions(), 0));
  $("composer").addEventListener("submit", (event) => {
    event.preventDefault();
    submitComposer();
    input.focus();
  });

  $("scroller").addEventListener("scroll", () => {
    if ($("scroller").scrollTop < 120) loadOlder();
    if (nearBottom()) $("jump").hidden = true;
  }, { passive: true });
  $("jump").addEventListener("click", () => {
    scrollToBottom();
    input.focus();
  });
  $("back").addEventListener("click", () => {
    document.body.dataset.view = "list";
    const current = ui.view && $("sessions").querySelector(`[aria-current="true"]`);
    (current ?? $("new-session-title")).focus();
  });
  $("moved-go").addEventListener("click", () => {
    const moved = ui.view?.moved;
    if (moved) openSection(moved.document_id, moved.section_id, moved.session_id);
  });
  $("close-session").addEventListener("click", onCloseSession);
  $("reopen-session").addEventListener("click", onReopenSession);
  $("retry-now").addEventListener("click", () => ui.chat?.reconnectNow());

  // A reaction picker closes on a click elsewhere.
  document.addEventListener("click", (event) => {
    if (ui.view?.picker != null && !event.target.closest?.(".message-actions")) closePicker();
  });
  // Reading: when the page comes back into view, what is open there has been read.
  document.addEventListener("visibilitychange", () => {
    if (!ui.chat) return;
    renderSessions();
    markReadSoon();
  });
  window.addEventListener("focus", () => ui.view && markReadSoon());
}

main();
