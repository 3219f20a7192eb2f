"""Byte-level BPE tokenizer on top of Hugging Face `tokenizers`.

Byte-level means every Unicode string round-trips exactly: the 256 byte values are in the
base vocabulary, so no text ever needs `[UNK]`. The saved `tokenizer.json` is the standard
`tokenizers` format, so `tokenizers.Tokenizer.from_file` and
`transformers.PreTrainedTokenizerFast(tokenizer_file=...)` load it and give the same ids.

Special tokens sit at fixed ids at the start of the vocabulary: `[PAD]`=0, `[UNK]`=1,
`[EOS]`=2 (the model card's), then three role markers for the chat template. The role markers
are never produced by text: their embeddings are trained in chat fine-tuning.
"""

from __future__ import annotations

import hashlib
import json
import operator
import os
import re
import threading
import time
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Mapping, Sequence

from tokenizers import Tokenizer as Backend
from tokenizers import decoders, models, pre_tokenizers, trainers

from gpt1.core.atomic import write_text
from gpt1.core.constants import BPE_TRAINING_THREAD
from gpt1.core.errors import Gpt1Error, threads_hint
from gpt1.core.paths import as_path
from gpt1.core.progress import info, progress, warn
from gpt1.core.reading import read_json
from gpt1.core.text_pieces import PIECE_CHARS, text_pieces

if TYPE_CHECKING:  # ids may be a 1-D tensor; this module does not load torch
    import torch

PAD, UNK, EOS = "[PAD]", "[UNK]", "[EOS]"
SYSTEM, USER, ASSISTANT = "<|system|>", "<|user|>", "<|assistant|>"
SPECIAL_TOKENS = [PAD, UNK, EOS, SYSTEM, USER, ASSISTANT]  # their ids are their positions here
BYTE_ALPHABET_SIZE = 256
MIN_VOCAB_SIZE = BYTE_ALPHABET_SIZE + len(SPECIAL_TOKENS)
# The longest token BPE may learn. llama-cpp-python's `detokenize` reads each token into a
# 32-byte buffer and silently drops a longer one (llama.cpp's own programs resize), which
# would eat a GGUF export's deep indentation; the cap also keeps runs of whitespace from
# taking vocabulary that words need.
MAX_TOKEN_BYTES = 32
# The pieces the BPE trainer is given (at a pre-token boundary: the same words counted): it pulls
# 256 at a time, so they set how far reading runs ahead of counting (~2 MB) and bound its memory.
TRAINER_PIECE_CHARS = 8192
TOKENIZER_FILE = "tokenizer.json"
MODEL_CONFIG_FILE = "config.json"  # beside tokenizer.json in a model dir (gpt1.formats.modeldir)


def check_text(text: Any, source: str) -> str:
    """`text` when it is what the tokenizer takes, a str of valid Unicode; else a Gpt1Error naming
    `source` (the Rust tokenizer's own error for both is "TextInputSequence must be str")."""
    if not isinstance(text, str):
        raise Gpt1Error(f"{source}: expected a string, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise Gpt1Error(f"{source}: a lone surrogate ({text[e.start]!r}) at character {e.start:,}: "
                        "not valid Unicode text") from None
    return text


