// Type declarations for sectionchat.js, the browser client of the sectionchat wire
// protocol (version 1, revision 1.1). Keep next to sectionchat.js (or copy both into
// your editor project): `import { SectionChat } from "./sectionchat.js"` then picks
// these types up.
//
// Field names of protocol objects are the wire's (snake_case), exactly as the server
// sends them; the module's own options and results are camelCase.

// ---------------------------------------------------------------------------------------
// Protocol objects
// ---------------------------------------------------------------------------------------

/** RFC 3339 UTC with milliseconds, e.g. "2026-11-25T08:00:00.000Z" (sorts as a string). */
export type Timestamp = string;

/** Any JSON value (session metadata holds a JSON object of at most 4,096 bytes). */
export type JsonValue = null | boolean | number | string | JsonValue[] | { [key: string]: JsonValue };
export type JsonObject = { [key: string]: JsonValue };

export interface Session {
  session_id: string;
  document_id: string;
  section_id: string;
  title: string | null;
  created_by: string;
  created_at: Timestamp;
  closed: boolean;
  last_seq: number;
  /** Revision 1.1: the latest message, edit, delete, reaction, update, close or reopen. */
  last_activity_at: Timestamp;
  /** Revision 1.1: an opaque object the creator attaches (e.g. where an editor anchors the session). */
  metadata: JsonObject | null;
}

export interface Message {
  session_id: string;
  /** 1, 2, 3… gapless within a session. */
  seq: number;
  message_id: string;
  author: string;
  /** "" for a deleted message (a tombstone). */
  text: string;
  client_msg_id: string | null;
  sent_at: Timestamp;
  /** Revision 1.1: user names the message mentions ([] for a tombstone). */
  mentions: string[];
  edited_at: Timestamp | null;
  /** Set on a tombstone. */
  deleted_at: Timestamp | null;
  /** Each reaction to the users who gave it, in the order they did ({} for a tombstone). */
  reactions: Record<string, string[]>;
}

/** A `reaction` event or reply. */
export interface Reaction {
  session_id: string;
  seq: number;
  reaction: string;
  user: string;
  /** true: given; false: taken back. */
  on: boolean;
  at: Timestamp;
}

/** One section of a document, for the user it is sent to (`watch_document`, `section_summary`). */
export interface SectionSummary {
  section_id: string;
  sessions: number;
  open_sessions: number;
  /** Messages that are not deleted. */
  messages: number;
  last_activity_at: Timestamp | null;
  /** Our unread messages in the section. */
  unread: number;
  /** Our unread messages that mention us. */
  mentions: number;
}

/** The reply to `move_sessions` (what `moveSessions` resolves with), revision 1.1. */
export interface SessionsMoved {
  document_id: string;
  from_section_id: string;
  to_section_id: string;
  /** The moved sessions as they are after the move (`section_id` is the target's). */
  sessions: Session[];
}

export interface Limits {
  max_frame_bytes: number;
  max_text_chars: number;
  /** 0: the server enforces no rate. */
  messages_per_s: number;
  /** Revision 1.1: subscriptions and watched documents together. */
  max_subscriptions?: number;
  [name: string]: unknown;
}

export interface Welcome {
  type: "welcome";
  connection_id: string;
  user: string;
  protocol: number;
  server: string;
  limits: Limits;
  /** ["moderator"] for a moderator (token mode, `roles` claim), else []. */
  roles?: string[];
  [field: string]: unknown;
}

/** Any frame as it travels on the wire. */
export interface Frame {
  type: string;
  id?: string | number;
  reply_to?: string | number;
  [field: string]: unknown;
}

export type ErrorCode =
  | "bad_request"
  | "unknown_type"
  | "not_found"
  | "forbidden"
  | "conflict"
  | "too_large"
  | "rate_limited"
  | "unavailable"
  | "internal"
  // from the client itself:
  | "connection_lost"
  | "timeout"
  | "closed"
  | "bad_frame";

