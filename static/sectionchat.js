// sectionchat.js: a client for the sectionchat wire protocol (version 1, revision 1.1).
//
// An ES module with no dependencies, for the browser page and for editors that
// embed section chats. It owns one WebSocket and keeps it alive: requests are
// promises, section subscriptions deliver events to callbacks, and after a
// drop it reconnects (exponential backoff with jitter), resubscribes with
// `since_offset` + `epoch`, and replays what was missed, so callbacks see each
// stored event once and in order. Messages are sent with a `client_msg_id`, so
// one typed while offline (or in flight when the socket dropped) is delivered
// exactly once after the reconnect. The writes of revision 1.1 (edits, deletes,
// reactions with an explicit `on`, read markers, session updates) are
// idempotent on the server, so they wait in the same outbox and are resent the
// same way; several of one kind queued for the same target while offline
// collapse into the last one (one edit, one reaction state, the highest read
// marker), so what goes out when the connection is back is sent once.
// Moves (`moveSessions`, when an editor renames, merges or deletes a section)
// go through the same outbox; a `session_moved` event, which comes in both
// sections' streams, takes the session out of the source's subscription and
// into the target's.
//
//   import { SectionChat } from "/static/sectionchat.js";
//   const chat = new SectionChat(undefined, { name: "alice" });
//   const sub = await chat.subscribe("spec-7", "intro", { onMessage(m) { ... } });
//   await chat.send(sessionId, "Hello");
//
// Types for editors and bundlers: sectionchat.d.ts, next to this file.

export const PROTOCOL = 1;
export const SUBPROTOCOL = "sectionchat.v1";

/** Connection states, in the order a client usually goes through them. */
export const STATES = Object.freeze(["idle", "connecting", "connected", "reconnecting", "offline", "closed"]);

const DEFAULTS = Object.freeze({
  name: null, // the user name in open mode (`?name=`)
  token: null, // a JWT in token mode (`?token=`)
  initialDelay: 250, // ms before the first reconnect attempt (before jitter)
  maxDelay: 5000, // ms, the cap of the exponential backoff
  policyDelay: 15000, // ms to wait after a close with 1008 (policy violation)
  offlineAfter: 15000, // ms of failed attempts before the state says "offline"
  connectTimeout: 10000, // ms for the socket to open and the welcome to arrive
  requestTimeout: 15000, // ms for a reply, counted from when the request is sent
  sendTimeout: 30000, // ms for a message_ack (0: wait as long as it takes)
  pingInterval: 25000, // ms of silence before we ping (0: never)
  temporaryRetries: 3, // resends of a retry-safe request refused with a temporary error
  WebSocket: globalThis.WebSocket,
});

// Requests that may be sent again if the connection dropped before the reply:
// reads, and writes that carry their own idempotency key (added by the helpers).
// The 1.1 writes are retry-safe by their nature: an edit sets a text, a delete
// leaves a tombstone, `react` with an explicit `on` sets a state, `mark_read`
// only moves forward, `update_session` sets fields; a repeat changes nothing.
// `move_sessions` too: a named session already in the target counts as moved, so a
// resent move gets the same reply (without `session_ids`, a resend moves what is
// in the source then: nothing more, unless someone created a session there since).
// Not `close_session`/`reopen_session`: a repeat of one that landed is `conflict`.
const RETRY_SAFE = new Set([
  "get_session",
  "list_sessions",
  "history",
  "ping",
  "send_message",
  "create_session",
  "edit_message",
  "delete_message",
  "react",
  "mark_read",
  "update_session",
  "move_sessions",
  "watch_document",
  "unwatch_document",
]);

/** Reactions the page offers in its picker (any string of 1–32 characters is valid). */
export const COMMON_REACTIONS = Object.freeze(["👍", "❤️", "😄", "🎉", "😮", "👀"]);

// Errors, in words a user understands. The server's `message` adds detail.
const PLAIN = {
  too_large: "That is too long to send.",
  rate_limited: "You are sending too fast. Wait a moment, then try again.",
  forbidden: "You do not have access to this document.",
  not_found: "That session does not exist (it may have been removed).",
  conflict: "This session is closed; it no longer takes new messages.",
  unavailable: "The server could not save that just now. Try again in a moment.",
  bad_request: "The server could not accept that request.",
  unknown_type: "The server does not understand this request; it may be running another version.",
  internal: "Something went wrong on the server.",
  connection_lost: "The connection dropped before the server answered.",
  timeout: "The server did not answer in time.",
  closed: "The chat connection is closed.",
};

/** An error reply from the server (or a local failure with the same shape). */
export class ChatError extends Error {
  constructor(code, message, { temporary = false, request = null } = {}) {
    super(message || code);
    this.name = "ChatError";
    this.code = code;
    this.temporary = temporary;
    this.request = request; // the request frame that failed, if any
  }
}

/** A sentence for a user about `error` (a ChatError or anything thrown). */
export function describeError(error) {
  if (!(error instanceof ChatError)) return "Something went wrong: " + String(error?.message ?? error);
  const plain = PLAIN[error.code] ?? `The server refused that (${error.code}).`;
  if (error.code === "conflict") {
    if (/deleted/.test(error.message)) return "That message has been deleted.";
    if (/not closed/.test(error.message)) return "This session is already open.";
  }
  if (error.code === "forbidden" && /author|creator/.test(error.message)) {
    return "Only its author (or a moderator) may change that.";
  }
  if (error.code === "too_large" && error.request?.type === "move_sessions") {
    return "That section has too many chats to move at once (more than 1,000). Move them in batches, naming their ids.";
  }
  if (error.code === "too_large" && /reaction/.test(error.message)) return "That message already has as many different reactions as it can take.";
  if (error.code === "too_large") {
    const found = /(\d+) characters; the limit is (\d+)/.exec(error.message);
    if (found) {
      const n = (x) => Number(x).toLocaleString("en");
      return `That message is too long: ${n(found[1])} characters, and the limit is ${n(found[2])}. Shorten it or split it into parts.`;
    }
  }
  const detail = error.message && error.message !== error.code && !PLAIN[error.code]?.includes(error.message) ? error.message : "";
  const withDetail = ["too_large", "bad_request", "internal", "unknown_type", "rate_limited"].includes(error.code);
  return withDetail && detail ? `${plain} (${detail})` : plain;
}

/** A random UUID v4 (also where crypto.randomUUID is missing: plain http on a LAN). */
export function randomId() {
  const b = new Uint8Array(16);
  globalThis.crypto.getRandomValues(b);
  b[6] = (b[6] & 0x0f) | 0x40;
  b[8] = (b[8] & 0x3f) | 0x80;
  const h = Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
}

/** The WebSocket URL of the server that served the current page. */
export function defaultUrl() {
  const { protocol, host } = globalThis.location;
  return `${protocol === "https:" ? "wss" : "ws"}://${host}/ws`;
}

const sectionKey = (documentId, sectionId) => JSON.stringify([documentId, sectionId]);

/** Report a bug in a callback without breaking the client's own state. */
function rethrowLater(error) {
  setTimeout(() => {
    throw error;
  });
}

class Emitter {
  constructor() {
    this._listeners = new Map();
  }

  /** Listen to `type`; returns a function that stops listening. */
  on(type, listener) {
    let set = this._listeners.get(type);
    if (!set) this._listeners.set(type, (set = new Set()));
    set.add(listener);
    return () => set.delete(listener);
  }

  _emit(type, ...args) {
    for (const listener of [...(this._listeners.get(type) ?? [])]) {
      try {
        listener(...args);
      } catch (error) {
        rethrowLater(error);
      }
    }
  }
}

