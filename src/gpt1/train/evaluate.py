"""Validation loss and perplexity of a model on held-out batches, shards, text files or chat data.

Perplexity is exp(mean token loss). `evaluate_loss` is what the training loop calls on its
fixed validation batches; `evaluate_data` is `gpt1 eval`: the whole `val.bin` of a prepared
data dir (or text files, tokenized with `[EOS]` after each document) cut into context windows
that predict every token after the first exactly once: disjoint runs of `block_size` targets,
the last, shorter run predicted by a window ending at the last token, whose inputs overlap the
window before (lm-eval's loglikelihood_rolling), so no token is dropped and each has a full context.
A source shorter than one context is scored in one window of its own length, as lm-eval does.
A loss that is not finite (fp16 overflow, a broken model) is an error, never a NaN in a report.

`per_document` scores text sources as lm-eval's `loglikelihood_rolling` scores a wikitext-style
task instead: each document alone, in the same windows over `[EOS] + document` ([EOS] is the
export's BOS, HFLM's prefix token), so no document sees another and no [EOS] after one is predicted;
it adds lm-eval's `word_perplexity` and `byte_perplexity` (lm_eval/api/metrics.py).

`evaluate_chat` is `gpt1 eval --chat`: the loss on the assistant tokens of the conversations
chat fine-tuning holds out. `read_chat_splits` is that split, which `gpt1.train.finetune` trains
on the other side of; a model's run record (train_config.json: `read_run_record`) gives the
settings it was split with, and says whether the conversations scored are the ones its run held out.

Bits per byte (tokenizer-independent, so models with different tokenizers compare) is the
summed loss in bits over the UTF-8 bytes of the predicted tokens; special tokens ([EOS] between
documents, a chat's role markers) count as zero bytes, their loss is still paid.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch

from gpt1.core.constants import IGNORE_INDEX
from gpt1.core.errors import Gpt1Error
from gpt1.core.fingerprints import sample_fingerprint
from gpt1.core.progress import progress, warn
from gpt1.core.reading import read_json
from gpt1.core.threads import tuned_threads
from gpt1.data.chat import encode_conversations, iter_batches
from gpt1.data.chat_sources import (
    ChatStats,
    Conversation,
    conversations_fingerprint,
    grouped_by_content,
    hf_split_names,
    read_conversations,
    split_conversations,
)
from gpt1.data.prepare import piece_batches
from gpt1.data.readers import parse_hf
from gpt1.data.shards import check_fingerprint, load_meta, looks_prepared
from gpt1.data.sources import SourceStats, iter_pieces, source_specs
from gpt1.data.windows import sequential_windows
from gpt1.train import distributed
from gpt1.train.config import TrainConfig
from gpt1.train.precision import autocast, resolve_precision
from gpt1.train.run_record import CONFIG_FILE


@dataclass
class EvalResult:
    loss: float
    perplexity: float
    tokens: int  # predicted tokens
    source: str
    bytes: int = 0  # UTF-8 bytes of the predicted tokens
    skipped: int = 0  # what was skipped: invalid documents (skip_invalid), entries that are not files
    skipped_by_reason: dict[str, int] = field(default_factory=dict)
    documents: int = 0  # per_document: the documents scored, each alone
    words: int = 0  # per_document: their words as lm-eval counts them (WORDS)

    @property
    def bits_per_byte(self) -> float:
        return bits_per_byte(self.loss, self.tokens, self.bytes)

    @property
    def word_perplexity(self) -> float:
        """lm-eval's: exp(summed loss / words), capped as `perplexity` is; NaN without a word count."""
        return perplexity(self.loss * self.tokens / self.words) if self.words else float("nan")

    @property
    def byte_perplexity(self) -> float:
        """lm-eval's: exp(summed loss / bytes), capped as `perplexity` is."""
        return perplexity(self.loss * self.tokens / self.bytes) if self.bytes else float("nan")


