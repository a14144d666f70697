"""Minecraft through MineRL 1.0, with RIG-style text actions.

Text actions (``MineRLCodec``)
------------------------------
RIG writes each action as keyboard/mouse text, e.g. ``forward, sprint, camera:[0,10]``. Ours:

- the pressed keys, spelled as MineRL names them, in one canonical order (``KEY_ORDER``:
  movement, sprint/sneak/jump, mouse buttons, items, GUI, hotbar, ESC), joined by ``", "``;
- then ``camera:[pitch,yaw]``: whole degrees on RIG's 5-degree grid, left out when ``[0,0]``;
  positive pitch looks down and positive yaw turns right, as in Minecraft;
- ``noop`` when no key is pressed and the camera does not move.

The vocabulary is finite so that the policy can mask its logits to it: the product of a list of
allowed key combinations (``DEFAULT_KEY_COMBOS``: 28) and the camera grid, 5 x 5 bins for the
default ``camera_max=10``, so 700 strings. Human and agent recordings use any keys and any camera
angle; ``MineRLCodec.from_minerl`` maps them to the nearest entry (rule in its docstring).

The adapter (``MineRLEnv``)
---------------------------
A Gymnasium 1.x env over MineRL's old-gym env (``reset() -> obs``, ``step -> obs, reward, done,
info``). Observations are MineRL's ``pov`` resized to ``(size, size, 3)``. Game instances hang
and crash (REFERENCES, "Minecraft (MineRL 1.0)": socket timeouts after hours, a window that is
not stepped in time crashes itself, the game itself crashes), so every call into the game runs on
a worker thread with a deadline, and a failure costs one episode, never the actor::

    step t:  worker.call(env.step, a) --timeout or exception--> (last good obs, 0.0,
             terminated=False, truncated=True, info["env_error"])
               '-- the broken instance is closed in the background and its worker dropped
    reset:   a fresh instance is built on a fresh worker, seeded and reset (3 attempts)

``backend="fake"`` swaps Minecraft for ``envs.fake_minerl.FakeMineRL`` (same spaces, same old
API), which is how all of this is tested where Minecraft cannot run.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable, Sequence
from concurrent import futures
from queue import SimpleQueue
from typing import Any

import gymnasium as gym
import numpy as np

from envs.codecs import ActionCodec
from envs.errors import EnvFailedError, MissingDependencyError
from envs.pixel import resize_frame

logger = logging.getLogger(__name__)

# -- MineRL 1.0 facts ----------------------------------------------------------------------------
# Source: minerllabs/minerl v1.0 — docs/source/environments/index.rst ("General Information",
# https://minerl.readthedocs.io/en/v1.0/environments/index.html) lists the action space of
# every HumanControl env, BASALT included:
#   Dict(ESC, attack, back, camera=Box(-180.0, 180.0, (2,)), drop, forward, hotbar.1..hotbar.9,
#        inventory, jump, left, pickItem, right, sneak, sprint, swapHands, use), keys Discrete(2)
# and the observation space Dict(pov=Box(0, 255, (360, 640, 3))). In code:
# herobraine/hero/mc.py KEYMAP (23 keys incl. "key.keyboard.escape": "ESC");
# env_specs/human_controls.py makes KeybasedCommandAction(v, v) for each, plus CameraAction
# (actions/camera.py: spaces.Box(low=-180, high=180, shape=[2], dtype=np.float32)), with
# resolution=(640, 360); observations/pov.py: Box(0, 255, (height, width, 3), uint8);
# basalt_specs.py BasaltBaseEnvSpec.create_observables: "Only POV". (HumanSurvival adds
# inventory, equipped_items, life_stats, location_stats and stats observations; we pass those
# through in info["minerl_obs"].)

MINERL_BUTTONS: tuple[str, ...] = (
    "ESC", "attack", "back", "drop", "forward",
    *(f"hotbar.{i}" for i in range(1, 10)),
    "inventory", "jump", "left", "pickItem", "right", "sneak", "sprint", "swapHands", "use",
)  # fmt: skip
"""MineRL 1.0's 23 binary keys (``Discrete(2)`` each), in its own sorted order."""

