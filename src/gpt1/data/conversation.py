"""What every chat reader gives back and counts: a conversation, the reasons it left something out,
and the two errors of reading.

`Conversation` is a list of messages and the split group of its message tree; `ChatStats` counts,
by reason, the conversations (or records) a reader skipped and the parts it cut, so that nothing
is silently lost. `Malformed` is one bad record (the file's reader names the file and line, or
skips and counts it with --skip-invalid); `NoRecords`, a file or dataset with none to read (a
folder passes it over, unless none of its files had one). The readers: `gpt1.data.chat_sources`
(files, folders, datasets), `gpt1.data.chat_formats` (one record), `gpt1.data.oasst_trees`
(OASST message trees), `gpt1.data.chatterbot` (its YAML dialogs).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from gpt1.core.errors import Gpt1Error


@dataclass
class Conversation:
    """A list of {"role", "content"} messages; `group` keeps the conversations of one message
    tree together when data is split into train and validation (an OASST tree's id, or the hash of
    a record's root: `gpt1.data.chat_splits.root_group`). An assistant message may hold
    `"weight": 0` (OpenAI's fine-tuning records): its reply is context, not a training target."""

    messages: list[dict[str, str]]
    group: str


# Reasons of ChatStats' counts that more than one module names (the readers, their callers); the
# others are written where they are counted.
TRAILING_USER_TURN = "trailing user turns (no reply)"
OTHER_LANGUAGES = "messages in other languages, with their replies"
NAMES_IGNORED = "message names ignored (the chat template has no names)"
TOOLS_IGNORED = "records whose tool definitions were ignored (the chat template has no tools)"
TOOL_CALLS = "records with tool calls or tool results (not supported)"
EMPTY_FILES = "empty files"
INVALID_UTF8_FILES = "files with invalid UTF-8"  # as text sources count them


@dataclass
class ChatStats:
    conversations: int = 0
    skipped: Counter = field(default_factory=Counter)  # reason -> conversations (or records) left out
    trimmed: Counter = field(default_factory=Counter)  # reason -> kept conversations that lost a part
    sources: Counter = field(default_factory=Counter)  # spec -> conversations read from it
    first_skipped: dict[str, str] = field(default_factory=dict)  # a reason for malformed records -> its first error
    other_languages: Counter = field(default_factory=Counter)  # lang -> messages left out by `languages`
    left_out: set[Path] = field(default_factory=set)  # files of a folder that are not chat data (named once)

    def summary(self) -> str:
        parts = [" + ".join(f"{spec}: {n:,}" for spec, n in self.sources.items())] if len(self.sources) > 1 else []
        parts += [f"{label}: " + ", ".join(f"{why}: {n:,}" for why, n in sorted(counts.items()))
                  for label, counts in (("skipped", self.skipped), ("cut", self.trimmed)) if counts]
        return f"{self.conversations:,} conversations" + (f" ({'; '.join(parts)})" if parts else "")

    def why_empty(self) -> str:
        """The summary, for an error that says no conversation is left, with what tells why: the
        first malformed record skipped, and the languages of the messages `languages` left out
        (codes are compared as written: "EN" keeps no "en")."""
        text = self.summary()
        if self.first_skipped:
            why, error = next(iter(self.first_skipped.items()))
            text += f"; the first of the {why}: {error}"
        if self.other_languages:
            found = ", ".join(f"{lang}: {n:,}" for lang, n in self.other_languages.most_common(10))
            text += f"; the languages left out (messages, with their replies): {found}"
        return text


class NoRecords(Gpt1Error):
    """A chat file or dataset with no record to read: `empty`, or every record skipped."""

    def __init__(self, message: str, empty: bool) -> None:
        super().__init__(message)
        self.empty = empty


class Malformed(Exception):
    """A record that cannot be read; `reason` is what --skip-invalid counts it as (None: malformed)."""

    def __init__(self, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason
