"""Imagined vs real transitions per second with the same policy, side by side in one process.

``real``: an in-process RLlib env runner (``actors.rollout.RolloutWorkers`` with
``num_env_runners=0``) samples ``fragment`` steps from each of ``envs`` Crafter envs (per step:
one batched ``act`` and the envs' ``step``). ``imagined``: an ``actors.imagination.Imaginer`` with
the same preset, seed and ``act`` settings rolls ``envs`` real start frames forward ``fragment``
steps in the policy's world model (per step: one batched ``act`` and one ``imagine``: the next
frame's VQ codes sampled with the KV cache, decoded to pixels, with the reward and continue
heads), plus the one extra ``act`` that reads the bootstrap value. Both produce ``envs x
fragment`` learner rows per call; calls are interleaved (the order alternating), torch on one
thread, medians reported, and the ratio imagined / real.

``phases``: where an imagined step's time goes, each part timed on its own at the same batch
(interleaved, medians): ``act`` (reasoning + action on ``envs`` frames, what a real step also
pays), ``codes`` (the next frame's G VQ codes sampled one by one on act's KV cache) and
``decode`` (those codes to pixels through the VQ decoder). A real step costs about ``act`` plus
the env's step, an imagined one ``act + codes + decode``, so the ratio cannot pass
``act / (act + codes + decode)`` by more than the env's share.

    rig bench imagination --envs 4 --fragment 8
    python -m benchmarks.imagination --envs 4 --fragment 8 --calls 5
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from benchmarks.common import interleaved, print_result, spread  # noqa: E402

TASK = "collect wood"


def bench_imagination(
    envs: int = 4,
    fragment: int = 8,
    calls: int = 5,
    reasoning_tokens: int = 4,
    preset: str = "tiny",
    threads: int = 1,
) -> dict[str, Any]:
    """Returns ``{"config", "real": {"median", "min", "max"}, "imagined": {...}, "ratio"}``
    (transitions/s; ratio = imagined / real medians)."""
    import torch

    from actors.imagination import Imaginer
    from actors.rollout import RolloutWorkers, preset_policy
    from envs.crafter_env import crafter_codec

    if min(envs, fragment, calls, threads) < 1 or reasoning_tokens < 0:
        raise ValueError("envs, fragment, calls and threads must be >= 1, reasoning_tokens >= 0")
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    act_kwargs = {"max_reasoning_tokens": reasoning_tokens}
    real = RolloutWorkers(
        num_env_runners=0,
        num_envs_per_env_runner=envs,
        rollout_fragment_length=fragment,
        policy_factory=preset_policy(preset),
        act_kwargs={"task": TASK, **act_kwargs},
    )
    try:
        starts = real.sample().act.frames[:envs].cpu()  # warm-up; real frames to imagine from
        imaginer = Imaginer(functools.partial(preset_policy(preset), crafter_codec()), act_kwargs)
        imaginer.rollout(starts, TASK, fragment)  # warm-up
        rows = {"real": 0, "imagined": 0}

        def sample_real() -> None:
            rows["real"] = len(real.sample())

        def imagine() -> None:
            rows["imagined"] = len(imaginer.rollout(starts, TASK, fragment))

        seconds = interleaved({"real": sample_real, "imagined": imagine}, calls, warmup=0)
        phases = _phases(imaginer, starts, calls)
    finally:
        real.stop()
        torch.set_num_threads(previous)
    rates = {name: spread([rows[name] / s for s in times]) for name, times in seconds.items()}
    config = {"envs": envs, "fragment": fragment, "calls": calls, "preset": preset,
              "reasoning_tokens": reasoning_tokens, "threads": threads,
              "rows_per_call": rows}  # fmt: skip
    return {
        **rates,
        "config": config,
        "ratio": rates["imagined"]["median"] / rates["real"]["median"],
        "phases": phases,
    }


def _phases(imaginer: Any, starts: Any, calls: int) -> dict[str, float]:
    """Median seconds per step of each part of an imagined step (module docstring), batch
    ``len(starts)``, on the imaginer's policy and generator: ``act`` and ``decode`` timed on
    their own, ``codes`` = ``act_imagine`` (act, codes and decode on one cache) minus both."""
    import statistics

    import torch

    from rl.imagine import decode_codes

    policy, gen, kwargs = imaginer.policy, imaginer.generator, imaginer.act_kwargs
    t = imaginer.imagine_temperature
    codes = policy.act_imagine(starts, TASK, generator=gen, **kwargs, imagine_temperature=t)[1].codes
    with torch.no_grad():
        times = interleaved({
            "act": lambda: policy.act(starts, TASK, generator=gen, **kwargs),
            "step": lambda: policy.act_imagine(starts, TASK, generator=gen, **kwargs,
                                               imagine_temperature=t),
            "decode": lambda: decode_codes(policy, codes),
        }, calls, warmup=0)  # fmt: skip
    out = {name: statistics.median(x) for name, x in times.items()}
    out["codes"] = max(out.pop("step") - out["act"] - out["decode"], 0.0)
    return out


COLUMNS = ("rollout", "transitions/s", "min", "max")


def header(result: dict[str, Any]) -> str:
    c = result["config"]
    return (
        f"{c['preset']} policy, {c['envs']} envs / start frames x {c['fragment']} steps per call, "
        f"up to {c['reasoning_tokens']} reasoning tokens, {c['threads']} torch thread(s), "
        f"in-process; median of {c['calls']} interleaved calls"
    )


def table_rows(result: dict[str, Any]) -> list[tuple[str, ...]]:
    return [(name, f"{result[name]['median']:.1f}", f"{result[name]['min']:.1f}",
             f"{result[name]['max']:.1f}") for name in ("real", "imagined")]  # fmt: skip


def ratio_lines(result: dict[str, Any]) -> list[str]:
    lines = [f"imagined / real transitions per second: {result['ratio']:.2f}"]
    ph = result.get("phases")
    if ph:
        total = ph["act"] + ph["codes"] + ph["decode"]
        lines.append(
            "an imagined step, seconds per call: "
            + ", ".join(f"{k} {ph[k]:.3f} ({ph[k] / total:.0%})" for k in ("act", "codes", "decode"))
            + f"; act / (act + codes + decode) = {ph['act'] / total:.2f}"
        )
    return lines


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--envs", type=int, default=4, help="envs = imagination start frames")
    parser.add_argument("--fragment", type=int, default=8, help="steps (= horizon) per call")
    parser.add_argument("--calls", type=int, default=5)
    parser.add_argument("--reasoning-tokens", type=int, default=4)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    result = bench_imagination(args.envs, args.fragment, args.calls, args.reasoning_tokens,
                               args.preset, args.threads)  # fmt: skip
    print_result(sys.modules[__name__], result, args.json)
    return result


if __name__ == "__main__":
    main()