const HANDLER_NAMES = {
  onSnapshot: "snapshot",
  onSessionCreated: "session_created",
  onMessage: "message",
  onSessionClosed: "session_closed",
  onMessageEdited: "message_edited",
  onMessageDeleted: "message_deleted",
  onReaction: "reaction",
  onSessionUpdated: "session_updated",
  onSessionReopened: "session_reopened",
  onSessionMoved: "session_moved",
  onRead: "read",
  onUnread: "unread",
  onPresence: "presence",
  onTyping: "typing",
  onRecovered: "recovered",
  onDocumentDeleted: "document_deleted",
  onError: "error",
};

const WATCH_HANDLER_NAMES = {
  onDocument: "document",
  onSectionSummary: "section_summary",
  onDocumentDeleted: "document_deleted",
  onError: "error",
};

/** The later of two protocol timestamps (they sort as strings); null-safe. */
function later(a, b) {
  if (!a) return b ?? null;
  if (!b) return a;
  return b > a ? b : a;
}

/**
 * Apply a `reaction` event (or reply) to a Message in place; true if it changed.
 * Idempotent: applying the same event twice (a replay, a retried request) changes nothing.
 */
export function applyReaction(message, { reaction, user, on }) {
  if (!message || message.deleted_at) return false;
  const reactions = (message.reactions ??= {});
  const users = reactions[reaction] ?? [];
  const has = users.includes(user);
  if (on === false) {
    if (!has) return false;
    const left = users.filter((u) => u !== user);
    if (left.length) reactions[reaction] = left;
    else delete reactions[reaction];
    return true;
  }
  if (has) return false;
  reactions[reaction] = [...users, user];
  return true;
}

/** Whether `message` is a tombstone (deleted: text "", `deleted_at` set). */
export function isDeleted(message) {
  return Boolean(message?.deleted_at);
}

/**
 * One section a client follows. Its state (`sessions`, `presence`, `offset`,
 * `epoch`) is kept current across reconnects; listen with `on(type, fn)` or
 * the `on…` handlers given to `subscribe`.
 */
export class Subscription extends Emitter {
  constructor(chat, documentId, sectionId) {
    super();
    this.chat = chat;
    this.documentId = documentId;
    this.sectionId = sectionId;
    this.key = sectionKey(documentId, sectionId);
    this.sessions = new Map(); // session_id -> Session (last_seq, closed, title, last_activity_at kept current)
    this.presence = new Set(); // users viewing the section
    this.read = new Map(); // session_id -> our read marker (last seq read), revision 1.1
    this.unread = new Map(); // session_id -> our unread count, revision 1.1
    this.readState = false; // true once the server has sent read/unread (a 1.1 server)
    this.epoch = null;
    this.offset = 0;
    this.active = true;
    this.subscribed = false; // true between a `subscribed` reply and the next drop
    this.ready = new Promise((resolve, reject) => {
      this._resolveReady = resolve;
      this._rejectReady = reject;
    });
    this.ready.catch(() => {}); // the caller of subscribe() gets the rejection
  }

  /** Attach `{onMessage, onPresence, …}` handlers. */
  attach(handlers = {}) {
    for (const [name, type] of Object.entries(HANDLER_NAMES)) {
      if (typeof handlers[name] === "function") this.on(type, handlers[name]);
    }
    return this;
  }

  /** Sessions, newest first by creation (the server lists them oldest first). */
  get sessionList() {
    return [...this.sessions.values()].reverse();
  }

  /** Sessions, latest `last_activity_at` first (as `list_sessions` with `order: "activity"`). */
  get sessionsByActivity() {
    const at = (s) => s.last_activity_at ?? s.created_at;
    return [...this.sessions.values()].sort((a, b) => (at(a) < at(b) ? 1 : at(a) > at(b) ? -1 : a.session_id < b.session_id ? -1 : 1));
  }

  /** Our unread count in a session (0 when unknown). */
  unreadOf(sessionId) {
    return this.unread.get(sessionId) ?? 0;
  }

  /** Our read marker in a session: the last seq we have read (0 when never marked). */
  readOf(sessionId) {
    return this.read.get(sessionId) ?? 0;
  }

  unsubscribe() {
    return this.chat.unsubscribe(this);
  }
}

/**
 * A document a client watches (`watch_document`): the summary of each of its
 * sections, kept current by `section_summary` events and re-watched after a
 * reconnect. Listen with `on(type, fn)` or the handlers given to `watchDocument`.
 */
export class DocumentWatch extends Emitter {
  constructor(chat, documentId) {
    super();
    this.chat = chat;
    this.documentId = documentId;
    this.sections = new Map(); // section_id -> SectionSummary, in the document's section order
    this.active = true;
    this.watching = false; // true between a `document` reply and the next drop
    this._answered = false; // a `document` reply has come (later ones are after a reconnect)
    this.ready = new Promise((resolve, reject) => {
      this._resolveReady = resolve;
      this._rejectReady = reject;
    });
    this.ready.catch(() => {});
  }

  attach(handlers = {}) {
    for (const [name, type] of Object.entries(WATCH_HANDLER_NAMES)) {
      if (typeof handlers[name] === "function") this.on(type, handlers[name]);
    }
    return this;
  }

  /** The section summaries, in the document's section order. */
  get sectionList() {
    return [...this.sections.values()];
  }

  unwatch() {
    return this.chat.unwatchDocument(this.documentId);
  }
}

/** A connection to one sectionchat server, kept alive until close(). */
export class SectionChat extends Emitter {
  constructor(url = defaultUrl(), options = {}) {
    super();
    this.url = url;
    this.options = { ...DEFAULTS, ...options };
    this.state = "idle";
    this.welcome = null;
    this.user = null;
    this.limits = null;
    this.roles = []; // from the welcome (1.1 server): ["moderator"] for a moderator
    this.nextRetryAt = null; // when a reconnect attempt is due (ms since epoch)
    this._entries = new Map(); // request id -> entry, waiting or in flight, in id order
    this._fireAndForget = new Map(); // request id -> {type, at} (typing: no reply unless an error)
    this._subs = new Map(); // sectionKey -> Subscription
    this._sessionIndex = new Map(); // session_id -> Subscription
    this._watches = new Map(); // document_id -> DocumentWatch
    this._lastId = 0;
    this._socket = null;
    this._welcomed = false;
    this._retryTimer = null;
    this._openTimer = null;
    this._pingTimer = null;
    this._attempt = 0;
    this._downSince = null;
    this._lastFrameAt = 0;
    this._waiters = [];
    this._budget = null; // {rate, capacity, tokens, at}: our side of the server's request rate
    this._pumpTimer = null;
    this._onOnline = () => {
      if (this.state === "reconnecting" || this.state === "offline") this.reconnectNow();
    };
    this._onOffline = () => {
      if (!this._welcomed && this.state !== "closed" && this.state !== "idle") this._setState("offline", { reason: "no network" });
    };
  }

  // Connection ---------------------------------------------------------------

  /** Open the connection (once); resolves with the `welcome` frame when connected. */
  connect() {
    if (this.state === "closed") return Promise.reject(new ChatError("closed", PLAIN.closed));
    if (this.state === "connected") return Promise.resolve(this.welcome);
    const connected = new Promise((resolve, reject) => this._waiters.push({ resolve, reject }));
    if (this.state === "idle") {
      globalThis.addEventListener?.("online", this._onOnline);
      globalThis.addEventListener?.("offline", this._onOffline);
      this._setState("connecting", {});
      this._open();
    }
    return connected;
  }

