"""Games as Gymnasium 1.x envs with text action codecs. Knows nothing of models, Ray or DeepSpeed.

Registered ids (importing ``envs`` registers them with Gymnasium):

============================  ================================================================
``rig/Crafter-v0``            Crafter, the embedded default (``envs.crafter_env``)
``rig/MineRL-v0``             Minecraft through MineRL 1.0 (needs the ``minerl`` extra + JDK 8)
``rig/FakeMineRL-v0``         ours: MineRL 1.0's exact spaces, no Minecraft (tests, debugging)
``rig/Catch-v0``              a tiny pixel game, used as "any other Gymnasium env"
``rig/ColorBandit-v0``        ours: the action is the frame's colour (the RL loop's smoke test)
============================  ================================================================

Any other Gymnasium id with RGB observations and discrete actions works too, through
``envs.pixel.PixelAdapter``; ``module:Id`` imports ``module`` first (Gymnasium's convention).

Every env made by :func:`make` has ``(size, size, 3)`` uint8 observations, a ``Discrete`` action
space, and a codec (:func:`get_codec`) whose vocabulary index is the action.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass, field
from typing import Any

import gymnasium as gym

from envs.codecs import ActionCodec


@dataclass(frozen=True)
class EnvInfo:
    """One of our registered envs. ``native`` envs take ``size`` and carry their own codec;
    the others go through the generic ``PixelAdapter``."""

    id: str
    entry_point: str
    description: str
    native: bool
    kwargs: dict[str, Any] = field(default_factory=dict)


ENVS: dict[str, EnvInfo] = {
    e.id: e
    for e in (
        EnvInfo("rig/Crafter-v0", "envs.crafter_env:CrafterEnv",
                "Crafter open-world survival (embedded default)", native=True),
        EnvInfo("rig/MineRL-v0", "envs.minerl:MineRLEnv",
                "Minecraft through MineRL 1.0 (extra 'minerl' + JDK 8)", native=True,
                kwargs={"backend": "minerl"}),
        EnvInfo("rig/FakeMineRL-v0", "envs.minerl:MineRLEnv",
                "MineRL 1.0's exact spaces without Minecraft (tests, debugging)", native=True,
                kwargs={"backend": "fake"}),
        EnvInfo("rig/Catch-v0", "envs.catch:CatchEnv",
                "Catch, a tiny pixel game (generic-adapter path)", native=False),
        EnvInfo("rig/ColorBandit-v0", "envs.bandit:ColorBanditEnv",
                "the right action is the frame's colour (the RL loop's learning test)",
                native=False),
    )
}  # fmt: skip
DEFAULT_ENV = "rig/Crafter-v0"


def _register() -> None:
    for e in ENVS.values():
        if e.id not in gym.registry:
            gym.register(e.id, entry_point=e.entry_point, kwargs=dict(e.kwargs))


_register()


def check_env_id(env_id: str) -> None:
    """Raise ValueError naming the problem if ``env_id`` cannot be made."""
    module, _, name = env_id.rpartition(":")
    if module:
        try:
            importlib.import_module(module)
        except ImportError as err:
            raise ValueError(
                f"env id {env_id!r}: cannot import module {module!r} ({err})"
            ) from None
    if name not in gym.registry:
        close = [k for k in gym.registry if k.lower().endswith(name.lower().split("/")[-1])]
        hint = f"; did you mean {close[0]!r}?" if close else "; `rig envs list` shows ours"
        raise ValueError(f"unknown env id {env_id!r}{hint}")


def env_kwargs(env_id: str) -> set[str] | None:
    """Keyword arguments the constructor of ``env_id`` accepts (None: it takes ``**kwargs``)."""
    check_env_id(env_id)
    spec = gym.spec(env_id.rpartition(":")[2])
    target = spec.entry_point
    if isinstance(target, str):
        module, _, attr = target.partition(":")
        target = getattr(importlib.import_module(module), attr)
    params = inspect.signature(target).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return None
    return {n for n, p in params.items() if p.kind is not p.VAR_POSITIONAL} - set(spec.kwargs)


def make(env_id: str = DEFAULT_ENV, size: int = 64, **kwargs: Any) -> gym.Env:
    """Make ``env_id`` with ``(size, size, 3)`` observations and a codec (see module doc)."""
    check_env_id(env_id)
    info = ENVS.get(env_id)
    if info is not None and info.native:
        return gym.make(env_id, size=size, **kwargs)
    from envs.pixel import PixelAdapter

    return PixelAdapter(gym.make(env_id, **kwargs), size=size)


def get_codec(env: gym.Env | gym.vector.VectorEnv) -> ActionCodec:
    """The action codec of an env made by :func:`make` (or of a vector env of them)."""
    if isinstance(env, gym.vector.VectorEnv):
        if hasattr(env, "envs"):
            return get_codec(env.envs[0])
        return env.get_attr("codec")[0]
    return env.get_wrapper_attr("codec")


__all__ = ["DEFAULT_ENV", "ENVS", "EnvInfo", "check_env_id", "env_kwargs", "get_codec", "make"]
