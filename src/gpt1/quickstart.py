"""`gpt1 quickstart`: the whole pipeline on data every machine has, in minutes on a CPU.

The stages, each in its own folder under `out` and each the same library call that the
full-scale commands make:

    tokenizer/   byte-level BPE (vocab 4096) trained on the Python standard library's source
    data/        train.bin / val.bin prepared from the same corpus          (`gpt1 prepare`)
    base/        the `tiny` preset pretrained with configs/tiny-cpu.toml     (`gpt1 pretrain`)
    chat/        a LoRA chat fine-tune with configs/tiny-chat.toml on the    (`gpt1 finetune`)
                 English dialogs of the chatterbot-corpus package
    loss.png     both runs' loss and perplexity curves
    summary.json the numbers and the samples of the last run, and what they were made from

Training lengths come from a time budget: a few measured steps tell how many optimizer steps
fit in `minutes` (pretraining) and a quarter of it (fine-tuning). A finished stage is reused
by the next run (a run's step count is fixed when it starts, so a killed run resumes with the
same schedule); delete a stage's folder to redo it. The last stage (held-out scores and samples)
is reused from summary.json when everything it reads is what it read then (`samples_inputs`):
both model folders, the held-out data, the prompts and sampling settings, gpt1's version and code, torch's version.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

import gpt1
from gpt1.core.atomic import write_json
from gpt1.core.config import ModelConfig
from gpt1.core.device import resolve_device
from gpt1.core.errors import Gpt1Error, first_line
from gpt1.core.fingerprints import file_fingerprint
from gpt1.core.locks import exclusive
from gpt1.core.paths import folder_target, make_dirs
from gpt1.core.progress import info, warn
from gpt1.core.reading import read_json
from gpt1.core.sampling_params import preset
from gpt1.core.tokenizer import Tokenizer, train_tokenizer
from gpt1.data.chat_sources import conversations_fingerprint, hf_split_names, read_conversations
from gpt1.data.prepare import prepare
from gpt1.data.sources import SourceStats, iter_documents
from gpt1.formats.modeldir import ADAPTER_DIR
from gpt1.train.config import TrainConfig, load_config
from gpt1.train.evaluate import evaluate_chat, evaluate_data
from gpt1.train.finetune import FinetuneConfig, finetune
from gpt1.train.plot import plot_runs
from gpt1.train.pretrain import pretrain
from gpt1.train.run_record import CONFIG_FILE

PRETRAIN_RECIPE = "tiny-cpu"
FINETUNE_RECIPE = "tiny-chat"
FINETUNE_SHARE = 0.25  # of the pretraining budget
MAX_PRETRAIN_EPOCHS = 4  # a fast GPU would otherwise loop over the small corpus for minutes
MIN_STEPS = 10  # whatever the budget: a loss curve, not a point
SUMMARY_FILE = "summary.json"
QUICKSTART_VAL = 0.02  # the held-out fraction of the corpus's files

# The model card's three uses, each sampled with the card's settings (gpt1.core.sampling_params.PRESETS).
SAMPLE_PROMPTS = {
    "qa": "What is a computer?",
    "creative": "Tell me a story about a robot.",
    "code": "Write a Python function that adds two numbers.",
}
# What pretraining on Python source taught the base model, before any chat tuning.
BASE_PROMPT = "def read_config(path):\n    "
# summary.json's record of what its scores and samples were made from (`samples_inputs`). Bump
# SAMPLES_LAYOUT when the last stage changes what it computes from the same inputs, so that a
# rerun after the upgrade makes them again instead of reusing an older gpt1's.
INPUTS_KEY = "samples_inputs"
SAMPLES_LAYOUT = 1
INPUT_NAMES = {"layout": "layout of summary.json", "gpt1": "gpt1 version or code", "torch": "torch version",
               "base": "base model", "chat": "chat model", "held_out": "held-out data",
               "samples": "prompts or sampling settings"}
# Files of the model and data folders that neither the scores nor the samples read.
UNREAD_BY_SAMPLES = frozenset({"metrics.jsonl", "loss.png", "train.bin"})


@dataclass
class QuickstartConfig:
    out: str = "gpt1-quickstart"
    minutes: float = 5.0  # pretraining time budget; the chat fine-tune gets a quarter of it
    corpus: str = "stdlib"  # any `gpt1 prepare` source
    chat_data: str = "chatterbot:english"  # any `gpt1 finetune --data` source
    vocab_size: int = 4096
    device: str = "auto"  # auto (cuda > mps > cpu), cpu, cuda, mps
    seed: int = 1337

    def __post_init__(self) -> None:
        if not (self.minutes > 0 and math.isfinite(self.minutes)):
            raise Gpt1Error(f"--minutes must be a positive number, got {self.minutes}")
        # Checked before any stage runs: these failed only when the stage reading them started.
        if not 0 <= self.seed < 2**63:
            raise Gpt1Error(f"--seed must be a whole number in [0, 2**63), got {self.seed}")
        resolve_device(self.device)


@dataclass
class Sample:
    use: str  # a sampling preset: qa, creative, code (or "base" for the base model's continuation)
    prompt: str
    text: str
    settings: dict


@dataclass
class QuickstartResult:
    out: Path
    tokenizer: Path
    data: Path
    base: Path
    chat: Path
    plot: Path | None  # None: it could not be drawn (a warning said why)
    train_tokens: int
    base_steps: int
    base_parameters: int  # a tied output head counted once
    base_val_perplexity: float | None  # the whole held-out split, after training
    base_val_bits_per_byte: float | None  # tokenizer-independent: comparable across vocabularies
    chat_steps: int
    chat_val_perplexity: float | None  # on the assistant replies of the held-out dialogs
    chat_val_bits_per_byte: float | None
    samples: list[Sample]
    # stage -> wall time it took to make its output: a resumed training stage's adds the time budget
    # its earlier invocations spent; a reused stage's is the time of the run that made it (a training
    # stage without that run's summary.json: the time budget its run spent)
    seconds: dict[str, float] = field(default_factory=dict)
    planned: dict[str, float] = field(default_factory=dict)  # stage -> its time budget (training stages)
    # stage -> what ended it before its budget was spent (its epochs, on a machine fast enough to finish them)
    ended_early: dict[str, str] = field(default_factory=dict)
    reused: list[str] = field(default_factory=list)  # stages whose output an earlier run made


def run_quickstart(cfg: QuickstartConfig) -> QuickstartResult:
    """Run (or reuse) every stage under `cfg.out`; see the module docstring."""
    out = make_dirs(folder_target(cfg.out, "choose a writable --out"))  # a read-only cwd: says so, and what to do
    # One quickstart per folder: a second one would race the first through its stages (the
    # prepare and training locks refuse it only mid-way, with a stage's error), so it is refused here.
    with exclusive(out, "running the quickstart"):
        return _run_stages(cfg, out)


def _run_stages(cfg: QuickstartConfig, out: Path) -> QuickstartResult:
    seconds: dict[str, float] = {}
    made_before = {"tokenizer": (out / "tokenizer" / "tokenizer.json").is_file(),
                   "prepare": (out / "data" / "meta.json").is_file()}

    def stage(name: str, title: str):
        info(f"\n== {title}")
        seconds[name] = time.perf_counter()

    def done(name: str) -> None:
        seconds[name] = time.perf_counter() - seconds[name]

    stage("tokenizer", f"1/5 tokenizer: byte-level BPE, {cfg.vocab_size:,} tokens, on {cfg.corpus}")
    tokenizer = _tokenizer(cfg, out / "tokenizer")
    done("tokenizer")

    stage("prepare", "2/5 prepare: token shards")
    meta = prepare([cfg.corpus], tokenizer, out / "data", val=QUICKSTART_VAL, seed=cfg.seed, skip_invalid=True,
                   redo_hint=f"delete {out / 'data'} (and the stages after it) to prepare it again")
    done("prepare")

    # A rerun continues (or reuses) the run it finds instead of starting a new time budget.
    stage("pretrain", "3/5 pretrain: the tiny model" + _budget_note(out / "base", cfg.minutes))
    base = _pretrain(cfg, out / "data", out / "base", meta["train"]["tokens"])
    done("pretrain")
    planned = {"pretrain": _budget(out / "base", 0.0)}  # the budget the run started with, resumed or not

    stage("finetune", f"4/5 finetune: LoRA chat tuning on {cfg.chat_data}" + _budget_note(out / "chat", cfg.minutes * FINETUNE_SHARE))
    chat = _finetune(cfg, out / "base", out / "chat")
    done("finetune")
    planned["finetune"] = _budget(out / "chat", 0.0)
    ended_early = {}  # a fast machine finishes a stage's epochs before its budget is spent
    if _reached_step_cap(out / "base", base.steps):
        ended_early["pretrain"] = f"{MAX_PRETRAIN_EPOCHS} epochs of the corpus"
    if _reached_step_cap(out / "chat", chat.steps):
        ended_early["finetune"] = f"{_run_config(out / 'chat')['epochs']:g} epochs of the dialogs"
    made_before |= {"pretrain": base.resumed_from >= base.steps, "finetune": chat.resumed_from >= chat.steps}
    reused = [name for name, before in made_before.items() if before]
    # A training stage's time is its whole run's: the stage's wall time (its setup, steps, final
    # validation, checkpoint and plot: what the budget plans to end on time), plus the budget a
    # killed run's earlier invocations spent; not the budget alone, which left out the run's end
    # ("pretrain 34 s" for a stage of 39 s). A reused run's is the time it took to make (below).
    for name, trained in (("pretrain", base), ("finetune", chat)):
        if name in reused and trained.budget_spent is not None:
            seconds[name] = trained.budget_spent
        elif trained.budget_spent_before:
            seconds[name] += trained.budget_spent_before

    stage("samples", "5/5 samples: held-out scores and the model card's three uses")
    inputs = samples_inputs(cfg, out)
    earlier = _earlier_summary(out / SUMMARY_FILE)
    made = _reusable_samples(earlier, inputs)
    if made is not None:
        reused.append("samples")
        plot = out / "loss.png" if (out / "loss.png").is_file() else _plot(out)
    else:
        made = _make_samples(cfg, out)
        plot = _plot(out)
    done("samples")
    _keep_earlier_seconds(earlier, reused, seconds)

    result = QuickstartResult(
        out=out, tokenizer=out / "tokenizer", data=out / "data", base=out / "base", chat=out / "chat", plot=plot,
        train_tokens=meta["train"]["tokens"], base_steps=base.steps, chat_steps=chat.steps, **made,
        seconds=seconds, planned=planned, ended_early=ended_early, reused=reused)
    summary = json.loads(json.dumps(dataclasses.asdict(result), default=str))
    write_json(out / SUMMARY_FILE, {**summary, INPUTS_KEY: inputs})
    return result


# The fields of QuickstartResult that the last stage makes, and the types summary.json must hold them in.
MADE_BY_SAMPLES = {"base_parameters": (int,), "base_val_perplexity": (float, type(None)),
                   "base_val_bits_per_byte": (float, type(None)), "chat_val_perplexity": (float, type(None)),
                   "chat_val_bits_per_byte": (float, type(None)), "samples": (list,)}


def _make_samples(cfg: QuickstartConfig, out: Path) -> dict:
    """The last stage's fields of QuickstartResult: both models' held-out scores and the samples."""
    # On the CPU: a few hundred tokens and a small held-out split are not worth a GPU's start-up.
    base_llm, chat_llm = gpt1.load(out / "base", device="cpu"), gpt1.load(out / "chat", device="cpu")
    base_eval = evaluate_data(base_llm, [str(out / "data")], batch_size=16, show_progress=False)
    chat_eval = evaluate_chat(chat_llm, cfg.chat_data, batch_size=16, show_progress=False)
    return {"base_parameters": base_llm.model.num_params(), "base_val_perplexity": base_eval.perplexity,
            "base_val_bits_per_byte": base_eval.bits_per_byte, "chat_val_perplexity": chat_eval.perplexity,
            "chat_val_bits_per_byte": chat_eval.bits_per_byte, "samples": _samples(cfg, base_llm, chat_llm)}


def samples_inputs(cfg: QuickstartConfig, out: Path) -> dict:
    """What the last stage's scores and samples are made from, as summary.json records it: equal
    records, equal results (the samples are seeded), so a rerun whose record is the same reuses them.
    Content, not size and mtime: a copied folder or a touched file reuses; rewritten weights do not."""
    record = {
        "layout": SAMPLES_LAYOUT, "gpt1": {"version": gpt1.__version__, "code": LOADED_CODE},
        "torch": torch.__version__,
        "base": _folder_fingerprint(out / "base"), "chat": _folder_fingerprint(out / "chat"),
        "held_out": {"data": _folder_fingerprint(out / "data"), "chat_data": cfg.chat_data,
                     # what the chat scores are split from: a changed corpus under a finished fine-tune
                     "chat_conversations": _chat_corpus_fingerprint(cfg.chat_data)},
        "samples": [{"use": use, "prompt": prompt, "params": dataclasses.asdict(_params(use, knobs))}
                    for use, prompt, knobs in _sample_plan(cfg)],
    }
    return json.loads(json.dumps(record, default=str))  # as it reads back from summary.json (tuples: lists)


def _chat_corpus_fingerprint(spec: str) -> str:
    """sha256 of the conversations the chat scores are taken from: the source's, and its validation
    split where it has one, which `evaluate_chat` scores instead of a share of the rest (a folder of
    train.jsonl and validation.jsonl: an edited validation.jsonl was not seen)."""
    conversations = read_conversations(spec)
    if "validation" in (hf_split_names(spec) or []):
        conversations += read_conversations(spec, "validation")
    return conversations_fingerprint(conversations)


def _code_fingerprint(package: Path) -> str:
    """sha256 of a gpt1 package's Python source: a checkout or a `pip install git+...` of another
    commit keeps the version number (0.3.0 through many changes to decoding and scoring), and its
    samples and scores must not be taken for this one's."""
    listing = "".join(f"{p.relative_to(package).as_posix()} {file_fingerprint(p)}\n" for p in sorted(package.rglob("*.py")))
    return hashlib.sha256(listing.encode()).hexdigest()


