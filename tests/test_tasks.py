"""`gpt1 eval --task`: the same per-example log-likelihoods and accuracies as lm-evaluation-harness.

The reference is the real `lm-eval` package (HF backend) run offline on the `gpt1 export` of a
tiny random-weight model, with task configs that include lm-eval's own task YAMLs and only point
the dataset at small hand-written local files (tests/task_files.py) in each task's hub schema.
"""

from __future__ import annotations

import json
import os
import re
from collections import defaultdict
from pathlib import Path

import pytest
import torch

from gpt1.cli import main
from gpt1.core.config import ModelConfig
from gpt1.core.errors import Gpt1Error
from gpt1.core.model import GPT
from gpt1.formats.hf import export_model
from gpt1.formats.modeldir import save_model
from tests.task_files import SCHEMAS, hellaswag, write_jsonl, write_task_folders
from tests.test_battery import assert_one_clear_line, run_main

ALL_TASKS = list(SCHEMAS)


@pytest.fixture(scope="module")
def model_dir(tokenizer, tmp_path_factory) -> Path:
    """Random weights with a context long enough for 2-shot prompts of the test documents."""
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("eval-model")
    config = ModelConfig.preset("tiny", vocab_size=tokenizer.vocab_size, block_size=320, n_layer=2, n_head=4, n_embd=64)
    save_model(out, GPT(config), tokenizer)
    return out


@pytest.fixture(scope="module")
def task_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tasks")
    write_task_folders(root)
    return root


def _lm_eval_configs(task_root: Path, out: Path) -> list[str]:
    """One lm-eval task per gpt1 task (MMLU: one per subject, as lm-eval splits it), each the
    installed task YAML with the dataset pointed at the local split files."""
    import lm_eval

    builtin = Path(lm_eval.__file__).parent / "tasks"
    yamls = {"hellaswag": "hellaswag/hellaswag.yaml", "arc_easy": "arc/arc_easy.yaml",
             "arc_challenge": "arc/arc_challenge.yaml", "piqa": "piqa/piqa.yaml", "winogrande": "winogrande/default.yaml",
             "lambada_openai": "lambada/lambada_openai.yaml"}
    names = []
    for task, yaml_file in yamls.items():
        files = {p.stem: str(p) for p in (task_root / task).glob("*.jsonl")}
        _write_config(out, f"local_{task}", builtin / yaml_file, files)
        names.append(f"local_{task}")
    by_subject = defaultdict(lambda: defaultdict(list))
    for split in ("test", "dev"):
        for line in (task_root / "mmlu" / f"{split}.jsonl").read_text().splitlines():
            doc = json.loads(line)
            by_subject[doc["subject"]][split].append(doc)
    for subject, splits in by_subject.items():
        files = {split: str(write_jsonl(out / "mmlu" / subject / f"{split}.jsonl", docs)) for split, docs in splits.items()}
        _write_config(out, f"local_mmlu_{subject}", builtin / f"mmlu/default/mmlu_{subject}.yaml", files)
        names.append(f"local_mmlu_{subject}")
    return names


def _write_config(out: Path, name: str, include: Path, files: dict[str, str]) -> None:
    lines = [f"task: {name}", f"include: {include}", "tag: []", "dataset_path: json", "dataset_name: null",
             "dataset_kwargs:", "  data_files:"] + [f"    {split}: {path}" for split, path in files.items()]
    (out / f"{name}.yaml").write_text("\n".join(lines) + "\n")


def _run_lm_eval(export_dir: Path, task_root: Path, config_dir: Path, num_fewshot: int) -> dict:
    """lm-eval's samples as {(context, continuation): loglikelihood} and its per-task metrics."""
    os.environ.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    import lm_eval
    from lm_eval.tasks import TaskManager

    names = _lm_eval_configs(task_root, config_dir)
    out = lm_eval.simple_evaluate(model="hf", model_args={"pretrained": str(export_dir), "dtype": "float32"},
                                  tasks=names, num_fewshot=num_fewshot, batch_size=8, device="cpu", log_samples=True,
                                  task_manager=TaskManager(include_path=str(config_dir)), bootstrap_iters=10)
    lls, per_doc, n_requests = {}, defaultdict(list), 0
    for name, samples in out["samples"].items():
        task = "mmlu" if name.startswith("local_mmlu") else name.removeprefix("local_")
        for sample in samples:
            for (context, continuation), resp in zip(sample["arguments"], sample["resps"]):
                lls[(context, continuation)] = resp[0][0]
                n_requests += 1
            per_doc[task].append({m: sample[m] for m in ("acc", "acc_norm") if m in sample})
    return {"loglikelihoods": lls, "requests": n_requests, "per_doc": per_doc, "results": out["results"]}


