"""Where a text may be cut so that its pieces tokenize as the whole: the byte-level BPE's
pre-token boundaries that do not depend on what lies beyond them.

A document of any length is handed on in pieces (`text_pieces`): the readers cut files into
PIECE_CHARS characters, which bounds memory (the `tokenizers` library takes ~80-130 bytes per
character of one string); the BPE trainer cuts them smaller still (it pulls its texts 256 at a
time, so its input's pieces set how far reading runs ahead of counting). The ids of the pieces,
one after another, are the ids of the whole wherever the cut falls at a boundary, and so are the
words BPE counts.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Iterator

PIECE_CHARS = 1 << 18  # a text document longer than this is handed on in pieces

# Boundaries of the byte-level BPE's pre-tokens (GPT-2's split pattern) that do not depend on what
# lies beyond them, so that a piece that ends at one is tokenized as the whole text is there;
# preferred first. They are where the tokenizer's pre-tokenizer (Rust regex: Unicode White_Space,
# \p{L}, \p{N}) also ends a pre-token, whatever Python's `re` thinks: a whitespace character between
# two others (" word" is one pre-token, hence the cut before its space), and a letter or digit
# followed by punctuation or a symbol (not the apostrophe, which starts "'s"; CJK or Thai prose,
# which has no spaces, is cut at its "。"). Python's \s also holds U+001C-U+001F, which the
# tokenizer reads as punctuation; and its \W holds every letter newer than Python's Unicode tables
# (unassigned, category Cn, to it), so the second boundary also asks the next character's category
# to be P* or S*.
SPACE_BOUNDARY = re.compile(r"(?<=\S)[^\S\x1c-\x1f](?=\S)")  # the first: the ids after it are the whole text's last
_BOUNDARIES = (
    (SPACE_BOUNDARY, lambda char: True),
    (re.compile(r"(?<=[^\W_])(?=[^\w\s'])"), lambda char: unicodedata.category(char)[0] in "PS"),
)


def text_pieces(text: str, size: int = PIECE_CHARS) -> Iterator[str]:
    """`text` in pieces of at most `size` characters, each but the last ending at the last
    boundary in its second half (or at `size` where it has none): the ids of the pieces, one
    after another, are the ids of the whole (where every cut falls at a boundary)."""
    start = 0
    while len(text) - start > size:
        cut = cut_point(text[start:start + size + 1], size)
        yield text[start:start + cut]
        start += cut
    yield text[start:]


def cut_point(text: str, size: int) -> int:
    """Where to end a piece of `text` (longer than `size`): at the last boundary (_BOUNDARIES, in
    order) in its second half, or at `size`."""
    start = size // 2
    window = text[start - 1:size + 1]  # a character each side for the look-arounds
    for boundary, next_char_ok in _BOUNDARIES:
        cuts = [m.start() + start - 1 for m in boundary.finditer(window)]
        cut = next((c for c in reversed(cuts) if start <= c < size and next_char_ok(text[c])), None)
        if cut is not None:
            return cut
    return size
