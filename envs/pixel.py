"""The generic adapter: any Gymnasium env with RGB image observations and discrete actions.

``PixelAdapter`` makes a third-party env look like ours: observations are ``(size, size, 3)``
uint8 images, the action space is ``Discrete(n)`` and ``env.codec`` is the default codec built
from the env's action meanings (``get_action_meanings()`` as Atari envs have it) or ``action_i``.

Where the image comes from, in order: a ``Box(H, W, 3)`` uint8 observation; a ``Dict``
observation with an RGB entry under ``pixels``, ``rgb``, ``image`` or ``pov``; otherwise the env
must support ``render_mode="rgb_array"`` and the rendered frame is the observation (this is how
state-based envs such as CartPole become pixel envs). Anything else is rejected with a message
naming what is missing.
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np

from envs.codecs import default_codec

IMAGE_KEYS = ("pixels", "rgb", "image", "pov")


def is_rgb_box(space: gym.Space) -> bool:
    return (
        isinstance(space, gym.spaces.Box)
        and space.dtype == np.uint8
        and len(space.shape) == 3
        and space.shape[-1] == 3
    )


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
        if self._key == "render" and getattr(env, "render_mode", None) != "rgb_array":
            raise ValueError(
                f"env {_name(env)} has no RGB image observation ({env.observation_space}) and "
                "was not made with render_mode='rgb_array'; pass env.kwargs.render_mode=rgb_array"
            )
        self.size = int(size)
        self.observation_space = gym.spaces.Box(0, 255, (self.size, self.size, 3), np.uint8)
        self.action_space = gym.spaces.Discrete(int(env.action_space.n))
        meanings = getattr(env.unwrapped, "get_action_meanings", None)
        self.codec = default_codec(int(env.action_space.n), meanings() if meanings else None)

    def reset(self, *, seed=None, options=None):
        obs, info = self.env.reset(seed=seed, options=options)
        return self._image(obs), info

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


def _name(env: gym.Env) -> str:
    spec = getattr(env, "spec", None)
    return spec.id if spec is not None else type(env.unwrapped).__name__
