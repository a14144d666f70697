"""Component tests of learner.engine: DeepSpeed (ZeRO 0-3 on CPU, gloo) against plain torch.

One process group serves every engine in this process (the engine reuses it), so the tests
also show that several engines can live side by side. The model is a 2-layer MLP on a fixed
batch; every number is compared with PlainTorchEngine or with an AdamW loop written out here.
"""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from learner.engine import (
    FULL_STATE,
    GRAD_NORM,
    LR,
    OPTIMIZER_STEP,
    DeepSpeedEngine,
    LearnerConfig,
    PlainTorchEngine,
)

# ZeRO's optimizer check imports DeepSpeed's Muon, whose torch.compile pulls in torch modules
# that use the deprecated torch.jit.script_method: torch's own noise, once per process.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated")

CPU = dict(
    zero_stage=0,
    precision="fp32",
    lr=1e-2,
    weight_decay=0.1,
    betas=(0.9, 0.95),
    grad_accum_steps=1,
    grad_clip=0.0,
    warmup_steps=0,
    device="cpu",
)
ATOL = 1e-6


def config(**changes) -> LearnerConfig:
    return LearnerConfig(**{**CPU, **changes})


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))


def batches(n: int, rows: int = 6) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``n`` fixed (x (rows, 8), y (rows, 4)) regression batches."""
    gen = torch.Generator().manual_seed(1)
    return [
        (torch.randn(rows, 8, generator=gen), torch.randn(rows, 4, generator=gen)) for _ in range(n)
    ]


def mse(engine, batch) -> torch.Tensor:
    x, y = batch
    return ((engine(x) - y) ** 2).mean()


def make(kind, model: nn.Module, cfg: LearnerConfig):
    """``kind`` is "plain" or a ZeRO stage (int)."""
    if kind == "plain":
        return PlainTorchEngine(model, cfg)
    return DeepSpeedEngine(model, cfg.model_copy(update={"zero_stage": kind}))


def params(engine) -> dict[str, torch.Tensor]:
    return engine.published_state_dict()


def assert_same(a: dict, b: dict, atol: float = ATOL) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=atol, rtol=0, msg=key)


# -- the update -----------------------------------------------------------------------------------


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_updates_match_plain_torch(stage):
    """Three updates (warmup, weight decay, Adam state all in play) give the same losses,
    gradient norms, learning rates and parameters as PlainTorchEngine."""
    cfg = config(warmup_steps=2)
    ds, ref = make(stage, mlp(), cfg), PlainTorchEngine(mlp(), cfg)
    for batch in batches(3):
        loss_ds, loss_ref = mse(ds, batch), mse(ref, batch)
        assert loss_ds.item() == pytest.approx(loss_ref.item(), abs=ATOL)
        got, want = ds.backward_step(loss_ds), ref.backward_step(loss_ref)
        assert got[OPTIMIZER_STEP] and want[OPTIMIZER_STEP]
        assert got[GRAD_NORM] == pytest.approx(want[GRAD_NORM], rel=1e-5)
        assert got[LR] == pytest.approx(want[LR])
    assert [ref.lr, ds.lr] == pytest.approx([1e-2, 1e-2])  # warmup over: 5e-3, 1e-2, 1e-2
    assert_same(params(ds), params(ref))
    assert ds.global_steps == ref.global_steps == 3
    with pytest.raises(AssertionError):  # the parameters did move
        assert_same(params(ds), mlp().state_dict())


@pytest.mark.parametrize("stage", [0, 2])
def test_gradient_accumulation_is_one_step_on_the_concatenated_batch(stage):
    """3 micro-batches of 2 rows with grad_accum_steps=3 == one step on the 6 rows (mean loss)."""
    (x, y), (x2, y2) = batches(2)
    micro = make(stage, mlp(), config(grad_accum_steps=3))
    whole = PlainTorchEngine(mlp(), config())
    for _ in range(2):  # two full cycles, so Adam's second moment is exercised too
        stats = [micro.backward_step(mse(micro, (x[i : i + 2], y[i : i + 2]))) for i in (0, 2, 4)]
        want = whole.backward_step(mse(whole, (x, y)))
        assert [s[OPTIMIZER_STEP] for s in stats] == [False, False, True]
        assert [s[GRAD_NORM] for s in stats[:2]] == [None, None]
        assert stats[2][GRAD_NORM] == pytest.approx(want[GRAD_NORM], rel=1e-5)
        x, y = x2, y2
    assert micro.global_steps == 2
    assert_same(params(micro), params(whole))


# -- clipping -------------------------------------------------------------------------------------


def clipped_adamw_reference(model: nn.Module, data, cfg: LearnerConfig) -> tuple[list, dict]:
    """The obvious loop: autograd, total norm, scale grads by min(1, clip/norm), AdamW step."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    rest = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0}],
        lr=cfg.lr,
        betas=cfg.betas,
    )
    norms = []
    for x, y in data:
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        norm = torch.sqrt(sum((p.grad**2).sum() for p in model.parameters())).item()
        for p in model.parameters():
            p.grad *= min(1.0, cfg.grad_clip / (norm + 1e-6))
        opt.step()
        norms.append(norm)
    return norms, model.state_dict()


