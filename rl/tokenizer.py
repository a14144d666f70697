"""The text tokenizer: RIG's segment markers, and a small byte-level BPE for from-scratch presets.

A RIG policy writes one sequence per step: the task, the observed frame, reasoning, the action as
text, then the imagined next frame after RIG's fixed ``<Imagine:>`` marker. The markers that cut
that sequence into segments are special tokens: one id each, never split, and never produced by
merging ordinary text, so code can find a segment by looking for one id. How they are laid out::

    <bos> <task> collect wood <end>
          <observation> <image> x N <end>                 frame t (N placeholder ids)
          <reasoning> A tree is two steps left. <end>
          <action> move_left <end>                        action t, a codec string
          <Imagine:> <image> x N <end>                    imagined frame t+1
          <review> Wait! Let's re-observe... <end>        (lookahead: re-decide the action)
          <action> do <end>
    ... next step ...                                      <eos> ends the sequence, <pad> fills

Two rules the rest of ``rl/`` relies on (``rl.constrained`` checks the first):

- the action text follows ``<action>`` directly, with no space, and ``<end>`` closes it, so an
  action tokenizes the same wherever it appears (a special token cuts the text before byte-level
  pre-tokenisation, so what comes before the marker cannot change the action's tokens);
- ``<image>`` is only a placeholder: the model puts image embeddings (SigLIP features for a real
  frame, VQ-code embeddings for an imagined one) at those positions; its id is never predicted.

Nothing adds ``<bos>``/``<eos>`` behind the caller's back (no post-processor): whoever builds the
sequence writes them, and encoding one action string gives exactly its tokens.

Text written by someone else (a Reasoner's reasoning, a task description) may contain a marker's
spelling; encode such text with ``split_special_tokens=True`` so that it stays ordinary text.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # transformers costs seconds to import; only the functions below need it
    from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

# -- segment markers -----------------------------------------------------------------------------

PAD = "<pad>"
"""Padding after the end of a sequence (never attended to, never in a loss)."""
BOS = "<bos>"
"""Begins a sequence (one episode fragment)."""
EOS = "<eos>"
"""Ends a sequence: the episode ended, or the fragment was cut here."""
END = "<end>"
"""Ends the current segment. After an action it is the end-of-action token that constrained
decoding needs: it tells ``forward`` from ``forward, sprint``."""
TASK = "<task>"
"""Begins the task instruction (``collect wood``, ``find a cave``)."""
OBSERVATION = "<observation>"
"""Begins the region of a real frame: ``<image>`` placeholders up to the next ``<end>``."""
IMAGE = "<image>"
"""One image position (a SigLIP patch feature or a VQ code in the model), repeated N times."""
REASONING = "<reasoning>"
"""Begins the reasoning text Y that precedes an action."""
ACTION = "<action>"
"""Begins the action A, written as one string of the env's action codec."""
IMAGINE = "<Imagine:>"
"""RIG's fixed marker of imagined content: the predicted next frame (and its reasoning)."""
REVIEW = "<review>"
"""Begins RIG's review after a lookahead (``Wait! Let's re-observe...``), before re-deciding."""

SEGMENT_TOKENS: tuple[str, ...] = (
    PAD, BOS, EOS, END, TASK, OBSERVATION, IMAGE, REASONING, ACTION, IMAGINE, REVIEW,
)  # fmt: skip
"""Every marker, in id order for a tokenizer built by :func:`build_tokenizer` (``<pad>`` is 0)."""

_ROLES = (("pad_token", PAD), ("bos_token", BOS), ("eos_token", EOS))
"""Markers that play a role transformers knows; a checkpoint's own role tokens take precedence."""
_MARKERS = tuple(t for t in SEGMENT_TOKENS if t not in dict(_ROLES).values())

_FILES = ("tokenizer.json", "tokenizer_config.json")
"""What a tokenizer directory must hold (``special_tokens_map.json`` is written but optional:
transformers 5 keeps the special tokens in ``tokenizer_config.json``)."""


@dataclass(frozen=True)
class SegmentIds:
    """The id of every marker in one tokenizer. ``pad``/``bos``/``eos`` are the tokenizer's own
    role tokens (a checkpoint's ``<｜begin▁of▁sentence｜>`` stays its BOS); the others are ours."""

    pad: int
    bos: int
    eos: int
    end: int
    task: int
    observation: int
    image: int
    reasoning: int
    action: int
    imagine: int
    review: int