class Tokenizer:
    """A trained byte-level BPE tokenizer. Load with `Tokenizer.load(dir_or_file)`."""

    def __init__(self, backend):  # backend: tokenizers.Tokenizer
        self.backend = backend
        # Text never turns into special tokens: a document that contains "[EOS]" is encoded
        # as those characters, so user text cannot inject control tokens. Special ids are
        # inserted explicitly (e.g. by the chat template). Not saved in tokenizer.json, so not in
        # the backend's pickled state either: see __reduce__.
        self.backend.encode_special_tokens = True
        # gpt1 fits and pads ids itself: a tokenizer.json's own truncation or padding (settings
        # outside the vocab and merges the fingerprint covers) cut every prompt and every prepared
        # document to its max_length, or padded each with [PAD], without a word.
        self.backend.no_truncation()
        self.backend.no_padding()
        for i, token in enumerate(SPECIAL_TOKENS[:3]):
            if backend.token_to_id(token) != i:
                raise Gpt1Error(f"tokenizer: expected special token {token} at id {i}, found id {backend.token_to_id(token)}")

    def __reduce__(self):
        # pickle, copy.deepcopy and multiprocessing (a spawn child, Pool.apply's arguments) rebuild
        # the backend from its tokenizer.json state, which lacks encode_special_tokens: a copy read
        # "[EOS]" and "<|user|>" in text as control tokens. Rebuild through __init__, which sets it.
        return type(self), (self.backend,)

    # ---- loading and saving -------------------------------------------------------------
    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "Tokenizer":
        """Load from a model dir (its tokenizer.json) or a tokenizer.json file."""
        path = as_path(path, "tokenizer path", "a model dir or a tokenizer.json")
        file = path / TOKENIZER_FILE if path.is_dir() else path
        if not file.is_file():
            raise Gpt1Error(f"{file}: tokenizer file not found (train one with `gpt1 tokenizer train`)")
        try:
            # Read here, not by the Rust `from_file`, which takes the path as UTF-8 text: a folder
            # name that is valid UTF-8 is not text to Python under a locale that is not UTF-8 (LANG=C
            # without its UTF-8 mode holds "é" as two lone surrogates), and one of other bytes never is.
            data = file.read_bytes()
        except OSError as e:  # permission denied: the CLI would word a bare OSError as a failed write
            raise Gpt1Error(f"{file}: cannot read ({e.strerror})") from None
        try:
            backend = Backend.from_buffer(data)
        except Exception as e:  # the Rust library raises a generic Exception with its message
            raise Gpt1Error(f"{file}: not a valid tokenizer.json ({e})") from None
        if why := _not_gpt1_pipeline(json.loads(data)):
            raise Gpt1Error(f"{file}: not a gpt1 tokenizer ({why}); gpt1 reads byte-level BPE with the ByteLevel "
                            "pre-tokenizer and decoder, no normalizer and its special tokens marked special, as "
                            "`gpt1 tokenizer train` writes it")
        ids = backend.get_vocab(with_added_tokens=True).values()
        if len(ids) != backend.get_vocab_size() or (ids and max(ids) != len(ids) - 1):
            missing = next((i for i in range(len(ids)) if backend.id_to_token(i) is None), max(ids, default=0))
            raise Gpt1Error(f"{file}: the token ids have holes (no token has id {missing}): "
                            "ids must run from 0 to the vocabulary size - 1")
        tokenizer = cls(backend)
        if path.is_dir():
            tokenizer.check_model_config(path)
        return tokenizer

    def check_model_config(self, directory: Path) -> None:
        """A model dir's config.json records its tokenizer's fingerprint and its vocab_size: a
        tokenizer.json from another training gives garbage, a larger one an IndexError."""
        config_file = directory / MODEL_CONFIG_FILE
        config = read_json(config_file) if config_file.is_file() else None
        if not isinstance(config, dict):
            return  # no model dir (ModelConfig.load reports a broken config.json)
        vocab_size = config.get("vocab_size")
        if isinstance(vocab_size, int) and self.vocab_size > vocab_size:
            raise Gpt1Error(f"{directory / TOKENIZER_FILE}: {self.vocab_size:,} tokens, but the model in {directory} "
                            f"has {vocab_size:,} token embeddings: not this model's tokenizer")
        recorded = config.get("tokenizer_fingerprint")
        if recorded is not None and recorded != self.fingerprint:
            raise Gpt1Error(f"{directory / TOKENIZER_FILE}: not the tokenizer this model was trained with (fingerprint "
                            f"{self.fingerprint}; {config_file} records {recorded}); put the model's own tokenizer back")

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write tokenizer.json into the folder `path` (made if missing), or to `path` itself when
        it names a .json file, as `load` reads either; atomically. Returns the file written."""
        path = as_path(path, "tokenizer path", "a folder or a .json file")
        # A path ending in .json is the file (a folder named x.json made by an earlier version stays one).
        file = path if path.suffix.lower() == ".json" and not path.is_dir() else path / TOKENIZER_FILE
        write_text(file, self.to_json())
        return file

    def to_json(self) -> str:
        return self.backend.to_str(pretty=True)

    @cached_property
    def fingerprint(self) -> str:
        """A short hash of the vocabulary and merges: shards and models must agree on it."""
        model = json.loads(self.backend.to_str())["model"]
        payload = json.dumps({"vocab": model["vocab"], "merges": model["merges"]}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    # ---- the vocabulary -----------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size()

    @property
    def pad_id(self) -> int:
        return 0

    @property
    def unk_id(self) -> int:
        return 1

    @property
    def eos_id(self) -> int:
        return 2

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def special_id(self, token: str) -> int:
        """The id of a special token (e.g. USER); a clear error if this tokenizer lacks it."""
        token_id = self.backend.token_to_id(token)
        if token_id is None:
            raise Gpt1Error(f"tokenizer has no special token {token} (it was trained without chat role markers)")
        return token_id

    @property
    def special_ids(self) -> list[int]:
        return sorted(i for t in SPECIAL_TOKENS if (i := self.backend.token_to_id(t)) is not None)

    # ---- encoding and decoding ----------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        # The batch call releases the GIL while it encodes (`encode` holds it: a 1 MB text froze the
        # server's event loop for a second) and skips the offsets, which nothing here reads: the
        # same ids, 2-3x faster on short texts.
        check_text(text, "text to encode")
        return _pooled(lambda: self.backend.encode_batch_fast([text], add_special_tokens=False))[0].ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Encode many texts in parallel (the Rust library uses all cores)."""
        if isinstance(texts, str):  # the Rust library: "Can't extract `str` to `Vec`"
            raise Gpt1Error("texts to encode: expected a list of strings, got one str (use encode for one text)")
        try:
            return [e.ids for e in _pooled(lambda: self.backend.encode_batch_fast(texts, add_special_tokens=False))]
        except TypeError:  # its one message for any bad text: name the first (checked only on failure)
            for i, text in enumerate(texts):
                check_text(text, f"texts[{i}] to encode")
            raise

    def decode(self, ids: Iterable[int] | torch.Tensor, skip_special_tokens: bool = False) -> str:
        ids = self._check_ids(ids)
        try:
            return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)
        except TypeError:  # an id that is no int (1.5 passes the range check)
            raise self._bad_ids(ids) from None

    def id_to_bytes(self, ids: Iterable[int] | torch.Tensor) -> bytes:
        """The raw bytes of tokens; special tokens give their text. Used by streaming, which
        must not emit half of a multi-byte character that spans two tokens."""
        table, ids = self.bytes_table, self._check_ids(ids)
        try:
            return b"".join(table[i] for i in ids)
        except TypeError:
            raise self._bad_ids(ids) from None

    def _check_ids(self, ids: Iterable[int] | torch.Tensor) -> list:
        """`ids` as a list, their range checked cheaply (callers may decode token by token): the Rust
        library drops an id past the vocabulary silently, a negative one raises OverflowError, and
        bytes_table would read it from the end."""
        if isinstance(ids, (str, bytes)) or not isinstance(ids, Iterable) or getattr(ids, "ndim", 1) == 0:
            raise Gpt1Error(f"token ids: expected a list of ints, got {type(ids).__name__}")
        if getattr(ids, "ndim", 1) > 1:  # a (1, T) batch, as the model takes it: its rows are no ids
            raise Gpt1Error(f"token ids: expected one sequence of ids (1-D), got a {type(ids).__name__} of shape "
                            f"{tuple(ids.shape)}; decode each row (ids[0] for a batch of one)")
        ids = list(ids)
        try:
            if not ids or (min(ids) >= 0 and max(ids) < self.vocab_size):
                return ids
        except TypeError:  # an id that is no number (a list, None, a str)
            pass
        raise self._bad_ids(ids)

    def _bad_ids(self, ids: list) -> Gpt1Error:
        """The error that names the first of `ids` that is not a token id of this vocabulary."""
        for t in ids:
            try:
                index = operator.index(t)
            except TypeError:
                return Gpt1Error(f"token ids must be integers, got {t!r}")
            if not 0 <= index < self.vocab_size:
                return Gpt1Error(f"token id {index} is not in the tokenizer's vocabulary (ids 0 to {self.vocab_size - 1:,})")
        return Gpt1Error(f"token ids: expected a list of ints, got {ids!r:.100}")

    @cached_property
    def bytes_table(self) -> list[bytes]:
        """The raw bytes of every token id, as `id_to_bytes` gives them."""
        # ByteLevel maps each byte to a printable character; invert that map.
        char_to_byte = {c: b for b, c in enumerate(_byte_level_chars())}
        specials = set(SPECIAL_TOKENS)
        table = []
        for i in range(self.vocab_size):
            token = self.backend.id_to_token(i)
            if token in specials:
                table.append(token.encode())
            else:
                table.append(bytes(char_to_byte[c] for c in token))
        return table

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, fingerprint={self.fingerprint})"


