"""Training numerics at their edges: an fp16 loss scale that NaN losses must not lower,
the count of skipped steps across a resume, the validation of a skipped step, the tokens of a
skipped step, the fp16 stop's words when overflows alternate with good steps, and the hidden
states' gradient of an fp16 caller of `linear_cross_entropy`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from gpt1.core.config import ModelConfig
from gpt1.core.errors import Gpt1Error
from gpt1.core.loss import linear_cross_entropy
from gpt1.core.model import GPT
from gpt1.data.shards import ShardWindows, fixed_windows
from gpt1.formats.modeldir import load_model, save_model
from gpt1.train.checkpoint import STATE_FILE, latest_checkpoint
from gpt1.train.config import TrainConfig, load_config
from gpt1.train.evaluate import evaluate_loss
from gpt1.train.loop import train

# tests/test_bad_steps.py's runs: fp16 matmuls are slow on a CPU.
TINY = ["model=tiny", "n_layer=1", "n_head=2", "n_embd=32", "block_size=32", "batch_size=4", "eval_batches=2",
        "device=cpu", "lr=3e-3", "min_lr=3e-4"]


class Steps:
    """Real training windows that note the (1-based) step each batch is drawn for (grad_accum=1;
    restored with the sampler on resume). The draw of step `kill_at` raises KeyboardInterrupt:
    a run killed there, its earlier checkpoints saved."""

    def __init__(self, source: ShardWindows, kill_at: int | None = None):
        self.source, self.kill_at, self.step = source, kill_at, 0

    def next_batch(self):
        self.step = self.source.draws + 1
        if self.step == self.kill_at:
            raise KeyboardInterrupt
        return self.source.next_batch()

    def state_dict(self):
        return self.source.state_dict()

    def load_state_dict(self, state):
        self.source.load_state_dict(state)


def _train(data_dir, tokenizer, run_dir: Path, overrides, *, nan_loss=(), nan_grad=(), kill_at=None):
    """A tiny run whose training forward gives a NaN loss at the steps `nan_loss` (as a forward
    overflow would, whatever the loss scale) and whose backward a NaN gradient at `nan_grad`."""
    cfg = load_config(TrainConfig, None, TINY + overrides)
    torch.manual_seed(0)
    model = GPT(ModelConfig.preset("tiny", vocab_size=tokenizer.vocab_size, block_size=32, n_layer=1, n_head=2, n_embd=32))
    steps = Steps(ShardWindows(data_dir / "train.bin", 32, 4, cfg.seed), kill_at)
    model.transformer.h[0].register_forward_hook(
        lambda module, inputs, out: out * float("nan") if module.training and steps.step in nan_loss else out)
    model.transformer.h[0].mlp.c_fc.bias.register_hook(lambda g: g * float("nan") if steps.step in nan_grad else g)
    val = fixed_windows(data_dir / "val.bin", 32, 4, 2)
    return train(model, cfg, run_dir, steps, lambda: val, lambda d, m: save_model(d, m, tokenizer))


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _timeless_metrics(run_dir: Path) -> list[dict]:
    return [{key: value for key, value in record.items() if key not in ("tokens_per_sec", "elapsed")}
            for record in _metrics(run_dir)]


def _state(run_dir: Path) -> dict:
    return torch.load(latest_checkpoint(run_dir) / STATE_FILE, weights_only=True)


def _stop(call) -> str:
    """The words of the error that stops a run, less its run dir (named in the last good checkpoint)."""
    with pytest.raises(Gpt1Error) as stopped:
        call()
    return str(stopped.value).split("; stopped.")[0]


def test_a_nan_loss_leaves_the_fp16_loss_scale_as_it_is(data_dir, tokenizer, tmp_path):
    """Each NaN loss halved the GradScaler's scale (its gradients read as an overflow) and no stop
    looked at it: a NaN loss on every third batch brought it to 6e-11 in 150 steps, where the
    blocks' gradients underflow to 0, and the run ended with exit 0, saving that scale. The loss
    was NaN before it was scaled: the scale stays where the good steps leave it (65,536 here)."""
    result = _train(data_dir, tokenizer, tmp_path / "run", ["max_steps=54", "save_every=100", "eval_every=100",
                                                            "precision=fp16-mixed"], nan_loss=range(3, 55, 3))
    assert result.steps == 54
    assert [r["step"] for r in _metrics(tmp_path / "run") if r.get("skipped")] == list(range(3, 55, 3))
    assert _state(tmp_path / "run")["scaler"]["scale"] == 65536.0  # 18 halvings made it 0.25


def test_a_loss_scale_below_1_stops_the_run_at_a_nan_loss_too(data_dir, tokenizer, tmp_path):
    """The stop below 1 follows every update of the scale, a NaN loss's too: a checkpoint of an
    older gpt1 holds a scale its NaN losses lowered below 1."""
    run, overrides = tmp_path / "run", ["max_steps=4", "save_every=2", "eval_every=100", "precision=fp16-mixed"]
    with pytest.raises(KeyboardInterrupt):
        _train(data_dir, tokenizer, run, overrides, kill_at=3)
    state = _state(run)
    state["scaler"]["scale"] = 0.5
    torch.save(state, latest_checkpoint(run) / STATE_FILE)
    assert _stop(lambda: _train(data_dir, tokenizer, run, overrides, nan_loss={3})) == \
        "the fp16 loss scale was 0.5 at step 3"


def test_a_resumed_run_stops_where_an_uninterrupted_one_does_in_a_bad_stretch(data_dir, tokenizer, tmp_path):
    """The count of consecutive skipped steps was not in the checkpoint: killed inside a bad
    stretch, the resumed run counted from 0 and finished where the uninterrupted one stops. Its
    metrics (the tokens a skipped step counts included) are those of the uninterrupted run."""
    overrides = ["max_steps=10", "save_every=1", "eval_every=100", "max_bad_steps=4"]
    bad = range(3, 7)
    straight = _stop(lambda: _train(data_dir, tokenizer, tmp_path / "straight", overrides, nan_grad=bad))
    assert straight == "the gradient norm was NaN/inf for 4 consecutive steps (last at step 6)"
    with pytest.raises(KeyboardInterrupt):
        _train(data_dir, tokenizer, tmp_path / "killed", overrides, nan_grad=bad, kill_at=5)
    assert latest_checkpoint(tmp_path / "killed").name == "step-00000004"
    assert _stop(lambda: _train(data_dir, tokenizer, tmp_path / "killed", overrides, nan_grad=bad)) == straight
    assert _timeless_metrics(tmp_path / "killed") == _timeless_metrics(tmp_path / "straight")


def test_a_skipped_step_still_validates_where_a_validation_is_due(data_dir, tokenizer, tmp_path):
    """A skipped step at an `eval_every` boundary or at the end had no validation: the result
    reported step 5's as the final one (here, with both skipped)."""
    result = _train(data_dir, tokenizer, tmp_path / "run", ["max_steps=8", "eval_every=5", "save_every=100"],
                    nan_grad={5, 8})
    records = _metrics(tmp_path / "run")
    assert [(r["step"], r.get("skipped")) for r in records if "val_loss" in r] == \
        [(5, "non-finite gradient"), (8, "non-finite gradient")]
    final, _ = evaluate_loss(load_model(tmp_path / "run"), fixed_windows(data_dir / "val.bin", 32, 4, 2),
                             torch.device("cpu"))
    assert result.val_loss == final == records[-1]["val_loss"] and result.best_step in (5, 8)


