"""Small hand-written documents in the hub schema of each task (not benchmark data), written as
one folder per task with the split files lm-eval and `gpt1 eval` both read."""

from __future__ import annotations

import json
from pathlib import Path

NOUNS = ["the cat", "a farmer", "my sister", "the old dog", "a young chef", "the teacher", "our neighbour", "a pilot"]
ACTIONS = ["opens the door", "cooks some rice", "paints the fence", "reads a letter", "fixes the bike",
           "waters the plants", "sings a song", "climbs the hill"]
ENDINGS = ["and then sits down.", "but drops [title] everything.", "while the sun sets slowly.",
           "because it is late.", "and smiles at everyone.", "then walks away quietly.", "as the rain starts.",
           "and calls a friend."]


def hellaswag(i: int) -> dict:
    return {"ind": i, "activity_label": ["Cooking", "Home and Garden", "Sports"][i % 3],
            "ctx_a": f"{NOUNS[i % 8].capitalize()} {ACTIONS[i % 8]}.", "ctx_b": f"{NOUNS[(i + 3) % 8]}",
            "ctx": "", "endings": [f"{ACTIONS[(i + j) % 8]} {ENDINGS[(i + 2 * j) % 8]}" for j in range(4)],
            "source_id": f"hand~{i}", "split": "val", "split_type": "indomain", "label": str(i % 4)}


def arc(i: int) -> dict:
    labels = ["A", "B", "C", "D"] if i % 3 else ["1", "2", "3", "4"]
    return {"id": f"hand-{i}", "question": f"What does {NOUNS[i % 8]} do after {ACTIONS[(i + 1) % 8]}?",
            "choices": {"text": [f"{ACTIONS[(i + j) % 8]}" for j in range(4)], "label": labels},
            "answerKey": labels[(i * 3) % 4]}


def piqa(i: int) -> dict:
    return {"goal": f"How can {NOUNS[i % 8]} {ACTIONS[i % 8].split()[0][:-1]} faster?",
            "sol1": f"Use a tool {ENDINGS[i % 8]}", "sol2": f"Ask {NOUNS[(i + 5) % 8]} for help.", "label": i % 2}


def winogrande(i: int) -> dict:
    return {"sentence": f"{NOUNS[i % 8].capitalize()} thanked {NOUNS[(i + 1) % 8]} because _ {ACTIONS[(i + 2) % 8]}.",
            "option1": NOUNS[i % 8], "option2": NOUNS[(i + 1) % 8], "answer": "1" if i % 2 else "2"}


def lambada(i: int) -> dict:
    return {"text": f"{NOUNS[i % 8].capitalize()} {ACTIONS[i % 8]} {ENDINGS[(i + 1) % 8][:-1]}, and later "
                    f"{NOUNS[(i + 2) % 8]} {ACTIONS[(i + 3) % 8]} with {NOUNS[i % 8].split()[-1]}"}


def mmlu(i: int) -> dict:
    return {"question": f"  Which of these does {NOUNS[i % 8]} do on day {i}?  ",
            "subject": ["high_school_biology", "world_religions"][i % 2],
            "choices": [ACTIONS[(i + j) % 8] for j in range(4)], "answer": (i * 7) % 4}


SCHEMAS = {  # task -> (document maker, {split: number of documents})
    "hellaswag": (hellaswag, {"validation": 12, "train": 6}),
    "arc_easy": (arc, {"test": 12, "train": 6}),
    "arc_challenge": (arc, {"test": 8, "train": 5}),
    "piqa": (piqa, {"validation": 12, "train": 6}),
    "winogrande": (winogrande, {"validation": 12, "train": 6}),
    "lambada_openai": (lambada, {"test": 12}),
    "mmlu": (mmlu, {"test": 12, "dev": 10}),
}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_task_folders(root: Path, tasks=SCHEMAS) -> dict[str, Path]:
    """root/TASK/SPLIT.jsonl for each task; different documents per split (offset indices)."""
    folders = {}
    for task in tasks:
        make, splits = SCHEMAS[task]
        for offset, (split, n) in enumerate(splits.items()):
            write_jsonl(root / task / f"{split}.jsonl", [make(i + 100 * offset) for i in range(n)])
        folders[task] = root / task
    return folders