  /** Stop for good: the socket closes, pending requests fail with `closed`. */
  close() {
    if (this.state === "closed") return;
    this._setState("closed", {});
    clearTimeout(this._retryTimer);
    clearTimeout(this._openTimer);
    clearInterval(this._pingTimer);
    clearTimeout(this._pumpTimer);
    globalThis.removeEventListener?.("online", this._onOnline);
    globalThis.removeEventListener?.("offline", this._onOffline);
    const socket = this._socket;
    this._socket = null;
    this._welcomed = false;
    if (socket) {
      this._detach(socket);
      try {
        socket.close(1000, "client closed");
      } catch {
        /* already closing */
      }
    }
    const error = new ChatError("closed", PLAIN.closed);
    for (const sub of this._subs.values()) {
      sub.active = false;
      clearTimeout(sub._unreadTimer);
      sub._rejectReady(error);
    }
    for (const watch of this._watches.values()) {
      watch.active = false;
      watch._rejectReady(error);
    }
    for (const entry of this._entries.values()) this._finish(entry, null, error);
    for (const waiter of this._waiters.splice(0)) waiter.reject(error);
  }

  /** Skip the rest of the backoff wait and try to connect now. */
  reconnectNow() {
    if (this.state === "closed" || this.state === "connected" || this._socket) return;
    clearTimeout(this._retryTimer);
    this._open();
  }

  get connected() {
    return this.state === "connected";
  }

  /** Whether the welcome named us a moderator (token mode, `roles` claim). */
  get isModerator() {
    return this.roles.includes("moderator");
  }

  _socketUrl() {
    const url = new URL(this.url, globalThis.location?.href);
    if (this.options.name != null) url.searchParams.set("name", this.options.name);
    if (this.options.token != null) url.searchParams.set("token", this.options.token);
    return url.href;
  }

  _open() {
    this._retryTimer = null;
    this.nextRetryAt = null;
    let socket;
    try {
      socket = new this.options.WebSocket(this._socketUrl(), [SUBPROTOCOL]);
    } catch (error) {
      // A malformed URL: no attempt can ever succeed.
      this._setState("closed", { reason: String(error.message ?? error) });
      for (const waiter of this._waiters.splice(0)) waiter.reject(error);
      return;
    }
    this._socket = socket;
    this._welcomed = false;
    socket.onmessage = (event) => this._onData(socket, event.data);
    socket.onclose = (event) => this._onSocketClosed(socket, event.code, event.reason);
    socket.onerror = () => {}; // a close event always follows
    this._openTimer = setTimeout(() => this._drop(socket, 4000, "no welcome in time"), this.options.connectTimeout);
  }

  _detach(socket) {
    socket.onmessage = socket.onclose = socket.onerror = null;
  }

  /** Give up on a socket that looks dead, without waiting for its close handshake. */
  _drop(socket, code, reason) {
    if (socket !== this._socket) return;
    this._detach(socket);
    try {
      socket.close(code, reason);
    } catch {
      /* already closing */
    }
    this._onSocketClosed(socket, code, reason);
  }

  _onSocketClosed(socket, code, reason) {
    if (socket !== this._socket) return;
    this._socket = null;
    const wasWelcomed = this._welcomed;
    this._welcomed = false;
    clearTimeout(this._openTimer);
    clearInterval(this._pingTimer);
    clearTimeout(this._pumpTimer);
    this._pumpTimer = null;
    for (const sub of this._subs.values()) sub.subscribed = false;
    for (const watch of this._watches.values()) watch.watching = false;
    // Requests in flight: resend the safe ones after the reconnect, fail the others.
    for (const entry of [...this._entries.values()]) {
      if (entry.internal) {
        clearTimeout(entry.timer);
        this._entries.delete(entry.id); // resubscribing after the reconnect covers it
        continue;
      }
      if (!entry.sent) continue;
      clearTimeout(entry.timer);
      entry.sent = false;
      if (!entry.retry) {
        this._finish(entry, null, new ChatError("connection_lost", PLAIN.connection_lost, { temporary: true, request: entry.frame }));
      }
    }
    if (this.state === "closed") return;
    if (wasWelcomed) this._emit("disconnected", { code, reason });
    this._scheduleReconnect(code, reason);
  }

  _scheduleReconnect(code, reason) {
    const { initialDelay, maxDelay, policyDelay, offlineAfter } = this.options;
    let base = Math.min(maxDelay, initialDelay * 2 ** Math.min(this._attempt, 30));
    if (code === 1008) base = Math.max(base, policyDelay); // "do not retry at once"
    const delay = Math.round(base / 2 + (Math.random() * base) / 2); // equal jitter
    this._attempt += 1;
    this._downSince ??= Date.now();
    const networkDown = globalThis.navigator?.onLine === false;
    const offline = networkDown || code === 1008 || Date.now() - this._downSince >= offlineAfter;
    this.nextRetryAt = Date.now() + delay;
    this._setState(offline ? "offline" : "reconnecting", { delay, attempt: this._attempt, code, reason });
    this._retryTimer = setTimeout(() => this._open(), delay);
  }

  _setState(state, detail) {
    this.state = state;
    this._emit("state", { state, ...detail });
  }

  _onData(socket, data) {
    if (socket !== this._socket) return;
    this._lastFrameAt = Date.now();
    let frame;
    try {
      frame = JSON.parse(data);
    } catch {
      this._emit("error", new ChatError("bad_frame", "The server sent a frame that is not JSON."));
      return;
    }
    if (frame === null || typeof frame !== "object") return;
    if (!this._welcomed) {
      if (frame.type === "welcome") this._onWelcome(frame);
      return;
    }
    if (frame.reply_to != null) this._onReply(frame);
    else this._onEvent(frame);
  }

  _onWelcome(frame) {
    clearTimeout(this._openTimer);
    this._welcomed = true;
    this.welcome = frame;
    this.user = frame.user;
    this.limits = frame.limits ?? null;
    this.roles = Array.isArray(frame.roles) ? frame.roles.filter((r) => typeof r === "string") : [];
    const recovering = this._attempt > 0 || this._downSince !== null;
    this._attempt = 0;
    this._downSince = null;
    this._setState("connected", { user: frame.user, reconnected: recovering });
    for (const waiter of this._waiters.splice(0)) waiter.resolve(frame);
    const rate = Number(this.limits?.messages_per_s) || 0;
    // A little under the server's limit (a bucket of one second's worth), so that
    // a burst of queued messages after a reconnect is paced, never refused.
    this._budget = rate > 0 ? { rate: rate * 0.9, capacity: Math.max(1, Math.floor(rate * 0.8)), tokens: 0, at: Date.now() } : null;
    if (this._budget) this._budget.tokens = this._budget.capacity;
    // Subscriptions (and watches) first, then what waited: the server answers in order.
    for (const sub of this._subs.values()) this._sendSubscribe(sub);
    for (const watch of this._watches.values()) this._sendWatch(watch);
    this._pump();
    clearInterval(this._pingTimer);
    if (this.options.pingInterval > 0) {
      this._pingTimer = setInterval(() => this._keepAlive(), Math.max(1000, this.options.pingInterval / 2));
    }
  }

  _keepAlive() {
    const socket = this._socket;
    if (!socket || !this._welcomed || Date.now() - this._lastFrameAt < this.options.pingInterval) return;
    this.request("ping", {}, { timeout: Math.min(10000, this.options.pingInterval), retry: false }).catch((error) => {
      if (error.code === "timeout") this._drop(socket, 4000, "no answer to ping");
    });
  }

  // Requests -----------------------------------------------------------------

