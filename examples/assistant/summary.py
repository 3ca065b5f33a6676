# The assistant's reply logic: plain functions over the protocol's Message dicts
# (as the HTTP API and webhooks carry them). No sockets, no clock, no model:
# `summarize` is the one function a real model call would replace.
#
# Rules kept here:
# - A message is addressed to the assistant when its `mentions` contain the
#   assistant's name, or its text contains "@name" (any case, not followed by a
#   letter, digit, "_" or "-").
# - The summary counts every message that is not deleted and not the
#   assistant's own, per author, most first (ties: who spoke first).
# - A question is a message whose text ends with "?" (trailing spaces aside).
#   It is open while no later message by another author follows it. Messages
#   addressed to the assistant are requests, not conversation: they are never
#   questions and never answer one. The assistant's own messages and tombstones
#   take no part either.
# - The reply stays short whatever the session: at most MAX_AUTHORS authors and
#   MAX_QUESTIONS questions are listed, each question cut at QUESTION_CHARS.

from __future__ import annotations

import re
from collections import Counter
from typing import Any

Message = dict[str, Any]

MAX_AUTHORS = 20
MAX_QUESTIONS = 10
QUESTION_CHARS = 200


def addressed_to(message: Message, name: str) -> bool:
    """Whether the message asks `name` for something (mentions it, or says @name)."""
    if name in message.get("mentions", []):
        return True
    pattern = rf"(?<![\w@])@{re.escape(name)}(?![\w-])"
    return re.search(pattern, message.get("text", ""), re.IGNORECASE) is not None


def is_question(message: Message) -> bool:
    return message.get("text", "").rstrip().endswith("?")


def open_questions(messages: list[Message], name: str) -> list[Message]:
    """The questions of the conversation that no later message by someone else follows, in seq order."""
    talk = [m for m in _said(messages, name) if not addressed_to(m, name)]
    later_authors: set[str] = set()
    found = []
    for message in reversed(talk):
        if is_question(message) and not later_authors - {message["author"]}:
            found.append(message)
        later_authors.add(message["author"])
    return found[::-1]


def summarize(messages: list[Message], name: str = "assistant") -> str:
    """The assistant's reply: who said how much, and the open questions."""
    said = _said(messages, name)
    if not said:
        return "Nothing has been said in this session yet."
    counts = Counter(m["author"] for m in said).most_common()
    per_author = ", ".join(f"{author} {count}" for author, count in counts[:MAX_AUTHORS])
    if len(counts) > MAX_AUTHORS:
        per_author += f", and {len(counts) - MAX_AUTHORS} more"
    people = "1 person" if len(counts) == 1 else f"{len(counts)} people"
    lines = [
        f"Summary so far: {_plural(len(said), 'message')} from {people}.",
        f"Messages per author: {per_author}.",
    ]
    questions = open_questions(messages, name)
    if not questions:
        lines.append("No open questions.")
        return "\n".join(lines)
    lines.append(f"Open questions ({len(questions)}):")
    for question in questions[:MAX_QUESTIONS]:
        lines.append(f"- {question['author']} (#{question['seq']}): {_shorten(question['text'])}")
    if len(questions) > MAX_QUESTIONS:
        lines.append(f"- and {len(questions) - MAX_QUESTIONS} more")
    return "\n".join(lines)


def _said(messages: list[Message], name: str) -> list[Message]:
    """What people said: neither tombstones nor the assistant's own messages."""
    return [m for m in messages if m.get("deleted_at") is None and m["author"] != name]


def _shorten(text: str) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= QUESTION_CHARS else flat[: QUESTION_CHARS - 1] + "…"


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"
