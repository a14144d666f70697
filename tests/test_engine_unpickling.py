"""Loading a learner checkpoint runs no code from it (learner/engine.py): DeepSpeed's files and
the plain engine's load with ``weights_only=True``, so a crafted run folder cannot execute
anything when it is resumed or exported."""

from __future__ import annotations

import pickle

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("deepspeed")

from test_engine import config, make, mlp  # noqa: E402

from learner.engine import FULL_STATE  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated")


class Payload:
    """Unpickling this creates the marker file: what a hostile checkpoint would do, harmlessly."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("kind", ["plain", 0, 2])
def test_a_crafted_checkpoint_file_runs_nothing(kind, tmp_path):
    engine = make(kind, mlp(), config())
    saved = engine.save_checkpoint(tmp_path, "engine", {"iteration": 1})
    own = [p for p in saved.glob("*.pt") if p.name != FULL_STATE]  # DeepSpeed's (FULL_STATE: ours)
    target = max(own, key=lambda p: p.stat().st_size)  # model (+optimiser) states
    state = torch.load(target, weights_only=False)  # our own, just written: trusted here
    marker = tmp_path / "pwned"
    state["client_state" if kind == "plain" else "rig_client_state"] = Payload(marker)
    torch.save(state, target)

    with pytest.raises(pickle.UnpicklingError, match="Unsupported global"):
        make(kind, mlp(seed=1), config()).load_checkpoint(tmp_path, "engine")
    assert not marker.exists()


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_every_zero_stage_still_loads_with_weights_only(stage, tmp_path):
    """The allow-list (learner.engine.DEEPSPEED_PICKLED) covers what ZeRO's optimiser files hold."""
    engine = make(stage, mlp(), config())
    x = torch.randn(4, 8)
    engine.backward_step(engine(x).pow(2).mean())
    engine.save_checkpoint(tmp_path, "engine", {"iteration": 1})
    resumed = make(stage, mlp(seed=3), config())
    assert resumed.load_checkpoint(tmp_path, "engine") == {"iteration": 1}
    for a, b in zip(engine.published_state_dict().values(), resumed.published_state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_the_full_state_of_a_checkpoint_from_other_ranks_loads_with_weights_only(tmp_path):
    """A checkpoint saved by another number of ranks is read from FULL_STATE, with weights_only
    too: here a 1-rank ZeRO-2 checkpoint made to look like a 2-rank one (a second optimiser
    file), its FULL_STATE crafted."""
    import shutil

    engine = make(2, mlp(), config())
    saved = engine.save_checkpoint(tmp_path, "engine", {"iteration": 1})
    (optim,) = saved.glob("*zero_pp_rank_0_mp_rank_00_optim_states.pt")
    shutil.copy(optim, optim.with_name(optim.name.replace("rank_0_", "rank_1_")))
    state = torch.load(saved / FULL_STATE, weights_only=True)
    marker = tmp_path / "pwned"
    state["client_state"] = Payload(marker)
    torch.save(state, saved / FULL_STATE)

    with pytest.raises(pickle.UnpicklingError, match="Unsupported global"):
        make(2, mlp(seed=1), config()).load_checkpoint(tmp_path, "engine")
    assert not marker.exists()