def test_skipped_steps_alone_since_a_validation_neither_validate_again_nor_stop_early(data_dir, tokenizer, tmp_path):
    """Two NaN batches in a row (steps 5, 6) after the validation of step 4 validated the same
    weights twice more, and early_stop=2 ended the run at step 6 of 12 as "no longer improving"."""
    result = _train(data_dir, tokenizer, tmp_path / "run", ["max_steps=12", "eval_every=1", "early_stop=2",
                                                            "save_every=100"], nan_loss={5, 6})
    assert result.steps == 12
    records = _metrics(tmp_path / "run")
    assert [r["step"] for r in records if "val_loss" in r] == [1, 2, 3, 4, 7, 8, 9, 10, 11, 12]


def test_a_run_resumed_just_before_its_skipped_last_step_ends_as_one_run_straight(data_dir, tokenizer, tmp_path):
    """Its skipped last step was counted against this process's one step: the resumed run failed
    ("the last 1 of the run's 1 steps") where the run straight finished."""
    overrides = ["max_steps=12", "save_every=1", "eval_every=100"]
    assert _train(data_dir, tokenizer, tmp_path / "straight", overrides, nan_loss={12}).steps == 12
    with pytest.raises(KeyboardInterrupt):
        _train(data_dir, tokenizer, tmp_path / "killed", overrides, nan_loss={12}, kill_at=12)
    assert _train(data_dir, tokenizer, tmp_path / "killed", overrides, nan_loss={12}).steps == 12
    assert _timeless_metrics(tmp_path / "killed") == _timeless_metrics(tmp_path / "straight")


