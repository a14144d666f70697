"""The DeepSpeed learner. The only package that touches DeepSpeed (imported lazily, on first use)."""

from learner.engine import (
    GRAD_NORM,
    LR,
    OPTIMIZER_STEP,
    DeepSpeedEngine,
    LearnerConfig,
    PlainTorchEngine,
    World,
)

__all__ = [
    "GRAD_NORM",
    "LR",
    "OPTIMIZER_STEP",
    "DeepSpeedEngine",
    "LearnerConfig",
    "PlainTorchEngine",
    "World",
]
