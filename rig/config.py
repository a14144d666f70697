"""Typed, validated configuration, layered from YAML files and ``key=value`` overrides.

Layers, later ones win, merged key by key (a preset only names what it changes):

1. ``configs/defaults.yaml``: every key, the single source of default values;
2. a preset file (``--config configs/debug.yaml``), or none;
3. ``key=value`` overrides from the command line (``env.num_envs=8``), values read as YAML
   (with YAML 1.2's floats: ``3e-4``); a dotted key reaches one entry of a mapping too
   (``ppo.loss_scales.next_frame=0.0``), a mapping as the value replaces it whole.

The merged tree is validated by pydantic models whose fields mirror the YAML sections one to one
(a section is the keyword arguments of one constructor). Unknown keys, wrong types and
out-of-range values are rejected before anything starts, as one line naming the file (or
"command line"), the key path and what was expected. The resolved config is saved in every
run's folder by :func:`save_config`.
"""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictFloat,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)  # fmt: skip
from pydantic_core import PydanticCustomError

from rig.errors import ConfigError

CONFIG_DIR = Path(os.environ.get("RIG_CONFIG_DIR", Path(__file__).resolve().parents[1] / "configs"))
DEFAULTS_FILE = CONFIG_DIR / "defaults.yaml"
COMMAND_LINE = "command line"


class _Loader(yaml.SafeLoader):
    """YAML as users write numbers: PyYAML follows YAML 1.1, whose floats need a dot, so
    ``3e-4`` and ``1e5`` would stay strings; YAML 1.2 (and Python, and every ML paper's config)
    reads them as floats."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def _yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)


class Section(BaseModel):
    # strict: YAML already gives typed values, so "3" for an int is a mistake worth reporting.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class RunConfig(Section):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$", description="run name, used in folder names")
    output_dir: str = Field(min_length=1, description="where run folders are created")
    seed: int = Field(ge=0, description="seeds envs, agents and (later) the model")


class EnvConfig(Section):
    id: str = Field(description="registered env id, see `rig envs list`")
    size: int = Field(ge=9, le=1024, description="observation side in pixels")
    num_envs: int = Field(ge=1, le=4096, description="envs stepped together per process")
    vectorization: Literal["sync", "async"] = Field(description="in-process or subprocess envs")
    kwargs: dict[str, Any] = Field(description="extra keyword arguments of the env constructor")

    @field_validator("id")
    @classmethod
    def _known_id(cls, value: str) -> str:
        from envs import check_env_id

        check_env_id(value)  # ValueError -> reported by pydantic with the key path
        return value

    @field_validator("kwargs")
    @classmethod
    def _known_kwargs(cls, value: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        from envs import env_kwargs

        env_id = info.data.get("id")
        accepted = None if env_id is None else env_kwargs(env_id)
        if accepted is None:  # bad id (reported on its own) or a constructor taking **kwargs
            return value
        accepted = accepted - {"size"}  # size has its own key, env.size
        for key in value:
            if key not in accepted:
                raise PydanticCustomError(
                    "unknown_env_kwarg",
                    "{env_id} takes no argument '{key}' (it takes: {accepted})",
                    {"key": key, "env_id": env_id, "accepted": ", ".join(sorted(accepted))},
                )
        return value


class PolicyConfig(Section):
    preset: str = Field(min_length=1, description="configs/policy/<preset>.yaml when not init_from")
    init_from: str | None = Field(description="HF checkpoint directory to start from (--init-from)")
    vq: str | None = Field(
        default=None, description="a `rig tokenizer train` folder: its trained VQ replaces the "
        "policy's, so next frames are coded by a tokenizer trained for the env",
    )
    task: str = Field(min_length=1, description="the task text every step's prompt starts with")
    max_reasoning_tokens: int = Field(ge=0, le=4096, description="reasoning length cap per step")
    temperature: float = Field(gt=0, description="sampling temperature of reasoning and action")
    history: int = Field(ge=0, le=64, description="past steps (frame + action) in the prompt")
    lookahead: int = Field(ge=0, le=16, description="imagined steps before deciding (RIG review)")
    head_hidden: int = Field(
        ge=0, le=65536, description="hidden ReLU units of the value and action heads; 0: linear"
    )
    sees: Literal["frames", "reconstructions"] | None = Field(
        default=None, description="what the vision path reads: the frames, or their "
        "reconstructions through the policy's VQ (IRIS's choice: real and imagined frames then "
        "come from one distribution; needs a trained tokenizer, policy.vq); null: an init_from "
        "checkpoint's own, else frames",
    )
    frame_head: int | None = Field(
        default=None, ge=0, le=65536, description="hidden ReLU units of the next-frame read-out "
        "(rl.heads.FrameHead: the decision state and the action to the generation head's code "
        "logits); 0: the generation head alone; null: an init_from checkpoint's own, else 0",
    )

    def heads(self) -> dict[str, Any]:
        """The head options of ``RigPolicy.load`` (for ``init_from``: null keeps the
        checkpoint's) or of ``RigPolicy.from_preset`` (null is the default)."""
        heads = {"head_hidden": self.head_hidden, "sees": self.sees, "frame_head": self.frame_head}
        if self.init_from is None:
            heads.update(sees=self.sees or "frames", frame_head=self.frame_head or 0)
        return heads

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, value: str) -> str:
        from rl.model import available_presets

        if value not in available_presets() and not value.endswith((".yaml", ".yml")):
            raise ValueError(f"unknown policy preset {value!r}; available: {available_presets()}")
        return value

    @model_validator(mode="after")
    def _reconstructions_need_a_tokenizer(self) -> PolicyConfig:
        if self.sees == "reconstructions" and self.vq is None and self.init_from is None:
            raise ValueError(
                "sees=reconstructions reads frames through the policy's VQ, and a preset's is "
                "untrained; give a trained one with policy.vq=<rig tokenizer train folder>"
            )
        return self