// ---------------------------------------------------------------------------------------
// Exports
// ---------------------------------------------------------------------------------------

export const PROTOCOL: 1;
export const SUBPROTOCOL: "sectionchat.v1";

export type ConnectionState = "idle" | "connecting" | "connected" | "reconnecting" | "offline" | "closed";
/** Connection states, in the order a client usually goes through them. */
export const STATES: readonly ConnectionState[];

/** The reactions the chat page offers in its picker (any string of 1–32 characters is valid). */
export const COMMON_REACTIONS: readonly string[];

/** An error reply from the server (or a local failure with the same shape). */
export class ChatError extends Error {
  constructor(code: ErrorCode | string, message?: string, options?: { temporary?: boolean; request?: Frame | null });
  name: "ChatError";
  code: ErrorCode | string;
  /** The same request may succeed if retried later. */
  temporary: boolean;
  /** The request frame that failed, if any. */
  request: Frame | null;
}

/** A sentence for a user about `error` (a ChatError or anything thrown). */
export function describeError(error: unknown): string;

/** A random UUID v4 (also where crypto.randomUUID is missing). */
export function randomId(): string;

/** The WebSocket URL of the server that served the current page. */
export function defaultUrl(): string;

/**
 * Apply a `reaction` event or reply to a Message in place; true if it changed.
 * Idempotent: a replayed or repeated reaction changes nothing.
 */
export function applyReaction(message: Pick<Message, "reactions" | "deleted_at"> | Message, reaction: Pick<Reaction, "reaction" | "user" | "on">): boolean;

/** Whether `message` is a tombstone. */
export function isDeleted(message: Pick<Message, "deleted_at"> | null | undefined): boolean;

// ---------------------------------------------------------------------------------------
// Events and handlers
// ---------------------------------------------------------------------------------------

/** How a stored event reached you. */
export interface How {
  /** The reply to a request of this client (or, for messages, a message whose author is us). */
  own: boolean;
  /** Replayed after a reconnect (recovery from the section's offset). */
  replay: boolean;
}

export interface MessageHow extends How {
  /** The session, as the subscription keeps it (last_seq, last_activity_at current). */
  session: Session;
}

/** A `session_moved` event, as a subscription hands it to `onSessionMoved`. */
export interface SessionMove {
  /** The session as it is after the move (`section_id` is `to_section_id`); the subscription's own object. */
  session: Session;
  from_section_id: string;
  to_section_id: string;
}

export interface MoveHow extends How {
  /** "out": this subscription's section was the source (the session has left it); "in": it arrived. */
  direction: "in" | "out";
}

export interface MoveSessionsOptions {
  documentId: string;
  fromSectionId: string;
  toSectionId: string;
  /** 1–1,000 distinct ids; absent or null: every session of the source section. */
  sessionIds?: string[] | null;
}

export interface Snapshot {
  sessions: Session[];
  presence: string[];
  /** true after a reconnect that could not be recovered: reload what you show. */
  reconnect: boolean;
}

export interface PresenceChange {
  joined: string[];
  left: string[];
  /** Everyone viewing the section now. */
  present: string[];
}

export interface Typing {
  session_id: string;
  user: string;
}

export interface ReadMarker {
  session_id: string;
  /** Our marker: the last seq read. */
  seq: number;
}

export interface UnreadChange {
  session_id: string;
  unread: number;
  read: number;
}

export interface Mentioned {
  document_id: string;
  section_id: string;
  message: Message;
}

export interface DocumentDeleted {
  document_id: string;
}

export interface StateChange {
  state: ConnectionState;
  delay?: number;
  attempt?: number;
  code?: number;
  reason?: string;
  user?: string;
  reconnected?: boolean;
}

