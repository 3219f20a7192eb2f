"""Chat sources -> conversations: where chat data is read, file by file and folder by folder.

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
  OASST messages, OASST trees, or records that each give a conversation: OpenAI's `{"messages"}`,
  ShareGPT's, Alpaca's, TRL's prompt/completion (`gpt1.data.chat_formats` says how each is read);
- `chatterbot` (the English dialogs of the `chatterbot-corpus` package), or `.yml` files in its
  format (each `conversations:` entry alternates user, assistant, user, ...: `gpt1.data.chatterbot`);
- any other folder: every chat file below it (the suffixes above), each read as if named alone,
  in sorted order; hidden files and folders are skipped, and files of other types are left out
  and named (entries that are not regular files, such as dangling links, counted too). When its
  files are named for splits as `datasets` names them (`train.jsonl`, `validation.jsonl`,
  `chats_dev.jsonl`, `test/...`), they are the folder's splits; a folder where some files name a
  split and others none is refused, naming the others (`datasets` dropped them), and so is one
  with a file whose path names two splits (`train/test_part.jsonl`).
  An empty file, or one whose every record `skip_invalid` skipped, is passed over (an empty one
  counted); the folder is refused only when none of its files has a record.

OASST messages become conversations as `gpt1.data.oasst_trees` says: pruned, and at each level the
best-ranked reply followed (or, with `all_paths`, every path). Everything dropped is counted in
`ChatStats.skipped`, never silently lost. Files are read through `gpt1.data.readers`: a malformed
line (bad JSON, a missing or mistyped required field) raises Gpt1Error naming the file and line, or
is skipped and counted with `skip_invalid`. The train/validation split is `gpt1.data.chat_splits`;
encoding for training, `gpt1.data.chat`.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from gpt1.core.errors import Gpt1Error
from gpt1.core.progress import warn
from gpt1.core.reading import walk_folder
from gpt1.data.chat_formats import (
    RECORD_FORMATS,
    SHAREGPT_ROLES,
    SHAREGPT_TOOL_ROLES,
    NotChat,
    first_format,
    record_conversation,
    record_format,
)
from gpt1.data.chat_splits import CONTENT_GROUP, conversations_fingerprint, grouped_by_content, split_conversations
from gpt1.data.chatterbot import CHATTERBOT, YAML_SUFFIXES, chatterbot_files, read_chatterbot
from gpt1.data.conversation import (
    EMPTY_FILES,
    INVALID_UTF8_FILES,
    NAMES_IGNORED,
    OTHER_LANGUAGES,
    TOOL_CALLS,
    TOOLS_IGNORED,
    TRAILING_USER_TURN,
    ChatStats,
    Conversation,
    Malformed,
    NoRecords,
)
from gpt1.data.oasst_trees import OASST_ROLES, TreeOptions, flatten_tree, oasst_message, tree_conversations
from gpt1.data.readers import (
    JSON_SUFFIXES,
    JSONL_SUFFIXES,
    PARQUET_SUFFIXES,
    HfSpec,
    dataset_split_names,
    declares_data_files,
    holds_json_array,
    load_hf_dataset,
    parse_hf,
    read_json_array,
    read_jsonl,
    read_parquet,
    saved_to_disk,
)
from gpt1.data.sources import SKIPPED_DIRS, check_not_datasets_files

# What this module gives, with the names of the modules split out of it (2026-12-07), which the
# package and its users still import from here.
__all__ = [
    "read_conversations", "hf_split_names", "Conversation", "ChatStats", "split_conversations",
    "conversations_fingerprint", "grouped_by_content", "OASST_HUB_NAME", "CHAT_SUFFIXES", "SPLIT_WORDS",
    "CHATTERBOT", "YAML_SUFFIXES", "OASST_ROLES", "CONTENT_GROUP", "RECORD_FORMATS",
    "SHAREGPT_ROLES", "SHAREGPT_TOOL_ROLES", "TRAILING_USER_TURN", "OTHER_LANGUAGES", "NAMES_IGNORED",
    "TOOLS_IGNORED", "TOOL_CALLS", "EMPTY_FILES", "INVALID_UTF8_FILES",
]

OASST_HUB_NAME = "OpenAssistant/oasst2"
CHAT_SUFFIXES = JSONL_SUFFIXES + PARQUET_SUFFIXES + YAML_SUFFIXES  # the reader layer's tables, as for text
# The words that name a split in a file's path inside a folder, as `datasets` reads them (its
# SPLIT_KEYWORDS, between separators, case-sensitive as its patterns are): train.jsonl, chats_dev.jsonl,
# validation/a.jsonl; Train.jsonl names none.
SPLIT_WORDS = {"train": ("train", "training"), "validation": ("validation", "valid", "dev", "val"),
               "test": ("test", "testing", "eval", "evaluation")}


def read_conversations(spec: str, split: str = "train", *, all_paths: bool = False,
                       languages: Sequence[str] | None = None, skip_invalid: bool = False,
                       stats: ChatStats | None = None) -> list[Conversation]:
    """All conversations of one chat source (see the module docstring for the formats).

    `split` applies to datasets read with `datasets` and folders whose files are named for
    splits; local files have no splits.
    `languages`: keep only OASST messages in these languages (e.g. ["en"]); None keeps all.
    """
    stats = stats if stats is not None else ChatStats()
    options = TreeOptions(all_paths, frozenset(languages) if languages else None, stats)
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
    if spec == CHATTERBOT or spec.startswith(CHATTERBOT + ":"):  # `chatterbot:a/b` is no hub name
        return None
    if (hf := parse_hf(spec)) is not None:
        return hf
    if os.path.isdir(spec):
        return HfSpec(spec) if saved_to_disk(spec) or declares_data_files(spec) else None
    looks_like_file = spec.lower().endswith(CHAT_SUFFIXES)
    if (not os.path.exists(spec) and spec.count("/") == 1 and not looks_like_file and not spec.startswith((".", "/"))
            and not glob.has_magic(spec)):
        return parse_hf("hf:" + spec)  # a hub name, e.g. OpenAssistant/oasst2
    return None


def _read(spec: str, split: str, options: TreeOptions, skip_invalid: bool) -> Iterator[Conversation]:
    if spec == CHATTERBOT or spec.startswith(CHATTERBOT + ":"):
        # The shipped corpus has a malformed entry (trivia.yml): it is skipped and counted.
        yield from read_chatterbot(chatterbot_files(spec), options.stats, skip_invalid=True)
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


def _read_folder(spec: str, split: str, options: TreeOptions, skip_invalid: bool) -> Iterator[Conversation]:
    """A folder's files of `split` in turn. One without a record (empty, as `prepare` folders
    take them, or every record skipped) is passed over, an empty one counted; the folder is
    refused only when none of its files had a record."""
    folder = _ChatFolder(spec)
    files = folder.files(split)
    if others := [path for path in folder.others if path not in options.stats.left_out]:  # said once a run
        options.stats.left_out.update(others)
        # Named as chat files, yet left out: not regular files (_ChatFolder), counted as text sources count them
        unreadable = [path for path in others if path.name.lower().endswith(CHAT_SUFFIXES)]
        if others := [path for path in others if path not in unreadable]:
            warn(f"{spec}: left out {len(others):,} file{'s' if len(others) > 1 else ''} that "
                 f"{'are' if len(others) > 1 else 'is'} not chat data ({', '.join(CHAT_SUFFIXES)}): "
                 f"{folder.names(others)}")
        if unreadable:
            options.stats.skipped["entries that are not regular files"] += len(unreadable)
            what = "entries that are not regular files" if len(unreadable) > 1 else "entry that is not a regular file"
            warn(f"{spec}: left out {len(unreadable):,} {what} (a dangling link, a pipe, a socket or a device): "
                 f"{folder.names(unreadable)}")
    passed_over: list[NoRecords] = []
    for file in files:
        try:
            yield from _read_file(file, options, skip_invalid)
        except NoRecords as e:  # raised before the file gave a conversation: nothing to take back
            passed_over.append(e)
            if e.empty:
                options.stats.skipped[EMPTY_FILES] += 1
    if len(passed_over) == len(files):
        reasons = [str(e) for e in passed_over if not e.empty]
        if not reasons:
            raise Gpt1Error(f"{spec}: no conversations found (every chat file is empty: {folder.names(files)})")
        empty = f" ({len(files) - len(reasons):,} empty)" if len(reasons) < len(files) else ""
        raise Gpt1Error(f"{spec}: no conversations found in any of its chat files{empty}; {reasons[0]}")


def _read_file(path: Path, options: TreeOptions, skip_invalid: bool) -> Iterator[Conversation]:
    name = path.name.lower()
    if name.endswith(YAML_SUFFIXES):
        yield from read_chatterbot([path], options.stats, skip_invalid)
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


def _read_rows(rows: Iterable[tuple[int, Any]], source: str, unit: str, options: TreeOptions,
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
                    raise (NotChat if kind is None else Malformed)(_not_an_object(record, unit))
                if kind is None:
                    kind = first_format(record)
                elif (other := record_format(record)) not in (None, kind):
                    raise Malformed(f"{RECORD_FORMATS[other]}, in a file whose first record is "
                                    f"{RECORD_FORMATS[kind]}: one format per file (a folder's files may differ)")
                if kind == "oasst messages":
                    messages.append(oasst_message(record))
                elif kind == "oasst trees":
                    yield from tree_conversations(flatten_tree(record), options)
                else:
                    conversation = record_conversation(kind, record, options.stats)
                    if conversation is not None:
                        yield conversation
            except Malformed as e:
                if skip_invalid:
                    reason = e.reason or f"malformed {unit}s"
                    options.stats.skipped[reason] += 1
                    first_skipped.setdefault(reason, f"{unit} {number}: {e}")
                    continue
                hint = "" if isinstance(e, NotChat) else f" (pass --skip-invalid to skip bad {unit}s)"
                raise Gpt1Error(f"{source}, {unit} {number}: {e}{hint}") from None
        if kind == "oasst messages":
            yield from tree_conversations(messages, options)
        elif kind is None and (skipped := options.stats.skipped - skipped_before):
            first = next((f"; the first: {e.removeprefix(f'{source}, ')}" for e in first_skipped.values()), "")
            raise NoRecords(f"{source}: no conversations found: every {unit} was skipped ("
                            + ", ".join(f"{why}: {n:,}" for why, n in sorted(skipped.items())) + f"{first})", False)
        elif kind is None:
            raise NoRecords(f"{source}: no conversations found (the source is empty)", True)
    finally:
        for why, error in first_skipped.items():  # what an error about empty data names
            options.stats.first_skipped.setdefault(why, f"{source}, {error.removeprefix(f'{source}, ')}")


def _not_an_object(record: Any, unit: str) -> str:
    if isinstance(record, list) and unit == "line":
        return ("expected a JSON object, got an array (a file holding one JSON array of records is read as such "
                "when its name ends in .json; in JSON Lines each line is one record)")
    return f"expected a JSON object, got {'an array' if isinstance(record, list) else type(record).__name__}"
