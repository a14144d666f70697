"""The learner's optimiser engine: DeepSpeed behind one small object, and a plain-torch twin.

Everything that calls DeepSpeed lives here (STYLE.md 3). :class:`DeepSpeedEngine` wraps
``deepspeed.initialize``; :class:`PlainTorchEngine` does the same update with plain torch and is
the reference in tests and benchmarks. Both share one API::

    engine = DeepSpeedEngine(model, LearnerConfig(...))
    loss = loss_fn(engine(batch))          # forward through the engine (or engine.module.method)
    stats = engine.backward_step(loss)     # {"grad_norm", "lr", "optimizer_step"}
    weights = engine.published_state_dict()    # full CPU state dict, also under ZeRO-3
    engine.save_checkpoint(dir, tag, {"iteration": 7}); engine.load_checkpoint(dir, tag)

The update is the same in both: AdamW over the module's trainable parameters (frozen ones are
never handed to the optimiser), weight decay on matrices only (nanoGPT's split: decaying biases
and norm gains only shrinks them), gradient-norm clipping, and a learning rate that rises
linearly over ``warmup_steps`` optimiser steps and then stays constant (groups named by
``warmup_skip`` start at the full rate; the others may first wait ``warmup_delay_steps`` at
0; those named by ``freeze`` never train). The schedule is a torch
``LambdaLR`` rather than DeepSpeed's ``WarmupLR``: its first step already uses ``lr / warmup``
(WarmupLR's first step uses lr 0, a wasted update), the plain engine can use the very same
object, and its ``state_dict`` round-trips through DeepSpeed checkpoints. Gradient accumulation
averages: each micro-step's loss is divided by ``grad_accum_steps``, so N micro-batches of equal
size give the gradient of the mean loss over their concatenation.

Recommended ``learner:`` section (CPU debug values; on a GPU cluster use ``zero_stage: 2``,
``precision: bf16``)::

    learner:
      zero_stage: 0        # one CPU process: nothing to shard; 1 and 2 work too, only slower
      precision: fp32      # CPU: bf16 matmuls are slow on most CPUs, fp16 is unsupported
      lr: 1.0e-5
      weight_decay: 0.0
      betas: [0.9, 0.95]
      grad_accum_steps: 1
      grad_clip: 1.0
      warmup_steps: 10
      warmup_skip: []      # name prefixes at full lr from step 1, e.g. [value_head] (fresh heads)
      warmup_delay_steps: 0   # steps the others wait at lr 0 before their warmup (LP-FT)
      freeze: []           # name prefixes that never train, e.g. [model]: the heads only
      device: auto         # cuda (nccl) when a GPU is visible, else cpu (gloo)

DeepSpeed on a CPU-only machine (0.19.8, without intel_extension_for_pytorch or oneCCL):

* The accelerator is chosen once, at ``import deepspeed``, and auto-detection falls back to CPU
  with a warning on every run. We set ``DS_ACCELERATOR`` (only if unset) before the first import,
  which selects the CPU accelerator silently; its collective backend is gloo when oneCCL is
  absent. DeepSpeed is imported lazily, so ``import learner`` stays cheap.
* DeepSpeed needs a ``torch.distributed`` process group even for one process. We create one
  (gloo on CPU, nccl on CUDA) from :class:`World` or the launcher's ``RANK``/``WORLD_SIZE``
  environment, and reuse an existing group, so several engines can live in one process
  (tests). A single rank without ``MASTER_PORT`` rendezvouses through an in-memory store and
  opens no port (a port picked free and bound later can be taken in between).
* ZeRO 0, 1, 2 and 3 all run on CPU with fp32 and gloo. With ZeRO 0 and fp32 DeepSpeed clips
  the gradients but does not report their norm (``get_global_grad_norm()`` is None), so for
  stage 0 we compute the norm from ``param.grad`` ourselves before the step.
* The optimiser is torch's ``AdamW`` handed in as a client optimiser, which ZeRO supports; the
  DeepSpeed config's ``"optimizer"`` section would build ``FusedAdam``/``DeepSpeedCPUAdam``,
  which compile C++/CUDA ops at first use.

Checkpoints resume on any number of ranks. DeepSpeed's own layout (``mp_rank_00_model_states.pt``,
one ``zero_pp_rank_<r>_..._optim_states.pt`` per rank under ZeRO 1-3, ``zero_to_fp32.py``) stays
as it is, so DeepSpeed's tools read it; beside it rank 0 writes :data:`FULL_STATE`: the module
state dict, the fp32 master weights and AdamW moments of every trainable parameter by name, the
step, the schedule and the counters, gathered with DeepSpeed's ``safe_get_full_*`` API. A
checkpoint saved by as many ranks as load it goes through DeepSpeed's loader (exact, each rank
its partition); saved by another number, the full state is loaded and each rank keeps its part
(``safe_set_full_*``): on one rank, across ZeRO stages, the same next step to the bit
(tests/test_engine.py), across 2 and 1 ranks to float noise (tests/test_learner_group.py). Why not DeepSpeed's
universal checkpoints: they need an offline conversion (``ds_to_universal``) between the save
and the resume and do not cover ZeRO 0; DeepSpeed's elastic ZeRO-1/2 loading does not cover
ZeRO 3. The cost: one more fp32 copy of the weights and both Adam moments per checkpoint.

Loading a checkpoint unpickles nothing but tensors, containers and plain types: DeepSpeed's own
loader calls ``torch.load(..., weights_only=False)``, which runs whatever code a crafted file
names, so the engine's checkpoint engine is handed a loader with ``weights_only=True`` that
allows, besides torch's defaults, exactly the DeepSpeed classes its checkpoints hold
(:data:`DEEPSPEED_PICKLED`: the loss scaler and the parameter-fragment addresses of ZeRO 1-3's
optimiser states, ZeRO-3's stage enum). Those are rebuilt from their attribute dicts (no
``__reduce__`` call, no import of anything else); any other global in a file is refused. The plain engine's file loads with
``weights_only=True`` too.
"""

