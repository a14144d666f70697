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
the KV-cached sampler (:func:`imagine`) and the one-forward recomputation
(:func:`next_frame_logits`) give the same log-probs to float32 rounding.

Pixels: frames go in as ``x / 127.5 - 1`` (``RigPolicy.pixel_values``); the VQ decoder's output
``y`` (nominally in [-1, 1]) comes back as ``uint8(round((clamp(y, -1, 1) + 1) * 127.5))``, HWC.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor, nn

from rl.losses import symexp

if TYPE_CHECKING:
    from rl.policy import ActOutput, RigPolicy


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

    @classmethod
    def for_policy(cls, policy: RigPolicy) -> WorldHeads:
        param = next(policy.model.parameters())
        return cls(int(policy.model.config.text_config.hidden_size)).to(param.device)

    def forward(self, hidden: Tensor) -> tuple[Tensor, Tensor]:
        """(..., D) hidden -> (reward_pred (...), continue_logit (...)), float32."""
        h = hidden.to(self.reward[0].weight.dtype)
        return self.reward(h).squeeze(-1).float(), self.cont(h).squeeze(-1).float()


# -- pixels <-> codes ------------------------------------------------------------------------------


def frame_codes(policy: RigPolicy, frames: np.ndarray | Tensor) -> Tensor:
    """(B, H, W, 3) uint8 real frames -> (B, G) int64 VQ code ids (the next-frame loss targets)."""
    pixels = policy.pixel_values(frames)  # (B, 3, H, W) in [-1, 1]
    vq = policy.model.model.vqmodel
    with torch.no_grad():
        codes = vq.encode(pixels).image_tokens  # (B * G,) row-major per frame
    return codes.view(pixels.shape[0], -1).long()


def decode_codes(policy: RigPolicy, codes: Tensor) -> Tensor:
    """(B, G) code ids -> (B, H, W, 3) uint8 frames: ``round((clamp(y, -1, 1) + 1) * 127.5)``."""
    with torch.no_grad():
        y = policy.model.model.vqmodel.decode(codes.long())  # (B, 3, H, W) ~[-1, 1]
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


# -- the prefix: prompt + generated + <Imagine:> -------------------------------------------------


def _prefix(policy: RigPolicy, act_out: ActOutput) -> tuple[Tensor, Tensor]:
    """LM input embeddings (B, P + L + 1, D) of prompt + generated + ``<Imagine:>`` with the
    observed frame's SigLIP features at the ``<image>`` placeholders, and the attention (bool)."""
    dev = policy.device
    prompt = act_out.prompt_ids.to(dev)
    batch = prompt.shape[0]
    marker = torch.full((batch, 1), policy.ids.imagine, dtype=torch.int64, device=dev)
    ids = torch.cat([prompt, act_out.tokens.to(dev), marker], 1)  # (B, P + L + 1)
    attn = torch.cat(
        [torch.ones_like(prompt, dtype=torch.bool), act_out.attention_mask.to(dev),
         torch.ones_like(marker, dtype=torch.bool)], 1,
    )  # fmt: skip
    m = policy.model.model
    embeds = m.get_input_embeddings()(ids)  # (B, T, D)
    feats = m.get_image_features(policy.pixel_values(act_out.frames), return_dict=True)
    feats = feats.pooler_output.to(embeds.dtype)  # (B, G, D)
    place = (ids == policy.model.config.image_token_id).unsqueeze(-1)  # (B, T, 1)
    if int(place.sum()) != feats.shape[0] * feats.shape[1]:
        raise ValueError("the prompt's <image> placeholders do not match the frame's features")
    embeds = embeds.masked_scatter(place, feats.reshape(-1))
    return embeds, attn


# -- sampling and teacher forcing ------------------------------------------------------------------


