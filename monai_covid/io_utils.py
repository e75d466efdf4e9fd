"""Atomic output writers: a killed run never leaves a half-written file behind.

Every writer stages its bytes in a temporary file in the destination folder and renames it into place
(``os.replace`` is atomic on POSIX within one file system).
"""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "atomic_write_bytes",
    "atomic_write_text",
    "atomic_write_json",
    "atomic_write_csv",
    "atomic_save_png",
    "atomic_save_with",
    "save_fp16",
]


def _umask_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary sibling file and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _umask_mode())  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_save_with(path: str | os.PathLike, writer, suffix: str | None = None) -> Path:
    """Call ``writer(tmp_path)`` for libraries that write by file name (SimpleITK, pydicom), then rename.

    ``suffix`` defaults to the destination's full suffix (``.nii.gz`` kept whole) so that writers which pick a
    format from the file name still do.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix is None:
        suffix = "".join(path.suffixes) or ".tmp"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".part{suffix}", dir=path.parent)
    os.close(fd)
    try:
        writer(tmp)
        os.chmod(tmp, _umask_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, default=_json_default) + "\n")


def atomic_write_csv(
    path: str | os.PathLike, rows: Iterable[Mapping[str, Any]], fieldnames: Sequence[str]
) -> Path:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(fieldnames), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow(row)
    return atomic_write_text(path, buf.getvalue())


def atomic_save_png(path: str | os.PathLike, array: np.ndarray) -> Path:
    """Save a uint8 (H, W), (H, W, 3) or (H, W, 4) array as PNG."""
    from PIL import Image

    array = np.asarray(array)
    if array.dtype != np.uint8:
        raise TypeError(f"atomic_save_png expects uint8, got {array.dtype} for {path}")
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return atomic_write_bytes(path, buf.getvalue())


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def save_fp16(state: Any, path: str | os.PathLike) -> Path:
    """Write a state_dict with its floating tensors in fp16 (how the bundles ship weights), atomically.

    ``state``: a state_dict, a module (a ``DistributedDataParallel``/``DataParallel`` wrapper is unwrapped) or the
    path of a saved state_dict (read with ``weights_only=True``; ``path`` may be that same file).
    """
    import torch

    if isinstance(state, (str, os.PathLike)):
        state = torch.load(state, map_location="cpu", weights_only=True)
    elif isinstance(state, torch.nn.Module):
        wrappers = (torch.nn.DataParallel, torch.nn.parallel.DistributedDataParallel)
        state = (state.module if isinstance(state, wrappers) else state).state_dict()
    state = {k: v.detach().cpu().half() if torch.is_floating_point(v) else v for k, v in state.items()}
    buf = io.BytesIO()
    torch.save(state, buf)
    return atomic_write_bytes(path, buf.getvalue())
