"""`gpt1.load(path)`: a model dir as one object with the model and its tokenizer."""

from __future__ import annotations

import os
from collections.abc import Generator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence, overload

import torch

from gpt1.core.config import ModelConfig
from gpt1.core.device import bf16_supported, no_bf16, resolve_device
from gpt1.core.errors import Gpt1Error
from gpt1.core.model import GPT
from gpt1.core.paths import as_path
from gpt1.core.progress import info
from gpt1.core.sampling_params import SamplingParams
from gpt1.core.sampling_params import preset as named_preset
from gpt1.core.tokenizer import Tokenizer, check_text
from gpt1.formats.hf import has_chat_template, load_with_tokenizer, model_folder
from gpt1.inference import generate as gen
from gpt1.inference.decoding import (
    Completion,
    chat_message_tails,
    chat_prompt_ids,
    fit_new_tokens,
    prompt_budget,
    prompt_tail,
    warn_if_cut,
    warn_if_message_cut,
)

# The dtypes a model can be loaded in for inference, by name (`--dtype` of generate, chat and serve).
DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(dtype: torch.dtype | str | None, device: torch.device) -> torch.dtype | None:
    """The dtype to load a model in on `device` (None: float32, the dtype a model folder's weights are
    loaded in, fp16/bf16 ones upcast). "auto"/None: bfloat16 on a
    CUDA GPU with native bf16 (`gpt1.core.device.bf16_supported`: half the memory traffic of
    float32, and its range), else None. bfloat16 where the device has no bf16 is a Gpt1Error."""
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise Gpt1Error(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        dtype = DTYPES[dtype]
    elif dtype is not None and dtype not in DTYPES.values():
        # torch would read an int as a device index ("Cannot access accelerator device ...").
        raise Gpt1Error(f"dtype must be one of {', '.join(DTYPES)} (or that torch dtype), got {dtype!r}")
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" and bf16_supported(device) else None
    if dtype == torch.bfloat16 and not bf16_supported(device):
        raise Gpt1Error(f"dtype bfloat16: {no_bf16(device)}; use float16 or float32")
    return dtype


# What was cut to fit the context, said through gpt1's logger as the library says everything: on
# stderr for a program that set up no logging (logging's last-resort handler prints warnings), in
# its own log for one that did. The CLI, which fits its prompts itself, says the same words.
def _model_dir(path: str | os.PathLike[str]) -> Path:
    return model_folder(as_path(path, "path", "a model dir"))  # hf:FOLDER or a Hub id too


@dataclass
class LLM:
    """A loaded model dir: `.model` (a GPT in eval mode), `.tokenizer` and `.path` (absolute)."""

    model: GPT
    tokenizer: Tokenizer
    # Absolute (errors while loading name the path as given): the host may chdir later, and it must
    # still name the dir that was loaded (its chat template, a fine-tune's train_config.json, the
    # process engine's child loading it again).
    path: Path

    @classmethod
    def load(cls, path: str | os.PathLike[str], device: str | torch.device | None = None,
             dtype: torch.dtype | str | None = None) -> "LLM":
        """The model in `dtype` (a torch dtype or one of DTYPES' names; default, or "auto":
        bfloat16 on a GPU that supports it, else float32, whatever dtype the folder stores)."""
        path = _model_dir(path)
        device = resolve_device(device)
        dtype = resolve_dtype(dtype, device)
        model, tokenizer = load_with_tokenizer(path, device=device, dtype=dtype)
        return cls(model=model, tokenizer=tokenizer, path=path.resolve())

    @classmethod
    def without_weights(cls, path: str | os.PathLike[str]) -> "LLM":
        """The dir's config and tokenizer with a weightless model (on the meta device), its shapes
        checked against the weights file: what a server whose engine runs in another process needs."""
        path = _model_dir(path)
        model, tokenizer = load_with_tokenizer(path, device="meta")
        return cls(model=model, tokenizer=tokenizer, path=path.resolve())

    @property
    def config(self) -> ModelConfig:
        return self.model.config

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    # ---- generation (gpt1.inference.generate, through the engine); knobs are SamplingParams fields, or preset="qa" ---------
    @property
    def is_chat_model(self) -> bool:
        """Whether the dir has the chat template (a fine-tuned model; `has_chat_template`). A base model given a
        conversation formats it the same way but just continues the text."""
        return has_chat_template(self.path)

    def sampling_params(self, preset: str | None = None, **knobs) -> SamplingParams:
        """The defaults, or a preset (qa, creative, code), with `knobs` overriding fields."""
        return (named_preset(preset) if preset is not None else SamplingParams()).override(**knobs)

    @overload
    def generate(self, prompt: str, *, n: None = None, **knobs) -> str: ...
    @overload
    def generate(self, prompt: str, *, n: int, **knobs) -> list[str]: ...

    def generate(self, prompt: str, *, n: int | None = None, **knobs) -> str | list[str]:
        """Continue `prompt`, e.g. `llm.generate("Once", temperature=0.7, top_k=50, seed=1)`.
        Without a max_new_tokens, the default (256) is capped at the room the prompt leaves, so that
        a prompt that fits is kept whole; a prompt that leaves no room for the max_new_tokens given
        (or fills the context) keeps its most recent tokens, with a warning.
        With `n`, a list of n samples decoded together, seeded seed, seed + 1, ... when `seed`
        is given (see SamplingParams.samples): reproducible, and different from each other."""
        ids, params = self._prompt_ids(prompt, self._text_params(knobs), knobs)
        if n is not None:
            return self._samples(params.samples(n), ids)
        return gen.generate(self.model, self.tokenizer, ids, params).text

    @overload
    def complete(self, prompt: str, *, n: None = None, **knobs) -> Completion: ...
    @overload
    def complete(self, prompt: str, *, n: int, **knobs) -> list[Completion]: ...

    def complete(self, prompt: str, *, n: int | None = None, **knobs) -> Completion | list[Completion]:
        """As `generate`, but the whole `Completion`: the text, its token ids, the finish reason,
        the token counts, and with `logprobs=k` / `prompt_logprobs=k` the log-probabilities of the
        reply's / the prompt's tokens (the model's own, each with its k most likely alternatives).
        `llm.complete(text, max_new_tokens=0, prompt_logprobs=0).prompt_logprobs` scores a text
        (the whole context's worth: no room is kept for a reply)."""
        ids, params = self._prompt_ids(prompt, self.sampling_params(**knobs), knobs)
        return self._completions(ids, params, n)

    @overload
    def chat_complete(self, messages: Sequence[Mapping[str, Any]], *, n: None = None, **knobs) -> Completion: ...
    @overload
    def chat_complete(self, messages: Sequence[Mapping[str, Any]], *, n: int, **knobs) -> list[Completion]: ...

    def chat_complete(self, messages: Sequence[Mapping[str, Any]], *, n: int | None = None,
                      **knobs) -> Completion | list[Completion]:
        """As `chat`, but the whole `Completion` (see `complete`): with `logprobs=k`, the reply's
        tokens' log-probabilities; with `prompt_logprobs=k`, the formatted conversation's."""
        ids, params = self._chat_ids(messages, self.sampling_params(**knobs), knobs)
        return self._completions(ids, params, n)

    def _completions(self, ids: list[int], params: SamplingParams, n: int | None) -> Completion | list[Completion]:
        if n is not None:
            samples = params.samples(n)
            return gen.generate_batch(self.model, self.tokenizer, [ids] * len(samples), samples)
        return gen.generate(self.model, self.tokenizer, ids, params)

    def _text_params(self, knobs: dict) -> SamplingParams:
        """The knobs of a call that returns text: log-probabilities would be computed and dropped."""
        params = self.sampling_params(**knobs)
        for name in ("logprobs", "prompt_logprobs"):
            if getattr(params, name) is not None:
                raise Gpt1Error(f"{name}: generate, stream and chat return text only; llm.complete(...) (and "
                                "llm.chat_complete(...)) return the Completion with its log-probabilities")
        return params

    def stream(self, prompt: str, **knobs) -> Generator[str, None, None]:
        """Like `generate`, yielding text pieces as they are produced. The prompt and knobs are
        checked at the call, as `generate` checks them."""
        return self._pieces(*self._prompt_ids(prompt, self._text_params(knobs), knobs))

    @overload
    def chat(self, messages: Sequence[Mapping[str, Any]], *, n: None = None, **knobs) -> str: ...
    @overload
    def chat(self, messages: Sequence[Mapping[str, Any]], *, n: int, **knobs) -> list[str]: ...

    def chat(self, messages: Sequence[Mapping[str, Any]], *, n: int | None = None, **knobs) -> str | list[str]:
        """The assistant's reply to `[{"role": "user", "content": "..."}, ...]` (roles system,
        user, assistant; `developer` and lists of text parts read as OpenAI's API sends them); the oldest turns are dropped when the conversation is too long, and a
        last message that alone does not fit loses the start of its text (the system message stays,
        and a warning says how many tokens went). Without a max_new_tokens, a conversation that fits
        is kept whole and the reply capped at the room it leaves, as the server does for an omitted
        max_tokens. With `n`, a list of n replies, as `generate`'s."""
        if n is None:
            return "".join(self.chat_stream(messages, **knobs))
        ids, params = self._chat_ids(messages, self._text_params(knobs), knobs)
        return self._samples(params.samples(n), ids)

    def chat_stream(self, messages: Sequence[Mapping[str, Any]], **knobs) -> Generator[str, None, None]:
        """Like `chat`, yielding text pieces as they are produced. The messages and knobs are
        checked at the call, as `chat` checks them."""
        return self._pieces(*self._chat_ids(messages, self._text_params(knobs), knobs))

    # `knobs`: the call's own, which say whether the caller chose max_new_tokens: gpt1's default is
    # a bound, capped at the room a prompt that fits leaves (decoding.fit_new_tokens), as the CLI
    # and the server cap theirs; it cut or refused prompts that fit a small model's context.
    def _chat_ids(self, messages: Sequence[Mapping[str, Any]], params: SamplingParams,
                  knobs: Mapping[str, Any]) -> tuple[list[int], SamplingParams]:
        """The conversation's token ids, fitted to the context (saying what was dropped or cut), and
        the knobs for them."""
        chosen, block = "max_new_tokens" in knobs, self.config.block_size
        chars_cut = 0
        if params.truncate_prompt:  # a text longer than the context is tokenized from its end only
            messages, chars_cut = chat_message_tails(self.tokenizer, messages, block)
        ids, dropped, cut = chat_prompt_ids(self.tokenizer, messages, block, params, max_new_tokens_chosen=chosen)
        if dropped:  # the documented fit, as `gpt1 chat` notes it (not a warning: the caller holds the history)
            info(f"(dropped the {dropped} oldest message(s) to fit the {block}-token context)")
        warn_if_message_cut(cut, chars_cut)
        return ids, fit_new_tokens(params, ids, block, chosen)

    def _prompt_ids(self, prompt: str, params: SamplingParams,
                    knobs: Mapping[str, Any]) -> tuple[list[int], SamplingParams]:
        """The prompt's token ids and the knobs for them, with a warning when generation will keep
        only its most recent ones (the engine cuts it by `prompt_budget`; without truncation
        fit_new_tokens refuses it instead). With truncation, a prompt longer than the context is
        tokenized from its end (`prompt_tail`): the ids that reach the model are the same."""
        block, text = self.config.block_size, check_text(prompt, "prompt")
        tail = prompt_tail(self.tokenizer, text, block) if params.truncate_prompt else text
        ids = self.tokenizer.encode(tail)
        params = fit_new_tokens(params, ids, block, "max_new_tokens" in knobs)
        if params.truncate_prompt:
            warn_if_cut(len(ids), min(len(ids), prompt_budget(block, params)), len(text) if len(tail) < len(text) else None)
        return ids, params

    def _samples(self, samples: list[SamplingParams], ids: list[int]) -> list[str]:
        """A text per SamplingParams of `samples`, of the prompt `ids`, decoded together."""
        return [c.text for c in gen.generate_batch(self.model, self.tokenizer, [ids] * len(samples), samples)]

    def _pieces(self, ids: list[int], params: SamplingParams) -> Generator[str, None, None]:
        # A generator of its own, so that stream and chat_stream, plain functions, check their
        # arguments when called: a bad knob raised only at the first next(), far from the call
        # (inside a web framework's streaming response).
        for chunk in gen.stream(self.model, self.tokenizer, ids, params):
            if chunk.text:
                yield chunk.text


def load(path: str | os.PathLike[str], device: str | torch.device | None = None, dtype: torch.dtype | str | None = None) -> LLM:
    """Load a model dir (pretrained, fine-tuned or a training run dir)."""
    return LLM.load(path, device=device, dtype=dtype)
