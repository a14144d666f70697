"""Throughput of the RIG policy's hot paths, measured side by side in one process.

What is timed (one fixed task, random uint8 frames, a reseeded ``torch.Generator`` so every
repeat samples the same tokens, i.e. does the same work):

- ``act``: transitions/s at each batch size, and the batching gain (transitions/s at B over the
  smallest batch);
- ``act(lookahead=n)`` at one batch: its cost against lookahead 0 at that batch (``--lookahead
  0`` leaves it out: with 576 codes per imagined frame it is most of a 1.3B preset's time);
- ``imagine``: imagined frames/s (G codes sampled with the KV cache, decoded to pixels);
- ``evaluate`` + backward: the learner's teacher-forced pass with the next-frame targets
  (``learner/ppo.py`` calls ``evaluate(act, next_codes=...)``), samples/s;
- the KV cache: teacher-forced decoding of N tokens after the prompt with the cache (one column
  per forward, ``past_key_values``, as ``rl.policy._Stream.feed``) against recomputing the whole
  growing sequence for each token. Both start from the same prompt embeddings (the SigLIP
  features are computed once for both), so the ratio is the attention cache's alone.

Every variant is warmed up, then the variants are interleaved over the repeats, each repeat in a
rotated order, so drifting machine load hits all alike; figures are medians.

    python -m benchmarks.policy                              # tiny preset, batch 1, 8, 32
    python -m benchmarks.policy --batch-sizes 1 8 --repeats 3 --device cuda --dtype bf16

``rig bench policy`` (``rig/bench.py``) calls :func:`bench_policy` and prints the same table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.common import interleaved  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TASK = "collect wood"


def build_policy(preset: str = "tiny", device: str = "cpu", dtype: str = "fp32", seed: int = 0):
    """A randomly initialised ``RigPolicy`` of ``preset`` on Crafter's codec, in eval mode, built
    directly on ``device`` (a 1.3B model never exists in fp32 on the host when ``cuda``)."""
    from envs.crafter_env import crafter_codec
    from rl.policy import RigPolicy

    with torch.device(device):
        policy = RigPolicy.from_preset(preset, crafter_codec(), seed=seed)
    return policy.to(dtype=DTYPES[dtype]).eval()


def bench_policy(
    preset: str = "tiny",
    batch_sizes: Sequence[int] = (1, 8, 32),
    repeats: int = 5,
    warmup: int = 1,
    reasoning_tokens: int = 16,
    batch: int = 8,
    lookahead: int = 2,
    kv_tokens: int = 32,
    threads: int | None = None,
    device: str = "cpu",
    dtype: str = "fp32",
    seed: int = 0,
    policy: Any = None,
) -> dict[str, Any]:
    """Time the policy's hot paths side by side; return a plain dict (JSON-ready).

    ``batch_sizes``: the ``act`` rows; ``batch``: the batch of the lookahead, imagine, evaluate
    and KV-cache measurements (its lookahead-0 ``act`` is timed too, as the lookahead's
    reference). ``threads``: torch's intra-op threads (default: every core), restored after.
    ``policy``: an already built policy to measure instead of building ``preset``.

    Returns ``{"config": {...}, "act": [{"batch", "seconds", "per_s"}, ...],
    "act_speedup": [{"batch", "base", "ratio"}, ...], "lookahead": {"batch", "lookahead",
    "seconds", "per_s", "base_seconds", "cost_ratio"} (None for lookahead 0), "imagine":
    {"batch", "seconds", "per_s"}, "evaluate": {...}, "kv_cache": {"batch", "tokens",
    "prompt_tokens", "cached_seconds", "recompute_seconds", "ratio", "max_abs_diff"},
    "samples": {variant:
    [seconds of each timed call]}}``; ``seconds`` are medians
    per call, ``per_s`` transitions (act), frames (imagine) or samples (evaluate) per second.
    """
    sizes = sorted(set(batch_sizes))
    if not sizes or sizes[0] < 1 or batch < 1:
        raise ValueError(f"batch sizes must be >= 1, got {list(batch_sizes)} and {batch}")
    if repeats < 1 or warmup < 0 or reasoning_tokens < 0 or lookahead < 0 or kv_tokens < 1:
        raise ValueError(
            f"need repeats >= 1, warmup >= 0, reasoning_tokens >= 0, lookahead >= 0 and "
            f"kv_tokens >= 1; got {repeats}, {warmup}, {reasoning_tokens}, {lookahead}, {kv_tokens}"
        )
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads or os.cpu_count() or 1)
    try:
        if policy is None:
            policy = build_policy(preset, device, dtype, seed)
        return _measure(
            policy, preset, sizes, repeats, warmup, reasoning_tokens, batch, lookahead,
            kv_tokens, dtype, seed,
        )  # fmt: skip
    finally:
        torch.set_num_threads(previous_threads)


def _measure(
    policy, preset, sizes, repeats, warmup, reasoning_tokens, batch, lookahead, kv_tokens,
    dtype, seed,
) -> dict[str, Any]:  # fmt: skip
    from rl.imagine import frame_codes

    size = policy.image_size
    rng = np.random.default_rng(seed)
    gen = torch.Generator(device=policy.device)

    def frames(b: int) -> torch.Tensor:
        return torch.as_tensor(rng.integers(0, 256, (b, size, size, 3), dtype=np.uint8))

    def act(x: torch.Tensor, n: int = 0):
        gen.manual_seed(seed)  # the same samples, hence the same work, every repeat
        return policy.act(x, TASK, reasoning_tokens, generator=gen, lookahead=n)

    # -- the variants: name -> a call to time -------------------------------------------------
    act_batches = sorted({*sizes, batch})
    act_frames = {b: frames(b) for b in act_batches}
    variants: dict[str, Callable[[], Any]] = {
        f"act_{b}": (lambda b=b: act(act_frames[b])) for b in act_batches
    }
    if lookahead:
        variants["lookahead"] = lambda: act(act_frames[batch], lookahead)

    act_out = act(act_frames[batch])
    next_codes = frame_codes(policy, frames(batch))

    def imagine():
        gen.manual_seed(seed)
        return policy.imagine(act_out, generator=gen)

    def evaluate():
        policy.zero_grad(set_to_none=True)
        out = policy.evaluate(act_out, next_codes=next_codes)
        loss = sum(v.float().mean() for v in out.values())  # a gradient through every output
        loss.backward()

    variants["imagine"] = imagine
    variants["evaluate"] = evaluate
    kv = _KvCase(policy, frames(batch), kv_tokens, seed)
    variants["kv_cached"] = kv.cached
    variants["kv_recompute"] = kv.recompute

    samples = interleaved(variants, repeats, warmup, sync=lambda: _sync(policy.device))
    times = {name: statistics.median(t) for name, t in samples.items()}
    policy.zero_grad(set_to_none=True)

    # -- results -------------------------------------------------------------------------------
    act_rows = [{"batch": b, "seconds": times[f"act_{b}"], "per_s": b / times[f"act_{b}"]}
                for b in sizes]  # fmt: skip
    base = act_rows[0]
    speedup = [{"batch": r["batch"], "base": base["batch"], "ratio": r["per_s"] / base["per_s"]}
               for r in act_rows[1:]]  # fmt: skip
    diff = (kv.cached() - kv.recompute()).abs().max().item()  # same logits, cache or not
    return {
        "config": {
            "preset": preset,
            "image_size": size,
            "image_tokens": policy.image_tokens,
            "parameters": sum(p.numel() for p in policy.parameters()),
            "reasoning_tokens": reasoning_tokens,
            "repeats": repeats,
            "warmup": warmup,
            "threads": torch.get_num_threads(),
            "device": str(policy.device),
            "dtype": dtype,
            "task": TASK,
            "seed": seed,
        },
        "act": act_rows,
        "act_speedup": speedup,
        "lookahead": {
            "batch": batch,
            "lookahead": lookahead,
            "seconds": times["lookahead"],
            "per_s": batch / times["lookahead"],
            "base_seconds": times[f"act_{batch}"],
            "cost_ratio": times["lookahead"] / times[f"act_{batch}"],
        }
        if lookahead
        else None,
        "imagine": {
            "batch": batch,
            "seconds": times["imagine"],
            "per_s": batch / times["imagine"],
        },
        "evaluate": {
            "batch": batch,
            "seconds": times["evaluate"],
            "per_s": batch / times["evaluate"],
        },
        "kv_cache": {
            "batch": batch,
            "tokens": kv_tokens,
            "prompt_tokens": kv.prompt_length,
            "cached_seconds": times["kv_cached"],
            "recompute_seconds": times["kv_recompute"],
            "ratio": times["kv_recompute"] / times["kv_cached"],
            "max_abs_diff": diff,
        },
        "samples": samples,  # seconds of every timed call: the spread behind the medians
    }


class _KvCase:
    """Teacher-forced decoding of ``tokens`` fixed text tokens after a prompt of ``frames``,
    computing the next-token logits after each, with and without the KV cache."""

    def __init__(self, policy, frames: torch.Tensor, tokens: int, seed: int):
        self.policy = policy
        ids, self.mask = policy.prompt(TASK, len(frames), None)
        self.prompt_length = ids.shape[1]
        with torch.no_grad():
            self.prompt = policy.embed(ids, torch.zeros_like(self.mask), frames)  # (B, P, D)
        allowed = (~policy.reasoning_banned).nonzero().squeeze(1).cpu()  # no markers
        pick = torch.randint(len(allowed), (len(frames), tokens),
                             generator=torch.Generator().manual_seed(seed))  # fmt: skip
        self.tokens = allowed[pick].to(policy.device)  # (B, N)

    @torch.no_grad()
    def cached(self) -> torch.Tensor:
        """Prefill, then one column per forward with ``past_key_values``; last logits (B, V)."""
        from rl.policy import positions

        p, mask = self.policy, self.mask
        h, cache = p.hidden(None, mask, positions(mask), use_cache=True,
                            inputs_embeds=self.prompt)  # fmt: skip
        logits = p.logits(h[:, -1])
        for j in range(self.tokens.shape[1] - 1):
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
            pos = mask.long().sum(1, keepdim=True) - 1  # (B, 1)
            h, cache = p.hidden(self.tokens[:, j : j + 1], mask, pos, past_key_values=cache,
                                use_cache=True)  # fmt: skip
            logits = p.logits(h[:, -1])
        return logits

    @torch.no_grad()
    def recompute(self) -> torch.Tensor:
        """One full forward over prompt + tokens so far for each new token; last logits (B, V)."""
        from rl.policy import positions

        p, n = self.policy, self.tokens.shape[1]
        table = p.model.model.get_input_embeddings()
        for j in range(n):
            embeds = torch.cat([self.prompt, table(self.tokens[:, :j])], 1)  # (B, P + j, D)
            mask = torch.cat([self.mask, torch.ones_like(self.tokens[:, :j], dtype=torch.bool)], 1)
            h, _ = p.hidden(None, mask, positions(mask), inputs_embeds=embeds)
            logits = p.logits(h[:, -1])
        return logits


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # kernels are asynchronous: count them in


# -- printing ----------------------------------------------------------------------------------


def table_rows(result: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(measurement, batch, seconds per call, throughput) rows of the results table."""
    rows = [("act", str(r["batch"]), f"{r['seconds']:.4f}", f"{r['per_s']:.1f} transitions/s")
            for r in result["act"]]  # fmt: skip
    la, im, ev, kv = (result[k] for k in ("lookahead", "imagine", "evaluate", "kv_cache"))
    if la is not None:
        rows.append((f"act, lookahead {la['lookahead']}", str(la["batch"]), f"{la['seconds']:.4f}",
                     f"{la['per_s']:.1f} transitions/s"))  # fmt: skip
    rows += [
        ("imagine (codes + pixels)", str(im["batch"]), f"{im['seconds']:.4f}",
         f"{im['per_s']:.1f} frames/s"),
        ("evaluate + backward", str(ev["batch"]), f"{ev['seconds']:.4f}",
         f"{ev['per_s']:.1f} samples/s"),
        (f"decode {kv['tokens']} tokens, KV cache", str(kv["batch"]),
         f"{kv['cached_seconds']:.4f}", ""),
        (f"decode {kv['tokens']} tokens, recompute", str(kv["batch"]),
         f"{kv['recompute_seconds']:.4f}", ""),
    ]  # fmt: skip
    return rows


