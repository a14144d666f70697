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
