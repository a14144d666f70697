"""The value and action heads: linear read-outs of the decision state, standardised per feature.

The decision state is the LM's hidden states at the current frame's image columns
(``RigPolicy.state_features``), pooled to at most 4x4 cells and flattened: where a frame is
mostly itself, as a CNN's feature map keeps each place apart. (Until 2026-12-02 it was the one
state at ``<reasoning>``, where uniform attention averaged the few tokens a frame changes with
the many it does not: on Catch the frame was a few percent of it.)

Why standardised. Most features of that state are shared by every frame (after the LM's final
RMSNorm they are of order 1); what the frame changes is a part of them (on Catch from scratch
0.12-0.23 across frames on the ball's and paddle's columns, 0.001-0.008 elsewhere). A linear
head on the raw state is badly conditioned: it learns slowly, and the noise it starts with (a
random read-out uncorrelated with the return) is cheapest to remove by shrinking the frame's
share of the state, which the trunk then does within 50 optimiser steps. Standardised per
feature, the same state is linearly read at once and a zero-initialised linear head fits
returns in tens of steps, so the gradient that reaches the trunk points along the frame's
features instead of against them. This is the read-out equivalent of observation
normalisation (VecNormalize, DreamerV3's symlog inputs) applied where the head reads, and of
LP-FT's "fit the head before the trunk moves" (with ``learner.warmup_skip: [value_head]``).
The variance floor (``eps``; the policy's is 1e-2, a scale of at least 0.1) keeps a feature
that hardly varies from being blown up: there, a small drift of the trunk would move every
frame's standardised state at once. docs/benchmarks.md ("Learning") has the measurements.

The statistics are buffers (saved in ``rig_heads.safetensors`` and published with the weights),
updated only by forwards that train (``module.training`` and grad enabled: the learner's
minibatches), never while acting, so actors read V with the learner's statistics of the
published version.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn


class RunningStandardize(nn.Module):
    """``(h - mean) / sqrt(var + eps)`` per feature with running statistics.

    A training forward first folds its batch into the statistics: the cumulative average over
    the first ``1 / momentum`` batches (the first batch sets them), then an exponential average
    with weight ``momentum``; then it standardises with them (detached: no gradient flows
    through the statistics). Other forwards, and any inside :func:`frozen_statistics`, only
    standardise. Computed in float32. ``eps`` (added to the variance) floors the scale at
    0.01: a feature that hardly varies over a batch is not blown up into noise.
    """

    def __init__(self, features: int, momentum: float = 0.01, eps: float = 1e-4):
        super().__init__()
        if not 0.0 < momentum <= 1.0:
            raise ValueError(f"momentum must be in (0, 1], got {momentum}")
        self.momentum, self.eps = momentum, eps
        self.register_buffer("mean", torch.zeros(features))
        self.register_buffer("var", torch.ones(features))
        self.register_buffer("count", torch.zeros(()))
        self.frozen = False
        # Data-parallel learners set this to an in-place sum over their ranks (learner/ppo.py),
        # so the batch statistics are those of the global batch, not of one rank's shard.
        self.all_sum: Callable[[Tensor], Tensor] | None = None

    def forward(self, h: Tensor) -> Tensor:  # (..., D) -> (..., D) float32
        x = h.float()
        if self.training and torch.is_grad_enabled() and not self.frozen:
            with torch.no_grad():
                rows = x.detach().reshape(-1, x.shape[-1])
                weight = max(self.momentum, 1.0 / (float(self.count) + 1.0))
                if self.all_sum is None:
                    mean = rows.mean(0)
                    var = rows.var(0, unbiased=False) if len(rows) > 1 else torch.zeros_like(mean)
                else:
                    mean, var = _global_moments(rows, self.all_sum)
                self.mean.lerp_(mean.to(self.mean.dtype), weight)
                self.var.lerp_(var.to(self.var.dtype), weight)
                self.count.add_(1)
        return (x - self.mean.float()) / torch.sqrt(self.var.float() + self.eps)


def _global_moments(rows: Tensor, all_sum: Callable[[Tensor], Tensor]) -> tuple[Tensor, Tensor]:
    """Mean and (biased) variance per feature of the rows of every rank, ``rows`` (n, D) being
    this rank's (n may be 0): two passes, as ``Tensor.var`` does, each one summed over ranks."""
    sums = all_sum(torch.cat([rows.new_full((1,), float(len(rows))), rows.sum(0)]))
    n = sums[0]
    mean = sums[1:] / n.clamp_min(1)
    var = all_sum((rows - mean).square().sum(0)) / n.clamp_min(1)
    return mean, var if n > 1 else torch.zeros_like(mean)