@torch.no_grad()
def imagine(
    policy: RigPolicy,
    heads: WorldHeads,
    act_out: ActOutput,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
) -> ImagineOutput:
    """Sample the imagined next frame after each row's action: prefill prompt + generated +
    ``<Imagine:>`` once, then G codes one by one with the KV cache (each fed back through the
    generation embeddings); decode them to pixels and read reward/continue after the last code."""
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    G = policy.image_tokens
    embeds, attn = _prefix(policy, act_out)
    pos = attn.long().cumsum(1).sub(1).clamp_min(0)
    hidden, cache = policy.hidden(None, attn, pos, inputs_embeds=embeds, use_cache=True)
    h = hidden[:, -1]  # (B, D) at <Imagine:>: predicts code 0
    ones = torch.ones(attn.shape[0], 1, dtype=torch.bool, device=attn.device)
    codes, logps = [], []
    for _ in range(G):
        logp = torch.log_softmax(code_logits(policy, h) / temperature, -1)  # (B, V)
        code = torch.multinomial(logp.exp(), 1, generator=generator)  # (B, 1)
        codes.append(code.squeeze(1))
        logps.append(logp.gather(1, code).squeeze(1))
        attn = torch.cat([attn, ones], 1)
        pos = attn.long().sum(1, keepdim=True).sub(1)  # (B, 1)
        hidden, cache = policy.hidden(
            None,
            attn,
            pos,
            past_key_values=cache,
            use_cache=True,
            inputs_embeds=code_embeds(policy, code),
        )
        h = hidden[:, -1]  # after the last iteration: the hidden state after code G-1
    code_t = torch.stack(codes, 1)  # (B, G)
    reward_pred, cont_logit = heads(h)
    return ImagineOutput(
        codes=code_t,
        log_probs=torch.stack(logps, 1).float(),
        frames=decode_codes(policy, code_t),
        reward=symexp(reward_pred),
        continue_prob=torch.sigmoid(cont_logit),
        reward_pred=reward_pred,
        continue_logit=cont_logit,
        temperature=float(temperature),
    )


def teacher_forced(
    policy: RigPolicy, act_out: ActOutput, next_codes: Tensor
) -> tuple[Tensor, Tensor]:
    """One forward (no cache, with gradients) over prompt + generated + ``<Imagine:>`` + the
    given codes (B, G). Returns generation-head logits (B, G, V) float32, where ``[:, g]`` is
    read at position ``P + L + g`` and predicts ``next_codes[:, g]``, and the hidden state
    (B, D) after the last code (for :class:`WorldHeads`)."""
    G = policy.image_tokens
    if next_codes.ndim != 2 or next_codes.shape[1] != G:
        raise ValueError(f"next_codes must be (B, {G}), got {tuple(next_codes.shape)}")
    embeds, attn = _prefix(policy, act_out)
    start = embeds.shape[1] - 1  # position of <Imagine:>
    codes = next_codes.to(policy.device)
    embeds = torch.cat([embeds, code_embeds(policy, codes).to(embeds.dtype)], 1)
    attn = torch.cat([attn, torch.ones_like(codes, dtype=torch.bool)], 1)
    pos = attn.long().cumsum(1).sub(1).clamp_min(0)
    hidden, _ = policy.hidden(None, attn, pos, inputs_embeds=embeds)
    return code_logits(policy, hidden[:, start : start + G]), hidden[:, -1]


def next_frame_logits(policy: RigPolicy, act_out: ActOutput, next_codes: Tensor) -> Tensor:
    """(B, G, V) float32 teacher-forced generation logits predicting ``next_codes`` (B, G)
    (``[:, g]`` predicts ``next_codes[:, g]``): the input of ``rl.losses.next_frame_loss``."""
    return teacher_forced(policy, act_out, next_codes)[0]


__all__ = [
    "ImagineOutput", "WorldHeads", "code_embeds", "code_log_probs", "code_logits",
    "decode_codes", "frame_codes", "imagine", "next_frame_logits", "teacher_forced",
]  # fmt: skip
