// panel.js: the side panel with one section's chats, on the embeddable sectionchat.js:
// the section's sessions (live), starting one, its messages (history, then live) and
// writing. A session that moves away while shown says where it went and follows on
// request; one that moves in appears in the list. User text is only ever textContent.

const $ = (id) => document.getElementById(id);

export function el(tag, { dataset = {}, ...props } = {}, ...children) {
  const node = Object.assign(document.createElement(tag), props);
  Object.assign(node.dataset, dataset);
  node.append(...children.filter((child) => child != null));
  return node;
}

export class ChatPanel {
  constructor(chat, documentId, { describeError, labelOf, notify, onSection }) {
    Object.assign(this, { chat, documentId, describeError, labelOf, notify, onSection });
    this.sub = null;
    this.sectionId = null;
    this.gen = 0; // bumps when the section changes: callbacks for the old one are dropped
    this.open = null; // {sessionId, messages: Map(seq -> Message), oldest, moved: {what, to, sessionId} once it moved away}
    this.note = null; // {what, to, sessionId}: a listed chat that moved away
    $("new-chat").addEventListener("submit", (event) => this._create(event));
    $("composer").addEventListener("submit", (event) => this._send(event));
    $("message").addEventListener("keydown", (event) => {
      if (event.key === "Enter" && !event.shiftKey && !event.isComposing) this._send(event);
    });
    $("chat-back").addEventListener("click", () => this.closeChat());
    $("older").addEventListener("click", () => this._loadOlder());
  }

  /** Show the chats of `sectionId` (and open `sessionId`, if given; `focus`: its message box). */
  async show(sectionId, { sessionId = null, focus = true } = {}) {
    if (sectionId !== this.sectionId) {
      this.sub?.unsubscribe();
      this.sub = null;
      this.sectionId = sectionId;
      this.closeChat();
      this._note(null);
      const gen = ++this.gen;
      const live = (fn) => (...args) => gen === this.gen && fn(...args);
      this.relabel();
      $("panel-hint").hidden = true;
      $("panel-body").hidden = false;
      $("panel").dataset.sectionId = sectionId;
      this.onSection(sectionId); // the page highlights it
      const render = live(() => this.renderList());
      try {
        const sub = await this.chat.subscribe(this.documentId, sectionId, {
          onSnapshot: render,
          onSessionCreated: render,
          onSessionClosed: render,
          onSessionUpdated: render,
          onSessionReopened: render,
          onUnread: render,
          onMessage: live((message) => this._onMessage(message)),
          onSessionMoved: live((move, how) => this._onMoved(move, how)),
          onError: live((error) => this.notify(this.describeError(error))),
        });
        if (gen !== this.gen) return;
        this.sub = sub;
        this.renderList();
      } catch (error) {
        if (gen === this.gen) this.notify(this.describeError(error));
        return;
      }
    }
    if (sessionId && this.open?.sessionId !== sessionId) await this.openChat(sessionId, { focus });
  }

  /** Section titles as the document shows them now (call after the document changed). */
  relabel() {
    const id = this.sectionId;
    if (id !== null) $("panel-title").textContent = `Chats · ${this.labelOf(id) ?? `${id} (no heading now)`}`;
    for (const [box, note] of [["moved", this.open?.moved], ["panel-note", this.note]]) {
      if (note) $(`${box}-text`).textContent = `${note.what} moved to “${this.labelOf(note.to) ?? note.to}”.`;
    }
  }

  renderList() {
    const sessions = this.sub ? this.sub.sessionsByActivity : [];
    $("session-list").replaceChildren(
      ...sessions.map((session) => {
        const unread = this.sub.unreadOf(session.session_id);
        const button = el(
          "button",
          { type: "button", onclick: () => this.openChat(session.session_id) },
          el("span", { textContent: session.title ?? "Untitled chat" }),
          el("span", { className: "meta", textContent: `${session.last_seq} msg${session.closed ? " · closed" : ""}` }),
          unread ? el("span", { className: "unread", textContent: String(unread), title: `${unread} unread` }) : null,
        );
        return el("li", { dataset: { sessionId: session.session_id, unread } }, button);
      }),
    );
    $("no-sessions").hidden = sessions.length > 0;
  }

