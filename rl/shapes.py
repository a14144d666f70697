"""Runtime shape checks shared by the maths modules: errors name the argument and the layout."""

from __future__ import annotations

from torch import Tensor


def require_tensor(name: str, x: object, ndim: int | None, layout: str) -> Tensor:
    """``x`` itself if it is a tensor with ``ndim`` dims (None: any); else a clear error."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor {layout}, got {type(x).__name__}")
    if ndim is not None and x.ndim != ndim:
        raise ValueError(f"{name} must be {layout}, got shape {tuple(x.shape)}")
    return x


def require_same_shape(layout: str, ref_name: str, ref: Tensor, **others: Tensor) -> None:
    """Every tensor in ``others`` has the shape of ``ref``."""
    for name, x in others.items():
        if x.shape != ref.shape:
            raise ValueError(
                f"{name} has shape {tuple(x.shape)} but {ref_name} has shape "
                f"{tuple(ref.shape)}; both must be {layout}"
            )


def require_matching(layout: str, ndim: int, **tensors: object) -> None:
    """Each of ``tensors`` is a tensor with ``ndim`` dims, all of the first one's shape."""
    for name, x in tensors.items():
        require_tensor(name, x, ndim, layout)
    (ref_name, ref), *others = tensors.items()
    require_same_shape(layout, ref_name, ref, **dict(others))
