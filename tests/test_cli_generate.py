"""`gpt1 generate` and `gpt1 chat`: in-process through `gpt1.cli.main`, and the interactive chat
as a real subprocess fed through standard input."""

import subprocess
import sys

import pytest
import torch

from gpt1 import load
from gpt1.cli import main
from gpt1.core.errors import Gpt1Error


def gpt1(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "gpt1", *args], input=stdin, capture_output=True, text=True, timeout=120)


def run_main(capsys, *args):
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_generate_streams_the_completion(capsys, tiny_model_dir, llm):
    model = str(tiny_model_dir)
    code, out, err = run_main(capsys, "generate", "--model", model, "--prompt", "import", "--temperature", "0",
                              "--max-new-tokens", "12", "--device", "cpu")
    assert code == 0
    assert out == llm.generate("import", temperature=0, max_new_tokens=12)  # no line end added into a pipe
    n_prompt = len(llm.tokenizer.encode("import"))
    assert f"[{n_prompt} prompt tokens, " in err and "tokens/s, float32 on cpu), finish: " in err
    args = ("generate", "--model", model, "--prompt", "x", "--preset", "creative", "--seed", "9", "--top-p", "0.9",
            "--max-new-tokens", "10", "--stop", "ab", "--stop", "cd", "--repeat-last-n", "-1", "--min-p", "0.01")
    _, first, _ = run_main(capsys, *args)
    _, second, _ = run_main(capsys, *args)
    expected = llm.generate("x", preset="creative", seed=9, top_p=0.9, max_new_tokens=10, stop=["ab", "cd"],
                            repeat_last_n=-1, min_p=0.01)
    assert first == second == expected


def test_generate_chat_wraps_the_prompt_as_a_user_turn(capsys, tiny_model_dir, llm):
    code, out, _ = run_main(capsys, "generate", "--model", str(tiny_model_dir), "--prompt", "hello", "--chat",
                            "--system", "be brief", "--temperature", "0", "--max-new-tokens", "6")
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
    assert code == 0 and out.rstrip("\n") == llm.chat(messages, temperature=0, max_new_tokens=6).rstrip("\n")



def test_generate_chat_from_a_pipe_is_the_typed_line_and_a_base_model_is_named(capsys, monkeypatch, tiny_model_dir):
    """`echo hello | gpt1 generate --chat` kept the line end in the user turn (another reply than
    --prompt hello), and gave no word that a base model only continues the text (gpt1 chat does)."""
    import io

    args = ["generate", "--model", str(tiny_model_dir), "--chat", "--temperature", "0", "--max-new-tokens", "6"]
    code, typed, err = run_main(capsys, *args, "--prompt", "hello")
    assert code == 0 and "has no chat template: it is a base model" in err
    for piped in ("hello\n", "hello\r\n"):
        monkeypatch.setattr("sys.stdin", io.StringIO(piped))
        assert run_main(capsys, *args)[1] == typed


@pytest.mark.parametrize("flags, message", [
    (["--top-p", "-0.5"], r"top_p must be a number in \[0, 1\] \(1 = off, 0 = the most likely token alone\), got -0.5"),
    (["--temperature", "-1"], r"temperature must be a number >= 0"),
    (["--max-new-tokens", "0"], r"max_new_tokens must be an integer >= 1 here, got 0 \(0 generates nothing"),
    (["--max-new-tokens", "-1"], r"max_new_tokens must be an integer >= 1 here, got -1 \(0 generates nothing"),
    (["--stop", ""], r"stop must be a list of non-empty strings"),
    (["--top-k", "-3"], r"top_k must be an integer >= 0 \(0 = off\), got -3$"),
    (["--no-truncate", "--max-new-tokens", "100"], r"exceed the context of 64 tokens"),
])
def test_generate_bad_knobs_are_one_line_exit_2(capsys, tiny_model_dir, flags, message):
    import re

    code, out, err = run_main(capsys, "generate", "--model", str(tiny_model_dir), "--prompt", "x", *flags)
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpt1 generate: error: "), err
    assert re.search(message, lines[0]), lines[0]


def test_generate_reads_the_prompt_from_stdin(capsys, monkeypatch, tiny_model_dir, llm):
    import io

    monkeypatch.setattr(sys, "stdin", io.StringIO("import json\n"))
    code, out, err = run_main(capsys, "generate", "--model", str(tiny_model_dir), "--temperature", "0",
                              "--max-new-tokens", "8")
    assert code == 0, err
    assert out == llm.generate("import json", temperature=0, max_new_tokens=8)