def evaluate_loss(model: torch.nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                  device: torch.device, precision: str = "fp32", show_progress: bool = False,
                  total: int | None = None, tune_threads: bool = False) -> tuple[float, int]:
    """Token-weighted mean loss over `batches` (labels IGNORE_INDEX excluded) and the token count.

    Under torchrun, rank r evaluates batches r, r + W, ... and the sums are all-reduced.
    The loss is NaN when there is no target token. `tune_threads`: on a CPU, the batches run on
    the fastest thread count as the load changes (`gpt1.core.threads`; the count does not change
    the result beyond float rounding); the training loop's evaluations keep its own count.
    """
    dist = distributed.current()
    was_training = model.training
    model.eval()
    # Each batch's mean loss and target count stay on the device until the end (no copy, no sync
    # per batch), then are summed on the CPU in float64: a float32 sum drifts over thousands of
    # batches, and MPS has no float64 (a float64 tensor there is a TypeError).
    losses: list[torch.Tensor] = []
    counts: list[torch.Tensor] = []
    with tuned_threads(device, enabled=tune_threads and not dist.enabled) as tuner, torch.no_grad():
        for i, (x, y) in enumerate(progress(batches, total=total, desc="eval", unit="batch",
                                            disable=None if show_progress else True)):
            if i % dist.world_size != dist.rank:
                continue
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            n = (y != IGNORE_INDEX).sum()
            if n == 0:
                continue
            # Timed per token: chat batches differ in length.
            with tuner.step(size=x.numel()) if tuner else contextlib.nullcontext(), autocast(device, precision):
                _, loss = model(x, y)
            losses.append(loss.detach().float())
            counts.append(n)
    model.train(was_training)
    loss_sum, tokens = 0.0, 0
    if losses:
        for mean, count in zip(torch.stack(losses).cpu().tolist(), torch.stack(counts).cpu().tolist()):
            loss_sum += mean * count
            tokens += count
    if dist.enabled:
        # NCCL (CUDA runs) reduces CUDA tensors, which have float64; gloo (CPU and MPS runs) CPU ones.
        sums = torch.tensor([loss_sum, tokens], dtype=torch.float64, device=device if device.type == "cuda" else "cpu")
        distributed.all_reduce_sum(sums)
        loss_sum, tokens = sums[0].item(), int(sums[1].item())
    return (loss_sum / tokens if tokens else float("nan")), tokens


def token_byte_lengths(tokenizer) -> np.ndarray:
    """UTF-8 length of every token id; 0 for special tokens."""
    special = set(tokenizer.special_ids)
    return np.array([0 if i in special else len(tokenizer.id_to_bytes([i])) for i in range(tokenizer.vocab_size)],
                    dtype=np.int64)


def bits_per_byte(loss: float, tokens: int, n_bytes: int) -> float:
    return loss * tokens / (math.log(2) * n_bytes) if n_bytes else float("nan")


def check_finite(value: float, what: str, llm, precision: str) -> None:
    """Refuse a NaN or infinite score: its perplexity, accuracy or JSON would look like a result."""
    if math.isfinite(value):
        return
    dtype = str(next(llm.model.parameters()).dtype).removeprefix("torch.")
    hint = ("fp16's range overflowed; try --precision bf16-mixed or fp32" if "fp16" in precision or dtype == "float16"
            else "the model is broken (e.g. saved from a diverged training); use an earlier checkpoint")
    raise Gpt1Error(f"{what} of the model {llm.path} is not finite ({value}) in {precision} ({dtype} weights): {hint}")


# exp overflows a float past ~709.8; a loss above this means "untrained" or "broken" whatever its
# value, so perplexity is capped at exp(700) ~ 1.01e304 instead of failing after the scoring.
MAX_LOG_PERPLEXITY = 700.0


def perplexity(loss: float) -> float:
    return math.exp(min(loss, MAX_LOG_PERPLEXITY))


