"""Seconds per learner update: DeepSpeed's engine against the same update in plain torch.

An update is ``grad_accum_steps`` micro-steps (forward, loss, ``backward_step``) ending in one
optimizer step. The two engines get the same model (one ``model_factory`` seed) and the same
batch, and are timed interleaved, alternating which goes first, so that drifting machine load
and caches hit both alike; the first ``warmup`` updates of each are dropped (allocator, lazy
init, first-touch of the Adam state).

    rig bench learner                                  # the PPO update of the tiny policy
    python -m benchmarks.learner_engine                # the same
    python -m benchmarks.learner_engine --model mlp --stages 0 1 2 3 --width 1024

``--model policy`` (the default) times the real update: ``learner.ppo.minibatch_loss`` (PPO,
value, entropy, KL to a frozen reference, next-frame, reward and continue terms; the VQ frozen,
as ``rig train`` has it) of a random-weight policy on one batch of its own ``act`` outputs.
``--model mlp`` times a residual MLP with a stand-in loss (no policy code involved).
"""

from __future__ import annotations

import argparse
import functools
import gc
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

import torch  # noqa: E402
from torch import nn  # noqa: E402

from benchmarks.common import print_result  # noqa: E402
from learner.engine import DeepSpeedEngine, LearnerConfig, PlainTorchEngine  # noqa: E402

ENGINES = {"deepspeed": DeepSpeedEngine, "plain": PlainTorchEngine}


def compare_update(
    model_factory: Callable[[], nn.Module],
    batch: Any,
    loss_fn: Callable[[Any, Any], torch.Tensor],
    config: LearnerConfig,
    repeats: int = 10,
    warmup: int = 2,
) -> dict[str, Any]:
    """Median seconds per update of each engine, measured side by side, and their ratio.

    ``model_factory()`` must build the same model each call (seed inside it);
    ``loss_fn(engine, batch)`` returns the scalar loss of one micro-batch, calling the engine
    (``engine(x)``) or its ``engine.module``, and moves ``batch`` to the device if needed.
    Returns ``{"deepspeed_s", "plain_s", "ratio" (deepspeed / plain), "deepspeed_min_s",
    "plain_min_s", "repeats", "zero_stage", "precision", "parameters"}``.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got {repeats} and {warmup}")
    engines = {name: cls(model_factory(), config) for name, cls in ENGINES.items()}
    times: dict[str, list[float]] = {name: [] for name in engines}
    for i in range(warmup + repeats):
        order = list(engines) if i % 2 == 0 else list(reversed(engines))
        for name in order:
            seconds = _time_update(engines[name], batch, loss_fn, config.grad_accum_steps)
            if i >= warmup:
                times[name].append(seconds)
    parameters = engines["plain"].num_trainable
    del engines
    gc.collect()  # two models with Adam state: free them before the caller builds the next pair
    median = {name: statistics.median(t) for name, t in times.items()}
    return {
        "deepspeed_s": median["deepspeed"],
        "plain_s": median["plain"],
        "ratio": median["deepspeed"] / median["plain"],
        "deepspeed_min_s": min(times["deepspeed"]),
        "plain_min_s": min(times["plain"]),
        "repeats": repeats,
        "zero_stage": config.zero_stage,
        "precision": config.precision,
        "parameters": parameters,
    }


def _time_update(engine, batch: Any, loss_fn: Callable, micro_steps: int) -> float:
    start = time.perf_counter()
    for _ in range(micro_steps):
        engine.backward_step(loss_fn(engine, batch))
    if torch.cuda.is_available():
        torch.cuda.synchronize()  # kernels are asynchronous: count them in
    return time.perf_counter() - start


# -- the script: a transformer-sized MLP ----------------------------------------------------------


class Block(nn.Module):
    """Pre-norm residual MLP block of a transformer: x (B, T, d) -> (B, T, d)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.up, self.down = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.nn.functional.gelu(self.up(self.norm(x))))


def mlp_factory(width: int, depth: int) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(*[Block(width) for _ in range(depth)])

    return build


def regression_loss(engine, batch: torch.Tensor) -> torch.Tensor:
    """Mean square of the output, in fp32: a stand-in loss with a gradient on every weight."""
    dtype = next(engine.module.parameters()).dtype  # bf16/fp16 under DeepSpeed mixed precision
    return engine(batch.to(dtype)).float().pow(2).mean()


# -- the real update: the PPO minibatch loss of a RigPolicy --------------------------------------


def _policy(preset: str, seed: int):
    from envs.crafter_env import crafter_codec
    from rl.policy import RigPolicy

    policy = RigPolicy.from_preset(preset, crafter_codec(), seed=seed)
    policy.model.model.vqmodel.requires_grad_(False)  # as rig train: next-frame targets fixed
    return policy


