"""Paths as the file system has them: outputs checked for writability before the work, links
followed (source folders) and written through (outputs), sources and recipes named in other
spellings, folder names that are not UTF-8, and names near the 255-byte limit."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import gpt1
from gpt1.core.errors import Gpt1Error
from gpt1.core.io import atomic_dir, file_target, folder_target, make_dirs, read_json, write_json
from gpt1.data.shards import prepare
from gpt1.data.sources import resolve_sources
from gpt1.train.config import TrainConfig, resolve_config_path
from gpt1.train.finetune import FinetuneConfig, finetune
from gpt1.train.pretrain import pretrain
from tests.model_factories import finetuned_dir
from tests.task_files import hellaswag, write_jsonl, write_task_folders
from tests.test_battery import assert_one_clear_line, run_main

CHAT_LINE = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]})


@contextlib.contextmanager
def read_only(folder: Path):
    """`folder` made unwritable for this process: chmod for a user; root ignores file modes, so
    chattr +i (nothing can be created in the folder, for root too) where the file system has it."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        try:
            yield
        finally:
            folder.chmod(0o755)
        return
    if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode:
        pytest.skip("root ignores file modes, and chattr +i is not supported here")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(folder)], check=True)


def _chat_file(path: Path) -> Path:
    path.write_text((CHAT_LINE + "\n") * 8)
    return path


def _not_started(monkeypatch, module, name: str) -> None:
    monkeypatch.setattr(module, name, lambda *a, **k: pytest.fail(f"{name} ran before the output was checked"))


# ---- 1. outputs checked for writability before the work ----------------------------------------

def test_an_unwritable_output_is_refused_before_the_work(tmp_path):
    """file_target's promise ("checked early, before hours of work") held for a folder in the
    way, not for one that cannot be written: a trial file there is the honest test (os.access
    answers yes to root whatever the modes say)."""
    ro = tmp_path / "ro"
    ro.mkdir()
    with read_only(ro):
        with pytest.raises(Gpt1Error, match=r"ro: cannot write e.json there \((Permission denied|Operation not permitted)\)"):
            file_target(ro / "e.json")
        with pytest.raises(Gpt1Error, match=r"ro/new/a: cannot create the folder: .*ro is not writable"):
            file_target(ro / "new" / "a" / "e.json")
        with pytest.raises(Gpt1Error, match=r"ro: cannot write there \("):
            folder_target(ro)
        with pytest.raises(Gpt1Error, match=r"ro/tok: cannot create the folder: .*ro is not writable"):
            folder_target(ro / "tok")
    assert list(ro.iterdir()) == []
    assert file_target(ro / "e.json") == ro / "e.json" and folder_target(ro / "tok") == ro / "tok"
    assert list(ro.iterdir()) == []  # the trial files are gone, and nothing was made


def test_eval_suite_on_a_read_only_model_is_refused_before_scoring(tiny_model_dir, tmp_path, capsys, monkeypatch):
    """Every task was scored, then 'cannot write report.md there' and --json was never written."""
    import gpt1.cli.eval_cmd as eval_cmd
    import gpt1.train.harness as harness

    model = shutil.copytree(tiny_model_dir, tmp_path / "model")
    write_task_folders(tmp_path / "tasks")
    suite = ["eval", "--model", model, "--suite", "quick", "--data", tmp_path / "tasks"]
    _not_started(monkeypatch, harness, "evaluate_task")
    with read_only(model):
        assert_one_clear_line(*run_main(capsys, *suite, "--json", tmp_path / "r.json"),
                              r"model: cannot write report.md there \(.*\); pass --report PATH")
        # --json into a folder that cannot be written: before the model loads
        _not_started(monkeypatch, eval_cmd.gpt1, "load")
        assert_one_clear_line(*run_main(capsys, "eval", "--model", model, "--data", tmp_path / "tasks",
                                        "--json", model / "e.json"), r"model: cannot write e.json there")
    assert not (tmp_path / "r.json").exists()