@pytest.mark.parametrize("kind", ["plain", 0, 2])
def test_grad_clipping_scales_the_gradient_to_the_limit(kind):
    # Adam's update ignores a constant gradient scale, so the two batches are chosen with
    # different norms (the second scaled by 10): clipped and unclipped runs then part ways.
    (x1, y1), (x2, y2) = batches(2)
    data = [(x1, y1), (x2, y2 * 10)]
    cfg = config(grad_clip=0.5)
    norms, want = clipped_adamw_reference(mlp(), data, cfg)
    assert min(norms) > cfg.grad_clip  # clipping engages on both steps
    engine = make(kind, mlp(), cfg)
    reported = [engine.backward_step(mse(engine, batch))[GRAD_NORM] for batch in data]
    assert reported == pytest.approx(norms, rel=1e-5)  # the norm before clipping
    assert_same(params(engine), want, atol=1e-5)
    _, unclipped = clipped_adamw_reference(mlp(), data, config(grad_clip=1e9))
    with pytest.raises(AssertionError):
        assert_same(params(engine), unclipped, atol=1e-5)


# -- checkpoints ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["plain", 0, 2, 3])
def test_checkpoint_round_trip_continues_like_an_uninterrupted_run(kind, tmp_path):
    cfg = config(warmup_steps=4)  # the schedule is mid-warmup at the save
    data = batches(3)
    run = make(kind, mlp(), cfg)
    for batch in data[:2]:
        run.backward_step(mse(run, batch))
    run.save_checkpoint(tmp_path, "step2", {"iteration": 2, "episodes": 17})
    run.backward_step(mse(run, data[2]))

    resumed = make(kind, mlp(seed=5), cfg)  # different weights: the load must overwrite them
    assert resumed.load_checkpoint(tmp_path, "step2") == {"iteration": 2, "episodes": 17}
    assert resumed.global_steps == 2
    assert resumed.lr == pytest.approx(cfg.lr * 3 / 4)
    resumed.backward_step(mse(resumed, data[2]))  # identical only if Adam's moments came back
    assert_same(params(resumed), params(run), atol=0)
    assert resumed.lr == run.lr


@pytest.mark.parametrize("saved, loaded", [(0, 2), (2, 0), (1, 3), (3, 1), (2, 2)])
def test_the_full_state_continues_like_an_uninterrupted_run_on_another_layout(saved, loaded, tmp_path):
    """The rank-independent state (FULL_STATE: what a resume on another number of learner ranks
    loads) carries the fp32 weights, Adam's moments and step, and the schedule whole: loaded
    into an engine of another ZeRO stage it makes the same next step, to the bit."""
    cfg = config(warmup_steps=4)
    data = batches(3)
    run = make(saved, mlp(), cfg)
    for batch in data[:2]:
        run.backward_step(mse(run, batch))
    run.save_checkpoint(tmp_path, "step2", {"iteration": 2})
    run.backward_step(mse(run, data[2]))

    resumed = make(loaded, mlp(seed=5), cfg)
    state = torch.load(tmp_path / "step2" / FULL_STATE, weights_only=True)
    assert state["client_state"] == {"iteration": 2} and state["world_size"] == 1
    resumed.load_full_state(state)
    assert resumed.global_steps == 2 and resumed.lr == pytest.approx(cfg.lr * 3 / 4)
    resumed.backward_step(mse(resumed, data[2]))
    assert_same(params(resumed), params(run), atol=0)