  /**
   * Send a request; resolves with its reply frame, rejects with a ChatError.
   * While disconnected the request waits and goes out after the reconnect.
   * `retry`: may it be sent again if the socket drops before the reply?
   * (default: reads, writes with an idempotency key / client_msg_id, and the
   * idempotent writes of revision 1.1).
   * `coalesce`: a key; a request with the same key that is still waiting (not
   * yet sent) is replaced by this one, and both promises get this one's reply.
   * `merge(oldFields, newFields)` may combine their fields (e.g. the higher seq).
   */
  request(type, fields = {}, { timeout = this.options.requestTimeout, retry = RETRY_SAFE.has(type), coalesce = null, merge = null } = {}) {
    if (this.state === "closed") return Promise.reject(new ChatError("closed", PLAIN.closed));
    if (this.state === "idle") this.connect().catch(() => {});
    return new Promise((resolve, reject) => {
      let waiting = null;
      if (coalesce !== null) {
        for (const entry of this._entries.values()) {
          if (entry.coalesce === coalesce && !entry.sent && !entry.internal) waiting = entry;
        }
      }
      if (waiting) {
        // The older one never left: only the newer goes out, and answers both.
        this._entries.delete(waiting.id);
        clearTimeout(waiting.timer);
        if (merge) fields = merge(waiting.fields, fields);
        const before = { resolve: waiting.resolve, reject: waiting.reject };
        const after = { resolve, reject };
        resolve = (reply) => (before.resolve(reply), after.resolve(reply));
        reject = (error) => (before.reject(error), after.reject(error));
      }
      const entry = this._newEntry(type, fields, { resolve, reject, timeout, retry, coalesce });
      entry.fields = fields;
      this._pump();
    });
  }

  /** How many requests wait to be sent or answered (the outbox), internal ones aside. */
  get pendingRequests() {
    let count = 0;
    for (const entry of this._entries.values()) if (!entry.internal) count += 1;
    return count;
  }

  /** Take one request's worth of the rate budget; false if there is none left just now. */
  _takeToken() {
    const budget = this._budget;
    if (!budget) return true;
    const now = Date.now();
    budget.tokens = Math.min(budget.capacity, budget.tokens + ((now - budget.at) / 1000) * budget.rate);
    budget.at = now;
    if (budget.tokens < 1) return false;
    budget.tokens -= 1;
    return true;
  }

  /** Send waiting requests in order, as fast as the rate budget allows. */
  _pump() {
    if (!this._welcomed || this._pumpTimer) return;
    for (const entry of this._entries.values()) {
      if (entry.sent || entry.held || entry.internal) continue;
      if (!this._takeToken()) {
        const wait = Math.ceil((1000 * (1 - this._budget.tokens)) / this._budget.rate);
        this._pumpTimer = setTimeout(() => {
          this._pumpTimer = null;
          this._pump();
        }, Math.max(10, wait));
        return;
      }
      this._transmit(entry);
    }
  }

  _newEntry(type, fields, options) {
    const id = ++this._lastId;
    const entry = { id, frame: { ...fields, type, id }, sent: false, held: false, timer: null, tries: 0, internal: false, ...options };
    this._entries.set(id, entry);
    return entry;
  }

  _transmit(entry) {
    const text = JSON.stringify(entry.frame);
    const limit = this.limits?.max_frame_bytes;
    if (limit && text.length * 3 > limit && new TextEncoder().encode(text).length > limit) {
      // The server would close the connection (1009); refuse it here instead.
      this._finish(entry, null, new ChatError("too_large", `The request is larger than the server's frame limit of ${limit} bytes.`, { request: entry.frame }));
      return;
    }
    try {
      this._socket.send(text);
    } catch {
      return; // the socket is going away; its close handler decides what happens
    }
    entry.sent = true;
    entry.tries += 1;
    if (entry.timeout > 0) {
      entry.timer = setTimeout(() => {
        this._finish(entry, null, new ChatError("timeout", PLAIN.timeout, { temporary: true, request: entry.frame }));
      }, entry.timeout);
    }
  }

  _finish(entry, reply, error) {
    if (this._entries.get(entry.id) !== entry) return;
    this._entries.delete(entry.id);
    clearTimeout(entry.timer);
    if (error) entry.reject(error);
    else entry.resolve(reply);
  }

  _onReply(frame) {
    const entry = this._entries.get(frame.reply_to);
    if (!entry) {
      const ephemeral = this._fireAndForget.get(frame.reply_to);
      if (ephemeral && frame.type === "error") {
        this._fireAndForget.delete(frame.reply_to);
        this._emit("error", new ChatError(frame.code, frame.message, { temporary: frame.temporary, request: ephemeral }));
      }
      return; // a reply after its timeout, or to a request we gave up on
    }
    clearTimeout(entry.timer);
    if (frame.type === "error") {
      const error = new ChatError(frame.code, frame.message, { temporary: !!frame.temporary, request: entry.frame });
      if (error.temporary && entry.retry && entry.tries <= this.options.temporaryRetries) {
        entry.sent = false;
        entry.held = true;
        setTimeout(() => {
          entry.held = false;
          this._pump();
        }, 500 * 2 ** (entry.tries - 1) * (0.5 + Math.random() / 2));
        return;
      }
      this._finish(entry, null, error);
      return;
    }
    this._finish(entry, frame, null);
    this._applyOwn(frame);
  }

  // Convenience requests -----------------------------------------------------

  /** Create a session; retried safely across reconnects (idempotency key). */
  async createSession(documentId, sectionId, { title = null, idempotencyKey = randomId() } = {}) {
    const fields = { document_id: documentId, section_id: sectionId, idempotency_key: idempotencyKey };
    if (title != null && title !== "") fields.title = title;
    return (await this.request("create_session", fields)).session;
  }

  async getSession(sessionId) {
    return (await this.request("get_session", { session_id: sessionId })).session;
  }

  /**
   * Sessions of a section (or of the whole document, `sectionId` null), following
   * every page. Options: `closed` (true/false: only closed/open ones), `order`
   * ("created", oldest first, the default; "activity", latest activity first),
   * `limit` (at most this many in all), `cursor` (start after a page's `nextCursor`).
   */
  async listSessions(documentId, sectionId = null, { closed = null, order = null, limit = null, cursor = null } = {}) {
    const sessions = [];
    if (limit != null && limit <= 0) return sessions;
    let next = cursor;
    for (;;) {
      const pageLimit = limit == null ? null : Math.min(1000, limit - sessions.length);
      const page = await this.listSessionsPage(documentId, { sectionId, closed, order, limit: pageLimit, cursor: next });
      sessions.push(...page.sessions);
      next = page.nextCursor;
      if (next == null || (limit != null && sessions.length >= limit)) return sessions;
    }
  }

  /**
   * One page of `list_sessions`: `{sessions, read, unread, nextCursor}` (`read`
   * and `unread` map each listed session id to our marker and unread count).
   */
  async listSessionsPage(documentId, { sectionId = null, closed = null, order = null, limit = null, cursor = null } = {}) {
    const fields = { document_id: documentId };
    if (sectionId != null) fields.section_id = sectionId;
    if (closed != null) fields.closed = Boolean(closed);
    if (order != null) fields.order = order;
    if (limit != null) fields.limit = limit;
    if (cursor != null) fields.cursor = cursor;
    const reply = await this.request("list_sessions", fields);
    // (The subscriptions this listing covers have taken its read state already: _applyOwn.)
    return { sessions: reply.sessions, read: reply.read ?? {}, unread: reply.unread ?? {}, nextCursor: reply.next_cursor ?? null };
  }

