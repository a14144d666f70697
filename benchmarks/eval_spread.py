"""The spread of `rig eval` figures: bootstrap 95% intervals of the mean return and the Crafter
score over a report's episodes (resampled with replacement, 2,000 times, a fixed seed).

    python benchmarks/eval_spread.py EVAL_DIR/report.json [more reports ...]
    python benchmarks/eval_spread.py --pool SEED0/report.json SEED1/report.json ...

With ``--pool`` the reports (one policy's seeds, played on the same kind of worlds) are first
pooled into one set of episodes, whose figures it prints after each report's own.

Two policies differ by more than the spread when their intervals do not overlap. With more
than one report it also prints, for each report after the first, the bootstrap 95% interval of
its difference from the first (each report's episodes resampled on their own, as the two sets of
worlds are independent draws): a difference whose interval excludes 0 is one the episodes
support, a weaker test than intervals apart.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from envs.stats import crafter_score


def spread(report: dict, samples: int = 2000, seed: int = 0) -> dict[str, Any]:
    """Mean return and Crafter score of ``report``'s episodes, their bootstrap 95% intervals
    (``*_lo``, ``*_hi``), and the bootstrap draws themselves (``*_draws``, for
    :func:`difference`). An env without achievements (no ``success_rates`` in the summary, e.g.
    Catch) has no score: its ``score*`` entries are None."""
    episodes = report["episodes"]
    names = sorted(report["summary"].get("success_rates") or {})
    unlocked = np.array([[n in e["unlocked"] for n in names] for e in episodes], float)
    returns = np.array([e["return"] for e in episodes], float)

    def score(rows: np.ndarray) -> float | None:
        if not names:
            return None
        return crafter_score(dict(zip(names, 100.0 * unlocked[rows].mean(0), strict=True)))

    rng = np.random.default_rng(seed)
    draws = [rng.integers(0, len(episodes), len(episodes)) for _ in range(samples)]
    every = np.arange(len(episodes))
    means = np.array([returns[d].mean() for d in draws])
    r_lo, r_hi = np.percentile(means, [2.5, 97.5])
    scores, s_lo, s_hi = None, None, None
    if names:
        scores = np.array([score(d) for d in draws])
        s_lo, s_hi = (float(v) for v in np.percentile(scores, [2.5, 97.5]))
    return {"episodes": len(episodes), "return": float(returns.mean()), "return_lo": float(r_lo),
            "return_hi": float(r_hi), "score": score(every), "score_lo": s_lo, "score_hi": s_hi,
            "return_draws": means, "score_draws": scores}  # fmt: skip


def pool(reports: list[dict]) -> dict:
    """One report of every given report's episodes (one policy's seeds): the input of
    :func:`spread` for figures pooled over seeds, as ``benchmarks.learning.pooled_eval`` does.
    The reports must share their achievements (the same env)."""
    names = [sorted(r["summary"].get("success_rates") or {}) for r in reports]
    if any(n != names[0] for n in names):
        raise ValueError("cannot pool reports of different envs (their achievements differ)")
    return {"episodes": [e for r in reports for e in r["episodes"]], "summary": reports[0]["summary"]}


def difference(base: dict, other: dict) -> dict[str, float]:
    """``other - base`` for the return and the score (two :func:`spread` results of the same
    number of draws), with the bootstrap 95% interval of each difference (the score's entries
    None where either has no score)."""
    out: dict[str, float | None] = {}
    for key in ("return", "score"):
        if base[f"{key}_draws"] is None or other[f"{key}_draws"] is None:
            out.update({key: None, f"{key}_lo": None, f"{key}_hi": None})
            continue
        lo, hi = np.percentile(other[f"{key}_draws"] - base[f"{key}_draws"], [2.5, 97.5])
        out.update({key: other[key] - base[key], f"{key}_lo": float(lo), f"{key}_hi": float(hi)})
    return out


def describe(s: dict) -> str:
    """One :func:`spread` as text: episodes, return and (where there is one) score, with their
    intervals."""
    text = (f"{s['episodes']} episodes, return {s['return']:.2f} "
            f"[{s['return_lo']:.2f}, {s['return_hi']:.2f}]")  # fmt: skip
    if s["score"] is not None:
        text += f", Crafter score {s['score']:.2f}% [{s['score_lo']:.2f}, {s['score_hi']:.2f}]"
    return text


def describe_difference(d: dict) -> str:
    """One :func:`difference` as text."""
    text = f"return {d['return']:+.2f} [{d['return_lo']:+.2f}, {d['return_hi']:+.2f}]"
    if d["score"] is not None:
        text += (f", Crafter score {d['score']:+.2f} points "
                 f"[{d['score_lo']:+.2f}, {d['score_hi']:+.2f}]")  # fmt: skip
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("reports", nargs="+", type=Path)
    parser.add_argument("--pool", action="store_true",
                        help="also print the reports' episodes pooled into one set")  # fmt: skip
    args = parser.parse_args()
    paths = args.reports
    reports = [json.loads(path.read_text()) for path in paths]
    for path, report in zip(paths, reports, strict=True):
        print(f"{path}: {describe(spread(report))}")
    if args.pool:
        print(f"pooled ({len(reports)} reports): {describe(spread(pool(reports), seed=1))}")
        return
    if len(reports) < 2:
        return
    # the differences from draws of their own (the intervals above share seed 0): the first
    # report's with seed 1, every other's with seed 2, so a figure does not depend on where in
    # the list its report stands
    base = spread(reports[0], seed=1)
    for path, report in zip(paths[1:], reports[1:], strict=True):
        print(f"{path} - {paths[0]}: {describe_difference(difference(base, spread(report, seed=2)))}")


if __name__ == "__main__":
    main()
