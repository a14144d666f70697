"""Constrained decoding of actions: the policy can only write strings of the codec's vocabulary.

RIG writes its action as text, so an unconstrained model can write ``forwrad`` or a camera angle
off the 5-degree grid. We never let it: while it writes the action, every logit outside the
vocabulary's token paths is set to -inf, so each sampled action is valid and its index is known
without parsing text. The paths live in a prefix trie over token ids::

    vocab "noop", "forward", "forward, sprint"; END closes every path; [i] = leaf of index i

    root --noop----> o --END--> [0]
      '---forward--> o --END--> [1]
                     '---,----> o --" sprint"--> o --END--> [2]

    (each leaf loops to itself on END: see ActionTrie)

Without END, ``forward`` would be a prefix of ``forward, sprint`` and the decoder could not know
when to stop; with it, every action is one path root -> leaf.

Alignment with the sequence (the learner must take the logits one position to the left)::

    tokens:        ... <action>   t0      t1      t2     <end>  <Imagine:> ...
    logits from:       <action>   t0      t1      t2            -> predict t0, t1, t2, <end>
    trie node:         root       n1      n2      n3             (the node *before* each token)

The probabilities are those of the masked, renormalised distribution
``softmax(masked_fill(logits / T, ~allowed, -inf))``, not the model's raw softmax. PPO's ratio
``exp(logp_new - logp_old)`` is only right if the learner recomputes exactly that: the same mask
(the trie node before each action token), the same temperature, float32. Use
:meth:`ActionTrie.masked_log_probs` on the learner's logits at those positions; the sampler
uses the same :meth:`ActionTrie.log_softmax`, so the numbers agree up to the logits themselves.

Batched state: one trie node id per batch row, a ``(B,)`` int64 tensor. Per step,
``allowed_mask`` is one gather and one scatter over the few children of each node (tables built
once per device), never a Python loop over the vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from rl.tokenizer import ACTION, END


@dataclass(frozen=True)
class _Tables:
    """The trie as tensors on one device. N nodes, K = most children of a node; rows with fewer
    children repeat their first child, so scatter and match need no validity mask."""

    child_tokens: torch.Tensor  # (N, K) int64 token ids of the children
    child_nodes: torch.Tensor  # (N, K) int64 node ids of the children
    action: torch.Tensor  # (N,) int64 codec index at a leaf, -1 elsewhere
    choices: torch.Tensor  # (N,) int64 number of distinct tokens allowed at the node


@dataclass(frozen=True)
class ActionSample:
    """What :func:`sample_actions` returns. L = the longest path written in this batch (at most
    ``trie.max_len``). Positions after a row's END are padding: token END, log-prob 0, ``valid``
    False."""

    tokens: torch.Tensor  # (B, L) int64 action token ids, END included
    log_probs: torch.Tensor  # (B, L) float32 log-prob of each token under the masked distribution
    valid: torch.Tensor  # (B, L) bool, True where a token was written
    actions: torch.Tensor  # (B,) int64 codec index of each row's action


class ActionTrie:
    """Prefix trie over the token ids of every action string, each ending with ``eos_id``.

    Args:
        token_sequences: ``token_sequences[i]`` is the token path of codec index ``i``, ending in
            ``eos_id`` (the end-of-action token, ``<end>``) and containing it nowhere else.
        eos_id: the end-of-action token id.

    A finished row sits at its leaf, whose only allowed token is ``eos_id`` and which loops to
    itself: rows that finish early keep stepping harmlessly while the rest of the batch decodes.
    """

    def __init__(self, token_sequences: Sequence[Sequence[int]], eos_id: int):
        if not token_sequences:
            raise ValueError("an action trie needs at least one token sequence")
        self.eos_id = int(eos_id)
        self.sequences = tuple(tuple(int(t) for t in seq) for seq in token_sequences)
        children: list[dict[int, int]] = [{}]
        action = [-1]
        for index, seq in enumerate(self.sequences):
            if not seq or seq[-1] != self.eos_id or self.eos_id in seq[:-1]:
                raise ValueError(
                    f"sequence {index} {list(seq)} must end with the end-of-action id "
                    f"{self.eos_id} and contain it nowhere else"
                )
            node = 0
            for token in seq:
                if token < 0:
                    raise ValueError(f"sequence {index} has a negative token id {token}")
                if token not in children[node]:
                    children[node][token] = len(children)
                    children.append({})
                    action.append(-1)
                node = children[node][token]
            if action[node] != -1:
                raise ValueError(
                    f"actions {action[node]} and {index} have the same token sequence {list(seq)}"
                )
            action[node] = index
        for node, index in enumerate(action):
            if index >= 0:
                children[node][self.eos_id] = node  # leaf: END loops to itself

        width = max(len(c) for c in children)
        tokens = [[*c, *[next(iter(c))] * (width - len(c))] for c in children]
        nodes = [[*c.values(), *[next(iter(c.values()))] * (width - len(c))] for c in children]
        self._cpu = _Tables(
            child_tokens=torch.tensor(tokens, dtype=torch.int64),  # (N, K)
            child_nodes=torch.tensor(nodes, dtype=torch.int64),  # (N, K)
            action=torch.tensor(action, dtype=torch.int64),  # (N,)
            choices=torch.tensor([len(c) for c in children], dtype=torch.int64),  # (N,)
        )
        self._by_device: dict[torch.device, _Tables] = {torch.device("cpu"): self._cpu}
        self.num_nodes = len(children)
        self.max_len = max(len(seq) for seq in self.sequences)
        """Longest path in tokens, END included: a decoding loop never needs more steps."""
        self.max_token_id = max(max(seq) for seq in self.sequences)

    def __len__(self) -> int:
        return len(self.sequences)

    def __repr__(self) -> str:
        return f"ActionTrie({len(self)} actions, {self.num_nodes} nodes, max_len={self.max_len})"

    def _tables(self, device: torch.device) -> _Tables:
        if device not in self._by_device:
            self._by_device[device] = _Tables(*(t.to(device) for t in vars(self._cpu).values()))
        return self._by_device[device]

    # -- per-step API (what a KV-cached sampling loop calls) ------------------------------------

    def root(self, batch: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """Start state: every row at the root. ``(batch,)`` int64."""
        return torch.zeros(batch, dtype=torch.int64, device=device)

    def allowed_mask(self, nodes: torch.Tensor, vocab_size: int) -> torch.Tensor:
        """``(B, V)`` bool: True for the tokens that continue a valid path from each row's node.

        ``vocab_size`` is the width of the model's logits (may exceed ``len(tokenizer)``)."""
        if vocab_size <= self.max_token_id:
            raise ValueError(
                f"vocab_size {vocab_size} is too small for action token id {self.max_token_id}"
            )
        t = self._tables(nodes.device)
        mask = torch.zeros(nodes.shape[0], vocab_size, dtype=torch.bool, device=nodes.device)
        return mask.scatter_(1, t.child_tokens[nodes], True)  # (B, V)

    def advance(self, nodes: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        """Next node of each row after writing ``token_ids`` ``(B,)``; ValueError if a token is not
        allowed there (a bug in the caller: the mask makes it impossible)."""
        t = self._tables(nodes.device)
        match = t.child_tokens[nodes] == token_ids.to(nodes.device).unsqueeze(1)  # (B, K)
        found = match.any(1)  # (B,)
        if not bool(found.all()):
            row = int((~found).nonzero()[0, 0])
            raise ValueError(
                f"token {int(token_ids[row])} is not allowed at trie node {int(nodes[row])} "
                f"(batch row {row}); apply allowed_mask before sampling"
            )
        first = match.to(torch.uint8).argmax(1, keepdim=True)  # (B, 1) first matching child
        return t.child_nodes[nodes].gather(1, first).squeeze(1)  # (B,)

    def is_done(self, nodes: torch.Tensor) -> torch.Tensor:
        """``(B,)`` bool: the row has written END and sits at a leaf."""
        return self._tables(nodes.device).action[nodes] >= 0

    def num_choices(self, nodes: torch.Tensor) -> torch.Tensor:
        """``(...)`` int64 how many tokens each node allows: 1 means the next token is forced
        (log-prob 0 whatever the logits), e.g. the second token of an action no other action
        shares a first token with, or END at a leaf."""
        return self._tables(nodes.device).choices[nodes]

    def choice_edges(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The trie's choices as tables on the CPU: ``(child_tokens, edges)``, both ``(N, K)``
        int64. ``edges[n, k]`` numbers the child ``k`` of node ``n`` (0 .. E-1, node by node)
        where the node allows more than one token, and is -1 at forced tokens and at padding
        slots (which repeat the node's first child in ``child_tokens``). What a read-out that
        scores each choice needs (``rl.heads.ActionHead``)."""
        t = self._cpu
        slots = torch.arange(t.child_tokens.shape[1]).expand_as(t.child_tokens)  # (N, K)
        real = (slots < t.choices[:, None]) & (t.choices[:, None] > 1)
        edges = torch.full_like(t.child_tokens, -1)
        edges[real] = torch.arange(int(real.sum()))
        return t.child_tokens.clone(), edges

    def action_index(self, nodes: torch.Tensor) -> torch.Tensor:
        """``(B,)`` int64 codec index of each finished row; -1 where the row is not done."""
        return self._tables(nodes.device).action[nodes]

    def sequence(self, action: int) -> tuple[int, ...]:
        """Token ids of codec index ``action``, END included (to teacher-force a given action)."""
        return self.sequences[int(action)]

    # -- the masked distribution, shared by actor and learner ------------------------------------

    def log_softmax(
        self, logits: torch.Tensor, nodes: torch.Tensor, temperature: float = 1.0
    ) -> torch.Tensor:
        """Log-probs of the masked, tempered distribution: ``(..., V)`` logits and ``(...)`` nodes
        give ``(..., V)`` float32, -inf off the allowed tokens. Every row has one allowed token
        at least (a leaf allows END), so no row is all -inf."""
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        vocab = logits.shape[-1]
        mask = self.allowed_mask(nodes.reshape(-1), vocab).view(*nodes.shape, vocab)
        scaled = logits.float() / temperature  # float32 on both sides: act == evaluate
        return torch.log_softmax(scaled.masked_fill(~mask, float("-inf")), dim=-1)

    def path_nodes(self, tokens: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Replay action tokens through the trie: ``(B, L)`` tokens and ``valid`` give the
        ``(B, L)`` node *before* each token, i.e. the mask that was applied when it was sampled.
        Invalid positions (padding) do not move the row."""
        batch, length = tokens.shape
        nodes = self.root(batch, tokens.device)
        out = torch.empty_like(tokens)  # (B, L)
        for j in range(length):
            out[:, j] = nodes
            rows = valid[:, j]
            nodes = nodes.clone()
            nodes[rows] = self.advance(nodes[rows], tokens[rows, j])
        return out

    def masked_log_probs(
        self,
        logits: torch.Tensor,
        tokens: torch.Tensor,
        valid: torch.Tensor,
        temperature: float = 1.0,
    ) -> torch.Tensor:
        """The learner's recomputation of :attr:`ActionSample.log_probs`.

        Args:
            logits: ``(B, L, V)`` the logits that predict each action token (from the position
                before it: see the module docstring's timeline).
            tokens: ``(B, L)`` int64 action tokens, END included; padding anywhere ``valid`` is
                False.
            valid: ``(B, L)`` bool.
            temperature: the sampler's temperature.

        Returns ``(B, L)`` float32 log-probs under the masked distribution, 0 where not valid;
        differentiable with respect to ``logits``.
        """
        nodes = self.path_nodes(tokens, valid)  # (B, L)
        logp = self.log_softmax(logits, nodes, temperature)  # (B, L, V)
        safe = tokens.masked_fill(~valid, self.eos_id)  # padding may hold any id
        taken = logp.gather(-1, safe.unsqueeze(-1)).squeeze(-1)  # (B, L)
        return taken.masked_fill(~valid, 0.0)


def build_action_trie(
    tokenizer, vocab: Sequence[str], marker: str | None = ACTION, end: str = END
) -> ActionTrie:
    """The trie of ``vocab`` (a codec's ``vocab``; index i = codec index i) for ``tokenizer``.

    Each string is tokenized the way it appears in a sequence: right after ``marker`` (no space)
    and closed by ``end``. We encode ``marker + text`` and drop the marker's ids, so a tokenizer
    that treats text after a special token differently (a SentencePiece ``▁`` prefix, say) still
    gets the path the model will write; for ours (byte-level, no prefix space) it equals encoding
    the text alone. ``marker=None`` encodes the text alone.

    ValueError if ``end`` is not one token, if a path does not decode back to its exact string
    (the model could not write it), or if two strings share a path.
    """
    end_ids = tokenizer(end, add_special_tokens=False)["input_ids"]
    if len(end_ids) != 1:
        raise ValueError(f"the end-of-action token {end!r} must be one id, got {end_ids}")
    prefix = [] if marker is None else tokenizer(marker, add_special_tokens=False)["input_ids"]
    sequences = []
    for index, text in enumerate(vocab):
        ids = tokenizer((marker or "") + text, add_special_tokens=False)["input_ids"]
        if ids[: len(prefix)] != prefix:
            raise ValueError(f"{marker!r} tokenizes differently before action {text!r}: {ids}")
        ids = list(ids[len(prefix) :])
        decoded = tokenizer.decode(
            ids, skip_special_tokens=False, clean_up_tokenization_spaces=False
        )
        if decoded != text or end_ids[0] in ids:
            raise ValueError(
                f"action {index} {text!r} tokenizes to {ids}, which decodes to {decoded!r}"
            )
        sequences.append(ids + end_ids)
    first: dict[tuple[int, ...], int] = {}
    for index, ids in enumerate(sequences):
        other = first.setdefault(tuple(ids), index)
        if other != index:
            raise ValueError(
                f"actions {vocab[other]!r} ({other}) and {vocab[index]!r} ({index}) share the "
                f"token sequence {ids}"
            )
    return ActionTrie(sequences, eos_id=end_ids[0])


def sample_actions(
    logits_fn: Callable[[torch.Tensor], torch.Tensor],
    trie: ActionTrie,
    batch: int,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
    greedy: bool = False,
    device: torch.device | str = "cpu",
) -> ActionSample:
    """Reference decoding loop: sample one action per row under the trie's mask.

    Args:
        logits_fn: ``prefix (B, t) int64 -> (B, V) logits`` of the next action token, given the
            action tokens written so far (``t = 0`` first; the policy's version feeds the last
            token to a KV-cached model).
        trie: from :func:`build_action_trie`.
        batch: rows B.
        temperature: divides the logits before masking; the log-probs are of that tempered,
            masked distribution, and the learner must use the same temperature.
        generator: torch generator on the logits' device, for reproducible draws.
        greedy: take the most likely allowed token (log-probs still under the sampler's
            distribution).
        device: where the empty first prefix lives.

    Log-probs are of ``softmax(masked_fill(logits / T, ~mask, -inf))``; recompute them with
    :meth:`ActionTrie.masked_log_probs` on the same logits.
    """
    prefix = torch.zeros(batch, 0, dtype=torch.int64, device=device)  # (B, t)
    nodes = None
    log_probs, valid = [], []  # per step: (B,) float32, (B,) bool
    for _ in range(trie.max_len):
        logits = logits_fn(prefix)  # (B, V)
        if nodes is None:
            nodes = trie.root(batch, logits.device)
            prefix = prefix.to(logits.device)
        active = ~trie.is_done(nodes)  # (B,) rows still writing
        logp = trie.log_softmax(logits, nodes, temperature)  # (B, V)
        if greedy:
            token = logp.argmax(-1)  # (B,)
        else:
            token = torch.multinomial(logp.exp(), 1, generator=generator).squeeze(1)  # (B,)
        log_probs.append(logp.gather(1, token.unsqueeze(1)).squeeze(1).masked_fill(~active, 0.0))
        valid.append(active)
        prefix = torch.cat([prefix, token.unsqueeze(1)], dim=1)
        nodes = trie.advance(nodes, token)
        if bool(trie.is_done(nodes).all()):
            break
    assert nodes is not None and bool(trie.is_done(nodes).all())  # every path <= max_len
    return ActionSample(
        tokens=prefix,
        log_probs=torch.stack(log_probs, dim=1),
        valid=torch.stack(valid, dim=1),
        actions=trie.action_index(nodes),
    )


__all__ = ["ActionSample", "ActionTrie", "build_action_trie", "sample_actions"]