class RolloutConfig(Section):
    num_env_runners: int = Field(ge=0, description="Ray env-runner actors; 0: in this process")
    fragment_length: int = Field(ge=1, description="env steps per sub-env per sample")
    max_restarts: int = Field(ge=0, description="env-runner restarts allowed before giving up")
    restart_delay_s: float = Field(
        default=5, ge=0, le=600, description="seconds a failed env runner waits before its "
        "process exits to be restarted (RLlib's delay_between_env_runner_restarts_s)",
    )
    num_cpus_per_runner: float = Field(ge=0, description="Ray CPUs each env runner reserves")
    num_gpus_per_runner: float = Field(
        ge=0, description="Ray GPUs each env runner reserves; > 0 acts on the GPU"
    )
    resources: dict[str, float] = Field(
        description="custom Ray resources each env runner needs, e.g. {minecraft: 1}"
    )
    num_inference_actors: int = Field(
        default=0, ge=0, description="Ray actors that act for all env runners, each on its "
        "runners' steps in one batch (actors/inference.py); 0: every runner acts itself",
    )
    num_cpus_per_inference_actor: float = Field(default=1, ge=0,
                                                description="Ray CPUs each inference actor reserves")  # fmt: skip
    num_gpus_per_inference_actor: float = Field(
        default=0, ge=0, description="Ray GPUs each inference actor reserves; > 0 acts on the GPU"
    )
    inference_wait_ms: float = Field(
        default=20, ge=0, description="longest an inference actor waits for the rest of its "
        "runners' requests after the first one, before acting on those it has",
    )
    weight_sync: Literal["object_store", "collective"] = Field(
        default="object_store", description="how weights reach the inference actors: one "
        "object-store put each fetches, or a bucketed broadcast from the driver (nccl between "
        "distinct GPUs, else gloo; actors/collective.py); env runners always use the store",
    )
    weight_sync_bucket_mb: float = Field(
        default=256, gt=0, le=65536, description="weight_sync collective: MiB per broadcast "
        "(the extra memory on each side)",
    )

    @model_validator(mode="after")
    def _inference_needs_runners(self) -> RolloutConfig:
        if self.num_inference_actors > self.num_env_runners:
            raise ValueError(
                f"num_inference_actors ({self.num_inference_actors}) must be at most "
                f"num_env_runners ({self.num_env_runners}): each serves one or more runners, "
                f"and an in-process runner (0 runners) acts itself"
            )
        if self.weight_sync == "collective" and self.num_inference_actors < 1:
            raise ValueError(
                "weight_sync=collective broadcasts to inference actors but num_inference_actors "
                "is 0; set rollout.num_inference_actors >= 1 or rollout.weight_sync=object_store"
            )
        return self