# The code this process runs: its source as this module is imported (~15 ms), not as a `git pull`
# since then left it on disk, which a long-lived process (a notebook's kernel) does not run.
LOADED_CODE = _code_fingerprint(Path(gpt1.__file__).parent)


def _folder_fingerprint(folder: Path) -> str:
    """sha256 of a model or data folder's files that loading or scoring it reads: its top-level
    files and adapter/ (not its checkpoints/, its run's log and plot, train.bin, or a .lock naming a process)."""
    files = [p for p in sorted(folder.iterdir()) if p.is_file() and not p.name.startswith(".")
             and p.name not in UNREAD_BY_SAMPLES]
    if (folder / ADAPTER_DIR).is_dir():
        files += [p for p in sorted((folder / ADAPTER_DIR).iterdir()) if p.is_file()]
    listing = "".join(f"{p.relative_to(folder)} {file_fingerprint(p)}\n" for p in files)
    return hashlib.sha256(listing.encode()).hexdigest()


def _earlier_summary(file: Path) -> dict | None:
    """The summary.json an earlier run wrote; None when there is none, or (with a note) when it cannot be read."""
    if not file.exists():
        return None
    try:
        earlier = read_json(file)
    except Gpt1Error as e:
        info(f"{first_line(e)}; making the scores and samples again")
        return None
    if not isinstance(earlier, dict):
        info(f"{file}: not a summary (a JSON object); making the scores and samples again")
        return None
    return earlier


