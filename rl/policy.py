"""The RIG policy: one Janus transformer that reads the frame, writes reasoning, then an action,
and can imagine what its action leads to before committing (lookahead with review).

One env step is one sequence (full layout and diagrams: docs/policy.md)::

    prompt (P columns, left-padded per row)                                    generated (L columns)
    <bos> <task> text <end>                                        task (per row)
    [<observation> <image> x G <end> <action> a <end>] x k         history: the last k steps
    <observation> <image> x G <end>                                the frame now
    [<reasoning> r <end> <action> a <end> <Imagine:> c x G <end>] x n     lookahead (n >= 0)
    [<review>] <reasoning>                                      |  r1 .. rk <end> <action> a1 .. am <end>

``<image>`` x G are placeholders where the model puts the SigLIP features of an observed frame
(G = ``image_tokens_per_frame``); ``c x G`` are VQ codes of an imagined frame, which enter the LM
through the generation embeddings (``prompt_codes`` marks their columns). Frames are normalised as
``x / 127.5 - 1`` (mean = std = 0.5, what the released Janus checkpoints'
``preprocessor_config.json`` uses; transformers' ``JanusImageProcessor`` class default is CLIP's
mean/std, which we do not use).

The policy gradient acts on the generated columns only (the final reasoning and action); the
lookahead chain is context the policy wrote for itself, like the history: ``evaluate`` reads it
back from the prompt, so the learner scores the final decision under exactly what ``act`` saw.

Off by one: the logits at position i predict the token at i + 1::

    position:    P-1          P     ..  P+k-1   P+k     P+k+1    ..  P+k+m+1
    token:       <reasoning>  r1    ..  rk      <end>   <action> a1 .. <end>
    its logits predict:       r1    r2 ..       <end>   <action>  a1     a2 .. <end>  (sampled)
                                                        (forced)

The value head reads the hidden state at the first ``<reasoning>`` (the last column of the
prompt before any lookahead: task, history and the frame now, nothing the policy sampled), so
V(s) is a baseline of the state alone. Read after the sampled reasoning it would be
V(s, reasoning) ~ Q(s, reasoning), and GAE would give the reasoning tokens no advantage.

So generated column j is predicted by the hidden state at absolute position P + j - 1: the
learner takes ``hidden[:, P-1 : P+L-1]``.

Which tokens are sampled (and scored): reasoning tokens and the ``<end>`` that closes them (from
the tempered softmax with the segment markers other than ``<end>`` banned, since an ``<image>``
or ``<pad>`` in the text would corrupt the sequence), and the action tokens with their ``<end>``
(from the trie-masked tempered softmax, ``rl.constrained``). Forced tokens (``<action>``, and the
``<end>`` that closes reasoning cut by the cap) have log-prob 0 and no mask bit.

Batching: rows decode in lockstep with one KV cache. Prompts of different lengths (tasks, history)
are left-padded; a row that has finished its reasoning feeds ``<pad>`` columns with attention 0
until every row has, so ``<action>`` sits in the same column for all rows. ``position_ids =
cumsum(attention) - 1`` makes each row's positions those of its own unpadded sequence.
``evaluate`` rebuilds exactly this layout (same columns, same mask, same positions) in one
forward, so its log-probs equal ``act``'s to float32 rounding.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from rl.constrained import ActionTrie, build_action_trie
from rl.heads import ActionHead, FrameHead, ValueHead
from rl.imagine import (
    ImagineOutput,
    WorldHeads,
    code_embeds,
    code_logits,
    decode_codes,
    frame_codes,
    sample_frame,
)  # fmt: skip
from rl.tokenizer import SegmentIds, segment_ids

if TYPE_CHECKING:
    from transformers import JanusForConditionalGeneration, PreTrainedTokenizerBase

    from envs.codecs import ActionCodec

LEGACY_VALUE_KEYS = {"value_head.0.weight", "value_head.2.weight"}
HEAD_INNER_KEY = "value_head.inner.0.weight"  # (head_hidden, features): the heads' hidden layer
ACTION_HEAD_KEYS = {"action_head.weight"}
FRAME_HEAD_KEY = "frame_head.out.weight"  # (V_vq, frame_head): the frame head's output layer
OUTCOME_KEYS = {"frame_head.outcome_out.weight", "frame_head.outcome_out.bias"}
HEADS_FILE = "rig_heads.safetensors"

SEES = ("frames", "reconstructions")
"""What the vision path reads (``policy.sees``): each frame as given, or its reconstruction
through the policy's own VQ, ``decode(encode(x))`` (:meth:`RigPolicy.reconstruct`). Kept in the
heads file's metadata, since the heads were fitted to one of them."""

READS_TRUNK_ONLY = ("model.generation_head.", "lm_head.")
"""``self.model``'s parameters that read the trunk's hidden states and feed nothing back into them
(the next-frame codes enter through the generation embeddings and aligner, not the head; a tied
``lm_head`` is named as the input embedding it shares, so only an untied one matches)."""
"""The value, action and world heads inside a checkpoint directory (``value_head.*``,
``action_head.*``, ``world.*``); the Janus weights stay in ``model.safetensors`` so that
transformers loads the directory as is."""


def saved_head_hidden(heads: dict[str, Tensor]) -> int:
    """The heads' hidden width (``RigPolicy(head_hidden=)``) a heads file's tensors were saved
    with: 0 (linear heads) unless they hold the hidden layer."""
    inner = heads.get(HEAD_INNER_KEY)
    return int(inner.shape[0]) if inner is not None else 0


def saved_frame_head(heads: dict[str, Tensor]) -> int:
    """The frame head's hidden width (``RigPolicy(frame_head=)``) a heads file holds; 0: none."""
    out = heads.get(FRAME_HEAD_KEY)
    return int(out.shape[1]) if out is not None else 0


def positions(mask: Tensor) -> Tensor:
    """(B, T) bool attention -> (B, T) int64 positions ``cumsum - 1`` (each row's positions in its
    own unpadded sequence; padding gets its left neighbour's, harmless as it is never attended)."""
    return mask.long().cumsum(1).sub(1).clamp_min(0)


def _as_uint8(frames: np.ndarray | Tensor) -> Tensor:
    return frames if isinstance(frames, Tensor) else torch.as_tensor(np.asarray(frames))


def shown(frames: Tensor, history_frames: Tensor, history_mask: Tensor) -> Tensor:
    """(N, H, W, 3) uint8 every observed frame the prompts show, in placeholder order: row by
    row, its real history slots (B, k) oldest first, then its current frame (B, H, W, 3)."""
    stacked = torch.cat([history_frames, frames[:, None]], 1)  # (B, k + 1, H, W, 3)
    now = torch.ones(len(frames), 1, dtype=torch.bool, device=history_mask.device)
    real = torch.cat([history_mask, now], 1)
    return stacked[real.to(stacked.device)]


HEAD_GRID = 4
"""The value and action heads read the current frame's image positions average-pooled to at most
``HEAD_GRID x HEAD_GRID`` cells (the tiny preset's 4x4 grid as it is, Janus-1.3B's 24x24 in 6x6
blocks): see :meth:`RigPolicy.state_features`."""

HEAD_EPS = 1e-2
"""The variance floor of the heads' standardisation: a feature's scale is at least 0.1. Most of
a frame's columns hardly change between frames (Catch: across-frame std 0.001-0.008 off the
ball's and paddle's columns, 0.12-0.23 on them, at initialisation); at a floor of 0.01 a drift
of the trunk of 0.01 in those features became a unit change of the standardised state of every
frame at once, and the critic diverged (``tests/test_conditioning.py``: explained variance
-24 after 200 steps)."""


