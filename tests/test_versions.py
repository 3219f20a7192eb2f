"""Mixed gpt1 versions over time: a continuation's checkpoint that an older gpt1 resumed
at its parent's windows, a continuation of a run recorded before the data fingerprints (or of a
fine-tune recorded before its data) that trained on its batches again, unsaid, a data dir of a
newer format read as this one, and a newer gpt1's run refused with advice no key=value can follow.
The older layouts are written here as those gpt1s wrote them; no older commit is checked out."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from gpt1.core.errors import Gpt1Error
from gpt1.data.shards import ShardWindows, load_meta, prepare, sequences_drawn
from gpt1.train import finetune as ft
from gpt1.train.config import load_config
from tests.test_finetune import FT_NO_SAVES as FT
from tests.test_finetune import _short_chats
from tests.test_train import _run
from tests.test_windows import _record_steps, _same_batches

BLOCK, BATCH, SEED = 32, 4, 1337  # tests/test_train.py's TINY
# The older gpt1s here drew their windows at random, the only order before data_order (pass 25).
COMMON = ["eval_every=1000", "save_every=1", "data_order=random"]


def _record(run) -> dict:
    return json.loads((run / "train_config.json").read_text())


def _write_record(run, record: dict) -> None:
    (run / "train_config.json").write_text(json.dumps(record))


def _draw(source, n: int) -> list[torch.Tensor]:
    return [source.next_batch()[0] for _ in range(n)]


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def _windows(data_dir, batch_size: int = BATCH, **kw) -> ShardWindows:
    return ShardWindows(data_dir / "train.bin", BLOCK, batch_size, SEED, order="random", **kw)


def _as_saved(state: dict) -> dict:
    return json.loads(json.dumps(state))


def _read_by_an_older_gpt1(data_dir, state: dict, batch_size: int = BATCH, **kw) -> ShardWindows:
    """The sampler as a gpt1 older than continuations resumes it: it reads "draws" and no other key."""
    windows = _windows(data_dir, batch_size, **kw)
    windows.load_state_dict({"draws": state["draws"]})
    return windows


def _longer_run(data_dir, skip: int, batch_size: int = BATCH, **kw) -> ShardWindows:
    """One longer run's windows, `skip` draws in: the stream a continuation goes on with."""
    windows = _windows(data_dir, batch_size, **kw)
    _draw(windows, skip)
    return windows


@pytest.fixture(scope="module")
def parent(data_dir, tmp_path_factory):
    """A finished 2-step pretraining run (8 windows drawn): the run the continuations go on from."""
    run = tmp_path_factory.mktemp("versions") / "parent"
    _run(data_dir, run, [*COMMON, "max_steps=2"])
    return run


# ---- 1. a continuation's checkpoint, resumed by an older gpt1 ------------------------------------

@pytest.mark.parametrize("world_size", [1, 2])
def test_a_continuations_sampler_state_resumes_alike_in_every_gpt1(data_dir, world_size):
    """A continuation's sampler was saved as {"draws", "start"}: a gpt1 older than continuations
    reads "draws" alone and resumed it at its parent's windows, unsaid. Now "draws" counts from the
    first window; a checkpoint saved with "start" (gpt1 of 2026-12-07) still resumes exactly, and
    is saved again as every gpt1 reads it."""
    parents = [_windows(data_dir, rank=r, world_size=world_size) for r in range(world_size)]
    for windows in parents:
        _draw(windows, 3)
    start = sequences_drawn(_as_saved(parents[0].state_dict()), BATCH, world_size)
    assert start == 3 * BATCH * world_size
    for rank in range(world_size):
        ranked = {"rank": rank, "world_size": world_size}
        child = _windows(data_dir, start=start, **ranked)
        _draw(child, 2)
        saved = _as_saved(child.state_dict())
        ahead = _draw(child, 2)
        assert _same(ahead, _draw(_longer_run(data_dir, 3 + 2, **ranked), 2))  # one longer run's windows
        resumed = _windows(data_dir, **ranked)
        resumed.load_state_dict(saved)
        assert _same(_draw(resumed, 2), ahead)
        assert _same(_draw(_read_by_an_older_gpt1(data_dir, saved, **ranked), 2), ahead)
        # Saved by the gpt1 of 2026-12-07: its draws after a "start".
        dated = _windows(data_dir, **ranked)
        dated.load_state_dict({"draws": 2, "start": start})
        again = _as_saved(dated.state_dict())
        assert _same(_draw(dated, 2), ahead)
        assert _same(_draw(_read_by_an_older_gpt1(data_dir, again, **ranked), 2), ahead)


