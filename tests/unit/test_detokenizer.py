"""IncrementalDecoder on a real byte-level BPE trained here (no model files): deltas, partial
UTF-8 characters, stop strings across token boundaries, and random token streams."""

from __future__ import annotations

import functools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from braid.runtime.detokenizer import DecodeStep, IncrementalDecoder

SENTENCES = [
    "Le café est très bon, né à Paris. Crème brûlée!",
    "日本語のテキストです。日本は美しい国です。",
    "Emoji time 😀🎉 party 🎉! Thumbs 👍🏽 up.",
    "The quick brown fox jumps over the lazy dog. END of story.\nNew line here.",
]


class ByteTokenizer:
    """A trained byte-level BPE behind the ``decode(ids, skip_special_tokens)`` interface."""

    def __init__(self) -> None:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=400,
            special_tokens=["<|endoftext|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(SENTENCES * 3, trainer)
        self.tok = tok
        self.vocab_size = tok.get_vocab_size()
        self.special_id = tok.token_to_id("<|endoftext|>")
        self.calls: list[int] = []  # length of every decode() call, to check the window stays small

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        self.calls.append(len(ids))
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text).ids

    def byte_ids(self, text: str) -> list[int]:
        """One token per UTF-8 byte: every multi-byte character is split across tokens."""
        return [self.tok.token_to_id(_BYTE_TO_CHAR[b]) for b in text.encode("utf-8")]


def _byte_to_char_table() -> dict[int, str]:
    # GPT-2's byte -> printable-character table used by byte-level BPE vocabularies.
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


_BYTE_TO_CHAR = _byte_to_char_table()


@functools.lru_cache(maxsize=1)
def _tokenizer() -> ByteTokenizer:
    return ByteTokenizer()


@pytest.fixture
def tok() -> ByteTokenizer:
    t = _tokenizer()
    t.calls.clear()
    return t


def _run(tok, ids, stop=(), skip=True, tail=()) -> tuple[list[DecodeStep], str, IncrementalDecoder]:
    dec = IncrementalDecoder(tok, list(stop), skip_special_tokens=skip, prompt_tail_ids=list(tail))
    steps = []
    for t in ids:
        steps.append(dec.push(t))
        if steps[-1].stop_matched is not None:
            break
    return steps, dec.flush(), dec


def _joined(steps: list[DecodeStep], flushed: str) -> str:
    return "".join(s.delta for s in steps) + flushed


def reference(tok, ids, stop, skip=True) -> tuple[str, str | None]:
    """Streaming semantics, stated plainly: after each token, the visible text is the full
    decode minus a trailing run of U+FFFD (a character still incomplete); the first time a stop
    string is visible, the text ends before its earliest (then shortest) occurrence."""
    for t in range(1, len(ids) + 1):
        visible = tok.decode(ids[:t], skip).rstrip("\ufffd")
        found = sorted((visible.find(s), len(s), s) for s in stop if s in visible)
        if found:
            return visible[: found[0][0]], found[0][2]
    return tok.decode(list(ids), skip), None


# ---- plain decoding ---------------------------------------------------------------------------


@pytest.mark.parametrize("text", SENTENCES + ["ça et là 日本 😀 fin", "😀😀🎉 é"])
@pytest.mark.parametrize("split", ["bpe", "bytes"])
def test_deltas_concatenate_to_full_decode_without_replacement_chars(tok, text, split):
    ids = tok.encode(text) if split == "bpe" else tok.byte_ids(text)
    steps, flushed, dec = _run(tok, ids)
    assert _joined(steps, flushed) == tok.decode(ids, True) == text
    assert all("\ufffd" not in s.delta for s in steps) and "\ufffd" not in flushed
    assert flushed == "" and dec.text == text  # nothing was left over at the end
    assert all(s.stop_matched is None for s in steps)


def test_partial_character_held_until_complete(tok):
    ids = tok.byte_ids("a😀b")  # 1 + 4 + 1 bytes
    steps, _, _ = _run(tok, ids)
    assert [s.delta for s in steps] == ["a", "", "", "", "😀", "b"]


def test_incomplete_character_at_the_end_is_flushed_as_decoded(tok):
    ids = tok.byte_ids("ok😀")[:-1]
    steps, flushed, dec = _run(tok, ids)
    assert "".join(s.delta for s in steps) == "ok"
    assert flushed == tok.decode(ids, True)[2:] and "\ufffd" in flushed
    assert dec.text == tok.decode(ids, True)


def test_decodes_only_a_short_window(tok):
    ids = tok.encode(" ".join(SENTENCES) * 8)
    assert len(ids) > 300
    full = tok.decode(ids, True)
    tok.calls.clear()
    steps, flushed, _ = _run(tok, ids)
    assert _joined(steps, flushed) == full
    assert max(tok.calls) <= 8, "decoded a long window: not incremental"
    assert len(tok.calls) <= 2 * len(ids) + 2


def test_prompt_tail_gives_context(tok):
    prompt, out = tok.encode("Le café est"), tok.encode(" très bon 日本")
    steps, flushed, _ = _run(tok, out, tail=prompt[-3:])
    assert _joined(steps, flushed) == " très bon 日本"


@pytest.mark.parametrize("skip", [True, False])
def test_special_tokens(tok, skip):
    ids = tok.encode("Hello") + [tok.special_id] + tok.encode(" 日本")
    steps, flushed, _ = _run(tok, ids, skip=skip)
    assert _joined(steps, flushed) == tok.decode(ids, skip)
    assert ("<|endoftext|>" in _joined(steps, flushed)) is (not skip)


# ---- stop strings -----------------------------------------------------------------------------


