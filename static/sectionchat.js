// sectionchat.js: a client for the sectionchat wire protocol (version 1).
//
// An ES module with no dependencies, for the browser page and for editors that
// embed section chats. It owns one WebSocket and keeps it alive: requests are
// promises, section subscriptions deliver events to callbacks, and after a
// drop it reconnects (exponential backoff with jitter), resubscribes with
// `since_offset` + `epoch`, and replays what was missed, so callbacks see each
// stored event once and in order. Messages are sent with a `client_msg_id`, so
// one typed while offline (or in flight when the socket dropped) is delivered
// exactly once after the reconnect.
//
//   import { SectionChat } from "/static/sectionchat.js";
//   const chat = new SectionChat(undefined, { name: "alice" });
//   const sub = await chat.subscribe("spec-7", "intro", { onMessage(m) { ... } });
//   await chat.send(sessionId, "Hello");

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
const RETRY_SAFE = new Set(["get_session", "list_sessions", "history", "ping", "send_message", "create_session"]);

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
  onPresence: "presence",
  onTyping: "typing",
  onRecovered: "recovered",
  onError: "error",
};

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
    this.sessions = new Map(); // session_id -> Session (last_seq and closed kept current)
    this.presence = new Set(); // users viewing the section
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

  unsubscribe() {
    return this.chat.unsubscribe(this);
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
    this.nextRetryAt = null; // when a reconnect attempt is due (ms since epoch)
    this._entries = new Map(); // request id -> entry, waiting or in flight, in id order
    this._fireAndForget = new Map(); // request id -> {type, at} (typing: no reply unless an error)
    this._subs = new Map(); // sectionKey -> Subscription
    this._sessionIndex = new Map(); // session_id -> Subscription
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
      sub._rejectReady(error);
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
    // Subscriptions first, then what waited: the server answers in order.
    for (const sub of this._subs.values()) this._sendSubscribe(sub);
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
   * (default: reads, and writes with an idempotency key / client_msg_id).
   */
  request(type, fields = {}, { timeout = this.options.requestTimeout, retry = RETRY_SAFE.has(type) } = {}) {
    if (this.state === "closed") return Promise.reject(new ChatError("closed", PLAIN.closed));
    if (this.state === "idle") this.connect().catch(() => {});
    return new Promise((resolve, reject) => {
      this._newEntry(type, fields, { resolve, reject, timeout, retry });
      this._pump();
    });
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

  /** Sessions of a section (or of the whole document), oldest first (every page of at most 1,000). */
  async listSessions(documentId, sectionId = null) {
    let fields = { document_id: documentId };
    if (sectionId != null) fields.section_id = sectionId;
    const sessions = [];
    for (;;) {
      const reply = await this.request("list_sessions", fields);
      sessions.push(...reply.sessions);
      if (reply.next_cursor == null) return sessions;
      fields = { ...fields, cursor: reply.next_cursor };
    }
  }

  /**
   * Send a message; resolves with the stored Message. The `clientMsgId` makes
   * it exactly-once: resending after a drop returns the original message.
   */
  async send(sessionId, text, { clientMsgId = randomId(), timeout = this.options.sendTimeout } = {}) {
    const fields = { session_id: sessionId, text, client_msg_id: clientMsgId };
    return (await this.request("send_message", fields, { retry: true, timeout })).message;
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
   * Each stored event reaches the handlers once, in order, including our own
   * actions (`own: true`) and events replayed after a reconnect (`replay: true`).
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
      // The reply's session list is the server's truth after the replay.
      for (const session of reply.sessions) this._indexSession(sub, session);
      sub.epoch = reply.epoch;
      sub.offset = reply.offset;
      this._replacePresence(sub, reply.presence);
      sub._emit("recovered", { missed: reply.events.length });
    } else {
      sub.epoch = reply.epoch;
      sub.offset = reply.offset;
      for (const [sessionId, owner] of this._sessionIndex) if (owner === sub) this._sessionIndex.delete(sessionId);
      sub.sessions = new Map();
      for (const session of reply.sessions) this._indexSession(sub, session);
      sub.presence = new Set(reply.presence);
      sub._emit("snapshot", { sessions: [...sub.sessions.values()], presence: [...sub.presence], reconnect: !first });
    }
    sub._resolveReady(sub);
  }

  _indexSession(sub, session) {
    sub.sessions.set(session.session_id, { ...session });
    this._sessionIndex.set(session.session_id, sub);
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
      case "session_closed": {
        const sessionId = frame.type === "message" ? frame.message.session_id : frame.session.session_id;
        const sub = this._sessionIndex.get(sessionId);
        if (sub?.subscribed) this._applyStored(sub, frame, { own: false, replay: false });
        break;
      }
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
    if (reply.type === "session_created") sub = this._subs.get(sectionKey(reply.session.document_id, reply.session.section_id));
    else if (reply.type === "message_ack") sub = this._sessionIndex.get(reply.message.session_id);
    else if (reply.type === "session_closed") sub = this._sessionIndex.get(reply.session.session_id);
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
        sub._emit("session_created", sub.sessions.get(session.session_id), how);
        return;
      }
      case "message":
      case "message_ack": {
        const message = event.message;
        const session = sub.sessions.get(message.session_id);
        if (!session || message.seq <= session.last_seq) return; // seen already
        session.last_seq = message.seq;
        sub._emit("message", message, { ...how, own: how.own || message.author === this.user, session });
        return;
      }
      case "session_closed": {
        const session = sub.sessions.get(event.session.session_id);
        if (!session || session.closed) return;
        session.closed = true;
        sub._emit("session_closed", session, how);
        return;
      }
    }
  }
}
