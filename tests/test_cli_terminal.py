"""Sampled control characters shown as escapes on a terminal (a real pseudo-terminal), by
`gpt1 generate` and `gpt1 chat`, while piped output stays exact."""

from __future__ import annotations

import os
import re
import sys
import tty

import pytest

from gpt1.cli import main
from gpt1.cli.chat_cmd import ChatSession
from gpt1.core.progress import printable
from gpt1.core.sampling_params import SamplingParams

PROMPT = "import"
KNOBS = dict(temperature=1.0, max_new_tokens=12)
MSG = [{"role": "user", "content": "Name a colour."}]
CONTROLS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")  # what a terminal must not be sent raw


# ---- control characters on a terminal -----------------------------------------------------------------
def seed_with_controls(sample) -> int:
    """A seed whose sample holds a control character other than a line end or a tab."""
    return next(seed for seed in range(200) if CONTROLS.search(sample(seed)))


def terminal():
    """(what the process writes to, what reads it): a pseudo-terminal in raw mode, so that what
    is read is what was written (no \\n -> \\r\\n)."""
    try:
        master, slave = os.openpty()
    except OSError as e:  # a sandbox without pseudo-terminals
        pytest.skip(f"no pseudo-terminal: {e}")
    tty.setraw(slave)
    return open(slave, "w", encoding="utf-8", newline=""), master


def read_all(master: int) -> str:
    data = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO once the writer is closed
            break
        if not chunk:
            break
        data += chunk
    os.close(master)
    return data.decode("utf-8")


def test_generate_shows_control_characters_as_escapes_on_a_terminal_only(capsys, monkeypatch, tiny_model_dir, llm):
    seed = seed_with_controls(lambda s: llm.generate(PROMPT, seed=s, **KNOBS))
    text = llm.generate(PROMPT, seed=seed, **KNOBS)
    args = ["generate", "--model", str(tiny_model_dir), "--device", "cpu", "--prompt", PROMPT, "--seed", str(seed),
            "--temperature", "1", "--max-new-tokens", "12"]
    assert main(args) == 0
    assert capsys.readouterr().out == text  # piped: exactly as generated, control characters and all

    out, master = terminal()
    monkeypatch.setattr(sys, "stdout", out)
    assert main(args) == 0
    out.close()
    shown = read_all(master)
    assert shown == printable(text) + ("" if text.endswith("\n") else "\n")
    assert not CONTROLS.search(shown) and "\\x" in shown


def test_chat_shows_control_characters_as_escapes_on_a_terminal_and_keeps_the_reply(llm):
    def reply(seed: int, out) -> tuple[str, ChatSession]:
        session = ChatSession(llm, SamplingParams(seed=seed, **KNOBS), max_new_tokens_chosen=True)
        return session.reply(MSG[0]["content"], out=out), session

    with open(os.devnull, "w", encoding="utf-8") as devnull:
        seed = seed_with_controls(lambda s: reply(s, devnull)[0])
    out, master = terminal()
    text, session = reply(seed, out)
    out.close()
    shown = read_all(master)
    assert shown == printable(text) + "\n" and not CONTROLS.search(shown)
    assert session.history[-1]["content"] == text and CONTROLS.search(text)  # the history keeps it as generated

    read, write = os.pipe()  # into a pipe, as generated
    with open(write, "w", encoding="utf-8", newline="") as piped:
        assert reply(seed, piped)[0] == text
    assert read_all(read) == text + "\n"
