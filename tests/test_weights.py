"""actors.weights: the packed (zero-copy) state dict round-trips every dtype a policy has."""

from __future__ import annotations

import pickle

import numpy as np
import torch

from actors.weights import is_packed, pack_state, unpack_state


def test_round_trip_keeps_values_dtypes_and_shapes():
    state = {
        "f32": torch.randn(3, 4),
        "bf16": torch.randn(5).to(torch.bfloat16),
        "f16": torch.randn(2, 2).half(),
        "i64": torch.arange(6).view(2, 3),
        "mask": torch.tensor([True, False, True]),
        "scalar": torch.tensor(1.5),
        "strided": torch.randn(4, 6)[:, ::2],  # not contiguous
    }
    packed = pack_state(state)
    assert is_packed(packed) and all(
        isinstance(a, np.ndarray) for a in packed[next(iter(packed))].values()
    )
    out = unpack_state(pickle.loads(pickle.dumps(packed, protocol=5)))
    assert set(out) == set(state)
    for name, tensor in state.items():
        assert out[name].dtype == tensor.dtype and out[name].shape == tensor.shape, name
        assert torch.equal(out[name], tensor), name


def test_unpacked_state_passes_through_and_loads_into_a_module():
    module = torch.nn.Linear(3, 2).to(torch.bfloat16)
    target = torch.nn.Linear(3, 2).to(torch.bfloat16)
    target.load_state_dict(unpack_state(pack_state(module.state_dict())))
    assert all(
        torch.equal(a, b) for a, b in zip(module.parameters(), target.parameters(), strict=True)
    )
    plain = unpack_state({"w": np.ones(2, np.float32)})
    assert not is_packed(plain) and torch.equal(plain["w"], torch.ones(2))


def test_read_only_buffers_do_not_warn(recwarn):
    packed = pack_state({"w": torch.ones(3)})
    packed[next(iter(packed))]["w"].setflags(write=False)  # as object-store buffers are
    out = unpack_state(packed)
    assert torch.equal(out["w"], torch.ones(3))
    assert not [w for w in recwarn if "not writable" in str(w.message)]