  /**
   * Send a message; resolves with the stored Message. The `clientMsgId` makes
   * it exactly-once: resending after a drop returns the original message.
   * `mentions`: user names the message mentions (each gets a `mentioned` event).
   */
  async send(sessionId, text, { clientMsgId = randomId(), timeout = this.options.sendTimeout, mentions = null } = {}) {
    const fields = { session_id: sessionId, text, client_msg_id: clientMsgId };
    if (mentions != null) fields.mentions = [...mentions];
    return (await this.request("send_message", fields, { retry: true, timeout })).message;
  }

  /**
   * Edit a message (yours, or anyone's as a moderator); resolves with the edited
   * Message. `mentions`, when given, replace the message's (absent: kept).
   * Made offline, it waits in the outbox; a later edit of the same message
   * queued before it left replaces it.
   */
  async editMessage(sessionId, seq, text, { mentions = null } = {}) {
    const fields = { session_id: sessionId, seq, text };
    if (mentions != null) fields.mentions = [...mentions];
    const reply = await this.request("edit_message", fields, { coalesce: `edit ${sessionId} ${seq}` });
    return reply.message;
  }

  /** Delete a message (yours, or anyone's as a moderator); resolves with the tombstone. */
  async deleteMessage(sessionId, seq) {
    const reply = await this.request("delete_message", { session_id: sessionId, seq }, { coalesce: `delete ${sessionId} ${seq}` });
    return reply.message;
  }

  /**
   * Give (`on` true, the default) or take back (`on` false) a reaction; resolves
   * with the `reaction` reply `{session_id, seq, reaction, user, on, at}`. `on`
   * is always sent explicitly, so a resend after a drop sets the same state
   * instead of toggling again; toggles queued while offline collapse into the last.
   */
  async react(sessionId, seq, reaction, on = true) {
    const fields = { session_id: sessionId, seq, reaction, on: Boolean(on) };
    return this._plain(await this.request("react", fields, { coalesce: `react ${sessionId} ${seq} ${reaction}` }));
  }

  /**
   * Mark a session read up to `seq` (its `last_seq` to mark everything); resolves
   * with `{session_id, seq}`, the marker now (never lower than before). Our other
   * connections get a `read` event. Marks queued while offline collapse into the highest.
   */
  async markRead(sessionId, seq) {
    const reply = await this.request(
      "mark_read",
      { session_id: sessionId, seq },
      { coalesce: `read ${sessionId}`, merge: (older, newer) => ({ ...newer, seq: Math.max(older.seq, newer.seq) }) },
    );
    return { session_id: reply.session_id, seq: reply.seq };
  }

  /**
   * Change a session's `title` and/or `metadata` (its creator, or a moderator).
   * A field left out is unchanged; `null` clears it. Resolves with the Session.
   */
  async updateSession(sessionId, changes = {}) {
    const fields = { session_id: sessionId };
    if ("title" in changes) fields.title = changes.title;
    if ("metadata" in changes) fields.metadata = changes.metadata;
    return (await this.request("update_session", fields)).session;
  }

  /** Reopen a closed session (`conflict` if it is open); resolves with the Session. */
  async reopenSession(sessionId) {
    return (await this.request("reopen_session", { session_id: sessionId }, { retry: false })).session;
  }

  /**
   * Move sessions of a document from one section to another (revision 1.1), as
   * an editor does when a section is renamed, merged into another, split or
   * deleted: `sessionIds` (1–1,000 ids) or, when absent, every session of
   * `fromSectionId`. Resolves with `{document_id, from_section_id,
   * to_section_id, sessions}`, the sessions as they are after the move (with
   * their ids, messages, seqs and read markers). The server moves them
   * atomically. Made offline, it waits in the outbox and is sent once when the
   * connection is back; resent if the socket dropped before the reply (a named
   * session already in the target counts as moved, so the reply is the same).
   * Subscriptions of either section follow (`onSessionMoved`).
   */
  async moveSessions({ documentId, fromSectionId, toSectionId, sessionIds = null } = {}) {
    const fields = { document_id: documentId, from_section_id: fromSectionId, to_section_id: toSectionId };
    if (sessionIds != null) fields.session_ids = [...sessionIds];
    return this._plain(await this.request("move_sessions", fields));
  }

  /** A reply frame without its `type` and `reply_to`. */
  _plain(reply) {
    const { type: _type, reply_to: _replyTo, ...rest } = reply;
    return rest;
  }

  /** A page of history: `{messages (ascending seq), has_more}`; newest page without a cursor. */
  async history(sessionId, { beforeSeq = null, afterSeq = null, limit = 50 } = {}) {
    const fields = { session_id: sessionId, limit };
    if (beforeSeq != null) fields.before_seq = beforeSeq;
    if (afterSeq != null) fields.after_seq = afterSeq;
    const reply = await this.request("history", fields);
    return { messages: reply.messages, has_more: reply.has_more, hasMore: reply.has_more };
  }

  async closeSession(sessionId) {
    return (await this.request("close_session", { session_id: sessionId }, { retry: false })).session;
  }

  /** Tell the section's other viewers that we are typing (only sent while connected). */
  typing(sessionId) {
    if (!this._welcomed || !this._takeToken()) return false; // a hint: skipped, never queued
    const now = Date.now();
    for (const [id, item] of this._fireAndForget) if (now - item.at > 30000) this._fireAndForget.delete(id);
    const id = ++this._lastId;
    const frame = { type: "typing", id, session_id: sessionId };
    this._fireAndForget.set(id, { ...frame, at: now });
    try {
      this._socket.send(JSON.stringify(frame));
    } catch {
      return false;
    }
    return true;
  }

  async ping() {
    await this.request("ping");
  }

  // Subscriptions ------------------------------------------------------------

  /**
   * Follow a section. Resolves with its Subscription once the server has
   * answered (the `snapshot` handler has run by then). Handlers:
   *   onSnapshot({sessions, presence, reconnect})  full state; also after a
   *       reconnect that could not be recovered (reload what you show)
   *   onSessionCreated(session, {own, replay}), onMessage(message, {own, replay, session}),
   *   onSessionClosed(session, {own, replay}), onPresence({joined, left, present}),
   *   onTyping({session_id, user}), onRecovered({missed}), onError(ChatError)
   * Revision 1.1:
   *   onMessageEdited(message, {own, replay, session}), onMessageDeleted(tombstone, {own, replay, session}),
   *   onReaction({session_id, seq, reaction, user, on, at}, {own, replay, session}),
   *   onSessionUpdated(session, {own, replay}), onSessionReopened(session, {own, replay}),
   *   onRead({session_id, seq}, {own}), onUnread({session_id, unread, read}),
   *   onSessionMoved({session, from_section_id, to_section_id}, {own, replay, direction}):
   *       direction "out" (this section was the source: the session has left it)
   *       or "in" (it arrived, with its last_seq; load its messages with history)
   *   onDocumentDeleted({document_id})
   * Each stored event reaches the handlers once, in order, including our own
   * actions (`own: true`) and events replayed after a reconnect (`replay: true`).
   * (Edits, deletes and reactions are idempotent to apply: a replay of one
   * already applied leaves what you show as it is; see `applyReaction`.)
   */
  subscribe(documentId, sectionId, handlers = {}) {
    if (this.state === "closed") return Promise.reject(new ChatError("closed", PLAIN.closed));
    const key = sectionKey(documentId, sectionId);
    let sub = this._subs.get(key);
    if (!sub) {
      sub = new Subscription(this, documentId, sectionId);
      this._subs.set(key, sub);
      sub.attach(handlers);
      if (this.state === "idle") this.connect().catch(() => {});
      else if (this._welcomed) this._sendSubscribe(sub);
    } else {
      sub.attach(handlers);
    }
    return sub.ready.then(() => sub);
  }