class ImaginationConfig(Section):
    num_actors: int = Field(ge=0, description="Ray imagination actors; 0: in this process")
    horizon: int = Field(ge=0, description="imagined steps per start state; 0 turns it off")
    num_starts: int = Field(ge=1, description="real start states imagined from per iteration")
    weight: float = Field(ge=0, description="loss weight of imagined rows")
    value_weight: float = Field(
        default=1.0, ge=0, description="imagined rows' weight in the value term, times weight: "
        "0 lets the critic learn from real returns only while imagined rows still move the policy",
    )
    gate: Literal["earned", "open", "closed"] = Field(
        description="earned: imagined rows enter the loss once the world model beats its "
        "baselines on fresh real data (rl/gate.py); open: always; closed: never (logged only)"
    )
    gate_checks: list[Literal["codes", "psnr", "reward", "continue", "value"]] = Field(
        default=["codes", "psnr", "reward", "continue", "value"], min_length=1,
        description="the baselines the world model must beat for gate earned (rl/gate.py): "
        "codes and psnr (copy the frame), reward and continue (constants), value (the critic on "
        "the dream against 'the value does not change'); every check is logged either way",
    )
    gate_rows: int = Field(
        ge=0, description="fresh real transitions the world model is checked on per iteration; 0: none"
    )
    gate_window: int = Field(
        default=4, ge=1, description="checks the gate's verdict is made on (their mean): one "
        "64-row check flickers with each batch's baseline",
    )
    temperature: float | None = Field(
        default=None, gt=0, description="the imagined frames' sampling temperature (the gate "
        "checks the frames imagination would use); null: policy.temperature",
    )
    num_gpus_per_actor: float = Field(
        ge=0, description="Ray GPUs each imagination actor reserves; > 0 imagines on the GPU"
    )
    updates: int = Field(
        default=0, ge=0, le=64, description="extra PPO updates per iteration on imagined rows "
        "only, each on a fresh imagined batch from the weights the one before left, while the "
        "gate is open (Dyna's planning steps: more policy updates per real env step)",
    )

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data: Any) -> Any:
        if isinstance(data, dict) and "min_accuracy" in data:
            raise ValueError("min_accuracy was replaced by gate (earned, open or closed) and "
                             "gate_rows: the world model now earns the gate against baselines")
        return data

    @model_validator(mode="after")
    def _gate_checks(self) -> ImaginationConfig:
        if self.gate == "earned" and self.horizon > 0 and self.gate_rows == 0:
            raise ValueError("gate earned needs gate_rows > 0 (the transitions it is checked on)")
        if len(set(self.gate_checks)) != len(self.gate_checks):
            raise ValueError(f"gate_checks names a check twice: {self.gate_checks}")
        return self


class TrainConfig(Section):
    iterations: int = Field(ge=1, description="sample + update rounds")
    checkpoint_every: int = Field(ge=1, description="iterations between checkpoints")
    keep_checkpoints: int = Field(ge=1, description="newest checkpoints kept")
    export_at_end: bool = Field(description="export an HF directory and log it to MLflow")
    ray_address: str | None = Field(description="null: start Ray here; auto or host:port: join")
    traces_every: int = Field(ge=1, description="iterations between logged reasoning traces")


