"""`gpt1 chat` and `gpt1 generate` as a user meets them: piped and typed input, what lands in a
redirected stdout, one syntax for stop strings, and the default max_new_tokens."""

import io
import os
import select
import subprocess
import sys
import time

import pytest

from gpt1.cli import build_parser, main
from gpt1.cli.chat_cmd import knob_text
from gpt1.cli.generate_cmd import sampling_params_from_args


def run_main(capsys, *argv):
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:  # argparse refuses a flag's value by exiting
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def chat_args(model, *flags):
    return [sys.executable, "-m", "gpt1", "chat", "--model", str(model), "--device", "cpu", *flags]


def in_terminal(argv, typed, stdout=None, timeout=60):
    """Run argv with stdin (and stdout, unless given) on a pseudo-terminal; type each of `typed`
    once the "> " prompt shows. Returns what the terminal showed."""
    try:
        master, slave = os.openpty()
    except OSError as e:  # a sandbox without pseudo-terminals
        pytest.skip(f"no pseudo-terminal: {e}")
    proc = subprocess.Popen(argv, stdin=slave, stdout=stdout or slave, stderr=slave, start_new_session=True)
    os.close(slave)
    shown, deadline = b"", time.monotonic() + timeout

    def read(until=None):
        nonlocal shown
        while time.monotonic() < deadline and (until is None or not shown.endswith(until)):
            if select.select([master], [], [], 0.2)[0]:
                try:
                    chunk = os.read(master, 4096)
                except OSError:  # EIO: the process is gone
                    return
                if not chunk:
                    return
                shown += chunk
            elif proc.poll() is not None and until is not None:
                return

    try:
        for line in typed:
            read(until=b"> ")
            os.write(master, line + b"\r")
        read()
        assert proc.wait(timeout=10) == 0, shown
    finally:
        proc.kill()
        os.close(master)
    return shown


# ---- invalid UTF-8: the line is reported, the session goes on ----------------------------------

def test_chat_reports_a_piped_line_that_is_not_utf8_and_answers_the_others(tiny_model_dir, llm):
    """`printf 'Hello\\n\\xff\\nHi\\n' | gpt1 chat` ended with exit 2 on the whole of stdin; "Hello"
    was never answered."""
    result = subprocess.run(chat_args(tiny_model_dir, "--temperature", "0", "--max-new-tokens", "4"),
                            input=b"Hello\n\xff\nHi\n", capture_output=True, timeout=120)
    stderr = result.stderr.decode()
    assert result.returncode == 2 and "Traceback" not in stderr, stderr  # a line failed: the status says so
    assert "error: line 2 is not valid UTF-8 (byte b'\\xff' at byte 0); it was not sent" in stderr
    first = llm.chat([{"role": "user", "content": "Hello"}], temperature=0, max_new_tokens=4)
    second = llm.chat([{"role": "user", "content": "Hello"}, {"role": "assistant", "content": first},
                       {"role": "user", "content": "Hi"}], temperature=0, max_new_tokens=4)
    assert result.stdout.decode() == first + "\n" + second + "\n"


@pytest.mark.slow
def test_chat_on_a_terminal_reports_a_message_that_is_not_utf8_and_goes_on(tiny_model_dir):
    shown = in_terminal(chat_args(tiny_model_dir, "--temperature", "0", "--max-new-tokens", "3"),
                        [b"abc\xff def", b"hello", b"/quit"])
    assert b"error: that message is not valid UTF-8 (byte b'\\xff' at byte 3); it was not sent" in shown, shown
    assert b"Traceback" not in shown and shown.count(b"> ") >= 3


# ---- piped input: the exit status says whether every line was done (pass 17) -------------------

def test_piped_chat_exits_2_when_a_line_failed_and_a_typed_one_exits_0(tiny_model_dir, capsys, monkeypatch):
    """`printf '/set temperature abc\\n/preset nope\\nhi\\n' | gpt1 chat` exited 0: a script could
    not tell that its settings were refused."""
    argv = ["chat", "--model", tiny_model_dir, "--device", "cpu", "--max-new-tokens", "3", "--seed", "1"]
    for script in ("/set temperature abc\n/preset nope\nhi\n", "/set temperature abc\n/preset nope\nhi\n/quit\nnot read\n"):
        monkeypatch.setattr(sys, "stdin", io.StringIO(script))
        code, out, err = run_main(capsys, *argv)
        assert code == 2 and out.strip(), err  # "hi" was answered
        assert err.rstrip().endswith("gpt1 chat: error: 2 input line(s) failed (line 1, 2; the errors are above)")
    monkeypatch.setattr(sys, "stdin", io.StringIO("hi\n/set temperature 0\n"))
    assert run_main(capsys, *argv)[0] == 0


