"""Action codecs: round trips (property-based), lenient spellings, invalid text -> counted no-op."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from envs.codecs import ActionCodec, default_codec
from envs.crafter_env import ACTIONS, crafter_codec


@given(st.integers(min_value=0, max_value=len(ACTIONS) - 1))
def test_crafter_round_trip(index):
    codec = crafter_codec()
    assert codec.decode(codec.encode(index)) == index
    assert codec.invalid_count == 0


@given(st.sampled_from(ACTIONS), st.sampled_from([str.upper, str.title, lambda s: f"  {s}\n"]))
def test_crafter_lenient_spellings(text, spell):
    codec = crafter_codec()
    assert codec.decode(spell(text.replace("_", " "))) == ACTIONS.index(text)


@given(st.text(max_size=30))
def test_arbitrary_text_never_crashes(text):
    codec = crafter_codec()
    index = codec.decode(text)
    assert 0 <= index < len(codec)
    if codec.try_decode(text) is None:
        assert index == codec.noop_index and codec.invalid_count == 1
    else:
        assert codec.invalid_count == 0


def test_invalid_text_maps_to_noop_and_is_counted():
    codec = crafter_codec()
    assert codec.decode("jump over the moon") == ACTIONS.index("noop")
    assert codec.decode("move_diagonal") == ACTIONS.index("noop")
    assert codec.decode("move_left") == ACTIONS.index("move_left")
    assert codec.invalid_count == 2


def test_encode_rejects_out_of_range():
    with pytest.raises(ValueError, match="outside 0..16"):
        crafter_codec().encode(17)


def test_default_codec_uses_meanings_and_finds_noop():
    codec = default_codec(3, ["LEFT", "NOOP", "RIGHT"])
    assert codec.vocab == ("left", "noop", "right")
    assert codec.noop == "noop"
    plain = default_codec(4)
    assert plain.vocab == ("action_0", "action_1", "action_2", "action_3")
    assert plain.noop == "action_0"
    repeated = default_codec(2, ["fire", "fire"])
    assert repeated.vocab == ("fire_0", "fire_1")


def test_codec_rejects_bad_vocabularies():
    with pytest.raises(ValueError, match="duplicate"):
        ActionCodec(["a", "a"], noop="a")
    with pytest.raises(ValueError, match="not in the vocabulary"):
        ActionCodec(["a", "b"], noop="c")