@contextmanager
def frozen_statistics(module: nn.Module) -> Iterator[None]:
    """Forwards of ``module`` inside leave every :class:`RunningStandardize` as it is (extra
    forwards for diagnostics must not count as data)."""
    norms = list(_standardizers(module))
    before = [m.frozen for m in norms]
    for m in norms:
        m.frozen = True
    try:
        yield
    finally:
        for m, was in zip(norms, before, strict=True):
            m.frozen = was


def fitted_statistics(module: nn.Module) -> bool:
    """Whether any :class:`RunningStandardize` of ``module`` has seen data (a trained policy's
    heads read their state through them)."""
    return any(float(m.count) > 0 for m in _standardizers(module))


def freeze_statistics(module: nn.Module) -> None:
    """Every :class:`RunningStandardize` of ``module`` keeps its statistics from now on."""
    for m in _standardizers(module):
        m.frozen = True


def _standardizers(module: nn.Module) -> Iterator[RunningStandardize]:
    return (m for m in module.modules() if isinstance(m, RunningStandardize))


class ValueHead(nn.Module):
    """(..., D) decision state -> (...) float32 V(s): standardise, then (``inner`` > 0) one
    hidden layer of ``inner`` ReLU units, then a zero-initialised linear layer (V = 0 before the
    first update, whatever the statistics). ``norm`` is also the :class:`ActionHead`'s input;
    ``read`` takes an already standardised state."""

    def __init__(self, hidden: int, momentum: float = 0.01, eps: float = 1e-4, inner: int = 0):
        super().__init__()
        self.norm = RunningStandardize(hidden, momentum, eps)
        self.inner = _inner_layer(hidden, inner)
        self.out = nn.Linear(inner or hidden, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, h: Tensor) -> Tensor:
        return self.read(self.norm(h))

    def read(self, z: Tensor) -> Tensor:
        z = z.to(self.out.weight.dtype)
        if self.inner is not None:
            z = self.inner(z)
        return self.out(z).squeeze(-1).float()


def _inner_layer(features: int, width: int) -> nn.Module | None:
    """The optional hidden layer of a head: ``Linear(features, width)`` then ReLU (None for 0),
    torch's default (Kaiming-uniform) initialisation: with the output layer at zero the head's
    output is still 0 at the start, and the first updates move the output layer only."""
    if width < 0:
        raise ValueError(f"a head's hidden width must be >= 0, got {width}")
    return nn.Sequential(nn.Linear(features, width), nn.ReLU()) if width else None


class ActionHead(nn.Module):
    """Scores of the action trie's choices read from the standardised decision state: linearly,
    or (``inner`` > 0) through one hidden layer of ``inner`` ReLU units of its own.

    The action is text: the LM head's logits over the tokens the trie allows (``rl.constrained``).
    This head adds to each allowed token's logit ``w_e . z``, where ``z`` is the standardised
    decision state (the value head's :class:`RunningStandardize`, so one set of
    statistics), or that layer's output, and ``w_e`` a weight vector per choice edge ``e`` of the
    trie (E of them: every child of every node with more than one child). ``w`` is
    zero-initialised, so a checkpoint's policy is unchanged until RL moves it.

    Why. From scratch or after SFT, the frame is a few percent of the decision state, so through
    the LM head alone the cheapest direction of a policy gradient is the action's marginal (one
    shared vector moves every frame's logits at once) and the policy sharpens onto one action
    before it learns to read the frame. On the standardised state a frame-dependent choice is as
    cheap as the marginal (a linear policy on features of unit variance). The head changes the
    policy's distribution only: ``act``, ``evaluate`` and the SFT scorer all add it, so the
    log-probs the actors record are the ones the learner recomputes.
    """

    def __init__(self, child_tokens: Tensor, edges: Tensor, hidden: int, inner: int = 0):
        super().__init__()
        if child_tokens.shape != edges.shape or child_tokens.ndim != 2:
            raise ValueError(f"child_tokens {tuple(child_tokens.shape)} and edges "
                             f"{tuple(edges.shape)} must be the same (N, K)")  # fmt: skip
        self.num_edges = int(edges.max()) + 1 if edges.numel() else 0
        self.register_buffer("child_tokens", child_tokens.long(), persistent=False)
        self.register_buffer("edges", edges.long(), persistent=False)
        self.inner = _inner_layer(hidden, inner)
        self.weight = nn.Parameter(torch.zeros(max(self.num_edges, 1), inner or hidden))

    def forward(self, z: Tensor, nodes: Tensor, vocab: int) -> Tensor:
        """(N, D) standardised states, (N,) trie nodes -> (N, V) float32 logit offsets: the
        scores of the node's choices at their token ids, 0 elsewhere."""
        edge = self.edges[nodes]  # (N, K)
        if self.inner is not None:
            z = self.inner(z.to(self.weight.dtype))
        scores = z.float() @ self.weight.float().T  # (N, E)
        picked = scores.gather(1, edge.clamp_min(0)) * (edge >= 0)  # (N, K), 0 off the choices
        out = torch.zeros(len(nodes), vocab, device=z.device, dtype=torch.float32)
        # scatter_add: padding slots repeat the first child's token and add 0 to it
        return out.scatter_add(1, self.child_tokens[nodes], picked)


