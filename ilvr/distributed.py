"""torch.distributed for folder runs under torchrun: one process per GPU (or CPU process), each making its
share of the outputs; a plain single process when not launched by torchrun."""
from __future__ import annotations

import datetime
import os
from typing import Any, Sequence

import torch

from .device import resolve_device

TIMEOUT_ENV = "ILVR_DIST_TIMEOUT"  # seconds a collective may wait for the slowest rank (default 2 h)
DEFAULT_TIMEOUT_S = 7200


class Comm:
    """torch.distributed when launched by torchrun (even with one process, so that path is the one a
    multi-GPU run takes), else a plain single process."""

    def __init__(self, device_arg: str):
        self.world = int(os.environ.get("WORLD_SIZE", "1") or 1)
        self.enabled = self.world > 1 or "TORCHELASTIC_RUN_ID" in os.environ
        self.rank = int(os.environ.get("RANK", "0") or 0) if self.enabled else 0
        self.local_rank = int(os.environ.get("LOCAL_RANK", str(self.rank)) or 0) if self.enabled else 0
        if not self.enabled:
            self.device = resolve_device(device_arg)
            return
        import torch.distributed as dist

        want_cuda = device_arg == "cuda" or (device_arg in (None, "auto") and torch.cuda.is_available())
        if device_arg not in (None, "auto", "cpu", "cuda"):
            raise ValueError(f"under torchrun each process uses its own GPU, cuda:LOCAL_RANK; pass --device cuda, "
                             f"cpu or auto (choose GPUs with CUDA_VISIBLE_DEVICES), not {device_arg!r}")
        if want_cuda:
            count = torch.cuda.device_count()
            if self.local_rank >= count:
                raise ValueError(f"process with LOCAL_RANK {self.local_rank} has no GPU: {count} visible; "
                                 f"use --nproc_per_node {count} or fewer")
            self.device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(self.device)
            backend = "nccl"
        else:
            self.device = torch.device("cpu")
            backend = "gloo"
        timeout = datetime.timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S)))
        kwargs: dict[str, Any] = {"device_id": self.device} if backend == "nccl" else {}
        dist.init_process_group(backend, timeout=timeout, **kwargs)
        self.backend = backend
        self.dist = dist

    def sum(self, values: Sequence[int]) -> list[int]:
        if not self.enabled:
            return [int(v) for v in values]
        t = torch.tensor([int(v) for v in values], dtype=torch.int64, device=self.device)
        self.dist.all_reduce(t)
        return [int(v) for v in t.tolist()]

    def broadcast(self, obj: Any) -> Any:
        if not self.enabled:
            return obj
        box = [obj]
        self.dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj: Any) -> list[Any]:
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world
        self.dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.enabled:
            self.sum([0])

    def close(self) -> None:
        if self.enabled and self.dist.is_initialized():
            self.dist.destroy_process_group()

    def say(self, text: str) -> str:
        return f"[rank {self.rank}] {text}" if self.enabled else text


class AnotherRankFailed(RuntimeError):
    pass


def agree(comm: Comm, error: BaseException | None) -> None:
    """Raise on every rank if any rank failed (so none is left waiting in a collective)."""
    failures = comm.sum([error is not None])[0]
    if error is not None:
        raise error
    if failures:
        raise AnotherRankFailed(f"{failures} other process(es) failed; see their messages")