@pytest.mark.slow
def test_chat_session_through_stdin(tiny_model_dir, llm):
    """/set, replies that remember the conversation, /reset, /system, bad input; ends at EOF."""
    script = "\n".join([
        "/set temperature 0", "/set max-new-tokens 6", "/set top_k nope", "hi", "and then?", "/reset",
        "/system be brief", "how are you", "/bogus", "/preset code",
    ]) + "\n"
    result = gpt1("chat", "--model", str(tiny_model_dir), "--device", "cpu", stdin=script)
    assert result.returncode == 2, result.stderr  # piped lines failed: the session went on, the status says so
    assert result.stderr.rstrip().endswith("gpt1 chat: error: 2 input line(s) failed (line 3, 9; the errors are above)")
    assert "Traceback" not in result.stderr
    knobs = dict(temperature=0, max_new_tokens=6)
    first = llm.chat([{"role": "user", "content": "hi"}], **knobs)
    history = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": first},
               {"role": "user", "content": "and then?"}]
    second = llm.chat(history, **knobs)
    third = llm.chat([{"role": "system", "content": "be brief"}, {"role": "user", "content": "how are you"}], **knobs)
    assert result.stdout == first + "\n" + second + "\n" + third + "\n"
    assert "error: top_k must be an integer >= 0 (0 = off), got 'nope'" in result.stderr
    assert "error: unknown command /bogus; type /help (a message that starts with / is typed //bogus)" in result.stderr
    assert "temperature 0.2, top_k 30, top_p 0.8" in result.stderr and "max_new_tokens 6" in result.stderr
    assert "base model" in result.stderr


def test_chat_quit_and_ctrl_c(capsys, monkeypatch, tiny_model_dir):
    import builtins
    import io

    monkeypatch.setattr(sys, "stdin", io.StringIO("/set max_new_tokens 3\n/quit\nnever answered\n"))
    code, out, err = run_main(capsys, "chat", "--model", str(tiny_model_dir), "--device", "cpu")
    assert code == 0 and out == "" and "max_new_tokens 3" in err
    assert sys.stdin.read() == "never answered\n"

    def interrupted(*args):
        raise KeyboardInterrupt

    class Terminal(io.StringIO):  # on a terminal (stdout too): input() with readline
        def isatty(self):
            return True

    for stdin, patched in ((io.StringIO(), "readline"), (Terminal(), "input")):
        monkeypatch.setattr(sys, "stdin", stdin)
        monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
        monkeypatch.setattr(*((builtins, "input") if patched == "input" else (stdin, "readline")), interrupted)
        code, out, err = run_main(capsys, "chat", "--model", str(tiny_model_dir), "--device", "cpu")
        assert code == 0 and "Traceback" not in err and "interrupted" not in err


def test_chat_set_shows_user_facing_values(capsys, monkeypatch, tiny_model_dir):
    """Issue 16: /set echoed Python reprs (`stop ()`, `seed None`)."""
    import io

    monkeypatch.setattr(sys, "stdin", io.StringIO("/set\n/set stop \\n\n/set seed 7\n/quit\n"))
    code, _, err = run_main(capsys, "chat", "--model", str(tiny_model_dir), "--device", "cpu")
    assert code == 0
    lines = [line for line in err.splitlines() if line.startswith("(temperature")]
    assert "stop none" in lines[0] and "seed random" in lines[0] and "truncate_prompt on" in lines[0]
    assert "temperature 0.8," in lines[0]
    assert "()" not in err and "None" not in err and "'" not in lines[0]
    assert "stop \\n," in lines[1] and "seed 7" in lines[2]


def test_chat_bad_stop_escapes_are_errors_and_windows_line_ends_are_not_message(capsys, monkeypatch, tiny_model_dir,
                                                                                 llm):
    """A stop string with a bad escape ended the session with a UnicodeDecodeError traceback; a
    piped Windows file sent each message with its \\r."""
    import io

    bad = ["\\x", "\\", "\\u12", "\\N{bogus}"]
    monkeypatch.setattr(sys, "stdin", io.StringIO("".join(f"/set stop {b}\n" for b in bad) + "/set stop \\n\n/quit\n"))
    code, _, err = run_main(capsys, "chat", "--model", str(tiny_model_dir), "--device", "cpu")
    assert code == 2 and "Traceback" not in err  # the session went on; the status says lines failed
    errors = [line for line in err.splitlines() if line.startswith("error: stop")]
    assert len(errors) == 4 and all("(escapes: \\n," in line for line in errors)
    assert "error: stop \\x: \\x needs 2 hex digits" in errors[0]
    assert "stop \\n," in err  # the session went on

    def reply(stdin: str) -> str:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
        code, out, _ = run_main(capsys, "chat", "--model", str(tiny_model_dir), "--device", "cpu", "--temperature", "0",
                                "--max-new-tokens", "8")
        assert code == 0
        return out

    assert reply("import json\r\n") == reply("import json\n")
    expected = llm.chat([{"role": "user", "content": "import json"}], temperature=0, max_new_tokens=8)
    assert reply("import json\r\n").strip() == expected.strip()


