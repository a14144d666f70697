"""Shared test setup: tiers are marked (see pyproject markers); GPU/Minecraft tests skip with a reason."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("SDL_VIDEODRIVER", "dummy")


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except ImportError:
        has_gpu = False
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU; none is visible on this machine")
    for item in items:
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(skip_gpu)


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """Run in a fresh working directory so run folders land in tmp_path/runs."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(scope="session")
def tiny_policy():
    """The tiny-preset policy on Crafter's codec, in eval mode, shared by the policy tests.

    A random model almost never writes <end> among ~800 tokens; an untied output bias on <end>
    makes rows stop their reasoning at different lengths, which every layout must survive
    (imagined frames then start at padded, row-dependent positions too). Tests must leave the
    weights as they found them."""
    import torch
    from policies import end_biased, state_readouts

    from envs.crafter_env import crafter_codec
    from rl.policy import RigPolicy

    policy = state_readouts(end_biased(RigPolicy.from_preset("tiny", crafter_codec(), seed=0).eval()))
    # The world and value heads start at constant predictions (zero last layer); randomise them
    # so that tests comparing two routes to the predictions compare something.
    with torch.no_grad():
        for layer in (policy.world.reward[-1], policy.world.cont[-1]):
            layer.weight.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(1))
    return policy