@pytest.mark.slow
def test_typed_chat_exits_0_after_a_failed_line(tiny_model_dir):
    shown = in_terminal(chat_args(tiny_model_dir, "--max-new-tokens", "3"), [b"/set temperature abc", b"/quit"])
    assert b"error: temperature must be" in shown  # in_terminal checks the exit status: 0


# ---- `gpt1 chat > file`: the prompt is no part of the file -------------------------------------

@pytest.mark.slow
def test_chat_with_stdout_redirected_shows_the_prompt_on_stderr(tiny_model_dir, llm, tmp_path):
    with open(tmp_path / "replies.txt", "wb") as replies:
        shown = in_terminal(chat_args(tiny_model_dir, "--temperature", "0", "--max-new-tokens", "4"),
                            [b"Hello", b"/quit"], stdout=replies)
    assert shown.count(b"> ") == 2, shown  # the user sees the prompt ...
    expected = llm.chat([{"role": "user", "content": "Hello"}], temperature=0, max_new_tokens=4)
    assert (tmp_path / "replies.txt").read_text() == expected + "\n"  # ... and the file holds the reply only


# ---- a piped prompt is the prompt typed after --prompt ----------------------------------------

def test_generate_drops_one_line_end_of_a_piped_prompt(capsys, monkeypatch, tiny_model_dir):
    args = ["generate", "--model", tiny_model_dir, "--device", "cpu", "--temperature", "0", "--max-new-tokens", "6"]

    def generate(stdin=None, *flags):
        if stdin is not None:
            monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
        code, out, err = run_main(capsys, *args, *flags)
        assert code == 0, err
        return out, err.split("[")[-1].split(" prompt tokens")[0]

    typed = generate(None, "--prompt", "import json")
    assert generate("import json\n") == generate("import json\r\n") == typed
    assert generate("import json\n\n") == generate(None, "--prompt", "import json\n") != typed


# ---- --stop and /set stop: one syntax, shown as typed --------------------------------------------

def test_stop_flag_reads_the_escapes_that_set_stop_reads(capsys, tiny_model_dir, llm):
    """`--stop '\\n'` was a backslash and an n, `/set stop \\n` a line end."""
    def stops(*values):
        args = build_parser().parse_args(["generate", "--model", "m", *[f"--stop={v}" for v in values]])
        return sampling_params_from_args(args).stop

    assert stops("\\n", "\n", "a\\\\b", '\\"\\t', "\\x41\\u00e9\\U0001F642", "C:\\\\x") == \
        ("\n", "\n", "a\\b", '"\t', "Aé🙂", "C:\\x")
    for bad, reason in (("a\\", "it ends in a lone backslash"), ("\\q", "unknown escape \\q"),
                        ("\\x4", "\\x needs 2 hex digits"), ("\\ud800", "\\ud800 is not a character")):
        code, _, err = run_main(capsys, "generate", "--model", tiny_model_dir, "--prompt", "x", "--stop", bad)
        assert code == 2 and err.count("\n") == 1, err
        assert err.startswith(f"gpt1 generate: error: argument --stop: {bad}: {reason} (escapes: \\n, "), err
    # End to end: a stop string typed as an escape stops the text.
    text = llm.generate("import", temperature=0, max_new_tokens=12)
    stop = text.strip()[1]
    code, out, _ = run_main(capsys, "generate", "--model", tiny_model_dir, "--device", "cpu", "--prompt", "import",
                            "--temperature", "0", "--max-new-tokens", "12", "--stop", f"\\u{ord(stop):04x}")
    assert code == 0 and out == text[:text.index(stop)]