def evaluate_data(llm, data: str | os.PathLike | list[str], *, batch_size: int = 8, block_size: int | None = None,
                  max_batches: int | None = None, precision: str = "fp32", text_field: str = "text",
                  skip_invalid: bool = False, show_progress: bool = True, per_document: bool = False) -> EvalResult:
    """Loss and perplexity of a loaded model (`gpt1.load`) on a prepared data dir's val.bin or on text sources
    (`skip_invalid`: skip and count their bad documents). Nothing to score is an error, not a NaN.

    `per_document` (text sources): each document scored alone after the [EOS] prefix token, as
    lm-eval's loglikelihood_rolling scores it; the result's `bits_per_byte`, `byte_perplexity` and
    `word_perplexity` are then lm-eval's numbers for a task of these documents."""
    if not (hasattr(llm, "model") and hasattr(llm, "tokenizer")):  # e.g. its path, or llm.model alone
        raise Gpt1Error(f"llm: expected a loaded model dir (llm = gpt1.load(path)), got {type(llm).__name__}")
    block_size = block_size or llm.model.config.block_size
    if batch_size < 1 or block_size < 1 or (max_batches is not None and max_batches < 1):
        raise Gpt1Error(f"batch size, block size and max batches must be >= 1, got {batch_size}, {block_size}, {max_batches}")
    if block_size > llm.model.config.block_size:
        raise Gpt1Error(f"block size {block_size} (--block-size) is longer than the model's context "
                        f"({llm.model.config.block_size})")
    precision = resolve_precision(precision, llm.device, doing="evaluating")
    stats = SourceStats()
    data = source_specs(data)
    prepared = len(data) == 1 and Path(data[0]).is_dir() and looks_prepared(data[0])
    if per_document:
        if prepared:  # val.bin holds ids: no document's text to count words and bytes in, as lm-eval counts them
            raise Gpt1Error(f"{data[0]} is a prepared data dir; per-document scoring (--per-document) reads text "
                            "sources: pass the files it was prepared from")
        if max_batches is not None:  # a prefix of the windows would score parts of documents
            raise Gpt1Error("max batches (--max-batches) cuts one stream short; per-document scoring "
                            "(--per-document) scores whole documents: pass fewer documents instead")
        return _evaluate_documents(llm, data, batch_size=batch_size, block_size=block_size, precision=precision,
                                   text_field=text_field, skip_invalid=skip_invalid, show_progress=show_progress)
    if prepared:  # an unfinished one: load_meta says so
        meta = load_meta(data[0])
        check_fingerprint(meta, llm.tokenizer, f"the model {llm.path}")
        tokens = np.memmap(Path(data[0]) / meta["val"]["file"], dtype=np.uint16, mode="r")
        source = str(Path(data[0]) / meta["val"]["file"])
        _warn_other_split(llm, Path(source))
    else:
        tokens = _text_tokens(llm.tokenizer, data, text_field, skip_invalid, stats)
        source = ", ".join(data)
    if len(tokens) < 2:
        raise Gpt1Error(f"{source}: {len(tokens)} token(s), nothing to predict (perplexity scores every token "
                        "after the first)")
    # A source shorter than one context is one shorter window, as lm-eval's rolling windows
    # (get_rolling_token_windows: the first is min(max_seq_len, len(tokens)) long) score it.
    block_size = min(block_size, len(tokens) - 1)
    n_windows = math.ceil((len(tokens) - 1) / block_size)
    if max_batches is not None:
        n_windows = min(n_windows, max_batches * batch_size)
    # The bytes the scored tokens hold, counted before the hours of scoring: a source with no text
    # to score is refused at once, and so is a damaged val.bin (an id outside the vocabulary).
    predicted = min(n_windows * block_size, len(tokens) - 1)
    n_bytes = _predicted_bytes(tokens, predicted, token_byte_lengths(llm.tokenizer), source)
    if not n_bytes:  # e.g. a one-token file: only its [EOS] is predicted; bits per byte would be NaN
        raise Gpt1Error(f"{source}: the {predicted:,} token(s) predicted are special tokens with no text ([EOS]); "
                        "bits per byte needs text after the first token")
    windows = sequential_windows(tokens, block_size, batch_size, max_batches, vocab_size=llm.tokenizer.vocab_size,
                                 path=source)
    loss, n = evaluate_loss(llm.model, windows, llm.device,
                            precision, show_progress=show_progress, total=math.ceil(n_windows / batch_size),
                            tune_threads=True)
    if not n:  # a mean over nothing is NaN, which no report or JSON should carry
        raise Gpt1Error(f"{source}: no tokens to score")
    check_finite(loss, f"{source}: the loss", llm, precision)
    return EvalResult(loss=loss, perplexity=perplexity(loss), tokens=n, source=source, bytes=n_bytes,
                      skipped=sum(stats.skipped.values()), skipped_by_reason=dict(stats.skipped))


