"""The policy network (rl/model.py): presets, the tiny model's VQ grid, checkpoint round trips,
atomic saves and one clear CheckpointError per broken checkpoint. Component tier: tiny model,
seconds. The 1.3B preset is checked as a config and a meta-device build only (no weights)."""

from __future__ import annotations

import json
import shutil

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from rl.model import (  # noqa: E402
    RIG_FILE,
    CheckpointError,
    build_config,
    build_model,
    image_tokens_per_frame,
    load_preset,
    load_pretrained_dir,
    save_pretrained_dir,
)
from rl.tokenizer import IMAGE, build_tokenizer, segment_ids  # noqa: E402


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture(scope="module")
def tiny(tok):
    torch.manual_seed(0)
    return build_model(load_preset("tiny"), tok)


@pytest.fixture(scope="module")
def saved(tiny, tok, tmp_path_factory):
    """A saved tiny checkpoint; tests that break one copy it first."""
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    return save_pretrained_dir(tiny, tok, path, extra={"global_step": 7})


@pytest.fixture
def copy(saved, tmp_path):
    target = tmp_path / "copy"
    shutil.copytree(saved, target)
    return target


def _inputs(tok, n_image: int):
    """One sequence with an observed frame: <bos> <observation> <image> x n <end> <action> ..."""
    ids = segment_ids(tok)
    text = tok("move_left", add_special_tokens=False)["input_ids"]
    seq = [ids.bos, ids.observation, *[ids.image] * n_image, ids.end, ids.action, *text, ids.end]
    g = torch.Generator().manual_seed(1)
    pixels = torch.rand(1, 3, 64, 64, generator=g) * 2 - 1
    return torch.tensor([seq]), pixels


def _logits(model, tok):
    input_ids, pixels = _inputs(tok, image_tokens_per_frame(model))
    with torch.no_grad():
        return model(input_ids=input_ids, pixel_values=pixels).logits


# -- presets and the tiny model ------------------------------------------------------------------


def test_unknown_preset_lists_available():
    with pytest.raises(ValueError, match=r"unknown policy preset 'huge'.*janus-1\.3b.*small.*tiny"):
        load_preset("huge")


