"""Every sampling knob in one frozen dataclass, and the model card's named presets.

Plain data, read by the decode loop (`gpt1.inference`), the server's request mapping and the
Hugging Face export's generation_config.json; the logits processors that apply the knobs live
in `gpt1.inference.sampling`.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from gpt1.core.errors import Gpt1Error, other_name_hint

# What each knob accepts; used in error messages and in the CLI's help.
KNOB_RANGES = {
    "temperature": "a number >= 0 (0 = greedy)",
    "top_k": "an integer >= 0 (0 = off)",
    "top_p": "a number in [0, 1] (1 = off, 0 = the most likely token alone)",
    "min_p": "a number in [0, 1] (0 = off)",
    "repeat_penalty": "a number > 0 (1 = off)",
    "repeat_last_n": "an integer >= -1 (-1 = the whole context, 0 = off)",
    "max_new_tokens": "an integer >= 0 (0 = none: the prompt scored alone)",
    "stop": "a list of non-empty strings",
    "seed": "an integer in [-2**63, 2**64) or None (random)",
    "truncate_prompt": "true or false",
    "logprobs": "None or an integer in [0, 20] (the alternatives shown beside each generated token)",
    "prompt_logprobs": "None or an integer in [0, 20] (the alternatives shown beside each prompt token)",
}
# OpenAI's penalties are subtracted (0 = off, -2..2); CTRL's repeat penalty divides, so the
# number a user brings from OpenAI means the opposite here (0.6 made repeats 6x likelier).
REPEAT_PENALTY_SCALE = ("CTRL's penalty, a factor: 1 = off, above 1 discourages repeats (1.1-1.3 typical), "
                        "below 1 encourages them")
MAX_LOGPROBS = 20  # alternatives per token, as OpenAI's top_logprobs and vLLM's default cap

# Other libraries' names for gpt1's knobs (Hugging Face's generate, OpenAI, vLLM, llama.cpp, Ollama,
# TGI, nanoGPT's sample.py), so that an unknown knob spelled their way is told gpt1's name: alias ->
# (gpt1's name, what differs). `n` is the number of samples, an argument of LLM.generate and
# LLM.chat (and the server's `n`), not a SamplingParams field.
ALIASES: dict[str, tuple[str, str]] = {
    "repetition_penalty": ("repeat_penalty", ""),
    "penalty_last_n": ("repeat_last_n", ""),
    "frequency_penalty": ("repeat_penalty", REPEAT_PENALTY_SCALE),
    "presence_penalty": ("repeat_penalty", REPEAT_PENALTY_SCALE),
    "max_tokens": ("max_new_tokens", ""),
    "max_length": ("max_new_tokens", "it counts the new tokens only"),
    "n_predict": ("max_new_tokens", ""),
    "num_predict": ("max_new_tokens", ""),
    "do_sample": ("temperature", "0 is greedy, as do_sample=False"),
    "stop_sequences": ("stop", ""),
    "stop_strings": ("stop", ""),
    "num_return_sequences": ("n", ""),
    "num_samples": ("n", ""),
    "top_logprobs": ("logprobs", "the number of alternatives; None is off"),
    "output_scores": ("logprobs", "log-probabilities of the model's own distribution"),
}

# SamplingParams fields that OpenAI's API (and so gpt1's server) names differently.
API_NAMES = {"max_new_tokens": "max_tokens"}


def alias_hint(name: str, rename: Mapping[str, str] | None = None) -> str:
    """What an error about the unknown knob `name` adds when it is another library's name for one of
    gpt1's: ` (gpt1's is NAME)`, else "". `rename`: gpt1's names as the caller spells them
    (API_NAMES for the server, where max_new_tokens is itself such a name)."""
    return other_name_hint(name, ALIASES, rename=rename)


@dataclass(frozen=True)
class SamplingParams:
    """Every sampling knob, with its default. `validate()` returns a checked, normalised copy.

    temperature     randomness; 0 = greedy (always the most likely token)
    top_k           sample among the k most likely tokens; 0 = off
    top_p           sample among the most likely tokens whose probabilities sum to top_p; 1 = off
    min_p           drop tokens less likely than min_p x the most likely one; 0 = off
    repeat_penalty  divide positive / multiply negative logits of tokens already in the window
                    (CTRL, Hugging Face, llama.cpp); 1 = off
    repeat_last_n   the window: last n tokens, prompt included (64, llama.cpp's default);
                    -1 = the whole context (as Hugging Face); 0 = off
    max_new_tokens  most tokens to generate; 0 = none, for a prompt scored alone (with
                    prompt_logprobs; OpenAI's legacy `max_tokens: 0` with `echo`)
    stop            strings that end the text (not included in it): a list, a tuple or one string;
                    held as a tuple
    seed            same seed, same prompt, same knobs -> same text (on one machine, at one
                    CPU thread count: docs/generation.md); None = random. A negative
                    seed (OpenAI's seed is an int64) is the same as seed + 2**64
    truncate_prompt a prompt too long for the context keeps its most recent tokens; False = error
    logprobs        report each generated token's log-probability and this many most likely
                    alternatives (0 = the token's alone); None = off. Of the model's own
                    distribution, before the repeat penalty, temperature and filters (vLLM's
                    default, and what scoring wants): greedy or sampled, the same numbers
    prompt_logprobs the same for each prompt token the model sees (the first has none: nothing
                    precedes it); None = off. What lm-eval-harness scores a continuation with
    """

    temperature: float = 0.8
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    max_new_tokens: int = 256
    stop: Sequence[str] = ()
    seed: int | None = None
    truncate_prompt: bool = True
    logprobs: int | None = None
    prompt_logprobs: int | None = None

    def __post_init__(self) -> None:
        # A list (as the docs pass it), one string or None (as the OpenAI API allows) is held as a
        # tuple: a frozen SamplingParams is then hashable and compares equal for equal stops before
        # validate(). Anything else is left for validate() to name.
        stop = (self.stop,) if isinstance(self.stop, str) else () if self.stop is None else self.stop
        if isinstance(stop, (list, tuple)):
            object.__setattr__(self, "stop", tuple(stop))

    def validate(self) -> "SamplingParams":
        """Check every knob; Gpt1Error naming the field and its allowed range otherwise."""
        def bad(name: str) -> Gpt1Error:
            return Gpt1Error(f"{name} must be {KNOB_RANGES[name]}, got {getattr(self, name)!r}")

        # numbers.Real/Integral: NumPy's scalars (np.float32(0.7), np.int64(3)) are knobs too.
        def number(name: str, ok) -> float:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or not ok(value):
                raise bad(name)
            return float(value)

        def integer(name: str, ok) -> int:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not ok(value):
                raise bad(name)
            return int(value)

        if not isinstance(self.stop, tuple) or not all(isinstance(s, str) and s for s in self.stop):  # see __post_init__
            raise bad("stop")
        # OpenAI's seed is a signed int64, gpt1's (a torch.Generator's) an unsigned one: -1 is 2**64 - 1.
        seed = None if self.seed is None else integer("seed", lambda v: -2**63 <= v < 2**64) % 2**64
        if not isinstance(self.truncate_prompt, bool):
            raise bad("truncate_prompt")
        # The engine batches these as int64 tensors; a larger value would fail there, and means
        # nothing more than the vocabulary size (top_k) or -1 (repeat_last_n) already does.
        for name, all_of in (("top_k", "any value >= the vocabulary size keeps every token"),
                             ("repeat_last_n", "-1 is the whole context")):
            value = getattr(self, name)
            if isinstance(value, numbers.Integral) and value >= 2**63:
                raise Gpt1Error(f"{name} must be less than 2**63 ({all_of}), got {value}")
        return dataclasses.replace(
            self,
            temperature=number("temperature", lambda v: v >= 0),
            top_k=integer("top_k", lambda v: v >= 0),
            top_p=number("top_p", lambda v: 0 <= v <= 1),  # 0 as transformers and llama.cpp take it: keep one token
            min_p=number("min_p", lambda v: 0 <= v <= 1),
            repeat_penalty=number("repeat_penalty", lambda v: v > 0),
            repeat_last_n=integer("repeat_last_n", lambda v: v >= -1),
            max_new_tokens=integer("max_new_tokens", lambda v: v >= 0),
            seed=seed,
            logprobs=None if self.logprobs is None else integer("logprobs", lambda v: 0 <= v <= MAX_LOGPROBS),
            prompt_logprobs=(None if self.prompt_logprobs is None
                             else integer("prompt_logprobs", lambda v: 0 <= v <= MAX_LOGPROBS)),
        )

    def override(self, **knobs: Any) -> "SamplingParams":
        """A validated copy with some knobs changed; an unknown knob is a Gpt1Error."""
        known = [f.name for f in dataclasses.fields(self)]
        unknown = sorted(set(knobs) - set(known))
        if unknown:
            named = ", ".join(name + alias_hint(name) for name in unknown)
            raise Gpt1Error(f"unknown sampling knob(s) {named}; known: {', '.join(known)}")
        return dataclasses.replace(self, **knobs).validate()

    def samples(self, n: int) -> list["SamplingParams"]:
        """The validated knobs of `n` samples of one prompt (OpenAI's and vLLM's `n`, Hugging
        Face's num_return_sequences): with a seed, seeds seed, seed + 1, ... (mod 2**64), so that
        the samples differ and the set is the same at every call, its first the text the seed gives
        alone; without one, each sample is a draw of its own. Greedy samples are all the same text.
        Gpt1Error unless n is an integer >= 1."""
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
            raise Gpt1Error(f"n must be an integer >= 1 (the number of samples), got {n!r}")
        params = self.validate()
        if params.seed is None:
            return [params] * int(n)
        return [dataclasses.replace(params, seed=(params.seed + i) % 2**64) for i in range(int(n))]


# The model card's three uses.
PRESETS: dict[str, SamplingParams] = {
    "qa": SamplingParams(temperature=0.7, top_k=50),
    "creative": SamplingParams(temperature=0.5, top_k=40, repeat_penalty=1.05),
    "code": SamplingParams(temperature=0.2, top_k=30, top_p=0.8, repeat_penalty=1.05),
}


def preset(name: str) -> SamplingParams:
    """A named preset (qa, creative, code); Gpt1Error listing them for an unknown name."""
    if name not in PRESETS:
        raise Gpt1Error(f"unknown sampling preset {name!r}; known: {', '.join(PRESETS)}")
    return PRESETS[name]
