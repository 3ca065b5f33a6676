// app.js: the sectionchat page, built on sectionchat.js.
//
// Rule kept here: user data (messages, titles, names, ids) only ever reaches
// the DOM as text (textContent, attributes via setAttribute); never as HTML.
// The page's state lives in `ui`; the connection's in the SectionChat client.

import { SectionChat, describeError, randomId } from "./sectionchat.js";

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
  for (const child of children) {
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

const ui = {
  chat: null,
  sub: null,
  user: null,
  doc: null,
  section: null,
  sectionGen: 0, // bumps when the section changes: late replies for the old one are dropped
  sessions: new Map(), // session_id -> {session, activity, last, unread, li, button}
  view: null, // the open session's view, see openSession()
  typing: new Map(), // session_id -> Map(user -> timer)
  lastTypingSent: 0,
  lastFetchers: null,
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

// Notices ------------------------------------------------------------------------

function notify(text, { kind = "error", timeout = 8000 } = {}) {
  const close = el("button", { type: "button", class: "icon-button", "aria-label": "Dismiss" }, "×");
  const notice = el("div", { class: `notice ${kind}`, role: kind === "error" ? "alert" : "status" }, el("p", {}, text), close);
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
  updateComposer();
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
  }
  showUser(name);
  if (!ui.chat) {
    const options = name ? { name } : {};
    if (params.get("token")) options.token = params.get("token");
    const chat = new SectionChat(undefined, options);
    chat.on("state", showState);
    chat.on("error", (error) => notify(describeError(error)));
    ui.chat = chat;
    showState({ state: "connecting" });
    chat.connect().catch(() => {});
  }
  openSection(doc, section, sessionId);
}

// The section --------------------------------------------------------------------------

async function openSection(doc, section, sessionId) {
  if (ui.sub) ui.sub.unsubscribe();
  ui.sub = null;
  ui.doc = doc;
  ui.section = section;
  const gen = ++ui.sectionGen;
  ui.sessions = new Map();
  ui.typing.clear();
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
  try {
    const sub = await ui.chat.subscribe(doc, section, {
      onSnapshot: (snapshot) => gen === ui.sectionGen && onSnapshot(snapshot),
      onSessionCreated: (session, how) => gen === ui.sectionGen && onSessionCreated(session, how),
      onMessage: (message, how) => gen === ui.sectionGen && onMessage(message, how),
      onSessionClosed: (session) => gen === ui.sectionGen && onSessionClosed(session),
      onPresence: ({ present }) => gen === ui.sectionGen && renderPresence(present),
      onTyping: (typing) => gen === ui.sectionGen && onTyping(typing),
      onError: (error) => notify(describeError(error)),
    });
    if (gen !== ui.sectionGen) return;
    ui.sub = sub;
    if (sessionId && ui.sessions.has(sessionId)) openSession(sessionId, { focus: false });
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
    if (old && old.session.last_seq === session.last_seq) Object.assign(item, { last: old.last, activity: old.activity, unread: old.unread });
    ui.sessions.set(session.session_id, item);
  }
  renderSessions();
  renderPresence(presence);
  fetchLastMessages();
  if (reconnect && ui.view) {
    if (ui.sessions.has(ui.view.sessionId)) reloadView();
    else {
      notify("The open session no longer exists on the server.", { kind: "info" });
      closeSessionView();
    }
  }
}

/** Sessions list: learn each session's latest message (preview + activity time), gently paced. */
async function fetchLastMessages() {
  const gen = ui.sectionGen;
  const token = (ui.lastFetchers = {});
  const wanted = [...ui.sessions.values()].filter((item) => item.session.last_seq > 0 && !item.last);
  wanted.sort((a, b) => b.activity - a.activity);
  const perSecond = Math.max(1, Math.floor((ui.chat.limits?.messages_per_s || 20) / 4));
  for (const item of wanted) {
    if (gen !== ui.sectionGen || token !== ui.lastFetchers) return;
    if (item.last) continue;
    try {
      const page = await ui.chat.history(item.session.session_id, { limit: 1 });
      const message = page.messages.at(-1);
      if (message && (!item.last || item.last.seq < message.seq)) noteLast(item, message);
      renderSessions();
    } catch {
      /* a preview is a nicety; the list still works without it */
    }
    await new Promise((resolve) => setTimeout(resolve, 1000 / perSecond));
  }
}

function sessionItem(session) {
  return { session, activity: Date.parse(session.created_at) || 0, last: null, unread: 0, li: null };
}

function noteLast(item, message) {
  item.last = message;
  item.activity = Math.max(item.activity, Date.parse(message.sent_at) || 0);
}

function onSessionCreated(session) {
  if (ui.sessions.has(session.session_id)) return;
  ui.sessions.set(session.session_id, sessionItem(session));
  renderSessions();
}

function onSessionClosed(session) {
  const item = ui.sessions.get(session.session_id);
  if (item) item.session = { ...item.session, closed: true };
  renderSessions();
  if (ui.view?.sessionId === session.session_id) renderSessionHead();
}

function onMessage(message, { own }) {
  const item = ui.sessions.get(message.session_id);
  if (item) {
    item.session = { ...item.session, last_seq: Math.max(item.session.last_seq, message.seq) };
    if (!item.last || item.last.seq < message.seq) noteLast(item, message);
    if (!own && ui.view?.sessionId !== message.session_id) item.unread += 1;
    renderSessions();
  }
  stopTyping(message.session_id, message.author);
  if (ui.view?.sessionId === message.session_id) addMessages([message], { live: true, own });
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
    (a, b) => b.activity - a.activity || b.session.created_at.localeCompare(a.session.created_at),
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

function fillSessionItem(item) {
  const { session, last, unread } = item;
  const open = ui.view?.sessionId === session.session_id;
  const when = last ? last.sent_at : session.created_at;
  const preview = last ? `${last.author === ui.user ? "You" : last.author}: ${last.text}` : `Started by ${session.created_by}`;
  const button = el(
    "button",
    {
      type: "button",
      class: "session",
      "data-session-id": session.session_id,
      "data-closed": session.closed ? "true" : null,
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

// Presence ---------------------------------------------------------------------------------

function renderPresence(users) {
  const sorted = [...new Set(users)].sort((a, b) => (a === ui.user ? -1 : b === ui.user ? 1 : a.localeCompare(b)));
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

// The open session ---------------------------------------------------------------------------

function openSession(sessionId, { focus = true } = {}) {
  const item = ui.sessions.get(sessionId);
  if (!item) return;
  if (ui.view?.sessionId !== sessionId) {
    ui.view = {
      sessionId,
      gen: (ui.view?.gen ?? 0) + 1,
      bySeq: new Map(), // seq -> li
      pending: new Map(), // client_msg_id -> {li, text, status}
      oldest: null,
      hasMore: false,
      loaded: false,
      loadingOlder: false,
    };
    $("messages").replaceChildren();
    $("history-status").textContent = "Loading messages…";
    $("jump").hidden = true;
    $("message-input").value = "";
    updateCharCount();
    loadLatest(ui.view);
  }
  item.unread = 0;
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
  $("session-view").hidden = true;
  $("no-session").hidden = false;
  document.body.dataset.view = "list";
  if (ui.doc) writeUrl();
}

function renderSessionHead() {
  const item = ui.sessions.get(ui.view.sessionId);
  const session = item.session;
  $("session-title").textContent = sessionTitle(session);
  $("session-meta").textContent = `Started by ${session.created_by} · ${fullTime(session.created_at)}`;
  $("session-view").dataset.closed = session.closed ? "true" : "false";
  $("closed-note").hidden = !session.closed;
  $("close-session").hidden = session.closed;
  resetCloseButton();
  updateComposer();
}

function updateComposer() {
  const session = ui.view && ui.sessions.get(ui.view.sessionId)?.session;
  const closed = !session || session.closed;
  $("message-input").disabled = closed;
  $("send").disabled = closed;
  $("message-input").placeholder = session ? (closed ? "This session is closed" : `Message “${sessionTitle(session)}”`) : "";
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
    scrollToBottom();
    fillViewport(view);
  } catch (error) {
    if (view !== ui.view) return;
    $("history-status").textContent = "Messages could not be loaded. " + describeError(error);
  }
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
    }
    view.hasMore = page.has_more;
    view.oldest = page.messages.length ? page.messages[0].seq : null;
    addMessages(page.messages, { live: false });
    renderHistoryStatus();
    if (wasAtBottom) scrollToBottom();
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

function messageItem(message) {
  const sentAt = new Date(message.sent_at);
  const li = el(
    "li",
    {
      class: "message",
      "data-seq": message.seq,
      "data-author": message.author,
      "data-status": "sent",
      "data-own": message.author === ui.user ? "true" : null,
      "data-time": sentAt.getTime() || 0,
    },
    avatar(message.author),
    el("div", { class: "message-body" },
      el("p", { class: "message-meta" },
        el("span", { class: "author" }, message.author),
        " ",
        el("time", { datetime: message.sent_at, title: fullTime(message.sent_at) }, clockTime(message.sent_at)),
      ),
      el("p", { class: "message-text" }, message.text),
    ),
  );
  return li;
}

function addMessages(messages, { live, own = false }) {
  const view = ui.view;
  const stick = live && (own || nearBottom());
  const list = $("messages");
  for (const message of messages) {
    if (view.bySeq.has(message.seq)) continue;
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
  if (!view.hasMore) renderHistoryStatus();
  if (stick) scrollToBottom();
  else if (live && messages.length) $("jump").hidden = false;
}

/** Consecutive messages of one author within a few minutes share one header. */
function regroup(li) {
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
  const li = el(
    "li",
    { class: "message pending", "data-status": "sending", "data-own": "true", "data-author": ui.user, "data-client-msg-id": clientMsgId, "data-time": Date.now() },
    avatar(ui.user),
    el("div", { class: "message-body" },
      el("p", { class: "message-meta" }, el("span", { class: "author" }, ui.user)),
      el("p", { class: "message-text" }, text),
      el("p", { class: "message-state", "aria-live": "polite" }),
    ),
  );
  const pending = { li, text, clientMsgId, sessionId: view.sessionId, status: "sending" };
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
    const message = await ui.chat.send(pending.sessionId, pending.text, { clientMsgId: pending.clientMsgId });
    // Normally the subscription has shown it already (as our own message).
    if (ui.view?.sessionId === pending.sessionId && ui.view.pending.has(pending.clientMsgId)) addMessages([message], { live: true, own: true });
  } catch (error) {
    if (ui.view?.sessionId === pending.sessionId && ui.view.pending.get(pending.clientMsgId) === pending) setPendingStatus(pending, "failed", error);
    else notify(`A message was not sent: ${describeError(error)}`);
  }
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
  autosize();
  updateCharCount();
  sendText(text);
}

function onComposerInput() {
  autosize();
  updateCharCount();
  const now = Date.now();
  if (ui.view && $("message-input").value.trim() && now - ui.lastTypingSent > TYPING_SEND_EVERY_MS) {
    const session = ui.sessions.get(ui.view.sessionId)?.session;
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
        if (!ui.sessions.has(session.session_id)) onSessionCreated(session, { own: true });
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
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing && !event.altKey && !event.ctrlKey && !event.metaKey) {
      event.preventDefault();
      submitComposer();
    } else if (event.key === "Escape" && document.body.dataset.view === "chat" && !input.value) {
      $("back").click();
    }
  });
  input.addEventListener("input", onComposerInput);
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
  $("close-session").addEventListener("click", onCloseSession);
  $("retry-now").addEventListener("click", () => ui.chat?.reconnectNow());
}

main();
