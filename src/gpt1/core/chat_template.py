"""The chat template, defined once: used by fine-tuning, `generate --chat`, `chat`, the server
and the Hugging Face export.

A conversation is a list of `{"role", "content"}` messages, roles `system`, `user`,
`assistant`. Each message becomes its role marker (a special token) followed by its text;
every assistant turn ends with `[EOS]`:

    <|system|>You are terse.<|user|>Hi!<|assistant|>Hello.[EOS]<|user|>...<|assistant|>

A prompt for generation ends with `<|assistant|>`; the model's reply ends at `[EOS]`.
Role markers are inserted as ids, never parsed out of text, so user text cannot forge a turn.
`JINJA_TEMPLATE` is the same template for `transformers`' `apply_chat_template`; the
export tests check that both give identical ids.
"""

from __future__ import annotations

from typing import Any, Sequence

from gpt1.core.errors import Gpt1Error
from gpt1.core.model import IGNORE_INDEX
from gpt1.core.tokenizer import ASSISTANT, EOS, SYSTEM, USER, Tokenizer, check_text

ROLE_TOKENS = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}
TEMPLATE_FILE = "chat_template.jinja"  # the file name transformers also reads from a model folder

JINJA_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ '" + EOS + "' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '" + ASSISTANT + "' }}{% endif %}"
)


def validate_messages(messages: Any, source: str = "messages") -> list[dict[str, str]]:
    """Check a list of {"role", "content"} dicts; raise Gpt1Error naming the bad item."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise Gpt1Error(f"{source}: expected a non-empty list of {{'role', 'content'}} messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise Gpt1Error(f"{source}[{i}]: expected an object with 'role' and 'content'")
        role, content = message.get("role"), message.get("content")
        if role not in ROLE_TOKENS:
            raise Gpt1Error(f"{source}[{i}].role: expected one of {', '.join(ROLE_TOKENS)}, got {role!r}")
        check_text(content, f"{source}[{i}].content")
    return list(messages)


def encode_chat(tokenizer: Tokenizer, messages: Sequence[dict[str, str]], add_generation_prompt: bool = True) -> list[int]:
    """Token ids of a conversation; with `add_generation_prompt`, ending with `<|assistant|>`."""
    ids, _ = encode_chat_with_labels(tokenizer, messages)
    if add_generation_prompt:
        ids.append(tokenizer.special_id(ASSISTANT))
    return ids


def encode_chat_with_labels(tokenizer: Tokenizer, messages: Sequence[dict[str, str]]) -> tuple[list[int], list[int]]:
    """Ids and training labels: labels equal ids on assistant reply tokens (text and its
    closing [EOS]) and IGNORE_INDEX everywhere else (role markers, system and user turns).

    Labels are aligned with ids (label i is the target for position i); the training code
    shifts by one so that position i predicts token i + 1.
    """
    validate_messages(messages)
    ids: list[int] = []
    labels: list[int] = []
    for message in messages:
        marker = tokenizer.special_id(ROLE_TOKENS[message["role"]])
        text_ids = tokenizer.encode(message["content"])
        ids.append(marker)
        labels.append(IGNORE_INDEX)
        if message["role"] == "assistant":
            text_ids = text_ids + [tokenizer.eos_id]
            labels.extend(text_ids)
        else:
            labels.extend([IGNORE_INDEX] * len(text_ids))
        ids.extend(text_ids)
    return ids, labels
