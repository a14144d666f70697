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
``--engines deepspeed`` times DeepSpeed alone (no ratio): a 1.3B preset's plain fp32 twin with
its Adam state would not fit beside it on one GPU.

Tokens/s and MFU of the DeepSpeed update (``--model policy``). A micro-step's forward computes
``rows x T`` positions, padding included, with T = P + L + 1 + G: the prompt (P, the frame's G
image placeholders among them), the L tokens ``act`` wrote, then ``<Imagine:>`` and the real
next frame's G codes (``RigPolicy.forward_sequence`` with ``next_codes``). Model FLOPs follow
PaLM's estimate (Chowdhery et al. 2022, appendix B: 6 N per position for the matmuls, forward +
backward, and 12 l d T for attention), plus the frozen KL reference's forward when the KL term
is on (``reference.evaluate(act)``: P + L positions, no next frame; forward only, a third)::

    FLOPs per micro-step = rows x T     x (6 N + 12 l d T)
                         + rows x T_ref x (2 N +  4 l d T_ref)      T_ref = P + L (0: KL off)
    tokens/s = accum x rows x T / seconds per update
    MFU      = accum x FLOPs per micro-step / seconds per update / peak FLOP/s

l layers and d hidden of the language model. The peak is ``--peak-tflops``, else, on CUDA in
bf16 (or fp16), :data:`PEAK_TFLOPS`'s dense figure for the GPU's name; on the CPU or an unknown
GPU there is none and no MFU is given. N is every trainable parameter, at every position, as
PaLM counts it; but the SigLIP encoder sees only the G image patches, the LM head only the
written tokens and the image head only the G codes, so that count overstates the work done.
``mfu_decoder`` counts only the decoder layers' parameters, which every position passes
through, and understates it: the true MFU lies between (janus-1.3b: N 2.0B against 1.23B).
"""

from __future__ import annotations

import argparse
import functools
import gc
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

import torch  # noqa: E402
from torch import nn  # noqa: E402

from benchmarks.common import print_result  # noqa: E402
from learner.engine import (  # noqa: E402
    DeepSpeedEngine,
    LearnerConfig,
    PlainTorchEngine,
    resolve_device,
)

ENGINES = {"deepspeed": DeepSpeedEngine, "plain": PlainTorchEngine}
# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s, by a part of the CUDA device's name; the
# first match wins, so the PCIe and NVL cards come before the SXM ones of the same name.
PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H200 NVL", 835.0), ("H100", 989.0),
               ("H200", 989.0), ("A100", 312.0))  # fmt: skip


def compare_update(
    model_factory: Callable[[], nn.Module],
    batch: Any,
    loss_fn: Callable[[Any, Any], torch.Tensor],
    config: LearnerConfig,
    repeats: int = 10,
    warmup: int = 2,
    engines: Sequence[str] = tuple(ENGINES),
) -> dict[str, Any]:
    """Median seconds per update of each engine, measured side by side, and their ratio.

    ``model_factory()`` must build the same model each call (seed inside it);
    ``loss_fn(engine, batch)`` returns the scalar loss of one micro-batch, calling the engine
    (``engine(x)``) or its ``engine.module``, and moves ``batch`` to the device if needed.
    ``engines``: which of :data:`ENGINES` to time (both: the ratio).
    Returns ``{"deepspeed_s", "plain_s", "ratio" (deepspeed / plain), "deepspeed_min_s",
    "plain_min_s", "repeats", "zero_stage", "precision", "parameters", "memory_gb"}``; the
    figures of an engine not timed, and the ratio without both, are None; ``memory_gb`` is the
    peak CUDA memory allocated (None on the CPU).
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got {repeats} and {warmup}")
    if not engines or set(engines) - set(ENGINES):
        raise ValueError(f"engines must be some of {list(ENGINES)}, got {list(engines)}")
    cuda = resolve_device(config.device) == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    built = {name: ENGINES[name](model_factory(), config) for name in ENGINES if name in engines}
    times: dict[str, list[float]] = {name: [] for name in built}
    for i in range(warmup + repeats):
        order = list(built) if i % 2 == 0 else list(reversed(built))
        for name in order:
            seconds = _time_update(built[name], batch, loss_fn, config.grad_accum_steps)
            if i >= warmup:
                times[name].append(seconds)
    parameters = next(iter(built.values())).num_trainable  # the same model in each
    memory_gb = torch.cuda.max_memory_allocated() / 1e9 if cuda else None
    del built
    gc.collect()  # two models with Adam state: free them before the caller builds the next pair
    if cuda:
        torch.cuda.empty_cache()
    median = {name: statistics.median(t) for name, t in times.items()}
    fastest = {name: min(t) for name, t in times.items()}
    ds, plain = median.get("deepspeed"), median.get("plain")
    return {
        "deepspeed_s": ds,
        "plain_s": plain,
        "ratio": ds / plain if ds is not None and plain is not None else None,
        "deepspeed_min_s": fastest.get("deepspeed"),
        "plain_min_s": fastest.get("plain"),
        "repeats": repeats,
        "zero_stage": config.zero_stage,
        "precision": config.precision,
        "parameters": parameters,
        "memory_gb": memory_gb,
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


def _policy(preset: str, seed: int, device: str = "cpu"):
    from envs.crafter_env import crafter_codec
    from rl.policy import RigPolicy

    with torch.device(device):  # a 1.3B preset is built on the GPU, not in host memory first
        policy = RigPolicy.from_preset(preset, crafter_codec(), seed=seed)
    policy.model.model.vqmodel.requires_grad_(False)  # as rig train: next-frame targets fixed
    return policy


@dataclass(frozen=True)
class UpdateWork:
    """What one micro-step of the policy update computes (module docstring): its tokens and,
    given the parameters each position passes through, its model FLOPs."""

    rows: int
    sequence: int  # T: positions per row of the learner's forward, P + L + 1 + G
    reference_sequence: int  # T_ref: of the KL reference's forward, P + L; 0 with KL off
    layers: int  # l: the language model's decoder layers
    hidden: int  # d: their width
    decoder_parameters: int  # in those layers: what every position passes through

    @property
    def tokens(self) -> int:
        return self.rows * self.sequence

    def flops(self, parameters: int) -> float:
        """PaLM's estimate for one micro-step with ``parameters`` N per position."""
        ld, t, t_ref = self.layers * self.hidden, self.sequence, self.reference_sequence
        learner = self.rows * t * (6 * parameters + 12 * ld * t)  # forward + backward
        reference = self.rows * t_ref * (2 * parameters + 4 * ld * t_ref)  # forward only
        return float(learner + reference)


def update_work(policy, exp: Any, kl_on: bool) -> UpdateWork:
    """:class:`UpdateWork` of ``minibatch_loss`` on ``exp`` (all of it one micro-batch)."""
    act = exp.act
    written = act.prompt_ids.shape[1] + act.tokens.shape[1]  # P + L
    text = policy.model.config.text_config
    decoder = policy.model.model.language_model.layers
    return UpdateWork(
        rows=act.tokens.shape[0], sequence=written + 1 + exp.next_codes.shape[1],
        reference_sequence=written if kl_on else 0, layers=int(text.num_hidden_layers),
        hidden=int(text.hidden_size),
        decoder_parameters=sum(p.numel() for p in decoder.parameters()),
    )  # fmt: skip


@dataclass
class PolicyCase:
    """:func:`compare_update`'s ``(model_factory, batch, loss_fn)`` for the PPO update, and
    what one micro-step of it computes."""

    factory: Callable[[], nn.Module]
    batch: Any
    loss_fn: Callable[[Any, Any], torch.Tensor]
    work: UpdateWork


def policy_case(
    preset: str = "tiny", rows: int = 32, reasoning_tokens: int = 8, seed: int = 0,
    device: str = "cpu",
) -> PolicyCase:  # fmt: skip
    """The PPO minibatch loss of a random-weight ``preset`` policy on ``rows`` of its own
    ``act`` outputs (random frames, rewards and terminations; GAE with the defaults' gamma and
    lambda), with the defaults' PPO settings and a frozen reference (the KL term's forward is
    part of the update), in the learner's dtype as ``rig train`` has it. The policies are built
    and the batch acted on ``device``; the batch is kept on the CPU."""
    import numpy as np

    from learner.ppo import _to, minibatch_loss, normalize
    from rig.config import load_config
    from rl.experience import real_experience
    from rl.imagine import frame_codes

    cfg = load_config(None, []).ppo
    factory = functools.partial(_policy, preset, seed, device)
    policy = factory().eval()
    gen = torch.Generator().manual_seed(seed)
    frames = torch.randint(0, 256, (rows + 1, policy.image_size, policy.image_size, 3),
                           dtype=torch.uint8, generator=gen)  # fmt: skip
    if policy.device.type == "cpu":
        sampler = gen  # frames and samples from one generator, as ever on the CPU
    else:
        sampler = torch.Generator(device=policy.device).manual_seed(seed)
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        act = policy.act(frames[:-1], "collect wood", reasoning_tokens, generator=sampler)
        boot = policy.state_values(frames[-1:], "collect wood")
        codes = frame_codes(policy, frames[1:])
    terminated = rng.random(rows) < 0.05
    exp = real_experience(
        act.to("cpu"), rng.normal(size=rows).astype(np.float32), terminated,
        np.zeros(rows, bool), np.zeros(rows, np.int64), boot.cpu(), codes.cpu(),
        np.zeros(rows, np.int64), cfg.gamma, cfg.lam,
    )  # fmt: skip
    exp = normalize(exp)
    work = update_work(policy, exp, cfg.loss_scales["kl"] > 0)
    references: dict[torch.dtype, Any] = {}  # the act policy (same seed: the factory's weights)

    def reference_for(param: torch.Tensor):
        if param.dtype not in references:  # a second dtype (fp32 plain beside bf16) gets a copy
            ref = policy if not references else factory()
            references[param.dtype] = ref.requires_grad_(False).eval().to(param.device, param.dtype)
        return references[param.dtype]

    def loss_fn(engine, batch) -> torch.Tensor:
        module = engine.module
        reference = reference_for(next(module.parameters()))
        mb = _to(batch, module.device)
        return minibatch_loss(module.train(), reference, mb, cfg)[0]

    return PolicyCase(factory, exp, loss_fn, work)


def policy_update(
    preset: str = "tiny", rows: int = 32, reasoning_tokens: int = 8, seed: int = 0
) -> tuple[Callable[[], nn.Module], Any, Callable[[Any, Any], torch.Tensor]]:
    """``(model_factory, batch, loss_fn)`` of :func:`policy_case` on the CPU."""
    case = policy_case(preset, rows, reasoning_tokens, seed)
    return case.factory, case.batch, case.loss_fn


def peak_tflops(
    device: str, precision: str, given: float | None = None
) -> tuple[float | None, str]:
    """The peak MFU is measured against, TFLOP/s, and where it comes from: ``given``
    (``--peak-tflops``), else :data:`PEAK_TFLOPS` for this CUDA GPU in bf16 or fp16, else None
    and why."""
    if given:
        return given, "--peak-tflops"
    if device != "cuda":
        return None, f"no peak known for {device}: give --peak-tflops"
    name = torch.cuda.get_device_name()
    if precision not in ("bf16", "fp16"):
        return None, f"PEAK_TFLOPS is bf16, not {precision}: give --peak-tflops"
    for part, tflops in PEAK_TFLOPS:
        if part in name:
            return tflops, f"{name}, dense bf16"
    return None, f"{name} is not in PEAK_TFLOPS: give --peak-tflops"


def throughput(row: dict[str, Any], work: UpdateWork, accum: int, peak: float | None) -> dict:
    """Tokens/s, achieved TFLOP/s and MFU of the DeepSpeed update in ``row`` (compare_update's),
    with PaLM's count (all trainable parameters) and with the decoder layers' alone."""
    seconds = row["deepspeed_s"]
    if seconds is None:
        return {}
    out = {"tokens_per_s": accum * work.tokens / seconds}
    for suffix, n in (("", row["parameters"]), ("_decoder", work.decoder_parameters)):
        tflops = accum * work.flops(n) / seconds / 1e12
        out["tflops" + suffix] = tflops
        out["mfu" + suffix] = tflops / peak if peak else None
    return out


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
    device: str = "auto",
    engines: Sequence[str] = tuple(ENGINES),
    peak: float | None = None,
) -> dict[str, Any]:
    """:func:`compare_update` for each ZeRO stage on the real policy update (``model="policy"``)
    or the MLP (``"mlp"``). Returns ``{"config": {...}, "rows": [compare_update's dict, ...]}``;
    for the policy, each row also has :func:`throughput`'s tokens/s, TFLOP/s and MFU, and the
    config the work per micro-step and the peak (``peak`` TFLOP/s, else :func:`peak_tflops`)."""
    if model not in ("policy", "mlp"):
        raise ValueError(f"model must be policy or mlp, got {model!r}")
    device = resolve_device(device)
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        work = None
        if model == "policy":
            case = policy_case(preset, rows, reasoning_tokens, device=device)
            factory, batch, loss_fn, work = case.factory, case.batch, case.loss_fn, case.work
        else:
            factory, loss_fn = mlp_factory(width, depth), regression_loss
            batch = torch.randn(1, rows, width, generator=torch.Generator().manual_seed(0))
            batch = batch.to(device)
        peak_tf, peak_source = peak_tflops(device, precision, peak)
        results = []
        for stage in stages:
            config = LearnerConfig(
                zero_stage=stage, precision=precision, lr=1e-4, weight_decay=0.0,
                betas=(0.9, 0.95), grad_accum_steps=accum, grad_clip=1.0, warmup_steps=0,
                device=device,
            )  # fmt: skip
            row = compare_update(factory, batch, loss_fn, config, repeats, warmup, engines)
            if work is not None:
                row.update(throughput(row, work, accum, peak_tf))
            results.append(row)
        config = {"model": model, "preset": preset if model == "policy" else None,
                  "rows": rows, "accum": accum, "repeats": repeats, "device": device,
                  "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
                  "threads": torch.get_num_threads(), "precision": precision,
                  "engines": [e for e in ENGINES if e in engines],
                  "parameters": results[0]["parameters"] if results else 0,
                  "peak_tflops": peak_tf, "peak_source": peak_source}  # fmt: skip
        if work is not None:
            config.update(
                sequence=work.sequence, reference_sequence=work.reference_sequence,
                layers=work.layers, hidden=work.hidden, tokens_per_micro_step=work.tokens,
                decoder_parameters=work.decoder_parameters,
                flops_per_micro_step=work.flops(config["parameters"]),
                flops_per_micro_step_decoder=work.flops(work.decoder_parameters),
            )  # fmt: skip
        return {"config": config, "rows": results}
    finally:
        torch.set_num_threads(previous)


