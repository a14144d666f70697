"""Weight sync by collective broadcast: the driver to the inference actors (issue 13 item 3).

``rollout.weight_sync: collective`` replaces the object store on the way to the inference
actors (``actors/inference.py``) with one torch.distributed broadcast per bucket, from the
driver (rank 0) to the N inference actors (ranks 1..N)::

    setup, once:  driver: layout of the published state (names, shapes, dtypes) --Ray call-->
                  each actor checks it against its policy's state dict (the first differing
                  tensor is a WeightSyncError); TCPStore on the driver (port picked by the OS),
                  every rank builds the group from it (gloo, or nccl: see below)
    every sync:   driver: actor.receive_weights.remote() x N, then
                  broadcast header [version, layout fingerprint]   (int64, 2)
                  broadcast bucket 0, 1, ... (at most bucket_mb each, one dtype each)
                  actors copy each bucket's pieces into their parameters in place and record
                  the version, which tags the rows they act (ACTED_VERSION) as on the object
                  store path; the driver waits for the N answers

The group is separate from the driver's default process group (DeepSpeed's, made by
``init_process_group``): it is a ``ProcessGroupGloo`` / ``ProcessGroupNCCL`` built directly on
a ``PrefixStore`` over our own ``TCPStore``, and its collectives are called on that object, so
nothing in torch.distributed's global state (default group, rank maps) is touched. vLLM's
``StatelessProcessGroup`` and OpenRLHF's weight-update group solve the same problem (OpenRLHF
registers its group in torch's private rank map to call ``dist.broadcast``; calling the group
object needs no private state). Gloo is bound to the node address Ray reports, not to what the
host name resolves to.

Buckets: each dtype's tensors, in the state dict's order, form one stream of elements cut into
buckets of at most ``bucket_bytes``; a tensor larger than a bucket spans several, so the extra
memory on either side is one bucket, whatever the largest tensor. Bytes travel as uint8 views
(gloo has no bfloat16 broadcast everywhere; NCCL moves bytes anyway). A receiver casts floating
point tensors to its own dtype on copy, as ``load_state_dict`` does on the object-store path (a
bf16 learner, fp32 actors); any other difference is a layout mismatch.

Never hangs: every collective, and the group's set-up, fails after ``timeout_s``; a receiver
that died makes the sender's broadcast fail at once (gloo sees the closed connection), an actor
that dies or fails before it joins the group fails the set-up at once (the driver watches the
join calls while it waits for the group), and the driver names the actor
(:class:`ActorBroadcast`).

Backend: nccl when the driver and every inference actor hold a CUDA device and no two share
one (NCCL cannot put two ranks of a communicator on one GPU), gloo over TCP otherwise (GPU
actors then copy from CPU buckets). The cluster preset's actor shares the learner's only GPU,
so there it would be gloo; the object store is the better path on one node (docs/cluster.md).

The sender is the driver, which holds the published weights (a single-rank learner is in the
driver; a multi-rank ``LearnerGroup`` hands the driver rank 0's full state dict, as the object
store path needs it too). On a GPU cluster, rank 0 of the learner as sender would change: the
broadcast would read rank 0's GPU parameters directly (no gather to CPU and no copy of the
weights to the driver, ZeRO-3 aside, which needs the gather on every rank first), the group's
rank 0 would be that learner actor (its node's address as rendezvous, as
``actors/learner.py`` publishes), and the driver would only start the receives and the send
and wait for both. Env runners and imagination actors keep the object store path.
"""

from __future__ import annotations

import datetime
import logging
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from rig.errors import UserError

log = logging.getLogger(__name__)

TIMEOUT_S = 120.0  # a group set-up or one broadcast that takes longer fails the sync
_PREFIX = "rig-weight-sync"

#: (name, shape, dtype name) of every tensor of the state dict, in its order.
Layout = list[tuple[str, tuple[int, ...], str]]


class WeightSyncError(UserError):
    """The sender's and a receiver's weights do not have the same layout."""


def layout_of(state: dict[str, Tensor]) -> Layout:
    return [
        (name, tuple(t.shape), str(t.dtype).removeprefix("torch.")) for name, t in state.items()
    ]


def fingerprint(layout: Layout) -> int:
    """A 63-bit checksum of ``layout``, sent with every version so a receiver notices a sender
    whose layout changed since the set-up."""
    return zlib.crc32(repr(layout).encode()) & 0x7FFFFFFF


