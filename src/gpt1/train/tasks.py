"""Benchmark tasks defined as lm-evaluation-harness 0.4.x defines them: documents -> scoring requests.

Each `Task` mirrors one task YAML (and its `utils.py`) of lm-eval's `lm_eval/tasks/`: the hub
dataset and splits, the document processing, `doc_to_text` / `doc_to_choice` / `doc_to_target`,
the few-shot sampler and the metrics. A request is a `(context, continuation)` pair whose
continuation log-likelihood is scored (`gpt1.train.harness`). The prompt is built exactly as
`ConfigurableTask.fewshot_context` builds it without a chat template:

    description + (text(shot) + " " + answer(shot) + "\\n\\n") * k + text(doc)

(a shot whose target is the empty string, a Winogrande sentence ending in its blank, adds its text
alone: lm-eval's `build_qa_turn` takes "" for no answer), and a multiple-choice continuation is
`" " + choice` (the target delimiter). Winogrande puts the choices in the context ("partial
evaluation": each option fills the blank, the rest of the sentence is the continuation); LAMBADA
scores `" " + last word` after the other words.

Few-shot examples are drawn as lm-eval draws them: one `random.Random(1234)` per task, one
`sample(pool, k)` per document in order (`k + 1`, then the document itself removed, where lm-eval's
few-shot split equals its test split), or the first k of the document's subject for MMLU.

Documents come from the hub (`datasets`, imported lazily; `NAME@REVISION` pins a revision) or from
local files in the hub's schema: a `.jsonl` file (one document per line) or a folder holding one
`SPLIT.jsonl` per split. Every document is checked against its task's schema (each field's type,
the number of endings, no empty choice, an answer index in range, a LAMBADA text with a last
word) and a bad one is reported with its file, line and field: lm-eval would score it silently
or crash.
"""

from __future__ import annotations

import itertools
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from gpt1.core.errors import Gpt1Error
from gpt1.data.readers import BadRecord, HfSpec, load_hf_dataset, parse_hf, read_jsonl

# A few hundred examples of a few tasks (minutes on a CPU), and everything (`gpt1 eval --suite`).
SUITES: dict[str, dict[str, int | None]] = {
    "quick": {"hellaswag": 100, "arc_easy": 100, "piqa": 100, "lambada_openai": 100},
    "full": {"hellaswag": None, "arc_easy": None, "arc_challenge": None, "piqa": None, "winogrande": None,
             "lambada_openai": None, "mmlu": None},
}

FEWSHOT_SEED = 1234  # lm-eval's default fewshot_random_seed
TARGET_DELIMITER = " "
FEWSHOT_DELIMITER = "\n\n"

Check = tuple[str, Callable[[Any], bool]]  # what a field must be (for the error message), and its test


@dataclass(frozen=True)
class Document:
    """One processed document and where it came from (for error messages and --samples)."""

    fields: dict[str, Any]
    origin: str  # "file.jsonl, line 3" or "hub NAME:SPLIT, row 3"


@dataclass(frozen=True)
class Request:
    context: str
    continuation: str


@dataclass(frozen=True)
class Example:
    """The scoring requests of one document. Multiple choice: one request per choice, `gold` the
    index of the right one and `choices` the strings acc_norm divides by; loglikelihood: one
    request, `gold` None."""

    doc: Document
    requests: list[Request]
    gold: int | None
    choices: list[str]