/** Handlers for `subscribe()`; each stored event reaches them once, in order. */
export interface SubscriptionHandlers {
  onSnapshot?(snapshot: Snapshot): void;
  onSessionCreated?(session: Session, how: How): void;
  onMessage?(message: Message, how: MessageHow): void;
  onSessionClosed?(session: Session, how: How): void;
  /** Revision 1.1: an edit (also served as the tombstone when replayed after a delete). */
  onMessageEdited?(message: Message, how: MessageHow): void;
  /** Revision 1.1: a delete; `message` is the tombstone. */
  onMessageDeleted?(message: Message, how: MessageHow): void;
  /** Revision 1.1: a reaction given or taken back (apply it with `applyReaction`). */
  onReaction?(reaction: Reaction, how: MessageHow): void;
  /** Revision 1.1: title or metadata changed. */
  onSessionUpdated?(session: Session, how: How): void;
  onSessionReopened?(session: Session, how: How): void;
  /**
   * Revision 1.1: a session moved out of this section (`direction: "out"`: drop it) or into it
   * (`"in"`: add it; its messages come with `history`). Once per move and subscription.
   */
  onSessionMoved?(move: SessionMove, how: MoveHow): void;
  /** Revision 1.1: our read marker moved (`own`: our markRead; else another connection of ours). */
  onRead?(marker: ReadMarker, how: { own: boolean }): void;
  /** Revision 1.1: our unread count of a session changed. */
  onUnread?(change: UnreadChange): void;
  onPresence?(change: PresenceChange): void;
  onTyping?(typing: Typing): void;
  onRecovered?(recovered: { missed: number }): void;
  /** The document was deleted: the subscription has ended. */
  onDocumentDeleted?(deleted: DocumentDeleted): void;
  /** The server refused the subscription (e.g. `forbidden`): it has ended. */
  onError?(error: ChatError): void;
}

export interface SubscriptionEvents {
  snapshot: [Snapshot];
  session_created: [Session, How];
  message: [Message, MessageHow];
  session_closed: [Session, How];
  message_edited: [Message, MessageHow];
  message_deleted: [Message, MessageHow];
  reaction: [Reaction, MessageHow];
  session_updated: [Session, How];
  session_reopened: [Session, How];
  session_moved: [SessionMove, MoveHow];
  read: [ReadMarker, { own: boolean }];
  unread: [UnreadChange];
  presence: [PresenceChange];
  typing: [Typing];
  recovered: [{ missed: number }];
  document_deleted: [DocumentDeleted];
  error: [ChatError];
}

export interface DocumentHandlers {
  /** The full list: on the first answer, and again after each reconnect (`reconnect: true`). */
  onDocument?(document: { document_id: string; sections: SectionSummary[]; reconnect: boolean }): void;
  /** One section changed (coalesced by the server, at most once a second); `sessions: 0`: no longer listed. */
  onSectionSummary?(summary: SectionSummary): void;
  onDocumentDeleted?(deleted: DocumentDeleted): void;
  /** The server refused the watch: it has ended. */
  onError?(error: ChatError): void;
}

export interface DocumentWatchEvents {
  document: [{ document_id: string; sections: SectionSummary[]; reconnect: boolean }];
  section_summary: [SectionSummary];
  document_deleted: [DocumentDeleted];
  error: [ChatError];
}

export interface ClientEvents {
  state: [StateChange];
  disconnected: [{ code: number; reason: string }];
  /** A ChatError not tied to a pending request (e.g. a refused `typing`). */
  error: [ChatError];
  /** An event type this module does not know (a newer server's). */
  frame: [Frame];
  /** Revision 1.1: someone mentioned us in a message of a document we may use. */
  mentioned: [Mentioned];
  document_deleted: [DocumentDeleted];
}

declare class Emitter<Events extends { [K in keyof Events]: unknown[] }> {
  /** Listen to `type`; returns a function that stops listening. */
  on<K extends keyof Events & string>(type: K, listener: (...args: Events[K]) => void): () => void;
}

// ---------------------------------------------------------------------------------------
// Subscriptions and watches
// ---------------------------------------------------------------------------------------

