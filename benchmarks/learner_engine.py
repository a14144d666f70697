"""Seconds per learner update: DeepSpeed's engine against the same update in plain torch.

An update is ``grad_accum_steps`` micro-steps (forward, loss, ``backward_step``) ending in one
optimizer step. The two engines get the same model (one ``model_factory`` seed) and the same
batch, and are timed interleaved, alternating which goes first, so that drifting machine load
and caches hit both alike; the first ``warmup`` updates of each are dropped (allocator, lazy
init, first-touch of the Adam state).

    python benchmarks/learner_engine.py                       # ZeRO 0-3 on a ~8M-parameter MLP
    python benchmarks/learner_engine.py --stages 0 2 --repeats 20 --width 1024

``compare_update`` is what ``rig bench learner`` will call with the real policy.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

import torch  # noqa: E402
from torch import nn  # noqa: E402

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


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stages", type=int, nargs="+", default=[0, 1, 2, 3], help="ZeRO stages")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--width", type=int, default=512, help="model width d (hidden 4d)")
    parser.add_argument("--depth", type=int, default=4, help="residual MLP blocks")
    parser.add_argument("--tokens", type=int, default=256, help="batch rows (B*T) per micro-step")
    parser.add_argument("--accum", type=int, default=1, help="micro-steps per update")
    parser.add_argument("--repeats", type=int, default=10, help="timed updates per engine")
    parser.add_argument("--warmup", type=int, default=2, help="untimed updates per engine")
    args = parser.parse_args(argv)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    batch = torch.randn(1, args.tokens, args.width, generator=torch.Generator().manual_seed(0))
    rows = []
    for stage in args.stages:
        config = LearnerConfig(
            zero_stage=stage,
            precision=args.precision,
            lr=1e-4,
            weight_decay=0.0,
            betas=(0.9, 0.95),
            grad_accum_steps=args.accum,
            grad_clip=1.0,
            warmup_steps=0,
            device=device,
        )
        rows.append(
            compare_update(
                mlp_factory(args.width, args.depth),
                batch.to(device),
                regression_loss,
                config,
                args.repeats,
                args.warmup,
            )
        )
    print(
        f"{device}, {torch.get_num_threads()} threads, {rows[0]['parameters'] / 1e6:.1f}M "
        f"parameters, {args.tokens} tokens x {args.accum} micro-steps per update, "
        f"median of {args.repeats} (plain torch is always fp32)"
    )
    print(f"{'ZeRO':>4s} {'precision':>9s} {'deepspeed s':>12s} {'plain s':>9s} {'ratio':>6s}")
    for r in rows:
        print(
            f"{r['zero_stage']:>4d} {r['precision']:>9s} {r['deepspeed_s']:>12.4f} "
            f"{r['plain_s']:>9.4f} {r['ratio']:>6.2f}"
        )
    return rows


if __name__ == "__main__":
    main()
