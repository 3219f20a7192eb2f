"""OASST message trees -> conversations (user/assistant turns, ending with an assistant turn).

OASST2 gives its messages flat (`*.messages.jsonl`, parquet, the hub's rows: `oasst_message`) or
nested, one tree per line (`*.trees.jsonl`: `flatten_tree`). Deleted messages and messages whose
review failed are pruned with their replies; so are messages in other languages (with
`languages`), empty messages, messages whose parent does not exist (orphans) and replies whose
role does not alternate. At each level the best-ranked reply (rank 0; unranked replies come after
ranked ones, in file order) is followed, or, with `all_paths`, every root-to-leaf path. A path
ending with a user turn (a prompt no one answered) loses that turn; a path left with no assistant
reply is dropped. Everything dropped is counted in `ChatStats.skipped`, never silently lost. A
conversation's group is its tree's id, so that a tree lands on one side of the train/validation
split (`gpt1.data.chat_splits`).
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Iterator

from gpt1.data.conversation import OTHER_LANGUAGES, TRAILING_USER_TURN, ChatStats, Conversation, Malformed

OASST_ROLES = {"prompter": "user", "assistant": "assistant"}


@dataclass
class TreeOptions:
    """How the trees of one source become conversations (`read_conversations`' options), and where
    what they leave out is counted."""

    all_paths: bool
    languages: frozenset[str] | None
    stats: ChatStats
    trees_read: bool = False  # whether the source had OASST message trees (the options apply to them)


def oasst_message(record: dict) -> dict:
    """Validate one OASST message record; raise Malformed naming the bad field."""
    for name in ("message_id", "parent_id", "role", "text"):
        if name not in record:
            raise Malformed(f"missing required field {name!r}")
    if not isinstance(record["message_id"], str) or not record["message_id"]:
        raise Malformed("field 'message_id' must be a non-empty string")
    if record["parent_id"] is not None and not isinstance(record["parent_id"], str):
        raise Malformed("field 'parent_id' must be a string or null")
    if record["role"] not in OASST_ROLES:
        raise Malformed(f"field 'role' must be 'prompter' or 'assistant', got {record['role']!r}")
    if not isinstance(record["text"], str):
        raise Malformed(f"field 'text' must be a string, got {type(record['text']).__name__}")
    rank = record.get("rank")
    if rank is not None and (not isinstance(rank, (int, float)) or isinstance(rank, bool)):
        raise Malformed(f"field 'rank' must be a number or null, got {rank!r}")
    if isinstance(rank, float) and math.isnan(rank):  # pandas' null in a float column, as json.dumps writes it
        record = {**record, "rank": None}  # unranked: NaN compared as neither better nor worse than rank 0
    return record


def flatten_tree(record: dict) -> list[dict]:
    """The messages of a nested `*.trees.jsonl` tree, with parent ids taken from the nesting."""
    if not isinstance(record.get("prompt"), dict):
        raise Malformed("expected an OASST tree with a 'prompt' object")
    tree_id = record.get("message_tree_id")
    out: list[dict] = []
    stack: list[tuple[dict, str | None]] = [(record["prompt"], None)]
    while stack:
        node, parent = stack.pop()
        if not isinstance(node, dict):
            raise Malformed("expected each message of the tree to be an object")
        message = oasst_message({**node, "parent_id": parent, "message_tree_id": tree_id})
        replies = node.get("replies") or []
        if not isinstance(replies, list):
            raise Malformed(f"message {message['message_id']}: field 'replies' must be a list")
        out.append(message)
        stack.extend((reply, message["message_id"]) for reply in reversed(replies))
    return out


def tree_conversations(messages: list[dict], options: TreeOptions) -> Iterator[Conversation]:
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


