"""The training windows pretraining draws from prepared shards (`gpt1.data.windows.ShardWindows`):
`data_order="epochs"` (the default) is one pass per epoch over non-overlapping windows, at an offset
and in an order of its own, a pure function of (seed, sequence number); `data_order="random"` draws
with replacement as gpt1 did before, and a run begun before the key resumes with it, bit-exact."""

from __future__ import annotations

import json
import logging
import math
import shutil

import numpy as np
import pytest
import torch

import gpt1.train.loop as loop
from gpt1.core.errors import Gpt1Error
from gpt1.data.shards import ShardWindows, fixed_windows
from gpt1.train import finetune as ft
from gpt1.train.checkpoint import STATE_FILE, latest_checkpoint
from gpt1.train.config import TrainConfig, load_config
from gpt1.train.run_record import _unknown_keys
from tests.test_finetune import FT_NO_SAVES, _short_chats
from tests.test_train import _run

T, SEED = 16, 1337
COMMON = ["max_steps=4", "save_every=2", "eval_every=1000"]  # tests/test_train.py's TINY: block 32, batches of 4


def _positions(tmp_path, length: int):
    """A shard whose tokens are their own positions: a window's x says where it starts."""
    path = tmp_path / f"positions-{length}.bin"
    np.arange(length, dtype=np.uint16).tofile(path)
    return path


def _old_start(seed: int, sequence: int, length: int, block_size: int) -> int:
    """Where gpt1 before pass 25 started the window of `sequence`: SplitMix64 of (seed, its salt,
    sequence) modulo len - T, written out in Python integers, apart from the code it checks."""
    mask = 2**64 - 1
    z = (sequence + (seed * 0x632BE59BD9B4E019 + 0x3A1D_0B75)) & mask
    z = (z * 0x9E3779B97F4A7C15) & mask
    z ^= z >> 30
    z = (z * 0xBF58476D1CE4E5B9) & mask
    z ^= z >> 27
    z = (z * 0x94D049BB133111EB) & mask
    z ^= z >> 31
    return z % (length - block_size)


def _starts(source: ShardWindows, draws: int) -> list[int]:
    """The starts of the windows of `draws` draws of a positions shard's `source`."""
    return [int(row[0]) for _ in range(draws) for row in source.next_batch()[0]]


def _as_saved(state: dict) -> dict:
    return json.loads(json.dumps(state))


