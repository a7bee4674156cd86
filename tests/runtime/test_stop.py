"""Stop strings over streamed pieces: nothing after (or of) a stop string is ever shown."""
from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from reft.runtime.stop import StopStrings


def stream(pieces, stops):
    s = StopStrings(stops)
    out = "".join(s.push(p) for p in pieces)
    if not s.stopped:
        out += s.flush()
    return out, s.stopped


def test_stop_split_across_pieces():
    assert stream(["Hello wo", "r", "ld and more"], ["world"]) == ("Hello ", True)


def test_held_back_prefix_released_when_not_a_stop():
    s = StopStrings(["world"])
    assert s.push("say wor") == "say "
    assert s.push("k") == "work"


def test_earliest_of_several_stops():
    assert stream(["a STOP b END"], ["END", "STOP"]) == ("a ", True)


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet="abc", max_size=30), st.lists(st.text(alphabet="abc", min_size=1, max_size=3),
                                                      max_size=3), st.data())
def test_matches_plain_search(text, stops, data):
    cuts = sorted(data.draw(st.lists(st.integers(0, len(text)), max_size=6)))
    pieces = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
    # Generation ends with the piece in which a stop string first completes; the text is cut at
    # the earliest stop string found in everything received up to that piece.
    ends = [b for b in cuts + [len(text)] if any(s in text[:b] for s in stops)]
    if ends:
        seen = text[:ends[0]]
        want = seen[:min(seen.find(s) for s in stops if s in seen)]
    else:
        want = text
    assert stream(pieces, stops) == (want, bool(ends))
