"""A run dir's record of its run, `train_config.json`, and the check that a run dir holds this run.

`check_run_dir` refuses a run dir that holds another run (another config, number of processes or
training data), a newer gpt1's run (config keys this one does not know) or files that are no run,
and returns the run's `RunRecord` to write once it trains: the run as started, the resumable
settings changed since (`RESUMABLE_CHANGES`, less those the run's other settings hold fixed: `_held`;
each with the step it holds from) and each start's and resume's provenance. Paths in the config
(`PATH_KEYS`) compare by what they name. The training loop (`gpt1.train.loop`) calls it on rank 0,
under the run's lock (`RUN_LOCK`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import shlex
from pathlib import Path

from gpt1.core.atomic import write_json
from gpt1.core.errors import Gpt1Error
from gpt1.core.paths import json_path
from gpt1.core.progress import info
from gpt1.core.reading import read_json
from gpt1.formats.modeldir import BASE_FILE, WEIGHTS_FILE, weights_fingerprint
from gpt1.train import checkpoint as ckpt
from gpt1.train.config import TrainConfig

CONFIG_FILE = "train_config.json"
RUN_LOCK = Path(ckpt.CHECKPOINTS_DIR, ".lock")  # the lock `gpt1.core.locks.exclusive` holds while a run trains
# Keys that may change between a run and its resumption: they do not change the weights it trains
# (eval_every and eval_batches where the run's other settings allow it: `_held`).
RESUMABLE_CHANGES = {"device", "tensorboard", "eval_batches", "save_every", "max_bad_steps",
                     "gradient_checkpointing", "keep_checkpoints", "keep_best", "eval_every"}


def check_run_dir(run_dir: Path, cfg: TrainConfig, max_steps: int, data: dict | None = None,
                  world_size: int = 1, redo_hint: str | None = None) -> RunRecord:
    """Refuse a run dir that holds another run (or anything else); the run's train_config.json
    to write once the run trains (`RunRecord.start`: a rerun of a finished run writes nothing).
    `redo_hint` replaces the advice to rerun as before (a caller like the quickstart has its own)."""
    config = cfg.to_dict()
    for key in PATH_KEYS & config.keys():  # recorded as the paths they name: a resume from another folder matches
        if isinstance(config[key], str):
            config[key] = json_path(_resolved(config[key]))
        elif isinstance(config[key], list):  # a fine-tune's several --data sources
            config[key] = [json_path(_resolved(v)) if isinstance(v, str) else v for v in config[key]]
    wanted = {"config": config, "max_steps": max_steps, "world_size": world_size,
              **({"data": data} if data is not None else {})}
    file = run_dir / CONFIG_FILE
    held = _held(config)
    resumable = RESUMABLE_CHANGES - held.keys()
    if file.is_file() and ckpt.latest_checkpoint(run_dir) is None and not _has_outputs(run_dir):
        # Stopped before its first checkpoint (out of memory at the first step, say): nothing to resume
        # and nothing lost, so a rerun with another config (the smaller batch_size advised) starts over.
        # (A finished run whose checkpoints/ was deleted to free the disk still has its model: kept.)
        info(f"{run_dir}: its run stopped before its first checkpoint; starting over")
    elif file.is_file():
        old = read_json(file)
        old_cfg = old.get("config") if isinstance(old, dict) else None
        if not isinstance(old_cfg, dict):
            raise Gpt1Error(f"{file}: expected an object with the run's \"config\"; the run dir is damaged "
                            "(restore the file, or choose another --out)")
        if not isinstance(old.get("changes", []), list):
            raise Gpt1Error(f"{file}: expected \"changes\" to be a list of the settings changed by resumes; the run dir "
                            "is damaged (restore the file, or choose another --out)")
        if unknown := _unknown_keys(old, config):
            raise Gpt1Error(f"{run_dir} was started by a newer gpt1 (keys this version does not know: "
                            f"{', '.join(unknown)}{_latest_gpt1(old)}): resume it with that gpt1, or choose another --out")
        # The global batch and each rank's share of the data follow the number of processes: on
        # another number a resume would replay or skip batches. (A run dir from before it was
        # recorded resumes unchecked: its number is unknown.)
        old_world = old.get("world_size")
        if isinstance(old_world, int) and old_world != world_size:
            how = f"with {old_world} processes (torchrun --nproc_per_node {old_world})" if old_world > 1 else \
                "in one process (without torchrun)"
            raise Gpt1Error(f"{run_dir} was trained by {old_world} process{'es' if old_world > 1 else ''}, this run has "
                            f"{world_size}: resume it {how}, or choose another --out")
        # A key that an older gpt1 did not write had its default value then; one changed on a
        # resume has its latest value.
        old_cfg = _settings(old, _field_defaults(cfg))
        held |= _held(old_cfg)
        resumable -= held.keys()
        keys = sorted(k for k in set(old_cfg) | set(wanted["config"])
                      if k not in resumable and not _same_setting(run_dir, k, old_cfg.get(k), wanted["config"].get(k)))
        if old.get("max_steps") != max_steps and "max_steps" not in keys:
            keys.append(f"max_steps (resolved: {old.get('max_steps')} -> {max_steps})")
        if keys:
            diffs = ", ".join(f"{k}: {toml_value(old_cfg.get(k))} -> {toml_value(wanted['config'].get(k))}{held.get(k, '')}"
                              if k in old_cfg or k in wanted["config"] else k for k in keys)
            raise Gpt1Error(f"{run_dir} holds a run with a different config ({diffs}); "
                            + (redo_hint or _ways_on(run_dir, resumable, wanted["config"])))
        # A run dir from before the data was recorded resumes unchecked (its data is unknown), and
        # one from before a part of it was (pretraining's content check) unchecked on that part.
        old_data = old.get("data")
        if data is not None and isinstance(old_data, dict):
            diffs = ", ".join(f"{k}: {old_data[k]!r} -> {data.get(k)!r}" for k in sorted(old_data)
                              if old_data[k] != data.get(k))
            if diffs:
                raise Gpt1Error(f"{run_dir} holds a run on other training data ({diffs}); "
                                + (redo_hint or "rerun with the data it was trained on to resume it (the same files "
                                                "split otherwise before 2026-12-07, when gpt1 began to keep copies "
                                                "and a conversation's paths on one side: such a run resumes with the "
                                                "gpt1 that began it), or choose another --out"))
        # The run as started stays recorded; what it did not record (an older gpt1) is, from now on.
        record = {**old, "world_size": world_size}
        if data is not None:
            record["data"] = {**data, **old_data} if isinstance(old_data, dict) else data
        return RunRecord(file, record, wanted["config"], resumable, _field_defaults(cfg))
    else:
        refuse_other_files(run_dir)
    return RunRecord(file, wanted, wanted["config"], resumable, _field_defaults(cfg))


def _unknown_keys(record: dict, config: dict) -> list[str]:
    """The settings of a run's `record` (as started, or changed by a resume) that are no key of
    this gpt1's `config`: a newer gpt1's (no key was ever removed). Compared as "(unset)", they
    were refused with the advice to rerun with the same config, which no key=value here can set.
    A run of the other kind (a fine-tune's LoRA keys, resumed as pretraining) is another config."""
    if ("lora_r" in record["config"]) != ("lora_r" in config):
        return []
    changed = [k for change in record.get("changes") or [] if isinstance(change, dict) for k in change]
    return sorted({*record["config"], *changed} - {*config, "from_step"})


def _latest_gpt1(record: dict) -> str:
    """"; its latest start: gpt1 0.3.0, git abc1234": the gpt1 that last started or resumed the run,
    where its provenance records it; "" otherwise."""
    provenance = record.get("provenance")
    latest = provenance[-1] if isinstance(provenance, list) and provenance and isinstance(provenance[-1], dict) else {}
    named = [f"{key} {latest[key]}" for key in ("gpt1", "git") if isinstance(latest.get(key), str)]
    return f"; its latest start: {', '.join(named)}" if named else ""


def _held(config: dict) -> dict[str, str]:
    """The resumable keys that `config`'s other settings hold fixed, each with the words a refused
    change adds: which settings, and why."""
    held = {}
    if config.get("time_budget"):  # validations change no weight, but their time counts in the plan
        held["eval_every"] = (f", which time_budget={toml_value(config['time_budget'])} holds fixed: the validations' "
                              "time counts in the plan")
    if on := [f"{k}={toml_value(config[k])}" for k in ("keep_best", "early_stop") if config.get(k)]:
        # The lowest loss so far (the checkpoint's) was measured on the batches before: a loss on
        # others, compared with it, stopped a run early and kept another model than the lowest in best/.
        held["eval_batches"] = (f", which {' and '.join(on)} hold{'s' if len(on) == 1 else ''} fixed: each "
                                "validation loss is compared with the lowest so far, measured on the batches before")
    return held


def toml_value(value) -> str:
    """A setting as a recipe writes it (true, not True; 'runs/a'), in a refusal that names one."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # inf, -inf, nan: TOML's spelling too
    if isinstance(value, str):  # a literal string where TOML allows one (no ' and no control character)
        return f"'{value}'" if value.isprintable() and "'" not in value else json.dumps(value, ensure_ascii=False)
    if isinstance(value, (list, tuple)):
        return f"[{', '.join(toml_value(v) for v in value)}]"
    return "(unset)" if value is None else repr(value)


def _ways_on(run_dir: Path, resumable: set[str], config: dict) -> str:
    """The advice of a refused config: the keys a resume may change, and how to train on from the
    run's weights with this config (a longer run, another lr): a new run that starts from them."""
    path = shlex.quote(str(run_dir))
    # A fine-tune's config (FinetuneConfig, above this module) has LoRA keys; it starts from --base.
    start = f"--base {path}" if "lora_r" in config else f"init_from={path}"
    return (f"rerun with the same config to resume it (a resume may change only {', '.join(sorted(resumable))}), "
            f"or choose another --out; to train on from its weights, and on the same data from where its batches "
            f"ended (with a fresh optimizer and LR warmup): --out NEW {start}")


def _settings(record: dict, defaults: dict) -> dict:
    """A run's settings as of its latest resume: its config as started (a key an older gpt1 did
    not write at its default `defaults`), with the resumable ones changed since (`changes`)."""
    settings = {**defaults, **record["config"]}
    for change in record.get("changes") or []:
        if isinstance(change, dict):
            settings.update({k: v for k, v in change.items() if k != "from_step"})
    return settings


class RunRecord:
    """A run's train_config.json: the run as started (`config`, the resolved `max_steps`,
    `world_size`, the training data's identity `data`, and `continues`: the run whose batches it
    goes on from, where it does), the resumable settings changed since, each
    with the step it holds from (`changes`: [{"from_step": 40, "eval_batches": 1}]), and one
    `provenance` entry per start and resume (versions, machine, device, precision, command line).
    Written once the run trains (a rerun of a finished run changes nothing), on rank 0."""

    def __init__(self, file: Path, record: dict, config: dict, resumable: set[str], defaults: dict):
        self.file, self.record, self.config, self.resumable, self.defaults = file, record, config, resumable, defaults

    def start(self, step: int, provenance: dict, continues: dict | None = None) -> None:
        """Record this invocation, which trains from `step`, and the resumable settings it changes;
        `continues`: a fresh start's run whose batches it goes on from (a resume keeps the record's)."""
        if continues:
            self.record["continues"] = continues
        changes = self._changes_before(step)
        self.record.pop("changes", None)
        was = _settings({**self.record, "changes": changes}, self.defaults)
        changed = {k: self.config[k] for k in sorted(self.resumable & self.config.keys()) if was.get(k) != self.config[k]}
        changes += [{"from_step": step, **changed}] if changed else []
        earlier = self.record.pop("provenance", None)
        self.record |= {**({"changes": changes} if changes else {}),
                        "provenance": [*(earlier if isinstance(earlier, list) else []), {"from_step": step, **provenance}]}
        self.write()

    def settings_before(self, step: int) -> dict:
        """The run's settings as it reached `step` (where this invocation resumes), before this
        invocation's changes: as started, with the changes of the resumes that saved a step since."""
        return _settings({**self.record, "changes": self._changes_before(step)}, self.defaults)

    def _changes_before(self, step: int) -> list[dict]:
        changes = [c for c in self.record.get("changes") or [] if isinstance(c, dict)]
        if changes and changes[-1].get("from_step") == step:
            changes.pop()  # an invocation's that saved no step after it: they held for no step kept
        return changes

    def setting_at(self, step: int, key: str):
        """The value `key` had while the run went from step - 1 to `step` (a validation after `step`
        ran under it): as started, with each change of a resume from an earlier step."""
        value = {**self.defaults, **self.record["config"]}.get(key)
        for change in self.record.get("changes") or []:
            if isinstance(change, dict) and change.get("from_step", 0) < step and key in change:
                value = change[key]
        return value

    def note(self, **values) -> None:
        """Add what this invocation found out as it ran (compile fell back to eager) to its provenance."""
        self.record["provenance"][-1].update(values)
        self.write()

    def write(self) -> None:
        write_json(self.file, self.record)


def _has_outputs(run_dir: Path) -> bool:
    """Whether a run dir holds a model a checkpoint wrote (its weights, adapter or base record)."""
    return any((run_dir / name).exists() for name in (WEIGHTS_FILE, BASE_FILE, "adapter"))


def refuse_other_files(run_dir: Path) -> None:
    """Refuse a folder that holds no run but other files. A new run's lock (`checkpoints/.lock`,
    taken before its train_config.json is written) is no other file: a run killed in between
    left a folder that is still new."""
    if (run_dir / CONFIG_FILE).is_file() or not run_dir.is_dir():
        return
    lock = run_dir / RUN_LOCK
    others = [p for p in run_dir.iterdir() if p != lock.parent or not p.is_dir()]
    if lock.parent.is_dir():
        others += [p for p in lock.parent.iterdir() if p != lock]
    if others:
        raise Gpt1Error(f"{run_dir} is not empty and holds no gpt1 run ({CONFIG_FILE} is missing); "
                        "choose a new or empty --out")


# Keys that may name a local file or folder: the same one spelled differently (runs/a, runs/a/,
# an absolute path) is the same setting. `data` is fine-tuning's chat source.
PATH_KEYS = {"init_from", "data"}


def _same_setting(run_dir: Path, key: str, old, new) -> bool:
    if old == new:
        return True
    if key in PATH_KEYS and isinstance(old, list) and isinstance(new, list):  # several --data sources
        return len(old) == len(new) and all(_same_setting(run_dir, key, o, n) for o, n in zip(old, new))
    if key not in PATH_KEYS or not isinstance(old, str) or not isinstance(new, str):
        return False
    if _resolved(old) == _resolved(new):
        return True
    # A path recorded resolved that is gone now (the chat data of a finished fine-tune, deleted):
    # named as typed, relative to here, it is still the same path.
    prefix = "hf:" if new.startswith("hf:") else ""
    if not Path(new.removeprefix(prefix)).exists() and old == prefix + str(Path(new.removeprefix(prefix)).resolve()):
        return True
    # Chat data read by gpt1 (FOLDER) or by `datasets` (hf:FOLDER) is one source; its fingerprint, checked
    # apart, tells whether the two read alike (a run begun before gpt1 read folders resumes with hf:).
    if key == "data" and _resolved(old).removeprefix("hf:") == _resolved(new).removeprefix("hf:"):
        return True
    # A fine-tune records its base's weights and adapter (BASE_FILE): the same elsewhere are the same base.
    base = run_dir / BASE_FILE
    if key == "init_from" and base.is_file() and (Path(new) / WEIGHTS_FILE).is_file():
        return read_json(base).get("sha256") == weights_fingerprint(new)
    return False


def _resolved(value: str) -> str:
    """A path-valued setting (a path, or hf:PATH) as the absolute path it names, if it exists."""
    prefix = "hf:" if value.startswith("hf:") else ""
    path = Path(value.removeprefix(prefix))
    return prefix + str(path.resolve()) if value != "scratch" and path.exists() else value


def _field_defaults(cfg: TrainConfig) -> dict:
    """The config class's default values, as `to_dict` writes them."""
    defaults = {f.name: f.default for f in dataclasses.fields(cfg) if f.default is not dataclasses.MISSING}
    defaults |= {f.name: f.default_factory() for f in dataclasses.fields(cfg)
                 if f.default_factory is not dataclasses.MISSING}
    return {k: list(v) if isinstance(v, tuple) else v for k, v in defaults.items()}