MINERL_ACTION_KEYS: tuple[str, ...] = tuple(sorted((*MINERL_BUTTONS, "camera")))
"""Every key of a MineRL 1.0 action dict (24), sorted as ``gym.spaces.Dict`` sorts them."""

POV_SHAPE = (360, 640, 3)
"""MineRL 1.0's ``pov`` observation: height, width, RGB; uint8."""

CAMERA_LIMIT_DEG = 180.0
"""MineRL's camera action is a pitch/yaw delta in degrees within [-180, 180]."""

# -- text actions --------------------------------------------------------------------------------

CAMERA_BIN_DEG = 5
"""RIG quantises the camera to 5-degree bins."""

KEY_ORDER: tuple[str, ...] = (
    "forward", "back", "left", "right", "sprint", "sneak", "jump", "attack", "use", "drop",
    "pickItem", "swapHands", "inventory", *(f"hotbar.{i}" for i in range(1, 10)), "ESC",
)  # fmt: skip
"""The order keys are written in: legs first, as RIG writes ``forward, sprint`` (then ``jump``),
then hands, items, GUI, hotbar, ESC."""

DEFAULT_KEY_COMBOS: tuple[str, ...] = (
    "noop", "forward", "forward+jump", "forward+sprint", "forward+sprint+jump", "back", "left",
    "right", "forward+left", "forward+right", "jump", "sneak", "forward+sneak", "attack",
    "forward+attack", "use", "jump+use", "drop", "inventory",
    *(f"hotbar.{i}" for i in range(1, 10)),
)  # fmt: skip
"""28 key combinations: walking, running and jumping, strafing, sneaking, mining
(``forward+attack``), placing and pillaring up (``jump+use``), dropping, the inventory and the
hotbar. ``ESC`` is left out on purpose: in BASALT it ends the episode (add ``"ESC"`` for tasks
where ending it is the agent's call, such as FindCave)."""

NOOP_TEXT = "noop"
_NOOP_WORDS = {"noop", "none"}
_CAMERA = re.compile(
    r"camera\s*[:=]?\s*[\[(]\s*([-+]?\d+(?:\.\d*)?)\s*,\s*([-+]?\d+(?:\.\d*)?)\s*[\])]",
    re.IGNORECASE,
)
_KEY_SEPARATORS = re.compile(r"[,+;]")


def _squash(word: str) -> str:
    """Lower-case ``word`` without spaces, dots, dashes or underscores: ``Hotbar 1`` -> hotbar1."""
    return re.sub(r"[\s._\-]+", "", word.lower())


_KEY_BY_SQUASHED = {_squash(k): k for k in KEY_ORDER}
assert set(KEY_ORDER) == set(MINERL_BUTTONS) and len(_KEY_BY_SQUASHED) == len(KEY_ORDER)


def camera_bins(camera_max: int) -> tuple[int, ...]:
    """The camera grid on one axis: multiples of 5 degrees in ``[-camera_max, camera_max]``."""
    return tuple(range(-camera_max, camera_max + 1, CAMERA_BIN_DEG))


def _parse_keys(text: str) -> frozenset[str] | None:
    """The key set that ``text`` names (separators ``,`` ``+`` ``;``), or None if a word is not
    a key. ``noop``/``none`` alone is the empty set; empty text is None (it says nothing)."""
    tokens = [t for t in (s.strip() for s in _KEY_SEPARATORS.split(text)) if t]
    if not tokens:
        return None
    if len(tokens) == 1 and _squash(tokens[0]) in _NOOP_WORDS:
        return frozenset()
    keys: set[str] = set()
    for token in tokens:
        key = _KEY_BY_SQUASHED.get(_squash(token))
        # "forward sprint" (no comma) is two keys; "hotbar 1" is one, caught above.
        words = (
            [key] if key is not None else [_KEY_BY_SQUASHED.get(_squash(w)) for w in token.split()]
        )
        if not words or None in words:
            return None
        keys.update(words)
    return frozenset(keys)