def _not_gpt1_pipeline(spec: dict) -> str | None:
    """What in a tokenizer.json is not gpt1's pipeline, or None. The fingerprint covers the vocab
    and merges only, and the rest of gpt1 assumes this pipeline: a WordLevel model or a token
    outside the byte-level alphabet failed with a traceback at the first token, a changed
    normalizer tokenized differently under the same fingerprint, and a Split pre-tokenizer's regex
    made a 1 MiB request cost half an hour of CPU (or panicked in Rust)."""
    model, pre_tokenizer, decoder = (spec.get(k) or {} for k in ("model", "pre_tokenizer", "decoder"))
    if model.get("type") != "BPE":
        return f"a {model.get('type')} model, not BPE"
    if model.get("dropout") or model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        return "BPE with dropout, a subword prefix or a word suffix"
    if spec.get("normalizer") is not None:
        return f"a {spec['normalizer'].get('type')} normalizer"
    if (pre_tokenizer.get("type"), pre_tokenizer.get("add_prefix_space"), pre_tokenizer.get("use_regex", True)) \
            != ("ByteLevel", False, True):
        return f"a {pre_tokenizer.get('type')} pre-tokenizer" + (
            " with other settings" if pre_tokenizer.get("type") == "ByteLevel" else "")
    if decoder.get("type") != "ByteLevel":
        return f"a {decoder.get('type')} decoder"
    if spec.get("post_processor") is not None and not _adds_nothing(spec["post_processor"]):
        return f"a {spec['post_processor'].get('type')} post-processor that adds tokens"
    alphabet, specials = set(_byte_level_chars()), set(SPECIAL_TOKENS)
    vocab = model.get("vocab") or {}
    if bad := next((t for t in vocab if t not in specials and not set(t) <= alphabet), None):
        return f"the token {bad!r} is not made of byte-level characters"
    return _added_tokens_problem(spec.get("added_tokens", []), vocab)