def frame_columns(col: Tensor, image_tokens: int) -> Tensor:
    """(B,) column of each row's first ``<reasoning>`` -> (B, G) int64 columns of the current
    frame's ``<image>`` placeholders (a prompt ends ``<observation> <image> x G <end>
    <reasoning>``)."""
    return col[:, None] - image_tokens - 1 + torch.arange(image_tokens, device=col.device)


def frame_features(full: Tensor, col: Tensor, image_tokens: int, grid: int) -> Tensor:
    """(B, T, D) hidden states, (B,) first ``<reasoning>`` column -> (B, c * c * D) float32: the
    current frame's G image columns, average-pooled from the sqrt(G) x sqrt(G) grid to c x c
    cells (c = min(``grid``, sqrt(G))), flattened cell by cell in row-major order."""
    g = round(image_tokens**0.5)
    rows = torch.arange(len(col), device=full.device)[:, None]
    img = full[rows, frame_columns(col.to(full.device), image_tokens)].float()  # (B, G, D)
    if grid < g:
        B, _, D = img.shape
        cells = nn.functional.adaptive_avg_pool2d(img.transpose(1, 2).reshape(B, D, g, g), grid)
        img = cells.flatten(2).transpose(1, 2)  # (B, grid * grid, D)
    return img.flatten(1)


def value_columns(prompt_ids: Tensor, prompt_mask: Tensor, prompt_codes: Tensor,
                  reasoning_id: int) -> Tensor:
    """(B,) int64 column of each row's first ``<reasoning>``; the heads read the frame's
    columns just before it (:func:`frame_columns`)."""
    first = (prompt_ids == reasoning_id) & prompt_mask & ~prompt_codes  # (B, P)
    if not bool(first.any(1).all()):
        raise ValueError("a prompt has no <reasoning> column to read the value at")
    return first.long().argmax(1)


@dataclass
class History:
    """The last k steps of B envs, oldest first: what the policy saw and did. Slot j of row b is
    real iff ``mask[b, j]``; rows fill from the right (the newest step is always slot k-1), so a
    fresh episode has ``mask[b] = [False, .., False]``."""

    frames: Tensor  # (B, k, H, W, 3) uint8
    actions: Tensor  # (B, k) int64 codec indices
    mask: Tensor  # (B, k) bool

    @classmethod
    def empty(cls, batch: int, k: int, size: int) -> History:
        return cls(
            frames=torch.zeros(batch, k, size, size, 3, dtype=torch.uint8),
            actions=torch.zeros(batch, k, dtype=torch.int64),
            mask=torch.zeros(batch, k, dtype=torch.bool),
        )

    @property
    def k(self) -> int:
        return self.mask.shape[1]

    def push(self, frames: np.ndarray | Tensor, actions: np.ndarray | Tensor) -> None:
        """Record one step of every row: the frames acted on (B, H, W, 3) and the actions (B,)."""
        if self.k == 0:
            return
        self.frames = torch.cat([self.frames[:, 1:], _as_uint8(frames).cpu()[:, None]], 1)
        self.actions = torch.cat([self.actions[:, 1:], torch.as_tensor(actions).cpu()[:, None]], 1)
        self.mask = torch.cat([self.mask[:, 1:], torch.ones_like(self.mask[:, :1])], 1)

    def reset(self, rows: np.ndarray | Tensor) -> None:
        """Forget the past of rows whose episode ended (``rows``: (B,) bool)."""
        self.mask = self.mask & ~torch.as_tensor(rows, dtype=torch.bool)[:, None]

    @classmethod
    def after(cls, out: ActOutput) -> History:
        """The history of the step that follows each row of ``out`` in its episode: the
        row's own history shifted by one, with the row's frame and action as the newest slot."""
        hist = cls(out.history_frames.cpu(), out.history_actions.cpu(), out.history_mask.cpu())
        hist.push(out.frames, out.actions)
        return hist


@dataclass
class ActOutput:
    """One batched ``act`` call: everything ``evaluate`` needs to recompute it, and the losses'
    inputs. B rows, P prompt columns (left-padded), L generated columns (right-padded), k history
    slots, n lookahead steps, G codes per imagined frame."""

    actions: Tensor  # (B,) int64 codec index of each row's action
    action_texts: list[str]  # B action strings, codec.vocab[actions[i]]
    prompt_ids: Tensor  # (B, P) int64 text ids; VQ code ids where prompt_codes
    prompt_mask: Tensor  # (B, P) bool attention: False at left padding and lockstep holes
    prompt_codes: Tensor  # (B, P) bool columns holding imagined VQ codes (lookahead)
    frames: Tensor  # (B, H, W, 3) uint8 the observed frames
    history_frames: Tensor  # (B, k, H, W, 3) uint8 past frames in the prompt (where history_mask)
    history_mask: Tensor  # (B, k) bool
    history_actions: Tensor  # (B, k) int64 codec indices of the past actions (where history_mask)
    tokens: Tensor  # (B, L) int64 generated ids: reasoning, <end>, <action>, action ids, <end>
    attention_mask: Tensor  # (B, L) bool, False at padding columns
    log_probs: Tensor  # (B, L) float32 log-prob of each sampled token, 0 elsewhere
    reasoning_mask: Tensor  # (B, L) bool sampled reasoning tokens (closing <end> included)
    action_mask: Tensor  # (B, L) bool sampled action tokens (closing <end> included)
    values: Tensor  # (B,) float32 V(s) from the prompt's frame columns (nothing sampled)
    lookahead_actions: Tensor  # (B, n) int64 the actions proposed in the lookahead, in order
    imagined_frames: Tensor  # (B, n, H, W, 3) uint8 the lookahead's imagined frames, decoded
    prompt_length: int  # P
    temperature: float  # the sampler's temperature; evaluate uses the same

    @property
    def token_mask(self) -> Tensor:
        """(B, L) bool every sampled token: what the policy loss sums over."""
        return self.reasoning_mask | self.action_mask

    def images(self) -> Tensor:
        """(N, H, W, 3) uint8 every observed frame the prompts show (:func:`shown`)."""
        return shown(self.frames, self.history_frames, self.history_mask)

    def to(self, device: torch.device | str) -> ActOutput:
        return ActOutput(**{
            f.name: v.to(device) if isinstance(v := getattr(self, f.name), Tensor) else v
            for f in fields(ActOutput)
        })  # fmt: skip

    def __getitem__(self, rows: slice | Tensor | Sequence[int]) -> ActOutput:
        """The rows ``rows`` (columns unchanged, so padding columns may remain)."""
        out: dict[str, Any] = {}
        for f in fields(ActOutput):
            v = getattr(self, f.name)
            if isinstance(v, Tensor):
                out[f.name] = v[rows]
            elif isinstance(v, list):
                index = range(len(v))[rows] if isinstance(rows, slice) else rows
                out[f.name] = [v[int(i)] for i in index]
            else:
                out[f.name] = v
        return ActOutput(**out)

    @staticmethod
    def collate(outputs: Sequence[ActOutput], pad_id: int) -> ActOutput:
        """Concatenate act outputs along B: prompts left-padded to the longest P, generated
        columns right-padded to the longest L, history slots left-padded (masked) to the
        largest k (imagined rows, which have no history, beside real rows that do). All must
        share the temperature and n."""
        if len({o.temperature for o in outputs}) != 1:
            raise ValueError("collate needs outputs sampled at one temperature")
        P = max(o.prompt_ids.shape[1] for o in outputs)
        L = max(o.tokens.shape[1] for o in outputs)
        left = {"prompt_ids": pad_id, "prompt_mask": False, "prompt_codes": False}
        right = {"tokens": pad_id, "attention_mask": False, "log_probs": 0.0,
                 "reasoning_mask": False, "action_mask": False}  # fmt: skip
        K = max(o.history_mask.shape[1] for o in outputs)
        cat: dict[str, Any] = {}
        for f in fields(ActOutput):
            items = [getattr(o, f.name) for o in outputs]
            if f.name in ("history_frames", "history_mask", "history_actions"):
                items = [_pad_slots(x, K) for x in items]
            if f.name == "action_texts":
                cat[f.name] = [t for item in items for t in item]
            elif f.name == "prompt_length":
                cat[f.name] = P
            elif f.name == "temperature":
                cat[f.name] = items[0]
            elif f.name in left:
                cat[f.name] = torch.cat([nn.functional.pad(x, (P - x.shape[1], 0),
                                                           value=left[f.name]) for x in items])  # fmt: skip
            elif f.name in right:
                cat[f.name] = torch.cat([nn.functional.pad(x, (0, L - x.shape[1]),
                                                           value=right[f.name]) for x in items])  # fmt: skip
            else:
                shapes = {tuple(x.shape[1:]) for x in items}
                if len(shapes) != 1:
                    raise ValueError(
                        f"collate: {f.name} differs in shape between outputs: {shapes}"
                    )
                cat[f.name] = torch.cat(items)
        return ActOutput(**cat)