  async openChat(sessionId, { focus = true } = {}) {
    const session = this.sub?.sessions.get(sessionId);
    if (!session) return;
    const view = (this.open = { sessionId, messages: new Map(), oldest: null, moved: null });
    $("panel-body").hidden = true;
    $("chat-view").hidden = false;
    $("chat-view").dataset.sessionId = sessionId;
    $("chat-title").textContent = session.title ?? "Untitled chat";
    $("messages").replaceChildren();
    this._moved(null);
    try {
      const page = await this.chat.history(sessionId);
      if (view !== this.open) return;
      view.oldest = page.messages[0]?.seq ?? null;
      $("older").hidden = !page.has_more;
      this._show(page.messages);
      if (focus) $("message").focus();
    } catch (error) {
      this.notify(this.describeError(error));
    }
  }

  closeChat() {
    this.open = null;
    $("chat-view").hidden = true;
    delete $("chat-view").dataset.sessionId;
    $("panel-body").hidden = this.sectionId === null;
  }

  async _loadOlder() {
    const view = this.open;
    if (!view?.oldest) return;
    const page = await this.chat.history(view.sessionId, { beforeSeq: view.oldest }).catch(() => null);
    if (!page || view !== this.open) return;
    view.oldest = page.messages[0]?.seq ?? view.oldest;
    $("older").hidden = !page.has_more;
    this._show(page.messages);
  }

  /** Add messages to the open chat (a live one may also be in a history page: keyed by seq). */
  _show(messages) {
    const view = this.open;
    for (const message of messages) view.messages.set(message.seq, message);
    const sorted = [...view.messages.values()].sort((a, b) => a.seq - b.seq);
    $("messages").replaceChildren(
      ...sorted.map((m) =>
        el("li", { dataset: { seq: m.seq, author: m.author } }, el("span", { className: "author", textContent: m.author }), el("span", { className: "text", textContent: m.deleted_at ? "(deleted)" : m.text })),
      ),
    );
    const last = this.sub?.sessions.get(view.sessionId)?.last_seq ?? 0;
    if (last > 0 && !view.moved) this.chat.markRead(view.sessionId, last).catch(() => {});
  }

  _onMessage(message) {
    this.renderList();
    if (this.open?.sessionId === message.session_id) this._show([message]);
  }

  _onMoved({ session, to_section_id: to }, { direction, own }) {
    this.renderList();
    const id = session.session_id;
    const wasOpen = this.open?.sessionId === id;
    if (direction === "in") {
      // Back where it was (an undo): the notes about it no longer hold.
      if (wasOpen && this.open.moved) {
        this.open.moved = null;
        this._moved(null);
      }
      if (this.note?.sessionId === id) this._note(null);
      return;
    }
    if (own) {
      // Our own edit moved it (a rename, a merge, a delete): the panel follows the text.
      this.show(to, { sessionId: wasOpen ? id : null, focus: false }); // the author goes on writing
      return;
    }
    const follow = () => this.show(to, { sessionId: session.session_id });
    if (wasOpen) {
      this.open.moved = { what: "This chat", to, sessionId: id };
      this._moved(follow);
    } else {
      this.note = { what: `“${session.title ?? "Untitled chat"}”`, to, sessionId: id };
      this._note(follow);
    }
    this.relabel();
  }

  /** The open chat moved away (`follow`: go there), or not (null). */
  _moved(follow) {
    $("moved-note").hidden = !follow;
    $("message").disabled = $("composer").querySelector("button").disabled = Boolean(follow);
    $("moved-follow").textContent = "Open it there";
    $("moved-follow").onclick = follow;
  }

  _note(follow) {
    if (!follow) this.note = null;
    $("panel-note").hidden = !follow;
    $("panel-note-go").textContent = "Follow it";
    $("panel-note-go").onclick = follow;
  }

  async _create(event) {
    event.preventDefault();
    const input = $("new-chat-title");
    const sectionId = this.sectionId;
    try {
      const session = await this.chat.createSession(this.documentId, sectionId, { title: input.value.trim() || null });
      input.value = "";
      if (sectionId === this.sectionId) await this.openChat(session.session_id);
    } catch (error) {
      this.notify(`The chat was not started. ${this.describeError(error)}`);
    }
  }

  async _send(event) {
    event.preventDefault();
    const box = $("message");
    const text = box.value.trim();
    if (!text || !this.open || this.open.moved) return;
    box.value = "";
    try {
      await this.chat.send(this.open.sessionId, text); // the message comes back through onMessage, once
    } catch (error) {
      box.value = text;
      this.notify(this.describeError(error));
    }
  }
}