@dataclass(frozen=True)
class Task:
    name: str
    hub: str  # dataset path on the hub
    hub_config: str | None
    eval_split: str
    fewshot_split: str | None  # None: the task has no split to draw examples from but the evaluated one
    fields: dict[str, Check]  # the schema: the fields every document must have, and what each must be
    kind: str  # "multiple_choice" or "loglikelihood"
    metrics: tuple[str, ...]
    text: Callable[[dict], Any]  # doc_to_text (an int for winogrande: the gold index)
    target: Callable[[dict], Any]  # doc_to_target: gold index, or the continuation string
    choices: Callable[[dict], list[str]] | None = None  # doc_to_choice
    process: Callable[[dict], dict] | None = None  # process_docs, per document
    description: Callable[[dict], str] | None = None
    first_n: bool = False  # lm-eval's first_n sampler (MMLU), else random
    # lm-eval removes the evaluated document from its few-shot draw when its few-shot split is
    # its test split (None == None counts: hellaswag, piqa, winogrande draw k + 1).
    exclude_eval_doc: bool = False
    multiple_input: bool = False  # winogrande: one context per choice, one shared continuation

    def build_examples(self, docs: list[Document], fewshot_docs: list[Document], num_fewshot: int,
                       same_pool: bool = False) -> list[Example]:
        """The requests of every document, with `num_fewshot` examples drawn as lm-eval draws them.
        `same_pool`: the few-shot documents are the evaluated file's own (no few-shot split given)."""
        rnd = random.Random(FEWSHOT_SEED)
        # A local file standing in for a missing few-shot split never lends the document evaluated.
        exclude = self.exclude_eval_doc or (same_pool and self.fewshot_split is not None)
        # first_n's pools, each subject's documents in file order, grouped once: filtering the whole
        # pool for each document made a 5-shot draw from MMLU's 14,042 questions take 11.5 s.
        by_subject: dict[tuple[str, str], list[Document]] = {}
        if self.first_n:
            for d in fewshot_docs:
                by_subject.setdefault(_subject_key(d), []).append(d)
        examples = []
        for doc in docs:
            shots = self._draw(doc, by_subject.get(_subject_key(doc), []) if self.first_n else fewshot_docs,
                               num_fewshot, rnd, exclude)
            prefix = (self.description(doc.fields) if self.description else "") + "".join(
                self._shot_text(shot.fields) for shot in shots)
            try:
                examples.append(self._example(doc, prefix))
            except (KeyError, ValueError, IndexError, TypeError, AttributeError) as e:
                raise Gpt1Error(f"{doc.origin}: not a valid {self.name} document ({type(e).__name__}: {e})") from None
        return examples

    def _draw(self, doc: Document, pool: list[Document], k: int, rnd: random.Random, exclude: bool) -> list[Document]:
        """`k` shots for `doc` from `pool` (for first_n, the documents of its subject)."""
        if k == 0:
            return []
        if self.first_n:
            candidates = list(itertools.islice((d for d in pool if not (exclude and d.fields == doc.fields)), k))
            if len(candidates) < k:
                raise Gpt1Error(f"{self.name}: {k}-shot needs {k} few-shot examples of subject "
                                f"{doc.fields.get('subject')!r}, the few-shot split has {len(candidates)}")
            return candidates
        if len(pool) < k + exclude:
            raise Gpt1Error(f"{self.name}: {k}-shot needs {k + exclude} few-shot documents, there are {len(pool)}")
        if not exclude:
            return rnd.sample(pool, k)
        drawn = [d for d in rnd.sample(pool, k + 1) if d.fields != doc.fields][:k]
        if len(drawn) < k:  # the pool held copies of the document: lm-eval redraws without them
            others = [d for d in pool if d.fields != doc.fields]
            if len(others) < k:
                raise Gpt1Error(f"{doc.origin}: {k}-shot needs {k} few-shot documents other than this one, and only "
                                f"{len(others)} of the {len(pool)} differ from it")
            drawn = rnd.sample(others, k)
        return drawn

    def _shot_text(self, doc: dict) -> str:
        question = self.choices(doc)[self.text(doc)] if self.multiple_input else self.text(doc)
        target = self.target(doc)  # an index into the choices, or the answer itself
        if target == "":  # lm-eval's build_qa_turn takes an empty target for no answer: no delimiters either
            return question
        answer = self.choices(doc)[target] if isinstance(target, int) else target
        return question + TARGET_DELIMITER + answer + FEWSHOT_DELIMITER

    def _example(self, doc: Document, prefix: str) -> Example:
        fields = doc.fields
        if self.kind == "loglikelihood":
            return Example(doc, [Request(prefix + self.text(fields), self.target(fields))], None, [])
        choices = self.choices(fields)
        if self.multiple_input:
            continuation = TARGET_DELIMITER + self.target(fields)
            requests = [Request(prefix + choice, continuation) for choice in choices]
            gold = self.text(fields)
        else:
            context = prefix + self.text(fields)
            requests = [Request(context, TARGET_DELIMITER + choice) for choice in choices]
            gold = self.target(fields)
        if not 0 <= gold < len(choices):
            raise ValueError(f"answer index {gold} is not one of the {len(choices)} choices")
        return Example(doc, requests, gold, choices)


# ---- the schemas: what each field of a document must be -----------------------------------------
TEXT: Check = ("a string", lambda v: isinstance(v, str))
# A choice is never "": acc_norm divides by its length, a Winogrande option fills the blank, and
# lm-eval crashes on one in its first document (`choice[0].isspace()` in ConfigurableTask.__init__).
# MMLU's choices are "A".."D".
CHOICE: Check = ("a non-empty string", lambda v: isinstance(v, str) and v != "")