def check_layout(layout: Layout, state: dict[str, Tensor]) -> None:
    """Raise :class:`WeightSyncError` naming the first tensor of the sender's ``layout`` that
    ``state`` (the receiver's) lacks or holds in another shape or an incompatible dtype."""
    for name, shape, dtype in layout:
        if name not in state:
            raise WeightSyncError(f"weight sync layout mismatch: the receiver has no tensor "
                                  f"{name!r} (sender: {list(shape)} {dtype})")  # fmt: skip
        t = state[name]
        mine = str(t.dtype).removeprefix("torch.")
        castable = t.is_floating_point() and getattr(torch, dtype).is_floating_point
        if tuple(t.shape) != shape or (mine != dtype and not castable):
            raise WeightSyncError(
                f"weight sync layout mismatch at {name!r}: sender {list(shape)} {dtype}, "
                f"receiver {list(t.shape)} {mine}"
            )
        if not t.is_contiguous():
            raise WeightSyncError(f"weight sync: the receiver's {name!r} is not contiguous")
    extra = sorted(set(state) - {name for name, *_ in layout})
    if extra:
        raise WeightSyncError(f"weight sync layout mismatch: the sender has no tensor "
                              f"{extra[0]!r} ({len(extra)} such)")  # fmt: skip


@dataclass(frozen=True)
class Bucket:
    """One broadcast: ``numel`` elements of ``dtype``; ``pieces`` are (tensor index in the
    layout, first element in the tensor, first element in the bucket, elements)."""

    dtype: torch.dtype
    numel: int
    pieces: tuple[tuple[int, int, int, int], ...]


