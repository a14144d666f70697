"""The generic adapter: any Gymnasium env with RGB image observations and discrete actions.

``PixelAdapter`` makes a third-party env look like ours: observations are ``(size, size, 3)``
uint8 images, the action space is ``Discrete(n)`` and ``env.codec`` is the default codec built
from the env's action meanings (``get_action_meanings()`` as Atari envs have it) or ``action_i``.

Where the image comes from, in order: a ``Box(H, W, 3)`` uint8 observation; a ``Dict``
observation with an RGB entry under ``pixels``, ``rgb``, ``image`` or ``pov``; otherwise the env
must support ``render_mode="rgb_array"`` and the rendered frame is the observation (this is how
state-based envs such as CartPole become pixel envs). Anything else is rejected with a message
naming what is missing.

An ``(H, W, 3)`` uint8 array is not always a picture: MiniGrid's ``image`` entry is a grid of
object, colour and state codes (values 0-10), which as pixels is a near-black frame. So the
first observation is looked at (:func:`looks_symbolic`: every value in 1..``GRID_MAX``); a grid
of codes is replaced by the env's ``render()`` frames, or refused where the env was not made with
``render_mode="rgb_array"``. A ``Dict`` observation is looked at when the adapter is built, and
which source is used is logged once per env id (a warning, so the CLI shows it).
"""

from __future__ import annotations

import logging

import gymnasium as gym
import numpy as np

from envs.codecs import default_codec

logger = logging.getLogger(__name__)
IMAGE_KEYS = ("pixels", "rgb", "image", "pov")
GRID_MAX = 15
"""Values all in 1..GRID_MAX: symbolic codes, not RGB (an RGB frame that dark is black to the
policy anyway; an all-zero frame, a game's fade-in, is left as RGB)."""

_ANNOUNCED: set[tuple[str, str]] = set()  # (env name, source) already said in this process


def is_rgb_box(space: gym.Space) -> bool:
    return (
        isinstance(space, gym.spaces.Box)
        and space.dtype == np.uint8
        and len(space.shape) == 3
        and space.shape[-1] == 3
        and not np.all(space.high <= GRID_MAX)  # declared as small codes: not a picture
    )


def looks_symbolic(frame: np.ndarray) -> bool:
    """True if ``frame`` (an (H, W, 3) array) holds small codes rather than RGB intensities."""
    top = int(np.max(frame))
    return 0 < top <= GRID_MAX


def resize_frame(frame: np.ndarray, size: int) -> np.ndarray:
    """Resize an ``(H, W, 3)`` uint8 frame to ``(size, size, 3)`` (bilinear; no-op if equal)."""
    if frame.shape[0] == size and frame.shape[1] == size:
        return frame
    from PIL import Image

    return np.asarray(Image.fromarray(frame).resize((size, size), Image.BILINEAR))


class PixelAdapter(gym.Wrapper, gym.utils.RecordConstructorArgs):
    """Adapt ``env`` to ``(size, size, 3)`` uint8 observations and a text codec.

    Args:
        env: a Gymnasium env with ``Discrete`` actions and an RGB image observation (see module
            docstring for where the image may come from).
        size: side of the square observation the policy sees.
    """

    def __init__(self, env: gym.Env, size: int = 64):
        gym.utils.RecordConstructorArgs.__init__(self, size=size)
        super().__init__(env)
        if not isinstance(env.action_space, gym.spaces.Discrete):
            raise ValueError(
                f"env {_name(env)} has action space {env.action_space}; "
                "rig-rl needs Discrete actions (wrap continuous ones in a discretizer first)"
            )
        self._key = _image_key(env)
        if self._key == "render" and not _renders_rgb(env):
            raise ValueError(
                f"env {_name(env)} has no RGB image observation ({env.observation_space}) and "
                "was not made with render_mode='rgb_array'; pass env.kwargs.render_mode=rgb_array"
            )
        self.size = int(size)
        self.observation_space = gym.spaces.Box(0, 255, (self.size, self.size, 3), np.uint8)
        self.action_space = gym.spaces.Discrete(int(env.action_space.n))
        meanings = getattr(env.unwrapped, "get_action_meanings", None)
        self.codec = default_codec(int(env.action_space.n), meanings() if meanings else None)
        self._checked = self._key == "render"  # rendered frames are RGB by Gymnasium's contract
        if isinstance(env.observation_space, gym.spaces.Dict):
            if self._checked:
                _announce(env, "render()", "no RGB entry in its Dict observation; using render()")
            else:  # decide now, so that the choice is known (and said) before any run starts
                self._check(self.env.reset()[0])

    def reset(self, *, seed=None, options=None):
        obs, info = self.env.reset(seed=seed, options=options)
        if not self._checked:
            self._check(obs)
        return self._image(obs), info

    def _check(self, obs) -> None:
        """Once, on the first observation: is the image entry RGB, or a grid of codes?"""
        self._checked = True
        frame = np.asarray(obs if self._key is None else obs[self._key])
        where = "the observation" if self._key is None else f"observation[{self._key!r}]"
        seen = f"{frame.shape} values {frame.min()}..{frame.max()}"
        if looks_symbolic(frame):
            what = f"{where} is a grid of symbolic codes ({seen}), not RGB"
            if not _renders_rgb(self.env):
                raise ValueError(
                    f"env {_name(self.env)}: {what}; pass env.kwargs.render_mode=rgb_array "
                    "to use its rendered frames"
                )
            self._key = "render"
            _announce(self.env, "render()", f"{what}; using render() RGB frames")
        elif isinstance(self.env.observation_space, gym.spaces.Dict):
            _announce(self.env, where, f"using {where} as RGB frames ({seen})")

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(int(action))
        info = dict(info, action_text=self.codec.vocab[int(action)])
        return self._image(obs), float(reward), bool(terminated), bool(truncated), info

    def _image(self, obs) -> np.ndarray:
        if self._key is None:
            frame = obs
        elif self._key == "render":
            frame = self.env.render()
        else:
            frame = obs[self._key]
        return resize_frame(np.asarray(frame, dtype=np.uint8), self.size)


def _image_key(env: gym.Env) -> str | None:
    """None: the observation is the image; a key: the image entry; "render": use render()."""
    space = env.observation_space
    if is_rgb_box(space):
        return None
    if isinstance(space, gym.spaces.Dict):
        for key in IMAGE_KEYS:
            if key in space.spaces and is_rgb_box(space.spaces[key]):
                return key
    return "render"


def _renders_rgb(env: gym.Env) -> bool:
    return getattr(env, "render_mode", None) == "rgb_array"


def _announce(env: gym.Env, source: str, message: str) -> None:
    """Say which image source an env's frames come from, once per env and source."""
    key = (_name(env), source)
    if key not in _ANNOUNCED:
        _ANNOUNCED.add(key)
        logger.warning("%s: %s", key[0], message)  # shown as "warning: ..." by the CLI


def _name(env: gym.Env) -> str:
    spec = getattr(env, "spec", None)
    return spec.id if spec is not None else type(env.unwrapped).__name__