def _warn_other_split(llm, val_file: Path) -> None:
    """Say so where the model's run record names the validation shard it was trained beside and
    `val_file` is another one (the same corpus prepared with another seed or --val: its held-out
    documents may be in the model's training data, so the score is not a held-out one)."""
    record_file = Path(llm.path) / CONFIG_FILE
    try:
        recorded = read_json(record_file).get("data", {}).get(val_file.name) if record_file.is_file() else None
    except (Gpt1Error, AttributeError):  # a record that is not ours to judge: nothing to compare
        return
    if isinstance(recorded, str) and recorded != sample_fingerprint(val_file):
        warn(f"{val_file} is not the validation split {llm.path} was trained beside (its {CONFIG_FILE} records "
             "another one): its documents may be in the model's training data, so this is not a held-out score")


# lm-eval's word count of a document (`count_words`: len(re.split(r"\s+", doc))): the empty
# strings before leading and after trailing whitespace count as words too.
WORDS = re.compile(r"\s+")


def _evaluate_documents(llm, data: list[str], *, batch_size: int, block_size: int, precision: str, text_field: str,
                        skip_invalid: bool, show_progress: bool) -> EvalResult:
    """Each document of text sources scored alone, as lm-eval's HFLM.loglikelihood_rolling scores
    it: `get_rolling_token_windows(ids, prefix_token=[EOS], max_seq_len=block_size, context_len=1)`
    are `sequential_windows` over `[EOS] + ids`. The windows of all documents run in batches of like
    length, right-padded (causal attention: no real token sees the padding, whose targets are ignored)."""
    stats = SourceStats()
    source = ", ".join(data)
    documents, n_bytes, words = [], 0, 0
    for text, ids in _encoded_documents(llm.tokenizer, data, text_field, skip_invalid, stats):
        documents.append(np.concatenate([np.array([llm.tokenizer.eos_id], dtype=np.int32), ids]))
        n_bytes += len(text.encode("utf-8"))  # lm-eval's count_bytes
        words += len(WORDS.split(text))
    # The readers skip (and count) an empty document; lm-eval scores it as 0 nats and 0 bytes but
    # re.split("\s+", "") is [""]: one word.
    words += stats.skipped.get("empty documents", 0)
    if not documents:
        raise Gpt1Error(f"{source}: no document to score")
    windows = []  # (document, first input token, targets the window before already predicted, length)
    for d, tokens in enumerate(documents):
        n_targets = len(tokens) - 1
        length = min(block_size, n_targets)  # a document shorter than one context: one window of its length
        for nominal in range(0, n_targets, length):
            start = min(nominal, n_targets - length)
            windows.append((d, start, nominal - start, length))
    windows.sort(key=lambda w: -w[3])  # stable: like lengths in one batch, documents in order within them
    batches = _document_batches(documents, windows, batch_size, llm.tokenizer.pad_id)
    loss, n = evaluate_loss(llm.model, batches, llm.device, precision, show_progress=show_progress,
                            total=math.ceil(len(windows) / batch_size), tune_threads=True)
    check_finite(loss, f"{source}: the loss", llm, precision)
    return EvalResult(loss=loss, perplexity=perplexity(loss), tokens=n, source=source, bytes=n_bytes,
                      skipped=sum(stats.skipped.values()), skipped_by_reason=dict(stats.skipped),
                      documents=len(documents), words=words)