def _reusable_samples(earlier: dict | None, inputs: dict) -> dict | None:
    """The last stage's fields from an earlier summary.json made from the same `inputs`; None when
    there is none, it was made from other inputs (or by a gpt1 that did not record them), or its
    fields are not what this gpt1 writes."""
    recorded = earlier.get(INPUTS_KEY) if earlier is not None else None
    if recorded != inputs:
        if isinstance(recorded, dict):  # what changed: why this rerun takes seconds longer than the last one
            changed = " and ".join(INPUT_NAMES[name] for name in inputs if recorded.get(name) != inputs[name])
            info(f"{SUMMARY_FILE}'s scores and samples were made with another {changed}; making them again")
        return None
    made = {name: earlier.get(name) for name in MADE_BY_SAMPLES}
    if not all(isinstance(made[name], types) and not isinstance(made[name], bool)
               for name, types in MADE_BY_SAMPLES.items()):
        return None
    try:
        made["samples"] = [Sample(**sample) for sample in made["samples"]]
    except TypeError:  # not a list of Sample's fields
        return None
    if len(made["samples"]) != len(inputs["samples"]):
        return None
    info(f"reusing the scores and samples in {SUMMARY_FILE} (same models, held-out data and settings)")
    return made


def _plot(out: Path) -> Path | None:
    """Both runs' curves in OUT/loss.png, a by-product (as each run's own loss.png): one that cannot be
    drawn (matplotlib broken or missing, a folder in the way) is a warning, not a failed quickstart
    whose models are written."""
    try:
        return plot_runs({"pretraining (base)": out / "base" / "metrics.jsonl",
                          "chat fine-tuning (chat)": out / "chat" / "metrics.jsonl"}, out / "loss.png")
    except Exception as e:  # noqa: BLE001 - whatever it was, the models and their scores stand
        warn(f"{out / 'loss.png'} not drawn ({first_line(e)}); `gpt1 plot {out / 'base'} {out / 'chat'}` draws it")
        return None