def _single_id(tok: PreTrainedTokenizerBase, text: str) -> int | None:
    """The one id ``text`` encodes to if it is an unsplittable added token, else None."""
    ids = tok(text, add_special_tokens=False)["input_ids"]
    if len(ids) == 1 and tok.convert_ids_to_tokens(ids[0]) == text:
        return int(ids[0])
    return None


def _role_id(tok: PreTrainedTokenizerBase, role: str) -> int | None:
    token = getattr(tok, role, None)
    return None if token is None else _single_id(tok, str(token))


def _missing_segments(tok: PreTrainedTokenizerBase) -> list[str]:
    missing = [role for role, _ in _ROLES if _role_id(tok, role) is None]
    return missing + [m for m in _MARKERS if _single_id(tok, m) is None]


def segment_ids(tok: PreTrainedTokenizerBase) -> SegmentIds:
    """Ids of all markers; ValueError naming the missing ones (fix: :func:`ensure_segment_tokens`)."""
    missing = _missing_segments(tok)
    if missing:
        raise ValueError(
            f"the tokenizer lacks segment tokens {missing}: call ensure_segment_tokens(tokenizer) "
            "and resize the model's embeddings to len(tokenizer)"
        )
    ids = {role.removesuffix("_token"): _role_id(tok, role) for role, _ in _ROLES}
    ids.update({m.strip("<>:").lower(): _single_id(tok, m) for m in _MARKERS})
    return SegmentIds(**{f.name: ids[f.name] for f in fields(SegmentIds)})


def ensure_segment_tokens(tok: PreTrainedTokenizerBase) -> int:
    """Add the markers ``tok`` lacks as special tokens; return how many ids were added.

    For a checkpoint's own tokenizer (Janus's, say): its pad/bos/eos roles are kept when set and
    filled with ours when not; every other marker is added. The caller must then grow the
    model's embeddings and output head to ``len(tok)`` (``model.resize_token_embeddings``); the
    new rows are untrained, which supervised fine-tuning on the RIG format fixes.
    """
    from tokenizers import AddedToken

    before = len(tok)
    for role, text in _ROLES:
        if _role_id(tok, role) is None:
            tok.add_special_tokens({role: AddedToken(text, special=True, normalized=False)})
    markers = [
        AddedToken(m, special=True, normalized=False)
        for m in _MARKERS
        if _single_id(tok, m) is None
    ]
    if markers:
        try:  # transformers 5 spelling, then 4's
            tok.add_special_tokens(
                {"extra_special_tokens": markers}, replace_extra_special_tokens=False
            )
        except TypeError:
            tok.add_special_tokens(
                {"additional_special_tokens": markers}, replace_additional_special_tokens=False
            )
    still = _missing_segments(tok)
    if still:  # e.g. a marker's spelling is already an ordinary vocabulary entry
        raise ValueError(f"could not make {still} single special tokens of this tokenizer")
    return len(tok) - before


# -- the built-in corpus -------------------------------------------------------------------------

_CRAFTER_THINGS = (
    "tree", "water", "stone", "coal", "iron", "diamond", "grass", "sand", "lava", "cow",
    "zombie", "skeleton", "table", "furnace", "sapling", "plant", "tunnel", "path",
)  # fmt: skip
_CRAFTER_ITEMS = (
    "wood", "stone", "coal", "iron", "diamond", "sapling", "wood_pickaxe", "stone_pickaxe",
    "iron_pickaxe", "wood_sword", "stone_sword", "iron_sword",
)  # fmt: skip
_CRAFTER_STATS = ("health", "food", "drink", "energy")
_DIRECTIONS = ("left", "right", "up", "down")
_NUMBER_WORDS = ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
_CRAFTER_GOALS = (
    "collect wood for a table", "make a wood pickaxe", "collect stone", "place a table",
    "make a stone pickaxe", "find coal and iron", "place a furnace", "make an iron pickaxe",
    "drink some water", "eat a cow", "sleep through the night", "defeat the zombie",
    "plant a sapling", "find a diamond", "build a shelter with stone", "stay away from lava",
)  # fmt: skip
_MC_THINGS = (
    "oak tree", "birch tree", "spruce log", "grass block", "dirt", "cobblestone", "sand",
    "cave entrance", "village", "river", "cow", "pig", "sheep", "zombie", "creeper",
    "crafting table", "furnace", "iron ore", "coal ore", "torch", "mountain", "flower",
)  # fmt: skip
_MC_PLACES = (
    "in front of me", "slightly to the left", "slightly to the right", "far to the left",
    "behind the hill", "below me", "above the horizon", "at the center of the view",
    "near the bottom of the screen", "just out of reach",
)  # fmt: skip
_MC_GOALS = (
    "chop the tree to collect logs", "walk towards it", "turn the camera to face it",
    "jump over the block", "mine it with the pickaxe", "open the inventory to craft planks",
    "select the hotbar slot with the sword", "place a block to climb up", "sprint across the field",
    "look around for a better view", "attack until the block breaks", "explore the cave",
)  # fmt: skip


