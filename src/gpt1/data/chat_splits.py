"""The train/validation split of conversations, by message tree.

A conversation's `group` is its message tree: an OASST tree is its root message's tree; a record
or chatterbot dialog belongs to the tree of its root, the system message (if any) and the first
user turn, by their text (`root_group`): copies of a dialog, and paths of one tree written as
records (the same first turn, other later turns), land on the same side. `split_conversations`
holds out whole trees; `conversations_fingerprint` is what a fine-tuning run records of those it
held out, so that `gpt1 eval --chat` can check that it scores the same ones.
"""

from __future__ import annotations

import hashlib
import json
from typing import Iterable

from gpt1.core.progress import warn
from gpt1.data.conversation import Conversation

# The split group of a {"messages"} record or chatterbot dialog: a hash of its root's text (`root_group`).
CONTENT_GROUP = "sha256:"


def root_group(messages: list[dict]) -> str:
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


def split_conversations(conversations: list[Conversation], val_fraction: float,
                        seed: int = 0) -> tuple[list[Conversation], list[Conversation]]:
    """A deterministic split by `group` (a whole message tree lands on one side: for records and
    chatterbot dialogs, every conversation of one root, `root_group`). A tree is held out when
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

