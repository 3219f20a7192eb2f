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
SCAN_CHARS = 1 << 12  # characters `cut_point` scans for a boundary at a time, back from the end

# Boundaries of the byte-level BPE's pre-tokens (GPT-2's split pattern) that do not depend on what
# lies beyond them, so that a piece that ends at one is tokenized as the whole text is there;
# preferred first. They are where the tokenizer's pre-tokenizer (Rust regex: Unicode White_Space,
# \p{L}, \p{N}) also ends a pre-token, whatever Python's `re` thinks: a whitespace character between
# two others (" word" is one pre-token, hence the cut before its space), and a letter or digit
# followed by punctuation or a symbol (not the apostrophe, which starts "'s"; CJK or Thai prose,
# which has no spaces, is cut at its "。"). Python's \s also holds U+001C-U+001F, which the
# tokenizer reads as punctuation; and its \W holds every letter newer than Python's Unicode tables
# (unassigned, category Cn, to it), so the second boundary also asks the next character's category
# to be P* or S*. The third: a letter next to a digit (GPT-2's pattern takes \p{L}+ and \p{N}+ apart),
# both sides' categories asked (Python's \d is Nd alone, \p{N} all of N*): hex, hashes, "abc123".
SPACE_BOUNDARY = re.compile(r"(?<=\S)[^\S\x1c-\x1f](?=\S)")  # the first: the ids after it are the whole text's last
_BOUNDARIES = (
    (SPACE_BOUNDARY, lambda text, at: True),
    (re.compile(r"(?<=[^\W_])(?=[^\w\s'])"), lambda text, at: unicodedata.category(text[at])[0] in "PS"),
    (re.compile(r"(?<=[^\W_])(?=[^\W_])"),
     lambda text, at: {unicodedata.category(text[at - 1])[0], unicodedata.category(text[at])[0]} == {"L", "N"}),
)


def text_pieces(text: str, size: int = PIECE_CHARS, longest: int | None = None) -> Iterator[str]:
    """`text` in pieces of about `size` characters (`cut_point`), none longer than `longest`
    (default `size`): the ids of the pieces, one after another, are the ids of the whole wherever
    every cut falls at a boundary, which it does unless `longest` characters hold none."""
    longest = max(size, longest or size)
    start = 0
    while len(text) - start > size:
        cut = cut_point(text[start:start + longest + 1], size, longest)
        if start + cut >= len(text):
            break
        yield text[start:start + cut]
        start += cut
    yield text[start:]


def cut_point(text: str, size: int, longest: int | None = None) -> int:
    """Where to end a piece of `text` (longer than `size`): at the last boundary (_BOUNDARIES, in
    order) in its second half; else at the first one after `size`, up to `longest` (default
    `size`: a piece longer than asked rather than a pre-token cut in two, in hex, Thai or a long
    run of letters); else at `longest` (the whole of `text` if it is no longer)."""
    for boundary, ok in _BOUNDARIES:
        if (cut := _last_boundary(text, boundary, ok, size // 2, size)) is not None:
            return cut
    limit = max(size, longest or size)
    later = [c for boundary, ok in _BOUNDARIES for m in boundary.finditer(text[size - 1:limit + 1])
             if size <= (c := m.start() + size - 1) < min(limit, len(text)) and ok(text, c)]
    return min(later) if later else min(limit, len(text))


def _last_boundary(text: str, boundary: re.Pattern, ok, start: int, end: int) -> int | None:
    """The last position in [start, end) where `boundary` matches and `ok` holds, or None; scanned
    back from `end` SCAN_CHARS at a time (all of [start, end) at once was 131K characters matched to
    keep the last: 1 s per 24 MB of long documents). Each slice holds a character either side of its
    positions: whether a boundary is at a position depends on those alone (the look-arounds)."""
    while end > start:
        low = max(start, end - SCAN_CHARS)
        cuts = [m.start() + low - 1 for m in boundary.finditer(text[low - 1:end + 1])]
        cut = next((c for c in reversed(cuts) if low <= c < end and ok(text, c)), None)
        if cut is not None:
            return cut
        end = low
    return None
