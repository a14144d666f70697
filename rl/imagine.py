"""Imagination: the policy's transformer predicts the next frame as VQ codes after its action.

One env step with imagination continues ``act``'s sequence (rl/policy.py) after the action's
closing ``<end>``::

    prompt (P) | generated (L columns, padding has attention 0) | <Imagine:> | c_0 .. c_{G-1}
    0 .. P-1   | P .. P+L-1                                      | P+L        | P+L+1 .. P+L+G

``<Imagine:>`` is an ordinary text id (input embedding table). The codes ``c_g`` are VQ codebook
ids in ``[0, V)`` (V = ``vq_config.num_embeddings``, NOT the text vocabulary); they enter the LM
through the generation path, ``generation_aligner(generation_embeddings(c))`` as
``inputs_embeds``, and are predicted by ``generation_head`` (not ``lm_head``), as in
``JanusForConditionalGeneration.generate``. G = ``image_tokens_per_frame`` (row-major over the
VQ grid, the order ``vqmodel.encode`` returns and ``vqmodel.decode`` reads).

Off by one: the hidden state at absolute position ``P + L + g`` predicts code ``c_g``; position
``P + L`` is ``<Imagine:>`` itself. So with the full teacher-forced sequence the generation
logits for the G codes are ``generation_head(hidden[:, P+L : P+L+G])``. The hidden state at
``P + L + G`` (after the last code: it has read the frame, reasoning, action and the whole
imagined frame) feeds the reward and continue heads (:class:`WorldHeads`).

Positions are ``cumsum(attention) - 1`` over the whole row, exactly as ``act``/``evaluate``, so
the KV-cached sampler (``RigPolicy.imagine``, and the lookahead of ``RigPolicy.act``, both through
:func:`sample_frame`) and the one-forward recomputation (:func:`teacher_forced`,
``RigPolicy.evaluate(batch, next_codes)``) give the same log-probs to float32 rounding.

Within a lookahead (``act(..., lookahead=n)``) an imagined frame is closed by ``<end>`` and the
next segment (``<reasoning>``, or ``<review>`` after the last one) follows it.

Pixels: frames go in as ``x / 127.5 - 1`` (``RigPolicy.pixel_values``); the VQ decoder's output
``y`` (nominally in [-1, 1]) comes back as ``uint8(round((clamp(y, -1, 1) + 1) * 127.5))``, HWC.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from rl.policy import ActOutput, RigPolicy, _Stream


@dataclass
class ImagineOutput:
    """One batched ``imagine`` call. B rows, G codes per frame."""

    codes: Tensor  # (B, G) int64 sampled VQ code ids in [0, V)
    log_probs: Tensor  # (B, G) float32 log-prob of each code under the tempered softmax
    frames: Tensor  # (B, H, W, 3) uint8 the decoded imagined frames
    reward: Tensor  # (B,) float32 predicted reward, symexp(reward head)
    continue_prob: Tensor  # (B,) float32 sigmoid(continue head): P(episode goes on)
    reward_pred: Tensor  # (B,) float32 raw reward head output (symlog space), for reward_loss
    continue_logit: Tensor  # (B,) float32 raw continue head logit, for continue_loss
    temperature: float  # the code sampler's temperature


class WorldHeads(nn.Module):
    """Reward head (scalar read as symlog(reward): train with ``rl.losses.reward_loss``, decode
    with ``symexp``) and continue head (a logit: train with ``rl.losses.continue_loss``), both
    small MLPs on a hidden state of the LM (``hidden_size``)."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.reward = nn.Sequential(
            nn.Linear(hidden_size, hidden_size), nn.Tanh(), nn.Linear(hidden_size, 1)
        )
        self.cont = nn.Sequential(
            nn.Linear(hidden_size, hidden_size), nn.Tanh(), nn.Linear(hidden_size, 1)
        )
        # Start at reward 0 and continue prob sigmoid(3) ~ 0.95 (most steps do not end an episode).
        for head in (self.reward, self.cont):
            nn.init.zeros_(head[-1].weight)
            nn.init.zeros_(head[-1].bias)
        nn.init.constant_(self.cont[-1].bias, 3.0)

    def forward(self, hidden: Tensor) -> tuple[Tensor, Tensor]:
        """(..., D) hidden -> (reward_pred (...), continue_logit (...)), float32."""
        h = hidden.to(self.reward[0].weight.dtype)
        return self.reward(h).squeeze(-1).float(), self.cont(h).squeeze(-1).float()