def test_a_skipped_step_counts_its_tokens(data_dir, tokenizer, tmp_path):
    """fp16 overflows counted their tokens and NaN losses did not, though both drew their batches."""
    result = _train(data_dir, tokenizer, tmp_path / "run", ["max_steps=5", "eval_every=100", "save_every=100",
                                                            "max_bad_steps=5"], nan_loss={2}, nan_grad={4})
    assert result.tokens == 5 * 4 * 32
    assert [(r["step"], r["tokens"]) for r in _metrics(tmp_path / "run")] == [(s, s * 4 * 32) for s in range(1, 6)]


def test_the_fp16_stop_says_what_alternating_overflows_did_and_a_resume_says_the_same(data_dir, tokenizer, tmp_path):
    """An overflow on every other step stopped the run with "NaN/inf for 1 consecutive steps"."""
    overrides = ["max_steps=60", "eval_every=100", "save_every=10", "precision=fp16-mixed"]
    every_other = range(2, 61, 2)
    straight = _stop(lambda: _train(data_dir, tokenizer, tmp_path / "straight", overrides, nan_grad=every_other))
    assert straight == ("17 fp16 overflows (a NaN/inf gradient norm) in the last 33 steps (last at step 34) "
                        "brought the loss scale from 65536 to 0.5")
    with pytest.raises(KeyboardInterrupt):
        _train(data_dir, tokenizer, tmp_path / "killed", overrides, nan_grad=every_other, kill_at=25)
    assert _stop(lambda: _train(data_dir, tokenizer, tmp_path / "killed", overrides, nan_grad=every_other)) == straight


@pytest.mark.parametrize("n, scale", [(1000, 1.0), (40_000, 65536.0)])
def test_an_fp16_caller_gets_its_hidden_states_gradient(n, scale):
    """`linear_cross_entropy` on fp16 hidden states and weights (a `.half()` model) divided their
    gradient by 1024 n as an fp16 number: 0.98x the gradient at n = 1,000, 0 from n = 32,768; and a
    GradScaler's 65,536, cast to fp16, made every gradient inf."""
    torch.manual_seed(0)
    hidden, weight = torch.randn(n, 16).half(), torch.randn(64, 16).half()
    targets = torch.randint(0, 64, (n,))
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    (linear_cross_entropy(h, w, targets) * scale).backward()
    h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    F.cross_entropy(F.linear(h64, w64), targets).backward()
    for got, expected in ((h.grad, h64.grad), (w.grad, w64.grad)):
        got = got.double() / scale
        assert got.isfinite().all()
        assert abs(got.norm() / expected.norm() - 1) < 2e-3
        assert F.cosine_similarity(got.flatten(), expected.flatten(), dim=0) > 0.9999
