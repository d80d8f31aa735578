"""Training on several processes with ``torch.distributed`` (``torchrun``).

``harden.fit`` trains data-parallel when it runs under ``torchrun`` with ``WORLD_SIZE > 1`` (or
inside a process group the caller initialised):

- the process group is initialised (NCCL for CUDA, gloo for CPU) unless it already is, and
  destroyed at the end only when ``fit`` created it;
- rank ``r`` uses ``cuda:LOCAL_RANK`` when the policy's device is ``cuda`` or ``auto`` and GPUs
  exist, else the CPU;
- the model is wrapped in ``DistributedDataParallel`` (gradients averaged during backward); the
  adversarial views and the per-epoch probe attack the plain module in eval mode, so an attack's
  input-gradient passes never touch DDP's gradient hooks;
- each rank reads its shard of the training set (``DistributedSampler``, seeded with
  ``policy.seed``, ``set_epoch`` every epoch; ``data.batch_size`` is per rank) and evaluates its
  shard of the validation set; losses, counts and accuracies are summed over ranks;
- BatchNorm running statistics are updated by each rank from its own batches and averaged over
  ranks at the end of every epoch, so every rank ends each epoch with the same model;
- objectives that own networks (MI's estimators) average their gradients with
  :func:`average_gradients` before their own optimizer step;
- only rank 0 writes files (``policy.yaml``, checkpoints, ``model.safetensors``); the others
  wait at a barrier.

With one process every helper here is a no-op, so single-process training is unchanged.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as tdist
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from harden.data import resolve_device
from harden.errors import DataError, HardenError, PolicyError

__all__ = [
    "Distributed",
    "active",
    "average_gradients",
    "broadcast_parameters",
    "distributed_session",
    "env_world_size",
]

log = logging.getLogger("harden")


def env_world_size() -> int:
    """``WORLD_SIZE`` from the environment (1 when unset), as ``torchrun`` sets it.

    Raises:
        HardenError: the variable is not a positive integer.

    Example:
        >>> env_world_size() >= 1
        True
    """
    raw = os.environ.get("WORLD_SIZE", "1")
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise HardenError(f"expected WORLD_SIZE to be a positive integer, got {raw!r}")
    return value


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError:
        raise HardenError(f"expected {name} to be an integer, got {raw!r}") from None


def active() -> bool:
    """True inside an initialised process group of more than one process.

    Example:
        >>> active()
        False
    """
    return tdist.is_available() and tdist.is_initialized() and tdist.get_world_size() > 1


@dataclass(frozen=True)
class Distributed:
    """Where this process stands in a (possibly one-process) training job.

    Attributes:
        device: the device this rank trains on.
        rank: global rank (0 writes the files).
        world_size: number of processes (1: not distributed).
        local_rank: rank on this machine (the CUDA device index).
        owns_group: this job initialised the process group (and destroys it).

    Example:
        >>> d = Distributed(torch.device("cpu"))
        >>> d.enabled, d.is_main, d.all_sum([1.0, 2.0])
        (False, True, [1.0, 2.0])
    """

    device: torch.device
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = field(default=False, compare=False)

    @property
    def enabled(self) -> bool:
        """More than one process."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes files and shows progress."""
        return self.rank == 0

    def barrier(self) -> None:
        """Wait for every rank (no-op with one process)."""
        if self.enabled:
            if self.device.type == "cuda":
                tdist.barrier(device_ids=[self.device.index or 0])
            else:
                tdist.barrier()

    def all_sum(self, values: Sequence[float]) -> list[float]:
        """Element-wise sum of ``values`` over ranks (one collective; float64)."""
        if not self.enabled or not values:
            return [float(v) for v in values]
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.device)
        tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
        return t.tolist()

    def any(self, flag: bool) -> bool:
        """True when ``flag`` is true on any rank (every rank gets the same answer)."""
        return self.all_sum([1.0 if flag else 0.0])[0] > 0 if self.enabled else flag

    def wrap(self, model: nn.Module) -> nn.Module:
        """``DistributedDataParallel(model)`` (rank 0's weights are broadcast); ``model`` with one process.

        Buffers are not broadcast at every forward (a step runs several forwards on different
        views); :meth:`average_buffers` syncs them once per epoch instead.
        """
        if not self.enabled:
            return model
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False)

    def average_buffers(self, model: nn.Module) -> None:
        """Average every floating-point buffer (BatchNorm running statistics) over ranks."""
        if not self.enabled:
            return
        with torch.no_grad():
            for buf in model.buffers():
                if buf.is_floating_point():
                    tdist.all_reduce(buf, op=tdist.ReduceOp.SUM)
                    buf.div_(self.world_size)

    def shard(self, dataset: Dataset[Any]) -> Dataset[Any]:
        """This rank's strided shard ``rank, rank + world_size, ...`` of ``dataset`` (for evaluation)."""
        if not self.enabled:
            return dataset
        return Subset(dataset, range(self.rank, len(dataset), self.world_size))  # type: ignore[arg-type]

    def share(self, first: int, n: int) -> int:
        """How many of the first ``min(first, n)`` examples fall in this rank's :meth:`shard`.

        Example:
            >>> Distributed(torch.device("cpu"), rank=1, world_size=2).share(5, 100)
            2
        """
        m = min(first, n)
        return len(range(self.rank, m, self.world_size)) if self.enabled else m

    def train_loader(
        self, data: Dataset[Any] | DataLoader[Any], batch_size: int, seed: int, epoch: int, num_workers: int
    ) -> DataLoader[Any]:
        """This rank's training loader for ``epoch``: a ``DistributedSampler`` seeded with ``seed``.

        A DataLoader the caller built is used as is when its sampler is a ``DistributedSampler``
        (its ``set_epoch`` is called); any other DataLoader is refused, since every rank would
        read all of it.

        Raises:
            DataError: a DataLoader without a ``DistributedSampler``.
        """
        if isinstance(data, DataLoader):
            if not isinstance(data.sampler, DistributedSampler):
                raise DataError(
                    f"expected a Dataset, or a DataLoader with a DistributedSampler, for training on "
                    f"{self.world_size} processes, got a DataLoader with {type(data.sampler).__name__}"
                )
            data.sampler.set_epoch(epoch)
            return data
        sampler: DistributedSampler[Any] = DistributedSampler(
            data, num_replicas=self.world_size, rank=self.rank, shuffle=True, seed=seed, drop_last=False
        )
        sampler.set_epoch(epoch)
        gen = torch.Generator().manual_seed(seed * 100_003 + epoch)  # worker seeds
        return DataLoader(data, batch_size=batch_size, sampler=sampler, generator=gen, num_workers=num_workers)

    def epoch_seed(self, seed: int, epoch: int) -> int:
        """The torch seed of ``epoch`` on this rank (attacks' random starts differ between ranks).

        Example:
            >>> d = Distributed(torch.device("cpu"), rank=1, world_size=2)
            >>> d.epoch_seed(0, 3) != Distributed(torch.device("cpu"), rank=0, world_size=2).epoch_seed(0, 3)
            True
        """
        return (seed * 1_000_003 + epoch * 10_007 + self.rank + 1) % (2**63)