@pytest.mark.slow
@pytest.mark.parametrize("num_fewshot", [0, 2])
def test_same_loglikelihoods_and_accuracy_as_lm_eval(model_dir, task_root, tmp_path, capsys, num_fewshot):
    export_dir = export_model(model_dir, tmp_path / "hf")
    (tmp_path / "lm-eval-tasks").mkdir()
    reference = _run_lm_eval(export_dir, task_root, tmp_path / "lm-eval-tasks", num_fewshot)

    data = [f"{task}={task_root / task}" for task in ALL_TASKS]
    assert main(["eval", "--model", str(model_dir), "--task", ",".join(ALL_TASKS), "--data", *data,
                 "--fewshot", str(num_fewshot), "--batch-size", "7", "--samples", str(tmp_path / "samples.jsonl"),
                 "--json", str(tmp_path / "results.json")]) == 0
    ours = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    results = json.loads((tmp_path / "results.json").read_text())

    compared = 0
    for sample in ours:
        for request in sample["requests"]:
            expected = reference["loglikelihoods"][(request["context"], request["continuation"])]
            assert request["loglikelihood"] == pytest.approx(expected, abs=1e-4), request
            compared += 1
    assert compared == reference["requests"]
    for task in ALL_TASKS:
        assert results[task]["skipped"] == 0 and results[task]["n"] == len(reference["per_doc"][task])
        for metric, value in results[task]["metrics"].items():
            if metric == "perplexity":
                expected = reference["results"]["local_lambada_openai"]["perplexity,none"]
                assert value["value"] == pytest.approx(expected, rel=1e-5)
                continue
            docs = reference["per_doc"][task]
            assert value["value"] == pytest.approx(sum(d[metric] for d in docs) / len(docs)), (task, metric)
            if task != "mmlu":  # lm-eval pools MMLU's per-subject stderrs; ours is over all examples
                expected = reference["results"][f"local_{task}"][f"{metric}_stderr,none"]
                assert value["stderr"] == pytest.approx(expected, rel=1e-6), (task, metric)


def test_unknown_task_lists_the_known_ones(tiny_model_dir, capsys):
    assert main(["eval", "--model", str(tiny_model_dir), "--task", "hellaswag,squad"]) == 2
    err = capsys.readouterr().err
    assert "unknown task 'squad'" in err and all(task in err for task in ALL_TASKS)
    assert main(["eval", "--model", str(tiny_model_dir), "--task", "piqa", "--data", "hellaswag=x.jsonl"]) == 2
    assert "not among the tasks evaluated (piqa)" in capsys.readouterr().err