class FrameHead(nn.Module):
    """The next frame's code logits read from the standardised decision state and the action:
    offsets (B, G, V) that the generation head's logits for the G codes after ``<Imagine:>`` add
    (``RigPolicy.frame_offsets``; config ``policy.frame_head``, its hidden width), and offsets
    (B, 2) that the world heads' reward and continue outputs add (:meth:`outcome`).

    For code g: ``out(relu(W z + C z_g + U[a] + P_g))``, where ``z`` (B, F) is the standardised
    state the value and action heads read (``RigPolicy.state_features``: ``cells`` pooled frame
    columns of F / cells features each), ``z_g`` the column of the cell that holds code g, ``a``
    the action and ``P_g`` a learned position. One hidden layer of ``inner`` ReLU units shared by
    the code positions; ``out`` is zero-initialised, so a checkpoint's world model is unchanged
    until it trains.

    Why. The generation head reads the trunk's state after ``<Imagine:>``; with the trunk frozen
    or from scratch that state is dominated by what every frame shares, and on Catch its dreams
    put the ball in its cell 5-11% of the time. The same trunk's frame columns plus the action
    predict 92% of Catch's next codes and the ball's cell 96% of the time through this read-out
    (benchmarks/world_probe.py, docs/benchmarks.md "session 43"): the information is there,
    the read-out after ``<Imagine:>`` is what loses it, as it was for the value before the heads
    read the frame's columns. IRIS and DreamerV3 likewise predict the next latent from the
    current one and the action directly. The offsets are added, not substituted, so the
    generation head still conditions each code on the codes sampled before it.

    The outcome (:meth:`outcome`): ``outcome(relu(W z + U[a]))``, the same hidden layer
    without a code's own column and position, read out to the reward (symlog) and continue
    logit that ``WorldHeads`` compute after the last imagined code; zero at first. Why: those
    heads read the trunk's state after the imagined codes, where (as at ``<Imagine:>``) what
    the frame changes is a small part; on Catch, at the step that decides catch or miss, the
    review's q of a safe and an unsafe action differed by 0.08 (docs/benchmarks.md, session
    44). The reward of a transition is a function of the state and the action (MuZero's
    dynamics function predicts it from the two), both of which this layer reads directly.
    """

    def __init__(self, features: int, cells: int, codes: int, actions: int, vocab: int,
                 inner: int):  # fmt: skip
        super().__init__()
        if inner <= 0:
            raise ValueError(f"the frame head's hidden width must be > 0, got {inner}")
        if features % cells:
            raise ValueError(f"{features} features do not split into {cells} cells")
        side, cside = round(codes**0.5), round(cells**0.5)
        if side * side != codes or cside * cside != cells:
            raise ValueError(f"{codes} codes and {cells} cells must both be square grids")
        self.cells = cells
        self.state = nn.Linear(features, inner)
        self.own = nn.Linear(features // cells, inner, bias=False)
        self.action = nn.Embedding(actions, inner)
        self.position = nn.Parameter(torch.zeros(codes, inner))
        self.out = nn.Linear(inner, vocab)
        self.outcome_out = nn.Linear(inner, 2)
        for layer in (self.out, self.outcome_out):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        g = torch.arange(codes)  # code g sits at (g // side, g % side); its cell, row-major:
        cell = (g // side) * cside // side * cside + (g % side) * cside // side
        self.register_buffer("cell", cell, persistent=False)

    def forward(self, z: Tensor, actions: Tensor) -> Tensor:
        """(B, F) standardised states, (B,) action indices -> (B, G, V) float32 logit offsets."""
        z = z.to(self.out.weight.dtype)
        own = self.own(z.view(len(z), self.cells, -1))[:, self.cell]  # (B, G, inner)
        h = self.state(z)[:, None] + own + self.action(actions.long())[:, None] + self.position
        return self.out(torch.relu(h)).float()

    def outcome(self, z: Tensor, actions: Tensor) -> tuple[Tensor, Tensor]:
        """(B, F) standardised states, (B,) action indices -> offsets (B,) float32 to the reward
        head's output (symlog space) and (B,) float32 to the continue head's logit."""
        z = z.to(self.out.weight.dtype)
        out = self.outcome_out(torch.relu(self.state(z) + self.action(actions.long()))).float()
        return out[:, 0], out[:, 1]


__all__ = ["ActionHead", "FrameHead", "RunningStandardize", "ValueHead", "frozen_statistics"]