def ratio_lines(result: dict[str, Any]) -> list[str]:
    """The ratios, one line each: the figures to compare between machines."""
    lines = [f"act batch {s['batch']} vs {s['base']}: {s['ratio']:.1f}x transitions/s"
             for s in result["act_speedup"]]  # fmt: skip
    la, kv = result["lookahead"], result["kv_cache"]
    if la is not None:
        lines.append(
            f"act lookahead {la['lookahead']} vs 0 (batch {la['batch']}): {la['cost_ratio']:.1f}x "
            f"the time per call"
        )
    lines.append(
        f"KV cache vs recompute ({kv['prompt_tokens']}-token prompt + {kv['tokens']} tokens, "
        f"batch {kv['batch']}): {kv['ratio']:.1f}x faster"
    )
    return lines


def header(result: dict[str, Any]) -> str:
    c = result["config"]
    return (
        f"policy preset {c['preset']} ({c['parameters'] / 1e6:.1f}M parameters, "
        f"{c['image_size']} px, {c['image_tokens']} image tokens), {c['device']} {c['dtype']}, "
        f"{c['threads']} threads; act writes up to {c['reasoning_tokens']} reasoning tokens; "
        f"median of {c['repeats']} interleaved repeats"
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--batch", type=int, default=8, help="lookahead/imagine/evaluate/KV")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--reasoning-tokens", type=int, default=16)
    parser.add_argument("--kv-tokens", type=int, default=32)
    parser.add_argument("--lookahead", type=int, default=2, help="0: leave act(lookahead) out")
    parser.add_argument("--threads", type=int, default=None, help="default: every core")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    result = bench_policy(
        args.preset, args.batch_sizes, args.repeats, reasoning_tokens=args.reasoning_tokens,
        batch=args.batch, lookahead=args.lookahead, kv_tokens=args.kv_tokens,
        threads=args.threads, device=args.device, dtype=args.dtype,
    )  # fmt: skip
    print(header(result))
    print(f"{'measurement':<30s} {'batch':>5s} {'s/call':>8s}  throughput")
    for name, b, seconds, rate in table_rows(result):
        print(f"{name:<30s} {b:>5s} {seconds:>8s}  {rate}")
    print("\n".join(ratio_lines(result)))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