def test_eval_writes_json_before_the_report(tiny_model_dir, tmp_path, capsys, monkeypatch):
    """One failing output (a full disk as the report is written) does not take --json with it."""
    import gpt1.train.harness as harness

    def disk_full(path, *args, **kwargs):
        raise Gpt1Error(f"{path}: no space left on device")

    monkeypatch.setattr(harness, "write_report", disk_full)
    model = shutil.copytree(tiny_model_dir, tmp_path / "model")
    write_task_folders(tmp_path / "tasks")
    assert_one_clear_line(*run_main(capsys, "eval", "--model", model, "--suite", "quick", "--data", tmp_path / "tasks",
                                    "--limit", "2", "--json", tmp_path / "r.json"), "report.md: no space left")
    assert set(read_json(tmp_path / "r.json")) >= {"hellaswag", "piqa"}


def test_tokenizer_train_and_finetune_check_out_before_the_work(tiny_model_dir, corpus_dir, tmp_path, capsys,
                                                                monkeypatch):
    """`tokenizer train --out` failed after the BPE training (an hour on OpenWebText), `finetune
    --out` after all its chat data was read and tokenized."""
    import gpt1.cli.tokenizer_cmd as tokenizer_cmd
    import gpt1.train.finetune as finetune

    ro = tmp_path / "ro"
    ro.mkdir()
    _not_started(monkeypatch, tokenizer_cmd, "train_tokenizer")
    _not_started(monkeypatch, finetune, "prepare_model")
    with read_only(ro):
        assert_one_clear_line(*run_main(capsys, "tokenizer", "train", "--vocab-size", "300", "--out", ro / "tok",
                                        corpus_dir / "json"), r"ro/tok: cannot create the folder: .*ro is not writable")
        assert_one_clear_line(*run_main(capsys, "tokenizer", "train", "--vocab-size", "300", "--out", ro,
                                        corpus_dir / "json"), r"ro: cannot write there")
        assert_one_clear_line(*run_main(capsys, "finetune", "--base", tiny_model_dir, "--data",
                                        _chat_file(tmp_path / "c.jsonl"), "--out", ro / "ft", "max_steps=1"),
                              r"ro/ft: cannot create the folder: .*ro is not writable")
    assert list(ro.iterdir()) == []


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv (util-linux)")
def test_a_read_only_folder_for_root_without_its_override_capabilities(corpus_dir, tmp_path):
    """The tester's setting: a chmod a-w folder, and root without the capabilities that bypass
    file modes. The trial file meets the modes the OS applies, whoever runs."""
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    caps = "-dac_override,-dac_read_search,-fowner,-chown,-fsetid"
    prefix = ["setpriv", "--inh-caps=-all", f"--bounding-set={caps}", "--"] if os.geteuid() == 0 else []
    try:
        run = subprocess.run([*prefix, sys.executable, "-m", "gpt1", "tokenizer", "train", "--vocab-size", "300",
                              "--out", str(ro / "tok"), str(corpus_dir / "json")],
                             capture_output=True, text=True, timeout=300, env={**os.environ, "GPT1_QUIET": "1"})
    finally:
        ro.chmod(0o755)
    assert_one_clear_line(run.returncode, run.stderr, r"ro/tok: cannot create the folder: .*ro is not writable "
                                                      r"\(Permission denied\)")
    assert "training a" not in run.stderr and list(ro.iterdir()) == []


# ---- 2. folder sources follow links to folders ------------------------------------------------

def test_a_folder_source_follows_links_to_folders_once(tmp_path):
    """corpus/part2 -> ../elsewhere/part2 was skipped in silence (the glob corpus/**/*.txt read it).
    A link back up (a loop) or a second link to a folder already read is read once."""
    corpus, elsewhere = tmp_path / "corpus", tmp_path / "elsewhere" / "part2"
    (corpus / "part1").mkdir(parents=True)
    elsewhere.mkdir(parents=True)
    (corpus / "part1" / "a.txt").write_text("a")
    (elsewhere / "b.txt").write_text("b")
    (corpus / "part2").symlink_to(Path("..") / "elsewhere" / "part2")
    (corpus / "part1" / "loop").symlink_to(Path(".."))
    (corpus / "zz-again").symlink_to(elsewhere)
    found = [os.path.relpath(s.location, corpus) for s in resolve_sources(corpus)]
    assert found == ["part1/a.txt", "part2/b.txt"]