from __future__ import annotations

import datetime
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rig.config import LearnerConfig

GRAD_NORM = "grad_norm"  # float: total L2 norm of the averaged gradient before clipping
LR = "lr"  # float: learning rate this update used (or would use, off the boundary)
OPTIMIZER_STEP = "optimizer_step"  # bool: this call ended an accumulation cycle and stepped

# DeepSpeed classes its checkpoint files pickle (0.19.8, ZeRO 0-3, fp32/bf16/fp16), the only
# globals the engine's loader allows beyond torch's weights_only defaults.
DEEPSPEED_PICKLED = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
)

_PLAIN_CHECKPOINT = "plain_engine.pt"
FULL_STATE = "rig_full_state.pt"  # in every DeepSpeed checkpoint folder: see DeepSpeedEngine
_CLIENT_STATE = "rig_client_state"
_SHM_COMM_OP = "deepspeed_shm_comm"  # deepspeed.ops.op_builder.cpu.ShareMemCommBuilder.NAME


@dataclass(frozen=True)
class World:
    """Where this process sits among the learner processes (one per GPU)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int | None = None  # None: a free port (only meaningful for world_size 1)
    timeout_s: float | None = None  # collectives (and the rendezvous) fail after this; None: torch's 30 min


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when torch sees a GPU, else ``cpu``; ``cuda`` without one is an error."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("learner.device is 'cuda' but torch sees no CUDA GPU")
    return device


def param_groups(
    named: list[tuple[str, nn.Parameter]], lr: float, weight_decay: float,
    lr_scales: dict[str, float], warmup_skip: Sequence[str] = (),
) -> list[dict[str, Any]]:
    """AdamW groups: matrices decay, biases and norm gains do not (nanoGPT's split); a
    parameter whose name starts with a key of ``lr_scales`` (the longest such key) learns at
    ``lr * lr_scales[key]`` (e.g. ``{value_head: 10}``: a fresh head beside a trained trunk).
    A parameter whose name starts with an entry of ``warmup_skip`` is in a group marked
    ``warmup_skip: True`` (full learning rate from the first step, see ``_Engine``). A key that
    names no trainable parameter is an error, not a silent no-op."""
    unused = [k for k in [*lr_scales, *warmup_skip] if not any(n.startswith(k) for n, _ in named)]
    if unused:
        raise ValueError(f"learner.lr_scales/warmup_skip name no trainable parameter: {unused} "
                         f"(parameter names start with e.g. "
                         f"{sorted({n.split('.')[0] for n, _ in named})})")  # fmt: skip
    groups: dict[tuple[float, bool, bool], list[nn.Parameter]] = {}
    for name, p in named:
        keys = [k for k in lr_scales if name.startswith(k)]
        scale = lr_scales[max(keys, key=len)] if keys else 1.0
        skip = any(name.startswith(k) for k in warmup_skip)
        groups.setdefault((scale, p.ndim >= 2, skip), []).append(p)
    order = sorted(groups.items(), key=lambda kv: (kv[0][2], kv[0][0] != 1.0, not kv[0][1]))
    return [{"params": params, "lr": lr * scale, "weight_decay": weight_decay if decay else 0.0,
             "warmup_skip": skip}
            for (scale, decay, skip), params in order]  # fmt: skip


def freeze(model: nn.Module, prefixes: Sequence[str]) -> None:
    """``requires_grad_(False)`` on every parameter whose name starts with one of ``prefixes``
    (``learner.freeze``): no gradient is computed for them or through modules only they feed,
    and the optimiser never sees them. A prefix that names no parameter is an error."""
    named = list(model.named_parameters())
    unused = [k for k in prefixes if not any(n.startswith(k) for n, _ in named)]
    if unused:
        raise ValueError(f"learner.freeze names no parameter: {unused} (parameter names start "
                         f"with e.g. {sorted({n.split('.')[0] for n, _ in named})})")  # fmt: skip
    for name, p in named:
        if any(name.startswith(k) for k in prefixes):
            p.requires_grad_(False)


def cpu_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``module``'s state dict as detached CPU copies in its own dtypes: what an engine publishes
    (its parameters may live on a GPU and change in place at the next step)."""
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


class _Engine:
    """What both engines share: the optimiser over the trainable parameters, the schedule, the API.

    Subclasses set ``self._module`` (the unwrapped model) and implement ``__call__``,
    ``_backward_and_step``, ``published_state_dict``, ``save_checkpoint`` and
    ``load_checkpoint``. Checkpoints are meant to be taken between updates: gradients of an
    unfinished accumulation cycle are not saved.
    """

    def __init__(self, model: nn.Module, config: LearnerConfig) -> None:
        self.config = config
        freeze(model, config.freeze)
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self._trainable = [p for _, p in named]
        if not self._trainable:
            raise ValueError("the model has no trainable parameters (all requires_grad=False)")
        self.optimizer = torch.optim.AdamW(
            param_groups(named, config.lr, config.weight_decay, dict(config.lr_scales),
                         list(config.warmup_skip)),
            lr=config.lr, betas=config.betas,
        )  # fmt: skip
        warmup, delay = config.warmup_steps, config.warmup_delay_steps

        def ramp(step: int) -> float:
            if step < delay:  # LP-FT's linear probe: only the warmup_skip groups move
                return 0.0
            return min(1.0, (step - delay + 1) / warmup) if warmup else 1.0

        def full(step: int) -> float:
            return 1.0

        # One factor per group: the trunk waits ``warmup_delay_steps`` and then warms up, fresh
        # heads (warmup_skip) do neither, so they fit before the trunk moves much (LP-FT: Kumar
        # et al. 2022, "fine-tuning can distort pretrained features"; rl/heads.py says why).
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            [full if g["warmup_skip"] else ramp for g in self.optimizer.param_groups],
        )

    # -- the shared API ---------------------------------------------------------------------------

    @property
    def module(self) -> nn.Module:
        """The unwrapped model (its methods may be called directly, also under ZeRO-3)."""
        return self._module

    def train(self) -> _Engine:
        self._module.train()
        return self

    def eval(self) -> _Engine:
        self._module.eval()
        return self

    @property
    def num_trainable(self) -> int:
        """Number of trainable scalars (ZeRO-3 leaves a partitioned parameter with numel 0)."""
        return sum(getattr(p, "ds_numel", p.numel()) for p in self._trainable)

    def trunk_waits(self, steps: int) -> bool:
        """Whether the next ``steps`` optimizer steps all fall in ``warmup_delay_steps`` (LP-FT's
        linear probe): every group outside ``warmup_skip`` stays at lr 0 through them, so their
        gradient could not move a weight and the learner may skip computing it
        (``learner.ppo.ppo_update`` then treats the trunk as frozen for that update)."""
        delay = self.config.warmup_delay_steps
        return delay > 0 and self.scheduler.last_epoch + steps <= delay

    @property
    def lr(self) -> float:
        """Learning rate of the next optimizer step (of the parameters at scale 1)."""
        return self.optimizer.param_groups[0]["lr"]

    def backward_step(self, loss: torch.Tensor) -> dict[str, Any]:
        """Backpropagate one micro-batch's scalar ``loss``; step the optimizer at the boundary.

        Returns ``{GRAD_NORM: float | None, LR: float, OPTIMIZER_STEP: bool}``; the grad norm
        (before clipping) is only known on the boundary micro-step, else None.
        """
        if loss.ndim != 0:
            raise ValueError(f"backward_step needs a scalar loss, got shape {tuple(loss.shape)}")
        lr = self.lr
        grad_norm, stepped = self._backward_and_step(loss)
        return {GRAD_NORM: grad_norm, LR: lr, OPTIMIZER_STEP: stepped}

    def _total_grad_norm(self) -> float:
        grads = [p.grad for p in self._trainable if p.grad is not None]
        return torch.nn.utils.get_total_norm(grads).item() if grads else 0.0