def _parse_degrees(text: str) -> int | None:
    """``text`` as whole degrees on the 5-degree grid, or None (``2.5`` and ``7`` are not)."""
    value = float(text)
    if value != round(value) or round(value) % CAMERA_BIN_DEG:
        return None
    return int(round(value)) + 0  # + 0 turns -0 into 0


class MineRLCodec(ActionCodec):
    """RIG-style text actions for MineRL 1.0 (format in the module docstring).

    Args:
        camera_max: largest camera turn per step in degrees on each axis, a multiple of 5
            (10 gives the bins -10, -5, 0, 5, 10).
        key_combos: the allowed key combinations, each written like a text action without the
            camera (``"forward+jump"`` or ``"forward, jump"``; ``"noop"`` for none). It must
            include ``"noop"``, the fallback. Default ``DEFAULT_KEY_COMBOS``.

    Index ``i`` is combination ``i // n_cam`` with camera bin ``i % n_cam`` (``n_cam`` =
    bins squared, pitch major): the vocabulary lists combinations in the order given.
    """

    def __init__(self, camera_max: int = 10, key_combos: Sequence[str] | None = None):
        if int(camera_max) != camera_max or camera_max < 0 or camera_max % CAMERA_BIN_DEG:
            raise ValueError(f"camera_max must be a non-negative multiple of 5, got {camera_max}")
        if camera_max > CAMERA_LIMIT_DEG:
            raise ValueError(f"camera_max must be at most {CAMERA_LIMIT_DEG:g}, got {camera_max}")
        self.camera_max = int(camera_max)
        self.combos = _parse_combos(DEFAULT_KEY_COMBOS if key_combos is None else key_combos)
        bins = camera_bins(self.camera_max)
        self.cameras: tuple[tuple[int, int], ...] = tuple((p, y) for p in bins for y in bins)
        self._parts = [(keys, cam) for keys in self.combos for cam in self.cameras]
        self._index_of = {(frozenset(k), cam): i for i, (k, cam) in enumerate(self._parts)}
        super().__init__([format_action(k, cam) for k, cam in self._parts], noop=NOOP_TEXT)

    def parts(self, index: int) -> tuple[tuple[str, ...], tuple[int, int]]:
        """Action ``index`` as (pressed keys in ``KEY_ORDER``, (pitch, yaw) in degrees)."""
        self.encode(index)  # range check with the codec's message
        return self._parts[int(index)]

    def canonical(self, text: str) -> str | None:
        """The vocabulary entry ``text`` spells, or None.

        Lenient about spelling: any key order, case and spacing; keys separated by ``,``, ``+``,
        ``;`` or (between whole key names) spaces; ``hotbar 1``/``pick_item`` for ``hotbar.1``/
        ``pickItem``; ``camera: [ 0.0 , 10 ]``, ``camera=(0,10)``; ``camera:[0,0]`` is no camera.
        None for an unknown word, a camera off the 5-degree grid or beyond ``camera_max``, two
        cameras, ``noop`` with keys, or a key combination that is not in the vocabulary.
        """
        text = str(text)
        cameras = _CAMERA.findall(text)
        if len(cameras) > 1:
            return None
        cam = (0, 0)
        if cameras:
            pitch, yaw = (_parse_degrees(v) for v in cameras[0])
            if pitch is None or yaw is None:
                return None
            cam = (pitch, yaw)
        rest = _CAMERA.sub("", text)
        only_camera = cameras and not _KEY_SEPARATORS.sub("", rest).strip()
        keys = frozenset() if only_camera else _parse_keys(rest)
        if keys is None:
            return None
        index = self._index_of.get((keys, cam))
        return None if index is None else self.vocab[index]

    def to_minerl(self, index: int) -> dict[str, np.ndarray]:
        """Action ``index`` as a MineRL 1.0 action dict: all 24 keys, as MineRL's ``no_op``
        has them; buttons ``np.array(0 or 1)``, camera ``np.array([pitch, yaw], float32)``."""
        keys, (pitch, yaw) = self.parts(index)
        action = {k: np.array(int(k in keys)) for k in MINERL_ACTION_KEYS if k != "camera"}
        action["camera"] = np.array([pitch, yaw], dtype=np.float32)
        return {k: action[k] for k in MINERL_ACTION_KEYS}

    def from_minerl(self, action: dict[str, Any]) -> int:
        """The vocabulary index nearest to a MineRL action dict (a recorded human or agent step).

        Camera: each axis is rounded to the nearest multiple of 5 degrees (``np.round``, so an
        exact half such as 2.5 goes to the even multiple, 0) and clamped to ``±camera_max``.
        Keys: the pressed set P (buttons whose value is non-zero; keys we do not know, such as
        ``chat``, are ignored; a missing key is released) becomes the allowed combination C with
        the fewest differing keys ``|P ^ C|``; ties go to the C that presses fewer keys P does not
        (``|C - P|``: never invent presses when dropping some will do), then to the earlier
        combination in ``key_combos``. So ``forward, sprint, attack`` with the default combos is
        ``forward, sprint`` (one key dropped), and ``left, right`` is ``left``.
        """
        pressed = {k for k in MINERL_BUTTONS if k in action and np.any(np.asarray(action[k]))}
        camera = np.asarray(action.get("camera", (0.0, 0.0)), dtype=np.float64).reshape(-1)
        if camera.shape != (2,) or not np.all(np.isfinite(camera)):
            raise ValueError(f"camera must be 2 finite numbers, got {action.get('camera')!r}")
        binned = np.round(camera / CAMERA_BIN_DEG) * CAMERA_BIN_DEG
        pitch, yaw = (int(v) + 0 for v in np.clip(binned, -self.camera_max, self.camera_max))
        combo = min(
            self.combos,
            key=lambda c: (len(pressed.symmetric_difference(c)), len(set(c) - pressed)),
        )  # min keeps the first of equals: the earlier combination wins the last tie
        return self._index_of[(frozenset(combo), (pitch, yaw))]


