"""Episode statistics against hand-worked examples."""

from __future__ import annotations

import math

import pytest

from envs.crafter_env import ACHIEVEMENTS
from envs.stats import crafter_score, episode_return, success_rates, summarize, unlocked_from_counts


def test_crafter_score_hand_worked():
    # Two achievements at 100% and 0%: exp((ln 101 + ln 1) / 2) - 1 = sqrt(101) - 1 = 9.0499...
    assert crafter_score({"a": 100.0, "b": 0.0}) == pytest.approx(math.sqrt(101) - 1)
    # 22 achievements, only collect_wood at 50%: exp(ln(51) / 22) - 1 = exp(0.178719) - 1 = 0.195685
    rates = dict.fromkeys(ACHIEVEMENTS, 0.0) | {"collect_wood": 50.0}
    assert crafter_score(rates) == pytest.approx(51 ** (1 / 22) - 1, rel=1e-12)
    assert crafter_score(rates) == pytest.approx(0.195685, abs=1e-6)
    # Everything always: the maximum, 100%.
    assert crafter_score(dict.fromkeys(ACHIEVEMENTS, 100.0)) == pytest.approx(100.0)
    assert crafter_score(dict.fromkeys(ACHIEVEMENTS, 0.0)) == 0.0


def test_crafter_score_rewards_breadth():
    narrow = dict.fromkeys(ACHIEVEMENTS, 0.0) | {"collect_wood": 100.0}
    broad = dict.fromkeys(ACHIEVEMENTS, 0.0) | {"collect_wood": 50.0, "place_table": 50.0}
    assert crafter_score(broad) > crafter_score(narrow)


def test_success_rates_over_episodes():
    episodes = [{"collect_wood", "place_table"}, {"collect_wood"}, set(), {"wake_up"}]
    rates = success_rates(episodes)
    assert rates["collect_wood"] == 50.0
    assert rates["place_table"] == 25.0
    assert rates["wake_up"] == 25.0
    assert rates["collect_diamond"] == 0.0
    assert len(rates) == 22


def test_success_rates_reject_typos_and_empty():
    with pytest.raises(ValueError, match="collect_woood"):
        success_rates([{"collect_woood"}])
    with pytest.raises(ValueError, match="at least one episode"):
        success_rates([])
    with pytest.raises(ValueError, match="percent"):
        crafter_score({"collect_wood": 150.0})


def test_summarize():
    episodes = [
        {"return": 2.0, "length": 100, "terminated": True, "unlocked": ["collect_wood"]},
        {"return": 4.0, "length": 300, "truncated": True, "unlocked": []},
    ]
    out = summarize(episodes, ACHIEVEMENTS)
    assert out["episodes"] == 2
    assert out["return_mean"] == 3.0
    assert out["length_mean"] == 200.0
    assert out["terminated"] == 1 and out["truncated"] == 1
    assert out["success_rates"]["collect_wood"] == 50.0
    assert out["score"] == pytest.approx(51 ** (1 / 22) - 1)
    assert episode_return([0.1, -0.1, 1.0]) == pytest.approx(1.0)
    assert summarize([]) == {"episodes": 0}


def test_unlocked_from_counts():
    assert unlocked_from_counts({"wake_up": 2, "collect_wood": 1, "eat_cow": 0}) == ["collect_wood", "wake_up"]
