"""The spread of `rig eval` figures: bootstrap 95% intervals of the mean return and the Crafter
score over a report's episodes (resampled with replacement, 2,000 times, a fixed seed).

    python benchmarks/eval_spread.py EVAL_DIR/report.json [more reports ...]

Two policies differ by more than the spread when their intervals do not overlap.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from envs.stats import crafter_score


def spread(report: dict, samples: int = 2000, seed: int = 0) -> dict[str, float]:
    episodes = report["episodes"]
    names = sorted(report["summary"]["success_rates"])
    unlocked = np.array([[n in e["unlocked"] for n in names] for e in episodes], float)
    returns = np.array([e["return"] for e in episodes], float)

    def score(rows: np.ndarray) -> float:
        return crafter_score(dict(zip(names, 100.0 * unlocked[rows].mean(0), strict=True)))

    rng = np.random.default_rng(seed)
    draws = [rng.integers(0, len(episodes), len(episodes)) for _ in range(samples)]
    every = np.arange(len(episodes))
    s_lo, s_hi = np.percentile([score(d) for d in draws], [2.5, 97.5])
    r_lo, r_hi = np.percentile([returns[d].mean() for d in draws], [2.5, 97.5])
    return {"episodes": len(episodes), "return": float(returns.mean()), "return_lo": r_lo,
            "return_hi": r_hi, "score": score(every), "score_lo": s_lo, "score_hi": s_hi}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("reports", nargs="+", type=Path)
    for path in parser.parse_args().reports:
        s = spread(json.loads(path.read_text()))
        print(f"{path}: {s['episodes']} episodes, return {s['return']:.2f} "
              f"[{s['return_lo']:.2f}, {s['return_hi']:.2f}], Crafter score {s['score']:.2f}% "
              f"[{s['score_lo']:.2f}, {s['score_hi']:.2f}]")  # fmt: skip


if __name__ == "__main__":
    main()