def format_action(keys: Sequence[str], camera: tuple[int, int]) -> str:
    """Canonical text for pressed ``keys`` (any order) and a (pitch, yaw) camera turn."""
    parts = [k for k in KEY_ORDER if k in keys]
    if tuple(camera) != (0, 0):
        parts.append(f"camera:[{int(camera[0])},{int(camera[1])}]")
    return ", ".join(parts) if parts else NOOP_TEXT


def _parse_combos(combos: Sequence[str]) -> tuple[tuple[str, ...], ...]:
    """Key combinations as key tuples in ``KEY_ORDER``; errors name the offending entry."""
    if isinstance(combos, str):
        raise ValueError(f"key_combos must be a list of strings, got the string {combos!r}")
    parsed: list[tuple[str, ...]] = []
    for combo in combos:
        keys = _parse_keys(str(combo))
        if keys is None:
            raise ValueError(
                f"key_combos entry {combo!r} is not a '+'-separated set of MineRL keys "
                f"({', '.join(KEY_ORDER)}) or 'noop'"
            )
        ordered = tuple(k for k in KEY_ORDER if k in keys)
        if ordered in parsed:
            raise ValueError(f"key_combos entry {combo!r} repeats an earlier combination")
        parsed.append(ordered)
    if () not in parsed:
        raise ValueError("key_combos must include 'noop', the fallback for invalid text")
    return tuple(parsed)


# -- calls with a deadline ----------------------------------------------------------------------


class _CallFailed(Exception):
    """A game call timed out or raised; the message says which, for ``info["env_error"]``."""