def _document_batches(documents: list[np.ndarray], windows: list[tuple[int, int, int, int]], batch_size: int,
                      pad_id: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(inputs, targets) of `batch_size` windows at a time, each row right-padded to the batch's
    longest; targets already predicted, and the padding's, are IGNORE_INDEX."""
    for i in range(0, len(windows), batch_size):
        batch = windows[i:i + batch_size]
        width = max(w[3] for w in batch)
        x = np.full((len(batch), width), pad_id, dtype=np.int64)
        y = np.full((len(batch), width), IGNORE_INDEX, dtype=np.int64)
        for row, (d, start, scored_before, length) in enumerate(batch):
            x[row, :length] = documents[d][start:start + length]
            y[row, scored_before:length] = documents[d][start + 1 + scored_before:start + 1 + length]
        yield torch.from_numpy(x), torch.from_numpy(y)


def _encoded_documents(tokenizer, data: list[str], text_field: str, skip_invalid: bool,
                       stats: SourceStats) -> Iterator[tuple[str, np.ndarray]]:
    """(text, int32 ids) of each document of text sources, its pieces encoded in prepare's batches
    (the pieces' ids are the whole document's: `core.text_pieces`), each piece's ids an array at
    once, as `_text_tokens` keeps them (a long document as one list of Python ints takes GBs)."""
    texts: list[str] = []
    ids: list[np.ndarray] = []
    pieces = iter_pieces(data, text_field=text_field, skip_invalid=skip_invalid, stats=stats)
    for batch in piece_batches(pieces, max_pieces=1024):
        for piece, piece_ids in zip(batch, tokenizer.encode_batch([p.text for p in batch])):
            texts.append(piece.text)
            ids.append(np.array(piece_ids, dtype=np.int32))
            if piece.ends_document:
                yield "".join(texts), np.concatenate(ids)
                texts, ids = [], []


def _text_tokens(tokenizer, data: list[str], text_field: str, skip_invalid: bool, stats: SourceStats) -> np.ndarray:
    """The ids of text sources with [EOS] after each document, as `prepare` writes them: the
    documents' pieces encoded in prepare's batches, kept as int32 arrays (a 20 MB text file encoded
    whole into a list of Python ints took 3.8 GB)."""
    arrays = []
    pieces = iter_pieces(data, text_field=text_field, skip_invalid=skip_invalid, stats=stats)
    for batch in piece_batches(pieces, max_pieces=1024):  # prepare's --batch-docs
        ids: list[int] = []
        for piece, piece_ids in zip(batch, tokenizer.encode_batch([p.text for p in batch])):
            ids.extend(piece_ids)
            if piece.ends_document:
                ids.append(tokenizer.eos_id)
        arrays.append(np.array(ids, dtype=np.int32))
    return np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.int32)


BYTES_CHUNK = 1 << 20  # tokens whose byte lengths are looked up at a time (8 MB of int64)


def _predicted_bytes(tokens: np.ndarray, predicted: int, lengths: np.ndarray, source: str) -> int:
    """The UTF-8 bytes of tokens[1:predicted + 1] (`lengths`: `token_byte_lengths`), summed a chunk
    at a time: a 200 MB val.bin looked up whole, as int64, took 1.76 GB. An id outside the
    vocabulary is refused by name, not an IndexError."""
    total = 0
    for start in range(1, predicted + 1, BYTES_CHUNK):
        chunk = np.asarray(tokens[start:min(start + BYTES_CHUNK, predicted + 1)])
        if chunk.max() >= len(lengths):
            at = int(np.argmax(chunk >= len(lengths)))
            raise Gpt1Error(f"{source}: token id {int(chunk[at]):,} at token {start + at:,} is not below the vocabulary "
                            f"size {len(lengths):,}; the shard is damaged or was made with another tokenizer "
                            "(run `gpt1 prepare` again)")
        total += int(lengths[chunk].sum())
    return total


# ---- chat: the assistant tokens of the conversations fine-tuning holds out (`gpt1 eval --chat`) ----

# How fine-tuning splits and reads chat data unless its run says otherwise: FinetuneConfig's
# defaults are these (`gpt1.train.finetune` imports this module, not the other way round), and
# `evaluate_chat` takes them for a model without a run record (a base model, an export).
CHAT_VAL_FRACTION, CHAT_ALL_PATHS = 0.05, False


@dataclass
class ChatEvalResult:
    loss: float
    perplexity: float
    tokens: int  # assistant tokens predicted
    conversations: int
    source: str
    bytes: int = 0  # UTF-8 bytes of the assistant tokens (special tokens count 0)

    @property
    def bits_per_byte(self) -> float:
        return bits_per_byte(self.loss, self.tokens, self.bytes)