def test_a_file_in_the_wrong_schema_names_file_line_and_field(tiny_model_dir, tmp_path, capsys):
    broken = hellaswag(1)
    del broken["endings"]
    bad = write_jsonl(tmp_path / "hellaswag.jsonl", [hellaswag(0), broken])
    assert main(["eval", "--model", str(tiny_model_dir), "--task", "hellaswag", "--data", str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"{bad}, line 2: missing field 'endings'" in err and "Traceback" not in err
    bad.write_text(json.dumps(hellaswag(0)) + "\n{not json\n")
    assert main(["eval", "--model", str(tiny_model_dir), "--task", "hellaswag", "--data", str(bad)]) == 2
    assert f"{bad}, line 2: invalid JSON" in capsys.readouterr().err
    wino = write_jsonl(tmp_path / "winogrande.jsonl", [{"sentence": "no blank here", "option1": "a", "option2": "b",
                                                        "answer": "1"}])
    assert main(["eval", "--model", str(tiny_model_dir), "--task", "winogrande", "--data", str(wino)]) == 2
    assert f"{wino}, line 1: field 'sentence' must be a string with a '_' blank" in capsys.readouterr().err


def test_an_example_longer_than_the_context_is_truncated_and_counted(tiny_model_dir, tmp_path, capsys):
    short = {"text": "the cat sat on the mat"}
    long = {"text": " ".join(["the old dog walks along the river"] * 30)}  # far past 64 tokens: cut from the left
    data = write_jsonl(tmp_path / "lambada.jsonl", [short, long, short])
    assert main(["eval", "--model", str(tiny_model_dir), "--task", "lambada_openai", "--data", str(data),
                 "--json", str(tmp_path / "r.json")]) == 0
    captured = capsys.readouterr()
    result = json.loads((tmp_path / "r.json").read_text())["lambada_openai"]
    assert (result["n"], result["truncated"], result["skipped"]) == (3, 1, 0)
    assert "1 example(s) were longer than the model's context (64 tokens): their prompts were cut from the left" \
        in captured.err
    assert "| lambada_openai | 0 | acc |" in captured.out


def test_quick_suite_on_local_files_writes_the_report(tiny_model_dir, tmp_path, capsys):
    import shutil

    from tests.task_files import lambada

    model = shutil.copytree(tiny_model_dir, tmp_path / "model")
    for task in ("hellaswag", "arc_easy", "piqa"):
        make, _ = SCHEMAS[task]
        # A short context: the test model's 64 tokens must hold a prompt and its longest choice.
        write_jsonl(tmp_path / "data" / f"{task}.jsonl",
                    [{**make(i), "ctx_a": "A", "ctx_b": "b", "question": "Q?", "goal": "G?"} for i in range(3)])
    write_jsonl(tmp_path / "data" / "lambada_openai.jsonl", [lambada(i) for i in range(3)])
    assert main(["eval", "--model", str(model), "--suite", "quick", "--data", str(tmp_path / "data"),
                 "--ppl-data", str(tmp_path / "data" / "lambada_openai.jsonl")]) == 0
    out = capsys.readouterr().out
    assert out.count("| 3 | 0 |") == 8  # hellaswag, arc_easy, piqa: acc + acc_norm; lambada: perplexity + acc
    report = (model / "report.md").read_text()
    assert "## Perplexity" in report and "bits per byte" in report and "| hellaswag | 0 | acc_norm |" in report
    assert "Radford et al. 2019" in report and "karpathy/llm.c" in report


def test_a_chat_model_is_scored_with_its_adapter_merged(tiny_model_dir, tokenizer, tmp_path):
    """A fine-tuned dir (base + LoRA adapter) scores as its merged copy does, and unlike its base."""
    from gpt1.core.lora import LoRAConfig, inject_lora
    from gpt1.formats.modeldir import load_model
    from gpt1.train.finetune import merge_model_dir, save_finetuned

    model = load_model(tiny_model_dir)
    inject_lora(model, LoRAConfig(r=4, alpha=8))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    save_finetuned(tmp_path / "chat", model, tokenizer, {"path": str(tiny_model_dir)})
    merge_model_dir(tmp_path / "chat", tmp_path / "merged")
    data = write_jsonl(tmp_path / "piqa.jsonl", [{"goal": "Dry a cup?", "sol1": "Use a towel.", "sol2": "Use water.",
                                                  "label": 0}, {"goal": "Cut bread?", "sol1": "A spoon.",
                                                                "sol2": "A knife.", "label": 1}])
    lls = {}
    for name, model_dir in (("chat", tmp_path / "chat"), ("merged", tmp_path / "merged"), ("base", tiny_model_dir)):
        samples = tmp_path / f"{name}.jsonl"
        assert main(["eval", "--model", str(model_dir), "--task", "piqa", "--data", str(data), "--samples", str(samples)]) == 0
        lls[name] = [r["loglikelihood"] for line in samples.read_text().splitlines() for r in json.loads(line)["requests"]]
    assert lls["chat"] == pytest.approx(lls["merged"], abs=1e-4)
    assert lls["chat"] != pytest.approx(lls["base"], abs=1e-2)



# ---- bad task files: one clear line naming the file, line and field ---------------------------------
def _hs(i: int, **changes) -> dict:
    """A HellaSwag document short enough for the 64-token test model."""
    return {**hellaswag(i), "ctx_a": "A", "ctx_b": "b", **changes}


SCHEMA_VIOLATIONS = [  # task, document, the error after "FILE, line N: "
    ("hellaswag", _hs(0, endings=["a", "b", "c"]), 'field \'endings\' must be a list of 4 non-empty strings, got \\["a", "b", "c"\\]'),
    ("hellaswag", _hs(0, label=True), "field 'label' must be one of 0, 1, 2, 3"),
    ("arc_easy", {"question": "Q?", "choices": {"text": ["a", "b"], "label": ["A"]}, "answerKey": "A"},
     "field 'choices' must be .*as many labels as texts"),
    ("arc_easy", {"question": "Q?", "choices": {"text": ["a", "b"], "label": ["A", "B"]}, "answerKey": "C"},
     "not a valid arc_easy document \\(ValueError: answerKey 'C' is not one of the choice labels A, B\\)"),
    ("mmlu", {"question": "Q?", "subject": "math", "choices": ["a", "b", "c", "d"], "answer": True},
     "field 'answer' must be one of 0, 1, 2, 3 \\(a number or its digits\\), got true"),
    ("piqa", {"goal": "G?", "sol1": "a", "sol2": "b", "label": 2}, "field 'label' must be one of 0, 1 "),
    ("winogrande", {"sentence": "a _ b", "option1": "a", "option2": "b", "answer": 3},
     "field 'answer' must be one of 1, 2 "),
    ("lambada_openai", {"text": "   "}, "field 'text' must be a string ending in a word"),
    ("lambada_openai", {"text": ""}, "field 'text' must be a string ending in a word"),
    ("lambada_openai", {"text": "a trailing space "}, "field 'text' must be a string ending in a word"),
]


@pytest.mark.parametrize("task,doc,message", SCHEMA_VIOLATIONS)
def test_a_document_outside_its_task_schema_names_file_line_and_field(tiny_model_dir, tmp_path, capsys, task, doc,
                                                                      message):
    """lm-eval would score these (3 endings, a bool answer, mismatched ARC labels) or crash (a
    LAMBADA text of spaces); the first line is a valid document, the second the bad one."""
    good = SCHEMAS[task][0](1) if task != "hellaswag" else _hs(1)
    data = write_jsonl(tmp_path / f"{task}.jsonl", [good, doc])
    assert_one_clear_line(*run_main(capsys, "eval", "--model", tiny_model_dir, "--task", task, "--data", data),
                          re.escape(f"{data}, line 2: ") + message)


def test_fewshot_draws_around_copies_of_the_document_as_lm_eval_does(tiny_model_dir, tmp_path, capsys):
    """With the evaluated file as its own few-shot pool, lm-eval's sampler draws k + 1, drops
    the document and redraws without its copies when more than one was drawn; when only copies
    are left there is nothing to draw (lm-eval fails in `random.sample`): a clear error."""
    from lm_eval.api.samplers import ContextSampler

    from gpt1.train.harness import build_examples
    from gpt1.train.tasks import get_task

    rows = [_hs(0), _hs(0), _hs(0), _hs(1), _hs(2), _hs(0), _hs(3)]
    data = write_jsonl(tmp_path / "hellaswag.jsonl", rows)
    task = get_task("hellaswag")
    examples = build_examples(task, str(data), num_fewshot=2)
    docs = [ex.doc.fields for ex in examples]
    sampler = ContextSampler(docs, rnd=1234)
    for doc, ex in zip(docs, examples):
        shots = sampler.sample(2, eval_doc=doc)
        expected = "".join(f"{s['query']} {s['choices'][s['gold']]}\n\n" for s in shots) + doc["query"]
        assert ex.requests[0].context == expected

    copies = write_jsonl(tmp_path / "copies.jsonl", [_hs(0)] * 4)
    assert_one_clear_line(*run_main(capsys, "eval", "--model", tiny_model_dir, "--task", "hellaswag", "--data", copies,
                                    "--fewshot", "2"),
                          re.escape(f"{copies}, line 1: 2-shot needs 2 few-shot documents other than this one, "
                                    "and only 0 of the 4 differ from it"))


def test_a_folder_missing_a_task_file_names_it_instead_of_asking_the_hub(tiny_model_dir, tmp_path, capsys):
    write_jsonl(tmp_path / "data" / "hellaswag.jsonl", [_hs(i) for i in range(3)])
    folder = tmp_path / "data"
    assert_one_clear_line(*run_main(capsys, "eval", "--model", tiny_model_dir, "--suite", "quick", "--data", folder),
                          re.escape(f"--data {folder}: no {folder / 'arc_easy.jsonl'}, {folder / 'piqa.jsonl'}, "
                                    f"{folder / 'lambada_openai.jsonl'} (or TASK/ folder of split files); pass "
                                    "arc_easy=PATH, or arc_easy=hf:allenai/ai2_arc to read it from the hub"))


def test_skip_invalid_is_refused_for_task_files(tiny_model_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "piqa.jsonl", [SCHEMAS["piqa"][0](0)])
    assert_one_clear_line(*run_main(capsys, "eval", "--model", tiny_model_dir, "--task", "piqa", "--data", data,
                                    "--skip-invalid"), "--skip-invalid applies to perplexity sources")


def test_a_context_of_only_whitespace_is_scored_after_the_prefix_token(tokenizer):
    """Its whitespace moves to the continuation (as HFLM moves it), leaving the empty context's
    prefix token, not an empty context the scorer cannot run."""
    from gpt1.train.harness import encode_pair

    assert encode_pair(tokenizer, "  ", "cat") == ([tokenizer.eos_id], tokenizer.encode("  cat"))
    assert encode_pair(tokenizer, "", " cat") == ([tokenizer.eos_id], tokenizer.encode(" cat"))


def test_a_shot_with_an_empty_target_is_its_text_alone_as_in_lm_eval(tmp_path):
    """A Winogrande sentence ending in its blank has the target "": lm-eval's build_qa_turn takes
    that for no answer and adds neither " " nor "\\n\\n" (gpt1 added both). A HellaSwag shot whose
    gold ending its cleaning empties is an index, an answer: both delimiters stay."""
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.tasks.winogrande import preprocess_winogrande as wg

    from gpt1.train.harness import build_examples
    from gpt1.train.tasks import get_task

    def lm_eval_shot(q, a, c=None) -> str:  # lm-eval 0.4's plain-text few-shot turn
        return "".join(m.to_text() for m in ConfigurableTask.build_qa_turn(None, q=q, c=c, a=a))

    blank_last = {"sentence": "The ending blank is _", "option1": "x", "option2": "y", "answer": "2"}
    other = {"sentence": "Ana thanked Bo because _ helped.", "option1": "Ana", "option2": "Bo", "answer": "1"}
    data = write_jsonl(tmp_path / "winogrande.jsonl", [blank_last, other])
    examples = build_examples(get_task("winogrande"), str(data), num_fewshot=1)  # each draws the other document
    shot = lm_eval_shot(wg.doc_to_choice(blank_last)[wg.doc_to_text(blank_last)], wg.doc_to_target(blank_last))
    assert shot == "The ending blank is y"
    assert [r.context for r in examples[1].requests] == [shot + choice for choice in wg.doc_to_choice(other)]

    # A HellaSwag gold ending that its cleaning empties ("[header]") is an answer: both delimiters stay.
    import datasets
    from lm_eval.tasks.hellaswag import utils as hs
    empty_gold = {"activity_label": "Cooking", "ctx_a": "A cook", "ctx_b": "stirs",
                  "endings": ["[header]", "x.", "y.", "z."], "label": "0"}
    doc = hs.process_docs(datasets.Dataset.from_list([empty_gold]))[0]
    shot = lm_eval_shot(doc["query"], int(doc["label"]), doc["choices"])
    assert shot == "Cooking: A cook Stirs \n\n"
    data = write_jsonl(tmp_path / "hs.jsonl", [empty_gold, {**empty_gold, "ctx_b": "waits"}])
    examples = build_examples(get_task("hellaswag"), str(data), num_fewshot=1)
    assert examples[1].requests[0].context == shot + "Cooking: A cook Waits"


def test_fewshot_from_a_folder_without_its_fewshot_split_is_an_error(tiny_model_dir, tmp_path, capsys):
    """The folder's validation file stood in for the missing train split, silently: prompts that
    lm-eval (which fails there) would not build. A single file lends its own documents (documented)."""
    folder = tmp_path / "piqa"
    write_jsonl(folder / "validation.jsonl", [{"goal": f"G{i}?", "sol1": "a", "sol2": "b", "label": 0} for i in range(3)])
    assert_one_clear_line(*run_main(capsys, "eval", "--model", tiny_model_dir, "--task", "piqa", "--data",
                                    f"piqa={folder}", "--fewshot", "1"),
                          re.escape(f"{folder / 'train.jsonl'}: no such file; --fewshot 1 draws piqa's examples from "
                                    "its train split, as lm-eval does (or pass piqa=FILE.jsonl"))
    assert main(["eval", "--model", str(tiny_model_dir), "--task", "piqa", "--data", f"piqa={folder}"]) == 0
    assert main(["eval", "--model", str(tiny_model_dir), "--task", "piqa", "--data",
                 f"piqa={folder / 'validation.jsonl'}", "--fewshot", "1"]) == 0


def test_a_hub_dataset_without_the_fewshot_split_names_it(monkeypatch):
    """The same error for a dataset read from the hub (it was a TypeError on Path(None))."""
    import gpt1.train.harness as harness
    from gpt1.train.tasks import get_task

    monkeypatch.setattr(harness, "split_exists", lambda task, source, split: False)
    monkeypatch.setattr(harness, "load_documents", lambda task, source, split: [SCHEMAS["piqa"][0](0)] * 3)
    for source, shown in ((None, get_task("piqa").hub), ("hf:someone/piqa", "hf:someone/piqa")):
        with pytest.raises(Gpt1Error, match=re.escape(f"{shown}: no train split; --fewshot 1 draws piqa's examples")):
            harness.build_examples(get_task("piqa"), source, 1)


def test_a_task_given_twice_is_an_error(tiny_model_dir, tmp_path, capsys):
    """`--data piqa=A piqa=B` silently used B (and `piqa=/nope.jsonl piqa=A` succeeded). A task
    named outright still takes precedence over a folder's file for it, in either order."""
    from gpt1.train.harness import task_sources

    a = write_jsonl(tmp_path / "a.jsonl", [SCHEMAS["piqa"][0](0)])
    assert_one_clear_line(*run_main(capsys, "eval", "--model", tiny_model_dir, "--task", "piqa", "--data",
                                    "piqa=/nope.jsonl", f"piqa={a}"),
                          re.escape(f"--data piqa={a}: task piqa is already given by --data piqa=/nope.jsonl; "
                                    "pass one source per task"))
    with pytest.raises(Gpt1Error, match=re.escape(f"--data {a}: task piqa is already given by --data {a}")):
        task_sources(["piqa"], [str(a), str(a)])
    folder = tmp_path / "tasks"
    write_jsonl(folder / "piqa.jsonl", [SCHEMAS["piqa"][0](1)])
    write_jsonl(folder / "piqa" / "validation.jsonl", [SCHEMAS["piqa"][0](1)])
    with pytest.raises(Gpt1Error, match=re.escape(f"{folder / 'piqa'}: task piqa is already given by "
                                                  f"{folder / 'piqa.jsonl'}")):
        task_sources(["piqa"], [str(folder)])
    (folder / "piqa" / "validation.jsonl").unlink()
    (folder / "piqa").rmdir()
    for data in ([str(folder), f"piqa={a}"], [f"piqa={a}", str(folder)]):
        assert task_sources(["piqa"], data) == {"piqa": str(a)}


def test_a_task_with_nothing_scored_is_an_error_after_the_others_results(tiny_model_dir, tmp_path, capsys):
    """Every example too long for the context gave null metrics and exit 0; now the scored tasks
    are reported (table, JSON) and the empty one is the error line."""
    long = {"text": "the cat sat on " + "\u2603" * 40}  # an answer (last word) far past 64 tokens
    lambada = write_jsonl(tmp_path / "lambada.jsonl", [long, long])
    piqa = write_jsonl(tmp_path / "piqa.jsonl", [SCHEMAS["piqa"][0](i) for i in range(2)])
    results = tmp_path / "r.json"
    rc = main(["eval", "--model", str(tiny_model_dir), "--task", "piqa,lambada_openai", "--data", f"piqa={piqa}",
               f"lambada_openai={lambada}", "--json", str(results)])
    captured = capsys.readouterr()
    assert "| piqa | 0 | acc |" in captured.out and "lambada_openai" not in captured.out
    assert_one_clear_line(rc, captured.err, re.escape("lambada_openai: nothing scored: all 2 examples have an answer "
                                             "(continuation) longer than the model's context of 64 tokens (a model "
                                             "with a longer context would score them)"))
    assert list(json.loads(results.read_text())) == ["piqa"]
    results.unlink()
    rc, err = run_main(capsys, "eval", "--model", tiny_model_dir, "--task", "lambada_openai", "--data", lambada,
                       "--json", results)
    assert_one_clear_line(rc, err, "lambada_openai: nothing scored: all 2 examples have an answer")
    assert not results.exists()