class PlainTorchEngine(_Engine):
    """The same update as :class:`DeepSpeedEngine` with plain torch, on one device, fp32.

    The reference for tests and benchmarks. ``precision`` and ``zero_stage`` are ignored.
    """

    def __init__(self, model: nn.Module, config: LearnerConfig) -> None:
        device = resolve_device(config.device)
        self._module = model.to(device)
        super().__init__(self._module, config)
        self.micro_steps = 0
        self.global_steps = 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._module(*args, **kwargs)

    def _backward_and_step(self, loss: torch.Tensor) -> tuple[float | None, bool]:
        (loss / self.config.grad_accum_steps).backward()
        self.micro_steps += 1
        if self.micro_steps % self.config.grad_accum_steps:
            return None, False
        clip = self.config.grad_clip or math.inf  # inf: clip_grad_norm_ only measures
        grad_norm = torch.nn.utils.clip_grad_norm_(self._trainable, clip).item()
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.global_steps += 1
        return grad_norm, True

    def published_state_dict(self) -> dict[str, torch.Tensor]:
        """The model's full state dict as detached CPU copies."""
        return cpu_state_dict(self._module)

    def save_checkpoint(
        self, directory: str | Path, tag: str, client_state: dict | None = None
    ) -> Path:
        """Model, optimizer, scheduler and counters in ``directory/tag/plain_engine.pt``."""
        path = Path(directory) / tag / _PLAIN_CHECKPOINT
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {
            "module": self._module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.scheduler.state_dict(),
            "micro_steps": self.micro_steps,
            "global_steps": self.global_steps,
            "client_state": dict(client_state or {}),
        }
        torch.save(state, path)
        return path.parent

    def load_checkpoint(self, directory: str | Path, tag: str) -> dict:
        """Restore what :meth:`save_checkpoint` wrote; return its ``client_state``."""
        path = Path(directory) / tag / _PLAIN_CHECKPOINT
        if not path.is_file():
            raise FileNotFoundError(f"no plain-engine checkpoint at {path}")
        state = torch.load(path, map_location="cpu", weights_only=True)
        self._module.load_state_dict(state["module"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["lr_scheduler"])
        self.micro_steps, self.global_steps = state["micro_steps"], state["global_steps"]
        return state["client_state"]


class DeepSpeedEngine(_Engine):
    """``deepspeed.initialize`` behind the engine API; see the module docstring.

    ``model`` is moved to the device, cast to the training dtype (bf16/fp16) and, under ZeRO-3,
    partitioned in place: use :attr:`module` or :meth:`published_state_dict` afterwards, not a
    reference kept from before.
    """

    def __init__(self, model: nn.Module, config: LearnerConfig, world: World | None = None) -> None:
        super().__init__(model, config)
        self.device = resolve_device(config.device)
        deepspeed = _import_deepspeed(self.device)
        _ensure_process_group(deepspeed, self.device, world)
        self._engine, _, _, _ = deepspeed.initialize(
            model=model,
            optimizer=self.optimizer,
            lr_scheduler=self.scheduler,
            config=_deepspeed_config(config, sum(p.numel() for p in model.parameters())),
            dist_init_required=False,
        )
        self._module = self._engine.module
        self._deepspeed = deepspeed
        self._engine.checkpoint_engine.load = _weights_only_load  # see the module docstring

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._engine(*args, **kwargs)

    @property
    def micro_steps(self) -> int:
        return self._engine.micro_steps

    @property
    def global_steps(self) -> int:
        """Optimizer steps taken (restored by :meth:`load_checkpoint`)."""
        return self._engine.global_steps

    def _backward_and_step(self, loss: torch.Tensor) -> tuple[float | None, bool]:
        boundary = self._engine.is_gradient_accumulation_boundary()  # before step() advances it
        self._engine.backward(loss)  # divides by grad_accum_steps, as the plain engine does
        # ZeRO 0 keeps full grads on the parameters and reports no norm in fp32: measure it.
        own_norm = self._total_grad_norm() if boundary and self.config.zero_stage == 0 else None
        self._engine.step()
        if not boundary:
            return None, False
        reported = self._engine.get_global_grad_norm()
        grad_norm = own_norm if reported is None else float(reported)
        return grad_norm, self._engine.was_step_applied()

    def published_state_dict(self) -> dict[str, torch.Tensor]:
        """The full model state dict as CPU copies in the model's dtype, for weight publishing.

        Under ZeRO-3 each rank holds a shard of every parameter: all of them are gathered for
        the copy (a collective, so call it on every rank; peak memory is one full model).
        Elsewhere the gather is a no-op.
        """
        params = list(self._module.parameters())
        with self._deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            return cpu_state_dict(self._module)

    @property
    def world_size(self) -> int:
        return torch.distributed.get_world_size()

    def save_checkpoint(
        self, directory: str | Path, tag: str, client_state: dict | None = None
    ) -> Path:
        """DeepSpeed's checkpoint (model, optimizer, scheduler) in ``directory/tag``, plus the
        rank-independent :data:`FULL_STATE` (see :meth:`full_state`). A collective: every rank
        calls it with the same folder (one filesystem that all ranks see)."""
        # Nested under one key: DeepSpeed merges client_state into its own model-state dict.
        client = {_CLIENT_STATE: dict(client_state or {})}
        self._engine.save_checkpoint(str(directory), tag=tag, client_state=client)
        full = self.full_state()  # every rank: a gather under ZeRO-3
        if full is not None and torch.distributed.get_rank() == 0:
            full["client_state"] = dict(client_state or {})
            torch.save(full, Path(directory) / tag / FULL_STATE)
        torch.distributed.barrier()  # the folder is complete on return, on every rank
        return Path(directory) / tag

    def load_checkpoint(self, directory: str | Path, tag: str) -> dict:
        """Restore model, optimizer, scheduler and step counters; return the ``client_state``.

        Saved by as many ranks as there are now: DeepSpeed's own files (each rank its
        partition). Saved by another number of ranks: the consolidated :data:`FULL_STATE`,
        repartitioned over this world (:meth:`load_full_state`)."""
        folder = Path(directory) / tag
        if not folder.is_dir():
            raise FileNotFoundError(f"no DeepSpeed checkpoint at {folder}")
        saved_world = _saved_world_size(folder)
        if saved_world is not None and saved_world != self.world_size:
            if not (folder / FULL_STATE).is_file():
                raise FileNotFoundError(
                    f"{folder} was saved by {saved_world} learner ranks and holds no {FULL_STATE} "
                    f"(saved before it existed, or with fp16 at ZeRO 0): resume it on "
                    f"learner.num_ranks={saved_world}"
                )
            state = torch.load(folder / FULL_STATE, map_location="cpu", weights_only=True)
            self.load_full_state(state)
            return state["client_state"]
        path, client_state = self._engine.load_checkpoint(
            str(directory), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
        )
        if path is None:
            raise FileNotFoundError(f"DeepSpeed could not load the checkpoint in {directory}/{tag}")
        return client_state[_CLIENT_STATE]

    # -- a state that does not depend on the number of ranks ----------------------------------

    def full_state(self) -> dict[str, Any] | None:
        """Everything a resume needs, whole and by parameter name, on every rank: the module's
        state dict (buffers, frozen parameters), the fp32 master weights and AdamW moments of
        every trainable parameter, the AdamW step, the scheduler and the engine's counters.

        It reads the same on any number of ranks and ZeRO stage, so :meth:`load_full_state`
        can repartition it over another world. Gathered through DeepSpeed's ``safe_get_full_*``
        (collectives under ZeRO 1-3: call on every rank). None where DeepSpeed keeps fp32
        masters it exposes no API for (fp16 at ZeRO 0)."""
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        if self.config.zero_stage == 0 and self.config.precision == "fp16":
            return None
        module = self.published_state_dict()
        masters: dict[str, torch.Tensor] = {}
        moments: dict[str, dict[str, torch.Tensor]] = {"exp_avg": {}, "exp_avg_sq": {}}
        plain = self._plain_optimizer()
        linked = not plain and self._optimizer_states_exist()
        if linked:
            self._link_optimizer_state()
        for name, p in self._module.named_parameters():
            if not p.requires_grad:
                continue
            if plain:  # the model's own tensors are the fp32 masters; AdamW keys by them
                masters[name] = p.detach().float().cpu().clone()
                state = self.optimizer.state.get(p, {})
                for key in moments:
                    if key in state:
                        moments[key][name] = state[key].detach().cpu().clone()
                continue
            masters[name] = safe_get_full_fp32_param(p).detach().cpu().clone()
            if linked:
                for key in moments:
                    moments[key][name] = safe_get_full_optimizer_state(p, key).detach().cpu()
        steps = [float(s["step"]) for s in self.optimizer.state.values() if "step" in s]
        return {
            "world_size": self.world_size,
            "zero_stage": self.config.zero_stage,
            "module": module,
            "fp32": masters,
            "moments": moments,
            "adam_step": max(steps) if steps else 0.0,
            "lr_scheduler": self.scheduler.state_dict(),
            "global_steps": self._engine.global_steps,
            "global_samples": self._engine.global_samples,
            "micro_steps": self._engine.micro_steps,
        }

    def load_full_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`full_state` returned, on this world (a collective under ZeRO-3:
        call on every rank with the same state)."""
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        params = list(self._module.parameters())
        with self._deepspeed.zero.GatheredParameters(params, modifier_rank=0):
            self._module.load_state_dict(state["module"])  # weights in the model's dtype
        plain = self._plain_optimizer()
        moments = state["moments"]
        if moments["exp_avg"]:  # AdamW state exists once the saved run stepped
            self._create_optimizer_states(state["adam_step"])
        named = dict(self._module.named_parameters())
        for name, value in state["fp32"].items():
            p = named[name]
            if plain:
                with torch.no_grad():
                    p.copy_(value.to(p.dtype))
                for key in moments:
                    if name in moments[key]:
                        self.optimizer.state[p][key].copy_(moments[key][name])
                continue
            safe_set_full_fp32_param(p, value.to(self.device))  # the exact fp32 masters
            for key in moments:
                if name in moments[key]:
                    safe_set_full_optimizer_state(p, moments[key][name].to(self.device), key)
        self.scheduler.load_state_dict(state["lr_scheduler"])
        for group, lr in zip(self.optimizer.param_groups, self.scheduler.get_last_lr(), strict=True):
            group["lr"] = lr  # the scheduler's state holds the rate, the groups apply it
        self._engine.global_steps = state["global_steps"]
        self._engine.global_samples = state["global_samples"]
        self._engine.micro_steps = state["micro_steps"]

    def _plain_optimizer(self) -> bool:
        """Whether DeepSpeed steps our AdamW on the model's own tensors (ZeRO 0, fp32)."""
        return self._engine.optimizer is self.optimizer

    def _optimizer_states_exist(self) -> bool:
        return any("exp_avg" in s for s in self.optimizer.state.values())

    def _create_optimizer_states(self, step: float) -> None:
        """AdamW's per-tensor state (zero moments at ``step``) on the tensors it steps (the
        model's, or ZeRO's fp32 partitions), as its first step would create it, and ZeRO's
        links from each parameter to its fragment of that state."""
        zero = self._engine.optimizer
        tensors = [p for group in self.optimizer.param_groups for p in group["params"]]
        tensors += getattr(zero, "fp32_partitioned_groups_flat", [])  # ZeRO-3's sub-groups
        for p in {id(t): t for t in tensors}.values():
            state = self.optimizer.state[p]
            state.setdefault("exp_avg", torch.zeros_like(p, memory_format=torch.preserve_format))
            state.setdefault("exp_avg_sq", torch.zeros_like(p, memory_format=torch.preserve_format))
            state["step"] = torch.tensor(float(step))
        self._link_optimizer_state()

    def _link_optimizer_state(self) -> None:
        """(Re)point each parameter's ZeRO 1-2 / bf16 fragment at the AdamW state it has now.
        DeepSpeed links them once, lazily, and its own checkpoint save relinks the parameters
        with empty state fragments, after which ``safe_get_full_optimizer_state`` finds none."""
        zero = self._engine.optimizer
        if hasattr(zero, "_lazy_init_hp_params_optimizer_state"):
            zero._hp_optimizer_states_linked = False
            zero._lazy_init_hp_params_optimizer_state()


# -- DeepSpeed set-up -----------------------------------------------------------------------------


def _weights_only_load(path: str, map_location=None):
    """DeepSpeed's checkpoint-engine ``load`` with ``weights_only=True`` (module docstring)."""
    import importlib

    allowed = []
    for name in DEEPSPEED_PICKLED:
        module, _, attr = name.rpartition(".")
        allowed.append(getattr(importlib.import_module(module), attr))
    with torch.serialization.safe_globals(allowed):
        return torch.load(path, map_location=map_location, weights_only=True)



def _saved_world_size(folder: Path) -> int | None:
    """How many ranks saved the DeepSpeed checkpoint in ``folder`` (None: unknown). DeepSpeed
    writes one optimiser file per data-parallel rank under ZeRO 1-3; ZeRO 0 none (its files load
    on any number of ranks: every rank holds everything), so the full state's record decides."""
    return len(list(folder.glob("*zero_pp_rank_*_mp_rank_00_optim_states.pt"))) or None


DEEPSPEED_BUCKET = 500_000_000
"""DeepSpeed's default reduce / all-gather bucket (elements), kept for models at least this big."""


def _deepspeed_config(config: LearnerConfig, num_params: int) -> dict[str, Any]:
    # We never use DeepSpeed's data loader, so the batch size only feeds its throughput timer;
    # train_batch_size = micro (1) x grad_accum_steps x world size is left for it to derive.
    # Buckets no bigger than the model: ZeRO-3 allocates its reduce bucket whole (5e8 fp32
    # elements, 1.9 GB, for a 5M-parameter tiny policy), and DeepSpeed never frees an engine's
    # buffers in the process that made it. A bucket of the model's size holds every gradient,
    # as the default does for any model under 5e8 parameters: the same reductions.
    # (Rounded up to 2**20 elements: DeepSpeed wants a multiple of its alignment factor.)
    bucket = DEEPSPEED_BUCKET if num_params >= DEEPSPEED_BUCKET else -(-max(num_params, 1) // 2**20) * 2**20
    zero: dict[str, Any] = {"stage": config.zero_stage}
    if config.zero_stage > 0:
        zero.update(reduce_bucket_size=bucket, allgather_bucket_size=bucket)
    if config.zero_stage == 3:
        zero.update(stage3_prefetch_bucket_size=min(bucket, 50_000_000))
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": config.grad_accum_steps,
        "gradient_clipping": config.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": config.precision == "bf16"},
        "fp16": {"enabled": config.precision == "fp16"},
        "steps_per_print": 2**62,  # DeepSpeed's own progress lines: we log through MLflow
        "wall_clock_breakdown": False,
    }


def _import_deepspeed(device: str):
    """Import DeepSpeed with its accelerator matching ``device`` (chosen once per process)."""
    os.environ.setdefault("DS_ACCELERATOR", device)  # before the import: it picks it there
    # ZeRO-3 calls torch.distributed collectives that torch 2.13 deprecates; nothing to act on.
    warnings.filterwarnings(
        "ignore",
        message=r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated",
        category=FutureWarning,
    )
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    chosen = get_accelerator().device_name()
    if chosen != device:
        raise RuntimeError(
            f"DeepSpeed's accelerator is {chosen!r} but learner.device resolved to {device!r}; "
            f"unset DS_ACCELERATOR or set learner.device={chosen}"
        )
    return deepspeed


def _ensure_process_group(deepspeed, device: str, world: World | None) -> None:
    """Create the torch.distributed group DeepSpeed needs, or reuse the one that exists."""
    if device == "cpu":
        # deepspeed.init_distributed JIT-compiles a shared-memory allreduce kernel for CPU ranks
        # (~45 s on a cold cache, needs a C++ compiler); it only speeds up several CPU ranks on
        # one node, which is not what the CPU path is for. Marked incompatible, gloo does it all.
        deepspeed.ops.__compatible_ops__[_SHM_COMM_OP] = False
    if torch.distributed.is_initialized():
        size = torch.distributed.get_world_size()
        if world is not None and world.world_size != size:
            raise RuntimeError(
                f"a process group of size {size} exists already; cannot join one of size "
                f"{world.world_size}"
            )
        deepspeed.init_distributed(dist_backend=torch.distributed.get_backend(), verbose=False)
        return
    if world is not None:  # the caller's placement wins over the environment
        os.environ.update(
            RANK=str(world.rank),
            WORLD_SIZE=str(world.world_size),
            LOCAL_RANK=str(world.local_rank),
            MASTER_ADDR=world.master_addr,
        )
        if world.master_port is not None:
            os.environ["MASTER_PORT"] = str(world.master_port)
    for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
        os.environ.setdefault(key, value)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    backend = "nccl" if device == "cuda" else "gloo"
    if device == "cuda":  # before the group exists, so NCCL binds each rank to its own GPU
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    if "MASTER_PORT" not in os.environ:
        if os.environ["WORLD_SIZE"] != "1":
            raise RuntimeError("MASTER_PORT must be set (or World.master_port) for several ranks")
        # One rank needs no rendezvous: an in-memory store, no TCP port. (A port picked free
        # and bound later can be taken in between, e.g. by Ray starting its workers.)
        torch.distributed.init_process_group(
            backend, store=torch.distributed.HashStore(), rank=0, world_size=1
        )
        deepspeed.init_distributed(dist_backend=backend, verbose=False)
        return
    timeout = {} if world is None or world.timeout_s is None else {
        "timeout": datetime.timedelta(seconds=world.timeout_s)}  # fmt: skip
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False,
                               **timeout)  # fmt: skip