def test_generate_says_when_max_new_tokens_is_capped(capsys, tiny_model_dir, llm):
    """Issue 16: a max_new_tokens beyond the context was accepted silently."""
    n = len(llm.tokenizer.encode("import json"))
    code, out, err = run_main(capsys, "generate", "--model", str(tiny_model_dir), "--prompt", "import json",
                              "--temperature", "0", "--max-new-tokens", "1000", "--device", "cpu")
    assert code == 0
    assert f"max_new_tokens 1000 does not fit: the context is 64 tokens and the prompt takes {n}," in err
    assert f"generation stops after at most {64 - n} tokens (lower --max-new-tokens)" in err
    code, _, err = run_main(capsys, "generate", "--model", str(tiny_model_dir), "--prompt", "import json",
                            "--max-new-tokens", "10", "--device", "cpu")
    assert code == 0 and "does not fit" not in err


def test_a_prompt_that_fits_is_kept_whole_unless_max_new_tokens_is_chosen(capsys, tiny_model_dir, llm):
    """The default max_new_tokens (256) is not a wish: it cut a 50-token prompt of this 64-token
    model to 32 tokens, while --no-truncate kept it whole. A prompt that fills the context is cut."""
    model = str(tiny_model_dir)
    prompt = llm.tokenizer.decode(list(range(300, 350)))
    n = len(llm.tokenizer.encode(prompt))
    assert 32 < n < 64
    for flags in ([], ["--no-truncate"]):
        code, out, err = run_main(capsys, "generate", "--model", model, "--prompt", prompt, "--temperature", "0", *flags)
        assert code == 0 and f"[{n} prompt tokens, " in err and "was cut" not in err
        assert out == llm.generate(prompt, temperature=0, max_new_tokens=64 - n)
    code, _, err = run_main(capsys, "generate", "--model", model, "--prompt", prompt, "--max-new-tokens", "40")
    assert code == 0 and f"the prompt ({n} tokens) was cut to its last 32 tokens" in err  # a chosen 40: 64 - 40 < 32
    long = llm.tokenizer.decode(list(range(300, 400)))
    code, _, err = run_main(capsys, "generate", "--model", model, "--prompt", long)
    assert code == 0 and "was cut to its last 32 tokens" in err


def test_chat_without_truncation_says_how_to_go_on_once_the_conversation_is_full(capsys, monkeypatch,
                                                                                  tiny_model_dir, llm):
    """With --no-truncate, every message after the conversation filled the context failed with
    the one-shot "shorten the prompt", which a chat user cannot do."""
    import io

    message = "word " * 10
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{message}\n" * 5 + f"/reset\n{message}\n"))
    code, out, err = run_main(capsys, "chat", "--model", str(tiny_model_dir), "--device", "cpu", "--temperature", "0",
                              "--no-truncate", "--max-new-tokens", "5")
    err, last = err.rstrip().rsplit("\n", 1)
    assert code == 2 and last.startswith("gpt1 chat: error: ") and "input line(s) failed" in last  # piped
    before, after = err.split("(conversation cleared)")
    errors = [line for line in before.splitlines() if line.startswith("error:")]
    assert 1 <= len(errors) < 5 and "error:" not in after, err  # the first turn fits, and the one after /reset
    assert all("no longer fits the 64-token context" in line and
               line.endswith("/reset starts a new one, /set truncate_prompt on drops the oldest turns") for line in errors)


