"""Stop strings as long as a request may send cost the text held back, not their length."""

from __future__ import annotations

import codecs

import pytest

from gpt1.inference.decoding import TextState


class CountedStop(str):
    """A stop string that counts the slices taken of it (TextState's prefix checks)."""

    slices = 0

    def __getitem__(self, key):
        CountedStop.slices += 1
        return str.__getitem__(self, key)


def test_a_long_stop_string_is_not_sliced_once_per_character_per_token(tokenizer):
    """Four 200,000-character stop strings (800 KB, under the body limit) cost a server 69 s for an
    8-token reply, in the engine's one thread, so every other request waited as long: each token
    built every prefix of each stop string."""
    text = "the cat sat on the mat and looked at the dog"
    ids = tokenizer.encode(text)
    stops = tuple(CountedStop(c * 200_000) for c in "qxzj")
    CountedStop.slices = 0
    state = TextState(tokenizer, stops, [], len(ids))
    out = "".join(state.add(i) for i in ids)
    assert out == text and state.finish_reason == "length"
    # At most one prefix per character held back, per stop string, per token: here a few hundred.
    assert CountedStop.slices <= len(ids) * len(stops) * (len(text) + 1)


def test_a_long_stop_string_still_holds_back_its_start_and_stops(tokenizer):
    stop = "sat on the mat" + "!" * 100_000
    ids = tokenizer.encode("the cat sat on the mat" + "!" * 100_000 + " and more")
    state = TextState(tokenizer, (stop,), [], len(ids))
    pieces = []
    for i in ids:  # as the engine does: until the state finishes
        pieces.append(state.add(i))
        if state.finish_reason:
            break
    assert "".join(pieces) == "the cat " and state.finish_reason == "stop"
    assert i != ids[-1]  # it stopped before the text after the stop string


# ---- a prompt of token ids that ends inside a character -----------------------------------------
def _cut_inside_a_character(tokenizer, text):
    ids = tokenizer.encode(text)
    for k in range(1, len(ids)):
        if tokenizer.decode(ids[:k]).endswith("\ufffd"):
            return ids[:k], ids[k:]
    raise AssertionError(f"no token boundary inside a character of {text!r}")


@pytest.mark.parametrize("stop", [(), ("zz",)])
def test_a_reply_that_finishes_the_prompts_character_starts_with_that_character(tokenizer, stop):
    """A token-id prompt cut inside 日 (as any prefix of tokenized CJK or Thai may be): the reply
    started with U+FFFD and lost the bytes that finish the character."""
    prompt, reply = _cut_inside_a_character(tokenizer, "ab日c")
    state = TextState(tokenizer, stop, prompt, len(reply))
    pieces = [state.add(i) for i in reply]
    assert "".join(pieces) == "日c" and state.finish_reason == "length"
    assert all("\ufffd" not in p for p in pieces)
    assert state.prompt_tokens == len(prompt)


def test_a_reply_that_does_not_finish_the_prompts_character_is_its_own_text(tokenizer):
    """The prompt's broken bytes stay the prompt's: no U+FFFD at the start of the reply."""
    prompt, _ = _cut_inside_a_character(tokenizer, "ab日c")
    reply = tokenizer.encode("c d")
    state = TextState(tokenizer, (), prompt, len(reply))
    assert "".join(state.add(i) for i in reply) == "c d"
    # Ended after its first token: that token's text.
    state = TextState(tokenizer, (), prompt, 5)
    assert state.add(reply[0]) + state.finish("length") == "c"


# ---- properties, on random token streams (hypothesis) -------------------------------------------
def _pieces(tokenizer):
    """Token ids that split characters (lone UTF-8 bytes and partial sequences) and short ASCII ones."""
    table = tokenizer.bytes_table
    normal = [i for i in range(tokenizer.vocab_size) if i not in set(tokenizer.special_ids)]
    partial = [i for i in normal if any(b >= 0x80 for b in table[i])][:200]
    ascii_ = [i for i in normal if all(b < 0x80 for b in table[i]) and 0 < len(table[i]) <= 3][:200]
    return partial + ascii_ + sorted({t for s in ("é", "日本", "naïve", "€", "😀") for t in tokenizer.encode(s)})