def test_preset_rejects_unknown_keys(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("image_size: 64\ntext: {}\nvision: {}\nvq: {}\nlayers: 3\n")
    with pytest.raises(ValueError, match=r"unknown keys \['layers'\] in policy preset .*bad\.yaml"):
        load_preset(bad)


def test_preset_with_mismatched_grids_is_refused(tok):
    preset = load_preset("tiny")
    preset["vq"]["channel_multiplier"] = [1, 2, 2, 4]  # 8x8 VQ grid vs 4x4 SigLIP patches
    with pytest.raises(ValueError, match=r"SigLIP grid is 4x4 .* VQ grid is 8x8"):
        build_config(preset, tok)


def test_tiny_builds_with_a_few_million_params(tiny, tok):
    n = sum(p.numel() for p in tiny.parameters())
    print(f"tiny preset: {n:,} parameters")
    assert 2_000_000 < n < 8_000_000
    assert tiny.config.text_config.vocab_size == len(tok)
    assert tiny.get_input_embeddings().weight.shape == (len(tok), 256)
    assert tiny.config.image_token_id == tok.convert_tokens_to_ids(IMAGE)
    assert image_tokens_per_frame(tiny) == 16


def test_tiny_vq_encodes_a_frame_to_4x4_and_decodes_back(tiny):
    frame = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        out = tiny.model.vqmodel.encode(frame)
        codes = out.image_tokens.view(2, -1)
        assert out.quantized_last_hidden_state.shape[-2:] == (4, 4)
        assert codes.shape == (2, 16) and int(codes.max()) < 512
        pixels = tiny.model.vqmodel.decode(codes)
    assert pixels.shape == (2, 3, 64, 64)


def test_small_preset_config(tok):
    preset = load_preset("small")
    config = build_config(preset, tok)
    assert config.vision_config.image_size == 64 and config.vision_config.patch_size == 8
    assert config.vq_config.num_patches == 8  # 64 tokens per frame
    with torch.device("meta"):  # no memory, no init: just the parameter count
        model = transformers.JanusForConditionalGeneration(config)
    n = sum(p.numel() for p in model.parameters())
    print(f"small preset: {n:,} parameters")
    assert 10_000_000 < n < 100_000_000


def test_tiny_vq16_preset_has_a_16x16_grid_for_both_encoders(tok):
    """The preset `rig tokenizer train` reaches 30 dB with: 256 codes of 1024 per frame."""
    config = build_config(load_preset("tiny-vq16"), tok)
    assert config.vision_config.patch_size == 4 and config.vq_config.num_patches == 16
    model = transformers.JanusForConditionalGeneration(config)
    assert image_tokens_per_frame(model) == 256
    with torch.no_grad():
        out = model.model.vqmodel.encode(torch.rand(1, 3, 64, 64) * 2 - 1)
    assert out.quantized_last_hidden_state.shape[-2:] == (16, 16)
    assert int(out.image_tokens.max()) < 1024


def test_janus_1_3b_preset_matches_the_published_architecture(tok):
    config = build_config(load_preset("janus-1.3b"), tok)
    text, vision, vq = config.text_config, config.vision_config, config.vq_config
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads) == (2048, 24, 16)
    assert text.intermediate_size == 5632 and text.max_position_embeddings == 4096
    assert text.vocab_size == 102400 >= len(tok)
    assert (vision.hidden_size, vision.num_hidden_layers, vision.image_size, vision.patch_size) == (
        1024, 24, 384, 16,
    )  # fmt: skip
    assert vq.num_embeddings == 16384 and vq.embed_dim == 8
    assert vq.num_patches**2 == 576
    with torch.device("meta"):  # parameters without storage: the weights are never allocated
        model = transformers.JanusForConditionalGeneration(config)
    n = sum(p.numel() for p in model.parameters())
    print(f"janus-1.3b preset: {n:,} parameters")
    assert 2.0e9 < n < 2.2e9  # Janus-1.3B's checkpoint holds about 2.09B parameters


# -- save and load -------------------------------------------------------------------------------


def test_round_trip_gives_identical_logits(tiny, tok, saved):
    assert sorted(p.name for p in saved.iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors", RIG_FILE,
        "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json",
    ]  # fmt: skip
    model, tok2, rig = load_pretrained_dir(saved)
    assert not model.training
    assert rig["format_version"] == 1 and rig["preset"] == "tiny" and rig["image_size"] == 64
    assert rig["image_tokens_per_frame"] == 16 and rig["extra"] == {"global_step": 7}
    assert tok2.get_vocab() == tok.get_vocab()
    tiny.eval()
    before, after = _logits(tiny, tok), _logits(model, tok2)
    assert before.dtype == after.dtype == torch.float32
    assert torch.equal(before, after)


def test_plain_transformers_loads_our_directory(tiny, saved):
    model = transformers.JanusForConditionalGeneration.from_pretrained(saved, local_files_only=True)
    for name, param in tiny.state_dict().items():
        assert torch.equal(model.state_dict()[name], param), name