def test_chat_says_when_a_message_longer_than_the_context_is_cut(capsys, monkeypatch, tiny_model_dir, llm):
    """A message longer than the context loses the start of its text (its role marker stays),
    and says so: the warning once counted the whole message and promised "at most -375 tokens";
    with --no-truncate only the error shows, and the message leaves the history."""
    import io

    message = "word " * 100
    monkeypatch.setattr(sys, "stdin", io.StringIO(message + "\n"))
    code, out, err = run_main(capsys, "chat", "--model", str(tiny_model_dir), "--device", "cpu",
                              "--max-new-tokens", "10", "--temperature", "0")
    n = len(llm.tokenizer.encode(message))  # the template adds its turn markers to these
    assert code == 0 and out.strip(), err
    assert "does not fit" not in err and "at most -" not in err
    cut = n + 2 - 54  # its <|user|> and the <|assistant|> after it stay
    assert f"the message's first {cut} tokens were cut to fit the context" in err and n > 64
    assert "was cut to its last" not in err  # the prompt fits once the message is cut
    # On a line of its own after the reply (it was written before the reply's line end).
    both = subprocess.run([sys.executable, "-m", "gpt1", "chat", "--model", str(tiny_model_dir), "--device", "cpu",
                           "--max-new-tokens", "10", "--temperature", "0"], input=message + "\n",
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=120).stdout
    assert any(line.startswith(f"the message's first {cut} tokens were cut") for line in both.splitlines()), both
    monkeypatch.setattr(sys, "stdin", io.StringIO(message + "\n"))
    code, out, err = run_main(capsys, "chat", "--model", str(tiny_model_dir), "--device", "cpu",
                              "--max-new-tokens", "10", "--no-truncate")
    assert out == "" and "does not fit" not in err
    assert "plus max_new_tokens (10) exceed the context of 64 tokens" in err


@pytest.mark.parametrize("value", ["1e-300", "1e-45"])
def test_generate_with_a_tiny_temperature_is_greedy(capsys, tiny_model_dir, llm, value):
    """Issue 17 item 6: a tiny temperature crashed `gpt1 generate` (inf/nan probabilities)."""
    code, out, err = run_main(capsys, "generate", "--model", str(tiny_model_dir), "--prompt", "import",
                              "--temperature", value, "--max-new-tokens", "8", "--device", "cpu")
    assert code == 0, err
    assert out == llm.generate("import", temperature=0, max_new_tokens=8)


def test_chat_session_survives_extreme_knobs(capsys, monkeypatch, tiny_model_dir):
    """Issue 17 item 6: a tiny temperature or repeat penalty ended a whole `gpt1 chat` session."""
    import io

    script = "/set temperature 1e-300\nhi\n/set temperature 1e-45\n/set repeat_penalty 1e-40\nhello\n/set max_new_tokens 2\n"
    monkeypatch.setattr(sys, "stdin", io.StringIO(script))
    code, out, err = run_main(capsys, "chat", "--model", str(tiny_model_dir), "--device", "cpu", "--max-new-tokens", "4")
    assert code == 0 and "error" not in err and "Traceback" not in err
    assert out.count("\n") >= 2  # both replies arrived


def test_dtype_loads_the_model_in_it_for_generation(capsys, tiny_model_dir, llm):
    """--dtype bfloat16: the weights (and so the KV cache) in bf16, said on stderr; a dtype gpt1
    does not offer is refused by name."""
    bf16 = load(tiny_model_dir, device="cpu", dtype="bfloat16")
    assert {p.dtype for p in bf16.model.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in llm.model.parameters()} == {torch.float32}  # auto on a CPU: as saved
    code, out, err = run_main(capsys, "generate", "--model", str(tiny_model_dir), "--prompt", "import", "--temperature",
                              "0", "--max-new-tokens", "24", "--device", "cpu", "--dtype", "bfloat16")
    assert code == 0 and out == bf16.generate("import", temperature=0, max_new_tokens=24)
    assert "tokens/s, bfloat16 on cpu), finish:" in err
    with pytest.raises(SystemExit) as exit_:
        main(["generate", "--model", str(tiny_model_dir), "--prompt", "x", "--dtype", "float64"])
    assert exit_.value.code == 2 and "--dtype: invalid choice: 'float64'" in capsys.readouterr().err
    with pytest.raises(Gpt1Error, match="dtype must be one of auto, float32, bfloat16, float16, got 'fp64'"):
        load(tiny_model_dir, device="cpu", dtype="fp64")
    for wrong in (5, torch.int8, torch.float64):  # an int was read by torch as a CUDA device index
        with pytest.raises(Gpt1Error, match=r"dtype must be one of auto, .* \(or that torch dtype\), got "):
            load(tiny_model_dir, device="cpu", dtype=wrong)
    assert load(tiny_model_dir, device="cpu", dtype=torch.bfloat16).dtype == torch.bfloat16


