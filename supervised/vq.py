"""Training the policy's VQ tokenizer (``JanusVQVAE``) on game frames, and its PSNR.

The VQ trained here is the one the policy imagines with: ``model.model.vqmodel`` of a preset
(``configs/policy/*.yaml``, its ``vq:`` section), so the weights it writes load into any policy
of that preset (:func:`load_vq_into`) and the codes the policy predicts are the codes trained here.

What training has to match. The policy only ever calls ``vqmodel.encode`` and ``vqmodel.decode``:

    encode:  x -> encoder -> quant_conv -> h (B, D, g, g) -> argmin_k |h - e_k|^2   (raw e_k)
    decode:  k -> e_k / |e_k| -> post_quant_conv -> decoder -> y                  (l2-normed!)

``JanusVQVAE.forward`` cannot be trained (its decoder reads the codes, so no gradient reaches
the encoder) and its decoder sees normalised codes while its encoder matches raw ones. So the
training step here uses l2-normalised codes throughout (as LlamaGen, Janus's tokenizer, does)
and keeps the stored codebook at unit norm: then ``argmin |h - e_k|^2 = argmax <h/|h|, e_k>``,
and ``encode``/``decode`` of the saved weights are exactly the training-time quantiser::

    z = normalize(quant_conv(encoder(x)))        (B, D, g, g)
    k = argmax_j <z, e_j>,  q = e_k               e_j unit vectors
    y = decoder(post_quant_conv(z + sg(q - z)))   straight-through
    loss = mse(y, x) + beta * mse(z, sg(q))

The codebook is updated by an exponential moving average of the (normalised) encoder outputs
assigned to each code (VQ-VAE-2), re-normalised; codes unused for a while are restarted on
random encoder outputs of the batch, so the whole codebook stays in use.

PSNR is measured through ``encode`` -> ``decode`` exactly as the policy decodes imagined frames
(``rl.imagine.decode_codes``: ``round((clamp(y, -1, 1) + 1) * 127.5)``), per frame on uint8
pixels, then averaged over frames; held-out frames come from episodes (worlds) not trained on.

Outputs of :func:`save_vq` in a folder: ``vq.safetensors`` (the ``JanusVQVAE`` state dict),
``vq_config.json`` (its ``JanusVQVAEConfig``) and ``report.json`` (settings, PSNR, timings).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from rig.errors import UserError
from rl.imagine import PSNR_CAP, psnr

if TYPE_CHECKING:
    import torch
    from transformers import JanusVQVAE

VQ_FILE = "vq.safetensors"
CONFIG_FILE = "vq_config.json"
REPORT_FILE = "report.json"
VQ_PREFIX = "model.vqmodel."
"""Where the VQ's tensors sit in a policy's ``model.safetensors``."""


# -- frames --------------------------------------------------------------------------------------


@dataclass
class Frames:
    """Training and held-out frames, (N, H, W, 3) uint8 each, and where they came from."""

    train: np.ndarray
    heldout: np.ndarray
    source: str


def frames_from_env(
    n: int,
    seed: int = 0,
    size: int = 64,
    env_id: str = "rig/Crafter-v0",
    episode_steps: int = 400,
    stride: int = 4,
) -> tuple[np.ndarray, np.ndarray]:
    """About ``n`` frames of the scripted Crafter expert: ``(frames (n, size, size, 3) uint8,
    episode (n,) int64)``. Every ``stride``-th frame of episodes of up to ``episode_steps`` steps,
    each episode a fresh world (seed ``seed * 100_000 + k``); 400 steps cover a whole day/night
    cycle (300 steps), so night frames (darker, with Crafter's random noise) are in too."""
    import envs
    from envs.agents import ScriptedCrafterAdapter

    if n < 1:
        raise UserError(f"--frames-from-env {n}: give at least 1 frame")
    env = envs.make(env_id, size=size)
    frames, episode = [], []
    k = 0
    try:
        while len(frames) < n:
            agent = ScriptedCrafterAdapter(seed=seed * 100_000 + k)
            obs, info = env.reset(seed=seed * 100_000 + k)
            agent.reset()
            for t in range(episode_steps):
                if t % stride == 0:
                    frames.append(obs)
                    episode.append(k)
                    if len(frames) == n:
                        break
                obs, _, terminated, truncated, info = env.step(agent.act(obs, info))
                if terminated or truncated:
                    break
            k += 1
    finally:
        env.close()
    return np.stack(frames).astype(np.uint8), np.asarray(episode, dtype=np.int64)


def split_by_episode(
    frames: np.ndarray, episode: np.ndarray, heldout_fraction: float = 0.1
) -> tuple[np.ndarray, np.ndarray]:
    """(train, heldout): the last episodes (about ``heldout_fraction`` of the frames, at least
    one episode) are held out whole, so held-out PSNR is measured on worlds never trained on.
    With a single episode, its last ``heldout_fraction`` of frames are held out."""
    ids = np.unique(episode)
    if len(ids) < 2:
        cut = len(frames) - max(1, round(heldout_fraction * len(frames)))
        return frames[:cut], frames[cut:]
    held: list[int] = []
    for e in ids[::-1]:
        if held and np.isin(episode, held).sum() >= heldout_fraction * len(frames):
            break
        if len(held) == len(ids) - 1:
            break
        held.append(int(e))
    mask = np.isin(episode, held)
    return frames[~mask], frames[mask]


def dataset_frames(
    path: str | os.PathLike, max_frames: int | None = None, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """``(frames (N, H, W, 3) uint8, episode (N,) int64)`` of a ``rig collect`` dataset
    (``supervised.dataset.open_dataset``), in dataset order; ``max_frames`` picks a
    deterministic random subset (``frames(max_frames, seed)``'s), the episode ordinal of each
    frame comes from the index (episode k holds ``length_k + 1`` frames)."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"--dataset {path}: no such dataset folder; make one with `rig collect`")
    from supervised.dataset import open_dataset

    reader = open_dataset(path)  # DatasetError (a UserError) names what is wrong
    total = reader.num_frames
    if total == 0:
        raise UserError(f"--dataset {path}: the dataset holds no frames")
    if max_frames is None or max_frames >= total:
        pick = np.arange(total)
    else:
        pick = np.sort(np.random.default_rng(seed).choice(total, int(max_frames), replace=False))
    lengths = [int(e["length"]) + 1 for s in reader.index["shards"] for e in s["episodes"]]
    starts = np.concatenate([[0], np.cumsum(lengths)])
    episode = np.searchsorted(starts, pick, side="right") - 1
    return np.asarray(reader.frames_at(pick)), episode.astype(np.int64)


def check_frames(frames: np.ndarray, image_size: int, what: str) -> None:
    """UserError unless ``frames`` are (N, image_size, image_size, 3) uint8 with N >= 1."""
    if frames.ndim != 4 or frames.shape[-1] != 3 or len(frames) == 0:
        raise UserError(f"{what}: expected (N, H, W, 3) RGB frames, got shape {frames.shape}")
    if frames.shape[1:3] != (image_size, image_size):
        h, w = frames.shape[1:3]
        raise UserError(
            f"{what}: frames are {h}x{w} but the preset's VQ reads {image_size}x{image_size}; "
            f"collect at env.size={image_size} or pick a preset with image_size {h}"
        )
    if frames.dtype != np.uint8:
        raise UserError(f"{what}: frames must be uint8 pixels, got {frames.dtype}")


# -- the VQ of a preset --------------------------------------------------------------------------


def vq_from_preset(preset: str | os.PathLike, seed: int = 0) -> tuple[JanusVQVAE, dict[str, Any]]:
    """A freshly initialised ``JanusVQVAE`` with the exact config a policy of ``preset`` has
    (``rl.model.build_config``), and the preset dict. UserError for an unknown/bad preset."""
    import torch
    from transformers import JanusVQVAE

    from rl.model import build_config, load_preset
    from rl.tokenizer import build_tokenizer

    try:
        data = load_preset(preset)
        config = build_config(data, build_tokenizer())
    except ValueError as err:
        raise UserError(f"--preset {preset}: {err}") from None
    torch.manual_seed(seed)
    vq = JanusVQVAE(config.vq_config)
    # PyTorch's default (Kaiming-uniform) init rather than HF's N(0, 0.02): trains faster from
    # scratch (taming's VQGAN uses the defaults too).
    for module in vq.modules():
        if isinstance(module, torch.nn.Conv2d | torch.nn.GroupNorm):
            module.reset_parameters()
    with torch.no_grad():
        w = vq.quantize.embedding.weight
        w.copy_(torch.nn.functional.normalize(torch.randn_like(w), dim=1))
    return vq, data


def image_size_of(vq: JanusVQVAE) -> int:
    """Frame side the VQ reads: its grid times its downsampling."""
    cfg = vq.config
    return int(cfg.num_patches) * 2 ** (len(cfg.channel_multiplier) - 1)


def to_pixels(frames: np.ndarray) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float32 in [-1, 1] (the policy's ``x / 127.5 - 1``)."""
    import torch

    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0


def reconstruct(
    vq: JanusVQVAE, frames: np.ndarray, batch_size: int = 64
) -> tuple[np.ndarray, np.ndarray]:
    """``(reconstructions (N, H, W, 3) uint8, codes (N, G) int64)`` through ``vq.encode`` and
    ``rl.imagine.vq_decode`` (the decode imagination uses)."""
    import torch

    from rl.imagine import vq_decode

    outs, codes = [], []
    with torch.no_grad():
        for i in range(0, len(frames), batch_size):
            x = to_pixels(frames[i : i + batch_size])
            c = vq.encode(x).image_tokens.view(len(x), -1)
            outs.append(vq_decode(vq, c).numpy())
            codes.append(c.numpy())
    return np.concatenate(outs), np.concatenate(codes).astype(np.int64)


def background(frames: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 per-pixel median of (N, H, W, 3) frames (at most 1,024 of them, evenly
    spaced): the static part of a game's screen. Where a frame differs from it is what moves."""
    step = max(1, len(frames) // 1024)
    return np.median(frames[::step], axis=0).astype(np.uint8)


def foreground_psnr(pred: np.ndarray, target: np.ndarray, back: np.ndarray) -> np.ndarray:
    """(N,) PSNR in dB over the pixels of ``target`` that differ from ``back`` (all channels of
    such a pixel; capped as :func:`rl.imagine.psnr`), NaN for a frame that is all background."""
    moving = (target != back).any(-1)  # (N, H, W)
    err = ((pred.astype(np.float64) - target.astype(np.float64)) ** 2).mean(-1)  # (N, H, W)
    n = moving.reshape(len(target), -1).sum(1)
    mse = (err * moving).reshape(len(target), -1).sum(1) / np.maximum(n, 1)
    with np.errstate(divide="ignore"):
        value = np.minimum(10.0 * np.log10(255.0**2 / mse), PSNR_CAP)
    return np.where(n > 0, value, np.nan)


def code_consistency(frames: np.ndarray, codes: np.ndarray) -> float:
    """Share of the patches whose content (the exact pixels a code covers) occurs more than once
    in ``frames`` (N, H, W, 3) that carry the code their content gets most often (``codes``
    (N, g * g), row-major): 1 when a code is a function of its patch. An encoder that reads the
    whole frame may code one patch differently by what lies elsewhere; then a world model has to
    predict codes of unchanged patches as a hash of the rest. NaN when no content repeats."""
    n, g = len(frames), round(codes.shape[1] ** 0.5)
    f = frames.shape[1] // g
    patches = frames.reshape(n, g, f, g, f, -1).transpose(0, 1, 3, 2, 4, 5).reshape(n * g * g, -1)
    _, content, seen = np.unique(patches, axis=0, return_inverse=True, return_counts=True)
    content = content.ravel()
    pairs, count = np.unique(np.stack([content, codes.ravel()], 1), axis=0, return_counts=True)
    top = np.zeros(len(seen), np.int64)
    np.maximum.at(top, pairs[:, 0], count)  # each content's most common code's count
    repeated = seen > 1
    return float(top[repeated].sum() / seen[repeated].sum()) if repeated.any() else float("nan")


FOREGROUND_GAP_DB = 6.0
"""How far the moving pixels' PSNR may fall below the whole frame's before ``rig tokenizer
train`` warns: 2.6 dB for Catch's tokenizer that keeps the ball, 13 dB for the one that lost it."""


def foreground_warning(held: dict[str, float]) -> str | None:
    """A one-line warning when the held-out metrics (:func:`evaluate`'s) say the tokenizer
    draws the moving pixels much worse than the frame (a small object lost), else None."""
    gap = held["psnr"] - held["psnr_foreground"]
    if gap <= FOREGROUND_GAP_DB:
        return None
    return (f"warning: the moving pixels reconstruct at {held['psnr_foreground']:.1f} dB, "
            f"{gap:.1f} dB below the whole frame: small objects may be lost; look at the "
            f"reconstructions, or train longer or with a higher --foreground")  # fmt: skip


def evaluate(vq: JanusVQVAE, frames: np.ndarray) -> dict[str, float]:
    """Held-out metrics: mean, 10th percentile and minimum per-frame PSNR, the mean PSNR over
    the moving pixels (:func:`foreground_psnr` against the frames' own :func:`background`),
    :func:`code_consistency` and codebook use."""
    recon, codes = reconstruct(vq, frames)
    values = psnr(recon, frames)
    moving = foreground_psnr(recon, frames, background(frames))
    counts = np.bincount(codes.ravel(), minlength=vq.config.num_embeddings).astype(np.float64)
    p = counts / counts.sum()
    entropy = -(p[p > 0] * np.log(p[p > 0])).sum()
    return {
        "psnr": float(values.mean()),
        "psnr_p10": float(np.percentile(values, 10)),
        "psnr_min": float(values.min()),
        "psnr_foreground": float(np.nanmean(moving)) if np.isfinite(moving).any() else PSNR_CAP,
        "code_consistency": code_consistency(frames, codes),
        "codes_used": float((counts > 0).sum()),
        "perplexity": float(math.exp(entropy)),
    }


# -- training ------------------------------------------------------------------------------------


@dataclass
class TrainSettings:
    """Knobs of :func:`train_vq` (the CLI's flags)."""

    steps: int = 2000
    batch_size: int = 8  # whole 64 px frames: 1250 steps reached 31.8 dB (16x16 grid, 1024 codes)
    lr: float = 2e-3
    target_psnr: float | None = 30.0  # stop at the first evaluation reaching it; None: never
    eval_every: int = 250
    warmup: int = 50  # linear lr warm-up, then cosine decay to 10 %
    beta: float = 0.25  # commitment weight (VQ-VAE's beta)
    ema_decay: float = 0.99  # codebook EMA
    dead_after: int = 50  # a code unassigned for this many steps is restarted
    eval_frames: int = 512  # held-out frames evaluated during training (all at the end)
    crop: int | None = None  # train on random crops of this side (a multiple of the VQ's
    # downsampling, so the code grid keeps its phase): the nets are convolutional, and a 32 px
    # crop costs a quarter of a 64 px frame; evaluation always encodes whole frames
    full_tail: float = 0.25  # with crop: the last quarter trains on whole frames (batch scaled
    # to the same pixels per step), because the attention blocks of the VQ see 4x more positions
    # on a whole frame than on a half-side crop: without it whole frames scored 21.5 dB where
    # the same model scored 24.7 dB on crops (500 whole-frame steps then brought 26.7 dB)
    max_seconds: float | None = None  # wall-clock budget of the training loop
    foreground: float = 1.0  # weight of a second reconstruction term, the MSE over the pixels
    # that differ from the training frames' per-pixel median (what moves). Plain MSE lets a
    # small object go: Catch's VQ dropped the ball from 98% of its reconstructions and still
    # scored 23 dB, since the ball is 1.6% of the pixels (docs/imagination.md); 0: plain MSE
    seed: int = 0


@dataclass
class _Codebook:
    """EMA state of the codebook (VQ-VAE-2's update) and per-code idle counters."""

    size: torch.Tensor  # (K,) float: EMA of assignments
    total: torch.Tensor  # (K, D): EMA of the sum of assigned (normalised) encoder outputs
    idle: torch.Tensor  # (K,) int64: steps since the code was last assigned
    restarts: int = 0


def _quantize(vq: JanusVQVAE, x: torch.Tensor):
    """z (N, D) normalised encoder outputs, k (N,) codes, q (N, D) their codebook vectors, and
    the (B, D, g, g) shape; rows are (b, i, j) in ``encode``'s order."""
    import torch.nn.functional as F

    h = vq.quant_conv(vq.encoder(x))  # (B, D, g, g)
    shape = h.shape
    z = F.normalize(h.permute(0, 2, 3, 1).reshape(-1, shape[1]), dim=1)  # (B*g*g, D)
    codebook = vq.quantize.embedding.weight  # (K, D), unit rows
    k = (z.detach() @ codebook.t()).argmax(dim=1)
    return z, k, codebook[k].detach(), shape


def _random_crop(x: torch.Tensor, crop: int, factor: int, rng: np.random.Generator) -> torch.Tensor:
    """One random (crop x crop) window per frame, its corner on the VQ's ``factor`` grid."""
    import torch

    cells = (x.shape[-1] - crop) // factor + 1
    corners = rng.integers(cells, size=(len(x), 2)) * factor
    return torch.stack(
        [f[:, i : i + crop, j : j + crop] for f, (i, j) in zip(x, corners, strict=True)]
    )


def _update_codebook(vq: JanusVQVAE, state: _Codebook, z: torch.Tensor, k: torch.Tensor,
                     decay: float, dead_after: int, gen: torch.Generator) -> None:  # fmt: skip
    import torch
    import torch.nn.functional as F

    z = z.detach()
    counts = torch.bincount(k, minlength=state.size.numel()).float()
    sums = torch.zeros_like(state.total).index_add_(0, k, z)
    state.size.mul_(decay).add_(counts, alpha=1 - decay)
    state.total.mul_(decay).add_(sums, alpha=1 - decay)
    state.idle.add_(1).masked_fill_(counts > 0, 0)
    dead = torch.nonzero(state.idle >= dead_after).flatten()
    if len(dead):  # restart idle codes on random encoder outputs of this batch
        pick = torch.randint(len(z), (len(dead),), generator=gen)
        state.total[dead] = z[pick]
        state.size[dead] = 1.0
        state.idle[dead] = 0
        state.restarts += len(dead)
    vq.quantize.embedding.weight.data.copy_(F.normalize(state.total, dim=1))


def train_vq(
    vq: JanusVQVAE,
    frames: Frames,
    settings: TrainSettings,
    progress: Callable[[int, dict[str, float]], None] | None = None,
) -> dict[str, Any]:
    """Train ``vq`` in place on ``frames.train``; evaluate on ``frames.heldout`` every
    ``eval_every`` steps and stop early once the held-out PSNR reaches ``target_psnr``.

    ``progress(step, metrics)`` is called after every step (metrics: ``loss``, ``recon_mse``,
    ``commit``, ``lr``; plus ``heldout/*`` on evaluation steps). Returns the report: settings,
    steps done, wall time, final held-out metrics (on every held-out frame) and the history."""
    import torch
    import torch.nn.functional as F

    s = settings
    if s.steps < 1 or s.batch_size < 1 or s.lr <= 0:
        raise UserError("--steps, --batch-size and --lr must be positive")
    torch.manual_seed(s.seed)
    gen = torch.Generator().manual_seed(s.seed)
    rng = np.random.default_rng(s.seed)
    K, D = vq.quantize.embedding.weight.shape
    with torch.no_grad():  # start from unit codes: the invariant encode relies on
        vq.quantize.embedding.weight.copy_(F.normalize(vq.quantize.embedding.weight, dim=1))
    book = _Codebook(
        size=torch.ones(K), total=vq.quantize.embedding.weight.detach().clone(),
        idle=torch.zeros(K, dtype=torch.long),
    )  # fmt: skip
    vq.quantize.embedding.weight.requires_grad_(False)  # EMA-updated, not by the optimiser
    params = [p for p in vq.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=s.lr, betas=(0.9, 0.99), weight_decay=0.0)

    def done(step: int) -> float:  # fraction of the budget (steps or seconds) used so far
        t = step / s.steps
        if s.max_seconds:
            t = max(t, (time.perf_counter() - start) / s.max_seconds)
        return min(1.0, t)

    def lr_at(step: int) -> float:
        # linear warm-up, then cosine to 10 % at the end of whichever budget ends first
        if step < s.warmup:
            return s.lr * (step + 1) / s.warmup
        return s.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * done(step))))

    factor = 2 ** (len(vq.config.channel_multiplier) - 1)
    size = frames.train.shape[1]
    if s.crop is not None and (s.crop % factor or not factor <= s.crop <= size):
        raise UserError(
            f"--crop {s.crop}: must be a multiple of the VQ's downsampling {factor} in [{factor}, {size}]"
        )
    eval_idx = rng.permutation(len(frames.heldout))[: s.eval_frames]
    back = to_pixels(background(frames.train)[None])  # (1, 3, H, W)
    history: list[dict[str, float]] = []
    start, cpu_start = time.perf_counter(), time.process_time()
    step, reached = 0, False
    vq.train()
    try:
        while step < s.steps and not reached:
            if s.max_seconds is not None and time.perf_counter() - start > s.max_seconds:
                break
            # one step: sample frames, quantise, reconstruct, update weights and codebook
            tail = s.crop is not None and done(step) >= 1.0 - s.full_tail
            n = max(1, s.batch_size * s.crop**2 // size**2) if tail else s.batch_size
            x = to_pixels(frames.train[rng.integers(len(frames.train), size=n)])  # (n, 3, H, W)
            x = torch.cat([x, (x != back).any(1, keepdim=True).float()], 1)  # + moving mask
            if s.crop is not None and not tail:
                x = _random_crop(x, s.crop, factor, rng)  # (B, 4, crop, crop)
            x, moving = x[:, :3], x[:, 3:]
            z, k, q, shape = _quantize(vq, x)
            st = (z + (q - z).detach()).view(shape[0], shape[2], shape[3], shape[1])
            y = vq.decoder(vq.post_quant_conv(st.permute(0, 3, 1, 2)))
            recon = F.mse_loss(y, x)
            if s.foreground:
                err = ((y - x) ** 2).mean(1, keepdim=True)  # (B, 1, H, W)
                recon = recon + s.foreground * (err * moving).sum() / moving.sum().clamp_min(1)
            commit = F.mse_loss(z, q)
            loss = recon + s.beta * commit
            for group in opt.param_groups:
                group["lr"] = lr_at(step)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                _update_codebook(vq, book, z, k, s.ema_decay, s.dead_after, gen)
            step += 1

            metrics = {"loss": loss.item(), "recon_mse": recon.item(), "commit": commit.item(),
                       "lr": opt.param_groups[0]["lr"]}  # fmt: skip
            if step % s.eval_every == 0:
                vq.eval()
                held = evaluate(vq, frames.heldout[eval_idx])
                vq.train()
                held["seconds"] = time.perf_counter() - start
                held["cpu_seconds"] = time.process_time() - cpu_start
                history.append({"step": step, **held})
                metrics.update({f"heldout/{key}": v for key, v in held.items()})
                reached = s.target_psnr is not None and held["psnr"] >= s.target_psnr
            if progress is not None:
                progress(step, metrics)
    finally:
        vq.quantize.embedding.weight.requires_grad_(True)
        vq.eval()
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    final = evaluate(vq, frames.heldout)
    return {
        "settings": asdict(s),
        "steps_done": step,
        "reached_target": s.target_psnr is not None and final["psnr"] >= s.target_psnr,
        "train_seconds": seconds,
        "train_cpu_seconds": cpu_seconds,  # less than threads x wall on a shared machine
        "train_frames": len(frames.train),
        "heldout_frames": len(frames.heldout),
        "frames_source": frames.source,
        "codebook_restarts": book.restarts,
        "heldout": final,
        "history": history,
        "vq_config": vq_config_dict(vq),
        "vq_parameters": sum(p.numel() for p in vq.parameters()),
        "tokens_per_frame": int(vq.config.num_patches) ** 2,
        "threads": torch.get_num_threads(),
    }


# -- weights -------------------------------------------------------------------------------------


def vq_config_dict(vq: JanusVQVAE) -> dict[str, Any]:
    keys = ("embed_dim", "num_embeddings", "latent_channels", "base_channels",
            "channel_multiplier", "num_res_blocks", "num_patches")  # fmt: skip
    return {
        key: (list(v) if isinstance(v := getattr(vq.config, key), tuple) else v) for key in keys
    }


def save_vq(vq: JanusVQVAE, out_dir: str | os.PathLike, report: dict[str, Any]) -> Path:
    """Write ``vq.safetensors``, ``vq_config.json`` and ``report.json`` into ``out_dir``."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in vq.state_dict().items()}
    save_file(state, str(out / VQ_FILE))
    (out / CONFIG_FILE).write_text(vq.config.to_json_string())
    (out / REPORT_FILE).write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    return out


def vq_file(path: str | os.PathLike) -> Path:
    """The ``vq.safetensors`` of a tokenizer folder (or the file itself); UserError if none."""
    path = Path(path)
    file = path / VQ_FILE if path.is_dir() else path
    if not file.is_file():
        raise UserError(f"{path}: no {VQ_FILE} there; train one with `rig tokenizer train`")
    return file


def _read_vq(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    file = vq_file(path)
    try:
        return load_file(str(file))
    except (SafetensorError, OSError) as err:
        raise UserError(f"corrupted VQ weights {file}: {err}") from None


def _check_fit(state: dict[str, torch.Tensor], target: dict[str, torch.Tensor], where: str) -> None:
    missing = sorted(set(target) - set(state))
    bad = sorted(k for k in set(state) & set(target) if state[k].shape != target[k].shape)
    extra = sorted(set(state) - set(target))
    if missing or bad or extra:
        first = (bad or missing or extra)[0]
        raise UserError(
            f"{where}: the VQ weights do not fit this model's VQ ({len(bad)} shapes differ, "
            f"{len(missing)} tensors missing, {len(extra)} unexpected, e.g. {first}); "
            f"train them with the same --preset"
        )


def load_vq_into(target: Any, path: str | os.PathLike) -> Any:
    """Load trained VQ weights (a :func:`save_vq` folder or its ``vq.safetensors``) into
    ``target``: a ``RigPolicy``, a ``JanusForConditionalGeneration`` or a ``JanusVQVAE``.
    Returns ``target``. UserError if the weights are missing or of another VQ config."""
    vq = target
    for _ in range(3):  # RigPolicy.model (Janus) .model (JanusModel) .vqmodel
        if hasattr(vq, "quantize"):
            break
        vq = getattr(vq, "vqmodel", None) or getattr(vq, "model", None)
    if not hasattr(vq, "quantize"):
        raise TypeError(f"load_vq_into: {type(target).__name__} holds no JanusVQVAE")
    state = _read_vq(path)
    current = vq.state_dict()
    _check_fit(state, current, str(path))
    param = next(vq.parameters())
    vq.load_state_dict({k: v.to(param.device, current[k].dtype) for k, v in state.items()})
    return target


def write_vq_into_checkpoint(checkpoint: str | os.PathLike, path: str | os.PathLike) -> Path:
    """Replace the VQ weights inside a policy checkpoint directory (``RigPolicy.save``'s, single
    ``model.safetensors``) by trained ones, atomically; ``rig_policy.json`` records where they
    came from (``extra.vq_tokenizer``)."""
    from safetensors.torch import load_file, save_file

    ckpt = Path(checkpoint)
    weights = ckpt / "model.safetensors"
    if not weights.is_file():
        raise UserError(
            f"{ckpt}: no model.safetensors (a policy checkpoint directory from RigPolicy.save, "
            "not sharded) to write the VQ into"
        )
    model_state = load_file(str(weights))
    current = {k[len(VQ_PREFIX) :]: v for k, v in model_state.items() if k.startswith(VQ_PREFIX)}
    state = _read_vq(path)
    _check_fit(state, current, str(ckpt))
    for k, v in state.items():
        model_state[VQ_PREFIX + k] = v.to(current[k].dtype).contiguous()
    tmp = weights.with_name(f".{weights.name}.tmp")
    save_file(model_state, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, weights)
    record_file = ckpt / "rig_policy.json"
    if record_file.is_file():
        record = json.loads(record_file.read_text())
        record.setdefault("extra", {})["vq_tokenizer"] = str(Path(path).resolve())
        record_file.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return ckpt


__all__ = [
    "CONFIG_FILE", "PSNR_CAP", "REPORT_FILE", "VQ_FILE", "Frames", "TrainSettings",
    "check_frames", "dataset_frames", "evaluate", "frames_from_env", "load_vq_into", "psnr",
    "reconstruct", "save_vq", "split_by_episode", "train_vq", "vq_file", "vq_from_preset",
    "write_vq_into_checkpoint",
]  # fmt: skip
