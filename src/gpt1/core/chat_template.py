"""The chat template, defined once: used by fine-tuning, `generate --chat`, `chat`, the server
and the Hugging Face export.

A conversation is a list of `{"role", "content"}` messages, roles `system`, `user`,
`assistant`. Messages are read as OpenAI's API sends them, one way everywhere (`validate_messages`):
`developer` means `system`, and content may be a list of text parts `{"type": "text", "text": ...}`,
joined; any other role or part is an error. Each message becomes its role marker (a special token)
followed by its text; every assistant turn ends with `[EOS]`:

    <|system|>You are terse.<|user|>Hi!<|assistant|>Hello.[EOS]<|user|>...<|assistant|>

A prompt for generation ends with `<|assistant|>`; the model's reply ends at `[EOS]`.
Role markers are inserted as ids, never parsed out of text, so user text cannot forge a turn.
`JINJA_TEMPLATE` is the same template, reading messages the same way, for `transformers`'
`apply_chat_template` and llama.cpp; the export tests check that both give identical ids. Those
programs parse special-token text in what the template renders, so it refuses content that
holds the text of a special token (`[EOS]`, `<|user|>`, ...), which gpt1 reads as plain text, and
tools, which it cannot show the model. `HF_JINJA_TEMPLATE`, the Hugging Face export's, also marks
the assistant replies with `{% generation %}` (transformers' `return_assistant_tokens_mask`).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from gpt1.core.constants import IGNORE_INDEX
from gpt1.core.errors import Gpt1Error
from gpt1.core.tokenizer import ASSISTANT, EOS, SPECIAL_TOKENS, SYSTEM, USER, Tokenizer, check_text

ROLE_TOKENS = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}
ROLE_ALIASES = {"developer": "system"}  # OpenAI's newer name for the system message
ROLES = "system, developer, user, assistant"  # what a message's role may be, as errors say it
TEMPLATE_FILE = "chat_template.jinja"  # the file name transformers also reads from a model folder

# validate_messages in Jinja, for the programs that render the exported template (transformers,
# llama.cpp and what is built on it): unknown roles and parts would otherwise become text
# ('<|tool|>'), so they call raise_exception, which transformers and llama-cpp-python provide.
# Those programs tokenize the rendered string with special tokens parsed, so content holding a
# special token's text ('[EOS]<|system|>...') would forge turns there: it is refused too (parts
# are joined first, since '[EO' + 'S]' renders as '[EOS]'). gpt1 itself inserts markers as ids
# and keeps such text as text. Tools are refused as `gpt1 serve` refuses them: the template has no
# place to show them, and dropping them would leave the caller believing the model saw them.
# (`tools is defined`: llama.cpp and jinja2 leave it undefined; transformers and
# llama-cpp-python pass None when there are none.)
# One line, no whitespace between tags: the output is the same with or without trim_blocks.
def _jinja_template(generation_marks: bool) -> str:
    """The template; `generation_marks` wraps each assistant reply and its [EOS] (what gpt1 trains
    on) in {% generation %}, for transformers' return_assistant_tokens_mask. The rendered text is
    the same either way."""
    reply = "{{ text + '" + EOS + "' }}"
    if generation_marks:
        reply = "{% generation %}" + reply + "{% endgeneration %}"
    return (
        "{% if tools is defined and tools %}{{ raise_exception('tools: gpt1 models cannot call tools (the chat "
        "template has no place for them); pass none') }}{% endif %}"
        "{% for message in messages %}"
        "{% set i = loop.index0 %}"
        "{% set role = 'system' if message['role'] == 'developer' else message['role'] %}"
        "{% if role not in ['system', 'user', 'assistant'] %}{{ raise_exception(\"messages[\" ~ i ~ \"].role: "
        "expected one of " + ROLES + ", got '\" ~ message['role'] ~ \"'\") }}{% endif %}"
        "{% if message['content'] is string %}{% set text = message['content'] %}"
        "{% elif message['content'] is defined and message['content'] is iterable %}"
        "{% for part in message['content'] %}"
        "{% if part['type'] != 'text' %}{{ raise_exception('messages[' ~ i ~ '].content[' ~ loop.index0 ~ "
        "']: expected a text part {\"type\": \"text\", \"text\": ...}') }}"
        "{% elif part['text'] is not string %}{{ raise_exception('messages[' ~ i ~ '].content[' ~ loop.index0 ~ "
        "'].text: expected a string') }}{% endif %}"
        "{% endfor %}"
        "{% set text = message['content'] | map(attribute='text') | join %}"
        "{% else %}{{ raise_exception('messages[' ~ i ~ '].content: expected a string or a list of text parts') }}"
        "{% endif %}"
        "{% for special in " + _jinja_list(SPECIAL_TOKENS) + " %}{% if special in text %}{{ raise_exception('messages[' ~ i ~ "
        "'].content: contains \"' ~ special ~ '\", the text of a special token, which would become that token here "
        "(gpt1 itself keeps it as text); remove it') }}{% endif %}{% endfor %}"
        "{{ '<|' + role + '|>' }}"
        "{% if role == 'assistant' %}" + reply + "{% else %}{{ text }}{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|' + 'assistant' + '|>' }}{% endif %}"
    )


def _jinja_list(tokens: list[str]) -> str:
    """`tokens` as a Jinja list whose source never spells a role marker whole ('<|' ~ 'user|>').
    Without --jinja, llama.cpp picks one of its built-in chat formats by the marker strings it
    finds in a template's source: <|user|> and <|assistant|> made it pick GLM-Edge's (a line break
    after each marker, no [EOS] after a reply), a prompt the model never saw, without a word. With
    no marker to find, it reports the template as unsupported instead (and --jinja renders it)."""
    return "[" + ", ".join(f"'<|' ~ '{t[2:]}'" if t.startswith("<|") else repr(t) for t in tokens) + "]"


# The model dir's chat_template.jinja and the GGUF export's tokenizer.chat_template: without
# {% generation %}, which plain jinja2 does not parse, nor llama-cpp-python before its 2026 fix
# (PR 2226): an older one fails to open a GGUF whose template holds it.
JINJA_TEMPLATE = _jinja_template(generation_marks=False)
# The Hugging Face export's: transformers reads the marks (the 4.45 that gpt1[hf] needs does).
HF_JINJA_TEMPLATE = _jinja_template(generation_marks=True)


def validate_messages(messages: Any, source: str = "messages") -> list[dict[str, str]]:
    """Checked and normalised copies of `{"role", "content"}` messages: `developer` becomes
    `system`, a list of text parts becomes their joined text, other keys are dropped. Raises
    Gpt1Error naming the bad item (`messages[1].content[0]`)."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise Gpt1Error(f"{source}: expected a non-empty list of {{'role', 'content'}} messages")
    return [_message(message, f"{source}[{i}]") for i, message in enumerate(messages)]


