"""The policy network: a Janus model (``JanusForConditionalGeneration``) built from a size preset,
and its checkpoint directory.

RIG's policy is Janus-1.3B: a Llama-style LM that reads SigLIP patch features of the observed
frame and writes reasoning, the action and the imagined next frame as VQ codes. One
transformers class covers every size here; a preset (``configs/policy/*.yaml``) only changes
numbers. A preset file::

    image_size: 64              # frames the policy sees are (3, image_size, image_size)
    tie_word_embeddings: true   # lm_head shares the input embedding matrix
    text:   {...}               # LlamaConfig kwargs; vocab_size defaults to len(tokenizer)
    vision: {...}               # JanusVisionConfig kwargs (image_size comes from the top level)
    vq:     {...}               # JanusVQVAEConfig kwargs

The two image paths must agree on one grid, because an imagined frame (VQ codes) and an observed
frame (SigLIP patches) take the same number of ``<image>`` positions::

    SigLIP:  image_size / patch_size                 = G  per side
    VQ:      image_size / 2**(len(channel_multiplier) - 1) = G  per side  ->  G*G tokens per frame

A checkpoint directory is an ordinary HF directory (``config.json``, ``model.safetensors``,
tokenizer files) plus ``rig_policy.json``, our own record (format version, preset, image size,
whatever the caller adds). ``JanusForConditionalGeneration.from_pretrained`` loads it as is.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rl.tokenizer import ensure_segment_tokens, load_tokenizer, save_tokenizer, segment_ids

if TYPE_CHECKING:  # transformers costs seconds to import
    from transformers import JanusConfig, JanusForConditionalGeneration, PreTrainedTokenizerBase

PRESET_DIR = Path(__file__).resolve().parent.parent / "configs" / "policy"
"""Where ``load_preset("tiny")`` looks: ``configs/policy/tiny.yaml``."""

RIG_FILE = "rig_policy.json"
FORMAT_VERSION = 1
"""Version of ``rig_policy.json``; bump when its meaning changes."""

_PRESET_KEYS = {"image_size", "tie_word_embeddings", "text", "vision", "vq"}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


class CheckpointError(ValueError):
    """A policy checkpoint directory that cannot be loaded; the message says why in one line."""


# -- presets -------------------------------------------------------------------------------------


def available_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def load_preset(name_or_path: str | os.PathLike) -> dict[str, Any]:
    """A preset as a dict, by name (``tiny`` -> ``configs/policy/tiny.yaml``) or by path to a
    YAML file. Adds ``name`` (the file's stem). ValueError for an unknown name (listing the
    available ones) and for keys outside ``image_size, tie_word_embeddings, text, vision, vq``."""
    import yaml

    text = str(name_or_path)
    path = Path(text)
    if not (path.suffix in (".yaml", ".yml") or os.sep in text):
        path = PRESET_DIR / f"{text}.yaml"
        if not path.is_file():
            raise ValueError(f"unknown policy preset {text!r}; available: {available_presets()}")
    elif not path.is_file():
        raise ValueError(f"policy preset file {path} does not exist")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"policy preset {path} must be a mapping, got {type(data).__name__}")
    unknown = sorted(set(data) - _PRESET_KEYS)
    if unknown:
        raise ValueError(
            f"unknown keys {unknown} in policy preset {path}; allowed: {sorted(_PRESET_KEYS)}"
        )
    missing = sorted({"image_size", "text", "vision", "vq"} - set(data))
    if missing:
        raise ValueError(f"policy preset {path} lacks {missing}")
    return {"name": path.stem, **data}


# -- build ---------------------------------------------------------------------------------------


def vq_grid(image_size: int, channel_multiplier: list[int] | tuple[int, ...]) -> int:
    """Side of the VQ token grid: the encoder halves the resolution between channel levels."""
    factor = 2 ** (len(channel_multiplier) - 1)
    if image_size % factor:
        raise ValueError(
            f"image_size {image_size} is not divisible by the VQ downsampling {factor}"
        )
    return image_size // factor


def build_config(preset: dict[str, Any], tokenizer: PreTrainedTokenizerBase) -> JanusConfig:
    """The ``JanusConfig`` of ``preset`` for ``tokenizer`` (no weights: cheap even for 1.3B).

    The text vocabulary is ``len(tokenizer)`` unless the preset fixes a larger one (the real
    checkpoint's 102400); ``image_token_id`` is the tokenizer's ``<image>`` id. ValueError when
    the SigLIP patch grid and the VQ grid differ, or the preset's vocabulary is too small.
    """
    from transformers import JanusConfig

    name = preset.get("name", "<preset>")
    size = int(preset["image_size"])
    text = dict(preset["text"])
    vision = dict(preset["vision"])
    vq = dict(preset["vq"])
    ids = segment_ids(tokenizer)

    vocab = text.setdefault("vocab_size", len(tokenizer))
    if vocab < len(tokenizer):
        raise ValueError(
            f"preset {name}: text.vocab_size {vocab} < len(tokenizer) {len(tokenizer)}"
        )
    text.update(pad_token_id=ids.pad, bos_token_id=ids.bos, eos_token_id=ids.eos)

    if vision.setdefault("image_size", size) != size:
        raise ValueError(
            f"preset {name}: vision.image_size {vision['image_size']} != image_size {size}"
        )
    patch = int(vision.get("patch_size", 16))
    if size % patch:
        raise ValueError(f"preset {name}: image_size {size} is not divisible by patch_size {patch}")
    grid = size // patch
    vq_side = vq_grid(size, vq.get("channel_multiplier", (1, 1, 2, 2, 4)))
    if vq_side != grid:
        raise ValueError(
            f"preset {name}: the SigLIP grid is {grid}x{grid} (image {size} / patch {patch}) but "
            f"the VQ grid is {vq_side}x{vq_side}; make 2**(len(channel_multiplier)-1) == patch_size"
        )
    vision["num_image_tokens"] = grid * grid
    for section, key in (("vision", "projection_dim"), ("vq", "projection_dim"),
                         ("vq", "image_token_embed_dim")):  # fmt: skip
        value = {"vision": vision, "vq": vq}[section].get(key)
        if value is not None and value != text["hidden_size"]:
            raise ValueError(
                f"preset {name}: {section}.{key} {value} != text.hidden_size {text['hidden_size']}"
            )
    vision.setdefault("projection_dim", text["hidden_size"])
    vq.setdefault("projection_dim", text["hidden_size"])
    vq.setdefault("image_token_embed_dim", text["hidden_size"])

    # JanusConfig sets vq_config.num_patches = image_size // patch_size itself.
    return JanusConfig(
        text_config=text,
        vision_config=vision,
        vq_config=vq,
        image_token_id=ids.image,
        tie_word_embeddings=bool(preset.get("tie_word_embeddings", True)),
    )


def image_tokens_per_frame(model: JanusForConditionalGeneration) -> int:
    """``<image>`` positions one frame takes (observed or imagined): the VQ grid's area."""
    side = model.config.vq_config.num_patches
    return side * side


def build_model(
    preset: dict[str, Any], tokenizer: PreTrainedTokenizerBase
) -> JanusForConditionalGeneration:
    """A randomly initialised policy of ``preset`` (seed with ``torch.manual_seed`` first).

    Encodes one dummy frame through the VQ to check that it really yields
    :func:`image_tokens_per_frame` codes (the decoder relies on that grid).
    """
    import torch
    from transformers import JanusForConditionalGeneration

    config = build_config(preset, tokenizer)
    model = JanusForConditionalGeneration(config)
    model.eval()
    size = config.vision_config.image_size
    with torch.no_grad():
        codes = model.model.vqmodel.encode(torch.zeros(1, 3, size, size)).image_tokens
    if codes.numel() != image_tokens_per_frame(model):
        raise ValueError(
            f"preset {preset.get('name')}: the VQ encodes a {size}px frame into {codes.numel()} "
            f"codes, expected {image_tokens_per_frame(model)}"
        )
    model.rig_preset = preset.get("name")  # what save_pretrained_dir records
    return model


# -- save ----------------------------------------------------------------------------------------


def save_pretrained_dir(
    model: JanusForConditionalGeneration,
    tokenizer: PreTrainedTokenizerBase,
    path: str | os.PathLike,
    extra: dict[str, Any] | None = None,
    *,
    preset: str | None = None,
    overwrite: bool = False,
    extra_files: dict[str, Callable[[Path], None]] | None = None,
) -> Path:
    """Write a checkpoint directory atomically: weights (safetensors), ``config.json``, the
    tokenizer and ``rig_policy.json`` (``format_version``, ``preset``, ``image_size``,
    ``image_tokens_per_frame`` and ``extra``). ``extra_files`` maps a file name to a function
    that writes it (given its path), for what the policy keeps beside the Janus weights.

    Everything is written into a temporary sibling ``.NAME.tmp-*`` which is renamed to ``path``
    only when complete; a crash leaves ``path`` as it was and the temporary removed. An existing
    ``path`` is an error unless ``overwrite``: then it is moved aside, the new one renamed in,
    and the old one deleted (a crash between the two renames leaves ``.NAME.old-*`` beside it).
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(
            f"checkpoint directory {path} exists; pass overwrite=True to replace it"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    tmp = path.parent / f".{path.name}.tmp-{tag}"
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a "Writing model shards" bar per checkpoint is noise
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        save_tokenizer(tokenizer, tmp)
        record = {
            "format_version": FORMAT_VERSION,
            "preset": preset if preset is not None else getattr(model, "rig_preset", None),
            "image_size": model.config.vision_config.image_size,
            "image_tokens_per_frame": image_tokens_per_frame(model),
            "extra": dict(extra or {}),
        }
        (tmp / RIG_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
        for name, write in (extra_files or {}).items():
            write(tmp / name)
        if path.exists():
            old = path.parent / f".{path.name}.old-{tag}"
            path.rename(old)
            tmp.rename(path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


# -- load ----------------------------------------------------------------------------------------


def _check_weights(path: Path) -> None:
    """CheckpointError unless ``path`` holds readable safetensors weights (single or sharded)."""
    from safetensors import safe_open

    single, index = path / "model.safetensors", path / "model.safetensors.index.json"
    if single.is_file():
        files = [single]
    elif index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError) as err:
            raise CheckpointError(f"corrupted weight index {index}: {err}") from None
        files = [path / s for s in shards]
        absent = [f.name for f in files if not f.is_file()]
        if absent:
            raise CheckpointError(
                f"checkpoint {path} lacks weight shards {absent} listed in {index.name}"
            )
    else:
        other = [p.name for p in path.glob("*.bin")]
        hint = f" (found {other}: only safetensors weights are supported)" if other else ""
        raise CheckpointError(
            f"checkpoint {path} lacks model.safetensors (or model.safetensors.index.json){hint}"
        )
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                    f.get_slice(key)
        except Exception as err:  # safetensors raises its own SafetensorError and OSError
            raise CheckpointError(f"corrupted weights file {file}: {err}") from None


def _rig_record(path: Path, config: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """``rig_policy.json``, or defaults for a plain (supervised) Janus checkpoint; and whether
    the file was there."""
    file = path / RIG_FILE
    if not file.is_file():
        size = config.get("vision_config", {}).get("image_size", 384)
        return {
            "format_version": FORMAT_VERSION, "preset": None, "image_size": size,
            "source": "supervised", "extra": {},
        }, False  # fmt: skip
    try:
        record = json.loads(file.read_text())
    except ValueError as err:
        raise CheckpointError(f"corrupted {file}: {err}") from None
    version = record.get("format_version") if isinstance(record, dict) else None
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{file} has format_version {version!r}; this code reads {FORMAT_VERSION}"
        )
    return record, True


def check_pretrained_dir(path: str | os.PathLike) -> tuple[dict[str, Any], bool]:
    """The cheap checks of :func:`load_pretrained_dir`, without building the model: the
    directory, ``config.json`` (a Janus one), readable safetensors weights, the tokenizer files
    and ``rig_policy.json``. Returns ``(rig_record, is_rig_checkpoint)``; CheckpointError else."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint directory {path} does not exist")
    if not path.is_dir():
        raise CheckpointError(f"checkpoint path {path} is not a directory")

    config_file = path / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"checkpoint {path} lacks config.json")
    try:
        config = json.loads(config_file.read_text())
    except ValueError as err:
        raise CheckpointError(f"corrupted {config_file}: {err}") from None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type != "janus":
        arch = (config.get("architectures") or ["?"])[0] if isinstance(config, dict) else "?"
        raise CheckpointError(
            f"checkpoint {path} is a {model_type!r} model ({arch}), not a Janus policy (model_type 'janus')"
        )
    _check_weights(path)
    absent = [f for f in _TOKENIZER_FILES if not (path / f).is_file()]
    if absent:
        raise CheckpointError(f"checkpoint {path} lacks tokenizer files {absent}")
    return _rig_record(path, config)