class _CallWorker:
    """One daemon thread that runs a game instance's calls in order, so the caller can give up.

    Why not ``ThreadPoolExecutor``: its threads are joined at interpreter exit, so one game call
    that hangs forever would hang the process's exit as well. A daemon thread is just dropped.
    A worker whose call timed out is abandoned with its instance (the hung thread may still be
    inside the game); the next instance gets a new worker.
    """

    def __init__(self, name: str):
        self._jobs: SimpleQueue = SimpleQueue()
        threading.Thread(target=self._run, name=name, daemon=True).start()

    def call(self, what: str, timeout_s: float, fn: Callable, *args: Any) -> Any:
        """``fn(*args)`` on the worker; ``_CallFailed`` if it raises or takes over ``timeout_s``."""
        future: futures.Future = futures.Future()
        self._jobs.put((future, fn, args))
        done, _ = futures.wait([future], timeout=timeout_s)
        if not done:  # the future is still running: our deadline, not an error inside fn
            raise _CallFailed(f"{what} timed out after {timeout_s:g} s")
        error = future.exception()
        if error is not None:
            raise _CallFailed(f"{what} raised {type(error).__name__}: {error}") from error
        return future.result()

    def stop(self) -> None:
        """Let the thread exit once its current call (if any) returns."""
        self._jobs.put(None)

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            future, fn, args = job
            try:
                future.set_result(fn(*args))
            except BaseException as error:  # noqa: BLE001 - handed to the waiting caller
                future.set_exception(error)


def _close_in_background(env: Any, reason: str) -> threading.Thread:
    """Close an instance on a daemon thread and return it: a hung ``close`` must not hang us
    too, so callers wait on the thread with a deadline, if at all."""

    def close() -> None:
        try:
            env.close()
        except Exception as error:  # noqa: BLE001 - closing is best effort
            logger.warning("closing a MineRL instance (%s) failed: %r", reason, error)

    thread = threading.Thread(target=close, name="minerl-close", daemon=True)
    thread.start()
    return thread


# -- backends ------------------------------------------------------------------------------------


def _import_minerl() -> Any:
    """Import ``minerl`` (which registers its envs with old ``gym``) and return ``gym``."""
    try:
        import gym  # MineRL 1.0 speaks the old gym API and registers there
        import minerl  # noqa: F401
    except ImportError as error:
        raise MissingDependencyError(
            "minerl", extra="minerl", requirements="JDK 8", docs=f"docs/minecraft.md ({error})"
        ) from error
    return gym


def _backend_factory(backend: str, task: str, kwargs: dict[str, Any]) -> Callable[[], Any]:
    """A function that builds one old-API game instance (called on the instance's worker)."""
    if backend == "minerl":
        gym_module = _import_minerl()  # fail at construction, not at the first reset
        return lambda: gym_module.make(task, **kwargs)
    from envs.fake_minerl import FakeMineRL

    return lambda: FakeMineRL(**kwargs)


# -- the adapter ---------------------------------------------------------------------------------

_RESET_ATTEMPTS = 3
"""Fresh instances tried by one ``reset`` before giving up with ``EnvFailedError``."""