def _keep_earlier_seconds(earlier: dict | None, reused: list[str], seconds: dict) -> None:
    """A rerun that reuses stages keeps, in summary.json, the time the run that made them took
    (from its summary.json, when it got that far), not the instant of the reuse."""
    kept = earlier.get("seconds") if earlier is not None else None
    for stage in reused:
        if isinstance(kept, dict) and isinstance(kept.get(stage), (int, float)):
            seconds[stage] = kept[stage]


def _tokenizer(cfg: QuickstartConfig, directory: Path):
    if (directory / "tokenizer.json").is_file():
        tokenizer = Tokenizer.load(directory)
        if tokenizer.vocab_size == cfg.vocab_size:
            info(f"reusing {directory} ({tokenizer.vocab_size:,} tokens)")
            return tokenizer
        raise Gpt1Error(f"{directory} holds a tokenizer of {tokenizer.vocab_size:,} tokens, not {cfg.vocab_size:,}; "
                        "delete it or choose another --out")
    return train_corpus_tokenizer(cfg.corpus, cfg.vocab_size, directory)


def train_corpus_tokenizer(corpus: str, vocab_size: int, directory: Path) -> Tokenizer:
    """A byte-level BPE tokenizer of `vocab_size` tokens trained on `corpus`, saved in `directory`."""
    stats = SourceStats()
    tokenizer, trained = train_tokenizer(iter_documents([corpus], skip_invalid=True, stats=stats), vocab_size,
                                         skipped=stats.skipped)
    tokenizer.save(directory)
    info(f"trained on {stats.summary()} in {trained['seconds']:.1f} s -> {directory}")
    return tokenizer