def test_chat_sends_a_message_that_starts_with_a_slash_and_reads_an_empty_system_message(capsys, monkeypatch,
                                                                                        tiny_model_dir, llm):
    """`/usr/bin/env is what?` could not be sent (an unknown command), `/reset me` silently cleared
    the conversation, and `--system ""` was dropped (`generate --chat` and the server keep it)."""
    import io

    monkeypatch.setattr(sys, "stdin", io.StringIO("hi\n/reset me\n//usr/bin/env is what?\n"))
    code, out, err = run_main(capsys, "chat", "--model", str(tiny_model_dir), "--device", "cpu", "--system", "",
                              "--temperature", "0", "--max-new-tokens", "6")
    assert code == 2 and "Traceback" not in err  # piped, and line 2 failed
    assert "error: /reset takes no argument (a message that starts with / is typed //reset me)" in err
    knobs = dict(temperature=0, max_new_tokens=6)
    history = [{"role": "system", "content": ""}, {"role": "user", "content": "hi"}]
    first = llm.chat(history, **knobs)
    second = llm.chat(history + [{"role": "assistant", "content": first},
                                 {"role": "user", "content": "/usr/bin/env is what?"}], **knobs)
    assert out == first + "\n" + second + "\n"


def test_generate_and_chat_with_standard_input_closed(tiny_model_dir):
    """`0<&-`: sys.stdin is None, and both crashed on None.isatty()."""
    for args, code, message in ((["generate"], 2, "no prompt: give --prompt TEXT"), (["chat"], 0, "")):
        result = subprocess.run([sys.executable, "-m", "gpt1", *args, "--model", str(tiny_model_dir), "--device", "cpu"],
                                stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120,
                                preexec_fn=lambda: __import__("os").close(0))
        assert result.returncode == code and "Traceback" not in result.stderr, result.stderr
        assert message in result.stderr