# -- pixels <-> codes ------------------------------------------------------------------------------

PSNR_CAP = 100.0
"""PSNR of an exact reconstruction (MSE 0), so that a mean over frames stays finite."""


def psnr(pred: np.ndarray | Tensor, target: np.ndarray | Tensor) -> np.ndarray:
    """Per-frame PSNR (N,) in dB of (N, H, W, C) frames on the 0..255 scale (uint8 or float):
    ``10 log10(255^2 / mean((pred - target)^2))``, capped at :data:`PSNR_CAP` for MSE 0."""
    p = np.asarray(pred, dtype=np.float64)
    t = np.asarray(target, dtype=np.float64)
    if p.shape != t.shape or p.ndim != 4:
        raise ValueError(
            f"psnr needs two (N, H, W, C) arrays of one shape, got {p.shape}, {t.shape}"
        )
    mse = ((p - t) ** 2).reshape(len(p), -1).mean(axis=1)
    with np.errstate(divide="ignore"):
        value = 10.0 * np.log10(255.0**2 / mse)
    return np.minimum(value, PSNR_CAP)



def frame_codes(policy: RigPolicy, frames: np.ndarray | Tensor) -> Tensor:
    """(B, H, W, 3) uint8 real frames -> (B, G) int64 VQ code ids (the next-frame loss targets)."""
    pixels = policy.pixel_values(frames)  # (B, 3, H, W) in [-1, 1]
    vq = policy.model.model.vqmodel
    with torch.no_grad():
        codes = vq.encode(pixels).image_tokens  # (B * G,) row-major per frame
    return codes.view(pixels.shape[0], -1).long()


def decode_codes(policy: RigPolicy, codes: Tensor) -> Tensor:
    """(B, G) code ids -> (B, H, W, 3) uint8 frames through the policy's VQ (:func:`vq_decode`)."""
    if codes.ndim != 2 or codes.shape[1] != policy.image_tokens:
        raise ValueError(f"codes must be (B, {policy.image_tokens}), got {tuple(codes.shape)}")
    return vq_decode(policy.model.model.vqmodel, codes)


def vq_decode(vq: nn.Module, codes: Tensor) -> Tensor:
    """(B, G) code ids -> (B, H, W, 3) uint8 frames: ``round((clamp(y, -1, 1) + 1) * 127.5)`` of
    a Janus VQ's decode. The one decode of the project (imagination, the gate, the tokenizer's
    reconstructions), so every figure decodes alike."""
    with torch.no_grad():
        # vqmodel.decode's three steps, the decoder's convolutions on a channels-last input:
        # oneDNN's fast layout on CPU (1.3x the decode here), the same values to float rounding
        latent = vq.quantize.get_codebook_entry(codes.long())  # (B, C, h, w)
        latent = vq.post_quant_conv(latent.contiguous(memory_format=torch.channels_last))
        y = vq.decoder(latent)  # (B, 3, H, W) ~[-1, 1]
    y = ((y.float().clamp(-1.0, 1.0) + 1.0) * 127.5).round()
    return y.permute(0, 2, 3, 1).to(torch.uint8).contiguous()


def code_embeds(policy: RigPolicy, codes: Tensor) -> Tensor:
    """(B, T) code ids -> (B, T, D) LM input embeddings via the generation path."""
    m = policy.model.model
    return m.generation_aligner(m.generation_embeddings(codes.long()))