def _pad_slots(x: Tensor, k: int) -> Tensor:
    """History slots (B, j, ...) left-padded with zeros / False to (B, k, ...): empty slots."""
    if x.shape[1] == k:
        return x
    pad = x.new_zeros((x.shape[0], k - x.shape[1], *x.shape[2:]))
    return torch.cat([pad, x], 1)


class _Stream:
    """B rows decoding in lockstep over one KV cache. Remembers every column it was fed (ids,
    attention, which are VQ codes) so the sequence can be stored and re-read by ``evaluate``."""

    def __init__(self, policy: RigPolicy, ids: Tensor, mask: Tensor, codes: Tensor, images: Tensor,
                 col: Tensor | None = None):  # fmt: skip
        self.policy = policy
        embeds = policy.embed(ids, codes, images)
        hidden, self.cache = policy.hidden(None, mask, positions(mask), use_cache=True,
                                           inputs_embeds=embeds)  # fmt: skip
        self.h = hidden[:, -1]  # (B, D) the state that predicts the next column
        if col is None:  # a prompt: its last column is the first <reasoning>
            col = torch.full((len(ids),), ids.shape[1] - 1, device=hidden.device)
        # (B, F) what the heads read (RigPolicy.state_features), not the whole (B, P, D) prompt
        self.frame = frame_features(hidden, col, policy.image_tokens, policy.head_grid)
        self.cols: list[tuple[Tensor, Tensor, Tensor]] = [(ids, mask, codes)]
        self.mask = mask

    @property
    def batch(self) -> int:
        return self.mask.shape[0]

    @property
    def length(self) -> int:
        return self.mask.shape[1]

    def feed(self, tok: Tensor, live: Tensor | None = None, code: bool = False) -> Tensor:
        """Append one column (B,) (text ids, or VQ code ids if ``code``), attended where ``live``;
        returns the hidden state (B, D) at it."""
        p = self.policy
        live = torch.ones_like(tok, dtype=torch.bool) if live is None else live
        self.mask = torch.cat([self.mask, live[:, None]], 1)
        pos = self.mask.long().sum(1, keepdim=True).sub(1).clamp_min(0)  # (B, 1)
        if code:
            h, self.cache = p.hidden(None, self.mask, pos, past_key_values=self.cache,
                                     use_cache=True, inputs_embeds=code_embeds(p, tok[:, None]))  # fmt: skip
        else:
            h, self.cache = p.hidden(tok[:, None], self.mask, pos, past_key_values=self.cache,
                                     use_cache=True)  # fmt: skip
        self.cols.append((tok[:, None], live[:, None], torch.full_like(live[:, None], code)))
        self.h = h[:, -1]
        return self.h

    def feed_marker(self, token_id: int) -> Tensor:
        return self.feed(torch.full((self.batch,), token_id, device=self.mask.device))

    def sequence(self) -> tuple[Tensor, Tensor, Tensor]:
        """(ids, mask, codes), each (B, T): everything fed so far."""
        return tuple(torch.cat(c, 1) for c in zip(*self.cols, strict=True))  # type: ignore[return-value]


@dataclass
class _Decision:
    """The columns one ``_decide`` wrote, each (B, L), and what it chose."""

    tokens: Tensor
    attention_mask: Tensor
    log_probs: Tensor
    reasoning_mask: Tensor
    action_mask: Tensor
    actions: Tensor  # (B,)