def test_a_chatterbot_folder_follows_links_to_folders(tmp_path):
    from gpt1.data.chat_sources import read_conversations

    dialogs = tmp_path / "dialogs"
    (dialogs / "mine").mkdir(parents=True)
    (tmp_path / "shared").mkdir()
    (dialogs / "mine" / "a.yml").write_text("conversations:\n- - hi\n  - hello\n")
    (tmp_path / "shared" / "b.yml").write_text("conversations:\n- - how are you\n  - fine\n")
    (dialogs / "shared").symlink_to(tmp_path / "shared")
    (dialogs / "mine" / "up").symlink_to(dialogs)
    assert [c.messages[0]["content"] for c in read_conversations(str(dialogs))] == ["hi", "how are you"]


# ---- 3. outputs that are links are written through ---------------------------------------------

def test_a_link_as_output_is_written_through(tmp_path):
    """The link was replaced by a file or folder of its own; its target kept the old content."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "m.json").write_text("old")
    (tmp_path / "m.json").symlink_to(elsewhere / "m.json")
    write_json(tmp_path / "m.json", {"a": 1})
    assert (tmp_path / "m.json").is_symlink() and read_json(elsewhere / "m.json") == {"a": 1}
    (elsewhere / "target").mkdir()
    (elsewhere / "target" / "old.txt").write_text("old")
    (tmp_path / "out").symlink_to(elsewhere / "target")
    with atomic_dir(tmp_path / "out") as tmp:
        (tmp / "new.txt").write_text("new")
    assert (tmp_path / "out").is_symlink() and os.listdir(elsewhere / "target") == ["new.txt"]
    assert sorted(os.listdir(elsewhere)) == ["m.json", "target"] and sorted(os.listdir(tmp_path)) == [
        "elsewhere", "m.json", "out"]  # no temp or moved-aside folder left


def test_a_dangling_link_as_output_is_a_clear_error(tmp_path):
    (tmp_path / "dangle").symlink_to(tmp_path / "notyet")
    message = re.escape(f"{tmp_path / 'dangle'}: a link to {tmp_path / 'notyet'}, which does not exist")
    with pytest.raises(Gpt1Error, match=message):
        write_json(tmp_path / "dangle", {"a": 1})
    with pytest.raises(Gpt1Error, match=message):
        file_target(tmp_path / "dangle")
    with pytest.raises(Gpt1Error, match=message):
        with atomic_dir(tmp_path / "dangle"):
            pass
    with pytest.raises(Gpt1Error, match=message):
        folder_target(tmp_path / "dangle" / "run")
    with pytest.raises(Gpt1Error, match=message):
        make_dirs(tmp_path / "dangle" / "run")
    assert os.listdir(tmp_path) == ["dangle"] and (tmp_path / "dangle").is_symlink()


def test_exports_write_through_a_link(tiny_model_dir, tiny_config, tokenizer, tmp_path, capsys):
    """export --out LINK made a folder in the link's place; a dangling one was a traceback after
    the whole export; gguf --force turned a link into a file."""
    chat = tmp_path / "chat"
    finetuned_dir(chat, tiny_config, tokenizer, seed=0)
    (tmp_path / "target").mkdir()
    (tmp_path / "hf").symlink_to(tmp_path / "target")
    assert run_main(capsys, "export", "--model", chat, "--out", tmp_path / "hf")[0] == 0
    assert (tmp_path / "hf").is_symlink() and (tmp_path / "target" / "config.json").is_file()
    adapter = read_json(tmp_path / "target" / "adapter" / "adapter_config.json")
    assert adapter["base_model_name_or_path"] == str(tmp_path / "target")
    (tmp_path / "dangle").symlink_to(tmp_path / "notyet")
    assert_one_clear_line(*run_main(capsys, "export", "--model", chat, "--out", tmp_path / "dangle"),
                          r"dangle: a link to .*notyet, which does not exist")
    assert run_main(capsys, "export", "--model", tiny_model_dir, "--format", "gguf", "--out", tmp_path / "m.gguf")[0] == 0
    (tmp_path / "link.gguf").symlink_to(tmp_path / "m.gguf")
    assert run_main(capsys, "export", "--model", tiny_model_dir, "--format", "gguf", "--type", "f32",
                    "--out", tmp_path / "link.gguf", "--force")[0] == 0
    assert (tmp_path / "link.gguf").is_symlink() and (tmp_path / "m.gguf").stat().st_size > 0
    assert_one_clear_line(*run_main(capsys, "export", "--model", tiny_model_dir, "--format", "gguf",
                                    "--out", tmp_path / "dangle"), r"dangle: a link to .*notyet, which does not exist")
    assert not (tmp_path / "notyet").exists() and (tmp_path / "dangle").is_symlink()


def test_prepare_overwrite_writes_through_a_linked_shard(corpus_dir, tokenizer, tmp_path):
    out, elsewhere = tmp_path / "data", tmp_path / "elsewhere"
    prepare([str(corpus_dir / "json")], tokenizer, out, val=1)
    elsewhere.mkdir()
    shutil.move(out / "train.bin", elsewhere / "train.bin")
    (out / "train.bin").symlink_to(elsewhere / "train.bin")
    meta = prepare([str(corpus_dir / "json")], tokenizer, out, val=2, overwrite=True)
    assert (out / "train.bin").is_symlink()
    assert (elsewhere / "train.bin").stat().st_size == meta["train"]["tokens"] * 2


# ---- 4. a source respelled is the same source -----------------------------------------------------

def _legacy_files_hash(specs: list[str]) -> str:
    """The "files" of a key as gpt1 before 2026-12 hashed it: each file's path as the spec spelled it."""
    files = hashlib.sha256()
    for s in resolve_sources(specs):
        st = os.stat(s.location)
        files.update(os.fsencode(str(s)) + f"\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return files.hexdigest()[:16]


def test_prepare_takes_a_respelled_source_as_the_same(corpus_dir, tokenizer, tmp_path, monkeypatch):
    """`prepare sl/corpus/` after `prepare sl/corpus` said 'already holds data prepared with other
    settings (sources: ['sl/corpus'] -> ['sl/corpus/'])'."""
    shutil.copytree(corpus_dir / "json", tmp_path / "c")
    monkeypatch.chdir(tmp_path)
    prepare(["c"], tokenizer, "d", val=1)
    before = (tmp_path / "d" / "train.bin").stat().st_mtime_ns
    for spelling in ("c/", "./c", str(tmp_path / "c"), "c//"):
        prepare([spelling], tokenizer, "d", val=1)  # nothing to do
    assert (tmp_path / "d" / "train.bin").stat().st_mtime_ns == before
    shutil.copytree(tmp_path / "c", tmp_path / "c2")
    with pytest.raises(Gpt1Error, match=r"other settings \(sources: \[.*/c'\] -> \[.*/c2'\]\)"):
        prepare(["c2"], tokenizer, "d", val=1)


def test_prepare_recognises_a_folder_recorded_by_an_earlier_gpt1(corpus_dir, tokenizer, tmp_path, monkeypatch):
    """Data dirs prepared before recorded the sources as typed (and hashed their files' paths so):
    rerunning the same command, or a respelling of it, is still 'nothing to do'."""
    shutil.copytree(corpus_dir / "json", tmp_path / "c")
    monkeypatch.chdir(tmp_path)
    prepare(["./c"], tokenizer, "d", val=1)
    meta = read_json(tmp_path / "d" / "meta.json")
    meta["key"].update(sources=["./c"], files=_legacy_files_hash(["./c"]))
    write_json(tmp_path / "d" / "meta.json", meta)
    before = (tmp_path / "d" / "train.bin").stat().st_mtime_ns
    for spelling in ("./c", "c", "c/"):
        assert prepare([spelling], tokenizer, "d", val=1)["key"] == meta["key"]  # nothing to do
    assert (tmp_path / "d" / "train.bin").stat().st_mtime_ns == before
    (tmp_path / "c" / "__init__.py").write_text("changed")
    with pytest.raises(Gpt1Error, match=r"other settings \(files \(changed on disk\)\)"):
        prepare(["c"], tokenizer, "d", val=1)


# ---- 5. a local recipe wins over a shipped one -------------------------------------------------

def test_a_local_recipe_wins_over_the_shipped_one(tmp_path, monkeypatch, capsys):
    """--config tiny-cpu (and ./tiny-cpu) read the shipped recipe although ./tiny-cpu.toml, an
    edited copy, was there; --config w6/tiny-cpu was 'not found'."""
    from gpt1.cli import main
    from gpt1.train.config import CONFIGS_DIR

    monkeypatch.chdir(tmp_path)
    shipped = (CONFIGS_DIR / "tiny-cpu.toml").read_text()
    edited = re.sub(r"(?m)^max_steps = \d+", "max_steps = 7", shipped)
    assert edited != shipped
    Path("tiny-cpu.toml").write_text(edited)
    Path("w6").mkdir()
    Path("w6/tiny-cpu.toml").write_text(edited)
    for name in ("tiny-cpu", "./tiny-cpu", "tiny-cpu.toml", "w6/tiny-cpu"):
        assert main(["pretrain", "--config", name, "--print-config"]) == 0
        captured = capsys.readouterr()
        assert "max_steps = 7" in captured.out, name
        shadowed = "tiny-cpu.toml: a local file of that name, used instead of the shipped recipe tiny-cpu" in captured.err
        assert shadowed == (name in ("tiny-cpu", "tiny-cpu.toml")), (name, captured.err)
    assert resolve_config_path("gpt1-openwebtext") == CONFIGS_DIR / "gpt1-openwebtext.toml"
    with pytest.raises(Gpt1Error, match=r"w6/nope: config file not found"):
        resolve_config_path("w6/nope")


# ---- 6. a folder name that is not UTF-8 ----------------------------------------------------------

def test_a_folder_name_that_is_not_utf8(tiny_model_dir, tiny_config, tokenizer, tmp_path, capsys, monkeypatch):
    """Exporting a chat model there was a UnicodeEncodeError traceback (base_model_name_or_path),
    finetune "key 'init_from' expects str ... lone leading surrogate" once the data was read."""
    import gpt1.train.finetune as finetune

    bad = Path(os.fsdecode(os.fsencode(tmp_path) + b"/bad\xffdir"))
    try:
        bad.mkdir()
    except OSError:
        pytest.skip("the file system refuses a name that is not UTF-8")
    chat = tmp_path / "chat"
    finetuned_dir(chat, tiny_config, tokenizer, seed=0)
    shutil.copytree(tiny_model_dir, bad / "base")
    _chat_file(bad / "c.jsonl")
    monkeypatch.chdir(bad)
    utf8 = r"bad\\xffdir/(hf|base): not valid UTF-8: gpt1 records this path in JSON, which needs UTF-8"
    assert_one_clear_line(*run_main(capsys, "export", "--model", chat, "--out", "hf"), utf8)
    _not_started(monkeypatch, finetune, "prepare_model")
    assert_one_clear_line(*run_main(capsys, "finetune", "--data", "c.jsonl", "--base", "base", "--out", "ft",
                                    "max_steps=1"), utf8)
    assert sorted(os.listdir(bad)) == ["base", "c.jsonl"]


# ---- 7. long names, and no folders left by a failed command ------------------------------------

@pytest.mark.parametrize("name", ["m" * 250 + ".gguf", "é" * 125 + ".json"])
def test_a_name_of_255_bytes_is_written(tmp_path, name):
    """The temporary name beside it (`.NAME.PID.XXXXXXXX.tmp`) passed the 255-byte limit."""
    assert len(os.fsencode(name)) == 255
    write_json(tmp_path / name, {"a": 1})
    folder = name.replace(".", "-")  # 255 bytes too
    with atomic_dir(tmp_path / folder) as tmp:
        (tmp / "x").write_text("x")
    assert sorted(os.listdir(tmp_path)) == sorted([name, folder])


def test_a_failed_command_leaves_no_folders_made_for_its_output(tmp_path, capsys):
    assert file_target(tmp_path / "new" / "a" / "b" / "e.json") and folder_target(tmp_path / "new" / "run")
    assert_one_clear_line(*run_main(capsys, "eval", "--model", tmp_path / "typo", "--data", tmp_path,
                                    "--json", tmp_path / "new" / "a" / "b" / "e.json"), "typo")
    assert os.listdir(tmp_path) == []


# Where HOME or an output folder cannot be written: plot, quickstart, prepare.

def test_a_plot_where_home_cannot_be_written_says_nothing_of_matplotlib(tmp_path):
    """matplotlib's import warned in two lines (`mkdir -p failed for path ...`, `Matplotlib created a
    temporary cache directory ...`) at every pretrain, finetune and plot of a user without a
    writable HOME."""
    from tests.test_cli_environment import gpt1

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text(METRICS)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XDG_", "MPLCONFIGDIR"))}
    result = gpt1("plot", tmp_path / "run", "--out", tmp_path / "p.png", env={**env, "HOME": "/proc/gpt1-no-home"})
    assert result.returncode == 0 and (tmp_path / "p.png").stat().st_size > 0, result.stderr.decode()
    assert "matplotlib" not in result.stderr.decode().lower(), result.stderr.decode()
    # Its other warnings still come through: a bad line in the user's own matplotlibrc.
    (tmp_path / "mpl").mkdir()
    (tmp_path / "mpl" / "matplotlibrc").write_text("bogus.key: 3\n")
    result = gpt1("plot", tmp_path / "run", "--out", tmp_path / "p.png", env={**env, "MPLCONFIGDIR": str(tmp_path / "mpl")})
    assert result.returncode == 0 and "Bad key bogus.key in file" in result.stderr.decode(), result.stderr.decode()


def test_a_quickstart_where_its_folder_cannot_be_made_says_what_to_do(capsys):
    """`gpt1-quickstart: cannot create the folder (Permission denied)` from a read-only current
    folder, without the way out that `tokenizer train` gives for the same case."""
    from tests.test_battery import run_main

    code, err = run_main(capsys, "quickstart", "--out", "/proc/gpt1-quickstart")
    assert code == 2 and err.strip().endswith("choose a writable --out"), err
    assert "cannot create the folder: /proc is not writable" in err


def test_a_prepare_whose_folder_cannot_be_made_says_what_to_do(corpus_dir, tokenizer_dir, capsys):
    """`../chat/newdata: cannot create the folder (Permission denied)`, without the way out."""
    from tests.test_battery import run_main

    code, err = run_main(capsys, "prepare", corpus_dir, "--tokenizer", tokenizer_dir, "--out", "/proc/gpt1-data")
    assert code == 2 and err.strip().endswith("; choose a writable --out"), err
    assert "/proc/gpt1-data: cannot create the folder: /proc is not writable (" in err


# Output-file flags never replace a model, run or data dir's own files; plot writes the format its
# suffix names; `info` says what a folder that is not a model dir is.

METRICS = '{"step": 1, "loss": 8.0, "tokens": 64}\n{"step": 2, "loss": 7.0, "val_loss": 7.5, "tokens": 128}\n'


@pytest.fixture
def run(tiny_model_dir, tmp_path) -> Path:
    """A run dir: a model dir with its metrics, train_config.json, a checkpoint and a loss.png."""
    run = tmp_path / "run"
    shutil.copytree(tiny_model_dir, run)
    (run / "metrics.jsonl").write_text(METRICS)
    (run / "train_config.json").write_text('{"config": {}}\n')
    (run / "checkpoints" / "step-00000002").mkdir(parents=True)
    (run / "checkpoints" / "step-00000002" / "trainer_state.pt").write_bytes(b"state")
    (run / "loss.png").write_bytes(b"an earlier plot")
    return run


def _contents(*folders: Path) -> dict[Path, bytes]:
    return {f: f.read_bytes() for folder in folders for f in sorted(folder.rglob("*")) if f.is_file()}


def test_output_flags_refuse_a_model_run_or_data_dirs_own_files(run, data_dir, tmp_path, capsys):
    """plot --out RUN/model.safetensors wrote a PNG over the weights; eval --json RUN/train_config.json
    broke the run; bench --json DATA/meta.json the data dir."""
    data = tmp_path / "data"
    shutil.copytree(data_dir, data)
    task = write_jsonl(tmp_path / "hs.jsonl", [hellaswag(i) for i in range(2)])
    before = _contents(run, data)
    eval_json = ["eval", "--model", run, "--data", data, "--max-batches", "1", "--json"]
    cases = [
        (eval_json + [run / "train_config.json"], r"run/train_config\.json: belongs to .*run, a model dir: writing it "
                                                  r"would replace that file; choose another file name"),
        (eval_json + [run / "model.safetensors"], r"run/model\.safetensors: belongs to .*run, a model dir"),
        (eval_json + [data / "train.bin"], r"data/train\.bin: belongs to .*data, a prepared data dir"),
        # not there yet, but it would make the data dir look like a model dir
        (eval_json + [data / "config.json"], r"data/config\.json: belongs to .*data, a prepared data dir"),
        (["eval", "--model", run, "--task", "hellaswag", "--data", task, "--samples", run / "metrics.jsonl"],
         r"run/metrics\.jsonl: belongs to"),
        (["eval", "--model", run, "--task", "hellaswag", "--data", task, "--report", run / "tokenizer.json"],
         r"run/tokenizer\.json: belongs to"),
        (["bench", "generate", "--json", data / "meta.json"], r"data/meta\.json: belongs to .*data, a prepared data dir"),
        (["plot", run, "--out", run / "checkpoints" / "step-00000002" / "plot.png"],
         r"plot\.png: belongs to .*run, a model dir \(its checkpoints/ folder\)"),
        (["plot", run, "--out", run / ".lock"], r"run/\.lock: belongs to"),
    ]
    for argv, pattern in cases:
        assert_one_clear_line(*run_main(capsys, *argv), pattern)
    assert _contents(run, data) == before  # nothing replaced, nothing added

    # A new file in such a folder, or one the command wrote before, is fine.
    assert run_main(capsys, *eval_json, run / "eval.json")[0] == 0
    assert run_main(capsys, *eval_json, run / "eval.json")[0] == 0
    assert json.loads((run / "eval.json").read_text())["tokens"] > 0
    assert run_main(capsys, "plot", run, "--out", run / "loss.png")[0] == 0
    assert (run / "loss.png").read_bytes().startswith(b"\x89PNG")


def test_plot_writes_the_format_its_suffix_names(run, tmp_path, capsys):
    """--out x.svg, x.pdf, x.jpg got PNG bytes; another suffix (a shard's .bin) got them too."""
    for name, magic in (("a.svg", b"<?xml"), ("a.pdf", b"%PDF"), ("a.jpg", b"\xff\xd8\xff"), ("a.JPEG", b"\xff\xd8\xff"),
                        ("a.png", b"\x89PNG"), ("a", b"\x89PNG")):
        assert run_main(capsys, "plot", run, "--out", tmp_path / name)[0] == 0, name
        assert (tmp_path / name).read_bytes().startswith(magic), name
    for name in ("a.txt", "train.bin"):
        assert_one_clear_line(*run_main(capsys, "plot", run, "--out", tmp_path / name),
                              rf"{name}: plot writes \.png, \.svg, \.pdf, \.jpg, \.jpeg files; expected a file name ending "
                              rf"in one of them, not \.{name.split('.')[1]}$")
        assert not (tmp_path / name).exists()


def test_info_says_what_a_folder_that_is_not_a_model_dir_is(tmp_path, tiny_model_dir, data_dir, tokenizer_dir, capsys):
    """All of these said "config.json: file not found" ('' too: the current folder)."""
    quickstart = tmp_path / "qs"
    for name in ("base", "chat"):
        shutil.copytree(tiny_model_dir, quickstart / name)
    (quickstart / "summary.json").write_text("{}")
    starting = tmp_path / "starting"
    starting.mkdir()
    (starting / "train_config.json").write_text("{}")
    (tmp_path / "other").mkdir()
    tokens = json.loads((data_dir / "meta.json").read_text())["train"]["tokens"]
    for arg, pattern in (
        ("", r"MODEL is empty; expected a preset name \(e\.g\. tiny, gpt1\) or a model dir$"),
        (data_dir, rf"{data_dir}: a prepared data dir \({tokens:,} train tokens, [\d,]+ validation\), not a model dir; "
                   rf"`gpt1 pretrain --data {data_dir} --out RUN` trains one$"),
        (quickstart, rf"qs: not a model dir; it holds the model dirs base/, chat/: try {quickstart}/chat$"),
        (starting, r"starting: a training run dir that has not saved its model yet \(no config\.json\)"),
        (tokenizer_dir, r": a tokenizer dir \(tokenizer\.json\), not a model dir$"),
        (tmp_path / "other", r"other: not a model dir \(no config\.json\)$"),
    ):
        assert_one_clear_line(*run_main(capsys, "info", arg), pattern)
    assert run_main(capsys, "info", quickstart / "chat")[0] == 0


# Folders that are not model dirs where a model is loaded, empty path arguments, and paths that
# are not paths in the Python API.

def test_loading_a_folder_that_is_not_a_model_dir_says_what_it_is(tmp_path, tiny_model_dir, data_dir, capsys):
    """generate/chat/serve/eval/gpt1.load said "config.json: file not found" (only `info` explained)."""
    quickstart = tmp_path / "qs"
    for name in ("base", "chat"):
        shutil.copytree(tiny_model_dir, quickstart / name)
    for argv in (["generate", "--prompt", "x"], ["chat"], ["serve"]):
        assert_one_clear_line(*run_main(capsys, *argv, "--model", data_dir),
                              rf"{data_dir}: a prepared data dir, not a model dir; `gpt1 pretrain --data {data_dir} --out RUN`")
    assert_one_clear_line(*run_main(capsys, "eval", "--model", quickstart, "--data", data_dir),
                          rf"qs: not a model dir; it holds the model dirs base/, chat/: try {quickstart}/chat$")
    with pytest.raises(Gpt1Error, match=r"qs: not a model dir; it holds the model dirs base/, chat/"):
        gpt1.load(quickstart)


@pytest.mark.parametrize("argv, flag", [
    (["pretrain", "--data", "DATA", "--out", ""], "--out"),
    (["pretrain", "--data", "", "--out", "OUT"], "--data"),
    (["finetune", "--base", "MODEL", "--out", ""], "--out"),
    (["eval", "--model", "MODEL", "--data", "DATA", "--json="], "--json"),
    (["eval", "--model", "", "--data", "DATA"], "--model"),
    (["generate", "--model", "", "--prompt", "x"], "--model"),
    (["export", "--model", "MODEL", "--out", ""], "--out"),
    (["plot", "OUT", "--out", ""], "--out"),
    (["quickstart", "--out", ""], "--out"),
])
def test_an_empty_path_is_refused_by_its_flag(argv, flag, tmp_path, tiny_model_dir, data_dir, capsys, monkeypatch):
    """`--out "$DIR"` with DIR unset trained into the current folder (Path("") is "."), and
    `eval --json=` printed instead of writing, without a word."""
    monkeypatch.chdir(tmp_path)
    argv = [{"DATA": data_dir, "MODEL": tiny_model_dir, "OUT": tmp_path / "run"}.get(a, a) for a in argv]
    assert_one_clear_line(*run_main(capsys, *argv),
                          rf"argument {flag}: expected a path, got an empty one \(an unset shell variable\?\)")
    assert list(tmp_path.iterdir()) == []  # nothing written where it ran


def test_the_python_api_names_a_path_argument_that_is_not_one(tmp_path, data_dir, tiny_model_dir):
    """pretrain(cfg, None, out) was a TypeError about "argument should be a str"."""
    cfg = TrainConfig(max_steps=1, device="cpu")
    with pytest.raises(Gpt1Error, match=r"^data_dir: expected a prepared data dir \(a str or Path\), got NoneType$"):
        pretrain(cfg, None, tmp_path / "run")
    with pytest.raises(Gpt1Error, match=r"^out: expected a run dir \(a str or Path\), got int$"):
        pretrain(cfg, data_dir, 3)
    with pytest.raises(Gpt1Error, match=r"^base: expected a model dir \(a str or Path\), got NoneType$"):
        finetune(FinetuneConfig(max_steps=1), None, tmp_path / "ft")
    assert not (tmp_path / "run").exists() and not (tmp_path / "ft").exists()
