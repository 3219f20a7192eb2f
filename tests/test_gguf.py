"""GGUF export, checked with the real llama.cpp (llama-cpp-python, built from source by pip):
the file loads, tokenizes as gpt1 does, continues greedily as `gpt1 generate` does, gives
gpt1's logits to a stated tolerance, and its chat template gives gpt1's chat ids through
llama-cpp-python's chat completion. Bad input gets one clear error."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from gpt1.benchmarks.llamacpp import cpu_has_amx, open_llama
from gpt1.cli import main
from gpt1.core.chat_template import JINJA_TEMPLATE, encode_chat
from gpt1.core.errors import Gpt1Error
from gpt1.core.model import GPT
from gpt1.core.sampling_params import SamplingParams, preset
from gpt1.core.tokenizer import SPECIAL_TOKENS
from gpt1.formats.gguf import GGUF_TYPES, check_representable, export_gguf
from gpt1.formats.modeldir import load_model, save_model
from gpt1.inference.generate import generate
from tests.model_factories import finetuned_dir, random_model

gguf = pytest.importorskip("gguf")

# Texts whose ids must agree: code, Unicode (multi-byte, combining, emoji, CJK), runs and
# mixes of whitespace (where GPT-2's regex has its subtle cases), contractions, numbers, and
# special tokens typed as text (text never becomes a special token, in gpt1 or here).
TEXTS = [
    "def encode(obj):\n    return json.dumps(obj, indent=2)  # héllo\n",
    "class A(dict):\n\tpass\r\n\r\n",
    "日本語のテキスト and emoji 🌍🚀 and e\u0301 combining, Ünïcödé, Ελληνικά, русский",
    "   leading spaces, trailing spaces   ",
    "a  b   c    d\n\n\n  \t x\u00a0y\u3000z",
    " \n",
    "it's we'll they've I'd YOU'RE don't 'quoted'",
    "12345 3.14159 1,000,000 0x1F",
    "[EOS] [PAD][UNK] <|user|>hi<|assistant|> <|system|>",
    "",
]
PROMPTS = ["def ", "import json\n\n", "The email package", "    return self.", "[EOS]<|user|>"]
CHAT = [
    {"role": "system", "content": "You answer in one line."},
    {"role": "user", "content": " What is a dict?\n"},
    {"role": "assistant", "content": "A mapping from keys to values."},
    {"role": "user", "content": "And  a list? 🌍"},
]
# Logits of llama.cpp against gpt1's, for logits of std ~2.5 (see `random_model`). f32: ggml's
# CPU GELU reads a float16 table and its matmuls sum in another order, so they agree to ~3e-3
# (measured), not bit for bit. The smaller types round the weights themselves (measured: f16
# 5e-3, bf16 4e-2, q8_0 0.13).
F32_ATOL = 1e-2
TYPE_ATOL = {"f16": 2e-2, "bf16": 0.1, "q8_0": 0.3}




def _llama(path, n_ctx: int):
    llama_cpp = pytest.importorskip("llama_cpp")
    return open_llama(llama_cpp, path, n_ctx=n_ctx, n_batch=n_ctx, n_threads=1, logits_all=True, verbose=False,
                      seed=0)


def _llama_greedy(llm, ids: list[int], n: int, special_ids: list[int]) -> list[int]:
    """llama.cpp's greedy continuation, cut where gpt1 stops (at any special token)."""
    llm.reset()
    out = []
    for token in llm.generate(ids, temp=0.0, repeat_penalty=1.0, reset=True):
        if token in special_ids or len(out) == n:
            break
        out.append(token)
    return out


def _llama_logits(llm, ids: list[int]) -> torch.Tensor:
    llm.reset()
    llm.eval(ids)
    return torch.tensor(llm.scores[: len(ids)])


# Two layouts: the reference model's (untied head, biases) and the other options llama.cpp
# must express differently: a tied head (no output tensor), no biases (zero biases), an
# embedding wider than the tokenizer (placeholder tokens), another LayerNorm epsilon.
LAYOUTS = {
    "untied": {},
    "tied-nobias-padded": dict(tie_embeddings=True, bias=False, vocab_size=576, norm_eps=1e-6),
}