class LearnerConfig(Section):
    zero_stage: int = Field(ge=0, le=3, description="DeepSpeed ZeRO stage: 0 off, 1-3 shard more")
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        description="training dtype of the model; bf16/fp16 keep fp32 master weights"
    )
    lr: float = Field(gt=0, description="peak AdamW learning rate, reached after warmup")
    weight_decay: float = Field(ge=0, description="AdamW decoupled weight decay, matrices only")
    # strict=False lets a YAML list become the tuple; the items stay strict floats.
    betas: tuple[StrictFloat, StrictFloat] = Field(
        strict=False, description="AdamW (beta1, beta2), each in [0, 1)"
    )
    lr_scales: dict[str, Annotated[float, Field(gt=0)]] = Field(
        default_factory=dict,
        description="learning-rate multiplier by parameter-name prefix, e.g. {value_head: 10}"
    )
    grad_accum_steps: int = Field(ge=1, description="micro-batches averaged per optimizer step")
    grad_clip: float = Field(ge=0, description="max global gradient L2 norm; 0 turns clipping off")
    warmup_steps: int = Field(ge=0, description="optimizer steps of linear LR warmup from lr/N")
    warmup_skip: list[str] = Field(
        default_factory=list,
        description="parameter-name prefixes that skip the warmup (fresh heads fit while the "
        "trunk warms up), e.g. [value_head]",
    )
    warmup_delay_steps: int = Field(
        default=0, ge=0,
        description="optimizer steps the groups outside warmup_skip wait at lr 0 before their "
        "warmup: the heads fit on a still trunk first (LP-FT)",
    )
    freeze: list[str] = Field(
        default_factory=list,
        description="parameter-name prefixes that do not train (no gradient, not in the "
        "optimiser), e.g. [model]: only the heads learn",
    )
    freeze_statistics: bool | None = Field(
        default=None,
        description="keep the heads' standardisation statistics as loaded (rl/heads.py): a "
        "trained policy reads its state through them, so refitting them on RL's states would "
        "change it with no gradient and no trust region; null: frozen when policy.init_from's "
        "are fitted, updated otherwise (from scratch they have to fit)",
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        description="auto: cuda if a GPU is visible, else cpu"
    )
    num_ranks: int = Field(
        default=1, ge=1, le=1024,
        description="DeepSpeed data-parallel ranks; 1: the learner in the driver process, "
        "more: one Ray actor per rank in a placement group (actors/learner.py)",
    )
    num_cpus_per_rank: float = Field(default=1.0, ge=0, description="Ray CPUs per learner rank")
    num_gpus_per_rank: float = Field(
        default=0.0, ge=0, description="Ray GPUs per learner rank (num_ranks > 1); 1 on a GPU node"
    )
    timeout_s: float = Field(
        default=900.0, gt=0,
        description="num_ranks > 1: seconds one collective, or one call of the driver to the "
        "ranks, may take before the run stops naming the rank that died or hung",
    )

    @field_validator("betas")
    @classmethod
    def _betas_in_range(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= beta < 1.0 for beta in value):
            raise ValueError(f"each beta must be in [0, 1), got {list(value)}")
        return value


class TrackingConfig(Section):
    tracking_uri: str | None = Field(
        description="MLflow tracking URI; null: $MLFLOW_TRACKING_URI, else <output_dir>/mlflow.db"
    )
    experiment: str = Field(min_length=1, max_length=500, description="MLflow experiment name")
    system_metrics: bool = Field(description="log CPU/GPU/memory/disk/network as system/* metrics")
    log_every: int = Field(ge=1, description="iterations between metric rows")
    image_every: int = Field(ge=1, description="iterations between real-vs-imagined images")


