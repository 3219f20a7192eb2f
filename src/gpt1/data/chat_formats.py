"""Chat records -> conversations: which of the RECORD_FORMATS a record is, and a record that holds
one conversation read as one.

The first record of a file decides the file's format (`first_format`); a later record of another
is malformed (`gpt1.data.chat_sources` reads the file). The formats whose records each give a
conversation:

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
In each, a `system` field is the system message: one that its messages also start with is taken
once, and a different system message there is refused (one per conversation). A null key is an
absent one, as parquet and `datasets` give every row every column and every message struct every
key. The other two formats, OASST messages and trees, are message trees (`gpt1.data.oasst_trees`).
A bad record raises `Malformed`, naming its field.
"""

from __future__ import annotations

from typing import Any

from gpt1.core.chat_template import validate_messages
from gpt1.core.errors import Gpt1Error
from gpt1.core.tokenizer import check_text
from gpt1.data.chat_splits import root_group
from gpt1.data.conversation import (
    NAMES_IGNORED,
    TOOL_CALLS,
    TOOLS_IGNORED,
    TRAILING_USER_TURN,
    ChatStats,
    Conversation,
    Malformed,
)

# The formats of a chat file's records, as errors name them (the module docstring, and OASST's).
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


class NotChat(Malformed):
    """A file's first record, in none of the RECORD_FORMATS: --skip-invalid would skip every record."""


def record_format(record: dict) -> str | None:
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


def first_format(record: dict) -> str:
    """The format of a file's first record, which is the file's; NotChat naming the fields found
    and the formats gpt1 reads when it is none of them."""
    kind = record_format(record)
    if kind is None:
        *others, last = RECORD_FORMATS.values()
        found = ", ".join(sorted(map(str, record))) or "none"
        raise NotChat(f"not a chat record that gpt1 reads: expected {', '.join(others)} or {last}; "
                      f"found fields: {found}")
    return kind


def record_conversation(kind: str, record: dict, stats: ChatStats) -> Conversation | None:
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
    is its root's text (`root_group`), not where it was read: the validation split is then the same
    however the file's path is spelled or wherever it moves (`gpt1 eval --chat` scores what the run
    held out), and the same turns in another record format are the same conversation."""
    _check_openai_keys(raw, key)
    try:
        messages = validate_messages(raw, source=f"field {key!r}")
    except Gpt1Error as e:
        raise Malformed(str(e)) from None
    # A weight on another message is 0 (_check_openai_keys), and such a message is never trained anyway.
    messages = [{"role": m["role"], "content": m["content"]}
                | ({"weight": 0} if m["role"] == "assistant" and r.get("weight") == 0 else {})
                for m, r in zip(messages, raw)]
    if system is not None and messages[0]["role"] == "system":
        if messages[0]["content"] != system:  # which one the record means is not for gpt1 to guess
            raise Malformed(f"a 'system' field and a different system message (field {key!r}[0]): one system "
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
    return Conversation(messages, root_group(messages))



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
            raise Malformed(f"field {key!r}[{i}]: tool calls and tool results (the 'tool' role) are not supported: "
                            "gpt1's chat template has no tool turns", TOOL_CALLS)
        weight = m.get("weight")
        if weight is None:
            continue
        if m.get("role") != "assistant":
            # SlimOrca's turns each have one (0 on system and human ones): 0 says what gpt1 does anyway
            if weight == 0 and not isinstance(weight, bool):
                continue
            raise Malformed(f"field {key!r}[{i}].weight: applies to assistant messages only (OpenAI's fine-tuning "
                            f"format); a {m.get('role')!r} message is never trained, so its weight can only be 0, "
                            f"got {weight!r}")
        if isinstance(weight, bool) or weight not in (0, 1):
            raise Malformed(f"field {key!r}[{i}].weight: expected 0 (leave this reply out of the loss) or 1, "
                            f"got {weight!r}")


def _sharegpt_messages(record: dict) -> tuple[list, str]:
    """A ShareGPT record's turns as messages: `from` (SHAREGPT_ROLES) and `value`, or `role` and
    `content` as some exports write them; a turn's `weight` (axolotl's) and `name` are kept, for
    the checks of OpenAI's keys."""
    turns, = _required(record, "conversations")
    if not isinstance(turns, list):
        raise Malformed(f"field 'conversations': expected a list of {{'from', 'value'}} turns, "
                        f"got {type(turns).__name__}")
    messages = [_sharegpt_turn(turn, f"field 'conversations'[{i}]") for i, turn in enumerate(turns)]
    return messages, "conversations"


def _sharegpt_turn(turn: Any, where: str) -> Any:
    if not isinstance(turn, dict) or turn.get("from") is None:
        return turn  # a {"role", "content"} turn, or not an object: validate_messages says what is wrong
    speaker = turn["from"]
    if speaker in SHAREGPT_TOOL_ROLES:
        raise Malformed(f"{where}: tool calls and tool results ({speaker!r}) are not supported: gpt1's chat "
                        "template has no tool turns", TOOL_CALLS)
    role = SHAREGPT_ROLES.get(speaker) if isinstance(speaker, str) else None  # (a list is unhashable)
    if role is None:
        raise Malformed(f"{where}.from: expected one of {', '.join(SHAREGPT_ROLES)}, got {speaker!r}")
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
        raise Malformed(f"field 'history': expected a list of [prompt, reply] pairs, got {type(history).__name__}")
    turns = []
    for i, pair in enumerate(history):
        if not isinstance(pair, list) or len(pair) != 2:
            got = f"a list of {len(pair)}" if isinstance(pair, list) else type(pair).__name__
            raise Malformed(f"field 'history'[{i}]: expected a [prompt, reply] pair of strings, got {got}")
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
        raise Malformed("fields 'prompt' and 'completion': expected two strings (TRL's standard form) or two lists "
                        f"of messages (its conversational form), got {type(prompt).__name__} and "
                        f"{type(completion).__name__}")
    for key, messages in (("prompt", prompt), ("completion", completion)):  # errors name the field and index
        _check_openai_keys(messages, key)
        try:
            validate_messages(messages, source=f"field {key!r}")
        except Gpt1Error as e:
            raise Malformed(str(e)) from None
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
    """The values of `keys` in `record`; a missing or null one is Malformed (a later record of a
    file, read in the format of its first)."""
    if missing := [key for key in keys if record.get(key) is None]:
        raise Malformed(f"missing required field {missing[0]!r}")
    return [record[key] for key in keys]


def _text(value: Any, where: str) -> str:
    """`value`, a string of valid Unicode, or Malformed naming `where`."""
    try:
        return check_text(value, where)
    except Gpt1Error as e:
        raise Malformed(str(e)) from None


# How each of the RECORD_FORMATS that is one conversation a record gives its messages, and the
# field that errors about them name.
_CHAT_MESSAGES = {
    "messages": lambda record: (record.get("messages"), "messages"),
    "sharegpt": _sharegpt_messages,
    "alpaca": _alpaca_messages,
    "prompt/completion": _prompt_completion_messages,
}