def plan(layout: Layout, bucket_bytes: int) -> list[Bucket]:
    """Buckets of at most ``bucket_bytes`` (at least one element) per dtype, covering every
    element of every tensor once, dtypes in order of first appearance."""
    by_dtype: dict[str, list[int]] = {}
    for i, (_, _, dtype) in enumerate(layout):
        by_dtype.setdefault(dtype, []).append(i)
    buckets = []
    for dtype_name, indices in by_dtype.items():
        dtype = getattr(torch, dtype_name)
        cap = max(1, int(bucket_bytes) // torch.empty((), dtype=dtype).element_size())
        pieces, filled = [], 0
        for i in indices:
            numel, start = _numel(layout[i][1]), 0
            while start < numel:
                n = min(numel - start, cap - filled)
                pieces.append((i, start, filled, n))
                start, filled = start + n, filled + n
                if filled == cap:
                    buckets.append(Bucket(dtype, filled, tuple(pieces)))
                    pieces, filled = [], 0
        if filled:
            buckets.append(Bucket(dtype, filled, tuple(pieces)))
    return buckets


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def open_group(
    store: dist.Store, host: str, rank: int, world_size: int, backend: str, timeout_s: float
) -> Any:
    """A process group of ``world_size`` ranks on ``store``, outside torch.distributed's global
    state; blocks until every rank has joined (or ``timeout_s``)."""
    timeout = datetime.timedelta(seconds=timeout_s)
    prefixed = dist.PrefixStore(_PREFIX, store)
    if backend == "nccl":
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = timeout
        return dist.ProcessGroupNCCL(prefixed, rank, world_size, options)
    options = dist.ProcessGroupGloo._Options()
    options._timeout = timeout
    options._devices = [dist.ProcessGroupGloo.create_device(hostname=host)]
    return dist.ProcessGroupGloo(prefixed, rank, world_size, options)


class _Broadcast:
    """What both ends share: the group, the bucket plan, the device the buckets live on."""

    def __init__(self, group: Any, layout: Layout, bucket_bytes: int, backend: str):
        self.group, self.layout = group, layout
        self.buckets = plan(layout, bucket_bytes)
        self.fingerprint = fingerprint(layout)
        self.device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" \
            else torch.device("cpu")  # fmt: skip
        # one buffer of the largest bucket, reused by every bucket of every sync
        most = max((b.numel * b.dtype.itemsize for b in self.buckets), default=0)
        self._raw = torch.empty(most, dtype=torch.uint8, device=self.device)

    def _buffer(self, bucket: Bucket) -> Tensor:
        return self._raw[: bucket.numel * bucket.dtype.itemsize].view(bucket.dtype)

    def _broadcast(self, tensor: Tensor) -> None:
        options = dist.BroadcastOptions()
        options.rootRank = 0
        self.group.broadcast([tensor], options).wait()


class WeightSender(_Broadcast):
    """Rank 0. ``WeightSender.serve`` opens the store first (its port is what the receivers
    need), :meth:`connect` then builds the group once they have been told to join."""

    def __init__(self, store: dist.TCPStore, host: str, world_size: int, layout: Layout,
                 bucket_bytes: int, backend: str = "gloo", timeout_s: float = TIMEOUT_S):  # fmt: skip
        self.store, self.host, self.world_size = store, host, world_size
        self.args = (layout, bucket_bytes, backend)
        self.timeout_s = timeout_s
        self.group = None

    @classmethod
    def serve(cls, host: str, world_size: int, layout: Layout, bucket_bytes: int,
              backend: str = "gloo", timeout_s: float = TIMEOUT_S) -> WeightSender:  # fmt: skip
        store = dist.TCPStore(host, 0, world_size, is_master=True, wait_for_workers=False,
                              timeout=datetime.timedelta(seconds=timeout_s))  # fmt: skip
        return cls(store, host, world_size, layout, bucket_bytes, backend, timeout_s)

    @property
    def port(self) -> int:
        return self.store.port

    def connect(self) -> None:
        group = open_group(self.store, self.host, 0, self.world_size, self.args[2], self.timeout_s)
        super().__init__(group, *self.args)

    def send(self, state: dict[str, Tensor], version: int) -> None:
        """Broadcast ``state`` (the set-up's layout) as ``version``: header, then the buckets.
        A state of another layout is refused after its header, which tells the receivers so."""
        sent = fingerprint(layout_of(state))
        self._broadcast(torch.tensor([version, sent], device=self.device))
        if sent != self.fingerprint:
            raise WeightSyncError("weight sync: the state to send has another layout than the "
                                  "one agreed at set-up (names, shapes or dtypes changed)")  # fmt: skip
        flat = [state[name].reshape(-1) for name, *_ in self.layout]
        for bucket in self.buckets:
            buf = self._buffer(bucket)
            for i, start, at, n in bucket.pieces:
                buf[at : at + n].copy_(flat[i][start : start + n])
            self._broadcast(buf.view(torch.uint8))


class WeightReceiver(_Broadcast):
    """Rank ``rank`` >= 1: joins the sender's group (blocks until every rank has) and
    copies each version into ``targets`` (its module's ``state_dict()``: tensors that share
    the parameters' memory) in place."""

    def __init__(self, host: str, port: int, rank: int, world_size: int, layout: Layout,
                 bucket_bytes: int, targets: dict[str, Tensor], backend: str = "gloo",
                 timeout_s: float = TIMEOUT_S, own_host: str | None = None):  # fmt: skip
        check_layout(layout, targets)
        store = dist.TCPStore(host, port, world_size, is_master=False,
                              timeout=datetime.timedelta(seconds=timeout_s))  # fmt: skip
        group = open_group(store, own_host or host, rank, world_size, backend, timeout_s)
        super().__init__(group, layout, bucket_bytes, backend)
        self.store = store  # the group's store connection lives as long as the group
        self.targets = [targets[name].view(-1) for name, *_ in layout]

    @torch.no_grad()
    def receive(self) -> int:
        """One version from the sender, copied into the targets; returns the version."""
        header = torch.zeros(2, dtype=torch.int64, device=self.device)
        self._broadcast(header)
        version, sent = (int(x) for x in header.tolist())
        if sent != self.fingerprint:
            raise WeightSyncError(f"weight sync: version {version} was sent with another layout "
                                  f"than the one agreed at set-up")  # fmt: skip
        for bucket in self.buckets:
            buf = self._buffer(bucket)
            self._broadcast(buf.view(torch.uint8))
            for i, start, at, n in bucket.pieces:
                self.targets[i][start : start + n].copy_(buf[at : at + n])
        return version


# -- the Ray side: the driver and the inference actors ---------------------------------------------


class ActorBroadcast:
    """The driver's end of ``rollout.weight_sync: collective``: rank 0 to the inference actors
    (``InferenceActor.check_weight_layout``, ``join_weight_sync``, ``receive_weights``). The
    group is set up on the first :meth:`sync`, from that state's layout."""

    def __init__(self, actors: Sequence[Any], bucket_mb: float, timeout_s: float = TIMEOUT_S):
        self.actors, self.timeout_s = list(actors), float(timeout_s)
        self.bucket_bytes = max(1, int(bucket_mb * 2**20))
        self.sender: WeightSender | None = None
        self.backend = "gloo"

    def sync(self, state: dict[str, Tensor], version: int) -> None:
        """Broadcast ``state`` as ``version`` and wait until every actor holds it."""
        import ray

        if self.sender is None:
            self._setup(state)
        refs = [a.receive_weights.remote() for a in self.actors]
        try:
            self.sender.send(state, version)
            ray.get(refs, timeout=self.timeout_s)
        except WeightSyncError:
            raise
        except Exception as exc:  # noqa: BLE001 (a broken group: gloo's RuntimeError, Ray's)
            raise self._failure(refs, exc, f"the sync of weights version {version}") from None

    def _setup(self, state: dict[str, Tensor]) -> None:
        import ray

        layout = layout_of(state)
        try:
            gpus = ray.get([a.check_weight_layout.remote(layout) for a in self.actors],
                           timeout=self.timeout_s)  # fmt: skip
        except ray.exceptions.RayTaskError as exc:  # the actor's own one-line WeightSyncError
            raise (exc.cause if isinstance(exc.cause, WeightSyncError) else exc) from None
        self.backend = _backend(gpus)
        host = ray.util.get_node_ip_address()
        world = len(self.actors) + 1
        sender = WeightSender.serve(host, world, layout, self.bucket_bytes, self.backend,
                                    self.timeout_s)  # fmt: skip
        refs = [a.join_weight_sync.remote(host, sender.port, j + 1, world, layout,
                                          self.bucket_bytes, self.backend, self.timeout_s)
                for j, a in enumerate(self.actors)]  # fmt: skip
        try:
            _connect_watching(sender, refs, self.timeout_s)
        except Exception as exc:  # noqa: BLE001
            raise self._failure(refs, exc, "the weight-sync group's set-up") from None
        self.sender = sender
        log.info("weight sync: %s broadcast to %d inference actors, %d buckets",
                 self.backend, len(self.actors), len(sender.buckets))  # fmt: skip

    def _failure(self, refs: list, exc: Exception, what: str) -> RuntimeError:
        """One line naming the first inference actor that died (or failed) during ``what``."""
        import ray

        pending = list(refs)
        deadline = time.monotonic() + self.timeout_s
        failed = None
        while pending and time.monotonic() < deadline:
            ready, pending = ray.wait(pending, num_returns=1,
                                      timeout=max(0.0, deadline - time.monotonic()))  # fmt: skip
            for ref in ready:
                try:
                    ray.get(ref)
                except ray.exceptions.RayActorError as err:  # dead: the likeliest cause
                    return _gone(refs.index(ref), len(refs), type(err).__name__, what)
                except Exception as err:  # noqa: BLE001
                    failed = failed or (refs.index(ref), err)
        if failed is not None:
            j, err = failed
            cause = getattr(err, "cause", None) or err
            first = (str(cause).strip().splitlines() or [""])[0][:200]
            return RuntimeError(f"inference actor {j} of {len(refs)} failed in {what} "
                                f"({type(cause).__name__}: {first}); resume the run from its "
                                f"last checkpoint (rig train --resume)")  # fmt: skip
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        return RuntimeError(f"the weight broadcast to the inference actors failed in {what} "
                            f"({type(exc).__name__}: {first}); resume the run from its last "
                            f"checkpoint (rig train --resume)")  # fmt: skip


def _connect_watching(sender: WeightSender, refs: list, timeout_s: float) -> None:
    """``sender.connect()`` (which blocks until every rank has joined) while watching the
    actors' ``join_weight_sync`` calls: one that fails or whose actor dies raises at once
    instead of after ``timeout_s``, the time the group would wait for the missing rank. The
    connecting thread is left to time out on its own (a daemon; the run is failing anyway)."""
    import threading

    import ray

    failed: list[BaseException] = []

    def connect() -> None:
        try:
            sender.connect()
        except BaseException as exc:  # noqa: BLE001 (re-raised in the caller's thread)
            failed.append(exc)

    thread = threading.Thread(target=connect, name="weight-sync-connect", daemon=True)
    thread.start()
    deadline, pending = time.monotonic() + timeout_s, list(refs)
    while thread.is_alive() or pending:
        if time.monotonic() > deadline:
            raise TimeoutError(f"the group was not complete after {timeout_s:.0f} s")
        if pending:
            ready, pending = ray.wait(pending, num_returns=len(pending), timeout=0.2)
            ray.get(ready)  # an actor that died or failed to join raises here
        else:
            thread.join(0.2)
    if failed:
        raise failed[0]


def _gone(j: int, n: int, kind: str, what: str) -> RuntimeError:
    return RuntimeError(f"inference actor {j} of {n} is gone ({kind}) in {what}; the env "
                        f"runners it served cannot act. Resume the run from its last checkpoint "
                        f"(rig train --resume)")  # fmt: skip


def _backend(actor_gpus: list[str | None]) -> str:
    """nccl when this process and every actor hold a CUDA device, no two the same GPU."""
    if not (dist.is_nccl_available() and torch.cuda.is_available()):
        return "gloo"
    mine = gpu_id(torch.device("cuda", torch.cuda.current_device()))
    ids = [mine, *actor_gpus]
    return "nccl" if None not in ids and len(set(ids)) == len(ids) else "gloo"


def gpu_id(device: torch.device) -> str | None:
    """The physical GPU behind ``device`` (its UUID), None on the CPU."""
    if device.type != "cuda":
        return None
    return str(torch.cuda.get_device_properties(device).uuid)


__all__ = ["TIMEOUT_S", "ActorBroadcast", "Bucket", "WeightReceiver", "WeightSender",
           "WeightSyncError", "check_layout", "fingerprint", "layout_of", "plan"]  # fmt: skip
