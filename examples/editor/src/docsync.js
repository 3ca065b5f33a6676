// docsync.js: shares the document through serve.py (a stand-in for your editor's own
// collaboration: Y.js, Hocuspocus…). Whole documents, versioned: a save names the
// version it was made on and loses to a newer one (409: the newer one is applied).
// Not part of the chat; the chat goes from the page to the sectionchat server.

export class DocSync {
  constructor(docId, { onRemote, onState }) {
    this.url = new URL(`doc/${encodeURIComponent(docId)}`, location.href).href;
    this.version = 0; // the version our editor shows
    this.onRemote = onRemote; // (content) => void: show someone else's version
    this.onState = onState; // ("saving" | "saved" | "offline") => void
    this.saving = null; // the save in flight
    this.next = null; // content to save once it is done
  }

  /** The current content (null if nobody saved one yet); then follow others' saves. */
  async load() {
    const { version, content } = await (await fetch(`${this.url}?after=-1`)).json();
    this.version = version;
    this.poll();
    return content;
  }

  async poll() {
    for (;;) {
      try {
        const response = await fetch(`${this.url}?after=${this.version}`, { cache: "no-store" });
        const { version, content } = await response.json();
        // A save of ours in flight decides what comes next (its version, or a 409 with the newer one).
        if (this.saving) await this.saving;
        else if (version > this.version) this._adopt(version, content);
      } catch {
        this.onState("offline");
        await new Promise((resolve) => setTimeout(resolve, 1000));
      }
    }
  }

  /** Save our content (one save at a time; the latest waiting one goes next). */
  save(content) {
    this.next = content;
    if (!this.saving) this.saving = this._drain();
  }

  async _drain() {
    while (this.next) {
      const content = this.next;
      this.next = null;
      this.onState("saving");
      try {
        const response = await fetch(this.url, { method: "PUT", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ base: this.version, content }) });
        const body = await response.json();
        if (response.ok) this.version = body.version;
        else if (response.status === 409) this._adopt(body.version, body.content); // someone was first
        this.onState("saved");
      } catch {
        this.next ??= content;
        this.onState("offline");
        await new Promise((resolve) => setTimeout(resolve, 1000));
      }
    }
    this.saving = null;
  }

  _adopt(version, content) {
    this.version = version;
    this.next = null;
    this.onRemote(content);
  }
}
