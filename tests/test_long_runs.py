"""The sizes a week-long run reaches: `gpt1 eval` on a large text file or val.bin, a
resume of a run with millions of metric lines, the plot of those lines, a time budget with a long
validation interval, and a projection measured in days. Each is checked by the structure of the
work (what it reads, holds or is handed) on small inputs, and against what it computed before."""

from __future__ import annotations

import json
import os
import shutil
import tracemalloc

import numpy as np
import pytest

import gpt1
from gpt1.core.errors import Gpt1Error
from gpt1.data.readers import PIECE_CHARS
from gpt1.train import distributed
from gpt1.train.budget import TimeBudget, duration
from gpt1.train.evaluate import evaluate_data
from gpt1.train.metrics_file import trim_metrics
from gpt1.train.plot import MAX_POINTS, _draw


class _Recorded:
    """A tokenizer that notes the longest text it is handed, then encodes it itself."""

    def __init__(self, tokenizer):
        self._tokenizer, self.longest = tokenizer, 0

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)

    def encode(self, text):
        self.longest = max(self.longest, len(text))
        return self._tokenizer.encode(text)

    def encode_batch(self, texts):
        self.longest = max([self.longest, *map(len, texts)])
        return self._tokenizer.encode_batch(texts)


def _with_val(data_dir, out, tokens: np.ndarray):
    """A copy of a prepared data dir whose val.bin holds `tokens`."""
    shutil.copytree(data_dir, out)
    tokens.astype(np.uint16).tofile(out / "val.bin")
    meta = json.loads((out / "meta.json").read_text())
    meta["val"]["tokens"] = len(tokens)
    (out / "meta.json").write_text(json.dumps(meta))
    return out


def _forwards(model) -> list:
    calls: list = []
    model.register_forward_hook(lambda *_: calls.append(1))
    return calls


def test_eval_of_a_long_text_file_encodes_it_in_pieces_with_the_ids_of_the_whole(tiny_model_dir, data_dir,
                                                                                corpus_dir, tmp_path):
    """A 20 MB text file was encoded in one call into a list of Python ints (+3.8 GB): its pieces
    are encoded in batches now, to the ids the whole text has, scored to the same loss."""
    text = "".join(p.read_text(encoding="utf-8") for p in sorted(corpus_dir.rglob("*.py")))
    text = text[:PIECE_CHARS + 20_000]  # one document, two pieces
    (tmp_path / "long.txt").write_text(text, encoding="utf-8")
    llm = gpt1.load(tiny_model_dir, device="cpu")
    ids = np.array(llm.tokenizer.encode(text) + [llm.tokenizer.eos_id])
    llm.tokenizer = recorded = _Recorded(llm.tokenizer)
    result = evaluate_data(llm, tmp_path / "long.txt", batch_size=64, show_progress=False)
    assert 0 < recorded.longest <= PIECE_CHARS
    llm.tokenizer = recorded._tokenizer
    reference = evaluate_data(llm, _with_val(data_dir, tmp_path / "data", ids), batch_size=64, show_progress=False)
    assert (result.tokens, result.bytes) == (reference.tokens, reference.bytes)
    assert result.loss == pytest.approx(reference.loss, rel=1e-6)  # the thread count each call tuned may differ
    assert result.tokens == len(ids) - 1


def test_a_damaged_or_textless_val_bin_is_refused_before_scoring_and_counted_in_chunks(tiny_model_dir, data_dir,
                                                                                       tmp_path):
    """The bytes for bits per byte were counted after the scoring (hours on a large val.bin), from
    the whole val.bin as int64, twice (+1.76 GB for 200 MB): now first, a chunk at a time, so a
    val.bin with an id outside the vocabulary at its end, or with no text, is refused at once."""
    llm = gpt1.load(tiny_model_dir, device="cpu")
    calls = _forwards(llm.model)
    tokens = np.random.default_rng(0).integers(3, 500, size=3_000_000)
    tokens[-2] = 600
    damaged = _with_val(data_dir, tmp_path / "damaged", tokens)
    tracemalloc.start()
    try:
        with pytest.raises(Gpt1Error, match=r"val.bin: token id 600 at token 2,999,998 is not below the vocabulary "
                                            r"size 512; the shard is damaged"):
            evaluate_data(llm, damaged, show_progress=False)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 20e6, peak  # 3M tokens as int64, twice: 48 MB
    eos_only = _with_val(data_dir, tmp_path / "eos", np.full(1000, llm.tokenizer.eos_id))
    with pytest.raises(Gpt1Error, match="the 999 token.s. predicted are special tokens with no text"):
        evaluate_data(llm, eos_only, show_progress=False)
    assert not calls
    # A sound val.bin scores as before: its bytes are those of every predicted token that is text.
    result = evaluate_data(llm, _with_val(data_dir, tmp_path / "sound", tokens[:5000]), show_progress=False)
    special = set(llm.tokenizer.special_ids)
    assert calls and result.bytes == sum(len(llm.tokenizer.id_to_bytes([i])) for i in tokens[1:5000].tolist()
                                         if i not in special)


def _metrics(steps) -> str:
    return "".join(json.dumps({"step": s, "loss": 3.0 + s % 7 / 10, "lr": 1e-4}) + "\n" for s in steps)


