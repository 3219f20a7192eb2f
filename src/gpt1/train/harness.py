"""Benchmark evaluation scored as lm-evaluation-harness scores it, fast (`gpt1 eval --task`).

Tokenization follows lm-eval's `HFLM` for a causal model: trailing whitespace of a context moves
to its continuation, the continuation's tokens are `encode(context + continuation)` after the
first `len(encode(context))` tokens, and an empty context is the single prefix token ([EOS], the
exported tokenizer's BOS). One exception: text that spells a special token ("[EOS]", "<|user|>")
is encoded as that text, as everywhere in gpt1, while the export's tokenizer in transformers
makes it the special token; such examples score differently, and a warning names them.
A request's score is the sum of the continuation tokens' log-probabilities and whether each was
the argmax (`is_greedy`). Metrics are lm-eval's: `acc` (argmax of the sums), `acc_norm` (argmax of
the sums divided by each choice's length in characters), LAMBADA's `acc` (every token greedy) and
`perplexity` (exp of minus the mean log-likelihood, its exponent capped at 700 as perplexity mode
caps it); `stderr` of a mean is the sample standard deviation over sqrt(n) (lm-eval's
`mean_stderr`); of perplexity, the delta-method estimate (lm-eval bootstraps it), None where the
perplexity is capped or the estimate overflows.

Speed: examples are scored in chunks (longest first). The distinct contexts of a chunk run once,
without their last token, in one batch into a KV cache; then the chunk's continuations, sorted by
length, run in padded batches, each row `[last context token] + continuation[:-1]` on a copy of
its context's cache row. So a context shared by four choices is encoded once, and the
output layer runs on continuation positions only.
A context + continuation longer than the model's context is cut from the left, as HFLM cuts it
(`(context + continuation)[-(block_size + 1):]`), and the example counted as truncated; an example
with a continuation longer than the context alone (HFLM stops on an assertion there) is skipped and
counted, and a task none of whose examples can be scored is an error (`NothingScored`), never a
null metric.
"""

from __future__ import annotations

import contextlib
import math
import platform
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from gpt1.core.atomic import write_text
from gpt1.core.errors import Gpt1Error
from gpt1.core.model import KVCache
from gpt1.core.progress import progress, warn
from gpt1.core.threads import tuned_threads
from gpt1.core.tokenizer import SPECIAL_TOKENS
from gpt1.train.evaluate import MAX_LOG_PERPLEXITY, check_finite, perplexity
from gpt1.train.precision import autocast, resolve_precision
from gpt1.train.tasks import Example, Task, get_task, load_documents, split_exists

CHUNK_BATCHES = 4  # a chunk's prefixes are held in memory while its continuations run

# Published numbers, each with where it was read. GPT-2 "117M" in the paper is the model now
# counted as 124M; "345M" is GPT-2 medium (~350M).
REFERENCES = [
    ("GPT-2 124M", "hellaswag", 0, "acc", 0.2892,
     "lm-evaluation-harness, as quoted in karpathy/llm.c dev/data/hellaswag.py (docstring)"),
    ("GPT-2 124M", "hellaswag", 0, "acc_norm", 0.3114,
     "lm-evaluation-harness, as quoted in karpathy/llm.c dev/data/hellaswag.py (docstring)"),
    ("GPT-2 124M", "lambada", 0, "acc", 0.4599,
     "Radford et al. 2019, Language Models are Unsupervised Multitask Learners, Table 3 (own LAMBADA protocol)"),
    ("GPT-2 124M", "lambada", 0, "perplexity", 35.13,
     "Radford et al. 2019, Table 3 (own LAMBADA protocol and detokenizer)"),
    ("GPT-2 350M", "lambada", 0, "acc", 0.5548,
     "Radford et al. 2019, Table 3 (own LAMBADA protocol)"),
    ("GPT-2 350M", "lambada", 0, "perplexity", 15.60,
     "Radford et al. 2019, Table 3 (own LAMBADA protocol and detokenizer)"),
]


class NothingScored(Gpt1Error):
    """No example of a task fits the model's context: the task has no result."""