  /** Stop following a section. */
  async unsubscribe(sub) {
    if (!sub.active) return;
    sub.active = false;
    clearTimeout(sub._unreadTimer);
    this._subs.delete(sub.key);
    for (const [sessionId, owner] of this._sessionIndex) if (owner === sub) this._sessionIndex.delete(sessionId);
    sub._rejectReady(new ChatError("closed", "unsubscribed"));
    // Only while connected: a queued unsubscribe could undo a later subscribe.
    if (this._welcomed) {
      await this.request("unsubscribe", { document_id: sub.documentId, section_id: sub.sectionId }, { retry: false }).catch(() => {});
    }
  }

  /** The subscription that holds `sessionId`, if any. */
  subscriptionOf(sessionId) {
    return this._sessionIndex.get(sessionId) ?? null;
  }

  _sendSubscribe(sub) {
    const fields = { document_id: sub.documentId, section_id: sub.sectionId };
    if (sub.epoch !== null) {
      fields.since_offset = sub.offset;
      fields.epoch = sub.epoch;
    }
    const entry = this._newEntry("subscribe", fields, {
      timeout: this.options.requestTimeout,
      retry: false,
      resolve: (reply) => this._onSubscribed(sub, reply),
      reject: (error) => this._onSubscribeFailed(sub, error),
    });
    entry.internal = true;
    this._takeToken(); // counted, but never held back: subscriptions go first
    this._transmit(entry);
  }

  _onSubscribeFailed(sub, error) {
    if (!sub.active) return;
    if (error.code === "timeout" && this._socket) {
      // No answer: treat the connection as broken; the reconnect resubscribes.
      this._drop(this._socket, 4000, "no answer to subscribe");
      return;
    }
    if (error.temporary) {
      setTimeout(() => sub.active && this._welcomed && !sub.subscribed && this._sendSubscribe(sub), 1000);
      return;
    }
    // Refused for good (forbidden, bad_request): the subscription ends.
    sub.active = false;
    this._subs.delete(sub.key);
    sub._rejectReady(error);
    sub._emit("error", error);
  }

  _onSubscribed(sub, reply) {
    if (!sub.active) return;
    const first = sub.epoch === null;
    sub.subscribed = true;
    if (!first && reply.recovered) {
      for (const event of reply.events) this._applyStored(sub, event, { own: false, replay: true });
      // The reply's session list is the server's truth after the replay (updated in
      // place, so that objects handed to callbacks stay current).
      for (const session of reply.sessions) this._indexSession(sub, session);
      sub.epoch = reply.epoch;
      sub.offset = reply.offset;
      // Read markers are not events (not recovered): the reply's maps are the truth.
      this._replaceReadState(sub, reply, { emit: true });
      this._replacePresence(sub, reply.presence);
      sub._emit("recovered", { missed: reply.events.length });
    } else {
      sub.epoch = reply.epoch;
      sub.offset = reply.offset;
      for (const [sessionId, owner] of this._sessionIndex) if (owner === sub) this._sessionIndex.delete(sessionId);
      sub.sessions = new Map();
      for (const session of reply.sessions) this._indexSession(sub, session);
      this._replaceReadState(sub, reply, { emit: false });
      sub.presence = new Set(reply.presence);
      sub._emit("snapshot", { sessions: [...sub.sessions.values()], presence: [...sub.presence], reconnect: !first });
    }
    sub._resolveReady(sub);
  }

  _indexSession(sub, session) {
    const known = sub.sessions.get(session.session_id);
    if (known) {
      const lastActivity = later(known.last_activity_at, session.last_activity_at);
      Object.assign(known, session, { last_seq: Math.max(known.last_seq, session.last_seq) });
      if (lastActivity) known.last_activity_at = lastActivity;
    } else {
      sub.sessions.set(session.session_id, { ...session });
    }
    this._sessionIndex.set(session.session_id, sub);
  }

  // Read state (revision 1.1) ----------------------------------------------------

  /** Take `read`/`unread` from a `subscribed` reply: the server's truth for that moment. */
  _replaceReadState(sub, reply, { emit }) {
    if (!reply.read && !reply.unread) return; // a 1.0 server
    sub.readState = true;
    const read = new Map(Object.entries(reply.read ?? {}));
    const unread = new Map(Object.entries(reply.unread ?? {}));
    for (const sessionId of sub.sessions.keys()) {
      if (!read.has(sessionId)) read.set(sessionId, sub.read.get(sessionId) ?? 0);
      if (!unread.has(sessionId)) unread.set(sessionId, sub.unread.get(sessionId) ?? 0);
    }
    const before = { read: sub.read, unread: sub.unread };
    sub.read = read;
    sub.unread = unread;
    if (!emit) return;
    for (const sessionId of sub.sessions.keys()) {
      if (before.read.get(sessionId) !== read.get(sessionId) || before.unread.get(sessionId) !== unread.get(sessionId)) {
        sub._emit("unread", { session_id: sessionId, unread: unread.get(sessionId), read: read.get(sessionId) });
      }
    }
  }

  /** A `sessions` reply carries read state too: refresh the subscriptions it covers. */
  _noteReadState(reply) {
    if (!reply.unread) return;
    for (const session of reply.sessions ?? []) {
      const sub = this._sessionIndex.get(session.session_id);
      if (!sub?.readState) continue;
      const id = session.session_id;
      const read = Math.max(sub.readOf(id), reply.read?.[id] ?? 0);
      const unread = reply.unread[id];
      // Only if the listing is not older than what we know (it may cross a live message).
      if (typeof unread === "number" && session.last_seq >= (sub.sessions.get(id)?.last_seq ?? 0)) this._setUnread(sub, id, unread, read);
    }
  }

  _setUnread(sub, sessionId, unread, read = sub.readOf(sessionId)) {
    const count = Math.max(0, unread);
    if (sub.unread.get(sessionId) === count && sub.read.get(sessionId) === read) return;
    sub.unread.set(sessionId, count);
    sub.read.set(sessionId, read);
    sub._emit("unread", { session_id: sessionId, unread: count, read });
  }

  /** Our marker moved to `seq` (our mark_read, our other tab's `read`, our own message). */
  _moveRead(sub, sessionId, seq) {
    if (!sub.readState) return;
    const session = sub.sessions.get(sessionId);
    const read = Math.max(sub.readOf(sessionId), seq);
    if (!session || read >= session.last_seq) {
      this._setUnread(sub, sessionId, 0, read);
      return;
    }
    // Messages after the marker that we cannot count here: ask the server (once, soon).
    this._setUnread(sub, sessionId, Math.min(sub.unreadOf(sessionId), session.last_seq - read), read);
    this._refreshReadSoon(sub);
  }

  /** Ask the server for the section's read state (once, soon); _noteReadState applies the answer. */
  _refreshReadSoon(sub) {
    clearTimeout(sub._unreadTimer);
    sub._unreadTimer = setTimeout(() => {
      if (!sub.active) return;
      this.listSessions(sub.documentId, sub.sectionId).catch(() => {});
    }, 250);
  }

  /** A message we had not seen arrived in a subscribed section: count it. */
  _countMessage(sub, message) {
    if (!sub.readState) return;
    const id = message.session_id;
    if (message.author === this.user) {
      // Sending moves the sender's marker to their message.
      this._setUnread(sub, id, 0, Math.max(sub.readOf(id), message.seq));
    } else if (!message.deleted_at && message.seq > sub.readOf(id)) {
      this._setUnread(sub, id, sub.unreadOf(id) + 1);
    }
  }