def test_a_resume_reads_only_the_tail_of_metrics_jsonl_and_leaves_it_alone_when_nothing_follows(tmp_path):
    """Every resume read, parsed and rewrote all of metrics.jsonl (3M lines: 29 s, 2.4 GB): it is
    read from its end now, cut after the checkpoint's step, and not written when nothing follows."""
    path = tmp_path / "metrics.jsonl"
    path.write_text(_metrics(range(1, 60_001)))
    before = os.stat(path)
    tracemalloc.start()
    try:
        trim_metrics(path, 60_000)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    after = os.stat(path)
    assert (after.st_ino, after.st_mtime_ns, after.st_size) == (before.st_ino, before.st_mtime_ns, before.st_size)
    assert peak < 5e6, peak  # the whole file (~3.5 MB) as bytes, as text and as lines: ~15 MB
    # A run killed 3 steps after its checkpoint, in the middle of a line: cut after the checkpoint's step.
    with open(path, "a") as f:
        f.write(_metrics(range(60_001, 60_003)) + '{"step": 60003, "lo')
    trim_metrics(path, 60_000)
    assert path.read_text() == _metrics(range(1, 60_001))


@pytest.mark.parametrize("tail, step, kept", [
    ('{"step": 3, "loss": 1.0}', 3, '{"step": 3, "loss": 1.0}\n'),  # a whole record a kill left without its newline
    ('{"step": 3, "loss": 1.0}', 2, ""),
    ('{"step": 3, "lo', 3, ""),  # cut short by a kill
])
def test_the_last_line_a_resume_keeps(tmp_path, tail, step, kept):
    path = tmp_path / "metrics.jsonl"
    path.write_text(_metrics([1, 2]) + tail)
    trim_metrics(path, step)
    assert path.read_text() == _metrics([1, 2]) + kept
    with open(path, "a") as f:  # the resumed run's lines each go on a line of their own
        f.write(_metrics([step + 1]))
    assert path.read_text() == _metrics([1, 2]) + kept + _metrics([step + 1])


def test_a_run_killed_before_its_first_checkpoint_starts_its_metrics_afresh(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(_metrics([1, 2]) + '{"st')
    trim_metrics(path, 0)
    assert path.read_text() == ""


def test_a_damaged_line_near_the_end_has_the_resume_filter_the_whole_file_as_before(tmp_path):
    """A line after the checkpoint's step that is not a record (not one a kill cuts short: a whole
    line) means the file holds more than the loop wrote: every line is filtered, as before."""
    path = tmp_path / "metrics.jsonl"
    path.write_text(_metrics([1]) + "[[[\n" + _metrics([2, 3]) + "\r\n" + _metrics([4]) + "not json\n" + _metrics([5]))
    trim_metrics(path, 3)
    assert path.read_text() == _metrics([1, 2, 3])


def test_the_plot_of_a_long_run_streams_its_lines_and_draws_the_means_of_runs_of_steps(tmp_path):
    """3M steps were held as dicts (3.6 GB, 40 s, in the training process at its end) and drawn as
    3M points: the records are streamed into arrays now, and a training curve of more than
    MAX_POINTS points is drawn as the means of runs of consecutive steps."""
    n = 3 * MAX_POINTS + 5
    steps = np.arange(1, n + 1)
    losses = 3.0 + np.sin(steps / 1000.0)
    lines = [json.dumps({"step": int(s), "loss": float(v), "lr": 1e-4, "grad_norm": 0.5, "tokens": int(s) * 4096,
                         "tokens_per_sec": 1e5, "mfu": 0.4}) for s, v in zip(steps, losses)]
    for i in range(999, n, 1000):
        lines[i] = lines[i][:-1] + ', "val_loss": 3.5, "val_ppl": 33.1}'
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    import matplotlib.figure  # noqa: F401  (imported before memory is counted: its modules are not the records)

    tracemalloc.start()
    try:
        fig = _draw({"run": tmp_path / "metrics.jsonl"})
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 15e6, peak  # 30,005 records as dicts: ~30 MB
    train, val = fig.axes[0].lines
    x, y = train.get_xdata(), train.get_ydata()
    assert len(x) == -(-n // 4) <= MAX_POINTS  # runs of 4 steps: 7,502 points
    assert x[0] == steps[:4].mean() and y[0] == pytest.approx(losses[:4].mean(), rel=1e-15)
    assert x[-1] == steps[-1] and y[-1] == losses[-1]  # the last run: the one step left over
    assert list(val.get_xdata()) == list(range(1000, n + 1, 1000))


def test_a_short_run_is_plotted_point_for_point(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(_metrics(range(1, 501)))
    train = _draw({"run": tmp_path / "metrics.jsonl"}).axes[0].lines[0]
    assert list(train.get_xdata()) == list(range(1, 501))
    assert list(train.get_ydata()) == [3.0 + s % 7 / 10 for s in range(1, 501)]


def test_a_time_budget_takes_the_median_of_the_last_thousand_steps_and_spreads_validations_over_eval_every():
    """The median was taken over the last eval_every steps, sorted afresh at every step (236 ms a
    step at eval_every = 1M): it is over the last 1,000 at most now; a validation is still spread
    over eval_every steps, so that the plan does not swing when it leaves the median's window."""
    now = [0.0]
    budget = TimeBudget(1e6, 0.0, 10**9, eval_every=5000, clock=lambda: now[0])
    dist = distributed.current()
    for done in range(1, 3001):
        now[0] += 0.2 if done <= 2000 else 0.1  # a machine twice as fast for the last 1,000 steps
        if done == 100:
            budget.timed(60.0)  # a validation pass
            now[0] += 60.0
        budget.plan(done, 10**9, dist)
    assert budget.step_time == pytest.approx(0.1)  # over the last eval_every = 5,000 steps: 0.2
    timed = 3000 - 3  # the first three steps of a process are not timed
    assert budget.per_step == pytest.approx(0.1 + 60.0 / timed)


def test_a_projection_of_days_is_said_in_days():
    assert [duration(s) for s in (80, 3600, 47 * 3600, 300 * 86400)] == ["80 s", "60 min", "47.0 h", "300.0 days"]