def _a(thing: str) -> str:
    return f"{'an' if thing[0] in 'aeiou' else 'a'} {thing}"


def _crafter_lines() -> Iterator[str]:
    """Crafter reasoning in the voice of RIG's Reasoner and our scripted expert's goals."""
    n_things, n_dirs, n_goals = len(_CRAFTER_THINGS), len(_DIRECTIONS), len(_CRAFTER_GOALS)
    for i in range(160):
        thing = _CRAFTER_THINGS[i % n_things]
        far = _NUMBER_WORDS[(i * 5) % 8 + 1]  # "two".."nine": plural "steps"
        side = _DIRECTIONS[(i * 3) % n_dirs]
        goal = _CRAFTER_GOALS[(i * 7) % n_goals]
        item = _CRAFTER_ITEMS[(i * 11) % len(_CRAFTER_ITEMS)]
        stat = _CRAFTER_STATS[i % 4]
        level = (i * 13) % 10
        yield f"I see {_a(thing)} {far} steps to the {side}. I want to {goal}, so I move {side}."
        yield f"My {stat} is {level}/9 and I have {i % 6} {item}; the next goal is to {goal}."
        yield f"{stat}: {stat} is {level}/9, {thing} {(i * 7) % 12 + 1} steps away"
        if i % 2 == 0:
            yield (
                f"The {thing} is right next to me, facing {side}. Doing the action collects it; "
                f"after that I can {goal}."
            )
        if i % 4 == 0:
            yield (
                f"Wait! Let's re-observe. The {thing} is not {side} of me, it is "
                f"{_DIRECTIONS[(i * 3 + 1) % n_dirs]}, so move_{_DIRECTIONS[(i * 3 + 1) % n_dirs]} "
                "is the better action."
            )
        if i % 8 == 0:
            yield (
                "Inventory: "
                + ", ".join(f"{it} {(i + k) % 5}" for k, it in enumerate(_CRAFTER_ITEMS[:6]))
                + f". Health {level}/9, food {(level + 3) % 10}/9, drink {(level + 5) % 10}/9."
            )


def _minecraft_lines() -> Iterator[str]:
    """Minecraft reasoning in RIG's style: what is seen, where, what to do, and reviews."""
    n_things, n_places, n_goals = len(_MC_THINGS), len(_MC_PLACES), len(_MC_GOALS)
    for i in range(160):
        thing = _MC_THINGS[i % n_things]
        place = _MC_PLACES[(i * 3) % n_places]
        goal = _MC_GOALS[(i * 5) % n_goals]
        degrees = 5 * ((i * 7) % 4 + 1)
        yield f"There is {_a(thing)} {place}. I should {goal}."
        yield (
            f"The {thing} is about {degrees} degrees to the "
            f"{'right' if i % 2 else 'left'}, so I turn the camera and keep moving forward."
        )
        if i % 2 == 1:
            yield (
                f"I am looking {'down at the ground' if i % 4 == 1 else 'up at the sky'}; "
                f"pitch the camera {'up' if i % 4 == 1 else 'down'} by {degrees} degrees "
                f"to see the {thing} again."
            )
        if i % 4 == 0:
            yield (
                f"Wait! Let's re-observe the image. The {thing} is {place}, not "
                f"{_MC_PLACES[(i * 3 + 2) % n_places]}, so I should {goal} instead."
            )
        if i % 6 == 0:
            yield (
                f"If I {goal}, the next frame should show the {thing} closer and larger; "
                "the imagined view confirms it."
            )


def builtin_corpus() -> list[str]:
    """The training text of :func:`build_tokenizer`: a few hundred lines of Crafter and Minecraft
    reasoning plus every action string of the Crafter and MineRL codecs (so actions get compact
    tokens). Deterministic: no randomness, no set or dict order."""
    from envs.crafter_env import crafter_codec  # lazily: rl/ does not depend on envs/ at import
    from envs.minerl import MineRLCodec

    lines = [*_crafter_lines(), *_minecraft_lines()]
    lines += [f"I choose {a} because it moves me towards my goal." for a in crafter_codec().vocab]
    lines += list(crafter_codec().vocab) + list(MineRLCodec().vocab)
    return lines