class PPOConfig(Section):
    gamma: float = Field(ge=0, le=1, description="discount")
    lam: float = Field(ge=0, le=1, description="GAE / lambda-return lambda")
    clip_eps: float = Field(gt=0, description="PPO ratio clip")
    value_clip: float | None = Field(gt=0, description="value clip around the old value, or null")
    epochs: int = Field(ge=1, le=100, description="passes over the batch per update")
    minibatch_size: int = Field(ge=1, description="rows per optimiser micro-step")
    reasoning_weight: float = Field(ge=0, description="weight of reasoning tokens (RL4VLM: 0.5)")
    reduction: Literal["sequence", "token"] = Field(description="where the PPO ratio is formed")
    kl_estimator: Literal["k1", "k2", "k3"] = Field(description="KL-to-reference estimator")
    normalize_advantages: bool = Field(description="standardise advantages over the batch")
    max_policy_lag: int = Field(
        ge=0, description="drop samples older than this many versions; also how many samples "
        "the runners have in flight while the learner updates (0: the two alternate)"
    )
    decoupled: bool = Field(
        default=False,
        description="decoupled PPO for stale rows: clip against the learner's weights at the "
        "update's start, weight by pi_prox / pi_behaviour (rl.losses.policy_loss)",
    )
    behaviour_cap: float = Field(
        default=2.0, gt=0, description="truncation of decoupled PPO's importance weight"
    )
    target_kl: float | None = Field(
        default=None, gt=0,
        description="stop the update before a step once a minibatch's approx KL to the "
        "behaviour policy exceeds 1.5x this (Spinning Up, SB3); null: run every epoch",
    )
    behaviour_kl_coeff: float = Field(
        default=0.0, ge=0,
        description="initial weight of a KL(behaviour || policy) penalty in the policy loss "
        "(RLlib PPO's kl_coeff, 0.2 there); 0: off",
    )
    behaviour_kl_target: float | None = Field(
        default=0.01, gt=0,
        description="after each update behaviour_kl_coeff x1.5 when its mean approx KL > 2x "
        "this, x0.5 when < 0.5x (RLlib's kl_target); null: the coefficient stays fixed",
    )
    freeze_actor_iterations: int = Field(
        default=0, ge=0,
        description="the updates of the first N iterations train the critic and world heads "
        "only (the policy, entropy and KL terms off: OpenRLHF's freezing_actor_steps), so a "
        "fresh value head fits before its advantages move an --init-from policy; 0: off",
    )
    sync_check_rows: int = Field(
        ge=0,
        description="rows per update whose act-time log-probs are recomputed with the learner's "
        "weights (sync/logp_abs_diff_*: actors on wrong weights show at once); 0 turns it off",
    )
    loss_scales: dict[str, float] = Field(description="weight of each loss term, by name")

    @field_validator("loss_scales")
    @classmethod
    def _known_losses(cls, value: dict[str, float]) -> dict[str, float]:
        from rl.losses import LOSS_NAMES

        if set(value) != set(LOSS_NAMES):
            missing, unknown = (
                sorted(set(LOSS_NAMES) - set(value)),
                sorted(set(value) - set(LOSS_NAMES)),
            )
            raise ValueError(
                f"must name exactly {list(LOSS_NAMES)}; missing {missing}, unknown {unknown}"
            )
        if any(not (v >= 0 and v != float("inf")) for v in value.values()):
            raise ValueError("every scale must be finite and >= 0")
        return value


class Config(Section):
    run: RunConfig
    env: EnvConfig
    policy: PolicyConfig
    rollout: RolloutConfig
    imagination: ImaginationConfig
    ppo: PPOConfig
    learner: LearnerConfig
    tracking: TrackingConfig
    train: TrainConfig


# -- loading --------------------------------------------------------------------------------------


def load_config(preset: str | Path | None = None, overrides: list[str] | tuple = ()) -> Config:
    """Defaults, then ``preset`` (a YAML path), then ``key=value`` overrides; validated."""
    tree: dict[str, Any] = {}
    sources: dict[tuple[str, ...], str] = {}
    _merge(tree, _read_yaml(DEFAULTS_FILE), _display(DEFAULTS_FILE), sources)
    if preset is not None:
        path = Path(preset)
        if not path.is_file():
            raise ConfigError(
                f"config file {str(path)!r} does not exist (presets live in {CONFIG_DIR})"
            )
        _merge(tree, _read_yaml(path), _display(path), sources)
    for item in overrides:
        key, value = _parse_override(item)
        _override(tree, key, value, sources)
    try:
        return Config.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_describe(err, sources)) from None