class RigPolicy(nn.Module):
    """Janus model + tokenizer + action trie + value and action heads (standardised linear
    read-outs of the current frame's columns, :meth:`state_features`, ``rl.heads``) + world
    heads (reward and continue after an imagined frame, ``rl.imagine.WorldHeads``).

    Args:
        model: a ``JanusForConditionalGeneration`` (``rl.model.build_model`` or a checkpoint).
        tok: its tokenizer, with the segment markers.
        codec: the env's action codec; the trie allows exactly ``codec.vocab``.
        head_hidden: width of the one hidden ReLU layer of the value head and of the action
            head (each its own), between the standardised frame read-out and the output; 0:
            both heads linear (``rl.heads``; config ``policy.head_hidden``).
        sees: ``"frames"``, or ``"reconstructions"``: every image the vision path reads (the
            current frame, the history's, imagined ones) goes through the policy's VQ first
            (:meth:`reconstruct`), as IRIS's actor-critic reads its tokenizer's
            reconstructions. Then the critic and the actor read real and imagined frames from
            one distribution: the VQ's outputs (``policy.sees``; docs/imagination.md).
        frame_head: hidden width of the next-frame read-out (``rl.heads.FrameHead``: the
            decision state and the action to offsets of the generation head's code logits;
            config ``policy.frame_head``); 0: the generation head alone predicts the codes.
    """

    def __init__(
        self,
        model: JanusForConditionalGeneration,
        tok: PreTrainedTokenizerBase,
        codec: ActionCodec,
        head_hidden: int = 0,
        sees: str = "frames",
        frame_head: int = 0,
    ):
        super().__init__()
        from rl.model import image_tokens_per_frame

        if sees not in SEES:
            raise ValueError(f"sees must be one of {SEES}, got {sees!r}")
        self.sees = sees

        self.model = model
        self.tok = tok
        self.codec = codec
        self.ids: SegmentIds = segment_ids(tok)
        self.trie: ActionTrie = build_action_trie(tok, codec.vocab)
        self.image_tokens = image_tokens_per_frame(model)
        self.image_size = int(model.config.vision_config.image_size)
        self.context_length = int(model.config.text_config.max_position_embeddings)
        hidden = int(model.config.text_config.hidden_size)
        grid = round(self.image_tokens**0.5)
        if grid * grid != self.image_tokens:
            raise ValueError(f"{self.image_tokens} image tokens per frame are not a square grid")
        self.head_grid = min(grid, HEAD_GRID)
        self.head_features = self.head_grid**2 * hidden  # what the value and action heads read
        self.vocab_size = int(model.config.text_config.vocab_size)
        param = next(model.parameters())
        features = self.head_features  # standardised read-outs of the frame (rl.heads)
        self.head_hidden = int(head_hidden)
        self.value_head = ValueHead(features, eps=HEAD_EPS, inner=self.head_hidden).to(param.device)
        self.action_head = ActionHead(*self.trie.choice_edges(), features,
                                      self.head_hidden).to(param.device)  # fmt: skip
        self.world = WorldHeads(hidden).to(param.device)
        if frame_head < 0:
            raise ValueError(f"frame_head must be >= 0, got {frame_head}")
        self.frame_head = FrameHead(
            features, self.head_grid**2, self.image_tokens, len(codec),
            int(model.config.vq_config.num_embeddings), frame_head,
        ).to(param.device) if frame_head else None  # fmt: skip
        # Reasoning may not write markers other than <end>, nor ids past the tokenizer.
        banned = torch.zeros(self.vocab_size, dtype=torch.bool)
        banned[len(tok) :] = True
        for name in ("pad", "bos", "eos", "task", "observation", "image", "reasoning",
                     "action", "imagine", "review"):  # fmt: skip
            banned[getattr(self.ids, name)] = True
        self.register_buffer("reasoning_banned", banned.to(param.device), persistent=False)
        self._task_ids: dict[str, list[int]] = {}

    # -- constructors and checkpoints -------------------------------------------------------

    @classmethod
    def from_preset(
        cls, name: str, codec: ActionCodec, seed: int = 0, head_hidden: int = 0,
        sees: str = "frames", frame_head: int = 0,
    ) -> RigPolicy:
        """A randomly initialised policy of preset ``name`` with the built-in tokenizer."""
        from rl.model import build_model, load_preset
        from rl.tokenizer import build_tokenizer

        tok = build_tokenizer()
        torch.manual_seed(seed)
        return cls(build_model(load_preset(name), tok), tok, codec, head_hidden, sees, frame_head)

    @classmethod
    def from_model(
        cls,
        model: JanusForConditionalGeneration,
        tok: PreTrainedTokenizerBase,
        codec: ActionCodec,
        head_hidden: int = 0,
        sees: str = "frames",
        frame_head: int = 0,
    ) -> RigPolicy:
        return cls(model, tok, codec, head_hidden, sees, frame_head)

    @classmethod
    def load(
        cls, path: str | os.PathLike, codec: ActionCodec, head_hidden: int | None = None,
        sees: str | None = None, frame_head: int | None = None,
    ) -> RigPolicy:
        """A policy from a checkpoint directory (``save``'s, or a plain supervised Janus one).

        The heads come from ``rig_heads.safetensors`` when the directory has it; a supervised
        checkpoint has none, so the value, action and world heads start fresh
        (``policy.heads_loaded`` says which; a fresh action head is zero: the checkpoint's own
        policy). A heads file from before the action head loads with a fresh one.
        ``head_hidden``: the heads' hidden width (:class:`RigPolicy`); None takes the heads
        file's (0 without one); a number the file disagrees with is refused. ``sees``
        (:data:`SEES`): None takes the heads file's (``"frames"`` without one or before it was
        recorded); a value overrides it (the heads then read what they were not fitted to).
        ``frame_head``: the frame head's width; None takes the heads file's (0 without one or
        before it existed); a width the file holds another of is refused, one it holds none of
        starts fresh (zero: the same world model). Every failure is an
        ``rl.model.CheckpointError`` naming the file."""
        from safetensors import SafetensorError, safe_open

        from rl.model import CheckpointError, load_pretrained_dir

        model, tok, record = load_pretrained_dir(path)
        file = Path(path) / HEADS_FILE
        state = None
        if file.is_file():
            try:
                with safe_open(str(file), "pt") as handle:  # tensors and metadata, one read
                    keys = handle.keys()  # noqa: SIM118 (a safe_open handle is not iterable)
                    state = {key: handle.get_tensor(key) for key in keys}
                    saved_sees = (handle.metadata() or {}).get("sees", "frames")
            except (SafetensorError, OSError) as err:
                raise CheckpointError(f"corrupted heads file {file}: {err}") from None
            saved = saved_head_hidden(state)
            if head_hidden is not None and head_hidden != saved:
                raise CheckpointError(
                    f"{file} holds heads with hidden width {saved} but head_hidden is "
                    f"{head_hidden}; set policy.head_hidden={saved} to load them (or delete "
                    f"the file to start with fresh heads)"
                )
            head_hidden = saved
            if saved_sees not in SEES:
                raise CheckpointError(f"{file} says its heads read {saved_sees!r}, not one of "
                                      f"{SEES}")  # fmt: skip
            sees = saved_sees if sees is None else sees
            saved_frame = saved_frame_head(state)
            if saved_frame and frame_head is not None and frame_head != saved_frame:
                raise CheckpointError(
                    f"{file} holds a frame head of width {saved_frame} but frame_head is "
                    f"{frame_head}; set policy.frame_head={saved_frame} to load it"
                )
            frame_head = saved_frame if frame_head is None else frame_head
        policy = cls(model, tok, codec, head_hidden or 0, sees or "frames", frame_head or 0)
        policy.record = record
        policy.heads_loaded = False
        if state is not None:
            heads = {k: v for k, v in policy.state_dict().items() if not k.startswith("model.")}
            if set(state) >= LEGACY_VALUE_KEYS:  # the MLP value head before rl.heads
                state = {k: v for k, v in state.items() if not k.startswith("value_head.")}
                state.update({k: v for k, v in heads.items() if k.startswith("value_head.")})
                warnings.warn(f"{file} holds the old MLP value head: the value head starts "
                              "fresh (the world heads are loaded)", stacklevel=2)  # fmt: skip
            for key in ACTION_HEAD_KEYS - set(state):  # saved before rl.heads.ActionHead:
                state[key] = heads[key]  # the fresh head is zero, i.e. the same policy
            if FRAME_HEAD_KEY not in state:  # none saved: a fresh one (zero: the same codes)
                state.update({k: v for k, v in heads.items() if k.startswith("frame_head.")})
            elif set(heads) >= OUTCOME_KEYS and not OUTCOME_KEYS & set(state):
                # saved before the frame head read out the outcome: a fresh (zero) one, the
                # same rewards and continues
                state.update({k: heads[k] for k in OUTCOME_KEYS})
            read = state.get("value_head.out.weight")
            if read is not None and HEAD_INNER_KEY not in state \
                    and read.shape[-1] == model.config.text_config.hidden_size \
                    and read.shape != heads["value_head.out.weight"].shape:  # fmt: skip
                # saved when the heads read the one state at <reasoning>: fresh value and
                # action heads (zero: the same policy), the world heads loaded
                state.update({k: v for k, v in heads.items()
                              if k.startswith(("value_head.", "action_head."))})  # fmt: skip
                warnings.warn(f"{file} holds value and action heads that read the state at "
                              "<reasoning>: they start fresh on the frame's columns (the world "
                              "heads are loaded)", stacklevel=2)  # fmt: skip
            if set(state) != set(heads) or any(state[k].shape != heads[k].shape for k in heads):
                raise CheckpointError(
                    f"{file} does not fit this policy (hidden size "
                    f"{model.config.text_config.hidden_size}); it holds {sorted(state)[:3]}..."
                )
            policy.load_state_dict(state, strict=False)
            policy.heads_loaded = True
        return policy.eval()

    def save(
        self, path: str | os.PathLike, extra: dict[str, Any] | None = None, overwrite: bool = False
    ) -> Path:
        """Write an HF checkpoint directory atomically (``rl.model.save_pretrained_dir``) with
        the heads in ``rig_heads.safetensors``. ``JanusForConditionalGeneration.from_pretrained``
        loads it as is; ``RigPolicy.load`` loads all of it."""
        from safetensors.torch import save_file

        from rl.model import save_pretrained_dir

        heads = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()
                 if not k.startswith("model.")}  # fmt: skip
        return save_pretrained_dir(
            self.model, self.tok, path, extra, overwrite=overwrite,
            extra_files={HEADS_FILE: lambda file: save_file(heads, str(file),
                                                            {"sees": self.sees})},
        )  # fmt: skip

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # -- building blocks ---------------------------------------------------------------------

    def task_ids(self, task: str) -> list[int]:
        """The task text's ids. The task is user text: a marker's spelling stays ordinary text."""
        if task not in self._task_ids:
            self._task_ids[task] = self.tok(task, add_special_tokens=False,
                                            split_special_tokens=True)["input_ids"]  # fmt: skip
        return self._task_ids[task]

    def prompt(
        self, tasks: str | Sequence[str], batch: int, history: History | None = None
    ) -> tuple[Tensor, Tensor]:
        """(ids, mask), each (B, P): task, history and the current frame's placeholders, up to
        and including ``<reasoning>``, left-padded with ``<pad>`` (mask False) to one length."""
        ids, G = self.ids, self.image_tokens
        tasks = [tasks] * batch if isinstance(tasks, str) else list(tasks)
        if len(tasks) != batch:
            raise ValueError(
                f"got {len(tasks)} tasks for {batch} frames; give one per row or a str"
            )
        frame = [ids.observation, *[ids.image] * G, ids.end]
        rows = []
        for b, task in enumerate(tasks):
            row = [ids.bos, ids.task, *self.task_ids(task), ids.end]
            if history is not None:
                for j in range(history.k):
                    if history.mask[b, j]:
                        row += [*frame, ids.action, *self.trie.sequence(int(history.actions[b, j]))]
            rows.append([*row, *frame, ids.reasoning])
        P = max(map(len, rows))
        out = torch.full((batch, P), ids.pad, dtype=torch.int64)
        mask = torch.zeros(batch, P, dtype=torch.bool)
        for b, row in enumerate(rows):
            out[b, P - len(row) :] = torch.tensor(row)
            mask[b, P - len(row) :] = True
        return out.to(self.device), mask.to(self.device)

    def pixel_values(self, frames: np.ndarray | Tensor) -> Tensor:
        """(N, H, W, 3) uint8 -> (N, 3, H, W) in [-1, 1] (mean = std = 0.5), the model's dtype."""
        x = _as_uint8(frames)
        if x.ndim != 4 or x.shape[-1] != 3 or x.dtype != torch.uint8:
            raise ValueError(f"frames must be (B, H, W, 3) uint8, got {tuple(x.shape)} {x.dtype}")
        if x.shape[1] != self.image_size or x.shape[2] != self.image_size:
            raise ValueError(
                f"frames are {x.shape[1]}x{x.shape[2]} but the policy sees "
                f"{self.image_size}x{self.image_size}; render or resize the env to that size"
            )
        dtype = next(self.model.parameters()).dtype
        x = x.to(self.device).permute(0, 3, 1, 2).float() / 127.5 - 1.0  # (B, 3, H, W)
        return x.to(dtype)

    def reconstruct(self, frames: np.ndarray | Tensor) -> Tensor:
        """(N, H, W, 3) uint8 -> (N, H, W, 3) uint8 ``decode(encode(frames))`` through the
        policy's VQ: what the vision path reads when ``sees == "reconstructions"``. An imagined
        frame is already a decode; its reconstruction is close to it but not always equal (the
        encoder may pick a neighbouring code), and it is reconstructed like any frame, so every
        image the transformer reads went through the same encoder and decoder."""
        return decode_codes(self, frame_codes(self, frames))

    def embed(self, ids: Tensor, codes: Tensor, images: Tensor) -> Tensor:
        """LM input embeddings (B, T, D) of a sequence: text ids through the input embedding,
        VQ codes (where ``codes``) through the generation path, and the SigLIP features of
        ``images`` (N, H, W, 3) uint8 at the ``<image>`` placeholders, in row-major order
        (each image's :meth:`reconstruct` when the policy ``sees`` reconstructions)."""
        m = self.model.model
        embeds = m.get_input_embeddings()(ids.masked_fill(codes, self.ids.pad))
        if bool(codes.any()):
            embeds = embeds.masked_scatter(
                codes[..., None], code_embeds(self, ids[codes]).to(embeds.dtype)
            )
        place = (ids == self.ids.image) & ~codes  # (B, T)
        if int(place.sum()) != len(images) * self.image_tokens:
            raise ValueError(
                f"the sequences have {int(place.sum())} <image> placeholders but {len(images)} "
                f"frames of {self.image_tokens} tokens were given"
            )
        if len(images):
            if self.sees == "reconstructions":
                images = self.reconstruct(images)
            feats = m.get_image_features(self.pixel_values(images), return_dict=True)
            feats = feats.pooler_output.to(embeds.dtype)  # (N, G, D)
            embeds = embeds.masked_scatter(place[..., None], feats.reshape(-1))
        return embeds

    def hidden(
        self,
        input_ids: Tensor | None,
        attention_mask: Tensor,
        position_ids: Tensor,
        past_key_values: Any = None,
        use_cache: bool = False,
        inputs_embeds: Tensor | None = None,
    ) -> tuple[Tensor, Any]:
        """Last hidden states (B, T, D) of the LM over text ``input_ids`` (B, T), or over ready
        ``inputs_embeds`` (B, T, D) (:meth:`embed`), and the cache. ``attention_mask`` covers
        the cached positions too: (B, past + T)."""
        # transformers >= 5.2x names the KV cache ``cache`` (``past_key_values`` still works but
        # warns on every run); older releases only know ``past_key_values``.
        if not hasattr(self, "_cache_kw"):
            import inspect

            params = inspect.signature(self.model.model.forward).parameters
            self._cache_kw = "cache" if "cache" in params else "past_key_values"
        out = self.model.model(
            input_ids=input_ids,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask.long(),
            position_ids=position_ids,
            use_cache=use_cache,
            **{self._cache_kw: past_key_values},
        )
        return out.last_hidden_state, getattr(out, self._cache_kw)

    def logits(self, hidden: Tensor) -> Tensor:
        """(..., D) hidden -> (..., V) float32 logits (float32 on both sides: act == evaluate)."""
        return self.model.lm_head(hidden).float()

    def value(self, full: Tensor, col: Tensor) -> Tensor:
        """(B, T, D) hidden states over the prompt, (B,) first ``<reasoning>`` column -> (B,)
        float32 V(s)."""
        return self.value_head.read(self.state_features(full, col))

    def state_features(self, full: Tensor, col: Tensor) -> Tensor:
        """(B, T, D) hidden states over the prompt, (B,) column of each row's first
        ``<reasoning>`` -> (B, F) float32 standardised decision state, what the value and action
        heads read: the hidden states at the current frame's G ``<image>`` columns, average-pooled
        over the image grid to at most ``HEAD_GRID`` x ``HEAD_GRID`` cells and flattened
        (F = cells x D). A training forward updates the statistics: call it once per forward.

        Why the image columns and not the one state at ``<reasoning>``: there, uniform attention
        averages the few tokens a frame changes with the many it does not (a Catch frame moves 2
        of 16 image tokens; docs/benchmarks.md "Why Catch is hard"), so a frame is a few percent
        of the state; at its own column an image token is mostly itself, as a CNN's feature map
        keeps each place apart. Each column has attended to the task and the history before it,
        so nothing the prompt says is lost."""
        return self.value_head.norm(frame_features(full, col, self.image_tokens, self.head_grid))

    def decision_state(self, full: Tensor, batch: ActOutput) -> Tensor:
        """(B, T, D) hidden states of ``forward_sequence(batch)`` -> (B, F) :meth:`state_features`
        of each row's prompt (what act read after its prefill)."""
        col = value_columns(batch.prompt_ids, batch.prompt_mask, batch.prompt_codes,
                            self.ids.reasoning).to(full.device)  # fmt: skip
        return self.state_features(full, col)

    def frame_offsets(self, state: Tensor, actions: Tensor) -> Tensor | None:
        """(B, F) standardised states (:meth:`state_features`), (B,) action indices -> (B, G, V)
        float32 offsets the frame head adds to the generation head's logits of the G codes
        after ``<Imagine:>`` (``rl.heads.FrameHead``); None without a frame head. Every path
        that scores codes adds them: the KV-cached sampler, ``evaluate`` and the SFT scorer."""
        if self.frame_head is None:
            return None
        return self.frame_head(state, actions.to(state.device))

    def world_outcome(self, hidden: Tensor, state: Tensor, actions: Tensor) -> tuple[Tensor, Tensor]:
        """(B, D) the trunk's state after the last code of a next frame, (B, F) standardised
        decision states, (B,) actions -> the world heads' ``(reward_pred, continue_logit)``
        (B,) float32, the frame head's outcome offsets added (``rl.heads.FrameHead.outcome``).
        Every path that reads a transition's reward and continue goes through here: the
        learner's ``evaluate``, ``imagine`` and ``act_imagine`` (so the gate and the review)."""
        reward_pred, cont_logit = self.world(hidden)
        if self.frame_head is None:
            return reward_pred, cont_logit
        reward_off, cont_off = self.frame_head.outcome(state, actions.to(state.device))
        return reward_pred + reward_off, cont_logit + cont_off

    def action_log_softmax(
        self, logits: Tensor, nodes: Tensor, state: Tensor, temperature: float
    ) -> Tensor:
        """(N, V) LM logits at action positions, (N,) trie nodes, (N, D) standardised states ->
        (N, V) log-probs of the trie-masked distribution, the action head's scores added."""
        scores = self.action_head(state, nodes, logits.shape[-1])
        return self.trie.log_softmax(logits + scores, nodes, temperature)

    def reasoning_log_softmax(self, logits: Tensor, temperature: float) -> Tensor:
        """(..., V) logits -> (..., V) log-probs of the tempered softmax, markers banned."""
        scaled = logits.float() / temperature
        return torch.log_softmax(scaled.masked_fill(self.reasoning_banned, float("-inf")), -1)

    # -- acting ------------------------------------------------------------------------------

    @torch.no_grad()
    def act(
        self,
        frames: np.ndarray | Tensor,
        task: str | Sequence[str],
        max_reasoning_tokens: int = 32,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
        *,
        history: History | None = None,
        lookahead: int = 0,
    ) -> ActOutput:
        """Sample reasoning then an action for each frame (B, H, W, 3) uint8, with one prefill
        and one KV cache. ``task``: one str for every row, or one per row. ``history``: the last
        k steps of each row (:class:`History`). ``lookahead`` n > 0: propose an action, imagine
        its next frame, reason and propose again from that imagined frame, n times, then write
        ``<review>`` and decide the action that is taken (RIG's review and self-correct)."""
        return self._act(frames, task, max_reasoning_tokens, temperature, generator, history,
                         lookahead, feed_last=False)[0]  # fmt: skip

    @torch.no_grad()
    def act_imagine(
        self,
        frames: np.ndarray | Tensor,
        task: str | Sequence[str],
        max_reasoning_tokens: int = 32,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
        *,
        history: History | None = None,
        lookahead: int = 0,
        imagine_temperature: float | None = None,
    ) -> tuple[ActOutput, ImagineOutput]:
        """:meth:`act`, then :meth:`imagine` of the action's next frame on the same KV cache:
        the imagined frame continues the stream act decoded, so the act sequence (and its
        frame, through the vision encoder) is not prefilled a second time. The same draws from
        ``generator`` in the same order as ``act`` then ``imagine``, so the same samples, up to
        float rounding between a cached and a one-pass prefill. ``imagine_temperature``: the
        code sampler's (default ``temperature``)."""
        t = temperature if imagine_temperature is None else imagine_temperature
        if t <= 0:
            raise ValueError(f"temperature must be positive, got {t}")
        out, stream = self._act(frames, task, max_reasoning_tokens, temperature, generator,
                                history, lookahead, feed_last=True)  # fmt: skip
        return out, self._imagine_on(stream, t, generator, out.actions)

    def _act(
        self,
        frames: np.ndarray | Tensor,
        task: str | Sequence[str],
        max_reasoning_tokens: int,
        temperature: float,
        generator: torch.Generator | None,
        history: History | None,
        lookahead: int,
        feed_last: bool,
    ) -> tuple[ActOutput, _Stream]:
        """:meth:`act`'s body; also returns its stream, past the action's closing column when
        ``feed_last`` (the stream then holds exactly the returned row's sequence)."""
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        if lookahead < 0:
            raise ValueError(f"lookahead must be >= 0, got {lookahead}")
        frames_t = _as_uint8(frames)
        self.pixel_values(frames_t[:1])  # a clear error for a wrong shape or dtype, up front
        batch, dev = frames_t.shape[0], self.device
        if history is None:
            history = History.empty(batch, 0, self.image_size)
        if history.mask.shape[0] != batch:
            raise ValueError(f"history has {history.mask.shape[0]} rows for {batch} frames")
        ids, mask = self.prompt(task, batch, history)
        self.check_context(ids.shape[1], max_reasoning_tokens, lookahead)
        frames_t = frames_t.to(dev)
        past, past_mask = history.frames.to(dev), history.mask.to(dev)
        stream = _Stream(self, ids, mask, torch.zeros_like(mask), shown(frames_t, past, past_mask))
        state = self.value_head.norm(stream.frame)  # state_features, before anything is sampled
        values = self.value_head.read(state)  # V(s)

        proposals, imagined = [], []
        for i in range(lookahead):
            step = self._decide(
                stream, state, max_reasoning_tokens, temperature, generator, feed_last=True
            )
            proposals.append(step.actions)
            offsets = self.frame_offsets(state, step.actions)  # from the real frame's state
            codes, _, _ = sample_frame(self, stream, temperature, generator, offsets)
            imagined.append(decode_codes(self, codes))
            stream.feed_marker(self.ids.end)
            if i == lookahead - 1:
                stream.feed_marker(self.ids.review)
            stream.feed_marker(self.ids.reasoning)
        prompt_ids, prompt_mask, prompt_codes = stream.sequence()
        prompt_length = stream.length
        final = self._decide(
            stream, state, max_reasoning_tokens, temperature, generator, feed_last=feed_last
        )
        empty = torch.zeros(batch, 0, dtype=torch.int64, device=dev)
        return ActOutput(
            actions=final.actions,
            action_texts=[self.codec.vocab[int(a)] for a in final.actions],
            prompt_ids=prompt_ids,
            prompt_mask=prompt_mask,
            prompt_codes=prompt_codes,
            frames=frames_t,
            history_frames=past,
            history_mask=past_mask,
            history_actions=history.actions.to(dev),
            tokens=final.tokens,
            attention_mask=final.attention_mask,
            log_probs=final.log_probs,
            reasoning_mask=final.reasoning_mask,
            action_mask=final.action_mask,
            values=values,
            lookahead_actions=torch.stack(proposals, 1) if proposals else empty,
            imagined_frames=(
                torch.stack(imagined, 1) if imagined else frames_t[:, None][:, :0]
            ),  # fmt: skip
            prompt_length=prompt_length,
            temperature=float(temperature),
        ), stream

    def check_context(self, prompt_length: int, max_reasoning_tokens: int, lookahead: int) -> None:
        """ValueError if the longest sequence this act call can write exceeds the context."""
        decision = max_reasoning_tokens + 3 + self.trie.max_len  # reasoning <end> <action> ...
        imagined = 2 + self.image_tokens + 1  # <Imagine:> codes <end> <reasoning>|<review>
        longest = prompt_length + lookahead * (decision + imagined) + (lookahead > 0) + decision
        longest += 1 + self.image_tokens  # evaluate's next-frame targets after the action
        if longest > self.context_length:
            raise ValueError(
                f"a step can take {longest} tokens but the model's context is "
                f"{self.context_length}: lower the history length, lookahead or "
                f"max_reasoning_tokens ({max_reasoning_tokens})"
            )

    def _decide(
        self,
        stream: _Stream,
        state: Tensor,
        max_reasoning_tokens: int,
        temperature: float,
        generator: torch.Generator | None,
        feed_last: bool,
    ) -> _Decision:
        """From ``stream.h`` (the hidden at a ``<reasoning>``): sample reasoning, force
        ``<action>``, sample the action under the trie, with the action head reading ``state``
        (B, D), the standardised state at the step's first ``<reasoning>``. ``feed_last`` also
        feeds the action's closing column, for a sequence that goes on (a lookahead proposal)."""
        ids, batch, dev = self.ids, stream.batch, stream.mask.device
        cols: dict[str, list[Tensor]] = {k: [] for k in ("tok", "attn", "logp", "reason", "act")}
        zero = torch.zeros(batch, device=dev)
        no = torch.zeros(batch, dtype=torch.bool, device=dev)
        every = torch.ones(batch, dtype=torch.bool, device=dev)

        def push(tok: Tensor, live: Tensor, logp: Tensor, reason: Tensor, action: Tensor) -> None:
            for key, val in zip(cols, (tok, live, logp, reason, action), strict=True):
                cols[key].append(val)

        def sample(logp: Tensor) -> Tensor:
            return torch.multinomial(logp.exp(), 1, generator=generator).squeeze(1)

        # Reasoning: free sampling until <end> or the cap; finished rows feed masked <pad>.
        logits = self.logits(stream.h)
        writing = every.clone()
        for _ in range(max_reasoning_tokens):
            logp = self.reasoning_log_softmax(logits, temperature)  # (B, V)
            tok = torch.where(writing, sample(logp), ids.pad)
            taken = logp.gather(1, tok.unsqueeze(1)).squeeze(1)
            push(tok, writing, torch.where(writing, taken, zero), writing, no)
            logits = self.logits(stream.feed(tok, writing))
            writing = writing & (tok != ids.end)
            if not bool(writing.any()):
                break
        if bool(writing.any()):  # rows cut by the cap: close their reasoning (forced)
            push(torch.where(writing, ids.end, ids.pad), writing, zero, no, no)
            stream.feed(cols["tok"][-1], writing)

        # <action> (forced)
        push(torch.full((batch,), ids.action, device=dev), every, zero, no, no)
        logits = self.logits(stream.feed(cols["tok"][-1], every))

        # Action: constrained by the trie until every row sits at a leaf.
        nodes = self.trie.root(batch, dev)
        for _ in range(self.trie.max_len):
            live = ~self.trie.is_done(nodes)
            logp = self.action_log_softmax(logits, nodes, state, temperature)  # (B, V)
            tok = torch.where(live, sample(logp), ids.pad)
            taken = logp.gather(1, tok.unsqueeze(1)).squeeze(1)
            push(tok, live, torch.where(live, taken, zero), no, live)
            nodes = nodes.clone()
            nodes[live] = self.trie.advance(nodes[live], tok[live])
            if bool(self.trie.is_done(nodes).all()):
                if feed_last:
                    stream.feed(tok, live)
                break
            logits = self.logits(stream.feed(tok, live))

        return _Decision(
            tokens=torch.stack(cols["tok"], 1),
            attention_mask=torch.stack(cols["attn"], 1),
            log_probs=torch.stack(cols["logp"], 1).float(),
            reasoning_mask=torch.stack(cols["reason"], 1),
            action_mask=torch.stack(cols["act"], 1),
            actions=self.trie.action_index(nodes),
        )

    # -- learning ----------------------------------------------------------------------------

    def _written(self, batch: ActOutput) -> tuple[Tensor, Tensor, Tensor]:
        """(ids, mask, codes), each (B, P + L): the whole sequence an act call wrote."""
        dev = self.device
        ids = torch.cat([batch.prompt_ids.to(dev), batch.tokens.to(dev)], 1)
        mask = torch.cat([batch.prompt_mask.to(dev), batch.attention_mask.to(dev)], 1)
        no_codes = torch.zeros_like(batch.attention_mask, dtype=torch.bool, device=dev)
        codes = torch.cat([batch.prompt_codes.to(dev), no_codes], 1)
        return ids, mask, codes

    def forward_sequence(
        self, batch: ActOutput, next_codes: Tensor | None = None
    ) -> tuple[Tensor, Tensor, int]:
        """One forward (no cache, with gradients) over prompt + generated columns, and, given
        ``next_codes`` (B, G), ``<Imagine:>`` + those codes after them. Returns the hidden states
        (B, T, D), the attention (B, T) and the column of ``<Imagine:>`` (``P + L``)."""
        dev = self.device
        ids, mask, codes = self._written(batch)  # (B, P + L)
        start = ids.shape[1]
        if next_codes is not None:
            G = self.image_tokens
            if next_codes.ndim != 2 or next_codes.shape != (ids.shape[0], G):
                raise ValueError(f"next_codes must be ({ids.shape[0]}, {G}), got "
                                 f"{tuple(next_codes.shape)}")  # fmt: skip
            marker = torch.full_like(ids[:, :1], self.ids.imagine)
            ids = torch.cat([ids, marker, next_codes.to(dev).long()], 1)
            mask = torch.cat([mask, torch.ones_like(mask[:, : 1 + G])], 1)
            codes = torch.cat([codes, torch.zeros_like(codes[:, :1]),
                               torch.ones_like(codes[:, :G])], 1)  # fmt: skip
        embeds = self.embed(ids, codes, batch.images().to(dev))
        hidden, _ = self.hidden(None, mask, positions(mask), inputs_embeds=embeds)
        return hidden, mask, start

    @property
    def trunk_frozen(self) -> bool:
        """Whether no parameter of the network under the heads trains (``learner.freeze:
        [model]``, or all of it but the generation head, which only reads the hidden states):
        then ``forward_sequence`` of a row is the same in every epoch."""
        return not any(p.requires_grad for name, p in self.model.named_parameters()
                       if not name.startswith(READS_TRUNK_ONLY))  # fmt: skip

    @torch.no_grad()
    def trunk_states(
        self, batch: ActOutput, next_codes: Tensor | None = None, chunk: int = 128
    ) -> Tensor:
        """(B, T, D) ``forward_sequence(batch, next_codes)``'s hidden states without gradients,
        ``chunk`` rows per forward: what :meth:`evaluate` takes as ``hidden`` when the trunk is
        frozen (the learner computes them once per update instead of once per epoch)."""
        parts = []
        for rows in torch.arange(len(batch.actions)).split(chunk):
            codes = None if next_codes is None else next_codes[rows.to(next_codes.device)]
            parts.append(self.forward_sequence(batch[rows], codes)[0])
        return torch.cat(parts)

    def evaluate(
        self, batch: ActOutput, next_codes: Tensor | None = None, hidden: Tensor | None = None
    ) -> dict[str, Tensor]:
        """Teacher-forced recomputation of ``act`` in one forward (no cache), with gradients.
        ``hidden``: that forward's states when the caller has them (:meth:`trunk_states`, for a
        frozen trunk), so only the heads and the LM's output layer run.

        Returns ``log_probs`` (B, L) float32 (0 off the sampled tokens), ``entropies`` (B, L)
        float32 of the distribution each sampled token was drawn from (0 elsewhere),
        ``values`` (B,) float32 and ``choice_mask`` (B, L) bool: the sampled tokens that had a
        choice (every reasoning token; action tokens where the trie allowed more than one), the
        tokens a policy loss, an entropy or a KL should average over (a forced token has
        log-prob 0 under any policy and would only dilute those means). Given the real next frame's VQ codes ``next_codes`` (B, G)
        (``rl.imagine.frame_codes``), the same forward goes on over ``<Imagine:>`` + those codes
        and also returns ``next_frame_logits`` (B, G, V_vq) float32 (``[:, g]`` predicts
        ``next_codes[:, g]``: the input of ``rl.losses.next_frame_loss``), and ``reward_pred``
        and ``continue_logit`` (B,) from the world heads after the last code
        (:meth:`world_outcome`).
        """
        P, T = batch.prompt_length, batch.temperature
        tokens = batch.tokens.to(self.device)  # (B, L)
        L = tokens.shape[1]
        reason = batch.reasoning_mask.to(self.device)
        action = batch.action_mask.to(self.device)
        if hidden is None:
            full, _, start = self.forward_sequence(batch, next_codes)
        else:
            full, start = hidden, batch.prompt_ids.shape[1] + L
            width = start + (0 if next_codes is None else 1 + self.image_tokens)
            if full.shape[:2] != (tokens.shape[0], width):
                raise ValueError(f"hidden must be ({tokens.shape[0]}, {width}, D) for this batch, "
                                 f"got {tuple(full.shape)}")  # fmt: skip
        hidden = full[:, P - 1 : P + L - 1]  # (B, L, D) column j is predicted at P + j - 1
        nodes = self.trie.path_nodes(tokens, action)  # (B, L) trie node before each token

        # Value: V(s) from the prompt's frame columns (act reads them after its prefill)
        state = self.decision_state(full, batch)
        values = self.value_head.read(state)  # (B,)
        rows = action.nonzero()[:, 0]  # the row of each action token, in mask order

        log_probs = torch.zeros(tokens.shape, device=self.device)
        entropies = torch.zeros(tokens.shape, device=self.device)
        for mask, logp in (
            (reason, self.reasoning_log_softmax(self.logits(hidden[reason]), T)),  # (N, V)
            (action, self.action_log_softmax(self.logits(hidden[action]), nodes[action],
                                             state[rows], T)),
        ):
            taken = logp.gather(1, tokens[mask].unsqueeze(1)).squeeze(1)  # (N,)
            p = logp.exp()
            # 0 * log 0 = 0, written so that the gradient is 0 there too (p * logp at a masked
            # logp = -inf would be nan in the backward pass even behind a torch.where)
            ent = -(p * torch.where(p > 0, logp, torch.zeros_like(logp))).sum(-1)  # (N,)
            log_probs = log_probs.masked_scatter(mask, taken)
            entropies = entropies.masked_scatter(mask, ent)
        choice = reason | (action & (self.trie.num_choices(nodes) > 1))
        out = {"log_probs": log_probs, "entropies": entropies, "values": values,
               "choice_mask": choice}  # fmt: skip
        if next_codes is not None:
            G = self.image_tokens
            logits = code_logits(self, full[:, start : start + G])
            offsets = self.frame_offsets(state, batch.actions)
            out["next_frame_logits"] = logits if offsets is None else logits + offsets
            out["reward_pred"], out["continue_logit"] = self.world_outcome(
                full[:, -1], state, batch.actions)
        return out

    @torch.no_grad()
    def state_values(
        self, frames: np.ndarray | Tensor, task: str | Sequence[str], history: History | None = None
    ) -> Tensor:
        """(B,) float32 V(s) of each frame (B, H, W, 3) uint8 with its ``history``: the value
        ``act`` reports for that state, from the prompt alone (one forward, nothing sampled).
        What GAE bootstraps a cut chunk from."""
        frames_t = _as_uint8(frames).to(self.device)
        batch = frames_t.shape[0]
        history = History.empty(batch, 0, self.image_size) if history is None else history
        ids, mask = self.prompt(task, batch, history)
        past, past_mask = history.frames.to(self.device), history.mask.to(self.device)
        embeds = self.embed(ids, torch.zeros_like(mask), shown(frames_t, past, past_mask))
        hidden, _ = self.hidden(None, mask, positions(mask), inputs_embeds=embeds)
        return self.value(hidden, torch.full((batch,), ids.shape[1] - 1, device=hidden.device))

    # -- imagination --------------------------------------------------------------------------

    @torch.no_grad()
    def imagine(
        self,
        batch: ActOutput,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> ImagineOutput:
        """The imagined next frame after each row's action (``rl.imagine``): prefill the act
        sequence + ``<Imagine:>`` once, sample G codes with the KV cache, decode them to pixels,
        and read predicted reward and continue after the last code. (Right after ``act``,
        :meth:`act_imagine` does both on one KV cache.)"""
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        col = value_columns(batch.prompt_ids, batch.prompt_mask, batch.prompt_codes,
                            self.ids.reasoning).to(self.device)  # fmt: skip
        stream = _Stream(self, *self._written(batch), batch.images().to(self.device), col)
        return self._imagine_on(stream, temperature, generator, batch.actions)

    def _imagine_on(
        self, stream: _Stream, temperature: float, generator: torch.Generator | None,
        actions: Tensor,
    ) -> ImagineOutput:
        """Sample the next frame on ``stream`` (its rows just past ``actions`` (B,)), the frame
        head reading the stream's decision state, decode it and read the world heads after its
        last code."""
        from rl.losses import symexp

        state = self.value_head.norm(stream.frame)
        offsets = self.frame_offsets(state, actions)
        sampled, log_probs, h = sample_frame(self, stream, temperature, generator, offsets)
        reward_pred, cont_logit = self.world_outcome(h, state, actions)
        return ImagineOutput(
            codes=sampled,
            log_probs=log_probs,
            frames=decode_codes(self, sampled),
            reward=symexp(reward_pred),
            continue_prob=torch.sigmoid(cont_logit),
            reward_pred=reward_pred,
            continue_logit=cont_logit,
            temperature=float(temperature),
        )


__all__ = ["ActOutput", "History", "RigPolicy", "positions", "shown"]