@pytest.mark.parametrize(
    "breakage, message",
    [
        ("no_dir", r"checkpoint directory .*nowhere does not exist"),
        ("a_file", r"checkpoint path .*a_file is not a directory"),
        ("no_config", r"lacks config\.json"),
        ("no_weights", r"lacks model\.safetensors \(or model\.safetensors\.index\.json\)"),
        ("truncated", r"corrupted weights file .*model\.safetensors"),
        ("garbage", r"corrupted weights file .*model\.safetensors"),
        ("no_tokenizer", r"lacks tokenizer files \['tokenizer\.json'\]"),
        ("big_tokenizer", r"the tokenizer has \d+ tokens but the model's embeddings have \d+ rows"),
    ],
)
def test_broken_checkpoints_give_one_clear_error(copy, tmp_path, tok, breakage, message):
    path = copy
    weights = copy / "model.safetensors"
    if breakage == "no_dir":
        path = tmp_path / "nowhere"
    elif breakage == "a_file":
        path = tmp_path / "a_file"
        path.write_text("not a checkpoint")
    elif breakage == "no_config":
        (copy / "config.json").unlink()
    elif breakage == "no_weights":
        weights.unlink()
    elif breakage == "truncated":
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) // 2])
    elif breakage == "garbage":
        weights.write_bytes(b"\x07garbage" * 1000)
    elif breakage == "no_tokenizer":
        (copy / "tokenizer.json").unlink()
    elif breakage == "big_tokenizer":
        from rl.tokenizer import load_tokenizer, save_tokenizer

        grown = load_tokenizer(copy)
        grown.add_tokens([f"<extra{i}>" for i in range(5)])
        save_tokenizer(grown, copy)
    with pytest.raises(CheckpointError, match=message) as err:
        load_pretrained_dir(path)
    assert "\n" not in str(err.value)


def test_another_architecture_is_named(tmp_path):
    config = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, vocab_size=300,
    )  # fmt: skip
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "llama")
    with pytest.raises(
        CheckpointError, match=r"is a 'llama' model \(LlamaForCausalLM\), not a Janus"
    ):
        load_pretrained_dir(tmp_path / "llama")


def test_plain_janus_checkpoint_loads_with_segment_tokens_added(tok, tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    # A "foreign" tokenizer: a byte-level BPE with none of our markers, no pad/bos/eos.
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    bpe.train_from_iterator(["a tree to the left", "collect wood"] * 10, trainer=trainer)
    foreign = PreTrainedTokenizerFast(tokenizer_object=bpe)
    n_foreign = len(foreign)

    config = build_config(load_preset("tiny"), tok)
    config.text_config.vocab_size = n_foreign
    config.image_token_id = 0
    torch.manual_seed(0)
    plain = transformers.JanusForConditionalGeneration(config)
    path = tmp_path / "janus"
    plain.save_pretrained(path, safe_serialization=True)
    foreign.save_pretrained(path)
    assert not (path / RIG_FILE).exists()

    model, tok2, rig = load_pretrained_dir(path)
    assert rig["preset"] is None and rig["source"] == "supervised" and rig["image_size"] == 64
    ids = segment_ids(tok2)  # raises if a marker is missing
    assert len(tok2) == n_foreign + 11
    assert model.get_input_embeddings().weight.shape[0] == len(tok2)
    assert model.lm_head.weight.shape[0] == len(tok2)
    assert model.config.image_token_id == ids.image
    # the old rows are the checkpoint's own
    assert torch.equal(
        model.get_input_embeddings().weight[:n_foreign], plain.get_input_embeddings().weight
    )
    assert _logits(model, tok2).shape[-1] == len(tok2)


# -- atomic save ---------------------------------------------------------------------------------


def _snapshot(path):
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def test_existing_directory_needs_overwrite(tiny, tok, copy):
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_pretrained_dir(tiny, tok, copy)
    save_pretrained_dir(tiny, tok, copy, extra={"global_step": 8}, overwrite=True)
    assert json.loads((copy / RIG_FILE).read_text())["extra"] == {"global_step": 8}
    assert [p.name for p in copy.parent.iterdir()] == ["copy"]  # no temp or old dir left


def test_crash_mid_save_leaves_the_previous_checkpoint_intact(tiny, tok, copy, monkeypatch):
    before = _snapshot(copy)

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise RuntimeError("disk full")

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        save_pretrained_dir(tiny, tok, copy, extra={"global_step": 9}, overwrite=True)
    assert _snapshot(copy) == before
    assert [p.name for p in copy.parent.iterdir()] == ["copy"]
    load_pretrained_dir(copy)  # still a good checkpoint