def _strings(n: int, nonempty: bool = False) -> Check:
    return (f"a list of {n} {'non-empty ' if nonempty else ''}strings",
            lambda v: isinstance(v, list) and len(v) == n
            and all(isinstance(s, str) and not (nonempty and s == "") for s in v))


def _index(*values: int) -> Check:
    """An answer index as the hub stores it, a number or its digits (lm-eval takes int() of it)."""
    allowed = {str(v) for v in values}
    return (f"one of {', '.join(sorted(allowed))} (a number or its digits)",
            lambda v: isinstance(v, (int, str)) and not isinstance(v, bool) and str(v) in allowed)


def _arc_choices(v: Any) -> bool:
    strings = isinstance(v, dict) and all(isinstance(v.get(k), list) and all(isinstance(s, str) for s in v[k])
                                          for k in ("text", "label"))
    return strings and 0 < len(v["text"]) == len(v["label"]) and "" not in v["text"]


ARC_CHOICES: Check = ('an object {"text": [...], "label": [...]} of strings, as many labels as texts, no text empty',
                      _arc_choices)
# LAMBADA scores the text's last space-separated word: without one there is nothing to predict.
LAST_WORD: Check = ("a string ending in a word", lambda v: isinstance(v, str) and v.split(" ")[-1].strip() != "")
BLANK: Check = ("a string with a '_' blank", lambda v: isinstance(v, str) and "_" in v)


# ---- the tasks (lm_eval/tasks/<name>/*.yaml and utils.py, lm-eval 0.4.x) ---------------------
def _hellaswag_preprocess(text: str) -> str:
    text = text.strip()
    # Brackets are artifacts of the WikiHow part of HellaSwag.
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def _hellaswag_process(doc: dict) -> dict:
    context = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
    return {**doc, "query": _hellaswag_preprocess(doc["activity_label"] + ": " + context),
            "choices": [_hellaswag_preprocess(ending) for ending in doc["endings"]], "gold": int(doc["label"])}


def _arc_gold(doc: dict) -> int:
    labels = doc["choices"]["label"]
    if doc["answerKey"] not in labels:
        raise ValueError(f"answerKey {doc['answerKey']!r} is not one of the choice labels {', '.join(labels)}")
    return labels.index(doc["answerKey"])


def _arc(name: str, config: str) -> Task:
    return Task(name, "allenai/ai2_arc", config, "test", "train",
                {"question": TEXT, "choices": ARC_CHOICES, "answerKey": TEXT},
                "multiple_choice", ("acc", "acc_norm"),
                text=lambda d: f"Question: {d['question']}\nAnswer:", target=_arc_gold,
                choices=lambda d: list(d["choices"]["text"]))


def _mmlu_description(doc: dict) -> str:
    subject = " ".join(doc["subject"].split("_"))
    return f"The following are multiple choice questions (with answers) about {subject}.\n\n"


def _mmlu_text(doc: dict) -> str:
    c = doc["choices"]
    return f"{doc['question'].strip()}\nA. {c[0]}\nB. {c[1]}\nC. {c[2]}\nD. {c[3]}\nAnswer:"