/** One section a client follows; its state is kept current across reconnects. */
export class Subscription extends Emitter<SubscriptionEvents> {
  readonly chat: SectionChat;
  readonly documentId: string;
  readonly sectionId: string;
  readonly key: string;
  /** session_id -> Session (last_seq, closed, title, metadata, last_activity_at kept current). */
  sessions: Map<string, Session>;
  presence: Set<string>;
  /** Revision 1.1: session_id -> our read marker. */
  read: Map<string, number>;
  /** Revision 1.1: session_id -> our unread count. */
  unread: Map<string, number>;
  /** true once the server has sent read state (a 1.1 server). */
  readState: boolean;
  epoch: string | null;
  offset: number;
  active: boolean;
  subscribed: boolean;
  readonly ready: Promise<Subscription>;
  attach(handlers?: SubscriptionHandlers): this;
  /** Sessions, newest first by creation. */
  readonly sessionList: Session[];
  /** Sessions, latest activity first. */
  readonly sessionsByActivity: Session[];
  unreadOf(sessionId: string): number;
  readOf(sessionId: string): number;
  unsubscribe(): Promise<void>;
}

/** A document a client watches: every section's summary, kept current. */
export class DocumentWatch extends Emitter<DocumentWatchEvents> {
  readonly chat: SectionChat;
  readonly documentId: string;
  /** section_id -> SectionSummary, in the document's section order. */
  sections: Map<string, SectionSummary>;
  active: boolean;
  watching: boolean;
  readonly ready: Promise<DocumentWatch>;
  attach(handlers?: DocumentHandlers): this;
  readonly sectionList: SectionSummary[];
  unwatch(): Promise<void>;
}

// ---------------------------------------------------------------------------------------
// The client
// ---------------------------------------------------------------------------------------

export interface SectionChatOptions {
  /** User name in open mode (`?name=`). */
  name?: string | null;
  /** JWT in token mode (`?token=`). */
  token?: string | null;
  /** ms before the first reconnect attempt (before jitter); default 250. */
  initialDelay?: number;
  /** ms, the cap of the exponential backoff; default 5000. */
  maxDelay?: number;
  /** ms to wait after a close with 1008; default 15000. */
  policyDelay?: number;
  /** ms of failed attempts before the state says "offline"; default 15000. */
  offlineAfter?: number;
  /** ms for the socket to open and the welcome to arrive; default 10000. */
  connectTimeout?: number;
  /** ms for a reply, counted from when the request is sent; default 15000. */
  requestTimeout?: number;
  /** ms for a message_ack (0: no limit); default 30000. */
  sendTimeout?: number;
  /** ms of silence before a ping (0: never); default 25000. */
  pingInterval?: number;
  /** Resends of a retry-safe request refused with a temporary error; default 3. */
  temporaryRetries?: number;
  /** The WebSocket constructor to use; default globalThis.WebSocket. */
  WebSocket?: typeof WebSocket;
}

export interface RequestOptions {
  timeout?: number;
  /** May it be sent again if the socket drops before the reply? */
  retry?: boolean;
  /** A key: a waiting (unsent) request with the same key is replaced by this one. */
  coalesce?: string | null;
  /** Combine the replaced request's fields with this one's. */
  merge?: ((older: Record<string, unknown>, newer: Record<string, unknown>) => Record<string, unknown>) | null;
}

export interface ListSessionsOptions {
  /** true: only closed sessions; false: only open ones. */
  closed?: boolean | null;
  /** "created" (oldest first, the default) or "activity" (latest activity first). */
  order?: "created" | "activity" | null;
  /** listSessions: at most this many in all; listSessionsPage: the page size (1–1,000). */
  limit?: number | null;
  /** Start after this page's `nextCursor` (same other options). */
  cursor?: string | null;
}

export interface SessionPage {
  sessions: Session[];
  /** session_id -> our read marker. */
  read: Record<string, number>;
  /** session_id -> our unread count. */
  unread: Record<string, number>;
  /** null on the last page. */
  nextCursor: string | null;
}