def evaluate_chat(llm, spec: str | list[str], *, split: str | None = None, batch_size: int = 8,
                  max_batches: int | None = None, precision: str = "fp32", all_paths: bool | None = None,
                  languages: list[str] | None = None, block_size: int | None = None, skip_invalid: bool = False,
                  stats: ChatStats | None = None, show_progress: bool = True) -> ChatEvalResult:
    """Loss, perplexity and bits per byte on the assistant tokens of a chat dataset's validation
    conversations (what `gpt1 eval --chat` prints). `spec`: one chat source, or a list (a mixture).

    The validation conversations are those fine-tuning holds out: a source's `validation`
    split when it has one, else the `val_fraction` of the message trees that `split_conversations`
    picks (with the model's own run settings from its train_config.json, when it has one).
    On the run's own data, what the run recorded decides whether these are the conversations it
    held out; where they may not be, a warning says why and `source` does not call them held-out.
    An explicit `split` is read whole; a local file has none. `stats` counts what was skipped.
    `all_paths`, `languages` and `block_size` (None: the run's, as it validated; without a run
    config the defaults and the model's context) shape the conversations as fine-tuning did.
    """
    specs = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    specs = [os.fspath(s) for s in specs]
    label = " + ".join(specs)
    record = read_run_record(llm.path)
    run = record.get("config", {})
    all_paths = run.get("all_paths", CHAT_ALL_PATHS) if all_paths is None else all_paths
    languages = (run.get("languages") or None) if languages is None else languages
    block_size = block_size or run.get("block_size") or llm.model.config.block_size
    if block_size > llm.model.config.block_size:
        raise Gpt1Error(f"block_size {block_size} is longer than the model's context ({llm.model.config.block_size})")
    stats = stats if stats is not None else ChatStats()
    options = dict(all_paths=all_paths, languages=languages, skip_invalid=skip_invalid, stats=stats)
    if split is not None:
        if (local := next((s for s in specs if hf_split_names(s) is None), None)) is not None:
            raise Gpt1Error(f"{local}: a local chat file has no splits (--split {split} applies to datasets)")
        conversations, source = [c for s in specs for c in read_conversations(s, split, **options)], f"{label} ({split})"
    else:
        val_fraction = run.get("val_fraction", CHAT_VAL_FRACTION)
        train_convs, conversations, pooled = read_chat_splits(specs, val_fraction, run.get("seed", TrainConfig.seed),
                                                             with_train=False, **options)
        if not conversations and not stats.conversations:  # everything was left out as it was read
            raise Gpt1Error(f"{label}: no conversations to evaluate: {stats.why_empty()}")
        if not conversations:  # nothing held out: no "filtering" to blame
            trees = len({c.group for c in train_convs})
            raise Gpt1Error(f"{label}: nothing held out to evaluate: val_fraction {val_fraction:g} holds out whole "
                            f"message trees, and the data has {trees:,} tree{'s' if trees != 1 else ''} (--chat scores "
                            "the share fine-tuning holds out); use more data, or a dataset with a validation split")
        source = f"{label} (validation)" if not pooled else f"{label} (held-out {val_fraction:.0%} of the conversations)"
        run_block_size = run.get("block_size") or llm.model.config.block_size
        if pooled and _is_run_data(specs, run) and (doubt := _held_out_doubt(llm, record, train_convs, conversations,
                                                                            run_block_size)):
            warn(f"{label}: {doubt}")
            source = (f"{label} ({val_fraction:.0%} of the conversations as this gpt1 splits them, not known to be "
                      "those the run held out)")
    data = encode_conversations(llm.tokenizer, conversations, block_size + 1)
    batches = iter_batches(data, batch_size, llm.tokenizer.pad_id)
    total = math.ceil(len(data) / batch_size)
    if max_batches is not None:
        batches, total = itertools.islice(batches, max_batches), min(total, max_batches)
    byte_lengths, n_bytes = token_byte_lengths(llm.tokenizer), 0

    def counting_bytes(batches):
        nonlocal n_bytes
        for x, y in batches:
            n_bytes += int(byte_lengths[y[y != IGNORE_INDEX].numpy()].sum())
            yield x, y

    loss, tokens = evaluate_loss(llm.model, counting_bytes(batches), llm.device, precision,
                                 show_progress=show_progress, total=total, tune_threads=True)
    if not tokens:
        raise Gpt1Error(f"{label}: no assistant tokens to evaluate in {source}"
                        + (f": {stats.why_empty()}; {data.why_empty()}" if not len(data) else ""))
    check_finite(loss, f"{source}: the assistant-token loss", llm, precision)
    return ChatEvalResult(loss=loss, perplexity=perplexity(loss), tokens=tokens, conversations=len(conversations),
                          source=source, bytes=n_bytes)