def _rank_device(name: str, local_rank: int, world_size: int) -> torch.device:
    """The device of one rank: ``cuda:LOCAL_RANK`` for ``cuda``/``auto`` with GPUs, else the CPU."""
    if world_size == 1:
        return resolve_device(name)
    if name.startswith("cuda:"):
        raise PolicyError(
            f"expected device 'cuda' or 'auto' when training on {world_size} processes (rank r uses "
            f"cuda:LOCAL_RANK), got {name!r}"
        )
    if name == "mps":
        raise PolicyError(f"expected device 'cpu', 'cuda' or 'auto' for {world_size} processes, got 'mps'")
    if name in ("cuda", "auto") and torch.cuda.is_available():
        count = torch.cuda.device_count()
        if local_rank >= count:
            raise HardenError(
                f"expected a GPU for LOCAL_RANK {local_rank}, got {count} GPU(s); use --nproc_per_node={count}"
            )
        return torch.device("cuda", local_rank)
    return resolve_device(name)  # cpu, or auto without GPUs; 'cuda' without GPUs raises here


@contextmanager
def distributed_session(device_name: str) -> Iterator[Distributed]:
    """This process's place in the job; initialises the process group under ``torchrun``.

    Args:
        device_name: the policy's ``device``.

    Yields:
        A :class:`Distributed`; ``world_size`` 1 when not under ``torchrun``.

    Example:
        >>> with distributed_session("cpu") as d:
        ...     d.world_size, d.device
        (1, device(type='cpu'))
    """
    owns = False
    if tdist.is_available() and tdist.is_initialized():
        rank, world = tdist.get_rank(), tdist.get_world_size()
        local = _env_int("LOCAL_RANK", rank if world > 1 else 0)
        device = _rank_device(device_name, local, world)
    else:
        world = env_world_size()
        rank, local = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
        device = _rank_device(device_name, local, world)
        if world > 1:
            if not tdist.is_available():
                raise HardenError("expected torch.distributed for WORLD_SIZE > 1, got a torch built without it")
            backend = "nccl" if device.type == "cuda" else "gloo"
            if device.type == "cuda":
                torch.cuda.set_device(device)
            tdist.init_process_group(backend=backend)
            owns = True
            rank, world = tdist.get_rank(), tdist.get_world_size()
            log.info("rank %d of %d on %s (%s)", rank, world, device, backend)
    try:
        yield Distributed(device, rank, world, local, owns)
    finally:
        if owns and tdist.is_initialized():
            tdist.destroy_process_group()


def _flat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def average_gradients(params: Iterable[nn.Parameter]) -> None:
    """Average the gradients of ``params`` over ranks in one all-reduce (no-op with one process).

    For networks trained outside DDP with their own optimizer (MI's estimators): every rank
    must call it with the same parameters, in the same order, before its optimizer step. A
    missing gradient counts as zero.

    Example:
        >>> lin = nn.Linear(2, 1)
        >>> lin(torch.ones(1, 2)).sum().backward()
        >>> average_gradients(lin.parameters())
        >>> lin.bias.grad.tolist()
        [1.0]
    """
    if not active():
        return
    ps = list(params)
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in ps]
    if not grads:
        return
    flat = _flat(grads)
    tdist.all_reduce(flat, op=tdist.ReduceOp.SUM)
    flat.div_(tdist.get_world_size())
    offset = 0
    for p, g in zip(ps, grads, strict=True):
        n = g.numel()
        p.grad = flat[offset : offset + n].view_as(p).clone()
        offset += n


def broadcast_parameters(modules: Iterable[nn.Module]) -> None:
    """Copy rank 0's parameters and buffers of ``modules`` to every rank (no-op with one process).

    Example:
        >>> broadcast_parameters([nn.Linear(2, 1)])
    """
    if not active():
        return
    with torch.no_grad():
        for module in modules:
            for t in [*module.parameters(), *module.buffers()]:
                tdist.broadcast(t.data, src=0)