def policy_update(
    preset: str = "tiny", rows: int = 32, reasoning_tokens: int = 8, seed: int = 0
) -> tuple[Callable[[], nn.Module], Any, Callable[[Any, Any], torch.Tensor]]:
    """``(model_factory, batch, loss_fn)`` for :func:`compare_update`: the PPO minibatch loss of
    a random-weight ``preset`` policy on ``rows`` of its own ``act`` outputs (random frames,
    rewards and terminations; GAE with the defaults' gamma and lambda), with the defaults' PPO
    settings and a frozen reference (the KL term's forward is part of the update)."""
    import numpy as np

    from learner.ppo import _to, minibatch_loss, normalize
    from rig.config import load_config
    from rl.experience import real_experience
    from rl.imagine import frame_codes

    cfg = load_config(None, []).ppo
    factory = functools.partial(_policy, preset, seed)
    policy = factory().eval()
    gen = torch.Generator().manual_seed(seed)
    frames = torch.randint(0, 256, (rows + 1, policy.image_size, policy.image_size, 3),
                           dtype=torch.uint8, generator=gen)  # fmt: skip
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        act = policy.act(frames[:-1], "collect wood", reasoning_tokens, generator=gen)
        boot = policy.state_values(frames[-1:], "collect wood")
        codes = frame_codes(policy, frames[1:])
    terminated = rng.random(rows) < 0.05
    exp = real_experience(
        act, rng.normal(size=rows).astype(np.float32), terminated, np.zeros(rows, bool),
        np.zeros(rows, np.int64), boot, codes, np.zeros(rows, np.int64), cfg.gamma, cfg.lam,
    )  # fmt: skip
    exp = normalize(exp)
    reference = policy.requires_grad_(False)  # same seed: the factory's weights

    def loss_fn(engine, batch) -> torch.Tensor:
        module = engine.module
        mb = _to(batch, module.device)
        return minibatch_loss(module.train(), reference.to(module.device), mb, cfg)[0]

    return factory, exp, loss_fn


def bench_learner(
    model: str = "policy",
    stages: Sequence[int] = (0, 1, 2),
    precision: str = "fp32",
    rows: int = 32,
    accum: int = 1,
    repeats: int = 10,
    warmup: int = 2,
    preset: str = "tiny",
    reasoning_tokens: int = 8,
    width: int = 512,
    depth: int = 4,
    threads: int | None = None,
) -> dict[str, Any]:
    """:func:`compare_update` for each ZeRO stage on the real policy update (``model="policy"``)
    or the MLP (``"mlp"``). Returns ``{"config": {...}, "rows": [compare_update's dict, ...]}``."""
    if model not in ("policy", "mlp"):
        raise ValueError(f"model must be policy or mlp, got {model!r}")
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        if model == "policy":
            factory, batch, loss_fn = policy_update(preset, rows, reasoning_tokens)
        else:
            factory, loss_fn = mlp_factory(width, depth), regression_loss
            batch = torch.randn(1, rows, width, generator=torch.Generator().manual_seed(0))
            batch = batch.to(device)
        results = []
        for stage in stages:
            config = LearnerConfig(
                zero_stage=stage, precision=precision, lr=1e-4, weight_decay=0.0,
                betas=(0.9, 0.95), grad_accum_steps=accum, grad_clip=1.0, warmup_steps=0,
                device=device,
            )  # fmt: skip
            results.append(compare_update(factory, batch, loss_fn, config, repeats, warmup))
        config = {"model": model, "preset": preset if model == "policy" else None,
                  "rows": rows, "accum": accum, "repeats": repeats, "device": device,
                  "threads": torch.get_num_threads(), "precision": precision,
                  "parameters": results[0]["parameters"] if results else 0}  # fmt: skip
        return {"config": config, "rows": results}
    finally:
        torch.set_num_threads(previous)


COLUMNS = ("ZeRO", "precision", "deepspeed s", "plain s", "ratio")


def header(result: dict[str, Any]) -> str:
    c = result["config"]
    what = f"PPO update of the {c['preset']} policy" if c["model"] == "policy" else "MLP"
    return (
        f"{what} ({c['parameters'] / 1e6:.1f}M trainable parameters), {c['rows']} rows x "
        f"{c['accum']} micro-steps per update, {c['device']}, {c['threads']} threads; median of "
        f"{c['repeats']} interleaved updates (plain torch is always fp32)"
    )


def table_rows(result: dict[str, Any]) -> list[tuple[str, ...]]:
    return [(str(r["zero_stage"]), r["precision"], f"{r['deepspeed_s']:.4f}",
             f"{r['plain_s']:.4f}", f"{r['ratio']:.2f}") for r in result["rows"]]  # fmt: skip


def ratio_lines(result: dict[str, Any]) -> list[str]:
    return [f"DeepSpeed / plain torch, ZeRO {r['zero_stage']}: {r['ratio']:.2f} (goal <= 1.15)"
            for r in result["rows"]]  # fmt: skip


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="policy", choices=["policy", "mlp"])
    parser.add_argument("--preset", default="tiny", help="policy preset (--model policy)")
    parser.add_argument("--stages", type=int, nargs="+", default=[0, 1, 2], help="ZeRO stages")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--width", type=int, default=512, help="MLP width d (hidden 4d)")
    parser.add_argument("--depth", type=int, default=4, help="MLP residual blocks")
    parser.add_argument("--rows", type=int, default=32, help="batch rows per micro-step")
    parser.add_argument("--accum", type=int, default=1, help="micro-steps per update")
    parser.add_argument("--repeats", type=int, default=10, help="timed updates per engine")
    parser.add_argument("--warmup", type=int, default=2, help="untimed updates per engine")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    result = bench_learner(
        args.model, args.stages, args.precision, args.rows, args.accum, args.repeats,
        args.warmup, args.preset, width=args.width, depth=args.depth, threads=args.threads,
    )  # fmt: skip
    print_result(sys.modules[__name__], result, args.json)
    return result


if __name__ == "__main__":
    main()