def test_a_continuation_with_another_batch_size_begins_at_a_whole_batch_of_its_own(data_dir):
    """After a parent's 12 windows, batches of 5 began at window 12, which no count of whole
    draws reaches: an older gpt1 could not resume it. They begin at window 15, as a run of
    batches of 5 drew them from the first, and none is one of the parent's."""
    parent = _windows(data_dir)
    parent_windows = _draw(parent, 3)
    child = _windows(data_dir, batch_size=5, start=sequences_drawn(_as_saved(parent.state_dict()), BATCH, 1))
    first = _draw(child, 1)
    assert _same(first, _draw(_longer_run(data_dir, 3, batch_size=5), 1))
    assert not any(torch.equal(row, old) for row in first[0] for batch in parent_windows for old in batch)
    saved = _as_saved(child.state_dict())
    assert _same(_draw(_read_by_an_older_gpt1(data_dir, saved, batch_size=5), 2), _draw(child, 2))


def test_a_continuations_checkpoint_read_as_an_older_gpt1_reads_it(data_dir, parent, tmp_path, caplog):
    """`init_from=RUN` on RUN's data and seed: its checkpoint, read as a gpt1 older than
    continuations reads it (draws alone), goes on with one longer run's windows, not RUN's."""
    run = tmp_path / "continued"
    _run(data_dir, run, [*COMMON, "max_steps=1", f"init_from={parent}"])
    assert _record(run)["continues"] == {"run": str(parent.resolve()), "sequences": 8}
    sampler = torch.load(run / "checkpoints" / "step-00000001" / "trainer_state.pt", weights_only=True)["sampler"]
    assert _same(_draw(_read_by_an_older_gpt1(data_dir, sampler), 1), _draw(_longer_run(data_dir, 2 + 1), 1))
    # Batches of 3 after RUN's 8 windows: from window 9, which an older gpt1 resumes alike too.
    with caplog.at_level("INFO", logger="gpt1"):
        _run(data_dir, tmp_path / "threes", [*COMMON, "max_steps=1", "batch_size=3", f"init_from={parent}"])
    assert f"windows: init_from={parent} drew 8 windows of this data with seed 1337; this run draws the ones after " \
           "them, from window 9 (a whole number of its batches of 3)" in [r.message for r in caplog.records]
    sampler = torch.load(tmp_path / "threes" / "checkpoints" / "step-00000001" / "trainer_state.pt",
                         weights_only=True)["sampler"]
    assert _same(_draw(_read_by_an_older_gpt1(data_dir, sampler, batch_size=3), 1),
                 _draw(_longer_run(data_dir, 3 + 1, batch_size=3), 1))


# ---- 2. a continuation of a run recorded before its data's fingerprints ---------------------------