def test_loading_a_missing_checkpoint_names_the_path(tmp_path):
    engine = make(0, mlp(), config())
    with pytest.raises(FileNotFoundError, match="nope"):
        engine.load_checkpoint(tmp_path, "nope")


# -- frozen parameters and weight publishing ------------------------------------------------------


@pytest.mark.parametrize("kind", ["plain", 0, 1, 2, 3])
def test_frozen_parameters_are_not_updated(kind):
    model = mlp()
    model[0].requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    engine = make(kind, model, config())
    engine.backward_step(mse(engine, batches(1)[0]))
    after = params(engine)
    for key in ("0.weight", "0.bias"):
        torch.testing.assert_close(after[key], before[key], atol=0, rtol=0)
    assert not torch.allclose(after["2.weight"], before["2.weight"])
    assert engine.num_trainable == 16 * 4 + 4


@pytest.mark.parametrize("kind", ["plain", 0, 3])
def test_published_state_dict_loads_into_a_plain_copy(kind):
    engine = make(kind, mlp(), config())
    (x, y), (x2, _) = batches(2)
    engine.backward_step(mse(engine, (x, y)))
    copy = mlp(seed=7)
    copy.load_state_dict(engine.published_state_dict())  # strict: every key, no extras
    engine.eval()
    with torch.no_grad():
        torch.testing.assert_close(copy(x2), engine(x2), atol=0, rtol=0)
    assert all(v.device.type == "cpu" for v in engine.published_state_dict().values())


# -- configuration --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"zero_stage": 4}, "zero_stage"),
        ({"precision": "fp8"}, "precision"),
        ({"lr": 0.0}, "lr"),
        ({"betas": (0.9, 1.0)}, "betas"),
        ({"grad_accum_steps": 0}, "grad_accum_steps"),
        ({"grad_clip": -1.0}, "grad_clip"),
        ({"typo": 1}, "typo"),
    ],
)
def test_bad_config_is_rejected_naming_the_field(change, field):
    with pytest.raises(ValidationError, match=field):
        config(**change)


def test_config_reads_yaml_lists_for_betas():
    assert LearnerConfig.model_validate({**CPU, "betas": [0.9, 0.99]}).betas == (0.9, 0.99)


# -- mixed precision ------------------------------------------------------------------------------


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_bf16_zero2_follows_fp32_plain_torch(device):
    """bf16 under ZeRO 2 (cuda + nccl on a GPU, gloo on CPU): bf16 weights published, within
    bf16 rounding of fp32 plain torch after 5 updates (the optimizer keeps fp32 masters)."""
    cfg = config(zero_stage=2, precision="bf16", device=device, lr=1e-3)
    ds, ref = DeepSpeedEngine(mlp(), cfg), PlainTorchEngine(mlp(), cfg)
    for x, y in batches(5):
        x, y = x.to(device), y.to(device)
        ds.backward_step(((ds(x.to(torch.bfloat16)).float() - y) ** 2).mean())
        ref.backward_step(((ref(x) - y) ** 2).mean())
    published = ds.published_state_dict()
    assert {v.dtype for v in published.values()} == {torch.bfloat16}
    want = params(ref)
    for key, value in published.items():
        torch.testing.assert_close(value.float(), want[key], atol=1e-2, rtol=0)


def test_warmup_skip_gives_fresh_heads_the_full_rate_while_the_trunk_warms_up():
    """``warmup_skip=["1"]``: the second layer steps at the full rate from the first step while
    the first ramps up over ``warmup_steps``, through save and load of the schedule too."""
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    engine = PlainTorchEngine(model, config(warmup_steps=4, warmup_skip=["1"]))
    rates = []
    for _ in range(5):
        by_param = {id(p): g["lr"] for g in engine.optimizer.param_groups for p in g["params"]}
        rates.append((by_param[id(model[0].weight)], by_param[id(model[1].weight)]))
        engine.backward_step(model(torch.ones(2, 3)).sum())
    trunk, head = zip(*rates, strict=True)
    assert trunk == pytest.approx([CPU["lr"] * k / 4 for k in (1, 2, 3, 4, 4)])
    assert head == pytest.approx([CPU["lr"]] * 5)
    with pytest.raises(ValueError, match="name no trainable parameter: \\['head'\\]"):
        PlainTorchEngine(nn.Linear(2, 2), config(warmup_skip=["head"]))