  _uncountDeleted(sub, tombstone) {
    if (!sub.readState) return;
    const id = tombstone.session_id;
    if (tombstone.author !== this.user && tombstone.seq > sub.readOf(id) && sub.unreadOf(id) > 0) this._setUnread(sub, id, sub.unreadOf(id) - 1);
  }

  // Document watches (revision 1.1) ------------------------------------------------

  /**
   * Watch a document: resolves with a DocumentWatch once the server has answered
   * with every section's summary (`onDocument` has run by then). Handlers:
   *   onDocument({document_id, sections, reconnect})  the full list: first, and after each reconnect
   *   onSectionSummary(summary)  one section changed (coalesced by the server, ≤ 1 s);
   *       `sessions: 0` means the section is no longer listed
   *   onDocumentDeleted({document_id}), onError(ChatError)  the watch has ended
   */
  watchDocument(documentId, handlers = {}) {
    if (this.state === "closed") return Promise.reject(new ChatError("closed", PLAIN.closed));
    let watch = this._watches.get(documentId);
    if (!watch) {
      // An unwatch of the same document still waiting to go out would undo this watch: drop it.
      for (const entry of [...this._entries.values()]) {
        if (entry.coalesce === `unwatch ${documentId}` && !entry.sent) this._finish(entry, { type: "unwatched", document_id: documentId }, null);
      }
      watch = new DocumentWatch(this, documentId);
      this._watches.set(documentId, watch);
      watch.attach(handlers);
      if (this.state === "idle") this.connect().catch(() => {});
      else if (this._welcomed) this._sendWatch(watch);
    } else {
      watch.attach(handlers);
    }
    return watch.ready.then(() => watch);
  }

  /** Stop watching a document (resolves once the server has said `unwatched`, or at once offline). */
  async unwatchDocument(documentId) {
    const watch = this._watches.get(documentId);
    if (!watch) return;
    watch.active = false;
    this._watches.delete(documentId);
    watch._rejectReady(new ChatError("closed", "unwatched"));
    if (this._welcomed) {
      await this.request("unwatch_document", { document_id: documentId }, { retry: false, coalesce: `unwatch ${documentId}` }).catch(() => {});
    }
  }

  _sendWatch(watch) {
    const entry = this._newEntry("watch_document", { document_id: watch.documentId }, {
      timeout: this.options.requestTimeout,
      retry: false,
      resolve: (reply) => this._onWatched(watch, reply),
      reject: (error) => this._onWatchFailed(watch, error),
    });
    entry.internal = true;
    this._takeToken();
    this._transmit(entry);
  }

  _onWatched(watch, reply) {
    if (!watch.active) return;
    const first = !watch._answered;
    watch._answered = true;
    watch.watching = true;
    watch.sections = new Map(reply.sections.map((summary) => [summary.section_id, summary]));
    watch._emit("document", { document_id: watch.documentId, sections: watch.sectionList, reconnect: !first });
    watch._resolveReady(watch);
  }

  _onWatchFailed(watch, error) {
    if (!watch.active) return;
    if (error.code === "timeout" && this._socket) {
      this._drop(this._socket, 4000, "no answer to watch_document");
      return;
    }
    if (error.temporary) {
      setTimeout(() => watch.active && this._welcomed && !watch.watching && this._sendWatch(watch), 1000);
      return;
    }
    watch.active = false;
    this._watches.delete(watch.documentId);
    watch._rejectReady(error);
    watch._emit("error", error);
  }

  _onSectionSummary(frame) {
    const watch = this._watches.get(frame.document_id);
    if (!watch?.watching) return;
    const summary = frame.summary;
    if (summary.sessions === 0) watch.sections.delete(summary.section_id);
    else watch.sections.set(summary.section_id, summary);
    watch._emit("section_summary", summary);
  }

  _onDocumentDeleted(frame) {
    const documentId = frame.document_id;
    const error = new ChatError("closed", "document deleted");
    for (const sub of [...this._subs.values()]) {
      if (sub.documentId !== documentId) continue;
      sub.active = false;
      clearTimeout(sub._unreadTimer);
      this._subs.delete(sub.key);
      for (const [sessionId, owner] of this._sessionIndex) if (owner === sub) this._sessionIndex.delete(sessionId);
      sub._rejectReady(error);
      sub._emit("document_deleted", { document_id: documentId });
    }
    const watch = this._watches.get(documentId);
    if (watch) {
      watch.active = false;
      this._watches.delete(documentId);
      watch._rejectReady(error);
      watch._emit("document_deleted", { document_id: documentId });
    }
    this._emit("document_deleted", { document_id: documentId });
  }

  _replacePresence(sub, users) {
    const present = new Set(users);
    const joined = [...present].filter((u) => !sub.presence.has(u));
    const left = [...sub.presence].filter((u) => !present.has(u));
    sub.presence = present;
    if (joined.length || left.length) sub._emit("presence", { joined, left, present: [...present] });
  }

  _onEvent(frame) {
    switch (frame.type) {
      case "session_created": {
        const sub = this._subs.get(sectionKey(frame.session.document_id, frame.session.section_id));
        if (sub?.subscribed) this._applyStored(sub, frame, { own: false, replay: false });
        break;
      }
      case "message":
      case "message_edited":
      case "message_deleted":
      case "reaction":
      case "session_closed":
      case "session_updated":
      case "session_reopened": {
        const sessionId = frame.message?.session_id ?? frame.session?.session_id ?? frame.session_id;
        const sub = this._sessionIndex.get(sessionId);
        if (sub?.subscribed) this._applyStored(sub, frame, { own: false, replay: false });
        break;
      }
      case "session_moved":
        this._onSessionMoved(frame);
        break;
      case "read": {
        const sub = this._sessionIndex.get(frame.session_id);
        if (!sub?.subscribed) break;
        this._moveRead(sub, frame.session_id, frame.seq);
        sub._emit("read", { session_id: frame.session_id, seq: frame.seq }, { own: false });
        break;
      }
      case "mentioned":
        this._emit("mentioned", { document_id: frame.document_id, section_id: frame.section_id, message: frame.message });
        break;
      case "section_summary":
        this._onSectionSummary(frame);
        break;
      case "document_deleted":
        this._onDocumentDeleted(frame);
        break;
      case "presence": {
        const sub = this._subs.get(sectionKey(frame.document_id, frame.section_id));
        if (!sub?.subscribed) break;
        for (const user of frame.joined) sub.presence.add(user);
        for (const user of frame.left) sub.presence.delete(user);
        sub._emit("presence", { joined: frame.joined, left: frame.left, present: [...sub.presence] });
        break;
      }
      case "typing": {
        const sub = this._sessionIndex.get(frame.session_id);
        if (sub?.subscribed) sub._emit("typing", { session_id: frame.session_id, user: frame.user });
        break;
      }
      case "error":
        this._emit("error", new ChatError(frame.code, frame.message, { temporary: !!frame.temporary }));
        break;
      default:
        this._emit("frame", frame); // a newer server's event: let the embedder decide
    }
  }