def test_a_run_recorded_without_data_fingerprints_is_continued_with_a_warning(data_dir, parent, tmp_path,
                                                                              monkeypatch, gpt1_warnings):
    """A run recorded before the shards' fingerprints (2026-12-06) never matched this data's
    identity: its continuation drew its windows again from the first, unsaid. What it records (the
    counts, the tokenizer) is compared; where it matches, the run goes on after its windows and
    says that the shards were not fingerprinted. A count that differs is other data, as before."""
    older = tmp_path / "older"
    shutil.copytree(parent, older)
    record = _record(older)
    record["data"] = {k: v for k, v in record["data"].items() if k not in ("train.bin", "val.bin")}
    _write_record(older, record)
    drawn = _record_steps(monkeypatch, [])
    _run(data_dir, tmp_path / "continued", [*COMMON, "max_steps=1", f"init_from={older}"])
    assert _same(drawn[0], _draw(_longer_run(data_dir, 2), 1))
    # The data is not known to be the parent's: recorded so, and not announced as "this data".
    assert _record(tmp_path / "continued")["continues"] == {"run": str(older.resolve()), "sequences": 8,
                                                            "checked": False}
    assert [r.getMessage() for r in gpt1_warnings] == [
        f"init_from={older} was recorded by an older gpt1, without train.bin and val.bin fingerprints: its token and "
        "document counts and tokenizer match this data's, so this run draws the windows after the 8 it drew (were its "
        "shards others of the same counts, those windows are as new to the model as the first ones)"]
    record["data"]["train_tokens"] += 1
    _write_record(older, record)
    drawn.clear()
    gpt1_warnings.clear()
    _run(data_dir, tmp_path / "other", [*COMMON, "max_steps=1", f"init_from={older}"])
    assert _same(drawn[0], _draw(_windows(data_dir), 1)) and not gpt1_warnings
    assert "continues" not in _record(tmp_path / "other")
    # (second wave) Recorded before its number of processes was too (2026-12-05 12:05): a 2-process
    # parent's draws were counted as 1 process's, and its continuation trained on windows it had drawn.
    record["data"]["train_tokens"] -= 1
    del record["world_size"]
    _write_record(older, record)
    drawn.clear()
    _run(data_dir, tmp_path / "unknown-processes", [*COMMON, "max_steps=1", f"init_from={older}"])
    assert _same(drawn[0], _draw(_windows(data_dir), 1)) and not gpt1_warnings
    assert "continues" not in _record(tmp_path / "unknown-processes")


def test_a_finetune_recorded_without_its_data_is_continued_with_a_warning(tiny_model_dir, tmp_path, monkeypatch,
                                                                           gpt1_warnings):
    """A fine-tune recorded before its data was (2026-12-05): `--base RUN` on RUN's sequences began
    at epoch 0's order again, unsaid. Its checkpoint's count of sequences and its seed match: it
    goes on with the next epoch, and says what it could not check."""
    chats = _short_chats(tmp_path / "chat.jsonl", 12)
    args = [*FT, "batch_size=4"]
    drawn = _record_steps(monkeypatch, [])
    ft.finetune(load_config(ft.FinetuneConfig, None, [*args, "epochs=2"], data=str(chats)), tiny_model_dir,
                tmp_path / "two")
    two_epochs = list(drawn)
    ft.finetune(load_config(ft.FinetuneConfig, None, [*args, "epochs=1"], data=str(chats)), tiny_model_dir,
                tmp_path / "a")
    _write_record(tmp_path / "a", {k: v for k, v in _record(tmp_path / "a").items() if k != "data"})
    drawn.clear()
    ft.finetune(load_config(ft.FinetuneConfig, None, [*args, "epochs=1"], data=str(chats)), tmp_path / "a",
                tmp_path / "b")
    assert _same_batches(drawn, two_epochs[3:])
    assert _record(tmp_path / "b")["continues"] == {"run": str((tmp_path / "a").resolve()), "epoch": 1, "checked": False}
    assert [r.getMessage() for r in gpt1_warnings] == [
        f"--base {tmp_path / 'a'} was recorded by an older gpt1, without a fingerprint of its training sequences: "
        "their number (12) and seed match this data's, so this run goes on with epoch 1 (were they other sequences "
        "of the same number, its order is as new to the model as the first's)"]


# ---- 3. a data dir of a newer format --------------------------------------------------------------