def read_chat_splits(specs: list[str], val_fraction: float, seed: int, stats: ChatStats, *, with_train: bool = True,
                     **options) -> tuple[list[Conversation], list[Conversation], bool]:
    """(train, validation, whether a fraction was held out) of chat sources: a source's own
    `validation` split (and `train`) where it has both (a named `hf:NAME:SPLIT` is read as it is),
    and the `val_fraction` of the message trees that `split_conversations` holds out of all the
    other sources' conversations together. `with_train=False` reads no train split (evaluation)."""
    train, val, pooled = [], [], []
    for spec in specs:
        named_split = (hf := parse_hf(spec)) is not None and hf.split is not None
        splits = hf_split_names(spec) or []
        if not named_split and "validation" in splits and ("train" in splits or not with_train):
            if with_train:
                train += read_conversations(spec, "train", stats=stats, **options)
            val += read_conversations(spec, "validation", stats=stats, **options)
        else:
            pooled += read_conversations(spec, stats=stats, **options)
    if pooled:
        kept, held_out = split_conversations(pooled, val_fraction, seed)
        train, val = train + kept, val + held_out
    return train, val, bool(pooled)


# What a run's train_config.json says of the gpt1 that made it, for runs made before their split
# was recorded: "world_size" came in at 2026-12-05 12:05 UTC, after {"messages"} records were
# split by content (09:39); "data", the identity of the training set, at 15:58.
def read_run_record(directory: Path) -> dict:
    """A run dir's (or merged/'s) train_config.json; {} without one."""
    file = directory / CONFIG_FILE
    record = read_json(file) if file.is_file() else {}
    return record if isinstance(record, dict) else {}


def split_unrecorded(record: dict) -> bool:
    """Whether a run may predate today's split of {"messages"} records (`grouped_by_content`):
    its train_config.json records neither its data nor its number of processes."""
    return bool(record) and "data" not in record and "world_size" not in record


def _is_run_data(specs: list[str], run: dict) -> bool:
    """Whether `specs` name the chat data the run trained on (as recorded, or the same paths)."""
    data = run.get("data")
    recorded = [data] if isinstance(data, str) and data else data if isinstance(data, list) else []
    return len(specs) == len(recorded) > 0 and all(
        spec == str(was) or (os.path.exists(spec) and isinstance(was, str) and Path(spec).resolve() == Path(was).resolve())
        for spec, was in zip(specs, recorded))


def _held_out_doubt(llm, record: dict, train: list, held_out: list, block_size: int) -> str | None:
    """Why `held_out` (split from the run's own data today) may not be what the run held out, or
    None: the record (train_config.json) says it is, or cannot say otherwise."""
    data = record.get("data") if isinstance(record.get("data"), dict) else {}
    where = llm.path / CONFIG_FILE
    if isinstance(data.get("validation"), dict):  # what the run held out (recorded since 2026-12-05)
        if data["validation"].get("sha256") == conversations_fingerprint(held_out):
            return None
        return (f"the conversations held out now are not the {data['validation'].get('conversations')} the run "
                f"held out (as {where} records them): the data, or how gpt1 reads it, changed since the run")
    if "sha256" in data:  # recorded before that: the training sequences tell whether the split is the same
        if encode_conversations(llm.tokenizer, train, block_size + 1).fingerprint() == data["sha256"]:
            return None
        return (f"the training sequences split from it now are not the run's ({where}: \"data\"): the data, or how "
                "gpt1 splits or encodes it, changed since the run, so some of the conversations scored may be ones "
                "it trained on")
    if split_unrecorded(record) and grouped_by_content(train + held_out):
        return (f"the run predates gpt1's record of its split ({where}), and until 2026-12-05 gpt1 split "
                "{\"messages\"} records by file and line (by their first turn since 2026-12-07), so some of the conversations scored "
                "may be ones it trained on")
    return None