@pytest.mark.parametrize("stop", ["END", "ND of", "x. END o", "\n"])
def test_stop_split_over_tokens_is_caught_and_excluded(tok, stop):
    text = "The quick brown fox. END of story.\nNext"
    ids = tok.byte_ids(text[:10]) + tok.encode(text[10:])  # some single-byte tokens, some merged
    steps, flushed, dec = _run(tok, ids, stop=[stop])
    cut = text.index(stop)
    assert steps[-1].stop_matched == stop and dec.stop_matched == stop
    assert _joined(steps, flushed) == text[:cut] == dec.text
    assert flushed == ""
    with pytest.raises(AssertionError):
        dec.push(ids[0])


def test_stop_over_three_byte_tokens(tok):
    ids = tok.byte_ids("abc END more")
    steps, _, dec = _run(tok, ids, stop=["END"])
    assert [s.delta for s in steps] == ["a", "b", "c", " ", "", "", ""]
    assert dec.text == "abc " and steps[-1] == DecodeStep("", "END")


def test_stop_at_the_very_first_token(tok):
    ids = tok.encode("café au lait")
    first = tok.decode(ids[:1], True)
    steps, flushed, dec = _run(tok, ids, stop=[first])
    assert steps == [DecodeStep("", first)] and flushed == "" and dec.text == ""


def test_text_that_may_start_a_stop_is_held_then_released(tok):
    dec = IncrementalDecoder(tok, ["END"])
    assert [dec.push(t).delta for t in tok.byte_ids("aEN")] == ["a", "", ""]
    assert dec.push(tok.byte_ids("X")[0]) == DecodeStep("ENX", None)
    assert [dec.push(t).delta for t in tok.byte_ids("E")] == [""]
    assert dec.flush() == "E" and dec.text == "aENXE"


def test_earliest_stop_wins_within_one_token(tok):
    quick = tok.encode(" quick")
    assert len(quick) == 1, "the trained vocabulary should hold ' quick' as one token"
    for stops in (["ck", "ui"], ["ui", "ck"]):
        steps, _, dec = _run(tok, tok.encode("The") + quick, stop=stops)
        assert steps[-1].stop_matched == "ui" and dec.text == "The q"


def test_first_completed_stop_ends_the_stream(tok):
    # "y" completes before "xyz" could: streaming ends at the first stop to complete.
    steps, _, dec = _run(tok, tok.byte_ids("axyz"), stop=["xyz", "y"])
    assert dec.stop_matched == "y" and dec.text == "ax"
    # Completed by the same token, the one starting earlier wins; at one start, the shorter.
    steps, _, dec = _run(tok, tok.byte_ids("ab"), stop=["b", "ab"])
    assert dec.stop_matched == "ab" and dec.text == ""


def test_no_stop_in_released_text_when_stop_never_completes(tok):
    text = "ENDING? no: E N D, EN D"
    steps, flushed, dec = _run(tok, tok.byte_ids(text), stop=["END!"])
    assert _joined(steps, flushed) == text and dec.stop_matched is None


# ---- random token streams ---------------------------------------------------------------------


@st.composite
def _streams(draw):
    tok = _tokenizer()
    ids = draw(st.lists(st.integers(0, tok.vocab_size - 1), min_size=0, max_size=30))
    skip = draw(st.booleans())
    full = tok.decode(ids, skip).replace("\ufffd", "")
    stops = []
    for _ in range(draw(st.integers(0, 3))):
        if full and draw(st.booleans()):  # a substring of the text: likely to match
            a = draw(st.integers(0, len(full) - 1))
            stops.append(full[a : a + draw(st.integers(1, 6))])
        else:
            stops.append(draw(st.text(alphabet="abe é日😀 .\n", min_size=1, max_size=4)))
    return ids, stops, skip


@settings(max_examples=300, deadline=None)
@given(_streams())
def test_random_streams_keep_the_invariants(case):
    ids, stops, skip = case
    tok = _tokenizer()
    steps, flushed, dec = _run(tok, ids, stop=stops, skip=skip)
    want_text, want_stop = reference(tok, ids, stops, skip)
    got = _joined(steps, flushed)
    assert got == want_text == dec.text
    assert dec.stop_matched == want_stop
    assert not any(s in got for s in stops)
    if "\ufffd" not in tok.decode(ids, skip):
        assert all("\ufffd" not in s.delta for s in steps)
    # Never ahead of the text visible so far (complete characters only).
    released = ""
    for t, step in enumerate(steps, start=1):
        released += step.delta
        assert tok.decode(ids[:t], skip).rstrip("\ufffd").startswith(released)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 399), min_size=0, max_size=12), st.lists(st.integers(0, 399), max_size=30),
       st.booleans())
def test_decode_output_at_once_equals_incremental(tail, ids, skip):
    """The engine decodes non-streaming, stop-free outputs in one call: same text as streaming."""
    from braid.runtime.detokenizer import decode_output

    tok = _tokenizer()
    tail = [t % tok.vocab_size for t in tail]
    ids = [t % tok.vocab_size for t in ids]
    steps, flushed, _ = _run(tok, ids, skip=skip, tail=tail)
    assert decode_output(tok, ids, skip, tail) == _joined(steps, flushed)


def test_decode_output_with_a_character_split_from_the_prompt(tok):
    ids = tok.byte_ids("日本")
    tail, out = ids[:2], ids[2:]  # the first character's bytes straddle prompt and output
    steps, flushed, _ = _run(tok, out, tail=tail)
    from braid.runtime.detokenizer import decode_output

    assert decode_output(tok, out, True, tail) == _joined(steps, flushed)