def code_logits(policy: RigPolicy, hidden: Tensor) -> Tensor:
    """(..., D) hidden -> (..., V) float32 generation-head logits over the VQ codebook."""
    return policy.model.model.generation_head(hidden).float()


def code_log_probs(logits: Tensor, codes: Tensor, temperature: float) -> Tensor:
    """(B, G, V) logits, (B, G) codes -> (B, G) float32 log-probs of the tempered softmax."""
    logp = torch.log_softmax(logits.float() / temperature, -1)
    return logp.gather(-1, codes.long().unsqueeze(-1)).squeeze(-1)


# -- sampling and teacher forcing ------------------------------------------------------------------


def sample_frame(
    policy: RigPolicy,
    stream: _Stream,
    temperature: float,
    generator: torch.Generator | None = None,
    offsets: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Feed ``<Imagine:>`` to a decoding stream (``rl.policy._Stream``, its rows just past an
    action), then sample G codes one by one, each fed back through the generation embeddings;
    ``offsets`` (B, G, V), the frame head's (``RigPolicy.frame_offsets``), add to code g's logits.
    Returns the codes (B, G) int64, their log-probs (B, G) float32 under the tempered softmax,
    and the hidden state (B, D) after the last code (the world heads' input)."""
    h = stream.feed_marker(policy.ids.imagine)  # (B, D) at <Imagine:>: predicts code 0
    codes, logps = [], []
    for g in range(policy.image_tokens):
        logits = code_logits(policy, h) if offsets is None else code_logits(policy, h) + offsets[:, g]
        logp = torch.log_softmax(logits / temperature, -1)  # (B, V)
        code = torch.multinomial(logp.exp(), 1, generator=generator)  # (B, 1)
        codes.append(code.squeeze(1))
        logps.append(logp.gather(1, code).squeeze(1))
        h = stream.feed(code.squeeze(1), code=True)
    return torch.stack(codes, 1), torch.stack(logps, 1).float(), h


def teacher_forced(
    policy: RigPolicy, act_out: ActOutput, next_codes: Tensor
) -> tuple[Tensor, Tensor]:
    """One forward (no cache, with gradients) over the act sequence + ``<Imagine:>`` + the
    given codes (B, G). Returns generation-head logits (B, G, V) float32, where ``[:, g]`` is
    read at position ``P + L + g`` and predicts ``next_codes[:, g]``, and the hidden state
    (B, D) after the last code (``RigPolicy.world_outcome`` reads reward and continue from it),
    the frame head's offsets added to the logits.
    ``RigPolicy.evaluate(batch, next_codes)`` gives the same from the learner's one forward."""
    from rl.heads import frozen_statistics

    hidden, _, start = policy.forward_sequence(act_out, next_codes)
    logits = code_logits(policy, hidden[:, start : start + policy.image_tokens])
    with frozen_statistics(policy):  # a diagnostic forward: the heads' statistics stay
        offsets = policy.frame_offsets(policy.decision_state(hidden, act_out), act_out.actions)
    return logits if offsets is None else logits + offsets, hidden[:, -1]


def next_frame_logits(policy: RigPolicy, act_out: ActOutput, next_codes: Tensor) -> Tensor:
    """(B, G, V) float32 teacher-forced generation logits predicting ``next_codes`` (B, G)
    (``[:, g]`` predicts ``next_codes[:, g]``): the input of ``rl.losses.next_frame_loss``."""
    return teacher_forced(policy, act_out, next_codes)[0]


__all__ = [
    "PSNR_CAP", "ImagineOutput", "WorldHeads", "code_embeds", "code_log_probs", "code_logits",
    "decode_codes", "frame_codes", "next_frame_logits", "psnr", "sample_frame", "teacher_forced",
    "vq_decode",
]  # fmt: skip