def _run_config(run_dir: Path) -> dict | None:
    """The config a run in `run_dir` was started with (None: no run there yet)."""
    file = run_dir / CONFIG_FILE
    return read_json(file)["config"] if file.is_file() else None


def _reached_step_cap(run_dir: Path, steps: int) -> bool:
    """Whether a run ended at its step cap (its epochs) rather than when its time budget was spent."""
    return steps >= read_json(run_dir / CONFIG_FILE)["max_steps"]


def _budget_note(run_dir: Path, minutes: float) -> str:
    started = _run_config(run_dir)
    if started is None:
        return f" for {minutes:g} min"
    started_minutes = started.get("time_budget", 0) / 60
    if not math.isclose(started_minutes, minutes, rel_tol=1e-6):  # a resumed run keeps its budget and schedule
        return (f" (continuing the {started_minutes:g}-min run in {run_dir}; "
                f"for a {minutes:g}-min one instead, delete that folder)")
    return f" (continuing the {started_minutes:g}-min run in {run_dir})"


def _redo_hint(run_dir: Path) -> str:
    # A stage made by another recipe (an older gpt1's): the quickstart cannot resume it, and its
    # user has no config to change.
    return f"it was made with another recipe or base (an earlier gpt1?): delete {run_dir} to redo this stage"


