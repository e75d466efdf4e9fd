"""Helpers for the bundles' ``multi_gpu_train.json`` (torchrun, one process a GPU; gloo on CPU)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["LOG_ONLY_HANDLERS", "rank_handlers"]

#: handlers that only print or log: on ranks other than 0 they would repeat rank 0's lines and files
LOG_ONLY_HANDLERS: tuple[str, ...] = ("StatsHandler", "TensorBoardStatsHandler")


def rank_handlers(handlers: Sequence[Any] | None, rank: int | None = None) -> list[Any]:
    """The engine handlers this process attaches under DistributedDataParallel.

    Rank 0 keeps every handler; the other ranks drop the log-only ones (:data:`LOG_ONLY_HANDLERS`) and keep the
    rest. They must keep them: ``MetricsSaver`` gathers its values from every rank, ``CheckpointSaver`` and
    ``EarlyStopHandler`` must decide alike on every rank (ignite writes the file on rank 0 only), and a handler that
    runs a collective on rank 0 alone leaves rank 0 waiting for ever. ``rank`` defaults to the process group's.
    """
    if rank is None:
        import torch.distributed as dist

        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    handlers = list(handlers or [])
    if rank == 0:
        return handlers
    return [h for h in handlers if type(h).__name__ not in LOG_ONLY_HANDLERS]