def test_warmup_delay_holds_the_trunk_still_while_the_heads_fit_then_warms_it_up():
    """``warmup_delay_steps=2``: the first layer's rate is 0 for two steps (its weights do not
    move), then ramps over ``warmup_steps``; the ``warmup_skip`` layer is at the full rate
    throughout; a save and load mid-delay resumes the same schedule."""
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    engine = PlainTorchEngine(model, config(warmup_steps=2, warmup_skip=["1"], warmup_delay_steps=2))
    start = model[0].weight.detach().clone()
    rates = []
    for step in range(5):
        by_param = {id(p): g["lr"] for g in engine.optimizer.param_groups for p in g["params"]}
        rates.append((by_param[id(model[0].weight)], by_param[id(model[1].weight)]))
        engine.backward_step(model(torch.ones(2, 3)).sum())
        if step == 1:
            torch.testing.assert_close(model[0].weight, start, rtol=0, atol=0)
            saved = engine.scheduler.state_dict()
    trunk, head = zip(*rates, strict=True)
    assert trunk == pytest.approx([0.0, 0.0, CPU["lr"] / 2, CPU["lr"], CPU["lr"]])
    assert head == pytest.approx([CPU["lr"]] * 5)
    again = PlainTorchEngine(nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)),
                             config(warmup_steps=2, warmup_skip=["1"], warmup_delay_steps=2))
    again.scheduler.load_state_dict(saved)  # saved after the delay's 2 steps: warmup step 1 next
    assert again.scheduler.get_last_lr() == pytest.approx(
        [CPU["lr"] if g["warmup_skip"] else CPU["lr"] / 2 for g in again.optimizer.param_groups])


@pytest.mark.parametrize("engine_cls", [PlainTorchEngine, DeepSpeedEngine])
def test_freeze_keeps_a_prefix_out_of_the_optimiser_and_the_backward(engine_cls):
    """``freeze=["0"]``: the first layer gets no gradient and does not move, the second
    learns; the optimiser holds only the second's parameters; an unknown prefix is an error."""
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    engine = engine_cls(model, config(freeze=["0"], warmup_steps=0))
    start = [p.detach().clone() for p in model.parameters()]
    for _ in range(3):
        engine.backward_step(engine(torch.ones(2, 3)).square().sum())
    first, second = model[0], model[1]
    assert not first.weight.requires_grad and first.weight.grad is None
    torch.testing.assert_close(first.weight, start[0], rtol=0, atol=0)
    assert not torch.equal(second.weight, start[2])
    in_optimiser = {id(p) for g in engine.optimizer.param_groups for p in g["params"]}
    assert in_optimiser == {id(second.weight), id(second.bias)}
    with pytest.raises(ValueError, match="learner.freeze names no parameter: \\['trunk'\\]"):
        PlainTorchEngine(nn.Linear(2, 2), config(freeze=["trunk"]))
    with pytest.raises(ValueError, match="no trainable parameters"):
        PlainTorchEngine(nn.Linear(2, 2), config(freeze=[""]))


def test_lr_scales_give_a_prefix_its_own_learning_rate():
    """``lr_scales={"1": 10}``: the second layer (names ``1.weight``, ``1.bias``) steps at ten
    times the learning rate; decay stays on matrices only; an unknown prefix is an error."""
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    engine = PlainTorchEngine(model, config(lr_scales={"1": 10.0}))
    groups = engine.optimizer.param_groups
    assert engine.lr == pytest.approx(CPU["lr"])  # the base rate is group 0's
    by_param = {id(p): g for g in groups for p in g["params"]}
    assert by_param[id(model[1].weight)]["lr"] == pytest.approx(10 * CPU["lr"])
    assert by_param[id(model[0].weight)]["lr"] == pytest.approx(CPU["lr"])
    assert by_param[id(model[1].bias)]["weight_decay"] == 0.0
    assert by_param[id(model[1].weight)]["weight_decay"] == CPU["weight_decay"]
    with pytest.raises(ValueError, match="name no trainable parameter: \\['head'\\]"):
        PlainTorchEngine(nn.Linear(2, 2), config(lr_scales={"head": 2.0}))
