"""Seconds per PPO update with a frozen trunk: its states computed once per update against
recomputed in every minibatch, side by side in one run.

With ``learner.freeze: [model]`` (configs/catch.yaml: only the heads train) the trunk's hidden
states of a row are the same in every epoch, so ``learner.ppo.ppo_update`` computes them once
(``RigPolicy.trunk_states``) and every minibatch runs only the heads on them. This times that
update against the same update with the trunk recomputed per minibatch (what it did before, and
still does for a trunk that trains), on one batch of the tiny policy's own ``act`` outputs
(``benchmarks.learner_engine.policy_update``), with configs/catch.yaml's learner and PPO settings
(``--epochs`` and ``--minibatch`` override them), interleaved after one untimed update each.

    rig bench frozen-trunk                          # 512 rows, catch.yaml's 10 epochs of 128
    python -m benchmarks.frozen_trunk --rows 256 --epochs 4

The ratio (recomputed / once) is the learner's speed-up: about ``epochs`` at most, less the
heads' share and the one forward's.

It also times the update without the world model's terms (``next_codes`` None: what the driver
hands the learner when no world-model term has a weight and imagination is off,
``rl.losses.world_model_trains``; configs/catch.yaml and crafter.yaml since session 39) and,
apart, the VQ encoding of the batch's frames that the driver then skips
(``rl.imagine.frame_codes``): the second ratio, (encoding + update with the codes) / update
without them, is what those presets save per iteration in the driver and learner.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from benchmarks.common import interleaved, print_result  # noqa: E402
from benchmarks.common import setups as common_setups  # noqa: E402

PRESET_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "catch.yaml"
VARIANTS = ("trunk once per update", "trunk per minibatch", "trunk once, no world terms",
            "next-frame codes (driver)")


def bench_frozen_trunk(
    rows: int = 512,
    epochs: int | None = None,
    minibatch: int | None = None,
    repeats: int = 3,
    warmup: int = 1,
    reasoning_tokens: int = 0,
    threads: int | None = None,
) -> dict[str, Any]:
    """Median seconds per ``ppo_update`` of each variant (a fresh DeepSpeed engine on the same
    weights for each call) and their ratio; ``epochs``/``minibatch`` None: configs/catch.yaml's."""
    import torch

    from benchmarks.learner_engine import policy_update
    from learner.engine import DeepSpeedEngine
    from learner.ppo import ppo_update
    from rig.config import load_config
    from rl.imagine import frame_codes

    if threads is not None:
        torch.set_num_threads(threads)
    overrides = ["learner.device=cpu", "ppo.sync_check_rows=0"]
    overrides += [] if epochs is None else [f"ppo.epochs={epochs}"]
    overrides += [] if minibatch is None else [f"ppo.minibatch_size={minibatch}"]
    config = load_config(PRESET_CONFIG, overrides)
    factory, exp, _ = policy_update("tiny", rows, reasoning_tokens)
    base = factory()

    def update(cached: bool, codes: bool = True) -> None:
        policy = copy.deepcopy(base)
        engine = DeepSpeedEngine(policy, config.learner)
        rows_ = copy.copy(exp) if codes else dataclasses.replace(exp, next_codes=None)
        ppo_update(engine, engine.module, None, rows_, config.ppo,
                   torch.Generator().manual_seed(0), 0, trunk_once=cached)  # fmt: skip

    times = interleaved({VARIANTS[0]: lambda: update(True), VARIANTS[1]: lambda: update(False),
                         VARIANTS[2]: lambda: update(True, codes=False),
                         VARIANTS[3]: lambda: frame_codes(base, exp.act.frames)},
                        repeats, warmup)  # fmt: skip
    setups = common_setups(times, rows * config.ppo.epochs)
    setups[VARIANTS[3]]["samples_per_s"] = None  # frames encoded, not update samples
    median = {name: s["median_s"] for name, s in setups.items()}
    return {
        "config": {"rows": rows, "epochs": config.ppo.epochs,
                   "minibatch": config.ppo.minibatch_size, "repeats": repeats, "warmup": warmup,
                   "reasoning_tokens": reasoning_tokens, "freeze": list(config.learner.freeze),
                   "threads": torch.get_num_threads(), "cores": os.cpu_count(),
                   "load": os.getloadavg()[0]},  # fmt: skip
        "setups": setups,
        "ratio": median[VARIANTS[1]] / median[VARIANTS[0]],
        "world_ratio": (median[VARIANTS[0]] + median[VARIANTS[3]]) / median[VARIANTS[2]],
    }


COLUMNS = ("learner", "update s (median)", "update s (min)", "samples/s")


def header(result: dict[str, Any]) -> str:
    c = result["config"]
    return (
        f"PPO update of the tiny policy, learner.freeze {c['freeze']} (configs/catch.yaml), "
        f"{c['rows']} rows x {c['epochs']} epochs in minibatches of {c['minibatch']}, "
        f"{c['reasoning_tokens']} reasoning tokens; {c['threads']} threads on {c['cores']} "
        f"cores, load {c['load']:.1f}; median of {c['repeats']} interleaved updates"
    )


def table_rows(result: dict[str, Any]) -> list[tuple[str, ...]]:
    return [(name, f"{s['median_s']:.3f}", f"{s['min_s']:.3f}",
             "-" if s["samples_per_s"] is None else f"{s['samples_per_s']:.1f}")
            for name, s in result["setups"].items()]  # fmt: skip


def ratio_lines(result: dict[str, Any]) -> list[str]:
    return [f"seconds per update, trunk per minibatch / once per update: {result['ratio']:.2f} "
            f"(at most about {result['config']['epochs']}, the epochs)",
            f"seconds per iteration's codes + update, with the world terms / without them: "
            f"{result['world_ratio']:.2f}"]  # fmt: skip


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=512, help="rows in the batch")
    parser.add_argument("--epochs", type=int, default=None, help="ppo.epochs (catch.yaml: 10)")
    parser.add_argument("--minibatch", type=int, default=None, help="ppo.minibatch_size (128)")
    parser.add_argument("--repeats", type=int, default=3, help="timed updates per variant")
    parser.add_argument("--warmup", type=int, default=1, help="untimed updates per variant")
    parser.add_argument("--reasoning-tokens", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    result = bench_frozen_trunk(args.rows, args.epochs, args.minibatch, args.repeats,
                                args.warmup, args.reasoning_tokens, args.threads)  # fmt: skip
    print_result(sys.modules[__name__], result, args.json)
    return result


if __name__ == "__main__":
    main()
