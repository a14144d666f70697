"""Test helpers shared by the policy and actor tests (tests/ is on sys.path under pytest)."""

from __future__ import annotations

import torch


def end_biased(policy, bias: float = 5.5):
    """``policy`` with an untied output bias on ``<end>``, in place, returned.

    A random model almost never writes <end> among ~800 tokens; the bias makes rows stop their
    reasoning at different lengths, so generated columns get padded and every layout must
    survive rows of several lengths."""
    old = policy.model.lm_head
    head = torch.nn.Linear(old.in_features, old.out_features, bias=True)
    with torch.no_grad():
        head.weight.copy_(old.weight)
        head.bias.zero_()
        head.bias[policy.ids.end] = bias
    policy.model.lm_head = head
    return policy


def state_readouts(policy, seed: int = 1):
    """``policy`` with random value and action-head read-outs, in place, returned. Both heads
    start at zero (rl/heads.py); tests that compare two routes to the value or to the action
    log-probs (act, evaluate, state_values, the SFT scorer, with and without history) need ones
    that depend on the state. The action head's scores are O(1) (std 0.05 per weight)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        policy.value_head.out.weight.normal_(0.0, 0.5, generator=gen)
        policy.action_head.weight.normal_(0.0, 0.05, generator=gen)
    return policy


def assert_evaluate_reproduces(policy, act, values: bool = False) -> None:
    """The PPO invariant: ``policy.evaluate(act)`` recomputes the log-probs ``act`` recorded
    (and its values, with ``values``) to 1e-4."""
    with torch.no_grad():
        fresh = policy.evaluate(act)
    mask = act.token_mask
    torch.testing.assert_close(fresh["log_probs"][mask], act.log_probs[mask], atol=1e-4, rtol=0)
    if values:
        torch.testing.assert_close(fresh["values"], act.values, atol=1e-4, rtol=0)


def wait_for_runner(workers, index: int, seconds: float) -> None:
    """Block until env runner ``index`` (1-based, RLlib's actor id) of ``workers`` (a
    ``RolloutWorkers``) answers again after its process was killed, at most ``seconds``: Ray
    rebuilds its policy and envs, slow on a loaded machine. Asks that runner's own handle, not
    the GCS actor table, which also lists the dead runners of earlier runs in the same Ray."""
    import time

    import ray

    handle = workers.group._worker_manager.actors()[index]
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            ray.get(handle.__ray_ready__.remote(), timeout=5)
            return
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            time.sleep(0.5)
