"""Episode statistics as pure functions (no env, no state): return, length, achievements, score.

The Crafter score is the one of the Crafter paper (Hafner 2021, eq. in section 3.3):

    S = exp( (1/N) * sum_i ln(1 + s_i) ) - 1

where ``s_i`` in [0, 100] is the success rate of achievement ``i`` in percent: the share of
episodes in which it was unlocked at least once, over all N = 22 achievements. An achievement
never unlocked contributes ln(1) = 0, so the score rewards breadth over repetition.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

from envs.crafter_env import ACHIEVEMENTS


def episode_return(rewards: Iterable[float]) -> float:
    """Undiscounted sum of an episode's rewards."""
    return float(sum(float(r) for r in rewards))


def success_rates(
    unlocked_per_episode: Sequence[Iterable[str]], achievements: Sequence[str] = ACHIEVEMENTS
) -> dict[str, float]:
    """Percent of episodes in which each achievement was unlocked at least once.

    ``unlocked_per_episode[e]`` is the set of achievement names unlocked in episode ``e``.
    Names outside ``achievements`` are an error: a typo would otherwise silently score zero.
    """
    if not unlocked_per_episode:
        raise ValueError("success rates need at least one episode")
    known = set(achievements)
    counts = dict.fromkeys(achievements, 0)
    for unlocked in unlocked_per_episode:
        unlocked = set(unlocked)
        unknown = unlocked - known
        if unknown:
            raise ValueError(f"unknown achievements: {sorted(unknown)}")
        for name in unlocked:
            counts[name] += 1
    n = len(unlocked_per_episode)
    return {name: 100.0 * counts[name] / n for name in achievements}


def crafter_score(rates_percent: Mapping[str, float]) -> float:
    """Crafter score in percent from per-achievement success rates in percent (see module doc)."""
    if not rates_percent:
        raise ValueError("the Crafter score needs at least one achievement")
    for name, rate in rates_percent.items():
        if not 0.0 <= rate <= 100.0:
            raise ValueError(f"success rate of {name} is {rate}, expected a percent in [0, 100]")
    mean_log = sum(math.log1p(r) for r in rates_percent.values()) / len(rates_percent)
    return math.exp(mean_log) - 1.0


def unlocked_from_counts(achievement_counts: Mapping[str, int]) -> list[str]:
    """Names with a positive count in crafter's ``info["achievements"]``, sorted."""
    return sorted(name for name, count in achievement_counts.items() if int(count) > 0)


def summarize(episodes: Sequence[Mapping], achievements: Sequence[str] | None = None) -> dict:
    """Aggregate finished episodes (dicts with ``return``, ``length`` and optionally ``unlocked``).

    Returns counts, mean/min/max return and length, and, when achievements are tracked, the
    per-achievement success rates and the Crafter score.
    """
    if not episodes:
        return {"episodes": 0}
    returns = [float(e["return"]) for e in episodes]
    lengths = [int(e["length"]) for e in episodes]
    out = {
        "episodes": len(episodes),
        "return_mean": sum(returns) / len(returns),
        "return_min": min(returns),
        "return_max": max(returns),
        "length_mean": sum(lengths) / len(lengths),
        "terminated": sum(bool(e.get("terminated")) for e in episodes),
        "truncated": sum(bool(e.get("truncated")) for e in episodes),
    }
    if achievements is not None and all("unlocked" in e for e in episodes):
        rates = success_rates([e["unlocked"] for e in episodes], achievements)
        out["success_rates"] = rates
        out["score"] = crafter_score(rates)
    return out
