"""Chat sources: OASST2 message trees and other dialog formats -> conversations.

Sources (`read_conversations(spec)`):

- `hf:NAME[@REVISION][:SPLIT]`, a hub name such as `OpenAssistant/oasst2`, or a local dataset folder: read
  with `datasets` (streamed); rows are OASST messages or `{"messages": [...]}` records;
- `*.messages.jsonl[.gz]` / `*.parquet`: OASST's flat export, one message per line / row;
- `*.trees.jsonl[.gz]`: OASST's nested export, one message tree per line;
- any other `.jsonl[.gz]`: sniffed from its first record: OASST messages, OASST trees, or the
  generic chat format `{"messages": [{"role": "user"|"assistant"|"system", "content": ...}]}`;
- `chatterbot` (the English dialogs of the `chatterbot-corpus` package), or `.yml` files /
  folders in its format (each `conversations:` entry alternates user, assistant, user, ...).

OASST trees become conversations (user/assistant turns, ending with an assistant turn):
deleted messages and messages whose review failed are pruned with their replies; so are
messages in other languages (with `languages`), empty messages, messages whose parent does not
exist (orphans) and replies whose role does not alternate. At each level the best-ranked reply
(rank 0; unranked replies come after ranked ones, in file order) is followed, or, with
`all_paths`, every root-to-leaf path. A path ending with a user turn (a prompt no one answered)
loses that turn; a path left with no assistant reply is dropped. Everything dropped is counted
in `ChatStats.skipped`, never silently lost. Files are read through `gpt1.data.readers`: a malformed line (bad JSON, a missing or
mistyped required field) raises Gpt1Error naming the file and line, or is skipped and counted
with `skip_invalid`. Encoding for training is `gpt1.data.chat`.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from gpt1.core.chat_template import validate_messages
from gpt1.core.errors import Gpt1Error
from gpt1.core.imports import require
from gpt1.core.io import walk_folder
from gpt1.core.progress import warn
from gpt1.data.readers import (
    HfSpec,
    dataset_split_names,
    load_hf_dataset,
    parse_hf,
    read_jsonl,
    read_parquet,
    read_yaml,
)

OASST_HUB_NAME = "OpenAssistant/oasst2"
OASST_ROLES = {"prompter": "user", "assistant": "assistant"}
CHATTERBOT = "chatterbot"
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".json.gz", ".ndjson")
YAML_SUFFIXES = (".yml", ".yaml")
# The split group of a {"messages"} record: a hash of its content (see _generic_conversation).
CONTENT_GROUP = "sha256:"


@dataclass
class Conversation:
    """A list of {"role", "content"} messages; `group` keeps the conversations of one message
    tree together when data is split into train and validation."""

    messages: list[dict[str, str]]
    group: str


TRAILING_USER_TURN = "trailing user turns (no reply)"


@dataclass
class ChatStats:
    conversations: int = 0
    skipped: Counter = field(default_factory=Counter)  # reason -> conversations (or records) left out
    trimmed: Counter = field(default_factory=Counter)  # reason -> kept conversations that lost a part

    def summary(self) -> str:
        parts = [f"{label}: " + ", ".join(f"{why}: {n:,}" for why, n in sorted(counts.items()))
                 for label, counts in (("skipped", self.skipped), ("cut", self.trimmed)) if counts]
        return f"{self.conversations:,} conversations" + (f" ({'; '.join(parts)})" if parts else "")


# ---- reading sources -----------------------------------------------------------------------

def read_conversations(spec: str, split: str = "train", *, all_paths: bool = False,
                       languages: Sequence[str] | None = None, skip_invalid: bool = False,
                       stats: ChatStats | None = None) -> list[Conversation]:
    """All conversations of one chat source (see the module docstring for the formats).

    `split` applies to datasets read with `datasets`; local files have no splits.
    `languages`: keep only OASST messages in these languages (e.g. ["en"]); None keeps all.
    """
    stats = stats if stats is not None else ChatStats()
    options = _TreeOptions(all_paths, frozenset(languages) if languages else None, stats)
    conversations = list(_read(spec, split, options, skip_invalid))
    stats.conversations += len(conversations)
    ignored = [name for name, value in (("languages", languages), ("all_paths", all_paths)) if value]
    if ignored and not options.trees_read:  # said once, rather than shape nothing silently
        warn(f"{spec}: {' and '.join(ignored)} apply to OASST message trees; this data has none, "
             f"so {'they are' if len(ignored) > 1 else 'it is'} ignored")
    return conversations


def hf_split_names(spec: str) -> list[str] | None:
    """The splits of a spec read with `datasets` (hub name or dataset folder); None for files."""
    hf = _hf_spec(spec)
    return None if hf is None else dataset_split_names(hf)


def _hf_spec(spec: str) -> HfSpec | None:
    """`hf:...`, a local dataset folder (no YAML inside) or a bare hub name such as OWNER/NAME."""
    if (hf := parse_hf(spec)) is not None:
        return hf
    if os.path.isdir(spec) and not _yaml_files(spec):
        return HfSpec(spec)
    looks_like_file = spec.lower().endswith(JSONL_SUFFIXES + YAML_SUFFIXES + (".parquet",))
    if not os.path.exists(spec) and spec.count("/") == 1 and not looks_like_file and not spec.startswith((".", "/")):
        return parse_hf("hf:" + spec)  # a hub name, e.g. OpenAssistant/oasst2
    return None


@dataclass
class _TreeOptions:
    all_paths: bool
    languages: frozenset[str] | None
    stats: ChatStats
    trees_read: bool = False  # whether the source had OASST message trees (the options apply to them)


def _read(spec: str, split: str, options: _TreeOptions, skip_invalid: bool) -> Iterator[Conversation]:
    if spec == CHATTERBOT or spec.startswith(CHATTERBOT + ":"):
        # The shipped corpus has a malformed entry (trivia.yml): it is skipped and counted.
        yield from _read_chatterbot(_chatterbot_files(spec), options.stats, skip_invalid=True)
        return
    hf = _hf_spec(spec)
    if hf is not None:
        hf = HfSpec(hf.name, hf.revision, hf.split or split)
        yield from _read_rows(enumerate(load_hf_dataset(hf)), str(hf), "row", options, skip_invalid)
        return
    if not os.path.exists(spec):
        raise Gpt1Error(f"{spec}: no such file or directory (expected a chat file, a dataset folder, "
                        f"hf:NAME, a hub name such as {OASST_HUB_NAME}, or {CHATTERBOT})")
    if os.path.isdir(spec) or spec.lower().endswith(YAML_SUFFIXES):
        files = _yaml_files(spec) if os.path.isdir(spec) else [Path(spec)]
        if os.path.isdir(spec):  # chatterbot dialogs; anything else there would be left out, silently
            others = [p for p in _files_below(spec) if p.name.lower().endswith(JSONL_SUFFIXES + (".json", ".parquet"))]
            if others:
                raise Gpt1Error(f"{spec}: holds chatterbot .yml dialogs and other chat files ({others[0].name}"
                                f"{' and more' if len(others) > 1 else ''}), and reads one kind; pass the files "
                                "of one kind (a folder of them, or one file)")
        yield from _read_chatterbot(files, options.stats, skip_invalid)
    elif spec.lower().endswith(".parquet"):
        yield from _read_rows(read_parquet(spec), spec, "row", options, skip_invalid)
    elif spec.lower().endswith(JSONL_SUFFIXES):
        rows = read_jsonl(spec, skip_invalid=skip_invalid, skipped=options.stats.skipped)
        yield from _read_rows(rows, spec, "line", options, skip_invalid)
    else:
        raise Gpt1Error(f"{spec}: unknown chat file type (expected .jsonl, .jsonl.gz, .parquet, .yml)")


class _Malformed(Exception):
    pass


def _read_rows(rows: Iterable[tuple[int, Any]], source: str, unit: str, options: _TreeOptions,
               skip_invalid: bool) -> Iterator[Conversation]:
    """Rows of OASST messages, OASST trees or {"messages": [...]} records; the first row decides."""
    kind = None
    messages: list[dict] = []
    for number, record in rows:
        try:
            if not isinstance(record, dict):
                raise _Malformed("expected a JSON object")
            if kind is None:
                kind = _record_kind(record)
            if kind == "messages":
                messages.append(_oasst_message(record))
            elif kind == "trees":
                yield from _tree_conversations(_flatten_tree(record), options)
            else:
                conversation = _generic_conversation(record, options.stats)
                if conversation is not None:
                    yield conversation
        except _Malformed as e:
            if skip_invalid:
                options.stats.skipped[f"malformed {unit}s"] += 1
                continue
            raise Gpt1Error(f"{source}, {unit} {number}: {e} (pass --skip-invalid to skip bad {unit}s)") from None
    if kind == "messages":
        yield from _tree_conversations(messages, options)
    elif kind is None:
        raise Gpt1Error(f"{source}: no conversations found (the source is empty)")


def _record_kind(record: dict) -> str:
    if "message_id" in record:
        return "messages"
    if "prompt" in record and isinstance(record["prompt"], dict):
        return "trees"
    if "messages" in record:
        return "chat"
    raise _Malformed("expected an OASST message (message_id, parent_id, role, text), an OASST tree "
                     "(prompt with replies) or a chat record with a 'messages' list; found fields: "
                     + ", ".join(sorted(record)))


# ---- OASST ---------------------------------------------------------------------------------

def _oasst_message(record: dict) -> dict:
    """Validate one OASST message record; raise _Malformed naming the bad field."""
    for name in ("message_id", "parent_id", "role", "text"):
        if name not in record:
            raise _Malformed(f"missing required field {name!r}")
    if not isinstance(record["message_id"], str) or not record["message_id"]:
        raise _Malformed("field 'message_id' must be a non-empty string")
    if record["parent_id"] is not None and not isinstance(record["parent_id"], str):
        raise _Malformed("field 'parent_id' must be a string or null")
    if record["role"] not in OASST_ROLES:
        raise _Malformed(f"field 'role' must be 'prompter' or 'assistant', got {record['role']!r}")
    if not isinstance(record["text"], str):
        raise _Malformed(f"field 'text' must be a string, got {type(record['text']).__name__}")
    rank = record.get("rank")
    if rank is not None and (not isinstance(rank, (int, float)) or isinstance(rank, bool)):
        raise _Malformed(f"field 'rank' must be a number or null, got {rank!r}")
    return record


def _flatten_tree(record: dict) -> list[dict]:
    """The messages of a nested `*.trees.jsonl` tree, with parent ids taken from the nesting."""
    if not isinstance(record.get("prompt"), dict):
        raise _Malformed("expected an OASST tree with a 'prompt' object")
    tree_id = record.get("message_tree_id")
    out: list[dict] = []
    stack: list[tuple[dict, str | None]] = [(record["prompt"], None)]
    while stack:
        node, parent = stack.pop()
        if not isinstance(node, dict):
            raise _Malformed("expected each message of the tree to be an object")
        message = _oasst_message({**node, "parent_id": parent, "message_tree_id": tree_id})
        replies = node.get("replies") or []
        if not isinstance(replies, list):
            raise _Malformed(f"message {message['message_id']}: field 'replies' must be a list")
        out.append(message)
        stack.extend((reply, message["message_id"]) for reply in reversed(replies))
    return out


def _tree_conversations(messages: list[dict], options: _TreeOptions) -> Iterator[Conversation]:
    """Build the message trees and walk them into conversations (rules in the module docstring)."""
    options.trees_read = True
    skipped = options.stats.skipped
    by_id: dict[str, dict] = {}
    for m in messages:
        if m["message_id"] in by_id:
            skipped["duplicate message ids"] += 1
        else:
            by_id[m["message_id"]] = m
    children: dict[str, list[dict]] = defaultdict(list)
    roots = []
    for m in by_id.values():
        parent = m["parent_id"]
        if parent is None:
            roots.append(m)
        elif parent in by_id:
            children[parent].append(m)
        else:
            skipped["orphan messages (parent not found), with their replies"] += 1

    def prune_reason(m: dict, parent: dict | None) -> str | None:
        if m.get("deleted"):
            return "deleted messages, with their replies"
        if m.get("review_result") is False:
            return "messages that failed review, with their replies"
        if options.languages is not None and m.get("lang") not in options.languages:
            return "messages in other languages, with their replies"
        if not m["text"].strip():
            return "empty messages, with their replies"
        expected = "prompter" if parent is None or parent["role"] == "assistant" else "assistant"
        if m["role"] != expected:
            return "messages out of turn order, with their replies"
        return None

    def usable(m: dict, parent: dict | None) -> bool:
        reason = prune_reason(m, parent)
        if reason:
            skipped[reason] += 1
        return reason is None

    order = {id(m): i for i, m in enumerate(by_id.values())}

    def rank_key(m: dict) -> tuple:
        rank = m.get("rank")
        return (rank is None, rank if rank is not None else 0, order[id(m)])

    seen: set[tuple[str, ...]] = set()
    for root in roots:
        if not usable(root, None):
            continue
        stack = [[root]]
        while stack:
            path = stack.pop()
            replies = [c for c in children.get(path[-1]["message_id"], []) if usable(c, path[-1])]
            if replies and options.all_paths:
                stack.extend(path + [c] for c in reversed(replies))
                continue
            if replies:
                stack.append(path + [min(replies, key=rank_key)])
                continue
            trailing_user_turn = path[-1]["role"] == "prompter"
            if trailing_user_turn:
                path = path[:-1]
            if not path:
                skipped["conversations without an assistant reply"] += 1
                continue
            key = tuple(m["message_id"] for m in path)
            if key in seen:
                continue
            seen.add(key)
            if trailing_user_turn:
                options.stats.trimmed[TRAILING_USER_TURN] += 1
            yield Conversation(
                messages=[{"role": OASST_ROLES[m["role"]], "content": m["text"]} for m in path],
                group=str(root.get("message_tree_id") or root["message_id"]),
            )


# ---- generic chat records and chatterbot ---------------------------------------------------

def _generic_conversation(record: dict, stats: ChatStats) -> Conversation | None:
    """A {"messages": [...]} record as a conversation, pruned and counted as OASST's and
    chatterbot's are. Its group is its content, not where it was read: the validation split is
    then the same however the file's path is spelled or wherever it moves (`gpt1 eval --chat`
    scores what the run held out), and copies of a dialog land on the same side."""
    try:
        messages = validate_messages(record.get("messages"), source="field 'messages'")
    except Gpt1Error as e:
        raise _Malformed(str(e)) from None
    messages = [{"role": m["role"], "content": m["content"]} for m in messages]
    if any(not m["content"].strip() for m in messages):
        stats.skipped["conversations with an empty message"] += 1
        return None
    turns = messages[1:] if messages[0]["role"] == "system" else messages
    if any(m["role"] != ("user" if i % 2 == 0 else "assistant") for i, m in enumerate(turns)):
        stats.skipped["conversations out of turn order (after an optional system message: user, assistant, ...)"] += 1
        return None
    trailing_user_turn = bool(turns) and turns[-1]["role"] == "user"
    if trailing_user_turn:
        messages = messages[:-1]
    if not messages or messages[-1]["role"] != "assistant":
        stats.skipped["conversations without an assistant reply"] += 1
        return None
    if trailing_user_turn:
        stats.trimmed[TRAILING_USER_TURN] += 1
    content = json.dumps(messages, ensure_ascii=False, sort_keys=True).encode("utf-8", "surrogatepass")
    return Conversation(messages, CONTENT_GROUP + hashlib.sha256(content).hexdigest()[:16])


def _chatterbot_files(spec: str) -> list[Path]:
    chatterbot_corpus = require("chatterbot_corpus", "reading chatterbot dialogs", "pip install chatterbot-corpus")
    language = spec.partition(":")[2] or "english"
    folder = Path(chatterbot_corpus.__file__).parent / "data" / language
    if not folder.is_dir():
        known = sorted(p.name for p in folder.parent.iterdir() if p.is_dir())
        raise Gpt1Error(f"{spec}: chatterbot-corpus has no language {language!r} (known: {', '.join(known)})")
    return _yaml_files(folder)


def _yaml_files(folder: str | Path) -> list[Path]:
    return [p for p in _files_below(folder) if p.suffix.lower() in YAML_SUFFIXES]


def _files_below(folder: str | Path) -> list[Path]:
    """Every file below `folder`, sorted; links to folders followed, each folder once (as text sources)."""
    return sorted(Path(root, name) for root, _, files in walk_folder(folder) for name in files)


def _read_chatterbot(files: list[Path], stats: ChatStats, skip_invalid: bool) -> Iterator[Conversation]:
    for file in files:
        data = read_yaml(file)
        dialogs = data.get("conversations") if isinstance(data, dict) else None
        if not isinstance(dialogs, list):
            raise Gpt1Error(f"{file}: expected a 'conversations:' list of dialogs")
        for i, turns in enumerate(dialogs):
            if not isinstance(turns, list) or not all(isinstance(t, str) for t in turns):
                if skip_invalid:
                    stats.skipped["malformed dialogs"] += 1
                    continue
                raise Gpt1Error(f"{file}: conversations[{i}] must be a list of strings "
                                "(pass --skip-invalid to skip bad dialogs)")
            if any(not t.strip() for t in turns):
                stats.skipped["conversations with an empty message"] += 1
                continue
            if len(turns) % 2:
                turns = turns[:-1]
                if turns:
                    stats.trimmed[TRAILING_USER_TURN] += 1
            if not turns:
                stats.skipped["conversations without an assistant reply"] += 1
                continue
            messages = [{"role": "user" if j % 2 == 0 else "assistant", "content": t} for j, t in enumerate(turns)]
            yield Conversation(messages, f"{file.name}:{i}")


# ---- train / validation split --------------------------------------------------------------

def split_conversations(conversations: list[Conversation], val_fraction: float,
                        seed: int = 0) -> tuple[list[Conversation], list[Conversation]]:
    """A deterministic split by `group` (a whole message tree lands on one side). As in `gpt1
    prepare`, a fraction > 0 holds out at least one of two or more trees: when none fell under
    it, the tree with the smallest hash (other splits are unchanged); and training always keeps
    one (a single tree whose hash fell under the fraction was held out, leaving nothing to train on)."""
    scores = {c.group: int.from_bytes(hashlib.sha256(f"{seed}:{c.group}".encode()).digest()[:8], "big") / 2**64
              for c in conversations}
    held_out = {g for g, score in scores.items() if score < val_fraction}
    if val_fraction > 0 and not held_out and len(scores) >= 2:
        held_out = {min(scores, key=scores.get)}
    if scores and held_out == set(scores):  # and never every tree: training keeps the highest-scored one
        held_out.discard(max(scores, key=scores.get))
    return ([c for c in conversations if c.group not in held_out], [c for c in conversations if c.group in held_out])


def conversations_fingerprint(conversations: Iterable[Conversation]) -> str:
    """sha256 of conversations (each one's group and messages, in order). Fine-tuning records
    that of the conversations it held out, so `gpt1 eval --chat` can tell whether the split it
    makes today holds out the same ones."""
    digest = hashlib.sha256()
    for c in conversations:  # one JSON line each: no line of one can run into the next
        line = json.dumps([c.group, c.messages], ensure_ascii=False, sort_keys=True) + "\n"
        digest.update(line.encode("utf-8", "surrogatepass"))
    return digest.hexdigest()


def grouped_by_content(conversations: Iterable[Conversation]) -> bool:
    """Whether these are {"messages"} records, the one source whose split changed: until
    2026-12-05 (a15eed6) a record's group was its file and line (the path as typed), so a run
    made before then held out other records than `split_conversations` holds out now."""
    return any(c.group.startswith(CONTENT_GROUP) for c in conversations)