def save_config(config: Config, run_dir: Path) -> Path:
    """Write the resolved config to ``run_dir/config.yaml`` (loadable as a preset)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "config.yaml"
    path.write_text(dump_config(config))
    return path


def dump_config(config: Config) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = _yaml_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(
            f"{_display(path)}:{where} is not valid YAML ({getattr(err, 'problem', err)})"
        ) from None
    except OSError as err:
        raise ConfigError(f"cannot read config file {str(path)!r}: {err.strerror}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{_display(path)}: expected a mapping of sections, got {type(data).__name__}"
        )
    return data


def _parse_override(item: str) -> tuple[str, Any]:
    key, sep, raw = item.partition("=")
    if not sep or not re.fullmatch(r"[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*", key.strip()):
        raise ConfigError(
            f"override {item!r} is not of the form section.key=value (e.g. env.num_envs=8)"
        )
    try:
        value = _yaml_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw  # not YAML: keep it as the string the user typed
    return key.strip(), value


def _override(tree: dict, key: str, value: Any, sources: dict) -> None:
    """Apply one ``key=value`` override in place. The dotted path walks into sections and
    free-form mappings alike, so ``ppo.loss_scales.next_frame=0.0`` changes that one entry;
    the value then replaces what was at the end of the path (``env.kwargs={}`` clears it),
    except that a section given as a mapping (``env={size: 96}``) merges key by key."""
    *parents, leaf = key.split(".")
    node, path = tree, ()
    for part in parents:
        path = (*path, part)
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
        if _model_at(path) is None:  # a mapping the command line changed: errors name it
            sources[path] = COMMAND_LINE
        else:
            sources.setdefault(path, COMMAND_LINE)
    _merge(node, {leaf: value}, COMMAND_LINE, sources, path)


def _merge(tree: dict, layer: dict, source: str, sources: dict, prefix: tuple = ()) -> None:
    """Merge ``layer`` into ``tree`` in place, remembering which source set each key path.

    Sections merge key by key; a free-form mapping value (``env.kwargs``) is one value, so a
    later layer replaces it whole (``env.kwargs={}`` clears what a preset set)."""
    for key, value in layer.items():
        path = (*prefix, str(key))
        section = _model_at(path) is not None
        if section and isinstance(value, dict) and isinstance(tree.get(key), dict):
            sources.setdefault(path, source)
            _merge(tree[key], value, source, sources, path)
        else:
            tree[key] = value
            sources[path] = source
            _mark_children(value, source, sources, path)


def _mark_children(value: Any, source: str, sources: dict, path: tuple) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            sources[(*path, str(k))] = source
            _mark_children(v, source, sources, (*path, str(k)))


def _describe(err: ValidationError, sources: dict[tuple[str, ...], str]) -> str:
    """One line for the first validation error: source, key path, what was expected."""
    first = err.errors(include_url=False)[0]
    loc = tuple(str(p) for p in first["loc"])
    if first["type"] == "unknown_env_kwarg":  # point at the offending key inside env.kwargs
        loc = (*loc, str(first["ctx"]["key"]))
    source = _source_of(loc, sources)
    key = ".".join(loc) or "<top level>"
    kind = first["type"]
    if kind == "extra_forbidden":
        section_model = _model_at(loc[:-1])
        allowed = sorted(section_model.model_fields) if section_model else []
        guess = difflib.get_close_matches(loc[-1], allowed, n=1)
        hint = f"; did you mean {guess[0]!r}?" if guess else ""
        return f"{source}: unknown key {key!r} (allowed here: {', '.join(allowed)}){hint}"
    if kind == "missing":
        return f"{source}: {key}: required key is missing"
    msg = first["msg"].removeprefix("Value error, ")
    got = first.get("input")
    shown = "" if isinstance(got, dict | list) else f" (got {got!r})"
    return f"{source}: {key}: {msg}{shown}"


def _source_of(loc: tuple[str, ...], sources: dict) -> str:
    """Where the value at ``loc`` came from. A whole section (a check across its keys, such as
    ``rollout``'s) names the last layer that set any key in it: the command line over a preset
    file over configs/defaults.yaml, which sets every section first."""
    if loc and _model_at(loc) is not None:
        inside = {src for path, src in sources.items() if path[: len(loc)] == loc}
        inside.discard(_display(DEFAULTS_FILE))
        if inside:  # the command line, the preset file (one at most), or both
            return COMMAND_LINE if COMMAND_LINE in inside else inside.pop()
    for n in range(len(loc), 0, -1):
        if loc[:n] in sources:
            return sources[loc[:n]]
    return _display(DEFAULTS_FILE)


def _model_at(loc: tuple[str, ...]) -> type[BaseModel] | None:
    model: type[BaseModel] = Config
    for part in loc:
        field = model.model_fields.get(part)
        if field is None or not (
            isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)
        ):
            return None
        model = field.annotation
    return model


def _display(path: Path) -> str:
    """A path as the user would type it: relative to the working directory when inside it."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)