COLUMNS = ("ZeRO", "precision", "deepspeed s", "plain s", "ratio")


def header(result: dict[str, Any]) -> str:
    c = result["config"]
    what = f"PPO update of the {c['preset']} policy" if c["model"] == "policy" else "MLP"
    engines = c.get("engines", list(ENGINES))
    timed = ("interleaved updates (plain torch is always fp32)" if len(engines) == 2
             else f"updates, {engines[0]} only")  # fmt: skip
    return (
        f"{what} ({c['parameters'] / 1e6:.1f}M trainable parameters), {c['rows']} rows x "
        f"{c['accum']} micro-steps per update, {c.get('gpu') or c['device']}, {c['threads']} "
        f"threads; median of {c['repeats']} {timed}"
    )


def _seconds(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def table_rows(result: dict[str, Any]) -> list[tuple[str, ...]]:
    return [(str(r["zero_stage"]), r["precision"], _seconds(r["deepspeed_s"]),
             _seconds(r["plain_s"]), _seconds(r["ratio"], 2)) for r in result["rows"]]  # fmt: skip


def ratio_lines(result: dict[str, Any]) -> list[str]:
    lines = [f"DeepSpeed / plain torch, ZeRO {r['zero_stage']}: {r['ratio']:.2f} (goal <= 1.15)"
             for r in result["rows"] if r["ratio"] is not None]  # fmt: skip
    c = result["config"]
    for r in result["rows"]:
        if "tokens_per_s" in r:
            lines += throughput_lines(c, r)
    return lines


def throughput_lines(c: dict[str, Any], r: dict[str, Any]) -> list[str]:
    """The tokens/s and MFU lines of one ZeRO stage's DeepSpeed update."""
    reference = (f"; the KL reference's forward: {c['rows']} x {c['reference_sequence']} more"
                 if c["reference_sequence"] else "")  # fmt: skip
    tokens = (f"learner tokens/s, ZeRO {r['zero_stage']} {r['precision']}: "
              f"{r['tokens_per_s']:,.0f} ({c['rows']} rows x {c['sequence']} positions per "
              f"micro-step{reference})")  # fmt: skip
    counts = (f"PaLM count, 6 x {r['parameters'] / 1e6:.1f}M trainable parameters per position: "
              f"{r['tflops']:.3g} TFLOP/s; decoder layers' {c['decoder_parameters'] / 1e6:.1f}M "
              f"only: {r['tflops_decoder']:.3g} TFLOP/s")  # fmt: skip
    if r["mfu"] is None:
        mfu = f"MFU, ZeRO {r['zero_stage']}: none ({c['peak_source']}); {counts}"
    else:
        mfu = (f"MFU, ZeRO {r['zero_stage']}: {r['mfu']:.1%} (PaLM count) to "
               f"{r['mfu_decoder']:.1%} (decoder layers only) of {c['peak_tflops']:g} TFLOP/s "
               f"({c['peak_source']}; goal >= 40%); {counts}")  # fmt: skip
    lines = [tokens, mfu]
    if r.get("memory_gb") is not None:
        lines.append(f"peak GPU memory, ZeRO {r['zero_stage']}: {r['memory_gb']:.1f} GB")
    return lines


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
    parser.add_argument("--reasoning-tokens", type=int, default=8, help="max per act (policy)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--engines", nargs="+", default=list(ENGINES), choices=list(ENGINES),
                        help="which engines to time (both: their ratio)")  # fmt: skip
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="peak for the MFU (default: by GPU name, dense bf16)")  # fmt: skip
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    result = bench_learner(
        args.model, args.stages, args.precision, args.rows, args.accum, args.repeats,
        args.warmup, args.preset, args.reasoning_tokens, width=args.width, depth=args.depth,
        threads=args.threads, device=args.device, engines=args.engines, peak=args.peak_tflops,
    )  # fmt: skip
    print_result(sys.modules[__name__], result, args.json)
    return result


if __name__ == "__main__":
    main()