export interface HistoryPage {
  /** Ascending seq. */
  messages: Message[];
  has_more: boolean;
  hasMore: boolean;
}

export class SectionChat extends Emitter<ClientEvents> {
  constructor(url?: string, options?: SectionChatOptions);
  readonly url: string;
  readonly options: Required<SectionChatOptions>;
  state: ConnectionState;
  welcome: Welcome | null;
  user: string | null;
  limits: Limits | null;
  /** Revision 1.1: the welcome's roles ([] on a 1.0 server or in open mode). */
  roles: string[];
  /** When a reconnect attempt is due (ms since the epoch), or null. */
  nextRetryAt: number | null;
  readonly connected: boolean;
  readonly isModerator: boolean;
  /** Requests waiting to be sent or answered (the outbox). */
  readonly pendingRequests: number;

  // Connection
  connect(): Promise<Welcome>;
  close(): void;
  reconnectNow(): void;

  // Requests
  /** Any request; resolves with the raw reply frame, rejects with a ChatError. */
  request(type: string, fields?: Record<string, unknown>, options?: RequestOptions): Promise<Frame>;
  createSession(documentId: string, sectionId: string, options?: { title?: string | null; idempotencyKey?: string }): Promise<Session>;
  getSession(sessionId: string): Promise<Session>;
  /** Every page (or at most `limit` sessions in all). */
  listSessions(documentId: string, sectionId?: string | null, options?: ListSessionsOptions): Promise<Session[]>;
  /** One page, with read state and the cursor of the next. */
  listSessionsPage(documentId: string, options?: ListSessionsOptions & { sectionId?: string | null }): Promise<SessionPage>;
  send(sessionId: string, text: string, options?: { clientMsgId?: string; timeout?: number; mentions?: string[] | null }): Promise<Message>;
  history(sessionId: string, options?: { beforeSeq?: number | null; afterSeq?: number | null; limit?: number }): Promise<HistoryPage>;
  closeSession(sessionId: string): Promise<Session>;
  /** Fire and forget, only while connected; returns whether it was sent. */
  typing(sessionId: string): boolean;
  ping(): Promise<void>;

  // Revision 1.1 requests
  /** Edit a message (yours, or anyone's as a moderator); `mentions` replace the message's when given. */
  editMessage(sessionId: string, seq: number, text: string, options?: { mentions?: string[] | null }): Promise<Message>;
  /** Delete a message (yours, or anyone's as a moderator); resolves with the tombstone. */
  deleteMessage(sessionId: string, seq: number): Promise<Message>;
  /** Give (`on` true, the default) or take back a reaction; `on` is always sent explicitly. */
  react(sessionId: string, seq: number, reaction: string, on?: boolean): Promise<Reaction>;
  /** Move our read marker to `seq`; resolves with the marker now (never lower than before). */
  markRead(sessionId: string, seq: number): Promise<ReadMarker>;
  /** Change title and/or metadata (creator or moderator): absent unchanged, null clears. */
  updateSession(sessionId: string, changes: { title?: string | null; metadata?: JsonObject | null }): Promise<Session>;
  /** Reopen a closed session (`conflict` if it is open). */
  reopenSession(sessionId: string): Promise<Session>;
  /**
   * Move the named sessions (or every session of the source) to another section of the
   * document, atomically, with their ids, messages, seqs and read markers. Waits in the
   * outbox while offline; resent after a drop (a repeat gets the same reply).
   */
  moveSessions(options: MoveSessionsOptions): Promise<SessionsMoved>;

  // Subscriptions and watches
  subscribe(documentId: string, sectionId: string, handlers?: SubscriptionHandlers): Promise<Subscription>;
  unsubscribe(sub: Subscription): Promise<void>;
  subscriptionOf(sessionId: string): Subscription | null;
  watchDocument(documentId: string, handlers?: DocumentHandlers): Promise<DocumentWatch>;
  unwatchDocument(documentId: string): Promise<void>;
}
