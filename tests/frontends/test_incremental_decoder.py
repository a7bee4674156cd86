"""IncrementalDecoder: streamed pieces concatenate to the one-shot decode, for both test tokenizers."""
from paths import SMOL_TOKENIZER, STORIES_HF
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reft.frontends.tokenizer import IncrementalDecoder, Tokenizer

DIRS = {"stories": str(STORIES_HF), "smol": str(SMOL_TOKENIZER)}
TEXTS = [
    "Once upon a time, there was a little girl.",
    "café au lait, é è ê, naïve",
    "中文 text mixed with 日本語",
    "emoji 😀🎉👩‍👩‍👧 and flags 🇫🇷!",
    "  leading spaces\n\n\ttabs  and  doubles ",
    "é",
    "",
]
TOKS = {name: Tokenizer.from_dir(d) for name, d in DIRS.items()}


def _stream(tok, ids, prompt=(), skip=False):
    dec = IncrementalDecoder(tok, prompt, skip_special_tokens=skip)
    pieces = [dec.push(i) for i in ids]
    return pieces, pieces + [dec.flush()]


@pytest.mark.parametrize("name", DIRS)
@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("skip", [False, True])
def test_concatenation_equals_decode(name, text, skip):
    tok = TOKS[name]
    ids = tok.encode(text)
    pieces, everything = _stream(tok, ids, skip=skip)
    assert "".join(everything) == tok.decode(ids, skip_special_tokens=skip)
    assert not any("\ufffd" in p for p in pieces)  # multi-byte characters are never split
    assert "".join(pieces) == "".join(everything)  # valid text needs no flush


@pytest.mark.parametrize("name", DIRS)
@pytest.mark.parametrize("text", TEXTS[:5])
def test_with_prompt(name, text):
    tok = TOKS[name]
    prompt = tok.encode("The story: ")
    ids = tok.encode(text, add_special_tokens=False)
    _, everything = _stream(tok, ids, prompt)
    full, head = tok.decode(prompt + ids), tok.decode(prompt)
    assert full.startswith(head)
    assert "".join(everything) == full[len(head):]


def test_stories_leading_space_kept_after_prompt():
    tok = TOKS["stories"]
    prompt = tok.encode("Once upon a")
    pieces, _ = _stream(tok, [tok.token_to_id("▁time")], prompt)
    assert pieces == [" time"]


def test_prompt_window_not_started_inside_a_character():
    tok = TOKS["stories"]
    ids = tok.encode(' 日😀文  👧üd"')  # 日 and 😀 are byte tokens: 5 back from id 9 is mid-日
    _, everything = _stream(tok, ids[9:], ids[:9])
    assert "".join(everything) == '文  👧üd"'


def test_byte_fallback_held_until_complete():
    tok = TOKS["stories"]
    ids = [tok.token_to_id(f"<0x{b:02X}>") for b in "中".encode()]
    pieces, everything = _stream(tok, ids)
    assert pieces == ["", "", "中"]


def test_invalid_bytes_come_out_on_flush():
    tok = TOKS["stories"]
    ids = [tok.token_to_id("▁a"), tok.token_to_id("<0xE4>"), tok.token_to_id("<0xB8>")]
    pieces, everything = _stream(tok, ids)
    assert pieces == ["a", "", ""] and "".join(everything) == tok.decode(ids)
    assert everything[-1].endswith("\ufffd")


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(sorted(DIRS)), st.text(max_size=30), st.integers(0, 8))
def test_random_text(name, text, cut):
    tok = TOKS[name]
    ids = tok.encode(text)
    prompt, gen = ids[:cut], ids[cut:]
    _, everything = _stream(tok, gen, prompt)
    full, head = tok.decode(prompt + gen), tok.decode(prompt)
    if full.startswith(head):  # a prompt cut inside a character has no clean text boundary
        assert "".join(everything) == full[len(head):]


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(sorted(DIRS)), st.lists(st.integers(0, 511), max_size=20))
def test_random_ids(name, ids):
    tok = TOKS[name]
    _, everything = _stream(tok, ids)
    want = tok.decode(ids)
    # an invalid run of byte-fallback tokens decodes to one U+FFFD per token, even bytes already
    # shown (b"\x00" alone is "\x00", b"\x00\x80" is two U+FFFD): streaming cannot take text back
    if "\ufffd" not in want:
        assert "".join(everything) == want
