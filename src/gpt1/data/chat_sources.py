"""Chat sources: OASST2 message trees and other dialog formats -> conversations.

Sources (`read_conversations(spec)`):

- `hf:NAME[@REVISION][:SPLIT]` (`hf:NAME[@REVISION]:CONFIG:SPLIT` for one of its configs) or a hub
  name such as `OpenAssistant/oasst2`: read with `datasets`
  (streamed); rows are OASST messages or `{"messages": [...]}` records. So is a local folder that
  `datasets` defines: one written by `save_to_disk`, or a dataset repository whose README.md
  lists its data files (`configs:`, as the hub's downloads have);
- `*.messages.jsonl[.gz]` / `*.parquet`: OASST's flat export, one message per line / row;
- `*.trees.jsonl[.gz]`: OASST's nested export, one message tree per line;
- any other `.jsonl[.gz]`, and a `.json[.gz]` of JSON Lines or of one array of records
  (`alpaca_data.json`; records numbered from 0 in errors): the format of the first record decides
  the file's (RECORD_FORMATS), and a later record of another format is refused, as a malformed one:
  OASST messages, OASST trees, or records that each give a conversation:
  - `{"messages": [{"role": "user"|"assistant"|"system", "content": ...}]}` (OpenAI's fine-tuning
    records: `"weight": 0` on an assistant message keeps that reply out of the loss, and is allowed
    on the other messages, which are never trained; `name` is ignored, and counted; tool calls are
    refused, and a `tools` field, the functions offered, is ignored and counted);
  - ShareGPT's `{"conversations": [{"from": "human"|"gpt"|"system", "value": ...}]}` (also `user`,
    `assistant`, or turns of `role` and `content`);
  - Alpaca's `{"instruction", "input", "output"}`: the user's turn is the instruction, then a blank
    line and the input when it has one (litgpt's layout, without Alpaca's preamble: gpt1's chat
    template marks the turns), the reply the output; LLaMA-Factory's `history`, `[[prompt, reply],
    ...]`, gives the turns before them;
  - TRL's `{"prompt", "completion"}`: two strings (a user turn and its reply), or two lists of
    messages (the prompt's assistant messages are context, with weight 0, as TRL trains on the
    completion only);
  each read as the `{"messages"}` record of the same turns (the same checks, conversation and split).
  In each, a `system` field is the system message: one that its messages also start with is
  taken once, and a different system message there is refused (one per conversation).
  A null key is an absent one, as parquet and `datasets` give every row every column and every
  message struct every key;
- `chatterbot` (the English dialogs of the `chatterbot-corpus` package), or `.yml` files in its
  format (each `conversations:` entry alternates user, assistant, user, ...);
- any other folder: every chat file below it (the suffixes above), each read as if named alone,
  in sorted order; hidden files and folders are skipped, and files of other types are left out
  and named. When its files are named for splits as `datasets` names them (`train.jsonl`,
  `validation.jsonl`, `chats_dev.jsonl`, `test/...`), they are the folder's splits; a folder where
  some files name a split and others none is refused, naming the others (`datasets` dropped them),
  and so is one with a file whose path names two splits (`train/test_part.jsonl`).
  An empty file, or one whose every record `skip_invalid` skipped, is passed over (an empty one
  counted); the folder is refused only when none of its files has a record.

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

The train/validation split (`split_conversations`) keeps a message tree on one side: an OASST
tree is its root message's tree; a record or chatterbot dialog belongs to the tree of its root,
the system message (if any) and the first user turn, by their text: copies of a dialog, and paths
of one tree written as records (the same first turn, other later turns), land on the same side.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import math
import os
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from gpt1.core.chat_template import validate_messages
from gpt1.core.errors import Gpt1Error
from gpt1.core.imports import require
from gpt1.core.progress import warn
from gpt1.core.reading import walk_folder
from gpt1.core.tokenizer import check_text
from gpt1.data.readers import (
    JSON_SUFFIXES,
    JSONL_SUFFIXES,
    PARQUET_SUFFIXES,
    BadRecord,
    HfSpec,
    check_no_lone_surrogates,
    dataset_split_names,
    declares_data_files,
    holds_json_array,
    load_hf_dataset,
    parse_hf,
    read_json_array,
    read_jsonl,
    read_parquet,
    read_yaml,
    saved_to_disk,
)
from gpt1.data.sources import SKIPPED_DIRS, check_not_datasets_files

OASST_HUB_NAME = "OpenAssistant/oasst2"
OASST_ROLES = {"prompter": "user", "assistant": "assistant"}
CHATTERBOT = "chatterbot"
YAML_SUFFIXES = (".yml", ".yaml")
CHAT_SUFFIXES = JSONL_SUFFIXES + PARQUET_SUFFIXES + YAML_SUFFIXES  # the reader layer's tables, as for text
# The words that name a split in a file's path inside a folder, as `datasets` reads them (its
# SPLIT_KEYWORDS, between separators, case-sensitive as its patterns are): train.jsonl, chats_dev.jsonl,
# validation/a.jsonl; Train.jsonl names none.
SPLIT_WORDS = {"train": ("train", "training"), "validation": ("validation", "valid", "dev", "val"),
               "test": ("test", "testing", "eval", "evaluation")}
# The split group of a {"messages"} record or chatterbot dialog: a hash of its root's text (`_root_group`).
CONTENT_GROUP = "sha256:"
# The formats of a chat file's records, as errors name them (module docstring).
RECORD_FORMATS = {
    "oasst messages": "an OASST message (message_id, parent_id, role, text)",
    "oasst trees": "an OASST tree (prompt with replies)",
    "messages": 'a chat record ({"messages": [{role, content}, ...]}: OpenAI\'s, TRL\'s)',
    "sharegpt": 'a ShareGPT record ({"conversations": [{from, value}, ...]})',
    "alpaca": "an Alpaca record (instruction, input, output)",
    "prompt/completion": "a prompt/completion record (TRL's: prompt, completion)",
}
# ShareGPT's speakers (`from`), as axolotl and LLaMA-Factory read them; their tool turns are refused.
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
SHAREGPT_TOOL_ROLES = ("function_call", "observation", "tool", "function")


@dataclass
class Conversation:
    """A list of {"role", "content"} messages; `group` keeps the conversations of one message
    tree together when data is split into train and validation (an OASST tree's id, or the hash of
    a record's root: `_root_group`). An assistant message may hold
    `"weight": 0` (OpenAI's fine-tuning records): its reply is context, not a training target."""

    messages: list[dict[str, str]]
    group: str


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


# ---- reading sources -----------------------------------------------------------------------

def read_conversations(spec: str, split: str = "train", *, all_paths: bool = False,
                       languages: Sequence[str] | None = None, skip_invalid: bool = False,
                       stats: ChatStats | None = None) -> list[Conversation]:
    """All conversations of one chat source (see the module docstring for the formats).

    `split` applies to datasets read with `datasets` and folders whose files are named for
    splits; local files have no splits.
    `languages`: keep only OASST messages in these languages (e.g. ["en"]); None keeps all.
    """
    stats = stats if stats is not None else ChatStats()
    options = _TreeOptions(all_paths, frozenset(languages) if languages else None, stats)
    names, tools = stats.trimmed[NAMES_IGNORED], stats.trimmed[TOOLS_IGNORED]
    conversations = list(_read(spec, split, options, skip_invalid))
    stats.conversations += len(conversations)
    stats.sources[spec] += len(conversations)
    ignored = [name for name, value in (("languages", languages), ("all_paths", all_paths)) if value]
    if ignored and not options.trees_read:  # said once, rather than shape nothing silently
        warn(f"{spec}: {' and '.join(ignored)} apply to OASST message trees; this data has none, "
             f"so {'they are' if len(ignored) > 1 else 'it is'} ignored")
    if (names := stats.trimmed[NAMES_IGNORED] - names) > 0:
        warn(f"{spec}: 'name' on {names:,} message{'s' if names > 1 else ''} is ignored (gpt1's chat template "
             "has no speaker names)")
    if (tools := stats.trimmed[TOOLS_IGNORED] - tools) > 0:
        warn(f"{spec}: 'tools' (the functions a model may call) on {tools:,} record{'s' if tools > 1 else ''} "
             "is ignored: gpt1's chat template has no tools, and records that call them are refused")
    return conversations


def hf_split_names(spec: str) -> list[str] | None:
    """The splits of a source that has them: a dataset read with `datasets` (hub name or dataset
    folder), or a folder whose files are named for splits. None: no splits (a file, a folder whose
    files name none, chatterbot)."""
    hf = _hf_spec(spec)
    if hf is not None:
        return dataset_split_names(hf)
    if os.path.isdir(spec):
        splits = _ChatFolder(spec).splits
        return sorted(splits) if splits else None
    return None


def _hf_spec(spec: str) -> HfSpec | None:
    """`hf:...`, a local folder that `datasets` defines (save_to_disk, or a dataset card listing
    its data files) or a bare hub name such as OWNER/NAME; None: gpt1's own readers read it."""
    if (hf := parse_hf(spec)) is not None:
        return hf
    if os.path.isdir(spec):
        return HfSpec(spec) if saved_to_disk(spec) or declares_data_files(spec) else None
    looks_like_file = spec.lower().endswith(CHAT_SUFFIXES)
    if (not os.path.exists(spec) and spec.count("/") == 1 and not looks_like_file and not spec.startswith((".", "/"))
            and not glob.has_magic(spec)):
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
        hf = dataclasses.replace(hf, split=hf.split or split)
        yield from _read_rows(enumerate(load_hf_dataset(hf)), str(hf), "row", options, skip_invalid)
        return
    if not os.path.exists(spec):
        pattern = " (a pattern: chat sources take none; repeat --data for each file, or pass their folder)" \
            if glob.has_magic(spec) else ""
        raise Gpt1Error(f"{spec}: no such file or directory{pattern} (expected a chat file, a folder of them, "
                        f"hf:NAME, a hub name such as {OASST_HUB_NAME}, or {CHATTERBOT})")
    if os.path.isdir(spec):
        yield from _read_folder(spec, split, options, skip_invalid)
    else:
        yield from _read_file(Path(spec), options, skip_invalid)


def _read_folder(spec: str, split: str, options: _TreeOptions, skip_invalid: bool) -> Iterator[Conversation]:
    """A folder's files of `split` in turn. One without a record (empty, as `prepare` folders
    take them, or every record skipped) is passed over, an empty one counted; the folder is
    refused only when none of its files had a record."""
    folder = _ChatFolder(spec)
    files = folder.files(split)
    if others := [path for path in folder.others if path not in options.stats.left_out]:  # said once a run
        options.stats.left_out.update(others)
        warn(f"{spec}: left out {len(others):,} file{'s' if len(others) > 1 else ''} that "
             f"{'are' if len(others) > 1 else 'is'} not chat data ({', '.join(CHAT_SUFFIXES)}): "
             f"{folder.names(others)}")
    passed_over: list[_NoRecords] = []
    for file in files:
        try:
            yield from _read_file(file, options, skip_invalid)
        except _NoRecords as e:  # raised before the file gave a conversation: nothing to take back
            passed_over.append(e)
            if e.empty:
                options.stats.skipped[EMPTY_FILES] += 1
    if len(passed_over) == len(files):
        reasons = [str(e) for e in passed_over if not e.empty]
        if not reasons:
            raise Gpt1Error(f"{spec}: no conversations found (every chat file is empty: {folder.names(files)})")
        empty = f" ({len(files) - len(reasons):,} empty)" if len(reasons) < len(files) else ""
        raise Gpt1Error(f"{spec}: no conversations found in any of its chat files{empty}; {reasons[0]}")


def _read_file(path: Path, options: _TreeOptions, skip_invalid: bool) -> Iterator[Conversation]:
    name = path.name.lower()
    if name.endswith(YAML_SUFFIXES):
        yield from _read_chatterbot([path], options.stats, skip_invalid)
        return
    first_skipped: dict[str, str] = {}  # the reader's first error of each kind of record it skipped
    how = dict(skip_invalid=skip_invalid, skipped=options.stats.skipped, first_skipped=first_skipped)
    if name.endswith(PARQUET_SUFFIXES):
        rows, unit = read_parquet(path, **how), "row"
    elif name.endswith(JSON_SUFFIXES) and holds_json_array(path):
        rows, unit = read_json_array(path, **how), "record"
    elif name.endswith(JSONL_SUFFIXES):
        rows, unit = read_jsonl(path, **how), "line"
    else:
        raise Gpt1Error(f"{path}: unknown chat file type (expected {', '.join(CHAT_SUFFIXES)})")
    yield from _read_rows(rows, str(path), unit, options, skip_invalid, first_skipped)


class _ChatFolder:
    """A folder of chat files read by gpt1 (not `datasets`): every file below it with a chat
    suffix (hidden ones and caches skipped), and the splits their names give (module docstring)."""

    def __init__(self, folder: str) -> None:
        self.folder = folder
        chat, self.others = [], []
        for root, dirs, names in walk_folder(folder):  # links to folders followed, each folder once
            dirs[:] = [d for d in dirs if not d.startswith(".") and d not in SKIPPED_DIRS]
            check_not_datasets_files(folder, root, names, "chat files")
            for name in names:
                path = Path(root, name)
                if name.startswith("."):
                    continue
                (chat if name.lower().endswith(CHAT_SUFFIXES) and path.is_file() else self.others).append(path)
        if not chat:
            found = f"; found: {self.names(self.others)}" if self.others else " (it has no files)"
            raise Gpt1Error(f"{folder}: no chat files (looked for {', '.join(CHAT_SUFFIXES)}){found}")
        splits_of = {path: _splits_named(path.relative_to(folder).as_posix()) for path in chat}
        if ambiguous := [path for path, splits in splits_of.items() if len(splits) > 1]:  # `datasets` may read it into both
            shown = "; ".join(f"{self.names([path])}: {' and '.join(splits_of[path])}" for path in ambiguous[:5])
            more = f"; and {len(ambiguous) - 5:,} more" if len(ambiguous) > 5 else ""
            raise Gpt1Error(f"{folder}: {'a file names' if len(ambiguous) == 1 else 'files name'} more than one "
                            f"split ({shown}{more}); name each file for one split (train, validation, test), or "
                            "none of them to read the folder as one collection")
        self.split_of = {path: splits[0] if splits else None for path, splits in splits_of.items()}
        named = [path for path, split in self.split_of.items() if split]
        if named and len(named) < len(chat):  # what `datasets` does then is drop the others, silently
            unnamed = [path for path, split in self.split_of.items() if not split]
            raise Gpt1Error(f"{folder}: some files name a split ({self.names(named)}) and others none "
                            f"({self.names(unnamed)}); name each file for one split (train, validation, test), or "
                            "none of them to read the folder as one collection")
        self.splits = sorted({split for split in self.split_of.values() if split})

    def names(self, paths: list[Path], most: int = 5) -> str:
        names = [path.relative_to(self.folder).as_posix() for path in paths]
        return ", ".join(names[:most]) + (f" and {len(names) - most:,} more" if len(names) > most else "")

    def files(self, split: str) -> list[Path]:
        """The files of `split`, or every file when the names give no splits."""
        if not self.splits:
            return list(self.split_of)
        if split not in self.splits:
            raise Gpt1Error(f"{self.folder}: no files for the split {split!r} (its files are named for "
                            f"{', '.join(self.splits)}); rename them, or pass a file")
        return [path for path, named in self.split_of.items() if named == split]


def _splits_named(relative: str) -> list[str]:
    """The splits that a file's path inside its folder names (SPLIT_WORDS): one, its split; none; or,
    for a path such as train/test_part.jsonl, more than one, which says no one split."""
    words = set(re.split(r"[-._ 0-9/]+", relative))
    return [split for split, keywords in SPLIT_WORDS.items() if words.intersection(keywords)]


class _NoRecords(Gpt1Error):
    """A chat file or dataset with no record to read: `empty`, or every record skipped."""

    def __init__(self, message: str, empty: bool) -> None:
        super().__init__(message)
        self.empty = empty


class _Malformed(Exception):
    """A record that cannot be read; `reason` is what --skip-invalid counts it as (None: malformed)."""

    def __init__(self, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason


def _read_rows(rows: Iterable[tuple[int, Any]], source: str, unit: str, options: _TreeOptions,
               skip_invalid: bool, first_skipped: dict[str, str] | None = None) -> Iterator[Conversation]:
    """Rows of one of the RECORD_FORMATS; the first row decides, and a later row of another format
    is malformed. A first row of none of them is refused without the --skip-invalid hint (every
    row would be skipped). `first_skipped`: the reader's first error of each kind of line it skipped."""
    first_skipped = first_skipped if first_skipped is not None else {}
    skipped_before = Counter(options.stats.skipped)
    kind = None
    messages: list[dict] = []
    try:
        for number, record in rows:
            try:
                if not isinstance(record, dict):
                    raise (_NotChat if kind is None else _Malformed)(_not_an_object(record, unit))
                if kind is None:
                    kind = _first_format(record)
                elif (other := _record_format(record)) not in (None, kind):
                    raise _Malformed(f"{RECORD_FORMATS[other]}, in a file whose first record is "
                                     f"{RECORD_FORMATS[kind]}: one format per file (a folder's files may differ)")
                if kind == "oasst messages":
                    messages.append(_oasst_message(record))
                elif kind == "oasst trees":
                    yield from _tree_conversations(_flatten_tree(record), options)
                else:
                    conversation = _record_conversation(kind, record, options.stats)
                    if conversation is not None:
                        yield conversation
            except _Malformed as e:
                if skip_invalid:
                    reason = e.reason or f"malformed {unit}s"
                    options.stats.skipped[reason] += 1
                    first_skipped.setdefault(reason, f"{unit} {number}: {e}")
                    continue
                hint = "" if isinstance(e, _NotChat) else f" (pass --skip-invalid to skip bad {unit}s)"
                raise Gpt1Error(f"{source}, {unit} {number}: {e}{hint}") from None
        if kind == "oasst messages":
            yield from _tree_conversations(messages, options)
        elif kind is None and (skipped := options.stats.skipped - skipped_before):
            first = next((f"; the first: {e.removeprefix(f'{source}, ')}" for e in first_skipped.values()), "")
            raise _NoRecords(f"{source}: no conversations found: every {unit} was skipped ("
                             + ", ".join(f"{why}: {n:,}" for why, n in sorted(skipped.items())) + f"{first})", False)
        elif kind is None:
            raise _NoRecords(f"{source}: no conversations found (the source is empty)", True)
    finally:
        for why, error in first_skipped.items():  # what an error about empty data names
            options.stats.first_skipped.setdefault(why, f"{source}, {error.removeprefix(f'{source}, ')}")


class _NotChat(_Malformed):
    """A file's first record, in none of the RECORD_FORMATS: --skip-invalid would skip every record."""


def _record_format(record: dict) -> str | None:
    """Which of the RECORD_FORMATS `record` is, by its fields (a null one is absent: parquet and
    `datasets` give every row every column); None: none of them."""
    fields = {key for key, value in record.items() if value is not None}
    if "message_id" in fields:
        return "oasst messages"
    if isinstance(record.get("prompt"), dict):
        return "oasst trees"
    for kind, needed in (("messages", {"messages"}), ("sharegpt", {"conversations"}),
                         ("alpaca", {"instruction", "output"}), ("prompt/completion", {"prompt", "completion"})):
        if needed <= fields:
            return kind
    return None


def _first_format(record: dict) -> str:
    """The format of a file's first record, which is the file's; _NotChat naming the fields found
    and the formats gpt1 reads when it is none of them."""
    kind = _record_format(record)
    if kind is None:
        *others, last = RECORD_FORMATS.values()
        found = ", ".join(sorted(map(str, record))) or "none"
        raise _NotChat(f"not a chat record that gpt1 reads: expected {', '.join(others)} or {last}; "
                       f"found fields: {found}")
    return kind


def _not_an_object(record: Any, unit: str) -> str:
    if isinstance(record, list) and unit == "line":
        return ("expected a JSON object, got an array (a file holding one JSON array of records is read as such "
                "when its name ends in .json; in JSON Lines each line is one record)")
    return f"expected a JSON object, got {'an array' if isinstance(record, list) else type(record).__name__}"


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
    if isinstance(rank, float) and math.isnan(rank):  # pandas' null in a float column, as json.dumps writes it
        record = {**record, "rank": None}  # unranked: NaN compared as neither better nor worse than rank 0
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
    # Messages whose parents form a cycle (a self-parent, x -> y -> x) reach no root and no
    # orphan, so the walk below never meets them: counted here.
    reached = {m["message_id"] for m in by_id.values() if m["parent_id"] is None or m["parent_id"] not in by_id}
    stack = list(reached)
    while stack:
        for child in children.get(stack.pop(), []):
            if child["message_id"] not in reached:
                reached.add(child["message_id"])
                stack.append(child["message_id"])
    if len(reached) < len(by_id):
        skipped["messages whose parents form a cycle (no prompt at their root)"] += len(by_id) - len(reached)

    def prune_reason(m: dict, parent: dict | None) -> str | None:
        if m.get("deleted"):
            return "deleted messages, with their replies"
        if m.get("review_result") is False:
            return "messages that failed review, with their replies"
        if options.languages is not None and m.get("lang") not in options.languages:
            options.stats.other_languages[str(m.get("lang"))] += 1  # what an error about empty data names
            return OTHER_LANGUAGES
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

def _record_conversation(kind: str, record: dict, stats: ChatStats) -> Conversation | None:
    """A record of one of the formats of _CHAT_MESSAGES as a conversation: its messages after its
    `system` field; a `tools` field (the functions offered: OpenAI's, LLaMA-Factory's) is ignored,
    and counted, where no message calls one (a record that does is refused)."""
    raw, key = _CHAT_MESSAGES[kind](record)
    conversation = _generic_conversation(raw, key, stats, _system_field(record))
    if conversation is not None and record.get("tools") not in (None, "", [], "[]"):
        stats.trimmed[TOOLS_IGNORED] += 1
    return conversation


def _generic_conversation(raw: Any, key: str, stats: ChatStats, system: str | None = None) -> Conversation | None:
    """A record's messages (`raw`, from its field `key`, which errors name) as a conversation, after
    the `system` message of its field, pruned and counted as OASST's and chatterbot's are. Its group
    is its root's text (`_root_group`), not where it was read: the validation split is then the same
    however the file's path is spelled or wherever it moves (`gpt1 eval --chat` scores what the run
    held out), and the same turns in another record format are the same conversation."""
    _check_openai_keys(raw, key)
    try:
        messages = validate_messages(raw, source=f"field {key!r}")
    except Gpt1Error as e:
        raise _Malformed(str(e)) from None
    # A weight on another message is 0 (_check_openai_keys), and such a message is never trained anyway.
    messages = [{"role": m["role"], "content": m["content"]}
                | ({"weight": 0} if m["role"] == "assistant" and r.get("weight") == 0 else {})
                for m, r in zip(messages, raw)]
    if system is not None and messages[0]["role"] == "system":
        if messages[0]["content"] != system:  # which one the record means is not for gpt1 to guess
            raise _Malformed(f"a 'system' field and a different system message (field {key!r}[0]): one system "
                             "message per conversation")
    elif system is not None:
        messages = [{"role": "system", "content": system}, *messages]
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
    if all(m.get("weight") == 0 for m in messages if m["role"] == "assistant"):
        stats.skipped["conversations whose replies all have weight 0 (nothing to learn)"] += 1
        return None
    if trailing_user_turn:
        stats.trimmed[TRAILING_USER_TURN] += 1
    if names := sum(1 for r in raw if r.get("name") is not None):  # OpenAI's speaker names: no place for them
        stats.trimmed[NAMES_IGNORED] += names
    return Conversation(messages, _root_group(messages))


def _root_group(messages: list[dict]) -> str:
    """The split group of a record's or chatterbot dialog's conversation: a hash of its root, the
    system message (if any) and the first user turn. The conversations of one tree share it, as
    an OASST tree's do: copies of a dialog (chatterbot's tech_support.yml repeats ten dialogs about
    100 times each), and the paths of one tree written as records (the same prompt and first
    reply, other later turns). Grouped by a record's whole text and a dialog's place in its file,
    they fell on both sides, and held-out conversations were scored on replies that training had
    learned."""
    root = messages[:2] if messages[0]["role"] == "system" else messages[:1]
    text = json.dumps(root, ensure_ascii=False, sort_keys=True).encode("utf-8", "surrogatepass")
    return CONTENT_GROUP + hashlib.sha256(text).hexdigest()[:16]


def _check_openai_keys(messages: Any, key: str = "messages") -> None:
    """The keys of OpenAI's fine-tuning records beyond role and content: a `weight` must be 0
    (the reply is not learned) or 1 on an assistant message, and 0 on another (never trained:
    SlimOrca's turns each have a weight); tool calls and tool results have no place in gpt1's
    template. (`name` is read and ignored: counted by the caller.)

    A key that is null counts as absent, here and in the caller: parquet and `datasets` give
    every message struct every field of its column, so a record whose assistant message alone
    has a `weight` (or a `name`, `tool_calls`) reads back with `"weight": None` on the others."""
    if not isinstance(messages, list):
        return  # validate_messages says what is wrong
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            continue
        if m.get("role") in ("tool", "function") or m.get("tool_calls") or m.get("function_call"):
            raise _Malformed(f"field {key!r}[{i}]: tool calls and tool results (the 'tool' role) are not supported: "
                             "gpt1's chat template has no tool turns", TOOL_CALLS)
        weight = m.get("weight")
        if weight is None:
            continue
        if m.get("role") != "assistant":
            # SlimOrca's turns each have one (0 on system and human ones): 0 says what gpt1 does anyway
            if weight == 0 and not isinstance(weight, bool):
                continue
            raise _Malformed(f"field {key!r}[{i}].weight: applies to assistant messages only (OpenAI's fine-tuning "
                             f"format); a {m.get('role')!r} message is never trained, so its weight can only be 0, "
                             f"got {weight!r}")
        if isinstance(weight, bool) or weight not in (0, 1):
            raise _Malformed(f"field {key!r}[{i}].weight: expected 0 (leave this reply out of the loss) or 1, "
                             f"got {weight!r}")


def _sharegpt_messages(record: dict) -> tuple[list, str]:
    """A ShareGPT record's turns as messages: `from` (SHAREGPT_ROLES) and `value`, or `role` and
    `content` as some exports write them; a turn's `weight` (axolotl's) and `name` are kept, for
    the checks of OpenAI's keys."""
    turns, = _required(record, "conversations")
    if not isinstance(turns, list):
        raise _Malformed(f"field 'conversations': expected a list of {{'from', 'value'}} turns, "
                         f"got {type(turns).__name__}")
    messages = [_sharegpt_turn(turn, f"field 'conversations'[{i}]") for i, turn in enumerate(turns)]
    return messages, "conversations"


def _sharegpt_turn(turn: Any, where: str) -> Any:
    if not isinstance(turn, dict) or turn.get("from") is None:
        return turn  # a {"role", "content"} turn, or not an object: validate_messages says what is wrong
    speaker = turn["from"]
    if speaker in SHAREGPT_TOOL_ROLES:
        raise _Malformed(f"{where}: tool calls and tool results ({speaker!r}) are not supported: gpt1's chat "
                         "template has no tool turns", TOOL_CALLS)
    role = SHAREGPT_ROLES.get(speaker) if isinstance(speaker, str) else None  # (a list is unhashable)
    if role is None:
        raise _Malformed(f"{where}.from: expected one of {', '.join(SHAREGPT_ROLES)}, got {speaker!r}")
    kept = {key: turn[key] for key in ("weight", "name") if turn.get(key) is not None}
    return {"role": role, "content": _text(turn.get("value"), f"{where}.value"), **kept}


def _alpaca_messages(record: dict) -> tuple[list, str]:
    """An Alpaca record as a user turn and its reply, after the turns of its `history` (the module
    docstring says how)."""
    instruction, output = _required(record, "instruction", "output")
    instruction, output = _text(instruction, "field 'instruction'"), _text(output, "field 'output'")
    extra = _text(record["input"], "field 'input'") if record.get("input") is not None else ""
    prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]
    return _history_turns(record.get("history")) + messages, "instruction"


def _history_turns(history: Any) -> list[dict]:
    """LLaMA-Factory's `history` of an Alpaca record, `[[prompt, reply], ...]` (the turns before
    the instruction), as user and assistant messages; null or absent: none. Its replies are
    trained, as LLaMA-Factory trains every turn of a conversation by default."""
    if history is None:
        return []
    if not isinstance(history, list):
        raise _Malformed(f"field 'history': expected a list of [prompt, reply] pairs, got {type(history).__name__}")
    turns = []
    for i, pair in enumerate(history):
        if not isinstance(pair, list) or len(pair) != 2:
            got = f"a list of {len(pair)}" if isinstance(pair, list) else type(pair).__name__
            raise _Malformed(f"field 'history'[{i}]: expected a [prompt, reply] pair of strings, got {got}")
        turns += [{"role": "user", "content": _text(pair[0], f"field 'history'[{i}][0]")},
                  {"role": "assistant", "content": _text(pair[1], f"field 'history'[{i}][1]")}]
    return turns


def _prompt_completion_messages(record: dict) -> tuple[list, str]:
    """TRL's prompt/completion record as messages: two strings are a user turn and its reply; two
    lists of messages are joined, the prompt's assistant messages given weight 0 (context: TRL
    trains on the completion only)."""
    prompt, completion = _required(record, "prompt", "completion")
    if isinstance(prompt, str) and isinstance(completion, str):
        return [{"role": "user", "content": _text(prompt, "field 'prompt'")},
                {"role": "assistant", "content": _text(completion, "field 'completion'")}], "prompt"
    if not (isinstance(prompt, list) and isinstance(completion, list)):
        raise _Malformed("fields 'prompt' and 'completion': expected two strings (TRL's standard form) or two lists "
                         f"of messages (its conversational form), got {type(prompt).__name__} and "
                         f"{type(completion).__name__}")
    for key, messages in (("prompt", prompt), ("completion", completion)):  # errors name the field and index
        _check_openai_keys(messages, key)
        try:
            validate_messages(messages, source=f"field {key!r}")
        except Gpt1Error as e:
            raise _Malformed(str(e)) from None
    context = [{**m, "weight": 0} if m.get("role") == "assistant" else m for m in prompt]
    return context + completion, "prompt"


def _system_field(record: dict) -> str | None:
    """The record's `system` field (LLaMA-Factory's, and a column of many chat datasets beside
    their messages), checked; None when absent, null or blank."""
    system = record.get("system")
    if system is None or not _text(system, "field 'system'").strip():
        return None
    return system


def _required(record: dict, *keys: str) -> list:
    """The values of `keys` in `record`; a missing or null one is _Malformed (a later record of a
    file, read in the format of its first)."""
    if missing := [key for key in keys if record.get(key) is None]:
        raise _Malformed(f"missing required field {missing[0]!r}")
    return [record[key] for key in keys]


def _text(value: Any, where: str) -> str:
    """`value`, a string of valid Unicode, or _Malformed naming `where`."""
    try:
        return check_text(value, where)
    except Gpt1Error as e:
        raise _Malformed(str(e)) from None


# How each of the RECORD_FORMATS that is one conversation a record gives its messages, and the
# field that errors about them name.
_CHAT_MESSAGES = {
    "messages": lambda record: (record.get("messages"), "messages"),
    "sharegpt": _sharegpt_messages,
    "alpaca": _alpaca_messages,
    "prompt/completion": _prompt_completion_messages,
}


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
        try:
            data = read_yaml(file)
        except BadRecord as e:  # invalid UTF-8: the whole file is skipped and counted, as a text file is
            if not skip_invalid:
                raise Gpt1Error(f"{e} (convert the file to UTF-8, or pass --skip-invalid to skip such files)") from None
            stats.skipped[INVALID_UTF8_FILES] += 1
            stats.first_skipped.setdefault(INVALID_UTF8_FILES, str(e))
            continue
        dialogs = data.get("conversations") if isinstance(data, dict) else None
        if data is None or dialogs == []:  # no document (an empty file, or comments only), or no dialogs
            raise _NoRecords(f"{file}: no conversations found (the file has no dialogs)", True)
        if not isinstance(dialogs, list):
            raise Gpt1Error(f"{file}: expected a 'conversations:' list of dialogs")
        for i, turns in enumerate(dialogs):
            try:
                turns = _dialog_turns(turns, f"{file}: conversations[{i}]")
            except BadRecord as e:
                if skip_invalid:
                    stats.skipped["malformed dialogs"] += 1
                    stats.first_skipped.setdefault("malformed dialogs", str(e))
                    continue
                raise Gpt1Error(f"{e} (pass --skip-invalid to skip bad dialogs)") from None
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
            yield Conversation(messages, _root_group(messages))  # by its root, as a record's


def _dialog_turns(turns: Any, where: str) -> list[str]:
    """A chatterbot dialog's turns, checked: a list of strings of valid Unicode. PyYAML reads the
    escape "\\ud83d\\ude00" (how JSON writers spell 😀) as two lone surrogates, where JSON reads
    the one character: a high and low surrogate in a row are joined, as the writer meant; a
    lone one (from "\\ud800") is refused here, naming the dialog, not later by the tokenizer."""
    if not isinstance(turns, list) or not all(isinstance(t, str) for t in turns):
        raise BadRecord(f"{where} must be a list of strings")
    joined = [t.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "surrogatepass") for t in turns]
    for j, text in enumerate(joined):
        check_no_lone_surrogates(text, f"{where}[{j}]")
    return joined


# ---- train / validation split --------------------------------------------------------------

def split_conversations(conversations: list[Conversation], val_fraction: float,
                        seed: int = 0) -> tuple[list[Conversation], list[Conversation]]:
    """A deterministic split by `group` (a whole message tree lands on one side: for records and
    chatterbot dialogs, every conversation of one root, `_root_group`). A tree is held out when
    its hash falls under the fraction, unless that would take the held-out conversations past
    twice the fraction of them: conversations that merely open alike ("Hi", one system prompt)
    are one tree, and two such trees held out half the data for validation, silently. Such a
    tree stays in training, and a warning names it. As in `gpt1 prepare`, a fraction > 0 holds
    out at least one of two or more trees: when none fell under it, the smallest tree that fits
    (the smallest hash among equals; other splits are unchanged); and training always keeps one."""
    sizes: dict[str, int] = {}
    for c in conversations:
        sizes[c.group] = sizes.get(c.group, 0) + 1
    scores = {g: int.from_bytes(hashlib.sha256(f"{seed}:{g}".encode()).digest()[:8], "big") / 2**64 for g in sizes}
    cap = max(1, int(2 * val_fraction * len(conversations)))
    held_out, taken, too_big = set(), 0, []
    for g in sorted((g for g, score in scores.items() if score < val_fraction), key=scores.get):
        if taken + sizes[g] <= cap:
            held_out.add(g)
            taken += sizes[g]
        elif sizes[g] > cap:
            too_big.append(g)
    if val_fraction > 0 and not held_out and len(scores) >= 2:
        fits = [g for g in scores if sizes[g] <= cap]
        if fits:
            held_out = {min(fits, key=lambda g: (sizes[g], scores[g]))}
        else:
            too_big = sorted(scores, key=sizes.get, reverse=True)[:1]
    if scores and held_out == set(scores):  # and never every tree: training keeps the highest-scored one
        held_out.discard(max(scores, key=scores.get))
    for g in too_big:
        _warn_big_tree(next(c for c in conversations if c.group == g), sizes[g], len(conversations), val_fraction)
    return ([c for c in conversations if c.group not in held_out], [c for c in conversations if c.group in held_out])


def _warn_big_tree(first: Conversation, size: int, total: int, val_fraction: float) -> None:
    opening = next((m.get("content") for m in first.messages if m.get("role") == "user"), "")
    opening = opening if isinstance(opening, str) else json.dumps(opening, ensure_ascii=False)
    warn(f"{size:,} of the {total:,} conversations ({size / total:.0%}) are one message tree (they open alike: "
         f"{opening[:60]!r}); kept for training, since holding it out would take more than twice val_fraction "
         f"({val_fraction}) of the conversations for validation")


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
    """Whether these are {"messages"} records or chatterbot dialogs, the sources whose split
    changed: until 2026-12-05 (a15eed6) a record's group was its file and line (the path as
    typed), and until 2026-12-07 a chatterbot dialog's was its file and place in it, so a run made
    before then held out other conversations than `split_conversations` holds out now."""
    return any(c.group.startswith(CONTENT_GROUP) for c in conversations)