def _decode(data: bytes) -> str:
    return data.decode("utf-8", "replace")


def test_streamed_text_is_the_decoded_tokens_cut_at_the_first_stop_string(tokenizer):
    """Differential: what TextState streams equals the tokens' bytes decoded whole and cut where a
    stop string first appears, whatever stops (spanning tokens, multi-byte, U+FFFD, one a prefix
    of another) and wherever the length limit falls."""
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies
    table, ids_pool = tokenizer.bytes_table, _pieces(tokenizer)

    @hypothesis.settings(max_examples=300, deadline=None, database=None)
    @hypothesis.given(ids=st.lists(st.sampled_from(ids_pool), min_size=1, max_size=20), data=st.data(),
                      limit=st.integers(1, 25))
    def check(ids, data, limit):
        whole = _decode(b"".join(table[i] for i in ids))
        stops = [data.draw(st.sampled_from(["é", "\ufffd", "a", " t", "日", "e\u0301", "x" * 300]))
                 if not whole or data.draw(st.booleans()) else whole[(a := data.draw(st.integers(0, len(whole) - 1))):
                                                                   data.draw(st.integers(a + 1, min(len(whole), a + 5)))]
                 for _ in range(data.draw(st.integers(0, 3)))]
        if stops and data.draw(st.booleans()):
            stops.append(stops[0] + "é")  # one stop the prefix of another
        state = TextState(tokenizer, tuple(stops), [], limit)
        pieces, used = [], 0
        for i in ids:
            pieces.append(state.add(i))
            used += 1
            if state.finish_reason:
                break
        if not state.finish_reason:
            pieces.append(state.finish("length"))
        text = "".join(pieces)
        seen = _decode(b"".join(table[i] for i in ids[:used]))
        hits = [seen.find(s) for s in stops if s in seen]
        # The stop that completes first wins; a stop found only in the final flush counts too.
        assert not any(s in text for s in stops)
        assert seen.startswith(text)
        if not hits:
            assert text == seen and state.finish_reason == "length"
        else:
            assert state.finish_reason == "stop" and text == seen[:len(text)] and len(text) <= max(hits)

    check()


def test_a_reply_after_any_token_id_prompt_is_the_text_the_prompt_leaves(tokenizer):
    """Differential: after a prompt that may end inside a character, the reply's text is what the
    prompt's and the reply's bytes decode to together, less the prompt's own text; when the reply
    does not finish the prompt's character, the reply's bytes decoded alone."""
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies
    table, ids_pool = tokenizer.bytes_table, _pieces(tokenizer)

    @hypothesis.settings(max_examples=300, deadline=None, database=None)
    @hypothesis.given(prompt=st.lists(st.sampled_from(ids_pool), min_size=1, max_size=6),
                      reply=st.lists(st.sampled_from(ids_pool), min_size=1, max_size=8))
    def check(prompt, reply):
        state = TextState(tokenizer, (), prompt, len(reply))
        text = "".join(state.add(i) for i in reply)  # the last token finishes it ("length")
        prompt_bytes, reply_bytes = b"".join(table[i] for i in prompt), b"".join(table[i] for i in reply)
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        decoder.decode(prompt_bytes)
        carry = decoder.getstate()[0]  # the prompt's unfinished character
        finished = False  # whether the reply's first bytes finish it as valid UTF-8
        for n in range(1, 5) if carry else ():
            try:
                (carry + reply_bytes[:n]).decode("utf-8")
                finished = True
                break
            except UnicodeDecodeError as e:
                if e.reason != "unexpected end of data" or n > len(reply_bytes):
                    break
        assert text == _decode(carry + reply_bytes if finished else reply_bytes)
        if finished:
            assert _decode(prompt_bytes + reply_bytes).endswith(text)  # nothing lost, nothing doubled

    check()