def test_set_shows_stop_strings_as_set_stop_reads_them_back(capsys, monkeypatch, tiny_model_dir):
    """/set showed `stop "\\n"` (JSON), and `/set stop "\\n"` typed back set quote, newline, quote."""
    for value in ["\n", "  a\\b\t ", '"x"', "é\x00\u2028🙂", " "]:
        monkeypatch.setattr(sys, "stdin", io.StringIO("/set\n"))
        # As from $'...': real control characters, a backslash typed as two.
        flag = value.replace("\\", "\\\\")
        code, _, err = run_main(capsys, "chat", "--model", tiny_model_dir, "--device", "cpu", "--stop", flag)
        shown = next(line for line in err.splitlines() if line.startswith("(temperature"))
        typed = knob_text((value,))
        assert f", stop {typed}, seed" in shown and "\n" not in typed and typed.strip() == typed
        monkeypatch.setattr(sys, "stdin", io.StringIO(f"/set stop {typed}\n"))
        code, _, err = run_main(capsys, "chat", "--model", tiny_model_dir, "--device", "cpu")
        assert code == 0 and shown in err.splitlines(), (value, typed, err)  # the same knobs again
    assert knob_text(("\n", "###")) == "\\n, stop ###"


# ---- the default max_new_tokens is a bound, not a wish -----------------------------------------

def test_default_max_new_tokens_fits_the_context_silently(capsys, monkeypatch, tiny_model_dir):
    """The default 256 in a 64-token context warned at every turn and every /set, and made
    --no-truncate refuse every prompt."""
    model = ["--model", tiny_model_dir, "--device", "cpu", "--temperature", "0"]
    for flags in ([], ["--no-truncate"]):
        code, _, err = run_main(capsys, "generate", *model, "--prompt", "import json", *flags)
        assert code == 0 and "does not fit" not in err and "error" not in err, err
        monkeypatch.setattr(sys, "stdin", io.StringIO("hi\n/set seed none\nhello\n"))
        code, out, err = run_main(capsys, "chat", *model, *flags)
        assert code == 0 and "does not fit" not in err and "error" not in err and out.count("\n") == 2, err
    # One that the user chose and that does not fit: said once, with how to change it.
    monkeypatch.setattr(sys, "stdin", io.StringIO("hi\n/set seed 1\nhello\n/set max_new_tokens 200\nhey\nyo\n"))
    code, out, err = run_main(capsys, "chat", *model, "--max-new-tokens", "100")
    warnings = [line for line in err.splitlines() if "does not fit" in line]
    assert code == 0 and len(warnings) == 2, err  # once for 100, once for 200
    assert warnings[0].startswith("max_new_tokens 100 does not fit: the context is 64 tokens")
    assert warnings[0].endswith("(/set max_new_tokens N to change it)") and "max_new_tokens 200" in warnings[1]
    code, _, err = run_main(capsys, "generate", *model, "--prompt", "import json", "--max-new-tokens", "100")
    assert code == 0 and err.count("does not fit") == 1 and "(lower --max-new-tokens)" in err
    # A prompt that leaves no room at all is still refused with --no-truncate.
    code, _, err = run_main(capsys, "generate", *model, "--prompt", "word " * 80, "--no-truncate")
    assert code == 2 and "leaves no room for a new token in the context of 64 tokens" in err


# ---- generate's text into a file is the text ------------------------------------------------

def test_generate_adds_a_line_end_on_a_terminal_only(capsys, monkeypatch, tiny_model_dir, llm):
    args = ["generate", "--model", tiny_model_dir, "--device", "cpu", "--prompt", "import", "--temperature", "0",
            "--max-new-tokens", "8"]
    text = llm.generate("import", temperature=0, max_new_tokens=8)
    assert not text.endswith("\n")
    assert run_main(capsys, *args)[1] == text  # as llm.generate and the server give it
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    assert run_main(capsys, *args)[1] == text + "\n"


# ---- /set lists and takes only what a terminal chat uses ------------------------------------

def test_the_chats_set_lists_and_takes_only_the_knobs_a_terminal_chat_uses(capsys, monkeypatch, tiny_model_dir):
    """`/set` listed `logprobs random, prompt_logprobs random`, and `/set logprobs 3` failed on
    "got 3.0": the terminal chat prints text only."""
    import io
    import sys

    from tests.test_battery import run_main

    monkeypatch.setattr(sys, "stdin", io.StringIO("/set\n/set logprobs 3\n/quit\n"))
    code, err = run_main(capsys, "chat", "--model", str(tiny_model_dir), "--device", "cpu")
    [listing] = [line for line in err.splitlines() if line.startswith("(temperature")]
    assert "logprobs" not in listing and listing.endswith("truncate_prompt on)")
    assert "logprobs: the terminal chat shows no log-probabilities; the Python API's `logprobs=` and the server's " \
           "`logprobs` do" in err and "got 3.0" not in err