@pytest.fixture(scope="module", params=list(LAYOUTS))
def exported(request, tiny_config, tokenizer, tmp_path_factory):
    """(model, f32 GGUF path, llama) for each layout."""
    config = dataclasses.replace(tiny_config, **LAYOUTS[request.param])
    model = random_model(config, seed=1, final_norm_scale=15.0)
    tmp = tmp_path_factory.mktemp(f"gguf-{request.param}")
    save_model(tmp / "model", model, tokenizer)
    path = export_gguf(tmp / "model", tmp / "model.gguf", "f32")
    return model, path, _llama(path, config.block_size)


@pytest.mark.slow
def test_metadata_and_tensors_are_llama_cpp_gpt2(exported, tokenizer):
    model, path, llm = exported
    c = model.config
    meta = llm.metadata
    assert meta["general.architecture"] == "gpt2" and meta["tokenizer.ggml.model"] == "gpt2"
    assert meta["tokenizer.ggml.pre"] == "gpt-2"
    assert (int(meta["gpt2.context_length"]), int(meta["gpt2.embedding_length"]), int(meta["gpt2.block_count"]),
            int(meta["gpt2.attention.head_count"]), int(meta["gpt2.feed_forward_length"])) == (
        c.block_size, c.n_embd, c.n_layer, c.n_head, c.mlp_hidden)
    assert float(meta["gpt2.attention.layer_norm_epsilon"]) == pytest.approx(c.norm_eps)
    assert [int(meta[f"tokenizer.ggml.{k}_token_id"]) for k in ("bos", "eos", "padding", "unknown")] == [2, 2, 0, 1]
    assert "tokenizer.chat_template" not in meta  # a base model
    qa = preset("qa")  # the sampling defaults, min_p 0 written too (missing, llama.cpp applies 0.05)
    assert [float(meta[f"general.sampling.{k}"]) for k in ("temp", "top_p", "min_p")] == pytest.approx(
        [qa.temperature, qa.top_p, qa.min_p])
    assert llm.n_vocab() == c.vocab_size and llm._model.n_ctx_train() == c.block_size and llm.token_eos() == 2

    reader = gguf.GGUFReader(path)
    names = {t.name for t in reader.tensors}
    assert ("output.weight" in names) is not c.tie_embeddings
    assert {"token_embd.weight", "position_embd.weight", "blk.1.attn_qkv.bias", "blk.1.ffn_down.bias"} <= names
    types = list(reader.fields["tokenizer.ggml.token_type"].contents())
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    control = [tokens[i] for i, t in enumerate(types) if t == gguf.TokenType.CONTROL]
    assert control == SPECIAL_TOKENS
    unused = [i for i, t in enumerate(types) if t == gguf.TokenType.UNUSED]
    assert unused == list(range(tokenizer.vocab_size, c.vocab_size))


@pytest.mark.slow
def test_token_ids_match_gpt1s_tokenizer(exported, tokenizer):
    _, _, llm = exported
    for text in TEXTS:
        ids = tokenizer.encode(text)
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == ids, text
        assert llm.detokenize(ids) == text.encode()


@pytest.mark.slow
def test_greedy_continuation_and_logits_match_gpt1(exported, tokenizer):
    model, _, llm = exported
    for prompt in PROMPTS:
        ids = tokenizer.encode(prompt)
        n = 24
        ours = generate(model, tokenizer, ids, SamplingParams(temperature=0, max_new_tokens=n)).token_ids
        assert _llama_greedy(llm, ids, n, tokenizer.special_ids) == ours, prompt
        sequence = ids + ours
        with torch.no_grad():
            expected = model(torch.tensor([sequence]))[0]
        torch.testing.assert_close(_llama_logits(llm, sequence), expected, atol=F32_ATOL, rtol=0)
    if not model.config.tie_embeddings:  # (a random tied model mostly repeats one token)
        assert len(set(ours)) > 5