def _added_tokens_problem(added: Any, vocab: dict) -> str | None:
    """What in a tokenizer.json's added_tokens is not gpt1's, or None: they must be exactly the
    special tokens its vocab holds, each marked special. `encode_special_tokens` keeps text from
    turning into the tokens marked special, and only those: an added token marked "special": false
    ("<|user|>", "[EOS]" or any other) was found in user text and encoded as its id (the role
    markers of a spoofed turn), under the same fingerprint, which covers the vocab and merges only."""
    expected = {t: vocab[t] for t in SPECIAL_TOKENS if t in vocab}
    if not isinstance(added, list) or not all(isinstance(entry, dict) for entry in added):
        return "its added_tokens are not a list of tokens"
    seen = set()
    for entry in added:
        content = entry.get("content")
        if not isinstance(content, str) or content not in expected:
            return (f"the added token {content!r} is not one of the special tokens of its vocab, "
                    f"{', '.join(expected)}: text would encode into it" if expected else
                    f"the added token {content!r} is not one of gpt1's special tokens, and its vocab has none of them "
                    f"({', '.join(SPECIAL_TOKENS)})")
        if entry.get("special") is not True:
            return (f"the added token {content} is marked \"special\": {json.dumps(entry.get('special'))}, "
                    "expected true: text would encode into it")
        if entry.get("id") != expected[content]:
            return f"the added token {content} has id {entry.get('id')!r}, its vocab's {expected[content]}"
        seen.add(content)
    if missing := [t for t in expected if t not in seen]:
        return f"the special token {missing[0]} is not among its added_tokens (marked special)"
    return None


def _adds_nothing(post_processor: dict) -> bool:
    """Whether a post-processor leaves the ids as they are: ByteLevel's (it trims offsets only;
    transformers 4 adds it), a TemplateProcessing of the sequences alone (transformers 5 writes one
    when it saves a tokenizer: `"single": [A]`, no special tokens), or a Sequence of these."""
    kind = post_processor.get("type")
    if kind == "TemplateProcessing":
        pieces = [*(post_processor.get("single") or []), *(post_processor.get("pair") or [])]
        return not post_processor.get("special_tokens") and all("Sequence" in piece for piece in pieces)
    if kind == "Sequence":
        return all(_adds_nothing(p or {}) for p in post_processor.get("processors") or [])
    return kind == "ByteLevel"