TASKS: dict[str, Task] = {task.name: task for task in [
    Task("hellaswag", "Rowan/hellaswag", None, "validation", "train",
         {"activity_label": TEXT, "ctx_a": TEXT, "ctx_b": TEXT, "endings": _strings(4, nonempty=True),
          "label": _index(0, 1, 2, 3)},
         "multiple_choice", ("acc", "acc_norm"),
         text=lambda d: d["query"], target=lambda d: d["gold"], choices=lambda d: d["choices"],
         process=_hellaswag_process, exclude_eval_doc=True),
    _arc("arc_easy", "ARC-Easy"),
    _arc("arc_challenge", "ARC-Challenge"),
    Task("piqa", "baber/piqa", None, "validation", "train",
         {"goal": TEXT, "sol1": CHOICE, "sol2": CHOICE, "label": _index(0, 1)}, "multiple_choice", ("acc", "acc_norm"),
         text=lambda d: f"Question: {d['goal']}\nAnswer:", target=lambda d: int(d["label"]),
         choices=lambda d: [d["sol1"], d["sol2"]], exclude_eval_doc=True),
    Task("winogrande", "allenai/winogrande", "winogrande_xl", "validation", "train",
         {"sentence": BLANK, "option1": CHOICE, "option2": CHOICE, "answer": _index(1, 2)}, "multiple_choice", ("acc",),
         text=lambda d: {"1": 0, "2": 1}[str(d["answer"])],
         target=lambda d: d["sentence"][d["sentence"].index("_") + 1:].strip(),
         choices=lambda d: [d["sentence"][:d["sentence"].index("_")] + d[o] for o in ("option1", "option2")],
         exclude_eval_doc=True, multiple_input=True),
    # Only a test split: lm-eval draws few-shot examples from it (the evaluated text may be one).
    Task("lambada_openai", "EleutherAI/lambada_openai", "default", "test", None, {"text": LAST_WORD},
         "loglikelihood", ("perplexity", "acc"),
         text=lambda d: " ".join(d["text"].split(" ")[:-1]), target=lambda d: " " + d["text"].split(" ")[-1]),
    Task("mmlu", "cais/mmlu", "all", "test", "dev",
         {"question": TEXT, "subject": TEXT, "choices": _strings(4), "answer": _index(0, 1, 2, 3)},
         "multiple_choice", ("acc",), text=_mmlu_text, target=lambda d: int(d["answer"]),
         choices=lambda d: ["A", "B", "C", "D"], description=_mmlu_description, first_n=True),
]}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise Gpt1Error(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")
    return TASKS[name]


# ---- documents: local files in the hub's schema, or the hub --------------------------------------
def load_documents(task: Task, source: str | None, split: str) -> list[Document]:
    """The documents of `split`: from `source` (a .jsonl file, a folder of SPLIT.jsonl files, or
    hf:NAME[@REVISION]; default: the task's hub dataset), processed as lm-eval processes them."""
    if source is None or source.startswith("hf:"):
        return _hub_documents(task, source[3:] if source else task.hub, split)
    path = Path(source)
    if path.is_dir():
        path = path / f"{split}.jsonl"
    if not path.is_file():
        raise Gpt1Error(f"{path}: no such file (a {task.name} data file: one JSON document per line, "
                        f"fields {', '.join(task.fields)})")
    return [_document(task, record, f"{path}, line {line}") for line, record in _jsonl_records(path)]


def split_exists(task: Task, source: str | None, split: str) -> bool:
    """Whether a local folder has `split` (the hub datasets of the tasks have every split they name)."""
    return source is None or source.startswith("hf:") or not Path(source).is_dir() or (Path(source) / f"{split}.jsonl").is_file()


def _jsonl_records(path: Path):
    """(line, record) of a JSONL task file, under the reader layer's error policy."""
    def a_document(value, where: str) -> dict:
        if not isinstance(value, dict):
            raise BadRecord(f"{where}: expected a JSON object, got {type(value).__name__}")
        return value

    yield from read_jsonl(path, a_document)


def _document(task: Task, record: dict, origin: str) -> Document:
    missing = [f for f in task.fields if f not in record]
    if missing:
        raise Gpt1Error(f"{origin}: missing field {missing[0]!r} (a {task.name} document has the fields "
                        f"{', '.join(task.fields)})")
    for name, (expected, ok) in task.fields.items():
        if not ok(record[name]):
            shown = json.dumps(record[name], ensure_ascii=False, default=str)
            raise Gpt1Error(f"{origin}: field {name!r} must be {expected}, got "
                            f"{shown if len(shown) <= 80 else shown[:77] + '...'}")
    try:
        return Document(task.process(record) if task.process else record, origin)
    except (KeyError, ValueError, TypeError, AttributeError) as e:
        raise Gpt1Error(f"{origin}: not a valid {task.name} document ({type(e).__name__}: {e})") from None


def _hub_documents(task: Task, name: str, split: str) -> list[Document]:
    spec = parse_hf(f"hf:{name}")
    spec = HfSpec(spec.name, spec.revision, split)
    rows = load_hf_dataset(spec, config=task.hub_config, instead=f"pass the task's documents as a local file: --data "
                           f"{task.name}=FILE.jsonl (docs/evaluation.md, Local task files)")
    return [_document(task, dict(row), f"hub {name}:{split}, row {i}") for i, row in enumerate(rows)]

def _subject_key(doc: Document) -> tuple[str, str]:
    """A document's "subject" as a dict key: equal JSON values, one key (a malformed subject may be
    a list, which no dict takes; the string "1" and the number 1 stay apart)."""
    subject = doc.fields.get("subject")
    return ("text", subject) if isinstance(subject, str) else ("json", json.dumps(subject, sort_keys=True))