class MineRLEnv(gym.Env):
    """MineRL 1.0 as a Gymnasium 1.x env with ``Discrete`` text actions (see module docstring).

    Args:
        task: MineRL env id, e.g. ``MineRLBasaltFindCave-v0`` or ``MineRLHumanSurvival-v0``
            (any id whose observations have ``pov``; the fake backend ignores it).
        size: side of the square observation. The 360x640 ``pov`` is resized to ``size x size``
            with PIL bilinear (``envs.pixel.resize_frame``) and the aspect is NOT kept: a center
            crop would throw away 44% of the horizontal field of view, which exploration tasks
            need, and squashing is what VPT, STEVE-1 and MineStudio do to the same frames, so
            their trajectories (RIG's data) look like ours. Data pipelines must use the same
            function: the interpolation is part of the input distribution (PIL's bilinear
            filter is antialiased when shrinking; OpenCV's INTER_LINEAR, which VPT uses, is not).
        step_timeout_s: deadline for one game step; past it the episode is truncated and the
            instance rebuilt (MineRL steps take ~25 ms; 60 s means the game is stuck).
        reset_timeout_s: deadline for building an instance and resetting it, which launches
            Minecraft the first time (minutes); 600 s is MineRL's own ``MAX_WAIT``.
        max_episode_steps: our own time limit: the step that reaches it has ``truncated=True``
            (None: only the game ends episodes; BASALT tasks have their own limit).
        camera_max: largest camera turn per step, degrees, a multiple of 5 (``MineRLCodec``).
        key_combos: allowed key combinations (``MineRLCodec``; None: ``DEFAULT_KEY_COMBOS``).
        backend: ``"minerl"`` (Minecraft; needs the ``minerl`` extra and JDK 8) or ``"fake"``
            (``envs.fake_minerl.FakeMineRL``, MineRL's spaces without Minecraft).
        backend_kwargs: keyword arguments for each instance: ``gym.make(task, **kw)`` for
            ``minerl``, ``FakeMineRL(**kw)`` for ``fake`` (its failure hooks, for tests).
        render_mode: ``"rgb_array"`` makes ``render()`` return the last full-size ``pov``.

    ``done`` from MineRL is ``terminated`` (ESC in BASALT, death, the task's own end);
    reaching ``max_episode_steps`` sets ``truncated`` as Gymnasium's ``TimeLimit`` does (both
    can be true on the same step). A failed game call truncates instead (module docstring).
    Seeding: each reset draws MineRL's world seed from ``self.np_random`` and passes it to
    ``env.seed`` before ``env.reset``, so ``reset(seed=s)`` and the resets after it replay.

    ``info`` on reset and step: ``action_text`` (canonical text of the action taken; None on
    reset), ``env_rebuilds`` (broken instances thrown away so far by this env),
    ``episode_steps``, ``minerl_obs`` (MineRL's observation minus ``pov``: inventory and
    stats in HumanSurvival, empty in BASALT), ``minerl_info`` (MineRL's own ``info``); after a
    failed call also ``env_error``, naming what happened.
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 20}  # MineRL: 20 steps a second

    def __init__(
        self,
        task: str = "MineRLBasaltFindCave-v0",
        size: int = 64,
        step_timeout_s: float = 60.0,
        max_episode_steps: int | None = None,
        camera_max: int = 10,
        key_combos: list[str] | None = None,
        backend: str = "minerl",
        render_mode: str | None = None,
        reset_timeout_s: float = 600.0,
        backend_kwargs: dict[str, Any] | None = None,
    ):
        if backend not in ("minerl", "fake"):
            raise ValueError(f"backend must be 'minerl' or 'fake', got {backend!r}")
        if int(size) < 1:
            raise ValueError(f"size must be a positive number of pixels, got {size}")
        if not step_timeout_s > 0 or not reset_timeout_s > 0:
            raise ValueError(
                f"timeouts must be positive, got step_timeout_s={step_timeout_s}, "
                f"reset_timeout_s={reset_timeout_s}"
            )
        if max_episode_steps is not None and int(max_episode_steps) < 1:
            raise ValueError(f"max_episode_steps must be >= 1 or None, got {max_episode_steps}")
        if render_mode not in (None, "rgb_array"):
            raise ValueError(f"render_mode must be None or 'rgb_array', got {render_mode!r}")
        self.task = task
        self.size = int(size)
        self.step_timeout_s = float(step_timeout_s)
        self.reset_timeout_s = float(reset_timeout_s)
        self.max_episode_steps = None if max_episode_steps is None else int(max_episode_steps)
        self.backend = backend
        self.render_mode = render_mode
        self.codec = MineRLCodec(camera_max=camera_max, key_combos=key_combos)
        self.observation_space = gym.spaces.Box(0, 255, (self.size, self.size, 3), np.uint8)
        self.action_space = gym.spaces.Discrete(len(self.codec))
        self._make_instance = _backend_factory(backend, task, dict(backend_kwargs or {}))
        self._game: Any = None  # the old-API instance; None until built or after it broke
        self._worker: _CallWorker | None = None
        self._rebuilds = 0
        self._steps = 0
        self._episode_over = True  # step() needs a reset() first
        self._pov: np.ndarray | None = None  # last good full-size frame
        self._obs: np.ndarray | None = None  # ... and resized

    # -- gymnasium API ---------------------------------------------------------------------------

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        world_seed = int(self.np_random.integers(0, 2**31 - 1))
        errors = []
        for _ in range(_RESET_ATTEMPTS):
            try:
                raw_obs = self._reset_game(world_seed)
                break
            except _CallFailed as error:
                errors.append(str(error))
                self._discard_game(str(error))
        else:
            raise EnvFailedError(
                f"{self.task}: {_RESET_ATTEMPTS} fresh instances failed to reset: {errors}"
            )
        self._steps = 0
        self._episode_over = False
        self._observe(raw_obs)
        return self._obs, self._info(None, raw_obs, {})

    def step(self, action):
        if self._episode_over:
            raise RuntimeError("the episode is over (or never started): call reset() first")
        index = int(action)
        if not self.action_space.contains(index):
            raise ValueError(f"action {action} is outside Discrete({self.action_space.n})")
        game = self._game  # bound now: a call left hanging must never reach a later instance
        try:
            raw_obs, reward, done, raw_info = self._worker.call(
                "step", self.step_timeout_s, game.step, self.codec.to_minerl(index)
            )
        except _CallFailed as error:
            return self._fail_episode(str(error), index)
        if isinstance(raw_info, dict) and "error" in raw_info:
            # MineRL's own socket-failure path: done=True with a random observation.
            return self._fail_episode(f"minerl reported: {raw_info['error']}", index)
        self._steps += 1
        self._observe(raw_obs)
        terminated = bool(done)
        truncated = self.max_episode_steps is not None and self._steps >= self.max_episode_steps
        self._episode_over = terminated or truncated
        info = self._info(index, raw_obs, raw_info)
        return self._obs, float(reward), terminated, bool(truncated), info

    def render(self):
        if self.render_mode == "rgb_array" and self._pov is not None:
            return self._pov.copy()
        return None

    def close(self):
        """Close the game instance, waiting at most ``step_timeout_s`` for it. Idempotent."""
        if self._game is not None:
            # Wait so that Minecraft is gone when close() returns, unless it hangs: then we leave
            # it to its daemon thread rather than hang the actor that is shutting down.
            _close_in_background(self._game, "env closed").join(timeout=self.step_timeout_s)
        self._drop_instance()
        super().close()

    # -- helpers ---------------------------------------------------------------------------------

    def _reset_game(self, world_seed: int) -> dict[str, Any]:
        """Build an instance if there is none, then seed and reset it, all under the deadline."""
        if self._game is None:
            self._worker = _CallWorker(name=f"minerl-{self.task}")
            self._game = self._worker.call("build", self.reset_timeout_s, self._make_instance)
        return self._worker.call(
            "reset", self.reset_timeout_s, _seed_and_reset, self._game, world_seed
        )

    def _fail_episode(self, error: str, index: int):
        """Truncate the episode on the last good frame and throw the broken instance away."""
        self._discard_game(error)
        self._episode_over = True
        info = self._info(index, {}, {})
        info["env_error"] = error
        return self._obs, 0.0, False, True, info

    def _discard_game(self, reason: str) -> None:
        logger.warning("MineRL instance failed (%s); rebuilding it at the next reset", reason)
        if self._game is not None:
            _close_in_background(self._game, reason)
        self._drop_instance()
        self._rebuilds += 1

    def _drop_instance(self) -> None:
        if self._worker is not None:
            self._worker.stop()
        self._game, self._worker = None, None

    def _observe(self, raw_obs: dict[str, Any]) -> None:
        self._pov = np.ascontiguousarray(raw_obs["pov"], dtype=np.uint8)
        self._obs = resize_frame(self._pov, self.size)

    def _info(self, index: int | None, raw_obs: dict[str, Any], raw_info: Any) -> dict[str, Any]:
        return {
            "action_text": None if index is None else self.codec.vocab[index],
            "env_rebuilds": self._rebuilds,
            "episode_steps": self._steps,
            "minerl_obs": {k: v for k, v in raw_obs.items() if k != "pov"},
            "minerl_info": dict(raw_info) if isinstance(raw_info, dict) else {},
        }


def _seed_and_reset(game: Any, world_seed: int) -> dict[str, Any]:
    """MineRL takes the world seed through ``seed()`` before ``reset()`` (old gym API)."""
    game.seed(world_seed)
    return game.reset()