def _byte_level_chars() -> list[str]:
    """GPT-2's byte -> printable-character table (the one `tokenizers`' ByteLevel uses)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


# The tokenizers library's thread pool (Rust's rayon: encode_batch_fast and the BPE trainer use it)
# is built at its first use, all its threads at once, and never again once that failed: under a limit
# on threads (`ulimit -u`, a container's pids limit) every later call panics too ("The global thread
# pool has not been initialized": pyo3's PanicException, a BaseException, ended the command with a
# traceback). The library's own switch, read at each call, runs it on the caller's thread instead.
PARALLELISM_VARIABLE = "TOKENIZERS_PARALLELISM"
_serial_switch = threading.Lock()


def _pooled(call: Callable[[], Any], retry: Callable[[], bool] = lambda: True) -> Any:
    """`call()`, which may use the library's thread pool; where that pool could not start, again on
    this thread alone (the same ids, the same merges), as every later call then runs, with one
    warning. `retry`: whether the call may run again (a training that has read text may not)."""
    try:
        return call()
    except BaseException as e:
        if not _pool_failed(e):
            raise
        why = re.search(r'message: "([^"]+)"', str(e))
        why = why[1] if why else "its thread pool failed to build"
        if not retry():
            raise Gpt1Error(f"the tokenizers library could not start its threads ({why}); set "
                            f"{PARALLELISM_VARIABLE}=false to run it on one thread, or {threads_hint()}") from None
        _go_serial(why)
    return call()


def _pool_failed(error: BaseException) -> bool:
    """Whether `error` is the library's panic for a thread pool it could not build. By name: pyo3
    makes its PanicException class at run time, in no module gpt1 can import."""
    return type(error).__name__ == "PanicException" and "ThreadPoolBuildError" in str(error)


def _go_serial(why: str) -> None:
    """Turn the library's thread pool off for the rest of the process, and say so once (requests of
    a server meet the failure on several threads at once)."""
    with _serial_switch:
        if os.environ.get(PARALLELISM_VARIABLE) == "false":
            return
        os.environ[PARALLELISM_VARIABLE] = "false"
    warn(f"the tokenizers library could not start its threads ({why}): tokenizing on one thread instead, more "
         f"slowly; to give it its threads, {threads_hint()}")


def _answering_signals(work: Callable[[], Any], abandoned: threading.Event) -> Any:
    """Run `work` in a worker thread while the main thread waits, so that Ctrl-C and SIGTERM
    are answered at once. Python runs signal handlers only in the main thread, between its own
    bytecodes: with the BPE merges in Rust on the main thread, a Ctrl-C waited for the whole
    training (minutes on a big corpus), which then finished and wrote its output anyway.
    Interrupted, it sets `abandoned` (for `work` to stop reading its input) and re-raises."""
    if threading.current_thread() is not threading.main_thread():
        return work()
    outcome: dict[str, Any] = {}
    done = threading.Event()

    def run() -> None:
        try:
            outcome["value"] = work()
        except BaseException as e:  # re-raised in the caller's thread
            outcome["error"] = e
        finally:
            done.set()

    # A daemon: Rust cannot be stopped mid-merge, so an interrupted training finishes on the
    # text read so far (it stops reading at once) and its result is dropped; in the CLI the
    # process ends first. Waited for on an Event, not join(): a join interrupted by Ctrl-C marks
    # a running thread stopped.
    threading.Thread(target=run, name=BPE_TRAINING_THREAD, daemon=True).start()
    try:
        while not done.wait(0.1):
            pass
    except BaseException:
        abandoned.set()
        raise
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")


def _trained(vocab_size: int, min_frequency: int, texts: Iterable[str]) -> Backend:
    """A byte-level BPE backend trained on `texts`."""
    backend = Backend(models.BPE(unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        # The library takes a u64: a larger count means the same (no pair occurs that often).
        min_frequency=min(min_frequency, 2**64 - 1),
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        # Counted in characters: with the byte-level alphabet, one character per byte.
        max_token_length=MAX_TOKEN_BYTES,
        # Off: the Rust bar writes to stdout (so only on a terminal: a log or a pipe saw nothing
        # for ten minutes on 1.5 GB) and counts pieces, with no total. Ours below, on stderr.
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer)
    return backend


MIN_FREQUENCY = 2  # the fewest times a pair must occur to be merged (train_tokenizer's and the CLI's default)


def train_tokenizer(texts: Iterable[str], vocab_size: int, *, min_frequency: int = MIN_FREQUENCY,
                    show_progress: bool = True, skipped: Mapping[str, int] | None = None,
                    total_bytes: int | None = None) -> tuple[Tokenizer, dict]:
    """Train a byte-level BPE tokenizer of exactly `vocab_size` tokens on `texts`.

    Returns the tokenizer and stats (documents, bytes, seconds). Raises Gpt1Error when the
    vocabulary cannot hold the byte alphabet plus the special tokens, or when the corpus is
    too small to learn that many merges. `skipped` (reason -> count, filled while `texts` are
    read, e.g. `SourceStats.skipped`) is named in the error when no text was left.
    With `show_progress`, a bar on stderr counts the UTF-8 bytes of `texts` read, against
    `total_bytes` when the caller knows it (the size of uncompressed text files).
    """
    if isinstance(texts, (str, bytes)):  # iterated, one string is a document per character
        raise Gpt1Error(f"texts: expected an iterable of documents (strings), got one {type(texts).__name__}; "
                        "pass [text] to train on it as one document")
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int):
        raise Gpt1Error(f"vocab size must be a whole number, got {vocab_size!r}")
    if vocab_size < MIN_VOCAB_SIZE:
        raise Gpt1Error(
            f"vocab size {vocab_size} is too small: a byte-level tokenizer needs at least {MIN_VOCAB_SIZE} "
            f"({BYTE_ALPHABET_SIZE} byte tokens + {len(SPECIAL_TOKENS)} special tokens)"
        )
    if vocab_size > 65_536:
        raise Gpt1Error(f"vocab size {vocab_size} is too large: token shards store ids as uint16 (at most 65,536)")
    if min_frequency < 0:
        raise Gpt1Error(f"min_frequency (--min-frequency) must be a whole number >= 0 (how often a merge must occur), got {min_frequency}")
    if vocab_size == MIN_VOCAB_SIZE:  # works in gpt1 and transformers; found out only at `gpt1 export --format gguf`
        warn(f"vocab size {vocab_size}: the bytes and special tokens alone, no merges; llama.cpp cannot load a BPE "
             f"vocabulary without merges, so this tokenizer's models cannot be exported to GGUF "
             f"({MIN_VOCAB_SIZE + 1} or more learns at least one)")

    stats = {"documents": 0, "bytes": 0}
    abandoned = threading.Event()
    # The reading happens here, in Python, as the trainer pulls the texts: most of the time on a
    # large corpus (the merges after it take a fraction).
    bar = progress(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1000, desc="tokenizer",
                   disable=None if show_progress else True)

    def counted(items: Iterable[str]) -> Iterator[str]:
        for text in items:
            if abandoned.is_set():  # interrupted: the trainer left running gets no more text
                return
            # Checked here, where the item's place is known: the Rust trainer's own error for a
            # non-string or a lone surrogate names neither the item nor the text.
            size = len(check_text(text, f"texts[{stats['documents']:,}]").encode("utf-8"))
            stats["documents"] += 1
            stats["bytes"] += size
            # In small pieces (the same words counted): the trainer pulls 256 texts at a time, so one
            # string of a document held the whole of it in Rust (~80 bytes per character: 4 GB for
            # 50 MB), and pieces of the readers' 256K characters ran the bar up to 67 MB ahead of
            # the counting, then left it silent until the end.
            bar.update(size)
            yield from text_pieces(text, TRAINER_PIECE_CHARS, longest=PIECE_CHARS)
        bar.close()  # all read: the bar's last line, before the merges are computed
        if show_progress:
            info(f"all {stats['bytes']:,} bytes read; counting the last of them and computing the merges")

    start = time.perf_counter()
    try:
        # Once more on one thread only where the pool failed before any text was read (`texts` may be
        # an iterator: what the first attempt took of it would be missing from the second), with a
        # new trainer: the panic leaves the first one's lock poisoned.
        backend = _answering_signals(lambda: _pooled(lambda: _trained(vocab_size, min_frequency, counted(texts)),
                                                     retry=lambda: stats["documents"] == 0), abandoned)
    finally:
        bar.close()
    stats["seconds"] = time.perf_counter() - start
    if stats["documents"] == 0:
        why = f" (skipped: {', '.join(f'{n:,} {reason}' for reason, n in sorted(skipped.items()))})" if skipped else ""
        raise Gpt1Error(f"no text to train the tokenizer on: the sources held no documents{why}")
    got = backend.get_vocab_size()
    if got != vocab_size:
        raise Gpt1Error(
            f"the corpus ({stats['bytes']:,} bytes) is too small to learn {vocab_size:,} tokens: BPE stopped at "
            f"{got:,} (min_frequency={min_frequency}); use more text or a smaller --vocab-size"
        )
    return Tokenizer(backend), stats