  /** Our own writes come back as replies, not events: show them to the subscription too. */
  _applyOwn(reply) {
    let sub = null;
    switch (reply.type) {
      case "session_created":
        sub = this._subs.get(sectionKey(reply.session.document_id, reply.session.section_id));
        break;
      case "message_ack":
      case "message_edited":
      case "message_deleted":
        sub = this._sessionIndex.get(reply.message.session_id);
        break;
      case "session_closed":
      case "session_updated":
      case "session_reopened":
        sub = this._sessionIndex.get(reply.session.session_id);
        break;
      case "reaction":
        sub = this._sessionIndex.get(reply.session_id);
        break;
      case "read_marked":
        sub = this._sessionIndex.get(reply.session_id);
        if (sub?.active && sub.epoch !== null) {
          this._moveRead(sub, reply.session_id, reply.seq);
          sub._emit("read", { session_id: reply.session_id, seq: reply.seq }, { own: true });
        }
        return;
      case "sessions":
        this._noteReadState(reply);
        return;
      case "sessions_moved":
        for (const session of reply.sessions) {
          this._applyMoveToBoth({ session, from_section_id: reply.from_section_id, to_section_id: reply.to_section_id }, { own: true, replay: false });
        }
        return;
    }
    if (sub?.active && sub.epoch !== null) this._applyStored(sub, reply, { own: true, replay: false });
  }

  /** Apply one stored event (or our own reply) to a subscription: once, in order. */
  _applyStored(sub, event, how) {
    if (typeof event.offset === "number" && event.offset > sub.offset) sub.offset = event.offset;
    switch (event.type) {
      case "session_created": {
        const session = event.session;
        if (sub.sessions.has(session.session_id)) return;
        this._indexSession(sub, session);
        if (sub.readState) {
          sub.read.set(session.session_id, 0);
          sub.unread.set(session.session_id, 0);
        }
        sub._emit("session_created", sub.sessions.get(session.session_id), how);
        return;
      }
      case "message":
      case "message_ack": {
        const message = event.message;
        const session = sub.sessions.get(message.session_id);
        if (!session || message.seq <= session.last_seq) return; // seen already
        session.last_seq = message.seq;
        this._touch(session, message.sent_at);
        this._countMessage(sub, message);
        sub._emit("message", message, { ...how, own: how.own || message.author === this.user, session });
        return;
      }
      case "message_edited":
      case "message_deleted": {
        const message = event.message;
        const session = sub.sessions.get(message.session_id);
        if (!session) return;
        if (message.seq > session.last_seq) session.last_seq = message.seq; // a replay may carry it first
        // A replayed edit of a message deleted since is served as the tombstone.
        const deleted = event.type === "message_deleted" || Boolean(message.deleted_at);
        this._touch(session, deleted ? message.deleted_at : message.edited_at);
        if (event.type === "message_deleted") this._uncountDeleted(sub, message);
        // `own`: the reply to our own request (a moderator may change someone else's message).
        sub._emit(deleted ? "message_deleted" : "message_edited", message, { ...how, session });
        return;
      }
      case "reaction": {
        const session = sub.sessions.get(event.session_id);
        if (!session) return;
        this._touch(session, event.at);
        const { session_id, seq, reaction, user, on, at } = event;
        sub._emit("reaction", { session_id, seq, reaction, user, on, at }, { ...how, own: how.own || user === this.user, session });
        return;
      }
      case "session_closed":
      case "session_reopened": {
        const session = sub.sessions.get(event.session.session_id);
        const closing = event.type === "session_closed";
        if (!session || session.closed === closing) return; // seen already (our own reply, then its replay)
        this._indexSession(sub, { ...event.session, closed: closing });
        sub._emit(event.type, session, how);
        return;
      }
      case "session_updated": {
        const session = sub.sessions.get(event.session.session_id);
        if (!session) return;
        // Title and metadata from the event; closed and last_seq as we know them (they have their own events).
        const { closed: _closed, last_seq: _lastSeq, ...changed } = event.session;
        this._indexSession(sub, { ...session, ...changed });
        sub._emit("session_updated", session, how);
        return;
      }
      case "session_moved":
        // A replay: this subscription's own stream says so (its read state follows in the reply).
        if (sub.sectionId === event.from_section_id) this._moveOut(sub, event, how);
        else if (sub.sectionId === event.to_section_id) this._moveIn(sub, event, how, null);
        return;
    }
  }

  // Moves (revision 1.1) ----------------------------------------------------------------

  /**
   * A live `session_moved`. It is stored in both sections' streams, each with its
   * own offset, and the frame does not say which stream it comes from. With one
   * of the two sections subscribed it is that one's. With both (two frames come,
   * one per stream) it is the one whose next offset it is, the source first when
   * both are at the same place (its twin then goes to the target); where it is
   * neither's (our own writes come back as replies, without offsets), no offset
   * moves: a later event catches up, and a recovery that replays this one
   * changes nothing, because a move is applied by where the session is.
   */
  _onSessionMoved(frame) {
    const documentId = frame.session.document_id;
    const live = [frame.from_section_id, frame.to_section_id]
      .map((sectionId) => this._subs.get(sectionKey(documentId, sectionId)))
      .filter((sub) => sub?.subscribed);
    if (!live.length) return;
    const owner = live.length === 1 ? live[0] : live.find((sub) => sub.offset + 1 === frame.offset);
    if (owner && frame.offset > owner.offset) owner.offset = frame.offset;
    this._applyMoveToBoth(frame, { own: false, replay: false });
  }

  /** Apply a move to the subscriptions of its source and of its target, whichever we have. */
  _applyMoveToBoth(move, how) {
    const documentId = move.session.document_id;
    const source = this._subs.get(sectionKey(documentId, move.from_section_id));
    const target = this._subs.get(sectionKey(documentId, move.to_section_id));
    const carried = source?.active && source.epoch !== null ? this._moveOut(source, move, how) : null;
    if (target?.active && target.epoch !== null) this._moveIn(target, move, how, carried);
  }

  /** The session left `sub`'s section; returns its read state there (or null if it was not there). */
  _moveOut(sub, move, how) {
    const id = move.session.session_id;
    const session = sub.sessions.get(id);
    if (!session) return null; // gone already (our own reply, then the event; or a replay)
    const carried = sub.readState ? { read: sub.readOf(id), unread: sub.unreadOf(id) } : null;
    sub.sessions.delete(id);
    sub.read.delete(id);
    sub.unread.delete(id);
    if (this._sessionIndex.get(id) === sub) this._sessionIndex.delete(id);
    // The object handed to callbacks so far now says where it went.
    const lastSeq = Math.max(session.last_seq, move.session.last_seq);
    const lastActivity = later(session.last_activity_at, move.session.last_activity_at);
    Object.assign(session, move.session, { last_seq: lastSeq, last_activity_at: lastActivity });
    sub._emit("session_moved", { session, from_section_id: move.from_section_id, to_section_id: move.to_section_id }, { ...how, direction: "out" });
    return carried;
  }

  /** The session arrived in `sub`'s section (with its read state from the source, when we had it). */
  _moveIn(sub, move, how, carried) {
    const id = move.session.session_id;
    if (sub.sessions.has(id)) return; // here already
    this._indexSession(sub, move.session);
    if (carried) {
      sub.read.set(id, carried.read);
      sub.unread.set(id, carried.unread);
    } else if (sub.readState && !how.replay) {
      this._refreshReadSoon(sub); // markers move with the session; ask for ours (a replay's reply carries them)
    }
    sub._emit("session_moved", { session: sub.sessions.get(id), from_section_id: move.from_section_id, to_section_id: move.to_section_id }, { ...how, direction: "in" });
  }

  /** A session's `last_activity_at` moves to `at` if that is later (it never goes back). */
  _touch(session, at) {
    if (at) session.last_activity_at = later(session.last_activity_at, at);
  }
}