def _message(message: Any, source: str) -> dict[str, str]:
    if not isinstance(message, dict):
        raise Gpt1Error(f"{source}: expected an object with 'role' and 'content'")
    role = message.get("role")
    role = ROLE_ALIASES.get(role, role) if isinstance(role, str) else None  # (a list is unhashable)
    if role not in ROLE_TOKENS:
        raise Gpt1Error(f"{source}.role: expected one of {ROLES}, got {message.get('role')!r}")
    return {"role": role, "content": _content(message.get("content"), f"{source}.content")}


def _content(content: Any, source: str) -> str:
    if isinstance(content, str):
        return check_text(content, source)
    if not isinstance(content, list):
        raise Gpt1Error(f"{source}: expected a string or a list of text parts, got {type(content).__name__}")
    texts = []
    for j, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") != "text":
            got = f"type {part.get('type')!r}" if isinstance(part, dict) else type(part).__name__
            raise Gpt1Error(f'{source}[{j}]: expected a text part {{"type": "text", "text": ...}}, got {got} '
                            "(gpt1 models read text only)")
        texts.append(check_text(part.get("text"), f"{source}[{j}].text"))
    return "".join(texts)


def encode_chat(tokenizer: Tokenizer, messages: Sequence[dict[str, str]], add_generation_prompt: bool = True) -> list[int]:
    """Token ids of a conversation; with `add_generation_prompt`, ending with `<|assistant|>`."""
    ids, _ = encode_chat_with_labels(tokenizer, messages)
    if add_generation_prompt:
        ids.append(tokenizer.special_id(ASSISTANT))
    return ids


def encode_chat_with_labels(tokenizer: Tokenizer, messages: Sequence[dict[str, str]],
                            encode_text: Callable[[str], list[int]] | None = None) -> tuple[list[int], list[int]]:
    """Ids and training labels: labels equal ids on assistant reply tokens (text and its
    closing [EOS]) and IGNORE_INDEX everywhere else (role markers, system and user turns).

    Labels are aligned with ids (label i is the target for position i); the training code
    shifts by one so that position i predicts token i + 1. `encode_text` (default
    `tokenizer.encode`): how each message's text becomes ids (training encodes a long one in part).
    """
    ids: list[int] = []
    labels: list[int] = []
    for message in validate_messages(messages):
        message_ids = encode_message(tokenizer, message, encode_text)
        ids.extend(message_ids)
        if message["role"] == "assistant":
            labels.extend([IGNORE_INDEX] + message_ids[1:])
        else:
            labels.extend([IGNORE_INDEX] * len(message_ids))
    return ids, labels


def encode_message(tokenizer: Tokenizer, message: dict[str, str],
                   encode_text: Callable[[str], list[int]] | None = None) -> list[int]:
    """One validated message's ids: its role marker, its text, and [EOS] after an assistant reply.
    A conversation's ids are its messages' ids one after another."""
    text_ids = (encode_text or tokenizer.encode)(message["content"])
    ids = [tokenizer.special_id(ROLE_TOKENS[message["role"]]), *text_ids]
    if message["role"] == "assistant":
        ids.append(tokenizer.eos_id)
    return ids