def load_pretrained_dir(
    path: str | os.PathLike,
) -> tuple[JanusForConditionalGeneration, PreTrainedTokenizerBase, dict[str, Any]]:
    """Load a checkpoint directory offline: ``(model, tokenizer, rig_config)``, model in eval mode.

    A plain Janus checkpoint (no ``rig_policy.json``) loads as a supervised RIG checkpoint: the
    segment tokens it lacks are added and the embeddings grown to ``len(tokenizer)`` when needed;
    ``image_token_id`` becomes our ``<image>`` marker. Every failure is a CheckpointError with
    one line naming the directory or file.
    """
    path = Path(path)
    record, is_rig = check_pretrained_dir(path)

    try:
        tokenizer = load_tokenizer(path, require_segments=is_rig)
    except ValueError as err:
        raise CheckpointError(f"tokenizer in {path}: {err}".splitlines()[0]) from None

    from transformers import JanusForConditionalGeneration

    try:
        model, info = JanusForConditionalGeneration.from_pretrained(
            path, local_files_only=True, output_loading_info=True
        )
    except Exception as err:  # shape mismatches, bad config values
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"cannot load the weights in {path}: {first}") from None
    if info.get("missing_keys"):
        missing = sorted(info["missing_keys"])
        raise CheckpointError(
            f"weights in {path} do not match config.json: {len(missing)} tensors missing, "
            f"e.g. {missing[0]}"
        )

    if not is_rig:
        ensure_segment_tokens(tokenizer)
        rows = model.get_input_embeddings().weight.shape[0]
        if len(tokenizer) > rows:
            model.resize_token_embeddings(len(tokenizer))
        model.config.image_token_id = segment_ids(tokenizer).image
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows:
        raise CheckpointError(
            f"checkpoint {path}: the tokenizer has {len(tokenizer)} tokens but the model's "
            f"embeddings have {rows} rows"
        )
    record.setdefault("image_tokens_per_frame", image_tokens_per_frame(model))
    model.rig_preset = record.get("preset")
    model.eval()
    return model, tokenizer, record


__all__ = [
    "FORMAT_VERSION", "PRESET_DIR", "RIG_FILE", "CheckpointError", "available_presets",
    "check_pretrained_dir",
    "build_config", "build_model", "image_tokens_per_frame", "load_preset", "load_pretrained_dir",
    "save_pretrained_dir", "vq_grid",
]  # fmt: skip