@pytest.fixture(scope="module")
def model_dir(tiny_config, tokenizer, tmp_path_factory):
    directory = tmp_path_factory.mktemp("gguf-types") / "model"
    save_model(directory, random_model(tiny_config, seed=2, final_norm_scale=15.0), tokenizer)
    return directory


@pytest.mark.slow
@pytest.mark.parametrize("out_type", [t for t in GGUF_TYPES if t != "f32"])
def test_smaller_types_load_and_stay_close(tmp_path, model_dir, tokenizer, out_type):
    path = export_gguf(model_dir, tmp_path / f"model-{out_type}.gguf", out_type)
    expected_type = {"f16": "F16", "bf16": "BF16", "q8_0": "Q8_0"}[out_type]
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    assert types["blk.0.attn_qkv.weight"] == types["output.weight"] == expected_type
    assert types["blk.0.attn_qkv.bias"] == types["position_embd.weight"] == "F32"
    f32 = export_gguf(model_dir, tmp_path / "model-f32.gguf", "f32")
    assert path.stat().st_size < 0.6 * f32.stat().st_size

    model = load_model(model_dir)
    llm = _llama(path, model.config.block_size)
    assert llm.model_params.use_extra_bufts is not cpu_has_amx()  # llama.cpp's AMX q8_0 path crashes
    ids = tokenizer.encode(TEXTS[0])[:48]
    with torch.no_grad():
        expected = model(torch.tensor([ids]))[0]
    torch.testing.assert_close(_llama_logits(llm, ids), expected, atol=TYPE_ATOL[out_type], rtol=0)


@pytest.mark.slow
def test_chat_model_adapter_merged_and_template_gives_gpt1_chat_ids(tmp_path, tiny_config, tokenizer):
    """A LoRA fine-tuned dir as `gpt1 finetune` writes it: exported with the adapter merged,
    and llama-cpp-python's chat completion (its Jinja handler over tokenizer.chat_template)
    feeds the model gpt1's chat prompt ids."""
    finetuned_dir(tmp_path / "chat", tiny_config, tokenizer, seed=4, final_norm_scale=15.0)
    assert main(["export", "--model", str(tmp_path / "chat"), "--format", "gguf", "--type", "f32",
                 "--out", str(tmp_path / "chat.gguf")]) == 0

    merged = load_model(tmp_path / "chat")  # gpt1's own merge of the adapter
    llm = _llama(tmp_path / "chat.gguf", tiny_config.block_size)
    assert llm.metadata["tokenizer.chat_template"] == JINJA_TEMPLATE
    assert llm.chat_format == "chat_template.default"  # the handler built from the file's template
    for messages in (CHAT, CHAT[1:2], CHAT[:3]):
        expected = encode_chat(tokenizer, messages)
        llm.reset()
        reply = llm.create_chat_completion(messages=messages, max_tokens=1, temperature=0.0)
        assert reply["usage"]["prompt_tokens"] == len(expected)
        # The context llama.cpp evaluated: the prompt first (then what it generated).
        assert llm.input_ids[: len(expected)].tolist() == expected
        with torch.no_grad():
            logits = merged(torch.tensor([expected]))[0]
        torch.testing.assert_close(_llama_logits(llm, expected), logits, atol=F32_ATOL, rtol=0)


def test_llama_cpp_without_jinja_finds_no_built_in_format_in_the_template():
    """Without --jinja, llama.cpp picks a built-in chat format by the marker strings in a
    template's source: <|user|> and <|assistant|> made it render GLM-Edge's (a line break after
    each marker, no [EOS] after a reply), a prompt gpt1 never trained on, without a word. Now its
    C API finds none and says the template is unsupported (-1), as for any custom template."""
    import ctypes

    llama_cpp = pytest.importorskip("llama_cpp")
    turns = [("system", "Be brief."), ("user", "Hi!"), ("assistant", "Hello."), ("user", "Bye")]
    chat = (llama_cpp.llama_chat_message * len(turns))(
        *[llama_cpp.llama_chat_message(role=role.encode(), content=text.encode()) for role, text in turns])
    out = ctypes.create_string_buffer(4096)
    assert llama_cpp.llama_chat_apply_template(JINJA_TEMPLATE.encode(), chat, len(turns), True, out, len(out)) == -1
    # A template with those markers in its source is taken for a built-in one (the check is real).
    assert llama_cpp.llama_chat_apply_template(b"<|user|><|assistant|>", chat, len(turns), True, out, len(out)) > 0