@pytest.mark.parametrize("length", [5000, 2 * T + 7, T + 9])
def test_one_epoch_is_a_pass_over_every_token_but_the_ends(tmp_path, length):
    """`epochs=1`'s steps draw every window of the epoch once: each position of train.bin is in one
    window's x, but fewer than 2T at the ends (a shard shorter than 2T holds one window)."""
    source = ShardWindows(_positions(tmp_path, length), T, 3, SEED)
    n = source.epoch_windows
    assert n == max(1, (length - T) // T) and source.epoch_tokens == n * T
    steps = TrainConfig(max_steps=0, epochs=1.0).resolve_steps(3 * T, source.epoch_tokens)
    assert steps == math.ceil(n / 3)  # one pass, its last batch topped up from the next epoch
    starts = _starts(source, steps)[:n]
    seen = np.bincount(np.concatenate([np.arange(s, s + T) for s in starts]), minlength=length)
    assert set(seen.tolist()) <= {0, 1}
    covered = np.flatnonzero(seen)
    assert covered[-1] - covered[0] + 1 == len(covered) == n * T  # one run of positions, each once
    assert length - len(covered) < 2 * T
    assert all(s + T + 1 <= length for s in starts)  # y's last token too


def test_two_epochs_differ_in_order_and_offset(tmp_path):
    """Each epoch has its own offset in [0, T) (two share one by chance, 1 in T) and its own order
    of the windows (not a shifted copy)."""
    source = ShardWindows(_positions(tmp_path, 5000), T, 1, SEED)
    n = source.epoch_windows
    epochs = [source.window_starts(np.arange(e * n, (e + 1) * n, dtype=np.uint64)) for e in range(8)]
    offsets = [int(starts.min()) for starts in epochs]
    assert all(0 <= o < T for o in offsets) and len(set(offsets)) >= 4
    orders = [((starts - o) // T).tolist() for starts, o in zip(epochs, offsets)]
    assert all(sorted(order) == list(range(n)) for order in orders)
    assert orders[0] != orders[1] and orders[0] != list(range(n))
    assert sum(a == b for a, b in zip(orders[0], orders[1])) < n // 10  # about 1 in common, by chance
    # The seed decides all of it.
    other = ShardWindows(_positions(tmp_path, 5000), T, 1, SEED + 1)
    assert other.window_starts(np.arange(n, dtype=np.uint64)).tolist() != epochs[0].tolist()


@pytest.mark.parametrize("order", ["epochs", "random"])
def test_the_stream_is_the_same_across_a_resume_at_any_draw_and_any_split_across_ranks(tmp_path, order):
    """Killed after any draw (epoch boundaries inside a batch included) and resumed from its state,
    saved as JSON, a sampler goes on with the same windows; one process drawing grad_accum x W
    batches per step sees the windows of W ranks drawing grad_accum each."""
    path = _positions(tmp_path, 20 * T + 5)  # 19 windows an epoch: batches of 3 cross into the next
    straight = _starts(ShardWindows(path, T, 3, SEED, order=order), 20)
    for kill_after in range(20):
        first = ShardWindows(path, T, 3, SEED, order=order)
        _starts(first, kill_after)
        saved = _as_saved(first.state_dict())
        assert saved.get("order") == ("epochs" if order == "epochs" else None)
        resumed = ShardWindows(path, T, 3, SEED, order=order)
        resumed.load_state_dict(saved)
        assert _starts(resumed, 20 - kill_after) == straight[3 * kill_after:]
    world, accum = 2, 3
    one = ShardWindows(path, T, 3, SEED, order=order)
    ranks = [ShardWindows(path, T, 3, SEED, rank=r, world_size=world, order=order) for r in range(world)]
    for _ in range(5):
        assert sorted(_starts(one, world * accum)) == sorted(s for r in ranks for s in _starts(r, accum))
    # Ranks never draw the same sequence: in an epoch, no two of its windows at once.
    ranks = [ShardWindows(path, T, 9, SEED, rank=r, world_size=world, order=order) for r in range(world)]
    if order == "epochs":
        assert len(set(_starts(ranks[0], 1) + _starts(ranks[1], 1))) == 18


def test_a_state_in_another_order_is_refused_by_name(tmp_path):
    path = _positions(tmp_path, 5000)
    epochs = ShardWindows(path, T, 3, SEED)
    _starts(epochs, 2)
    with pytest.raises(Gpt1Error, match=r"the sampler state's windows are in the 'epochs' order, this run's in the "
                                        r"'random' order: resume it with data_order=epochs"):
        ShardWindows(path, T, 3, SEED, order="random").load_state_dict(_as_saved(epochs.state_dict()))
    with pytest.raises(Gpt1Error, match=r"data_order must be one of epochs, random, got 'shuffled'"):
        ShardWindows(path, T, 3, SEED, order="shuffled")
    with pytest.raises(Gpt1Error, match=r"data_order must be one of epochs, random, got 'shuffle'"):
        TrainConfig(data_order="shuffle")


@pytest.mark.parametrize("world_size", [1, 2])
def test_data_order_random_draws_exactly_the_windows_of_before(tmp_path, world_size):
    """`data_order="random"` is the sampler before pass 25, window for window, on every rank."""
    length = 5000
    path = _positions(tmp_path, length)
    for rank in range(world_size):
        source = ShardWindows(path, T, 3, SEED, rank=rank, world_size=world_size, order="random")
        drawn = _starts(source, 6)
        sequences = [(c * world_size + rank) * 3 + i for c in range(6) for i in range(3)]
        assert drawn == [_old_start(SEED, s, length, T) for s in sequences]
        assert source.state_dict() == {"draws": 6}  # the layout every gpt1 reads
        assert source.epoch_tokens == length


def _older_run(run) -> None:
    """`run`'s record as a gpt1 before pass 25 wrote it: no data_order in its config."""
    record = json.loads((run / "train_config.json").read_text())
    del record["config"]["data_order"]
    (run / "train_config.json").write_text(json.dumps(record))


def test_a_run_begun_before_data_order_resumes_with_its_own_random_windows(data_dir, tmp_path, monkeypatch,
                                                                           stop_training_at, caplog):
    """A run begun before the key, killed at step 3 and resumed by this gpt1 (whose default is now
    "epochs"), goes on with the windows it drew before, as the old formula gives them, and ends
    where the uninterrupted run ends; with data_order=random set on the resume too. A run begun
    with the key resumes in its own recorded order: another one is another config."""
    straight_steps = _record_steps(monkeypatch, [])
    straight = _run(data_dir, tmp_path / "straight", [*COMMON, "data_order=random"])
    monkeypatch.undo()
    stop_training_at(3, KeyboardInterrupt)
    with pytest.raises(KeyboardInterrupt):
        _run(data_dir, tmp_path / "older", [*COMMON, "data_order=random"])
    monkeypatch.undo()
    _older_run(tmp_path / "older")
    shutil.copytree(tmp_path / "older", tmp_path / "older-random")
    train_bin = np.memmap(data_dir / "train.bin", dtype=np.uint16, mode="r")
    old_windows = torch.tensor(np.stack([train_bin[s:s + 32] for s in
                                         (_old_start(SEED, q, len(train_bin), 32) for q in range(8, 16))]).astype(np.int64))
    for run, asked in ((tmp_path / "older", []), (tmp_path / "older-random", ["data_order=random"])):
        resumed_steps = _record_steps(monkeypatch, [])
        with caplog.at_level("INFO", logger="gpt1"):
            resumed = _run(data_dir, run, [*COMMON, *asked])
        monkeypatch.undo()
        assert torch.equal(torch.cat([s[0] for s in resumed_steps]), old_windows)
        assert all(torch.equal(a[0], b[0]) for a, b in zip(resumed_steps, straight_steps[2:], strict=True))
        assert resumed.train_loss == straight.train_loss
        assert "data_order" not in json.loads((run / "train_config.json").read_text())["config"]
        said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("windows: ")]
        assert said == ([f"windows: {run} began before gpt1 had data_order: it resumes with its own, drawn at random "
                         f"(data_order=random); to go on in epochs, train on from its weights: --out NEW "
                         f"init_from={run}"] if not asked else [])
        caplog.clear()
    # Begun with the key: its order is recorded, and a rerun in another is refused as another config.
    with pytest.raises(Gpt1Error, match=r"holds a run with a different config \(data_order: 'random' -> 'epochs'\)"):
        _run(data_dir, tmp_path / "straight", COMMON)


def test_a_run_in_epochs_resumes_bit_exact_and_a_continuation_goes_on_in_its_own_order(data_dir, tmp_path,
                                                                                       monkeypatch, stop_training_at):
    """The default order through the training loop: killed at step 3, a run resumes with the windows
    of the uninterrupted one (its checkpoint says "order": "epochs"); `init_from=RUN` goes on in its
    own config's order after the windows RUN drew (16 here), whatever RUN's order."""
    straight_steps = _record_steps(monkeypatch, [])
    straight = _run(data_dir, tmp_path / "straight", COMMON)
    monkeypatch.undo()
    stop_training_at(3, KeyboardInterrupt)
    with pytest.raises(KeyboardInterrupt):
        _run(data_dir, tmp_path / "killed", COMMON)
    monkeypatch.undo()
    sampler = torch.load(latest_checkpoint(tmp_path / "killed") / STATE_FILE, weights_only=True)["sampler"]
    assert sampler == {"draws": 2, "order": "epochs"}
    resumed_steps = _record_steps(monkeypatch, [])
    assert _run(data_dir, tmp_path / "killed", COMMON).train_loss == straight.train_loss
    assert all(torch.equal(a[0], b[0]) for a, b in zip(resumed_steps, straight_steps[2:], strict=True))
    parent = tmp_path / "straight"
    for child, order, start in (("same", "epochs", 16), ("other", "random", 0)):
        monkeypatch.undo()
        child_steps = _record_steps(monkeypatch, [])
        _run(data_dir, tmp_path / child, ["max_steps=1", "save_every=1", "eval_every=1000", f"data_order={order}",
                                          f"init_from={parent}"])
        expected = ShardWindows(data_dir / "train.bin", 32, 4, SEED, start=start, order=order).next_batch()[0]
        assert torch.equal(child_steps[0][0], expected), child
        continues = json.loads((tmp_path / child / "train_config.json").read_text()).get("continues")
        assert (continues or {}).get("sequences") == (start or None), child


def test_a_continuation_in_another_order_starts_its_own_at_the_first_window(data_dir, tmp_path, caplog):
    """Second wave: `init_from=RUN` in another order (or, in epochs, of another block_size) skipped
    as many windows as RUN drew, of a stream RUN never drew from: the first windows of its own
    first epoch were left out and the "1.00 epochs" it counted were no pass. It starts at its first
    window, and says why."""
    _run(data_dir, tmp_path / "parent", ["max_steps=2", "save_every=2", "eval_every=1000", "data_order=random"])
    with caplog.at_level(logging.INFO, logger="gpt1"):
        _run(data_dir, tmp_path / "child", ["max_steps=1", "save_every=1", "eval_every=1000",
                                            f"init_from={tmp_path / 'parent'}"])
    assert "continues" not in json.loads((tmp_path / "child" / "train_config.json").read_text())
    assert "drew its windows in the 'random' order; this run's 'epochs' order starts at its first window" in \
        caplog.text


@pytest.mark.parametrize("n", [5, 16])
def test_an_epochs_order_of_few_windows_is_a_uniform_shuffle(n):
    """Second wave: a Feistel network on a few bits is far from a uniform shuffle (at n = 5, chi2
    2,328 on 119 degrees of freedom over 60k epochs; on 4**h windows it made even permutations
    only): shards of few windows take a keyed shuffle instead."""
    from itertools import permutations

    from gpt1.data.windows import _permuted

    orders = [tuple(_permuted(SEED, np.full(n, epoch, dtype=np.uint64), np.arange(n, dtype=np.uint64), n).tolist())
              for epoch in range(6000 if n == 5 else 200)]
    assert all(sorted(order) == list(range(n)) for order in orders)
    if n == 5:
        expected = len(orders) / 120
        counts = {order: 0 for order in permutations(range(5))}
        for order in orders:
            counts[order] += 1
        assert sum((c - expected) ** 2 / expected for c in counts.values()) < 180  # df 119: p ~ 3e-4
    else:
        odd = sum(sum(a > b for i, a in enumerate(order) for b in order[i + 1:]) % 2 for order in orders)
        assert 60 < odd < 140  # half of them, as in a uniform shuffle (0 of 300 before)


def test_an_older_gpt1_refuses_a_run_with_data_order_by_its_name(data_dir, tmp_path):
    """A gpt1 without the key sees data_order in the record of a run begun by this one: a newer
    gpt1's key, named (`run_record`'s check, with that gpt1's config, which lacks the key)."""
    _run(data_dir, tmp_path / "run", ["max_steps=1", "save_every=1", "eval_every=1000"])
    record = json.loads((tmp_path / "run" / "train_config.json").read_text())
    older_config = {k: v for k, v in TrainConfig().to_dict().items() if k != "data_order"}
    assert _unknown_keys(record, older_config) == ["data_order"]


# Validation windows that overlapped, and a continuation (`init_from=RUN`, `--base RUN`) that
# replayed its parent's batches.

def _record_steps(monkeypatch, steps: list) -> list:
    """Each step's input batches into `steps`, as the loop draws them from its (real) batch source."""
    real = loop._next_step

    def recording(source, n):
        batches = real(source, n)
        steps.append([x.clone() for x, _ in batches])
        return batches

    monkeypatch.setattr(loop, "_next_step", recording)
    return steps


@pytest.fixture
def drawn(monkeypatch):
    return _record_steps(monkeypatch, [])


def _same_batches(a: list, b: list) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for s, t in zip(a, b) for x, y in zip(s, t, strict=True))


# ---- validation windows --------------------------------------------------------------------

@pytest.mark.parametrize("tokens, batches, rows", [(16 * 4 * 3 + 30, 3, 4), (50, 1, 3)])
def test_validation_windows_never_score_a_target_twice(tmp_path, tokens, batches, rows):
    """Capped with math.ceil, 221 targets gave 4 batches of 4 windows of 16 (256 targets: overlap),
    logged as "all that val.bin holds without overlap"; a shard shorter than one batch, 4 windows."""
    path = tmp_path / "val.bin"
    np.arange(tokens, dtype=np.uint16).tofile(path)  # each token is its position
    val = fixed_windows(path, 16, 4, 1_000_000)
    assert len(val) == batches and val[-1][0].shape[0] == rows
    targets = torch.cat([y.reshape(-1) for _, y in val]).tolist()
    assert len(targets) == len(set(targets))


# ---- a continuation goes on where its parent's batches ended ------------------------------------

def test_a_run_from_a_runs_weights_draws_the_windows_after_its_own(data_dir, tmp_path, drawn, stop_training_at,
                                                                   monkeypatch, caplog):
    """`--out NEW init_from=RUN` (the refusal's way on for a longer run) drew RUN's windows again,
    in the same order; now it draws those a run of both lengths would have drawn next, and a
    resume of it goes on with them."""
    common = ["eval_every=1000", "save_every=1"]
    _run(data_dir, tmp_path / "a", [*common, "max_steps=3"])
    _run(data_dir, tmp_path / "long", [*common, "max_steps=6"])
    long_run = list(drawn)
    assert len(long_run) == 9 and _same_batches(long_run[:3], long_run[3:6])  # a's 3 steps: the 6-step run's first
    drawn.clear()
    with caplog.at_level("INFO", logger="gpt1"):
        _run(data_dir, tmp_path / "b", [*common, "max_steps=3", f"init_from={tmp_path / 'a'}"])
    assert _same_batches(drawn, long_run[6:])  # the 6-step run's steps 4-6
    assert any(r.message == f"windows: init_from={tmp_path / 'a'} drew 12 windows of this data with seed 1337; this "
               "run draws the ones after them, as one longer run would" for r in caplog.records)
    record = json.loads((tmp_path / "b" / "train_config.json").read_text())
    assert record["continues"] == {"run": str((tmp_path / "a").resolve()), "sequences": 12}
    # Stopped in its step 3 (checkpoint 2) and resumed: the same windows.
    drawn.clear()
    stop_training_at(3, KeyboardInterrupt)
    with pytest.raises(KeyboardInterrupt):
        _run(data_dir, tmp_path / "c", [*common, "max_steps=3", f"init_from={tmp_path / 'a'}"])
    monkeypatch.undo()  # the recording too
    _record_steps(monkeypatch, drawn)
    assert _run(data_dir, tmp_path / "c", [*common, "max_steps=3", f"init_from={tmp_path / 'a'}"]).resumed_from == 2
    assert _same_batches(drawn[:2] + drawn[3:], long_run[6:])  # its steps 1-2, then step 3 after the resume
    assert json.loads((tmp_path / "c" / "train_config.json").read_text())["continues"] == record["continues"]
    # Another seed draws other windows: from the first, as before.
    _run(data_dir, tmp_path / "d", [*common, "max_steps=1", "seed=7", f"init_from={tmp_path / 'a'}"])
    assert "continues" not in json.loads((tmp_path / "d" / "train_config.json").read_text())
    # A parent stopped between its latest checkpoint and its model files (a kill leaves no mark on the
    # checkpoint): its weights are an earlier step's, and the latest checkpoint's place skipped the
    # batches between the two; the run starts from the first, and says why.
    (tmp_path / "a" / "checkpoints" / "step-00000003" / "outputs.done").unlink()
    drawn.clear()
    caplog.clear()
    with caplog.at_level("INFO", logger="gpt1"):
        _run(data_dir, tmp_path / "e", [*common, "max_steps=3", f"init_from={tmp_path / 'a'}"])
    assert _same_batches(drawn, long_run[:3])
    assert "continues" not in json.loads((tmp_path / "e" / "train_config.json").read_text())
    assert [r.message for r in caplog.records if r.levelname == "WARNING"] == [
        f"{tmp_path / 'a'} was stopped after its step-3 checkpoint, before its model files were written from it: its "
        "weights are an earlier step's, so this run's batches start from the first ones; run its command again to "
        "complete it"]


def test_a_finetune_of_a_finetune_goes_on_with_the_next_epoch(tiny_model_dir, tmp_path, drawn, caplog):
    """`--base RUN` on RUN's own data began at epoch 0's order again: the epoch RUN trained first."""
    chats = _short_chats(tmp_path / "chat.jsonl", 12)
    args = [*FT_NO_SAVES, "batch_size=4"]
    ft.finetune(load_config(ft.FinetuneConfig, None, [*args, "epochs=2"], data=str(chats)), tiny_model_dir,
                tmp_path / "two")
    two_epochs = list(drawn)
    assert len(two_epochs) == 6
    drawn.clear()
    ft.finetune(load_config(ft.FinetuneConfig, None, [*args, "epochs=1"], data=str(chats)), tiny_model_dir,
                tmp_path / "a")
    assert _same_batches(drawn, two_epochs[:3])
    drawn.clear()
    with caplog.at_level("INFO", logger="gpt1"):
        ft.finetune(load_config(ft.FinetuneConfig, None, [*args, "epochs=1"], data=str(chats)), tmp_path / "a",
                    tmp_path / "b")
    assert _same_batches(drawn, two_epochs[3:])
    assert any(f"--base {tmp_path / 'a'} was fine-tuned on these 12 sequences with seed 1337 for 1 epoch: this run "
               "goes on with the next epochs' orders" in r.message for r in caplog.records)
    record = json.loads((tmp_path / "b" / "train_config.json").read_text())
    assert record["continues"] == {"run": str((tmp_path / "a").resolve()), "epoch": 1}