def _budget(run_dir: Path, seconds: float) -> float:
    """This stage's time budget: a run that already exists keeps the budget it started with
    (so that a rerun with another --minutes resumes it instead of refusing its config)."""
    started = _run_config(run_dir)
    return float(started.get("time_budget", seconds)) if started else seconds


def _pretrain(cfg: QuickstartConfig, data_dir: Path, run_dir: Path, train_tokens: int):
    return pretrain(pretrain_config(cfg, train_tokens, _budget(run_dir, 60 * cfg.minutes)), data_dir, run_dir,
                    redo_hint=_redo_hint(run_dir))


def pretrain_config(cfg: QuickstartConfig, train_tokens: int, budget: float) -> TrainConfig:
    """The quickstart's pretraining run: the recipe, ended by `budget` seconds."""
    train_cfg = load_config(TrainConfig, PRETRAIN_RECIPE, [], device=cfg.device, seed=cfg.seed)
    # The budget ends the run; the epochs cap keeps a fast GPU from looping over the small corpus.
    block_size = train_cfg.block_size or ModelConfig.preset(train_cfg.model).block_size
    tokens_per_step = train_cfg.batch_size * block_size * train_cfg.grad_accum
    cap = max(MIN_STEPS, MAX_PRETRAIN_EPOCHS * train_tokens // tokens_per_step)
    return dataclasses.replace(train_cfg, max_steps=cap, time_budget=budget)


def _finetune(cfg: QuickstartConfig, base: Path, run_dir: Path):
    ft_cfg = load_config(FinetuneConfig, FINETUNE_RECIPE, [], data=cfg.chat_data, device=cfg.device, seed=cfg.seed)
    # The recipe's epochs cap the budget: more passes over a few thousand dialogs only memorise them.
    ft_cfg = dataclasses.replace(ft_cfg, time_budget=_budget(run_dir, 60 * cfg.minutes * FINETUNE_SHARE))
    return finetune(ft_cfg, base, run_dir, redo_hint=_redo_hint(run_dir))


def _sample_plan(cfg: QuickstartConfig) -> list[tuple[str, str, dict]]:
    """(use, prompt, knobs) of each sample: the chat model's three uses, then the base model's code."""
    plan = [(use, prompt, {"max_new_tokens": 96, "seed": cfg.seed}) for use, prompt in SAMPLE_PROMPTS.items()]
    # A model this small falls into loops (`_name_name_name...`) at the code preset's penalty of
    # 1.05; 1.2 over the last 64 tokens keeps its continuation code-shaped. Two blank lines end it.
    knobs = {"max_new_tokens": 64, "seed": cfg.seed, "stop": ("\n\n\n",), "repeat_penalty": 1.2, "repeat_last_n": 64}
    return [*plan, ("base", BASE_PROMPT, knobs)]


def _params(use: str, knobs: dict):
    """A sample's sampling settings: its use's preset (the base model's continuation: code's) with its knobs."""
    return preset("code" if use == "base" else use).override(**knobs)


def _samples(cfg: QuickstartConfig, base_llm, chat_llm) -> list[Sample]:
    samples = []
    for use, prompt, knobs in _sample_plan(cfg):
        if use == "base":
            text = prompt + base_llm.generate(prompt, preset="code", **knobs)
        else:
            text = chat_llm.chat([{"role": "user", "content": prompt}], preset=use, **knobs).strip()
        samples.append(Sample(use, prompt, text, _settings(_params(use, knobs), knobs)))
    return samples


def _settings(params, knobs: dict) -> dict:
    fields = ("temperature", "top_k", "top_p", "repeat_penalty")
    return {**{name: getattr(params, name) for name in fields}, "max_new_tokens": knobs["max_new_tokens"]}
