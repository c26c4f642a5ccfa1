"""MSL across processes with torch.distributed: each rank holds the draws of a shard of persons.

The units are cut into the same chunks as in one process (:class:`mixlogit.msl.MSLProblem`); rank ``r`` of
``W`` computes a contiguous block of them and keeps the draws of those units only (:class:`ShardRule`). Every
value, gradient, score and Hessian is a table of per-chunk results: each rank fills its own entries, one
``all_reduce`` (gloo on the CPU, NCCL on GPUs) adds the zeros of the other ranks' rows, which is exact, and every
rank then sums the rows in chunk order. So a run on any number of ranks gives bit for bit the estimates of one
process, and every rank holds the same result.

Ranks that hold different models, data or draws would silently fit a mixture of problems. :func:`shard_problem`
all-gathers a hash of each rank's spec, data, draws and settings and refuses, before any fitting, a run whose
ranks differ, naming the ranks and what differs.
"""

from __future__ import annotations

import hashlib
import json
import os
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .draws import IntegrationRule


def world() -> tuple[int, int]:
    """``(rank, world size)`` of the default process group; ``(0, 1)`` when torch.distributed is not in use."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def launched_by_torchrun() -> bool:
    """Whether this process is one of several started by ``torchrun`` (its environment names a world > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


@contextmanager
def torchrun_group(device: torch.device):
    """Join, for the duration, the process group that ``torchrun`` describes in the environment: NCCL for CUDA
    devices (each rank on the GPU of its ``LOCAL_RANK``), gloo otherwise. Yields True when this process is one of
    several ranks, False outside torchrun. A group already initialized is used as it is, and left open."""
    if not launched_by_torchrun():
        yield False
        return
    created = not dist.is_initialized()
    if created:
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    try:
        yield True
    finally:
        if created:
            dist.destroy_process_group()


@dataclass
class ShardRule(IntegrationRule):
    """An integration rule holding the points of one shard's units only, indexed by the units' global positions.

    ``z`` is (stop - offset, R, D) for simulation draws, or (1, R, D) shared nodes (kept whole).
    """

    offset: int = 0

    def for_units(self, index: slice) -> torch.Tensor:
        if self.shared:
            return self.z
        if not isinstance(index, slice):
            raise TypeError(f"a shard's draws are indexed by a slice of units, got {type(index).__name__}")
        start, stop = index.start - self.offset, index.stop - self.offset
        if start < 0 or stop > self.z.shape[0]:
            raise IndexError(f"units {index} are outside this rank's shard (units {self.offset} to "
                             f"{self.offset + self.z.shape[0] - 1})")
        return self.z[start:stop]


@dataclass
class Shard:
    """The units one rank computes: ``units`` (a slice made of whole chunks) of a problem split over a group."""

    units: slice
    rank: int
    size: int
    group: object = None  # the process group; None: the default one

    @classmethod
    def split(cls, chunks: list[slice], rank: int, size: int, group=None) -> Shard:
        """Rank ``rank`` of ``size`` takes a contiguous block of about ``len(chunks) / size`` chunks (none when
        there are fewer chunks than ranks)."""
        first, stop = (len(chunks) * r // size for r in (rank, rank + 1))
        n = chunks[-1].stop
        lo = chunks[first].start if first < len(chunks) else n
        hi = chunks[stop - 1].stop if stop > first else lo
        return cls(slice(lo, hi), rank, size, group)

    def owns(self, piece: slice) -> bool:
        """Whether ``piece`` (a slice of units within one chunk) is this rank's to compute."""
        return self.units.start <= piece.start and piece.stop <= self.units.stop

    def reduce(self, table: torch.Tensor) -> None:
        """Sum, in place, a float64 table in which this rank filled its own pieces' entries and left the others'
        zero: each entry becomes one rank's number plus zeros, which is exact."""
        dist.all_reduce(table, op=dist.ReduceOp.SUM, group=self.group)

    def rule(self, rule: IntegrationRule) -> IntegrationRule:
        """``rule`` reduced to this shard's units (a copy of their draws; the rest is not kept)."""
        if rule.shared:
            return rule
        z = rule.z[self.units].clone()
        return ShardRule(z=z, log_weights=rule.log_weights, kind=rule.kind, coarse=rule.coarse,
                         coarse_reason=rule.coarse_reason, offset=self.units.start)


def _sha(*tensors: torch.Tensor) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(str((tuple(t.shape), str(t.dtype))).encode())
        flat = t.detach().reshape(-1)
        for s in range(0, flat.numel(), 2**22):  # in pieces: the draws of many persons are never copied whole
            h.update(flat[s:s + 2**22].cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def problem_fingerprint(problem, settings: dict) -> dict[str, str]:
    """Short hashes of what every rank must share: the spec, the data's shapes, the data, the draws (shape,
    weights and points) and ``settings`` (those that change the numbers, e.g. draw type, seed, precision)."""
    d, rule = problem.design, problem.rule
    shapes = {"units": d.n_units, "x_rand_diff": list(d.x_rand_diff.shape), "x_fixed_diff": list(d.x_fixed_diff.shape),
              "draws": list(rule.z.shape), "chunks": [[c.start, c.stop] for c in problem.chunks]}
    return {
        "spec": hashlib.sha256(json.dumps(problem.spec.to_dict(), sort_keys=True).encode()).hexdigest()[:16],
        "data shapes": hashlib.sha256(json.dumps(shapes, sort_keys=True).encode()).hexdigest()[:16],
        "data": _sha(d.x_rand_diff, d.x_fixed_diff, d.avail_diff, d.situation_mask, d.weights),
        "draws": _sha(rule.z, rule.log_weights),
        "settings": hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16],
    }


def shard_problem(problem, settings: dict, group=None):
    """Split ``problem`` (a :class:`mixlogit.msl.MSLProblem`) over the ranks of ``group``, in place: it keeps the
    draws of this rank's units only and computes their chunks; results are reduced over the group.

    Every rank must call this with the same model, data, draws and ``settings``; a ValueError on every rank names
    the ranks and the parts that differ otherwise, before any fitting. Needs an initialized process group.
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("distributed=True needs an initialized torch.distributed process group: launch with "
                         "torchrun and call torch.distributed.init_process_group first (the mixlogit command does "
                         "both under torchrun)")
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    mine = problem_fingerprint(problem, settings)
    every: list = [None] * size
    dist.all_gather_object(every, mine, group=group)
    odd = {r: [k for k in mine if every[r][k] != every[0][k]] for r in range(1, size)}
    odd = {r: parts for r, parts in odd.items() if parts}
    if odd:
        listed = "; ".join(f"rank {r} differs from rank 0 in {', '.join(parts)}" for r, parts in odd.items())
        raise ValueError(f"the ranks of this distributed fit hold different problems ({listed}): every rank must "
                         "fit the same model on the same data with the same draws (same draws, draw_type, seed, "
                         "antithetic and precision)")
    problem.shard = Shard.split(problem.chunks, rank, size, group)
    problem.rule = problem.shard.rule(problem.rule)
    return problem