def test_a_data_dir_of_a_newer_format_is_refused_by_name(data_dir, corpus_dir, tokenizer, tmp_path):
    """meta.json's "version" was written and never read: a newer gpt1's data dir (another dtype,
    other entries) was read as this one's, and a rerun of its `prepare` said "nothing to do"."""
    newer = tmp_path / "newer"
    shutil.copytree(data_dir, newer)
    meta = json.loads((newer / "meta.json").read_text())
    (newer / "meta.json").write_text(json.dumps({**meta, "version": 2}))
    with pytest.raises(Gpt1Error) as refused:
        load_meta(newer)
    assert str(refused.value) == f"{newer}: prepared by a newer gpt1 (format version 2; this gpt1 reads 1): upgrade " \
                                 "gpt1 to read it"
    with pytest.raises(Gpt1Error) as refused:
        prepare([str(corpus_dir)], tokenizer, newer, val=8)
    assert str(refused.value) == f"{newer} already holds data prepared by a newer gpt1 (format version 2; this gpt1 " \
                                 "reads 1); choose another --out, or pass --overwrite to replace it"
    # This format's versions read as before; one that is no whole number is damage.
    (newer / "meta.json").write_text(json.dumps({k: v for k, v in meta.items() if k != "version"}))
    assert load_meta(newer)["train"] == meta["train"]
    (newer / "meta.json").write_text(json.dumps({**meta, "version": "2"}))
    with pytest.raises(Gpt1Error, match=r'"version" must be a whole number >= 1, got "2"; the data dir is damaged'):
        load_meta(newer)


# ---- 4. a newer gpt1's run ------------------------------------------------------------------------

def test_a_run_with_config_keys_this_gpt1_does_not_know_is_a_newer_gpt1s(data_dir, parent, tiny_model_dir,
                                                                          tmp_path):
    """A key a newer gpt1 added was compared as "(unset)" here: "different config (z_loss: 0.0001
    -> (unset)); rerun with the same config", which no key=value of this gpt1 can set."""
    run = tmp_path / "newer"
    shutil.copytree(parent, run)
    record = _record(run)
    record["config"]["z_loss"] = 1e-4
    record["changes"] = [{"from_step": 1, "eval_batches": 2, "eval_shuffle": True}]
    record["provenance"][-1] |= {"gpt1": "0.3.0", "git": "abc1234"}
    _write_record(run, record)
    with pytest.raises(Gpt1Error) as refused:
        _run(data_dir, run, [*COMMON, "max_steps=2"])
    assert str(refused.value) == f"{run} was started by a newer gpt1 (keys this version does not know: eval_shuffle, " \
                                 "z_loss; its latest start: gpt1 0.3.0, git abc1234): resume it with that gpt1, or " \
                                 "choose another --out"
    # A fine-tune's too.
    chats = _short_chats(tmp_path / "chat.jsonl", 8)
    cfg = load_config(ft.FinetuneConfig, None, [*FT, "batch_size=4", "max_steps=1"], data=str(chats))
    ft.finetune(cfg, tiny_model_dir, tmp_path / "chat")
    record = _record(tmp_path / "chat")
    _write_record(tmp_path / "chat", {**record, "config": {**record["config"], "lora_bias": True}})
    with pytest.raises(Gpt1Error, match=r"was started by a newer gpt1 \(keys this version does not know: lora_bias; "
                                        r"its latest start: gpt1 .*\): resume it with that gpt1"):
        ft.finetune(cfg, tiny_model_dir, tmp_path / "chat")
    # A fine-tune's run dir given to pretraining is another config, not a newer gpt1's.
    with pytest.raises(Gpt1Error, match=r"holds a run with a different config \(all_paths: false -> \(unset\), "):
        _run(data_dir, tmp_path / "chat", [*COMMON, "max_steps=2"])


def test_a_record_whose_changes_are_not_a_list_is_damaged(data_dir, parent, tmp_path):
    """(second wave) `"changes": 5` in train_config.json: `TypeError: 'int' object is not iterable`."""
    run = tmp_path / "damaged"
    shutil.copytree(parent, run)
    _write_record(run, {**_record(run), "changes": 5})
    with pytest.raises(Gpt1Error, match=r'train_config.json: expected "changes" to be a list .*the run dir is damaged'):
        _run(data_dir, run, [*COMMON, "max_steps=2"])
