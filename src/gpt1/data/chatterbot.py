"""The chatterbot YAML corpus -> conversations.

`chatterbot` is the English dialogs of the `chatterbot-corpus` package (`chatterbot:LANGUAGE`
another of its languages); a `.yml` file in its format is read the same way. Each entry of a
file's `conversations:` list is one dialog, its turns alternating user, assistant, user, ...: a
dialog ending with a user turn loses it, and one with an empty turn or no reply is skipped, each
counted. A dialog's group is its root's text (`gpt1.data.chat_splits.root_group`), as a record's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

from gpt1.core.errors import Gpt1Error
from gpt1.core.imports import require
from gpt1.core.reading import walk_folder
from gpt1.data.chat_splits import root_group
from gpt1.data.conversation import INVALID_UTF8_FILES, TRAILING_USER_TURN, ChatStats, Conversation, NoRecords
from gpt1.data.readers import BadRecord, check_no_lone_surrogates, read_yaml

CHATTERBOT = "chatterbot"
YAML_SUFFIXES = (".yml", ".yaml")


def chatterbot_files(spec: str) -> list[Path]:
    """The YAML files of the language that `spec` names (`chatterbot[:LANGUAGE]`, English by default)."""
    chatterbot_corpus = require("chatterbot_corpus", "reading chatterbot dialogs", "pip install chatterbot-corpus")
    language = spec.partition(":")[2] or "english"
    data = Path(chatterbot_corpus.__file__).parent / "data"
    known = sorted(p.name for p in data.iterdir() if p.is_dir() and not p.name.startswith((".", "_")))
    if language not in known:  # a name, not a path: "english/.." read every language
        raise Gpt1Error(f"{spec}: chatterbot-corpus has no language {language!r} (known: {', '.join(known)})")
    return _yaml_files(data / language)


def _yaml_files(folder: str | Path) -> list[Path]:
    return [p for p in _files_below(folder) if p.suffix.lower() in YAML_SUFFIXES]


def _files_below(folder: str | Path) -> list[Path]:
    """Every file below `folder`, sorted; links to folders followed, each folder once (as text sources)."""
    return sorted(Path(root, name) for root, _, files in walk_folder(folder) for name in files)


def read_chatterbot(files: list[Path], stats: ChatStats, skip_invalid: bool) -> Iterator[Conversation]:
    """The dialogs of `files` in turn. A file of invalid UTF-8, or a malformed dialog, is an error, or
    with `skip_invalid` skipped and counted; a file with no dialog is NoRecords."""
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
            raise NoRecords(f"{file}: no conversations found (the file has no dialogs)", True)
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
            yield Conversation(messages, root_group(messages))  # by its root, as a record's


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
