"""rl.tokenizer: markers are single ids, any text round-trips, save/load is exact, builds repeat."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rl import tokenizer as T


@pytest.fixture(scope="module")
def tok():
    return T.build_tokenizer()


def _ids(tokenizer, text: str, **kwargs) -> list[int]:
    return tokenizer(text, add_special_tokens=False, **kwargs)["input_ids"]


SAMPLE_TEXTS = [
    "I see a tree two steps to the left, so I move left.",
    f"{T.BOS}{T.TASK}collect wood{T.END}{T.OBSERVATION}{T.IMAGE * 4}{T.END}"
    f"{T.REASONING}A tree.{T.END}{T.ACTION}forward, sprint, camera:[0,10]{T.END}"
    f"{T.IMAGINE}{T.IMAGE * 4}{T.END}{T.REVIEW}Wait! Let's re-observe...{T.END}{T.EOS}",
    "Ünïcödé 🙂 \t\n\x00 中文  two  spaces",
]


def test_segment_tokens_are_single_ids_in_declared_order(tok):
    for i, marker in enumerate(T.SEGMENT_TOKENS):
        assert _ids(tok, marker) == [i], marker
    ids = T.segment_ids(tok)
    assert (ids.pad, ids.bos, ids.eos) == (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id)
    assert (ids.pad, ids.end, ids.action, ids.imagine) == (0, 3, 8, 9)
    assert T.IMAGINE == "<Imagine:>"  # RIG's own marker, spelled as in the paper


def test_markers_cut_a_sequence_and_survive_the_round_trip(tok):
    text = SAMPLE_TEXTS[1]
    ids = _ids(tok, text)
    assert tok.decode(ids) == text
    markers = [tok.convert_ids_to_tokens(i) for i in ids if i < len(T.SEGMENT_TOKENS)]
    assert markers == [
        T.BOS, T.TASK, T.END, T.OBSERVATION, *[T.IMAGE] * 4, T.END, T.REASONING, T.END,
        T.ACTION, T.END, T.IMAGINE, *[T.IMAGE] * 4, T.END, T.REVIEW, T.END, T.EOS,
    ]  # fmt: skip
    # The action's tokens in context are those of the string alone (what rl.constrained uses).
    start = ids.index(T.segment_ids(tok).action) + 1
    action = _ids(tok, "forward, sprint, camera:[0,10]")
    assert ids[start : start + len(action) + 1] == [*action, T.segment_ids(tok).end]


def test_ordinary_text_never_becomes_a_marker(tok):
    n = len(T.SEGMENT_TOKENS)
    spelled = {tok.decode([i]) for i in range(n, len(tok))}
    assert not spelled & set(T.SEGMENT_TOKENS)
    text = f"the reasoner wrote {T.ACTION} and {T.IMAGINE} in plain text"
    ids = _ids(tok, text, split_special_tokens=True)
    assert max(ids) >= n and min(ids) >= n  # no marker id at all
    assert tok.decode(ids) == text


def test_nothing_is_added_behind_the_callers_back(tok):
    assert tok("noop")["input_ids"] == _ids(tok, "noop")


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.one_of(st.text(max_size=40), st.sampled_from(T.SEGMENT_TOKENS)), max_size=8).map(
        "".join
    )
)
def test_any_text_round_trips(tok, text):
    assert tok.decode(_ids(tok, text)) == text


def test_save_and_load_give_identical_encodings(tok, tmp_path):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    path = T.save_tokenizer(tok, tmp_path / "tok")
    names = {p.name for p in path.iterdir()}
    assert {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"} <= names
    texts = SAMPLE_TEXTS + T.builtin_corpus()[::50]
    loaded = [
        T.load_tokenizer(path),
        AutoTokenizer.from_pretrained(str(path), local_files_only=True),
        PreTrainedTokenizerFast.from_pretrained(str(path), local_files_only=True),
    ]
    for again in loaded:
        assert len(again) == len(tok)
        assert T.segment_ids(again) == T.segment_ids(tok)
        assert [_ids(again, t) for t in texts] == [_ids(tok, t) for t in texts]
        assert [again.decode(_ids(again, t)) for t in texts] == texts


def test_load_names_what_is_missing(tok, tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        T.load_tokenizer(tmp_path / "nowhere")
    path = T.save_tokenizer(tok, tmp_path / "tok")
    (path / "tokenizer.json").unlink()
    with pytest.raises(ValueError, match=r"lacks \['tokenizer.json'\]"):
        T.load_tokenizer(path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"lacks \['tokenizer.json', 'tokenizer_config.json'\]"):
        T.load_tokenizer(tmp_path / "empty")


def _foreign_tokenizer():
    """Stands in for a checkpoint's own tokenizer: its own EOS, none of our markers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["</s>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )  # fmt: skip
    bpe.train_from_iterator(["hello world"] * 3, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="</s>")


def test_a_checkpoint_tokenizer_gets_the_markers_it_lacks(tmp_path):
    foreign = _foreign_tokenizer()
    foreign.save_pretrained(tmp_path / "ckpt")
    with pytest.raises(ValueError, match="ensure_segment_tokens"):
        T.load_tokenizer(tmp_path / "ckpt")
    with pytest.raises(ValueError, match="ensure_segment_tokens"):
        T.segment_ids(foreign)

    ckpt = T.load_tokenizer(tmp_path / "ckpt", require_segments=False)
    size = len(ckpt)
    # pad and bos are missing (filled with ours), eos is the checkpoint's own, 8 markers added
    assert T.ensure_segment_tokens(ckpt) == 2 + 8 == len(ckpt) - size
    assert T.ensure_segment_tokens(ckpt) == 0
    ids = T.segment_ids(ckpt)
    assert ids.eos == _ids(ckpt, "</s>")[0] and ids.action == _ids(ckpt, T.ACTION)[0] >= size
    T.save_tokenizer(ckpt, tmp_path / "ready")
    assert T.segment_ids(T.load_tokenizer(tmp_path / "ready")) == ids


def test_build_is_deterministic_and_uses_extra_texts(tok):
    assert T.build_tokenizer().backend_tokenizer.to_str() == tok.backend_tokenizer.to_str()
    # Another process with another hash seed: no set or dict order leaks into the vocabulary.
    code = "from rl.tokenizer import build_tokenizer; print(build_tokenizer().backend_tokenizer.to_str())"
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == tok.backend_tokenizer.to_str()

    assert len(_ids(tok, "glowstone")) > 1
    extra = T.build_tokenizer(extra_texts=["glowstone lights the cave"] * 5)
    assert len(_ids(extra, "glowstone")) == 1


def test_vocab_size_bounds_the_vocabulary(tok):
    small = T.build_tokenizer(vocab_size=300)
    assert len(small) == 300 < len(tok) <= 2048
    assert small.decode(_ids(small, SAMPLE_TEXTS[1])) == SAMPLE_TEXTS[1]
    with pytest.raises(ValueError, match="at least 267"):
        T.build_tokenizer(vocab_size=100)