@dataclass
class Scored:
    """One request's score: log P(continuation | context), and whether every token was the argmax."""

    loglikelihood: float
    is_greedy: bool
    tokens: int


@dataclass
class TaskResult:
    task: str
    num_fewshot: int
    n: int  # examples scored
    skipped: int  # examples with a continuation longer than the model's context
    metrics: dict[str, tuple[float, float | None]]  # name -> (value, stderr); stderr None: one example
    samples: list[dict] = field(default_factory=list, repr=False)
    truncated: int = 0  # examples scored whose prompts were cut from the left to fit the context

    def rows(self) -> list[dict]:
        return [{"task": self.task, "fewshot": self.num_fewshot, "metric": name, "value": value, "stderr": stderr,
                 "n": self.n, "truncated": self.truncated, "skipped": self.skipped}
                for name, (value, stderr) in self.metrics.items()]


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) exactly as lm-eval's HFLM splits a request."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    if not context:  # empty, or only the whitespace just moved (HFLM would score with no context at all)
        return [tokenizer.eos_id], tokenizer.encode(continuation)
    context_ids = tokenizer.encode(context)
    return context_ids, tokenizer.encode(context + continuation)[len(context_ids):]


class Scorer:
    """Batched log-likelihood scoring of (context ids, continuation ids) pairs with a shared-context KV cache."""

    def __init__(self, model: torch.nn.Module, *, batch_size: int = 32, precision: str = "fp32"):
        self.model, self.batch_size = model.eval(), batch_size
        self.device = next(model.parameters()).device
        self.precision = resolve_precision(precision, self.device, doing="evaluating")
        self.dtype = next(model.parameters()).dtype

    def can_score(self, continuation: list[int]) -> bool:
        """Whether a continuation can be scored: 1 to block_size tokens, as HFLM asserts (a longer
        one leaves no room for any context)."""
        return 0 < len(continuation) <= self.model.config.block_size

    def fit(self, context: list[int], continuation: list[int]) -> list[int]:
        """The context, cut from the left so that context + continuation[:-1] fills at most the
        model's context, as HFLM cuts `(context + continuation)[-(block_size + 1):][:-1]`."""
        keep = self.model.config.block_size + 1 - len(continuation)
        return context[-keep:] if len(context) > keep else context

    def score_examples(self, examples: list[list[tuple[list[int], list[int]]]], desc: str = "eval",
                       show_progress: bool = True) -> list[list[Scored]]:
        """Scores of each example's requests, in chunks of whole examples (longest first, so a
        chunk holds examples of like length) of at most `batch_size` distinct contexts and about
        CHUNK_BATCHES x `batch_size` requests."""
        order = sorted(range(len(examples)), key=lambda i: -max(len(c) + len(k) for c, k in examples[i]))
        results: list[list[Scored]] = [[] for _ in examples]
        # On a CPU each chunk runs on the fastest thread count as the load changes (gpt1.core.threads),
        # its time compared per token scored.
        with tuned_threads(self.device) as tuner, \
                progress(total=len(examples), desc=desc, unit="ex", disable=None if show_progress else True) as bar:
            chunk: list[int] = []
            for n, i in enumerate(order):
                chunk.append(i)
                pairs = [pair for j in chunk for pair in examples[j]]
                if n + 1 < len(order) and len(pairs) < CHUNK_BATCHES * self.batch_size and \
                        len({tuple(c) for c, _ in pairs}) < self.batch_size:
                    continue
                tokens = sum(len(c) for c in {tuple(c) for c, _ in pairs}) + sum(len(k) for _, k in pairs)
                with tuner.step(size=tokens) if tuner else contextlib.nullcontext():
                    scores = iter(self.score(pairs))
                for j in chunk:
                    results[j] = [next(scores) for _ in examples[j]]
                bar.update(len(chunk))
                chunk = []
        return results

    @torch.inference_mode()
    def score(self, pairs: list[tuple[list[int], list[int]]]) -> list[Scored]:
        """Scores of pairs that all fit the context (see `fit`): the distinct contexts' prefixes
        are encoded once, in one batch, into a KV cache; then the continuations run in batches of
        `batch_size` rows of like length, each row on a copy of its context's cache rows."""
        contexts = list(dict.fromkeys(tuple(c) for c, _ in pairs))
        prefix = self._encode_prefixes(contexts)
        row_of = {c: i for i, c in enumerate(contexts)}
        scores: list[Scored | None] = [None] * len(pairs)
        order = sorted(range(len(pairs)), key=lambda r: -len(pairs[r][1]))
        for start in range(0, len(order), self.batch_size):
            rows = order[start:start + self.batch_size]
            batch = [pairs[r] for r in rows]
            cache_rows = torch.tensor([row_of[tuple(c)] for c, _ in batch], device=self.device)
            for r, scored in zip(rows, self._score_continuations(batch, prefix, cache_rows)):
                scores[r] = scored
        return scores

    def _encode_prefixes(self, contexts: list[tuple[int, ...]]) -> KVCache:
        """A cache with row i = context i but its last token (right-padded)."""
        prefix = torch.zeros(len(contexts), max(len(c) for c in contexts) - 1, dtype=torch.long)
        for i, c in enumerate(contexts):
            prefix[i, :len(c) - 1] = torch.tensor(c[:-1])
        cache = KVCache(self.model.config, len(contexts), max_len=max(prefix.size(1), 1), device=self.device,
                        dtype=self.dtype)
        if prefix.size(1):
            with autocast(self.device, self.precision):
                # Plain causal attention: right padding comes after every real token, so no real
                # token sees it; only the cache is kept.
                self.model(prefix.to(self.device), cache=cache, last_only=True)
        return cache

    def _score_continuations(self, pairs: list[tuple[list[int], list[int]]], prefix: KVCache,
                             cache_rows: torch.Tensor) -> list[Scored]:
        """Run `[last context token] + continuation[:-1]` of every pair on its context's cache row."""
        prefix_lens = torch.tensor([len(c) - 1 for c, _ in pairs])
        cont_lens = torch.tensor([len(k) for _, k in pairs])
        Lc, T = int(prefix_lens.max()), int(cont_lens.max())
        cache = KVCache(self.model.config, len(pairs), max_len=Lc + T, device=self.device, dtype=self.dtype)
        cache.k[:, :, :, :Lc] = prefix.k[:, cache_rows, :, :Lc]
        cache.v[:, :, :, :Lc] = prefix.v[:, cache_rows, :, :Lc]
        cache.length = Lc
        inputs = torch.zeros(len(pairs), T, dtype=torch.long)
        targets = torch.zeros(len(pairs), T, dtype=torch.long)
        for r, (c, k) in enumerate(pairs):
            inputs[r, :len(k)] = torch.tensor([c[-1]] + k[:-1])
            targets[r, :len(k)] = torch.tensor(k)
        # Padding positions may run past the context; they are masked and never read.
        positions = (prefix_lens[:, None] + torch.arange(T)[None]).clamp(max=self.model.config.block_size - 1)
        valid = torch.arange(T)[None] < cont_lens[:, None]
        key_mask = torch.cat([torch.arange(Lc)[None] < prefix_lens[:, None], valid], dim=1)
        with autocast(self.device, self.precision):
            logits = self.model(inputs.to(self.device), cache=cache, positions=positions.to(self.device),
                                attention_mask=key_mask.to(self.device)).float()
        targets, valid = targets.to(self.device), valid.to(self.device)
        token_lp = logits.gather(-1, targets[..., None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)
        # Summed in float64 on the CPU (MPS has no float64); masking in float32 first is exact.
        token_lp = (token_lp * valid).cpu().double()
        greedy = ((logits.argmax(-1) == targets) | ~valid).cpu()
        return [Scored(float(token_lp[r].sum()), bool(greedy[r].all()), int(cont_lens[r])) for r in range(len(pairs))]


# ---- tasks -> results ------------------------------------------------------------------------
def task_sources(task_names: list[str], data: list[str] | None) -> dict[str, str | None]:
    """Where each task's documents come from. `data` entries: `TASK=SOURCE`; a folder holding
    `TASK.jsonl` files or `TASK/` split folders (for every task found there); or, with one task,
    its file or split folder. A source is a .jsonl file, a folder of SPLIT.jsonl files or
    hf:NAME[@REVISION]. `TASK=SOURCE` takes precedence over a folder's file for that task; any
    other task given twice is an error. Tasks not named get their hub dataset, unless a folder of
    task files was given: then a task missing from it is an error (the hub is asked for only by name)."""
    sources: dict[str, str | None] = {name: None for name in task_names}
    given: dict[str, str] = {}  # task -> what gave its source, for the error when another does too
    named: set[str] = set()  # tasks given as TASK=SOURCE

    def give(name: str, source: str, by: str) -> None:
        if name in given:  # the later one would silently win
            raise Gpt1Error(f"{by}: task {name} is already given by {given[name]}; pass one source per task")
        sources[name], given[name] = source, by

    folders = []
    for entry in sorted(data or [], key=lambda e: "=" not in e):  # TASK=SOURCE entries first
        name, sep, source = entry.partition("=")
        if sep:
            get_task(name)
            if name not in sources:
                raise Gpt1Error(f"--data {entry}: task {name!r} is not among the tasks evaluated ({', '.join(task_names)})")
            give(name, source, f"--data {entry}")
            named.add(name)
            continue
        path = Path(entry)
        found = [(n, p) for n in task_names for p in (path / f"{n}.jsonl", path / n) if p.exists()]
        if found:
            for n, p in found:
                if n not in named:
                    give(n, str(p), str(p))
            folders.append(path)
        elif len(task_names) == 1 and (path.exists() or entry.startswith("hf:")):
            give(task_names[0], entry, f"--data {entry}")
        else:
            raise Gpt1Error(f"--data {entry}: not a task file or folder for {', '.join(task_names)} (pass TASK=PATH, or a "
                            "folder holding TASK.jsonl files)")
    missing = [name for name, source in sources.items() if source is None]
    if folders and missing:
        expected = ", ".join(str(folders[0] / f"{name}.jsonl") for name in missing)
        raise Gpt1Error(f"--data {folders[0]}: no {expected} (or TASK/ folder of split files); pass "
                        f"{missing[0]}=PATH, or {missing[0]}=hf:{get_task(missing[0]).hub} to read it from the hub")
    return sources


def build_examples(task: Task, source: str | None, num_fewshot: int = 0, limit: int | None = None) -> list[Example]:
    docs = load_documents(task, source, task.eval_split)
    if not docs:
        raise Gpt1Error(f"{task.name}: {source or task.hub} has no documents")
    fewshot_docs = docs  # a single file lends its own documents (documented); a folder or the hub has the split
    if num_fewshot and task.fewshot_split and not (source and Path(source).is_file()):
        if not split_exists(task, source, task.fewshot_split):  # drawing from the evaluated split: not lm-eval's prompts
            local = source is not None and not source.startswith("hf:")
            missing = (f"{Path(source) / task.fewshot_split}.jsonl: no such file" if local
                       else f"{source or task.hub}: no {task.fewshot_split} split")
            raise Gpt1Error(f"{missing}; --fewshot {num_fewshot} draws "
                            f"{task.name}'s examples from its {task.fewshot_split} split, as lm-eval does (or pass "
                            f"{task.name}=FILE.jsonl to draw them from the evaluated file)")
        fewshot_docs = load_documents(task, source, task.fewshot_split)
    return task.build_examples(docs[:limit], fewshot_docs, num_fewshot, same_pool=fewshot_docs is docs)


def evaluate_task(llm, task_name: str, *, source: str | None = None, num_fewshot: int = 0, limit: int | None = None,
                  batch_size: int = 32, precision: str = "fp32", show_progress: bool = True) -> TaskResult:
    """Score one task on a loaded model (`gpt1.load`: a chat model's adapter is merged)."""
    task = get_task(task_name)
    examples = build_examples(task, source, num_fewshot, limit)
    scorer = Scorer(llm.model, batch_size=batch_size, precision=precision)
    encoded = [[encode_pair(llm.tokenizer, r.context, r.continuation) for r in ex.requests] for ex in examples]
    kept = [i for i, pairs in enumerate(encoded) if all(scorer.can_score(k) for _, k in pairs)]
    if not kept:  # a mean over nothing: an error, never a null metric
        raise NothingScored(f"{task_name}: nothing scored: all {len(examples)} examples have an answer (continuation) "
                            f"longer than the model's context of {llm.model.config.block_size} tokens (a model with a "
                            "longer context would score them)")
    # As lm-eval scores them: a prompt too long for the context loses its first tokens (the
    # first shots, then the question's start), never the answer scored.
    fitted = [[(scorer.fit(c, k), k) for c, k in encoded[i]] for i in kept]
    cut = [[len(c) - len(f) for (c, _), (f, _) in zip(encoded[i], pairs)] for i, pairs in zip(kept, fitted)]
    _warn_special_token_text(task_name, [examples[i] for i in kept], llm.tokenizer)
    scores = scorer.score_examples(fitted, desc=task_name, show_progress=show_progress)
    for i, scored in zip(kept, scores):  # NaN log-likelihoods still have an argmax: a chance-level accuracy
        for s in scored:
            check_finite(s.loglikelihood, f"{task_name}: {examples[i].doc.origin}: the log-likelihood", llm, precision)
    return _metrics(task, [examples[i] for i in kept], scores, num_fewshot, skipped=len(examples) - len(kept), cut=cut)


def _warn_special_token_text(task_name: str, examples: list[Example], tokenizer) -> None:
    """gpt1 encodes text that spells a special token ("[EOS]", "<|user|>") as that text; transformers'
    tokenizer of the `gpt1 export`, which lm-eval's HFLM uses, makes it the special token, so the
    scores of such examples differ from lm-eval's. Said once per task, naming the first one."""
    specials = [t for t in SPECIAL_TOKENS if tokenizer.token_to_id(t) is not None]
    spelled: dict[str, None] = {}  # in the order found
    found = []
    for ex in examples:
        texts = {r.context + r.continuation for r in ex.requests}
        hits = [t for t in specials if any(t in text for text in texts)]
        if hits:
            found.append(ex)
            spelled.update(dict.fromkeys(hits))
    if found:
        warn(f"{task_name}: {len(found)} example(s) spell special tokens as text ({', '.join(spelled)}; the first: "
             f"{found[0].doc.origin}); gpt1 scores that text as text, lm-eval on the `gpt1 export` as special "
             "tokens, so those examples' scores differ from lm-eval's")


def _metrics(task: Task, examples: list[Example], scores: list[list[Scored]], num_fewshot: int, skipped: int,
             cut: list[list[int]] | None = None) -> TaskResult:
    """`cut`: per example, per request, the context tokens cut from the left (none: nothing cut)."""
    cut = cut or [[0] * len(ex.requests) for ex in examples]
    per_metric: dict[str, list[float]] = {m: [] for m in task.metrics}
    samples = []
    for ex, scored, ex_cut in zip(examples, scores, cut):
        lls = np.array([s.loglikelihood for s in scored])
        sample = {"task": task.name, "doc": ex.doc.origin, "gold": ex.gold,
                  "requests": [{"context": r.context, "continuation": r.continuation, "loglikelihood": s.loglikelihood,
                                "is_greedy": s.is_greedy, "tokens": s.tokens, "context_tokens_cut": n}
                               for r, s, n in zip(ex.requests, scored, ex_cut)]}
        if task.kind == "multiple_choice":
            values = {"acc": float(np.argmax(lls) == ex.gold)}
            if "acc_norm" in per_metric:
                # The schema refuses an empty choice, but HellaSwag's cleaning can empty an ending
                # ("[header]"): lm-eval divides by its 0 too (-inf, never chosen); no numpy warning.
                with np.errstate(divide="ignore", invalid="ignore"):
                    normed = lls / np.array([float(len(c)) for c in ex.choices])
                values["acc_norm"] = float(np.argmax(normed) == ex.gold)
        else:
            values = {"perplexity": float(lls[0]), "acc": float(scored[0].is_greedy)}
        for name in per_metric:
            per_metric[name].append(values[name])
        samples.append({**sample, **values})
    metrics = {}
    for name, values in per_metric.items():
        arr = np.array(values)
        stderr = float(arr.std(ddof=1) / math.sqrt(len(arr))) if len(arr) > 1 else None
        if name == "perplexity":  # values are log-likelihoods; exp(-mean), delta-method stderr
            loss = -float(arr.mean())
            ppl = perplexity(loss)  # capped as perplexity mode caps it: exp overflows past ~709.8
            # Past the cap, or where ppl x stderr overflows, the delta method estimates nothing: no
            # stderr (null in --json, as for one example), never inf, which JSON cannot hold.
            delta = ppl * stderr if stderr is not None and loss < MAX_LOG_PERPLEXITY else None
            metrics[name] = (ppl, delta if delta is not None and math.isfinite(delta) else None)
        else:
            metrics[name] = (float(arr.mean()), stderr)
    return TaskResult(task.name, num_fewshot, len(examples), skipped, metrics, samples,
                      truncated=sum(any(ex_cut) for ex_cut in cut))


# ---- output ------------------------------------------------------------------------------------
def format_results(results: list[TaskResult]) -> str:
    """A Markdown table: task, shots, metric, value ± stderr, n (truncated, skipped)."""
    lines = ["| task | shots | metric | value | stderr | n | truncated | skipped |", "|---|---|---|---|---|---|---|---|"]
    for row in (row for r in results for row in r.rows()):
        stderr = "" if row["stderr"] is None else f"{row['stderr']:.4f}"
        lines.append(f"| {row['task']} | {row['fewshot']} | {row['metric']} | {row['value']:.4f} | {stderr} | "
                     f"{row['n']} | {row['truncated']} | {row['skipped']} |")
    return "\n".join(lines)


def results_json(results: list[TaskResult]) -> dict:
    return {r.task: {"fewshot": r.num_fewshot, "n": r.n, "truncated": r.truncated, "skipped": r.skipped,
                     "metrics": {name: {"value": v, "stderr": s} for name, (v, s) in r.metrics.items()}} for r in results}


def samples_text(results: list[TaskResult]) -> str:
    """The scored examples, one JSON object per line (what `--samples` writes)."""
    import json

    return "".join(json.dumps(s) + "\n" for r in results for s in r.samples)


def write_samples(path: str | Path, results: list[TaskResult]) -> None:
    write_text(path, samples_text(results))


def report_text(model_path: str | Path, results: list[TaskResult], *, suite: str | None,
                perplexity: dict | None, device: str) -> str:
    """The model's report.md: perplexity, the task table, and published reference points."""
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"# Evaluation of `{model_path}`", "",
             f"{when}, on {device} ({platform.processor() or platform.machine()}), with `gpt1 eval`"
             + (f" `--suite {suite}`" if suite else "") + ". Tasks are scored as lm-evaluation-harness 0.4.x scores "
             "them (same prompts and metrics); `n` is the number of examples, so a limited run is a sample.", ""]
    if perplexity:
        lines += ["## Perplexity", "", "| data | tokens | loss | perplexity | bits per byte |", "|---|---|---|---|---|",
                  f"| {perplexity['source']} | {perplexity['tokens']:,} | {perplexity['loss']:.4f} | "
                  f"{perplexity['perplexity']:.2f} | {perplexity['bits_per_byte']:.4f} |", ""]
    lines += ["## Tasks", "", format_results(results), "", "## Published reference points", "",
              "Not measured here: numbers as published, with where each is from. Compare a row only with the same "
              "task, shots and metric.", "", "| model | task | shots | metric | value | source |", "|---|---|---|---|---|---|"]
    lines += [f"| {m} | {t} | {k} | {metric} | {v:g} | {src} |" for m, t, k, metric, v, src in REFERENCES]
    return "\n".join(lines) + "\n"


def write_report(path: str | Path, model_path: str | Path, results: list[TaskResult], *, suite: str | None,
                 perplexity: dict | None, device: str) -> None:
    write_text(path, report_text(model_path, results, suite=suite, perplexity=perplexity, device=device))