# -- build, save, load ---------------------------------------------------------------------------


def build_tokenizer(
    extra_texts: Iterable[str] = (), vocab_size: int = 2048
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on :func:`builtin_corpus` plus ``extra_texts``, offline.

    Byte-level (GPT-2's scheme: text -> UTF-8 bytes -> 256 base symbols, GPT-2's split regex,
    no normaliser) so that every string round-trips exactly, emoji and control characters
    included; a normaliser (NFC, lower-casing) would break ``decode(encode(s)) == s``.
    The markers are the trainer's special tokens: ids ``0..len(SEGMENT_TOKENS)-1`` in
    ``SEGMENT_TOKENS`` order. ``vocab_size`` is an upper bound: training stops earlier when no
    pair occurs twice, so use ``len(tokenizer)`` to size the model's embeddings.

    Deterministic: the same corpus gives the same vocabulary and merges (the BPE trainer breaks
    ties between equally frequent pairs by their ids, which follow the sorted byte alphabet).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    smallest = 256 + len(SEGMENT_TOKENS)
    if vocab_size < smallest:
        raise ValueError(f"vocab_size must be at least {smallest} (256 bytes + markers)")
    corpus = [*builtin_corpus(), *(str(t) for t in extra_texts)]

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SEGMENT_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(corpus, trainer=trainer, length=len(corpus))
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        extra_special_tokens=list(_MARKERS),
        clean_up_tokenization_spaces=False,  # would rewrite " ," as "," and break round trips
    )


def save_tokenizer(tok: PreTrainedTokenizerBase, path: str | os.PathLike) -> Path:
    """Write ``tok`` in HF's directory format: ``tokenizer.json``, ``tokenizer_config.json`` and
    ``special_tokens_map.json``; ``AutoTokenizer.from_pretrained(path, local_files_only=True)``
    loads it. Returns the directory."""
    path = Path(path)
    tok.save_pretrained(path)
    config_file = path / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    # transformers 5 names its generic fast class "TokenizersBackend"; the older alias loads in
    # transformers 4 and 5 alike. A checkpoint's own class (LlamaTokenizerFast...) is kept.
    if config.get("tokenizer_class") in (None, "TokenizersBackend"):
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
        config_file.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    special = {
        role: str(getattr(tok, role))
        for role in ("bos_token", "eos_token", "unk_token", "pad_token")
        if getattr(tok, role, None) is not None
    }
    special["additional_special_tokens"] = [m for m in _MARKERS if m in tok.get_vocab()]
    (path / "special_tokens_map.json").write_text(
        json.dumps(special, indent=2, ensure_ascii=False) + "\n"
    )
    return path


def load_tokenizer(
    path: str | os.PathLike, require_segments: bool = True
) -> PreTrainedTokenizerFast:
    """Load a tokenizer directory without network access.

    ValueError when the directory or one of ``tokenizer.json``/``tokenizer_config.json`` is
    missing, and (``require_segments``) when the tokenizer lacks a segment marker. A
    checkpoint's own tokenizer lacks ours: load it with ``require_segments=False``, call
    :func:`ensure_segment_tokens`, and resize the model's embeddings.
    """
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"tokenizer directory {path} does not exist")
    missing = [f for f in _FILES if not (path / f).is_file()]
    if missing:
        found = sorted(p.name for p in path.iterdir())
        raise ValueError(
            f"tokenizer directory {path} lacks {missing} (HF fast-tokenizer format; "
            f"found {found}); save one with rl.tokenizer.save_tokenizer"
        )
    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    if require_segments and _missing_segments(tok):
        raise ValueError(
            f"the tokenizer in {path} lacks segment tokens {_missing_segments(tok)}: load it with "
            "require_segments=False, call ensure_segment_tokens(tokenizer) and resize the "
            "model's embeddings to len(tokenizer)"
        )
    return tok


__all__ = [
    "ACTION", "BOS", "END", "EOS", "IMAGE", "IMAGINE", "OBSERVATION", "PAD", "REASONING",
    "REVIEW", "SEGMENT_TOKENS", "TASK", "SegmentIds", "build_tokenizer", "builtin_corpus",
    "ensure_segment_tokens", "load_tokenizer", "save_tokenizer", "segment_ids",
]  # fmt: skip