def test_cli_writes_the_file_and_hf_config_has_n_ctx(tmp_path, tiny_model_dir, capsys):
    out = tmp_path / "m.gguf"
    assert main(["export", "--model", str(tiny_model_dir), "--format", "gguf", "--type", "q8_0", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == str(out)
    # llama.cpp pads n_ctx to 256 positions, past this 64-token model's table: said at export
    assert "a context of 64 tokens, which llama.cpp rounds up to 256" in captured.err
    reader = gguf.GGUFReader(out)
    assert reader.fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q8_0
    assert not list(tmp_path.glob(".*.tmp"))  # the temporary file was renamed into place

    pytest.importorskip("transformers")
    assert main(["export", "--model", str(tiny_model_dir), "--out", str(tmp_path / "hf")]) == 0
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["n_ctx"] == config["n_positions"] == 64


@pytest.mark.parametrize("argv,message", [
    (["--format", "onnx", "--out", "x"], "unknown --format 'onnx'; known formats: hf, gguf"),
    (["--format", "gguf", "--type", "q4_0", "--out", "x.gguf"], "unknown GGUF type 'q4_0'; known types: f32, f16, bf16, q8_0"),
    (["--type", "f16", "--out", "x"], "--type applies to --format gguf only"),
])
def test_cli_bad_flags_list_the_known_values(tmp_path, tiny_model_dir, capsys, argv, message):
    argv = [a if a not in ("x", "x.gguf") else str(tmp_path / a) for a in argv]
    assert main(["export", "--model", str(tiny_model_dir), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_existing_file_needs_force_and_a_folder_is_refused(tmp_path, tiny_model_dir):
    out = tmp_path / "m.gguf"
    out.write_text("old")
    with pytest.raises(Gpt1Error, match=r"exists; choose another --out or pass --force \(overwrite=True in Python\)"):
        export_gguf(tiny_model_dir, out, "f32")
    assert out.read_text() == "old"
    # --force replaced any file: the model's own weights, a data dir's train.bin. Only a GGUF file now.
    with pytest.raises(Gpt1Error, match="m.gguf: exists and is not a GGUF file; --force replaces only an earlier export"):
        export_gguf(tiny_model_dir, out, "f32", overwrite=True)
    weights = tiny_model_dir / "model.safetensors"
    before = weights.read_bytes()
    with pytest.raises(Gpt1Error, match="model.safetensors: exists and is not a GGUF file"):
        export_gguf(tiny_model_dir, weights, "f32", overwrite=True)
    assert weights.read_bytes() == before
    out.unlink()
    export_gguf(tiny_model_dir, out, "f32")
    export_gguf(tiny_model_dir, out, "f16", overwrite=True)
    assert out.read_bytes()[:4] == b"GGUF"
    with pytest.raises(Gpt1Error, match="names a folder; --out names the .gguf file to write"):
        export_gguf(tiny_model_dir, tmp_path, "f32")
    # A new folder, said with a trailing slash, became a file of that name.
    with pytest.raises(Gpt1Error, match=r"newdir/: names a folder; .* \(e\.g\. .*newdir/model\.gguf\)"):
        export_gguf(tiny_model_dir, f"{tmp_path}/newdir/", "f32")
    assert not (tmp_path / "newdir").exists()


def test_a_model_llama_cpp_cannot_represent_says_why(tmp_path, tiny_config, tokenizer):
    spec = json.loads(tokenizer.to_json())
    spec["pre_tokenizer"]["add_prefix_space"] = True
    spec["normalizer"] = {"type": "NFC"}
    directory = tmp_path / "model"
    save_model(directory, GPT(tiny_config))
    (directory / "tokenizer.json").write_text(json.dumps(spec))
    # Such a tokenizer.json is refused at load (not gpt1's pipeline); one built in Python still
    # meets the export's own check.
    with pytest.raises(Gpt1Error, match="tokenizer.json: not a gpt1 tokenizer"):
        export_gguf(directory, tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()
    from tokenizers import Tokenizer as Backend

    from gpt1.core.tokenizer import Tokenizer

    with pytest.raises(Gpt1Error, match="llama.cpp cannot represent this model") as error:
        check_representable(tiny_config, Tokenizer(Backend.from_str(json.dumps(spec))), directory)
    assert "pre-tokenizer" in str(error.value) and "no prefix space" in str(error.value)
    assert "a normalizer (NFC)" in str(error.value)

    small = dataclasses.replace(tiny_config, vocab_size=300)
    save_model(tmp_path / "small", GPT(small), tokenizer)
    # The model dir's own check (its tokenizer must fit its embedding) speaks first.
    with pytest.raises(Gpt1Error, match=f"{tokenizer.vocab_size} tokens, but the model .* has 300 token embeddings"):
        export_gguf(tmp_path / "small", tmp_path / "m.gguf")
    with pytest.raises(Gpt1Error, match=f"the tokenizer has {tokenizer.vocab_size} tokens, the model's embedding only 300"):
        check_representable(small, tokenizer, tmp_path / "small")

    # Head size 1: the file was written, and llama.cpp aborted the loading process (GGML_ASSERT).
    one_wide = dataclasses.replace(tiny_config, n_embd=8, n_head=8)
    save_model(tmp_path / "heads", GPT(one_wide), tokenizer)
    with pytest.raises(Gpt1Error, match=r"head size 1 \(n_embd 8 / n_head 8\): llama.cpp's attention needs heads of at least 2"):
        export_gguf(tmp_path / "heads", tmp_path / "h.gguf")
    assert not (tmp_path / "h.gguf").exists()


GO_RENDER = """package main

import (
	"encoding/json"
	"fmt"
	"os"
	"strings"
	"text/template"
)

type Message struct {
	Role    string `json:"role"`
	Content string `json:"content"`
}

func main() {
	src, _ := os.ReadFile(os.Args[1])
	tpl := template.Must(template.New("ollama").Parse(string(src)))
	var conversations [][]Message
	if err := json.NewDecoder(os.Stdin).Decode(&conversations); err != nil {
		panic(err)
	}
	out := []string{}
	for _, messages := range conversations {
		var b strings.Builder
		if err := tpl.Execute(&b, map[string]any{"Messages": messages}); err != nil {
			out = append(out, fmt.Sprintf("error: %v", err))
		} else {
			out = append(out, b.String())
		}
	}
	json.NewEncoder(os.Stdout).Encode(out)
}
"""


def render_with_ollama_template(tmp_path: Path, conversations: list) -> list[str]:
    """Each conversation rendered by the Modelfile TEMPLATE of docs/gguf.md in Go's text/template
    (Ollama's engine), or "error: ..." where the template stops the render."""
    go = shutil.which("go")
    if go is None:
        pytest.skip("Go is not installed (apt-get install golang-go)")
    docs = (Path(__file__).parents[1] / "docs" / "gguf.md").read_text()
    (tmp_path / "template.txt").write_text(re.search(r'^TEMPLATE """(.*?)"""$', docs, re.S | re.M).group(1))
    (tmp_path / "main.go").write_text(GO_RENDER)
    env = {**os.environ, "GOCACHE": str(tmp_path / "gocache"), "GOPATH": str(tmp_path / "gopath"), "GO111MODULE": "off"}
    result = subprocess.run([go, "run", "main.go", "template.txt"], cwd=tmp_path, input=json.dumps(conversations),
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.mark.slow
def test_ollama_template_in_the_docs_renders_gpt1s_chat_text(tmp_path):
    """The Modelfile TEMPLATE of docs/gguf.md, run by Go's text/template (Ollama's engine),
    gives the text gpt1's Jinja template gives (conversations ending with a user turn)."""
    jinja2 = pytest.importorskip("jinja2")
    conversations = [CHAT, CHAT[1:2], CHAT[:2], CHAT[1:], [{"role": "user", "content": "{{ .Role }} <b>&amp; \n\n"}]]
    jinja = jinja2.Environment().from_string(JINJA_TEMPLATE)
    expected = [jinja.render(messages=m, add_generation_prompt=True) for m in conversations]
    assert render_with_ollama_template(tmp_path, conversations) == expected


@pytest.mark.slow
def test_bench_llamacpp_quick_reports_llama_cpp_beside_gpt1(tmp_path, capsys):
    pytest.importorskip("llama_cpp")
    assert main(["bench", "llamacpp", "--quick", "--json", str(tmp_path / "bench.json")]) == 0
    rows = json.loads((tmp_path / "bench.json").read_text())["llamacpp"]
    assert [(r["implementation"], r["type"]) for r in rows] == [
        ("gpt1 generate", "f32"), *[("llama.cpp (llama-cpp-python)", t) for t in ("f32", "f16", "q8_0")]]
    assert all(r["tokens_per_s"] > 0 and r["threads"] == 1 for r in rows)
    assert rows[1]["same_tokens_as_gpt1"] is True  # f32: the same model, the same greedy tokens
    assert "## llamacpp" in capsys.readouterr().out


def test_tokens_over_32_bytes_warn_as_llama_cpp_python_drops_them(tmp_path, tiny_config, corpus_dir, monkeypatch,
                                                                  capsys):
    """llama-cpp-python's detokenize reads each token into 32 bytes and returns a longer one as
    empty text: tokenizers trained before gpt1 capped tokens at 32 bytes get a warning on export;
    a capped vocabulary comes back whole."""
    import gpt1.core.tokenizer
    from gpt1.core.tokenizer import train_tokenizer
    from gpt1.data.sources import iter_documents

    deep = "if x:\n" + " " * 32 + "y = 1\n" + " " * 64 + "return y\n"  # newline + indentation: long tokens
    texts = [*iter_documents([str(corpus_dir)]), *[deep] * 200]
    config = dataclasses.replace(tiny_config, vocab_size=2048)
    for capped in (False, True):
        with monkeypatch.context() as patch:
            if not capped:  # as gpt1 trained tokenizers before the cap
                patch.setattr(gpt1.core.tokenizer, "MAX_TOKEN_BYTES", None)
            tokenizer, _ = train_tokenizer(texts, config.vocab_size, show_progress=False)
        save_model(tmp_path / f"m{capped}", GPT(config), tokenizer)
        out = tmp_path / f"m{capped}.gguf"
        assert main(["export", "--model", str(tmp_path / f"m{capped}"), "--format", "gguf", "--type", "f32",
                     "--out", str(out)]) == 0
        err = capsys.readouterr().err
        lengths = [len(b) for b in tokenizer.bytes_table]
        long = sum(n > 32 for n in lengths)
        assert (long > 0) is (not capped) and (32 in lengths) is (not capped)
        warned = (f"the tokenizer has {long} token(s) longer than 32 bytes, which llama-cpp-python's detokenize "
                  "(32 bytes per token) drops from generated text")
        assert (warned in err) is (not capped), err

        if importlib.util.find_spec("llama_cpp") is None:
            continue  # the warning is tested; what llama-cpp-python does with the tokens needs it
        llm = _llama(out, config.block_size)
        special = set(tokenizer.special_ids)
        detokenized = {i: llm.detokenize([i]) for i in range(tokenizer.vocab_size) if i not in special}
        # Exactly the tokens over 32 bytes (32-byte ones fit) come back empty: the uncapped export's warning.
        assert {i: b for i, b in detokenized.items() if b != tokenizer.bytes_table[i]} == {
            i: b"" for i in detokenized if lengths[i] > 32}
