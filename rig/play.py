"""`rig envs play`: run an agent in vectorised envs, record env 0 to a video, summarise episodes."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import envs
from envs.agents import make_agent
from envs.crafter_env import ACHIEVEMENTS
from envs.stats import summarize
from envs.vector import Step, make_vector, play_episodes, unbatch_info
from rig.config import Config, save_config


@dataclass
class PlayResult:
    finished: list[dict[str, Any]]
    unfinished: list[dict[str, Any]]
    steps: int
    seconds: float
    invalid_actions: int
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def steps_per_second(self) -> float:
        return self.steps / max(self.seconds, 1e-9)


def play(
    config: Config,
    agent_name: str,
    steps: int | None,
    episodes: int | None,
    record: Path | None = None,
    video_size: int = 256,
    progress: Any = None,
    run_dir: Path | None = None,
) -> PlayResult:
    """Play until ``steps`` vector steps (per env) or ``episodes`` finished episodes, whichever
    comes first; ``progress(steps_done, episodes_done)`` is called after every step.

    Envs and agents are built before anything is written, so a bad env argument or an agent
    that cannot play the env raises ValueError with no run folder left behind; then the resolved
    config goes to ``run_dir/config.yaml``."""
    cfg = config.env
    try:
        venv = make_vector(cfg.id, cfg.num_envs, size=cfg.size, vectorization=cfg.vectorization, **cfg.kwargs)
    except ValueError as err:
        raise ValueError(f"env {cfg.id} with env.size={cfg.size}, env.kwargs={cfg.kwargs}: {err}") from err
    try:
        codec = envs.get_codec(venv)
        n = cfg.num_envs
        agents = [make_agent(agent_name, cfg.id, len(codec), seed=config.run.seed * 1000 + i) for i in range(n)]
        if run_dir is not None:
            save_config(config, run_dir)
        writer = _VideoWriter(record, video_size, fps=venv.metadata.get("render_fps", 10)) if record else None
    except BaseException:
        venv.close()
        raise

    def act(obs: np.ndarray, infos: dict[str, Any]) -> np.ndarray:
        return np.array([agents[i].act(obs[i], unbatch_info(infos, i)) for i in range(n)])

    def on_reset(obs: np.ndarray, infos: dict[str, Any]) -> None:
        for agent in agents:
            agent.reset()
        if writer:
            writer.add(obs[0])

    def on_step(step: Step) -> None:
        for episode in step.ended:
            agents[episode["env"]].reset()
            if writer and episode["env"] == 0:
                writer.add(step.infos["final_obs"][0])
        if writer:
            writer.add(step.new_obs[0])
        if progress:
            progress(step.steps, step.finished)

    try:
        played = play_episodes(venv, act, config.run.seed, episodes, steps, on_reset, on_step)
    finally:
        venv.close()
        if writer:
            writer.close()
    finished, unfinished = played.finished, played.unfinished
    result = PlayResult(finished, unfinished, played.steps * n, played.seconds, codec.invalid_count)
    achievements = ACHIEVEMENTS if played.crafter_like else None
    result.summary = {
        "finished": summarize(finished, achievements),
        "all": summarize(finished + unfinished, achievements),
    }
    return result


def write_result(result: PlayResult, run_dir: Path) -> Path:
    path = run_dir / "stats.json"
    payload = {
        "steps": result.steps,
        "seconds": result.seconds,
        "steps_per_second": result.steps_per_second,
        "invalid_actions": result.invalid_actions,
        "summary": result.summary,
        "episodes": result.finished + result.unfinished,
    }
    path.write_text(json.dumps(payload, indent=2))
    return path


class _VideoWriter:
    """MP4 (H.264) through imageio's ffmpeg plugin; frames upscaled by pixel repetition so tiny
    64x64 game frames stay crisp and the size suits the codec (multiples of 16)."""

    def __init__(self, path: Path, size: int, fps: int):
        import imageio.v2 as imageio

        path.parent.mkdir(parents=True, exist_ok=True)
        self.size = size
        self._writer = imageio.get_writer(str(path), fps=fps, codec="libx264", quality=8, macro_block_size=16)
        self.frames = 0

    def add(self, frame: np.ndarray) -> None:
        h, w = frame.shape[:2]
        scale = max(1, self.size // max(h, w))
        big = np.repeat(np.repeat(frame, scale, axis=0), scale, axis=1)
        pad_h, pad_w = (-big.shape[0]) % 16, (-big.shape[1]) % 16
        if pad_h or pad_w:
            big = np.pad(big, ((0, pad_h), (0, pad_w), (0, 0)))
        self._writer.append_data(big)
        self.frames += 1

    def close(self) -> None:
        self._writer.close()