def test_text_typed_in_utf8_under_a_c_locale_is_the_same_prompt(tiny_model_dir):
    """Under LANG=C (no UTF-8 mode) `--prompt héllo` reached the tokenizer as lone surrogates: refused."""
    import os

    args = ["generate", "--model", str(tiny_model_dir), "--device", "cpu", "--chat", "--system", "soyez brèf",
            "--prompt", "héllo", "--stop", "é", "--temperature", "0", "--max-new-tokens", "6"]
    outputs = []
    for locale in ({"LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}, {"LANG": "C", "LC_ALL": "C", "PYTHONUTF8": "0"}):
        env = {**os.environ, **locale}
        env.pop("PYTHONIOENCODING", None)
        result = subprocess.run([sys.executable, "-m", "gpt1", *args], capture_output=True, timeout=120, env=env)
        assert result.returncode == 0, result.stderr
        outputs.append((result.stdout, result.stderr.split(b"[")[-1].split(b" generated")[0]))
    assert outputs[0] == outputs[1]  # the same text and the same prompt token count


# ---- a prompt longer than the context is tokenized from its end (pass 17) ----------------------

def _texts(rng) -> list[str]:
    """Text of many shapes, each ~100,000 characters: code, line ends only, one word repeated, no
    boundary at all (returned whole), CJK without spaces, and random mixes of what the boundary
    rule must get right (\\x1c-\\x1f, NEL, NBSP, ideographic space, contractions, CRLF, emoji)."""
    import json as json_module
    from pathlib import Path

    code = "".join(p.read_text() for p in sorted(Path(json_module.__file__).parent.glob("*.py")))
    code = code * (100_000 // len(code) + 1)
    alphabet = [*" \n\t\x1c\x1d\x85\xa0\u3000ab1.,'é日😀-_", "  ", "\r\n", "'s", "'ll", " 's"]
    mixes = ["".join(rng.choice(alphabet) for _ in range(rng.randint(5_000, 40_000))) for _ in range(12)]
    return [code, code.replace(" ", "\n"), "word " * 20_000, "word " * 20_000 + "  \n", "a" * 100_000,
            "日本語。" * 25_000, *mixes]


@pytest.mark.parametrize("block_size", [8, 64, 1024])
def test_the_prompt_tail_holds_the_last_ids_of_the_whole_text(tokenizer, block_size):
    """The ids of prompt_tail's text are the last ids of the whole text's, more of them than any
    fitted prompt keeps: fitting it gives what fitting the whole did, without tokenizing the whole."""
    import random

    from gpt1.inference.decoding import prompt_tail

    cut = 0
    for text in _texts(random.Random(block_size)):
        tail = prompt_tail(tokenizer, text, block_size)
        whole, ids = tokenizer.encode(text), tokenizer.encode(tail)
        assert text.endswith(tail) and whole[len(whole) - len(ids):] == ids, text[:40]
        assert tail == text or len(ids) > block_size
        cut += len(tail) < len(text)
    assert cut >= 10  # most were cut (not "a" * 100,000, nor the CJK)


def test_a_long_prompt_is_fitted_from_its_end_as_the_whole_was(capsys, monkeypatch, tiny_model_dir, llm):
    """A 10 MB prompt on stdin was tokenized whole (1.7 GB) to keep its last 61 tokens: generate,
    generate --chat and chat now tokenize its end, with the same replies; what was cut is told in
    characters (the whole prompt's token count is no longer known)."""
    import io

    from gpt1.inference.decoding import prompt_tail

    prompt = "import json and then some words, " * 2_000  # one line: chat reads a line as a message
    assert len(prompt_tail(llm.tokenizer, prompt, 64)) < len(prompt)
    args = ["--model", str(tiny_model_dir), "--device", "cpu", "--temperature", "0", "--max-new-tokens", "8"]
    code, out, err = run_main(capsys, "generate", *args, "--prompt", prompt)
    assert code == 0 and out == llm.generate(prompt, temperature=0, max_new_tokens=8)
    assert f"the prompt ({len(prompt):,} characters) was cut to its last 56 tokens to fit the context" in err
    reply = llm.chat([{"role": "user", "content": prompt}], temperature=0, max_new_tokens=8)
    capsys.readouterr()  # the library's own warning (in tokens: it tokenized the whole)
    code, out, err = run_main(capsys, "generate", *args, "--prompt", prompt, "--chat")
    assert code == 0 and out.rstrip("\n") == reply.rstrip("\n")
    told = [line for line in err.splitlines() if line.startswith("the message's first ")]
    assert len(told) == 1 and " characters and then " in told[0] and told[0].endswith(
        " tokens were cut to fit the context (the system message and the role markers stay)")
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{prompt}\nhi\n"))
    code, out, err = run_main(capsys, "chat", *args)
    second = llm.chat([{"role": "user", "content": prompt}, {"role": "assistant", "content": reply},
                       {"role": "user", "content": "hi"}], temperature=0, max_new_tokens=8)  # the whole message
    assert code == 0 and out == reply + "\n" + second + "\n" and told[0] in err


@pytest.mark.slow
def test_a_huge_prompt_on_stdin_takes_little_memory(tiny_model_dir, tmp_path):
    """10 MB on stdin took 1.7 GB (50 MB: 7 GB and 83 s): the tokenizer's ids and offsets of the
    whole text, to keep its last tokens. Measured in one process: its peak with torch and the model
    loaded, then after `gpt1 generate` read and fitted a 4 MB prompt (~550 MB more before)."""
    if sys.platform != "linux":
        pytest.skip("ru_maxrss in KiB: Linux")
    measure = ("import resource, sys, gpt1; from gpt1.cli import main; gpt1.load(sys.argv[1], device='cpu'); "
               "peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss; before = peak(); "
               "assert main(['generate', '--model', sys.argv[1], '--device', 'cpu', '--max-new-tokens', '3']) == 0; "
               "print((peak() - before) // 1024, file=sys.stderr)")
    (tmp_path / "prompt.txt").write_text("word " * 800_000)
    with open(tmp_path / "prompt.txt", "rb") as stdin:
        result = subprocess.run([sys.executable, "-c", measure, str(tiny_model_dir)], stdin=stdin,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert int(result.stderr.splitlines()[-1]) < 100, result.stderr  # MiB: the text's few copies


def test_chat_set_max_new_tokens_below_1_names_the_cli_range():
    """`/set max_new_tokens -1` said ">= 0 (0 = none: the prompt scored alone)", and 0 was then refused."""
    from gpt1.cli.chat_cmd import parse_knob
    from gpt1.core.errors import Gpt1Error
    from gpt1.core.sampling_params import SamplingParams

    for value in ("0", "-1"):
        with pytest.raises(Gpt1Error, match=rf"max_new_tokens must be an integer >= 1 here, got {value} "):
            parse_knob(SamplingParams(), "max_new_tokens", value)
    assert parse_knob(SamplingParams(), "max_new_tokens", "3").max_new_tokens == 3
