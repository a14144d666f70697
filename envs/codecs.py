"""Action codecs: the finite vocabulary of action strings an env accepts, and text <-> action.

The policy writes its action as text (RIG: ``forward, sprint, camera:[0,10]``). Every env of
ours has a ``Discrete(len(codec))`` action space whose index ``i`` means ``codec.vocab[i]``, so
one codec serves three callers:

- the policy, which constrains its decoding to ``codec.vocab`` (every sampled action is valid);
- the env, which turns an index into the game's own action (``MineRLCodec.to_minerl``);
- the data pipeline, which turns recorded game actions back into text (``encode``).

Text that is not in the vocabulary is never a crash: ``decode`` maps it to the documented
fallback, ``codec.noop`` (the action that does nothing), and counts it in ``invalid_count``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

_SPACES = re.compile(r"\s+")


class ActionCodec:
    """A fixed, ordered vocabulary of action strings.

    ``canonical(text)`` normalises free text to a vocabulary entry or returns None; subclasses
    override it to accept more spellings (the default lower-cases, trims, and reads spaces and
    dashes as underscores, so ``"Move Left"`` is ``move_left``).
    """

    def __init__(self, vocab: Sequence[str], noop: str):
        vocab = tuple(vocab)
        if not vocab:
            raise ValueError("an action vocabulary needs at least one entry")
        if len(set(vocab)) != len(vocab):
            raise ValueError(f"duplicate entries in the action vocabulary: {vocab}")
        if noop not in vocab:
            raise ValueError(f"the fallback action {noop!r} is not in the vocabulary")
        self.vocab = vocab
        self.noop = noop
        self.noop_index = vocab.index(noop)
        self.invalid_count = 0
        self._index = {text: i for i, text in enumerate(vocab)}

    def __len__(self) -> int:
        return len(self.vocab)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self)} actions, noop={self.noop!r})"

    def canonical(self, text: str) -> str | None:
        """The vocabulary entry that ``text`` spells, or None."""
        key = _SPACES.sub("_", str(text).strip().lower().replace("-", "_"))
        return key if key in self._index else None

    def try_decode(self, text: str) -> int | None:
        """Action index for ``text``, or None when it is not a valid action (not counted)."""
        entry = self.canonical(text)
        return None if entry is None else self._index[entry]

    def decode(self, text: str) -> int:
        """Action index for ``text``; invalid text gives ``noop_index`` and is counted."""
        index = self.try_decode(text)
        if index is None:
            self.invalid_count += 1
            return self.noop_index
        return index

    def encode(self, action: int) -> str:
        """The text of action index ``action``."""
        action = int(action)
        if not 0 <= action < len(self.vocab):
            raise ValueError(f"action index {action} is outside 0..{len(self.vocab) - 1}")
        return self.vocab[action]


def default_codec(num_actions: int, meanings: Sequence[str] | None = None) -> ActionCodec:
    """Codec for a generic discrete env: its action meanings if it names them, else ``action_i``.

    The fallback is the first of ``noop``/``none``/``stay``/``idle`` among the meanings, else
    action 0 (which is what Atari and most grid worlds use for "do nothing").
    """
    if meanings is not None and len(meanings) == num_actions:
        vocab = [_SPACES.sub("_", str(m).strip().lower()) for m in meanings]
    else:
        vocab = [f"action_{i}" for i in range(num_actions)]
    if len(set(vocab)) != len(vocab):  # repeated meanings: keep them apart by index
        vocab = [f"{m}_{i}" for i, m in enumerate(vocab)]
    noop = next((m for m in vocab if m in ("noop", "none", "stay", "idle")), vocab[0])
    return ActionCodec(vocab, noop=noop)
